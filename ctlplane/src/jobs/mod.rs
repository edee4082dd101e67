//! Transfers the daemon runs for local callers, through the same engine as `dwcp send`. They
//! are asked for on a Unix socket (`api.socket`, created mode 0600: whoever may open it may
//! make this host send): `POST /transfers` with an engine [`Request`] as JSON starts one,
//! `GET /transfers` lists them, `GET /transfers/ID` shows one (its plan, bytes acknowledged,
//! and at the end its result), `GET /transfers/ID/events` follows one as a stream of events
//! (one JSON object a line: its state when it changes, its progress every [`EVENT_EVERY`], the
//! end), `DELETE /transfers/ID` cancels one (nothing is published).
//! A request with `migrate` (`{"qmp": PATH, "vm": NAME, "to_node": N}`) is a live migration of
//! that QEMU ([`crate::engine::migrate`]): its stream goes through the same engine, on the
//! peer's warm streams, with the VM's ownership handed over in the fleet once the destination
//! verified all of it; its JSON shows QEMU's figures as they move (`qemu`).
//! At most [`MAX_RUNNING`] run at once; the latest [`KEEP`] are remembered. A transfer whose
//! request names no cores is placed by ITP ([`crate::itp::place`]): next to the NIC its peer is
//! routed through, on the cores the running transfers use least; its placement and the reason
//! are part of its JSON. Each transfer in flight is recorded in `api.jobs_dir`
//! ([`records`]): a daemon restarted mid-transfer resumes the ones that can resume (the
//! receiver keeps what it got) and ends the others failed, with the reason; either way nothing
//! is half-published.

pub mod records;

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dataplane::crypto::Psk;
use dataplane::send::Progress;
use serde_json::{Value, json};

use crate::engine::{self, Host, Request};
use crate::host::NumaNode;
use crate::itp::{self, Placement};
use crate::mode::Thresholds;
use records::{Record, Records};

/// Transfers running at once; a request beyond gets 503 with the reason.
pub const MAX_RUNNING: usize = 16;
/// Finished transfers remembered.
pub const KEEP: usize = 100;
/// Largest request body, bytes.
const MAX_BODY: u64 = 64 << 10;
/// Event streams open at once (each holds a thread while its transfer runs).
pub const MAX_WATCHERS: usize = 64;
/// How often an event stream reports a running transfer's progress.
pub const EVENT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Where a transfer is.
#[derive(Debug, Clone)]
enum Phase {
    /// Probing and planning.
    Starting,
    /// Moving bytes.
    Running { plan: Value, progress: Arc<Progress> },
    /// Ended: verified, failed or cancelled, with the outcome's JSON or the error, the bytes
    /// acknowledged of how many, and when (seconds after submission).
    Ended { state: &'static str, result: Value, acked: u64, total: u64, at_s: f64 },
}

#[derive(Debug)]
struct Job {
    id: u64,
    name: String,
    to: String,
    started: Instant,
    phase: Phase,
    cancel: Arc<std::sync::atomic::AtomicBool>,
    /// Where ITP put it (None: its request named the cores).
    placement: Option<Placement>,
    /// The cores its shards hold, counted in the book's load until it ends.
    held: Vec<usize>,
    /// Seconds after submission by which it should be verified.
    deadline_s: Option<f64>,
    /// The peer's address (the link it shares with the jobs to the same peer).
    peer: Option<std::net::IpAddr>,
    /// What ITP's sharing last set for it.
    share: Option<itp::Cap>,
    /// Bytes acknowledged at the last sharing tick.
    tick_acked: u64,
    /// Times a restarted daemon took it up again.
    restarts: u32,
    /// Whether it runs on a warm peer's streams, and why (not).
    warm: Option<String>,
    /// A migration: QEMU's latest figures (status, round, bytes sent and remaining).
    qemu: Option<Value>,
}

impl Job {
    fn json(&self) -> Value {
        let elapsed = match &self.phase {
            Phase::Ended { at_s, .. } => *at_s,
            _ => self.started.elapsed().as_secs_f64(),
        };
        let mut j = json!({"id": self.id, "name": self.name, "to": self.to, "elapsed_s": elapsed});
        if self.restarts > 0 {
            j["restarts"] = self.restarts.into();
        }
        if let Some(w) = &self.warm {
            j["warm"] = w.as_str().into();
        }
        if let Some(q) = &self.qemu {
            j["kind"] = "migration".into();
            j["qemu"] = q.clone();
        }
        if let Some(p) = &self.placement {
            j["placement"] = serde_json::to_value(p).unwrap_or_default();
        }
        match &self.phase {
            Phase::Starting => j["state"] = "starting".into(),
            Phase::Running { plan, progress } => {
                let (acked, total) = (progress.acked.load(Relaxed), progress.total.load(Relaxed));
                let bounds = progress.next_second_bps.load();
                j["state"] = "running".into();
                j["plan"] = plan.clone();
                j["acked_bytes"] = acked.into();
                j["total_bytes"] = total.into();
                if let Some((lo, hi)) = bounds {
                    j["next_second_bps"] = json!([lo, hi]);
                }
                if let Some(c) = &self.share {
                    j["share"] = json!(c);
                }
                if let Some(due) = self.deadline_s {
                    let remaining = (total > 0).then(|| total.saturating_sub(acked));
                    j["deadline"] = json!(itp::deadline(due, self.started.elapsed().as_secs_f64(), remaining, bounds));
                }
            }
            Phase::Ended { state, result, at_s, .. } => {
                j["state"] = (*state).into();
                j["result"] = result.clone();
                if let Some(due) = self.deadline_s {
                    j["deadline"] = json!(itp::deadline_ended(due, *at_s, *state == "verified"));
                }
            }
        }
        j
    }

