//! The probes against real sockets on loopback: loaded as root, they record a transfer of a
//! watched socket and ignore an unwatched one; refused BPF (the same test re-run as an
//! unprivileged user by setpriv) degrades to TCP_INFO polling, named, and still samples.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;

use ebpf::{Monitor, Want};

/// A connected loopback pair (client, server).
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

/// Sends `bytes` from `c` to `s` and waits until they were read and answered.
fn pump(c: &mut TcpStream, mut s: TcpStream, bytes: usize) -> TcpStream {
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < bytes {
            got += s.read(&mut buf).unwrap();
        }
        s.write_all(b"k").unwrap();
        s
    });
    let chunk = vec![0x5au8; 1 << 20];
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min(bytes - sent);
        c.write_all(&chunk[..n]).unwrap();
        sent += n;
    }
    c.read_exact(&mut [0u8; 1]).unwrap();
    reader.join().unwrap()
}

#[test]
fn probes_record_a_watched_transfer_and_only_it() {
    if !ebpf::sys::is_root() {
        // The unprivileged half is `refused_bpf_degrades_to_polling`; this one is for root (CI).
        eprintln!("not root: the probes cannot load here; see refused_bpf_degrades_to_polling");
        return;
    }
    let _stats = ebpf::Probes::enable_stats().expect("BPF statistics");
    let mut m = Monitor::open(Want::Auto);
    assert_eq!(m.backend(), "ebpf", "root must load the probes: {:?}", m.degraded());
    // Watch the sender's socket before it sends (the probes record from their first event on).
    let (mut c, s) = pair();
    let idx = m.watch(c.as_fd());
    const BYTES: usize = 64 << 20;
    let _s = pump(&mut c, s, BYTES);
    let got = m.sample(idx).expect("the probes saw the watched socket");
    let polled = ebpf::sys::tcp_info(std::os::fd::AsRawFd::as_raw_fd(&c)).unwrap();
    eprintln!("probes: {got:?}\nTCP_INFO: {polled:?}");
    // One event per ACK received. A receiver on a loaded host acknowledges up to a MiB at once
    // (64 events for the 64 MiB while QEMU guests ran beside the test; hundreds when idle).
    assert!(got.events >= 32, "one event per ACK received: {got:?}");
    assert!(got.bytes_acked >= BYTES as u64 - 65536 && got.bytes_acked <= polled.bytes_acked, "{got:?} vs {polled:?}");
    assert!(got.srtt_us > 0 && got.srtt_us < 200_000, "{got:?}");
    assert!(got.min_rtt_us > 0 && got.min_rtt_us <= got.srtt_us.max(polled.min_rtt_us), "{got:?}");
    assert!(got.cwnd >= 2 && got.mss > 0, "{got:?}");
    assert_eq!(got.cong_state, 0, "loopback stays Open");
    // An unwatched transfer leaves no trace, and the cost is measured per event.
    let before = m.cost().iter().map(|c| c.runs).sum::<u64>();
    let (mut u, peer) = pair();
    let _peer = pump(&mut u, peer, 8 << 20);
    let idx_late = m.watch(u.as_fd());
    assert!(m.sample(idx_late).is_none(), "an unwatched socket's earlier traffic was recorded");
    let cost = m.cost();
    let probe = cost.iter().find(|c| c.name == "tcp_probe").unwrap();
    assert!(probe.runs > before.min(probe.runs) && probe.run_ns > 0, "{cost:?}");
    eprintln!("tcp_probe: {} runs, {:.0} ns each", probe.runs, probe.run_ns as f64 / probe.runs as f64);
}

#[test]
fn refused_bpf_degrades_to_polling() {
    if ebpf::sys::is_root() {
        common::rerun_unprivileged("refused_bpf_degrades_to_polling", "degraded:");
        return;
    }
    let mut m = Monitor::open(Want::Auto);
    assert_eq!(m.backend(), "tcp_info");
    let why = m.degraded().unwrap().to_string();
    assert!(why.contains("not permitted") && why.contains("polling TCP_INFO"), "{why}");
    // What to do is said once.
    assert_eq!(why.matches('(').count(), 1, "{why}");
    eprintln!("degraded: {why}");
    let (mut c, s) = pair();
    let _s = pump(&mut c, s, 4 << 20);
    let idx = m.watch(c.as_fd());
    let got = m.sample(idx).expect("TCP_INFO of a live socket");
    assert!(got.bytes_acked >= 4 << 20 && got.srtt_us > 0, "{got:?}");
    // The stats and the send chronographs from one read.
    let (stats, time) = m.sample_with_time(idx);
    assert!(stats.is_some_and(|s| s.bytes_acked == got.bytes_acked), "{stats:?}");
    // (Their figures count in jiffies: a short loopback transfer may show none.)
    assert!(time.is_some_and(|t| t.path_limited_us() <= t.busy_us), "{time:?}");
}
