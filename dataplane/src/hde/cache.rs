//! The sender's cache of pages as last sent.

use super::*;

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
