//! ITP: which cores a daemon job's shards are pinned to, whether a job will meet its deadline,
//! and how jobs on one link share it. No I/O in [`place`]; its inputs are the host's NUMA nodes
//! (hwloc, once at boot), the node of the NIC the kernel routes the peer through
//! (`/proc/net/route` or `/proc/net/ipv6_route`, and sysfs, read per job by [`nic_of`]) and the
//! shards the running jobs already hold on each core.
//!
//! The rules, from what the field does (UCX and DPDK pin next to the NIC; perftest's `-c` the
//! same): a NIC's DMA lands in its node's memory and its interrupts on its node's cores, so the
//! shards that touch every byte run there; the cores are handed least loaded first, so a job
//! with fewer shards than the node has cores lands on idle ones instead of doubling up on the
//! first; a job goes to another node only when every core of the NIC's node already carries at
//! least [`SPILL_AT`] shards and the other node has an idle core (crossing the interconnect then
//! costs less than time-sharing a core). A job never spans nodes: its shards share the chunk
//! queue, and half of them remote would put that traffic on the interconnect.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use serde::Serialize;

use crate::host::NumaNode;

/// Shards per core on every core of the NIC's node at which a job goes to an idle node instead.
pub const SPILL_AT: usize = 2;

/// Where one job runs, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// The NUMA node (OS index), when the host has any.
    pub node: Option<usize>,
    /// The cores in the order the shards take them (least loaded first).
    pub cores: Vec<usize>,
    /// The reason, for `dwcp job list`, the log and `/transfers`.
    pub why: String,
}

/// The NIC a job's traffic leaves through: its name, and its NUMA node when the kernel knows it
/// (a virtual NIC, loopback, or a one-node host says -1, kept as `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nic {
    /// Interface name.
    pub name: String,
    /// NUMA node.
    pub node: Option<usize>,
}

/// Places a job: the cores (among `allowed`, the process's or the config's) its shards take,
/// given the host's `nodes`, the peer's `nic` and the shards running jobs hold per core (`load`).
/// With no NUMA information at all, the allowed cores least loaded first.
pub fn place(nodes: &[NumaNode], allowed: &[usize], nic: Option<&Nic>, load: &BTreeMap<usize, usize>) -> Placement {
    let shards = |c: &usize| load.get(c).copied().unwrap_or(0);
    let ordered = |mut v: Vec<usize>| {
        v.sort_by_key(|c| (shards(c), *c));
        v
    };
    // Each node with the allowed cores it holds.
    let usable: Vec<(usize, Vec<usize>)> =
        nodes.iter().map(|n| (n.os_index, n.cpus.iter().copied().filter(|c| allowed.contains(c)).collect::<Vec<_>>())).filter(|(_, c)| !c.is_empty()).collect();
    if usable.is_empty() {
        return Placement { node: None, cores: ordered(allowed.to_vec()), why: "no NUMA information: the allowed cores, least loaded first".into() };
    }
    let busiest_min = |cores: &[usize]| cores.iter().map(shards).min().unwrap_or(0);
    let per_core = |cores: &[usize]| cores.iter().map(shards).sum::<usize>() as f64 / cores.len() as f64;
    // The least loaded node (shards per core, then index): where a job goes without a NIC node.
    let idlest = usable.iter().min_by(|a, b| per_core(&a.1).total_cmp(&per_core(&b.1)).then(a.0.cmp(&b.0))).expect("non-empty");
    let local = nic.and_then(|n| n.node).and_then(|k| usable.iter().find(|(i, _)| *i == k));
    let (node, why) = match (nic, local) {
        (Some(n), Some(l)) if busiest_min(&l.1) >= SPILL_AT && busiest_min(&idlest.1) == 0 && idlest.0 != l.0 => {
            (idlest, format!("{} is on node {}, whose every core already runs {SPILL_AT} or more shards; node {} has an idle core", n.name, l.0, idlest.0))
        }
        (Some(n), Some(l)) => (l, format!("next to {} on node {}", n.name, l.0)),
        (Some(n), None) if n.node.is_some() => (idlest, format!("{}'s node {} has none of the allowed cores; the least loaded node", n.name, n.node.unwrap_or(0))),
        (Some(n), None) => (idlest, format!("{} has no NUMA node (virtual or loopback); the least loaded node", n.name)),
        (None, _) => (idlest, "route unknown; the least loaded node".into()),
    };
    Placement { node: Some(node.0), cores: ordered(node.1.clone()), why }
}

