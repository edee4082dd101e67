//! The first-window and startup-window loader: loads `src/bpf/initwin.bpf.c`, attaches it to
//! this process's cgroup (v2) as a sockops program, and fills its map with the peers whose
//! connections get a larger first congestion window and, optionally, a window held during
//! startup to a multiple of what each stream delivers per least RTT (the program's header says
//! why). The attachment is a BPF link owned by this value: it detaches when the value drops or
//! the process exits. A stream whose startup window is not yet released when the program
//! detaches keeps its clamp: [`InitialWindow::release`] every such stream first.

use std::net::SocketAddr;

use crate::ProbeError;
#[cfg(not(dwcp_no_bpf))]
use crate::sys;

#[cfg(not(dwcp_no_bpf))]
#[allow(clippy::all, clippy::pedantic, missing_debug_implementations, unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/initwin.skel.rs"));
}
#[cfg(not(dwcp_no_bpf))]
const _: () = assert!(std::mem::size_of::<skel::types::iw_key>() == sys::IW_KEY_LEN);
#[cfg(not(dwcp_no_bpf))]
const _: () = assert!(std::mem::size_of::<skel::types::iw_value>() == sys::IW_VALUE_LEN);
#[cfg(not(dwcp_no_bpf))]
const _: () = assert!(std::mem::size_of::<skel::types::sw_state>() == sys::SW_STATE_LEN);

/// What the program did for one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowReport {
    /// The window asked for, bytes.
    pub bytes: u32,
    /// What the last connection got, segments (0: none connected yet).
    pub segments: u32,
    /// Connections given it.
    pub applied: u32,
    /// Connections where the kernel refused it.
    pub refused: u32,
    /// The startup window's gain asked for, in sixteenths (0: none).
    pub startup_gain16: u32,
    /// Streams whose window startup clamped.
    pub clamped: u32,
    /// Streams released from it (by [`InitialWindow::release`], the peer's entry gone, or an
    /// implausible least RTT).
    pub released: u32,
    /// The largest clamp set, segments.
    pub peak_clamp_segments: u32,
}

impl WindowReport {
    /// The startup window's gain, when one was asked for.
    pub fn startup_gain(&self) -> Option<f64> {
        (self.startup_gain16 > 0).then(|| f64::from(self.startup_gain16) / 16.0)
    }
}

/// The attached program (in a build without the BPF programs, [`InitialWindow::load`] says so).
pub struct InitialWindow {
    #[cfg(not(dwcp_no_bpf))]
    skel: skel::InitwinSkel<'static>,
    #[cfg(not(dwcp_no_bpf))]
    _link: libbpf_rs::Link,
}

impl std::fmt::Debug for InitialWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitialWindow").finish_non_exhaustive()
    }
}

impl InitialWindow {
    /// In this build: why there is no program.
    #[cfg(dwcp_no_bpf)]
    pub fn load() -> Result<Self, ProbeError> {
        Err(ProbeError::NotBuilt(env!("DWCP_NO_BPF_WHY")))
    }

    /// Loads the program and attaches it to this process's cgroup. Needs CAP_BPF and
    /// CAP_NET_ADMIN (root) and a cgroup v2 hierarchy.
    #[cfg(not(dwcp_no_bpf))]
    pub fn load() -> Result<Self, ProbeError> {
        use libbpf_rs::skel::{OpenSkel, SkelBuilder};
        use std::os::fd::AsRawFd;
        let load_err = crate::probes::load_err;
        sys::probe_bpf()?;
        let cgroup = sys::own_cgroup_v2().map_err(ProbeError::Load)?;
        // As in `Probes::load`: the skeleton borrows its object's storage for its whole life.
        let storage: &'static mut std::mem::MaybeUninit<libbpf_rs::OpenObject> = Box::leak(Box::new(std::mem::MaybeUninit::uninit()));
        let open = skel::InitwinSkelBuilder::default().open(storage).map_err(load_err)?;
        let skel = open.load().map_err(load_err)?;
        let link = skel.progs.set_initial_window.attach_cgroup(cgroup.as_raw_fd()).map_err(|e| ProbeError::Load(format!("attaching the sockops program to the cgroup: {e:#}")))?;
        Ok(Self { skel, _link: link })
    }

