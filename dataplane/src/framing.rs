//! Incremental decoding of frames from a byte stream, free of I/O: bytes go in as they arrive,
//! whole frames (header opened, payload opened and checksum verified) come out.
//!
//! Used for the control direction (acks, commit replies) and by the fuzz target. The bulk data
//! direction reads headers and payloads with exact-length receives straight into pool buffers.

use crate::crypto::FrameCodec;
use crate::wire::{FrameHeader, WireError};

/// Accumulates bytes and yields frames.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    pending: Option<FrameHeader>,
}

impl FrameReader {
    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed. After an error the stream is
    /// out of sync and must be closed.
    pub fn next_frame(&mut self, codec: &mut FrameCodec) -> Result<Option<(FrameHeader, Vec<u8>)>, WireError> {
        let hl = codec.header_wire_len();
        let h = match self.pending {
            Some(h) => h,
            None => {
                if self.buf.len() < hl {
                    return Ok(None);
                }
                let h = codec.open_header(&mut self.buf[..hl])?;
                self.buf.drain(..hl);
                self.pending = Some(h);
                h
            }
        };
        let pl = codec.payload_wire_len(h.len);
        if self.buf.len() < pl {
            return Ok(None);
        }
        let payload = codec.open_payload(&mut self.buf[..pl], h.len)?.to_vec();
        self.buf.drain(..pl);
        self.pending = None;
        h.verify(&payload)?;
        Ok(Some((h, payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FrameType, encode_ack};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn split_anywhere_roundtrips(frames in prop::collection::vec(prop::collection::vec(any::<u64>(), 0..20), 1..8),
                                     cuts in prop::collection::vec(1usize..64, 1..50)) {
            let mut tx = FrameCodec::new(1, None);
            let mut rx = FrameCodec::new(1, None);
            let mut bytes = Vec::new();
            for f in &frames {
                let p = encode_ack(f);
                bytes.extend(tx.encode_frame(&FrameHeader::for_payload(FrameType::Ack, 1, 0, &p), &p));
            }
            let mut r = FrameReader::default();
            let mut got = Vec::new();
            let mut at = 0;
            let mut ci = 0;
            while at < bytes.len() {
                let n = cuts[ci % cuts.len()].min(bytes.len() - at);
                ci += 1;
                r.push(&bytes[at..at + n]);
                at += n;
                while let Some((_, p)) = r.next_frame(&mut rx).unwrap() {
                    got.push(crate::wire::decode_ack(&p).unwrap());
                }
            }
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let mut r = FrameReader::default();
            r.push(&bytes);
            let mut c = FrameCodec::new(0, None);
            while let Ok(Some(_)) = r.next_frame(&mut c) {}
        }
    }
}
