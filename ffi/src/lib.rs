//! libdwcp: a thin, stable C ABI over dwcp's transfer engine (`ctlplane::engine`), the same
//! plan and engine `dwcp send` and the daemon use. The header, `include/dwcp.h`, is generated
//! from this file by cbindgen and committed; `tests/header.rs` fails when it is stale
//! (`DWCP_BLESS=1 cargo test -p ffi --test header` rewrites it).
//!
//! Conventions, for every function:
//! - Strings passed in are NUL-terminated UTF-8, borrowed for the call only.
//! - Handles (`dwcp_transfer *`, `dwcp_receiver *`) are created by a `*_start` function and
//!   released by the matching `*_free`, exactly once; a NULL handle is refused, not followed.
//! - A function that fails returns a non-zero `dwcp_status`; `dwcp_last_error()` then gives the
//!   message, owned by the library and valid until the next call on the same thread.
//! - No Rust panic crosses the boundary: one becomes `DWCP_E_PANIC`.
//! - Thread safety is stated per function.
#![allow(non_camel_case_types)]

mod sys;

use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ctlplane::engine::plan::ModeChoice;
use ctlplane::engine::{self, EngineError, Failure, Request, Transfer};
use dataplane::crypto::Psk;
use dataplane::recv::{self, ReceiverHandle, RecvOptions, Sink};
use dataplane::send::Progress;

/// What a call returned.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum dwcp_status {
    /// Success (for a transfer: its digest was verified by the receiver).
    DWCP_OK = 0,
    /// A bad argument or option (NULL where a value is needed, not UTF-8, out of range,
    /// contradictory): a usage error.
    DWCP_E_INVALID = 1,
    /// The key file cannot be used (missing, unreadable, readable by others, malformed).
    DWCP_E_KEY = 2,
    /// The receiver refused the handshake: a wrong key, another protocol version, or not dwcp.
    DWCP_E_AUTH = 3,
    /// The receiver cannot be reached, or stopped answering.
    DWCP_E_CONNECT = 4,
    /// The receiver's digest did not match, or it refused the object's bytes.
    DWCP_E_DIGEST = 5,
    /// The receiver ended the session for another reason (busy, refused, out of space).
    DWCP_E_RECEIVER = 6,
    /// Cancelled by `dwcp_transfer_cancel`; nothing was published.
    DWCP_E_CANCELLED = 7,
    /// A local file or system call failed.
    DWCP_E_IO = 8,
    /// Nothing arrived within the time given.
    DWCP_E_TIMEOUT = 9,
    /// The call does not fit the handle's state (waiting twice on one transfer).
    DWCP_E_STATE = 10,
    /// A bug in libdwcp (a Rust panic was caught); the handle may be unusable.
    DWCP_E_PANIC = 11,
}

use dwcp_status::*;

thread_local!(static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default()));

fn fail(status: dwcp_status, msg: impl Into<String>) -> dwcp_status {
    let msg = msg.into().replace('\0', " ");
    LAST_ERROR.with_borrow_mut(|e| *e = CString::new(msg).unwrap_or_default());
    status
}

/// Runs `f`, turning a panic into `DWCP_E_PANIC` with its message.
fn guard(f: impl FnOnce() -> dwcp_status) -> dwcp_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(s) => s,
        Err(p) => {
            let what = p.downcast_ref::<&str>().map(|s| (*s).to_owned()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
            fail(DWCP_E_PANIC, format!("libdwcp panicked: {what}"))
        }
    }
}

fn engine_status(e: &EngineError) -> dwcp_status {
    match e.failure() {
        Failure::Invalid => DWCP_E_INVALID,
        Failure::Auth => DWCP_E_AUTH,
        Failure::Connect => DWCP_E_CONNECT,
        Failure::Digest => DWCP_E_DIGEST,
        Failure::Receiver => DWCP_E_RECEIVER,
        Failure::Cancelled => DWCP_E_CANCELLED,
        Failure::Io => DWCP_E_IO,
    }
}

/// The library's version, a static string. Any thread.
#[unsafe(no_mangle)]
pub extern "C" fn dwcp_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed call on this thread (empty if none): owned by the library,
/// valid until the next libdwcp call on this thread. Any thread.
#[unsafe(no_mangle)]
pub extern "C" fn dwcp_last_error() -> *const c_char {
    LAST_ERROR.with_borrow(|e| e.as_ptr())
}

