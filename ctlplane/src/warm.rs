//! Warm peers: for each configured peer, streams kept authenticated and parked at its receiver
//! (probe connections between sessions), with the path measured on them, so that a job to that
//! peer opens its session on them at once: no probe, no key exchange, no connection set-up, and
//! congestion state that the warm-up burst built and idleness does not reset (BBR keeps its
//! model across idle periods). After a verified session the streams are parked again.
//!
//! One maintenance thread keeps every pool: it connects what is missing, measures the path on
//! the first stream (pings and a bulk burst, which also opens each stream's window), and sends
//! each parked stream a ping every [`KEEPALIVE`] (a stream that does not answer is dropped and
//! replaced). An idle pool costs its sockets' memory and one ping a stream each way per
//! keepalive, nothing else.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use dataplane::crypto::Psk;
use dataplane::handshake::{self, Conn, HandshakeError};
use dataplane::probe::{self, PathEstimate, ProbeOptions};
use dataplane::wire::{FrameType, Hello, ProbeMsg};
use serde_json::{Value, json};

/// How often each parked stream is pinged (the receiver closes a parked stream after its
/// `park_timeout`, 120 s by default, without a frame).
pub const KEEPALIVE: Duration = Duration::from_secs(20);
/// How often a pool short of streams (a peer down, say) tries again.
const RETRY: Duration = Duration::from_secs(5);
/// Bulk bytes per stream in the warm-up burst: enough to open a window of a
/// bandwidth-delay product on a 1 Gbit/s, 150 ms path (19 MB) in a few round trips.
const WARM_BULK: u64 = 24 << 20;

/// One peer's pool.
#[derive(Debug)]
struct Peer {
    name: String,
    /// Streams wanted.
    want: usize,
    parked: Vec<Conn>,
    /// Lent to a job.
    lent: bool,
    est: Option<(PathEstimate, Instant)>,
    last_error: Option<String>,
    /// Sessions carried on warm streams.
    jobs: u64,
}

/// Streams lent to a job, and where they go back.
#[derive(Debug)]
pub struct Lent {
    /// The peer's address (the pool's key).
    pub addr: String,
    /// Its streams, parked: the first opens the session, the others join it.
    pub conns: Vec<Conn>,
    /// The path as last measured on them.
    pub est: PathEstimate,
    /// How long ago it was measured.
    pub measured_ago: Duration,
    /// The send puts its streams here after a verified session ([`Pool::give_back`]).
    pub keep: Sender<Conn>,
    pub kept: Receiver<Conn>,
}

/// The warm pools of the configured peers.
#[derive(Debug)]
pub struct Pool {
    psk: Psk,
    peers: Mutex<BTreeMap<String, Peer>>,
    /// Wakes the maintenance thread (a pool found short).
    wake: Sender<()>,
}

fn park(c: &mut Conn) -> Result<(), HandshakeError> {
    c.write_frame(FrameType::Hello, 0, &Hello::Probe.encode())?;
    c.expect(FrameType::Welcome, "parking a warm stream").map(drop)
}

