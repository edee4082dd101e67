//! Safe typed wrappers over libibverbs (through `rdma-sys`); all of the RDMA transport's `unsafe`.
//!
//! Ownership mirrors the verbs object tree: a [`Device`] (context) outlives its [`Pd`]s, a `Pd` its
//! [`Mr`]s and [`Qp`]s, a [`Cq`] the `Qp`s that use it; each holds an `Arc` of its parent, so
//! drops run children first. A queue pair is typed by state: [`Qp<Init>`] can only report its
//! [`Endpoint`] and be connected; only a [`Qp<Rts>`] can post work. Memory a queue pair may
//! DMA into or out of must be an `Mr` attached to it ([`Qp::attach`]), which keeps the memory
//! alive until the queue pair is destroyed: posting checks that every scatter entry lies inside
//! an attached region.

use std::ffi::CStr;
use std::marker::PhantomData;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use rdma_sys::*;
use thiserror::Error;

/// Errors of the verbs layer, each naming the call and the cause.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerbsError {
    /// No RDMA device (or not the one asked for).
    #[error("no RDMA device{0}")]
    NoDevice(String),
    /// A verbs call failed.
    #[error("{call} failed: {cause}")]
    Call {
        /// The call.
        call: &'static str,
        /// errno text.
        cause: String,
    },
    /// A scatter entry outside every region attached to the queue pair.
    #[error("buffer {addr:#x}+{len} is not inside a memory region registered for this queue pair")]
    NotRegistered {
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
    },
}

fn call(rc: i32, call: &'static str) -> Result<(), VerbsError> {
    if rc != 0 {
        return Err(VerbsError::Call { call, cause: std::io::Error::from_raw_os_error(rc.abs()).to_string() });
    }
    Ok(())
}

fn nonnull<T>(p: *mut T, call: &'static str) -> Result<*mut T, VerbsError> {
    if p.is_null() {
        return Err(VerbsError::Call { call, cause: std::io::Error::last_os_error().to_string() });
    }
    Ok(p)
}

/// Names of the RDMA devices present (empty without libibverbs providers or devices).
pub fn device_names() -> Vec<String> {
    let mut n = 0;
    // SAFETY: ibv_get_device_list writes the count and returns an array we free below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Vec::new();
    }
    let names = (0..n.max(0) as usize)
        // SAFETY: i < n; each entry is a device with a NUL-terminated name.
        .map(|i| unsafe { CStr::from_ptr(ibv_get_device_name(*list.add(i))) }.to_string_lossy().into_owned())
        .collect();
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    names
}

/// An open device (verbs context) with the port and RoCE v2 GID used.
#[derive(Debug)]
pub struct Device {
    ctx: *mut ibv_context,
    /// Device name.
    pub name: String,
    /// GID (IPv4-mapped RoCE v2 address).
    pub gid: [u8; 16],
    /// Its index in the port's GID table.
    pub gid_index: u8,
    /// Active MTU of port 1.
    pub mtu: u32,
}

// SAFETY: a verbs context is thread-safe (libibverbs serializes what needs it); we only share
// the pointer for calls documented as thread-safe.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: opened in `open`, closed once; children hold an Arc, so they are gone.
        unsafe { ibv_close_device(self.ctx) };
    }
}

