//! The sending side of a transfer: session setup, per-core io_uring shards that stripe chunks
//! over the streams, re-send of a dead stream's unacknowledged chunks, and the final commit.

use std::collections::VecDeque;
use std::io::Read;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::crypto::Psk;
use crate::handshake::{self, Conn, HandshakeError};
use crate::session::{RangeSet, default_streams, plan_chunks};
use crate::source::Source;
use crate::transport::uring::sys::{Completion, Payload, Returned, Ring, probe_send_zc};
use crate::wire::{self, CODEC_RAW, Caps, ErrorCode, FrameHeader, FrameType, Hello, ManifestDigest, TRANSPORT_RDMA, TRANSPORT_TCP, Welcome};

pub mod faults;
mod monitor;
#[cfg(feature = "rdma")]
mod rdma;
pub use faults::{Faults, KillStream, RdmaFault};
pub use monitor::{ControlOptions, ControlReport, FIRST_WINDOW, STARTUP_GAIN, TraceRow};
#[cfg(feature = "rdma")]
pub use rdma::RdmaOptions;

/// Zero-copy send policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Use `IORING_OP_SEND_ZC` when the kernel has it and the peer is not on loopback.
    Auto,
    /// Use it whenever the kernel has it.
    On,
    /// Never.
    Off,
}

/// HDE effort: `--compress`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Compress {
    /// Choose the zstd level (or none) that finishes soonest on the measured link.
    Auto,
    /// Zero, duplicate and XBZRLE pages only.
    Off,
    /// A fixed zstd level.
    Level(i32),
}

/// HDE options of a send: chunks travel as HDE frames of their pages.
#[derive(Debug, Clone)]
pub struct HdeSend {
    /// Effort.
    pub compress: Compress,
    /// The previous round's image: send a delta round (the receiver holds this image under the
    /// same name); pages equal to it are not sent at all.
    pub round_of: Option<Arc<memmap2::Mmap>>,
    /// A delta round's dirty log (`--dirty`): only pages in dirty units are sent, against
    /// `round_of` when it is given, else whole (the previous round is then only at the receiver).
    pub dirty: Option<Arc<crate::hde::DirtyLog>>,
    /// The path's measured bandwidth (bit/s, the probe's), the starting point of `Auto`.
    pub link_bps: f64,
}

/// Page-aware mode for a QEMU migration stream on stdin (`crate::qemu`).
#[derive(Debug, Clone, Copy)]
pub struct QemuPages {
    /// zstd level of pages and carried bytes (`None`: no zstd on pages, `--compress off`).
    pub level: Option<i32>,
    /// Bytes of old pages kept for deltas (as QEMU's XBZRLE cache).
    pub cache_bytes: u64,
}

/// What page-aware mode did.
#[derive(Debug, Clone)]
pub enum QemuOutcome {
    /// The receiver decoded the page-aware stream.
    Encoded(crate::qemu::EncodeReport),
    /// The receiver did not take it: tunnel mode, for this reason.
    Tunnel(String),
}

/// `ZeroCopy::Auto` uses SEND_ZC only on paths shorter than this (datacenter paths).
const ZC_MAX_RTT: Duration = Duration::from_millis(2);

/// Options of one send.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Receiver address.
    pub to: String,
    /// Stream count; None picks from cores and measured RTT.
    pub streams: Option<u16>,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Pre-shared key.
    pub psk: Psk,
    /// Encrypt the streams.
    pub encrypt: bool,
    /// Ask the receiver for what it already holds and send only the rest.
    pub resume: bool,
    /// Unacknowledged chunks allowed per stream.
    pub window: usize,
    /// Bound each stream's bytes queued in the kernel and not yet sent (`TCP_NOTSENT_LOWAT`).
    /// Unset, a socket buffer autotuned to several MiB holds what the window lets through; for a
    /// live producer (QEMU) that queue still waits when it stops the VM.
    pub notsent_lowat: Option<u32>,
    /// Chunks read from a pipe ahead of the streams' windows (None: streams x window). A live
    /// producer such as QEMU paces itself by how fast its pipe drains: what dwcp reads ahead
    /// waits in its queue, and is still waiting when QEMU stops the VM.
    pub read_ahead: Option<usize>,
    /// Zero-copy policy.
    pub zerocopy: ZeroCopy,
    /// A stream with no acknowledgement for this long is declared dead.
    pub idle_timeout: Duration,
    /// Cores to pin shards to (None: all).
    pub cores: Option<Vec<usize>>,
    /// Send the image HDE-encoded.
    pub hde: Option<HdeSend>,
    /// A QEMU migration stream on stdin: send it page-aware (the receiver rebuilds QEMU's bytes).
    pub qemu: Option<QemuPages>,
    /// Move chunks over RDMA when both sides have a device and the receiver grants it
    /// (plaintext only: the receiver must allow it); otherwise TCP, with the reason reported.
    #[cfg(feature = "rdma")]
    pub rdma: Option<RdmaOptions>,
    /// Path control over TCP: probes, ACP, PBA, the streams' congestion control.
    pub control: ControlOptions,
}

impl SendOptions {
    /// Defaults for sending to `to` with `psk`.
    pub fn new(to: impl Into<String>, psk: Psk) -> Self {
        Self {
            to: to.into(),
            streams: None,
            chunk_size: 1 << 20,
            psk,
            encrypt: true,
            resume: false,
            window: 32,
            read_ahead: None,
            notsent_lowat: None,
            zerocopy: ZeroCopy::Auto,
            idle_timeout: Duration::from_secs(30),
            cores: None,
            hde: None,
            qemu: None,
            #[cfg(feature = "rdma")]
            rdma: None,
            control: ControlOptions::default(),
        }
    }
}

/// Errors of a send.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SendError {
    /// Setting up a stream failed.
    #[error("stream {stream}: {source}")]
    Setup {
        /// Stream index.
        stream: u16,
        /// Cause.
        source: HandshakeError,
    },
    /// The receiver reported an error that ends the session.
    #[error("the receiver ended the session: {message} ({code:?})")]
    Receiver {
        /// Code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// Every stream died before the transfer finished.
    #[error("all {streams} streams were lost with {acked} of {total} bytes acknowledged (last: {last}); run the same command with --resume to send only what is missing")]
    AllStreamsLost {
        /// Streams used.
        streams: u16,
        /// Bytes acknowledged.
        acked: u64,
        /// Bytes in all.
        total: u64,
        /// The last stream's cause.
        last: String,
    },
    /// A request that cannot be met.
    #[error("{0}")]
    Invalid(String),
    /// The RDMA data path failed (named by the verbs status).
    #[error("RDMA: {0}")]
    Rdma(String),
    /// The caller cancelled the send ([`Progress::cancel`]); the receiver published nothing.
    #[error("cancelled with {acked} bytes acknowledged; nothing was published (send again with --resume to finish it)")]
    Cancelled {
        /// Bytes acknowledged when it ended.
        acked: u64,
    },
    /// Local I/O failure.
    #[error("{during}: {source}")]
    Io {
        /// What was being done.
        during: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

/// A send's live state, shared with the caller: counters for a progress bar, path measurements
/// for a controller, and the one control a controller turns while chunks flow.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes acknowledged by the receiver (this run).
    pub acked: AtomicU64,
    /// Bytes to send this run (0 if unknown yet).
    pub total: AtomicU64,
    /// Streams that take new chunks; the others stay connected but parked (0: all). It may change
    /// at any time: a parked stream resumes at once, a stream parked while it has chunks in
    /// flight finishes them first. Streams lost take their replacements from the parked ones.
    pub active: AtomicU16,
    /// Least smoothed RTT over the streams carrying data, microseconds (the monitor's, every
    /// control interval; 0 until measured).
    pub srtt_us: AtomicU64,
    /// Retransmitted segments summed over the streams.
    pub retrans: AtomicU64,
    /// PBA's prediction of the next interval's goodput, bit/s (0 until it has one).
    pub predicted_bps: AtomicU64,
    /// PBA's 80% interval of the next second's goodput, bit/s (`None` until it has one: a
    /// second after the startup's two): what a deadline or a time left is reckoned from.
    pub next_second_bps: Bounds,
    /// Summed over the active TCP streams and the monitor's intervals: the time they were
    /// watched (µs), and of it the time the path limited them ([`ebpf::sys::SendTime`]), not
    /// the receiver's window, a send buffer or a sender with nothing to send. Over an interval,
    /// the second's share of the first says whether its goodput measured the path. Neither
    /// moves where `TCP_INFO` cannot be read (RDMA).
    pub watched_us: AtomicU64,
    /// See `watched_us`.
    pub path_limited_us: AtomicU64,
    /// Set by the caller: the aggregate pace the streams may not exceed, bit/s (0: none). It
    /// bounds ACP's pace, or paces alone without ACP; applied at the next control interval
    /// (100 ms). The daemon's ITP sets it to share a link between jobs.
    pub rate_cap_bps: AtomicU64,
    /// Set by the caller to end the send: the streams close without a commit, so the receiver
    /// publishes nothing (it keeps what arrived for `--resume`), and the send returns
    /// [`SendError::Cancelled`].
    pub cancel: AtomicBool,
}

/// A pair of bounds, both set together (bit/s; 0 and 0: none yet).
#[derive(Debug, Default)]
pub struct Bounds(std::sync::Mutex<(u64, u64)>);

impl Bounds {
    /// Sets both.
    pub fn store(&self, lo: u64, hi: u64) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = (lo, hi);
    }
    /// Both, if set.
    pub fn load(&self) -> Option<(u64, u64)> {
        let b = *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (b.1 > 0).then_some(b)
    }
}