/// The host's NUMA nodes as hwloc sees them in `t` (a live topology or a synthetic one).
pub fn numa_nodes(t: &hwlocality::Topology) -> Vec<NumaNode> {
    use hwlocality::object::types::ObjectType;
    t.objects_with_type(ObjectType::NUMANode)
        .map(|n| NumaNode {
            os_index: n.os_index().unwrap_or(0),
            cpus: n.cpuset().map(|c| c.iter_set().map(usize::from).collect()).unwrap_or_default(),
            memory_bytes: n.total_memory(),
        })
        .collect()
}

/// The NUMA nodes of an hwloc synthetic topology such as `"pack:2 numa:1 core:4 pu:1"` (two
/// nodes of four cores), for tests and for planning a host one does not have.
pub fn synthetic(description: &str) -> Result<Vec<NumaNode>, String> {
    let t = hwlocality::Topology::builder()
        .from_synthetic(description)
        .map_err(|e| format!("hwloc synthetic topology {description:?}: {e}"))?
        .build()
        .map_err(|e| format!("hwloc synthetic topology {description:?}: {e}"))?;
    Ok(numa_nodes(&t))
}

/// The interface the kernel routes IPv4 `ip` through, from the text of `/proc/net/route`
/// (longest prefix, then least metric; loopback addresses go through `lo`).
pub fn route_iface(table: &str, ip: IpAddr) -> Option<String> {
    let v4 = match ip {
        IpAddr::V4(a) if a.is_loopback() => return Some("lo".into()),
        IpAddr::V4(a) => a,
        IpAddr::V6(a) if a.is_loopback() => return Some("lo".into()),
        IpAddr::V6(_) => return None,
    };
    // Addresses in the table are the kernel's little-endian hex of the network-order bytes.
    let hex = |s: &str| u32::from_str_radix(s, 16).ok().map(|v| Ipv4Addr::from(v.swap_bytes()));
    let mut best: Option<(u32, u32, String)> = None;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Some(dest), Some(mask), Ok(flags), Ok(metric)) = (hex(f[1]), hex(f[7]), u32::from_str_radix(f[3], 16), f[6].parse::<u32>()) else { continue };
        // RTF_UP.
        if flags & 1 == 0 || u32::from(v4) & u32::from(mask) != u32::from(dest) {
            continue;
        }
        let prefix = u32::from(mask).count_ones();
        if best.as_ref().is_none_or(|b| prefix > b.0 || (prefix == b.0 && metric < b.1)) {
            best = Some((prefix, metric, f[0].to_owned()));
        }
    }
    best.map(|b| b.2)
}

/// The interface the kernel routes IPv6 `ip` through, from the text of `/proc/net/ipv6_route`
/// (destination, prefix length, source, its length, next hop, metric, references, use, flags,
/// interface; longest prefix, then least metric).
pub fn route6_iface(table: &str, ip: std::net::Ipv6Addr) -> Option<String> {
    if ip.is_loopback() {
        return Some("lo".into());
    }
    let want = u128::from(ip);
    let mut best: Option<(u32, u32, String)> = None;
    for line in table.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let (Ok(dest), Ok(plen), Ok(metric), Ok(flags)) =
            (u128::from_str_radix(f[0], 16), u32::from_str_radix(f[1], 16), u32::from_str_radix(f[5], 16), u32::from_str_radix(f[8], 16))
        else {
            continue;
        };
        let mask = if plen == 0 { 0 } else { u128::MAX << (128 - plen.min(128)) };
        // RTF_UP, and not a reject route (RTF_REJECT, 0x200: unreachable).
        if flags & 1 == 0 || flags & 0x200 != 0 || want & mask != dest & mask {
            continue;
        }
        if best.as_ref().is_none_or(|b| plen > b.0 || (plen == b.0 && metric < b.1)) {
            best = Some((plen, metric, f[9].to_owned()));
        }
    }
    best.map(|b| b.2)
}

/// The NUMA node of interface `name` from sysfs under `sys_class_net` (`/sys/class/net`).
pub fn iface_node(sys_class_net: &Path, name: &str) -> Option<usize> {
    let s = std::fs::read_to_string(sys_class_net.join(name).join("device/numa_node")).ok()?;
    s.trim().parse::<i64>().ok().and_then(|n| usize::try_from(n).ok())
}

