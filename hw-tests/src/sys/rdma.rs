//! The rig's verbs smoke test: two RC queue pairs on one RDMA device, connected to each other,
//! one RDMA WRITE and one SEND/RECV, each checked byte for byte. All `unsafe` of this crate is here.
//!
//! This is a rig check (does the soft-RoCE guest do real verbs?), not the data plane's RDMA
//! transport, which gets its own typed wrapper in `dataplane` (RDMA issue).

use std::ffi::CStr;
use std::ptr;
use std::time::{Duration, Instant};

use rdma_sys::*;

/// What the smoke test saw.
#[derive(Debug)]
pub struct SmokeReport {
    /// Device used.
    pub device: String,
    /// GID index used (an IPv4-mapped RoCE v2 GID).
    pub gid_index: u8,
    /// Bytes moved by the RDMA WRITE.
    pub write_bytes: usize,
    /// Time the WRITE took to complete.
    pub write_time: Duration,
    /// Bytes moved by the SEND.
    pub send_bytes: usize,
}

struct Guard<T, F: FnMut(*mut T)>(*mut T, F);
impl<T, F: FnMut(*mut T)> Drop for Guard<T, F> {
    fn drop(&mut self) {
        if !self.0.is_null() {
            (self.1)(self.0);
        }
    }
}

fn check(rc: i32, what: &str) -> Result<(), String> {
    if rc != 0 {
        return Err(format!("{what} failed: {}", std::io::Error::from_raw_os_error(rc.abs())));
    }
    Ok(())
}

fn nonnull<T>(p: *mut T, what: &str) -> Result<*mut T, String> {
    if p.is_null() {
        return Err(format!("{what} failed: {}", std::io::Error::last_os_error()));
    }
    Ok(p)
}