/// Options of a send. Set `struct_size` to `sizeof(dwcp_send_options)`: a library newer than
/// the caller's header reads only that much, so fields added later stay at their defaults.
/// Zero (or NULL) in any field means "the engine decides", as `dwcp send` without the flag.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dwcp_send_options {
    /// `sizeof(dwcp_send_options)` as the caller compiled it.
    pub struct_size: u32,
    /// The receiver, `HOST:PORT` (required).
    pub to: *const c_char,
    /// What to send: a file path, or `gen:SIZE[:SEED]` (a generated image) (required).
    pub source: *const c_char,
    /// The name at the receiver (NULL: the file's name, or `generated.img`).
    pub name: *const c_char,
    /// The pre-shared key file, mode 0600 (required).
    pub key_file: *const c_char,
    /// Parallel streams (0: chosen by the plan).
    pub streams: u16,
    /// Read only when `encrypt_set` is 1: 0 authenticated plaintext, 1 AES-256-GCM.
    pub encrypt: u8,
    /// 0: the plan chooses encryption (plaintext only where the receiver allows it and the mode
    /// is datacenter); 1: `encrypt` decides.
    pub encrypt_set: u8,
    /// 0: probed (auto); 1: datacenter; 2: internet.
    pub mode: u8,
    /// Chunk size in bytes (0: the plan's).
    pub chunk_size: u32,
    /// NULL, or an engine request as JSON with any of `dwcp send`'s options as fields (the
    /// daemon's `POST /transfers` body): read first, then the fields above override it.
    pub request_json: *const c_char,
}

/// A running or finished send. Created by `dwcp_send_start`, released by `dwcp_transfer_free`.
#[derive(Debug)]
pub struct dwcp_transfer {
    run: Mutex<Option<Transfer>>,
    progress: Arc<Progress>,
    outcome: Mutex<Option<CString>>,
}

/// A send's live counters.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct dwcp_progress {
    /// Bytes the receiver acknowledged.
    pub acked_bytes: u64,
    /// Bytes to send (0 until known).
    pub total_bytes: u64,
    /// Streams taking new chunks.
    pub active_streams: u16,
    /// 1 once the send has ended (`dwcp_transfer_wait` returns at once).
    pub finished: u8,
}

/// A finished send.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dwcp_result {
    /// 1 when the receiver verified the whole-object digest.
    pub verified: u8,
    /// Object size, bytes.
    pub size: u64,
    /// Payload bytes put on the wire (re-sends included).
    pub sent_bytes: u64,
    /// From the first connection to the verified commit, seconds.
    pub wall_seconds: f64,
    /// The digest as the receiver verified it, lowercase hex, NUL-terminated.
    pub digest: [c_char; 65],
}

fn request(o: &dwcp_send_options) -> Result<(Request, String), String> {
    let s = |p, what| {
        // SAFETY: the header documents these fields as NUL-terminated strings (or NULL)
        // borrowed for the call, which is all this borrow lasts.
        unsafe { sys::str_arg(p, what) }
    };
    let mut r: Request = match s(o.request_json, "request_json")? {
        Some(j) => serde_json::from_str(j).map_err(|e| format!("request_json: {e}"))?,
        None => Request::default(),
    };
    if let Some(to) = s(o.to, "to")? {
        r.to = to.to_owned();
    }
    if let Some(src) = s(o.source, "source")? {
        r.source = src.to_owned();
    }
    if let Some(n) = s(o.name, "name")? {
        r.name = Some(n.to_owned());
    }
    let key = s(o.key_file, "key_file")?.ok_or("key_file is required")?.to_owned();
    if o.streams > 0 {
        r.streams = Some(o.streams);
    }
    if o.encrypt_set == 1 {
        r.encrypt = Some(o.encrypt == 1);
    }
    match o.mode {
        0 => {}
        1 => r.mode = ModeChoice::Datacenter,
        2 => r.mode = ModeChoice::Internet,
        m => return Err(format!("mode {m} is not 0 (auto), 1 (datacenter) or 2 (internet)")),
    }
    if o.chunk_size > 0 {
        r.chunk_size = Some(o.chunk_size);
    }
    r.check_detached("libdwcp").map_err(|e| e.to_string())?;
    Ok((r, key))
}

