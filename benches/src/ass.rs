//! `make bench-ass`: the fleet's shared state (ASS) on the WAN rig's mesh (`hw-tests/wan mesh`,
//! one namespace per daemon, every pair its own emulated link). Per RTT profile:
//!
//! - Raft (three daemons, `[fleet]`): the time to commit a VM handoff asked of the leader and of
//!   a follower (forwarded), against its floor (one round trip from the leader to a majority;
//!   two from a follower); the time from the leader's SIGKILL until a survivor commits again
//!   (election and first commit), against the election timeout.
//! - Gossip (five daemons, `[gossip]`): the time until every node sees every other and holds
//!   every card after they start; until all see a killed node down; the staleness of the cards
//!   held in steady state.
//! - Both: the steady traffic (bytes each node puts on the mesh) and CPU each daemon spends,
//!   idle.
//!
//! Everything is driven through each daemon's jobs socket (a file, reachable across
//! namespaces).
//!
//!   bench-ass [--rounds 3] [--raft 2ms,50ms] [--gossip 50ms,150ms]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use benches::{Figure, Proc, die, in_ns};

/// Gossip probe period in the bench (the default, foca's WAN profile, is 5 s).
const GOSSIP_PERIOD_MS: u64 = 1000;
/// How long the idle cost is watched.
const IDLE: Duration = Duration::from_secs(30);

/// The mesh, taken down when dropped.
struct Mesh(PathBuf);

impl Mesh {
    fn up(root: &Path, n: usize, rtt: &str) -> Mesh {
        let o = Command::new(root.join("hw-tests/wan")).args(["mesh", &n.to_string(), "--rtt", rtt, "--rate", "1gbit"]).output().expect("hw-tests/wan mesh");
        if !o.status.success() {
            die(&format!("hw-tests/wan mesh: {}", String::from_utf8_lossy(&o.stderr)));
        }
        Mesh(root.to_owned())
    }
    /// Bytes each node has put on the mesh so far.
    fn sent(&self) -> Vec<u64> {
        let o = Command::new(self.0.join("hw-tests/wan")).arg("mesh-stats").output().expect("mesh-stats");
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v["from"].as_array().into_iter().flatten().map(|f| f["bytes"].as_u64().unwrap_or(0)).collect()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = Command::new(self.0.join("hw-tests/wan")).arg("mesh-down").status();
    }
}

/// A daemon in namespace `dwcp-mI`.
struct Daemon {
    cfg: PathBuf,
    sock: PathBuf,
    ns: String,
    proc: Option<Proc>,
}

impl Daemon {
    fn start(&mut self, dwcp: &Path) {
        let _ = std::fs::remove_file(&self.sock);
        let mut c = in_ns(&self.ns, dwcp);
        c.args(["daemon", "--config"]).arg(&self.cfg).stdout(Stdio::null()).stderr(Stdio::null());
        self.proc = Some(Proc::group(&mut c).unwrap_or_else(|e| die(&format!("starting a daemon: {e}"))));
        let t = Instant::now();
        while !self.sock.exists() {
            if t.elapsed() > Duration::from_secs(20) {
                die(&format!("the daemon in {} did not bind its socket", self.ns));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn kill(&mut self) {
        self.proc = None;
    }
    fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.0.id())
    }
    /// One request on the jobs socket: status and JSON body.
    fn http(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.sock) else { return (0, Value::Null) };
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let _ = write!(s, "{method} {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (code, serde_json::from_str(body).unwrap_or(Value::Null))
    }
    fn view(&self) -> Value {
        self.http("GET", "/fleet", "").1
    }
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_s(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = s.rsplit_once(')').map_or("", |x| x.1).split_whitespace().collect();
    let tick = 100.0;
    (f.get(11).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0) + f.get(12).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0)) / tick
}

fn ms(rtt: &str) -> f64 {
    rtt.trim_end_matches("ms").parse().unwrap_or_else(|_| die(&format!("{rtt}: give milliseconds, e.g. 50ms")))
}