impl Device {
    /// Opens device `want` (or the first one) and finds its IPv4-mapped GID on port 1.
    pub fn open(want: Option<&str>) -> Result<Arc<Self>, VerbsError> {
        let mut n = 0;
        // SAFETY: as in `device_names`.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() || n == 0 {
            if !list.is_null() {
                // SAFETY: freed once.
                unsafe { ibv_free_device_list(list) };
            }
            return Err(VerbsError::NoDevice(" (ibv_get_device_list found none: no RDMA NIC or rxe link)".into()));
        }
        let mut found = None;
        for i in 0..n as usize {
            // SAFETY: i < n.
            let d = unsafe { *list.add(i) };
            // SAFETY: a listed device has a NUL-terminated name.
            let name = unsafe { CStr::from_ptr(ibv_get_device_name(d)) }.to_string_lossy().into_owned();
            if want.is_none_or(|w| w == name) {
                found = Some((d, name));
                break;
            }
        }
        let Some((dev, name)) = found else {
            // SAFETY: freed once.
            unsafe { ibv_free_device_list(list) };
            return Err(VerbsError::NoDevice(format!(" named {}", want.unwrap_or("?"))));
        };
        // SAFETY: `dev` is from the list, which stays allocated until after the open.
        let ctx = unsafe { ibv_open_device(dev) };
        // SAFETY: freed once; the opened context does not depend on the list.
        unsafe { ibv_free_device_list(list) };
        let ctx = nonnull(ctx, "ibv_open_device")?;
        let mut me = Self { ctx, name, gid: [0; 16], gid_index: 0, mtu: 1024 };
        // SAFETY: all-zero is a valid ibv_port_attr to be filled.
        let mut port: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: ctx is open; the out-pointer is valid (the bindings' compat type is the same struct).
        call(unsafe { ibv_query_port(ctx, 1, (&raw mut port).cast()) }, "ibv_query_port")?;
        me.mtu = match port.active_mtu {
            ibv_mtu::IBV_MTU_256 => 256,
            ibv_mtu::IBV_MTU_512 => 512,
            ibv_mtu::IBV_MTU_2048 => 2048,
            ibv_mtu::IBV_MTU_4096 => 4096,
            _ => 1024,
        };
        for i in 0..port.gid_tbl_len.min(32) {
            // SAFETY: all-zero is a valid GID.
            let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
            // SAFETY: i is within the GID table; gid is a valid out-pointer.
            if unsafe { ibv_query_gid(ctx, 1, i, &mut gid) } == 0 {
                // SAFETY: `raw` views the union's 16 bytes, valid for any value.
                let raw = unsafe { gid.raw };
                if raw[..10].iter().all(|b| *b == 0) && raw[10] == 0xff && raw[11] == 0xff {
                    me.gid = raw;
                    me.gid_index = i as u8;
                    return Ok(Arc::new(me));
                }
            }
        }
        Err(VerbsError::NoDevice(format!(" {}: no IPv4-mapped GID on port 1 (is its netdev up with an IPv4 address?)", me.name)))
    }
}

/// A protection domain.
#[derive(Debug)]
pub struct Pd {
    pd: *mut ibv_pd,
    dev: Arc<Device>,
}
// SAFETY: PD handles are usable from any thread.
unsafe impl Send for Pd {}
// SAFETY: as above.
unsafe impl Sync for Pd {}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: allocated in `new`, freed once after its MRs and QPs (they hold Arcs).
        unsafe { ibv_dealloc_pd(self.pd) };
    }
}

impl Pd {
    /// Allocates a protection domain on `dev`.
    pub fn new(dev: &Arc<Device>) -> Result<Arc<Self>, VerbsError> {
        // SAFETY: the context is open.
        let pd = nonnull(unsafe { ibv_alloc_pd(dev.ctx) }, "ibv_alloc_pd")?;
        Ok(Arc::new(Self { pd, dev: dev.clone() }))
    }
    /// Its device.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }
}

enum Backing {
    Owned(memmap2::MmapMut),
    Shared(Arc<memmap2::Mmap>),
}

/// A registered memory region: memory we own (anonymous, page aligned) or a read-only file
/// mapping shared with the caller.
pub struct Mr {
    mr: *mut ibv_mr,
    backing: Backing,
    _pd: Arc<Pd>,
}
// SAFETY: MR handles are usable from any thread; the memory is owned by the Mr.
unsafe impl Send for Mr {}
// SAFETY: as above; mutable access to owned memory needs `&mut self`.
unsafe impl Sync for Mr {}

impl std::fmt::Debug for Mr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mr {{ addr: {:#x}, len: {} }}", self.addr(), self.len())
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered in a constructor, deregistered once, before the memory is unmapped
        // (fields drop after this body).
        unsafe { ibv_dereg_mr(self.mr) };
    }
}

impl Mr {
    /// Allocates `len` bytes of zeroed, page-aligned memory and registers it; `remote_write`
    /// lets peers RDMA-WRITE into it.
    pub fn alloc(pd: &Arc<Pd>, len: usize, remote_write: bool) -> Result<Self, VerbsError> {
        let mut m = memmap2::MmapMut::map_anon(len.max(1)).map_err(|e| VerbsError::Call { call: "mmap", cause: e.to_string() })?;
        let mut access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        if remote_write {
            access |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        }
        // SAFETY: the range is our own mapping, kept alive by `backing` until after deregistration.
        let mr = unsafe { ibv_reg_mr(pd.pd, m.as_mut_ptr().cast(), m.len(), access.0 as i32) };
        let mr = nonnull(mr, "ibv_reg_mr")?;
        Ok(Self { mr, backing: Backing::Owned(m), _pd: pd.clone() })
    }

