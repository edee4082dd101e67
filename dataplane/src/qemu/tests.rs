//! Streams laid out as QEMU 7.2 writes them (`qemu_savevm_state_header`, `ram_save_setup`,
//! `ram_save_iterate`, `ram_save_complete`, then device state and the JSON description).

use proptest::prelude::*;

use super::*;

/// A small deterministic generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.next() as u8;
        }
    }
}

const RAM: &str = "pc.ram";
const ROM: &str = "/rom@etc/acpi/tables";
const RAM_PAGES: u64 = 512;
const ROM_PAGES: u64 = 32;

struct Qemu {
    out: Vec<u8>,
    /// The guest's RAM as the source sees it.
    ram: Vec<Vec<u8>>,
    last_block: Option<&'static str>,
}

impl Qemu {
    fn new(rng: &mut Rng) -> Self {
        let mut ram = Vec::new();
        for i in 0..RAM_PAGES {
            let mut p = vec![0u8; PAGE];
            match i % 4 {
                0 => {}
                1 => rng.bytes(&mut p),
                2 => {
                    for (j, b) in p.iter_mut().enumerate() {
                        *b = b"kernel text and page tables "[(j + i as usize) % 28];
                    }
                }
                _ => p[..64].copy_from_slice(&[i as u8; 64]),
            }
            ram.push(p);
        }
        Self { out: Vec::new(), ram, last_block: None }
    }
    fn header(&mut self) {
        self.out.extend_from_slice(b"QEVM");
        self.out.extend_from_slice(&3u32.to_be_bytes());
        self.out.push(CONFIGURATION);
        let m = b"pc-i440fx-7.2";
        self.out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        self.out.extend_from_slice(m);
    }
    fn section(&mut self, t: u8, id: u32, name: &str) {
        self.out.push(t);
        self.out.extend_from_slice(&id.to_be_bytes());
        if t == SEC_START || t == SEC_FULL {
            self.out.push(name.len() as u8);
            self.out.extend_from_slice(name.as_bytes());
            self.out.extend_from_slice(&0u32.to_be_bytes());
            self.out.extend_from_slice(&(if name == "ram" { 4u32 } else { 1 }).to_be_bytes());
        }
    }
    fn footer(&mut self, id: u32) {
        self.out.push(FOOTER);
        self.out.extend_from_slice(&id.to_be_bytes());
    }
    fn setup(&mut self) {
        self.section(SEC_START, 2, "ram");
        let total = (RAM_PAGES + ROM_PAGES) * PAGE as u64;
        self.out.extend_from_slice(&(total | F_MEM_SIZE).to_be_bytes());
        for (n, p) in [(RAM, RAM_PAGES), (ROM, ROM_PAGES)] {
            self.out.push(n.len() as u8);
            self.out.extend_from_slice(n.as_bytes());
            self.out.extend_from_slice(&(p * PAGE as u64).to_be_bytes());
        }
        self.out.extend_from_slice(&F_EOS.to_be_bytes());
        self.footer(2);
    }
    fn page(&mut self, block: &'static str, index: u64, data: &[u8]) {
        let cont = if self.last_block == Some(block) { F_CONTINUE } else { 0 };
        let zero = data.iter().all(|&b| b == 0);
        let flags = if zero { F_ZERO } else { F_PAGE } | cont;
        self.out.extend_from_slice(&((index * PAGE as u64) | flags).to_be_bytes());
        if cont == 0 {
            self.out.push(block.len() as u8);
            self.out.extend_from_slice(block.as_bytes());
            self.last_block = Some(block);
        }
        if zero {
            self.out.push(0);
        } else {
            self.out.extend_from_slice(data);
        }
    }
    /// A round: `pages` of pc.ram (and, in the first, the ROM).
    fn round(&mut self, t: u8, pages: &[u64], rom: bool) {
        self.section(t, 2, "");
        for &i in pages {
            let p = self.ram[i as usize].clone();
            self.page(RAM, i, &p);
        }
        if rom {
            for i in 0..ROM_PAGES {
                self.page(ROM, i, &[i as u8 + 1; PAGE]);
            }
        }
        self.out.extend_from_slice(&F_EOS.to_be_bytes());
        self.footer(2);
    }
    /// The guest runs: it changes a few bytes of some pages, rewrites others, zeroes some.
    fn dirty(&mut self, rng: &mut Rng, n: usize) -> Vec<u64> {
        let mut v: Vec<u64> = (0..n).map(|_| rng.below(RAM_PAGES)).collect();
        v.sort_unstable();
        v.dedup();
        for &i in &v {
            let p = &mut self.ram[i as usize];
            match rng.below(8) {
                0 => rng.bytes(p),
                1 => p.fill(0),
                _ => {
                    for _ in 0..4 {
                        let at = rng.below(PAGE as u64) as usize;
                        p[at] = p[at].wrapping_add(1);
                    }
                }
            }
        }
        v
    }
    fn complete(&mut self, rng: &mut Rng) {
        let mut dev = vec![0u8; 3000];
        rng.bytes(&mut dev);
        self.section(SEC_FULL, 3, "cpu");
        self.out.extend_from_slice(&dev);
        self.footer(3);
        self.out.push(EOF);
        self.out.extend_from_slice(b"\x06\x00\x00\x00\x10{\"devices\": []}");
    }
}