/// The NIC this host sends to `ip` through, as the kernel has it now.
pub fn nic_of(ip: IpAddr) -> Option<Nic> {
    let name = match ip {
        IpAddr::V6(a) if !a.is_loopback() => match a.to_ipv4_mapped() {
            Some(v4) => route_iface(&std::fs::read_to_string("/proc/net/route").unwrap_or_default(), IpAddr::V4(v4))?,
            None => route6_iface(&std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default(), a)?,
        },
        _ => route_iface(&std::fs::read_to_string("/proc/net/route").unwrap_or_default(), ip)?,
    };
    let node = iface_node(Path::new("/sys/class/net"), &name);
    Some(Nic { name, node })
}

/// Where a transfer stands against its deadline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Deadline {
    /// Seconds left until it is due (negative: overdue).
    pub due_in_s: f64,
    /// When it would finish, seconds from now, at the top and the bottom of PBA's 80% interval
    /// of the next second's goodput (None until PBA has an interval).
    pub finish_s: Option<(f64, f64)>,
    /// `met`, `missed`, `on track` (even at the interval's bottom), `at risk` (inside the
    /// interval), `will miss` (even at its top), `not predicted yet`.
    pub verdict: &'static str,
}

/// Judges a running transfer due `due_s` after its start, `elapsed_s` in, with `remaining`
/// bytes to go (`None`: its size is not known) and PBA's 80% bounds of the next second's
/// goodput in bit/s. The bounds are those of one second carried over the rest of the transfer,
/// which overstates the spread of a long remainder's average: `at risk` is the cautious side.
pub fn deadline(due_s: f64, elapsed_s: f64, remaining: Option<u64>, bounds: Option<(u64, u64)>) -> Deadline {
    let due_in_s = due_s - elapsed_s;
    let finish_s = remaining.zip(bounds).map(|(remaining, (lo, hi))| {
        let bits = remaining as f64 * 8.0;
        let at = |bps: u64| if bps == 0 { f64::INFINITY } else { bits / bps as f64 };
        (at(hi), at(lo))
    });
    let verdict = match finish_s {
        _ if due_in_s < 0.0 => "missed",
        None => "not predicted yet",
        Some((_, slow)) if slow <= due_in_s => "on track",
        Some((fast, _)) if fast > due_in_s => "will miss",
        Some(_) => "at risk",
    };
    Deadline { due_in_s, finish_s, verdict }
}

/// Judges a transfer that ended `at_s` after its start: met if it was verified in time.
pub fn deadline_ended(due_s: f64, at_s: f64, verified: bool) -> Deadline {
    let due_in_s = due_s - at_s;
    Deadline { due_in_s, finish_s: None, verdict: if verified && due_in_s >= 0.0 { "met" } else { "missed" } }
}

/// One running job on a link, as [`share`] sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkJob {
    /// The job.
    pub id: u64,
    /// Bytes left to send.
    pub remaining: u64,
    /// Seconds until it is due (`None`: no deadline).
    pub due_in_s: Option<f64>,
}

/// What [`share`] sets for one job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cap {
    /// The job.
    pub id: u64,
    /// The pace its streams may not exceed, bit/s (`None`: uncapped).
    pub cap_bps: Option<f64>,
    /// Why, for the job's JSON.
    pub why: String,
}

/// Headroom on a deadline job's needed rate (its measured rate wobbles; PBA's interval at
/// 1 s is about +-20%).
pub const DEADLINE_MARGIN: f64 = 1.25;
/// The least share a capped job keeps of the link, so that nothing starves.
pub const MIN_SHARE: f64 = 0.03;

