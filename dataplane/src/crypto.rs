//! Peer authentication and stream encryption. Free of I/O.
//!
//! Each TCP stream runs its own Noise handshake, `Noise_NNpsk0_25519_AESGCM_SHA256` through the
//! `snow` crate: the initiator's first message is already authenticated with the pre-shared key,
//! so a responder refuses a peer without the key before writing a single byte. Every stream gets
//! fresh ephemeral keys (forward secrecy per stream).
//!
//! Noise transport messages are capped at 64 KiB, too small for megabyte chunks, so (as WireGuard
//! does) the split keys of the finished handshake drive the bulk AEAD directly: AES-256-GCM from
//! `ring`, sealed and opened in place, one nonce per sealed part, counting up per direction. With
//! `--no-encrypt` frames travel in plaintext but every part still carries a 16-byte tag: keyed
//! BLAKE3 of the part's sequence number and bytes, under a key derived from the same per-stream
//! Noise key, so a plaintext stream is as authenticated as an encrypted one: an on-path host cannot change
//! a byte, and a recorded handshake replayed later derives other keys (the responder's ephemeral
//! is fresh) and fails at its first frame. The preamble (version, encryption choice) is the Noise
//! prologue, so a changed preamble fails the handshake.

use std::path::Path;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use thiserror::Error;

use crate::wire::{self, FrameHeader, HEADER_LEN, TAG_LEN, WireError};

/// The Noise protocol name used on every stream.
pub const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";

/// Errors of key files and handshakes.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    KeyFileRead {
        /// Path given.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The key file can be read by other users.
    #[error("key file {path} has mode {mode:04o}: other users can read it; run `chmod 600 {path}`")]
    KeyFileMode {
        /// Path given.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file did not hold 64 hex digits.
    #[error("key file {path} must hold 64 hex digits (32 bytes); create one with `dwcp keygen {path}`")]
    KeyFileFormat {
        /// Path given.
        path: String,
    },
    /// The peer's first handshake message did not verify under our key.
    #[error("peer authentication failed: the peer does not hold this key (or is not a dwcp peer)")]
    BadKey,
    /// Any other handshake failure.
    #[error("noise handshake failed: {0}")]
    Handshake(String),
    /// A datagram that is not sealed with this key (or not a dwcp datagram at all).
    #[error("a datagram failed authentication: wrong key, changed bytes or not a dwcp datagram")]
    Datagram,
}

/// A 32-byte pre-shared key.
#[derive(Clone)]
pub struct Psk([u8; 32]);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(..)")
    }
}

impl Psk {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).expect("OS random source");
        Self(k)
    }
    /// The key as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    /// Parses 64 hex digits (surrounding whitespace allowed).
    pub fn from_hex(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(k))
    }
    /// Writes the key to `path` as a key file (hex, mode 0600, replacing what was there).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        writeln!(f, "{}", self.to_hex())
    }

    /// Reads a key file.
    pub fn from_file(path: &Path) -> Result<Self, CryptoError> {
        use std::os::unix::fs::PermissionsExt;
        let p = path.display().to_string();
        let mode = std::fs::metadata(path).map_err(|source| CryptoError::KeyFileRead { path: p.clone(), source })?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(CryptoError::KeyFileMode { path: p, mode: mode & 0o777 });
        }
        let s = std::fs::read_to_string(path).map_err(|source| CryptoError::KeyFileRead { path: p.clone(), source })?;
        Self::from_hex(&s).ok_or(CryptoError::KeyFileFormat { path: p })
    }
}

/// Seals and opens datagrams under a key derived from the pre-shared key (the fleet's gossip,
/// one UDP packet per message): AES-256-GCM with a random 96-bit nonce per packet (random
/// nonces are safe for far more packets than gossip sends under one key), the sender's clock in
/// the sealed bytes so that a receiver can refuse a packet replayed long after.
/// Packet: version (1 byte, authenticated) | nonce (12) | sealed(time ms (8) | payload) | tag (16).
pub struct DatagramKey(LessSafeKey);

