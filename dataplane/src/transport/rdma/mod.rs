//! RDMA verbs transport: RC queue pairs, one-sided RDMA WRITE WITH IMMEDIATE of each chunk
//! (frame header + payload) into a slot of the receiver's registered region, credits returned by
//! SEND. Connection setup rides on the session's control stream (`RdmaConnect`/`RdmaAccept`
//! after the Welcome; see `docs/wire.md`). The sender's loop lives in `send.rs`, the receiver's
//! in `recv.rs`, beside their TCP counterparts, so both share session, journal and digest logic.
//! All `unsafe` is in [`sys`].

pub mod sys;

use std::sync::Arc;

use crate::wire::QpAddr;
use sys::{Cq, Device, Endpoint, Init, Pd, Qp, VerbsError};

/// Slots (chunks in flight) each queue pair owns at the receiver.
pub const SLOTS_PER_QP: u32 = 8;

/// How completions are waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Poll {
    /// Spin on the completion queue (lowest latency, one core busy).
    #[default]
    Busy,
    /// Sleep on the completion channel between completions.
    Event,
}

/// One side's verbs objects before connection: a device and protection domain, and per shard
/// (thread) a completion queue with its queue pairs.
#[derive(Debug)]
pub struct Local {
    /// Device.
    pub dev: Arc<Device>,
    /// Protection domain.
    pub pd: Arc<Pd>,
    /// Per shard: its completion queue and queue pairs (in INIT).
    pub shards: Vec<(Arc<Cq>, Vec<Qp<Init>>)>,
}

/// Opens `device` (or the first) and creates `nqps` queue pairs dealt over `nshards` completion
/// queues.
pub fn local(device: Option<&str>, nqps: usize, nshards: usize, poll: Poll) -> Result<Local, VerbsError> {
    let dev = Device::open(device)?;
    let pd = Pd::new(&dev)?;
    let per_qp = SLOTS_PER_QP + 4;
    let nshards = nshards.clamp(1, nqps.max(1));
    let mut shards = Vec::new();
    for k in 0..nshards {
        let mine = (k..nqps).step_by(nshards).count();
        let cq = Cq::new(&dev, (2 * per_qp as usize * mine) as i32 + 16, poll == Poll::Event)?;
        let qps = (0..mine).map(|_| Qp::new(&pd, &cq, per_qp + 2, per_qp + 2)).collect::<Result<_, _>>()?;
        shards.push((cq, qps));
    }
    Ok(Local { dev, pd, shards })
}

impl Local {
    /// Every queue pair's endpoint, in wire order (shard by shard).
    pub fn endpoints(&self) -> Vec<QpAddr> {
        self.shards.iter().flat_map(|(_, q)| q.iter().map(|q| to_wire(&q.endpoint()))).collect()
    }
}

/// The wire form of an endpoint.
pub fn to_wire(e: &Endpoint) -> QpAddr {
    QpAddr { qpn: e.qpn, psn: e.psn, gid: e.gid }
}

/// An endpoint from the wire.
pub fn from_wire(a: &QpAddr) -> Endpoint {
    Endpoint { qpn: a.qpn, psn: a.psn, gid: a.gid }
}

/// Whether this host has an RDMA device (for HostCaps and the transport choice).
pub fn available() -> bool {
    !sys::device_names().is_empty()
}