/// Starts a send: probes the receiver, plans, and runs the transfer on its own threads. Blocks
/// for the probe (a few round trips), not for the transfer. On success `*out` is a new handle
/// the caller releases with `dwcp_transfer_free`. `opts` is read during the call only. Any
/// thread.
///
/// # Safety
/// `opts` points to a `dwcp_send_options` of at least `opts->struct_size` readable bytes whose
/// strings are NUL-terminated or NULL; `out` points to writable storage for a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_send_start(opts: *const dwcp_send_options, out: *mut *mut dwcp_transfer) -> dwcp_status {
    guard(|| {
        if opts.is_null() || out.is_null() {
            return fail(DWCP_E_INVALID, "opts and out must not be NULL");
        }
        // SAFETY: opts is not NULL and points to struct_size readable bytes (documented); the
        // struct holds only integers and pointers, so all-zero is valid.
        let size = unsafe { sys::borrow(opts.cast::<u32>()) }.copied().unwrap_or(0) as usize;
        // SAFETY: as above.
        let o: dwcp_send_options = unsafe { sys::versioned(opts, size) };
        let (req, key) = match request(&o) {
            Ok(x) => x,
            Err(e) => return fail(DWCP_E_INVALID, e),
        };
        let psk = match Psk::from_file(std::path::Path::new(&key)) {
            Ok(p) => p,
            Err(e) => return fail(DWCP_E_KEY, e.to_string()),
        };
        let host = match engine::host(req.cores.as_deref()) {
            Ok(h) => h,
            Err(e) => return fail(DWCP_E_INVALID, e.to_string()),
        };
        match engine::start(req, psk, host, ctlplane::mode::Thresholds::default(), dataplane::send::Faults::default()) {
            Ok(t) => {
                let h = Box::new(dwcp_transfer { progress: t.progress().clone(), run: Mutex::new(Some(t)), outcome: Mutex::new(None) });
                // SAFETY: out is not NULL and writable (documented).
                unsafe { sys::write_out(out, Box::into_raw(h)) };
                DWCP_OK
            }
            Err(e) => fail(engine_status(&e), e.to_string()),
        }
    })
}

/// Reads a transfer's counters into `*out`. Any thread, concurrently with every other call on
/// the handle but `dwcp_transfer_free`.
///
/// # Safety
/// `t` is a live handle from `dwcp_send_start`; `out` points to a writable `dwcp_progress`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_transfer_progress(t: *const dwcp_transfer, out: *mut dwcp_progress) -> dwcp_status {
    guard(|| {
        // SAFETY: t is NULL or a live handle (documented).
        let Some(t) = (unsafe { sys::borrow(t) }) else { return fail(DWCP_E_INVALID, "NULL transfer") };
        let finished = t.run.lock().map(|r| r.as_ref().is_none_or(Transfer::is_finished)).unwrap_or(true);
        let p = dwcp_progress {
            acked_bytes: t.progress.acked.load(Relaxed),
            total_bytes: t.progress.total.load(Relaxed),
            active_streams: t.progress.active.load(Relaxed),
            finished: u8::from(finished),
        };
        // SAFETY: out is NULL or writable (documented).
        if unsafe { sys::write_out(out, p) } { DWCP_OK } else { fail(DWCP_E_INVALID, "NULL out") }
    })
}

/// Asks a transfer to end without a commit: the receiver publishes nothing (it keeps what
/// arrived for a resume), and `dwcp_transfer_wait` returns `DWCP_E_CANCELLED`. Returns at
/// once. Any thread, concurrently with every other call on the handle but `dwcp_transfer_free`.
///
/// # Safety
/// `t` is a live handle from `dwcp_send_start`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_transfer_cancel(t: *const dwcp_transfer) -> dwcp_status {
    guard(|| {
        // SAFETY: t is NULL or a live handle (documented).
        let Some(t) = (unsafe { sys::borrow(t) }) else { return fail(DWCP_E_INVALID, "NULL transfer") };
        t.progress.cancel.store(true, Relaxed);
        DWCP_OK
    })
}

