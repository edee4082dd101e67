//! Host detection, once at boot, into one plain [`HostCaps`] value that is logged, shown on
//! `/status` and passed down; code branches on it instead of probing again.
//!
//! Topology comes from hwloc through `hwlocality` (safe bindings to the hwloc 2 C library that
//! glommio-style placement needs anyway: cores, processing units and NUMA nodes with their CPU
//! sets, the same view `lstopo` gives). The `hwloc` crate binds the old 1.x API only.

use std::path::Path;

use hwlocality::Topology;
use hwlocality::object::types::ObjectType;
use serde::Serialize;

/// One NUMA node.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NumaNode {
    /// OS index.
    pub os_index: usize,
    /// Processing units (OS indices) in this node.
    pub cpus: Vec<usize>,
    /// Local memory in bytes, when hwloc knows it.
    pub memory_bytes: u64,
}

/// What this host can do.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HostCaps {
    /// Kernel release.
    pub kernel: String,
    /// Physical cores.
    pub cores: usize,
    /// Processing units (hardware threads).
    pub pus: usize,
    /// NUMA nodes.
    pub numa: Vec<NumaNode>,
    /// io_uring operations dwcp uses, and whether each is supported; empty if io_uring is missing.
    pub io_uring_ops: Vec<(String, bool)>,
    /// Why io_uring is unavailable, if it is.
    pub io_uring_error: Option<String>,
    /// Zero-copy sends available.
    pub send_zc: bool,
    /// Why BPF is unavailable, if it is.
    pub bpf_denied: Option<String>,
    /// RDMA devices (from /sys/class/infiniband).
    pub rdma_devices: Vec<String>,
}

/// Detects the host. Never fails: what cannot be detected is recorded as missing.
pub fn detect() -> HostCaps {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default();
    let (cores, pus, numa) = match Topology::new() {
        Ok(t) => {
            let cores = t.objects_with_type(ObjectType::Core).count();
            let pus = t.objects_with_type(ObjectType::PU).count();
            (cores, pus, crate::itp::numa_nodes(&t))
        }
        Err(_) => {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            (n, n, Vec::new())
        }
    };
    let (io_uring_ops, io_uring_error) = match dataplane::transport::uring::probe_ops() {
        Ok(ops) => (ops.into_iter().map(|(n, b)| (n.to_owned(), b)).collect::<Vec<_>>(), None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let send_zc = io_uring_ops.iter().any(|(n, b)| n == "SEND_ZC" && *b);
    HostCaps {
        kernel,
        cores,
        pus,
        numa,
        io_uring_ops,
        io_uring_error,
        send_zc,
        bpf_denied: ebpf::probe_bpf().err().map(|e| e.to_string()),
        rdma_devices: rdma_devices(Path::new("/sys/class/infiniband")),
    }
}

/// RDMA devices listed under `dir`.
pub fn rdma_devices(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_this_host() {
        let h = detect();
        assert!(h.cores >= 1 && h.pus >= h.cores);
        assert!(!h.kernel.is_empty());
        assert!(!h.numa.is_empty(), "hwloc sees at least one NUMA node");
        assert_eq!(h.numa.iter().map(|n| n.cpus.len()).sum::<usize>(), h.pus);
        // This machine has io_uring with SEND_ZC (kernel 6.x) and no RDMA device.
        if h.io_uring_error.is_none() {
            assert!(h.io_uring_ops.iter().any(|(n, b)| n == "SEND" && *b));
        }
    }

    #[test]
    fn rdma_devices_from_sysfs() {
        let d = std::env::temp_dir().join(format!("dwcp-ib-{}", std::process::id()));
        std::fs::create_dir_all(d.join("rxe0")).unwrap();
        std::fs::create_dir_all(d.join("mlx5_0")).unwrap();
        assert_eq!(rdma_devices(&d), vec!["mlx5_0".to_string(), "rxe0".to_string()]);
        assert!(rdma_devices(Path::new("/nonexistent")).is_empty());
        std::fs::remove_dir_all(d).unwrap();
    }
}
