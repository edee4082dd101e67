//! The sender's side: pages into HDE frames.

use super::*;

/// The sender's side.
pub struct Encoder {
    level: i32,
    /// zstd on (`--compress off` keeps zero, duplicate and XBZRLE pages and sends the rest raw).
    compress: bool,
    dict: Option<Vec<u8>>,
    literal: zstd::bulk::Compressor<'static>,
    /// Content hash -> page numbers holding it at the receiver (or that will by the end of
    /// this round).
    known: FxHashMap<u128, Vec<u64>>,
    /// Page number -> content hash of what the receiver holds there.
    held: FxHashMap<u64, u128>,
    /// What this encoder sent: sampled 16-byte blocks -> the first page holding them.
    index: RefIndex,
    /// An index of the image the receiver held before this session (`--round-of`), shared by
    /// the session's encoders.
    shared: Option<std::sync::Arc<RefIndex>>,
    /// Whether pages sent go into `index` (not when they can never be references).
    indexing: bool,
}


impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoder {{ level: {}, dict: {:?}, known: {} }}", self.level, self.dict.as_ref().map(Vec::len), self.known.len())
    }
}

/// One page's entry before it is written out.
struct Entry<'a> {
    no: u64,
    kind: Kind,
    sum: u64,
    /// Inline data (Dup reference, XBZRLE runs, raw bytes).
    inline: Vec<u8>,
    /// The new bytes (a block that does not compress falls back to raw).
    new: &'a [u8],
}

impl Encoder {
    /// An encoder at zstd `level`, with an optional trained dictionary for literal pages (the
    /// decoder must be given the same one, once per session).
    pub fn new(level: i32, dict: Option<Vec<u8>>) -> std::io::Result<Self> {
        let literal = match &dict {
            Some(d) => zstd::bulk::Compressor::with_dictionary(level, d)?,
            None => zstd::bulk::Compressor::new(level)?,
        };
        Ok(Self { level, compress: true, dict, literal, known: FxHashMap::default(), held: FxHashMap::default(), index: RefIndex::default(), shared: None, indexing: true })
    }

    /// Forgets every page it sent (a new session with the same settings), keeping its zstd
    /// context: a caller encoding many short sessions does not pay for a context each.
    pub fn reset(&mut self) {
        self.known.clear();
        self.held.clear();
        self.index = RefIndex::default();
        self.shared = None;
        self.indexing = true;
    }

    /// Stops adding the pages it sends to its reference index: for a caller whose receiver may
    /// apply frames in any order, so that a page sent in this session is never a stable
    /// reference (`dwcp send`'s shards); saves the index's time and memory.
    pub fn stop_indexing(&mut self) {
        self.indexing = false;
        self.index = RefIndex::default();
    }

    /// Adds no more of the pages it sends to its reference index, and keeps what it holds: for
    /// a round whose references are the receiver's image as the round began, where a page sent
    /// in the round is not what a reference to it would read.
    pub fn freeze_index(&mut self) {
        self.indexing = false;
    }

    /// Also looks for moved data in `index` (of the image the receiver held before the session).
    pub fn share_index(&mut self, index: std::sync::Arc<RefIndex>) {
        self.shared = Some(index);
    }

    /// The zstd level in force.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Changes the effort (adaptive): a zstd level, or `None` for no zstd; from the next frame.
    pub fn set_level(&mut self, level: Option<i32>) -> std::io::Result<()> {
        self.compress = level.is_some();
        if let Some(l) = level
            && l != self.level
        {
            self.literal.set_compression_level(l)?;
            self.level = l;
        }
        Ok(())
    }

    /// Trains a dictionary from sample pages with zstd's own trainer.
    pub fn train(samples: &[&[u8]], max_size: usize) -> std::io::Result<Vec<u8>> {
        zstd::dict::from_samples(samples, max_size)
    }

    /// Starts a round whose dirty pages are `dirty`: their current content at the receiver will
    /// be overwritten during the round, in an order the encoder does not control (frames travel
    /// on several streams), so no duplicate may refer to it any more.
    pub fn begin_round(&mut self, dirty: impl IntoIterator<Item = u64>) {
        for no in dirty {
            if let Some(h) = self.held.remove(&no) {
                self.forget(h, no);
            }
        }
    }

