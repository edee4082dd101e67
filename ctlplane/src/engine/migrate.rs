//! Live migration of a QEMU VM through the engine, for the daemon's migration jobs. The source
//! QEMU is driven over QMP: one end of a socket pair is handed to it with `getfd` (the file
//! descriptor rides on the QMP socket, as libvirt passes its own), `migrate fd:NAME` makes it
//! write its migration stream there, and the engine sends what it reads from the other end
//! (page-aware or tunnel mode), on a warm peer's streams when the caller lends them. No socket
//! file, no helper process, nothing QEMU could be given access to by mistake.
//!
//! While the stream flows, [`Watch`] follows `query-migrate` (rounds, remaining, dirty rate)
//! and tells QEMU when the rest fits in its downtime limit at the link's pace ([`Converge`]).
//! A cancelled or failed migration cancels the transfer before QEMU closes its end, so nothing
//! is committed at the receiver: the destination never gets a complete stream and never starts,
//! and QEMU keeps the source running. `dwcp migrate` (the CLI, `exec:` into `dwcp send -`)
//! shares [`Qmp`], [`Converge`] and [`Watch`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::crypto::Psk;
use dataplane::send::Faults;
use dataplane::source::{Input, Source};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{EngineError, Host, Outcome, Request, Transfer};
use crate::mode::Thresholds;

/// What a migration job migrates: the source QEMU, and the VM's place in the fleet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrateSpec {
    /// The source QEMU's QMP socket (`-qmp unix:PATH,server,nowait`).
    pub qmp: PathBuf,
    /// The VM's name in the fleet: this daemon must own it (a VM nobody owns is claimed), and
    /// once the destination has the whole verified stream its ownership is handed to `to_node`.
    pub vm: Option<String>,
    /// The destination host's fleet node id (with `vm`).
    pub to_node: Option<u64>,
}

/// Longest QMP line read, bytes: QEMU's replies to the commands used here are a few KiB.
const MAX_QMP_LINE: u64 = 1 << 20;
/// Each end's socket buffer for QEMU's stream, bytes (doubled by the kernel: a pipe's 64 KiB).
const SOCKET_BUFFER: usize = 32 << 10;
/// The name the stream's descriptor has inside QEMU.
const FD_NAME: &str = "dwcp-migrate";

/// What went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot reach QEMU's QMP socket {path} (start QEMU with -qmp unix:PATH,server,nowait): {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a QMP socket (greeting {greeting})")]
    NotQmp { path: PathBuf, greeting: String },
    #[error("QEMU closed the QMP socket")]
    Closed,
    #[error("QEMU sent a QMP line longer than {MAX_QMP_LINE} bytes or not JSON")]
    Garbled,
    #[error("QEMU refused {cmd}: {desc}")]
    Refused { cmd: String, desc: String },
    #[error("talking to QEMU over QMP: {0}")]
    Io(#[from] std::io::Error),
}

/// A QMP connection (QEMU's monitor socket takes one client at a time).
#[derive(Debug)]
pub struct Qmp {
    r: BufReader<std::io::Take<UnixStream>>,
    w: UnixStream,
}

impl Qmp {
    /// Connects and leaves capabilities negotiation.
    pub fn connect(path: &Path) -> Result<Self, QmpError> {
        let s = UnixStream::connect(path).map_err(|source| QmpError::Connect { path: path.to_owned(), source })?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut q = Self { r: BufReader::new(s.try_clone()?.take(MAX_QMP_LINE)), w: s };
        let greeting = q.line()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::NotQmp { path: path.to_owned(), greeting: greeting.to_string() });
        }
        q.cmd("qmp_capabilities", None)?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value, QmpError> {
        let mut l = String::new();
        // Each line may be up to MAX_QMP_LINE long.
        self.r.get_mut().set_limit(MAX_QMP_LINE);
        if self.r.read_line(&mut l)? == 0 {
            return Err(QmpError::Closed);
        }
        if !l.ends_with('\n') && self.r.get_ref().limit() == 0 {
            return Err(QmpError::Garbled);
        }
        serde_json::from_str(&l).map_err(|_| QmpError::Garbled)
    }

    fn reply(&mut self, name: &str) -> Result<Value, QmpError> {
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Refused { cmd: name.into(), desc: e["desc"].as_str().unwrap_or("?").into() });
            }
            // Events (MIGRATION, STOP, RESUME...) are skipped.
        }
    }

    fn message(name: &str, args: Option<Value>) -> String {
        let mut m = json!({ "execute": name });
        if let Some(a) = args {
            m["arguments"] = a;
        }
        format!("{m}\n")
    }

    /// Runs command `name` with `args`; its `return`.
    pub fn cmd(&mut self, name: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.w.write_all(Self::message(name, args).as_bytes())?;
        self.reply(name)
    }

    /// Runs command `name` (`getfd`) with `fd` passed beside it (`SCM_RIGHTS`).
    pub fn cmd_with_fd(&mut self, name: &str, args: Option<Value>, fd: std::os::fd::BorrowedFd<'_>) -> Result<Value, QmpError> {
        send_with_fd(&self.w, Self::message(name, args).as_bytes(), fd)?;
        self.reply(name)
    }
}