/// What a finished send reports.
#[derive(Debug, Clone)]
pub struct SendReport {
    /// Object name.
    pub name: String,
    /// Object size.
    pub size: u64,
    /// Payload bytes put on the wire (re-sends included).
    pub sent: u64,
    /// Bytes the receiver already held (resume).
    pub skipped: u64,
    /// Wall time from first connect to verified commit.
    pub wall: Duration,
    /// Streams used.
    pub streams: u16,
    /// The session's chunk size, and whether PBA cut it from the base for a startup-bound object.
    pub chunk_size: (u32, bool),
    /// Whether the stream count was chosen automatically.
    pub streams_auto: bool,
    /// Handshake RTT of stream 0.
    pub rtt: Duration,
    /// Streams that died during the transfer.
    pub streams_lost: u32,
    /// Chunks sent again after their stream died.
    pub resent_chunks: u64,
    /// Whole-object digest, as verified by the receiver.
    pub digest: [u8; 32],
    /// Whether the receiver verified the digest.
    pub verified: bool,
    /// Encryption on.
    pub encrypted: bool,
    /// Zero-copy sends used.
    pub send_zc: bool,
    /// Shards (pinned threads) used.
    pub shards: usize,
    /// Process CPU time spent during the transfer.
    pub cpu: Duration,
    /// `tcp` or `rdma`.
    pub transport: &'static str,
    /// Why RDMA was asked for but not used.
    pub rdma_fallback: Option<String>,
    /// RDMA queue pairs used (0 over TCP).
    pub rdma_qps: u16,
    /// HDE: image bytes covered, and the levels used (chunks per level; None = no zstd).
    pub hde: Option<HdeReport>,
    /// Why HDE was asked for but not used.
    pub hde_fallback: Option<String>,
    /// What the path monitor and controllers did (TCP only).
    pub control: Option<ControlReport>,
    /// Page-aware mode, when it was asked for.
    pub qemu: Option<QemuOutcome>,
}

/// What HDE did in a send.
#[derive(Debug, Clone, Default)]
pub struct HdeReport {
    /// Image bytes encoded (a delta round counts only the pages that differ).
    pub input: u64,
    /// Frame bytes produced.
    pub output: u64,
    /// Pages sent, by kind.
    pub pages: std::collections::BTreeMap<String, u64>,
    /// Reference pages listed by frames (moved data found elsewhere in the receiver's image).
    pub refs: u64,
    /// Chunks per effort (`off`, `zstd-1`, ...).
    pub levels: std::collections::BTreeMap<String, u64>,
    /// Encode seconds summed over shards.
    pub encode_s: f64,
}

#[derive(Debug)]
struct Chunk {
    offset: u64,
    len: u32,
    data: Option<Arc<[u8]>>,
    /// HDE: the frame the chunk was encoded to, kept until it is acknowledged. A chunk sent
    /// again after its stream dropped goes as the same frame: encoding it anew would describe
    /// its pages against what the encoder believes the receiver holds, which counts the lost
    /// frame as delivered (duplicates of pages only it carried), and would checksum differently
    /// from the copy the receiver may already have placed.
    frame: Option<Arc<Vec<u8>>>,
}

/// State shared by the shards of one send. Counters and lock-free queues only.
struct Shared {
    plan: Vec<(u64, u32)>,
    cursor: AtomicUsize,
    requeue: SegQueue<Chunk>,
    stdin: Option<crossbeam_channel::Receiver<Chunk>>,
    total_chunks: AtomicU64,
    acked_chunks: AtomicU64,
    sent_bytes: AtomicU64,
    resent: AtomicU64,
    lost: AtomicU64,
    stop: AtomicBool,
    fatal: Mutex<Option<(ErrorCode, String)>>,
    /// What page-aware mode did (set by the stdin reader).
    qemu: Mutex<Option<QemuOutcome>>,
    last_loss: Mutex<String>,
    progress: Arc<Progress>,
}

impl Shared {
    /// The send ends: a stream's fatal error, the end of the transfer, or the caller's cancel.
    fn stopped(&self) -> bool {
        self.stop.load(Relaxed) || self.progress.cancel.load(Relaxed)
    }
    fn done(&self) -> bool {
        self.acked_chunks.load(Relaxed) >= self.total_chunks.load(Relaxed)
    }
    fn next_chunk(&self) -> Option<Chunk> {
        if let Some(c) = self.requeue.pop() {
            return Some(c);
        }
        if let Some(rx) = &self.stdin {
            return rx.try_recv().ok();
        }
        let i = self.cursor.fetch_add(1, Relaxed);
        self.plan.get(i).map(|&(offset, len)| Chunk { offset, len, data: None, frame: None })
    }
}

struct TxStream {
    conn: Conn,
    unacked: VecDeque<(Chunk, Instant)>,
    sending: bool,
    reading: bool,
    alive: bool,
    last_ack: Instant,
    sent: u64,
    kill_after: Option<u64>,
}

const TAG_SEND: u64 = 0;
const TAG_RECV: u64 = 1;

struct Shard<'a> {
    ring: Ring,
    streams: Vec<TxStream>,
    shared: &'a Shared,
    source: &'a Source,
    window: usize,
    idle: Duration,
    manifest: Vec<(u64, u32, u64)>,
    stash: Option<Chunk>,
    hde: Option<HdeShard<'a>>,
}

/// A shard's HDE encoder and its effort control.
struct HdeShard<'a> {
    enc: crate::hde::Encoder,
    opts: &'a HdeSend,
    /// `--round-of`: where the index of the previous image appears once its thread built it
    /// (always filled, empty if the send stopped first); `None` once the encoder took it, or
    /// without `--round-of`.
    ref_index: Option<&'a OnceLock<Arc<crate::hde::RefIndex>>>,
    /// The effort (`--compress auto` re-chooses it), against `t0`'s clock.
    effort: crate::control::effort::Effort,
    t0: Instant,
    stats: crate::hde::EncodeStats,
    report: HdeReport,
    pages: Vec<u8>,
}