    fn forget(&mut self, h: u128, no: u64) {
        if let Some(v) = self.known.get_mut(&h) {
            v.retain(|&x| x != no);
            if v.is_empty() {
                self.known.remove(&h);
            }
        }
    }

    /// Encodes `pages` (page number, new bytes; ascending page numbers) against the receiver's
    /// copies (`old`) into one frame, independently decodable except for duplicates of pages
    /// sent earlier in the same round (the decoder defers those until they verify).
    pub fn encode<'a>(&mut self, pages: &[(u64, &'a [u8])], old: &dyn Fn(u64) -> Option<&'a [u8]>, stats: &mut EncodeStats) -> Vec<u8> {
        self.encode_with_refs(pages, old, &|_| None, stats)
    }

    /// [`Encoder::encode`], with other pages of the receiver's image as references for the delta
    /// pages: `stable(no)` is what the receiver's [`PageStore::base`] will give for page `no`
    /// when this frame is decoded (a delta round's starting copy; for a store applying frames
    /// in order, its copy after the frames before), else `None`. A wrong answer writes nothing
    /// wrong: the receiver's checksums refuse the frame's delta pages.
    pub fn encode_with_refs<'a>(
        &mut self,
        pages: &[(u64, &'a [u8])],
        old: &dyn Fn(u64) -> Option<&'a [u8]>,
        stable: &dyn Fn(u64) -> Option<&'a [u8]>,
        stats: &mut EncodeStats,
    ) -> Vec<u8> {
        let mut entries: Vec<Entry<'a>> = Vec::with_capacity(pages.len());
        let mut olds: Vec<Option<&'a [u8]>> = Vec::with_capacity(pages.len());
        for &(no, new) in pages {
            assert_eq!(new.len(), PAGE, "pages are 4 KiB");
            let (kind, inline, o) = self.classify(no, new, old(no));
            olds.push(o);
            let sum = if kind.bare() { 0 } else { page_sum(no, new) };
            entries.push(Entry { no, kind, sum, inline, new });
            // The receiver's page `no` holds `new` once this round is through.
            let h = xxh3_128(new);
            if let Some(prev) = self.held.insert(no, h) {
                self.forget(prev, no);
            }
            if kind != Kind::Zero {
                self.known.entry(h).or_default().push(no);
            }
        }
        // References (before this frame's pages join the index): the delta pages' and those
        // literal pages' whose bytes sit in stable pages; such literal pages move to the delta
        // block. The references lead the prefix: the delta pages' own old copies stay nearest.
        let mut refs: Vec<(u64, &'a [u8])> = if self.compress { self.references(&mut entries, &olds, stable) } else { Vec::new() };
        if self.indexing {
            // A same page is in the index as it was sent before.
            for e in entries.iter().filter(|e| !e.kind.bare()) {
                self.index.add(e.no, e.new);
            }
        }
        let (mut lit_raw, mut delta_raw) = (Vec::new(), Vec::new());
        let mut prefix = Vec::with_capacity(refs.len() * PAGE);
        for &(_, copy) in &refs {
            prefix.extend_from_slice(copy);
        }
        for (e, o) in entries.iter().zip(&olds) {
            match e.kind {
                Kind::Literal => lit_raw.extend_from_slice(e.new),
                Kind::ZstdDelta => {
                    delta_raw.extend_from_slice(e.new);
                    prefix.extend_from_slice(o.expect("a delta has an old page"));
                }
                Kind::RefLiteral => delta_raw.extend_from_slice(e.new),
                _ => {}
            }
        }
        let lit = if lit_raw.is_empty() || !self.compress { Vec::new() } else { self.literal.compress(&lit_raw).unwrap_or_default() };
        let delta = if delta_raw.is_empty() || !self.compress { Vec::new() } else { compress_with_prefix(self.level, &prefix, &delta_raw).unwrap_or_default() };
        // A block that did not compress (or failed) falls back to raw pages.
        let lit_ok = !lit.is_empty() && lit.len() < lit_raw.len();
        let delta_ok = !delta.is_empty() && delta.len() < delta_raw.len();
        for e in &mut entries {
            if (e.kind == Kind::Literal && !lit_ok) || (matches!(e.kind, Kind::ZstdDelta | Kind::RefLiteral) && !delta_ok) {
                e.kind = Kind::Raw;
                e.inline = e.new.to_vec();
            }
        }
        let mut out = Vec::with_capacity(16 + entries.len() * 12 + lit.len() + delta.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        let lit = if lit_ok { lit } else { Vec::new() };
        let delta = if delta_ok { delta } else { Vec::new() };
        if !delta_ok {
            refs.clear();
        }
        out.extend_from_slice(&(lit.len() as u32).to_le_bytes());
        out.extend_from_slice(&(delta.len() as u32).to_le_bytes());
        out.extend_from_slice(&(refs.len() as u32).to_le_bytes());
        let mut prev: Option<u64> = None;
        for &(r, _) in &refs {
            put_step(&mut out, &mut prev, r);
        }
        stats.refs += refs.len() as u64;
        let mut prev: Option<u64> = None;
        let mut i = 0;
        while i < entries.len() {
            let e = &entries[i];
            put_step(&mut out, &mut prev, e.no);
            // Zero and same pages numbered one after the other: one entry for the run.
            let run = if e.kind.bare() { entries[i + 1..].iter().zip(&entries[i..]).take_while(|(n, p)| n.kind == e.kind && n.no == p.no.wrapping_add(1)).count() } else { 0 };
            *stats.pages.entry(e.kind).or_default() += 1 + run as u64;
            if run > 0 {
                out.push(e.kind as u8 | RUN);
                put_leb(&mut out, run as u64);
                prev = Some(entries[i + run].no);
                i += 1 + run;
                continue;
            }
            out.push(e.kind as u8);
            if !e.kind.bare() {
                out.extend_from_slice(&e.sum.to_le_bytes());
            }
            if matches!(e.kind, Kind::Dup | Kind::Xbzrle | Kind::Raw) {
                put_leb(&mut out, e.inline.len() as u64);
                out.extend_from_slice(&e.inline);
            }
            i += 1;
        }
        let listed = list_sum(&out);
        out.extend_from_slice(&listed.to_le_bytes());
        out.extend_from_slice(&lit);
        out.extend_from_slice(&delta);
        stats.input += (pages.len() * PAGE) as u64;
        stats.output += out.len() as u64;
        out
    }

    /// The frame's reference pages and the receiver's copies of them: for each delta page, and
    /// each literal page sharing at least [`MIN_MATCH`] bytes with one, the stable pages (other
    /// than the frame's own) sharing the most bytes with it, found from sampled blocks at the
    /// offsets looked at and extended both ways; ascending. Literal pages given references
    /// become [`Kind::RefLiteral`].
    fn references<'a>(&self, entries: &mut [Entry<'_>], olds: &[Option<&[u8]>], stable: &dyn Fn(u64) -> Option<&'a [u8]>) -> Vec<(u64, &'a [u8])> {
        if self.index.is_empty() && self.shared.as_ref().is_none_or(|s| s.is_empty()) {
            return Vec::new();
        }
        let own: FxHashSet<u64> = entries.iter().map(|e| e.no).collect();
        let mut refs: Vec<(u64, &'a [u8])> = Vec::new();
        // Per page it shares bytes with: how many, and the receiver's copy of it.
        let mut votes: FxHashMap<u64, (u32, &'a [u8])> = FxHashMap::default();
        let mut spans: Vec<(usize, usize, usize)> = Vec::new();
        let mut cand: Vec<(usize, u64)> = Vec::with_capacity(LOOKUP_BATCH);
        for (e, old) in entries.iter_mut().zip(olds).filter(|(e, _)| matches!(e.kind, Kind::ZstdDelta | Kind::Literal)) {
            if refs.len() >= REFS_MAX {
                break;
            }
            votes.clear();
            spans.clear();
            match old {
                // A changed page: at every byte offset (moved data keeps no alignment), but only
                // where a block overlaps bytes that differ from the page's own old copy, which
                // is in the prefix anyway.
                Some(o) => {
                    for k in 0..PAGE / 16 {
                        if e.new[k * 16..k * 16 + 16] != o[k * 16..k * 16 + 16] {
                            let (from, to) = ((k * 16).saturating_sub(15), (k * 16 + 15).min(PAGE - 16));
                            match spans.last_mut() {
                                Some(last) if last.1 + 1 >= from => last.1 = to,
                                _ => spans.push((from, to, 1)),
                            }
                        }
                    }
                }
                None => spans.push((0, PAGE - 16, 8)),
            }
            for &(from, to, step) in &spans {
                let mut at = from;
                while at <= to {
                    // A batch of hashes, then their look-ups in a tight loop of their own: most
                    // miss the cache (the index is far larger), and independent loads back to
                    // back overlap.
                    cand.clear();
                    while at <= to && cand.len() < LOOKUP_BATCH {
                        let h = block_hash(&e.new[at..at + 16]);
                        if sampled(h) {
                            cand.push((at, h));
                        }
                        at += step;
                    }
                    cand.retain(|&(_, h)| self.shared.as_ref().is_some_and(|s| s.may_hold(h)) || self.index.may_hold(h));
                    let mut past = 0;
                    for &(pos, h) in &cand {
                        // The receiver's image before the session first: what this session sent
                        // is mostly pages changing in this round.
                        let Some((src, off)) = self.shared.as_ref().and_then(|s| s.get(h)).or_else(|| self.index.get(h)) else { continue };
                        if pos < past || own.contains(&src) {
                            continue;
                        }
                        // The match, verified and extended both ways in the page the receiver
                        // will read: its length is the vote, and the look-ups skip past it.
                        let Some(copy) = stable(src) else { continue };
                        let ahead = e.new[pos..].iter().zip(&copy[off..]).take_while(|(a, b)| a == b).count();
                        if ahead < 16 {
                            continue;
                        }
                        let behind = e.new[..pos].iter().rev().zip(copy[..off].iter().rev()).take_while(|(a, b)| a == b).count();
                        votes.entry(src).or_insert((0, copy)).0 += (behind + ahead) as u32;
                        past = pos + ahead;
                    }
                    if past > at {
                        // Back on the span's grid.
                        at = from + (past - from).div_ceil(step) * step;
                    }
                }
            }
            let mut best: Vec<(u64, u32, &'a [u8])> = votes.iter().map(|(&k, &(n, copy))| (k, n, copy)).collect();
            best.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut chosen = best.into_iter().filter(|c| c.1 >= MIN_REF_MATCH).take(REFS_PER_PAGE).peekable();
            if e.kind == Kind::Literal {
                if chosen.peek().is_none_or(|b| b.1 < MIN_MATCH) {
                    continue;
                }
                e.kind = Kind::RefLiteral;
            }
            for (src, _, copy) in chosen {
                if refs.len() < REFS_MAX && !refs.iter().any(|r| r.0 == src) {
                    refs.push((src, copy));
                }
            }
        }
        refs.sort_unstable_by_key(|r| r.0);
        refs
    }

    fn classify<'a>(&mut self, no: u64, new: &[u8], old: Option<&'a [u8]>) -> (Kind, Vec<u8>, Option<&'a [u8]>) {
        if is_zero(new) {
            return (Kind::Zero, Vec::new(), None);
        }
        if old == Some(new) {
            return (Kind::Same, Vec::new(), None);
        }
        if let Some(&src) = self.known.get(&xxh3_128(new)).and_then(|v| v.iter().find(|&&x| x != no)) {
            return (Kind::Dup, leb(src), None);
        }
        if let Some(o) = old {
            if let Some(d) = xbzrle_encode(o, new, XBZRLE_MAX) {
                return (Kind::Xbzrle, d, None);
            }
            return (Kind::ZstdDelta, Vec::new(), Some(o));
        }
        (Kind::Literal, Vec::new(), None)
    }
}
