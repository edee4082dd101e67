//! HDE, hierarchical delta encoding of VM pages: the codec core, free of I/O.
//!
//! Each 4 KiB page becomes one of: **zero** (a flag), **duplicate** of a page the receiver
//! already holds (found by content hash; the decoder copies it and checks the result against
//! the page's checksum, so a stale or colliding hash never writes wrong bytes), **delta**
//! against the receiver's copy of the same page (XBZRLE-style runs, or zstd with the old page as
//! dictionary, whichever is smaller), **literal** (zstd, with a trained dictionary when one was
//! sent), or **raw** when nothing is smaller; a page sent again as it was is **same** (nothing
//! but its number: the receiver's copy stands). Every page that carries bytes carries the XXH3-64
//! of its decoded bytes; a page that does not decode or does not match is reported for
//! re-sending, never written.
//!
//! **Huge pages.** Where RAM on 2 MiB huge pages is dirty-logged by huge page (soft-dirty bits
//! and userfaultfd write protection track a hugetlb mapping per huge page; QEMU's postcopy sends
//! whole host pages), a round re-sends all 512 pages of a huge page of which one changed. The
//! pages that did not change are **same** and the untouched zero ones **zero**, and
//! a run of consecutive pages of either kind is one entry of the page list (kind with [`RUN`]
//! set, then the count), so a huge page costs what its changed 4 KiB pages cost, plus a few
//! bytes.
//!
//! Literal pages of a frame are compressed together as one zstd block (a frame is a chunk of
//! 256 pages or more, so zstd sees their context), and so are the delta pages, with the
//! receiver's old copies of those pages as the block's prefix (zstd's `refPrefix`): one zstd call
//! per block, not per page. Small deltas stay XBZRLE. Wire layout in `docs/wire.md` (HDE frames).
//!
//! **References.** A changed page often holds data that sits elsewhere in the old image at
//! another offset (a heap moving objects, a database moving rows), not in its own old copy. The
//! encoder keeps a sparse index of the pages it sent (16-byte blocks at 16-byte offsets, one in
//! [`SAMPLE`] by content hash) and looks a changed page's bytes up in it at every byte offset
//! around what differs from its old copy (moved data keeps no alignment: a row rewritten with
//! five bytes prepended), a new page's at every 8-byte offset. Each hit is verified and extended
//! both ways in the page it points to; the pages sharing the most bytes, if the caller vouches
//! that the receiver can read them as they were when the round began ([`PageStore::base`]), lead
//! the delta block's prefix (the frame lists them). A new page (no old copy) sharing enough with
//! one such page goes to the delta block too, as a **ref-literal**: round 1 of an image finds
//! data repeated far apart this way. A page that changes in the same round is a reference too when
//! the receiver keeps the round's starting image beside the one it writes (`dwcp recv` of a
//! delta round reads the previous round's published file): a heap rewriting its records moves
//! data between pages that all change, and most of a round's delta is there.
//!
//! Frame: `"HDE5" | count u32 | lit_len u32 | delta_len u32 | ref_count u32` (LE), then the
//! reference pages (page steps, LEB128), then per entry
//! `page step LEB128 | kind u8 | sum u64 (not for zero, same) | [len LEB128 | data] (dup, xbzrle, raw)`
//! or, for a run, `page step LEB128 | kind | RUN u8 | more LEB128` (zero or same; `more` pages
//! follow the first, numbered one after the other); `count` is the number of pages,
//! then `list_sum u64` (XXH3-64 of all the frame's bytes before it), then the literal block and
//! the delta block. `sum` is [`page_sum`].

use std::collections::HashMap;

use rustc_hash::{FxHashMap, FxHashSet};

use thiserror::Error;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, xxh3_128};

/// Page size.
pub const PAGE: usize = 4096;
const MAGIC: &[u8; 4] = b"HDE5";
/// Pages in a frame at most (1 GiB of image; a frame is one transfer chunk): a run entry
/// stands for many pages in a few bytes, so the count is bounded here, not by the frame's size.
const PAGES_MAX: usize = 1 << 18;
/// Set in a kind byte: the entry is a run of pages of that kind (zero or same), its count follows.
pub const RUN: u8 = 0x80;
const HEADER: usize = 20;

/// One 16-byte block in this many (by content hash) goes into the reference index. At 8 rather
/// than 16, shorter moved runs are found (corpus round 2: database 14.66 -> 14.90, fileserver
/// 6.47 -> 6.50; round 1 5.52 -> 5.54 and 6.91 -> 7.00), for twice the index (peak RSS 428 ->
/// 462 MB on a 1 GiB image) and the same speed within this host's noise; at 4, 0.6% more on
/// the database.
pub const SAMPLE: u64 = 8;
/// Reference pages taken per delta page (the ones sharing the most bytes with it): a rewritten
/// record draws on several old ones (corpus round 2: 2 -> 9.5 and 11.6, 8 -> 10.3 and
/// 13.4).
const REFS_PER_PAGE: usize = 8;
/// Reference pages per frame at most (the prefix is then at most this plus the frame's pages):
/// a frame of 256 changed pages takes about 700 when all of the round's old pages may be
/// references (measured on the corpus).
const REFS_MAX: usize = 1024;
/// Bytes a literal page must share with one stable page to be sent against it.
const MIN_MATCH: u32 = 256;
/// Bytes a page must share with another for that page to be worth its 4 KiB in the prefix
/// (corpus round 2: the same ratio as any match at all, and 10-25% faster).
const MIN_REF_MATCH: u32 = 64;
/// Sampled positions of a page looked up together.
const LOOKUP_BATCH: usize = 16;
/// Entries in the reference index at most (about 24 bytes each); past it, no more are added.
const INDEX_MAX: usize = 1 << 23;

