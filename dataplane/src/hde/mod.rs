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

mod cache;
mod decode;
mod dirty;
mod encode;
mod index;
#[cfg(test)]
mod tests;

pub use cache::*;
pub use decode::*;
pub use dirty::*;
pub use encode::*;
pub use index::*;

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

/// A receiver image held in memory, page number to page: the simplest [`PageStore`] (tests,
/// benchmarks, tools).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemStore(pub HashMap<u64, Vec<u8>>);

impl PageStore for MemStore {
    fn get(&self, no: u64) -> Option<&[u8]> {
        self.0.get(&no).map(Vec::as_slice)
    }
    fn put(&mut self, no: u64, page: &[u8]) {
        self.0.insert(no, page.to_vec());
    }
}

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

