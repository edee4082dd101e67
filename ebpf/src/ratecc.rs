//! The rate congestion control's loader: registers `src/bpf/ratecc.bpf.c` (a BPF struct_ops
//! TCP congestion control whose window follows the socket's `SO_MAX_PACING_RATE`) under a name
//! of this process's own, which sockets then select with `TCP_CONGESTION`. The registration is a
//! BPF link owned by this value: it goes when the value drops or the process exits (sockets that
//! use it keep it until they close).

use crate::ProbeError;

#[cfg(not(dwcp_no_bpf))]
#[allow(clippy::all, clippy::pedantic, missing_debug_implementations, unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/ratecc.skel.rs"));
}

/// The registered congestion control.
pub struct RateCc {
    name: String,
    #[cfg(not(dwcp_no_bpf))]
    _skel: skel::RateccSkel<'static>,
    #[cfg(not(dwcp_no_bpf))]
    _link: libbpf_rs::Link,
}

impl std::fmt::Debug for RateCc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateCc").field("name", &self.name).finish_non_exhaustive()
    }
}

/// The name this process registers it under (TCP_CA_NAME_MAX is 16 with its NUL; a pid has at
/// most 7 digits).
pub fn rate_cc_name() -> String {
    format!("dwcp_rate{}", std::process::id())
}

impl RateCc {
    /// In this build: why there is none.
    #[cfg(dwcp_no_bpf)]
    pub fn register() -> Result<Self, ProbeError> {
        Err(ProbeError::NotBuilt(env!("DWCP_NO_BPF_WHY")))
    }

    /// Loads and registers it. Needs CAP_BPF and CAP_NET_ADMIN (root) and a kernel whose
    /// `tcp_congestion_ops.cong_control` takes the acknowledgement and its flags (Linux 6.10 and
    /// later); an older kernel refuses the program and this says so.
    #[cfg(not(dwcp_no_bpf))]
    pub fn register() -> Result<Self, ProbeError> {
        use libbpf_rs::skel::{OpenSkel, SkelBuilder};
        crate::sys::probe_bpf()?;
        let name = rate_cc_name();
        // As in `Probes::load`: the skeleton borrows its object's storage for its whole life.
        let storage: &'static mut std::mem::MaybeUninit<libbpf_rs::OpenObject> = Box::leak(Box::new(std::mem::MaybeUninit::uninit()));
        let mut open = skel::RateccSkelBuilder::default().open(storage).map_err(crate::probes::load_err)?;
        let ops = open.struct_ops.dwcp_rate_mut();
        ops.name = [0; 16];
        for (d, s) in ops.name.iter_mut().zip(name.bytes().take(15)) {
            *d = s as i8;
        }
        let mut skel = open.load().map_err(|e| ProbeError::Load(format!("loading the rate congestion control (needs Linux 6.10 or later): {e:#}")))?;
        let link = skel.maps.dwcp_rate.attach_struct_ops().map_err(|e| ProbeError::Load(format!("registering the rate congestion control {name}: {e:#}")))?;
        Ok(Self { name, _skel: skel, _link: link })
    }

    /// The name sockets select it by.
    pub fn name(&self) -> &str {
        &self.name
    }
}