/// A migration of three rounds; returns the stream and where round 2 starts and ends.
fn migration(seed: u64) -> (Vec<u8>, std::ops::Range<usize>) {
    let mut rng = Rng(seed | 1);
    let mut q = Qemu::new(&mut rng);
    q.header();
    q.setup();
    let all: Vec<u64> = (0..RAM_PAGES).collect();
    q.round(SEC_PART, &all, true);
    let r2 = q.out.len();
    let d = q.dirty(&mut rng, 120);
    q.round(SEC_PART, &d, false);
    let r2_end = q.out.len();
    let d = q.dirty(&mut rng, 20);
    q.round(SEC_END, &d, false);
    q.complete(&mut rng);
    (q.out, r2..r2_end)
}

/// Encodes `input` fed in pieces cut at `cuts`, flushing now and then as a reader would when
/// QEMU pauses; returns the encoded stream and the offset in it where each input piece ended.
fn encode(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Encoder, Vec<(usize, usize)>) {
    let mut e = Encoder::new(Some(3), 64 << 20).expect("encoder");
    let mut out = Vec::new();
    let mut marks = Vec::new();
    let mut at = 0;
    for (k, &c) in cuts.iter().chain(std::iter::once(&input.len())).enumerate() {
        let c = c.clamp(at, input.len());
        e.push(&input[at..c]);
        if k % 3 == 0 {
            e.flush();
        }
        out.extend(e.take());
        marks.push((c, out.len()));
        at = c;
    }
    e.finish();
    out.extend(e.take());
    (out, e, marks)
}

fn decode(enc: &[u8], piece: usize) -> (Vec<u8>, Result<(), QemuError>, Decoder) {
    let mut d = Decoder::new().expect("decoder");
    let mut out = Vec::new();
    for p in enc.chunks(piece.max(1)) {
        if let Err(e) = d.push(p, &mut out) {
            return (out, Err(e), d);
        }
    }
    let r = d.finish().map(|_| ());
    (out, r, d)
}

#[test]
fn a_migration_round_trips_and_later_rounds_travel_as_deltas() {
    let (input, r2) = migration(7);
    let (enc, e, marks) = encode(&input, &[100, 5000, r2.start, r2.end, input.len() - 10]);
    let (out, r, d) = decode(&enc, 65536);
    r.expect("decodes");
    assert!(out == input, "rebuilt stream differs");
    let rep = e.report();
    assert_eq!(rep.fallback, None);
    assert_eq!(d.report().fallback, None);
    assert!(rep.passthrough > 3000 && rep.passthrough < 4000, "device state passes through: {}", rep.passthrough);
    // Re-sent pages that were zero before have no old copy (a quarter of the guest is zero).
    assert!(rep.resent_pages > 100 && rep.cache_hits * 2 > rep.resent_pages, "{rep:?}");
    let deltas = rep.hde.pages.get(&hde::Kind::Xbzrle).copied().unwrap_or(0) + rep.hde.pages.get(&hde::Kind::ZstdDelta).copied().unwrap_or(0);
    assert!(deltas > 50, "small changes travel as deltas: {:?}", rep.hde.pages);
    // Round 2's share of the encoded stream, against its raw size.
    let enc_at = |input_at: usize| marks.iter().find(|m| m.0 == input_at).expect("mark").1;
    let r2_enc = enc_at(r2.end) - enc_at(r2.start);
    let r2_raw = r2.end - r2.start;
    assert!(r2_enc * 4 < r2_raw, "round 2: {r2_enc} encoded bytes for {r2_raw}");
    assert!(enc.len() < input.len() / 2, "whole: {} of {}", enc.len(), input.len());
}