    /// Registers a read-only file mapping as the source of RDMA WRITEs (zero-copy sends).
    pub fn register_readonly(pd: &Arc<Pd>, map: &Arc<memmap2::Mmap>) -> Result<Self, VerbsError> {
        // SAFETY: the mapping is kept alive by `backing` until after deregistration; access 0
        // (local read only) never writes into it.
        let mr = unsafe { ibv_reg_mr(pd.pd, map.as_ptr() as *mut _, map.len().max(1), 0) };
        let mr = nonnull(mr, "ibv_reg_mr (source mapping)")?;
        Ok(Self { mr, backing: Backing::Shared(map.clone()), _pd: pd.clone() })
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        match &self.backing {
            Backing::Owned(m) => m.as_ptr() as u64,
            Backing::Shared(m) => m.as_ptr() as u64,
        }
    }
    /// Length.
    pub fn len(&self) -> usize {
        match &self.backing {
            Backing::Owned(m) => m.len(),
            Backing::Shared(m) => m.len(),
        }
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Local key.
    pub fn lkey(&self) -> u32 {
        // SAFETY: a registered MR; lkey is a plain field.
        unsafe { (*self.mr).lkey }
    }
    /// Remote key.
    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.mr).rkey }
    }
    /// `len` bytes at `at` (bounds-checked). For memory a peer or the NIC writes, read only a
    /// range a completion reported finished and no work request still targets.
    pub fn read(&self, at: usize, len: usize) -> &[u8] {
        let all: &[u8] = match &self.backing {
            Backing::Owned(m) => m,
            Backing::Shared(m) => m,
        };
        &all[at..at + len]
    }
    /// Lets `f` fill `len` owned bytes at `at` in place (bounds-checked), under the contract of
    /// [`Mr::write_at`].
    pub fn fill_at(&self, at: usize, len: usize, f: impl FnOnce(&mut [u8])) {
        let Backing::Owned(m) = &self.backing else { panic!("fill_at on a read-only source region") };
        assert!(at.checked_add(len).is_some_and(|e| e <= m.len()), "fill_at {at}+{len} outside a region of {}", m.len());
        // SAFETY: in bounds of a mapping this Mr owns; the slice lives only during `f`, and by
        // the contract no other reference to these bytes exists and no work request uses them.
        let area = unsafe { std::slice::from_raw_parts_mut(m.as_ptr().add(at).cast_mut(), len) };
        f(area);
    }

    /// Copies `src` into owned memory at `at` (bounds-checked; a shared read-only mapping
    /// panics). The caller writes only ranges no posted work request uses (a slot whose write
    /// completed, a header no write is sending).
    pub fn write_at(&self, at: usize, src: &[u8]) {
        let Backing::Owned(m) = &self.backing else { panic!("write_at on a read-only source region") };
        assert!(at.checked_add(src.len()).is_some_and(|e| e <= m.len()), "write_at {at}+{} outside a region of {}", src.len(), m.len());
        // SAFETY: in bounds (checked above) of a mapping this Mr owns; no Rust reference to
        // these bytes is live (`read` hands out only ranges the caller no longer writes), and the
        // NIC does not touch them (the caller's contract above). A raw copy, as the NIC itself
        // writes, because the region is shared with the hardware through `&self`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), m.as_ptr().add(at).cast_mut(), src.len()) };
    }
    fn contains(&self, addr: u64, len: u32) -> bool {
        addr >= self.addr() && addr.checked_add(u64::from(len)).is_some_and(|e| e <= self.addr() + self.len() as u64)
    }
}

/// A completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wc {
    /// The work request's id.
    pub wr_id: u64,
    /// Success, or the verbs status text.
    pub status: Result<(), &'static str>,
    /// A receive (as opposed to a send-side completion).
    pub is_recv: bool,
    /// Bytes received.
    pub byte_len: u32,
    /// Immediate data, host order.
    pub imm: Option<u32>,
    /// The local queue pair it belongs to.
    pub qp_num: u32,
}

