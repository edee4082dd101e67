//! The receiver's mapped output image, written by several shard threads at once.
//!
//! An HDE session's frames are decoded by whichever shard read them, straight into one shared
//! mapping of the output file. What keeps that sound:
//!
//! - A chunk of the image is decoded once: a shard first takes the chunk's [`Claim`], and only
//!   the first taker of each chunk ever gets it (a chunk sent again after a stream dropped is
//!   not decoded twice). A claim writes only the pages of its own chunk, each at most once.
//! - A page of another chunk is read only once its writer has **published** it (a bit per page,
//!   set with release ordering after the page is written, read with acquire ordering), and a
//!   published page is never written again.
//! - The whole image is read or written only through [`SharedImage::exclusive`], which closes
//!   the image to new claims and succeeds only while no claim is held.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use memmap2::MmapRaw;

const PAGE: usize = 4096;
/// The top bit of [`SharedImage::state`]: closed to new claims. The bits below count claims held.
const CLOSED: u64 = 1 << 63;

/// A writable shared mapping of a file whose size is a whole number of pages, cut in chunks.
pub struct SharedImage {
    map: MmapRaw,
    pages: u64,
    chunk_pages: u64,
    claimed: Box<[AtomicBool]>,
    published: Box<[AtomicU64]>,
    state: AtomicU64,
}

impl std::fmt::Debug for SharedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedImage").field("pages", &self.pages).field("chunk_pages", &self.chunk_pages).finish_non_exhaustive()
    }
}

impl SharedImage {
    /// Maps `f` (read-write, shared), cut in chunks of `chunk_bytes` (a whole number of pages).
    /// The file is the receiver's own `.part` file: nothing else truncates it while mapped.
    pub fn new(f: &File, chunk_bytes: u32) -> std::io::Result<Self> {
        let chunk = chunk_bytes as usize;
        if chunk == 0 || !chunk.is_multiple_of(PAGE) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("chunk of {chunk} bytes is not a whole number of 4 KiB pages")));
        }
        let map = MmapRaw::map_raw(f)?;
        if !map.len().is_multiple_of(PAGE) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("image of {} bytes is not a whole number of 4 KiB pages", map.len())));
        }
        let pages = (map.len() / PAGE) as u64;
        let chunk_pages = (chunk / PAGE) as u64;
        let chunks = pages.div_ceil(chunk_pages) as usize;
        Ok(Self {
            map,
            pages,
            chunk_pages,
            claimed: (0..chunks).map(|_| AtomicBool::new(false)).collect(),
            published: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            state: AtomicU64::new(0),
        })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the image is empty.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Chunk `index`, to decode into: `None` if it is past the image, was claimed before, or
    /// the image is closed.
    pub fn claim(&self, index: u64) -> Option<Claim<'_>> {
        let slot = self.claimed.get(usize::try_from(index).ok()?)?;
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if s & CLOSED != 0 {
                return None;
            }
            match self.state.compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => s = now,
            }
        }
        let claim = Claim { image: self, first: index * self.chunk_pages, end: ((index + 1) * self.chunk_pages).min(self.pages) };
        // Dropping the claim on refusal gives the count back.
        if slot.swap(true, Ordering::AcqRel) { None } else { Some(claim) }
    }

    /// The whole image, once no claim is held; the image then takes no more claims. `None`
    /// while a chunk is being decoded, or if the image was taken before.
    pub fn exclusive(&self) -> Option<Exclusive<'_>> {
        self.state.compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire).ok().map(|_| Exclusive(self))
    }

    fn is_published(&self, no: u64) -> bool {
        self.published[(no / 64) as usize].load(Ordering::Acquire) & (1 << (no % 64)) != 0
    }

    /// Page `no`'s bytes. Callers make sure nothing writes it meanwhile (the module's rules).
    fn page(&self, no: u64) -> &[u8] {
        debug_assert!(no < self.pages);
        // SAFETY: `no` is a page of the mapping (callers check it against `pages`). What may be
        // read is what the module's rules say nothing writes while the slice lives: a published
        // page, a page of the reader's own claim (only that claim writes it, and `put` takes the
        // claim mutably, so no such slice outlives into a write), or anything under `Exclusive`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(no as usize * PAGE), PAGE) }
    }
}

/// The right to decode one chunk: write its pages (each once) and read published pages.
pub struct Claim<'a> {
    image: &'a SharedImage,
    first: u64,
    end: u64,
}

impl std::fmt::Debug for Claim<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim").field("first", &self.first).field("end", &self.end).finish()
    }
}

