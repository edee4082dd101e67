//! The initial-window program against real loopback connections: a connection to the peer it
//! was given starts with that window (in segments of the connection's MSS), a connection to any
//! other port with the kernel's ten segments; without BPF permission loading fails, named.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use ebpf::InitialWindow;

fn cwnd_and_mss(c: &TcpStream) -> (u32, u32) {
    let i = ebpf::sys::tcp_info(c.as_raw_fd()).unwrap();
    (i.cwnd, i.mss)
}

#[test]
fn a_listed_peer_gets_the_window_and_no_other_connection_does() {
    if !ebpf::sys::is_root() {
        eprintln!("not root: see refused_bpf_is_named");
        return;
    }
    let iw = InitialWindow::load().expect("root loads and attaches the sockops program");
    let listed = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    // Loopback's MSS is about 64 KiB: 2 MB is about 30 of its segments.
    const BYTES: u32 = 2_000_000;
    iw.set(listed.local_addr().unwrap(), BYTES).unwrap();

    let c = TcpStream::connect(listed.local_addr().unwrap()).unwrap();
    let _s = listed.accept().unwrap();
    let (cwnd, mss) = cwnd_and_mss(&c);
    let want = (BYTES / mss).max(10);
    assert!(want > 10, "the test's window must exceed ten segments (mss {mss})");
    assert_eq!(cwnd, want, "the listed peer's connection starts with {BYTES} bytes in segments of {mss}");
    let r = iw.report(listed.local_addr().unwrap()).unwrap();
    assert_eq!((r.bytes, r.segments, r.applied, r.refused), (BYTES, want, 1, 0), "{r:?}");

    let d = TcpStream::connect(other.local_addr().unwrap()).unwrap();
    let _t = other.accept().unwrap();
    assert_eq!(cwnd_and_mss(&d).0, 10, "an unlisted peer keeps the kernel's initial window");
    assert!(iw.report(other.local_addr().unwrap()).is_none());

    // Detached when dropped: a new connection to the listed peer is back to ten segments.
    drop(iw);
    let e = TcpStream::connect(listed.local_addr().unwrap()).unwrap();
    let _u = listed.accept().unwrap();
    assert_eq!(cwnd_and_mss(&e).0, 10, "the program stays attached after its owner dropped it");
}

#[test]
fn refused_bpf_is_named() {
    if ebpf::sys::is_root() {
        common::rerun_unprivileged("refused_bpf_is_named", "refused:");
        return;
    }
    match InitialWindow::load() {
        Ok(_) => panic!("an unprivileged process attached a cgroup sockops program"),
        Err(e) => {
            assert!(matches!(e, ebpf::ProbeError::Permission(_)), "{e}");
            eprintln!("refused: {e}");
        }
    }
}