/// How a page is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// All zero.
    Zero = 0,
    /// Copy of another page the receiver holds (data: its page number).
    Dup = 1,
    /// XBZRLE-style runs against the receiver's copy of this page.
    Xbzrle = 2,
    /// zstd with the receiver's copy of this page as dictionary.
    ZstdDelta = 3,
    /// zstd (with the trained dictionary, if any).
    Literal = 4,
    /// The 4096 bytes as they are.
    Raw = 5,
    /// zstd in the delta block, without an old copy of its own: its bytes are found in the
    /// frame's reference pages.
    RefLiteral = 6,
    /// Sent again unchanged: the receiver's copy (as the round began) stands. No checksum: that
    /// copy was verified when it was written, and a receiver without one refuses the page.
    Same = 7,
}

impl Kind {
    /// Zero and same pages carry no bytes and no checksum of their own; only they form runs.
    fn bare(self) -> bool {
        matches!(self, Self::Zero | Self::Same)
    }

    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Zero,
            1 => Self::Dup,
            2 => Self::Xbzrle,
            3 => Self::ZstdDelta,
            4 => Self::Literal,
            5 => Self::Raw,
            6 => Self::RefLiteral,
            7 => Self::Same,
            _ => return None,
        })
    }
}

/// A frame that cannot be parsed at all.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HdeError {
    /// Not an HDE frame.
    #[error("not an HDE frame (bad magic)")]
    BadMagic,
    /// More reference pages than an encoder ever lists.
    #[error("HDE frame lists {count} reference pages (at most {REFS_MAX})")]
    TooManyRefs {
        /// What the frame said.
        count: u32,
    },
    /// More pages than a frame ever holds.
    #[error("HDE frame holds {count} pages (at most {PAGES_MAX})")]
    TooManyPages {
        /// What the frame said.
        count: u32,
    },
    /// The frame ends inside an entry, or its blocks do not add up.
    #[error("HDE frame truncated or malformed at entry {index}")]
    Truncated {
        /// Entry index.
        index: u32,
    },
    /// The frame's header, references and page list do not match their checksum (a zero page
    /// carries none of its own: a changed page number would write zeros where they do not go).
    #[error("HDE frame's page list does not match its checksum")]
    Corrupt,
}

/// Per-kind counters of an encode.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EncodeStats {
    /// Pages by kind.
    pub pages: HashMap<Kind, u64>,
    /// Input bytes.
    pub input: u64,
    /// Output bytes.
    pub output: u64,
    /// Reference pages listed (other pages' copies that led a delta block's prefix).
    pub refs: u64,
}

impl EncodeStats {
    /// Pages zstd worked on (or tried to): literal, block-delta, ref-literal and raw. Zero,
    /// duplicate and XBZRLE pages cost about nothing at any level.
    pub fn zstd_pages(&self) -> u64 {
        [Kind::Literal, Kind::ZstdDelta, Kind::RefLiteral, Kind::Raw].iter().map(|k| self.pages.get(k).copied().unwrap_or(0)).sum()
    }
}

/// A page's checksum: XXH3-64 of its bytes, seeded with its page number, so a page decoded
/// right but filed under a damaged page number is refused too.
pub fn page_sum(no: u64, page: &[u8]) -> u64 {
    xxh3_64_with_seed(page, no)
}

/// XBZRLE-style encoding of `new` against `old`: alternating (unchanged run, changed run + bytes),
/// lengths as LEB128. `None` when the result would exceed `limit`.
pub fn xbzrle_encode(old: &[u8], new: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    let mut i = 0;
    let n = new.len();
    while i < n {
        let s = i;
        while i < n && old[i] == new[i] {
            i += 1;
        }
        put_leb(&mut out, (i - s) as u64);
        let s = i;
        while i < n && old[i] != new[i] {
            i += 1;
        }
        put_leb(&mut out, (i - s) as u64);
        out.extend_from_slice(&new[s..i]);
        if out.len() > limit {
            return None;
        }
    }
    Some(out)
}

/// Applies an XBZRLE delta to `old` into `out`; `None` if it does not fit a page exactly.
pub fn xbzrle_decode(old: &[u8], delta: &[u8], out: &mut [u8]) -> Option<()> {
    out.copy_from_slice(old);
    let (mut at, mut d) = (0usize, delta);
    while !d.is_empty() {
        let (skip, r) = get_leb(d)?;
        at = at.checked_add(usize::try_from(skip).ok()?).filter(|&a| a <= out.len())?;
        let (lit, r) = get_leb(r)?;
        let lit = usize::try_from(lit).ok()?;
        let end = at.checked_add(lit).filter(|&e| e <= out.len() && lit <= r.len())?;
        out[at..end].copy_from_slice(&r[..lit]);
        at = end;
        d = &r[lit..];
    }
    (at <= out.len()).then_some(())
}

/// Writes page number `no` of a list: the first as it is, each next as its distance from the
/// one before minus 1 (LEB128; ascending numbers take one byte each, any order encodes).
fn put_step(out: &mut Vec<u8>, prev: &mut Option<u64>, no: u64) {
    put_leb(out, prev.map_or(no, |p| no.wrapping_sub(p).wrapping_sub(1)));
    *prev = Some(no);
}

/// The page number a [`put_step`] step stands for.
fn take_step(prev: &mut Option<u64>, step: u64) -> u64 {
    let no = prev.map_or(step, |p| p.wrapping_add(step).wrapping_add(1));
    *prev = Some(no);
    no
}

/// Appends `v` as LEB128.
pub(crate) fn put_leb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Reads a LEB128 number; returns it and the rest.
pub(crate) fn get_leb(d: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, &b) in d.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, &d[i + 1..]));
        }
    }
    None
}

/// Pages whose XBZRLE delta is at most this many bytes stay XBZRLE; larger deltas go to the
/// frame's delta block, where zstd sees the old pages as a prefix.
const XBZRLE_MAX: usize = 128;

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

/// Where moved data may be found: sampled 16-byte blocks (16-byte offsets, one in [`SAMPLE`] by
/// content hash) -> the first page seen holding them and the block's offset in it
/// (`page << 12 | offset`).
#[derive(Debug, Default)]
pub struct RefIndex(FxHashMap<u64, u64>, Filter);

