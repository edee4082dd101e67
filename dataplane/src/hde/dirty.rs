//! Dirty logs: which pages a later round sends.

use super::*;

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