/// Writes `bytes` on `sock` with `fd` beside them (`SCM_RIGHTS`, on the first segment); the
/// rest, if the socket took only part, is written plainly.
fn send_with_fd(mut sock: &UnixStream, bytes: &[u8], fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    if !cmsg.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("no room for the descriptor in the control message"));
    }
    let n = sendmsg(sock, &[std::io::IoSlice::new(bytes)], &mut cmsg, SendFlags::empty())?;
    sock.write_all(&bytes[n..])
}

/// When to tell QEMU to stop the VM and send the rest. QEMU decides that itself from its own
/// estimate of the bandwidth, the bytes it wrote in the last 100 ms; writing into dwcp, which
/// reads in bursts as its windows open, that estimate swings, and the migration can go on for
/// round after round with a few MiB left. dwcp knows better: over the last two seconds QEMU's
/// stream drained at the link's pace (compression included), so the rest takes `remaining /
/// rate`. Once that fits in QEMU's downtime limit (after the first full pass), dwcp lifts the
/// limit so QEMU completes at its next check. Free of I/O.
#[derive(Debug)]
pub struct Converge {
    target: Duration,
    samples: std::collections::VecDeque<(Duration, u64)>,
    fired: bool,
}

/// The rate window.
const RATE_WINDOW: Duration = Duration::from_secs(2);

impl Converge {
    /// Completes once the rest fits in `target` (QEMU's `downtime-limit`).
    pub fn new(target: Duration) -> Self {
        Self { target, samples: Default::default(), fired: false }
    }

    /// A `query-migrate` sample at `t`: `transferred` and `remaining` bytes, `round` (QEMU's
    /// dirty-sync-count). Returns the expected downtime when it is time to complete (once).
    pub fn observe(&mut self, t: Duration, transferred: u64, remaining: u64, round: u64) -> Option<Duration> {
        self.samples.push_back((t, transferred));
        while self.samples.len() > 2 && t.saturating_sub(self.samples[1].0) >= RATE_WINDOW {
            self.samples.pop_front();
        }
        let (t0, b0) = *self.samples.front()?;
        let span = t.saturating_sub(t0);
        if self.fired || round < 2 || span < RATE_WINDOW / 2 {
            return None;
        }
        let rate = transferred.saturating_sub(b0) as f64 / span.as_secs_f64();
        if rate <= 0.0 {
            return None;
        }
        let expected = Duration::from_secs_f64(remaining as f64 / rate);
        (expected <= self.target).then(|| {
            self.fired = true;
            expected
        })
    }
}

/// Follows a running migration on its QMP connection: one [`Watch::step`] per sample.
#[derive(Debug)]
pub struct Watch {
    converge: Converge,
    /// QEMU's downtime limit before the migration, ms (restored at the end).
    limit_ms: u64,
    /// The round in which QEMU was told to complete, and the downtime expected then.
    pub pushed: Option<(u64, Duration)>,
    /// The last `query-migrate` reply.
    pub last: Value,
    t0: Instant,
}

/// Whether QEMU's migration status is final.
pub fn is_final(status: &Value) -> bool {
    matches!(status["status"].as_str(), Some("completed" | "failed" | "cancelled"))
}

impl Watch {
    /// Reads QEMU's downtime limit; call before `migrate`.
    pub fn new(q: &mut Qmp) -> Result<Self, QmpError> {
        let params = q.cmd("query-migrate-parameters", None)?;
        let limit_ms = params["downtime-limit"].as_u64().unwrap_or(300);
        Ok(Self { converge: Converge::new(Duration::from_millis(limit_ms)), limit_ms, pushed: None, last: Value::Null, t0: Instant::now() })
    }

