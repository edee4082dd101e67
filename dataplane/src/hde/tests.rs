use super::*;
use crate::control::effort::*;
use proptest::prelude::*;

#[test]
fn the_reference_index_finds_every_block_before_and_after_its_filter_is_built() {
    let mut img = vec![0u8; 512 * PAGE];
    crate::source::generate(9, 0, &mut img);
    let mut ix = RefIndex::default();
    let mut added = Vec::new();
    for (no, p) in img.chunks_exact(PAGE).enumerate() {
        ix.add(no as u64, p);
        added.extend(p.chunks_exact(16).map(block_hash).filter(|&h| sampled(h)));
        assert_eq!(ix.1.0.is_empty(), ix.0.len() < FILTER_FROM, "filter built at {FILTER_FROM} blocks, not before");
        assert!(added.iter().all(|&h| ix.get(h).is_some()), "a block indexed is found (page {no})");
    }
    assert!(!ix.1.0.is_empty(), "the image indexes more than {FILTER_FROM} blocks");
}


fn page_of(kind: u8, seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    match kind % 4 {
        0 => {}
        1 => crate::source::generate(seed, 0, &mut p),
        2 => {
            for (i, b) in p.iter_mut().enumerate() {
                *b = ((i as u64 * 31 + seed) % 7) as u8 + b'a';
            }
        }
        _ => {
            let mut s = seed | 1;
            for b in p.iter_mut() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *b = s as u8;
            }
        }
    }
    p
}

fn roundtrip(round1: &[(u64, Vec<u8>)], round2: &[(u64, Vec<u8>)]) {
    let mut enc = Encoder::new(3, None).unwrap();
    let mut dec = Decoder::new(None).unwrap();
    let mut rx = MemStore(HashMap::new());
    let mut stats = EncodeStats::default();
    for round in [round1, round2] {
        let refs: Vec<(u64, &[u8])> = round.iter().map(|(n, p)| (*n, p.as_slice())).collect();
        let snapshot = rx.0.clone();
        let old = |no: u64| snapshot.get(&no).map(Vec::as_slice);
        // Pages this round does not touch keep the receiver's copy: references.
        let stable = |no: u64| if round.iter().any(|p| p.0 == no) { None } else { snapshot.get(&no).map(Vec::as_slice) };
        let f = enc.encode_with_refs(&refs, &old, &stable, &mut stats);
        let r = dec.decode(&f, &mut rx).unwrap();
        assert!(r.rejected.is_empty(), "{:?}", r.rejected);
        let r = Decoder::retry(&r.deferred, &mut rx);
        assert!(r.rejected.is_empty(), "{:?}", r.rejected);
        for (n, p) in round {
            assert_eq!(rx.0.get(n), Some(p), "page {n}");
        }
    }
}

/// A receiver's shard decoding one chunk: it may write pages `[.0, .1)` only.
struct Chunk(u64, u64, MemStore);
impl PageStore for Chunk {
    fn get(&self, no: u64) -> Option<&[u8]> {
        self.2.get(no)
    }
    fn put(&mut self, no: u64, page: &[u8]) {
        assert!(self.owns(no), "page {no} written outside its chunk");
        self.2.put(no, page);
    }
    fn owns(&self, no: u64) -> bool {
        (self.0..self.1).contains(&no)
    }
}

#[test]
fn a_page_outside_the_frames_chunk_is_refused_and_the_others_still_apply() {
    let mut enc = Encoder::new(3, None).unwrap();
    let mut dec = Decoder::new(None).unwrap();
    let mut stats = EncodeStats::default();
    // Literal, zero, random (raw) and text pages, one of each kind outside the chunk 4..8.
    let pages: Vec<(u64, Vec<u8>)> = (0..8).map(|i| (i, page_of(i as u8 + 2, i))).collect();
    let refs: Vec<(u64, &[u8])> = pages.iter().map(|(n, p)| (*n, p.as_slice())).collect();
    let f = enc.encode(&refs, &|_| None, &mut stats);
    let mut rx = Chunk(4, 8, MemStore(HashMap::new()));
    let r = dec.decode(&f, &mut rx).unwrap();
    let refused: Vec<u64> = r.rejected.iter().map(|x| x.0).collect();
    assert_eq!(refused, vec![0, 1, 2, 3]);
    assert!(r.rejected.iter().all(|x| x.1 == "page outside the frame's chunk"));
    // The blocks' pages after refused ones still land on the right page numbers.
    for (n, p) in &pages[4..] {
        assert_eq!(rx.2.0.get(n), Some(p), "page {n}");
    }
}

