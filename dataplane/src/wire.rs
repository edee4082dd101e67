//! Wire protocol v1: byte layouts of the preamble, frame headers and control payloads.
//!
//! Free of I/O: every function takes bytes and returns values or a [`WireError`] naming what was
//! wrong. `docs/wire.md` has the byte tables; this module is the truth they are written from.
//!
//! Integrity: each chunk carries the XXH3-64 of its plaintext payload, checked before the chunk is
//! written; the commit frame carries a BLAKE3 digest over the whole object's chunk manifest (see
//! [`ManifestDigest`]). Each header carries a 32-bit check of its own bytes so a damaged or
//! misaligned header is refused before its length field is trusted.

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

/// First four bytes a dwcp initiator writes on a fresh connection.
pub const PREAMBLE_MAGIC: [u8; 4] = *b"DWCP";
/// Magic at the start of every frame header.
pub const FRAME_MAGIC: u16 = 0xD7C9;
/// The protocol version this build speaks (2: plaintext parts carry tags; the preamble is the
/// handshake's prologue).
pub const VERSION: u8 = 3;
/// Length of the plaintext preamble.
pub const PREAMBLE_LEN: usize = 8;
/// Length of a frame header in plaintext.
pub const HEADER_LEN: usize = 32;
/// AEAD tag length added to each sealed part (header and payload) on an encrypted stream.
pub const TAG_LEN: usize = 16;
/// What precedes an RDMA chunk's payload in its slot: its frame header and the chunk's tag
/// ([`crate::crypto::ChunkTag`]).
pub const RDMA_SLOT_HEADER: usize = HEADER_LEN + TAG_LEN;
/// Largest payload a frame may declare (chunks are at most this big).
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Largest payload a control frame (anything but a chunk) may declare.
pub const MAX_CONTROL_PAYLOAD: u32 = 1 << 20;
/// Largest fleet request or reply (a batch of Raft log entries, a snapshot chunk).
pub const MAX_FLEET_PAYLOAD: u32 = 4 << 20;
/// Largest object name, in bytes.
pub const MAX_NAME: usize = 255;

/// Errors decoding bytes from a peer. Each names what was wrong.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum WireError {
    /// The first bytes were not the dwcp preamble: the peer does not speak dwcp.
    #[error("bad preamble magic {found:02x?}: the peer is not a dwcp endpoint")]
    BadPreamble {
        /// The four bytes received.
        found: [u8; 4],
    },
    /// The peer speaks a protocol version this build does not.
    #[error("unsupported protocol version {found} (this build speaks version {supported})")]
    UnsupportedVersion {
        /// Version the peer announced.
        found: u16,
        /// Version this build speaks.
        supported: u16,
    },
    /// A frame header did not start with the frame magic.
    #[error("bad frame magic {found:#06x} (expected {FRAME_MAGIC:#06x}): stream out of sync or not dwcp")]
    BadMagic {
        /// The magic found.
        found: u16,
    },
    /// A frame header's own check did not match: the header was damaged.
    #[error("frame header check failed: header damaged in transit")]
    HeaderCheck,
    /// Unknown frame type byte.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// A frame declared a payload larger than allowed.
    #[error("{kind} frame declares {len} payload bytes, more than the {max} allowed")]
    PayloadTooLarge {
        /// Frame type.
        kind: FrameType,
        /// Declared length.
        len: u32,
        /// Limit.
        max: u32,
    },
    /// A chunk's payload did not match its checksum.
    #[error("chunk at offset {offset} on stream {stream} failed its checksum (expected {expected:#018x}, computed {found:#018x})")]
    BadChecksum {
        /// Stream id.
        stream: u16,
        /// Chunk offset in the object.
        offset: u64,
        /// Checksum in the header.
        expected: u64,
        /// Checksum of the bytes received.
        found: u64,
    },
    /// A payload was shorter than its fields need.
    #[error("{what}: truncated ({have} bytes, need {need})")]
    Truncated {
        /// Which payload.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A payload field held an impossible value.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which payload.
        what: &'static str,
        /// Why it is malformed.
        why: String,
    },
    /// A part failed authentication (its tag, encrypted or plaintext).
    #[error("authentication failed on stream {stream}: wrong key, tampered, replayed or corrupted bytes")]
    Decrypt {
        /// Stream id.
        stream: u16,
    },
}

/// Frame types. The byte values are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Initiator opens a session or joins a stream to one.
    Hello = 1,
    /// Responder accepts a Hello.
    Welcome = 2,
    /// A chunk of the object at an offset.
    Chunk = 3,
    /// Receiver has durably placed the chunks listed.
    Ack = 4,
    /// Sender has finished; carries the whole object's digest.
    Commit = 6,
    /// Receiver verified the digest and published the object.
    Verified = 7,
    /// Either side reports an error and closes the session.
    Error = 8,
    /// A measurement exchange on a probe connection (`Hello::Probe`): RTT and delivery rate.
    Probe = 9,
    /// Sender's RDMA queue pairs, after a Welcome that granted RDMA.
    RdmaConnect = 10,
    /// Receiver's queue pairs and the region chunks are written into.
    RdmaAccept = 11,
    /// A request or reply between the daemons of a fleet (its Raft group), on a fleet
    /// connection, never on a transfer's.
    Fleet = 12,
}