    /// Its state, and bytes acknowledged of how many.
    fn bytes(&self) -> (&'static str, u64, u64) {
        match &self.phase {
            Phase::Starting => ("starting", 0, 0),
            Phase::Running { progress, .. } => ("running", progress.acked.load(Relaxed), progress.total.load(Relaxed)),
            Phase::Ended { state, acked, total, .. } => (state, *acked, *total),
        }
    }
}

/// The transfers remembered, the shards the running ones hold per core, and per link what its
/// jobs carried lately.
#[derive(Debug, Default)]
struct Book {
    next: u64,
    list: VecDeque<Job>,
    load: BTreeMap<usize, usize>,
    links: BTreeMap<std::net::IpAddr, Link>,
    /// Per warm peer, the jobs that asked for its streams together.
    draws: BTreeMap<String, Draw>,
}

/// Jobs to one warm peer that asked for its streams within one window ([`Jobs::draw_warm`]):
/// the most urgent gets them.
#[derive(Debug)]
struct Draw {
    opened: Instant,
    window: std::time::Duration,
    /// Each entrant's id and when it is due (None: no deadline).
    entrants: Vec<(u64, Option<Instant>)>,
    winner: Option<u64>,
}

/// How long a job waits for others to draw a warm peer's streams with it: the path's round trip,
/// within these bounds (on a short path, requests sent together arrive a few hundred
/// microseconds apart on a busy host).
const MIN_DRAW: std::time::Duration = std::time::Duration::from_millis(5);
const MAX_DRAW: std::time::Duration = std::time::Duration::from_millis(100);

impl Draw {
    /// The earliest deadline; a job without one after every job with one; then the first id.
    fn most_urgent(&self) -> Option<u64> {
        self.entrants.iter().min_by_key(|(id, due)| (due.is_none(), *due, *id)).map(|(id, _)| *id)
    }
}

/// A link's measurements for sharing it: bits its jobs carried per tick, over [`CAPACITY_WINDOW`].
#[derive(Debug, Default)]
struct Link {
    ticks: VecDeque<(Instant, f64)>,
    /// One-second rates measured, over the window, with their time.
    rates: VecDeque<(Instant, f64)>,
}

/// How often the links are shared anew.
const TICK: std::time::Duration = std::time::Duration::from_millis(250);
/// A link's capacity is the most its jobs carried in one second over this window.
const CAPACITY_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

impl Link {
    /// Records `bits` carried in the tick ending `now`; the capacity (the most carried in one
    /// second over the window), once half a second is measured.
    fn record(&mut self, now: Instant, bits: f64) -> Option<f64> {
        self.ticks.push_back((now, bits));
        while self.ticks.front().is_some_and(|(t, _)| now.duration_since(*t) > std::time::Duration::from_secs(1)) {
            self.ticks.pop_front();
        }
        let span = self.ticks.front().map_or(0.0, |(t, _)| now.duration_since(*t).as_secs_f64()) + TICK.as_secs_f64();
        // Half a second measured is enough to start sharing: a deadline job is favoured from
        // the start (the capacity is low then, so the others are held to their floor) rather
        // than after a second in which everything shares equally.
        if span >= 0.5 {
            let rate = self.ticks.iter().map(|(_, b)| b).sum::<f64>() / span;
            self.rates.push_back((now, rate));
        }
        while self.rates.front().is_some_and(|(t, _)| now.duration_since(*t) > CAPACITY_WINDOW) {
            self.rates.pop_front();
        }
        self.rates.iter().map(|(_, r)| *r).reduce(f64::max)
    }
}

impl Book {
    fn job(&mut self, id: u64) -> Option<&mut Job> {
        self.list.iter_mut().find(|j| j.id == id)
    }

    /// Job `id` (placed) holds the first `shards` of its cores in the load, instead of what it
    /// held before.
    fn hold(&mut self, id: u64, shards: usize) {
        let Some(j) = self.list.iter_mut().find(|j| j.id == id) else { return };
        let Some(p) = &j.placement else { return };
        let now: Vec<usize> = p.cores.iter().copied().take(shards.max(1)).collect();
        for c in &now {
            *self.load.entry(*c).or_default() += 1;
        }
        let before = std::mem::replace(&mut j.held, now);
        release(&mut self.load, &before);
    }
}

/// The daemon's transfers.
#[derive(Debug)]
pub struct Jobs {
    psk: Psk,
    host: Host,
    /// The host's NUMA nodes (hwloc, at boot), for placement.
    nodes: Vec<NumaNode>,
    thresholds: Thresholds,
    defaults: crate::config::TransferDefaults,
    /// Where the jobs in flight are recorded (none: they end with the daemon).
    records: Option<Records>,
    /// The configured peers' warm streams.
    pool: Option<Arc<crate::warm::Pool>>,
    /// The site's Raft group and the fleet's gossip, whose endpoints this socket also serves.
    fleet: std::sync::OnceLock<FleetParts>,
    book: Mutex<Book>,
}

/// A reply: status code and JSON body.
type Reply = (u16, Value);

/// The Raft group and the gossip a daemon takes part in (either may be absent).
type FleetParts = (Option<Arc<crate::fleet::Fleet>>, Option<Arc<crate::gossip::Handle>>);

fn error(code: u16, msg: impl Into<String>) -> Reply {
    (code, json!({"error": msg.into()}))
}

impl Jobs {
    /// Transfers sent with `psk` from `host` (whose NUMA nodes are `nodes`), planned with
    /// `thresholds`, what a request leaves unset filled from `defaults` (the config's `[transfer]`).
    /// A thread shares each link between its jobs every [`TICK`] until the last `Arc` is dropped.
    /// With `records`, each job in flight is recorded there, and ids go on from the last one
    /// recorded.
    /// A job to a peer of `pool` runs on its warm streams when they are free.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        psk: Psk,
        host: Host,
        nodes: Vec<NumaNode>,
        thresholds: Thresholds,
        defaults: crate::config::TransferDefaults,
        records: Option<Records>,
        pool: Option<Arc<crate::warm::Pool>>,
    ) -> Arc<Self> {
        let book = Book { next: records.as_ref().map_or(0, Records::last_id), ..Book::default() };
        let me = Arc::new(Self { psk, host, nodes, thresholds, defaults, records, pool, fleet: std::sync::OnceLock::new(), book: Mutex::new(book) });
        let weak = Arc::downgrade(&me);
        let _ = std::thread::Builder::new().name("dwcp-share".into()).spawn(move || {
            while let Some(jobs) = weak.upgrade() {
                jobs.share(Instant::now());
                drop(jobs);
                std::thread::sleep(TICK);
            }
        });
        me
    }