/// A bit per slot of hashes the index holds (2 MiB): most positions looked up hold no indexed
/// block, and this answers them from cache instead of a miss into the map. Built once the
/// index holds [`FILTER_FROM`] blocks; a smaller map answers from cache itself, and an encoder
/// that indexes a few pages does not zero 2 MiB.
#[derive(Debug, Default)]
struct Filter(Vec<u64>);

const FILTER_BITS: u32 = 24;
const FILTER_FROM: usize = 4096;

impl Filter {
    fn slot(h: u64) -> usize {
        // `sampled` fixed the low bits (SAMPLE's); the slot is taken above them.
        ((h >> SAMPLE.trailing_zeros()) & ((1 << FILTER_BITS) - 1)) as usize
    }
    fn set(&mut self, h: u64) {
        let i = Self::slot(h);
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn may_hold(&self, h: u64) -> bool {
        let i = Self::slot(h);
        self.0[i / 64] >> (i % 64) & 1 == 1
    }
}

impl RefIndex {
    /// Adds page `no`'s sampled blocks (a full index takes no more).
    pub fn add(&mut self, no: u64, page: &[u8]) {
        if self.0.len() >= INDEX_MAX {
            return;
        }
        for (k, b) in page.chunks_exact(16).enumerate() {
            let h = block_hash(b);
            if sampled(h) {
                self.0.entry(h).or_insert(no << 12 | (k as u64 * 16));
                if !self.1.0.is_empty() {
                    self.1.set(h);
                } else if self.0.len() >= FILTER_FROM {
                    self.1.0 = vec![0; 1 << (FILTER_BITS - 6)];
                    for &h in self.0.keys() {
                        self.1.set(h);
                    }
                }
            }
        }
    }

    /// Whether the index may hold a block with hash `h` (no false negatives).
    fn may_hold(&self, h: u64) -> bool {
        if self.1.0.is_empty() { self.0.contains_key(&h) } else { self.1.may_hold(h) }
    }

    /// The page and offset of the first block seen with hash `h`.
    fn get(&self, h: u64) -> Option<(u64, usize)> {
        if self.may_hold(h) { self.0.get(&h).map(|&v| (v >> 12, (v & 0xfff) as usize)) } else { None }
    }

    /// The index of a whole image (page `i` at byte `i * PAGE`), or `None` once `stop` is set.
    pub fn of_image(image: &[u8], stop: &std::sync::atomic::AtomicBool) -> Option<Self> {
        let mut ix = Self::default();
        for (i, p) in image.chunks_exact(PAGE).enumerate() {
            if i % 4096 == 0 && stop.load(std::sync::atomic::Ordering::Relaxed) {
                return None;
            }
            if !is_zero(p) {
                ix.add(i as u64, p);
            }
        }
        Some(ix)
    }

    /// The index of `prev` for a round that turns it into `cur` (page `i` at byte `i * PAGE`),
    /// or `None` once `stop` is set: first the pages the round changes, then the others, so that
    /// a full index ([`INDEX_MAX`]) keeps the first. A round's moved data sits mostly in the old
    /// copies of the pages it rewrites (a database moving rows), but on a file server much of it
    /// sits in pages it leaves alone: on two fileserver corpora, indexing only the changed pages
    /// gave round 2 3.43x and 3.51x, the whole image 6.46x and 6.06x (databases: the same).
    pub fn of_round(prev: &[u8], cur: &[u8], stop: &std::sync::atomic::AtomicBool) -> Option<Self> {
        let mut ix = Self::default();
        for changed in [true, false] {
            for (i, (p, c)) in prev.chunks_exact(PAGE).zip(cur.chunks_exact(PAGE)).enumerate() {
                if i % 4096 == 0 && stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return None;
                }
                if (p != c) == changed && !is_zero(p) {
                    ix.add(i as u64, p);
                }
            }
        }
        Some(ix)
    }

    /// Sampled blocks indexed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
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

/// Which pages a round sends, from a dirty bitmap kept by whoever wrote the image: bit `i`
/// (least significant first in each byte) for unit `i` of the image, a unit being a 4 KiB page,
/// a 2 MiB huge page, or a block of a disk's dirty bitmap (QEMU's are 64 KiB by default). A page
/// whose unit is clear is taken as the receiver already holds it; the commit digest covers the
/// whole image, so a log that missed a change fails the round, unpublished.
#[derive(Debug, Clone)]
pub struct DirtyLog {
    bits: Vec<u8>,
    unit_pages: u64,
}

impl DirtyLog {
    /// The log `bits` in units of `unit` bytes for an image of `image_bytes`; the bitmap must
    /// cover the image (it may be longer: trailing bits are not read).
    pub fn new(bits: Vec<u8>, unit: u64, image_bytes: u64) -> Result<Self, String> {
        if unit == 0 || !unit.is_multiple_of(PAGE as u64) {
            return Err(format!("a dirty log's unit is a whole number of 4 KiB pages, not {unit} bytes"));
        }
        let need = image_bytes.div_ceil(unit).div_ceil(8);
        if (bits.len() as u64) < need {
            return Err(format!(
                "the dirty bitmap has {} bytes; a {image_bytes}-byte image in units of {unit} bytes needs {need} (one bit per unit, least significant first)",
                bits.len()
            ));
        }
        Ok(Self { bits, unit_pages: unit / PAGE as u64 })
    }

