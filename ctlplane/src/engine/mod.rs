//! The transfer engine every caller drives: [`plan`] decides (no I/O), [`transfer`] runs a send
//! (probe, plan, data plane, live mode control) and lets the caller watch, cancel and collect
//! it, [`migrate`] runs a QEMU live migration into one, [`live`] is the mode controller it runs, [`report`] the outcome's one JSON shape. `dwcp
//! send`, the daemon's `/transfers` and the C ABI call these; nothing else decides a knob.

pub mod live;
pub mod migrate;
pub mod plan;
pub mod report;
pub mod transfer;

pub use plan::{Host, Plan, PlanError, Request, decide};
pub use migrate::MigrateSpec;
pub use transfer::{EngineError, Failure, Outcome, Transfer, start, start_on};

/// This host, detected once: the cores the shards may use (all, or `cores`), whether an RDMA
/// device opens (and this build has the transport), and whether sealing costs less than the
/// plaintext tag here.
pub fn host(cores: Option<&[usize]>) -> Result<Host, PlanError> {
    let cores = dataplane::placement::shard_cores(cores).map_err(PlanError::Invalid)?.len();
    #[cfg(feature = "rdma")]
    let rdma = dataplane::transport::rdma::available();
    #[cfg(not(feature = "rdma"))]
    let rdma = false;
    // Measured once per process (a few milliseconds).
    static SEAL_CHEAPER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let seal_cheaper = *SEAL_CHEAPER.get_or_init(|| dataplane::crypto::ProtectionCost::measure().is_ok_and(|c| c.seal_bps >= c.tag_bps));
    Ok(Host { cores, rdma, seal_cheaper })
}
