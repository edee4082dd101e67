//! The daemon: the boot graph of its real components (the state they fill is `state.rs`).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dataplane::crypto::Psk;
use dataplane::recv::{self, ReceiverHandle, RecvOptions, Sink};

use crate::boot::{BootError, Booted, Component, Ctx, Graph, Phase, Spec};
use crate::config::Config;
use crate::host;
use crate::mode::{Mode, Peers, Sample};
pub use crate::state::{Metrics, PeerStatus, SessionSummary, State};

macro_rules! component {
    ($name:ident) => {
        struct $name(Arc<State>);
    };
}

component!(HostC);
component!(ConfigC);
component!(LoggingC);
component!(KeysC);
component!(ListenerC);
component!(RdmaC);
component!(BpfC);
component!(SessionsC);
component!(ApiC);
component!(JobsC);
component!(FleetC);
component!(GossipC);
component!(ModeC);
component!(PeersC);
component!(ReadyC);

struct Listener(Mutex<Option<ReceiverHandle>>);
struct ApiServer(Arc<tiny_http::Server>);
struct JobsServer(Arc<tiny_http::Server>, std::path::PathBuf);

impl Component for HostC {
    fn spec(&self) -> Spec {
        Spec::new("host", Phase::PreInit)
    }
    fn start(&self, _: &Ctx) -> Result<(), String> {
        let h = host::detect();
        tracing::info!(?h, "host detected");
        let _ = self.0.host.set(h);
        Ok(())
    }
}

impl Component for ConfigC {
    fn spec(&self) -> Spec {
        Spec::new("config", Phase::PreInit)
    }
    fn start(&self, _: &Ctx) -> Result<(), String> {
        let out = &self.0.config.node.out;
        std::fs::create_dir_all(out).map_err(|e| format!("node.out {}: {e}", out.display()))
    }
}

impl Component for LoggingC {
    fn spec(&self) -> Spec {
        Spec::new("logging", Phase::PreInit).after(&["config"])
    }
    fn start(&self, _: &Ctx) -> Result<(), String> {
        // The config was validated at load, so the filter parses. RUST_LOG, when set, wins.
        let l = &self.0.config.log;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&l.level));
        let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
        let r = if l.format == "json" { b.json().try_init() } else { b.try_init() };
        match r {
            Ok(()) => tracing::info!(level = %l.level, format = %l.format, "logging set up"),
            // An embedding program (a test, a host process) installed its own: keep it.
            Err(_) => tracing::debug!("a tracing subscriber is already installed; log.level and log.format do not apply"),
        }
        Ok(())
    }
}

impl Component for KeysC {
    fn spec(&self) -> Spec {
        Spec::new("keys", Phase::Core).after(&["config"])
    }
    fn start(&self, ctx: &Ctx) -> Result<(), String> {
        let p = self.0.config.node.key_file.as_ref().ok_or("no key: set node.key_file (create one with `dwcp keygen FILE`)")?;
        ctx.put(Psk::from_file(p).map_err(|e| e.to_string())?);
        Ok(())
    }
}

impl Component for ListenerC {
    fn spec(&self) -> Spec {
        Spec::new("listener", Phase::Core).after(&["keys", "host"])
    }
    fn start(&self, ctx: &Ctx) -> Result<(), String> {
        let psk = ctx.get::<Psk>().ok_or("keys missing")?;
        let c = &self.0.config.node;
        let mut o = RecvOptions::new(c.listen.clone(), Sink::Dir(c.out.clone()), (*psk).clone());
        o.allow_plaintext = c.allow_plaintext;
        let h = recv::start(o).map_err(|e| e.to_string())?;
        let _ = self.0.listener.set(h.local_addr);
        ctx.put(Listener(Mutex::new(Some(h))));
        Ok(())
    }
    fn stop(&self, ctx: &Ctx) {
        if let Some(l) = ctx.get::<Listener>()
            && let Some(h) = l.0.lock().expect("listener lock").take()
        {
            h.stop();
        }
    }
}