impl HdeShard<'_> {
    /// `--compress auto`: re-chooses the effort every 250 ms ([`crate::control::effort::Effort::choose`]).
    fn adapt(&mut self, sent_bytes: u64, predicted_bps: f64) {
        if self.opts.compress != Compress::Auto {
            return;
        }
        if let Some(l) = self.effort.choose(self.t0.elapsed().as_secs_f64(), sent_bytes, predicted_bps)
            && self.enc.set_level(l).is_ok()
        {
            self.effort.set(l);
        }
    }

    /// Encodes chunk `[offset, offset + len)` of `source` into a frame.
    fn encode(&mut self, source: &Source, offset: u64, len: u32) -> Vec<u8> {
        const P: usize = crate::hde::PAGE;
        let n = len as usize / P;
        let bytes: &[u8] = match source {
            Source::File { map: Some(m), .. } => &m[offset as usize..offset as usize + len as usize],
            _ => {
                self.pages.resize(len as usize, 0);
                source.fill(offset, &mut self.pages);
                &self.pages
            }
        };
        let old = self.opts.round_of.as_deref().map(|m| &m[offset as usize..offset as usize + len as usize]);
        let first = offset / P as u64;
        if let Some(ix) = self.ref_index.take() {
            self.enc.share_index(ix.wait().clone());
        }
        // The receiver of a delta round reads every reference from the previous round's image,
        // which it keeps as it was until the round is published: any of its pages will do,
        // changed in this round or not.
        let prev_all = self.opts.round_of.as_deref().map(|m| &m[..]);
        let stable = |no: u64| -> Option<&[u8]> {
            let at = usize::try_from(no).ok()?.checked_mul(P)?;
            prev_all?.get(at..at + P)
        };
        // A delta round sends only the pages its dirty log flags and that differ from the
        // previous round.
        let dirty = self.opts.dirty.as_deref();
        let pages: Vec<(u64, &[u8])> = (0..n)
            .filter(|&i| dirty.is_none_or(|d| d.is_dirty(first + i as u64)))
            .filter(|&i| old.is_none_or(|o| o[i * P..(i + 1) * P] != bytes[i * P..(i + 1) * P]))
            .map(|i| (first + i as u64, &bytes[i * P..(i + 1) * P]))
            .collect();
        let t = Instant::now();
        // Only the pages zstd works on measure a level: a chunk of mostly zeros says nothing of
        // its speed.
        let before = (self.stats.zstd_pages(), self.stats.output);
        let frame = self.enc.encode_with_refs(&pages, &|no| old.map(|o| &o[(no - first) as usize * P..(no - first + 1) as usize * P]), &stable, &mut self.stats);
        let dt = t.elapsed().as_secs_f64();
        let (di, dout) = ((self.stats.zstd_pages() - before.0) * P as u64, self.stats.output - before.1);
        self.report.encode_s += dt;
        *self.report.levels.entry(crate::control::effort::level_name(self.effort.level())).or_default() += 1;
        self.effort.observe(di, dout, dt);
        frame
    }
}

impl Shard<'_> {
    fn run(&mut self) {
        let mut done = Vec::new();
        loop {
            if self.shared.stopped() || self.shared.done() || !self.streams.iter().any(|s| s.alive) {
                break;
            }
            for i in 0..self.streams.len() {
                self.pump(i);
            }
            if let Err(e) = self.ring.submit_and_wait(Duration::from_millis(2)) {
                warn!("io_uring wait failed: {e}");
            }
            done.clear();
            self.ring.reap(&mut done);
            for c in done.drain(..) {
                self.complete(c);
            }
            let now = Instant::now();
            for i in 0..self.streams.len() {
                let s = &self.streams[i];
                if s.alive && !s.unacked.is_empty() && now.duration_since(s.last_ack) > self.idle {
                    let why = format!("no acknowledgement for {:.1}s (stalled)", self.idle.as_secs_f64());
                    self.kill(i, &why);
                }
            }
        }
        // Drain: nothing may remain in flight when the ring and the buffers go away.
        self.ring.cancel_all();
        while self.ring.in_flight() > 0 {
            let _ = self.ring.submit_and_wait(Duration::from_millis(10));
            done.clear();
            self.ring.reap(&mut done);
            for c in done.drain(..) {
                self.complete(c);
            }
        }
        if let Some(c) = self.stash.take() {
            self.shared.requeue.push(c);
        }
    }

    /// Whether stream `i` is parked by the live controller.
    fn parked(&self, i: usize) -> bool {
        let active = self.shared.progress.active.load(Relaxed);
        let lost = self.shared.lost.load(Relaxed).min(u64::from(u16::MAX)) as u16;
        active != 0 && self.streams[i].conn.codec.stream() >= active.saturating_add(lost)
    }

    fn pump(&mut self, i: usize) {
        let s = &mut self.streams[i];
        if !s.alive {
            return;
        }
        let fd = s.conn.sock.as_raw_fd();
        if !s.reading {
            s.reading = true;
            self.ring.recv_heap(fd, Vec::with_capacity(64 * 1024), (i as u64) << 1 | TAG_RECV);
        }
        let s = &self.streams[i];
        if s.sending || s.unacked.len() >= self.window || self.parked(i) {
            return;
        }
        let Some(mut chunk) = self.stash.take().or_else(|| self.shared.next_chunk()) else { return };
        let tag = (i as u64) << 1 | TAG_SEND;
        let len = chunk.len as usize;
        let s = &mut self.streams[i];
        let hl = s.conn.codec.header_wire_len();
        // Plaintext from the mapping or from a stdin chunk: header, payload and the payload's
        // tag go out in one sendmsg, with no copy.
        let direct = match (s.conn.codec.encrypted(), self.source, &chunk.data) {
            _ if self.hde.is_some() => None,
            (true, _, _) => None,
            (false, _, Some(d)) => Some(Payload::Shared(d.clone(), 0, len)),
            (false, Source::File { map: Some(m), .. }, None) => Some(Payload::Mapped(m.clone(), chunk.offset as usize, chunk.offset as usize + len)),
            (false, _, None) => None,
        };
        let sum;
        if let Some(payload) = direct {
            let h = FrameHeader::for_payload(FrameType::Chunk, s.conn.codec.stream(), chunk.offset, payload.as_slice());
            sum = h.checksum;
            let mut hdr = vec![0u8; hl];
            s.conn.codec.seal_header(&h, &mut hdr);
            if let Some(t) = s.conn.codec.payload_tag(payload.as_slice()) {
                hdr.extend_from_slice(&t);
            }
            self.ring.send_msg(fd, hdr, hl, payload, tag);
        } else {
            // Generated bytes, or encryption: build the frame in a registered buffer and seal in place.
            let Some(id) = self.ring.alloc() else {
                self.stash = Some(chunk);
                return;
            };
            // HDE: the chunk's pages become one frame, which is the payload (a chunk sent again
            // goes as the frame it was encoded to).
            let frame = match (&mut self.hde, &chunk.frame) {
                (Some(_), Some(f)) => Some(f.clone()),
                (Some(h), None) => {
                    h.adapt(self.shared.sent_bytes.load(Relaxed), self.shared.progress.predicted_bps.load(Relaxed) as f64);
                    // Kept as encoded (an Arc of the Vec, not a copy into a slice).
                    let f = Arc::new(h.encode(self.source, chunk.offset, chunk.len));
                    chunk.frame = Some(f.clone());
                    Some(f)
                }
                (None, _) => None,
            };
            let buf = self.ring.buf_mut(id);
            let plen = match (&frame, &chunk.data) {
                (Some(f), _) => {
                    buf[hl..hl + f.len()].copy_from_slice(f);
                    f.len()
                }
                (None, Some(d)) => {
                    buf[hl..hl + len].copy_from_slice(d);
                    len
                }
                (None, None) => {
                    self.source.fill(chunk.offset, &mut buf[hl..hl + len]);
                    len
                }
            };
            let h = FrameHeader::for_payload(FrameType::Chunk, s.conn.codec.stream(), chunk.offset, &buf[hl..hl + plen]);
            sum = h.checksum;
            s.conn.codec.seal_header(&h, &mut buf[..hl]);
            s.conn.codec.seal_payload(&mut buf[hl..], plen);
            let end = hl + s.conn.codec.payload_wire_len(plen as u32);
            self.ring.send_buf(fd, id, 0, end, tag);
        }
        self.manifest.push((chunk.offset, chunk.len, sum));
        s.sending = true;
        s.unacked.push_back((chunk, Instant::now()));
    }

    fn complete(&mut self, c: Completion) {
        let i = (c.tag >> 1) as usize;
        match c.returned {
            Returned::Buf(id) => self.ring.free(id),
            Returned::Heap(ref v) if c.tag & 1 == TAG_RECV => {
                self.streams[i].reading = false;
                if !self.streams[i].alive {
                    return;
                }
                if c.result <= 0 {
                    let why = if c.result == 0 { "receiver closed the stream".to_string() } else { errno_text(c.result) };
                    if !self.shared.done() {
                        self.kill(i, &why);
                    }
                    return;
                }
                self.streams[i].conn.reader.push(v);
                self.on_frames(i);
                return;
            }
            _ => {}
        }
        if c.released {
            return;
        }
        if c.tag & 1 == TAG_SEND {
            let s = &mut self.streams[i];
            s.sending = false;
            if !s.alive {
                return;
            }
            if c.result < 0 {
                let why = format!("send failed: {}", errno_text(c.result));
                self.kill(i, &why);
                return;
            }
            s.sent += c.result as u64;
            self.shared.sent_bytes.fetch_add(c.result as u64, Relaxed);
            if let Some(after) = s.kill_after
                && s.sent >= after
            {
                // Lost here rather than when its socket next fails: a stream whose last frame
                // was acknowledged before this completion arrived would otherwise end the
                // transfer without the loss ever being handled.
                s.kill_after = None;
                self.kill(i, "fault injection: the stream's socket shut down");
            }
        }
    }

    fn on_frames(&mut self, i: usize) {
        loop {
            let s = &mut self.streams[i];
            let frame = match s.conn.reader.next_frame(&mut s.conn.codec) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => {
                    let why = format!("bad frame from receiver: {e}");
                    self.kill(i, &why);
                    return;
                }
            };
            match frame.0.kind {
                FrameType::Ack => {
                    let Ok(offsets) = wire::decode_ack(&frame.1) else {
                        self.kill(i, "malformed ack");
                        return;
                    };
                    s.last_ack = Instant::now();
                    for off in offsets {
                        if let Some(pos) = s.unacked.iter().position(|(c, _)| c.offset == off) {
                            let (c, _) = s.unacked.remove(pos).expect("position is valid");
                            self.shared.acked_chunks.fetch_add(1, Relaxed);
                            self.shared.progress.acked.fetch_add(u64::from(c.len), Relaxed);
                        }
                    }
                }
                FrameType::Error => {
                    let (code, msg) = wire::decode_error(&frame.1).unwrap_or((ErrorCode::Internal, "unreadable error".into()));
                    if matches!(code, ErrorCode::Checksum | ErrorCode::Stalled | ErrorCode::Protocol) {
                        let why = format!("receiver closed the stream: {msg}");
                        self.kill(i, &why);
                    } else {
                        *self.shared.fatal.lock().expect("fatal lock") = Some((code, msg));
                        self.shared.stop.store(true, Relaxed);
                    }
                    return;
                }
                other => {
                    let why = format!("unexpected {other} frame from receiver");
                    self.kill(i, &why);
                    return;
                }
            }
        }
    }

    fn kill(&mut self, i: usize, why: &str) {
        let s = &mut self.streams[i];
        if !s.alive {
            return;
        }
        s.alive = false;
        let _ = s.conn.sock.shutdown(Shutdown::Both);
        let n = s.unacked.len();
        for (c, _) in s.unacked.drain(..) {
            self.shared.requeue.push(c);
        }
        self.shared.resent.fetch_add(n as u64, Relaxed);
        self.shared.lost.fetch_add(1, Relaxed);
        *self.shared.last_loss.lock().expect("loss lock") = format!("stream {}: {why}", s.conn.codec.stream());
        warn!(stream = s.conn.codec.stream(), "stream lost: {why}; {n} unacknowledged chunks re-queued on the other streams");
    }
}