    /// Whether page `no` is in a dirty unit.
    pub fn is_dirty(&self, no: u64) -> bool {
        let u = no / self.unit_pages;
        usize::try_from(u / 8).ok().and_then(|i| self.bits.get(i)).is_some_and(|b| b >> (u % 8) & 1 == 1)
    }
}

/// Hash of a 16-byte block (for the reference index; not a checksum).
fn block_hash(b: &[u8]) -> u64 {
    let lo = u64::from_le_bytes(b[..8].try_into().expect("8"));
    let hi = u64::from_le_bytes(b[8..16].try_into().expect("8"));
    let x = lo.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ hi.wrapping_mul(0xC2B2_AE3D_27D4_EB4F).rotate_left(31);
    x ^ (x >> 29)
}

/// Whether a block with this [`block_hash`] is one the reference index keeps: one in
/// [`SAMPLE`], never the all-zero block (its hash is 0; zeros are everywhere).
fn sampled(h: u64) -> bool {
    h.is_multiple_of(SAMPLE) && h != 0
}

fn leb(v: u64) -> Vec<u8> {
    let mut o = Vec::with_capacity(3);
    put_leb(&mut o, v);
    o
}

/// The digest an HDE session commits to: the chunk-manifest digest of the frames, bound to a
/// hash of the whole resulting image. Frames alone prove only what was sent; a delta round
/// leaves unchanged pages unsent, so the receiver must also show that the image it now holds is
/// the sender's, or a wrong previous round would go unnoticed.
pub fn session_digest(manifest: [u8; 32], image: &mut dyn FnMut(&mut xxhash_rust::xxh3::Xxh3)) -> [u8; 32] {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    image(&mut h);
    let mut b = blake3::Hasher::new();
    b.update(b"dwcp-hde-image");
    b.update(&manifest);
    b.update(&h.digest128().to_le_bytes());
    *b.finalize().as_bytes()
}

/// The most an encoded frame of `bytes` of pages can exceed them by: the frame header and, per
/// page, a raw entry's step, kind, checksum and length.
pub fn frame_overhead(bytes: usize) -> usize {
    HEADER + 8 + bytes.div_ceil(PAGE) * (10 + 1 + 8 + 3)
}

/// The checksum that follows a frame's header, references and page list (`list`): XXH3-64.
pub fn list_sum(list: &[u8]) -> u64 {
    xxh3_64(list)
}

/// Whether a page is all zero (word at a time).
pub fn is_zero(p: &[u8]) -> bool {
    let mut words = p.chunks_exact(8);
    words.all(|w| u64::from_ne_bytes(w.try_into().expect("8")) == 0) && words.remainder().iter().all(|&b| b == 0)
}

fn compress_with_prefix(level: i32, prefix: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let mut c = CCtx::try_create()?;
    c.set_parameter(CParameter::CompressionLevel(level)).ok()?;
    // The old copy of each page sits one block length back: the window must reach it.
    let wlog = (usize::BITS - (prefix.len() + data.len()).leading_zeros()).clamp(20, 27);
    c.set_parameter(CParameter::WindowLog(wlog)).ok()?;
    // A prefix of a few MiB (reference pages) overflows the level's default match tables
    // (2^17 at level 3): most of its positions would be forgotten before the data is matched
    // (2^18 doubles the ratio of some rounds; 2^20 adds under 1% and costs 15% of the speed).
    if prefix.len() > 1 << 20 && level <= 6 {
        let log = (wlog - 2).min(18);
        c.set_parameter(CParameter::HashLog(log)).ok()?;
        c.set_parameter(CParameter::ChainLog(log)).ok()?;
    }
    // Beyond a MiB of prefix the level's match tables lose most of it even at 2^18, and moved
    // data is long runs: zstd's long-distance matcher finds them anywhere in the prefix (a
    // round 2 with eight references per page: 7.5 -> 10.3 and 8.5 -> 13.4 on the corpus).
    if prefix.len() > 1 << 20 {
        c.set_parameter(CParameter::EnableLongDistanceMatching(true)).ok()?;
    }
    c.ref_prefix(prefix).ok()?;
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    c.compress2(&mut out, data).ok()?;
    Some(out)
}

fn decompress_with_prefix(prefix: &[u8], data: &[u8], out: &mut [u8]) -> Result<usize, &'static str> {
    use zstd::zstd_safe::{DCtx, DParameter};
    let mut d = DCtx::try_create().ok_or("zstd context")?;
    d.set_parameter(DParameter::WindowLogMax(27)).map_err(|_| "zstd window")?;
    d.ref_prefix(prefix).map_err(|_| "zstd delta prefix refused")?;
    d.decompress(out, data).map_err(|_| "zstd delta block does not decode")
}

/// What one effort setting gives on this data: compression ratio and encode speed per core.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelEstimate {
    /// zstd level, or None for no zstd.
    pub level: Option<i32>,
    /// Input bytes per output byte, over the pages zstd works on (literal, delta, raw): zero,
    /// duplicate and XBZRLE pages cost about nothing at every level, so they leave the choice
    /// alone (a chunk of mostly zeros once made level 9 look fast, and kept it on dense data).
    pub ratio: f64,
    /// Such bytes encoded per second on one core.
    pub bytes_per_s: f64,
}

/// Starting estimates for `--compress auto`, from `make bench-hde` on the guest-RAM corpus (one
/// core, the literal and delta pages of round 1); the sender replaces the one in use with what
/// it measures.
pub const DEFAULT_ESTIMATES: [LevelEstimate; 4] = [
    LevelEstimate { level: None, ratio: 1.0, bytes_per_s: 3.0e9 },
    LevelEstimate { level: Some(1), ratio: 2.8, bytes_per_s: 0.35e9 },
    LevelEstimate { level: Some(3), ratio: 3.2, bytes_per_s: 0.25e9 },
    LevelEstimate { level: Some(9), ratio: 3.5, bytes_per_s: 0.06e9 },
];