    /// One `query-migrate`: lifts the downtime limit once the rest fits in it at the link's
    /// pace. Returns the reply.
    pub fn step(&mut self, q: &mut Qmp) -> Result<&Value, QmpError> {
        let r = q.cmd("query-migrate", None)?;
        let ram = &r["ram"];
        let round = ram["dirty-sync-count"].as_u64().unwrap_or(0);
        if r["status"] == "active"
            && let Some(expected) = self.converge.observe(self.t0.elapsed(), ram["transferred"].as_u64().unwrap_or(0), ram["remaining"].as_u64().unwrap_or(u64::MAX), round)
        {
            // QEMU completes at its next check once its threshold (bandwidth x limit) is above
            // what remains.
            q.cmd("migrate-set-parameters", Some(json!({ "downtime-limit": 60_000 })))?;
            tracing::info!(round, expected_ms = expected.as_millis() as u64, "the rest fits in the downtime limit at the link's pace: QEMU may stop the VM");
            self.pushed = Some((round, expected));
        }
        self.last = r;
        Ok(&self.last)
    }

    /// Puts QEMU's downtime limit back if it was lifted.
    pub fn restore(&self, q: &mut Qmp) {
        if self.pushed.is_some() {
            let _ = q.cmd("migrate-set-parameters", Some(json!({ "downtime-limit": self.limit_ms })));
        }
    }

    /// A line for a person: status, round, bytes sent and remaining, dirty rate.
    pub fn line(&self) -> String {
        let ram = &self.last["ram"];
        format!(
            "{}, round {}, {} MiB sent, {} MiB remaining, dirtying {} pages/s",
            self.last["status"].as_str().unwrap_or("?"),
            ram["dirty-sync-count"].as_u64().unwrap_or(0),
            ram["transferred"].as_u64().unwrap_or(0) >> 20,
            ram["remaining"].as_u64().unwrap_or(0) >> 20,
            ram["dirty-pages-rate"].as_u64().unwrap_or(0)
        )
    }
}

/// Why a migration could not start or went wrong outside the transfer.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("the source VM is {0}, not running")]
    NotRunning(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Invalid(String),
}

/// A migration in flight: the source QEMU writing into the engine's transfer.
#[derive(Debug)]
pub struct Migration {
    q: Qmp,
    watch: Watch,
    transfer: Transfer,
}

/// The knobs tunnel mode fixes unless the request sets them (the daemon's jobs here, `dwcp
/// migrate`'s `exec:` as `dwcp send` flags): QEMU paces its rounds (and decides when to stop the
/// VM) by how fast its stream drains, so dwcp must not buffer much more than the link holds.
/// Page-aware mode plans its own window from the probe (about two bandwidth-delay products).
pub mod tunnel {
    /// Chunk size, bytes.
    pub const CHUNK_SIZE: u32 = 256 << 10;
    /// Unacknowledged chunks per stream.
    pub const WINDOW: usize = 4;
    /// Chunks read ahead of the streams.
    pub const READ_AHEAD: usize = 1;
    /// `TCP_NOTSENT_LOWAT`, bytes.
    pub const NOTSENT_LOWAT: u32 = 32 << 10;
}

fn tunnel_defaults(req: &mut Request) {
    req.chunk_size.get_or_insert(tunnel::CHUNK_SIZE);
    req.window.get_or_insert(tunnel::WINDOW);
    req.read_ahead.get_or_insert(tunnel::READ_AHEAD);
    req.notsent_lowat.get_or_insert(tunnel::NOTSENT_LOWAT);
}

/// Why a migration whose stream the destination verified did not move the VM's ownership to
/// node `to` (`why`: the fleet's answer), and what a person does next.
pub fn handoff_not_committed(vm: &str, to: u64, why: &str) -> String {
    format!(
        "the stream reached the destination verified, but the ownership of {vm} was not handed to node {to}: {why}. The source VM stays paused and neither side may resume it until `dwcp fleet owner {vm}` names its owner; then `dwcp fleet resume {vm} --qmp ...` on that host"
    )
}

