//! The system calls of the probes and of their fallback. All `unsafe` of this crate is here.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::{Event, SocketStats};

/// Checks that this process may use BPF, by creating (and closing) a one-entry array map.
/// Returns why not when it may not.
pub fn probe_bpf() -> Result<(), crate::ProbeError> {
    // bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries (u32 each), the
    // rest zero. 128 bytes covers every field the kernel reads for this command.
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4;
    attr[2] = 4;
    attr[3] = 1;
    // SAFETY: bpf(BPF_MAP_CREATE = 0) reads `size_of_val(&attr)` bytes from a valid buffer we own.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        // Only a refusal is about permission; its error adds what to do about it.
        return Err(match e.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => crate::ProbeError::Permission("BPF not permitted".into()),
            Some(libc::ENOSYS) => crate::ProbeError::Load("this kernel has no BPF system call".into()),
            _ => crate::ProbeError::Load(format!("BPF map creation failed: {e}")),
        });
    }
    // SAFETY: `fd` is the map descriptor just created and owned by us.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// Whether this process runs as root (effective uid 0): the probes need it (or CAP_BPF and
/// CAP_PERFMON).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The socket's cookie (`SO_COOKIE`): the key the probes file it under.
pub fn socket_cookie(sock: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = 8 as libc::socklen_t;
    // SAFETY: a u64 out-parameter of the length passed.
    let rc = unsafe { libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut cookie).cast(), &mut len) };
    if rc == 0 { Ok(cookie) } else { Err(std::io::Error::last_os_error()) }
}

/// Size of `struct sock_stats` (src/bpf/tcpstats.h).
pub const SOCK_STATS_LEN: usize = 96;

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// Parses a `struct sock_stats` value of the stats map.
pub fn parse_stats(b: &[u8]) -> Option<SocketStats> {
    if b.len() < SOCK_STATS_LEN {
        return None;
    }
    Some(SocketStats {
        events: u64_at(b, 8),
        delivered: u64_at(b, 16),
        bytes_acked: u64_at(b, 24),
        delivery_rate_bps: u64_at(b, 32) * 8,
        recoveries: u64_at(b, 48),
        srtt_us: u32_at(b, 56),
        min_rtt_us: u32_at(b, 60),
        cwnd: u32_at(b, 64),
        ssthresh: u32_at(b, 68),
        mss: u32_at(b, 80),
        total_retrans: u32_at(b, 84),
        cong_state: b[88],
    })
}

/// Parses a `struct probe_event` record of the ring buffer.
pub fn parse_event(b: &[u8]) -> Option<Event> {
    if b.len() < 24 {
        return None;
    }
    let (ts_ns, cookie, kind, value) = (u64_at(b, 0), u64_at(b, 8), u32_at(b, 16), u32_at(b, 20));
    match kind {
        1 => Some(Event::Retransmit { cookie, ts_ns }),
        2 => Some(Event::CongState { cookie, ts_ns, state: value as u8 }),
        _ => None,
    }
}

/// Switches on BPF run-time statistics for as long as the returned descriptor is open.
#[cfg(not(dwcp_no_bpf))]
pub fn enable_run_time_stats() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain system call wrapper; on success it returns a new descriptor that we own.
    let fd = unsafe { libbpf_rs::libbpf_sys::bpf_enable_stats(libbpf_rs::libbpf_sys::BPF_STATS_RUN_TIME) };
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(-fd));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// A program's (run count, run nanoseconds).
#[cfg(not(dwcp_no_bpf))]
pub fn prog_run_stats(prog: BorrowedFd<'_>) -> std::io::Result<(u64, u64)> {
    let mut info = libbpf_rs::libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of_val(&info) as u32;
    // SAFETY: `info` is a plain C struct of the length passed, which the kernel fills.
    let rc = unsafe { libbpf_rs::libbpf_sys::bpf_prog_get_info_by_fd(prog.as_raw_fd(), &raw mut info, &raw mut len) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(-rc));
    }
    Ok((info.run_cnt, info.run_time_ns))
}

/// The fields of Linux's `struct tcp_info` (linux/tcp.h) up to `tcpi_delivered_ce`, in kernel
/// layout; the kernel fills as much as both it and the caller know.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct RawTcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    app_limited: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt: u32,
    data_segs_in: u32,
    data_segs_out: u32,
    delivery_rate: u64,
    busy_time: u64,
    rwnd_limited: u64,
    sndbuf_limited: u64,
    delivered: u32,
    delivered_ce: u32,
}

