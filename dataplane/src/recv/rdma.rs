//! The receiver's RDMA data path: queue pairs set up on the session's control stream, a
//! registered region of slots the sender writes chunks into, and one thread per session that
//! takes each WRITE WITH IMMEDIATE's completion, verifies the slot's frame (header, bounds,
//! checksum), places the payload (one copy, region to page cache), tells the coordinator, and
//! returns the slot to the sender with a credit SEND.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use tracing::{info, warn};

use super::{Out, SessionRef, ToCoord, millis};
use crate::crypto::ChunkTag;
use crate::handshake::{Conn, HandshakeError};
use crate::transport::rdma::sys::{Cq, Device, Mr, Pd, Qp, Rts, VerbsError, Wc};
use crate::transport::rdma::{self, Poll, SLOTS_PER_QP};
use crate::wire::{ErrorCode, FrameHeader, FrameType, HEADER_LEN, RDMA_SLOT_HEADER, RdmaAccept, RdmaConnect, RdmaCredit, TAG_LEN};

/// RDMA options of a receiver.
#[derive(Debug, Clone, Default)]
pub struct RdmaRecvOptions {
    /// Device (None: the first).
    pub device: Option<String>,
    /// Completion waiting.
    pub poll: Poll,
}

/// A device opened when a sender asked for RDMA, before the Welcome grants it.
pub(super) struct Granted {
    dev: Arc<Device>,
    pd: Arc<Pd>,
}

/// Opens the device for a session that asked for RDMA; the reason when it cannot be granted.
pub(super) fn grant(o: &RdmaRecvOptions) -> Result<Granted, VerbsError> {
    let dev = Device::open(o.device.as_deref())?;
    let pd = Pd::new(&dev)?;
    Ok(Granted { dev, pd })
}

fn verbs(e: VerbsError) -> HandshakeError {
    HandshakeError::Io { during: "setting up RDMA", source: std::io::Error::other(e.to_string()) }
}

/// Reads the sender's queue pairs, connects ours, answers with them and the region, and starts
/// the session's data-path thread.
#[allow(clippy::too_many_arguments)]
pub(super) fn accept(
    conn: &mut Conn,
    g: Granted,
    o: &RdmaRecvOptions,
    max_chunk: u32,
    sess: SessionRef,
    coord: Sender<ToCoord>,
    idle: Duration,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) -> Result<(), HandshakeError> {
    let (_, p) = conn.expect(FrameType::RdmaConnect, "reading the sender's RDMA queue pairs")?;
    let c = RdmaConnect::decode(&p).map_err(|source| HandshakeError::Wire { during: "reading the RDMA connect", source })?;
    let nqps = c.qps.len();
    let slots = nqps as u32 * SLOTS_PER_QP;
    let slot_size = (RDMA_SLOT_HEADER as u32 + max_chunk).next_multiple_of(64);
    let tag = conn.codec.chunk_tag_to_check().ok_or_else(|| HandshakeError::Wire {
        during: "setting up RDMA",
        source: crate::wire::WireError::Malformed { what: "RDMA session", why: "the control stream has no keys to check chunk tags with".into() },
    })?;
    let cq = Cq::new(&g.dev, (4 * slots) as i32 + 16, o.poll == Poll::Event).map_err(verbs)?;
    let region = Arc::new(Mr::alloc(&g.pd, slots as usize * slot_size as usize, true).map_err(verbs)?);
    let inbox = Arc::new(Mr::alloc(&g.pd, slots as usize * RdmaCredit::LEN, false).map_err(verbs)?);
    let outbox = Arc::new(Mr::alloc(&g.pd, slots as usize * RdmaCredit::LEN, false).map_err(verbs)?);
    let mut qps = Vec::new();
    let mut ours = Vec::new();
    for (i, remote) in c.qps.iter().enumerate() {
        let q = Qp::new(&g.pd, &cq, SLOTS_PER_QP + 4, SLOTS_PER_QP + 4).map_err(verbs)?;
        ours.push(rdma::to_wire(&q.endpoint()));
        let mut q = q.connect(&rdma::from_wire(remote)).map_err(verbs)?;
        for m in [&region, &inbox, &outbox] {
            q.attach(m);
        }
        // One receive per owned slot: each WRITE WITH IMMEDIATE consumes one.
        for s in (0..slots).filter(|s| *s as usize % nqps == i) {
            q.recv(u64::from(s), inbox.addr() + u64::from(s) * RdmaCredit::LEN as u64, RdmaCredit::LEN as u32).map_err(verbs)?;
        }
        qps.push(q);
    }
    let a = RdmaAccept { addr: region.addr(), rkey: region.rkey(), slot_size, slots, qps: ours };
    conn.write_frame(FrameType::RdmaAccept, 0, &a.encode())?;
    info!(qps = nqps, slots, slot_size, device = %g.dev.name, "RDMA session set up");
    let poll = o.poll;
    // Stream 0 goes to a shard; its descriptor is watched here so a vanished sender ends the
    // data path at once rather than after the idle timeout.
    let ctl = conn.sock.try_clone().map_err(|source| HandshakeError::Io { during: "watching the control stream", source })?;
    std::thread::Builder::new()
        .name("dwcp-rx-rdma".into())
        .spawn(move || {
            let id = sess.id;
            let why = serve(&cq, &mut qps, &region, &inbox, &outbox, slot_size, &tag, &sess, &coord, idle, epoch, &stop, poll, &ctl);
            if let Some(w) = &why {
                warn!("RDMA data path ended: {w}");
            }
            let _ = coord.send(ToCoord::Down { session: id, why: why.map(|w| format!("RDMA: {w}")) });
            drop(qps);
        })
        .map_err(|source| HandshakeError::Io { during: "starting the RDMA thread", source })?;
    Ok(())
}