/// Starts migrating the VM behind `req.migrate`'s QMP socket to `req.to` (`req.qemu`: page-aware,
/// else tunnel mode), on `warm`'s streams when lent. The fleet's part (ownership) is the
/// caller's.
pub fn start(mut req: Request, psk: Psk, host: Host, t: Thresholds, warm: Option<&mut crate::warm::Lent>) -> Result<Migration, MigrateError> {
    let spec = req.migrate.clone().ok_or_else(|| MigrateError::Invalid("not a migration: no \"migrate\" in the request".into()))?;
    let mut q = Qmp::connect(&spec.qmp)?;
    let st = q.cmd("query-status", None)?;
    if st["status"] != "running" && st["status"] != "paused" {
        return Err(MigrateError::NotRunning(st["status"].as_str().unwrap_or("?").into()));
    }
    if !req.qemu {
        tunnel_defaults(&mut req);
    }
    let (ours, theirs) = UnixStream::pair().map_err(|e| MigrateError::Invalid(format!("creating the stream's socket pair: {e}")))?;
    // As little buffered between QEMU and dwcp as the pipe of `dwcp migrate`'s `exec:` (64 KiB):
    // QEMU estimates its bandwidth from how fast its writes go, and completes (stops the VM)
    // once the rest fits in its downtime limit at that rate; a deep socket buffer makes its
    // writes look faster than the link, and it stops the VM with more left than the limit.
    // (A Unix stream socket's queue is bounded by the sender's buffer; the kernel doubles it.)
    rustix::net::sockopt::set_socket_send_buffer_size(&theirs, SOCKET_BUFFER)
        .and_then(|()| rustix::net::sockopt::set_socket_recv_buffer_size(&ours, SOCKET_BUFFER))
        .map_err(|e| MigrateError::Invalid(format!("sizing the stream's socket buffers: {e}")))?;
    q.cmd_with_fd("getfd", Some(json!({ "fdname": FD_NAME })), theirs.as_fd())?;
    // QEMU holds its own copy now.
    drop(theirs);
    let name = req.name.clone().unwrap_or_else(|| "vmstate".into());
    let source = Source::Stream { name, input: Input::Socket(Arc::new(ours)) };
    let mut watch = Watch::new(&mut q)?;
    let transfer = super::transfer::start_from(req, source, psk, host, t, Faults::default(), warm)?;
    // The migration's clock starts with QEMU's `migrate`, after the transfer's start.
    watch.t0 = Instant::now();
    if let Err(e) = q.cmd("migrate", Some(json!({ "uri": format!("fd:{FD_NAME}") }))) {
        transfer.cancel();
        let _ = q.cmd("closefd", Some(json!({ "fdname": FD_NAME })));
        let _ = transfer.wait();
        return Err(e.into());
    }
    Ok(Migration { q, watch, transfer })
}

/// How a migration ended.
#[derive(Debug)]
pub struct Ended {
    /// QEMU's last `query-migrate` (status, total time, downtime, RAM figures).
    pub status: Value,
    /// The transfer's outcome.
    pub transfer: Result<Outcome, EngineError>,
    /// The source VM's run state at the end.
    pub source_vm: String,
    pub wall: Duration,
    pub pushed: Option<(u64, Duration)>,
}

impl Ended {
    /// QEMU completed and the destination verified the whole stream.
    pub fn moved(&self) -> bool {
        self.status["status"] == "completed" && self.transfer.as_ref().is_ok_and(|o| o.report.verified)
    }

    /// The summary `dwcp migrate --json` prints.
    pub fn json(&self) -> Value {
        let ram = &self.status["ram"];
        json!({
            "status": self.status["status"], "wall_s": self.wall.as_secs_f64(),
            "downtime_ms": self.status["downtime"], "total_time_ms": self.status["total-time"],
            "rounds": ram["dirty-sync-count"], "ram_transferred": ram["transferred"],
            "source_vm": self.source_vm,
            "transfer": self.transfer.as_ref().map_or_else(|e| json!({ "error": e.to_string() }), Outcome::json),
            "completion": self.pushed.map(|(round, e)| json!({"round": round, "expected_downtime_ms": e.as_secs_f64() * 1e3})),
            "error": self.status.get("error-desc"),
        })
    }

    /// Why it did not move the VM, for a person (None when it did).
    pub fn why_not(&self) -> Option<String> {
        if self.moved() {
            return None;
        }
        let st = self.status["status"].as_str().unwrap_or("?");
        if st == "completed" {
            let why = match &self.transfer {
                Err(e) => e.to_string(),
                Ok(_) => "the receiver's digest did not match ours".into(),
            };
            return Some(format!(
                "QEMU finished writing its stream but the destination did not verify it ({why}); the source VM is left {}: check the destination before resuming the source with `cont`",
                self.source_vm
            ));
        }
        let why = self.status["error-desc"].as_str().unwrap_or("no reason given");
        let t = self.transfer.as_ref().err().map_or(String::new(), |e| format!(" (dwcp: {e})"));
        Some(format!("the migration {st}: {why}{t}; the source VM is {}", self.source_vm))
    }
}

