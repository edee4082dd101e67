//! The reference index: where moved data may be found.

use super::*;

/// Where moved data may be found: sampled 16-byte blocks (16-byte offsets, one in [`SAMPLE`] by
/// content hash) -> the first page seen holding them and the block's offset in it
/// (`page << 12 | offset`).
#[derive(Debug, Default)]
pub struct RefIndex(pub(super) FxHashMap<u64, u64>, pub(super) Filter);

/// A bit per slot of hashes the index holds (2 MiB): most positions looked up hold no indexed
/// block, and this answers them from cache instead of a miss into the map. Built once the
/// index holds [`FILTER_FROM`] blocks; a smaller map answers from cache itself, and an encoder
/// that indexes a few pages does not zero 2 MiB.
#[derive(Debug, Default)]
pub(super) struct Filter(pub(super) Vec<u64>);

const FILTER_BITS: u32 = 24;
pub(super) const FILTER_FROM: usize = 4096;

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
    pub(super) fn may_hold(&self, h: u64) -> bool {
        if self.1.0.is_empty() { self.0.contains_key(&h) } else { self.1.may_hold(h) }
    }

    /// The page and offset of the first block seen with hash `h`.
    pub(super) fn get(&self, h: u64) -> Option<(u64, usize)> {
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