/// `--compress auto`: the effort that finishes soonest. Encoding on `cores` cores and sending
/// over a link of `link_bps` (bit/s) overlap, so image bytes go out at
/// `min(cores × speed, link / 8 × ratio)`; the level with the highest such rate wins (ties to
/// the cheaper one). A fast link picks little or no compression, a thin one the highest ratio
/// the cores can feed.
pub fn choose_level(link_bps: f64, cores: usize, est: &[LevelEstimate]) -> Option<i32> {
    let rate = |e: &LevelEstimate| (cores.max(1) as f64 * e.bytes_per_s).min(link_bps / 8.0 * e.ratio);
    let mut best: Option<&LevelEstimate> = None;
    for e in est {
        if best.is_none_or(|b| rate(e) > rate(b) * 1.02) {
            best = Some(e);
        }
    }
    best.and_then(|b| b.level)
}

/// How a level is named in reports: `zstd-3`, or `off` for no zstd.
pub fn level_name(level: Option<i32>) -> String {
    level.map_or("off".to_string(), |l| format!("zstd-{l}"))
}

/// `--compress auto`'s state, I/O-free (the caller gives its clock, in seconds, and what it
/// measured): each level's estimate, corrected by what the level in use achieves, and the choice
/// of level every 250 ms for the link as it is seen.
///
/// How compressible the data is applies to every level alike: one learned factor scales each
/// level's default **saving** (`1 - 1/ratio`), so the gaps between levels stay as measured on
/// the corpus whatever the data, and incompressible data (factor near 0) brings every level's
/// ratio to 1. (Scaling the ratios instead lost the gaps: once incompressible data had pressed
/// them all to 1, data that compressed again looked alike at levels 1 and 3, and level 1 stayed.)
#[derive(Debug, Clone)]
pub struct Effort {
    est: Vec<LevelEstimate>,
    /// Learned compressibility: the measured saving over the level's default saving (EWMA).
    factor: f64,
    level: Option<i32>,
    /// The probe's figure of the path (bit/s), until PBA has a prediction.
    probe_bps: f64,
    cores: usize,
    /// When the level was last chosen, and the bytes sent then.
    last: Option<(f64, u64)>,
    /// When no zstd was last left for a look at level 1 (see [`Effort::choose`]).
    explored: f64,
}

/// How often `--compress auto`, without zstd because the data did not compress, looks again.
const EXPLORE_EVERY: f64 = 2.0;

impl Effort {
    /// Starts from [`DEFAULT_ESTIMATES`] at the level they choose for the probe's figure
    /// (`probe_bps`, NaN if none: 1 Gbit/s is assumed) on `cores` encoding cores.
    pub fn new(probe_bps: f64, cores: usize) -> Self {
        let probe_bps = if probe_bps.is_finite() && probe_bps > 0.0 { probe_bps } else { 1e9 };
        Self { est: DEFAULT_ESTIMATES.to_vec(), factor: 1.0, level: choose_level(probe_bps, cores, &DEFAULT_ESTIMATES), probe_bps, cores, last: None, explored: 0.0 }
    }

    /// The level in use.
    pub fn level(&self) -> Option<i32> {
        self.level
    }

    /// What the level in use did: `zstd_bytes` of the pages zstd works on (and whatever else
    /// went with them) became `out_bytes` in `secs`. Its speed moves (EWMA); under zstd, so does
    /// the compressibility factor, and with it every zstd level's ratio (see [`Effort`]).
    pub fn observe(&mut self, zstd_bytes: u64, out_bytes: u64, secs: f64) {
        let Some(cur) = self.est.iter().position(|e| e.level == self.level) else { return };
        if zstd_bytes == 0 || secs <= 0.0 {
            return;
        }
        let measured = zstd_bytes as f64 / out_bytes.max(1) as f64;
        let saving = |ratio: f64| 1.0 - 1.0 / ratio.max(1.0);
        match self.level {
            // No zstd compresses nothing, however compressible the data: only its own
            // measurement moves it.
            None => self.est[cur].ratio = 0.8 * self.est[cur].ratio + 0.2 * measured,
            Some(_) => {
                let seen = saving(measured) / saving(DEFAULT_ESTIMATES[cur].ratio);
                self.factor = 0.8 * self.factor + 0.2 * seen.clamp(0.0, 4.0);
                for (e, d) in self.est.iter_mut().zip(&DEFAULT_ESTIMATES).filter(|(e, _)| e.level.is_some()) {
                    e.ratio = 1.0 / (1.0 - (self.factor * saving(d.ratio)).min(0.99));
                }
            }
        }
        let e = &mut self.est[cur];
        e.bytes_per_s = 0.8 * e.bytes_per_s + 0.2 * (zstd_bytes as f64 / secs);
    }

    /// At `now`, with `sent_bytes` on the wire so far and PBA's prediction of the path
    /// (`predicted_bps`, 0 before it has one): every 250 ms, the level for the link (the larger
    /// of the prediction, or before it the probe's figure, and the wire rate seen since the last
    /// choice). `Some(level)` when it differs from the one in use; [`Effort::set`] it once the
    /// encoder took it. Without zstd, what is sent says nothing of how well the data would
    /// compress (raw pages measure 1.0): when that is why zstd was left (every estimate's ratio
    /// fell to about 1: incompressible data), level 1 gets another look every
    /// [`EXPLORE_EVERY`] seconds, for one choice, so that data that compresses again is
    /// compressed again.
    pub fn choose(&mut self, now: f64, sent_bytes: u64, predicted_bps: f64) -> Option<Option<i32>> {
        let Some((t0, b0)) = self.last else {
            self.last = Some((now, sent_bytes));
            return None;
        };
        if now - t0 < 0.25 {
            return None;
        }
        self.last = Some((now, sent_bytes));
        let seen = sent_bytes.saturating_sub(b0) as f64 * 8.0 / (now - t0);
        let link = if predicted_bps > 0.0 { predicted_bps.max(seen) } else { self.probe_bps.max(seen) };
        let l = choose_level(link, self.cores, &self.est);
        if l.is_none() && self.level.is_none() && self.est.iter().all(|e| e.ratio < 1.05) && now - self.explored >= EXPLORE_EVERY {
            self.explored = now;
            return Some(Some(1));
        }
        (l != self.level).then_some(l)
    }

