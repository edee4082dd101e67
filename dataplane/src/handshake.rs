//! Connection setup over blocking sockets: preamble, Noise handshake, then control frames.
//! Not on the hot path; once a stream is established it is handed to an io_uring shard.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::crypto::{CryptoError, FrameCodec, Initiator, Psk, Responder};
use crate::framing::FrameReader;
use crate::wire::{self, ErrorCode, FrameHeader, FrameType, PREAMBLE_ENCRYPT, PREAMBLE_LEN, Preamble, VERSION, WireError};

/// What to check when a connection cannot be made, by its cause.
fn connect_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "; nothing listens there: start `dwcp recv --listen ADDR:PORT` on the peer (or check the port)",
        io::ErrorKind::TimedOut | io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            "; check the address, the route to it, and that a firewall lets TCP through to the port"
        }
        _ => "",
    }
}

/// Largest Noise handshake message accepted.
const MAX_NOISE_MSG: usize = 1024;

/// Errors while setting up or using a control exchange. Each names what went wrong.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Could not connect.
    #[error("cannot connect to {addr}: {source}{hint}", hint = connect_hint(source))]
    Connect {
        /// Address.
        addr: String,
        /// Cause.
        source: io::Error,
    },
    /// A socket error.
    #[error("{during}: {source}")]
    Io {
        /// What was being done.
        during: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// The peer sent nothing in time.
    #[error("{during}: peer sent nothing for {secs:.1}s (stalled peer)")]
    Timeout {
        /// What was awaited.
        during: &'static str,
        /// Seconds waited.
        secs: f64,
    },
    /// The peer closed the connection.
    #[error("{during}: the peer closed the connection{hint}")]
    Closed {
        /// What was awaited.
        during: &'static str,
        /// Why that may be.
        hint: &'static str,
    },
    /// Bytes that do not decode.
    #[error("{during}: {source}")]
    Wire {
        /// What was being read.
        during: &'static str,
        /// Cause.
        source: WireError,
    },
    /// Authentication failure.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The peer refused with an Error frame.
    #[error("the peer refused: {message} ({code:?})")]
    Refused {
        /// Code.
        code: ErrorCode,
        /// The peer's message.
        message: String,
    },
    /// The receiver had no room for another handshake (its caps on handshakes in progress, in
    /// all or from this address), after retrying for `secs`.
    #[error(
        "{addr} is busy: it refused new connections for {secs:.1}s (too many handshakes in progress, from all peers or from this address); try again later, or raise the receiver's limits"
    )]
    Busy {
        /// The receiver.
        addr: String,
        /// Seconds spent retrying.
        secs: f64,
    },
    /// A frame of the wrong type.
    #[error("{during}: expected a {expected} frame, got {got}")]
    Unexpected {
        /// What was awaited.
        during: &'static str,
        /// Expected type.
        expected: FrameType,
        /// Received type.
        got: FrameType,
    },
}

fn io_err(during: &'static str, timeout: Duration, hint: &'static str) -> impl Fn(io::Error) -> HandshakeError {
    move |e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandshakeError::Timeout { during, secs: timeout.as_secs_f64() },
        io::ErrorKind::UnexpectedEof => HandshakeError::Closed { during, hint },
        _ => HandshakeError::Io { during, source: e },
    }
}

/// An established stream: socket, frame codec, and bytes read but not yet decoded.
#[derive(Debug)]
pub struct Conn {
    /// The socket.
    pub sock: TcpStream,
    /// Seals and opens frames for this stream.
    pub codec: FrameCodec,
    /// Buffered control-direction bytes.
    pub reader: FrameReader,
    /// Read timeout in force.
    pub timeout: Duration,
}

impl Conn {
    /// Writes one frame.
    pub fn write_frame(&mut self, kind: FrameType, offset: u64, payload: &[u8]) -> Result<(), HandshakeError> {
        let h = FrameHeader::for_payload(kind, self.codec.stream(), offset, payload);
        let bytes = self.codec.encode_frame(&h, payload);
        self.sock.write_all(&bytes).map_err(|source| HandshakeError::Io { during: "sending a control frame", source })
    }