fn status_text(s: u32) -> &'static str {
    match s {
        ibv_wc_status::IBV_WC_LOC_LEN_ERR => "local length error",
        ibv_wc_status::IBV_WC_LOC_QP_OP_ERR => "local QP operation error",
        ibv_wc_status::IBV_WC_LOC_PROT_ERR => "local protection error",
        ibv_wc_status::IBV_WC_WR_FLUSH_ERR => "flushed (the queue pair went to the error state)",
        ibv_wc_status::IBV_WC_REM_INV_REQ_ERR => "remote invalid request (region too small or out of range)",
        ibv_wc_status::IBV_WC_REM_ACCESS_ERR => "remote access error (wrong rkey, or a write outside the peer's region)",
        ibv_wc_status::IBV_WC_REM_OP_ERR => "remote operation error",
        ibv_wc_status::IBV_WC_RETRY_EXC_ERR => "transport retry count exceeded (the peer is gone or unreachable)",
        ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR => "receiver-not-ready retry count exceeded (the peer posted no receive)",
        _ => "failed",
    }
}

/// A completion queue, with an optional completion channel for event-driven waiting.
#[derive(Debug)]
pub struct Cq {
    cq: *mut ibv_cq,
    channel: *mut ibv_comp_channel,
    _dev: Arc<Device>,
}
// SAFETY: CQs are polled from one thread at a time (the owner holds `&mut` to poll); the handle
// itself may move between threads.
unsafe impl Send for Cq {}
// SAFETY: polling needs `&mut self`; shared references only read plain fields.
unsafe impl Sync for Cq {}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once after its QPs (they hold Arcs); the channel after it.
        unsafe {
            ibv_destroy_cq(self.cq);
            if !self.channel.is_null() {
                ibv_destroy_comp_channel(self.channel);
            }
        }
    }
}

impl Cq {
    /// A CQ of `depth` entries; `events` adds a completion channel for [`Cq::wait`].
    pub fn new(dev: &Arc<Device>, depth: i32, events: bool) -> Result<Arc<Self>, VerbsError> {
        let channel = if events {
            // SAFETY: the context is open.
            nonnull(unsafe { ibv_create_comp_channel(dev.ctx) }, "ibv_create_comp_channel")?
        } else {
            ptr::null_mut()
        };
        // SAFETY: the context is open; channel is null or ours.
        let cq = unsafe { ibv_create_cq(dev.ctx, depth, ptr::null_mut(), channel, 0) };
        let cq = nonnull(cq, "ibv_create_cq").inspect_err(|_| {
            if !channel.is_null() {
                // SAFETY: created above, not used by anything.
                unsafe { ibv_destroy_comp_channel(channel) };
            }
        })?;
        Ok(Arc::new(Self { cq, channel, _dev: dev.clone() }))
    }

    /// Polls up to `out.len()` completions; returns how many.
    pub fn poll(&self, out: &mut Vec<Wc>, max: usize) -> Result<usize, VerbsError> {
        // SAFETY: all-zero is a valid ibv_wc to be filled.
        let mut wcs: [ibv_wc; 16] = unsafe { std::mem::zeroed() };
        let want = max.min(16) as i32;
        // SAFETY: the CQ is valid; wcs has room for `want` entries.
        let k = unsafe { ibv_poll_cq(self.cq, want, wcs.as_mut_ptr()) };
        if k < 0 {
            return Err(VerbsError::Call { call: "ibv_poll_cq", cause: format!("returned {k}") });
        }
        for w in &wcs[..k as usize] {
            let with_imm = w.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
            out.push(Wc {
                wr_id: w.wr_id,
                status: if w.status == ibv_wc_status::IBV_WC_SUCCESS { Ok(()) } else { Err(status_text(w.status)) },
                is_recv: w.opcode & ibv_wc_opcode::IBV_WC_RECV != 0,
                byte_len: w.byte_len,
                // SAFETY: with IBV_WC_WITH_IMM the union holds the immediate (network order).
                imm: with_imm.then(|| u32::from_be(unsafe { w.imm_data_invalidated_rkey_union.imm_data })),
                qp_num: w.qp_num,
            });
        }
        Ok(k as usize)
    }