#[test]
fn xbzrle_roundtrip_and_limit() {
    let old = page_of(1, 1);
    let mut new = old.clone();
    new[100..110].fill(9);
    new[4000] ^= 1;
    let d = xbzrle_encode(&old, &new, PAGE).unwrap();
    assert!(d.len() < 30);
    let mut out = vec![0u8; PAGE];
    xbzrle_decode(&old, &d, &mut out).unwrap();
    assert_eq!(out, new);
    assert!(xbzrle_encode(&old, &page_of(3, 9), 100).is_none());
}

#[test]
fn xbzrle_rejects_runs_past_the_page() {
    let old = vec![0u8; PAGE];
    let mut out = vec![0u8; PAGE];
    // Found by the fuzz target: a skip near u64::MAX used to overflow.
    let mut d = Vec::new();
    put_leb(&mut d, u64::MAX - 2);
    put_leb(&mut d, 5);
    d.extend_from_slice(&[1; 5]);
    assert!(xbzrle_decode(&old, &d, &mut out).is_none());
    let mut d = Vec::new();
    put_leb(&mut d, 4090);
    put_leb(&mut d, 10);
    d.extend_from_slice(&[1; 10]);
    assert!(xbzrle_decode(&old, &d, &mut out).is_none());
}

#[test]
fn classes_are_chosen() {
    let mut enc = Encoder::new(3, None).unwrap();
    let mut st = EncodeStats::default();
    let a = page_of(2, 5);
    let mut b = a.clone();
    b[7] ^= 0xff;
    let zero = vec![0u8; PAGE];
    let text: Vec<u8> = (0..PAGE).map(|i| b"migration of a page "[i % 20]).collect();
    let rnd = page_of(3, 4);
    let held = HashMap::from([(1u64, a.clone())]);
    let old = |no: u64| held.get(&no).map(Vec::as_slice);
    enc.encode(&[(9, &a)], &|_| None, &mut st);
    let pages: Vec<(u64, &[u8])> = vec![(0, &zero), (1, &b), (2, &a), (3, &text), (4, &rnd)];
    let mut st = EncodeStats::default();
    enc.encode(&pages, &old, &mut st);
    assert_eq!(st.pages.get(&Kind::Zero), Some(&1));
    assert_eq!(st.pages.get(&Kind::Xbzrle), Some(&1));
    assert_eq!(st.pages.get(&Kind::Dup), Some(&1));
    assert_eq!(st.pages.get(&Kind::Literal), Some(&2), "text and noise share one literal block");
    assert_eq!(st.pages.get(&Kind::Raw), None);
    // A page far from its old copy goes to the delta block.
    let mut c = a.clone();
    for i in (0..PAGE).step_by(16) {
        c[i] ^= 0x33;
    }
    let mut st = EncodeStats::default();
    enc.encode(&[(1, &c)], &old, &mut st);
    assert_eq!(st.pages.get(&Kind::ZstdDelta), Some(&1));
    // A frame of noise alone does not compress: raw.
    let mut st = EncodeStats::default();
    enc.encode(&[(20, &page_of(3, 77)), (21, &page_of(3, 78))], &|_| None, &mut st);
    assert_eq!(st.pages.get(&Kind::Raw), Some(&2));
}

#[test]
fn duplicates_of_pages_later_in_the_round_are_deferred_then_applied() {
    let mut enc = Encoder::new(3, None).unwrap();
    let mut dec = Decoder::new(None).unwrap();
    let a = page_of(2, 42);
    // Frame 1 carries page 3; frame 2 carries page 8, a duplicate of page 3.
    let f1 = enc.encode(&[(3, &a)], &|_| None, &mut EncodeStats::default());
    let f2 = enc.encode(&[(8, &a)], &|_| None, &mut EncodeStats::default());
    let mut rx = MemStore(HashMap::new());
    // Frame 2 arrives first (another stream was faster).
    let r2 = dec.decode(&f2, &mut rx).unwrap();
    assert_eq!((r2.applied, r2.deferred.len()), (0, 1));
    assert!(!rx.0.contains_key(&8));
    dec.decode(&f1, &mut rx).unwrap();
    let r = Decoder::retry(&r2.deferred, &mut rx);
    assert_eq!((r.applied, r.rejected.len()), (1, 0));
    assert_eq!(rx.0[&8], a);
    // Next round: page 3 is dirty, so it is no longer a source for duplicates.
    enc.begin_round([3]);
    let mut st = EncodeStats::default();
    enc.encode(&[(12, &a)], &|_| None, &mut st);
    assert_eq!(st.pages.get(&Kind::Dup), Some(&1), "page 8 still holds it");
    enc.begin_round([8, 12]);
    let mut st = EncodeStats::default();
    enc.encode(&[(13, &a)], &|_| None, &mut st);
    assert_eq!(st.pages.get(&Kind::Dup), None, "every holder is dirty");
}