    /// One sharing tick: per link (the jobs to one peer), what its jobs carried since the last
    /// tick, its capacity (the most carried in a second lately), and [`itp::share`]'s caps set
    /// on the jobs' streams. A link with no deadline on it is left uncapped.
    fn share(&self, now: Instant) {
        self.with(|b| {
            let mut by_link: BTreeMap<std::net::IpAddr, Vec<(itp::LinkJob, Arc<Progress>)>> = BTreeMap::new();
            let mut carried: BTreeMap<std::net::IpAddr, f64> = BTreeMap::new();
            for j in b.list.iter_mut() {
                let (Phase::Running { progress, .. }, Some(ip)) = (&j.phase, j.peer) else { continue };
                let (acked, total) = (progress.acked.load(Relaxed), progress.total.load(Relaxed));
                *carried.entry(ip).or_default() += acked.saturating_sub(j.tick_acked) as f64 * 8.0;
                j.tick_acked = acked;
                let due_in_s = j.deadline_s.map(|d| d - j.started.elapsed().as_secs_f64());
                by_link.entry(ip).or_default().push((itp::LinkJob { id: j.id, remaining: total.saturating_sub(acked), due_in_s }, progress.clone()));
            }
            b.links.retain(|ip, _| by_link.contains_key(ip));
            for (ip, jobs) in by_link {
                // Until the jobs' own rates measure it, a warm peer's link is what its streams
                // measured (so a deadline is favoured from the first tick).
                let capacity = b.links.entry(ip).or_default().record(now, carried.get(&ip).copied().unwrap_or(0.0)).or_else(|| self.pool.as_ref().and_then(|p| p.bandwidth_to(ip)));
                let any_deadline = jobs.iter().any(|(j, _)| j.due_in_s.is_some());
                let caps = match capacity {
                    Some(c) if any_deadline && c > 0.0 => itp::share(&jobs.iter().map(|(j, _)| *j).collect::<Vec<_>>(), c),
                    _ => jobs.iter().map(|(j, _)| itp::Cap { id: j.id, cap_bps: None, why: "shares the link (no deadline on it, or its rate not measured yet)".into() }).collect(),
                };
                for ((_, progress), cap) in jobs.iter().zip(caps) {
                    progress.rate_cap_bps.store(cap.cap_bps.map_or(0, |c| c as u64), Relaxed);
                    if let Some(j) = b.job(cap.id) {
                        j.share = Some(cap);
                    }
                }
            }
        });
    }

    fn with<R>(&self, f: impl FnOnce(&mut Book) -> R) -> R {
        f(&mut self.book.lock().expect("jobs lock"))
    }

