//! The only `unsafe` of the io_uring transport.
//!
//! [`Ring`] owns the ring, a pool of registered buffers and every resource an in-flight operation
//! points at. Callers hand buffers in by value (a pool [`BufId`], a `Vec`, a shared mapping) and get
//! them back in the [`Completion`], as monoio's `IoBuf` does, so safe code can never free or touch
//! memory the kernel is still reading or writing. A zero-copy send keeps its resources until the
//! kernel's notification CQE says the pages are released.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};
use memmap2::{Mmap, MmapMut};
use slab::Slab;

/// Index of a registered buffer in the ring's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufId(u16);

/// Bytes an operation reads from, kept alive until it completes.
#[derive(Debug)]
pub enum Payload {
    /// A slice of a read-only file mapping (the sender's source).
    Mapped(Arc<Mmap>, usize, usize),
    /// A slice of shared heap bytes (a chunk read from stdin).
    Shared(Arc<[u8]>, usize, usize),
}

impl Payload {
    /// The bytes it refers to.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Mapped(m, s, e) => &m[*s..*e],
            Payload::Shared(d, s, e) => &d[*s..*e],
        }
    }
}

/// What comes back to the caller with a completion.
#[derive(Debug)]
pub enum Returned {
    /// A pool buffer.
    Buf(BufId),
    /// A heap buffer; for a receive its length is set to the bytes received.
    Heap(Vec<u8>),
    /// A header and payload sent with `sendmsg`.
    Msg(Vec<u8>, Payload),
    /// Nothing yet: a zero-copy send has moved its bytes (this is its result) but the kernel
    /// still holds the pages; they come back in a later completion with `released` set.
    Pending,
    /// The operation held no memory (a writeback request).
    Nothing,
}

/// One finished operation.
#[derive(Debug)]
pub struct Completion {
    /// The caller's tag.
    pub tag: u64,
    /// The kernel's result: bytes moved, or a negative errno.
    pub result: i32,
    /// The resources the operation held.
    pub returned: Returned,
    /// The kernel's release of a zero-copy send's pages, whose result was reported before:
    /// only `returned` matters.
    pub released: bool,
}

enum Res {
    Buf(BufId),
    Heap(Vec<u8>),
    Msg { hdr: Vec<u8>, payload: Payload, _iov: Box<[libc::iovec; 3]>, _msg: Box<libc::msghdr> },
    None,
}

struct Op {
    tag: u64,
    res: Res,
    /// For zero-copy sends: the result, held until the notification arrives.
    zc_result: Option<i32>,
}

/// A registered buffer pool: one anonymous mapping cut into equal buffers.
struct Pool {
    mem: MmapMut,
    buf_size: usize,
    free: Vec<u16>,
    busy: Vec<bool>,
}

/// An io_uring instance with its registered buffer pool.
pub struct Ring {
    ring: IoUring,
    pool: Pool,
    ops: Slab<Op>,
    send_zc: bool,
    registered: bool,
}

// SAFETY: the raw pointers inside in-flight operations point only into memory the Ring itself
// owns (its pool and the resources held in `ops`), so moving the Ring to another thread moves
// that memory's owner with it; nothing is shared.
unsafe impl Send for Ring {}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ring {{ in_flight: {}, send_zc: {} }}", self.ops.len(), self.send_zc)
    }
}

/// Probes once whether this kernel's io_uring has `IORING_OP_SEND_ZC` and `IORING_OP_SENDMSG_ZC`.
pub fn probe_send_zc() -> bool {
    let Ok(ring) = IoUring::new(2) else { return false };
    let mut probe = Probe::new();
    if ring.submitter().register_probe(&mut probe).is_err() {
        return false;
    }
    probe.is_supported(opcode::SendZc::CODE) && probe.is_supported(opcode::SendMsgZc::CODE)
}

/// Probes which io_uring operations this kernel supports, by name (the ones dwcp uses).
pub fn probe_ops() -> Result<Vec<(&'static str, bool)>, String> {
    let ring = IoUring::new(2).map_err(|e| format!("io_uring unavailable: {e}"))?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| format!("io_uring probe failed: {e}"))?;
    Ok(vec![
        ("SEND", probe.is_supported(opcode::Send::CODE)),
        ("RECV", probe.is_supported(opcode::Recv::CODE)),
        ("SENDMSG", probe.is_supported(opcode::SendMsg::CODE)),
        ("WRITE_FIXED", probe.is_supported(opcode::WriteFixed::CODE)),
        ("SEND_ZC", probe.is_supported(opcode::SendZc::CODE)),
        ("SENDMSG_ZC", probe.is_supported(opcode::SendMsgZc::CODE)),
        ("ASYNC_CANCEL", probe.is_supported(opcode::AsyncCancel::CODE)),
    ])
}