impl FrameType {
    fn from_u8(b: u8) -> Result<Self, WireError> {
        Ok(match b {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Chunk,
            4 => Self::Ack,
            6 => Self::Commit,
            7 => Self::Verified,
            8 => Self::Error,
            9 => Self::Probe,
            10 => Self::RdmaConnect,
            11 => Self::RdmaAccept,
            12 => Self::Fleet,
            other => return Err(WireError::UnknownFrameType(other)),
        })
    }
    fn max_payload(self) -> u32 {
        match self {
            Self::Chunk => MAX_PAYLOAD,
            Self::Fleet => MAX_FLEET_PAYLOAD,
            _ => MAX_CONTROL_PAYLOAD,
        }
    }
}

impl std::fmt::Display for FrameType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Preamble flags.
pub const PREAMBLE_ENCRYPT: u16 = 1;

/// The 8-byte preamble: magic, version, flags. Sent in plaintext before the Noise handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    /// Protocol version.
    pub version: u16,
    /// [`PREAMBLE_ENCRYPT`] and future bits.
    pub flags: u16,
}

impl Preamble {
    /// Encodes to bytes.
    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[..4].copy_from_slice(&PREAMBLE_MAGIC);
        b[4..6].copy_from_slice(&self.version.to_be_bytes());
        b[6..8].copy_from_slice(&self.flags.to_be_bytes());
        b
    }
    /// Decodes and checks magic and version.
    pub fn decode(b: &[u8; PREAMBLE_LEN]) -> Result<Self, WireError> {
        let magic: [u8; 4] = b[..4].try_into().expect("4 bytes");
        if magic != PREAMBLE_MAGIC {
            return Err(WireError::BadPreamble { found: magic });
        }
        let version = u16::from_be_bytes([b[4], b[5]]);
        if version != u16::from(VERSION) {
            return Err(WireError::UnsupportedVersion { found: version, supported: VERSION.into() });
        }
        Ok(Self { version, flags: u16::from_be_bytes([b[6], b[7]]) })
    }
    /// Whether the initiator asks for an encrypted session.
    pub fn encrypted(&self) -> bool {
        self.flags & PREAMBLE_ENCRYPT != 0
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame type.
    pub kind: FrameType,
    /// Stream index within the session.
    pub stream: u16,
    /// Frame-type specific flags.
    pub flags: u16,
    /// Object offset (chunks), or a frame-specific value.
    pub offset: u64,
    /// Payload length in plaintext bytes.
    pub len: u32,
    /// XXH3-64 of the plaintext payload.
    pub checksum: u64,
}

impl FrameHeader {
    /// A header for `payload`, computing its checksum.
    pub fn for_payload(kind: FrameType, stream: u16, offset: u64, payload: &[u8]) -> Self {
        Self { kind, stream, flags: 0, offset, len: payload.len() as u32, checksum: checksum(payload) }
    }

    /// Encodes to the 32-byte layout in `docs/wire.md`.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&FRAME_MAGIC.to_be_bytes());
        b[2] = VERSION;
        b[3] = self.kind as u8;
        b[4..6].copy_from_slice(&self.stream.to_be_bytes());
        b[6..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..16].copy_from_slice(&self.offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.len.to_be_bytes());
        b[20..28].copy_from_slice(&self.checksum.to_be_bytes());
        let check = xxh3_64(&b[..28]) as u32;
        b[28..32].copy_from_slice(&check.to_be_bytes());
        b
    }

    /// Decodes and validates a header: magic, header check, version, type, payload bound.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, WireError> {
        let magic = u16::from_be_bytes([b[0], b[1]]);
        if magic != FRAME_MAGIC {
            return Err(WireError::BadMagic { found: magic });
        }
        let check = u32::from_be_bytes(b[28..32].try_into().expect("4"));
        if check != xxh3_64(&b[..28]) as u32 {
            return Err(WireError::HeaderCheck);
        }
        if b[2] != VERSION {
            return Err(WireError::UnsupportedVersion { found: b[2].into(), supported: VERSION.into() });
        }
        let kind = FrameType::from_u8(b[3])?;
        let len = u32::from_be_bytes(b[16..20].try_into().expect("4"));
        if len > kind.max_payload() {
            return Err(WireError::PayloadTooLarge { kind, len, max: kind.max_payload() });
        }
        Ok(Self {
            kind,
            stream: u16::from_be_bytes([b[4], b[5]]),
            flags: u16::from_be_bytes([b[6], b[7]]),
            offset: u64::from_be_bytes(b[8..16].try_into().expect("8")),
            len,
            checksum: u64::from_be_bytes(b[20..28].try_into().expect("8")),
        })
    }

    /// Checks `payload` against this header's checksum.
    pub fn verify(&self, payload: &[u8]) -> Result<(), WireError> {
        let found = checksum(payload);
        if found != self.checksum {
            return Err(WireError::BadChecksum { stream: self.stream, offset: self.offset, expected: self.checksum, found });
        }
        Ok(())
    }
}

