//! dwcp's rate congestion control (`ebpf::RateCc`) on real loopback sockets: a socket selects it
//! by the name it was registered under, the kernel then paces the socket at the rate ACP sets
//! (`SO_MAX_PACING_RATE`, with no fq qdisc: the program asks for the kernel's own pacing), and
//! the name is gone once the registration is dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use dataplane::sys::{congestion, set_congestion, set_max_pacing_rate};

#[test]
fn a_socket_on_the_rate_congestion_control_is_paced_at_the_rate_set() {
    if !ebpf::sys::is_root() {
        eprintln!("not root: registering a congestion control needs CAP_BPF and CAP_NET_ADMIN");
        return;
    }
    let cc = ebpf::RateCc::register().expect("root registers the rate congestion control");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut s, _) = l.accept().unwrap();
    set_congestion(c.as_raw_fd(), cc.name()).expect("the socket selects it by name");
    assert_eq!(congestion(c.as_raw_fd()).unwrap(), cc.name());
    // 8 MB at 20 MB/s is 0.4 s; unpaced, loopback moves it in a few milliseconds.
    const BYTES: usize = 8 << 20;
    set_max_pacing_rate(c.as_raw_fd(), 20 << 20).unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < BYTES {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => panic!("{e}"),
            }
        }
        got
    });
    let t = Instant::now();
    c.write_all(&vec![7u8; BYTES]).unwrap();
    assert_eq!(reader.join().unwrap(), BYTES);
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(300), "8 MB went in {took:?}: the socket was not paced at 20 MB/s");
    // The window is two of the pace times the smoothed RTT, plus four segments (four on
    // loopback, where the RTT is microseconds; any of the kernel's own algorithms starts at ten).
    let info = ebpf::sys::tcp_info(c.as_raw_fd()).unwrap();
    let want = (2.0 * f64::from(20u32 << 20) * f64::from(info.srtt_us) / 1e6 / f64::from(info.mss)) as u32 + 4;
    assert!(info.cwnd.abs_diff(want) <= 1, "window {} segments, want {want} (srtt {} µs, mss {})", info.cwnd, info.srtt_us, info.mss);

    // Unregistered with its owner: a new socket cannot select the name any more.
    let name = cc.name().to_string();
    drop(cc);
    let d = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    assert!(set_congestion(d.as_raw_fd(), &name).is_err(), "{name} still registered after its owner dropped it");
}