#[test]
fn a_block_that_decodes_short_is_refused() {
    // Found by the fuzz target: a literal block decoding to zero bytes once passed the
    // length check (zstd had set the scratch Vec's length to what it wrote).
    let mut enc = Encoder::new(3, None).unwrap();
    let text: Vec<u8> = (0..PAGE).map(|i| b"page "[i % 5]).collect();
    let f = enc.encode(&[(1, &text)], &|_| None, &mut EncodeStats::default());
    let lit_len = u32::from_le_bytes(f[8..12].try_into().unwrap()) as usize;
    let empty = zstd::bulk::compress(b"", 3).unwrap();
    let mut bad = f[..f.len() - lit_len].to_vec();
    bad[8..12].copy_from_slice(&(empty.len() as u32).to_le_bytes());
    // The header is under the page list's checksum: a sender's own frame, to reach the block.
    let listed = bad.len() - 8;
    let sum = list_sum(&bad[..listed]);
    bad[listed..].copy_from_slice(&sum.to_le_bytes());
    bad.extend_from_slice(&empty);
    let mut rx = MemStore(HashMap::new());
    let r = Decoder::new(None).unwrap().decode(&bad, &mut rx).unwrap();
    assert_eq!(r.rejected, vec![(1, "literal block decodes to the wrong length")]);
    assert!(rx.0.is_empty());
}

#[test]
fn a_zero_page_moved_by_a_flipped_bit_is_refused_with_its_frame() {
    // Found by the flipped-bit property: a zero page carries no checksum of its own, so a
    // flipped bit in its page number once wrote zeros over another page.
    let mut enc = Encoder::new(3, None).unwrap();
    let text: Vec<u8> = (0..PAGE).map(|i| b"page "[i % 5]).collect();
    let zero = vec![0u8; PAGE];
    let f = enc.encode(&[(1, &text), (2, &zero)], &|_| None, &mut EncodeStats::default());
    // Entries start after the header (no references): page 1's step, kind, sum; page 2's step.
    let at = HEADER + 1 + 1 + 8;
    assert_eq!((f[at], f[at + 1]), (0, Kind::Zero as u8), "page 2 follows page 1 as a zero page");
    let mut bad = f.clone();
    bad[at] ^= 4;
    let mut rx = MemStore(HashMap::new());
    assert_eq!(Decoder::new(None).unwrap().decode(&bad, &mut rx).err(), Some(HdeError::Corrupt));
    assert!(rx.0.is_empty());
    assert_eq!(Decoder::new(None).unwrap().decode(&f, &mut rx).unwrap().applied, 2);
}

#[test]
fn auto_effort_follows_the_link() {
    let e = &DEFAULT_ESTIMATES;
    // 100 Gbit/s with 2 cores: compression only slows it down.
    assert_eq!(choose_level(100e9, 2, e), None);
    // 10 Gbit/s, 2 cores: raw at line rate (1.25 GB/s) beats level 1 (0.7 GB/s).
    assert_eq!(choose_level(10e9, 2, e), None);
    // 4 Gbit/s: level 1, as fast as the cores can go (0.7 GB/s, where raw is 0.5).
    assert_eq!(choose_level(4e9, 2, e), Some(1));
    // 1 Gbit/s: level 3 (0.4 GB/s through the link, 0.5 from the cores); level 9's cores
    // (0.12 GB/s) would be the bottleneck.
    assert_eq!(choose_level(1e9, 2, e), Some(3));
    // 200 Mbit/s: the link is the bottleneck at every level; the best ratio the cores can
    // feed (level 9: 25 MB/s x 3.5 < 0.12 GB/s).
    assert_eq!(choose_level(200e6, 2, e), Some(9));
    // The state a sender keeps: chosen every 250 ms of its clock; incompressible data (ratio
    // 1.0 measured) makes every level's ratio fall, and raw wins at 200 Mbit/s too.
    let mut eff = Effort::new(200e6, 1);
    assert_eq!(eff.level(), Some(3));
    assert_eq!(eff.choose(0.0, 0, 0.0), None, "the first call starts the clock");
    assert_eq!(eff.choose(0.1, 1 << 20, 0.0), None, "within 250 ms");
    for k in 0..40 {
        eff.observe(1 << 20, 1 << 20, 0.004);
        if let Some(l) = eff.choose(0.3 * f64::from(k + 1), (k as u64 + 1) << 20, 200e6) {
            eff.set(l);
        }
        if eff.level().is_none() {
            break;
        }
    }
    assert_eq!(eff.level(), None, "{eff:?}");
    // Without zstd nothing measures compressibility: level 1 gets a look every 2 s, and
    // data that compresses again brings zstd back.
    let mut t = 12.5;
    let mut looked = 0;
    while eff.level().is_none() && t < 30.0 {
        t += 0.3;
        if let Some(l) = eff.choose(t, (t * 25e6) as u64, 200e6) {
            looked += u32::from(l == Some(1));
            eff.set(l);
        }
        if eff.level().is_some() {
            // Text: 4x at level 1.
            eff.observe(4 << 20, 1 << 20, 0.01);
            if let Some(l) = eff.choose(t + 0.3, ((t + 0.3) * 25e6) as u64, 200e6) {
                eff.set(l);
            }
            t += 0.3;
        }
    }
    assert!(looked >= 1 && eff.level().is_some(), "{eff:?}");
    // The gaps between levels survive the incompressible stretch: text at 200 Mbit/s on one
    // core settles at level 3 (the link-bound rate at 4-5x beats level 1's), not level 1.
    for _ in 0..40 {
        t += 0.3;
        // Each level at its default speed.
        let speed = DEFAULT_ESTIMATES.iter().find(|e| e.level == eff.level()).unwrap().bytes_per_s;
        eff.observe(4 << 20, 1 << 20, f64::from(4 << 20) / speed);
        if let Some(l) = eff.choose(t, (t * 25e6) as u64, 200e6) {
            eff.set(l);
        }
    }
    assert_eq!(eff.level(), Some(3), "{eff:?}");
    // And a fast link with compressible data keeps little effort: level 1 or none.
    let mut eff = Effort::new(10e9, 1);
    assert!(matches!(eff.level(), None | Some(1)), "{eff:?}");
    eff.set(Some(1));
    eff.observe(4 << 20, 1 << 20, 0.01);
    assert_eq!(eff.choose(0.0, 0, 0.0), None);
    assert!(matches!(eff.choose(1.0, 1 << 30, 10e9), None | Some(None)));
    // No zstd still compresses zero and duplicate pages.
    let mut enc = Encoder::new(3, None).unwrap();
    enc.set_level(None).unwrap();
    let mut st = EncodeStats::default();
    let text: Vec<u8> = (0..PAGE).map(|i| b"abc "[i % 4]).collect();
    enc.encode(&[(0, &vec![0u8; PAGE]), (1, &text)], &|_| None, &mut st);
    assert_eq!((st.pages.get(&Kind::Zero), st.pages.get(&Kind::Raw)), (Some(&1), Some(&1)));
}