fn errno_text(res: i32) -> String {
    std::io::Error::from_raw_os_error(-res).to_string()
}

/// How long past their three round trips the other streams may take to join.
const JOIN_GRACE: Duration = Duration::from_millis(150);
/// A path at least this long leaves late streams out (see `JOIN_GRACE`).
const LONG_PATH: Duration = Duration::from_millis(10);

/// Streams joining a session, each on its own thread from [`Joins::start`]: it connects and
/// exchanges keys, then sends its Join once stream 0 has the session id ([`Joins::finish`]),
/// unless the transfer has started without it. Dropped unfinished, the connections close before
/// their Hello.
struct Joins {
    started: Instant,
    session: Vec<crossbeam_channel::Sender<[u8; 16]>>,
    done: crossbeam_channel::Receiver<(u16, Result<Option<Conn>, SendError>)>,
    cutoff: Arc<AtomicBool>,
}

impl Joins {
    fn start(opts: &SendOptions, streams: std::ops::Range<u16>) -> Self {
        let (done_tx, done) = crossbeam_channel::unbounded();
        let cutoff = Arc::new(AtomicBool::new(false));
        let session = streams
            .map(|i| {
                let (tx, rx) = crossbeam_channel::bounded::<[u8; 16]>(1);
                let (to, psk, encrypt, idle) = (opts.to.clone(), opts.psk.clone(), opts.encrypt, opts.idle_timeout);
                let (done_tx, cutoff) = (done_tx.clone(), cutoff.clone());
                std::thread::spawn(move || {
                    let setup = |source| SendError::Setup { stream: i, source };
                    let join = || -> Result<Option<Conn>, SendError> {
                        let mut c = handshake::connect(&to, &psk, encrypt, i, idle).map_err(setup)?.0;
                        let Ok(session) = rx.recv() else { return Ok(None) };
                        if cutoff.load(Relaxed) {
                            return Ok(None);
                        }
                        c.write_frame(FrameType::Hello, 0, &Hello::Join { session, index: i }.encode()).map_err(setup)?;
                        c.expect(FrameType::Welcome, "joining the session").map_err(setup)?;
                        Ok(Some(c))
                    };
                    let _ = done_tx.send((i, join()));
                });
                tx
            })
            .collect();
        Self { started: Instant::now(), session, done, cutoff }
    }

    /// The joined streams, in index order. Every stream normally joins within three round trips
    /// of its start (TCP, the key exchange, the Join), and within one round trip of the session
    /// id (the Join) when stream 0 took longer to open the session (a receiver copying the
    /// previous round of a large image). One whose SYN or key exchange was lost waits out TCP's
    /// initial retransmission timeout (1 s). On a long path the transfer does not wait for it:
    /// streams not joined by the later of those (+ `JOIN_GRACE`) are left out. On a short path
    /// every stream joins within milliseconds unless the host is overloaded: there all are
    /// waited for (a stream count that depends on the host's load would surprise).
    fn finish(self, session: [u8; 16], rtt: Duration, idle: Duration) -> Result<Vec<Conn>, SendError> {
        for tx in &self.session {
            let _ = tx.send(session);
        }
        let deadline = join_deadline(self.started, Instant::now(), rtt, idle);
        let mut joined: Vec<(u16, Conn)> = Vec::new();
        let mut waiting = self.session.len();
        while waiting > 0 {
            let Ok((i, r)) = self.done.recv_deadline(deadline) else { break };
            waiting -= 1;
            if let Some(c) = r? {
                joined.push((i, c));
            }
        }
        self.cutoff.store(true, Relaxed);
        // A stream that joins after all is closed at once (`done` goes with `self`).
        if waiting > 0 {
            warn!(
                late = waiting,
                joined = joined.len() + 1,
                "streams not joined {} ms after they started connecting (a lost packet waits for TCP's retransmission timeout): sending without them",
                self.started.elapsed().as_millis()
            );
        }
        joined.sort_by_key(|(i, _)| *i);
        Ok(joined.into_iter().map(|(_, c)| c).collect())
    }
}