    /// Writes an Error frame (best effort).
    pub fn write_error(&mut self, code: ErrorCode, msg: &str) {
        let _ = self.write_frame(FrameType::Error, 0, &wire::encode_error(code, msg));
    }

    /// Reads one frame, blocking up to the read timeout. An Error frame becomes `Refused`.
    pub fn read_frame(&mut self, during: &'static str) -> Result<(FrameHeader, Vec<u8>), HandshakeError> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.reader.next_frame(&mut self.codec) {
                Ok(Some((h, p))) => {
                    if h.kind == FrameType::Error {
                        let (code, message) = wire::decode_error(&p).map_err(|source| HandshakeError::Wire { during, source })?;
                        return Err(HandshakeError::Refused { code, message });
                    }
                    return Ok((h, p));
                }
                Ok(None) => {}
                Err(source) => return Err(HandshakeError::Wire { during, source }),
            }
            let n = match self.sock.read(&mut buf) {
                // A signal (io_uring task work in this process can raise one) is not an error.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r.map_err(io_err(during, self.timeout, ""))?,
            };
            if n == 0 {
                return Err(HandshakeError::Closed { during, hint: "" });
            }
            self.reader.push(&buf[..n]);
        }
    }

    /// Reads a frame that must be of `expected` type.
    pub fn expect(&mut self, expected: FrameType, during: &'static str) -> Result<(FrameHeader, Vec<u8>), HandshakeError> {
        let (h, p) = self.read_frame(during)?;
        if h.kind != expected {
            return Err(HandshakeError::Unexpected { during, expected, got: h.kind });
        }
        Ok((h, p))
    }

    /// Sets the read timeout.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
        let _ = self.sock.set_read_timeout(Some(t));
    }
}

/// What a receiver writes, in place of its handshake reply's length, to a connection it has no
/// room for (it never names a Noise message: those are at most 1024 bytes).
pub const BUSY: [u8; 2] = [0xff, 0xff];

/// Turns away a connection the receiver has no room for: writes [`BUSY`] without blocking and
/// closes. Whatever the peer already sent is read first, so the close is a FIN (which lets the
/// peer read the marker), not a reset.
pub fn refuse_busy(sock: TcpStream) {
    let _ = sock.set_nonblocking(true);
    let mut junk = [0u8; 512];
    let _ = (&sock).read(&mut junk);
    let _ = (&sock).write(&BUSY);
    let _ = sock.shutdown(std::net::Shutdown::Write);
}

/// How long a sender keeps trying a receiver that answers busy (at least; longer if its
/// connect timeout is): a receiver's handshake deadline, three times over.
pub const BUSY_RETRY: Duration = Duration::from_secs(30);