#[test]
fn page_cache_is_bounded_and_counts_hits() {
    let mut c = PageCache::new(2 * PAGE as u64);
    for i in 0..3 {
        c.put(i, &page_of(1, i));
    }
    assert_eq!(c.bytes(), 2 * PAGE as u64);
    assert!(c.lookup(0).is_none(), "the oldest was evicted");
    assert_eq!(c.lookup(2), Some(page_of(1, 2).as_slice()));
    assert_eq!(c.counts(), (1, 1));
    assert!((c.hit_rate() - 0.5).abs() < 1e-9);
}

#[test]
fn a_stale_duplicate_is_refused_not_written() {
    let mut enc = Encoder::new(3, None).unwrap();
    let mut dec = Decoder::new(None).unwrap();
    let a = page_of(1, 1);
    let mut rx = MemStore(HashMap::new());
    let f = enc.encode(&[(5, &a)], &|_| None, &mut EncodeStats::default());
    dec.decode(&f, &mut rx).unwrap();
    // The receiver's page 5 changes behind the encoder's back; a dup of it must not apply.
    rx.0.insert(5, page_of(3, 2));
    let f = enc.encode(&[(6, &a)], &|_| None, &mut EncodeStats::default());
    let r = dec.decode(&f, &mut rx).unwrap();
    assert_eq!(r.applied, 0);
    assert!(r.rejected.is_empty() && r.deferred.len() == 1, "{r:?}");
    let r = Decoder::retry(&r.deferred, &mut rx);
    assert_eq!(r.rejected, vec![(6, "duplicate whose source never matched its checksum")]);
    assert!(!rx.0.contains_key(&6), "nothing wrong written");
}

/// Round 1 of pages 0..8 and 10 (random bytes), encoded and decoded; and a page made of half
/// of page 3 and half of page 5, at other offsets (round 2 rewrites page 10 with it).
fn after_round_one() -> (Encoder, Decoder, MemStore, Vec<u8>) {
    let mut r1: Vec<(u64, Vec<u8>)> = (0..8).map(|i| (i, page_of(3, i + 1))).collect();
    r1.push((10, page_of(3, 100)));
    let mut moved = vec![0u8; PAGE];
    moved[..2048].copy_from_slice(&r1[3].1[1024..3072]);
    moved[2048..].copy_from_slice(&r1[5].1[..2048]);
    let mut enc = Encoder::new(3, None).unwrap();
    let mut dec = Decoder::new(None).unwrap();
    let mut rx = MemStore(HashMap::new());
    let pages: Vec<(u64, &[u8])> = r1.iter().map(|(n, p)| (*n, p.as_slice())).collect();
    let f = enc.encode(&pages, &|_| None, &mut EncodeStats::default());
    assert!(dec.decode(&f, &mut rx).unwrap().rejected.is_empty());
    (enc, dec, rx, moved)
}

