//! The sender's RDMA data path: after the Welcome granted RDMA, the queue pairs are exchanged
//! on the control stream, then each shard writes chunks (header + payload, two scatter entries:
//! the payload straight from the source mapping, which is registered read-only) into the
//! receiver's slots with RDMA WRITE WITH IMMEDIATE (the slot number) and takes credits back by
//! receive. The control stream carries the Commit afterwards, as for TCP.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{Chunk, RdmaFault, SendError, SendOptions, Shared};
use crate::crypto::ChunkTag;
use crate::handshake::{Conn, HandshakeError};
use crate::source::Source;
use crate::transport::rdma::sys::{Cq, Mr, Qp, Rts, Wc};
use crate::transport::rdma::{self, Local, Poll};
use crate::wire::{self, FrameHeader, FrameType, HEADER_LEN, RDMA_SLOT_HEADER, RdmaAccept, RdmaConnect, RdmaCredit};

/// RDMA options of a send.
#[derive(Debug, Clone, Default)]
pub struct RdmaOptions {
    /// Device (None: the first).
    pub device: Option<String>,
    /// Queue pairs (0: one per shard core).
    pub qps: u16,
    /// Completion waiting.
    pub poll: Poll,
}

/// The connected data path of one session.
pub(super) struct Connected {
    local: Local,
    qps: Vec<Vec<Qp<Rts>>>,
    accept: RdmaAccept,
    /// The control stream, watched by the shards while they wait: the receiver's end closing
    /// (it stopped or died) ends the send at once instead of after the idle timeout.
    ctl: std::net::TcpStream,
    /// Each chunk's tag, under the session's key.
    tag: ChunkTag,
}

fn setup_err(e: impl std::fmt::Display) -> SendError {
    SendError::Rdma(e.to_string())
}

impl Connected {
    /// Queue pairs connected.
    pub(crate) fn qps(&self) -> u16 {
        self.accept.qps.len() as u16
    }
}

/// Sends our queue pairs, reads the receiver's, connects.
pub(super) fn connect(c0: &mut Conn, mut local: Local, opts: &SendOptions) -> Result<Connected, SendError> {
    let during = |e| SendError::Setup { stream: 0, source: e };
    let tag = c0.codec.chunk_tag_to_send().ok_or_else(|| SendError::Rdma("the control stream has no keys to tag chunks with".into()))?;
    c0.write_frame(FrameType::RdmaConnect, 0, &RdmaConnect { qps: local.endpoints() }.encode()).map_err(during)?;
    let (_, p) = c0.expect(FrameType::RdmaAccept, "waiting for the receiver's RDMA queue pairs").map_err(during)?;
    let accept = RdmaAccept::decode(&p).map_err(|e| during(HandshakeError::Wire { during: "reading the RDMA accept", source: e }))?;
    let ours: usize = local.shards.iter().map(|s| s.1.len()).sum();
    if accept.qps.len() != ours {
        return Err(SendError::Rdma(format!("the receiver answered with {} queue pairs for our {ours}", accept.qps.len())));
    }
    let need = RDMA_SLOT_HEADER as u64 + u64::from(opts.chunk_size);
    if u64::from(accept.slot_size) < need {
        return Err(SendError::Rdma(format!(
            "the receiver's RDMA region is too small: slots of {} bytes cannot hold a {}-byte chunk, its header and tag (use --chunk-size {} or less)",
            accept.slot_size,
            opts.chunk_size,
            (accept.slot_size as usize).saturating_sub(RDMA_SLOT_HEADER)
        )));
    }
    let mut remote = accept.qps.iter();
    let mut qps = Vec::new();
    for (_, shard) in &mut local.shards {
        let mut connected = Vec::new();
        for q in shard.drain(..) {
            let r = rdma::from_wire(remote.next().expect("counted above"));
            connected.push(q.connect(&r).map_err(setup_err)?);
        }
        qps.push(connected);
    }
    info!(qps = ours, slots = accept.slots, slot_size = accept.slot_size, device = %local.dev.name, "RDMA queue pairs connected");
    let ctl = c0.sock.try_clone().map_err(|source| SendError::Io { during: "watching the control stream", source })?;
    Ok(Connected { local, qps, accept, ctl, tag })
}