/// Waits for a transfer to end and writes its result to `*out` (if `out` is not NULL). Returns
/// `DWCP_OK` when the receiver verified it, else why not (the message from
/// `dwcp_last_error`). Once per handle: a second wait returns `DWCP_E_STATE`. One thread at a
/// time; the others may poll and cancel meanwhile.
///
/// # Safety
/// `t` is a live handle from `dwcp_send_start`; `out` is NULL or points to a writable
/// `dwcp_result`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_transfer_wait(t: *const dwcp_transfer, out: *mut dwcp_result) -> dwcp_status {
    guard(|| {
        // SAFETY: t is NULL or a live handle (documented).
        let Some(t) = (unsafe { sys::borrow(t) }) else { return fail(DWCP_E_INVALID, "NULL transfer") };
        let Some(run) = t.run.lock().ok().and_then(|mut r| r.take()) else { return fail(DWCP_E_STATE, "this transfer was already waited for") };
        match run.wait() {
            Ok(o) => {
                let mut digest = [0 as c_char; 65];
                for (d, c) in digest.iter_mut().zip(dataplane::recv::hex(&o.report.digest).bytes()) {
                    *d = c as c_char;
                }
                let r = dwcp_result {
                    verified: u8::from(o.report.verified),
                    size: o.report.size,
                    sent_bytes: o.report.sent,
                    wall_seconds: o.report.wall.as_secs_f64(),
                    digest,
                };
                if let Ok(mut j) = t.outcome.lock() {
                    *j = CString::new(o.json().to_string()).ok();
                }
                // SAFETY: out is NULL or writable (documented).
                unsafe { sys::write_out(out, r) };
                if o.report.verified { DWCP_OK } else { fail(DWCP_E_DIGEST, "the receiver's digest did not match ours") }
            }
            Err(e) => fail(engine_status(&e), e.to_string()),
        }
    })
}

/// The finished transfer's whole outcome as JSON (the plan, the mode, the report: what `dwcp
/// send --json` prints), owned by the handle and valid until `dwcp_transfer_free`; NULL before
/// a successful `dwcp_transfer_wait`. Any thread.
///
/// # Safety
/// `t` is a live handle from `dwcp_send_start`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_transfer_json(t: *const dwcp_transfer) -> *const c_char {
    // SAFETY: t is NULL or a live handle (documented).
    let Some(t) = (unsafe { sys::borrow(t) }) else { return std::ptr::null() };
    t.outcome.lock().ok().and_then(|j| j.as_ref().map(|c| c.as_ptr())).unwrap_or(std::ptr::null())
}

/// Releases a transfer handle; one still running is cancelled and waited for first. NULL is
/// ignored. After it, the handle and every string it gave are invalid. Once per handle, with
/// no other call on it in progress.
///
/// # Safety
/// `t` is NULL or a handle from `dwcp_send_start` not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_transfer_free(t: *mut dwcp_transfer) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: t is NULL or came from Box::into_raw in dwcp_send_start, freed once (documented).
        if let Some(t) = unsafe { sys::take(t) } {
            t.progress.cancel.store(true, Relaxed);
            if let Some(run) = t.run.lock().ok().and_then(|mut r| r.take()) {
                let _ = run.wait();
            }
        }
    }));
}

/// Options of a receiver; `struct_size` as in `dwcp_send_options`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dwcp_recv_options {
    /// `sizeof(dwcp_recv_options)` as the caller compiled it.
    pub struct_size: u32,
    /// Where to listen, `HOST:PORT` (port 0: any free one, see `dwcp_receiver_port`) (required).
    pub listen: *const c_char,
    /// Output directory (NULL: verify and drop what arrives).
    pub out_dir: *const c_char,
    /// The pre-shared key file, mode 0600 (required).
    pub key_file: *const c_char,
    /// 1: also accept senders that do not encrypt (their frames are still authenticated).
    pub allow_plaintext: u8,
}

/// A running receiver. Created by `dwcp_recv_start`, released by `dwcp_receiver_free`.
#[derive(Debug)]
pub struct dwcp_receiver {
    rx: ReceiverHandle,
}

/// One finished receive session.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dwcp_session {
    /// 1 when the object verified and was published.
    pub verified: u8,
    /// Object size.
    pub size: u64,
    /// Bytes received in this session.
    pub received: u64,
    /// Seconds the session took.
    pub wall_seconds: f64,
    /// The object's name, NUL-terminated (truncated to 255 bytes).
    pub name: [c_char; 256],
}