impl std::fmt::Debug for DatagramKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatagramKey(..)")
    }
}

/// The bytes a sealed datagram adds to its payload.
pub const DATAGRAM_OVERHEAD: usize = 1 + 12 + 8 + TAG_LEN;
const DATAGRAM_VERSION: u8 = 1;

impl DatagramKey {
    /// The key for `purpose` (a fixed string naming the use), derived from `psk` with BLAKE3's
    /// key derivation, so that it is never a key any other part of dwcp uses.
    pub fn derive(psk: &Psk, purpose: &str) -> Self {
        let k = blake3::derive_key(purpose, &psk.0);
        Self(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).expect("a 32-byte AES-256 key")))
    }

    /// Seals `payload` sent at `now_ms` (milliseconds since the Unix epoch).
    pub fn seal(&self, now_ms: u64, payload: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).expect("OS random source");
        let mut out = Vec::with_capacity(payload.len() + DATAGRAM_OVERHEAD);
        out.push(DATAGRAM_VERSION);
        out.extend_from_slice(&nonce);
        let mut body = Vec::with_capacity(8 + payload.len() + TAG_LEN);
        body.extend_from_slice(&now_ms.to_be_bytes());
        body.extend_from_slice(payload);
        self.0.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from([DATAGRAM_VERSION]), &mut body).expect("sealing a datagram");
        out.extend_from_slice(&body);
        out
    }

    /// Opens a datagram: its sender's time (ms) and payload, or why it is refused (too short,
    /// another version, or not sealed with this key: a wrong key, a changed byte).
    pub fn open(&self, packet: &[u8]) -> Result<(u64, Vec<u8>), CryptoError> {
        if packet.len() < DATAGRAM_OVERHEAD || packet[0] != DATAGRAM_VERSION {
            return Err(CryptoError::Datagram);
        }
        let nonce = Nonce::try_assume_unique_for_key(&packet[1..13]).map_err(|_| CryptoError::Datagram)?;
        let mut body = packet[13..].to_vec();
        let plain = self.0.open_in_place(nonce, Aad::from([DATAGRAM_VERSION]), &mut body).map_err(|_| CryptoError::Datagram)?;
        let t = u64::from_be_bytes(plain[..8].try_into().expect("8 bytes"));
        Ok((t, plain[8..].to_vec()))
    }
}

fn builder<'a>(psk: &'a Psk, prologue: &'a [u8]) -> snow::Builder<'a> {
    snow::Builder::new(NOISE_PATTERN.parse().expect("valid noise pattern")).psk(0, &psk.0).expect("psk location 0 exists in NNpsk0").prologue(prologue).expect("one prologue")
}