#[test]
fn data_moved_from_other_pages_is_sent_as_a_reference() {
    let mut sizes = Vec::new();
    for with_refs in [true, false] {
        let (mut enc, mut dec, mut rx, moved) = after_round_one();
        enc.begin_round([10]);
        let snapshot = rx.0.clone();
        let old = |no: u64| snapshot.get(&no).map(Vec::as_slice);
        let stable = |no: u64| if with_refs && no != 10 { snapshot.get(&no).map(Vec::as_slice) } else { None };
        let mut st = EncodeStats::default();
        let f = enc.encode_with_refs(&[(10, &moved)], &old, &stable, &mut st);
        // Without references the delta block does not shrink and the page goes raw.
        assert_eq!(st.pages.get(&if with_refs { Kind::ZstdDelta } else { Kind::Raw }), Some(&1));
        assert_eq!(st.refs, if with_refs { 2 } else { 0 });
        let r = dec.decode(&f, &mut rx).unwrap();
        assert!(r.rejected.is_empty(), "{r:?}");
        assert_eq!(rx.0[&10], moved);
        sizes.push(f.len());
    }
    assert!(sizes[0] * 20 < sizes[1], "with references {} bytes, without {}", sizes[0], sizes[1]);
}

/// A receiver writing a round in place while it reads references from the image as the
/// round began (`dwcp recv` of a delta round: the previous round's file).
struct Round<'a> {
    now: &'a mut MemStore,
    start: &'a HashMap<u64, Vec<u8>>,
}
impl PageStore for Round<'_> {
    fn get(&self, no: u64) -> Option<&[u8]> {
        self.now.get(no)
    }
    fn put(&mut self, no: u64, page: &[u8]) {
        self.now.put(no, page);
    }
    fn base(&self, no: u64) -> Option<&[u8]> {
        self.start.get(&no).map(Vec::as_slice)
    }
}

#[test]
fn pages_that_trade_data_in_a_round_decode_in_any_order_against_its_starting_image() {
    // Round 2 rewrites pages 3 and 5 with each other's old bytes, shifted by 5 and 7 bytes
    // (no 8-byte alignment left), in two frames that arrive in the reverse order.
    let (mut enc, _, rx, _) = after_round_one();
    let start = rx.0.clone();
    let mut new3 = b"x123 ".to_vec();
    new3.extend_from_slice(&start[&5][..PAGE - 5]);
    let mut new5 = b"row 77 ".to_vec();
    new5.extend_from_slice(&start[&3][..PAGE - 7]);
    enc.begin_round([3, 5]);
    enc.freeze_index();
    let old = |no: u64| start.get(&no).map(Vec::as_slice);
    let mut st = EncodeStats::default();
    let f3 = enc.encode_with_refs(&[(3, &new3)], &old, &old, &mut st);
    let f5 = enc.encode_with_refs(&[(5, &new5)], &old, &old, &mut st);
    assert_eq!(st.pages.get(&Kind::ZstdDelta), Some(&2), "{st:?}");
    // Random bytes: only the other page's old copy makes them small.
    assert!(f3.len() < 300 && f5.len() < 300, "frames of {} and {} bytes for two moved pages", f3.len(), f5.len());
    for (first, second) in [(&f5, &f3), (&f3, &f5)] {
        let mut now = MemStore(start.clone());
        let mut dec = Decoder::new(None).unwrap();
        for f in [first, second] {
            let r = dec.decode(f, &mut Round { now: &mut now, start: &start }).unwrap();
            assert!(r.rejected.is_empty(), "{r:?}");
        }
        assert_eq!(now.0[&3], new3);
        assert_eq!(now.0[&5], new5);
    }
    // A store that reads its current copy instead: the frame decoded second finds its
    // reference overwritten, and its page is refused, not written wrong.
    let mut now = MemStore(start.clone());
    let mut dec = Decoder::new(None).unwrap();
    assert!(dec.decode(&f5, &mut now).unwrap().rejected.is_empty());
    let r = dec.decode(&f3, &mut now).unwrap();
    assert_eq!(r.rejected.len(), 1, "{r:?}");
    assert_eq!(now.0[&3], start[&3]);
}

#[test]
fn a_new_page_made_of_pages_sent_before_is_a_ref_literal() {
    // A second frame of round 1: its page 20 (no old copy) holds halves of pages 3 and 5.
    let (mut enc, mut dec, mut rx, moved) = after_round_one();
    let snapshot = rx.0.clone();
    let mut st = EncodeStats::default();
    let f = enc.encode_with_refs(&[(20, &moved)], &|_| None, &|no| snapshot.get(&no).map(Vec::as_slice), &mut st);
    assert_eq!(st.pages.get(&Kind::RefLiteral), Some(&1), "{st:?}");
    assert!(f.len() < 200, "{} bytes for a page of moved random bytes", f.len());
    assert!(dec.decode(&f, &mut rx).unwrap().rejected.is_empty());
    assert_eq!(rx.0[&20], moved);
    // Without stable pages it is a literal page (random bytes: raw).
    let mut other = moved.clone();
    other[0] ^= 1;
    let mut st = EncodeStats::default();
    enc.encode_with_refs(&[(21, &other)], &|_| None, &|_| None, &mut st);
    assert_eq!(st.pages.get(&Kind::Raw), Some(&1), "{st:?}");
}