/// Per-slot state of a queue pair at the sender.
struct QpState {
    qp: Qp<Rts>,
    /// Slots this queue pair owns, free to write.
    free: Vec<u32>,
    /// Slots written, awaiting their credit.
    inflight: HashMap<u32, (Chunk, Instant)>,
}

const WR_WRITE: u64 = 1 << 62;
const WR_CREDIT: u64 = 1 << 61;
const WR_BYE: u64 = 1 << 60;

/// Runs the data path over every shard; returns the manifest entries of what was sent.
pub(super) fn run(
    c: Connected,
    shared: &Shared,
    source: &Source,
    opts: &SendOptions,
    rdma: &RdmaOptions,
    fault: Option<RdmaFault>,
    cores: &[core_affinity::CoreId],
) -> Result<Vec<(u64, u32, u64)>, SendError> {
    let Connected { local, qps, accept, ctl, tag } = c;
    let ctl = ctl.as_raw_fd();
    let nqps = accept.qps.len() as u32;
    // The source mapping, registered once, is the payload of every write (no copy). Kernels
    // may refuse to pin a file's pages for long (file systems with writeback; overlayfs): then
    // each chunk is copied once into a registered staging slot.
    let src_mr = match source {
        Source::File { map: Some(m), .. } => match Mr::register_readonly(&local.pd, m) {
            Ok(mr) => Some(Arc::new(mr)),
            Err(e) => {
                warn!("{e}: the source mapping cannot be registered; chunks are copied into registered staging slots");
                None
            }
        },
        _ => None,
    };
    let mut global = 0u32;
    let mut shard_qps = Vec::new();
    for (k, q) in qps.into_iter().enumerate() {
        let mut states = Vec::new();
        for qp in q {
            let i = global;
            global += 1;
            let free: Vec<u32> = (0..accept.slots).filter(|s| s % nqps == i).collect();
            states.push(QpState { qp, free, inflight: HashMap::new() });
        }
        shard_qps.push((local.shards[k].0.clone(), states));
    }
    let pd = local.pd.clone();
    type ShardManifest = Result<Vec<(u64, u32, u64)>, SendError>;
    let results: Vec<ShardManifest> = std::thread::scope(|sc| {
        let hs: Vec<_> = shard_qps
            .into_iter()
            .enumerate()
            .map(|(k, (cq, states))| {
                let (pd, src_mr, accept, tag) = (pd.clone(), src_mr.clone(), &accept, &tag);
                let core = cores.get(k % cores.len().max(1)).copied();
                sc.spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    let r = shard(&pd, &cq, states, src_mr, accept, tag, ctl, shared, source, opts, rdma, fault);
                    if r.is_err() {
                        shared.stop.store(true, Relaxed);
                    }
                    r
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("rdma shard")).collect()
    });
    let mut manifest = Vec::new();
    let mut first_err = None;
    for r in results {
        match r {
            Ok(m) => manifest.extend(m),
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(manifest),
    }
}

#[allow(clippy::too_many_arguments)]
fn shard(
    pd: &Arc<crate::transport::rdma::sys::Pd>,
    cq: &Arc<Cq>,
    mut qps: Vec<QpState>,
    src_mr: Option<Arc<Mr>>,
    accept: &RdmaAccept,
    tag: &ChunkTag,
    ctl: std::os::fd::RawFd,
    shared: &Shared,
    source: &Source,
    opts: &SendOptions,
    ro: &RdmaOptions,
    fault: Option<RdmaFault>,
) -> Result<Vec<(u64, u32, u64)>, SendError> {
    let slots = accept.slots as usize;
    let chunk = opts.chunk_size as usize;
    // Headers for every slot, credits landing per slot, and (for sources that are not a
    // mapping) a staging area per slot.
    let hdr = Arc::new(Mr::alloc(pd, slots * RDMA_SLOT_HEADER, false).map_err(setup_err)?);
    let credits = Arc::new(Mr::alloc(pd, slots * RdmaCredit::LEN, false).map_err(setup_err)?);
    let staging = match &src_mr {
        Some(_) => None,
        None => Some(Arc::new(Mr::alloc(pd, slots * chunk, false).map_err(setup_err)?)),
    };
    let hdr_base = hdr.addr();
    let credit_base = credits.addr();
    for q in &mut qps {
        q.qp.attach(&hdr);
        q.qp.attach(&credits);
        if let Some(m) = &src_mr {
            q.qp.attach(m);
        }
        if let Some(m) = &staging {
            q.qp.attach(m);
        }
        for &s in &q.free {
            q.qp.recv(WR_CREDIT | u64::from(s), credit_base + u64::from(s) * RdmaCredit::LEN as u64, RdmaCredit::LEN as u32).map_err(setup_err)?;
        }
    }
    let by_qpn: HashMap<u32, usize> = qps.iter().enumerate().map(|(i, q)| (q.qp.qpn(), i)).collect();
    let mut manifest = Vec::new();
    let mut wcs: Vec<Wc> = Vec::with_capacity(16);
    let mut stash: Option<Chunk> = None;
    let (mut last_progress, mut last_watch) = (Instant::now(), Instant::now());
    let (mut rkey, mut past) = (accept.rkey, 0u64);
    match fault {
        Some(RdmaFault::WrongRkey) => rkey ^= 0x5a5a,
        Some(RdmaFault::PastRegion) => past = u64::from(accept.slots) * u64::from(accept.slot_size),
        Some(RdmaFault::BadTag) | None => {}
    }
    loop {
        if shared.stopped() {
            break;
        }
        let idle_qps = qps.iter().all(|q| q.inflight.is_empty());
        if shared.done() && idle_qps {
            break;
        }
        // Fill every free slot.
        let mut posted = false;
        for q in &mut qps {
            while let Some(&slot) = q.free.last() {
                let Some(c) = stash.take().or_else(|| shared.next_chunk()) else { break };
                let len = c.len as usize;
                let s = slot as usize;
                let (payload_addr, payload) = match (&src_mr, &c.data) {
                    (Some(m), None) => (m.addr() + c.offset, m.read(c.offset as usize, len)),
                    _ => {
                        // Generated or piped bytes: into the slot's staging area (free, since
                        // the slot is: no write reads it now).
                        let st = staging.as_ref().expect("staging for non-mapped sources");
                        st.fill_at(s * chunk, len, |area| match &c.data {
                            Some(d) => area.copy_from_slice(&d[..len]),
                            None => source.fill(c.offset, area),
                        });
                        (st.addr() + (s * chunk) as u64, st.read(s * chunk, len))
                    }
                };
                let sum = wire::checksum(payload);
                let h = FrameHeader { kind: FrameType::Chunk, stream: 0, flags: 0, offset: c.offset, len: c.len, checksum: sum }.encode();
                let mut t = tag.tag(&h, payload);
                if matches!(fault, Some(RdmaFault::BadTag)) {
                    t[0] ^= 1;
                }
                hdr.write_at(s * RDMA_SLOT_HEADER, &h);
                hdr.write_at(s * RDMA_SLOT_HEADER + HEADER_LEN, &t);
                let remote = accept.addr + u64::from(slot) * u64::from(accept.slot_size) + past;
                let pieces = [(hdr_base + (s * RDMA_SLOT_HEADER) as u64, RDMA_SLOT_HEADER as u32), (payload_addr, c.len)];
                let n = if len == 0 { 1 } else { 2 };
                q.qp.write_imm(WR_WRITE | u64::from(slot), &pieces[..n], remote, rkey, slot).map_err(setup_err)?;
                q.free.pop();
                manifest.push((c.offset, c.len, sum));
                shared.sent_bytes.fetch_add((RDMA_SLOT_HEADER + len) as u64, Relaxed);
                q.inflight.insert(slot, (c, Instant::now()));
                posted = true;
            }
        }
        wcs.clear();
        cq.poll(&mut wcs, 16).map_err(setup_err)?;
        if wcs.is_empty() && !posted {
            if last_watch.elapsed() > Duration::from_millis(100) {
                last_watch = Instant::now();
                if crate::sys::peer_closed(ctl) {
                    return Err(SendError::Rdma("the receiver closed the control stream (it stopped or died)".into()));
                }
            }
            if last_progress.elapsed() > opts.idle_timeout && !qps.iter().all(|q| q.inflight.is_empty()) {
                return Err(SendError::Rdma(format!("no RDMA credit for {:.1}s (stalled receiver)", opts.idle_timeout.as_secs_f64())));
            }
            if ro.poll == Poll::Event {
                cq.wait(Duration::from_millis(50)).map_err(setup_err)?;
            } else {
                std::hint::spin_loop();
            }
            continue;
        }
        for w in wcs.drain(..) {
            if let Err(why) = w.status {
                let what = if w.wr_id & WR_WRITE != 0 { "RDMA WRITE of a chunk" } else { "credit receive" };
                return Err(SendError::Rdma(format!("{what} failed: {why}")));
            }
            if w.wr_id & WR_CREDIT == 0 {
                continue;
            }
            last_progress = Instant::now();
            let slot = (w.wr_id & 0xffff_ffff) as u32;
            let Some(&qi) = by_qpn.get(&w.qp_num) else { continue };
            let at = (slot as usize) * RdmaCredit::LEN;
            let credit = RdmaCredit::decode(credits.read(at, RdmaCredit::LEN)).map_err(setup_err)?;
            let q = &mut qps[qi];
            let Some((c, _)) = q.inflight.remove(&credit.slot) else {
                return Err(SendError::Rdma(format!("credit for slot {} that holds no chunk", credit.slot)));
            };
            if credit.code != 0 {
                let code = wire::ErrorCode::from_u16(credit.code);
                return Err(SendError::Receiver { code, message: format!("the receiver refused the chunk at offset {} written over RDMA", c.offset) });
            }
            shared.acked_chunks.fetch_add(1, Relaxed);
            shared.progress.acked.fetch_add(u64::from(c.len), Relaxed);
            q.free.push(credit.slot);
            // The credit's buffer is the slot's own: post it again for the next credit.
            q.qp.recv(WR_CREDIT | u64::from(slot), credit_base + at as u64, RdmaCredit::LEN as u32).map_err(setup_err)?;
        }
    }
    // Tell the receiver's data path we are through (it stops waiting for chunks).
    if let Some(q) = qps.first_mut()
        && !shared.stopped()
    {
        let bye = RdmaCredit { slot: u32::MAX, code: 0, offset: 0 }.encode();
        // Header slot 0 is free: every write has been credited.
        hdr.write_at(0, &bye);
        if q.qp.send(WR_BYE, hdr_base, RdmaCredit::LEN as u32).is_ok() {
            let t = Instant::now();
            'wait: while t.elapsed() < Duration::from_secs(2) {
                wcs.clear();
                if cq.poll(&mut wcs, 16).is_err() {
                    break;
                }
                for w in &wcs {
                    if w.wr_id == WR_BYE {
                        if let Err(why) = w.status {
                            warn!("RDMA goodbye failed: {why}");
                        }
                        break 'wait;
                    }
                }
            }
        }
    }
    Ok(manifest)
}