/// The two directions' keys of a finished handshake.
#[derive(Clone)]
pub struct SessionKeys {
    send: [u8; 32],
    recv: [u8; 32],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

/// Initiator side of the handshake: `-> msg1`, `<- msg2`.
#[derive(Debug)]
pub struct Initiator(snow::HandshakeState);

impl Initiator {
    /// Starts a handshake; returns the state and the first message to send.
    pub fn start(psk: &Psk) -> Result<(Self, Vec<u8>), CryptoError> {
        Self::start_bound(psk, &[])
    }
    /// Starts a handshake bound to `prologue` (the bytes sent before it: the responder must
    /// see the same, or the handshake fails).
    pub fn start_bound(psk: &Psk, prologue: &[u8]) -> Result<(Self, Vec<u8>), CryptoError> {
        let mut hs = builder(psk, prologue).build_initiator().map_err(|e| CryptoError::Handshake(e.to_string()))?;
        let mut buf = vec![0u8; 256];
        let n = hs.write_message(&[], &mut buf).map_err(|e| CryptoError::Handshake(e.to_string()))?;
        buf.truncate(n);
        Ok((Self(hs), buf))
    }
    /// Reads the responder's reply and derives the keys.
    pub fn finish(mut self, msg2: &[u8]) -> Result<SessionKeys, CryptoError> {
        let mut out = [0u8; 256];
        self.0.read_message(msg2, &mut out).map_err(|_| CryptoError::BadKey)?;
        let (i2r, r2i) = self.0.dangerously_get_raw_split();
        Ok(SessionKeys { send: i2r, recv: r2i })
    }
}

/// Responder side of the handshake.
#[derive(Debug)]
pub struct Responder;

impl Responder {
    /// Verifies the initiator's first message under `psk`; on success returns the reply to send
    /// and the keys. On failure nothing must be written to the peer.
    pub fn accept(psk: &Psk, msg1: &[u8]) -> Result<(Vec<u8>, SessionKeys), CryptoError> {
        Self::accept_bound(psk, &[], msg1)
    }
    /// [`Responder::accept`] of a handshake bound to `prologue` (what the initiator sent before it).
    pub fn accept_bound(psk: &Psk, prologue: &[u8], msg1: &[u8]) -> Result<(Vec<u8>, SessionKeys), CryptoError> {
        let mut hs = builder(psk, prologue).build_responder().map_err(|e| CryptoError::Handshake(e.to_string()))?;
        let mut out = [0u8; 256];
        hs.read_message(msg1, &mut out).map_err(|_| CryptoError::BadKey)?;
        let mut reply = vec![0u8; 256];
        let n = hs.write_message(&[], &mut reply).map_err(|e| CryptoError::Handshake(e.to_string()))?;
        reply.truncate(n);
        let (i2r, r2i) = hs.dangerously_get_raw_split();
        Ok((reply, SessionKeys { send: r2i, recv: i2r }))
    }
}

/// One direction's protection of its parts: AES-256-GCM (encrypted streams) or a keyed BLAKE3
/// tag over the part (authenticated plaintext), with the part's sequence number in both.
struct Aead {
    key: LessSafeKey,
    /// The direction's BLAKE3 key for plaintext tags (derived from its Noise key, so the two
    /// uses of the key never meet).
    mac: [u8; 32],
    counter: u64,
}

impl Aead {
    fn new(k: &[u8; 32]) -> Self {
        Self { key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k).expect("32-byte key")), mac: blake3::derive_key("dwcp 2026 plaintext frame tag", k), counter: 0 }
    }
    fn next_nonce(&mut self) -> Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter += 1;
        Nonce::assume_unique_for_key(n)
    }
    /// The tag of a plaintext part: keyed BLAKE3 of its sequence number and bytes, truncated to
    /// 16 bytes. (GMAC through `ring`'s associated data runs at 1.9 GB/s here against BLAKE3's
    /// 4.2: measured, see `docs/security.md`.)
    fn next_mac(&mut self, data: &[u8]) -> [u8; TAG_LEN] {
        let seq = self.counter;
        self.counter += 1;
        keyed_tag(&self.mac, &[&seq.to_le_bytes(), data])
    }
}

/// Keyed BLAKE3 over `parts` in order, truncated to [`TAG_LEN`] bytes: the tag of plaintext
/// frame parts and of RDMA chunks.
fn keyed_tag(key: &[u8; 32], parts: &[&[u8]]) -> [u8; TAG_LEN] {
    let mut h = blake3::Hasher::new_keyed(key);
    for p in parts {
        h.update(p);
    }
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&h.finalize().as_bytes()[..TAG_LEN]);
    t
}

/// Whether a received tag is the expected one: every byte compared, whatever the first
/// difference (no early exit).
fn tag_matches(want: &[u8; TAG_LEN], got: &[u8]) -> bool {
    got.len() == TAG_LEN && want.iter().zip(got).fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y)) == 0
}