/// Connects, authenticates with `psk`, and returns the stream with the measured handshake RTT.
/// A receiver that answers busy is tried again with growing pauses, for up to [`BUSY_RETRY`]
/// or `timeout`, whichever is longer.
pub fn connect(addr: &str, psk: &Psk, encrypt: bool, stream: u16, timeout: Duration) -> Result<(Conn, Duration), HandshakeError> {
    let t0 = Instant::now();
    let mut pause = Duration::from_millis(20);
    let budget = timeout.max(BUSY_RETRY);
    loop {
        match connect_once(addr, psk, encrypt, stream, timeout) {
            Err(HandshakeError::Busy { .. }) if t0.elapsed() + pause < budget => {
                let mut j = [0u8; 1];
                let _ = getrandom::fill(&mut j);
                std::thread::sleep(pause + pause * u32::from(j[0]) / 512);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(HandshakeError::Busy { addr, .. }) => return Err(HandshakeError::Busy { addr, secs: t0.elapsed().as_secs_f64() }),
            r => return r,
        }
    }
}

fn connect_once(addr: &str, psk: &Psk, encrypt: bool, stream: u16, timeout: Duration) -> Result<(Conn, Duration), HandshakeError> {
    let cerr = |source| HandshakeError::Connect { addr: addr.to_owned(), source };
    let sa = addr.to_socket_addrs().map_err(cerr)?.next().ok_or_else(|| cerr(io::Error::new(io::ErrorKind::NotFound, "address resolves to nothing")))?;
    let mut sock = TcpStream::connect_timeout(&sa, timeout).map_err(cerr)?;
    let _ = sock.set_nodelay(true);
    let _ = sock.set_read_timeout(Some(timeout));
    let _ = sock.set_write_timeout(Some(timeout));
    let pre = Preamble { version: VERSION.into(), flags: if encrypt { PREAMBLE_ENCRYPT } else { 0 } };
    let (init, msg1) = Initiator::start_bound(psk, &pre.encode())?;
    let mut out = pre.encode().to_vec();
    out.extend_from_slice(&(msg1.len() as u16).to_be_bytes());
    out.extend_from_slice(&msg1);
    let t0 = Instant::now();
    sock.write_all(&out).map_err(|source| HandshakeError::Io { during: "sending the handshake", source })?;
    let hint = ": wrong key, protocol version mismatch or not a dwcp receiver (the receiver's log names which)";
    let msg2 = read_noise(&mut sock, "reading the handshake reply", timeout, hint, Some(addr))?;
    let rtt = t0.elapsed();
    let keys = init.finish(&msg2)?;
    let codec = if encrypt { FrameCodec::new(stream, Some(&keys)) } else { FrameCodec::authenticated(stream, &keys) };
    Ok((Conn { sock, codec, reader: FrameReader::default(), timeout }, rtt))
}

/// Reads one length-prefixed Noise message. `receiver` is the address of the receiver whose
/// reply this is (the initiator's side), where [`BUSY`] in place of the length means busy; from
/// an initiator it is just a length too long.
fn read_noise(sock: &mut TcpStream, during: &'static str, timeout: Duration, hint: &'static str, receiver: Option<&str>) -> Result<Vec<u8>, HandshakeError> {
    let mut l = [0u8; 2];
    sock.read_exact(&mut l).map_err(io_err(during, timeout, hint))?;
    if let (true, Some(addr)) = (l == BUSY, receiver) {
        return Err(HandshakeError::Busy { addr: addr.to_owned(), secs: 0.0 });
    }
    let n = u16::from_be_bytes(l) as usize;
    if n == 0 || n > MAX_NOISE_MSG {
        return Err(HandshakeError::Wire { during, source: WireError::Malformed { what: "handshake message", why: format!("length {n}") } });
    }
    let mut m = vec![0u8; n];
    sock.read_exact(&mut m).map_err(io_err(during, timeout, hint))?;
    Ok(m)
}

/// Responder side: reads the preamble and the initiator's first Noise message, checks the key,
/// and only then writes. Returns the stream (codec for stream 0 until the Hello names its index)
/// and whether the peer asked for encryption.
pub fn accept(mut sock: TcpStream, psk: &Psk, timeout: Duration) -> Result<(Conn, bool), HandshakeError> {
    let _ = sock.set_nodelay(true);
    let _ = sock.set_read_timeout(Some(timeout));
    let _ = sock.set_write_timeout(Some(timeout));
    let mut pre = [0u8; PREAMBLE_LEN];
    let during = "reading the preamble";
    sock.read_exact(&mut pre).map_err(io_err(during, timeout, ""))?;
    let pre_bytes = pre;
    let pre = Preamble::decode(&pre).map_err(|source| HandshakeError::Wire { during, source })?;
    let msg1 = read_noise(&mut sock, "reading the handshake", timeout, "", None)?;
    let (msg2, keys) = Responder::accept_bound(psk, &pre_bytes, &msg1)?;
    let mut out = (msg2.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&msg2);
    sock.write_all(&out).map_err(|source| HandshakeError::Io { during: "sending the handshake reply", source })?;
    let enc = pre.encrypted();
    let codec = if enc { FrameCodec::new(0, Some(&keys)) } else { FrameCodec::authenticated(0, &keys) };
    Ok((Conn { sock, codec, reader: FrameReader::default(), timeout }, enc))
}