/// Joins parked streams (streams 1.. in their order) to `session`: every Join written first,
/// then the Welcomes read, so that all of them take one round trip together.
fn join_parked(mut parked: Vec<Conn>, session: [u8; 16]) -> Result<Vec<Conn>, SendError> {
    for (i, c) in parked.iter_mut().enumerate() {
        let index = i as u16 + 1;
        c.codec.set_stream(index);
        c.write_frame(FrameType::Hello, 0, &Hello::Join { session, index }.encode()).map_err(|source| SendError::Setup { stream: index, source })?;
    }
    for (i, c) in parked.iter_mut().enumerate() {
        c.expect(FrameType::Welcome, "joining the session").map_err(|source| SendError::Setup { stream: i as u16 + 1, source })?;
    }
    Ok(parked)
}

/// Until when [`Joins::finish`] waits for the joining streams, started at `started`, given the
/// session id at `now`: on a long path three round trips from their start or one from the
/// session id, whichever is later (+ `JOIN_GRACE`); on a short path the idle timeout.
fn join_deadline(started: Instant, now: Instant, rtt: Duration, idle: Duration) -> Instant {
    if rtt >= LONG_PATH { (started + rtt * 3 + JOIN_GRACE).max(now + rtt + JOIN_GRACE) } else { started + idle }
}

fn hello_open(source: &Source, opts: &SendOptions, streams: u16, rdma: bool) -> Hello {
    let transports = if rdma { TRANSPORT_TCP | TRANSPORT_RDMA } else { TRANSPORT_TCP };
    let codecs = match &opts.hde {
        None if opts.qemu.is_some() && !source.seekable() => CODEC_RAW | wire::CODEC_QEMU,
        None => CODEC_RAW,
        Some(h) if h.round_of.is_some() || h.dirty.is_some() => CODEC_RAW | wire::CODEC_HDE | wire::CODEC_HDE_ROUND,
        Some(_) => CODEC_RAW | wire::CODEC_HDE,
    };
    Hello::Open {
        caps: Caps { max_streams: 256, max_chunk: opts.chunk_size, codecs, transports },
        chunk_size: opts.chunk_size,
        streams,
        object_size: source.size().unwrap_or(wire::SIZE_UNKNOWN),
        object_id: source.object_id(),
        resume: opts.resume,
        name: source.name().to_owned(),
    }
}

/// Streams a send starts with instead of connecting them, and where they go after it.
#[derive(Debug, Default)]
pub struct Start {
    /// Stream 0, connected and its keys exchanged (what [`handshake::connect`] returned: the
    /// stream and the RTT it measured), for instance while the path was being probed, or a
    /// parked stream (its encryption must be `opts.encrypt`).
    pub stream0: Option<(Conn, Duration)>,
    /// Streams parked at the receiver (probe connections: a warm peer's) that join the session
    /// as streams 1.. instead of connecting; with any, the session has at most one more stream
    /// than these (the rest go to `keep` unused).
    pub parked: Vec<Conn>,
    /// Where the streams go after a verified session instead of being closed (to be parked
    /// again).
    pub keep: Option<crossbeam_channel::Sender<Conn>>,
}

/// Sends `source` to the receiver in `opts`, returning once the receiver has verified the digest.
pub fn send(source: Source, opts: &SendOptions, progress: Arc<Progress>) -> Result<SendReport, SendError> {
    send_with(source, opts, progress, Start::default(), Faults::default())
}