    /// Starts a transfer for `body` (a JSON [`Request`]).
    pub fn submit(self: &Arc<Self>, body: &[u8]) -> Reply {
        let req: Request = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return error(400, format!("not a transfer request: {e}")),
        };
        if let Err(e) = req.check_detached("the daemon") {
            return error(400, e.to_string());
        }
        let Some(id) = self.admit(None, &req, Instant::now(), 0) else {
            return error(503, format!("{MAX_RUNNING} transfers are running; try again when one ends"));
        };
        if let Some(rs) = &self.records {
            let r = Record { id, request: req.clone(), submitted_ms: records::now_ms(), chunk_size: None, restarts: 0 };
            // Synced once the job runs (its record is updated with the plan's chunk size).
            if let Err(e) = rs.write(&r, false) {
                let msg = format!("recording the transfer in {}: {e} (free space there or set api.jobs_dir)", rs.dir().display());
                self.end(id, "failed", json!({ "error": msg }));
                return error(500, msg);
            }
        }
        self.spawn(id, req);
        (202, json!({"id": id, "href": format!("/transfers/{id}")}))
    }

    /// Books a job for `req` (id `id`, or the next), started at `started`: its id, or `None`
    /// when [`MAX_RUNNING`] run already.
    fn admit(&self, id: Option<u64>, req: &Request, started: Instant, restarts: u32) -> Option<u64> {
        self.with(|b| {
            let running = b.list.iter().filter(|j| !matches!(j.phase, Phase::Ended { .. })).count();
            if running >= MAX_RUNNING {
                return None;
            }
            let id = id.unwrap_or_else(|| b.next + 1);
            b.next = b.next.max(id);
            let job = Job {
                id,
                name: req.name.clone().unwrap_or_default(),
                to: req.to.clone(),
                started,
                phase: Phase::Starting,
                cancel: Arc::default(),
                placement: None,
                held: Vec::new(),
                deadline_s: req.deadline_s,
                peer: None,
                share: None,
                tick_acked: 0,
                restarts,
                warm: None,
                qemu: req.migrate.as_ref().map(|m| json!({ "qmp": m.qmp, "vm": m.vm, "status": "starting" })),
            };
            b.list.push_back(job);
            while b.list.len() > KEEP {
                match b.list.iter().position(|j| matches!(j.phase, Phase::Ended { .. })) {
                    Some(i) => drop(b.list.remove(i)),
                    None => break,
                }
            }
            Some(id)
        })
    }

    /// Runs booked job `id` on its own thread.
    fn spawn(self: &Arc<Self>, id: u64, req: Request) {
        let cancel = self.with(|b| b.job(id).map(|j| j.cancel.clone())).unwrap_or_default();
        let me = self.clone();
        let spawned = std::thread::Builder::new().name(format!("dwcp-job-{id}")).spawn(move || me.run(id, req, cancel));
        if let Err(e) = spawned {
            self.end(id, "failed", json!({"error": format!("starting its thread: {e}")}));
        }
    }

    /// Takes up the jobs a previous daemon left recorded (it stopped or crashed while they ran):
    /// one that can resume is sent again with `resume` (the receiver keeps what it got, so only
    /// the rest moves), under its id and counting its deadline from its first submission; any
    /// other ends failed with the reason. Nothing a previous run sent is published unverified
    /// either way: the receiver publishes only after the whole object's digest matches.
    pub fn recover(self: &Arc<Self>) {
        let Some(rs) = &self.records else { return };
        let (found, bad) = rs.load();
        for b in bad {
            tracing::warn!("job record not taken up: {b}");
        }
        for r in found {
            let mut req = r.request.clone();
            let age = std::time::Duration::from_millis(records::now_ms().saturating_sub(r.submitted_ms));
            let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            let restarts = r.restarts + 1;
            let why_not = resumable(&req).err();
            let Some(id) = self.admit(Some(r.id), &req, started, restarts) else {
                tracing::warn!(id = r.id, "job record not taken up: {MAX_RUNNING} transfers are running");
                continue;
            };
            if let Some(why) = why_not {
                let msg = format!("the daemon restarted while it ran, and {why}: nothing of it was published; submit it again");
                tracing::warn!(id, "{msg}");
                self.end(id, "failed", json!({ "error": msg }));
                continue;
            }
            req.resume = true;
            req.chunk_size = r.chunk_size.or(req.chunk_size);
            if let Err(e) = rs.write(&Record { request: req.clone(), restarts, ..r }, true) {
                tracing::warn!(id, "updating its record: {e}");
            }
            tracing::info!(id, name = %req.name.as_deref().unwrap_or(""), restarts, "taking up a transfer a previous daemon left: resuming it");
            self.spawn(id, req);
        }
    }

    /// Tells `tx` of every job recorded here from now on (the fleet's replicated record).
    pub fn mirror_to(&self, tx: crossbeam_channel::Sender<records::Mirror>) {
        if let Some(rs) = &self.records {
            rs.mirror_to(tx);
        }
    }

    /// Takes over `r`, a job another node of the fleet ran until it was presumed gone: resumed
    /// here under a new id (the receiver keeps what it got, so only the rest moves, and publishes
    /// only the whole verified object), or refused with why (it cannot resume, or its source is
    /// not readable here).
    pub fn adopt(self: &Arc<Self>, r: &Record) -> Result<u64, String> {
        let mut req = r.request.clone();
        resumable(&req)?;
        if !req.source.starts_with("gen:") {
            std::fs::metadata(&req.source).map_err(|e| format!("its source {} is not readable on this node: {e}", req.source))?;
        }
        req.resume = true;
        req.chunk_size = r.chunk_size.or(req.chunk_size);
        let age = std::time::Duration::from_millis(records::now_ms().saturating_sub(r.submitted_ms));
        let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let id = self.admit(None, &req, started, r.restarts + 1).ok_or_else(|| format!("{MAX_RUNNING} transfers are running here"))?;
        if let Some(rs) = &self.records
            && let Err(e) = rs.write(&Record { id, request: req.clone(), submitted_ms: r.submitted_ms, chunk_size: req.chunk_size, restarts: r.restarts + 1 }, true)
        {
            tracing::warn!(id, "recording an adopted job: {e}");
        }
        tracing::info!(id, name = %req.name.as_deref().unwrap_or(""), "took over a job of a node presumed gone: resuming it");
        self.spawn(id, req);
        Ok(id)
    }

    fn end(&self, id: u64, state: &'static str, result: Value) {
        if let Some(rs) = &self.records {
            let outcome = match result["error"].as_str() {
                Some(e) => format!("{state}: {e}"),
                None => state.to_owned(),
            };
            rs.remove(id, &outcome);
        }
        self.with(|b| {
            let Some(j) = b.job(id) else { return };
            let (_, acked, total) = j.bytes();
            j.phase = Phase::Ended { state, result, acked, total, at_s: j.started.elapsed().as_secs_f64() };
            let held = std::mem::take(&mut j.held);
            release(&mut b.load, &held);
        });
    }

    /// Takes back the warm streams a job borrowed (after it ended for its caller: parking them
    /// again takes a round trip).
    fn give_back(&self, lent: Option<crate::warm::Lent>) {
        if let (Some(p), Some(l)) = (&self.pool, lent) {
            p.give_back(l);
        }
    }

    /// The warm streams to `to` for job `id` (due at `due`), or why not. Jobs to one peer that
    /// ask within one window (the path's measured round trip, within [`MIN_DRAW`] and
    /// [`MAX_DRAW`]) draw for
    /// them: the earliest deadline wins, a job without one comes after every job with one, then
    /// the first submitted; the others connect anew at once. Waiting one round trip costs less
    /// than what the streams save (a probe, a key exchange, slow start), and it lets the most
    /// urgent of jobs submitted together start warm whatever order their requests arrived in.
    fn draw_warm(&self, id: u64, to: &str, due: Option<Instant>) -> (Option<crate::warm::Lent>, Option<String>) {
        let Some(pool) = &self.pool else { return (None, None) };
        // One draw per pool, however the job spells the peer (resolved once, here).
        let Some(key) = pool.key(to) else { return (None, None) };
        let Some(est) = pool.measured(&key) else { return (None, Some("not lent: the peer's warm streams are not ready".into())) };
        let window = est.rtt_min.clamp(MIN_DRAW, MAX_DRAW);
        let (opened, window) = self.with(|b| {
            let now = Instant::now();
            let d = b.draws.entry(key.clone()).or_insert_with(|| Draw { opened: now, window, entrants: Vec::new(), winner: None });
            if now.duration_since(d.opened) > d.window {
                *d = Draw { opened: now, window, entrants: Vec::new(), winner: None };
            }
            d.entrants.push((id, due));
            (d.opened, d.window)
        });
        std::thread::sleep((opened + window).saturating_duration_since(Instant::now()));
        let winner = self.with(|b| {
            let d = b.draws.get_mut(&key)?;
            if d.winner.is_none() {
                d.winner = d.most_urgent();
            }
            d.entrants.iter().any(|(e, _)| *e == id).then_some(d.winner).flatten()
        });
        match winner {
            Some(w) if w != id => (None, Some(format!("not lent: job {w}, due sooner or submitted first, drew the peer's warm streams"))),
            _ => match pool.lend(&key) {
                Some(l) => (Some(l), None),
                None => (None, Some("not lent: the peer's warm streams are busy (another job has them) or not ready".into())),
            },
        }
    }

    /// Places job `id` (its request names no cores): picks the cores, records the placement and
    /// holds the first `shards` of them until it ends, under one lock so that two jobs starting
    /// together see each other. `allowed`: the config's cores or the process's.
    fn place(&self, id: u64, peer: Option<std::net::IpAddr>, allowed: &[usize], shards: usize) -> Placement {
        let nic = peer.and_then(itp::nic_of);
        self.with(|b| {
            let p = itp::place(&self.nodes, allowed, nic.as_ref(), &b.load);
            if let Some(j) = b.job(id) {
                j.placement = Some(p.clone());
            }
            b.hold(id, shards);
            tracing::info!(id, cores = ?p.cores, node = ?p.node, why = %p.why, "transfer placed");
            p
        })
    }

    /// Shards held per core by the running transfers (for `/status` and tests).
    pub fn load(&self) -> BTreeMap<usize, usize> {
        self.with(|b| b.load.clone())
    }

    /// Sets the transfers' metrics (at each scrape of `/metrics`): bytes acknowledged and size
    /// per remembered transfer, and how many are in each state.
    pub fn export(&self, m: &crate::state::Metrics) {
        m.transfer_acked.reset();
        m.transfer_total.reset();
        m.transfers.reset();
        self.with(|b| {
            for j in &b.list {
                let (state, acked, total) = j.bytes();
                let id = j.id.to_string();
                let labels = [id.as_str(), j.name.as_str(), j.to.as_str(), state];
                m.transfer_acked.with_label_values(&labels).set(acked as f64);
                m.transfer_total.with_label_values(&labels).set(total as f64);
                m.transfers.with_label_values(&[state]).inc();
            }
        });
    }

    fn run(&self, id: u64, mut req: Request, cancel: Arc<std::sync::atomic::AtomicBool>) {
        // The peer's address: the link the job shares, and the NIC it leaves through. Resolved
        // here, outside the lock (a name may take a DNS round trip).
        let peer = std::net::ToSocketAddrs::to_socket_addrs(req.to.as_str()).ok().and_then(|mut a| a.next()).map(|a| a.ip());
        let placed = req.cores.is_none();
        req.apply_defaults(&self.defaults);
        if placed {
            let allowed = match dataplane::placement::shard_cores(req.cores.as_deref()) {
                Ok(c) => c.into_iter().map(|c| c.id).collect::<Vec<_>>(),
                Err(e) => return self.end(id, "failed", json!({"error": format!("[transfer] cores: {e}")})),
            };
            // Until the plan says, as many shards as the request's streams (or every core).
            let shards = req.streams.map_or(allowed.len(), usize::from).min(allowed.len());
            req.cores = Some(self.place(id, peer, &allowed, shards).cores);
        }
        // The plan sizes the transfer to the cores it may use, as `dwcp send --cores` does.
        let host = Host { cores: req.cores.as_ref().map_or(self.host.cores, |c| c.len().max(1)), ..self.host };
        let to = req.to.clone();
        let due = req.deadline_s.and_then(|d| self.with(|b| b.job(id).map(|j| j.started + std::time::Duration::from_secs_f64(d))));
        let (mut lent, not_lent) = self.draw_warm(id, &to, due);
        if let Some(why) = &not_lent {
            tracing::info!(id, %to, "{why}: connecting anew");
            self.with(|b| b.job(id).map(|j| j.warm = Some(why.clone())));
        }
        if req.migrate.is_some() {
            return self.run_migration(id, req, host, peer, lent, cancel);
        }
        let started = engine::start_on(req, self.psk.clone(), host, self.thresholds, dataplane::send::Faults::default(), lent.as_mut());
        let t = match started {
            Ok(t) => t,
            Err(e) => {
                self.give_back(lent);
                return self.end(id, "failed", json!({"error": e.to_string()}));
            }
        };
        let warm = t.warm().map(str::to_owned).or(not_lent);
        let plan = serde_json::to_value(t.plan()).unwrap_or_default();
        let progress = t.progress().clone();
        // A restarted daemon resumes it with this chunk size (the receiver's journal is per
        // chunk size).
        if let Some(rs) = &self.records
            && let Err(e) = rs.update(id, |r| r.chunk_size = Some(t.plan().chunk_size))
        {
            tracing::warn!(id, "updating its record: {e}");
        }
        // The plan may open fewer streams than the placement assumed.
        self.with(|b| b.hold(id, usize::from(t.plan().streams)));
        self.with(|b| {
            if let Some(j) = b.job(id) {
                j.warm = warm.clone();
                j.name = t.name().to_owned();
                j.phase = Phase::Running { plan, progress: progress.clone() };
                j.peer = peer;
            }
        });
        // A cancel asked for while it was starting takes effect now.
        if cancel.load(Relaxed) {
            t.cancel();
        }
        match t.wait() {
            Ok(out) => {
                let state = if out.report.verified { "verified" } else { "failed" };
                let mut j = out.json();
                if let Some(w) = &warm {
                    j["warm"] = w.as_str().into();
                }
                self.end(id, state, j);
            }
            Err(e) if progress.cancel.load(Relaxed) => self.end(id, "cancelled", json!({"error": e.to_string()})),
            Err(e) => self.end(id, "failed", json!({"error": e.to_string()})),
        }
        // After the job has ended for its caller: parking the streams again takes a round trip.
        self.give_back(lent);
    }

    /// Runs migration job `id` (booked, placed): the fleet's ownership checked first (this node
    /// must own the VM; one nobody owns is claimed), then QEMU's stream sent through the engine
    /// (on `lent`'s warm streams when lent), QEMU followed every 100 ms, and, once the
    /// destination verified the whole stream, the ownership handed to the destination's node.
    /// Only a committed handoff lets the destination resume (`dwcp fleet resume`); without one
    /// the source stays paused.
    fn run_migration(&self, id: u64, req: Request, host: Host, peer: Option<std::net::IpAddr>, mut lent: Option<crate::warm::Lent>, cancel: Arc<std::sync::atomic::AtomicBool>) {
        use crate::engine::migrate;
        let spec = req.migrate.clone().unwrap_or_default();
        let fleet = self.fleet.get().and_then(|(f, _)| f.clone());
        let owned = match (&spec.vm, spec.to_node) {
            (Some(vm), Some(to)) => match &fleet {
                None => Err(format!("{vm}: this daemon is in no Raft group ([fleet]): migrate without \"vm\", or configure the fleet")),
                Some(f) => owned_here(f, vm, to).map(|epoch| Some((f.clone(), vm.clone(), to, epoch))),
            },
            _ => Ok(None),
        };
        let owned = match owned {
            Ok(o) => o,
            Err(e) => {
                self.give_back(lent);
                return self.end(id, "failed", json!({ "error": e }));
            }
        };
        let mut m = match migrate::start(req, self.psk.clone(), host, self.thresholds, lent.as_mut()) {
            Ok(m) => m,
            Err(e) => {
                self.give_back(lent);
                return self.end(id, "failed", json!({ "error": e.to_string() }));
            }
        };
        let t = m.transfer();
        let (warm, progress) = (t.warm().map(str::to_owned), t.progress().clone());
        let plan = serde_json::to_value(t.plan()).unwrap_or_default();
        let (streams, name) = (usize::from(t.plan().streams), t.name().to_owned());
        self.with(|b| b.hold(id, streams));
        self.with(|b| {
            if let Some(j) = b.job(id) {
                j.warm = warm.clone().or(j.warm.take());
                j.name = name;
                j.phase = Phase::Running { plan, progress: progress.clone() };
                j.peer = peer;
            }
        });
        let mut cancelled = false;
        let mut qmp_error = None;
        loop {
            if cancel.load(Relaxed) && !cancelled {
                tracing::info!(id, "cancelling the migration: the source VM keeps running");
                m.cancel();
                cancelled = true;
            }
            match m.step() {
                Ok(done) => {
                    let (last, line) = m.last();
                    let ram = &last["ram"];
                    let q = json!({
                        "qmp": spec.qmp, "vm": spec.vm, "status": last["status"], "round": ram["dirty-sync-count"],
                        "sent_bytes": ram["transferred"], "remaining_bytes": ram["remaining"], "dirty_pages_rate": ram["dirty-pages-rate"], "line": line,
                    });
                    self.with(|b| b.job(id).map(|j| j.qemu = Some(q)));
                    if done {
                        break;
                    }
                }
                Err(e) => {
                    // QEMU went away or stopped answering: nothing of its stream may be
                    // committed.
                    m.transfer().cancel();
                    qmp_error = Some(e.to_string());
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let ended = m.finish();
        let mut result = ended.json();
        if let Some(w) = &warm {
            result["warm"] = w.as_str().into();
        }
        let handoff = match owned {
            Some((f, vm, to, epoch)) if ended.moved() => {
                let r = f.handoff(&vm, f.id(), to, epoch);
                result["handoff"] = match &r {
                    Ok(e) => json!({ "vm": vm, "to_node": to, "committed": true, "epoch": e }),
                    Err(e) => json!({ "vm": vm, "to_node": to, "committed": false, "error": e.to_string() }),
                };
                r.map(|_| ()).map_err(|e| migrate::handoff_not_committed(&vm, to, &e.to_string()))
            }
            _ => Ok(()),
        };
        let state = match (cancelled, qmp_error, ended.why_not(), handoff) {
            (true, ..) => {
                result["error"] = match ended.moved() {
                    false => format!("cancelled on request: nothing was published at the destination, and the source VM is {}", ended.source_vm),
                    // QEMU had written all of it and the destination verified it before the
                    // cancel took: the VM moved, but its ownership did not (no handoff).
                    true => {
                        format!("cancelled after the destination had verified the whole stream: the source VM is {}; check the destination before resuming either", ended.source_vm)
                    }
                }
                .into();
                "cancelled"
            }
            (_, Some(e), ..) => {
                result["error"] = format!("QEMU's monitor: {e}; the stream was cancelled, nothing is published; the source VM is {}", ended.source_vm).into();
                "failed"
            }
            (_, _, Some(why), _) | (_, _, None, Err(why)) => {
                result["error"] = why.into();
                "failed"
            }
            (_, _, None, Ok(())) => "verified",
        };
        self.end(id, state, result);
        self.give_back(lent);
    }

    /// Every transfer remembered.
    pub fn list(&self) -> Value {
        self.with(|b| Value::Array(b.list.iter().map(Job::json).collect()))
    }

    fn get(&self, id: u64) -> Reply {
        self.with(|b| b.list.iter().find(|j| j.id == id).map_or_else(|| error(404, format!("no transfer {id}")), |j| (200, j.json())))
    }

    fn cancel(&self, id: u64) -> Reply {
        self.with(|b| match b.list.iter().find(|j| j.id == id) {
            None => error(404, format!("no transfer {id}")),
            Some(j) => {
                j.cancel.store(true, Relaxed);
                if let Phase::Running { progress, .. } = &j.phase {
                    progress.cancel.store(true, Relaxed);
                }
                (202, j.json())
            }
        })
    }

    /// Serves the fleet's endpoints (`/fleet/...`) on this socket too.
    pub fn set_fleet(&self, f: Option<Arc<crate::fleet::Fleet>>, g: Option<Arc<crate::gossip::Handle>>) {
        let _ = self.fleet.set((f, g));
    }

    /// Answers one request of the jobs socket.
    pub fn handle(self: &Arc<Self>, method: &str, path: &str, body: &[u8]) -> Reply {
        let (f, g) = self.fleet.get().map_or((None, None), |(f, g)| (f.as_deref(), g.as_deref()));
        if let Some(r) = crate::fleet::api::handle(f, g, method, path, body) {
            return r;
        }
        let id = path.strip_prefix("/transfers/").map(|s| s.parse::<u64>());
        match (method, path, id) {
            ("POST", "/transfers", _) => self.submit(body),
            ("GET", "/transfers", _) => (200, self.list()),
            ("GET", _, Some(Ok(id))) => self.get(id),
            ("DELETE", _, Some(Ok(id))) => self.cancel(id),
            (_, _, Some(Err(_))) => error(404, "a transfer's id is a number: /transfers/ID"),
            _ => error(404, "try POST /transfers, GET /transfers, GET or DELETE /transfers/ID, GET /transfers/ID/events, GET /fleet"),
        }
    }

    /// The events of transfer `id` from now until it ends, written to `out` one JSON line each
    /// (flushed at once): `{"event":"state","job":...}` first and at each change of state,
    /// `{"event":"progress",...}` every [`EVENT_EVERY`] while it runs (bytes acknowledged of
    /// how many, the rate over the interval, PBA's next-second interval and the deadline's
    /// verdict when it has them), `{"event":"ended","job":...}` last. Returns once it ended
    /// or the reader went away.
    pub fn events(&self, id: u64, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut line = |v: Value| -> std::io::Result<()> {
            out.write_all(format!("{v}\n").as_bytes())?;
            out.flush()
        };
        let mut last_state = String::new();
        let mut last: Option<(Instant, u64)> = None;
        let mut first = true;
        loop {
            if !first {
                // The state is looked at often, so that the end is told at once; progress only
                // every EVENT_EVERY.
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            first = false;
            let Some(j) = self.with(|b| b.list.iter().find(|j| j.id == id).map(Job::json)) else {
                return line(json!({"event": "gone", "id": id, "error": format!("no transfer {id}")}));
            };
            let state = j["state"].as_str().unwrap_or("").to_owned();
            if !matches!(state.as_str(), "starting" | "running") {
                return line(json!({"event": "ended", "job": j}));
            }
            if state != last_state {
                line(json!({"event": "state", "job": j}))?;
                last_state = state;
            } else if state == "running" && last.is_none_or(|(t, _)| t.elapsed() >= EVENT_EVERY) {
                let (now, acked) = (Instant::now(), j["acked_bytes"].as_u64().unwrap_or(0));
                let bps = last.map(|(t, a)| acked.saturating_sub(a) as f64 * 8.0 / now.duration_since(t).as_secs_f64().max(1e-3));
                last = Some((now, acked));
                let mut e = json!({"event": "progress", "id": id, "acked_bytes": acked, "total_bytes": j["total_bytes"], "elapsed_s": j["elapsed_s"]});
                if let Some(b) = bps {
                    e["bps"] = json!(b.round());
                }
                for k in ["next_second_bps", "deadline", "share", "qemu"] {
                    if !j[k].is_null() {
                        e[k] = j[k].clone();
                    }
                }
                line(e)?;
            }
        }
    }

    /// Serves `server` (the jobs socket) until it is unblocked. An event stream gets its own
    /// thread (at most [`MAX_WATCHERS`]), so that it does not hold up the other requests.
    pub fn serve(self: &Arc<Self>, server: &tiny_http::Server) {
        let watchers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for mut req in server.incoming_requests() {
            let events = req.url().split('?').next().and_then(|p| p.strip_prefix("/transfers/")).and_then(|p| p.strip_suffix("/events")).map(str::parse::<u64>);
            if let (&tiny_http::Method::Get, Some(Ok(id))) = (req.method(), events) {
                self.serve_events(req, id, &watchers);
                continue;
            }
            let mut body = Vec::new();
            let read = req.as_reader().take(MAX_BODY + 1).read_to_end(&mut body);
            let (code, v) = match read {
                Err(e) => error(400, format!("reading the request: {e}")),
                Ok(_) if body.len() as u64 > MAX_BODY => error(413, format!("a request is at most {MAX_BODY} bytes")),
                Ok(_) => {
                    let path = req.url().split('?').next().unwrap_or("").to_owned();
                    self.handle(req.method().as_str(), &path, &body)
                }
            };
            let h = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]).expect("header");
            let _ = req.respond(tiny_http::Response::from_string(format!("{v}\n")).with_status_code(code).with_header(h));
        }
    }
}

impl Jobs {
    /// Answers `GET /transfers/ID/events` on a thread of its own: the response's head, then
    /// [`Jobs::events`] on the raw connection (tiny_http's chunked writer would hold the lines
    /// back until 8 KiB gathered), ended by closing it.
    fn serve_events(self: &Arc<Self>, req: tiny_http::Request, id: u64, watchers: &Arc<std::sync::atomic::AtomicUsize>) {
        let respond = |req: tiny_http::Request, (code, v): Reply| {
            let h = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]).expect("header");
            let _ = req.respond(tiny_http::Response::from_string(format!("{v}\n")).with_status_code(code).with_header(h));
        };
        if self.with(|b| b.list.iter().all(|j| j.id != id)) {
            return respond(req, error(404, format!("no transfer {id}")));
        }
        if watchers.fetch_add(1, Relaxed) >= MAX_WATCHERS {
            watchers.fetch_sub(1, Relaxed);
            return respond(req, error(503, format!("{MAX_WATCHERS} event streams are open; poll GET /transfers/{id} instead")));
        }
        let (me, count) = (self.clone(), watchers.clone());
        let spawned = std::thread::Builder::new().name(format!("dwcp-events-{id}")).spawn(move || {
            let mut w = req.into_writer();
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";
            let _ = w.write_all(head.as_bytes()).and_then(|()| me.events(id, &mut w));
            count.fetch_sub(1, Relaxed);
        });
        if spawned.is_err() {
            watchers.fetch_sub(1, Relaxed);
        }
    }
}

