//! `dwcp-wan run [options]`: the WAN link emulator's forwarder. Creates network namespaces
//! `dwcp-a` (10.77.0.1) and `dwcp-b` (10.77.0.2), a TUN device in each (virtio-net headers, TCP
//! segmentation offload, so 64 KiB super-packets cross it), and moves packets between them through
//! one [`hw_tests::link::Link`] per direction until killed. `hw-tests/wan up|down` wraps it.
//!
//! `dwcp-wan mesh N [options]`: N namespaces `dwcp-m1`..`dwcp-mN` (10.78.0.1..N on `wan0`),
//! every pair joined by its own link each way with the same settings (a full mesh, as sites on
//! the internet are), for the fleet's rigs of three to five daemons.
//!
//! Options (both directions get the same settings; the RTT is split evenly):
//!   --rtt 50ms --rate 1gbit --loss 0.1% --jitter 1ms --reorder 1% --queue 1bdp|BYTES
//!   --ready-file F   written once the link is up
//!   --stats-file F   JSON counters and CPU seconds, rewritten every second
//!   --control-file F polled every 100 ms: when it appears, its options (the same ones) change the
//!                    running link, and it is removed (`hw-tests/wan set ...`)

use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use hw_tests::link::{Link, LinkParams, VNET_HDR};
use hw_tests::sys::tun::{self, Tun};

const NS_A: &str = "dwcp-a";
const NS_B: &str = "dwcp-b";
const ADDR_A: &str = "10.77.0.1";
const ADDR_B: &str = "10.77.0.2";

fn die(msg: &str) -> ! {
    eprintln!("dwcp-wan: {msg}");
    std::process::exit(2);
}

fn parse_duration_ns(s: &str) -> u64 {
    let (n, m) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1e6)
    } else if let Some(v) = s.strip_suffix("us") {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e9)
    } else {
        die(&format!("{s:?}: give a unit (us, ms, s)"))
    };
    (n.parse::<f64>().unwrap_or_else(|_| die(&format!("{s:?} is not a duration"))) * m) as u64
}

fn parse_rate(s: &str) -> u64 {
    let l = s.to_ascii_lowercase();
    let (n, m) = if let Some(v) = l.strip_suffix("gbit") {
        (v.to_owned(), 1e9)
    } else if let Some(v) = l.strip_suffix("mbit") {
        (v.to_owned(), 1e6)
    } else if let Some(v) = l.strip_suffix("kbit") {
        (v.to_owned(), 1e3)
    } else if let Some(v) = l.strip_suffix("bit") {
        (v.to_owned(), 1.0)
    } else {
        die(&format!("{s:?}: give a unit (kbit, mbit, gbit)"))
    };
    (n.parse::<f64>().unwrap_or_else(|_| die(&format!("{s:?} is not a rate"))) * m) as u64
}

fn parse_prob(s: &str) -> f64 {
    let v = match s.strip_suffix('%') {
        Some(p) => p.parse::<f64>().map(|x| x / 100.0),
        None => s.parse::<f64>(),
    }
    .unwrap_or_else(|_| die(&format!("{s:?} is not a probability (e.g. 0.1%)")));
    if !(0.0..=1.0).contains(&v) {
        die(&format!("{s:?} is not between 0% and 100%"));
    }
    v
}

fn sh(args: &[&str]) {
    let st = Command::new("ip").args(args).status().unwrap_or_else(|e| die(&format!("running ip: {e}")));
    if !st.success() {
        die(&format!("`ip {}` failed", args.join(" ")));
    }
}

#[derive(Default)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    lost: AtomicU64,
    queue_drops: AtomicU64,
    segmented: AtomicU64,
}

/// Link parameters the control file changes, with a generation number the forwarders poll.
struct Shared {
    params: Mutex<LinkParams>,
    generation: AtomicU64,
}

