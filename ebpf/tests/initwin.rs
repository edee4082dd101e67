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
    iw.set(listed.local_addr().unwrap(), BYTES, None).unwrap();

    let c = TcpStream::connect(listed.local_addr().unwrap()).unwrap();
    let _s = listed.accept().unwrap();
    let (cwnd, mss) = cwnd_and_mss(&c);
    let want = (BYTES / mss).max(10);
    assert!(want > 10, "the test's window must exceed ten segments (mss {mss})");
    assert_eq!(cwnd, want, "the listed peer's connection starts with {BYTES} bytes in segments of {mss}");
    let r = iw.report(listed.local_addr().unwrap()).unwrap();
    assert_eq!((r.bytes, r.segments, r.applied, r.refused), (BYTES, want, 1, 0), "{r:?}");
    assert_eq!((r.startup_gain16, r.clamped), (0, 0), "no startup window asked for: {r:?}");

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

/// Sends `bytes` on `c` while a thread drains the other end; returns the largest congestion
/// window TCP_INFO showed between writes.
fn send_and_watch_cwnd(c: &mut TcpStream, s: &TcpStream, bytes: usize) -> u32 {
    use std::io::{Read, Write};
    let mut r = s.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < bytes {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    });
    let block = vec![7u8; 256 * 1024];
    let mut most = 0;
    let mut sent = 0;
    while sent < bytes {
        c.write_all(&block).unwrap();
        sent += block.len();
        most = most.max(cwnd_and_mss(c).0);
    }
    drain.join().unwrap();
    most
}

/// Up to four rounds of 64 MiB until the window passes `segs` (loopback's ACKs do not always
/// leave reno window-limited); the largest window seen.
fn grow_past(c: &mut TcpStream, s: &TcpStream, segs: u32) -> u32 {
    let mut most = 0;
    for _ in 0..4 {
        most = most.max(send_and_watch_cwnd(c, s, 64 << 20));
        if most > segs {
            break;
        }
    }
    most
}

/// The startup window: a listed peer's connection with a gain gets its window clamped from its
/// first acknowledgements (on loopback, whose least RTT is microseconds, to the first window:
/// what it delivers per least RTT is far less than one of its 64 KiB segments), never above the
/// largest clamp the program set; released, the clamp goes at the next acknowledgement and the
/// window grows past it (the control: the same connection, unclamped). Without a gain, nothing
/// is clamped.
#[test]
fn a_startup_window_holds_the_window_until_released() {
    if !ebpf::sys::is_root() {
        eprintln!("not root: see refused_bpf_is_named");
        return;
    }
    let iw = InitialWindow::load().expect("root loads and attaches the sockops program");
    let listed = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = listed.local_addr().unwrap();
    // The first window: ten segments (the least), the clamp's floor.
    iw.set(peer, 1, Some(2.0)).unwrap();
    let mut c = TcpStream::connect(peer).unwrap();
    let (s, _) = listed.accept().unwrap();
    // Reno's window grows by every acknowledged segment in slow start: left alone it passes
    // ten within the first megabytes.
    ebpf::sys::set_congestion(c.as_raw_fd(), "reno").unwrap();
    // The clamp is armed once two first windows are acknowledged (the window may grow before,
    // and shrink again while the writer keeps it short of data): watched from after that.
    let _ = send_and_watch_cwnd(&mut c, &s, 8 << 20);
    let held = send_and_watch_cwnd(&mut c, &s, 64 << 20);
    let r = iw.report(peer).unwrap();
    assert_eq!((r.startup_gain16, r.clamped, r.released), (32, 1, 0), "{r:?}");
    assert!(r.peak_clamp_segments >= 10, "the clamp is never below the first window: {r:?}");
    assert!(held <= r.peak_clamp_segments, "the window passed the clamp: {held} > {r:?}");

    eprintln!("held {held} under {r:?}");
    assert!(iw.release(std::os::fd::AsFd::as_fd(&c)).unwrap(), "the stream had a startup window to release");
    let freed = grow_past(&mut c, &s, r.peak_clamp_segments);
    let r2 = iw.report(peer).unwrap();
    assert_eq!(r2.released, 1, "{r2:?}");
    assert!(freed > r.peak_clamp_segments, "released, the window grows past the clamp: {freed} <= {r:?}");
    assert!(!iw.release(std::os::fd::AsFd::as_fd(&c)).unwrap(), "released once: a released stream has nothing left to release");

    // The same peer listed without a gain: nothing clamped.
    iw.set(peer, 1, None).unwrap();
    let mut d = TcpStream::connect(peer).unwrap();
    let (t, _) = listed.accept().unwrap();
    ebpf::sys::set_congestion(d.as_raw_fd(), "reno").unwrap();
    let _ = send_and_watch_cwnd(&mut d, &t, 8 << 20);
    eprintln!("released: {freed}");
    assert_eq!(iw.report(peer).unwrap().clamped, 0);
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