/// What this host's CPU pays per byte for the two ways a stream protects its payloads, measured
/// on 1 MiB: sealing in place with AES-GCM (encrypted) and the keyed BLAKE3 tag of an
/// authenticated plaintext part. On a CPU with VAES the first is the cheaper (here 6.6 GiB/s
/// against 3.9), so plaintext saves nothing there for a source that is copied anyway.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProtectionCost {
    /// AES-GCM seal, bytes per second.
    pub seal_bps: f64,
    /// Keyed BLAKE3 tag, bytes per second.
    pub tag_bps: f64,
}

impl ProtectionCost {
    /// Measures both, best of a few runs each (a few milliseconds in all).
    pub fn measure() -> Result<Self, CryptoError> {
        const LEN: usize = 1 << 20;
        let psk = Psk::generate();
        let (init, m1) = Initiator::start(&psk)?;
        let (m2, _) = Responder::accept(&psk, &m1)?;
        let keys = init.finish(&m2)?;
        let (mut enc, mut auth) = (FrameCodec::new(0, Some(&keys)), FrameCodec::authenticated(0, &keys));
        let mut buf = vec![0x5au8; LEN + TAG_LEN];
        let best = |f: &mut dyn FnMut()| {
            (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let seal = best(&mut || enc.seal_payload(&mut buf, LEN));
        let tag = best(&mut || {
            std::hint::black_box(auth.payload_tag(&buf[..LEN]));
        });
        Ok(Self { seal_bps: LEN as f64 / seal, tag_bps: LEN as f64 / tag })
    }
}

/// The tag of an RDMA chunk: keyed BLAKE3 over its encoded frame header (kind, offset, length,
/// checksum) and payload, truncated to 16 bytes. The key is derived from the control stream's
/// plaintext-tag key of the sender's direction, so it is the session's and the direction's: a
/// chunk forged on the fabric (with a queue pair number, sequence and rkey seen on the wire)
/// is refused before anything of it is written. A chunk replayed within its session carries
/// its own offset and bytes.
#[derive(Clone)]
pub struct ChunkTag([u8; 32]);

impl std::fmt::Debug for ChunkTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkTag")
    }
}

impl ChunkTag {
    fn derive(mac: &[u8; 32]) -> Self {
        Self(blake3::derive_key("dwcp 2026 rdma chunk tag", mac))
    }
    /// The tag of `header` and `payload`.
    pub fn tag(&self, header: &[u8; HEADER_LEN], payload: &[u8]) -> [u8; TAG_LEN] {
        keyed_tag(&self.0, &[header, payload])
    }
    /// Whether `tag` is theirs (every byte compared, whatever the first difference).
    pub fn verify(&self, header: &[u8; HEADER_LEN], payload: &[u8], tag: &[u8]) -> bool {
        tag_matches(&self.tag(header, payload), tag)
    }
}

/// Per-stream frame codec: seals outgoing and opens incoming headers and payloads, in place.
/// Without keys it only checks (before a handshake, and in tests); with keys every part carries a
/// 16-byte tag, over the ciphertext (encrypted) or over the plaintext as associated data
/// (authenticated plaintext).
pub struct FrameCodec {
    stream: u16,
    seal: Option<Aead>,
    open: Option<Aead>,
    encrypt: bool,
}

impl std::fmt::Debug for FrameCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameCodec {{ stream: {}, encrypted: {} }}", self.stream, self.encrypted())
    }
}