#[test]
fn a_reference_the_receiver_changed_writes_nothing() {
    let (mut enc, mut dec, mut rx, moved) = after_round_one();
    let snapshot = rx.0.clone();
    let old = |no: u64| snapshot.get(&no).map(Vec::as_slice);
    let stable = |no: u64| if no != 10 { snapshot.get(&no).map(Vec::as_slice) } else { None };
    let f = enc.encode_with_refs(&[(10, &moved)], &old, &stable, &mut EncodeStats::default());
    // The caller vouched wrongly: page 5 changed at the receiver before the frame arrived.
    rx.0.insert(5, page_of(3, 555));
    let before = rx.0[&10].clone();
    let r = dec.decode(&f, &mut rx).unwrap();
    assert_eq!(r.rejected.iter().map(|x| x.0).collect::<Vec<_>>(), vec![10], "{r:?}");
    assert_eq!(rx.0[&10], before, "nothing wrong written");
    // And a frame listing more references than any encoder writes is refused whole.
    let mut bad = f.clone();
    bad[16..20].copy_from_slice(&(REFS_MAX as u32 + 1).to_le_bytes());
    assert_eq!(parse(&bad, PAGES_MAX).err(), Some(HdeError::TooManyRefs { count: REFS_MAX as u32 + 1 }));
}

#[test]
fn a_dirty_log_flags_the_pages_of_its_units() {
    // Units of 2 MiB (512 pages) over an image of 1300 pages: units 0 and 2 dirty, the
    // last one short.
    let log = DirtyLog::new(vec![0b101], 2 << 20, 1300 * PAGE as u64).unwrap();
    assert!(log.is_dirty(0) && log.is_dirty(511) && !log.is_dirty(512) && log.is_dirty(1024) && log.is_dirty(1299));
    let log = DirtyLog::new(vec![0b1, 0b1], 4096, 9 * PAGE as u64).unwrap();
    assert!(log.is_dirty(0) && !log.is_dirty(1) && log.is_dirty(8), "least significant bit first");
    assert!(DirtyLog::new(vec![0; 511], 4096, 16 << 20).unwrap_err().contains("needs 512"));
    assert!(DirtyLog::new(vec![0; 1], 6000, 4096).unwrap_err().contains("whole number of 4 KiB pages"));
}

#[test]
fn trained_dictionary_roundtrip() {
    let samples: Vec<Vec<u8>> = (0..200).map(|i| page_of(2, i)).collect();
    let refs: Vec<&[u8]> = samples.iter().map(Vec::as_slice).collect();
    let dict = Encoder::train(&refs, 16 * 1024).unwrap();
    let mut enc = Encoder::new(3, Some(dict.clone())).unwrap();
    let mut dec = Decoder::new(Some(&dict)).unwrap();
    let p = page_of(2, 777);
    let mut rx = MemStore(HashMap::new());
    let f = enc.encode(&[(1, &p)], &|_| None, &mut EncodeStats::default());
    assert!(dec.decode(&f, &mut rx).unwrap().rejected.is_empty());
    assert_eq!(rx.0[&1], p);
}

/// Round 1 of one huge page's 512 pages (every third zero) through `enc` into `rx`.
fn huge_page_round1(enc: &mut Encoder, dec: &mut Decoder, rx: &mut MemStore) -> Vec<Vec<u8>> {
    let pages: Vec<Vec<u8>> = (0..512u64).map(|i| if i % 3 == 0 { vec![0; PAGE] } else { page_of(1 + (i % 3) as u8, i) }).collect();
    for half in pages.chunks(256).enumerate() {
        let refs: Vec<(u64, &[u8])> = half.1.iter().enumerate().map(|(i, p)| ((half.0 * 256 + i) as u64, p.as_slice())).collect();
        let f = enc.encode(&refs, &|_| None, &mut EncodeStats::default());
        assert!(dec.decode(&f, rx).unwrap().rejected.is_empty());
    }
    pages
}