fn forward(from: &Tun, to: &Tun, mut link: Link, c: &Counters, epoch: Instant, shared: &Shared) {
    let mut buf = vec![0u8; VNET_HDR + 256 * 1024];
    let mut generation = 0;
    loop {
        let g = shared.generation.load(Relaxed);
        if g != generation {
            generation = g;
            link.set_params(*shared.params.lock().expect("params lock"));
        }
        let now = epoch.elapsed().as_nanos() as u64;
        let wait = link.next_due().map_or(Duration::from_millis(100), |at| Duration::from_nanos(at.saturating_sub(now)));
        if !wait.is_zero() && from.wait_readable(wait).unwrap_or_else(|e| die(&format!("poll {}: {e}", from.name))) {
            for _ in 0..256 {
                match from.read(&mut buf) {
                    Ok(Some(n)) => link.offer(epoch.elapsed().as_nanos() as u64, &buf[..n]),
                    Ok(None) => break,
                    Err(e) => die(&format!("read {}: {e}", from.name)),
                }
            }
        }
        let now = epoch.elapsed().as_nanos() as u64;
        while let Some(p) = link.pop_due(now) {
            if let Err(e) = to.write(&p) {
                // A full or vanished device drops the packet, as a real interface would.
                if e.raw_os_error() == Some(libc::EIO) {
                    die(&format!("{} is gone", to.name));
                }
            }
        }
        let s = link.stats;
        c.packets.store(s.packets, Relaxed);
        c.bytes.store(s.bytes, Relaxed);
        c.lost.store(s.lost, Relaxed);
        c.queue_drops.store(s.queue_drops, Relaxed);
        c.segmented.store(s.segmented, Relaxed);
    }
}

/// The link options, as given on the command line or in the control file.
#[derive(Clone)]
struct Opts {
    rtt: u64,
    rate: u64,
    loss: f64,
    jitter: u64,
    reorder: f64,
    queue: String,
}

impl Default for Opts {
    fn default() -> Self {
        Self { rtt: 0, rate: 0, loss: 0.0, jitter: 0, reorder: 0.0, queue: "1bdp".into() }
    }
}

impl Opts {
    /// Applies the link options in `args`; returns the other (option, value) pairs.
    fn parse(&mut self, args: &[String]) -> Vec<(String, String)> {
        let mut rest = Vec::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let v = it.next().unwrap_or_else(|| die(&format!("{k} needs a value")));
            match k.as_str() {
                "--rtt" => self.rtt = parse_duration_ns(v),
                "--rate" => self.rate = parse_rate(v),
                "--loss" => self.loss = parse_prob(v),
                "--jitter" => self.jitter = parse_duration_ns(v),
                "--reorder" => self.reorder = parse_prob(v),
                "--queue" => self.queue = v.clone(),
                _ => rest.push((k.clone(), v.clone())),
            }
        }
        rest
    }

    /// The link options in `args` and the files named there (ready, stats, control); any other
    /// option is an error.
    fn with_files(args: &[String]) -> (Opts, Option<String>, Option<String>, Option<String>) {
        let mut o = Opts::default();
        let (mut ready, mut stats_file, mut control_file) = (None, None, None);
        for (k, v) in o.parse(args) {
            match k.as_str() {
                "--ready-file" => ready = Some(v),
                "--stats-file" => stats_file = Some(v),
                "--control-file" => control_file = Some(v),
                other => die(&format!("unknown option {other}")),
            }
        }
        (o, ready, stats_file, control_file)
    }

    fn params(&self) -> LinkParams {
        let queue_bytes = if self.queue == "1bdp" {
            // One bandwidth-delay product, but never less than a few full-size packets.
            ((self.rate as u128 * self.rtt as u128 / 8_000_000_000) as u64).max(16 * 1514)
        } else {
            self.queue.parse().unwrap_or_else(|_| die("--queue takes 1bdp or a byte count"))
        };
        LinkParams { delay_ns: self.rtt / 2, jitter_ns: self.jitter, rate_bps: self.rate, loss: self.loss, reorder: self.reorder, queue_bytes }
    }
}

/// Applies the control file `f`, if it is there (`hw-tests/wan set`), to `o` and the running
/// links, and removes it.
fn apply_control(f: &str, o: &mut Opts, shared: &Shared) {
    let Ok(text) = std::fs::read_to_string(f) else { return };
    let words: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
    if let Some((k, _)) = o.parse(&words).first() {
        eprintln!("dwcp-wan: control file: unknown option {k}; ignored");
    } else {
        let np = o.params();
        *shared.params.lock().expect("params lock") = np;
        shared.generation.fetch_add(1, Relaxed);
        eprintln!("dwcp-wan: link changed to {np:?}");
    }
    let _ = std::fs::remove_file(f);
}

/// The mesh: namespace `i` (from 1) is `dwcp-mI` at `10.78.0.I`.
fn mesh_ns(i: usize) -> String {
    format!("dwcp-m{i}")
}

/// IPv4 destination of a TUN packet (after its virtio-net header), if it is one of the mesh's.
fn mesh_dst(pkt: &[u8], n: usize) -> Option<usize> {
    let ip = pkt.get(VNET_HDR..)?;
    if ip.first()? >> 4 != 4 || ip.get(16..19)? != [10, 78, 0] {
        return None;
    }
    let d = usize::from(ip[19]);
    (1..=n).contains(&d).then_some(d)
}