    /// Event-driven wait: arms the CQ and sleeps on the channel until a completion event or
    /// `timeout`. Returns whether an event arrived. Poll after it either way (a completion can
    /// land between the last poll and the arming).
    pub fn wait(&self, timeout: Duration) -> Result<bool, VerbsError> {
        if self.channel.is_null() {
            std::thread::sleep(timeout.min(Duration::from_micros(50)));
            return Ok(false);
        }
        // SAFETY: the CQ is valid.
        call(unsafe { ibv_req_notify_cq(self.cq, 0) }, "ibv_req_notify_cq")?;
        // SAFETY: the channel is ours; its fd is a plain field.
        let fd = unsafe { (*self.channel).fd };
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            return Ok(false);
        }
        let mut ev_cq = ptr::null_mut();
        let mut ctx = ptr::null_mut();
        // SAFETY: the fd is readable, so this does not block; out-pointers are valid.
        call(unsafe { ibv_get_cq_event(self.channel, &mut ev_cq, &mut ctx) }, "ibv_get_cq_event")?;
        // SAFETY: acknowledges the one event just taken, on the CQ it named (ours).
        unsafe { ibv_ack_cq_events(ev_cq, 1) };
        Ok(true)
    }
}

/// Queue-pair state markers.
#[derive(Debug)]
pub enum Init {}
/// Ready to send.
#[derive(Debug)]
pub enum Rts {}

/// What a peer needs to connect to a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number.
    pub psn: u32,
    /// GID.
    pub gid: [u8; 16],
}

/// A reliable-connected queue pair in state `S`.
pub struct Qp<S> {
    qp: *mut ibv_qp,
    psn: u32,
    mrs: Vec<Arc<Mr>>,
    pd: Arc<Pd>,
    _cq: Arc<Cq>,
    _s: PhantomData<S>,
}
// SAFETY: posting to a QP needs `&mut self`; the handle may move between threads.
unsafe impl<S> Send for Qp<S> {}

impl<S> Drop for Qp<S> {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once, before the MRs it may access (fields drop
        // after this body) and the CQ and PD (Arcs).
        unsafe { ibv_destroy_qp(self.qp) };
    }
}

impl<S> std::fmt::Debug for Qp<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Qp {{ qpn: {} }}", self.qpn())
    }
}

impl<S> Qp<S> {
    /// Queue pair number.
    pub fn qpn(&self) -> u32 {
        // SAFETY: a valid QP; qp_num is a plain field.
        unsafe { (*self.qp).qp_num }
    }
    /// Lets this queue pair use `mr` (kept alive as long as the queue pair).
    pub fn attach(&mut self, mr: &Arc<Mr>) {
        if !self.mrs.iter().any(|m| Arc::ptr_eq(m, mr)) {
            self.mrs.push(mr.clone());
        }
    }
    fn sge(&self, addr: u64, len: u32) -> Result<ibv_sge, VerbsError> {
        let mr = self.mrs.iter().find(|m| m.contains(addr, len)).ok_or(VerbsError::NotRegistered { addr, len })?;
        Ok(ibv_sge { addr, length: len, lkey: mr.lkey() })
    }
}

const ACCESS: u32 = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;

impl Qp<Init> {
    /// Creates an RC queue pair on `cq` and moves it to INIT.
    pub fn new(pd: &Arc<Pd>, cq: &Arc<Cq>, max_send: u32, max_recv: u32) -> Result<Self, VerbsError> {
        // SAFETY: all-zero is a valid ibv_qp_init_attr to fill in.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.cq;
        init.recv_cq = cq.cq;
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.cap.max_send_wr = max_send;
        init.cap.max_recv_wr = max_recv;
        init.cap.max_send_sge = 2;
        init.cap.max_recv_sge = 1;
        // SAFETY: pd and cq are valid; init is fully initialized.
        let qp = nonnull(unsafe { ibv_create_qp(pd.pd, &mut init) }, "ibv_create_qp")?;
        let me = Self { qp, psn: rand_psn(), mrs: Vec::new(), pd: pd.clone(), _cq: cq.clone(), _s: PhantomData };
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut at: ibv_qp_attr = unsafe { std::mem::zeroed() };
        at.qp_state = ibv_qp_state::IBV_QPS_INIT;
        at.port_num = 1;
        at.qp_access_flags = ACCESS;
        let m = ibv_qp_attr_mask::IBV_QP_STATE | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX | ibv_qp_attr_mask::IBV_QP_PORT | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        // SAFETY: a valid QP; the attributes match the mask.
        call(unsafe { ibv_modify_qp(me.qp, &mut at, m.0 as i32) }, "ibv_modify_qp (INIT)")?;
        Ok(me)
    }