fn raw_tcp_info(fd: std::os::fd::RawFd) -> std::io::Result<RawTcpInfo> {
    let mut raw = RawTcpInfo::default();
    let mut len = std::mem::size_of::<RawTcpInfo>() as libc::socklen_t;
    // SAFETY: `raw` is a plain repr(C) struct of integers, valid for any bytes; `len` is its size,
    // and the kernel writes at most `len` bytes into it.
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut raw).cast(), &mut len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(raw)
}

/// Where a socket's sending time went, from the kernel's chronographs (`TCP_INFO`, Linux 4.10
/// on), µs over the socket's life, counted at the kernel's tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendTime {
    /// Time with data in flight or queued to send.
    pub busy_us: u64,
    /// Of it, time the receiver's advertised window held the sender back.
    pub rwnd_limited_us: u64,
    /// Of it, time the socket's own send buffer held the sender back.
    pub sndbuf_limited_us: u64,
}

impl SendTime {
    /// Time the path limited the sender (its congestion window or pace): busy, and held back by
    /// neither the receiver's window nor the send buffer.
    pub fn path_limited_us(&self) -> u64 {
        self.busy_us.saturating_sub(self.rwnd_limited_us.saturating_add(self.sndbuf_limited_us))
    }
}

/// Reads the socket's [`SendTime`].
pub fn send_time(fd: std::os::fd::RawFd) -> std::io::Result<SendTime> {
    raw_tcp_info(fd).map(|raw| time_of(&raw))
}

/// Reads `TCP_INFO` of the socket: the fallback when the probes cannot load.
pub fn tcp_info(fd: std::os::fd::RawFd) -> std::io::Result<SocketStats> {
    raw_tcp_info(fd).map(|raw| stats_of(&raw))
}

/// [`tcp_info`] and [`send_time`] from one read.
pub fn tcp_info_and_time(fd: std::os::fd::RawFd) -> std::io::Result<(SocketStats, SendTime)> {
    raw_tcp_info(fd).map(|raw| (stats_of(&raw), time_of(&raw)))
}

fn time_of(raw: &RawTcpInfo) -> SendTime {
    SendTime { busy_us: raw.busy_time, rwnd_limited_us: raw.rwnd_limited, sndbuf_limited_us: raw.sndbuf_limited }
}

fn stats_of(raw: &RawTcpInfo) -> SocketStats {
    SocketStats {
        srtt_us: raw.rtt,
        min_rtt_us: raw.min_rtt,
        cwnd: raw.snd_cwnd,
        ssthresh: raw.snd_ssthresh,
        mss: raw.snd_mss,
        total_retrans: raw.total_retrans,
        bytes_acked: raw.bytes_acked,
        delivered: u64::from(raw.delivered),
        delivery_rate_bps: raw.delivery_rate.saturating_mul(8),
        cong_state: raw.ca_state,
        recoveries: 0,
        events: 0,
    }
}

/// Sets the socket's congestion control (`TCP_CONGESTION`), e.g. `bbr` or `cubic`.
pub fn set_congestion(fd: std::os::fd::RawFd, name: &str) -> std::io::Result<()> {
    // SAFETY: a byte buffer of the length passed; the kernel copies at most that many bytes.
    let rc = unsafe { libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_CONGESTION, name.as_ptr().cast(), name.len() as libc::socklen_t) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::other(format!("congestion control {name:?}: {}", std::io::Error::last_os_error()))) }
}

/// Size of `struct iw_key` (src/bpf/initwin.h).
pub const IW_KEY_LEN: usize = 24;
/// Size of `struct iw_value` (src/bpf/initwin.h).
pub const IW_VALUE_LEN: usize = 32;
/// Size of `struct sw_state` (src/bpf/initwin.h).
pub const SW_STATE_LEN: usize = 32;
/// Offset of `sw_state.release`.
const SW_RELEASE: usize = 20;

/// The `initial_window` map's key for a peer: family, address as the socket holds it (network
/// byte order), port in host byte order.
pub fn iw_key(peer: std::net::SocketAddr) -> [u8; IW_KEY_LEN] {
    let mut k = [0u8; IW_KEY_LEN];
    let (family, addr): (i32, Vec<u8>) = match peer.ip() {
        std::net::IpAddr::V4(a) => (libc::AF_INET, a.octets().to_vec()),
        std::net::IpAddr::V6(a) => (libc::AF_INET6, a.octets().to_vec()),
    };
    k[0..4].copy_from_slice(&(family as u32).to_ne_bytes());
    k[4..4 + addr.len()].copy_from_slice(&addr);
    k[20..24].copy_from_slice(&u32::from(peer.port()).to_ne_bytes());
    k
}

