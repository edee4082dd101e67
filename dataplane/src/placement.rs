//! Which cores the shard threads are pinned to.
//!
//! Default: every core the process may run on, in order. `--cores` narrows it, like iperf3's
//! `-A`: two pinned programs on one host (a loopback test, a sender beside a receiver) otherwise
//! put their first shards on the same core and halve each other. NUMA-aware placement from the
//! hwloc topology comes with HostCaps (control plane issue).

use core_affinity::CoreId;

/// The cores to pin shards to: `wanted` (validated against the cores this process may use), or all.
pub fn shard_cores(wanted: Option<&[usize]>) -> Result<Vec<CoreId>, String> {
    let all = core_affinity::get_core_ids().unwrap_or_default();
    let Some(w) = wanted else {
        return Ok(if all.is_empty() { vec![CoreId { id: 0 }] } else { all });
    };
    if w.is_empty() {
        return Err("--cores needs at least one core".into());
    }
    w.iter()
        .map(|&id| {
            all.iter().find(|c| c.id == id).copied().ok_or_else(|| {
                let have: Vec<String> = all.iter().map(|c| c.id.to_string()).collect();
                format!("core {id} is not available to this process (available: {})", have.join(","))
            })
        })
        .collect()
}
