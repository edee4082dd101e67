//! `make bench-migrate`: live migration of the same guests (`hw-tests/migrate-guest`, 256 MiB)
//! over the WAN rig (`hw-tests/wan`, source QEMU in `dwcp-a`, destination in `dwcp-b`), same
//! run: QEMU's own migration (plain, xbzrle, multifd with 4 channels and zstd) against dwcp
//! (`dwcp migrate`) in tunnel mode and in page-aware mode (RAM pages delta-encoded across
//! rounds), on three links: 200 Mbit/s clean (2 ms), 200 Mbit/s at 50 ms with 0.1% loss,
//! 200 Mbit/s at 150 ms with 1% loss. Two guests: `random` (64 MiB of random data, 4 MiB of
//! random scratch rewritten over and over) and `mix` (16 MiB random, text, eight copies of a
//! binary, a heap of records updated in place, 1 MiB/s of random scratch).
//! Each run is limited to `--limit` seconds (a single lossy TCP stream can need far more: it is
//! then reported as not finished, with the share it sent). Figures: total time (until the
//! destination runs), downtime (QEMU's own event stamps: the source's STOP to the destination's
//! RESUME), rounds, RAM bytes sent (for dwcp: QEMU's stream and the bytes dwcp put on its
//! streams). QEMU picks no congestion control: its streams get the host's default. It runs once
//! with the namespaces' default as the host has it, and (plain and multifd, `METHOD@cubic`) with
//! cubic, Debian's default; speedups are reported against both, per guest and link
//! (`speedup_150ms_mix`), and as headline figures the worst over the guests run.
//!
//! `daemon` is page-aware mode as a job of a `dwcp daemon` that keeps warm streams to the
//! destination's receiver (`dwcp migrate --via-daemon`), timed from the submission; it is
//! reported beside the headline figures (`daemon_vs_cold_150ms_mix`: a cold page-aware `dwcp
//! migrate`'s time over the job's; `daemon_speedup_150ms_mix`: the best QEMU method's over the
//! job's), which stay those of a cold `dwcp migrate`.
//!
//!   bench-migrate [--limit 90] [--profiles clean,50ms,150ms] [--methods plain,xbzrle,multifd+zstd,tunnel,pages,daemon] [--workloads random,mix]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use benches::{Proc, die};

/// The source daemon's HTTP endpoint (`dwcp daemon` method), inside `dwcp-a`.
const DAEMON_API: &str = "127.0.0.1:7498";

struct Qmp(BufReader<UnixStream>, UnixStream);

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > Duration::from_secs(20) => die(&format!("{}: {e}", path.display())),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let mut q = Qmp(BufReader::new(s.try_clone().expect("clone")), s);
        let mut l = String::new();
        q.0.read_line(&mut l).expect("greeting");
        q.cmd("qmp_capabilities", Value::Null);
        q
    }
    fn cmd(&mut self, name: &str, args: Value) -> Value {
        let m = if args.is_null() { json!({"execute": name}) } else { json!({"execute": name, "arguments": args}) };
        writeln!(self.1, "{m}").expect("qmp write");
        loop {
            let mut l = String::new();
            if self.0.read_line(&mut l).unwrap_or(0) == 0 {
                return json!({"error": {"desc": "QEMU closed QMP"}});
            }
            let v: Value = serde_json::from_str(&l).unwrap_or(Value::Null);
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    }

    /// The timestamp (seconds of the host's real-time clock, as QEMU stamps its events) of the
    /// first `name` event on this connection, waiting up to `wait` for it.
    fn event_time(&mut self, name: &str, wait: Duration) -> Option<f64> {
        let t = Instant::now();
        self.1.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
        while t.elapsed() < wait {
            let mut l = String::new();
            match self.0.read_line(&mut l) {
                Ok(0) => return None,
                Ok(_) => {
                    let v: Value = serde_json::from_str(&l).unwrap_or(Value::Null);
                    if v["event"] == name {
                        let ts = &v["timestamp"];
                        return Some(ts["seconds"].as_f64()? + ts["microseconds"].as_f64()? / 1e6);
                    }
                }
                Err(_) => {}
            }
        }
        None
    }
}