/// The per-chunk checksum: XXH3-64 of the plaintext.
pub fn checksum(payload: &[u8]) -> u64 {
    xxh3_64(payload)
}

/// Bytes a header occupies on the wire.
pub fn header_wire_len(encrypted: bool) -> usize {
    HEADER_LEN + if encrypted { TAG_LEN } else { 0 }
}

/// Bytes a payload of `len` occupies on the wire (zero-length payloads carry no tag).
pub fn payload_wire_len(len: u32, encrypted: bool) -> usize {
    if len == 0 { 0 } else { len as usize + if encrypted { TAG_LEN } else { 0 } }
}

// ---------------------------------------------------------------- control payloads

/// Capabilities an endpoint announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Most streams it will use or accept for one session.
    pub max_streams: u16,
    /// Largest chunk it will send or accept.
    pub max_chunk: u32,
    /// Bit set of codecs ([`CODEC_RAW`]; HDE codecs take further bits).
    pub codecs: u32,
    /// Bit set of transports ([`TRANSPORT_TCP`], [`TRANSPORT_RDMA`]).
    pub transports: u32,
}

/// Raw bytes, no codec.
pub const CODEC_RAW: u32 = 1;
/// Codec bit: chunks are HDE frames (`dataplane::hde`) of the pages they cover.
pub const CODEC_HDE: u32 = 2;
/// Codec bit: an HDE delta round against the receiver's published object of the same name.
pub const CODEC_HDE_ROUND: u32 = 4;
/// Codec bit: the stream is a QEMU migration stream in page-aware form (`dataplane::qemu`); the
/// receiver rebuilds QEMU's bytes before writing them out.
pub const CODEC_QEMU: u32 = 8;
/// io_uring TCP streams.
pub const TRANSPORT_TCP: u32 = 1;
/// RDMA RC queue pairs.
pub const TRANSPORT_RDMA: u32 = 2;
/// Transport bit, in a probe's Welcome only: the receiver accepts plaintext streams.
pub const TRANSPORT_PLAINTEXT: u32 = 4;

/// `object_size` of a stream whose size is not known in advance (stdin).
pub const SIZE_UNKNOWN: u64 = u64::MAX;

/// The Hello payload: open a new session (stream 0) or join a stream to one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Opens a session for one object.
    Open {
        /// Sender's capabilities.
        caps: Caps,
        /// Chunk size the sender will use.
        chunk_size: u32,
        /// Streams the sender intends to open.
        streams: u16,
        /// Object size in bytes, or [`SIZE_UNKNOWN`].
        object_size: u64,
        /// Identity of the object's content version, for resume (size, mtime, name hash).
        object_id: u64,
        /// Whether the sender asks to resume a previous transfer of the same object.
        resume: bool,
        /// Object name (a file name; no path separators).
        name: String,
    },
    /// Joins stream `index` to an existing session.
    Join {
        /// Session id from the Welcome.
        session: [u8; 16],
        /// Stream index, 1..streams.
        index: u16,
    },
    /// Opens a measurement connection (no session): Probe frames follow, see [`ProbeMsg`].
    Probe,
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), WireError> {
    if b.len() < n {
        return Err(WireError::Truncated { what, need: n, have: b.len() });
    }
    Ok(())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8"))
}

impl Caps {
    const LEN: usize = 14;
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.max_streams.to_be_bytes());
        out.extend_from_slice(&self.max_chunk.to_be_bytes());
        out.extend_from_slice(&self.codecs.to_be_bytes());
        out.extend_from_slice(&self.transports.to_be_bytes());
    }
    fn get(b: &[u8]) -> Self {
        Self { max_streams: u16_at(b, 0), max_chunk: u32_at(b, 2), codecs: u32_at(b, 6), transports: u32_at(b, 10) }
    }
}

/// Checks an object name. Accepted: 1 to [`MAX_NAME`] bytes of UTF-8 with no `/`, no control
/// character (U+0000 to U+001F, U+007F to U+009F: a name is printed in logs and on terminals),
/// and not `.` or `..`. A directory receiver further refuses its state directory's name
/// (`.dwcp-state`) and names longer than its file system takes (`recv::outdir`).
pub fn check_name(name: &str) -> Result<(), WireError> {
    let bad = |why: &str| Err(WireError::Malformed { what: "object name", why: format!("{why}: {name:?}") });
    if name.is_empty() || name.len() > MAX_NAME {
        return bad("must be 1 to 255 bytes");
    }
    if name.contains('/') || name == "." || name == ".." {
        return bad("must not contain '/', nor be '.' or '..'");
    }
    if name.chars().any(char::is_control) {
        return bad("must not contain control characters");
    }
    Ok(())
}