impl Claim<'_> {
    /// Whether page `no` is in this claim's chunk.
    pub fn owns(&self, no: u64) -> bool {
        (self.first..self.end).contains(&no)
    }

    /// Page `no` of this claim's chunk, as it stands.
    pub fn own(&self, no: u64) -> Option<&[u8]> {
        self.owns(no).then(|| self.image.page(no))
    }

    /// Page `no` as this claim may read it: its own chunk's as it stands, another's once
    /// published.
    pub fn get(&self, no: u64) -> Option<&[u8]> {
        self.own(no).or_else(|| self.published(no))
    }

    /// Page `no` of the image once its writer has published it.
    pub fn published(&self, no: u64) -> Option<&[u8]> {
        (no < self.image.pages && self.image.is_published(no)).then(|| self.image.page(no))
    }

    /// Writes page `no` of this chunk (`Some(bytes)`) or takes it as it stands (`None`: a fresh
    /// file's zero page), then publishes it. `false` if the page is not this chunk's or was
    /// published before (a frame listing a page twice): nothing is written.
    pub fn put(&mut self, no: u64, page: Option<&[u8]>) -> bool {
        if !self.owns(no) || self.image.is_published(no) {
            return false;
        }
        if let Some(bytes) = page {
            assert_eq!(bytes.len(), PAGE, "a page is 4 KiB");
            // SAFETY: page `no` is in this claim's chunk, which no other claim ever gets; it is
            // not published yet, so no other thread reads it; `&mut self` ends every slice this
            // claim handed out. The source is a separate buffer (never the mapping's own page:
            // callers copy a page of the image into scratch before putting it).
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.image.map.as_mut_ptr().add(no as usize * PAGE), PAGE) };
        }
        self.image.published[(no / 64) as usize].fetch_or(1 << (no % 64), Ordering::Release);
        true
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.image.state.fetch_sub(1, Ordering::Release);
    }
}

/// The whole image, read and written by one thread: no claim is held and none can be taken.
#[derive(Debug)]
pub struct Exclusive<'a>(&'a SharedImage);

impl Exclusive<'_> {
    /// The image's bytes.
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the image is closed to claims and none is held (`exclusive`), so this is the
        // only access to the mapping, and `&mut self` keeps it so for the slice's life.
        unsafe { std::slice::from_raw_parts_mut(self.0.map.as_mut_ptr(), self.0.map.len()) }
    }

    /// Writes the image's dirty pages back to the file.
    pub fn flush(&self) -> std::io::Result<()> {
        self.0.map.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(pages: u64, chunk_pages: u32) -> (tempfile::NamedTempFile, SharedImage) {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        f.as_file().set_len(pages * PAGE as u64).expect("size");
        let img = SharedImage::new(f.as_file(), chunk_pages * PAGE as u32).expect("map");
        (f, img)
    }

    #[test]
    fn a_chunk_is_claimed_once_and_writes_only_its_own_pages_once() {
        let (_f, img) = image(10, 4);
        let mut c = img.claim(1).expect("first claim");
        assert!(img.claim(1).is_none(), "a chunk is decoded once");
        assert!(img.claim(3).is_none(), "past the image");
        assert!(c.owns(4) && c.owns(7) && !c.owns(3) && !c.owns(8));
        assert!(!c.put(3, Some(&[1; PAGE])), "another chunk's page");
        assert!(c.published(5).is_none());
        assert!(c.put(5, Some(&[7; PAGE])));
        assert!(!c.put(5, Some(&[8; PAGE])), "a published page is never written again");
        assert_eq!(c.published(5).expect("published")[0], 7);
        // The last chunk is short.
        let last = img.claim(2).expect("last");
        assert!(last.owns(9) && !last.owns(10) && last.own(10).is_none());
        // Pages of other chunks are seen once published, not before.
        assert!(last.published(4).is_none());
        assert!(c.put(4, None));
        assert_eq!(last.published(4).expect("published"), &[0; PAGE][..]);
        drop(c);
        assert!(img.exclusive().is_none(), "a claim is held");
        drop(last);
        let mut ex = img.exclusive().expect("no claim held");
        assert_eq!(ex.bytes()[5 * PAGE], 7);
        assert!(img.claim(0).is_none(), "closed");
        assert!(img.exclusive().is_none(), "taken once");
    }

    #[test]
    fn shards_writing_chunks_at_once_leave_every_page_right() {
        let (_f, img) = image(256, 8);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let img = &img;
                s.spawn(move || {
                    for chunk in 0..32 {
                        // Every thread tries every chunk; one wins each.
                        let Some(mut c) = img.claim((chunk + t * 8) % 32) else { continue };
                        for no in c.first..c.end {
                            assert!(c.put(no, Some(&[no as u8; PAGE])));
                        }
                        // A page of another chunk, once published, holds what its writer put.
                        if let Some(p) = c.published((chunk * 8 + 100) % 256) {
                            assert!(p.iter().all(|&b| b == p[0]));
                        }
                    }
                });
            }
        });
        let mut ex = img.exclusive().expect("all claims dropped");
        for (no, page) in ex.bytes().chunks(PAGE).enumerate() {
            assert!(page.iter().all(|&b| b == no as u8), "page {no}");
        }
    }
}