impl Component for RdmaC {
    fn spec(&self) -> Spec {
        Spec::new("rdma", Phase::Core).after(&["host"]).optional()
    }
    fn start(&self, _: &Ctx) -> Result<(), String> {
        let h = self.0.host.get().ok_or("host unknown")?;
        if h.rdma_devices.is_empty() {
            return Err("no RDMA device: datacenter transfers use io_uring TCP".into());
        }
        // The device must open and show a RoCE v2 GID, as a session will need.
        #[cfg(feature = "rdma")]
        {
            let dev = dataplane::transport::rdma::sys::Device::open(Some(&h.rdma_devices[0])).map_err(|e| format!("{e}: datacenter transfers use io_uring TCP"))?;
            tracing::info!(device = %dev.name, mtu = dev.mtu, "RDMA ready: plaintext sessions from peers that ask for it go over verbs");
            Ok(())
        }
        #[cfg(not(feature = "rdma"))]
        Err(format!("RDMA devices {:?} found, but this build has no RDMA transport (built without the rdma feature): transfers use io_uring TCP", h.rdma_devices))
    }
}

impl Component for BpfC {
    fn spec(&self) -> Spec {
        Spec::new("bpf", Phase::Core).after(&["host"]).optional()
    }
    fn start(&self, _: &Ctx) -> Result<(), String> {
        let h = self.0.host.get().ok_or("host unknown")?;
        // Where BPF is permitted, load and attach the TCP probes once, so a kernel that refuses
        // them (no BTF, a verifier that disagrees) shows here at boot rather than as a degraded
        // transfer later.
        let why = match &h.bpf_denied {
            Some(why) => Some(why.clone()),
            None => ebpf::Monitor::open(ebpf::Want::Auto).degraded().map(str::to_string),
        };
        match why {
            None => Ok(()),
            Some(why) => Err(format!("{why}: congestion signals from TCP_INFO polling")),
        }
    }
}