/// Moves packets from `tuns[from]` to each destination through that pair's link.
fn forward_mesh(from: usize, tuns: &[Arc<Tun>], p: LinkParams, c: &Counters, epoch: Instant, shared: &Shared) {
    let n = tuns.len();
    let mut links: Vec<Link> = (0..n).map(|to| Link::new(p, 0x9e37_79b9 ^ ((from as u64) << 16 | to as u64))).collect();
    let mut buf = vec![0u8; VNET_HDR + 256 * 1024];
    let mut generation = 0;
    loop {
        let g = shared.generation.load(Relaxed);
        if g != generation {
            generation = g;
            let np = *shared.params.lock().expect("params lock");
            links.iter_mut().for_each(|l| l.set_params(np));
        }
        let now = epoch.elapsed().as_nanos() as u64;
        let due = links.iter().filter_map(Link::next_due).min();
        let wait = due.map_or(Duration::from_millis(100), |at| Duration::from_nanos(at.saturating_sub(now)));
        let src = &tuns[from];
        if !wait.is_zero() && src.wait_readable(wait).unwrap_or_else(|e| die(&format!("poll {}: {e}", src.name))) {
            for _ in 0..256 {
                match src.read(&mut buf) {
                    Ok(Some(len)) => {
                        // Packets for an address outside the mesh (or for itself) are dropped.
                        if let Some(d) = mesh_dst(&buf[..len], n).filter(|d| *d != from + 1) {
                            links[d - 1].offer(epoch.elapsed().as_nanos() as u64, &buf[..len]);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => die(&format!("read {}: {e}", src.name)),
                }
            }
        }
        let now = epoch.elapsed().as_nanos() as u64;
        for (to, l) in links.iter_mut().enumerate() {
            while let Some(pkt) = l.pop_due(now) {
                let _ = tuns[to].write(&pkt);
            }
        }
        let (mut packets, mut bytes, mut lost, mut drops, mut seg) = (0, 0, 0, 0, 0);
        for l in &links {
            packets += l.stats.packets;
            bytes += l.stats.bytes;
            lost += l.stats.lost;
            drops += l.stats.queue_drops;
            seg += l.stats.segmented;
        }
        c.packets.store(packets, Relaxed);
        c.bytes.store(bytes, Relaxed);
        c.lost.store(lost, Relaxed);
        c.queue_drops.store(drops, Relaxed);
        c.segmented.store(seg, Relaxed);
    }
}

/// `dwcp-wan mesh N ...`.
fn mesh(n: usize, args: &[String]) {
    if !(2..=9).contains(&n) {
        die("mesh takes 2 to 9 namespaces");
    }
    let (mut o, ready, stats_file, control_file) = Opts::with_files(args);
    let p = o.params();
    let mut tuns = Vec::new();
    for i in 1..=n {
        let ns = mesh_ns(i);
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(std::process::Stdio::null()).status();
        sh(&["netns", "add", &ns]);
        sh(&["-n", &ns, "link", "set", "lo", "up"]);
        let t = tun::open_in_netns(&ns, "wan0").unwrap_or_else(|e| die(&format!("TUN in {ns}: {e}")));
        sh(&["-n", &ns, "addr", "add", &format!("10.78.0.{i}/24"), "dev", "wan0"]);
        sh(&["-n", &ns, "link", "set", "wan0", "up"]);
        tuns.push(Arc::new(t));
    }
    let epoch = Instant::now();
    let shared = Arc::new(Shared { params: Mutex::new(p), generation: AtomicU64::new(0) });
    let counters: Vec<Arc<Counters>> = (0..n).map(|_| Arc::new(Counters::default())).collect();
    for (from, c) in counters.iter().enumerate() {
        let (tuns, c, sh) = (tuns.clone(), c.clone(), shared.clone());
        std::thread::spawn(move || forward_mesh(from, &tuns, p, &c, epoch, &sh));
    }
    let addrs: Vec<String> = (1..=n).map(|i| format!("10.78.0.{i}")).collect();
    println!("{}", addrs.join(" "));
    if let Some(f) = &ready {
        std::fs::write(f, format!("{}\n", addrs.join(" "))).unwrap_or_else(|e| die(&format!("{f}: {e}")));
    }
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(f) = &control_file {
            apply_control(f, &mut o, &shared);
        }
        if let Some(f) = &stats_file {
            let per: Vec<serde_json::Value> = counters
                .iter()
                .map(|c| serde_json::json!({"packets": c.packets.load(Relaxed), "bytes": c.bytes.load(Relaxed), "lost": c.lost.load(Relaxed), "queue_drops": c.queue_drops.load(Relaxed)}))
                .collect();
            let j = serde_json::json!({"uptime_s": epoch.elapsed().as_secs_f64(), "cpu_s": tun::process_cpu_seconds(), "from": per, "params": {"rtt_ns": o.rtt, "rate_bps": o.rate, "loss": o.loss}});
            if let Ok(mut fh) = std::fs::File::create(f) {
                let _ = writeln!(fh, "{j}");
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("mesh") {
        let n = args.get(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| die("usage: dwcp-wan mesh N [options]"));
        return mesh(n, &args[2..]);
    }
    if args.first().map(String::as_str) != Some("run") {
        die("usage: dwcp-wan run [--rtt 50ms] [--rate 1gbit] [--loss 0.1%] [--jitter 1ms] [--reorder 1%] [--queue 1bdp|BYTES] [--ready-file F] [--stats-file F]");
    }
    let (mut o, ready, stats_file, control_file) = Opts::with_files(&args[1..]);
    let p = o.params();

    for ns in [NS_A, NS_B] {
        let _ = Command::new("ip").args(["netns", "del", ns]).stderr(std::process::Stdio::null()).status();
        sh(&["netns", "add", ns]);
        sh(&["-n", ns, "link", "set", "lo", "up"]);
    }
    let ta = tun::open_in_netns(NS_A, "wan0").unwrap_or_else(|e| die(&format!("TUN in {NS_A}: {e}")));
    let tb = tun::open_in_netns(NS_B, "wan0").unwrap_or_else(|e| die(&format!("TUN in {NS_B}: {e}")));
    for (ns, me, peer) in [(NS_A, ADDR_A, ADDR_B), (NS_B, ADDR_B, ADDR_A)] {
        sh(&["-n", ns, "addr", "add", me, "peer", peer, "dev", "wan0"]);
        sh(&["-n", ns, "link", "set", "wan0", "up"]);
    }
    let epoch = Instant::now();
    let shared = Arc::new(Shared { params: Mutex::new(p), generation: AtomicU64::new(0) });
    let (ca, cb) = (Arc::new(Counters::default()), Arc::new(Counters::default()));
    let (ta, tb) = (Arc::new(ta), Arc::new(tb));
    {
        let (ta, tb, c) = (ta.clone(), tb.clone(), ca.clone());
        let sh = shared.clone();
        std::thread::spawn(move || forward(&ta, &tb, Link::new(p, 0x1234_5678), &c, epoch, &sh));
    }
    {
        let (ta, tb, c) = (ta.clone(), tb.clone(), cb.clone());
        let sh = shared.clone();
        std::thread::spawn(move || forward(&tb, &ta, Link::new(p, 0x8765_4321), &c, epoch, &sh));
    }
    println!("{ADDR_A} {ADDR_B}");
    if let Some(f) = &ready {
        std::fs::write(f, format!("{ADDR_A} {ADDR_B}\n")).unwrap_or_else(|e| die(&format!("{f}: {e}")));
    }
    let mut last_stats = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(f) = &control_file {
            apply_control(f, &mut o, &shared);
        }
        if last_stats.elapsed() < Duration::from_secs(1) {
            continue;
        }
        last_stats = Instant::now();
        let (rtt, rate, loss, jitter, reorder, queue_bytes) = (o.rtt, o.rate, o.loss, o.jitter, o.reorder, o.params().queue_bytes);
        if let Some(f) = &stats_file {
            let dir = |c: &Counters| {
                serde_json::json!({
                    "packets": c.packets.load(Relaxed), "bytes": c.bytes.load(Relaxed), "lost": c.lost.load(Relaxed),
                    "queue_drops": c.queue_drops.load(Relaxed), "segmented": c.segmented.load(Relaxed),
                })
            };
            let j = serde_json::json!({
                "uptime_s": epoch.elapsed().as_secs_f64(), "cpu_s": tun::process_cpu_seconds(),
                "a_to_b": dir(&ca), "b_to_a": dir(&cb),
                "params": {"rtt_ns": rtt, "rate_bps": rate, "loss": loss, "jitter_ns": jitter, "reorder": reorder, "queue_bytes": queue_bytes},
            });
            if let Ok(mut fh) = std::fs::File::create(f) {
                let _ = writeln!(fh, "{j}");
            }
        }
    }
}