/// Whether a transfer can be taken up by a restarted daemon: resumed, sending only what the
/// receiver does not hold yet.
fn resumable(req: &Request) -> Result<(), String> {
    use crate::engine::plan::Choice;
    if req.migrate.is_some() {
        return Err("a migration cannot be taken up again (QEMU's migration failed with its stream, so the source VM runs on; if QEMU had already written all of it, the source is paused: check the destination, then `dwcp fleet resume` or `cont` the source)".into());
    }
    if req.hde == Choice::On || req.round_of.is_some() || req.dirty.is_some() {
        return Err("an HDE transfer cannot resume".into());
    }
    if req.qemu || req.source == "-" {
        return Err("a stream cannot be read again".into());
    }
    Ok(())
}

/// The epoch at which this node owns `vm` (one nobody owns is claimed for it), checked before
/// it may be migrated to node `to`.
fn owned_here(f: &crate::fleet::Fleet, vm: &str, to: u64) -> Result<u64, String> {
    let me = f.id();
    if to == me {
        return Err(format!("to_node {me} is this node: the destination is another node of the fleet"));
    }
    match f.owner(vm) {
        Ok(Some(o)) if o.node == me => Ok(o.epoch),
        Ok(Some(o)) => Err(format!("{vm} is owned by node {} (epoch {}), not this node ({me}): migrate it from its owner", o.node, o.epoch)),
        Ok(None) => f.claim(vm, me).map_err(|e| format!("claiming {vm} for this node: {e}")),
        Err(e) => Err(format!("asking the fleet who owns {vm}: {e}")),
    }
}

/// Takes back the shards `held` from `load` (a core with none left leaves the map).
fn release(load: &mut BTreeMap<usize, usize>, held: &[usize]) {
    for c in held {
        if let Some(n) = load.get_mut(c) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                load.remove(c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_urgent_draws_a_warm_peer_whatever_the_order_it_asked_in() {
        let now = Instant::now();
        let s = std::time::Duration::from_secs;
        let draw = |entrants: Vec<(u64, Option<Instant>)>| Draw { opened: now, window: MIN_DRAW, entrants, winner: None }.most_urgent();
        // A copy asked first; the job due soonest wins, then the next due, then the first copy.
        assert_eq!(draw(vec![(1, None), (2, Some(now + s(8))), (3, Some(now + s(5)))]), Some(3));
        assert_eq!(draw(vec![(1, None), (2, Some(now + s(8)))]), Some(2));
        assert_eq!(draw(vec![(4, None), (2, None)]), Some(2));
        assert_eq!(draw(vec![]), None);
    }
}