    /// The level now in use.
    pub fn set(&mut self, level: Option<i32>) {
        self.level = level;
    }
}

/// Where decoded pages go: the receiver's copy of the image.
pub trait PageStore {
    /// The receiver's current copy of page `no`.
    fn get(&self, no: u64) -> Option<&[u8]>;
    /// The receiver's copy of page `no` as the round began: what references and deltas are
    /// against. By default the current copy, which is right for a store whose frames apply in
    /// the order they were encoded (the page-aware QEMU stream); a delta round whose frames
    /// apply in any order reads the round's starting image, which it keeps as it was.
    fn base(&self, no: u64) -> Option<&[u8]> {
        self.get(no)
    }
    /// Writes page `no` (only ever called with verified bytes, and only for pages it owns).
    fn put(&mut self, no: u64, page: &[u8]);
    /// Whether this frame may write page `no`: a receiver decoding chunks at once lets a frame
    /// write only its own chunk's pages. By default, any page.
    fn owns(&self, _no: u64) -> bool {
        true
    }
}

/// A duplicate that did not verify yet: its source may be a page of the same round whose
/// frame has not arrived. Retry with [`Decoder::retry`] once the round's frames are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deferred {
    /// Page.
    pub no: u64,
    /// Source page.
    pub src: u64,
    /// Expected checksum.
    pub sum: u64,
}

/// What a decode did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DecodeReport {
    /// Pages written.
    pub applied: u64,
    /// Pages refused (did not decode, or did not match their checksum): re-send them literal.
    pub rejected: Vec<(u64, &'static str)>,
    /// Duplicates to retry at the end of the round.
    pub deferred: Vec<Deferred>,
}

/// The receiver's side.
pub struct Decoder {
    literal: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decoder")
    }
}

struct Parsed<'f> {
    no: u64,
    kind: Option<Kind>,
    sum: u64,
    inline: &'f [u8],
}

/// A parsed frame: its reference pages, entries, literal block and delta block.
type Frame<'f> = (Vec<u64>, Vec<Parsed<'f>>, &'f [u8], &'f [u8]);

fn parse(frame: &[u8], max_pages: usize) -> Result<Frame<'_>, HdeError> {
    if frame.len() < HEADER || &frame[..4] != MAGIC {
        return Err(HdeError::BadMagic);
    }
    let u32_at = |at: usize| u32::from_le_bytes(frame[at..at + 4].try_into().expect("4")) as usize;
    let (count, lit_len, delta_len, nrefs) = (u32_at(4), u32_at(8), u32_at(12), u32_at(16));
    if nrefs > REFS_MAX {
        return Err(HdeError::TooManyRefs { count: nrefs as u32 });
    }
    if count > PAGES_MAX.min(max_pages) {
        return Err(HdeError::TooManyPages { count: count as u32 });
    }
    let mut d = &frame[HEADER..];
    let mut prev: Option<u64> = None;
    let mut refs = Vec::with_capacity(nrefs.min(REFS_MAX));
    for _ in 0..nrefs {
        let (step, r) = get_leb(d).ok_or(HdeError::Truncated { index: 0 })?;
        refs.push(take_step(&mut prev, step));
        d = r;
    }
    let mut prev: Option<u64> = None;
    let mut out = Vec::with_capacity(count.min(1 << 16));
    while out.len() < count {
        let t = HdeError::Truncated { index: out.len() as u32 };
        let (step, r) = get_leb(d).ok_or(t.clone())?;
        let no = take_step(&mut prev, step);
        let (&k, r) = r.split_first().ok_or(t.clone())?;
        if k & RUN != 0 {
            // A run of zero or same pages: `more` after this one, numbered one after the other,
            // within the frame's count.
            let kind = Kind::from_u8(k & !RUN).filter(|k| k.bare());
            let (more, r) = get_leb(r).ok_or(t.clone())?;
            let more = usize::try_from(more).ok().filter(|&m| m >= 1 && m < count - out.len()).ok_or(t.clone())?;
            no.checked_add(more as u64).ok_or(t)?;
            out.extend((0..=more as u64).map(|k| Parsed { no: no + k, kind, sum: 0, inline: &r[..0] }));
            prev = Some(no + more as u64);
            d = r;
            continue;
        }
        let kind = Kind::from_u8(k);
        let (sum, r) = if kind.is_some_and(Kind::bare) {
            (0, r)
        } else {
            let s = r.get(..8).ok_or(t.clone())?;
            (u64::from_le_bytes(s.try_into().expect("8")), &r[8..])
        };
        let (inline, r) = if matches!(kind, Some(Kind::Dup | Kind::Xbzrle | Kind::Raw)) {
            let (n, r) = get_leb(r).ok_or(t.clone())?;
            let n = usize::try_from(n).ok().filter(|&n| n <= r.len()).ok_or(t.clone())?;
            (&r[..n], &r[n..])
        } else {
            (&r[..0], r)
        };
        d = r;
        out.push(Parsed { no, kind, sum, inline });
    }
    let listed = frame.len() - d.len();
    let (sum, d) = d.split_at_checked(8).ok_or(HdeError::Truncated { index: count as u32 })?;
    if d.len() != lit_len + delta_len {
        return Err(HdeError::Truncated { index: count as u32 });
    }
    if list_sum(&frame[..listed]) != u64::from_le_bytes(sum.try_into().expect("8")) {
        return Err(HdeError::Corrupt);
    }
    Ok((refs, out, &d[..lit_len], &d[lit_len..]))
}

impl Decoder {
    /// A decoder holding the sender's trained dictionary, if any.
    pub fn new(dict: Option<&[u8]>) -> std::io::Result<Self> {
        Ok(Self {
            literal: match dict {
                Some(d) => zstd::bulk::Decompressor::with_dictionary(d)?,
                None => zstd::bulk::Decompressor::new()?,
            },
        })
    }