impl Hello {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Hello::Open { caps, chunk_size, streams, object_size, object_id, resume, name } => {
                out.push(1);
                caps.put(&mut out);
                out.extend_from_slice(&chunk_size.to_be_bytes());
                out.extend_from_slice(&streams.to_be_bytes());
                out.extend_from_slice(&object_size.to_be_bytes());
                out.extend_from_slice(&object_id.to_be_bytes());
                out.push(u8::from(*resume));
                out.push(name.len() as u8);
                out.extend_from_slice(name.as_bytes());
            }
            Hello::Join { session, index } => {
                out.push(2);
                out.extend_from_slice(session);
                out.extend_from_slice(&index.to_be_bytes());
            }
            Hello::Probe => out.push(3),
        }
        out
    }

    /// Decodes and validates the payload.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "hello";
        need(WHAT, b, 1)?;
        match b[0] {
            1 => {
                let fixed = 1 + Caps::LEN + 4 + 2 + 8 + 8 + 1 + 1;
                need(WHAT, b, fixed)?;
                let caps = Caps::get(&b[1..]);
                let at = 1 + Caps::LEN;
                let chunk_size = u32_at(b, at);
                let streams = u16_at(b, at + 4);
                let object_size = u64_at(b, at + 6);
                let object_id = u64_at(b, at + 14);
                let resume = match b[at + 22] {
                    0 => false,
                    1 => true,
                    v => return Err(WireError::Malformed { what: WHAT, why: format!("resume flag {v}") }),
                };
                let name_len = b[at + 23] as usize;
                need(WHAT, b, fixed + name_len)?;
                let name = std::str::from_utf8(&b[fixed..fixed + name_len]).map_err(|_| WireError::Malformed { what: WHAT, why: "object name is not UTF-8".into() })?.to_owned();
                check_name(&name)?;
                if chunk_size == 0 || chunk_size > MAX_PAYLOAD {
                    return Err(WireError::Malformed { what: WHAT, why: format!("chunk size {chunk_size}") });
                }
                if streams == 0 {
                    return Err(WireError::Malformed { what: WHAT, why: "zero streams".into() });
                }
                Ok(Hello::Open { caps, chunk_size, streams, object_size, object_id, resume, name })
            }
            2 => {
                need(WHAT, b, 19)?;
                let session: [u8; 16] = b[1..17].try_into().expect("16");
                Ok(Hello::Join { session, index: u16_at(b, 17) })
            }
            3 => Ok(Hello::Probe),
            k => Err(WireError::Malformed { what: WHAT, why: format!("hello kind {k}") }),
        }
    }
}

/// The Welcome payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Session id (random, chosen by the receiver).
    pub session: [u8; 16],
    /// Receiver's capabilities.
    pub caps: Caps,
    /// Byte ranges `[start, end)` the receiver already holds verified (resume); empty otherwise.
    pub have: Vec<(u64, u64)>,
}

impl Welcome {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + Caps::LEN + 4 + self.have.len() * 16);
        out.extend_from_slice(&self.session);
        self.caps.put(&mut out);
        out.extend_from_slice(&(self.have.len() as u32).to_be_bytes());
        for (s, e) in &self.have {
            out.extend_from_slice(&s.to_be_bytes());
            out.extend_from_slice(&e.to_be_bytes());
        }
        out
    }
    /// Decodes the payload.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "welcome";
        let fixed = 16 + Caps::LEN + 4;
        need(WHAT, b, fixed)?;
        let session: [u8; 16] = b[..16].try_into().expect("16");
        let caps = Caps::get(&b[16..]);
        let n = u32_at(b, 16 + Caps::LEN) as usize;
        need(WHAT, b, fixed + n.saturating_mul(16))?;
        let mut have = Vec::with_capacity(n);
        for i in 0..n {
            let at = fixed + i * 16;
            let (s, e) = (u64_at(b, at), u64_at(b, at + 8));
            if e <= s {
                return Err(WireError::Malformed { what: WHAT, why: format!("empty range {s}..{e}") });
            }
            have.push((s, e));
        }
        Ok(Self { session, caps, have })
    }
}

/// Largest bulk payload a probe connection accepts in total.
pub const MAX_PROBE_BULK: u64 = 256 << 20;

/// A Probe frame's payload. The prober sends `Ping` and `Bulk` messages; the responder answers
/// every `Ping` and the `Bulk` marked last with a `Reply`. Bulk messages carry padding after the
/// fixed part; the responder measures their delivery rate from the arrival of the first to the
/// arrival of the last, so the figure excludes the round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeMsg {
    /// Answer at once.
    Ping {
        /// Sequence number, echoed.
        seq: u32,
    },
    /// Padding to measure delivery rate; `last` asks for the reply.
    Bulk {
        /// Sequence number.
        seq: u32,
        /// The last of the burst.
        last: bool,
    },
    /// The responder's answer.
    Reply {
        /// Sequence number answered.
        seq: u32,
        /// Bulk payload bytes received after the burst's first message.
        bytes: u64,
        /// Nanoseconds from the first bulk message's arrival to the last's.
        span_ns: u64,
        /// The responder accepts plaintext streams.
        plaintext_ok: bool,
    },
}

impl ProbeMsg {
    /// Bytes of the fixed part.
    pub const LEN: usize = 1 + 4 + 8 + 8 + 1;