#[test]
fn a_capability_that_changes_ram_records_falls_back_to_passthrough_with_the_reason() {
    let (mut input, r2) = migration(9);
    // An XBZRLE record (QEMU with the xbzrle capability) opening round 2's pages.
    let at = r2.start + 5;
    let rec = [&((3 * PAGE as u64) | 0x40 | F_CONTINUE).to_be_bytes()[..], &[1, 0, 4, 9, 9, 9, 9]].concat();
    input.splice(at..at, rec);
    let (enc, e, _) = encode(&input, &[r2.start + 7]);
    let why = e.report().fallback.clone().expect("falls back");
    assert!(why.contains("XBZRLE"), "{why}");
    let (out, r, d) = decode(&enc, 4096);
    r.expect("decodes");
    assert!(out == input);
    assert_eq!(d.report().fallback.as_deref(), Some(why.as_str()));
}

#[test]
fn other_streams_pass_through_exactly() {
    for input in [b"not a migration stream at all".to_vec(), [&b"QEVM"[..], &2u32.to_be_bytes(), b"old"].concat(), Vec::new()] {
        let (enc, e, _) = encode(&input, &[3]);
        let (out, r, _) = decode(&enc, 7);
        r.expect("decodes");
        assert_eq!(out, input);
        if !input.is_empty() {
            assert!(e.report().fallback.is_some());
        }
    }
}

#[test]
fn a_stream_cut_short_is_carried_as_far_as_it_went() {
    let (input, r2) = migration(11);
    let cut = &input[..r2.start + 1234];
    let (enc, _, _) = encode(cut, &[777]);
    let (out, r, _) = decode(&enc, 1000);
    r.expect("decodes");
    assert!(out == cut);
    // Without its end record the decoder says the source stopped mid-stream.
    let (enc, _, _) = encode(&input, &[]);
    let (out, r, _) = decode(&enc[..enc.len() - 29], 1 << 20);
    assert_eq!(r, Err(QemuError::Unfinished));
    assert!(input.starts_with(&out));
}

#[test]
fn the_wrong_stream_is_refused() {
    let mut d = Decoder::new().expect("decoder");
    assert_eq!(d.push(b"QEVM\0\0\0\x03junk", &mut Vec::new()), Err(QemuError::NotPageAware));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any split of the input and of the encoded stream gives back the input.
    #[test]
    fn any_split_round_trips(seed in 1u64.., cuts in proptest::collection::vec(0usize..3_000_000, 0..12), piece in 1usize..200_000) {
        let (input, _) = migration(seed);
        let mut cuts = cuts;
        cuts.sort_unstable();
        let (enc, _, _) = encode(&input, &cuts);
        let (out, r, _) = decode(&enc, piece);
        prop_assert!(r.is_ok());
        prop_assert!(out == input);
    }

    /// A flipped bit anywhere in the encoded stream never changes what reaches QEMU: that is a
    /// prefix of what the source wrote, and the stream counts as complete only if it is all of
    /// it, exactly. (Zero pages carry no checksum in an HDE frame: a flip in one's page number,
    /// as seed 188 found, zeroes another page of the receiver's copy while QEMU's bytes, rebuilt
    /// from the skeleton, stay exact; a later delta against that page would fail its checksum.
    /// On the wire every chunk is checksummed too.)
    #[test]
    fn a_flipped_bit_never_reaches_qemu(seed in 1u64..1000, pos in 0.0f64..1.0, bit in 0u8..8) {
        let (input, _) = migration(seed);
        let (mut enc, _, _) = encode(&input, &[]);
        let at = ((enc.len() - 1) as f64 * pos) as usize;
        enc[at] ^= 1 << bit;
        let (out, r, _) = decode(&enc, 1 << 16);
        prop_assert!(input.starts_with(&out), "bytes that differ reached QEMU (flip at {})", at);
        prop_assert!(r.is_err() || out == input, "a flip at {} changed the stream and went unnoticed", at);
    }
}