impl FrameCodec {
    /// A codec for `stream`; `keys` = None means plaintext.
    pub fn new(stream: u16, keys: Option<&SessionKeys>) -> Self {
        Self { stream, seal: keys.map(|k| Aead::new(&k.send)), open: keys.map(|k| Aead::new(&k.recv)), encrypt: keys.is_some() }
    }
    /// A codec for `stream` whose parts travel in plaintext, each with a tag under `keys`.
    pub fn authenticated(stream: u16, keys: &SessionKeys) -> Self {
        Self { stream, seal: Some(Aead::new(&keys.send)), open: Some(Aead::new(&keys.recv)), encrypt: false }
    }
    /// Whether parts are encrypted.
    pub fn encrypted(&self) -> bool {
        self.encrypt
    }
    /// Whether parts carry tags (encrypted or authenticated plaintext).
    pub fn tagged(&self) -> bool {
        self.seal.is_some()
    }
    /// The tag of the RDMA chunks this side sends in its session (`None` without keys).
    pub fn chunk_tag_to_send(&self) -> Option<ChunkTag> {
        self.seal.as_ref().map(|a| ChunkTag::derive(&a.mac))
    }
    /// The tag of the RDMA chunks the peer sends in its session (`None` without keys).
    pub fn chunk_tag_to_check(&self) -> Option<ChunkTag> {
        self.open.as_ref().map(|a| ChunkTag::derive(&a.mac))
    }
    /// Sets the stream index (known once the Hello is read).
    pub fn set_stream(&mut self, stream: u16) {
        self.stream = stream;
    }
    /// Stream index this codec serves.
    pub fn stream(&self) -> u16 {
        self.stream
    }
    /// Bytes a header takes on the wire.
    pub fn header_wire_len(&self) -> usize {
        wire::header_wire_len(self.tagged())
    }
    /// Bytes a payload of `len` takes on the wire.
    pub fn payload_wire_len(&self, len: u32) -> usize {
        wire::payload_wire_len(len, self.tagged())
    }

    /// Writes the sealed header into `out[..header_wire_len()]`.
    pub fn seal_header(&mut self, h: &FrameHeader, out: &mut [u8]) {
        out[..HEADER_LEN].copy_from_slice(&h.encode());
        self.seal_part(out, HEADER_LEN);
    }

    /// Seals `buf[..len]` in place, writing the tag at `buf[len..len+16]` when encrypting.
    /// `buf` must be at least `payload_wire_len(len)` long. Empty payloads are not sealed.
    pub fn seal_payload(&mut self, buf: &mut [u8], len: usize) {
        if len > 0 {
            self.seal_part(buf, len);
        }
    }

    fn seal_part(&mut self, buf: &mut [u8], len: usize) {
        let encrypt = self.encrypt;
        if let Some(a) = &mut self.seal {
            let (data, rest) = buf.split_at_mut(len);
            if encrypt {
                let nonce = a.next_nonce();
                let tag = a.key.seal_in_place_separate_tag(nonce, Aad::empty(), data).expect("AES-GCM seal");
                rest[..TAG_LEN].copy_from_slice(tag.as_ref());
            } else {
                rest[..TAG_LEN].copy_from_slice(&a.next_mac(data));
            }
        }
    }

    /// The tag of a plaintext payload that is sent from where it lies (a mapped file), not
    /// from a buffer the codec can append to: it goes on the wire right after the payload.
    /// Authenticated plaintext only; empty payloads have none.
    pub fn payload_tag(&mut self, payload: &[u8]) -> Option<[u8; TAG_LEN]> {
        debug_assert!(!self.encrypt, "an encrypted payload is sealed in place");
        let a = self.seal.as_mut().filter(|_| !payload.is_empty())?;
        Some(a.next_mac(payload))
    }

    /// Opens and decodes a header from `wire[..header_wire_len()]`.
    pub fn open_header(&mut self, wire: &mut [u8]) -> Result<FrameHeader, WireError> {
        let n = self.header_wire_len();
        let plain = self.open_part(&mut wire[..n])?;
        let h = FrameHeader::decode(plain[..HEADER_LEN].try_into().expect("32"))?;
        Ok(h)
    }