    /// What the peer needs to connect to us.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint { qpn: self.qpn(), psn: self.psn, gid: self.pd.dev.gid }
    }

    /// Connects to `remote`: INIT -> RTR -> RTS.
    pub fn connect(self, remote: &Endpoint) -> Result<Qp<Rts>, VerbsError> {
        let dev = &self.pd.dev;
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut at: ibv_qp_attr = unsafe { std::mem::zeroed() };
        at.qp_state = ibv_qp_state::IBV_QPS_RTR;
        at.path_mtu = match dev.mtu {
            256 => ibv_mtu::IBV_MTU_256,
            512 => ibv_mtu::IBV_MTU_512,
            2048 => ibv_mtu::IBV_MTU_2048,
            4096 => ibv_mtu::IBV_MTU_4096,
            _ => ibv_mtu::IBV_MTU_1024,
        };
        at.dest_qp_num = remote.qpn;
        at.rq_psn = remote.psn;
        at.max_dest_rd_atomic = 1;
        at.min_rnr_timer = 12;
        at.ah_attr.is_global = 1;
        at.ah_attr.grh.dgid = ibv_gid { raw: remote.gid };
        at.ah_attr.grh.sgid_index = dev.gid_index;
        at.ah_attr.grh.hop_limit = 64;
        at.ah_attr.port_num = 1;
        let m = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        // SAFETY: a valid QP; the attributes match the mask.
        call(unsafe { ibv_modify_qp(self.qp, &mut at, m.0 as i32) }, "ibv_modify_qp (RTR)")?;
        at.qp_state = ibv_qp_state::IBV_QPS_RTS;
        at.sq_psn = self.psn;
        // 4.096 us * 2^14 = 67 ms per try, 7 tries: a vanished peer is named within ~0.5 s.
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
        call(unsafe { ibv_modify_qp(self.qp, &mut at, m.0 as i32) }, "ibv_modify_qp (RTS)")?;
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: each field is read exactly once out of a value that is never dropped, so the
        // QP is not destroyed and every Arc/Vec moves into the new value.
        unsafe { Ok(Qp { qp: me.qp, psn: me.psn, mrs: ptr::read(&me.mrs), pd: ptr::read(&me.pd), _cq: ptr::read(&me._cq), _s: PhantomData }) }
    }
}

fn rand_psn() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b) & 0x00ff_ffff
}

impl Qp<Rts> {
    /// RDMA WRITE WITH IMMEDIATE of the local pieces `(addr, len)` (at most two, each inside an
    /// attached region) to `remote_addr` under `rkey`; the peer sees `imm` in a receive completion.
    pub fn write_imm(&mut self, wr_id: u64, pieces: &[(u64, u32)], remote_addr: u64, rkey: u32, imm: u32) -> Result<(), VerbsError> {
        let mut sges: Vec<ibv_sge> = pieces.iter().map(|&(a, l)| self.sge(a, l)).collect::<Result<_, _>>()?;
        // SAFETY: all-zero is a valid send WR to fill in.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = sges.as_mut_ptr();
        wr.num_sge = sges.len() as i32;
        wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        wr.wr.rdma = rdma_t { remote_addr, rkey };
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is in RTS; the scatter list (copied by the provider during the call)
        // points into regions attached to this QP, which outlive it.
        call(unsafe { ibv_post_send(self.qp, &mut wr, &mut bad) }, "ibv_post_send (RDMA WRITE WITH IMM)")
    }

    /// SEND of `len` bytes at `addr` (inside an attached region).
    pub fn send(&mut self, wr_id: u64, addr: u64, len: u32) -> Result<(), VerbsError> {
        let mut sge = self.sge(addr, len)?;
        // SAFETY: all-zero is a valid send WR.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        let mut bad = ptr::null_mut();
        // SAFETY: as for `write_imm`.
        call(unsafe { ibv_post_send(self.qp, &mut wr, &mut bad) }, "ibv_post_send (SEND)")
    }

    /// Posts a receive into `len` bytes at `addr` (inside an attached region; `len` 0 for
    /// WRITE WITH IMMEDIATE, which consumes a receive but places no bytes through it).
    pub fn recv(&mut self, wr_id: u64, addr: u64, len: u32) -> Result<(), VerbsError> {
        let mut sge = if len == 0 { ibv_sge { addr: 0, length: 0, lkey: 0 } } else { self.sge(addr, len)? };
        // SAFETY: all-zero is a valid recv WR.
        let mut wr: ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = i32::from(len != 0);
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is in RTS; the buffer is in an attached region that outlives the QP.
        call(unsafe { ibv_post_recv(self.qp, &mut wr, &mut bad) }, "ibv_post_recv")
    }
}