    /// Decodes a frame into `store`. Every page is decoded into scratch and checked against its
    /// checksum before it is written; nothing of the frame is written before all of its delta
    /// pages are decoded (their old copies are the block's prefix).
    pub fn decode(&mut self, frame: &[u8], store: &mut dyn PageStore) -> Result<DecodeReport, HdeError> {
        self.decode_bounded(frame, store, PAGES_MAX)
    }

    /// [`Decoder::decode`] of a frame that may list at most `max_pages` pages (a chunk's): what
    /// it allocates (entries, decoded blocks, the report) is bounded by that, whatever the
    /// frame's header claims.
    pub fn decode_bounded(&mut self, frame: &[u8], store: &mut dyn PageStore, max_pages: usize) -> Result<DecodeReport, HdeError> {
        let (refs, entries, lit, delta) = parse(frame, max_pages)?;
        let mut rep = DecodeReport::default();
        let count = |k: Kind| entries.iter().filter(|e| e.kind == Some(k)).count();
        let (nlit, ndelta) = (count(Kind::Literal), count(Kind::ZstdDelta) + count(Kind::RefLiteral));
        let mut lit_pages = vec![0u8; nlit * PAGE];
        let lit_state: Result<(), &'static str> = if nlit == 0 {
            Ok(())
        } else {
            // A slice, not the Vec: zstd would set a Vec's length to what it wrote.
            match self.literal.decompress_to_buffer(lit, &mut lit_pages[..]) {
                Ok(n) if n == nlit * PAGE => Ok(()),
                Ok(_) => Err("literal block decodes to the wrong length"),
                Err(_) => Err("literal block does not decode"),
            }
        };
        let mut delta_pages = vec![0u8; ndelta * PAGE];
        let delta_state: Result<(), &'static str> = if ndelta == 0 {
            Ok(())
        } else {
            let mut prefix = Vec::with_capacity((refs.len() + ndelta) * PAGE);
            let mut missing = false;
            // The references, then the old copies of the block-delta pages (as the encoder).
            for no in refs.iter().copied().chain(entries.iter().filter(|e| e.kind == Some(Kind::ZstdDelta)).map(|e| e.no)) {
                match store.base(no) {
                    Some(p) => prefix.extend_from_slice(p),
                    None => missing = true,
                }
            }
            if missing {
                Err("delta against a page the receiver does not hold")
            } else {
                match decompress_with_prefix(&prefix, delta, &mut delta_pages) {
                    Ok(n) if n == ndelta * PAGE => Ok(()),
                    Ok(_) => Err("delta block decodes to the wrong length"),
                    Err(e) => Err(e),
                }
            }
        };
        // Blocks are decoded above, before any page is written (the delta prefix is the store as
        // it was); pages are then verified and written in order, so a duplicate may refer to a
        // page earlier in the same frame.
        let mut page = vec![0u8; PAGE];
        let (mut li, mut di) = (0, 0);
        for e in &entries {
            if !store.owns(e.no) {
                match e.kind {
                    Some(Kind::Literal) => li += 1,
                    Some(Kind::ZstdDelta | Kind::RefLiteral) => di += 1,
                    _ => {}
                }
                rep.rejected.push((e.no, "page outside the frame's chunk"));
                continue;
            }
            let r: Result<(), &'static str> = match e.kind {
                None => Err("unknown page kind"),
                Some(Kind::Zero) => {
                    page.fill(0);
                    Ok(())
                }
                Some(Kind::Raw) if e.inline.len() == PAGE => {
                    page.copy_from_slice(e.inline);
                    Ok(())
                }
                Some(Kind::Raw) => Err("raw page of the wrong length"),
                Some(Kind::Same) => {
                    match store.base(e.no) {
                        None => rep.rejected.push((e.no, "unchanged page the receiver does not hold")),
                        // Written only where the store's copy differs from the round's start (a
                        // page is written once a round): nothing is dirtied for nothing.
                        Some(b) if store.get(e.no) == Some(b) => rep.applied += 1,
                        Some(b) => {
                            page.copy_from_slice(b);
                            store.put(e.no, &page);
                            rep.applied += 1;
                        }
                    }
                    continue;
                }
                Some(Kind::Literal) => {
                    li += 1;
                    lit_state.map(|()| page.copy_from_slice(&lit_pages[(li - 1) * PAGE..li * PAGE]))
                }
                Some(Kind::ZstdDelta | Kind::RefLiteral) => {
                    di += 1;
                    delta_state.map(|()| page.copy_from_slice(&delta_pages[(di - 1) * PAGE..di * PAGE]))
                }
                Some(Kind::Xbzrle) => match store.base(e.no) {
                    None => Err("delta against a page the receiver does not hold"),
                    Some(o) => xbzrle_decode(o, e.inline, &mut page).ok_or("delta does not apply"),
                },
                Some(Kind::Dup) => match get_leb(e.inline) {
                    Some((src, [])) => {
                        let d = Deferred { no: e.no, src, sum: e.sum };
                        if !Self::apply_dup(d, store) {
                            rep.deferred.push(d);
                        } else {
                            rep.applied += 1;
                        }
                        continue;
                    }
                    _ => Err("duplicate reference malformed"),
                },
            };
            match r {
                Ok(()) if e.kind == Some(Kind::Zero) || page_sum(e.no, &page) == e.sum => {
                    store.put(e.no, &page);
                    rep.applied += 1;
                }
                Ok(()) => rep.rejected.push((e.no, "decoded page does not match its checksum")),
                Err(why) => rep.rejected.push((e.no, why)),
            }
        }
        Ok(rep)
    }

    fn apply_dup(d: Deferred, store: &mut dyn PageStore) -> bool {
        let Some(src) = store.get(d.src) else { return false };
        if page_sum(d.no, src) != d.sum {
            return false;
        }
        let copy = src.to_vec();
        store.put(d.no, &copy);
        true
    }

    /// Retries deferred duplicates (at the end of a round); those that still do not verify are
    /// refused for re-sending. A copy and a checksum each: no decoder state is needed.
    pub fn retry(deferred: &[Deferred], store: &mut dyn PageStore) -> DecodeReport {
        let mut rep = DecodeReport::default();
        // A duplicate may depend on another deferred one: retry until nothing changes.
        let mut left: Vec<Deferred> = deferred.to_vec();
        loop {
            let before = left.len();
            left.retain(|d| {
                let ok = Self::apply_dup(*d, store);
                rep.applied += u64::from(ok);
                !ok
            });
            if left.len() == before {
                break;
            }
        }
        rep.rejected = left.iter().map(|d| (d.no, "duplicate whose source never matched its checksum")).collect();
        rep
    }
}