struct Env {
    root: PathBuf,
    dir: PathBuf,
    initrd: PathBuf,
    kernel: String,
    /// The guest's RAM for `-m` (`hw-tests/migrate-guest mem`: not a multiple of 64 pages, which
    /// QEMU 7.2 migrates wrongly under TCG).
    mem: String,
    key: PathBuf,
}

fn in_ns(ns: &str, args: &[String]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

impl Env {
    fn qemu(&self, ns: &str, tag: &str, incoming: &str) -> Proc {
        let mut a: Vec<String> =
            ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", &self.mem, "-smp", "1", "-kernel", &self.kernel, "-initrd"].map(String::from).to_vec();
        a.push(self.initrd.display().to_string());
        a.extend(["-append", "console=ttyS0 quiet rdinit=/init", "-display", "none", "-nodefaults", "-serial"].map(String::from));
        a.push(format!("file:{}", self.dir.join(format!("{tag}.log")).display()));
        a.push("-qmp".into());
        a.push(format!("unix:{},server,nowait", self.dir.join(format!("{tag}.qmp")).display()));
        // A second monitor that only watches events: the downtime is read from QEMU's own
        // timestamps (the source's STOP, the destination's RESUME), whoever drives the migration.
        a.push("-qmp".into());
        a.push(format!("unix:{},server,nowait", self.dir.join(format!("{tag}-ev.qmp")).display()));
        if !incoming.is_empty() {
            a.push("-incoming".into());
            a.push(incoming.into());
        }
        let err = std::fs::File::create(self.dir.join(format!("{tag}-qemu.log"))).expect("qemu log");
        Proc::group(in_ns(ns, &a).stdout(Stdio::null()).stderr(err)).unwrap_or_else(|e| die(&format!("qemu: {e} (make vm-deps)")))
    }

    /// Whether the migrated guest runs on and its data checks out: its first self-check on the
    /// destination (`CHECK ok N`), read from the destination's console. A migration counts only
    /// then: QEMU under TCG has resumed guests that crashed at once (the thirteenth session's
    /// note), and the events the figures come from do not show that.
    fn guest_after(&self, resumed: bool) -> String {
        if !resumed {
            return "not resumed".into();
        }
        let t = Instant::now();
        loop {
            let log = std::fs::read_to_string(self.dir.join("dst.log")).unwrap_or_default();
            if let Some(l) = log.lines().find(|l| l.contains("CHECK BAD") || l.contains("BUG:") || l.contains("Kernel panic") || l.contains("Oops")) {
                return format!("broken: {}", l.trim());
            }
            if log.lines().any(|l| l.starts_with("CHECK ok")) {
                return "ok".into();
            }
            if t.elapsed() > Duration::from_secs(30) {
                return "no self-check within 30 s".into();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// One migration; returns its figures.
    fn run(&self, label: &str, limit: Duration) -> Value {
        // `METHOD@CC`: QEMU's own migration with CC as the namespaces' default congestion
        // control (QEMU does not choose one: it gets the host's; Debian's default is cubic).
        let (method, cc) = label.split_once('@').unwrap_or((label, ""));
        if cc.is_empty() {
            let o = in_ns("dwcp-a", &["sysctl".into(), "-n".into(), "net.ipv4.tcp_congestion_control".into()]).output().expect("sysctl");
            let mut r = self.run_one(method, limit);
            r["qemu_cc"] = json!(String::from_utf8_lossy(&o.stdout).trim());
            r["method"] = json!(label);
            return r;
        }
        // The routes' `congctl` (a namespace may not make a restricted algorithm its default):
        // each namespace's route to its peer, as `ip route` prints it, changed and then restored.
        let routes: Vec<(&str, String)> = [("dwcp-a", "10.77.0.2"), ("dwcp-b", "10.77.0.1")]
            .iter()
            .map(|(ns, peer)| {
                let o = in_ns(ns, &["ip".into(), "route".into(), "show".into(), (*peer).into()]).output().expect("ip route");
                (*ns, String::from_utf8_lossy(&o.stdout).trim().to_string())
            })
            .collect();
        let set = |extra: &[&str]| {
            for (ns, route) in &routes {
                let mut a: Vec<String> = vec!["ip".into(), "route".into(), "change".into()];
                a.extend(route.split_whitespace().map(String::from));
                a.extend(extra.iter().map(|x| x.to_string()));
                if !in_ns(ns, &a).status().is_ok_and(|s| s.success()) {
                    die(&format!("cannot set {extra:?} on the route in {ns}"));
                }
            }
        };
        set(&["congctl", cc]);
        let mut r = self.run_one(method, limit);
        set(&[]);
        r["qemu_cc"] = json!(cc);
        r["method"] = json!(label);
        r
    }

    /// A `dwcp daemon` in `dwcp-a` keeping warm streams to the destination's receiver
    /// (10.77.0.2:7471), once its pool is full; its jobs socket.
    fn warm_daemon(&self) -> (Proc, PathBuf) {
        let dwcp = self.root.join("target/release/dwcp");
        let (cfg, sock) = (self.dir.join("daemon.toml"), self.dir.join("api.sock"));
        let _ = std::fs::remove_file(&sock);
        let toml = format!(
            "[node]\nname = \"src\"\nlisten = \"10.77.0.1:7490\"\nout = \"{}\"\nkey_file = \"{}\"\n[api]\nlisten = \"{DAEMON_API}\"\nsocket = \"{}\"\n[mode]\nprobe_interval_s = 3600\n[[peers]]\nname = \"dst\"\naddr = \"10.77.0.2:7471\"\n",
            self.dir.join("daemon-out").display(),
            self.key.display(),
            sock.display()
        );
        std::fs::write(&cfg, toml).unwrap_or_else(|e| die(&format!("{}: {e}", cfg.display())));
        let log = std::fs::File::create(self.dir.join("daemon.log")).expect("daemon.log");
        let p = Proc::group(in_ns("dwcp-a", &[dwcp.display().to_string(), "daemon".into(), "--config".into(), cfg.display().to_string()]).stdout(Stdio::null()).stderr(log))
            .unwrap_or_else(|e| die(&format!("dwcp daemon: {e}")));
        benches::warm_pool_ready(&dwcp, DAEMON_API);
        (p, sock)
    }

    fn run_one(&self, method: &str, limit: Duration) -> Value {
        for f in ["src.log", "dst.log", "src.qmp", "dst.qmp", "src-ev.qmp", "dst-ev.qmp"] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        let dwcp = self.root.join("target/release/dwcp");
        let incoming = match method {
            "dwcp tunnel" | "dwcp pages" | "dwcp daemon" => {
                format!("exec:{} recv --listen 10.77.0.2:7471 --out - --once --key-file {} 2>{}", dwcp.display(), self.key.display(), self.dir.join("recv.log").display())
            }
            "multifd+zstd" => "defer".into(),
            _ => "tcp:10.77.0.2:4444".into(),
        };
        let _dst = self.qemu("dwcp-b", "dst", &incoming);
        let _src = self.qemu("dwcp-a", "src", "");
        let t = Instant::now();
        while !std::fs::read_to_string(self.dir.join("src.log")).is_ok_and(|s| s.contains("CHECK ok 2")) {
            if t.elapsed() > Duration::from_secs(120) {
                die("the source guest did not come up");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut src = Qmp::connect(&self.dir.join("src.qmp"));
        let mut dst = Qmp::connect(&self.dir.join("dst.qmp"));
        let mut watch = (Qmp::connect(&self.dir.join("src-ev.qmp")), Qmp::connect(&self.dir.join("dst-ev.qmp")));
        let caps = |q: &mut Qmp, c: &[&str]| {
            let list: Vec<Value> = c.iter().map(|n| json!({"capability": n, "state": true})).collect();
            q.cmd("migrate-set-capabilities", json!({"capabilities": list}))
        };
        match method {
            "xbzrle" => {
                caps(&mut src, &["xbzrle"]);
                caps(&mut dst, &["xbzrle"]);
                src.cmd("migrate-set-parameters", json!({"xbzrle-cache-size": 64u64 << 20}));
            }
            "multifd+zstd" => {
                for q in [&mut src, &mut dst] {
                    caps(q, &["multifd"]);
                    q.cmd("migrate-set-parameters", json!({"multifd-channels": 4, "multifd-compression": "zstd"}));
                }
                dst.cmd("migrate-incoming", json!({"uri": "tcp:10.77.0.2:4444"}));
            }
            _ => {}
        }
        // No bandwidth cap from QEMU's side: the link decides.
        src.cmd("migrate-set-parameters", json!({"max-bandwidth": 1u64 << 40}));
        // `dwcp daemon`: a daemon in the source's namespace that keeps warm streams to the
        // destination's receiver, started once that listens and ready before the clock starts
        // (as a host's daemon is, long before a migration).
        let daemon = (method == "dwcp daemon").then(|| self.warm_daemon());
        let t0 = Instant::now();
        if let Some(mode) = method.strip_prefix("dwcp ") {
            // QEMU's QMP socket takes one client: `dwcp migrate` drives and reports it.
            drop(src);
            let mut a: Vec<String> = vec![
                dwcp.display().to_string(),
                "-v".into(),
                "migrate".into(),
                "--qmp".into(),
                self.dir.join("src.qmp").display().to_string(),
                "--to".into(),
                "10.77.0.2:7471".into(),
                "--json".into(),
            ];
            match &daemon {
                Some((_, sock)) => a.extend(["--via-daemon".into(), sock.display().to_string()]),
                None => a.extend(["--key-file".into(), self.key.display().to_string(), "--mode".into(), mode.into()]),
            }
            // Extra `dwcp send` flags for experiments, e.g. DWCP_SEND_FLAGS="--zerocopy off".
            if let Ok(f) = std::env::var("DWCP_SEND_FLAGS")
                && daemon.is_none()
            {
                a.push("--".into());
                a.extend(f.split_whitespace().map(String::from));
            }
            let log = std::fs::File::create(self.dir.join("migrate.log")).expect("migrate.log");
            let mut p = Proc(in_ns("dwcp-a", &a).stdout(Stdio::piped()).stderr(log).spawn().expect("dwcp migrate"));
            let out = p.0.stdout.take().expect("stdout");
            let reader = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = BufReader::new(out).read_line(&mut s);
                s
            });
            let mut resumed = None;
            while t0.elapsed() < limit && (p.0.try_wait().ok().flatten().is_none() || resumed.is_none()) {
                if resumed.is_none() && dst.cmd("query-status", Value::Null)["return"]["status"] == "running" {
                    resumed = Some(t0.elapsed());
                }
                if p.0.try_wait().ok().flatten().is_some() && resumed.is_none() && t0.elapsed() > limit {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let finished = p.0.try_wait().ok().flatten().is_some();
            drop(p);
            let line = reader.join().unwrap_or_default();
            let _ = std::fs::write(self.dir.join("migrate.json"), &line);
            let j: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
            let guest = self.guest_after(resumed.is_some());
            let ok = j["status"] == "completed" && resumed.is_some() && guest == "ok";
            let mut r = figures(
                method,
                ok,
                finished,
                t0,
                resumed,
                downtime(&mut watch, ok),
                j["total_time_ms"].as_f64(),
                j["downtime_ms"].as_f64(),
                &j["rounds"],
                j["ram_transferred"].as_f64(),
            );
            r["guest"] = json!(guest);
            r["wire_mib"] = json!(j["transfer"]["sent_bytes"].as_f64().unwrap_or(0.0) / 1048576.0);
            r["page_aware"] = j["transfer"]["qemu"].clone();
            // When dwcp told QEMU to complete (the round, and the downtime it expected then).
            r["completion"] = j["completion"].clone();
            if daemon.is_some() {
                r["warm"] = j["warm"].clone();
            }
            return r;
        } else {
            let r = src.cmd("migrate", json!({"uri": "tcp:10.77.0.2:4444"}));
            if r.get("error").is_some() {
                return json!({"method": method, "status": "refused", "error": r["error"]["desc"]});
            }
        }
        let (mut last, mut resumed, mut done) = (Value::Null, None, false);
        while t0.elapsed() < limit && !(done && resumed.is_some()) {
            if !done {
                let r = src.cmd("query-migrate", Value::Null);
                if let Some(s) = r["return"]["status"].as_str() {
                    last = r["return"].clone();
                    done = matches!(s, "completed" | "failed" | "cancelled");
                    if done && s != "completed" {
                        break;
                    }
                }
            }
            if resumed.is_none() && dst.cmd("query-status", Value::Null)["return"]["status"] == "running" {
                resumed = Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !done {
            src.cmd("migrate_cancel", Value::Null);
        }
        let guest = self.guest_after(resumed.is_some());
        let ok = last["status"] == "completed" && resumed.is_some() && guest == "ok";
        let mut r = figures(
            method,
            ok,
            done,
            t0,
            resumed,
            downtime(&mut watch, ok),
            last["total-time"].as_f64(),
            last["downtime"].as_f64(),
            &last["ram"]["dirty-sync-count"],
            last["ram"]["transferred"].as_f64(),
        );
        r["guest"] = json!(guest);
        r["share_sent"] = json!(last["ram"]["transferred"].as_f64().unwrap_or(0.0) / last["ram"]["total"].as_f64().unwrap_or(f64::NAN));
        r
    }
}

/// The guest's downtime in ms, from the source's `STOP` to the destination's `RESUME`, both
/// stamped by QEMU with the host's clock (both VMs run on this host).
fn downtime(watch: &mut (Qmp, Qmp), ok: bool) -> Option<f64> {
    if !ok {
        return None;
    }
    let stop = watch.0.event_time("STOP", Duration::from_secs(5))?;
    let resume = watch.1.event_time("RESUME", Duration::from_secs(5))?;
    Some((resume - stop) * 1e3)
}

/// A run's figures, measured where the guest is: the time is until the destination VM runs
/// (from the bench's start of the migration, dwcp's connection setup included); the downtime
/// from the source's stop to the destination running. QEMU's own figures are kept beside them:
/// for an `exec:` tunnel QEMU counts only until it has written the stream into the pipe.
#[allow(clippy::too_many_arguments)]
fn figures(
    method: &str,
    ok: bool,
    ended: bool,
    t0: Instant,
    resumed: Option<Duration>,
    downtime_ms: Option<f64>,
    qemu_total_ms: Option<f64>,
    qemu_down_ms: Option<f64>,
    rounds: &Value,
    sent: Option<f64>,
) -> Value {
    let status = if ok {
        "completed"
    } else if ended && resumed.is_some() {
        "guest broken"
    } else if ended {
        "failed"
    } else {
        "not finished"
    };
    let time_s = resumed.map_or(t0.elapsed().as_secs_f64(), |d| d.as_secs_f64());
    json!({
        "method": method, "status": status, "time_s": time_s, "downtime_ms": downtime_ms,
        "qemu_total_ms": qemu_total_ms, "qemu_downtime_ms": qemu_down_ms,
        "rounds": rounds, "ram_sent_mib": sent.unwrap_or(0.0) / 1048576.0,
    })
}

/// Builds the guest's initramfs for `workload`.
fn guest(root: &Path, dir: &Path, workload: &str) -> PathBuf {
    let (out, mib) = (dir.join(format!("initrd-{workload}.gz")), if workload == "mix" { "16" } else { "64" });
    let st = Command::new(root.join("hw-tests/migrate-guest")).arg("initrd").arg(&out).arg(mib).arg(workload).status().expect("migrate-guest");
    if !st.success() {
        die(&format!("building the {workload} guest failed"));
    }
    out
}

fn main() {
    let (mut limit, mut profiles) = (90u64, vec!["clean".to_string(), "50ms".into(), "150ms".into()]);
    let mut methods: Vec<String> = ["plain", "xbzrle", "multifd+zstd", "plain@cubic", "multifd+zstd@cubic", "dwcp tunnel", "dwcp pages", "dwcp daemon"].map(String::from).to_vec();
    let mut workloads = vec!["random".to_string(), "mix".into()];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(k) = it.next() {
        match (k.as_str(), it.next()) {
            ("--limit", Some(v)) => limit = v.parse().unwrap_or_else(|_| die("--limit takes seconds")),
            ("--profiles", Some(v)) => profiles = v.split(',').map(String::from).collect(),
            ("--methods", Some(v)) => methods = v.split(',').map(|m| if matches!(m, "tunnel" | "pages" | "daemon") { format!("dwcp {m}") } else { m.to_string() }).collect(),
            ("--workloads", Some(v)) => workloads = v.split(',').map(String::from).collect(),
            _ => die("usage: bench-migrate [--limit SECONDS] [--profiles clean,50ms,150ms] [--methods plain,xbzrle,multifd+zstd,tunnel,pages,daemon] [--workloads random,mix]"),
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_owned();
    let dir = root.join("target/bench/migrate");
    std::fs::create_dir_all(&dir).expect("target/bench/migrate");
    let k = Command::new(root.join("hw-tests/migrate-guest")).arg("kernel").output().expect("kernel");
    let kernel = String::from_utf8_lossy(&k.stdout).trim().to_string();
    let m = Command::new(root.join("hw-tests/migrate-guest")).arg("mem").output().expect("migrate-guest mem");
    let mem = String::from_utf8_lossy(&m.stdout).trim().to_string();
    let key = dir.join("key");
    Command::new(root.join("target/release/dwcp")).args(["keygen", "--force"]).arg(&key).stderr(Stdio::null()).status().expect("keygen");
    let link = |p: &str| -> Vec<&'static str> {
        match p {
            "clean" => vec!["--rate", "200mbit", "--rtt", "2ms"],
            "50ms" => vec!["--rate", "200mbit", "--rtt", "50ms", "--loss", "0.1%"],
            "150ms" => vec!["--rate", "200mbit", "--rtt", "150ms", "--loss", "1%"],
            _ => die(&format!("unknown profile {p}")),
        }
    };
    // The headline speedups are a cold `dwcp migrate`'s (tunnel or page-aware); the daemon's
    // warm job is reported beside them.
    let dwcp = |r: &Value| r["method"].as_str().is_some_and(|m| m.starts_with("dwcp") && m != "dwcp daemon");
    let daemon = |r: &Value| r["method"] == "dwcp daemon";
    let time = |r: &Value| if r["status"] == "completed" { r["time_s"].as_f64().unwrap_or(f64::INFINITY) } else { f64::INFINITY };
    let mut all = serde_json::Map::new();
    let mut per_guest = serde_json::Map::new();
    println!("{:<8} {:<8} {:<20} {:>14} {:>9} {:>12} {:>7} {:>9} {:>9}", "guest", "link", "method", "status", "time s", "downtime ms", "rounds", "RAM MiB", "wire MiB");
    for w in &workloads {
        let env = Env { root: root.clone(), dir: dir.clone(), initrd: guest(&root, &dir, w), kernel: kernel.clone(), mem: mem.clone(), key: key.clone() };
        let mut by_profile = serde_json::Map::new();
        for p in &profiles {
            let up = Command::new(root.join("hw-tests/wan")).arg("up").args(link(p)).output().expect("wan up");
            if !up.status.success() {
                die(&format!("hw-tests/wan up: {}", String::from_utf8_lossy(&up.stderr)));
            }
            let mut rows = Vec::new();
            for m in &methods {
                let r = env.run(m, Duration::from_secs(limit));
                println!(
                    "{:<8} {:<8} {:<20} {:>14} {:>9.2} {:>12} {:>7} {:>9.1} {:>9}",
                    w,
                    p,
                    m,
                    r["status"].as_str().unwrap_or("?"),
                    r["time_s"].as_f64().unwrap_or(f64::NAN),
                    r["downtime_ms"].as_f64().map_or("-".to_string(), |d| format!("{d:.0}")),
                    r["rounds"].to_string(),
                    r["ram_sent_mib"].as_f64().unwrap_or(0.0),
                    r["wire_mib"].as_f64().map_or("-".to_string(), |w| format!("{w:.1}"))
                );
                rows.push(r);
            }
            let _ = Command::new(root.join("hw-tests/wan")).arg("down").status();
            // Speedups: best QEMU time / best dwcp time (a run that did not finish counts as the
            // limit); `cubic`: against QEMU on Debian's default congestion control only.
            let speedup_vs = |cubic_only: bool| -> Option<f64> {
                let native = |r: &&Value| !dwcp(r) && (!cubic_only || r["qemu_cc"] == "cubic");
                let best_native = rows.iter().filter(native).map(time).fold(f64::INFINITY, f64::min);
                let ours = rows.iter().filter(|r| dwcp(r)).map(time).fold(f64::INFINITY, f64::min);
                rows.iter().any(|r| native(&r)).then(|| if best_native.is_infinite() { limit as f64 } else { best_native } / ours)
            };
            // Downtime: the faster dwcp mode's against the least of QEMU's completed runs.
            let native_down = rows.iter().filter(|r| !dwcp(r) && r["status"] == "completed").filter_map(|r| r["downtime_ms"].as_f64()).fold(f64::INFINITY, f64::min);
            let ours_down = rows.iter().filter(|r| dwcp(r) && r["status"] == "completed").min_by(|a, b| time(a).total_cmp(&time(b))).and_then(|r| r["downtime_ms"].as_f64());
            per_guest.insert(format!("speedup_{p}_{w}"), json!(speedup_vs(false)));
            per_guest.insert(format!("speedup_{p}_vs_cubic_{w}"), json!(speedup_vs(true)));
            per_guest.insert(format!("downtime_ratio_{p}_{w}"), json!(ours_down.filter(|_| native_down.is_finite()).map(|d| d / native_down)));
            // The warm daemon job against a cold page-aware `dwcp migrate` and against the best
            // QEMU method, same link, same guest.
            if let Some(d) = rows.iter().find(|r| daemon(r)) {
                let cold = rows.iter().find(|r| r["method"] == "dwcp pages").map(time);
                let best_native = rows.iter().filter(|r| !dwcp(r) && !daemon(r)).map(time).fold(f64::INFINITY, f64::min);
                per_guest.insert(format!("daemon_vs_cold_{p}_{w}"), json!(cold.filter(|c| c.is_finite()).map(|c| c / time(d))));
                per_guest.insert(format!("daemon_speedup_{p}_{w}"), json!(best_native.is_finite().then(|| best_native / time(d))));
                per_guest.insert(format!("daemon_downtime_ms_{p}_{w}"), d["downtime_ms"].clone());
            }
            by_profile.insert(p.clone(), Value::Array(rows));
        }
        all.insert(w.clone(), Value::Object(by_profile));
    }
    // The headline figures are the worst over the guests run: no workload is picked to flatter.
    let worst = |key: &dyn Fn(&str) -> String| -> Value {
        let v: Vec<f64> = workloads.iter().filter_map(|w| per_guest.get(&key(w)).and_then(Value::as_f64)).collect();
        if v.is_empty() { Value::Null } else { json!(v.into_iter().fold(f64::MAX, f64::min)) }
    };
    let mut j = serde_json::Map::new();
    for p in ["clean", "50ms", "150ms"] {
        j.insert(format!("speedup_{p}"), worst(&|w| format!("speedup_{p}_{w}")));
        j.insert(format!("speedup_{p}_vs_cubic"), worst(&|w| format!("speedup_{p}_vs_cubic_{w}")));
    }
    let downs: Vec<f64> = per_guest.iter().filter(|(k, _)| k.starts_with("downtime_ratio_")).filter_map(|(_, v)| v.as_f64()).collect();
    j.insert("downtime_ratio".into(), if downs.is_empty() { Value::Null } else { json!(downs.iter().copied().fold(f64::MIN, f64::max)) });
    j.extend(per_guest);
    j.insert("limit_s".into(), json!(limit));
    j.insert("methods".into(), json!(methods));
    j.insert("workloads".into(), json!(workloads));
    j.insert("runs".into(), Value::Object(all));
    benches::emit(&root.join("target/bench/migrate.json"), Value::Object(j));
}