#[test]
fn the_effort_may_change_between_batches() {
    // `--compress auto` moves the level as the link and the data go: every batch decodes
    // whatever level (or none) encoded it, and the report counts batches per level.
    let (input, _) = migration(11);
    let mut e = Encoder::new(Some(3), 64 << 20).expect("encoder");
    let mut out = Vec::new();
    for (k, piece) in input.chunks(64 << 10).enumerate() {
        e.set_level([Some(1), None, Some(9), Some(3)][k % 4]).expect("level");
        e.push(piece);
        e.flush();
        out.extend(e.take());
    }
    e.finish();
    out.extend(e.take());
    let (rebuilt, r, _) = decode(&out, 4096);
    r.expect("decodes");
    assert!(rebuilt == input, "rebuilt stream differs");
    let levels = &e.report().levels;
    assert!(["off", "zstd-1", "zstd-3", "zstd-9"].iter().all(|l| levels.get(*l).is_some_and(|&n| n > 0)), "{levels:?}");
}

/// Writes the fuzz targets' seeds for the QEMU parser and decoder (a small migration stream and
/// its encoding) under `$DWCP_FUZZ_SEEDS` (`make fuzz-seeds`).
#[test]
#[ignore = "writes the fuzz seed corpus; run by make fuzz-seeds"]
fn write_fuzz_seeds() {
    let Some(dir) = std::env::var_os("DWCP_FUZZ_SEEDS") else { return };
    let dir = std::path::PathBuf::from(dir);
    // The start of a migration (header, RAM setup, the first pages): big enough to reach
    // every record kind, small enough for the fuzzer to mutate quickly.
    let (input, _) = migration(7);
    let input = input[..48 << 10].to_vec();
    let (enc, _, _) = encode(&input, &[4096, 20_000]);
    for (target, name, bytes) in [("qemu_parser", "migration", &input), ("qemu_decoder", "encoded", &enc)] {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).unwrap();
        // The targets take a first byte (the size of the pieces they feed) before the stream.
        std::fs::write(d.join(name), [&[16u8][..], bytes].concat()).unwrap();
    }
}

/// A page-aware stream whose batch declares 4 GiB of output and carries a skeleton that
/// decompresses to 256 MiB (a zstd bomb of 30 KiB): the decoder sized its buffer from the
/// declared length and filled it. Now the declared length is bounded by what a batch can rebuild,
/// the record is refused before anything is decompressed.
#[test]
fn a_batch_declaring_gigabytes_is_refused_before_it_decompresses() {
    let mut skel = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    std::io::copy(&mut std::io::Read::take(std::io::repeat(0), 256 << 20), &mut skel).unwrap();
    let skel = skel.finish().unwrap();
    let mut body = u32::MAX.to_le_bytes().to_vec();
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&(skel.len() as u32).to_le_bytes());
    body.extend_from_slice(&skel);
    let mut stream = Vec::new();
    record(&mut stream, b'H', &[MAGIC]);
    record(&mut stream, b'F', &[&body]);
    // Refused by the bound, before the skeleton is decompressed (without it, the 256 MiB are
    // decompressed and the record fails later, at its HDE frame). Memory is not asserted here:
    // unit tests run in parallel in one process.
    let mut d = Decoder::new().unwrap();
    let e = d.push(&stream, &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("more than a batch can rebuild"), "{e}");
}

/// A restarted encoder and decoder behave as new ones: the same stream encodes to the same
/// bytes after another stream went through them, and decodes back exactly.
#[test]
fn restarted_coders_are_as_new() {
    let (a, _) = migration(3);
    let (b, _) = migration(4);
    let fresh = |input: &[u8]| {
        let mut e = Encoder::new(Some(3), 64 << 20).unwrap();
        e.push(input);
        e.finish();
        e.take()
    };
    let mut e = Encoder::new(Some(3), 64 << 20).unwrap();
    e.push(&a[..a.len() / 2]);
    let _ = e.take();
    e.restart();
    e.push(&b);
    e.finish();
    let enc = e.take();
    assert!(enc == fresh(&b), "a restarted encoder makes what a new one makes");
    let mut d = Decoder::new().unwrap();
    let mut out = Vec::new();
    d.push(&fresh(&a)[..1000], &mut out).unwrap();
    d.restart();
    out.clear();
    d.push(&enc, &mut out).unwrap();
    d.finish().unwrap();
    assert!(out == b, "and a restarted decoder rebuilds it");
}