/// The data path; returns why it ended (None: the sender said goodbye).
#[allow(clippy::too_many_arguments)]
fn serve(
    cq: &Arc<Cq>,
    qps: &mut [Qp<Rts>],
    region: &Mr,
    inbox: &Mr,
    outbox: &Mr,
    slot_size: u32,
    tag: &ChunkTag,
    sess: &SessionRef,
    coord: &Sender<ToCoord>,
    idle: Duration,
    epoch: Instant,
    stop: &AtomicBool,
    poll: Poll,
    ctl: &std::net::TcpStream,
) -> Option<String> {
    use std::os::fd::AsRawFd;
    let mut last_watch = Instant::now();
    let nqps = qps.len();
    let by_qpn: std::collections::HashMap<u32, usize> = qps.iter().enumerate().map(|(i, q)| (q.qpn(), i)).collect();
    let mut wcs: Vec<Wc> = Vec::with_capacity(16);
    let mut last = Instant::now();
    let ss = slot_size as usize;
    loop {
        if stop.load(Relaxed) {
            return Some("receiver stopping".into());
        }
        wcs.clear();
        if let Err(e) = cq.poll(&mut wcs, 16) {
            return Some(e.to_string());
        }
        if wcs.is_empty() {
            if last_watch.elapsed() > Duration::from_millis(100) {
                last_watch = Instant::now();
                if crate::sys::peer_closed(ctl.as_raw_fd()) {
                    return Some("the sender closed the control stream before its goodbye (it stopped or died)".into());
                }
            }
            if last.elapsed() > idle {
                return Some(format!("no chunk for {:.1}s (stalled or vanished sender)", idle.as_secs_f64()));
            }
            if poll == Poll::Event {
                let _ = cq.wait(Duration::from_millis(50));
            } else {
                std::hint::spin_loop();
            }
            continue;
        }
        last = Instant::now();
        sess.activity.store(millis(epoch), Relaxed);
        for w in wcs.drain(..) {
            if let Err(why) = w.status {
                return Some(format!("{} completion failed: {why}", if w.is_recv { "receive" } else { "credit" }));
            }
            if !w.is_recv {
                continue;
            }
            let Some(&qi) = by_qpn.get(&w.qp_num) else { continue };
            let Some(slot) = w.imm else {
                // A SEND: the sender's goodbye.
                let at = (w.wr_id as usize) * RdmaCredit::LEN;
                return match RdmaCredit::decode(inbox.read(at, RdmaCredit::LEN)) {
                    Ok(c) if c.slot == u32::MAX => None,
                    _ => Some("unexpected message from the sender".into()),
                };
            };
            let placed = place(slot, qi, nqps, region, ss, tag, sess).map(|(offset, len, sum)| {
                let _ = coord.send(ToCoord::Placed { session: sess.id, offset, len, sum });
                offset
            });
            let (credit, end) = match placed {
                Ok(offset) => (RdmaCredit { slot, code: 0, offset }, None),
                Err((code, msg)) => (RdmaCredit { slot, code: code as u16, offset: 0 }, Some(msg)),
            };
            let s = slot as usize % (outbox.len() / RdmaCredit::LEN);
            outbox.write_at(s * RdmaCredit::LEN, &credit.encode());
            let q = &mut qps[qi];
            if let Err(e) = q.send(1 << 40 | slot as u64, outbox.addr() + (s * RdmaCredit::LEN) as u64, RdmaCredit::LEN as u32) {
                return Some(e.to_string());
            }
            if let Some(msg) = end {
                return Some(msg);
            }
            if let Err(e) = q.recv(w.wr_id, inbox.addr() + w.wr_id * RdmaCredit::LEN as u64, RdmaCredit::LEN as u32) {
                return Some(e.to_string());
            }
        }
    }
}

