//! The loader: opens the libbpf skeleton, attaches its three tracepoint programs, and reads their
//! maps. Not `Send` (libbpf objects are tied to the thread that uses them): a sender creates its
//! probes on the thread that samples them.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, RingBuffer, RingBufferBuilder};

use crate::{Event, ProbeError, ProgCost, SocketStats, sys};

#[allow(clippy::all, clippy::pedantic, missing_debug_implementations, unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/tcpstats.skel.rs"));
}
use skel::{TcpstatsSkel, TcpstatsSkelBuilder};

// The C structs and their byte parsers in `sys` must agree.
const _: () = assert!(std::mem::size_of::<skel::types::sock_stats>() == sys::SOCK_STATS_LEN);

/// The loaded, attached probes.
pub struct Probes {
    skel: TcpstatsSkel<'static>,
    ring: RingBuffer<'static>,
    pending: Rc<RefCell<Vec<Event>>>,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes").finish_non_exhaustive()
    }
}

pub(crate) fn load_err(e: libbpf_rs::Error) -> ProbeError {
    match e.kind() {
        libbpf_rs::ErrorKind::PermissionDenied => ProbeError::Permission(e.to_string()),
        _ => ProbeError::Load(format!("{e:#}")),
    }
}

pub(crate) fn map_err(map: &'static str) -> impl Fn(libbpf_rs::Error) -> ProbeError {
    move |e| ProbeError::Map { map, source: std::io::Error::other(format!("{e:#}")) }
}

impl Probes {
    /// Loads and attaches the programs. Needs CAP_BPF and CAP_PERFMON (root).
    pub fn load() -> Result<Self, ProbeError> {
        sys::probe_bpf()?;
        // The skeleton borrows its object's storage for as long as it lives: one pointer-sized
        // box per load, leaked on purpose (the object itself is freed when the skeleton drops).
        let storage: &'static mut MaybeUninit<libbpf_rs::OpenObject> = Box::leak(Box::new(MaybeUninit::uninit()));
        let open = TcpstatsSkelBuilder::default().open(storage).map_err(load_err)?;
        let mut skel = open.load().map_err(load_err)?;
        skel.attach().map_err(load_err)?;
        let pending = Rc::new(RefCell::new(Vec::new()));
        let sink = Rc::clone(&pending);
        let mut b = RingBufferBuilder::new();
        b.add(&skel.maps.events, move |data: &[u8]| {
            if let Some(e) = sys::parse_event(data) {
                sink.borrow_mut().push(e);
            }
            0
        })
        .map_err(map_err("events"))?;
        let ring = b.build().map_err(map_err("events"))?;
        Ok(Self { skel, ring, pending })
    }

    /// Starts recording the socket; returns its cookie.
    pub fn watch(&self, sock: BorrowedFd<'_>) -> Result<u64, ProbeError> {
        let cookie = sys::socket_cookie(sock).map_err(|source| ProbeError::Map { map: "watch", source })?;
        self.skel.maps.watch.update(&cookie.to_ne_bytes(), &[1], MapFlags::ANY).map_err(map_err("watch"))?;
        Ok(cookie)
    }

    /// Stops recording the socket and forgets its state.
    pub fn unwatch(&self, cookie: u64) {
        let _ = self.skel.maps.watch.delete(&cookie.to_ne_bytes());
        let _ = self.skel.maps.stats.delete(&cookie.to_ne_bytes());
    }

    /// The socket's state as the probes last saw it (None before its first event).
    pub fn stats(&self, cookie: u64) -> Result<Option<SocketStats>, ProbeError> {
        let v = self.skel.maps.stats.lookup(&cookie.to_ne_bytes(), MapFlags::ANY).map_err(map_err("stats"))?;
        Ok(v.and_then(|b| sys::parse_stats(&b)))
    }

    /// Moves the ring buffer's pending events into `out`; returns how many.
    pub fn drain(&self, out: &mut Vec<Event>) -> Result<usize, ProbeError> {
        self.ring.consume().map_err(map_err("events"))?;
        let mut p = self.pending.borrow_mut();
        let n = p.len();
        out.append(&mut p);
        Ok(n)
    }

    /// Switches on the kernel's per-program run-time statistics while the descriptor is held.
    pub fn enable_stats() -> Result<OwnedFd, ProbeError> {
        sys::enable_run_time_stats().map_err(|e| ProbeError::Load(format!("BPF_ENABLE_STATS: {e}")))
    }

    /// Each program's runs and nanoseconds so far (zero unless statistics are on).
    pub fn cost(&self) -> Vec<ProgCost> {
        let progs = &self.skel.progs;
        [("tcp_probe", progs.on_tcp_probe.as_fd()), ("tcp_retransmit_skb", progs.on_retransmit.as_fd()), ("tcp_cong_state_set", progs.on_cong_state.as_fd())]
            .into_iter()
            .map(|(name, fd)| {
                let (runs, run_ns) = sys::prog_run_stats(fd).unwrap_or((0, 0));
                ProgCost { name, runs, run_ns }
            })
            .collect()
    }
}