/// Whether `c` is still open at the far end: nothing is waiting on a parked stream, so readable
/// means its receiver closed it (restarted, or its park timeout passed).
fn open(c: &Conn) -> bool {
    if c.sock.set_nonblocking(true).is_err() {
        return false;
    }
    let r = c.sock.peek(&mut [0u8; 1]);
    let _ = c.sock.set_nonblocking(false);
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Pings every stream of `conns` at once and keeps those that answer (one round trip for all).
fn ping_all(conns: &mut Vec<Conn>, seq: u32) {
    let sent: Vec<bool> = conns.iter_mut().map(|c| c.write_frame(FrameType::Probe, 0, &ProbeMsg::Ping { seq }.encode(0)).is_ok()).collect();
    let mut i = 0;
    conns.retain_mut(|c| {
        let ok =
            sent[i] && matches!(c.expect(FrameType::Probe, "a warm stream's keepalive").map(|(_, p)| ProbeMsg::decode(&p)), Ok(Ok(ProbeMsg::Reply { seq: s, .. })) if s == seq);
        i += 1;
        ok
    });
}

impl Pool {
    /// Pools of `streams` streams to each `(name, addr)`; the thread that keeps them runs until
    /// the last `Arc` is dropped.
    pub fn start(psk: Psk, peers: &[(String, String)], streams: usize) -> Arc<Pool> {
        let peers = peers
            .iter()
            .map(|(name, addr)| (addr.clone(), Peer { name: name.clone(), want: streams.max(1), parked: Vec::new(), lent: false, est: None, last_error: None, jobs: 0 }))
            .collect();
        let (wake, woken) = crossbeam_channel::bounded(1);
        let pool = Arc::new(Pool { psk, peers: Mutex::new(peers), wake });
        let weak = Arc::downgrade(&pool);
        let _ = std::thread::Builder::new().name("dwcp-warm".into()).spawn(move || keep(&weak, &woken));
        pool
    }

    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, Peer>) -> R) -> R {
        f(&mut self.peers.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Lends `addr`'s parked streams to a job, if the pool has all it wants, is measured and is
    /// not lent already.
    pub fn lend(&self, addr: &str) -> Option<Lent> {
        // The job may name the peer otherwise than the config (a name, another spelling).
        let resolve = |a: &str| std::net::ToSocketAddrs::to_socket_addrs(a).ok().and_then(|mut i| i.next());
        let key = if self.knows(addr) { Some(addr.to_owned()) } else { resolve(addr).and_then(|want| self.with(|p| p.keys().find(|k| resolve(k) == Some(want)).cloned())) };
        let addr = key?;
        let addr = addr.as_str();
        self.with(|peers| {
            let p = peers.get_mut(addr)?;
            let (est, at) = p.est?;
            if p.lent {
                return None;
            }
            // Streams its receiver closed since the last keepalive are dropped here, not lent.
            let before = p.parked.len();
            p.parked.retain(open);
            if p.parked.len() < before {
                tracing::info!(peer = %p.name, closed = before - p.parked.len(), "warm streams closed by the peer; replacing them");
                let _ = self.wake.try_send(());
            }
            if p.parked.len() < p.want {
                return None;
            }
            p.lent = true;
            p.jobs += 1;
            let (keep, kept) = crossbeam_channel::unbounded();
            Some(Lent { addr: addr.to_owned(), conns: std::mem::take(&mut p.parked), est, measured_ago: at.elapsed(), keep, kept })
        })
    }

    /// Takes back what a job's send kept (its streams after a verified session), parks them
    /// again and ends the loan; streams it lost are replaced by the maintenance thread.
    pub fn give_back(&self, lent: Lent) {
        let Lent { addr, kept, keep, .. } = lent;
        drop(keep);
        let mut back: Vec<Conn> = kept.try_iter().collect();
        back.retain_mut(|c| park(c).is_ok());
        // In stream order again (they may come back in any order).
        back.sort_by_key(|c| c.codec.stream());
        self.with(|peers| {
            if let Some(p) = peers.get_mut(&addr) {
                p.parked.extend(back);
                p.lent = false;
            }
        });
    }

    /// Whether `addr` has a warm pool (ready or not).
    pub fn knows(&self, addr: &str) -> bool {
        self.with(|peers| peers.contains_key(addr))
    }

    /// Per peer: streams parked and wanted, whether lent, the path measured and when, the last
    /// error, the jobs carried (for `/status`).
    pub fn status(&self) -> Value {
        self.with(|peers| {
            Value::Array(
                peers
                    .iter()
                    .map(|(addr, p)| {
                        let mut j = json!({"name": p.name, "addr": addr, "parked": p.parked.len(), "want": p.want, "lent": p.lent, "jobs": p.jobs});
                        if let Some((e, at)) = &p.est {
                            j["rtt_ms"] = json!(e.rtt_min.as_secs_f64() * 1e3);
                            j["bw_bps"] = if e.bw_bps.is_finite() { json!(e.bw_bps) } else { Value::Null };
                            j["measured_s_ago"] = json!(at.elapsed().as_secs_f64());
                        }
                        if let Some(e) = &p.last_error {
                            j["last_error"] = json!(e);
                        }
                        j
                    })
                    .collect(),
            )
        })
    }
}

/// The maintenance loop: fill, measure and ping every pool until the pool is dropped.
fn keep(weak: &Weak<Pool>, woken: &Receiver<()>) {
    let mut seq = 0u32;
    loop {
        let Some(pool) = weak.upgrade() else { return };
        let addrs: Vec<String> = pool.with(|p| p.keys().cloned().collect());
        let mut short = false;
        for addr in addrs {
            // Work on the streams outside the lock: take them, give them back.
            let Some((mut conns, want, measured)) = pool.with(|p| {
                let peer = p.get_mut(&addr)?;
                (!peer.lent).then(|| (std::mem::take(&mut peer.parked), peer.want, peer.est.is_some()))
            }) else {
                continue;
            };
            seq = seq.wrapping_add(1);
            ping_all(&mut conns, seq);
            let mut error = None;
            let mut est = None;
            while conns.len() < want {
                let i = conns.len() as u16;
                match handshake::connect(&addr, &pool.psk, true, i, Duration::from_secs(10)).and_then(|(mut c, kx)| park(&mut c).map(|()| (c, kx))) {
                    Ok((mut c, kx)) => {
                        // Each new stream's window is opened by a burst; the first also measures.
                        let o = ProbeOptions { rtt_samples: 5, bulk_bytes: WARM_BULK, ..ProbeOptions::default() };
                        match probe::measure_on(&mut c, vec![kx], false, o) {
                            Ok(e) => {
                                if est.is_none() || !measured {
                                    est.get_or_insert(e);
                                }
                                conns.push(c);
                            }
                            Err(e) => {
                                error = Some(format!("warming a stream to {addr}: {e}"));
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        error = Some(format!("connecting a warm stream to {addr}: {e}"));
                        break;
                    }
                }
            }
            short |= conns.len() < want;
            pool.with(|p| {
                if let Some(peer) = p.get_mut(&addr) {
                    peer.parked = conns;
                    if let Some(e) = est {
                        peer.est = Some((e, Instant::now()));
                    }
                    if let Some(e) = &error {
                        tracing::warn!(peer = %peer.name, "{e}; retrying in {} s", RETRY.as_secs());
                    }
                    peer.last_error = error;
                }
            });
        }
        drop(pool);
        let _ = woken.recv_timeout(if short { RETRY } else { KEEPALIVE });
    }
}