#[test]
fn a_huge_page_sent_again_costs_what_its_changed_pages_cost() {
    // Two senders in the same state after round 1; in round 2 three pages changed. One is
    // given the huge page's dirty set (all 512 pages), the other the three pages alone.
    let (mut enc, mut dec, mut rx) = (Encoder::new(3, None).unwrap(), Decoder::new(None).unwrap(), MemStore(HashMap::new()));
    let (mut twin, mut twin_dec, mut twin_rx) = (Encoder::new(3, None).unwrap(), Decoder::new(None).unwrap(), MemStore(HashMap::new()));
    let r1 = huge_page_round1(&mut enc, &mut dec, &mut rx);
    huge_page_round1(&mut twin, &mut twin_dec, &mut twin_rx);
    let mut r2 = r1.clone();
    for no in [7usize, 301, 302] {
        r2[no][100..140].fill(0xab);
    }
    let snapshot = rx.0.clone();
    let old = |no: u64| snapshot.get(&no).map(Vec::as_slice);
    let (mut huge_bytes, mut st) = (0, EncodeStats::default());
    for (h, half) in r2.chunks(256).enumerate() {
        let refs: Vec<(u64, &[u8])> = half.iter().enumerate().map(|(i, p)| ((h * 256 + i) as u64, p.as_slice())).collect();
        let f = enc.encode(&refs, &old, &mut st);
        huge_bytes += f.len();
        let r = dec.decode(&f, &mut rx).unwrap();
        assert!(r.rejected.is_empty(), "{:?}", r.rejected);
        assert_eq!(r.applied, 256);
    }
    for (no, p) in r2.iter().enumerate() {
        assert_eq!(rx.0.get(&(no as u64)), Some(p), "page {no}");
    }
    assert_eq!(st.pages.get(&Kind::Same), Some(&(341 - 3)));
    assert_eq!(st.pages.get(&Kind::Zero), Some(&171));
    let mut changed_bytes = 0;
    for group in [vec![7u64], vec![301, 302]] {
        let refs: Vec<(u64, &[u8])> = group.iter().map(|&no| (no, r2[no as usize].as_slice())).collect();
        changed_bytes += twin.encode(&refs, &old, &mut EncodeStats::default()).len();
    }
    // Each run of zero or same pages is an entry of three bytes or four: 2 x 171 runs.
    assert!(huge_bytes <= changed_bytes + 2 * 171 * 4, "huge page {huge_bytes} B, its changed pages {changed_bytes} B");
}

