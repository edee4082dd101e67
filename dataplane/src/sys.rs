//! Small system calls the data plane needs outside io_uring, each behind a safe function.

use std::fs::File;
use std::time::Duration;

use memmap2::Mmap;

/// Maps a file read-only.
///
/// A file truncated by another process while mapped would fault on access; dwcp maps only the
/// sender's source, documents that it must not be truncated during a transfer, and a file
/// changed (not truncated) while mapped is caught by the receiver's digest check, because the
/// per-chunk checksums are computed from the very bytes that are sent.
pub fn map_readonly(f: &File) -> std::io::Result<Mmap> {
    // SAFETY: see above: the mapping is read-only and its contents are verified end to end.
    unsafe { Mmap::map(f) }
}

/// CPU time (user + system) this process has used so far.
pub fn process_cpu_time() -> Duration {
    // SAFETY: all-zero is a valid `rusage`; getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to a rusage struct.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Preallocates `len` bytes of `f` (fallocate), so a full disk is found before the transfer starts.
pub fn preallocate(f: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on an open descriptor with mode 0 only changes the file's allocation.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return f.set_len(len);
    }
    Err(e)
}

/// The fields of Linux's `struct tcp_info` (linux/tcp.h) up to `tcpi_delivery_rate`, in kernel
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
}

/// A TCP socket's congestion state, from `getsockopt(TCP_INFO)`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfo {
    /// Smoothed RTT, microseconds.
    pub srtt_us: u32,
    /// Least RTT the kernel has seen (its windowed minimum), microseconds.
    pub min_rtt_us: u32,
    /// Congestion window, segments.
    pub cwnd: u32,
    /// Retransmitted segments over the connection's life.
    pub total_retrans: u32,
    /// Bytes the peer acknowledged.
    pub bytes_acked: u64,
    /// Last delivery-rate sample, bytes per second.
    pub delivery_rate: u64,
}

/// Reads `TCP_INFO` of socket `fd`.
pub fn tcp_info(fd: std::os::fd::RawFd) -> std::io::Result<TcpInfo> {
    let mut raw = RawTcpInfo::default();
    let mut len = std::mem::size_of::<RawTcpInfo>() as libc::socklen_t;
    // SAFETY: `raw` is a plain repr(C) struct of integers, valid for any bytes; `len` is its size,
    // and the kernel writes at most `len` bytes into it.
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut raw).cast(), &mut len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpInfo {
        srtt_us: raw.rtt,
        min_rtt_us: raw.min_rtt,
        cwnd: raw.snd_cwnd,
        total_retrans: raw.total_retrans,
        bytes_acked: raw.bytes_acked,
        delivery_rate: raw.delivery_rate,
    })
}

#[cfg(test)]
mod tests {
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

/// Whether the peer of socket `fd` has closed it (an orderly EOF or a reset), without consuming
/// anything and without blocking: `recv(MSG_PEEK | MSG_DONTWAIT)` of one byte.
pub fn peer_closed(fd: std::os::fd::RawFd) -> bool {
    let mut b = 0u8;
    // SAFETY: one valid byte of buffer; MSG_PEEK leaves the data queued, MSG_DONTWAIT never blocks.
    let n = unsafe { libc::recv(fd, (&raw mut b).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if n == 0 {
        return true;
    }
    n < 0 && !matches!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EAGAIN | libc::EINTR))
}

/// Maps a file read-write and shared: the receiver decodes HDE pages straight into its output.
/// The file is the receiver's own `.part` file, which nothing else truncates while mapped.
pub fn map_readwrite(f: &File) -> std::io::Result<memmap2::MmapMut> {
    // SAFETY: the receiver created (or copied) this file under a name only it writes, keeps it
    // at its full size while mapped, and unmaps before renaming it.
    unsafe { memmap2::MmapMut::map_mut(f) }
}
