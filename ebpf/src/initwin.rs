//! The initial-window loader: loads `src/bpf/initwin.bpf.c`, attaches it to this process's
//! cgroup (v2) as a sockops program, and fills its map with the peers whose connections get a
//! larger first congestion window. The attachment is a BPF link owned by this value: it detaches
//! when the value drops or the process exits, and leaves nothing behind.

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

    /// Connections to `peer` from now on start with a window of `bytes` (in segments of their
    /// MSS, at least ten).
    #[cfg(not(dwcp_no_bpf))]
    pub fn set(&self, peer: SocketAddr, bytes: u32) -> Result<(), ProbeError> {
        use libbpf_rs::{MapCore, MapFlags};
        let v = sys::iw_value(bytes);
        self.skel.maps.initial_window.update(&sys::iw_key(peer), &v, MapFlags::ANY).map_err(crate::probes::map_err("initial_window"))
    }

    /// In this build: nothing (no value exists to call it on).
    #[cfg(dwcp_no_bpf)]
    pub fn set(&self, _peer: SocketAddr, _bytes: u32) -> Result<(), ProbeError> {
        Ok(())
    }

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