/// As [`send`], with the streams `start` gives (see [`Start`]) and the faults a test injects
/// ([`Faults::default`]: none).
pub fn send_with(source: Source, opts: &SendOptions, progress: Arc<Progress>, start: Start, faults: Faults) -> Result<SendReport, SendError> {
    let Start { stream0, mut parked, keep } = start;
    if let Some(h) = &opts.hde {
        const P: u64 = crate::hde::PAGE as u64;
        let size = source.size().unwrap_or(1);
        if !matches!(source, Source::File { map: Some(_), .. } | Source::Generated { .. }) || !size.is_multiple_of(P) {
            return Err(SendError::Invalid("--hde encodes memory images: a file or generated image whose size is a whole number of 4 KiB pages".into()));
        }
        if u64::from(opts.chunk_size) % P != 0 {
            return Err(SendError::Invalid("--hde needs a chunk size that is a whole number of 4 KiB pages".into()));
        }
        if opts.resume {
            return Err(SendError::Invalid("--hde transfers cannot resume yet: send again without --resume".into()));
        }
        if let Some(m) = &h.round_of
            && m.len() as u64 != size
        {
            return Err(SendError::Invalid(format!("--round-of image has {} bytes, this one {size}: a round is of the same image", m.len())));
        }
    }
    if opts.resume && !source.seekable() {
        return Err(SendError::Invalid("--resume needs a file or generated source: standard input cannot be read twice".into()));
    }
    if opts.chunk_size == 0 || opts.chunk_size > wire::MAX_PAYLOAD {
        return Err(SendError::Invalid(format!("chunk size must be 1..={} bytes", wire::MAX_PAYLOAD)));
    }
    wire::check_name(source.name()).map_err(|e| SendError::Invalid(e.to_string()))?;
    let t0 = Instant::now();
    // --round-of: the reference index of the previous image (moved data), built while the
    // streams connect. The encoders wait for it at their first frame (on this two-core host
    // 1.5 s for a 1 GiB corpus image; the pages the round changes go in first).
    let ref_index: Arc<OnceLock<Arc<crate::hde::RefIndex>>> = Arc::new(OnceLock::new());
    let ref_index_stop = Arc::new(AtomicBool::new(false));
    if let Some(prev) = opts.hde.as_ref().and_then(|h| h.round_of.clone()) {
        let cur = match &source {
            Source::File { map: Some(m), .. } => Some(m.clone()),
            _ => None,
        };
        // The encoders wait on the slot: it is filled however the thread ends (an empty index
        // if it stopped, failed to start or panicked: the round then only has fewer references).
        struct FillOnDrop(Arc<OnceLock<Arc<crate::hde::RefIndex>>>);
        impl Drop for FillOnDrop {
            fn drop(&mut self) {
                let _ = self.0.set(Arc::default());
            }
        }
        let (slot, stop) = (FillOnDrop(ref_index.clone()), ref_index_stop.clone());
        let spawned = std::thread::Builder::new().name("dwcp-ref-index".into()).spawn(move || {
            let t = Instant::now();
            let built = match &cur {
                Some(cur) => crate::hde::RefIndex::of_round(&prev, cur, &stop),
                None => crate::hde::RefIndex::of_image(&prev, &stop),
            };
            let built = built.unwrap_or_default();
            tracing::debug!(blocks = built.len(), took_ms = t.elapsed().as_millis() as u64, "reference index of the previous round built");
            let _ = slot.0.set(Arc::new(built));
        });
        if let Err(e) = spawned {
            // The closure, dropped unrun, filled the slot.
            warn!("no reference index for this round ({e}): its deltas find no moved data");
        }
    }
    // However the send ends, the index thread stops.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Relaxed);
        }
    }
    let _stop_index = StopOnDrop(ref_index_stop);
    let cpu0 = crate::sys::process_cpu_time();
    let core_ids = crate::placement::shard_cores(opts.cores.as_deref()).map_err(SendError::Invalid)?;
    let cores = core_ids.len();
    let setup = |stream, source| SendError::Setup { stream, source };

    // RDMA: the local queue pairs exist before the Hello asks for it; without a device (or with
    // encryption, which the RDMA path does not do) the reason is reported and TCP carries on.
    #[cfg_attr(not(feature = "rdma"), allow(unused_mut))]
    let mut rdma_fallback = None;
    #[cfg(feature = "rdma")]
    let mut rdma_local = match &opts.rdma {
        Some(_) if opts.encrypt => {
            rdma_fallback = Some("encryption is on, and the RDMA path sends plaintext (datacenter mode, --no-encrypt)".to_string());
            None
        }
        Some(ro) => {
            let nqps = if ro.qps == 0 { cores } else { usize::from(ro.qps) };
            match crate::transport::rdma::local(ro.device.as_deref(), nqps, cores, ro.poll) {
                Ok(l) => Some(l),
                Err(e) => {
                    rdma_fallback = Some(e.to_string());
                    None
                }
            }
        }
        None => None,
    };
    #[cfg(feature = "rdma")]
    let want_rdma = rdma_local.is_some();
    #[cfg(not(feature = "rdma"))]
    let want_rdma = false;
    // The streams' first window is set as they connect (TCP only; RDMA uses stream 0 alone).
    let first_window = opts.control.initial_window.filter(|_| !want_rdma).map(|b| monitor::FirstWindow::open(&opts.to, b, opts.control.startup_window));
    // With the stream count known up front (and no RDMA, which uses stream 0 alone), the other
    // streams connect and exchange keys while stream 0 opens the session: on a long path that
    // saves two round trips before the first byte (a migration's downtime does not change, its
    // total does).
    let early = match opts.streams {
        Some(n) if !want_rdma && parked.is_empty() => Some(Joins::start(opts, 1..n.max(1))),
        _ => None,
    };
    // Stream 0 opens the session and measures the RTT that sizes the stream count.
    let (mut c0, rtt) = match stream0 {
        Some(c) => c,
        None => handshake::connect(&opts.to, &opts.psk, opts.encrypt, 0, opts.idle_timeout).map_err(|e| setup(0, e))?,
    };
    // A parked stream may have been another index in its last session.
    c0.codec.set_stream(0);
    let mut streams = opts.streams.unwrap_or_else(|| default_streams(cores, rtt)).max(1);
    // Parked streams join as they are: no more streams than they make.
    if !parked.is_empty() {
        streams = streams.min(1 + parked.len() as u16);
        for c in parked.drain(usize::from(streams) - 1..) {
            if let Some(k) = &keep {
                let _ = k.send(c);
            }
        }
    }
    // PBA cuts a startup-bound object into smaller chunks, so that it reaches every active stream
    // (not with --resume: the receiver keeps its journal only for the chunk size it was written
    // with; not over RDMA, or for a QEMU stream, whose size is not known).
    let base_chunk = opts.chunk_size;
    let cut_opts;
    let opts = if opts.control.cut_chunks && !opts.resume && !want_rdma && opts.qemu.is_none() {
        let active = match progress.active.load(Relaxed) {
            0 => streams,
            a => a.min(streams),
        };
        let c = crate::control::pba::chunk_size(source.size(), active, opts.control.link_bps, rtt, opts.chunk_size);
        if c != opts.chunk_size {
            debug!(chunk = c, base = opts.chunk_size, active, "PBA cuts a startup-bound object into smaller chunks");
            cut_opts = SendOptions { chunk_size: c, ..opts.clone() };
            &cut_opts
        } else {
            opts
        }
    } else {
        opts
    };
    let hello = hello_open(&source, opts, streams, want_rdma);
    c0.write_frame(FrameType::Hello, 0, &hello.encode()).map_err(|e| setup(0, e))?;
    let (_, p) = c0.expect(FrameType::Welcome, "waiting for the receiver's welcome").map_err(|e| setup(0, e))?;
    let welcome = Welcome::decode(&p).map_err(|e| setup(0, HandshakeError::Wire { during: "reading the welcome", source: e }))?;
    info!(streams, rtt_us = rtt.as_micros() as u64, "session opened");
    #[cfg(feature = "rdma")]
    let rdma_conn = match rdma_local.take() {
        Some(l) if welcome.caps.transports & TRANSPORT_RDMA != 0 => Some(rdma::connect(&mut c0, l, opts)?),
        Some(_) => {
            rdma_fallback = Some("the receiver did not grant RDMA (no device there, plaintext not allowed, or a stdout sink)".into());
            None
        }
        None => None,
    };
    #[cfg(feature = "rdma")]
    let on_rdma = rdma_conn.is_some();
    #[cfg(feature = "rdma")]
    let rdma_qps = rdma_conn.as_ref().map_or(0, rdma::Connected::qps);
    #[cfg(not(feature = "rdma"))]
    let rdma_qps = 0;
    #[cfg(not(feature = "rdma"))]
    let on_rdma = false;
    if let Some(why) = &rdma_fallback {
        warn!("RDMA not used: {why}; sending over TCP");
    }

    // The remaining streams join in parallel (none over RDMA: stream 0 is its control channel).
    let streams = if on_rdma { 1 } else { streams };
    let mut conns: Vec<Conn> = vec![c0];
    if on_rdma {
        // Stream 0 alone: the parked ones stay parked.
        for c in parked.drain(..) {
            if let Some(k) = &keep {
                let _ = k.send(c);
            }
        }
    }
    if parked.is_empty() {
        conns.extend(early.unwrap_or_else(|| Joins::start(opts, 1..streams)).finish(welcome.session, rtt, opts.idle_timeout)?);
    } else {
        conns.extend(join_parked(parked, welcome.session)?);
    }
    let streams = conns.len() as u16;

    // Plan: what the receiver lacks.
    let mut have = RangeSet::default();
    for &(s, e) in &welcome.have {
        have.insert(s, e);
    }
    let size = source.size();
    let plan = size.map(|sz| plan_chunks(sz, opts.chunk_size, &have)).unwrap_or_default();
    let skipped = have.covered();
    let total_chunks = if size.is_some() { plan.len() as u64 } else { u64::MAX };
    let progress_total: u64 = plan.iter().map(|c| u64::from(c.1)).sum();
    progress.total.store(progress_total, Relaxed);

    let (stdin_tx, stdin_rx) = crossbeam_channel::bounded::<Chunk>(opts.read_ahead.unwrap_or(usize::from(streams) * opts.window).max(1));
    let shared = Shared {
        plan,
        cursor: AtomicUsize::new(0),
        requeue: SegQueue::new(),
        stdin: (!source.seekable()).then_some(stdin_rx),
        total_chunks: AtomicU64::new(total_chunks),
        acked_chunks: AtomicU64::new(0),
        sent_bytes: AtomicU64::new(0),
        resent: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        fatal: Mutex::new(None),
        qemu: Mutex::new(None),
        last_loss: Mutex::new(String::new()),
        progress: progress.clone(),
    };
    // On loopback the kernel copies zero-copy pages anyway (and pays for the notifications), so
    // `auto` keeps SEND_ZC for real NICs; and for short paths: pages stay pinned until they are
    // acknowledged, and on a 50 ms path that held goodput to 0.30 of the copying send's 0.88
    // (make bench-wan's rig, 1 Gbit/s).
    let loopback = conns[0].sock.peer_addr().map(|a| a.ip().is_loopback()).unwrap_or(false);
    let send_zc = !on_rdma
        && match opts.zerocopy {
            ZeroCopy::On => probe_send_zc(),
            ZeroCopy::Auto => !loopback && rtt < ZC_MAX_RTT && probe_send_zc(),
            ZeroCopy::Off => false,
        };
    // Path control (TCP only): the streams' congestion control is set before data flows.
    let mut control_socks = if on_rdma {
        None
    } else {
        let socks = conns
            .iter()
            .map(|c| c.sock.as_fd().try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| SendError::Io { during: "duplicating a stream socket for the monitor", source })?;
        let cc_error = monitor::set_cc(&socks, &opts.control);
        if let Some(b) = opts.notsent_lowat {
            for s in &socks {
                if let Err(e) = crate::sys::set_notsent_lowat(s.as_raw_fd(), b) {
                    warn!("TCP_NOTSENT_LOWAT: {e}; the kernel queues what the window allows");
                }
            }
        }
        Some((socks, cc_error))
    };
    let nshards = cores.min(usize::from(streams));
    let mut per_shard: Vec<Vec<Conn>> = (0..nshards).map(|_| Vec::new()).collect();
    for (i, c) in conns.into_iter().enumerate() {
        per_shard[i % nshards].push(c);
    }
    // HDE only if the receiver took it (its Welcome carries the bit); a delta round must be taken.
    let hde_opts = opts.hde.as_ref().filter(|_| welcome.caps.codecs & wire::CODEC_HDE != 0);
    let mut hde_fallback = None;
    if opts.hde.is_some() && hde_opts.is_none() {
        if opts.hde.as_ref().is_some_and(|h| h.round_of.is_some()) {
            return Err(SendError::Invalid("the receiver did not take the HDE delta round".into()));
        }
        hde_fallback = Some("the receiver does not decode HDE (it discards, writes to stdout, or is older)".to_string());
        warn!("HDE not used: the receiver did not take it; sending raw chunks");
    }
    // An HDE frame may exceed its chunk by its entries (raw pages, at worst).
    let hde_extra = if hde_opts.is_some() { crate::hde::frame_overhead(opts.chunk_size as usize) } else { 0 };
    if hde_extra > 0 && welcome.caps.max_chunk as usize > 0 && opts.chunk_size as usize + hde_extra > welcome.caps.max_chunk as usize {
        return Err(SendError::Invalid(format!(
            "an HDE frame of a {}-byte chunk can reach {} bytes, above the receiver's limit of {}: use a smaller --chunk-size",
            opts.chunk_size,
            opts.chunk_size as usize + hde_extra,
            welcome.caps.max_chunk
        )));
    }
    let buf_size = wire::header_wire_len(true) + opts.chunk_size as usize + hde_extra + wire::TAG_LEN;

    type ShardResult = Result<(Vec<Conn>, Vec<(u64, u32, u64)>, Option<HdeReport>), SendError>;
    #[cfg_attr(not(feature = "rdma"), allow(unused_mut))]
    let mut per_shard = per_shard;
    let mut control_report = None;
    // Page-aware mode only if the receiver took it.
    let qemu_enc = match opts.qemu {
        Some(q) if !source.seekable() && welcome.caps.codecs & wire::CODEC_QEMU != 0 => {
            Some(crate::qemu::Encoder::new(q.level, q.cache_bytes).map_err(|e| SendError::Invalid(format!("page-aware encoder: {e}")))?)
        }
        Some(_) if !source.seekable() => {
            let why = "the receiver does not rebuild page-aware streams (it does when it writes to standard output, --out -)".to_string();
            warn!("page-aware mode not used: {why}; tunnel mode");
            *shared.qemu.lock().expect("qemu lock") = Some(QemuOutcome::Tunnel(why));
            None
        }
        _ => None,
    };
    let results: Vec<ShardResult> = std::thread::scope(|sc| {
        if !source.seekable() {
            let shared = &shared;
            let chunk = opts.chunk_size as usize;
            let input = match &source {
                Source::Stream { input, .. } => input.clone(),
                _ => unreachable!("only a stream is not seekable"),
            };
            sc.spawn(move || read_stream(&input, stdin_tx, chunk, shared, qemu_enc));
        } else {
            drop(stdin_tx);
        }
        #[cfg(feature = "rdma")]
        if let Some(c) = rdma_conn {
            // Chunks go over the queue pairs; the control stream stays with this thread for
            // the Commit.
            let ro = opts.rdma.clone().unwrap_or_default();
            let r = rdma::run(c, &shared, &source, opts, &ro, faults.rdma, &core_ids);
            shared.stop.store(true, Relaxed);
            let control = per_shard.pop().unwrap_or_default();
            return vec![r.map(|m| (control, m, None))];
        }
        // The monitor watches duplicates of the sockets (a stream that dies closes only its own).
        let startup = first_window.as_ref().and_then(monitor::FirstWindow::startup);
        let ctl = control_socks.take().map(|(socks, cc_error)| {
            let shared = &shared;
            sc.spawn(move || monitor::run(socks, &opts.control, shared, cc_error, startup))
        });
        let handles: Vec<_> = per_shard
            .into_iter()
            .enumerate()
            .map(|(k, conns)| {
                let (shared, source, ref_index) = (&shared, &source, &*ref_index);
                let core = core_ids.get(k % core_ids.len().max(1)).copied();
                sc.spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    let count = (conns.len() * 2 + 2) as u16;
                    let ring = Ring::new(256, count, buf_size, send_zc).map_err(|source| SendError::Io { during: "creating an io_uring", source })?;
                    let now = Instant::now();
                    let streams = conns
                        .into_iter()
                        .map(|conn| {
                            let kill_after = faults.kill.filter(|k| k.stream == conn.codec.stream()).map(|k| k.after);
                            TxStream { conn, unacked: VecDeque::new(), sending: false, reading: false, alive: true, last_ack: now, sent: 0, kill_after }
                        })
                        .collect();
                    let hde = match hde_opts {
                        Some(h) => {
                            let mut effort = crate::control::effort::Effort::new(h.link_bps, nshards);
                            match h.compress {
                                Compress::Off => effort.set(None),
                                Compress::Level(l) => effort.set(Some(l)),
                                Compress::Auto => {}
                            }
                            let level = effort.level();
                            let mut enc = crate::hde::Encoder::new(level.unwrap_or(3), None).map_err(|source| SendError::Io { during: "creating an HDE encoder", source })?;
                            enc.set_level(level).map_err(|source| SendError::Io { during: "setting the HDE level", source })?;
                            // Frames reach the receiver in any order: only pages it held before
                            // the session (--round-of, the shared index) are references.
                            enc.stop_indexing();
                            Some(HdeShard {
                                enc,
                                opts: h,
                                ref_index: h.round_of.is_some().then_some(ref_index),
                                effort,
                                t0: Instant::now(),
                                stats: crate::hde::EncodeStats::default(),
                                report: HdeReport::default(),
                                pages: Vec::new(),
                            })
                        }
                        None => None,
                    };
                    let mut shard = Shard { ring, streams, shared, source, window: opts.window.max(1), idle: opts.idle_timeout, manifest: Vec::new(), stash: None, hde };
                    shard.run();
                    let manifest = std::mem::take(&mut shard.manifest);
                    let hde = shard.hde.take().map(|mut h| {
                        h.report.input = h.stats.input;
                        h.report.output = h.stats.output;
                        h.report.refs = h.stats.refs;
                        h.report.pages = h.stats.pages.iter().map(|(k, v)| (format!("{k:?}").to_lowercase(), *v)).collect();
                        h.report
                    });
                    let alive = shard.streams.into_iter().filter(|s| s.alive).map(|s| s.conn).collect();
                    Ok((alive, manifest, hde))
                })
            })
            .collect();
        let r = handles.into_iter().map(|h| h.join().expect("shard thread")).collect();
        shared.stop.store(true, Relaxed);
        control_report = ctl.map(|h| {
            let mut r = h.join().expect("monitor thread");
            if let Some((w, why)) = first_window.as_ref().map(monitor::FirstWindow::report) {
                (r.initial_window, r.initial_window_degraded) = (w, why);
            }
            r
        });
        r
    });

    let mut alive = Vec::new();
    let mut manifest = ManifestDigest::default();
    let mut hde_report: Option<HdeReport> = None;
    for r in results {
        let (a, m, h) = r?;
        if let Some(h) = h {
            let t = hde_report.get_or_insert_with(HdeReport::default);
            t.input += h.input;
            t.output += h.output;
            t.encode_s += h.encode_s;
            t.refs += h.refs;
            for (k, v) in h.pages {
                *t.pages.entry(k).or_default() += v;
            }
            for (k, v) in h.levels {
                *t.levels.entry(k).or_default() += v;
            }
        }
        alive.extend(a);
        for (o, l, s) in m {
            manifest.add(o, l, s);
        }
    }
    if let Some((code, message)) = shared.fatal.lock().expect("fatal lock").take() {
        return Err(SendError::Receiver { code, message });
    }
    let acked_bytes = progress.acked.load(Relaxed);
    if progress.cancel.load(Relaxed) {
        return Err(SendError::Cancelled { acked: acked_bytes + skipped });
    }
    if !shared.done() || alive.is_empty() {
        return Err(SendError::AllStreamsLost {
            streams,
            acked: acked_bytes + skipped,
            total: size.unwrap_or(acked_bytes),
            last: shared.last_loss.lock().expect("loss lock").clone(),
        });
    }
    // Chunks the receiver already had count in the digest with our own checksums of them.
    if let Some(sz) = size {
        for (off, len) in plan_chunks(sz, opts.chunk_size, &RangeSet::default()) {
            if have.contains(off, off + u64::from(len)) {
                manifest.add(off, len, source.checksum(off, len));
            }
        }
    }
    let total = size.unwrap_or(acked_bytes);
    let mut digest = manifest.finish(total).map_err(SendError::Invalid)?;
    if hde_opts.is_some() {
        // Bind the frames to the whole image the receiver must now hold.
        digest = crate::hde::session_digest(digest, &mut |h| match &source {
            Source::File { map: Some(m), .. } => h.update(m),
            _ => {
                let mut buf = vec![0u8; 1 << 20];
                let mut off = 0;
                while off < total {
                    let n = (total - off).min(buf.len() as u64) as usize;
                    source.fill(off, &mut buf[..n]);
                    h.update(&buf[..n]);
                    off += n as u64;
                }
            }
        });
    }

    let c = &mut alive[0];
    c.set_timeout(Duration::from_secs(300).max(opts.idle_timeout));
    let commit = wire::Commit { size: total, digest };
    let during = |e| SendError::Setup { stream: 0, source: e };
    c.write_frame(FrameType::Commit, 0, &commit.encode()).map_err(during)?;
    let verified = loop {
        match c.read_frame("waiting for the receiver to verify the digest") {
            Ok((h, _)) if h.kind == FrameType::Ack => continue,
            Ok((h, p)) if h.kind == FrameType::Verified => break p.get(..32) == Some(&digest[..]),
            Ok((h, _)) => return Err(during(HandshakeError::Unexpected { during: "commit", expected: FrameType::Verified, got: h.kind })),
            Err(HandshakeError::Refused { code, message }) => return Err(SendError::Receiver { code, message }),
            Err(e) => return Err(during(e)),
        }
    };
    match &keep {
        Some(k) if verified => {
            for c in alive {
                let _ = k.send(c);
            }
        }
        _ => {
            for c in &alive {
                let _ = c.sock.shutdown(Shutdown::Both);
            }
        }
    }
    Ok(SendReport {
        name: source.name().to_owned(),
        size: total,
        sent: shared.sent_bytes.load(Relaxed),
        skipped,
        wall: t0.elapsed(),
        streams,
        chunk_size: (opts.chunk_size, opts.chunk_size != base_chunk),
        streams_auto: opts.streams.is_none(),
        rtt,
        streams_lost: shared.lost.load(Relaxed) as u32,
        resent_chunks: shared.resent.load(Relaxed),
        digest,
        verified,
        encrypted: opts.encrypt,
        send_zc,
        shards: nshards,
        cpu: crate::sys::process_cpu_time().saturating_sub(cpu0),
        transport: if on_rdma { "rdma" } else { "tcp" },
        rdma_fallback,
        rdma_qps,
        hde: hde_report,
        hde_fallback,
        control: control_report,
        qemu: shared.qemu.lock().expect("qemu lock").take(),
    })
}