const CANCEL_TAG: u64 = u64::MAX;

impl Ring {
    /// A ring of `entries` with `count` registered buffers of `buf_size` bytes each.
    /// `send_zc` enables zero-copy sends (pass the result of [`probe_send_zc`]).
    pub fn new(entries: u32, count: u16, buf_size: usize, send_zc: bool) -> io::Result<Self> {
        let ring = IoUring::new(entries)?;
        let buf_size = buf_size.next_multiple_of(4096);
        let mut mem = MmapMut::map_anon(buf_size * usize::from(count).max(1))?;
        // Transparent huge pages make the pinning at registration (and later TLB use) cheaper.
        let _ = mem.advise(memmap2::Advice::HugePage);
        let iovs: Vec<libc::iovec> = (0..usize::from(count)).map(|i| libc::iovec { iov_base: mem[i * buf_size..].as_mut_ptr().cast(), iov_len: buf_size }).collect();
        // Registration pins the pool; without the locked-memory allowance it fails, and the ring
        // then uses the same buffers unregistered (plain send and write).
        // SAFETY: every iovec points into `mem`, which lives in `self.pool` as long as the ring;
        // the ring is dropped first (field order), which unregisters the buffers.
        let registered = count > 0 && unsafe { ring.submitter().register_buffers(&iovs) }.is_ok();
        Ok(Self {
            ring,
            pool: Pool { mem, buf_size, free: (0..count).rev().collect(), busy: vec![false; count.into()] },
            ops: Slab::with_capacity(256),
            send_zc: send_zc && registered,
            registered,
        })
    }

    /// Size of each pool buffer.
    pub fn buf_size(&self) -> usize {
        self.pool.buf_size
    }
    /// Whether the pool is registered with the kernel (fixed buffers).
    pub fn registered(&self) -> bool {
        self.registered
    }
    /// Whether zero-copy sends are in use.
    pub fn send_zc(&self) -> bool {
        self.send_zc
    }
    /// Operations not yet completed.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Takes a free pool buffer.
    pub fn alloc(&mut self) -> Option<BufId> {
        self.pool.free.pop().map(BufId)
    }
    /// Returns a pool buffer. It must not be in flight (it is not: in-flight ids are held by the ring).
    pub fn free(&mut self, id: BufId) {
        debug_assert!(!self.pool.busy[usize::from(id.0)]);
        self.pool.free.push(id.0);
    }
    /// The whole of a pool buffer, for filling or reading. Panics if it is in flight.
    pub fn buf_mut(&mut self, id: BufId) -> &mut [u8] {
        assert!(!self.pool.busy[usize::from(id.0)], "pool buffer {} used while in flight", id.0);
        let s = usize::from(id.0) * self.pool.buf_size;
        &mut self.pool.mem[s..s + self.pool.buf_size]
    }

    fn buf_ptr(&mut self, id: BufId, start: usize, end: usize) -> *mut u8 {
        assert!(start <= end && end <= self.pool.buf_size, "range {start}..{end} outside pool buffer");
        assert!(!self.pool.busy[usize::from(id.0)], "pool buffer {} submitted twice", id.0);
        self.pool.busy[usize::from(id.0)] = true;
        let s = usize::from(id.0) * self.pool.buf_size + start;
        self.pool.mem[s..].as_mut_ptr()
    }