    /// Encodes the payload with `pad` zero bytes after the fixed part (bulk only).
    pub fn encode(&self, pad: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN + pad);
        let (kind, seq, bytes, span, flag) = match *self {
            ProbeMsg::Ping { seq } => (1u8, seq, 0, 0, 0u8),
            ProbeMsg::Bulk { seq, last } => (2, seq, 0, 0, u8::from(last)),
            ProbeMsg::Reply { seq, bytes, span_ns, plaintext_ok } => (3, seq, bytes, span_ns, u8::from(plaintext_ok)),
        };
        out.push(kind);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&bytes.to_be_bytes());
        out.extend_from_slice(&span.to_be_bytes());
        out.push(flag);
        out.resize(Self::LEN + pad, 0);
        out
    }

    /// Decodes the fixed part (padding is ignored).
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "probe";
        need(WHAT, b, Self::LEN)?;
        let (seq, flag) = (u32_at(b, 1), b[21]);
        if flag > 1 {
            return Err(WireError::Malformed { what: WHAT, why: format!("flag {flag}") });
        }
        Ok(match b[0] {
            1 => ProbeMsg::Ping { seq },
            2 => ProbeMsg::Bulk { seq, last: flag == 1 },
            3 => ProbeMsg::Reply { seq, bytes: u64_at(b, 5), span_ns: u64_at(b, 13), plaintext_ok: flag == 1 },
            k => return Err(WireError::Malformed { what: WHAT, why: format!("probe kind {k}") }),
        })
    }
}

/// One RDMA queue pair's address: queue pair number, first packet sequence number, GID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpAddr {
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// Initial PSN (24 bits).
    pub psn: u32,
    /// GID (RoCE v2: IPv4-mapped IPv6).
    pub gid: [u8; 16],
}

impl QpAddr {
    const LEN: usize = 24;
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.qpn.to_be_bytes());
        out.extend_from_slice(&self.psn.to_be_bytes());
        out.extend_from_slice(&self.gid);
    }
    fn get(b: &[u8]) -> Result<Self, WireError> {
        let (qpn, psn) = (u32_at(b, 0), u32_at(b, 4));
        if qpn >> 24 != 0 || psn >> 24 != 0 {
            return Err(WireError::Malformed { what: "rdma queue pair", why: format!("qpn {qpn:#x} or psn {psn:#x} beyond 24 bits") });
        }
        Ok(Self { qpn, psn, gid: b[8..24].try_into().expect("16") })
    }
}

/// Most queue pairs per session.
pub const MAX_QPS: usize = 64;

/// The RdmaConnect payload: the sender's queue pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaConnect {
    /// Queue pairs, in order.
    pub qps: Vec<QpAddr>,
}

/// The RdmaAccept payload: the receiver's queue pairs (paired with the sender's by index) and
/// its region: `slots` slots of `slot_size` bytes at `addr` under `rkey`. Queue pair `i` owns
/// the slots `j` with `j % qps == i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaAccept {
    /// Region address.
    pub addr: u64,
    /// Region key.
    pub rkey: u32,
    /// Bytes per slot: a frame header plus the largest chunk.
    pub slot_size: u32,
    /// Slot count.
    pub slots: u32,
    /// Queue pairs.
    pub qps: Vec<QpAddr>,
}

fn put_qps(out: &mut Vec<u8>, qps: &[QpAddr]) {
    out.extend_from_slice(&(qps.len() as u16).to_be_bytes());
    for q in qps {
        q.put(out);
    }
}

fn get_qps(what: &'static str, b: &[u8]) -> Result<Vec<QpAddr>, WireError> {
    need(what, b, 2)?;
    let n = u16_at(b, 0) as usize;
    if n == 0 || n > MAX_QPS {
        return Err(WireError::Malformed { what, why: format!("{n} queue pairs (1..={MAX_QPS})") });
    }
    need(what, b, 2 + n * QpAddr::LEN)?;
    (0..n).map(|i| QpAddr::get(&b[2 + i * QpAddr::LEN..])).collect()
}

impl RdmaConnect {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_qps(&mut out, &self.qps);
        out
    }
    /// Decodes the payload.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        Ok(Self { qps: get_qps("rdma connect", b)? })
    }
}

impl RdmaAccept {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.addr.to_be_bytes());
        out.extend_from_slice(&self.rkey.to_be_bytes());
        out.extend_from_slice(&self.slot_size.to_be_bytes());
        out.extend_from_slice(&self.slots.to_be_bytes());
        put_qps(&mut out, &self.qps);
        out
    }
    /// Decodes the payload.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "rdma accept";
        need(WHAT, b, 20)?;
        let (slot_size, slots) = (u32_at(b, 12), u32_at(b, 16));
        if (slot_size as usize) <= HEADER_LEN || slots == 0 {
            return Err(WireError::Malformed { what: WHAT, why: format!("{slots} slots of {slot_size} bytes") });
        }
        let qps = get_qps(WHAT, &b[20..])?;
        if (slots as usize) < qps.len() {
            return Err(WireError::Malformed { what: WHAT, why: format!("{slots} slots for {} queue pairs", qps.len()) });
        }
        Ok(Self { addr: u64_at(b, 0), rkey: u32_at(b, 8), slot_size, slots, qps })
    }
}