/// Runs the smoke test on device `want` (or the first device).
pub fn loopback_smoke(want: Option<&str>, len: usize) -> Result<SmokeReport, String> {
    let mut n = 0;
    // SAFETY: ibv_get_device_list writes the count and returns an array freed below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    let list = nonnull(list, "ibv_get_device_list")?;
    // SAFETY: `list` came from ibv_get_device_list and is freed exactly once.
    let _list_guard = Guard(list, |l| unsafe { ibv_free_device_list(l) });
    let mut dev = ptr::null_mut();
    let mut name = String::new();
    for i in 0..n as usize {
        // SAFETY: i < n, the array holds n device pointers.
        let d = unsafe { *list.add(i) };
        // SAFETY: a device from the list has a NUL-terminated name.
        let nm = unsafe { CStr::from_ptr(ibv_get_device_name(d)) }.to_string_lossy().into_owned();
        if want.is_none_or(|w| w == nm) {
            dev = d;
            name = nm;
            break;
        }
    }
    if dev.is_null() {
        return Err(format!("no RDMA device {} (found {n})", want.unwrap_or("at all")));
    }
    // SAFETY: `dev` is a valid device from the list, which outlives the context's opening.
    let ctx = nonnull(unsafe { ibv_open_device(dev) }, "ibv_open_device")?;
    // SAFETY: closed once, after everything made from it (guards drop in reverse order).
    let _ctx_guard = Guard(ctx, |c| unsafe {
        ibv_close_device(c);
    });
    // Find an IPv4-mapped GID (::ffff:a.b.c.d), the RoCE v2 one on an IPv4 netdev.
    // SAFETY: all-zero is a valid ibv_port_attr; ibv_query_port fills it.
    let mut port: ibv_port_attr = unsafe { std::mem::zeroed() };
    // SAFETY: ctx is open; port 1 exists on rxe devices.
    check(unsafe { ibv_query_port(ctx, 1, &mut port as *mut _ as *mut _) }, "ibv_query_port")?;
    let mut gid_index = None;
    // SAFETY: all-zero is a valid GID value.
    let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
    for i in 0..port.gid_tbl_len.min(16) {
        // SAFETY: i is below the port's GID table length; gid is a valid out-pointer.
        if unsafe { ibv_query_gid(ctx, 1, i, &mut gid) } == 0 {
            // SAFETY: raw is the union's byte view, valid for any value.
            let raw = unsafe { gid.raw };
            if raw[..10].iter().all(|b| *b == 0) && raw[10] == 0xff && raw[11] == 0xff {
                gid_index = Some(i as u8);
                break;
            }
        }
    }
    let gid_index = gid_index.ok_or("no IPv4-mapped GID on port 1 (is the netdev up with an address?)")?;

    // SAFETY: ctx is open.
    let pd = nonnull(unsafe { ibv_alloc_pd(ctx) }, "ibv_alloc_pd")?;
    // SAFETY: deallocated once, after its MRs and QPs (declared later, dropped earlier).
    let _pd_guard = Guard(pd, |p| unsafe {
        ibv_dealloc_pd(p);
    });
    // SAFETY: ctx is open; no completion channel, vector 0.
    let cq = nonnull(unsafe { ibv_create_cq(ctx, 64, ptr::null_mut(), ptr::null_mut(), 0) }, "ibv_create_cq")?;
    // SAFETY: destroyed once, after the QPs using it.
    let _cq_guard = Guard(cq, |c| unsafe {
        ibv_destroy_cq(c);
    });

    // Two buffers: A (source of the write, sender of the SEND), B (target of the write, receiver).
    let mut a = vec![0u8; 2 * len];
    let mut b = vec![0u8; 2 * len];
    for (i, x) in a.iter_mut().enumerate() {
        *x = (i * 7 + 3) as u8;
    }
    let access = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_READ).0 as i32;
    // SAFETY: `a` is declared before its registration's guard, so it is dropped after the
    // deregistration; the pointer and length describe `a` exactly.
    let mra = nonnull(unsafe { ibv_reg_mr(pd, a.as_mut_ptr().cast(), a.len(), access) }, "ibv_reg_mr")?;
    // SAFETY: deregistered once.
    let _mra_guard = Guard(mra, |m| unsafe {
        ibv_dereg_mr(m);
    });
    // SAFETY: as above for `b`.
    let mrb = nonnull(unsafe { ibv_reg_mr(pd, b.as_mut_ptr().cast(), b.len(), access) }, "ibv_reg_mr")?;
    // SAFETY: deregistered once.
    let _mrb_guard = Guard(mrb, |m| unsafe {
        ibv_dereg_mr(m);
    });

    let make_qp = || -> Result<*mut ibv_qp, String> {
        // SAFETY: all-zero is a valid ibv_qp_init_attr to fill in.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq;
        init.recv_cq = cq;
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.cap.max_send_wr = 16;
        init.cap.max_recv_wr = 16;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: pd and the CQ are valid; init is fully initialized.
        nonnull(unsafe { ibv_create_qp(pd, &mut init) }, "ibv_create_qp")
    };
    let qa = make_qp()?;
    // SAFETY: destroyed once, before the CQ and PD.
    let _qa_guard = Guard(qa, |q| unsafe {
        ibv_destroy_qp(q);
    });
    let qb = make_qp()?;
    // SAFETY: destroyed once, before the CQ and PD.
    let _qb_guard = Guard(qb, |q| unsafe {
        ibv_destroy_qp(q);
    });

    // INIT -> RTR -> RTS, each pointing at the other.
    let connect = |q: *mut ibv_qp, remote_qpn: u32| -> Result<(), String> {
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut at: ibv_qp_attr = unsafe { std::mem::zeroed() };
        at.qp_state = ibv_qp_state::IBV_QPS_INIT;
        at.pkey_index = 0;
        at.port_num = 1;
        at.qp_access_flags = access as u32;
        let m = ibv_qp_attr_mask::IBV_QP_STATE | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX | ibv_qp_attr_mask::IBV_QP_PORT | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        // SAFETY: q is a valid QP; at and the mask agree.
        check(unsafe { ibv_modify_qp(q, &mut at, m.0 as i32) }, "modify QP to INIT")?;
        at.qp_state = ibv_qp_state::IBV_QPS_RTR;
        at.path_mtu = ibv_mtu::IBV_MTU_1024;
        at.dest_qp_num = remote_qpn;
        at.rq_psn = 0;
        at.max_dest_rd_atomic = 1;
        at.min_rnr_timer = 12;
        at.ah_attr.is_global = 1;
        at.ah_attr.grh.dgid = gid;
        at.ah_attr.grh.sgid_index = gid_index;
        at.ah_attr.grh.hop_limit = 1;
        at.ah_attr.port_num = 1;
        let m = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        // SAFETY: as above.
        check(unsafe { ibv_modify_qp(q, &mut at, m.0 as i32) }, "modify QP to RTR")?;
        at.qp_state = ibv_qp_state::IBV_QPS_RTS;
        at.sq_psn = 0;
        at.timeout = 14;
        at.retry_cnt = 7;
        at.rnr_retry = 7;
        at.max_rd_atomic = 1;
        let m = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        // SAFETY: as above.
        check(unsafe { ibv_modify_qp(q, &mut at, m.0 as i32) }, "modify QP to RTS")
    };
    // SAFETY: qa and qb are valid QPs; qp_num is a plain field.
    let (qpn_a, qpn_b) = unsafe { ((*qa).qp_num, (*qb).qp_num) };
    connect(qa, qpn_b)?;
    connect(qb, qpn_a)?;

    let poll = |want: usize| -> Result<Vec<ibv_wc>, String> {
        let t0 = Instant::now();
        let mut out = Vec::new();
        while out.len() < want {
            // SAFETY: all-zero is a valid ibv_wc to be filled.
            let mut wc: ibv_wc = unsafe { std::mem::zeroed() };
            // SAFETY: cq is valid; wc has room for one entry.
            let k = unsafe { ibv_poll_cq(cq, 1, &mut wc) };
            if k < 0 {
                return Err("ibv_poll_cq failed".into());
            }
            if k == 1 {
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    return Err(format!("work request {} completed with status {}", wc.wr_id, wc.status));
                }
                out.push(wc);
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err("no completion within 30 s".into());
            }
        }
        Ok(out)
    };

    // 1. RDMA WRITE: a[..len] -> b[..len].
    // SAFETY: mrb is a valid MR; rkey and addr are plain fields.
    let (rkey_b, addr_b) = unsafe { ((*mrb).rkey, b.as_ptr() as u64) };
    // SAFETY: mra is a valid MR.
    let lkey_a = unsafe { (*mra).lkey };
    let mut sge = ibv_sge { addr: a.as_ptr() as u64, length: len as u32, lkey: lkey_a };
    // SAFETY: all-zero is a valid send WR to fill in.
    let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
    wr.wr_id = 1;
    wr.sg_list = &mut sge;
    wr.num_sge = 1;
    wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
    wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
    wr.wr.rdma = rdma_t { remote_addr: addr_b, rkey: rkey_b };
    let mut bad = ptr::null_mut();
    let t0 = Instant::now();
    // SAFETY: qa is in RTS; sge points into registered memory that lives until the completion.
    check(unsafe { ibv_post_send(qa, &mut wr, &mut bad) }, "ibv_post_send (RDMA WRITE)")?;
    poll(1)?;
    let write_time = t0.elapsed();
    if a[..len] != b[..len] {
        return Err("RDMA WRITE completed but the target bytes differ".into());
    }

    // 2. SEND/RECV: a[len..2len] -> b[len..2len].
    // SAFETY: mrb is a valid MR.
    let lkey_b = unsafe { (*mrb).lkey };
    let mut rsge = ibv_sge { addr: b[len..].as_ptr() as u64, length: len as u32, lkey: lkey_b };
    // SAFETY: all-zero is a valid recv WR to fill in.
    let mut rwr: ibv_recv_wr = unsafe { std::mem::zeroed() };
    rwr.wr_id = 2;
    rwr.sg_list = &mut rsge;
    rwr.num_sge = 1;
    let mut rbad = ptr::null_mut();
    // SAFETY: qb is in RTS; the buffer is registered and outlives the completion.
    check(unsafe { ibv_post_recv(qb, &mut rwr, &mut rbad) }, "ibv_post_recv")?;
    let mut ssge = ibv_sge { addr: a[len..].as_ptr() as u64, length: len as u32, lkey: lkey_a };
    // SAFETY: all-zero is a valid send WR.
    let mut swr: ibv_send_wr = unsafe { std::mem::zeroed() };
    swr.wr_id = 3;
    swr.sg_list = &mut ssge;
    swr.num_sge = 1;
    swr.opcode = ibv_wr_opcode::IBV_WR_SEND;
    swr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
    // SAFETY: as for the write.
    check(unsafe { ibv_post_send(qa, &mut swr, &mut bad) }, "ibv_post_send (SEND)")?;
    let wcs = poll(2)?;
    let recv = wcs.iter().find(|w| w.wr_id == 2).ok_or("no receive completion")?;
    if recv.byte_len as usize != len || a[len..] != b[len..] {
        return Err(format!("SEND/RECV: {} bytes arrived, contents {}", recv.byte_len, if a[len..] == b[len..] { "equal" } else { "differ" }));
    }
    Ok(SmokeReport { device: name, gid_index, write_bytes: len, write_time, send_bytes: len })
}
