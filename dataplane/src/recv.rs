//! The receiving side: an acceptor, a handshake thread per new connection, pinned io_uring shards
//! that read frames straight into registered buffers and write chunks at their offsets, and one
//! coordinator thread that owns every session's state (journal, acknowledgements, digest). What
//! takes a session's file I/O (preparing its output at open; verifying, syncing and publishing it
//! at commit) runs on storage workers, so one session's disk never stalls another's
//! acknowledgements.
//!
//! A bad peer only ever ends its own stream or session; the process keeps serving the others.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::crypto::Psk;
use crate::handshake::{self, Conn, HandshakeError};
use crate::session::{JournalHeader, parse_journal};
use crate::transport::uring::sys::{BufId, Completion, Returned, Ring};
use crate::wire::{self, CODEC_RAW, Caps, ErrorCode, FrameType, Hello, TRANSPORT_TCP, Welcome};
use ledger::Ledger;
use outdir::{Kind, OutDir};

mod admission;
pub mod ledger;
pub mod outdir;
#[cfg(feature = "rdma")]
mod rdma;
#[doc(hidden)]
pub mod reorder;
#[cfg(feature = "rdma")]
pub use rdma::RdmaRecvOptions;

/// Where received objects go.
#[derive(Debug, Clone)]
pub enum Sink {
    /// Files in this directory, named by the sender.
    Dir(PathBuf),
    /// Standard output, in order (one session at a time).
    Stdout,
    /// A Unix socket this receiver connects to when a session starts, written in order (one
    /// session at a time): a destination QEMU's `-incoming unix:PATH`, or the socket libvirt's
    /// `--listen-address` names.
    Unix(PathBuf),
    /// Verified, then dropped (benchmarks).
    Discard,
}

/// Receiver options.
#[derive(Debug, Clone)]
pub struct RecvOptions {
    /// Address to listen on.
    pub listen: String,
    /// Where objects go.
    pub sink: Sink,
    /// Pre-shared key.
    pub psk: Psk,
    /// Accept senders that ask for plaintext streams.
    pub allow_plaintext: bool,
    /// A handshake or session with no progress for this long is ended as stalled.
    pub idle_timeout: Duration,
    /// Largest chunk accepted.
    pub max_chunk: u32,
    /// Cores to pin shards to, one shard each (None: all cores).
    pub cores: Option<Vec<usize>>,
    /// Permission bits of published objects (and of their temporaries).
    pub file_mode: u32,
    /// How long an interrupted session's partial output is kept for a resume.
    pub keep_partial: Duration,
    /// Largest object a sender may declare (None: only the free space bounds it).
    pub max_object_size: Option<u64>,
    /// Time a new connection has for its whole handshake (preamble to Welcome).
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once, from all addresses.
    pub max_handshakes: usize,
    /// Handshakes in progress at once from one address.
    pub max_handshakes_per_addr: usize,
    /// Streams one session may join.
    pub max_streams_per_session: usize,
    /// Authenticated streams parked between sessions (a sender's warm streams, held as probe
    /// connections) at once, from all addresses and from one.
    pub max_parked: usize,
    /// See `max_parked`.
    pub max_parked_per_addr: usize,
    /// A parked stream with nothing from its sender (its keepalive pings) for this long is
    /// closed.
    pub park_timeout: Duration,
    /// Grant RDMA to senders that ask for it (plaintext sessions to a file or discard sink,
    /// when a device opens); None refuses it.
    #[cfg(feature = "rdma")]
    pub rdma: Option<RdmaRecvOptions>,
}

impl RecvOptions {
    /// Defaults.
    pub fn new(listen: impl Into<String>, sink: Sink, psk: Psk) -> Self {
        Self {
            listen: listen.into(),
            sink,
            psk,
            allow_plaintext: false,
            idle_timeout: Duration::from_secs(30),
            max_chunk: 2 << 20,
            cores: None,
            file_mode: 0o600,
            keep_partial: Duration::from_secs(24 * 3600),
            max_object_size: None,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            max_handshakes_per_addr: 64,
            max_streams_per_session: 64,
            max_parked: 256,
            max_parked_per_addr: 64,
            park_timeout: Duration::from_secs(120),
            #[cfg(feature = "rdma")]
            rdma: Some(RdmaRecvOptions::default()),
        }
    }
}

/// Receiver start-up errors.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RecvError {
    /// Could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Could not prepare the output directory.
    #[error("output directory {path}: {source}")]
    OutDir {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Could not create a ring.
    #[error("creating an io_uring: {0}")]
    Ring(std::io::Error),
    /// Bad core list.
    #[error("{0}")]
    Cores(String),
}

/// How one session ended.
#[derive(Debug, Clone)]
pub struct SessionOutcome {
    /// Object name.
    pub name: String,
    /// The sender's address.
    pub peer: Option<std::net::IpAddr>,
    /// Object size (bytes placed, for a stream).
    pub size: u64,
    /// Bytes received in this session (excluding what a resume found already present).
    pub received: u64,
    /// Bytes found already present and verified at resume.
    pub resumed: u64,
    /// Wall time.
    pub wall: Duration,
    /// Of it, the time until the sender's commit arrived: the data phase, without the
    /// verification and sync that follow (seconds for an image of gigabytes). Goodput that
    /// says something of the path is reckoned over this.
    pub data_wall: Duration,
    /// Where it was published.
    pub path: Option<PathBuf>,
    /// The verified digest, or why the session failed.
    pub result: Result<[u8; 32], String>,
}