/// `n` daemons in the mesh's namespaces, with `extra(i)` appended to daemon i's config.
fn daemons(dir: &Path, key: &Path, n: usize, extra: impl Fn(usize) -> String) -> Vec<Daemon> {
    (1..=n)
        .map(|i| {
            let d = dir.join(format!("n{i}"));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            let (cfg, sock) = (d.join("dwcp.toml"), d.join("api.sock"));
            let t = format!(
                "[node]\nname = \"n{i}\"\nlisten = \"10.78.0.{i}:7470\"\nout = \"{}\"\nkey_file = \"{}\"\n[api]\nlisten = \"127.0.0.1:7471\"\nsocket = \"{}\"\n[log]\nlevel = \"warn\"\n{}",
                d.join("out").display(),
                key.display(),
                sock.display(),
                extra(i)
            );
            std::fs::write(&cfg, t).unwrap();
            Daemon { cfg, sock, ns: format!("dwcp-m{i}"), proc: None }
        })
        .collect()
}

/// The leader all live daemons agree on, other than `not` (within 60 s).
fn agreed_leader(ds: &[Daemon], not: u64) -> u64 {
    let t = Instant::now();
    loop {
        let ls: Vec<Option<u64>> = ds.iter().filter(|d| d.proc.is_some()).map(|d| d.view()["status"]["leader"].as_u64()).collect();
        if let Some(Some(l)) = ls.first()
            && *l != not
            && ls.iter().all(|x| *x == Some(*l))
        {
            return *l;
        }
        if t.elapsed() > Duration::from_secs(60) {
            die(&format!("no agreed leader: {ls:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The idle cost of `ds` over [`IDLE`]: per node, bytes per second on the mesh and CPU percent.
fn idle_cost(mesh: &Mesh, ds: &[Daemon]) -> (Figure, Figure) {
    let (b0, c0): (Vec<u64>, Vec<f64>) = (mesh.sent(), ds.iter().map(|d| d.pid().map_or(0.0, cpu_s)).collect());
    let t = Instant::now();
    std::thread::sleep(IDLE);
    let secs = t.elapsed().as_secs_f64();
    let (b1, c1): (Vec<u64>, Vec<f64>) = (mesh.sent(), ds.iter().map(|d| d.pid().map_or(0.0, cpu_s)).collect());
    let bps = b0.iter().zip(&b1).map(|(a, b)| (b - a) as f64 * 8.0 / secs).collect();
    let cpu = c0.iter().zip(&c1).map(|(a, b)| (b - a) / secs * 100.0).collect();
    (Figure::new(bps), Figure::new(cpu))
}

fn raft(root: &Path, dwcp: &Path, key: &Path, dir: &Path, rtt: &str, rounds: usize, figs: &mut Map<String, Value>) {
    let r = ms(rtt);
    let mesh = Mesh::up(root, 3, rtt);
    // Heartbeats of two round trips (at least 50 ms): elections time out after 5 to 10 of them.
    let hb = (2.0 * r).max(50.0) as u64;
    let members = "[{ id = 1, addr = \"10.78.0.1:7472\" }, { id = 2, addr = \"10.78.0.2:7472\" }, { id = 3, addr = \"10.78.0.3:7472\" }]";
    let mut ds = daemons(dir, key, 3, |i| format!("[fleet]\nid = {i}\nlisten = \"10.78.0.{i}:7472\"\nmembers = {members}\nheartbeat_ms = {hb}\ncommit_timeout_s = 10\n"));
    for d in &mut ds {
        d.start(dwcp);
    }
    let l = agreed_leader(&ds, 0);
    let (code, v) = ds[l as usize - 1].http("POST", "/fleet/vms/bench/claim", "{}");
    if code != 200 {
        die(&format!("claiming the bench VM: {v}"));
    }
    // Handoffs, alternately asked of the leader and of a follower.
    let (mut from_leader, mut from_follower) = (Vec::new(), Vec::new());
    let mut owner = (l, 1u64);
    for i in 0..20 * rounds {
        let asker = if i % 2 == 0 { l } else { (l % 3) + 1 };
        let to = (owner.0 % 3) + 1;
        let body = json!({"from": owner.0, "to": to, "epoch": owner.1}).to_string();
        let t = Instant::now();
        let (code, v) = ds[asker as usize - 1].http("POST", "/fleet/vms/bench/handoff", &body);
        let took = t.elapsed().as_secs_f64() * 1e3;
        if code != 200 {
            die(&format!("handoff: {code} {v}"));
        }
        owner = (to, v["epoch"].as_u64().unwrap_or(0));
        if asker == l { from_leader.push(took) } else { from_follower.push(took) }
    }
    let (fl, ff) = (Figure::new(from_leader), Figure::new(from_follower));
    let (idle_bps, idle_cpu) = idle_cost(&mesh, &ds);
    // Failover: the leader SIGKILLed; until a survivor has committed a claim.
    let mut failover = Vec::new();
    let mut elected = Vec::new();
    for k in 0..rounds {
        let l = agreed_leader(&ds, 0);
        let t = Instant::now();
        ds[l as usize - 1].kill();
        let survivor = (l % 3) as usize; // index of another node
        let l2 = agreed_leader(&ds, l);
        elected.push(t.elapsed().as_secs_f64());
        let (code, v) = ds[survivor].http("POST", &format!("/fleet/vms/after-{k}/claim"), "{}");
        if code != 200 {
            die(&format!("no commit after the failover: {code} {v}"));
        }
        failover.push(t.elapsed().as_secs_f64());
        eprintln!("  failover {k}: node {l} killed, node {l2} leads after {:.2} s, first commit after {:.2} s", elected[k], failover[k]);
        ds[l as usize - 1].start(dwcp);
        let _ = agreed_leader(&ds, 0);
    }
    let (el, fo) = (Figure::new(elected), Figure::new(failover));
    let hb_s = hb as f64 / 1e3;
    println!(
        "raft {rtt:>6}  handoff {:>7.1} ms from the leader ({:.1} RTT), {:>7.1} ms from a follower ({:.1} RTT); leader killed: new leader {:.2} s, commit {:.2} s (election timeout {:.2}-{:.2} s); idle {:.0} bit/s, {:.2}% CPU per node",
        fl.median(),
        fl.median() / r,
        ff.median(),
        ff.median() / r,
        el.median(),
        fo.median(),
        5.0 * hb_s,
        10.0 * hb_s,
        idle_bps.median(),
        idle_cpu.median()
    );
    let tag = rtt.replace("ms", "");
    figs.insert(format!("raft_handoff_ms_leader_{tag}ms"), fl.json());
    figs.insert(format!("raft_handoff_ms_follower_{tag}ms"), ff.json());
    figs.insert(format!("raft_handoff_rtts_leader_{tag}ms"), Figure::new(fl.runs.iter().map(|x| x / r).collect()).json());
    figs.insert(format!("raft_new_leader_s_{tag}ms"), el.json());
    figs.insert(format!("raft_failover_commit_s_{tag}ms"), fo.json());
    figs.insert(format!("raft_election_timeout_s_{tag}ms"), json!([5.0 * hb_s, 10.0 * hb_s]));
    figs.insert(format!("raft_idle_bps_per_node_{tag}ms"), idle_bps.json());
    figs.insert(format!("raft_idle_cpu_pct_per_node_{tag}ms"), idle_cpu.json());
    drop(ds);
    drop(mesh);
}

fn gossip(root: &Path, dwcp: &Path, key: &Path, dir: &Path, rtt: &str, rounds: usize, figs: &mut Map<String, Value>) {
    const N: usize = 5;
    let mesh = Mesh::up(root, N, rtt);
    let mut ds = daemons(dir, key, N, |i| {
        format!(
            "[gossip]\nnode = {i}\nlisten = \"10.78.0.{i}:7473\"\nseeds = [\"10.78.0.1:7473\", \"10.78.0.2:7473\"]\nsite = \"site{i}\"\nperiod_ms = {GOSSIP_PERIOD_MS}\nsize = {N}\n"
        )
    });
    let all_see = |ds: &[Daemon], alive: u64, cards: usize| {
        ds.iter().filter(|d| d.proc.is_some()).all(|d| {
            let g = d.view()["gossip"].clone();
            g["alive"] == alive && g["cards"].as_array().map_or(0, Vec::len) >= cards
        })
    };
    let (mut join, mut down, mut stale_med, mut stale_max) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for k in 0..rounds {
        let t = Instant::now();
        for d in &mut ds {
            d.start(dwcp);
        }
        while !all_see(&ds, N as u64, N) {
            if t.elapsed() > Duration::from_secs(120) {
                die("gossip never converged");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        join.push(t.elapsed().as_secs_f64());
        // Steady state: the staleness of every card each node holds, sampled for 10 s.
        let mut samples = Vec::new();
        let t1 = Instant::now();
        while t1.elapsed() < Duration::from_secs(10) {
            for d in &ds {
                for c in d.view()["gossip"]["cards"].as_array().into_iter().flatten() {
                    samples.push(c["heard_s"].as_f64().unwrap_or(0.0));
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        stale_med.push(benches::median(&samples));
        stale_max.push(samples.iter().copied().fold(0.0, f64::max));
        let t = Instant::now();
        ds[N - 1].kill();
        while !all_see(&ds, N as u64 - 1, 0) {
            if t.elapsed() > Duration::from_secs(180) {
                die("a killed node was never declared down by all");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        down.push(t.elapsed().as_secs_f64());
        eprintln!(
            "  gossip round {k}: all see all in {:.2} s; staleness median {:.2} s, max {:.2} s; a killed node down at all in {:.2} s",
            join[k], stale_med[k], stale_max[k], down[k]
        );
        if k + 1 < rounds {
            for d in &mut ds {
                d.kill();
            }
        }
    }
    ds[N - 1].start(dwcp);
    while !all_see(&ds, N as u64, N) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (idle_bps, idle_cpu) = idle_cost(&mesh, &ds);
    let (j, dn, sm, sx) = (Figure::new(join), Figure::new(down), Figure::new(stale_med), Figure::new(stale_max));
    println!(
        "gossip {rtt:>5}  {N} nodes see all in {:.2} s; a dead one is down at all in {:.2} s; card staleness median {:.2} s, max {:.2} s (period {} ms); idle {:.0} bit/s, {:.2}% CPU per node",
        j.median(),
        dn.median(),
        sm.median(),
        sx.median(),
        GOSSIP_PERIOD_MS,
        idle_bps.median(),
        idle_cpu.median()
    );
    let tag = rtt.replace("ms", "");
    figs.insert(format!("gossip_converge_s_{tag}ms"), j.json());
    figs.insert(format!("gossip_down_s_{tag}ms"), dn.json());
    figs.insert(format!("gossip_staleness_median_s_{tag}ms"), sm.json());
    figs.insert(format!("gossip_staleness_max_s_{tag}ms"), sx.json());
    figs.insert(format!("gossip_idle_bps_per_node_{tag}ms"), idle_bps.json());
    figs.insert(format!("gossip_idle_cpu_pct_per_node_{tag}ms"), idle_cpu.json());
    drop(ds);
    drop(mesh);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |k: &str, d: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| d.to_owned());
    let rounds: usize = opt("--rounds", "3").parse().unwrap_or_else(|_| die("--rounds takes a number"));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
    let dwcp = root.join("target/release/dwcp");
    let dir = std::env::temp_dir().join(format!("dwcp-bench-ass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key");
    if !Command::new(&dwcp).args(["keygen", "--force"]).arg(&key).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
        die("dwcp keygen failed (cargo build --release -p dwcp)");
    }
    let mut figs = Map::new();
    println!("bench-ass: {rounds} rounds; Raft on 3 daemons, gossip on 5, each in its own namespace of the WAN rig's mesh (1 Gbit/s links)");
    // The peer: the same daemons with no fleet, idle, so that what the fleet costs stands apart.
    {
        let mesh = Mesh::up(&root, 3, "2ms");
        let mut ds = daemons(&dir, &key, 3, |_| String::new());
        for d in &mut ds {
            d.start(&dwcp);
        }
        let (bps, cpu) = idle_cost(&mesh, &ds);
        println!("no fleet        idle {:.0} bit/s, {:.2}% CPU per node (the daemon alone)", bps.median(), cpu.median());
        figs.insert("baseline_idle_bps_per_node".into(), bps.json());
        figs.insert("baseline_idle_cpu_pct_per_node".into(), cpu.json());
    }
    for rtt in opt("--raft", "2ms,50ms").split(',') {
        raft(&root, &dwcp, &key, &dir, rtt, rounds, &mut figs);
    }
    for rtt in opt("--gossip", "50ms,150ms").split(',') {
        gossip(&root, &dwcp, &key, &dir, rtt, rounds, &mut figs);
    }
    println!("(handoff: POST /fleet/vms/NAME/handoff on the jobs socket, committed by a majority, fsync included; a follower forwards it to the leader)");
    figs.insert("rounds".into(), json!(rounds));
    figs.insert("gossip_period_ms".into(), json!(GOSSIP_PERIOD_MS));
    let _ = std::fs::remove_dir_all(&dir);
    benches::emit(&root.join("target/bench/ass.json"), Value::Object(figs));
}