    /// Opens a payload in place from `wire[..payload_wire_len(len)]`; returns the plaintext.
    pub fn open_payload<'a>(&mut self, wire: &'a mut [u8], len: u32) -> Result<&'a mut [u8], WireError> {
        if len == 0 {
            return Ok(&mut wire[..0]);
        }
        let n = self.payload_wire_len(len);
        self.open_part(&mut wire[..n])
    }

    fn open_part<'a>(&mut self, wire: &'a mut [u8]) -> Result<&'a mut [u8], WireError> {
        let (stream, encrypt) = (self.stream, self.encrypt);
        match &mut self.open {
            None => Ok(wire),
            Some(a) if encrypt => {
                let nonce = a.next_nonce();
                a.key.open_in_place(nonce, Aad::empty(), wire).map_err(|_| WireError::Decrypt { stream })
            }
            Some(a) => {
                let at = wire.len().checked_sub(TAG_LEN).ok_or(WireError::Decrypt { stream })?;
                let (data, tag) = wire.split_at_mut(at);
                if !tag_matches(&a.next_mac(data), tag) {
                    return Err(WireError::Decrypt { stream });
                }
                Ok(data)
            }
        }
    }

    /// Encodes a whole control frame (header and payload) into one buffer.
    pub fn encode_frame(&mut self, h: &FrameHeader, payload: &[u8]) -> Vec<u8> {
        let hl = self.header_wire_len();
        let mut out = vec![0u8; hl + self.payload_wire_len(payload.len() as u32)];
        self.seal_header(h, &mut out[..hl]);
        out[hl..hl + payload.len()].copy_from_slice(payload);
        self.seal_payload(&mut out[hl..], payload.len());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::FrameType;

    #[test]
    fn an_rdma_chunk_tag_binds_its_header_payload_session_and_direction() {
        let (a, b) = pair(false);
        let (send, check) = (a.chunk_tag_to_send().unwrap(), b.chunk_tag_to_check().unwrap());
        let h = FrameHeader { kind: wire::FrameType::Chunk, stream: 0, flags: 0, offset: 1 << 20, len: 5, checksum: wire::checksum(b"hello") }.encode();
        let t = send.tag(&h, b"hello");
        assert!(check.verify(&h, b"hello", &t));
        assert!(!check.verify(&h, b"hellp", &t), "a payload byte");
        let mut moved = h;
        moved[9] ^= 1;
        assert!(!check.verify(&moved, b"hello", &t), "a header byte (the offset)");
        assert!(!check.verify(&h, b"hello", &t[..15]), "a short tag");
        // The other direction's key, and another session's, do not verify it.
        assert!(!b.chunk_tag_to_send().unwrap().verify(&h, b"hello", &t));
        let (_, other) = pair(false);
        assert!(!other.chunk_tag_to_check().unwrap().verify(&h, b"hello", &t));
        assert!(FrameCodec::new(0, None).chunk_tag_to_send().is_none(), "no keys, no tag");
    }

    fn pair(encrypt: bool) -> (FrameCodec, FrameCodec) {
        let psk = Psk::generate();
        let (init, m1) = Initiator::start(&psk).unwrap();
        let (m2, rk) = Responder::accept(&psk, &m1).unwrap();
        let ik = init.finish(&m2).unwrap();
        if encrypt { (FrameCodec::new(0, Some(&ik)), FrameCodec::new(0, Some(&rk))) } else { (FrameCodec::authenticated(0, &ik), FrameCodec::authenticated(0, &rk)) }
    }

    #[test]
    fn wrong_key_refused_on_first_message() {
        let (_, m1) = Initiator::start(&Psk::generate()).unwrap();
        assert!(matches!(Responder::accept(&Psk::generate(), &m1), Err(CryptoError::BadKey)));
        assert!(matches!(Responder::accept(&Psk::generate(), b"garbage"), Err(CryptoError::BadKey)));
    }

    #[test]
    fn frames_roundtrip_and_tamper_detected() {
        for enc in [false, true] {
            let (mut tx, mut rx) = pair(enc);
            for i in 0..3u64 {
                let payload = vec![i as u8; 1000];
                let h = FrameHeader::for_payload(FrameType::Chunk, 0, i * 1000, &payload);
                let mut w = tx.encode_frame(&h, &payload);
                let hl = rx.header_wire_len();
                let got = rx.open_header(&mut w[..hl]).unwrap();
                assert_eq!(got, h);
                let p = rx.open_payload(&mut w[hl..], got.len).unwrap();
                got.verify(p).unwrap();
            }
            {
                // A changed byte fails the tag, encrypted or not.
                let payload = [5u8; 64];
                let h = FrameHeader::for_payload(FrameType::Chunk, 0, 0, &payload);
                let mut w = tx.encode_frame(&h, &payload);
                let last = w.len() - 1;
                w[last] ^= 1;
                let hl = rx.header_wire_len();
                rx.open_header(&mut w[..hl]).unwrap();
                assert!(matches!(rx.open_payload(&mut w[hl..], 64), Err(WireError::Decrypt { .. })));
            }
        }
    }

    #[test]
    fn key_file_hex() {
        let k = Psk::generate();
        assert_eq!(Psk::from_hex(&format!("{}\n", k.to_hex())).unwrap().0, k.0);
        assert!(Psk::from_hex("abc").is_none());
        assert!(Psk::from_hex(&"zz".repeat(32)).is_none());
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, "ab".repeat(32)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Psk::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600") && e.contains("0644"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Psk::from_file(&p).is_ok());
    }

    #[test]
    fn plaintext_parts_travel_in_clear_with_a_tag_and_a_changed_prologue_fails() {
        let psk = Psk::generate();
        let (init, m1) = Initiator::start_bound(&psk, b"pre").unwrap();
        assert!(matches!(Responder::accept_bound(&psk, b"prf", &m1), Err(CryptoError::BadKey)), "the prologue is bound");
        let (m2, rk) = Responder::accept_bound(&psk, b"pre", &m1).unwrap();
        let ik = init.finish(&m2).unwrap();
        let (mut tx, mut rx) = (FrameCodec::authenticated(0, &ik), FrameCodec::authenticated(0, &rk));
        let payload = b"in the clear".to_vec();
        let h = FrameHeader::for_payload(FrameType::Chunk, 0, 0, &payload);
        let w = tx.encode_frame(&h, &payload);
        let hl = rx.header_wire_len();
        assert_eq!(w.len(), hl + payload.len() + TAG_LEN);
        assert_eq!(&w[hl..hl + payload.len()], payload, "plaintext on the wire");
        // A detached tag (a payload sent from a mapping) matches the in-place one.
        let mut tx2 = FrameCodec::authenticated(0, &ik);
        let mut hdr = vec![0u8; hl];
        tx2.seal_header(&h, &mut hdr);
        let tag = tx2.payload_tag(&payload).unwrap();
        assert_eq!(&w[hl + payload.len()..], tag);
        let mut w2 = w.clone();
        rx.open_header(&mut w2[..hl]).unwrap();
        assert_eq!(rx.open_payload(&mut w2[hl..], payload.len() as u32).unwrap(), payload);
        // A codec of other keys (a replayed handshake derives other keys) refuses the header.
        let (_, other) = Responder::accept_bound(&psk, b"pre", &m1).unwrap();
        let mut w3 = w.clone();
        assert!(FrameCodec::authenticated(0, &other).open_header(&mut w3[..hl]).is_err());
    }

    #[test]
    fn a_datagram_opens_only_under_its_key_and_unchanged() {
        let psk = Psk::generate();
        let k = DatagramKey::derive(&psk, "dwcp gossip v1");
        let p = k.seal(1234, b"hello");
        assert_eq!(p.len(), 5 + DATAGRAM_OVERHEAD);
        assert_eq!(k.open(&p).unwrap(), (1234, b"hello".to_vec()));
        // Another purpose or another key: refused.
        assert!(DatagramKey::derive(&psk, "another use").open(&p).is_err());
        assert!(DatagramKey::derive(&Psk::generate(), "dwcp gossip v1").open(&p).is_err());
        for i in 0..p.len() {
            let mut q = p.clone();
            q[i] ^= 1;
            assert!(k.open(&q).is_err(), "byte {i} changed and still opened");
        }
        assert!(k.open(&p[..DATAGRAM_OVERHEAD - 1]).is_err());
    }
}