    /// The program this process shares between its sends: loaded at the first call and
    /// attached while the process lives (or the reason it could not be, every call after). A
    /// stream's startup window is lifted at its first acknowledgement after its release, which
    /// may come after the send that asked for it ended (a warm stream's next session): the
    /// program must still be attached then.
    pub fn shared() -> Result<&'static Self, String> {
        static SHARED: std::sync::OnceLock<Result<InitialWindow, String>> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| Self::load().map_err(|e| e.to_string())).as_ref().map_err(Clone::clone)
    }

    /// Connections to `peer` from now on start with a window of `bytes` (in segments of their
    /// MSS, at least ten) and, with `startup_gain`, hold at most that many times what they
    /// deliver per least RTT in flight until released (the gain is kept in sixteenths, at least
    /// 1 and at most 4).
    #[cfg(not(dwcp_no_bpf))]
    pub fn set(&self, peer: SocketAddr, bytes: u32, startup_gain: Option<f64>) -> Result<(), ProbeError> {
        use libbpf_rs::{MapCore, MapFlags};
        let v = sys::iw_value(bytes, startup_gain.map_or(0, gain16));
        self.skel.maps.initial_window.update(&sys::iw_key(peer), &v, MapFlags::ANY).map_err(crate::probes::map_err("initial_window"))
    }

    /// In this build: nothing (no value exists to call it on).
    #[cfg(dwcp_no_bpf)]
    pub fn set(&self, _peer: SocketAddr, _bytes: u32, _startup_gain: Option<f64>) -> Result<(), ProbeError> {
        Ok(())
    }

    /// Lifts the startup window of the stream `sock` at its next acknowledgement (nothing if
    /// it has none or was released). Returns whether it had one to lift.
    #[cfg(not(dwcp_no_bpf))]
    pub fn release(&self, sock: std::os::fd::BorrowedFd<'_>) -> Result<bool, ProbeError> {
        use libbpf_rs::{MapCore, MapFlags};
        use std::os::fd::AsRawFd;
        let key = sock.as_raw_fd().to_ne_bytes();
        let map = &self.skel.maps.startup_window;
        let Some(cur) = map.lookup(&key, MapFlags::ANY).map_err(crate::probes::map_err("startup_window"))? else {
            return Ok(false);
        };
        let Some(new) = sys::sw_released(cur) else { return Ok(false) };
        map.update(&key, &new, MapFlags::EXIST).map_err(crate::probes::map_err("startup_window"))?;
        Ok(true)
    }

    /// In this build: nothing.
    #[cfg(dwcp_no_bpf)]
    pub fn release(&self, _sock: std::os::fd::BorrowedFd<'_>) -> Result<bool, ProbeError> {
        Ok(false)
    }

    /// Removes `peer`'s entry: its connections from now on get the kernel's first window, and
    /// its streams still in startup are released at their next acknowledgement.
    #[cfg(not(dwcp_no_bpf))]
    pub fn forget(&self, peer: SocketAddr) {
        use libbpf_rs::MapCore;
        let _ = self.skel.maps.initial_window.delete(&sys::iw_key(peer));
    }

    /// In this build: nothing.
    #[cfg(dwcp_no_bpf)]
    pub fn forget(&self, _peer: SocketAddr) {}

    /// What it did for `peer` so far (None if `peer` was never set).
    #[cfg(not(dwcp_no_bpf))]
    pub fn report(&self, peer: SocketAddr) -> Option<WindowReport> {
        use libbpf_rs::{MapCore, MapFlags};
        let b = self.skel.maps.initial_window.lookup(&sys::iw_key(peer), MapFlags::ANY).ok()??;
        sys::parse_iw_value(&b)
    }

    /// In this build: nothing.
    #[cfg(dwcp_no_bpf)]
    pub fn report(&self, _peer: SocketAddr) -> Option<WindowReport> {
        None
    }
}

/// A gain in sixteenths, within 1 and 4.
#[cfg_attr(dwcp_no_bpf, allow(dead_code))]
fn gain16(g: f64) -> u32 {
    (g.clamp(1.0, 4.0) * 16.0).round() as u32
}