/// The sender's bounded cache of pages as last sent (as QEMU's XBZRLE cache): a later round
/// can delta-encode a dirty page only if its old copy is here. First in, first out.
#[derive(Debug)]
pub struct PageCache {
    cap_pages: usize,
    pages: HashMap<u64, Box<[u8]>>,
    order: std::collections::VecDeque<u64>,
    hits: std::cell::Cell<u64>,
    misses: std::cell::Cell<u64>,
}

impl PageCache {
    /// A cache of at most `cap_bytes`.
    pub fn new(cap_bytes: u64) -> Self {
        Self { cap_pages: (cap_bytes / PAGE as u64) as usize, pages: HashMap::new(), order: std::collections::VecDeque::new(), hits: 0.into(), misses: 0.into() }
    }
    /// Empties it, same capacity.
    pub fn clear(&mut self) {
        *self = Self { cap_pages: self.cap_pages, ..Self::new(0) };
    }
    /// Records what was sent for page `no` (zero pages need no copy: they are cached as absent
    /// and compared against zero by the caller).
    pub fn put(&mut self, no: u64, page: &[u8]) {
        if self.cap_pages == 0 {
            return;
        }
        if let Some(p) = self.pages.get_mut(&no) {
            p.copy_from_slice(page);
            return;
        }
        while self.pages.len() >= self.cap_pages {
            match self.order.pop_front() {
                Some(old) => {
                    self.pages.remove(&old);
                }
                None => break,
            }
        }
        self.pages.insert(no, page.into());
        self.order.push_back(no);
    }
    /// The cached copy of page `no`, counting the hit or miss.
    pub fn lookup(&self, no: u64) -> Option<&[u8]> {
        let p = self.pages.get(&no).map(|p| &p[..]);
        let c = if p.is_some() { &self.hits } else { &self.misses };
        c.set(c.get() + 1);
        p
    }
    /// The cached copy of page `no`, not counted.
    pub fn peek(&self, no: u64) -> Option<&[u8]> {
        self.pages.get(&no).map(|p| &p[..])
    }
    /// Forgets page `no` (it became zero, or what the receiver holds changed otherwise).
    pub fn remove(&mut self, no: u64) {
        // Its place in the FIFO order goes stale and is skipped when it comes up.
        self.pages.remove(&no);
    }
    /// (hits, misses) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.hits.get(), self.misses.get())
    }
    /// Hit rate so far (NaN before any lookup).
    pub fn hit_rate(&self) -> f64 {
        let (h, m) = self.counts();
        h as f64 / (h + m) as f64
    }
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        (self.pages.len() * PAGE) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    /// A receiver image in memory.
    struct Mem(HashMap<u64, Vec<u8>>);
    impl PageStore for Mem {
        fn get(&self, no: u64) -> Option<&[u8]> {
            self.0.get(&no).map(Vec::as_slice)
        }
        fn put(&mut self, no: u64, page: &[u8]) {
            self.0.insert(no, page.to_vec());
        }
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
        let mut rx = Mem(HashMap::new());
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
    struct Chunk(u64, u64, Mem);
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
        let mut rx = Chunk(4, 8, Mem(HashMap::new()));
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
        let mut rx = Mem(HashMap::new());
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
        let mut rx = Mem(HashMap::new());
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
        let mut rx = Mem(HashMap::new());
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
        let mut rx = Mem(HashMap::new());
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
    fn after_round_one() -> (Encoder, Decoder, Mem, Vec<u8>) {
        let mut r1: Vec<(u64, Vec<u8>)> = (0..8).map(|i| (i, page_of(3, i + 1))).collect();
        r1.push((10, page_of(3, 100)));
        let mut moved = vec![0u8; PAGE];
        moved[..2048].copy_from_slice(&r1[3].1[1024..3072]);
        moved[2048..].copy_from_slice(&r1[5].1[..2048]);
        let mut enc = Encoder::new(3, None).unwrap();
        let mut dec = Decoder::new(None).unwrap();
        let mut rx = Mem(HashMap::new());
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
        now: &'a mut Mem,
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
            let mut now = Mem(start.clone());
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
        let mut now = Mem(start.clone());
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
        let mut rx = Mem(HashMap::new());
        let f = enc.encode(&[(1, &p)], &|_| None, &mut EncodeStats::default());
        assert!(dec.decode(&f, &mut rx).unwrap().rejected.is_empty());
        assert_eq!(rx.0[&1], p);
    }

    /// Round 1 of one huge page's 512 pages (every third zero) through `enc` into `rx`.
    fn huge_page_round1(enc: &mut Encoder, dec: &mut Decoder, rx: &mut Mem) -> Vec<Vec<u8>> {
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
        let (mut enc, mut dec, mut rx) = (Encoder::new(3, None).unwrap(), Decoder::new(None).unwrap(), Mem(HashMap::new()));
        let (mut twin, mut twin_dec, mut twin_rx) = (Encoder::new(3, None).unwrap(), Decoder::new(None).unwrap(), Mem(HashMap::new()));
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
        let mut rx = Mem(HashMap::new());
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
            let (mut enc, mut dec, mut rx) = (Encoder::new(3, None).unwrap(), Decoder::new(None).unwrap(), Mem(HashMap::new()));
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
            let mut rx = Mem(HashMap::new());
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
}