/// A fresh `initial_window` value asking for a first window of `bytes` and, with `gain16`
/// nonzero, the startup window at `gain16 / 16` times what each stream delivers per least RTT.
pub fn iw_value(bytes: u32, gain16: u32) -> [u8; IW_VALUE_LEN] {
    let mut v = [0u8; IW_VALUE_LEN];
    v[0..4].copy_from_slice(&bytes.to_ne_bytes());
    v[16..20].copy_from_slice(&gain16.to_ne_bytes());
    v
}

/// Parses an `initial_window` value.
pub fn parse_iw_value(b: &[u8]) -> Option<crate::WindowReport> {
    (b.len() >= IW_VALUE_LEN).then(|| crate::WindowReport {
        bytes: u32_at(b, 0),
        segments: u32_at(b, 4),
        applied: u32_at(b, 8),
        refused: u32_at(b, 12),
        startup_gain16: u32_at(b, 16),
        clamped: u32_at(b, 20),
        released: u32_at(b, 24),
        peak_clamp_segments: u32_at(b, 28),
    })
}

/// A stream's `startup_window` storage with `release` set (user space lifts its clamp); None
/// when it was released or asked to be already.
pub fn sw_released(mut b: Vec<u8>) -> Option<Vec<u8>> {
    (b.len() >= SW_STATE_LEN && u32_at(&b, SW_RELEASE) == 0).then(|| {
        b[SW_RELEASE..SW_RELEASE + 4].copy_from_slice(&1u32.to_ne_bytes());
        b
    })
}

/// Where the cgroup v2 hierarchy is mounted, per a mountinfo file.
fn cgroup2_mount(mountinfo: &str) -> Option<String> {
    // Fields: id parent maj:min root mount-point options... - fstype source super-options
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2").then(|| pre.split_whitespace().nth(4).map(str::to_string))?
    })
}

/// This process's cgroup in the cgroup v2 hierarchy, opened as a directory (for attaching
/// cgroup BPF programs). The hierarchy is found in /proc/self/mountinfo (`/sys/fs/cgroup` on a
/// unified system, `/sys/fs/cgroup/unified` on a hybrid one), the path in /proc/self/cgroup.
/// `ip netns exec` runs its command in a mount namespace with a fresh /sys and no cgroup
/// mounts: then the hierarchy is mounted on a fresh temporary directory for the moment it takes
/// to open the cgroup, and detached at once (the open directory keeps it alive; nothing stays
/// mounted). Mounting needs CAP_SYS_ADMIN, which attaching the program needs anyway.
pub fn own_cgroup_v2() -> Result<std::fs::File, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::")).ok_or("this process has no cgroup v2 path in /proc/self/cgroup")?;
    let open = |mount: &std::path::Path| {
        let dir = mount.join(path.trim_start_matches('/'));
        std::fs::File::open(&dir).map_err(|e| format!("{}: {e}", dir.display()))
    };
    if let Some(m) = cgroup2_mount(&mountinfo) {
        return open(std::path::Path::new(&m));
    }
    let tmp = std::env::temp_dir().join(format!("dwcp-cgroup2-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (target, fstype) = (c(&tmp.to_string_lossy()), c("cgroup2"));
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, std::ptr::null()) };
    let r = if rc == 0 {
        let f = open(&tmp);
        // SAFETY: as above; MNT_DETACH leaves the mount alive while `f` refers into it.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        f
    } else {
        Err(format!("no cgroup v2 hierarchy is mounted here and mounting one failed: {}", std::io::Error::last_os_error()))
    };
    let _ = std::fs::remove_dir(&tmp);
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn bpf_probe_matches_privilege() {
        let root = super::is_root();
        match super::probe_bpf() {
            Ok(()) => assert!(root || std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled").is_ok_and(|v| v.trim() == "0")),
            Err(e) => assert!(!root, "root was refused BPF: {e}"),
        }
    }

    #[test]
    fn tcp_info_of_a_loopback_connection() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(&[7u8; 100_000]).unwrap();
        let mut got = vec![0u8; 100_000];
        s.read_exact(&mut got).unwrap();
        s.write_all(b"x").unwrap();
        c.read_exact(&mut [0u8; 1]).unwrap();
        let i = super::tcp_info(c.as_raw_fd()).unwrap();
        assert!(i.srtt_us > 0 && i.srtt_us < 1_000_000, "{i:?}");
        assert!(i.cwnd >= 1 && i.bytes_acked >= 100_000, "{i:?}");
        assert!(super::tcp_info(-1).is_err());
    }
}