impl Migration {
    /// What the transfer runs.
    pub fn transfer(&self) -> &Transfer {
        &self.transfer
    }

    /// One sample of QEMU's progress (call every 100 ms or so); true once QEMU's part is over.
    pub fn step(&mut self) -> Result<bool, QmpError> {
        let r = self.watch.step(&mut self.q)?;
        let done = is_final(r);
        if done && r["status"] != "completed" {
            // Nothing may be committed from a stream QEMU gave up on.
            self.transfer.cancel();
        }
        Ok(done)
    }

    /// QEMU's latest figures (the last `query-migrate`) and a line for a person.
    pub fn last(&self) -> (&Value, String) {
        (&self.watch.last, self.watch.line())
    }

    /// Cancels: the transfer first (the receiver publishes nothing), then QEMU's migration
    /// (the source VM keeps running).
    pub fn cancel(&mut self) {
        self.transfer.cancel();
        let _ = self.q.cmd("migrate_cancel", None);
    }

    /// Waits for the transfer's verdict (QEMU reports completion once its stream is in dwcp)
    /// and collects the figures.
    pub fn finish(mut self) -> Ended {
        self.watch.restore(&mut self.q);
        let wall = self.watch.t0.elapsed();
        let transfer = self.transfer.wait();
        // QEMU fills in its total and downtime figures only once it has closed the channel:
        // ask again now that the sender is through.
        let status = match self.q.cmd("query-migrate", None) {
            Ok(r) if r["status"] == self.watch.last["status"] && r["total-time"].as_u64().unwrap_or(0) > 0 => r,
            _ => self.watch.last.clone(),
        };
        let source_vm = self.q.cmd("query-status", None).map_or_else(|e| format!("unknown ({e})"), |s| s["status"].as_str().unwrap_or("?").to_owned());
        Ended { status, transfer, source_vm, wall, pushed: self.watch.pushed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn completes_once_the_rest_fits_at_the_links_pace() {
        let mut c = Converge::new(ms(300));
        // 25 MB/s drained; the first pass (round 1) never completes, however little remains.
        for i in 0..20u64 {
            assert_eq!(c.observe(ms(i * 100), i * 2_500_000, 1_000_000, 1), None);
        }
        // Round 3, 10 MB left: 400 ms at 25 MB/s, above the limit.
        assert_eq!(c.observe(ms(2000), 50_000_000, 10_000_000, 3), None);
        // 5 MB left: 200 ms.
        let e = c.observe(ms(2100), 52_500_000, 5_000_000, 3).expect("completes");
        assert!(e > ms(150) && e < ms(250), "{e:?}");
        // Once only.
        assert_eq!(c.observe(ms(2200), 55_000_000, 1, 4), None);
    }

    #[test]
    fn a_stalled_link_never_completes_early() {
        let mut c = Converge::new(ms(300));
        for i in 0..40u64 {
            // Nothing drains (the rate is zero), however little remains.
            assert_eq!(c.observe(ms(i * 100), 7_000_000, 4096, 5), None);
        }
        // A rate measured over too short a span does not count either.
        let mut c = Converge::new(ms(300));
        assert_eq!(c.observe(ms(0), 0, 1, 3), None);
        assert_eq!(c.observe(ms(100), 10_000_000, 1, 3), None);
    }

    /// A QMP peer that answers with an over-long line or garbage is refused with a clear
    /// error, not read without bound.
    #[test]
    fn a_garbled_or_endless_qmp_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (tag, greeting) in [("long", vec![b'x'; (MAX_QMP_LINE + 10) as usize]), ("garbage", b"not json\n".to_vec()), ("other", b"{\"hello\":1}\n".to_vec())] {
            let path = dir.path().join(format!("{tag}.qmp"));
            let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
            let t = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let _ = s.write_all(&greeting);
            });
            let e = Qmp::connect(&path).unwrap_err();
            t.join().unwrap();
            match tag {
                "other" => assert!(matches!(e, QmpError::NotQmp { .. }), "{e}"),
                _ => assert!(matches!(e, QmpError::Garbled), "{tag}: {e}"),
            }
        }
    }
}