#[test]
fn a_page_sent_again_that_the_receiver_lacks_is_refused_and_runs_stay_in_the_frame() {
    let mut enc = Encoder::new(3, None).unwrap();
    let p = page_of(3, 9);
    let f = enc.encode(&[(4, &p), (5, &p)], &|_| Some(p.as_slice()), &mut EncodeStats::default());
    let mut rx = MemStore(HashMap::new());
    let r = Decoder::new(None).unwrap().decode(&f, &mut rx).unwrap();
    assert_eq!(r.rejected, vec![(4, "unchanged page the receiver does not hold"), (5, "unchanged page the receiver does not hold")]);
    assert!(rx.0.is_empty());
    // A run claiming more pages than the frame holds, or a frame claiming more pages than
    // any frame holds, is refused as malformed.
    let frame = |count: u32, list: &[u8]| {
        let mut f = MAGIC.to_vec();
        for v in [count, 0, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(list);
        let sum = list_sum(&f);
        f.extend_from_slice(&sum.to_le_bytes());
        f
    };
    let same_run = Kind::Same as u8 | RUN;
    assert_eq!(parse(&frame(3, &[0, same_run, 2]), PAGES_MAX).map(|f| f.1.len()), Ok(3));
    assert_eq!(parse(&frame(3, &[0, same_run, 3]), PAGES_MAX).err(), Some(HdeError::Truncated { index: 0 }));
    assert_eq!(parse(&frame(2, &[0, Kind::Literal as u8 | RUN, 1]), PAGES_MAX).map(|f| f.1[0].kind), Ok(None));
    assert_eq!(parse(&frame(PAGES_MAX as u32 + 1, &[0, same_run, 100]), PAGES_MAX).err(), Some(HdeError::TooManyPages { count: PAGES_MAX as u32 + 1 }));
    // A frame of one chunk lists at most the chunk's pages: a header claiming more (an
    // 80-byte frame whose run would make 2^18 entries) is refused before anything is made.
    assert_eq!(parse(&frame(129, &[0, same_run, 100]), 128).err(), Some(HdeError::TooManyPages { count: 129 }));
    assert!(parse(&frame(128, &[0, same_run, 127]), 128).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn encode_decode_is_identity(r1 in prop::collection::vec((0u64..64, any::<u8>(), any::<u64>()), 1..24),
                                 r2 in prop::collection::vec((0u64..64, any::<u8>(), any::<u64>(), any::<u16>()), 0..24)) {
        let mut seen = std::collections::HashSet::new();
        let round1: Vec<(u64, Vec<u8>)> = r1.iter().filter(|x| seen.insert(x.0)).map(|&(n, k, s)| (n, page_of(k, s))).collect();
        let mut seen2 = std::collections::HashSet::new();
        let round2: Vec<(u64, Vec<u8>)> = r2.iter().filter(|x| seen2.insert(x.0)).map(|&(n, k, s, flip)| {
            // Dirty pages: some rewritten, some changed in a few bytes of what round 1 sent.
            let base = round1.iter().find(|p| p.0 == n).map(|p| p.1.clone()).unwrap_or_else(|| page_of(k, s));
            let mut p = base;
            // Some sent again as they were (a huge page's untouched 4 KiB pages).
            if flip % 5 != 0 {
                if k % 2 == 0 { p[flip as usize % PAGE] ^= 0x5a; } else { p = page_of(k / 2, s ^ 1); }
            }
            (n, p)
        }).collect();
        roundtrip(&round1, &round2);
    }

    #[test]
    fn a_flipped_bit_in_a_round_of_runs_never_writes_a_wrong_page(bit in any::<usize>()) {
        let (mut enc, mut dec, mut rx) = (Encoder::new(3, None).unwrap(), Decoder::new(None).unwrap(), MemStore(HashMap::new()));
        let r1 = huge_page_round1(&mut enc, &mut dec, &mut rx);
        let mut r2 = r1[..256].to_vec();
        r2[10][5] ^= 1;
        let snapshot = rx.0.clone();
        let refs: Vec<(u64, &[u8])> = r2.iter().enumerate().map(|(i, p)| (i as u64, p.as_slice())).collect();
        let mut f = enc.encode(&refs, &|no| snapshot.get(&no).map(Vec::as_slice), &mut EncodeStats::default());
        let bit = bit % (f.len() * 8);
        f[bit / 8] ^= 1 << (bit % 8);
        if let Ok(r) = dec.decode(&f, &mut rx) {
            for (no, p) in &rx.0 {
                // Every page holds what round 1 or round 2 sent under its number.
                prop_assert!(p == &r1[*no as usize] || r2.get(*no as usize) == Some(p), "page {}", no);
            }
            prop_assert!(r.applied <= 256);
        }
    }

    #[test]
    fn a_flipped_bit_never_writes_a_wrong_page(bit in any::<usize>(), k in any::<u8>(), s in any::<u64>()) {
        let mut enc = Encoder::new(3, None).unwrap();
        let pages: Vec<Vec<u8>> = (0..4).map(|i| page_of(k.wrapping_add(i), s + u64::from(i))).collect();
        let refs: Vec<(u64, &[u8])> = pages.iter().enumerate().map(|(i, p)| (i as u64, p.as_slice())).collect();
        let mut f = enc.encode(&refs, &|_| None, &mut EncodeStats::default());
        let bit = bit % (f.len() * 8);
        f[bit / 8] ^= 1 << (bit % 8);
        let mut rx = MemStore(HashMap::new());
        let mut dec = Decoder::new(None).unwrap();
        if let Ok(r) = dec.decode(&f, &mut rx) {
            for (no, p) in &rx.0 {
                // Whatever was written is exactly a page that was sent under that number.
                prop_assert_eq!(Some(p), pages.get(*no as usize));
            }
            prop_assert!(r.applied <= 4);
        }
    }
}

/// Writes the HDE decoder's fuzz seeds (frames of each page kind, a first and a later
/// round) under `$DWCP_FUZZ_SEEDS` (`make fuzz-seeds`).
#[test]
#[ignore = "writes the fuzz seed corpus; run by make fuzz-seeds"]
fn write_fuzz_seeds() {
    let Some(dir) = std::env::var_os("DWCP_FUZZ_SEEDS") else { return };
    let d = std::path::PathBuf::from(dir).join("hde_decoder");
    std::fs::create_dir_all(&d).unwrap();
    let mut enc = Encoder::new(3, None).unwrap();
    let pages: Vec<Vec<u8>> = (0..8u64).map(|k| if k % 3 == 0 { vec![0u8; PAGE] } else { page_of(k as u8 % 4, k) }).collect();
    let list: Vec<(u64, &[u8])> = pages.iter().enumerate().map(|(k, p)| (k as u64, p.as_slice())).collect();
    let first = enc.encode(&list, &|_| None, &mut EncodeStats::default());
    let mut changed = pages.clone();
    changed[1][100] ^= 1;
    changed[2] = changed[4].clone();
    let list2: Vec<(u64, &[u8])> = changed.iter().enumerate().map(|(k, p)| (k as u64, p.as_slice())).collect();
    let second = enc.encode(&list2, &|no| pages.get(no as usize).map(Vec::as_slice), &mut EncodeStats::default());
    // The target takes a first byte (the store's pages) before the frame.
    std::fs::write(d.join("first"), [&[0u8][..], &first].concat()).unwrap();
    std::fs::write(d.join("second"), [&[1u8][..], &second].concat()).unwrap();
}
