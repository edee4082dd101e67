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