/// Starts a receiver on its own threads; on success `*out` is a new handle the caller releases
/// with `dwcp_receiver_free`. Any thread.
///
/// # Safety
/// `opts` points to at least `opts->struct_size` readable bytes whose strings are NUL-terminated
/// or NULL; `out` points to writable storage for a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_recv_start(opts: *const dwcp_recv_options, out: *mut *mut dwcp_receiver) -> dwcp_status {
    guard(|| {
        if opts.is_null() || out.is_null() {
            return fail(DWCP_E_INVALID, "opts and out must not be NULL");
        }
        // SAFETY: opts is not NULL and readable for struct_size bytes (documented).
        let size = unsafe { sys::borrow(opts.cast::<u32>()) }.copied().unwrap_or(0) as usize;
        // SAFETY: as above; all-zero is a valid dwcp_recv_options.
        let o: dwcp_recv_options = unsafe { sys::versioned(opts, size) };
        let s = |p, what| {
            // SAFETY: NUL-terminated strings or NULL, borrowed for the call (documented).
            unsafe { sys::str_arg(p, what) }
        };
        let (listen, out_dir, key) = match (s(o.listen, "listen"), s(o.out_dir, "out_dir"), s(o.key_file, "key_file")) {
            (Ok(Some(l)), Ok(d), Ok(Some(k))) => (l, d, k),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return fail(DWCP_E_INVALID, e),
            _ => return fail(DWCP_E_INVALID, "listen and key_file are required"),
        };
        let psk = match Psk::from_file(std::path::Path::new(key)) {
            Ok(p) => p,
            Err(e) => return fail(DWCP_E_KEY, e.to_string()),
        };
        let sink = out_dir.map_or(Sink::Discard, |d| Sink::Dir(d.into()));
        let mut ro = RecvOptions::new(listen, sink, psk);
        ro.allow_plaintext = o.allow_plaintext == 1;
        match recv::start(ro) {
            Ok(rx) => {
                // SAFETY: out is not NULL and writable (documented).
                unsafe { sys::write_out(out, Box::into_raw(Box::new(dwcp_receiver { rx }))) };
                DWCP_OK
            }
            Err(e) => fail(DWCP_E_IO, e.to_string()),
        }
    })
}

/// The port a receiver listens on (0 for a NULL handle). Any thread.
///
/// # Safety
/// `r` is NULL or a live handle from `dwcp_recv_start`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_receiver_port(r: *const dwcp_receiver) -> u16 {
    // SAFETY: r is NULL or a live handle (documented).
    unsafe { sys::borrow(r) }.map_or(0, |r| r.rx.local_addr.port())
}

/// Waits up to `timeout_ms` for the next finished session and writes it to `*out`.
/// `DWCP_E_TIMEOUT` when none ended in time; a session that failed still fills `*out` (with
/// `verified` 0) and returns why. One thread at a time.
///
/// # Safety
/// `r` is a live handle from `dwcp_recv_start`; `out` points to a writable `dwcp_session`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_receiver_next(r: *const dwcp_receiver, timeout_ms: u32, out: *mut dwcp_session) -> dwcp_status {
    guard(|| {
        // SAFETY: r is NULL or a live handle (documented).
        let Some(r) = (unsafe { sys::borrow(r) }) else { return fail(DWCP_E_INVALID, "NULL receiver") };
        let Ok(o) = r.rx.outcomes.recv_timeout(Duration::from_millis(u64::from(timeout_ms))) else {
            return fail(DWCP_E_TIMEOUT, format!("no session ended within {timeout_ms} ms"));
        };
        let mut name = [0 as c_char; 256];
        for (d, c) in name.iter_mut().take(255).zip(o.name.bytes()) {
            *d = c as c_char;
        }
        let s = dwcp_session { verified: u8::from(o.result.is_ok()), size: o.size, received: o.received, wall_seconds: o.wall.as_secs_f64(), name };
        // SAFETY: out is NULL or writable (documented).
        unsafe { sys::write_out(out, s) };
        match o.result {
            Ok(_) => DWCP_OK,
            Err(e) => fail(DWCP_E_RECEIVER, e),
        }
    })
}

/// Stops a receiver (sessions in progress end) and releases its handle. NULL is ignored. Once
/// per handle, with no other call on it in progress.
///
/// # Safety
/// `r` is NULL or a handle from `dwcp_recv_start` not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_receiver_free(r: *mut dwcp_receiver) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: r is NULL or came from Box::into_raw in dwcp_recv_start, freed once.
        if let Some(r) = unsafe { sys::take(r) } {
            r.rx.stop();
        }
    }));
}