/// A running receiver.
#[derive(Debug)]
pub struct ReceiverHandle {
    /// The bound address.
    pub local_addr: std::net::SocketAddr,
    /// Session outcomes, as they happen.
    pub outcomes: Receiver<SessionOutcome>,
    /// Connections refused before a session began: peer address and why (newest 1024 kept).
    pub refused: Receiver<(String, String)>,
    stop: Arc<AtomicBool>,
    coordinator: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl ReceiverHandle {
    /// Asks every thread to stop, and waits for the coordinator (which owns the sessions and
    /// the output directory's lock) to end: a receiver started next on the same directory
    /// finds it free.
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
        let _ = TcpStream::connect(self.local_addr);
        if let Some(h) = self.coordinator.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// Per-session facts a shard needs.
#[derive(Debug, Clone)]
struct SessionRef {
    id: [u8; 16],
    size: Option<u64>,
    out: Out,
    activity: Arc<AtomicU64>,
    gate: Arc<WriteGate>,
}

/// Closes a session's output to writes at its commit: shards enter before each chunk write and
/// leave when it completes; the commit seals the gate, then waits for the writes inside to
/// finish before it verifies, so no byte lands in the output after the digest was checked.
#[derive(Debug, Default)]
struct WriteGate {
    sealed: AtomicBool,
    writes: AtomicUsize,
}

/// A write inside the gate: leaves it when dropped.
struct GateGuard(Arc<WriteGate>);

impl Drop for GateGuard {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl WriteGate {
    /// A shard is about to write: false once sealed.
    fn enter(&self) -> bool {
        self.writes.fetch_add(1, SeqCst);
        if self.sealed.load(SeqCst) {
            self.writes.fetch_sub(1, SeqCst);
            return false;
        }
        true
    }

    fn leave(&self) {
        self.writes.fetch_sub(1, SeqCst);
    }

    fn seal(&self) {
        self.sealed.store(true, SeqCst);
    }

    /// Waits (up to `limit`) for the writes that entered before the seal: true once none is left.
    fn drain(&self, limit: Duration) -> bool {
        let t = Instant::now();
        while self.writes.load(SeqCst) > 0 {
            if t.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

#[derive(Debug, Clone)]
enum Out {
    File(Arc<File>),
    Discard,
    /// An ordered stream (standard output or a Unix socket): chunks go to the coordinator, which
    /// writes them in order.
    Ordered,
    /// HDE frames: decoded by the shard that read them, into the shared mapped output.
    Hde(Arc<HdeImage>),
}

/// Registered buffers per receiver shard: one per stream being read plus writes in flight.
const POOL_BUFFERS: u16 = 16;

type Reply<T> = Sender<Result<T, (ErrorCode, String)>>;
type StreamAddr = (usize, usize);

enum ToCoord {
    Open {
        hello: Hello,
        peer: Option<std::net::IpAddr>,
        reply: Reply<(Welcome, SessionRef)>,
    },
    Join {
        session: [u8; 16],
        reply: Reply<SessionRef>,
    },
    Placed {
        session: [u8; 16],
        offset: u64,
        len: u32,
        sum: u64,
    },
    Deliver {
        session: [u8; 16],
        offset: u64,
        data: Vec<u8>,
        sum: u64,
        from: StreamAddr,
    },
    /// A shard decoded the HDE frame of the chunk at `offset`.
    HdeDone {
        session: [u8; 16],
        offset: u64,
        done: HdeDone,
        sum: u64,
        from: StreamAddr,
    },
    /// The chunk at `offset` arrived again (sent anew after a stream dropped): it was decoded,
    /// or is being decoded, from its first arrival. Acknowledged once that is placed.
    HdeAgain {
        session: [u8; 16],
        offset: u64,
        from: StreamAddr,
    },
    Commit {
        session: [u8; 16],
        commit: wire::Commit,
        from: StreamAddr,
    },
    Down {
        session: [u8; 16],
        why: Option<String>,
    },
}

enum ToShard {
    Add(Box<(Conn, SessionRef)>),
    Ack { key: usize, offset: u64 },
    Reply { key: usize, kind: FrameType, payload: Vec<u8> },
}

/// A stream a shard gives back to the lobby: its sender sent a Hello on it after its session
/// (to open another, or to park it as a probe connection), with that Hello.
type Handoff = (Conn, wire::FrameHeader, Vec<u8>);

/// What admits a stream to a session (the second half of a new connection's admission, and all
/// of a reused stream's): the options and the ways to the coordinator and the shards.
struct Lobby {
    opts: RecvOptions,
    coord: Sender<ToCoord>,
    shards: Vec<Sender<ToShard>>,
    next: AtomicUsize,
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    stop: Arc<AtomicBool>,
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    epoch: Instant,
    /// Streams parked as probe connections.
    parked: Arc<admission::Admission>,
}

fn millis(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// Starts a receiver: binds, then runs acceptor, coordinator and shards on their own threads.
pub fn start(opts: RecvOptions) -> Result<ReceiverHandle, RecvError> {
    let outdir = match &opts.sink {
        Sink::Dir(d) => Some(Arc::new(OutDir::open(d, opts.file_mode).map_err(|source| RecvError::OutDir { path: d.display().to_string(), source })?)),
        _ => None,
    };
    let listener = TcpListener::bind(&opts.listen).map_err(|source| RecvError::Listen { addr: opts.listen.clone(), source })?;
    let local_addr = listener.local_addr().map_err(|source| RecvError::Listen { addr: opts.listen.clone(), source })?;
    let cores = crate::placement::shard_cores(opts.cores.as_deref()).map_err(RecvError::Cores)?;
    let nshards = cores.len();
    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let (coord_tx, coord_rx) = crossbeam_channel::unbounded::<ToCoord>();
    let (out_tx, out_rx) = crossbeam_channel::unbounded();
    let buf_size = wire::header_wire_len(true) + opts.max_chunk.max(wire::MAX_CONTROL_PAYLOAD) as usize + wire::TAG_LEN;
    let mut shard_txs = Vec::new();
    let (handoff_tx, handoff_rx) = crossbeam_channel::unbounded::<Handoff>();
    // Each shard builds its own ring and pool on its own core, in parallel (registering a pool
    // pins its pages, which is most of a receiver's start-up time).
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), std::io::Error>>(nshards);
    for k in 0..nshards {
        let (tx, rx) = crossbeam_channel::unbounded::<ToShard>();
        shard_txs.push(tx);
        let coord = coord_tx.clone();
        let core = cores.get(k % cores.len().max(1)).copied();
        let (stop, idle, ready, handoff) = (stop.clone(), opts.idle_timeout, ready_tx.clone(), handoff_tx.clone());
        std::thread::Builder::new()
            .name(format!("dwcp-rx-shard{k}"))
            .spawn(move || {
                if let Some(c) = core {
                    core_affinity::set_for_current(c);
                }
                let ring = match Ring::new(512, POOL_BUFFERS, buf_size, false) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                RxShard { k, ring, rx, coord, handoff, streams: slab::Slab::new(), waiting: Default::default(), idle, epoch }.run(&stop);
            })
            .expect("spawn shard");
    }
    for _ in 0..nshards {
        if let Ok(Err(e)) = ready_rx.recv() {
            stop.store(true, Relaxed);
            return Err(RecvError::Ring(e));
        }
    }
    let coordinator = {
        let (sink, shard_txs, stop) = (opts.sink.clone(), shard_txs.clone(), stop.clone());
        let limits = Limits { keep_partial: opts.keep_partial, max_object_size: opts.max_object_size, max_streams: opts.max_streams_per_session };
        std::thread::Builder::new()
            .name("dwcp-coordinator".into())
            .spawn(move || {
                let storage = Storage::start(nshards.max(2));
                Coordinator { sink, outdir, limits, ordered: None, sessions: HashMap::new(), busy: HashMap::new(), shards: shard_txs, outcomes: out_tx, epoch, storage }
                    .run(coord_rx, &stop)
            })
            .expect("spawn coordinator")
    };
    let lobby = Arc::new(Lobby {
        opts: opts.clone(),
        coord: coord_tx.clone(),
        shards: shard_txs.clone(),
        next: AtomicUsize::new(0),
        stop: stop.clone(),
        epoch,
        parked: admission::Admission::new(opts.max_parked, opts.max_parked_per_addr),
    });
    {
        // Streams the shards give back after a session: each admitted again on its own thread.
        let lobby = lobby.clone();
        std::thread::Builder::new()
            .name("dwcp-lobby".into())
            .spawn(move || {
                for (conn, h, p) in handoff_rx {
                    let lobby = lobby.clone();
                    let _ = std::thread::Builder::new().name("dwcp-readmit".into()).spawn(move || {
                        let peer = conn.sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                        if let Err(e) = serve_hellos(conn, h, p, &lobby, None) {
                            debug!(%peer, "a reused stream ended: {e}");
                        }
                    });
                }
            })
            .expect("spawn the lobby");
    }
    let (ref_tx, ref_rx) = crossbeam_channel::bounded(1024);
    {
        let stop = stop.clone();
        let caps = admission::Admission::new(opts.max_handshakes, opts.max_handshakes_per_addr);
        let watchdog = admission::Watchdog::start(opts.handshake_timeout);
        std::thread::Builder::new()
            .name("dwcp-accept".into())
            .spawn(move || {
                let mut last_warn: Option<Instant> = None;
                for sock in listener.incoming() {
                    if stop.load(Relaxed) {
                        break;
                    }
                    let sock = match sock {
                        Ok(s) => s,
                        // Out of descriptors or memory: nothing can be accepted until some close.
                        // Back off instead of spinning on the error.
                        Err(e) => {
                            if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                                warn!("accepting a connection failed: {e}; backing off");
                                last_warn = Some(Instant::now());
                            }
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    };
                    let Ok(peer_addr) = sock.peer_addr() else { continue };
                    let peer = peer_addr.to_string();
                    // Unauthenticated peers cost a thread each until they finish or their deadline
                    // passes: capped in all and per address; a refused one is told the receiver is busy.
                    let ticket = match caps.admit(peer_addr.ip()) {
                        Ok(t) => t,
                        Err(why) => {
                            handshake::refuse_busy(sock);
                            debug!(%peer, "connection refused: {why}");
                            let _ = ref_tx.try_send((peer, why));
                            continue;
                        }
                    };
                    let deadline = match watchdog.watch(&sock) {
                        Ok(d) => d,
                        Err(e) => {
                            warn!(%peer, "connection refused: {e}");
                            continue;
                        }
                    };
                    let (lobby, refused, limit) = (lobby.clone(), ref_tx.clone(), watchdog.limit());
                    // The watchdog holds a copy of the socket until the deadline: a handshake that
                    // fails must shut the connection itself, or the peer waits for the deadline
                    // (a wrong key then read as a stalled receiver, not as a closed connection).
                    let shut = sock.try_clone().ok();
                    let _ = std::thread::Builder::new().name("dwcp-handshake".into()).spawn(move || {
                        let r = admit(sock, &lobby, &deadline, ticket);
                        if let (Err(_), Some(s)) = (&r, &shut) {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                        drop(shut);
                        match r {
                            // Closed before a byte: a reachability probe (mode detection), not an error;
                            // closed after the key exchange: a sender's stream it did not need after all
                            // (connected while it probed the path, or a join too late).
                            Err(HandshakeError::Closed { during: during @ ("reading the preamble" | "reading the hello"), .. }) if !deadline.expired() => {
                                tracing::debug!(%peer, "connection closed {during}");
                            }
                            Err(e) => {
                                let e = if deadline.expired() { format!("handshake not finished within {:.1}s ({e})", limit.as_secs_f64()) } else { e.to_string() };
                                warn!(%peer, "connection refused: {e}");
                                let _ = refused.try_send((peer, e));
                            }
                            Ok(()) => {}
                        }
                    });
                }
            })
            .expect("spawn acceptor");
    }
    info!(%local_addr, shards = nshards, "receiver listening");
    Ok(ReceiverHandle { local_addr, outcomes: out_rx, refused: ref_rx, stop, coordinator: std::sync::Mutex::new(Some(coordinator)) })
}

/// Handshake and first Hello of a new connection, within its deadline; the rest is
/// [`serve_hellos`]'s. The admission `ticket` (a slot among the unauthenticated handshakes) is
/// given back once the Welcome has gone out.
fn admit(sock: TcpStream, lobby: &Lobby, deadline: &admission::Deadline, ticket: admission::Ticket) -> Result<(), HandshakeError> {
    let (mut conn, _) = handshake::accept(sock, &lobby.opts.psk, lobby.opts.idle_timeout)?;
    let (h, p) = conn.expect(FrameType::Hello, "reading the hello")?;
    serve_hellos(conn, h, p, lobby, Some((deadline, ticket)))
}

/// Answers the Hello `(h, p)` on an authenticated stream and those that follow it: a Probe
/// parks the stream as a probe connection (bounded by `max_parked`, closed after
/// `park_timeout` without a frame) until its sender closes it or sends another Hello; an Open
/// or a Join hands it to a shard for that session (which gives it back here if its sender
/// sends a Hello after the session). `first`: a new connection's handshake deadline and
/// admission ticket, both done with at its first Welcome.
fn serve_hellos(
    mut conn: Conn,
    mut h: wire::FrameHeader,
    mut p: Vec<u8>,
    lobby: &Lobby,
    mut first: Option<(&admission::Deadline, admission::Ticket)>,
) -> Result<(), HandshakeError> {
    let opts = &lobby.opts;
    let (coord, shards) = (&lobby.coord, &lobby.shards);
    let encrypted = conn.codec.encrypted();
    // Past the deadline the watchdog has shut the socket; a handshake that finished in time is
    // no longer its business.
    let mut in_time = |conn: &mut Conn| -> Result<(), HandshakeError> {
        match first.take() {
            Some((deadline, _ticket)) if !deadline.finish() => {
                let _ = conn.sock.shutdown(Shutdown::Both);
                Err(HandshakeError::Closed { during: "the handshake", hint: ": its deadline passed" })
            }
            _ => Ok(()),
        }
    };
    let refuse = |conn: &mut Conn, code, msg: String| {
        conn.write_error(code, &msg);
        HandshakeError::Refused { code, message: msg }
    };
    // A session granted RDMA: set up its data path once the Welcome has gone out.
    #[cfg(feature = "rdma")]
    let mut granted = None;
    let (session, welcome) = loop {
        let hello = Hello::decode(&p).map_err(|source| {
            conn.write_error(ErrorCode::Protocol, &source.to_string());
            HandshakeError::Wire { during: "reading the hello", source }
        })?;
        if !encrypted && !opts.allow_plaintext {
            return Err(refuse(&mut conn, ErrorCode::Refused, "this receiver requires encryption; start it with --no-encrypt to allow plaintext streams".into()));
        }
        break match hello {
            Hello::Probe => {
                let ip = conn.sock.peer_addr().map_err(|source| HandshakeError::Io { during: "parking a stream", source })?.ip();
                let _parked = lobby.parked.admit(ip).map_err(|why| refuse(&mut conn, ErrorCode::Refused, format!("cannot park another stream: {why}")))?;
                let plain = if opts.allow_plaintext { crate::wire::TRANSPORT_PLAINTEXT } else { 0 };
                let caps = Caps { max_streams: 256, max_chunk: opts.max_chunk, codecs: CODEC_RAW, transports: TRANSPORT_TCP | plain };
                conn.codec.set_stream(h.stream);
                conn.write_frame(FrameType::Welcome, 0, &Welcome { session: [0; 16], caps, have: Vec::new() }.encode())?;
                in_time(&mut conn)?;
                conn.set_timeout(opts.park_timeout.max(opts.idle_timeout));
                match crate::probe::serve(&mut conn, opts.allow_plaintext)? {
                    Some((h2, p2)) => {
                        (h, p) = (h2, p2);
                        conn.set_timeout(opts.idle_timeout);
                        continue;
                    }
                    None => return Ok(()),
                }
            }
            Hello::Open { chunk_size, .. } if chunk_size > opts.max_chunk => {
                return Err(refuse(&mut conn, ErrorCode::Refused, format!("chunk size {chunk_size} exceeds this receiver's limit of {}", opts.max_chunk)));
            }
            Hello::Open { caps, .. } => {
                let (rtx, rrx) = crossbeam_channel::bounded(1);
                let peer = conn.sock.peer_addr().ok().map(|a| a.ip());
                let _ = coord.send(ToCoord::Open { hello, peer, reply: rtx });
                let (mut w, s) = rrx.recv().unwrap_or(Err((ErrorCode::Internal, "receiver shutting down".into()))).map_err(|(c, m)| refuse(&mut conn, c, m))?;
                w.caps.max_chunk = opts.max_chunk;
                #[cfg(feature = "rdma")]
                if caps.transports & wire::TRANSPORT_RDMA != 0 {
                    let why_not = match (&opts.rdma, encrypted, &s.out) {
                        (None, _, _) => Some("RDMA is off at this receiver".to_string()),
                        (_, true, _) => Some("the session is encrypted, and the RDMA path is plaintext".into()),
                        (_, _, Out::Ordered) => Some("a stream sink (standard output or a Unix socket)".into()),
                        (_, _, Out::Hde(_)) => Some("HDE frames are decoded by the receiver's shards, over TCP".into()),
                        (Some(ro), _, _) => match rdma::grant(ro) {
                            Ok(g) => {
                                w.caps.transports |= wire::TRANSPORT_RDMA;
                                granted = Some((g, ro.clone()));
                                None
                            }
                            Err(e) => Some(e.to_string()),
                        },
                    };
                    if let Some(w) = why_not {
                        info!("RDMA not granted: {w}; the session goes over TCP");
                    }
                }
                #[cfg(not(feature = "rdma"))]
                let _ = caps;
                (s, w)
            }
            Hello::Join { session, .. } => {
                let (rtx, rrx) = crossbeam_channel::bounded(1);
                let _ = coord.send(ToCoord::Join { session, reply: rtx });
                let s = rrx.recv().unwrap_or(Err((ErrorCode::Internal, "receiver shutting down".into()))).map_err(|(c, m)| refuse(&mut conn, c, m))?;
                let caps = Caps { max_streams: 256, max_chunk: opts.max_chunk, codecs: CODEC_RAW, transports: TRANSPORT_TCP };
                (s, Welcome { session, caps, have: Vec::new() })
            }
        };
    };
    conn.codec.set_stream(h.stream);
    // The session counts this stream from its open or join: a stream that ends here is counted
    // down again, or the session would wait for it forever.
    if let Err(e) = conn.write_frame(FrameType::Welcome, 0, &welcome.encode()).and_then(|()| in_time(&mut conn)) {
        let _ = coord.send(ToCoord::Down { session: session.id, why: Some(format!("a stream's handshake failed: {e}")) });
        return Err(e);
    }
    #[cfg(feature = "rdma")]
    if let Some((g, ro)) = granted {
        // The data path counts as one of the session's streams.
        let (rtx, rrx) = crossbeam_channel::bounded(1);
        let _ = coord.send(ToCoord::Join { session: session.id, reply: rtx });
        let _ = rrx.recv();
        rdma::accept(&mut conn, g, &ro, opts.max_chunk, session.clone(), coord.clone(), opts.idle_timeout, lobby.epoch, lobby.stop.clone())?;
    }
    let _ = conn.sock.set_read_timeout(None);
    // Streams are dealt from the last shard down, while a sender pins from the first core up, so a
    // sender and a receiver on one host (loopback) do not start out on the same core.
    let k = shards.len() - 1 - lobby.next.fetch_add(1, Relaxed) % shards.len();
    let _ = shards[k].send(ToShard::Add(Box::new((conn, session))));
    Ok(())
}

// ------------------------------------------------------------------------------------ shards

enum RxState {
    /// Nothing to read yet: a readiness poll is posted (or about to be), no buffer held.
    Idle,
    /// Readable: waiting its turn for a pool buffer to read the next header into.
    NeedBuf,
    /// Reading a header into `buf[..hl]`.
    Header { buf: BufId, filled: usize },
    /// Reading a payload into `buf[hl..hl+wire]`.
    Payload { buf: BufId, h: wire::FrameHeader, filled: usize },
    /// Stream finished or failed.
    Dead,
}

struct RxStream {
    conn: Conn,
    sess: SessionRef,
    state: RxState,
    /// A readiness poll is in flight.
    polling: bool,
    /// In the shard's queue of streams waiting for a buffer.
    queued: bool,
    reading: bool,
    sending: bool,
    acks: Vec<u64>,
    replies: Vec<(FrameType, Vec<u8>)>,
    close_after_send: bool,
    in_flight: usize,
    /// This stream's HDE decoder (zstd contexts), made at its first HDE frame.
    hde_dec: Option<crate::hde::Decoder>,
    /// A Hello its sender sent after its session: the stream goes back to the lobby with it
    /// once nothing of it is in flight.
    handoff: Option<(wire::FrameHeader, Vec<u8>)>,
}

const T_RECV: u64 = 0;
const T_WRITE: u64 = 1;
const T_SEND: u64 = 2;
/// A writeback started for a placed chunk: its completion only ends the operation (a failure
/// shows at the commit's sync).
const T_WRITEBACK: u64 = 3;
/// The stream became readable.
const T_POLL: u64 = 4;
/// Low bits of an operation's tag that say which kind it is; the stream's key is above them.
const TAG_BITS: u32 = 3;

struct RxShard {
    k: usize,
    ring: Ring,
    rx: Receiver<ToShard>,
    coord: Sender<ToCoord>,
    /// Where a stream goes whose sender sent a Hello on it after its session.
    handoff: Sender<Handoff>,
    streams: slab::Slab<RxStream>,
    /// Readable streams waiting for a pool buffer, served in turn (`grant`).
    waiting: std::collections::VecDeque<usize>,
    idle: Duration,
    epoch: Instant,
}

impl RxShard {
    fn run(&mut self, stop: &AtomicBool) {
        let mut done = Vec::new();
        while !stop.load(Relaxed) {
            while let Ok(m) = self.rx.try_recv() {
                self.command(m);
            }
            let keys: Vec<usize> = self.streams.iter().map(|(k, _)| k).collect();
            for key in keys {
                self.pump(key);
            }
            self.grant();
            let wait = if self.streams.is_empty() { Duration::from_millis(20) } else { Duration::from_millis(2) };
            if self.streams.is_empty() {
                // Nothing to drive: block on the command channel instead of spinning the ring.
                if let Ok(m) = self.rx.recv_timeout(wait) {
                    self.command(m);
                }
                continue;
            }
            if let Err(e) = self.ring.submit_and_wait(wait) {
                warn!("io_uring wait failed: {e}");
            }
            done.clear();
            self.ring.reap(&mut done);
            for c in done.drain(..) {
                self.complete(c);
            }
            self.check_stalls();
        }
    }

    fn command(&mut self, m: ToShard) {
        match m {
            ToShard::Add(b) => {
                let (conn, sess) = *b;
                let _ = self.streams.insert(RxStream {
                    conn,
                    sess,
                    state: RxState::Idle,
                    polling: false,
                    queued: false,
                    reading: false,
                    sending: false,
                    acks: Vec::new(),
                    replies: Vec::new(),
                    close_after_send: false,
                    in_flight: 0,
                    hde_dec: None,
                    handoff: None,
                });
            }
            ToShard::Ack { key, offset } => {
                if let Some(s) = self.streams.get_mut(key) {
                    s.acks.push(offset);
                }
            }
            ToShard::Reply { key, kind, payload } => {
                if let Some(s) = self.streams.get_mut(key) {
                    s.replies.push((kind, payload));
                }
            }
        }
    }

    /// Gives free pool buffers to readable streams in the order they became readable, each
    /// session at most its share of the pool while others wait, so that no session's streams
    /// (many idle ones, or many busy ones) can keep another's from being read.
    fn grant(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let mut held: HashMap<[u8; 16], usize> = HashMap::new();
        for (_, s) in self.streams.iter() {
            match s.state {
                RxState::Header { .. } | RxState::Payload { .. } => *held.entry(s.sess.id).or_default() += 1,
                RxState::NeedBuf => {
                    held.entry(s.sess.id).or_default();
                }
                _ => {}
            }
        }
        let share = (usize::from(POOL_BUFFERS) / held.len().max(1)).max(1);
        let mut skipped = Vec::new();
        while let Some(key) = self.waiting.pop_front() {
            let Some(s) = self.streams.get_mut(key) else { continue };
            if !matches!(s.state, RxState::NeedBuf) {
                s.queued = false;
                continue;
            }
            let h = held.entry(s.sess.id).or_default();
            if *h >= share {
                skipped.push(key);
                continue;
            }
            let Some(buf) = self.ring.alloc() else {
                self.waiting.push_front(key);
                break;
            };
            *h += 1;
            s.queued = false;
            s.state = RxState::Header { buf, filled: 0 };
            self.pump(key);
        }
        // Those over their share keep their place at the front for the next round.
        for key in skipped.into_iter().rev() {
            self.waiting.push_front(key);
        }
    }

    fn check_stalls(&mut self) {
        let now = millis(self.epoch);
        let idle = self.idle.as_millis() as u64;
        let stalled: Vec<usize> =
            self.streams.iter().filter(|(_, s)| !matches!(s.state, RxState::Dead) && now.saturating_sub(s.sess.activity.load(Relaxed)) > idle).map(|(k, _)| k).collect();
        for k in stalled {
            let msg = format!("stalled: the sender sent nothing for {:.1}s", self.idle.as_secs_f64());
            self.fail(k, ErrorCode::Stalled, &msg);
        }
    }

    /// Starts whatever the stream can do now: a receive, a send of acks and replies.
    fn pump(&mut self, key: usize) {
        let s = &mut self.streams[key];
        let fd = s.conn.sock.as_raw_fd();
        let dead = matches!(s.state, RxState::Dead);
        if dead {
            s.acks.clear();
        }
        if !s.sending && (!s.acks.is_empty() || !s.replies.is_empty()) {
            let mut out = Vec::new();
            if !s.acks.is_empty() {
                let p = wire::encode_ack(&s.acks);
                s.acks.clear();
                let h = wire::FrameHeader::for_payload(FrameType::Ack, s.conn.codec.stream(), 0, &p);
                out.extend(s.conn.codec.encode_frame(&h, &p));
            }
            for (kind, p) in s.replies.drain(..) {
                let h = wire::FrameHeader::for_payload(kind, s.conn.codec.stream(), 0, &p);
                out.extend(s.conn.codec.encode_frame(&h, &p));
            }
            s.sending = true;
            s.in_flight += 1;
            self.ring.send_heap(fd, out, (key as u64) << TAG_BITS | T_SEND);
        }
        let s = &mut self.streams[key];
        if s.handoff.is_some() && !s.sending && s.in_flight == 0 {
            let s = self.streams.remove(key);
            let (h, p) = s.handoff.expect("checked");
            let _ = self.handoff.send((s.conn, h, p));
            return;
        }
        if s.close_after_send && !s.sending && s.in_flight == 0 {
            self.remove(key);
            return;
        }
        if s.reading {
            return;
        }
        match s.state {
            RxState::Idle if !s.polling => {
                s.polling = true;
                s.in_flight += 1;
                self.ring.poll_readable(fd, (key as u64) << TAG_BITS | T_POLL);
                return;
            }
            RxState::Idle => return,
            RxState::NeedBuf => {
                if !s.queued {
                    s.queued = true;
                    self.waiting.push_back(key);
                }
                return;
            }
            _ => {}
        }
        let hl = s.conn.codec.header_wire_len();
        let (buf, start, end) = match s.state {
            RxState::Header { buf, filled } => (buf, filled, hl),
            RxState::Payload { buf, h, filled } => (buf, hl + filled, hl + s.conn.codec.payload_wire_len(h.len)),
            _ => return,
        };
        s.reading = true;
        s.in_flight += 1;
        self.ring.recv_buf(fd, buf, start, end, (key as u64) << TAG_BITS | T_RECV);
    }

    fn complete(&mut self, c: Completion) {
        let key = (c.tag >> TAG_BITS) as usize;
        let kind = c.tag & ((1 << TAG_BITS) - 1);
        let Some(s) = self.streams.get_mut(key) else {
            if let Returned::Buf(b) = c.returned {
                self.ring.free(b);
            }
            return;
        };
        s.in_flight -= 1;
        match kind {
            T_SEND => {
                s.sending = false;
                if c.result < 0 && !matches!(s.state, RxState::Dead) {
                    let why = format!("sending acknowledgements failed: {}", std::io::Error::from_raw_os_error(-c.result));
                    self.down(key, Some(why));
                }
            }
            T_WRITEBACK => {}
            T_POLL => {
                s.polling = false;
                if matches!(s.state, RxState::Idle) {
                    // Bytes (or the end) arrived: the sender is not stalled, whatever the wait
                    // for a buffer that follows.
                    s.sess.activity.store(millis(self.epoch), Relaxed);
                    s.state = RxState::NeedBuf;
                }
            }
            T_WRITE => {
                // This write entered the session's gate (`advance`): it leaves however this ends.
                let entered = GateGuard(s.sess.gate.clone());
                let Returned::Buf(buf) = c.returned else { return };
                let hl = s.conn.codec.header_wire_len();
                let b = self.ring.buf_mut(buf);
                let h = wire::FrameHeader::decode(b[..wire::HEADER_LEN].try_into().expect("32"));
                let Ok(h) = h else {
                    self.ring.free(buf);
                    return;
                };
                let mut result = if c.result < 0 { Err(std::io::Error::from_raw_os_error(-c.result)) } else { Ok(()) };
                let done = c.result.max(0) as usize;
                if result.is_ok() && done < h.len as usize {
                    // A short write: finish it synchronously (cold path), which also yields the
                    // real cause when there is one (a full disk shows up here as ENOSPC).
                    if let Out::File(f) = &s.sess.out {
                        result = f.write_all_at(&b[hl + done..hl + h.len as usize], h.offset + done as u64);
                    }
                }
                self.ring.free(buf);
                drop(entered);
                if let Err(e) = result {
                    self.fail(key, ErrorCode::Storage, &format!("writing {} bytes at offset {}: {e}", h.len, h.offset));
                    return;
                }
                let s = &mut self.streams[key];
                let _ = self.coord.send(ToCoord::Placed { session: s.sess.id, offset: h.offset, len: h.len, sum: h.checksum });
                s.acks.push(h.offset);
                if let Out::File(f) = &s.sess.out {
                    s.in_flight += 1;
                    self.ring.start_writeback(f.as_raw_fd(), h.offset, h.len, (key as u64) << TAG_BITS | T_WRITEBACK);
                }
            }
            _ => {
                s.reading = false;
                let Returned::Buf(buf) = c.returned else { return };
                if matches!(s.state, RxState::Dead) {
                    self.ring.free(buf);
                    return;
                }
                if c.result <= 0 {
                    self.release(key);
                    let why = if c.result == 0 { None } else { Some(std::io::Error::from_raw_os_error(-c.result).to_string()) };
                    self.down(key, why);
                    return;
                }
                s.sess.activity.store(millis(self.epoch), Relaxed);
                let n = c.result as usize;
                match &mut s.state {
                    RxState::Header { filled, .. } | RxState::Payload { filled, .. } => *filled += n,
                    _ => {}
                }
                self.advance(key);
            }
        }
    }

    /// A receive finished: decode what is complete.
    fn advance(&mut self, key: usize) {
        let s = &mut self.streams[key];
        let hl = s.conn.codec.header_wire_len();
        match s.state {
            RxState::Header { buf, filled } if filled == hl => {
                let b = self.ring.buf_mut(buf);
                let h = match s.conn.codec.open_header(&mut b[..hl]) {
                    Ok(h) => h,
                    Err(e) => return self.fail(key, ErrorCode::Protocol, &e.to_string()),
                };
                // Keep the plaintext header at the buffer's start for the write completion.
                let plain = h.encode();
                b[..wire::HEADER_LEN].copy_from_slice(&plain);
                let cap = self.ring.buf_size() - hl;
                match h.kind {
                    FrameType::Chunk | FrameType::Commit | FrameType::Hello => {}
                    other => return self.fail(key, ErrorCode::Protocol, &format!("unexpected {other} frame from a sender")),
                }
                if s.conn.codec.payload_wire_len(h.len) > cap {
                    return self.fail(key, ErrorCode::Protocol, &format!("chunk of {} bytes exceeds this receiver's limit", h.len));
                }
                // An HDE frame's length is not the span it covers: only its start must be inside.
                let span = if matches!(s.sess.out, Out::Hde(_)) { 1 } else { u64::from(h.len) };
                if h.kind == FrameType::Chunk
                    && let Some(size) = s.sess.size
                    && h.offset.checked_add(span).is_none_or(|end| end > size)
                {
                    let msg = format!("chunk at offset {} of {} bytes lies past the declared object size {size}", h.offset, h.len);
                    // The code (OutOfRange) tells the sender this ends the session, not just the stream.
                    return self.fail(key, ErrorCode::OutOfRange, &msg);
                }
                s.state = RxState::Payload { buf, h, filled: 0 };
                if h.len == 0 {
                    self.advance(key);
                }
            }
            RxState::Payload { buf, h, filled } if filled == s.conn.codec.payload_wire_len(h.len) => {
                let b = self.ring.buf_mut(buf);
                let plain = match s.conn.codec.open_payload(&mut b[hl..], h.len) {
                    Ok(p) => p,
                    Err(e) => return self.fail(key, ErrorCode::Protocol, &e.to_string()),
                };
                if let Err(e) = h.verify(plain) {
                    return self.fail(key, ErrorCode::Checksum, &e.to_string());
                }
                // The next frame is read once bytes of it are there (`pump`).
                s.state = RxState::Idle;
                let from = (self.k, key);
                match h.kind {
                    FrameType::Hello => {
                        // The stream leaves its session (its sender is done with it) and goes
                        // back to the lobby for this Hello: another session, or parked.
                        let hello = plain.to_vec();
                        self.ring.free(buf);
                        s.handoff = Some((h, hello));
                        s.state = RxState::Dead;
                        let _ = self.coord.send(ToCoord::Down { session: s.sess.id, why: None });
                    }
                    FrameType::Commit => {
                        let r = wire::Commit::decode(plain);
                        self.ring.free(buf);
                        match r {
                            Ok(commit) => {
                                let _ = self.coord.send(ToCoord::Commit { session: s.sess.id, commit, from });
                            }
                            Err(e) => self.fail(key, ErrorCode::Protocol, &e.to_string()),
                        }
                    }
                    _ => match &s.sess.out {
                        Out::File(_) if !s.sess.gate.enter() => {
                            self.ring.free(buf);
                            self.fail(key, ErrorCode::Protocol, &format!("chunk at offset {} arrived after the session's commit", h.offset));
                        }
                        Out::File(f) => {
                            let fd = f.as_raw_fd();
                            s.in_flight += 1;
                            // The plaintext sits after the header slot; when encrypted it is still in
                            // place at `hl`, since AES-GCM opens in place.
                            self.ring.write_buf_at(fd, buf, hl, hl + h.len as usize, h.offset, (key as u64) << TAG_BITS | T_WRITE);
                        }
                        Out::Discard => {
                            let _ = self.coord.send(ToCoord::Placed { session: s.sess.id, offset: h.offset, len: h.len, sum: h.checksum });
                            s.acks.push(h.offset);
                            self.ring.free(buf);
                        }
                        Out::Ordered => {
                            let data = plain.to_vec();
                            let _ = self.coord.send(ToCoord::Deliver { session: s.sess.id, offset: h.offset, data, sum: h.checksum, from });
                            self.ring.free(buf);
                        }
                        Out::Hde(img) => {
                            // Decoded here, from the receive buffer, into the shared output:
                            // the session's chunks decode on every shard at once.
                            let dec = match &mut s.hde_dec {
                                Some(d) => Ok(d),
                                None => crate::hde::Decoder::new(None).map(|d| s.hde_dec.insert(d)).map_err(|e| (ErrorCode::Internal, format!("HDE decoder: {e}"))),
                            };
                            let decoded = dec.and_then(|dec| {
                                let r = img.decode(dec, h.offset, plain).map_err(|why| (ErrorCode::Protocol, why))?;
                                Ok(match r {
                                    Some(done) => ToCoord::HdeDone { session: s.sess.id, offset: h.offset, done, sum: h.checksum, from },
                                    None => ToCoord::HdeAgain { session: s.sess.id, offset: h.offset, from },
                                })
                            });
                            self.ring.free(buf);
                            match decoded {
                                Ok(msg) => {
                                    if let ToCoord::HdeDone { done, .. } = &msg {
                                        s.in_flight += 1;
                                        let tag = (key as u64) << TAG_BITS | T_WRITEBACK;
                                        self.ring.start_writeback(img.file.as_raw_fd(), h.offset, done.span, tag);
                                    }
                                    let _ = self.coord.send(msg);
                                }
                                Err((code, why)) => self.fail(key, code, &why),
                            }
                        }
                    },
                }
            }
            _ => {}
        }
    }

    /// Sends an error on this stream, then closes it. The session goes on on its other streams.
    fn fail(&mut self, key: usize, code: ErrorCode, msg: &str) {
        let s = &mut self.streams[key];
        warn!(stream = s.conn.codec.stream(), "closing stream: {msg}");
        s.replies.push((FrameType::Error, wire::encode_error(code, msg)));
        s.close_after_send = true;
        self.release(key);
        let why = Some(msg.to_owned());
        self.down(key, why);
    }

    /// Frees the stream's read buffer if it holds one that is not in flight.
    fn release(&mut self, key: usize) {
        let s = &mut self.streams[key];
        if s.reading {
            return;
        }
        match std::mem::replace(&mut s.state, RxState::Dead) {
            RxState::Header { buf, .. } | RxState::Payload { buf, .. } => self.ring.free(buf),
            _ => {}
        }
    }

    fn down(&mut self, key: usize, why: Option<String>) {
        let s = &mut self.streams[key];
        s.state = RxState::Dead;
        let _ = self.coord.send(ToCoord::Down { session: s.sess.id, why });
        if !s.close_after_send {
            let _ = s.conn.sock.shutdown(Shutdown::Both);
            s.close_after_send = true;
        }
    }

    fn remove(&mut self, key: usize) {
        let s = self.streams.remove(key);
        let _ = s.conn.sock.shutdown(Shutdown::Both);
    }
}

// ------------------------------------------------------------------------------- coordinator

struct Journal {
    file: File,
}

struct RxSession {
    name: String,
    peer: Option<std::net::IpAddr>,
    out: Out,
    /// The output directory of a directory sink, once the output is prepared: the session's
    /// partial output and journal live in its state directory (`outdir.rs`).
    dir: Option<Arc<OutDir>>,
    /// Where the object is published.
    fin: Option<PathBuf>,
    journal: Option<Journal>,
    /// The chunks placed and a commit's verdict (I/O-free).
    ledger: Ledger,
    streams_up: usize,
    finished: bool,
    started: Instant,
    activity: Arc<AtomicU64>,
    gate: Arc<WriteGate>,
    /// HDE sessions: the mapped output, the decoder, and what did not apply yet.
    hde: Option<Box<HdeRx>>,
    /// Page-aware QEMU streams: the decoder rebuilding QEMU's bytes.
    qemu: Option<Box<crate::qemu::Decoder>>,
    /// Why the ordered output gets nothing more (a stream that did not rebuild, a reader gone).
    out_failed: Option<String>,
    /// Standard output's chunks, put back in order.
    reorder: reorder::Reorder<StreamAddr>,
    outcome: Option<SessionOutcome>,
}

/// How often the state directory is swept for expired partial outputs.
const EXPIRY_SWEEP: Duration = Duration::from_secs(60);

/// Bytes of standard-output chunks held ahead of a gap and acknowledged early.
const REORDER_CAP: usize = 64 << 20;

/// An HDE session's output as the shards decode into it.
#[derive(Debug)]
struct HdeImage {
    /// The mapped output: each chunk is claimed by the shard that decodes it.
    image: crate::sys::image::SharedImage,
    /// A delta round's starting image: the previous round's published file, which stays as it
    /// was until this round is published. References and deltas are against it, so frames
    /// decode right in any order although they overwrite pages others refer to.
    base: Option<memmap2::Mmap>,
    /// The file was created for this session (preallocated, all zeros): zero pages need no write.
    fresh: bool,
    /// The output file: the shards start each decoded chunk's writeback on it, and the commit
    /// sizes and syncs it.
    file: File,
    chunk: u32,
    /// The session's object size: the last chunk's span ends there.
    size: u64,
}

/// What decoding one chunk's frame did.
#[derive(Debug)]
struct HdeDone {
    span: u32,
    applied: u64,
    deferred: Vec<crate::hde::Deferred>,
    rejected: Vec<(u64, &'static str)>,
}

impl HdeImage {
    /// Decodes the frame of the chunk at `offset` into the output: `None` if that chunk was
    /// claimed before (it arrived again); `Err` for a frame that is not at a chunk's start.
    fn decode(&self, dec: &mut crate::hde::Decoder, offset: u64, frame: &[u8]) -> Result<Option<HdeDone>, String> {
        let chunk = u64::from(self.chunk);
        if !offset.is_multiple_of(chunk) {
            return Err(format!("HDE frame at offset {offset} is not at the start of a {chunk}-byte chunk"));
        }
        let Some(claim) = self.image.claim(offset / chunk) else { return Ok(None) };
        let span = chunk.min(self.size.saturating_sub(offset)) as u32;
        let first = offset / crate::hde::PAGE as u64;
        let mut store = ClaimStore { claim, base: self.base.as_deref(), fresh: self.fresh };
        Ok(Some(match dec.decode_bounded(frame, &mut store, (span as usize).div_ceil(crate::hde::PAGE)) {
            Ok(r) => HdeDone { span, applied: r.applied, deferred: r.deferred, rejected: r.rejected },
            Err(e) => HdeDone { span, applied: 0, deferred: Vec::new(), rejected: vec![(first, frame_error(&e))] },
        }))
    }
}

/// Why a whole HDE frame was refused, for the commit's error.
fn frame_error(e: &crate::hde::HdeError) -> &'static str {
    match e {
        crate::hde::HdeError::BadMagic => "not an HDE frame",
        crate::hde::HdeError::Corrupt => "HDE frame's page list does not match its checksum",
        crate::hde::HdeError::TooManyRefs { .. } => "HDE frame lists more reference pages than an encoder does",
        crate::hde::HdeError::TooManyPages { .. } => "HDE frame holds more pages than a frame does",
        crate::hde::HdeError::Truncated { .. } => "truncated HDE frame",
    }
}

/// Duplicates a session may hold unresolved until its commit (32 bytes each): far more than an
/// encoder leaves (it refers to pages it sent before), bounded so that a peer cannot grow the
/// coordinator's memory with them.
const HDE_DEFERRED_MAX: usize = 1 << 20;

/// The coordinator's part of an HDE session.
struct HdeRx {
    img: Arc<HdeImage>,
    deferred: Vec<crate::hde::Deferred>,
    /// Pages that did not apply: the first few (for the error), and how many.
    rejected: Vec<(u64, &'static str)>,
    rejected_count: u64,
    pages: u64,
    /// Streams a chunk arrived on again while its first arrival was decoding: acknowledged
    /// once that is placed.
    waiting: BTreeMap<u64, Vec<StreamAddr>>,
}

impl HdeRx {
    /// Counts pages that did not apply, keeping the first few for the error.
    fn note_rejected(&mut self, r: &[(u64, &'static str)]) {
        self.rejected_count += r.len() as u64;
        let room = 8usize.saturating_sub(self.rejected.len());
        self.rejected.extend(r.iter().take(room));
    }
}

/// A shard's view of the output while it decodes one chunk: that chunk's pages to write, the
/// pages others published (or the round's starting image) to read.
struct ClaimStore<'a> {
    claim: crate::sys::image::Claim<'a>,
    base: Option<&'a [u8]>,
    fresh: bool,
}

impl crate::hde::PageStore for ClaimStore<'_> {
    fn get(&self, no: u64) -> Option<&[u8]> {
        // A page nobody wrote in this round yet is as the round began (a delta round's output
        // starts as a copy of the previous round): a duplicate of a page that does change in
        // this round then fails its checksum and is retried at commit.
        self.claim.get(no).or_else(|| page_of(self.base?, no))
    }
    fn base(&self, no: u64) -> Option<&[u8]> {
        match self.base {
            Some(b) => page_of(b, no),
            None => self.claim.get(no),
        }
    }
    fn put(&mut self, no: u64, page: &[u8]) {
        self.claim.put(no, needs_write(self.fresh, page).then_some(page));
    }
    fn owns(&self, no: u64) -> bool {
        self.claim.owns(no)
    }
}

/// The whole mapped output as the decoder's page store (at commit, when no shard decodes),
/// with a delta round's starting image, and whether the output was created for this session
/// (all zeros).
struct MapStore<'a>(&'a mut [u8], Option<&'a [u8]>, bool);

/// Whether a decoded page must be written into the output: a zero page into a file created for
/// this session is not (its preallocated, unwritten extent stays so and is never flushed; half
/// of a guest image's pages, often).
fn needs_write(fresh: bool, page: &[u8]) -> bool {
    !(fresh && crate::hde::is_zero(page))
}

/// Page `no` of a mapped image, if the image holds it.
fn page_of(image: &[u8], no: u64) -> Option<&[u8]> {
    let at = usize::try_from(no).ok()?.checked_mul(crate::hde::PAGE)?;
    image.get(at..at + crate::hde::PAGE)
}

impl crate::hde::PageStore for MapStore<'_> {
    fn get(&self, no: u64) -> Option<&[u8]> {
        page_of(self.0, no)
    }
    fn base(&self, no: u64) -> Option<&[u8]> {
        page_of(self.1.unwrap_or(self.0), no)
    }
    fn put(&mut self, no: u64, page: &[u8]) {
        if !needs_write(self.2, page) {
            return;
        }
        let at = no as usize * crate::hde::PAGE;
        self.0[at..at + crate::hde::PAGE].copy_from_slice(page);
    }
}

/// What the coordinator bounds per session.
#[derive(Debug, Clone, Copy)]
struct Limits {
    keep_partial: Duration,
    max_object_size: Option<u64>,
    max_streams: usize,
}

struct Coordinator {
    sink: Sink,
    outdir: Option<Arc<OutDir>>,
    limits: Limits,
    sessions: HashMap<[u8; 16], RxSession>,
    /// Sessions whose output a storage worker is preparing or publishing: out of `sessions`
    /// meanwhile, their names held.
    busy: HashMap<[u8; 16], Busy>,
    shards: Vec<Sender<ToShard>>,
    outcomes: Sender<SessionOutcome>,
    epoch: Instant,
    storage: Storage,
    /// The ordered output of the one stream session that has it.
    ordered: Option<Ordered>,
}

/// The ordered output (standard output or a connected Unix socket) and the session writing it.
struct Ordered {
    session: [u8; 16],
    /// `standard output` or `unix:PATH`, for messages.
    what: String,
    to: OrderedTo,
}

enum OrderedTo {
    Stdout,
    Socket(std::os::unix::net::UnixStream),
}

impl Ordered {
    /// Writes all of `b` and flushes: standard output is line-buffered, so the bytes after the
    /// last newline would wait for the next write, and a migration's last bytes are what the
    /// destination QEMU waits for to resume the guest.
    fn write_now(&mut self, b: &[u8]) -> std::io::Result<()> {
        match &mut self.to {
            OrderedTo::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(b)?;
                out.flush()
            }
            OrderedTo::Socket(s) => s.write_all(b),
        }
    }
}

/// A session at a storage worker.
struct Busy {
    name: String,
    /// Its streams that ended meanwhile.
    downs: usize,
    /// Kept fresh while the worker runs, so the shards' idle timeout does not fail the streams
    /// of a session whose commit is syncing a large file.
    activity: Option<Arc<AtomicU64>>,
}

/// What a storage worker hands back to the coordinator.
enum Stored {
    Opened { id: [u8; 16], sess: Box<RxSession>, hde: bool, r: Result<(), (ErrorCode, String)>, reply: Reply<(Welcome, SessionRef)> },
    Committed { id: [u8; 16], sess: Box<RxSession>, commit: wire::Commit, r: Result<[u8; 32], (ErrorCode, String)>, from: StreamAddr, data_wall: Duration },
}

type Job = Box<dyn FnOnce() -> Stored + Send>;

/// Threads that run the sessions' file I/O off the coordinator: preparing an output (a delta
/// round's copy of the previous round, a resume's re-check of the journaled chunks) and
/// publishing it (whole-image digest, sync, rename). Several, so that one session's large commit
/// does not hold up another's open.
struct Storage {
    jobs: Sender<Job>,
    done: Receiver<Stored>,
}

impl Storage {
    fn start(workers: usize) -> Storage {
        let (jobs, job_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done) = crossbeam_channel::unbounded();
        for k in 0..workers {
            let (job_rx, done_tx) = (job_rx.clone(), done_tx.clone());
            std::thread::Builder::new()
                .name(format!("dwcp-storage{k}"))
                .spawn(move || {
                    for job in job_rx {
                        if done_tx.send(job()).is_err() {
                            return;
                        }
                    }
                })
                .expect("spawn storage worker");
        }
        Storage { jobs, done }
    }
}

impl Coordinator {
    fn run(&mut self, rx: Receiver<ToCoord>, stop: &AtomicBool) {
        let tick = crossbeam_channel::tick(Duration::from_millis(200));
        let done = self.storage.done.clone();
        let mut swept: Option<Instant> = None;
        while !stop.load(Relaxed) {
            if swept.is_none_or(|t| t.elapsed() >= EXPIRY_SWEEP) {
                swept = Some(Instant::now());
                self.expire_partials();
            }
            select! {
                recv(rx) -> m => match m {
                    Ok(m) => self.handle(m),
                    Err(_) => return,
                },
                recv(done) -> m => match m {
                    Ok(Stored::Opened { id, sess, hde, r, reply }) => self.opened(id, *sess, hde, r, &reply),
                    Ok(Stored::Committed { id, sess, commit, r, from, data_wall }) => self.committed(id, *sess, commit, r, from, data_wall),
                    Err(_) => return,
                },
                recv(tick) -> _ => {
                    self.flush_journals();
                    let now = millis(self.epoch);
                    for a in self.busy.values().filter_map(|b| b.activity.as_ref()) {
                        a.store(now, Relaxed);
                    }
                }
            }
        }
    }

    fn handle(&mut self, m: ToCoord) {
        match m {
            ToCoord::Open { hello, peer, reply } => {
                if let Err(e) = self.open(hello, peer, &reply) {
                    let _ = reply.send(Err(e));
                }
            }
            ToCoord::Join { session, reply } => {
                let r = match self.sessions.get_mut(&session) {
                    Some(s) if !s.finished && s.streams_up >= self.limits.max_streams => {
                        Err((ErrorCode::Refused, format!("a session may have at most {} streams", self.limits.max_streams)))
                    }
                    Some(s) if !s.finished => {
                        s.streams_up += 1;
                        Ok(SessionRef { id: session, size: s.ledger.size(), out: s.out.clone(), activity: s.activity.clone(), gate: s.gate.clone() })
                    }
                    _ => Err((ErrorCode::UnknownSession, "no open session with that id".into())),
                };
                let _ = reply.send(r);
            }
            ToCoord::Placed { session, offset, len, sum } => {
                if let Some(s) = self.sessions.get_mut(&session) {
                    s.ledger.place(offset, len, sum);
                    if s.ledger.pending_journal() >= 256 * 24 {
                        s.flush_journal();
                    }
                }
            }
            ToCoord::Deliver { session, offset, data, sum, from } => self.deliver(session, offset, data, sum, from),
            ToCoord::HdeDone { session, offset, done, sum, from } => self.hde_done(session, offset, done, sum, from),
            ToCoord::HdeAgain { session, offset, from } => self.hde_again(session, offset, from),
            ToCoord::Commit { session, commit, from } => self.commit(session, commit, from),
            ToCoord::Down { session, why } => {
                if let Some(b) = self.busy.get_mut(&session) {
                    b.downs += 1;
                    if let Some(w) = &why {
                        warn!(session = %hex(&session), name = %b.name, "stream ended: {w}");
                    }
                    return;
                }
                let Some(s) = self.sessions.get_mut(&session) else { return };
                s.streams_up = s.streams_up.saturating_sub(1);
                if let Some(w) = &why {
                    warn!(session = %hex(&session), name = %s.name, "stream ended: {w}");
                }
                if s.streams_up == 0 {
                    let mut s = self.sessions.remove(&session).expect("present");
                    match s.outcome.take() {
                        Some(o) => {
                            let _ = self.outcomes.send(o);
                        }
                        None => self.interrupted(s, why.unwrap_or_else(|| "the sender closed every stream before committing".into())),
                    }
                }
            }
        }
    }

    /// Opens a session: answered here, or by a storage worker once the output is prepared.
    fn open(&mut self, hello: Hello, peer: Option<std::net::IpAddr>, reply: &Reply<(Welcome, SessionRef)>) -> Result<(), (ErrorCode, String)> {
        let Hello::Open { caps: Caps { codecs, .. }, chunk_size, object_size, object_id, resume, name, .. } = hello else {
            return Err((ErrorCode::Protocol, "expected an open".into()));
        };
        let size = (object_size != wire::SIZE_UNKNOWN).then_some(object_size);
        if let Some(d) = &self.outdir {
            d.check_name(&name).map_err(|why| (ErrorCode::Refused, format!("object name {name:?} refused: {why}")))?;
        }
        if let (Some(sz), Some(max)) = (size, self.limits.max_object_size)
            && sz > max
        {
            return Err((ErrorCode::Refused, format!("an object of {sz} bytes exceeds this receiver's --max-object-size of {max} bytes")));
        }
        if let (Some(sz), Some(d), false) = (size, &self.outdir, resume || codecs & wire::CODEC_HDE_ROUND != 0) {
            // Space promised to sessions still filling their preallocated outputs is already
            // taken from the free space, so this only checks the new object.
            if let Ok(free) = d.free_space()
                && sz > free
            {
                return Err((ErrorCode::Storage, format!("{name:?} ({sz} bytes) does not fit: {free} bytes free in {}; free space or choose another --out", d.path().display())));
            }
        }
        if self.sessions.values().any(|s| s.name == name && !s.finished) || self.busy.values().any(|b| b.name == name) {
            return Err((ErrorCode::Refused, format!("an object named {name:?} is already being received")));
        }
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).expect("OS random source");
        let activity = Arc::new(AtomicU64::new(millis(self.epoch)));
        let mut sess = RxSession {
            name: name.clone(),
            peer,
            out: Out::Discard,
            dir: None,
            fin: None,
            journal: None,
            ledger: Ledger::new(size),
            streams_up: 1,
            finished: false,
            started: Instant::now(),
            activity: activity.clone(),
            gate: Arc::default(),
            hde: None,
            qemu: None,
            out_failed: None,
            reorder: reorder::Reorder::new(REORDER_CAP),
            outcome: None,
        };
        // HDE is taken when it can be (a directory sink, whole pages, no resume); otherwise the
        // Welcome leaves its bit out and the sender sends raw chunks. A delta round cannot
        // fall back: it is refused with the reason.
        let round = codecs & wire::CODEC_HDE_ROUND != 0;
        let why_not_hde = match (&self.sink, size) {
            _ if codecs & wire::CODEC_HDE == 0 => Some(String::new()),
            (Sink::Dir(_), Some(sz)) if sz % crate::hde::PAGE as u64 == 0 && (chunk_size as usize).is_multiple_of(crate::hde::PAGE) && !resume => None,
            (Sink::Dir(_), _) if resume => Some("HDE sessions cannot resume yet".into()),
            (Sink::Dir(_), _) => Some("HDE needs a known size and chunk size of whole 4 KiB pages".into()),
            _ => Some("HDE decodes into a file, and this receiver writes a stream or discards".into()),
        };
        let hde = why_not_hde.is_none();
        if round && let Some(why) = why_not_hde {
            return Err((ErrorCode::Refused, format!("a delta round cannot be received here: {why}")));
        }
        match &self.sink {
            Sink::Discard => {}
            Sink::Stdout | Sink::Unix(_) => {
                let what = match &self.sink {
                    Sink::Unix(p) => format!("unix:{}", p.display()),
                    _ => "standard output".into(),
                };
                if resume {
                    return Err((ErrorCode::Refused, format!("this receiver writes to {what} and cannot resume")));
                }
                if self.sessions.values().any(|s| matches!(s.out, Out::Ordered) && !s.finished) {
                    return Err((ErrorCode::Refused, format!("this receiver writes to {what} and is busy with another session")));
                }
                let to = match &self.sink {
                    Sink::Unix(p) => OrderedTo::Socket(
                        std::os::unix::net::UnixStream::connect(p)
                            .map_err(|e| (ErrorCode::Storage, format!("cannot connect to {what}: {e} (start its reader first: QEMU with -incoming unix:{})", p.display())))?,
                    ),
                    _ => OrderedTo::Stdout,
                };
                self.ordered = Some(Ordered { session: id, what, to });
                sess.out = Out::Ordered;
                if codecs & wire::CODEC_QEMU != 0 {
                    let dec = crate::qemu::Decoder::new().map_err(|e| (ErrorCode::Internal, e.to_string()))?;
                    sess.qemu = Some(Box::new(dec));
                }
            }
            Sink::Dir(_) => {
                let (dir, prep) =
                    (self.outdir.clone().expect("a directory sink has its OutDir"), Prepare { jh: JournalHeader { object_size, object_id, chunk_size }, resume, round, hde });
                self.busy.insert(id, Busy { name, downs: 0, activity: None });
                let reply = reply.clone();
                let _ = self.storage.jobs.send(Box::new(move || {
                    let mut sess = Box::new(sess);
                    let t = Instant::now();
                    let r = prepare(&dir, &mut sess, &prep);
                    debug!(name = %sess.name, took_ms = t.elapsed().as_millis() as u64, "output prepared");
                    Stored::Opened { id, sess, hde, r, reply }
                }));
                return Ok(());
            }
        }
        let _ = reply.send(Ok(self.admit_session(id, sess, hde)));
        Ok(())
    }

    /// A storage worker prepared a session's output (or failed to).
    fn opened(&mut self, id: [u8; 16], sess: RxSession, hde: bool, r: Result<(), (ErrorCode, String)>, reply: &Reply<(Welcome, SessionRef)>) {
        self.busy.remove(&id);
        let _ = reply.send(r.map(|()| self.admit_session(id, sess, hde)));
    }

    /// The session is open: the Welcome the sender gets, and the handle its streams use.
    fn admit_session(&mut self, id: [u8; 16], sess: RxSession, hde: bool) -> (Welcome, SessionRef) {
        let welcome = Welcome {
            session: id,
            caps: Caps {
                max_streams: 256,
                max_chunk: 0,
                codecs: CODEC_RAW | if hde { wire::CODEC_HDE } else { 0 } | if sess.qemu.is_some() { wire::CODEC_QEMU } else { 0 },
                transports: TRANSPORT_TCP,
            },
            have: sess.ledger.have().ranges(),
        };
        let r = SessionRef { id, size: sess.ledger.size(), out: sess.out.clone(), activity: sess.activity.clone(), gate: sess.gate.clone() };
        info!(session = %hex(&id), name = %sess.name, size = ?sess.ledger.size(), resumed = sess.ledger.resumed(), "session opened");
        self.sessions.insert(id, sess);
        (welcome, r)
    }

    /// A shard decoded the chunk at `offset` into the session's output (every page was
    /// checked before it was written); what did not apply fails the session at commit.
    fn hde_done(&mut self, session: [u8; 16], offset: u64, done: HdeDone, sum: u64, from: StreamAddr) {
        let Some(s) = self.sessions.get_mut(&session) else { return };
        let Some(h) = s.hde.as_mut() else { return };
        h.pages += done.applied;
        h.note_rejected(&done.rejected);
        if h.deferred.len() + done.deferred.len() > HDE_DEFERRED_MAX {
            // Counted as rejected: the commit then fails the session with the reason.
            h.rejected_count += done.deferred.len() as u64;
            if h.rejected.len() < 8 {
                h.rejected.extend(done.deferred.iter().take(1).map(|d| (d.no, "more unresolved duplicates than a session may hold")));
            }
        } else {
            h.deferred.extend(done.deferred);
        }
        let waiting = h.waiting.remove(&offset).unwrap_or_default();
        s.ledger.place(offset, done.span, sum);
        for to in std::iter::once(from).chain(waiting) {
            let _ = self.shards[to.0].send(ToShard::Ack { key: to.1, offset });
        }
    }

    /// The chunk at `offset` arrived again: acknowledged now if its first arrival is placed,
    /// else once it is.
    fn hde_again(&mut self, session: [u8; 16], offset: u64, from: StreamAddr) {
        let Some(s) = self.sessions.get_mut(&session) else { return };
        let Some(h) = s.hde.as_mut() else { return };
        debug!(session = %hex(&session), offset, "HDE chunk arrived again; decoded from its first arrival");
        if s.ledger.placed(offset) {
            let _ = self.shards[from.0].send(ToShard::Ack { key: from.1, offset });
        } else {
            h.waiting.entry(offset).or_default().push(from);
        }
    }

    fn deliver(&mut self, session: [u8; 16], offset: u64, data: Vec<u8>, sum: u64, from: StreamAddr) {
        let Some(s) = self.sessions.get_mut(&session) else { return };
        match s.reorder.arrive(offset, data, sum, from) {
            reorder::Arrival::Stale | reorder::Arrival::AckedNow => {
                let _ = self.shards[from.0].send(ToShard::Ack { key: from.1, offset });
            }
            reorder::Arrival::AckOnWrite => {}
            reorder::Arrival::Full => {
                let msg = format!("chunk at offset {offset} is too far ahead of the next in order ({}): the reorder buffer is full", s.reorder.next());
                warn!(session = %hex(&session), name = %s.name, "{msg}");
                let _ = self.shards[from.0].send(ToShard::Reply { key: from.1, kind: FrameType::Error, payload: wire::encode_error(ErrorCode::OutOfRange, &msg) });
                s.out_failed = Some(msg);
                return;
            }
        }
        let Some(out) = self.ordered.as_mut().filter(|o| o.session == session) else {
            s.out_failed = Some("the session has no ordered output".into());
            return;
        };
        while let Some((off, reorder::Held { data: d, sum, ack })) = s.reorder.pop() {
            // A page-aware stream is rebuilt first; only verified bytes are written.
            let mut rebuilt = Vec::new();
            // A reader gone (a destination QEMU that exited) ends the session now, so the
            // sender fails at once instead of stalling on chunks nobody acknowledges.
            let mut write_now = |b: &[u8]| out.write_now(b).map_err(|e| (ErrorCode::Storage, format!("writing {}: {e} (the program reading it stopped)", out.what)));
            let written = match (&s.out_failed, s.qemu.as_deref_mut()) {
                (Some(_), _) => Ok(()),
                (None, None) => write_now(&d),
                (None, Some(dec)) => match dec.push(&d, &mut rebuilt) {
                    Ok(()) => write_now(&rebuilt),
                    Err(err) => Err((ErrorCode::DigestMismatch, format!("{err}; the destination gets nothing more"))),
                },
            };
            if let Err((code, msg)) = written {
                warn!(session = %hex(&session), name = %s.name, "{msg}");
                let to = ack.unwrap_or(from);
                let _ = self.shards[to.0].send(ToShard::Reply { key: to.1, kind: FrameType::Error, payload: wire::encode_error(code, &msg) });
                s.out_failed = Some(msg);
                return;
            }
            s.ledger.place(off, d.len() as u32, sum);
            if let Some(to) = ack {
                let _ = self.shards[to.0].send(ToShard::Ack { key: to.1, offset: off });
            }
        }
    }

    /// The sender committed: verified and published by a storage worker when there is a file to
    /// check and sync, here otherwise.
    fn commit(&mut self, session: [u8; 16], commit: wire::Commit, from: StreamAddr) {
        let Some(s) = self.sessions.get_mut(&session) else { return };
        s.activity.store(millis(self.epoch), Relaxed);
        let data_wall = s.started.elapsed();
        if s.dir.is_none() {
            let r = s.verify_and_publish(commit);
            // The stream is whole (or never will be): its reader sees the end now.
            if self.ordered.as_ref().is_some_and(|o| o.session == session) {
                self.ordered = None;
            }
            let s = self.sessions.remove(&session).expect("present");
            return self.committed(session, s, commit, r, from, data_wall);
        }
        let mut s = Box::new(self.sessions.remove(&session).expect("present"));
        s.gate.seal();
        self.busy.insert(session, Busy { name: s.name.clone(), downs: 0, activity: Some(s.activity.clone()) });
        let _ = self.storage.jobs.send(Box::new(move || {
            let t = Instant::now();
            let r = if s.gate.drain(Duration::from_secs(60)) {
                s.flush_journal();
                s.verify_and_publish(commit)
            } else {
                Err((ErrorCode::Storage, "chunk writes did not finish within 60 s of the commit: output not published".into()))
            };
            debug!(name = %s.name, took_ms = t.elapsed().as_millis() as u64, "commit verified, synced and published");
            Stored::Committed { id: session, sess: s, commit, r, from, data_wall }
        }));
    }

    /// A commit's verdict: the reply to the sender, and the outcome reported once its streams close.
    fn committed(&mut self, session: [u8; 16], mut s: RxSession, commit: wire::Commit, r: Result<[u8; 32], (ErrorCode, String)>, from: StreamAddr, data_wall: Duration) {
        let reply = |shards: &[Sender<ToShard>], kind, payload| {
            let _ = shards[from.0].send(ToShard::Reply { key: from.1, kind, payload });
        };
        let downs = self.busy.remove(&session).map_or(0, |b| b.downs);
        s.finished = true;
        match &r {
            Ok(d) => {
                reply(&self.shards, FrameType::Verified, d.to_vec());
                info!(session = %hex(&session), name = %s.name, size = commit.size, "verified and published");
            }
            Err((code, msg)) => {
                reply(&self.shards, FrameType::Error, wire::encode_error(*code, msg));
                warn!(session = %hex(&session), name = %s.name, "commit failed: {msg}");
            }
        }
        // Reported once the sender has closed its streams, i.e. after it has read the reply.
        s.outcome = Some(SessionOutcome {
            name: s.name.clone(),
            peer: s.peer,
            size: commit.size,
            received: s.ledger.received(),
            resumed: s.ledger.resumed(),
            wall: s.started.elapsed(),
            data_wall,
            path: s.fin.clone().filter(|_| r.is_ok()),
            result: r.map_err(|(_, m)| m),
        });
        s.streams_up = s.streams_up.saturating_sub(downs);
        if s.streams_up == 0 {
            // Every stream ended while the worker ran (the sender gone before the verdict).
            let _ = self.outcomes.send(s.outcome.take().expect("set above"));
        } else {
            self.sessions.insert(session, s);
        }
    }

    fn interrupted(&mut self, mut s: RxSession, why: String) {
        s.flush_journal();
        // An ordered output's reader sees the stream end (a destination QEMU fails its incoming
        // migration) rather than wait for bytes that will not come.
        if matches!(s.out, Out::Ordered) {
            self.ordered = None;
        }
        // A stream of unknown size (a pipe) cannot be resumed: its partial output only takes space.
        let keep = s.dir.is_some() && s.ledger.size().is_some() && !self.limits.keep_partial.is_zero();
        if !keep {
            s.discard_output();
        }
        let wall = s.started.elapsed();
        let msg = format!(
            "interrupted: {why}; {} of {} bytes placed{}",
            s.ledger.have().covered(),
            s.ledger.size().map_or("?".into(), |v| v.to_string()),
            if keep { ", partial output kept for --resume" } else { "" }
        );
        warn!(name = %s.name, "{msg}");
        let _ = self.outcomes.send(SessionOutcome {
            name: s.name.clone(),
            peer: s.peer,
            size: s.ledger.size().unwrap_or(0),
            received: s.ledger.received(),
            resumed: s.ledger.resumed(),
            // Interrupted: no commit came, so the data phase is all of it.
            wall,
            data_wall: wall,
            path: None,
            result: Err(msg),
        });
    }

    /// Removes partial outputs no session resumed within `keep_partial` (held names spared).
    fn expire_partials(&self) {
        let Some(d) = &self.outdir else { return };
        let live: std::collections::HashSet<String> = self.sessions.values().map(|s| s.name.as_str()).chain(self.busy.values().map(|b| b.name.as_str())).map(outdir::key).collect();
        let n = d.expire(self.limits.keep_partial, &|k| live.contains(k));
        if n > 0 {
            info!(files = n, keep_s = self.limits.keep_partial.as_secs(), "expired partial outputs nobody resumed");
        }
    }

    fn flush_journals(&mut self) {
        for s in self.sessions.values_mut() {
            s.flush_journal();
        }
    }
}

/// What preparing a directory session's output needs from its open.
struct Prepare {
    jh: JournalHeader,
    resume: bool,
    round: bool,
    hde: bool,
}

/// Prepares a session's output in `dir` (run by a storage worker): a resume's partial file with
/// its journaled chunks re-checked, a delta round's copy of the previous round, or a fresh
/// preallocated file; then the journal, and for HDE the shared mapping the shards decode into.
/// Whatever it created is removed again if it fails.
fn prepare(dir: &Arc<OutDir>, sess: &mut RxSession, p: &Prepare) -> Result<(), (ErrorCode, String)> {
    let r = prepare_files(dir, sess, p);
    if r.is_err() {
        sess.journal = None;
        sess.out = Out::Discard;
        dir.remove(&sess.name, Kind::Part);
        dir.remove(&sess.name, Kind::Journal);
    }
    r
}

fn prepare_files(dir: &Arc<OutDir>, sess: &mut RxSession, p: &Prepare) -> Result<(), (ErrorCode, String)> {
    let &Prepare { jh, resume, round, hde } = p;
    let (chunk_size, size, name) = (jh.chunk_size, sess.ledger.size(), sess.name.clone());
    let part = dir.temp_path(&name, Kind::Part);
    let jpath = dir.temp_path(&name, Kind::Journal);
    let storage = |what: &str, p: &PathBuf, e: std::io::Error| (ErrorCode::Storage, format!("{what} {}: {e}", p.display()));
    let fin = dir.final_path(&name);
    let mut file = None;
    if resume
        && let Ok(mut jf) = dir.open_existing(&name, Kind::Journal)
        && let Ok(bytes) = read_bounded(&mut jf, JOURNAL_MAX)
        && let Some((h, recs)) = parse_journal(&bytes)
        && h == jh
        && let Ok(f) = dir.open_existing(&name, Kind::Part)
    {
        // Trust nothing unverified: each journaled chunk is re-checked against the data.
        sess.ledger.restore(recs, chunk_size, |offset, len| {
            let mut buf = vec![0; len as usize];
            f.read_exact_at(&mut buf, offset).ok().map(|()| buf)
        });
        file = Some(f);
    }
    // A later round starts from the previous round's published image, which another process
    // could truncate under a mapping (SIGBUS): its bytes are copied into an anonymous file of
    // the state directory first, which nobody else can reach, and the round decodes against that.
    let mut base = None;
    let fresh = file.is_none() && !round;
    let f = match file {
        Some(f) => f,
        None => {
            let prev = if round {
                let prev = dir.open_published(&name).map_err(|e| (ErrorCode::Refused, format!("a delta round needs the previous round's {}: {e}", fin.display())))?;
                let len = prev.metadata().map_err(|e| storage("reading the previous round", &fin, e))?.len();
                if Some(len) != size {
                    return Err((ErrorCode::Refused, format!("a delta round of {} bytes against a {len}-byte {}", size.unwrap_or(0), fin.display())));
                }
                Some((prev, len))
            } else {
                None
            };
            let f = dir.create(&name, Kind::Part).map_err(|e| storage("creating", &part, e))?;
            let filled = match &prev {
                Some((prev, len)) => (|| {
                    let copy = dir.anonymous()?;
                    let n = crate::sys::copy_data(prev, &copy, *len)?;
                    if n != *len || copy.metadata()?.len() != *len {
                        return Err(std::io::Error::other(format!("the previous round changed while it was read ({n} of {len} bytes)")));
                    }
                    crate::sys::copy_data(&copy, &f, *len)?;
                    base = Some(copy);
                    Ok(())
                })()
                .map_err(|e| ("copying the previous round into", e)),
                None => size.map_or(Ok(()), |sz| crate::sys::preallocate(&f, sz)).map_err(|e| ("preallocating", e)),
            };
            if let Err((what, e)) = filled {
                return Err(storage(what, &part, e));
            }
            f
        }
    };
    // A fresh journal holding only the verified records.
    let mut jf = dir.create(&name, Kind::Journal).map_err(|e| storage("creating journal", &jpath, e))?;
    let mut bytes = jh.encode().to_vec();
    for r in sess.ledger.journal() {
        bytes.extend_from_slice(&r.encode());
    }
    jf.write_all(&bytes).map_err(|e| storage("writing journal", &jpath, e))?;
    sess.journal = Some(Journal { file: jf });
    sess.ledger.start_journal();
    if hde {
        let image = crate::sys::image::SharedImage::new(&f, chunk_size).map_err(|e| storage("mapping", &part, e))?;
        let base = match &base {
            Some(copy) => Some(crate::sys::map_readonly(copy).map_err(|e| storage("mapping the previous round", &fin, e))?),
            None => None,
        };
        let img = Arc::new(HdeImage { image, base, fresh, file: f, chunk: chunk_size, size: size.unwrap_or(0) });
        sess.out = Out::Hde(img.clone());
        sess.hde = Some(Box::new(HdeRx { img, deferred: Vec::new(), rejected: Vec::new(), rejected_count: 0, pages: 0, waiting: BTreeMap::new() }));
    } else {
        sess.out = Out::File(Arc::new(f));
    }
    sess.dir = Some(dir.clone());
    sess.fin = Some(fin);
    Ok(())
}

/// The largest resume journal read: one record per chunk of the largest object at the smallest
/// chunk, far beyond any real one (a journal of 64 KiB chunks of a 1 TiB image is 384 MiB; of
/// 1 MiB chunks, 24 MiB).
const JOURNAL_MAX: u64 = 512 << 20;

/// Reads a whole file of at most `max` bytes.
fn read_bounded(f: &mut File, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut v = Vec::new();
    f.take(max + 1).read_to_end(&mut v)?;
    if v.len() as u64 > max {
        return Err(std::io::Error::other("journal too large"));
    }
    Ok(v)
}

impl RxSession {
    /// Removes the session's partial output and journal: nothing of it can be resumed.
    fn discard_output(&mut self) {
        self.journal = None;
        if let Some(dir) = &self.dir {
            dir.remove(&self.name, Kind::Part);
            dir.remove(&self.name, Kind::Journal);
        }
    }

    fn flush_journal(&mut self) {
        let pending = self.ledger.take_journal();
        if let Some(j) = &mut self.journal
            && !pending.is_empty()
            && let Err(e) = j.file.write_all(&pending)
        {
            warn!(name = %self.name, "journal write failed ({e}); a resume will re-send more");
        }
    }

    fn verify_and_publish(&mut self, commit: wire::Commit) -> Result<[u8; 32], (ErrorCode, String)> {
        // The size first: a commit of another size is named as such, whatever else is wrong.
        self.ledger.check_size(&commit)?;
        if let Some(why) = &self.out_failed {
            return Err((ErrorCode::Storage, why.clone()));
        }
        if let Some(dec) = self.qemu.as_deref() {
            let r = dec.finish().map_err(|e| (ErrorCode::DigestMismatch, e.to_string()))?;
            info!(name = %self.name, qemu_bytes = r.output, pages = r.pages, fallback = ?r.fallback, "page-aware stream rebuilt and verified");
        }
        // Complete means every chunk was placed, and an HDE chunk is placed once its shard has
        // decoded it: no shard writes the output any more.
        let mut digest = self.ledger.verdict(&commit)?;
        if let Some(h) = self.hde.as_mut() {
            let img = h.img.clone();
            let Some(mut whole) = img.image.exclusive() else {
                return Err((ErrorCode::Internal, "HDE chunks are still being decoded at commit".into()));
            };
            let deferred = std::mem::take(&mut h.deferred);
            let r = crate::hde::Decoder::retry(&deferred, &mut MapStore(whole.bytes(), img.base.as_deref(), img.fresh));
            h.pages += r.applied;
            h.note_rejected(&r.rejected);
            if let Some(&(no, why)) = h.rejected.first() {
                return Err((
                    ErrorCode::DigestMismatch,
                    format!(
                        "{} HDE pages did not apply (first: page {no}, {why}); output not published. A delta round needs the receiver to hold exactly the previous round",
                        h.rejected_count
                    ),
                ));
            }
            let bytes = whole.bytes();
            let n = (commit.size as usize).min(bytes.len());
            digest = crate::hde::session_digest(digest, &mut |x| x.update(&bytes[..n]));
            if digest != commit.digest {
                return Err((
                    ErrorCode::DigestMismatch,
                    "the decoded image differs from the sender's (a delta round against a previous image the receiver does not hold, or a dirty log that missed changed pages?): output not published".into(),
                ));
            }
            whole.flush().map_err(|e| (ErrorCode::Storage, format!("flushing the decoded pages: {e}")))?;
        }
        if digest != commit.digest {
            self.discard_output();
            return Err((ErrorCode::DigestMismatch, "the whole-object digest does not match: output not published".into()));
        }
        let file = match &self.out {
            Out::File(f) => Some(&**f),
            Out::Hde(img) => Some(&img.file),
            _ => None,
        };
        if let (Some(f), Some(dir)) = (file, &self.dir) {
            let part = dir.temp_path(&self.name, Kind::Part);
            let storage = |what: &str, e: std::io::Error| (ErrorCode::Storage, format!("{what} {}: {e}", part.display()));
            f.set_len(commit.size).map_err(|e| storage("truncating", e))?;
            f.sync_data().map_err(|e| storage("syncing", e))?;
            dir.publish(&self.name).map_err(|e| storage("publishing", e))?;
            dir.remove(&self.name, Kind::Journal);
            self.journal = None;
        }
        Ok(digest)
    }
}

/// Lowercase hex of bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