/// Reads an ordered stream (stdin or a Unix socket) into chunks; at end of input, fixes the chunk
/// count. With a page-aware encoder, the chunks carry its output: QEMU's bytes go through it as
/// they arrive, and a batch is closed whenever QEMU pauses, so nothing it wrote waits for more.
fn read_stream(input: &crate::source::Input, tx: crossbeam_channel::Sender<Chunk>, chunk: usize, shared: &Shared, mut enc: Option<crate::qemu::Encoder>) {
    let mut stdin: Box<dyn Read> = match input {
        crate::source::Input::Stdin => Box::new(std::io::stdin().lock()),
        crate::source::Input::Socket(s) => Box::new(&**s),
    };
    let what = input.describe();
    let mut offset = 0u64;
    let mut n = 0u64;
    let mut pending: Vec<u8> = Vec::new();
    // The encoder's input; plain stdin is read straight into the chunk.
    let mut input = if enc.is_some() { vec![0u8; 256 << 10] } else { Vec::new() };
    let mut eof = false;
    let fail = |what: String| {
        *shared.fatal.lock().expect("fatal lock") = Some((ErrorCode::Internal, what));
        shared.stop.store(true, Relaxed);
    };
    loop {
        // Fill `pending` up to a chunk, from stdin directly or through the encoder.
        while !eof && pending.len() < chunk {
            let Some(e) = enc.as_mut() else {
                // Plain stdin (nothing is ever left over between chunks): read straight into
                // a chunk's buffer, zeroed once.
                let mut buf = vec![0u8; chunk];
                let mut filled = 0;
                while filled < chunk {
                    match stdin.read(&mut buf[filled..]) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(k) => filled += k,
                        Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(err) => return fail(format!("reading {what}: {err}")),
                    }
                }
                buf.truncate(filled);
                debug_assert!(pending.is_empty());
                pending = buf;
                break;
            };
            let k = match stdin.read(&mut input) {
                Ok(k) => k,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return fail(format!("reading {what}: {err}")),
            };
            if k == 0 {
                e.finish();
                eof = true;
            } else {
                let before = e.report().fallback.is_some();
                e.push(&input[..k]);
                if let (false, Some(why)) = (before, &e.report().fallback) {
                    warn!("page-aware mode fell back to tunnel mode for the rest of the stream: {why}");
                }
                // A short read: QEMU paused (between rounds, or rate-limited).
                if k < input.len() {
                    e.flush();
                }
            }
            pending.extend(e.take());
        }
        if pending.is_empty() {
            break;
        }
        let take = pending.len().min(chunk);
        let rest = pending.split_off(take);
        let buf = std::mem::replace(&mut pending, rest);
        let filled = buf.len();
        let c = Chunk { offset, len: filled as u32, data: Some(Arc::from(buf)), frame: None };
        offset += filled as u64;
        n += 1;
        shared.progress.total.fetch_add(filled as u64, Relaxed);
        let mut c = c;
        loop {
            match tx.send_timeout(c, Duration::from_millis(50)) {
                Ok(()) => break,
                Err(crossbeam_channel::SendTimeoutError::Timeout(back)) if !shared.stopped() => c = back,
                Err(_) => return,
            }
        }
        if filled < chunk {
            break;
        }
    }
    if let Some(e) = enc {
        *shared.qemu.lock().expect("qemu lock") = Some(QemuOutcome::Encoded(e.report().clone()));
    }
    shared.total_chunks.store(n, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joining_streams_get_a_round_trip_after_the_session_id_however_late_it_comes() {
        let t0 = Instant::now();
        let (rtt, idle) = (Duration::from_millis(50), Duration::from_secs(30));
        // Stream 0 opened the session at once: three round trips from the start.
        assert_eq!(join_deadline(t0, t0 + rtt * 2, rtt, idle), t0 + rtt * 3 + JOIN_GRACE);
        // The receiver took 2 s to open it (copying the previous round): the streams, long
        // connected, still get the round trip their Join needs.
        let late = t0 + Duration::from_secs(2);
        assert_eq!(join_deadline(t0, late, rtt, idle), late + rtt + JOIN_GRACE);
        // A short path waits for every stream, up to the idle timeout.
        let short = Duration::from_micros(200);
        assert_eq!(join_deadline(t0, late, short, idle), t0 + idle);
    }
}