/// Verifies slot `slot`'s frame and writes its payload to the session's output.
fn place(slot: u32, qi: usize, nqps: usize, region: &Mr, ss: usize, tag: &ChunkTag, sess: &SessionRef) -> Result<(u64, u32, u64), (ErrorCode, String)> {
    let slots = region.len() / ss;
    if slot as usize >= slots || slot as usize % nqps != qi {
        return Err((ErrorCode::Protocol, format!("write into slot {slot}, which queue pair {qi} does not own")));
    }
    let base = slot as usize * ss;
    // Header and tag are copied out of the peer-writable region before they are read.
    let hb: [u8; HEADER_LEN] = region.read(base, HEADER_LEN).try_into().expect("header length");
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(region.read(base + HEADER_LEN, TAG_LEN));
    let h = FrameHeader::decode(&hb).map_err(|e| (ErrorCode::Protocol, format!("slot {slot}: {e}")))?;
    if h.kind != FrameType::Chunk || RDMA_SLOT_HEADER + h.len as usize > ss {
        return Err((ErrorCode::Protocol, format!("slot {slot}: a {} frame of {} bytes does not fit a slot", h.kind, h.len)));
    }
    if let Some(size) = sess.size
        && h.offset.checked_add(u64::from(h.len)).is_none_or(|e| e > size)
    {
        return Err((ErrorCode::OutOfRange, format!("chunk at offset {} of {} bytes lies past the declared object size {size}", h.offset, h.len)));
    }
    // The region stays writable by the peer's NIC: the payload is copied out first, then the
    // copy is verified and written, so what is written is what was verified.
    thread_local!(static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) });
    SCRATCH.with_borrow_mut(|payload| {
        payload.clear();
        payload.extend_from_slice(region.read(base + RDMA_SLOT_HEADER, h.len as usize));
        if !tag.verify(&hb, payload, &t) {
            return Err((ErrorCode::Checksum, format!("chunk at offset {} in slot {slot}: its tag does not match (forged or corrupted on the fabric); nothing of it was written", h.offset)));
        }
        h.verify(payload).map_err(|e| (ErrorCode::Checksum, e.to_string()))?;
        match &sess.out {
            Out::File(_) if !sess.gate.enter() => return Err((ErrorCode::Protocol, format!("chunk at offset {} arrived after the session's commit", h.offset))),
            Out::File(f) => {
                let _entered = super::GateGuard(sess.gate.clone());
                f.write_all_at(payload, h.offset).map_err(|e| (ErrorCode::Storage, format!("writing at offset {}: {e}", h.offset)))?
            }
            Out::Discard => {}
            Out::Ordered | Out::Hde(_) => return Err((ErrorCode::Refused, "RDMA is not granted to a stream sink or an HDE session".into())),
        }
        Ok((h.offset, h.len, h.checksum))
    })
}