    fn push(&mut self, entry: squeue::Entry, tag: u64, res: Res) {
        let key = self.ops.insert(Op { tag, res, zc_result: None });
        let entry = entry.user_data(key as u64);
        loop {
            // SAFETY: every pointer in `entry` refers to memory owned by `self.ops[key].res` or the
            // pool (marked busy), both kept until the completion is reaped in `reap`.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return;
            }
            // Queue full: hand what is queued to the kernel and retry.
            let _ = self.ring.submit();
        }
    }

    /// Receives into `buf[start..end]` of a pool buffer (`MSG_WAITALL`).
    pub fn recv_buf(&mut self, fd: RawFd, id: BufId, start: usize, end: usize, tag: u64) {
        let ptr = self.buf_ptr(id, start, end);
        let e = opcode::Recv::new(types::Fd(fd), ptr, (end - start) as u32).flags(libc::MSG_WAITALL).build();
        self.push(e, tag, Res::Buf(id));
    }

    /// Receives into the spare capacity of `v` (whatever is available, at least one byte).
    pub fn recv_heap(&mut self, fd: RawFd, mut v: Vec<u8>, tag: u64) {
        v.clear();
        let cap = v.capacity();
        assert!(cap > 0, "receive into an empty buffer");
        let e = opcode::Recv::new(types::Fd(fd), v.as_mut_ptr(), cap as u32).build();
        self.push(e, tag, Res::Heap(v));
    }

    /// Sends `buf[start..end]` of a pool buffer, zero-copy from the registered buffer when enabled.
    pub fn send_buf(&mut self, fd: RawFd, id: BufId, start: usize, end: usize, tag: u64) {
        let ptr = self.buf_ptr(id, start, end);
        let len = (end - start) as u32;
        let e = if self.send_zc {
            opcode::SendZc::new(types::Fd(fd), ptr, len).buf_index(Some(id.0)).flags(libc::MSG_WAITALL).build()
        } else {
            opcode::Send::new(types::Fd(fd), ptr, len).flags(libc::MSG_WAITALL).build()
        };
        self.push(e, tag, Res::Buf(id));
    }

    /// Sends all of `v`.
    pub fn send_heap(&mut self, fd: RawFd, v: Vec<u8>, tag: u64) {
        let e = opcode::Send::new(types::Fd(fd), v.as_ptr(), v.len() as u32).flags(libc::MSG_WAITALL).build();
        self.push(e, tag, Res::Heap(v));
    }

    /// Sends `hdr[..head]`, then `payload`, then `hdr[head..]` (a trailer, such as the payload's
    /// tag) in one `sendmsg` (zero-copy when enabled).
    pub fn send_msg(&mut self, fd: RawFd, hdr: Vec<u8>, head: usize, payload: Payload, tag: u64) {
        let body = payload.as_slice();
        let (h, t) = hdr.split_at(head);
        let mut iov = Box::new([
            libc::iovec { iov_base: h.as_ptr() as *mut libc::c_void, iov_len: h.len() },
            libc::iovec { iov_base: body.as_ptr() as *mut libc::c_void, iov_len: body.len() },
            libc::iovec { iov_base: t.as_ptr() as *mut libc::c_void, iov_len: t.len() },
        ]);
        // SAFETY: msghdr is a plain C struct for which all-zero is a valid (empty) value.
        let mut msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = if t.is_empty() { 2 } else { 3 };
        let e = if self.send_zc {
            opcode::SendMsgZc::new(types::Fd(fd), &*msg).flags(libc::MSG_WAITALL as u32).build()
        } else {
            opcode::SendMsg::new(types::Fd(fd), &*msg).flags(libc::MSG_WAITALL as u32).build()
        };
        // The heap blocks behind hdr, iov and msg do not move when their owners move into the slab.
        self.push(e, tag, Res::Msg { hdr, payload, _iov: iov, _msg: msg });
    }

    /// Writes `buf[start..end]` of a pool buffer to `fd` at `offset` (a registered-buffer write).
    pub fn write_buf_at(&mut self, fd: RawFd, id: BufId, start: usize, end: usize, offset: u64, tag: u64) {
        let ptr = self.buf_ptr(id, start, end);
        let len = (end - start) as u32;
        let e = if self.registered {
            opcode::WriteFixed::new(types::Fd(fd), ptr, len, id.0).offset(offset).build()
        } else {
            opcode::Write::new(types::Fd(fd), ptr, len).offset(offset).build()
        };
        self.push(e, tag, Res::Buf(id));
    }

    /// Waits until `fd` is readable (or closed): a stream with nothing to read holds no buffer.
    pub fn poll_readable(&mut self, fd: RawFd, tag: u64) {
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
        self.push(e, tag, Res::None);
    }

    /// Starts writeback of `[offset, offset + len)` of `fd` without waiting for it
    /// (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`): data written during a transfer goes to
    /// the disk meanwhile, so the sync at its end has little left to do. It makes nothing
    /// durable by itself.
    pub fn start_writeback(&mut self, fd: RawFd, offset: u64, len: u32, tag: u64) {
        let e = opcode::SyncFileRange::new(types::Fd(fd), len).offset(offset).flags(libc::SYNC_FILE_RANGE_WRITE).build();
        self.push(e, tag, Res::None);
    }

    /// Asks the kernel to cancel every operation in flight (each still completes, with `-ECANCELED`).
    pub fn cancel_all(&mut self) {
        let keys: Vec<u64> = self.ops.iter().map(|(k, _)| k as u64).collect();
        for k in keys {
            let e = opcode::AsyncCancel::new(k).build().user_data(CANCEL_TAG);
            // SAFETY: a cancel entry points at no memory.
            while unsafe { self.ring.submission().push(&e) }.is_err() {
                let _ = self.ring.submit();
            }
        }
    }

    /// Submits queued entries and waits up to `timeout` for at least one completion.
    pub fn submit_and_wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Collects finished operations.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let cqes: Vec<cqueue::Entry> = self.ring.completion().collect();
        for cqe in cqes {
            let key = cqe.user_data();
            if key == CANCEL_TAG {
                continue;
            }
            let key = key as usize;
            let flags = cqe.flags();
            if cqueue::more(flags) {
                // First CQE of a zero-copy send: the bytes are queued, so the caller may send on
                // (on a long path the pages stay pinned until acknowledged, a round trip later);
                // the pages come back with the notification.
                if let Some(op) = self.ops.get_mut(key) {
                    op.zc_result = Some(cqe.result());
                    out.push(Completion { tag: op.tag, result: cqe.result(), returned: Returned::Pending, released: false });
                }
                continue;
            }
            let Some(op) = self.ops.try_remove(key) else { continue };
            let released = cqueue::notif(flags) && op.zc_result.is_some();
            let result = if cqueue::notif(flags) { op.zc_result.unwrap_or(0) } else { cqe.result() };
            let returned = match op.res {
                Res::Buf(id) => {
                    self.pool.busy[usize::from(id.0)] = false;
                    Returned::Buf(id)
                }
                Res::Heap(mut v) => {
                    if result > 0 && v.is_empty() {
                        // A receive: the kernel filled `result` bytes of the spare capacity.
                        // SAFETY: the kernel wrote exactly `result` (<= capacity) initialized bytes.
                        unsafe { v.set_len(result as usize) };
                    }
                    Returned::Heap(v)
                }
                Res::Msg { hdr, payload, .. } => Returned::Msg(hdr, payload),
                Res::None => Returned::Nothing,
            };
            out.push(Completion { tag: op.tag, result, returned, released });
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Never let the kernel write into memory we are about to free: cancel and wait it out.
        if !self.ops.is_empty() {
            self.cancel_all();
            let mut sink = Vec::new();
            for _ in 0..1000 {
                if self.ops.is_empty() {
                    break;
                }
                let _ = self.submit_and_wait(Duration::from_millis(10));
                self.reap(&mut sink);
            }
            if !self.ops.is_empty() {
                // Still not done after 10 s: leak the resources rather than free memory in use.
                let ops = std::mem::take(&mut self.ops);
                std::mem::forget(ops);
                let pool = std::mem::replace(&mut self.pool.mem, MmapMut::map_anon(1).expect("map"));
                std::mem::forget(pool);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Runs the ring until the operation tagged `tag` completes.
    fn wait(ring: &mut Ring, tag: u64) -> Completion {
        let mut out = Vec::new();
        for _ in 0..500 {
            ring.submit_and_wait(Duration::from_millis(10)).expect("wait");
            ring.reap(&mut out);
            if let Some(k) = out.iter().position(|c| c.tag == tag) {
                return out.swap_remove(k);
            }
        }
        panic!("operation {tag} did not complete");
    }

    #[test]
    fn a_registered_write_then_its_writeback_complete_and_the_data_is_there() {
        let mut ring = Ring::new(8, 2, 8192, false).expect("ring");
        let f = tempfile::tempfile().expect("tmp");
        let id = ring.alloc().expect("buffer");
        ring.buf_mut(id)[..8192].fill(0x5a);
        ring.write_buf_at(f.as_raw_fd(), id, 0, 8192, 4096, 1);
        let c = wait(&mut ring, 1);
        assert_eq!(c.result, 8192);
        assert!(matches!(c.returned, Returned::Buf(b) if b == id));
        ring.free(id);
        ring.start_writeback(f.as_raw_fd(), 4096, 8192, 2);
        let c = wait(&mut ring, 2);
        assert_eq!(c.result, 0, "{}", std::io::Error::from_raw_os_error(-c.result));
        assert!(matches!(c.returned, Returned::Nothing));
        assert_eq!(ring.in_flight(), 0);
        let mut back = vec![0u8; 8192];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 4096).expect("read");
        assert!(back.iter().all(|&b| b == 0x5a));
        // It is `sync_file_range` that ran: a pipe has no page cache to write back.
        let (r, _w) = std::io::pipe().expect("pipe");
        ring.start_writeback(r.as_raw_fd(), 0, 4096, 3);
        assert_eq!(wait(&mut ring, 3).result, -libc::ESPIPE);
    }
}
