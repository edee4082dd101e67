//! Small system calls the data plane needs outside io_uring, each behind a safe function.

use std::fs::File;
use std::time::Duration;

use memmap2::Mmap;

pub mod image;

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

/// The host's physical memory in bytes, if the system says.
pub fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf only reads system configuration.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages > 0 && size > 0).then(|| pages as u64 * size as u64)
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

/// Makes `dst` a copy of the first `len` bytes of `src`: empties it, preallocates it to `len`,
/// then copies `src`'s data at the same offsets. Preallocated, a full disk is found here, not as
/// a fault in a mapping later, and the copy into allocated blocks is quicker (a 1 GiB image on
/// ext4: 0.18 s against 0.7-0.8 s for a plain copy, which allocates as it goes). `src`'s holes (and the unwritten extents ext4 reports as
/// holes once they are out of the page cache) stay unwritten in `dst`, which reads them as zeros.
/// Returns the bytes copied.
pub fn copy_data(src: &File, dst: &File, len: u64) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    // Emptied first: a hole of `src` must read as zeros in `dst` whatever `dst` held.
    dst.set_len(0)?;
    preallocate(dst, len)?;
    let (s, d) = (src.as_raw_fd(), dst.as_raw_fd());
    let last = || std::io::Error::last_os_error();
    let (mut off, mut copied) = (0u64, 0u64);
    let mut in_kernel = true;
    let mut buf = Vec::new();
    while off < len {
        // SAFETY: lseek on an open descriptor only moves its file offset, which nothing here uses.
        let data = unsafe { libc::lseek(s, off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = last();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past `off`
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(s, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(last());
        }
        let end = (hole as u64).min(len);
        let mut at = data as u64;
        while at < end {
            let want = (end - at).min(1 << 30) as usize;
            let n = if in_kernel {
                let (mut so, mut dof) = (at as libc::loff_t, at as libc::loff_t);
                // SAFETY: both descriptors are open; the offsets are passed by pointer (the files'
                // own offsets are not used) and the kernel copies at most `want` bytes.
                let n = unsafe { libc::copy_file_range(s, &mut so, d, &mut dof, want, 0) };
                if n < 0 {
                    let e = last();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        // Not between these files (another file system, an old kernel): by hand.
                        Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                            in_kernel = false;
                            continue;
                        }
                        _ => return Err(e),
                    }
                }
                n as usize
            } else {
                buf.resize(want.min(1 << 20), 0);
                let n = src.read_at(&mut buf, at)?;
                dst.write_all_at(&buf[..n], at)?;
                n
            };
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("the source ends at {at} of {len} bytes")));
            }
            at += n as u64;
            copied += n as u64;
        }
        off = end;
    }
    Ok(copied)
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

/// Caps the socket's pacing rate (`SO_MAX_PACING_RATE`, bytes per second; `u64::MAX` lifts the
/// cap). The kernel paces TCP itself (internal pacing) when no fq qdisc does.
pub fn set_max_pacing_rate(fd: std::os::fd::RawFd, bytes_per_s: u64) -> std::io::Result<()> {
    // SAFETY: a u64 value of the size passed; the kernel reads that many bytes.
    let rc = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_MAX_PACING_RATE, (&raw const bytes_per_s).cast(), 8) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Bounds the bytes a TCP socket holds not yet sent (`TCP_NOTSENT_LOWAT`): past it the socket
/// is not writable, so a queue builds in the producer, not in the kernel.
pub fn set_notsent_lowat(fd: std::os::fd::RawFd, bytes: u32) -> std::io::Result<()> {
    let v = bytes as libc::c_int;
    // SAFETY: a c_int value of the size passed; the kernel reads that many bytes.
    let rc = unsafe { libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, (&raw const v).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// The socket's congestion control, set (`TCP_CONGESTION`): one helper, beside the programs
/// that register dwcp's own.
pub use ebpf::sys::set_congestion;

/// The socket's congestion control (`TCP_CONGESTION`).
pub fn congestion(fd: std::os::fd::RawFd) -> std::io::Result<String> {
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: a writable buffer of `len` bytes, and `len` itself, which the kernel sets to what it wrote.
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_CONGESTION, name.as_mut_ptr().cast(), &raw mut len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = name[..(len as usize).min(name.len())].iter().position(|&b| b == 0).unwrap_or(len as usize);
    Ok(String::from_utf8_lossy(&name[..n]).into_owned())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    #[test]
    fn copy_data_copies_the_data_and_leaves_the_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = std::fs::File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("src")).unwrap();
        // Data, a 4 MiB hole, data; the file ends in another hole.
        let len = 8u64 << 20;
        src.set_len(len).unwrap();
        let a: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        src.write_all_at(&a, 0).unwrap();
        src.write_all_at(&a, 5 << 20).unwrap();
        let dst = std::fs::File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("dst")).unwrap();
        // Something to be overwritten: the copy starts from a stale file.
        dst.write_all_at(&[9u8; 4096], 2 << 20).unwrap();
        let copied = super::copy_data(&src, &dst, len).unwrap();
        assert_eq!(dst.metadata().unwrap().len(), len);
        let (mut x, mut y) = (vec![0u8; len as usize], vec![0u8; len as usize]);
        src.read_exact_at(&mut x, 0).unwrap();
        dst.read_exact_at(&mut y, 0).unwrap();
        assert!(x == y, "the copy differs");
        // ext4, xfs and tmpfs report holes; a file system that does not copies all of it.
        assert!(copied >= 2 * a.len() as u64 && copied <= len, "{copied}");
    }
}