impl Component for SessionsC {
    fn spec(&self) -> Spec {
        Spec::new("sessions", Phase::Service).after(&["listener"])
    }
    fn start(&self, ctx: &Ctx) -> Result<(), String> {
        let l = ctx.get::<Listener>().ok_or("listener missing")?;
        let rx = l.0.lock().expect("listener lock").as_ref().ok_or("listener stopped")?.outcomes.clone();
        let st = self.0.clone();
        std::thread::Builder::new()
            .name("dwcp-sessions".into())
            .spawn(move || {
                while !st.stop.load(Relaxed) {
                    let Ok(o) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
                    let result = o.result.as_ref().map(|d| dataplane::recv::hex(d)).map_err(Clone::clone);
                    st.metrics.sessions.with_label_values(&[if result.is_ok() { "verified" } else { "failed" }]).inc();
                    st.metrics.bytes.with_label_values::<&str>(&[]).inc_by(o.received);
                    feed_goodput(&st, &o);
                    let mut s = st.sessions.lock().expect("sessions lock");
                    s.push(SessionSummary { name: o.name, size: o.size, received: o.received, wall_s: o.wall.as_secs_f64(), result });
                    let n = s.len();
                    if n > 100 {
                        s.drain(..n - 100);
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(())
    }
    fn stop(&self, _: &Ctx) {
        self.0.stop.store(true, Relaxed);
    }
}

impl Component for ApiC {
    fn spec(&self) -> Spec {
        Spec::new("api", Phase::Service).after(&["config", "host"])
    }
    fn start(&self, ctx: &Ctx) -> Result<(), String> {
        let addr = &self.0.config.api.listen;
        let server = Arc::new(tiny_http::Server::http(addr).map_err(|e| format!("api.listen {addr}: {e}"))?);
        if let Some(a) = server.server_addr().to_ip() {
            let _ = self.0.api.set(a);
        }
        let (st, srv) = (self.0.clone(), server.clone());
        std::thread::Builder::new().name("dwcp-api".into()).spawn(move || crate::api::serve(&srv, &st)).map_err(|e| e.to_string())?;
        ctx.put(ApiServer(server));
        Ok(())
    }
    fn stop(&self, ctx: &Ctx) {
        if let Some(s) = ctx.get::<ApiServer>() {
            s.0.unblock();
        }
    }
}

/// Binds the jobs socket at `path`, mode 0600 from its first instant: bound in a private
/// directory beside it and renamed into place (a stale socket there is replaced; any other
/// file is left alone and named).
fn bind_private(path: &std::path::Path) -> Result<std::os::unix::net::UnixListener, String> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    if let Ok(m) = std::fs::symlink_metadata(path)
        && !m.file_type().is_socket()
    {
        return Err(format!("api.socket {} exists and is not a socket; remove it or choose another path", path.display()));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    // A missing directory (such as /run/dwcp outside systemd's RuntimeDirectory=) is created,
    // private to this user and its group.
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o750).create(dir).map_err(|e| format!("api.socket: creating its directory {}: {e}", dir.display()))?;
    }
    let tmp = dir.join(format!(".dwcp-sock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new().mode(0o700).create(&tmp).map_err(|e| format!("api.socket: creating {}: {e}", tmp.display()))?;
    let inner = tmp.join("s");
    let r = (|| {
        let l = std::os::unix::net::UnixListener::bind(&inner).map_err(|e| format!("api.socket {}: {e}", path.display()))?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600)).map_err(|e| format!("api.socket {}: {e}", path.display()))?;
        std::fs::rename(&inner, path).map_err(|e| format!("api.socket {}: {e}", path.display()))?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

impl Component for JobsC {
    fn spec(&self) -> Spec {
        Spec::new("jobs", Phase::Service).after(&["keys", "host", "config", "fleet", "gossip"])
    }
    fn start(&self, ctx: &Ctx) -> Result<(), String> {
        let Some(path) = &self.0.config.api.socket else { return Ok(()) };
        let psk = ctx.get::<Psk>().ok_or("keys missing")?;
        let host = crate::engine::host(None).map_err(|e| e.to_string())?;
        let nodes = self.0.host.get().map(|h| h.numa.clone()).unwrap_or_default();
        let records = match self.0.config.api.jobs_dir() {
            Some(d) => Some(crate::jobs::records::Records::open(&d)?),
            None => None,
        };
        let warm = self.0.config.transfer.warm_streams.map(usize::from);
        let peers: Vec<(String, String)> = self.0.config.peers.iter().map(|p| (p.name.clone(), p.addr.clone())).collect();
        let pool = (warm != Some(0) && !peers.is_empty()).then(|| crate::warm::Pool::start((*psk).clone(), &peers, warm, host.cores));
        let _ = self.0.warm.set(pool.clone());
        let jobs = crate::jobs::Jobs::new((*psk).clone(), host, nodes, self.0.config.thresholds(), self.0.config.transfer.clone(), records, pool);
        let listener = bind_private(path)?;
        let server = Arc::new(tiny_http::Server::from_listener(listener, None).map_err(|e| format!("api.socket {}: {e}", path.display()))?);
        jobs.set_fleet(self.0.fleet.get().cloned(), self.0.gossip.get().cloned());
        if let (Some(f), Some(fc)) = (self.0.fleet.get(), &self.0.config.fleet) {
            // Jobs recorded here are mirrored into the fleet, and jobs of members presumed gone
            // are taken over (`fleet::jobs`).
            let (tx, rx) = crossbeam_channel::unbounded();
            jobs.mirror_to(tx);
            let (f, j, stop) = (f.clone(), jobs.clone(), self.0.fleet_jobs_stop.clone());
            let after = Duration::from_secs_f64(fc.takeover_after_s);
            std::thread::Builder::new().name("dwcp-fleet-jobs".into()).spawn(move || crate::fleet::jobs::run(f, j, rx, after, stop)).map_err(|e| e.to_string())?;
        }
        let _ = self.0.jobs.set(jobs.clone());
        let srv = server.clone();
        // What a previous daemon left running is taken up before new requests are served.
        jobs.recover();
        std::thread::Builder::new().name("dwcp-jobs".into()).spawn(move || jobs.serve(&srv)).map_err(|e| e.to_string())?;
        ctx.put(JobsServer(server, path.clone()));
        Ok(())
    }
    fn stop(&self, ctx: &Ctx) {
        if let Some(s) = ctx.get::<JobsServer>() {
            s.0.unblock();
            let _ = std::fs::remove_file(&s.1);
        }
    }
}

impl Component for FleetC {
    fn spec(&self) -> Spec {
        Spec::new("fleet", Phase::Service).after(&["keys", "host", "config"])
    }
    fn start(&self, ctx: &Ctx) -> Result<(), String> {
        let Some(fc) = &self.0.config.fleet else { return Ok(()) };
        let psk = ctx.get::<Psk>().ok_or("keys missing")?;
        let f = Arc::new(crate::fleet::Fleet::start(fc.options(&self.0.config.api)?, (*psk).clone())?);
        let _ = self.0.fleet.set(f.clone());
        let st = self.0.clone();
        std::thread::Builder::new()
            .name("dwcp-fleet-caps".into())
            .spawn(move || {
                // What this node has, reported at start and every CAPS_EVERY after.
                let mut warned = false;
                while !st.stop.load(Relaxed) {
                    match f.propose(crate::fleet::state::Cmd::Caps { node: f.id(), caps: caps(&st) }) {
                        Ok(_) => warned = false,
                        Err(e) if !warned => {
                            tracing::warn!("fleet: reporting this node's capabilities: {e}");
                            warned = true;
                        }
                        Err(_) => {}
                    }
                    let t = Instant::now();
                    while t.elapsed() < CAPS_EVERY && !st.stop.load(Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(())
    }
    fn stop(&self, _: &Ctx) {
        self.0.fleet_jobs_stop.store(true, Relaxed);
        if let Some(f) = self.0.fleet.get() {
            f.stop();
        }
    }
}

impl Component for GossipC {
    fn spec(&self) -> Spec {
        Spec::new("gossip", Phase::Service).after(&["keys", "host", "config"])
    }
    fn start(&self, ctx: &Ctx) -> Result<(), String> {
        let Some(gc) = &self.0.config.gossip else { return Ok(()) };
        let psk = ctx.get::<Psk>().ok_or("keys missing")?;
        let node = gc.node.or(self.0.config.fleet.as_ref().map(|f| f.id)).ok_or("gossip.node unset")?;
        let st = self.0.clone();
        let site = gc.site.clone();
        let card = move || {
            let c = caps(&st);
            let links = st
                .peer_status
                .lock()
                .expect("peer status lock")
                .iter()
                .take(crate::gossip::MAX_LINKS)
                .filter_map(|p| {
                    let rtt_ms = p.last_rtt_ms.as_ref().ok().copied()?;
                    let bps = p.last_goodput_gbps.or(p.last_probe_gbps).unwrap_or(0.0) * 1e9;
                    Some(crate::gossip::Link { peer: p.name.chars().take(crate::gossip::MAX_NAME).collect(), rtt_ms, bps, mode: p.mode.clone() })
                })
                .collect();
            crate::gossip::Card { node, name: c.name, site: site.clone(), version: c.at_ms, cores: c.cores, rdma: c.rdma, free_bytes: c.free_bytes, links }
        };
        let o = crate::gossip::driver::Options {
            node,
            listen: gc.listen.clone(),
            seeds: gc.seeds.clone(),
            period: Duration::from_millis(gc.period_ms),
            size_hint: gc.size,
            card: Box::new(card),
        };
        let h = crate::gossip::run(o, &psk)?;
        let _ = self.0.gossip.set(Arc::new(h));
        Ok(())
    }
    fn stop(&self, _: &Ctx) {
        if let Some(g) = self.0.gossip.get() {
            g.stop();
        }
    }
}

/// How often a fleet member reports its capabilities.
const CAPS_EVERY: Duration = Duration::from_secs(30);

/// This node's capabilities, as the fleet records them.
fn caps(st: &State) -> crate::fleet::state::Caps {
    let h = st.host.get();
    let free = rustix::fs::statvfs(&st.config.node.out).map(|v| v.f_bavail * v.f_frsize).unwrap_or(0);
    crate::fleet::state::Caps {
        name: st.config.node.name.clone(),
        cores: h.map_or(0, |h| h.cores as u32),
        rdma: h.is_some_and(|h| !h.rdma_devices.is_empty()),
        free_bytes: free,
        at_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
    }
}

/// A finished transfer from a configured peer refreshes its mode with the goodput it reached
/// (with the last probed RTT): a live measurement, not only the probe's. It is reckoned over the
/// data phase: the verification and sync after it are the receiver's, not the path's.
fn feed_goodput(st: &State, o: &dataplane::recv::SessionOutcome) {
    let (Some(ip), true) = (o.peer, o.received >= 1 << 20 && o.data_wall > Duration::from_millis(10)) else { return };
    let gbps = o.received as f64 * 8.0 / o.data_wall.as_secs_f64() / 1e9;
    let mut ps = st.peer_status.lock().expect("peer status lock");
    let Some(p) = ps.iter_mut().find(|p| p.ips.contains(&ip)) else { return };
    p.last_goodput_gbps = Some(gbps);
    let Ok(rtt_ms) = p.last_rtt_ms else { return };
    let mut peers = st.peers.lock().expect("peers lock");
    let at = st.epoch.elapsed();
    if let Some(sw) = peers.observe(&p.name, Sample { at, rtt: Duration::from_secs_f64(rtt_ms / 1e3), bw_bps: gbps * 1e9 }) {
        tracing::info!(peer = %p.name, ?sw, "mode switch from a live transfer");
    }
}

/// Bulk bytes of each periodic probe: enough to time the delivery rate on a datacenter path,
/// small next to the traffic a peer carries (a long path's probe ends in slow start, so its rate
/// is a lower bound that live transfers refine).
const PROBE_BULK: u64 = 4 << 20;

fn probe_peers(st: &State, psk: &Psk) {
    let epoch = st.epoch;
    for p in st.config.peers.clone() {
        let o = dataplane::probe::ProbeOptions { bulk_bytes: PROBE_BULK, timeout: Duration::from_secs(2), ..Default::default() };
        let est = dataplane::probe::measure(&p.addr, psk, o).map_err(|e| e.to_string());
        let r = est.as_ref().map(|e| e.rtt_min).map_err(Clone::clone);
        let ips: Vec<std::net::IpAddr> = p.addr.to_socket_addrs().map(|a| a.map(|s| s.ip()).collect()).unwrap_or_default();
        let mut peers = st.peers.lock().expect("peers lock");
        if let Ok(e) = &est {
            if let Some(sw) = peers.observe(&p.name, Sample { at: epoch.elapsed(), rtt: e.rtt_min, bw_bps: e.bw_bps }) {
                tracing::info!(peer = %p.name, ?sw, "mode switch");
            }
            st.metrics.peer_rtt.with_label_values(&[&p.name]).set(e.rtt_min.as_secs_f64());
            if e.bw_bps.is_finite() {
                st.metrics.peer_probe_bw.with_label_values(&[&p.name]).set(e.bw_bps);
            }
        } else if let Err(e) = &est {
            tracing::warn!(peer = %p.name, "probe failed: {e}");
        }
        let mode = peers.modes().into_iter().find(|(n, _)| *n == p.name).map(|(_, m)| m).unwrap_or(Mode::Internet);
        for m in [Mode::Datacenter, Mode::Internet] {
            st.metrics.peer_mode.with_label_values(&[p.name.as_str(), m.name()]).set(f64::from(u8::from(m == mode)));
        }
        let mut ps = st.peer_status.lock().expect("peer status lock");
        if let Some(e) = ps.iter_mut().find(|e| e.name == p.name) {
            e.mode = mode.name().to_owned();
            let h = st.host.get();
            e.defaults = crate::mode::defaults(mode, h.is_some_and(|h| !h.rdma_devices.is_empty()), h.map_or(1, |h| h.cores), r.as_ref().ok().copied());
            e.last_rtt_ms = r.map(|d| d.as_secs_f64() * 1e3);
            e.last_probe_gbps = est.ok().map(|e| e.bw_bps / 1e9).filter(|b| b.is_finite());
            e.ips = ips;
        }
    }
}

impl Component for PeersC {
    fn spec(&self) -> Spec {
        Spec::new("peers", Phase::PostInit).after(&["config"])
    }
    fn start(&self, _: &Ctx) -> Result<(), String> {
        let t = self.0.config.thresholds();
        let mut peers = self.0.peers.lock().expect("peers lock");
        let mut ps = self.0.peer_status.lock().expect("peer status lock");
        for p in &self.0.config.peers {
            peers.add(&p.name, t, Mode::Internet);
            let defaults = crate::mode::defaults(Mode::Internet, false, 1, None);
            ps.push(PeerStatus {
                name: p.name.clone(),
                addr: p.addr.clone(),
                mode: "internet".into(),
                last_rtt_ms: Err("not measured yet".into()),
                last_probe_gbps: None,
                last_goodput_gbps: None,
                defaults,
                ips: Vec::new(),
            });
        }
        Ok(())
    }
}

impl Component for ModeC {
    fn spec(&self) -> Spec {
        Spec::new("mode", Phase::PostInit).after(&["peers", "keys"]).optional()
    }
    fn start(&self, ctx: &Ctx) -> Result<(), String> {
        let st = self.0.clone();
        let psk = (*ctx.get::<Psk>().ok_or("keys missing")?).clone();
        let every = Duration::from_secs_f64(st.config.mode.probe_interval_s);
        std::thread::Builder::new()
            .name("dwcp-mode".into())
            .spawn(move || {
                while !st.stop.load(Relaxed) {
                    probe_peers(&st, &psk);
                    let t = Instant::now();
                    while t.elapsed() < every && !st.stop.load(Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

impl Component for ReadyC {
    fn spec(&self) -> Spec {
        Spec::new("ready", Phase::PostInit).after(&["api", "sessions", "peers", "jobs"])
    }
    fn start(&self, _: &Ctx) -> Result<(), String> {
        self.0.ready.store(true, Relaxed);
        // Tells systemd (Type=notify) we are ready; a no-op without NOTIFY_SOCKET.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        // Under WatchdogSec=, the watchdog is fed only while the daemon's own HTTP endpoint
        // answers /healthz: a daemon whose API thread hangs is restarted, not kept alive by a
        // timer thread that outlived it.
        if let (Some(every), Some(api)) = (sd_notify::watchdog_enabled(), self.0.api.get().copied()) {
            let st = self.0.clone();
            std::thread::Builder::new()
                .name("dwcp-watchdog".into())
                .spawn(move || {
                    while !st.stop.load(Relaxed) {
                        if healthy(api, every / 4) {
                            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                        } else {
                            tracing::warn!(%api, "the HTTP endpoint did not answer /healthz: the systemd watchdog is not fed");
                        }
                        std::thread::sleep(every / 2);
                    }
                })
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Whether the HTTP endpoint at `api` answers `GET /healthz` with 200 within `within`.
fn healthy(api: SocketAddr, within: Duration) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect_timeout(&api, within) else { return false };
    let _ = c.set_read_timeout(Some(within));
    let _ = c.set_write_timeout(Some(within));
    if c.write_all(b"GET /healthz HTTP/1.0\r\nHost: dwcp\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    c.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    /// What the API reports.
    pub state: Arc<State>,
    booted: Booted,
}

impl Daemon {
    /// Stops everything in reverse order.
    pub fn shutdown(self) {
        self.state.stop.store(true, Relaxed);
        self.booted.shutdown();
    }
}

/// The daemon's boot graph over `state`.
pub fn graph(state: &Arc<State>) -> Graph {
    let s = || state.clone();
    let comps: Vec<Arc<dyn Component>> = vec![
        Arc::new(HostC(s())),
        Arc::new(ConfigC(s())),
        Arc::new(LoggingC(s())),
        Arc::new(KeysC(s())),
        Arc::new(ListenerC(s())),
        Arc::new(RdmaC(s())),
        Arc::new(BpfC(s())),
        Arc::new(SessionsC(s())),
        Arc::new(ApiC(s())),
        Arc::new(FleetC(s())),
        Arc::new(GossipC(s())),
        Arc::new(JobsC(s())),
        Arc::new(PeersC(s())),
        Arc::new(ModeC(s())),
        Arc::new(ReadyC(s())),
    ];
    Graph::new(comps).expect("the daemon's own graph is well formed")
}

/// Boots the daemon; returns once it is ready (or why it could not be).
pub fn run(config: Config, parallel: bool) -> Result<Daemon, BootError> {
    let state = Arc::new(State {
        config,
        host: OnceLock::new(),
        listener: OnceLock::new(),
        api: OnceLock::new(),
        ready: AtomicBool::new(false),
        boot: Mutex::new(Vec::new()),
        boot_ms: Mutex::new(0.0),
        sessions: Mutex::new(Vec::new()),
        peers: Mutex::new(Peers::default()),
        peer_status: Mutex::new(Vec::new()),
        metrics: Metrics::new(),
        jobs: OnceLock::new(),
        warm: OnceLock::new(),
        fleet: OnceLock::new(),
        gossip: OnceLock::new(),
        fleet_jobs_stop: Arc::default(),
        stop: AtomicBool::new(false),
        epoch: Instant::now(),
    });
    let booted = graph(&state).boot(parallel)?;
    for r in &booted.records {
        let outcome = match r.outcome {
            crate::boot::Outcome::Started => "started",
            crate::boot::Outcome::Degraded(_) => "degraded",
            _ => "other",
        };
        state.metrics.component_seconds.with_label_values(&[r.name.as_str(), &format!("{:?}", r.phase), outcome]).set(r.took.as_secs_f64());
        if outcome == "degraded" {
            state.metrics.degraded.with_label_values(&[&r.name]).set(1.0);
        }
    }
    *state.boot.lock().expect("boot lock") = booted.records.clone();
    *state.boot_ms.lock().expect("boot lock") = booted.took.as_secs_f64() * 1e3;
    Ok(Daemon { state, booted })
}