/// A credit the RDMA receiver SENDs back: slot `slot` is free again; `code` 0 means its chunk
/// at `offset` was verified and placed, otherwise it is an [`ErrorCode`] and the session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaCredit {
    /// Slot.
    pub slot: u32,
    /// 0 or an error code.
    pub code: u16,
    /// The chunk's offset.
    pub offset: u64,
}

impl RdmaCredit {
    /// Encoded length.
    pub const LEN: usize = 16;
    /// Encodes.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&self.slot.to_be_bytes());
        b[4..6].copy_from_slice(&self.code.to_be_bytes());
        b[8..].copy_from_slice(&self.offset.to_be_bytes());
        b
    }
    /// Decodes.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        need("rdma credit", b, Self::LEN)?;
        Ok(Self { slot: u32_at(b, 0), code: u16_at(b, 4), offset: u64_at(b, 8) })
    }
}

/// Encodes an Ack payload: the offsets of the chunks placed.
pub fn encode_ack(offsets: &[u64]) -> Vec<u8> {
    offsets.iter().flat_map(|o| o.to_be_bytes()).collect()
}

/// Decodes an Ack payload.
pub fn decode_ack(b: &[u8]) -> Result<Vec<u64>, WireError> {
    if !b.len().is_multiple_of(8) {
        return Err(WireError::Malformed { what: "ack", why: format!("length {} is not a multiple of 8", b.len()) });
    }
    Ok(b.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8"))).collect())
}

/// The Commit payload: total size and digest of the whole object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Total object size in bytes.
    pub size: u64,
    /// [`ManifestDigest`] of the object.
    pub digest: [u8; 32],
}

impl Commit {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.size.to_be_bytes().to_vec();
        out.extend_from_slice(&self.digest);
        out
    }
    /// Decodes the payload.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        need("commit", b, 40)?;
        Ok(Self { size: u64_at(b, 0), digest: b[8..40].try_into().expect("32") })
    }
}

/// Error codes carried by Error frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A frame or payload could not be decoded.
    Protocol = 1,
    /// A chunk failed its checksum.
    Checksum = 2,
    /// A chunk lies past the declared object size.
    OutOfRange = 3,
    /// The whole-object digest did not match.
    DigestMismatch = 4,
    /// The receiver could not store the object (disk full, permissions).
    Storage = 5,
    /// No session with the id given.
    UnknownSession = 6,
    /// The peer stopped sending within the idle timeout.
    Stalled = 7,
    /// The request is refused by policy (e.g. plaintext not allowed).
    Refused = 8,
    /// Anything else.
    Internal = 99,
}

impl ErrorCode {
    /// From the wire value; unknown values map to `Internal`.
    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::Protocol,
            2 => Self::Checksum,
            3 => Self::OutOfRange,
            4 => Self::DigestMismatch,
            5 => Self::Storage,
            6 => Self::UnknownSession,
            7 => Self::Stalled,
            8 => Self::Refused,
            _ => Self::Internal,
        }
    }
}

/// Encodes an Error payload: code and a message for a person.
pub fn encode_error(code: ErrorCode, msg: &str) -> Vec<u8> {
    let mut out = (code as u16).to_be_bytes().to_vec();
    let m = msg.as_bytes();
    out.extend_from_slice(&m[..m.len().min(4000)]);
    out
}

/// Decodes an Error payload.
pub fn decode_error(b: &[u8]) -> Result<(ErrorCode, String), WireError> {
    need("error", b, 2)?;
    // The peer's words end up on a terminal or in a log: control characters (escape sequences,
    // line breaks that forge log lines) become U+FFFD, and at most 1 KiB of it is kept.
    let text = String::from_utf8_lossy(&b[2..b.len().min(2 + 1024)]).chars().map(|c| if c.is_control() { '\u{fffd}' } else { c }).collect();
    Ok((ErrorCode::from_u16(u16_at(b, 0)), text))
}

/// The whole-object digest: BLAKE3 over the chunk manifest in offset order, each entry being
/// `offset u64 LE | len u32 LE | xxh3 u64 LE`, keyed by nothing. Both ends compute it from the
/// checksums they computed themselves over their own bytes, so it binds every byte of the object
/// while letting chunks arrive in any order and a resumed transfer reuse the journal's checksums.
#[derive(Debug, Default, Clone)]
pub struct ManifestDigest {
    entries: Vec<(u64, u32, u64)>,
}