/// Shares a link of measured `capacity_bps` between `jobs` by earliest deadline first: with no
/// deadline among them, nothing is capped (the streams share the link as TCP does). Otherwise
/// the job due first runs uncapped, so it takes whatever the others leave and the link stays
/// full (earliest deadline first is what minimizes the worst lateness, so a job already late
/// keeps its place); each later deadline job runs beside it at the rate it needs (its bytes
/// over its time left, at least a second, with [`DEADLINE_MARGIN`]); the jobs without a
/// deadline share what is left, each at least [`MIN_SHARE`] of the link. A deadline the link
/// cannot meet in that order (its bytes and all earlier ones' by its due time) is said so in
/// its reason. No I/O; the daemon calls it every tick with what it measured.
///
/// Tried and dropped: later deadline jobs waiting their turn at [`MIN_SHARE`] when the link
/// meets them in turn (strict earliest deadline first). On the rig each job then started its
/// turn from a few Mbit/s and ramped for about a second: `make bench-fleet` met fewer deadlines
/// (2 and 0 of 3 against 2 and 3) and the makespan grew 6-15%.
pub fn share(jobs: &[LinkJob], capacity_bps: f64) -> Vec<Cap> {
    let need = |j: &LinkJob, due: f64| j.remaining as f64 * 8.0 / due.max(1.0) * DEADLINE_MARGIN;
    let mut dl: Vec<(&LinkJob, f64)> = jobs.iter().filter_map(|j| j.due_in_s.map(|d| (j, d))).collect();
    if dl.is_empty() {
        return jobs.iter().map(|j| Cap { id: j.id, cap_bps: None, why: "no deadline on this link: shares it".into() }).collect();
    }
    dl.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.id.cmp(&b.0.id)));
    let mut bits = 0.0;
    let late: Vec<u64> = dl
        .iter()
        .filter(|(j, due)| {
            bits += j.remaining as f64 * 8.0;
            bits > capacity_bps * due.max(0.0)
        })
        .map(|(j, _)| j.id)
        .collect();
    let first = dl[0].0.id;
    let reserved: f64 = dl.iter().map(|(j, d)| need(j, *d)).sum::<f64>().min(capacity_bps);
    let others = jobs.len() - dl.len();
    let floor = MIN_SHARE * capacity_bps;
    let rest = if others > 0 { ((capacity_bps - reserved) / others as f64).max(floor) } else { 0.0 };
    let late_note = |id: u64| if late.contains(&id) { format!("; at the link's measured {:.0} Mbit/s it will be late", capacity_bps / 1e6) } else { String::new() };
    jobs.iter()
        .map(|j| match dl.iter().find(|(f, _)| f.id == j.id) {
            Some(_) if j.id == first => Cap { id: j.id, cap_bps: None, why: format!("earliest deadline: uncapped{}", late_note(j.id)) },
            Some((f, d)) => {
                let c = need(f, *d).max(floor);
                Cap { id: j.id, cap_bps: Some(c), why: format!("deadline in {d:.1} s: the {:.0} Mbit/s it needs{}", c / 1e6, late_note(j.id)) }
            }
            None => Cap { id: j.id, cap_bps: Some(rest), why: format!("no deadline: what the deadlines leave of {:.0} Mbit/s", capacity_bps / 1e6) },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_nodes() -> Vec<NumaNode> {
        // hwloc's own synthetic topology: two packages of one node of four single-PU cores.
        let n = synthetic("pack:2 numa:1 core:4 pu:1").expect("synthetic topology");
        assert_eq!(n.iter().map(|n| n.cpus.clone()).collect::<Vec<_>>(), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        n
    }

    fn nic(node: Option<usize>) -> Nic {
        Nic { name: "eth1".into(), node }
    }

    #[test]
    fn a_job_goes_next_to_its_nic_and_the_next_one_onto_idle_cores_there() {
        let nodes = two_nodes();
        let all: Vec<usize> = (0..8).collect();
        let mut load = BTreeMap::new();
        let p = place(&nodes, &all, Some(&nic(Some(1))), &load);
        assert_eq!((p.node, p.cores.clone()), (Some(1), vec![4, 5, 6, 7]), "{}", p.why);
        assert!(p.why.contains("eth1") && p.why.contains("node 1"), "{}", p.why);
        // A first job runs two shards (on 4 and 5): the second starts on 6 and 7.
        load.insert(4, 1);
        load.insert(5, 1);
        let p = place(&nodes, &all, Some(&nic(Some(1))), &load);
        assert_eq!(p.cores, vec![6, 7, 4, 5]);
        // The NIC's node full (two shards on every core), the other idle: the job goes there.
        for c in 4..8 {
            load.insert(c, SPILL_AT);
        }
        let p = place(&nodes, &all, Some(&nic(Some(1))), &load);
        assert_eq!(p.node, Some(0), "{}", p.why);
        assert!(p.why.contains("idle"), "{}", p.why);
        // ...but not when the other node is as busy: the NIC's node again.
        for c in 0..4 {
            load.insert(c, 1);
        }
        assert_eq!(place(&nodes, &all, Some(&nic(Some(1))), &load).node, Some(1));
    }

    #[test]
    fn without_a_nic_node_the_least_loaded_node_and_only_allowed_cores() {
        let nodes = two_nodes();
        let all: Vec<usize> = (0..8).collect();
        let mut load = BTreeMap::new();
        load.insert(0, 3);
        // A virtual NIC (no node): the least loaded node, 1.
        let p = place(&nodes, &all, Some(&nic(None)), &load);
        assert_eq!(p.node, Some(1));
        assert!(p.why.contains("no NUMA node"), "{}", p.why);
        // Unknown route, the same.
        assert_eq!(place(&nodes, &all, None, &load).node, Some(1));
        // Only cores 0-2 allowed (the config's `cores`): node 0, the busy core last.
        let p = place(&nodes, &[0, 1, 2], Some(&nic(Some(1))), &load);
        assert_eq!((p.node, p.cores), (Some(0), vec![1, 2, 0]));
        // No NUMA information at all (hwloc failed): the allowed cores, least loaded first.
        let p = place(&[], &[0, 1, 2], None, &load);
        assert_eq!((p.node, p.cores), (None, vec![1, 2, 0]));
    }

    #[test]
    fn a_larger_synthetic_host_keeps_jobs_on_their_nics_nodes() {
        // Four nodes of eight cores, two PUs each: NICs on nodes 1 and 3.
        let nodes = synthetic("pack:4 numa:1 core:8 pu:2").expect("synthetic topology");
        assert_eq!(nodes.len(), 4);
        let all: Vec<usize> = nodes.iter().flat_map(|n| n.cpus.clone()).collect();
        let load = BTreeMap::new();
        for k in [1, 3] {
            let p = place(&nodes, &all, Some(&nic(Some(k))), &load);
            assert_eq!(p.node, Some(k));
            assert_eq!(p.cores.len(), 16);
            assert!(p.cores.iter().all(|c| nodes[k].cpus.contains(c)));
        }
    }

    #[test]
    fn a_deadline_is_judged_by_both_ends_of_the_interval() {
        const GB: u64 = 125_000_000; // a gigabit, in bytes
        let b = Some((500_000_000, 1_000_000_000)); // 0.5-1 Gbit/s
        // 10 Gbit left, 30 s to go: 10-20 s at the bounds.
        assert_eq!(deadline(40.0, 10.0, Some(10 * GB), b).verdict, "on track");
        // 15 s to go: inside.
        let d = deadline(40.0, 25.0, Some(10 * GB), b);
        assert_eq!((d.verdict, d.finish_s), ("at risk", Some((10.0, 20.0))));
        // 5 s to go: not even at the top.
        assert_eq!(deadline(40.0, 35.0, Some(10 * GB), b).verdict, "will miss");
        assert_eq!(deadline(40.0, 41.0, Some(10 * GB), b).verdict, "missed");
        assert_eq!(deadline(40.0, 5.0, Some(10 * GB), None).verdict, "not predicted yet");
        assert_eq!(deadline(40.0, 5.0, Some(GB), Some((0, 1))).finish_s.map(|f| f.1), Some(f64::INFINITY));
        assert_eq!(deadline(40.0, 5.0, None, b).verdict, "not predicted yet", "size unknown");
        assert_eq!(deadline_ended(40.0, 39.0, true).verdict, "met");
        assert_eq!(deadline_ended(40.0, 41.0, true).verdict, "missed");
        assert_eq!(deadline_ended(40.0, 39.0, false).verdict, "missed", "a failed transfer missed it");
    }

    #[test]
    fn a_link_is_shared_earliest_deadline_first_and_left_alone_without_deadlines() {
        const MB: u64 = 1_000_000;
        let c = 200e6;
        let job = |id, mb: u64, due: Option<f64>| LinkJob { id, remaining: mb * MB, due_in_s: due };
        // Without deadlines: nothing capped.
        let caps = share(&[job(1, 250, None), job(2, 250, None)], c);
        assert!(caps.iter().all(|c| c.cap_bps.is_none()), "{caps:?}");
        // Two copies and three deadlines: 50 MB in 6, 9 and 12 s.
        let jobs = [job(1, 250, None), job(2, 250, None), job(3, 50, Some(6.0)), job(4, 50, Some(9.0)), job(5, 50, Some(12.0))];
        let caps = share(&jobs, c);
        let cap = |id: u64| caps.iter().find(|c| c.id == id).expect("a cap").cap_bps;
        assert_eq!(cap(3), None, "the earliest deadline runs uncapped");
        // The later ones get what they need: 400 Mbit over 9 s and 12 s, with the margin.
        assert!((cap(4).expect("capped") - 400e6 / 9.0 * DEADLINE_MARGIN).abs() < 1.0);
        assert!((cap(5).expect("capped") - 400e6 / 12.0 * DEADLINE_MARGIN).abs() < 1.0);
        // The copies share the rest: 200 - 1.25 x (66.7 + 44.4 + 33.3) = 19.4 Mbit/s, split.
        let rest = (c - DEADLINE_MARGIN * (400e6 / 6.0 + 400e6 / 9.0 + 400e6 / 12.0)) / 2.0;
        assert!((cap(1).expect("capped") - rest).abs() < 1.0 && cap(1) == cap(2), "{caps:?}");
        // Every cap plus the first's need fits the link.
        let sum: f64 = caps.iter().filter_map(|c| c.cap_bps).sum::<f64>() + 400e6 / 6.0 * DEADLINE_MARGIN;
        assert!(sum <= c + 1.0, "{sum}");
        // A deadline the link cannot meet (150 MB in 2 s at 200 Mbit/s) keeps its place, first,
        // and says it will be late; the next is capped at its need.
        let caps = share(&[job(1, 250, None), job(6, 150, Some(2.0)), job(3, 50, Some(6.0))], c);
        let six = caps.iter().find(|c| c.id == 6).expect("a cap");
        assert!(six.cap_bps.is_none() && six.why.contains("will be late"), "{six:?}");
        assert!(caps.iter().find(|c| c.id == 3).expect("a cap").cap_bps.is_some());
        // However many copies, each keeps its floor.
        let many: Vec<LinkJob> = (10..40).map(|i| job(i, 100, None)).chain([job(3, 50, Some(2.5))]).collect();
        assert!(share(&many, c).iter().filter_map(|c| c.cap_bps).all(|b| b >= MIN_SHARE * c - 1.0));
    }

    #[test]
    fn routes_are_matched_by_longest_prefix() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     rdma0\t00004D0A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
                     down0\t00024D0A\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let r = |s: &str| route_iface(table, s.parse().expect("ip"));
        assert_eq!(r("10.77.2.9").as_deref(), Some("rdma0"), "a route that is down is skipped");
        assert_eq!(r("192.0.2.7").as_deref(), Some("eth0"));
        assert_eq!(r("8.8.8.8").as_deref(), Some("eth0"));
        assert_eq!(r("127.0.0.1").as_deref(), Some("lo"));
        assert_eq!(r("::1").as_deref(), Some("lo"));
        assert_eq!(r("2001:db8::1"), None, "IPv6 is route6_iface's");
        assert_eq!(route_iface("Iface\n", "10.0.0.1".parse().expect("ip")), None);
        // IPv6, as this host's /proc/net/ipv6_route has it (a /64 on eth0, a default through a
        // router, a /48 on rdma0, a reject route, loopback).
        let t6 = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0\n\
                  20010db8000100000000000000000000 30 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001    rdma0\n\
                  20010db8000200000000000000000000 30 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00200201       lo\n";
        let r6 = |s: &str| route6_iface(t6, s.parse().expect("ip"));
        assert_eq!(r6("2001:db8:1::7").as_deref(), Some("rdma0"));
        assert_eq!(r6("fd00::9").as_deref(), Some("eth0"));
        assert_eq!(r6("2001:db8:2::1").as_deref(), Some("eth0"), "the reject route is skipped; the default remains");
        assert_eq!(r6("::1").as_deref(), Some("lo"));
        assert_eq!(route6_iface("", "2001:db8::1".parse().expect("ip")), None);
    }

    #[test]
    fn a_nics_node_is_read_from_sysfs_and_minus_one_is_none() {
        let d = tempfile::tempdir().expect("tmp");
        for (name, v) in [("a", "1\n"), ("b", "-1\n")] {
            std::fs::create_dir_all(d.path().join(name).join("device")).expect("mkdir");
            std::fs::write(d.path().join(name).join("device/numa_node"), v).expect("write");
        }
        assert_eq!(iface_node(d.path(), "a"), Some(1));
        assert_eq!(iface_node(d.path(), "b"), None);
        assert_eq!(iface_node(d.path(), "lo"), None);
    }
}
