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
/// Bulk bytes of a warm-up burst, shared by the streams it opens (at least 4 MiB each): a few
/// bandwidth-delay products of a 1 Gbit/s, 150 ms path (19 MB).
const WARM_BULK: u64 = 64 << 20;

/// One peer's pool.
#[derive(Debug)]
struct Peer {
    name: String,
    /// Streams wanted, as configured (None: as many as a cold send would open on the path).
    want: Option<usize>,
    /// Streams wanted now (0 until the path is measured, with `want` None).
    wanted: usize,
    parked: Vec<Conn>,
    /// Lent to a job.
    lent: bool,
    /// Its streams are out for their keepalive pings (a round trip).
    pinging: bool,
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
    /// This host's cores (what a cold send's stream count depends on besides the RTT).
    cores: usize,
    peers: Mutex<BTreeMap<String, Peer>>,
    /// Signalled when a pool's streams are back from their keepalive pings.
    back: std::sync::Condvar,
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
    /// Pools of `streams` streams to each `(name, addr)` (None: as many as a cold send from
    /// `cores` cores would open on the path measured); the thread that keeps them runs until
    /// the last `Arc` is dropped.
    pub fn start(psk: Psk, peers: &[(String, String)], streams: Option<usize>, cores: usize) -> Arc<Pool> {
        let peers = peers
            .iter()
            .map(|(name, addr)| {
                (
                    addr.clone(),
                    Peer {
                        name: name.clone(),
                        want: streams.map(|n| n.max(1)),
                        wanted: streams.unwrap_or(0),
                        parked: Vec::new(),
                        lent: false,
                        pinging: false,
                        est: None,
                        last_error: None,
                        jobs: 0,
                    },
                )
            })
            .collect();
        let (wake, woken) = crossbeam_channel::bounded(1);
        let pool = Arc::new(Pool { psk, cores, peers: Mutex::new(peers), back: std::sync::Condvar::new(), wake });
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
        let addr = self.key(addr)?;
        let addr = addr.as_str();
        // Out for their keepalive pings: back within a round trip; waited for, not skipped.
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let t = Instant::now();
        while peers.get(addr).is_some_and(|p| p.pinging) && t.elapsed() < Duration::from_secs(2) {
            peers = self.back.wait_timeout(peers, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
        }
        (|| {
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
            if p.wanted == 0 || p.parked.len() < p.wanted {
                return None;
            }
            p.lent = true;
            p.jobs += 1;
            let (keep, kept) = crossbeam_channel::unbounded();
            Some(Lent { addr: addr.to_owned(), conns: std::mem::take(&mut p.parked), est, measured_ago: at.elapsed(), keep, kept })
        })()
    }

    /// Takes back what a job's send kept (its streams after a verified session), parks them
    /// again and ends the loan; streams it lost are replaced by the maintenance thread.
    pub fn give_back(&self, lent: Lent) {
        let Lent { addr, kept, keep, .. } = lent;
        drop(keep);
        let mut back: Vec<Conn> = kept.try_iter().collect();
        // Every Hello first, then the Welcomes: one round trip for all.
        let sent: Vec<bool> = back.iter_mut().map(|c| c.write_frame(FrameType::Hello, 0, &Hello::Probe.encode()).is_ok()).collect();
        let mut i = 0;
        back.retain_mut(|c| {
            let ok = sent[i] && c.expect(FrameType::Welcome, "parking a warm stream").is_ok();
            i += 1;
            ok
        });
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

    /// The pool `addr` names (as configured, or another spelling of the same address).
    pub fn key(&self, addr: &str) -> Option<String> {
        if self.knows(addr) {
            return Some(addr.to_owned());
        }
        let resolve = |a: &str| std::net::ToSocketAddrs::to_socket_addrs(a).ok().and_then(|mut i| i.next());
        let want = resolve(addr)?;
        self.with(|p| p.keys().find(|k| resolve(k) == Some(want)).cloned())
    }

    /// The path as last measured on `addr`'s streams (None: no pool, or not measured yet).
    pub fn measured(&self, addr: &str) -> Option<PathEstimate> {
        let key = self.key(addr)?;
        self.with(|p| p.get(&key).and_then(|p| p.est.map(|(e, _)| e)))
    }

    /// The bandwidth measured on the streams to `ip` (a pool configured by address), bit/s.
    pub fn bandwidth_to(&self, ip: std::net::IpAddr) -> Option<f64> {
        self.with(|peers| {
            peers.iter().find_map(|(k, p)| {
                let a: std::net::SocketAddr = k.parse().ok()?;
                (a.ip() == ip).then_some(p.est?.0.bw_bps).filter(|b| b.is_finite() && *b > 0.0)
            })
        })
    }

    /// Per peer: streams parked and wanted, whether lent, the path measured and when, the last
    /// error, the jobs carried (for `/status`).
    pub fn status(&self) -> Value {
        self.with(|peers| {
            Value::Array(
                peers
                    .iter()
                    .map(|(addr, p)| {
                        let mut j = json!({"name": p.name, "addr": addr, "parked": p.parked.len(), "want": p.wanted, "lent": p.lent, "jobs": p.jobs});
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
        let (mut short, mut sized) = (false, false);
        for addr in addrs {
            // Work on the streams outside the lock: take them, give them back.
            let Some((mut conns, want, est0)) = pool.with(|p| {
                let peer = p.get_mut(&addr)?;
                peer.pinging = !peer.lent;
                (!peer.lent).then(|| (std::mem::take(&mut peer.parked), peer.want, peer.est.map(|e| e.0)))
            }) else {
                continue;
            };
            seq = seq.wrapping_add(1);
            ping_all(&mut conns, seq);
            // Back at once: a job may take them while new ones connect and warm up.
            let kept = conns.len();
            pool.with(|p| {
                if let Some(peer) = p.get_mut(&addr) {
                    peer.parked = std::mem::take(&mut conns);
                    peer.pinging = false;
                }
            });
            pool.back.notify_all();
            // Until the path is measured, one stream (which measures it); then as many as a
            // cold send would open on that path, unless the config fixed the count.
            let want = match (want, est0) {
                (Some(n), _) => n,
                (None, None) => 1,
                (None, Some(e)) => usize::from(dataplane::session::default_streams(pool.cores, e.rtt_min)),
            };
            let (fresh, mut error) = connect_parked(&pool, &addr, kept, want.saturating_sub(kept));
            // The new streams' windows are opened together, as a job will use them: each
            // stream's congestion state learns its share of the path, not the whole of it.
            let bulk = (WARM_BULK / fresh.len().max(1) as u64).max(4 << 20);
            let o = ProbeOptions { rtt_samples: 5, bulk_bytes: bulk, ..ProbeOptions::default() };
            let warmed: Vec<(Conn, Result<PathEstimate, HandshakeError>)> = std::thread::scope(|sc| {
                let hs: Vec<_> = fresh
                    .into_iter()
                    .map(|(mut c, kx)| {
                        sc.spawn(move || {
                            let r = probe::measure_on(&mut c, vec![kx], false, o);
                            (c, r)
                        })
                    })
                    .collect();
                hs.into_iter().filter_map(|h| h.join().ok()).collect()
            });
            let mut est: Option<PathEstimate> = None;
            for (c, r) in warmed {
                match r {
                    Ok(e) => {
                        // The path's rate is what the streams carried together.
                        est = Some(match est {
                            None => e,
                            Some(mut t) => {
                                t.bw_bps = if t.bw_bps.is_finite() && e.bw_bps.is_finite() { t.bw_bps + e.bw_bps } else { t.bw_bps.max(e.bw_bps) };
                                t.rtt_min = t.rtt_min.min(e.rtt_min);
                                t
                            }
                        });
                        conns.push(c);
                    }
                    Err(e) => error = Some(format!("warming a stream to {addr}: {e}")),
                }
            }
            // Sized from the first measurement: filled up at once.
            sized |= est0.is_none() && est.is_some();
            short |= kept + conns.len() < want;
            pool.with(|p| {
                if let Some(peer) = p.get_mut(&addr) {
                    peer.parked.extend(conns);
                    peer.wanted = if peer.want.is_some() || est0.is_some() { want } else { 0 };
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
        let _ = woken.recv_timeout(if sized {
            Duration::ZERO
        } else if short {
            RETRY
        } else {
            KEEPALIVE
        });
    }
}

/// Connects `n` streams to `addr` at once (indexes from `first`) and parks them; those that
/// made it with their key exchange's round trip, and the first error.
fn connect_parked(pool: &Pool, addr: &str, first: usize, n: usize) -> (Vec<(Conn, Duration)>, Option<String>) {
    let results: Vec<Result<(Conn, Duration), HandshakeError>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..n)
            .map(|k| {
                let psk = &pool.psk;
                sc.spawn(move || handshake::connect(addr, psk, true, (first + k) as u16, Duration::from_secs(10)).and_then(|(mut c, kx)| park(&mut c).map(|()| (c, kx))))
            })
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let mut error = None;
    let mut ok = Vec::new();
    for r in results {
        match r {
            Ok(ck) => ok.push(ck),
            Err(e) => error = error.or(Some(format!("connecting a warm stream to {addr}: {e}"))),
        }
    }
    (ok, error)
}