impl ManifestDigest {
    /// Adds one chunk (duplicates of the same offset are ignored).
    pub fn add(&mut self, offset: u64, len: u32, sum: u64) {
        self.entries.push((offset, len, sum));
    }
    /// Finishes: sorts by offset, drops duplicates, and checks the chunks tile `[0, size)` exactly.
    pub fn finish(mut self, size: u64) -> Result<[u8; 32], String> {
        self.entries.sort_unstable();
        self.entries.dedup_by_key(|e| e.0);
        let mut h = blake3::Hasher::new();
        let mut at = 0u64;
        for &(off, len, sum) in &self.entries {
            if off != at {
                return Err(format!("chunks do not tile the object: expected a chunk at {at}, next is at {off}"));
            }
            h.update(&off.to_le_bytes());
            h.update(&len.to_le_bytes());
            h.update(&sum.to_le_bytes());
            at += u64::from(len);
        }
        if at != size {
            return Err(format!("chunks cover {at} bytes but the object has {size}"));
        }
        Ok(*h.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(kind: FrameType) -> FrameHeader {
        FrameHeader { kind, stream: 3, flags: 0, offset: 1 << 40, len: 4096, checksum: 0xdead_beef }
    }

    #[test]
    fn header_roundtrip_and_checks() {
        let h = header(FrameType::Chunk);
        let b = h.encode();
        assert_eq!(FrameHeader::decode(&b), Ok(h));
        let mut bad = b;
        bad[0] ^= 1;
        assert!(matches!(FrameHeader::decode(&bad), Err(WireError::BadMagic { .. })));
        let mut bad = b;
        bad[10] ^= 1;
        assert_eq!(FrameHeader::decode(&bad), Err(WireError::HeaderCheck));
    }

    #[test]
    fn version_99_is_named() {
        let mut p = Preamble { version: 1, flags: 0 }.encode();
        p[4..6].copy_from_slice(&99u16.to_be_bytes());
        let e = Preamble::decode(&p).unwrap_err();
        assert_eq!(e, WireError::UnsupportedVersion { found: 99, supported: VERSION.into() });
        assert!(e.to_string().contains("99"));
    }

    #[test]
    fn oversized_control_payload_refused() {
        let mut h = header(FrameType::Hello);
        h.len = MAX_CONTROL_PAYLOAD + 1;
        assert!(matches!(FrameHeader::decode(&h.encode()), Err(WireError::PayloadTooLarge { .. })));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("disk.qcow2").is_ok());
        assert!(check_name("vm.img.part").is_ok() && check_name(&"é".repeat(127)).is_ok());
        for bad in ["", "..", ".", "a/b", "x\0", "a\nb", "\x1b[31mred", "x\u{9b}"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn manifest_digest_needs_tiling() {
        let mut m = ManifestDigest::default();
        m.add(0, 10, 1);
        m.add(20, 10, 1);
        assert!(m.finish(30).unwrap_err().contains("expected a chunk at 10"));
        let mut a = ManifestDigest::default();
        a.add(10, 5, 2);
        a.add(0, 10, 1);
        a.add(0, 10, 1);
        let mut b = ManifestDigest::default();
        b.add(0, 10, 1);
        b.add(10, 5, 2);
        assert_eq!(a.finish(15).unwrap(), b.finish(15).unwrap());
    }

    proptest! {
        #[test]
        fn header_roundtrip(kind in prop::sample::select(vec![FrameType::Hello, FrameType::Chunk, FrameType::Ack, FrameType::Error]),
                            stream: u16, flags: u16, offset: u64, len in 0u32..=MAX_CONTROL_PAYLOAD, checksum: u64) {
            let h = FrameHeader { kind, stream, flags, offset, len, checksum };
            prop_assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn header_bitflip_detected(bit in 0usize..256) {
            let h = header(FrameType::Chunk);
            let mut b = h.encode();
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(FrameHeader::decode(&b).is_err());
        }

        #[test]
        fn hello_roundtrip(max_streams: u16, chunk_size in 1u32..=MAX_PAYLOAD, streams in 1u16.., object_size: u64,
                           object_id: u64, resume: bool, name in "[a-zA-Z0-9._-]{1,40}") {
            prop_assume!(name != "." && name != "..");
            let caps = Caps { max_streams, max_chunk: chunk_size, codecs: CODEC_RAW, transports: TRANSPORT_TCP };
            let h = Hello::Open { caps, chunk_size, streams, object_size, object_id, resume, name };
            prop_assert_eq!(Hello::decode(&h.encode()), Ok(h));
            let j = Hello::Join { session: [7; 16], index: streams };
            prop_assert_eq!(Hello::decode(&j.encode()), Ok(j));
            prop_assert_eq!(Hello::decode(&Hello::Probe.encode()), Ok(Hello::Probe));
        }

        #[test]
        fn rdma_messages_roundtrip(qpns in prop::collection::vec((0u32..1 << 24, 0u32..1 << 24, any::<[u8; 16]>()), 1..8),
                                   addr: u64, rkey: u32, slot_size in 33u32.., extra in 0u32..100, slot: u32, code: u16, offset: u64) {
            let qps: Vec<QpAddr> = qpns.iter().map(|&(qpn, psn, gid)| QpAddr { qpn, psn, gid }).collect();
            let c = RdmaConnect { qps: qps.clone() };
            prop_assert_eq!(RdmaConnect::decode(&c.encode()), Ok(c));
            let a = RdmaAccept { addr, rkey, slot_size, slots: qps.len() as u32 + extra, qps };
            prop_assert_eq!(RdmaAccept::decode(&a.encode()), Ok(a));
            let k = RdmaCredit { slot, code, offset };
            prop_assert_eq!(RdmaCredit::decode(&k.encode()), Ok(k));
        }

        #[test]
        fn probe_roundtrip(seq: u32, bytes: u64, span_ns: u64, flag: bool, pad in 0usize..4096) {
            for m in [ProbeMsg::Ping { seq }, ProbeMsg::Bulk { seq, last: flag }, ProbeMsg::Reply { seq, bytes, span_ns, plaintext_ok: flag }] {
                let b = m.encode(pad);
                prop_assert_eq!(b.len(), ProbeMsg::LEN + pad);
                prop_assert_eq!(ProbeMsg::decode(&b), Ok(m));
            }
        }

        #[test]
        fn welcome_roundtrip(ranges in prop::collection::vec((0u64..1 << 40, 1u64..1 << 20), 0..20)) {
            let have: Vec<_> = ranges.iter().map(|&(s, l)| (s, s + l)).collect();
            let w = Welcome { session: [1; 16], caps: Caps { max_streams: 8, max_chunk: 1 << 20, codecs: 1, transports: 1 }, have };
            prop_assert_eq!(Welcome::decode(&w.encode()), Ok(w));
        }

        #[test]
        fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = Hello::decode(&bytes);
            let _ = Welcome::decode(&bytes);
            let _ = Commit::decode(&bytes);
            let _ = decode_ack(&bytes);
            let _ = decode_error(&bytes);
            let _ = ProbeMsg::decode(&bytes);
            let _ = RdmaConnect::decode(&bytes);
            let _ = RdmaAccept::decode(&bytes);
            let _ = RdmaCredit::decode(&bytes);
            if bytes.len() >= HEADER_LEN {
                let _ = FrameHeader::decode(bytes[..HEADER_LEN].try_into().unwrap());
            }
        }

        #[test]
        fn chunk_payload_bitflip_detected(data in prop::collection::vec(any::<u8>(), 1..4096), bit in any::<usize>()) {
            let h = FrameHeader::for_payload(FrameType::Chunk, 0, 0, &data);
            let mut d = data.clone();
            let bit = bit % (d.len() * 8);
            d[bit / 8] ^= 1 << (bit % 8);
            let bad = matches!(h.verify(&d), Err(WireError::BadChecksum { .. }));
            prop_assert!(bad);
        }
    }

    /// Writes seeds for the wire, frame and journal fuzz targets under `$DWCP_FUZZ_SEEDS`
    /// (`make fuzz-seeds`).
    #[test]
    #[ignore = "writes the fuzz seed corpus; run by make fuzz-seeds"]
    fn write_fuzz_seeds() {
        let Some(dir) = std::env::var_os("DWCP_FUZZ_SEEDS") else { return };
        let dir = std::path::PathBuf::from(dir);
        let put = |target: &str, name: &str, b: &[u8]| {
            let d = dir.join(target);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(name), b).unwrap();
        };
        let caps = Caps { max_streams: 8, max_chunk: 1 << 20, codecs: CODEC_RAW | CODEC_HDE, transports: TRANSPORT_TCP };
        let hello = Hello::Open { caps, chunk_size: 1 << 20, streams: 4, object_size: 1 << 30, object_id: 7, resume: true, name: "vm.img".into() };
        put("wire_payloads", "hello", &hello.encode());
        put("wire_payloads", "join", &Hello::Join { session: [3; 16], index: 2 }.encode());
        put("wire_payloads", "welcome", &Welcome { session: [1; 16], caps, have: vec![(0, 4096), (8192, 1 << 20)] }.encode());
        put("wire_payloads", "commit", &Commit { size: 1 << 30, digest: [2; 32] }.encode());
        put("wire_payloads", "ack", &encode_ack(&[0, 1 << 20, 2 << 20]));
        put("wire_payloads", "error", &encode_error(ErrorCode::Refused, "busy"));
        let mut codec = crate::crypto::FrameCodec::new(0, None);
        let mut frames = vec![40u8];
        for (k, p) in [(FrameType::Hello, hello.encode()), (FrameType::Chunk, vec![9u8; 100]), (FrameType::Commit, Commit { size: 100, digest: [0; 32] }.encode())] {
            frames.extend(codec.encode_frame(&FrameHeader::for_payload(k, 0, 0, &p), &p));
        }
        put("frame_decoder", "three", &frames);
        let mut j = crate::session::JournalHeader { object_size: 1 << 22, object_id: 7, chunk_size: 1 << 20 }.encode().to_vec();
        for k in 0..3u64 {
            j.extend_from_slice(&crate::session::JournalRecord { offset: k << 20, len: 1 << 20, sum: k }.encode());
        }
        put("journal", "three", &j);
        put("reorder", "gap", &[1, 0, 8, 2, 0, 8, 0, 0, 8, 3, 0, 8]);
        put("config", "good", b"[node]\nname = \"rack1-a\"\nlisten = \"0.0.0.0:7470\"\nout = \"/srv/images\"\n\n[mode]\ndc_max_rtt_ms = 1.5\nprobe_interval_s = 30\n\n[[peers]]\nname = \"dr\"\naddr = \"dr.example.net:7470\"\n");
    }
}
