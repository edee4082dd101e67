//! `rdma-smoke [DEVICE]`: RDMA WRITE WITH IMMEDIATE and SEND/RECV between two RC queue pairs on
//! one device, through dwcp's own verbs layer (`dataplane::transport::rdma::sys`), each checked
//! byte for byte. Prints one JSON line; exits non-zero with the reason on failure. It answers
//! "does the soft-RoCE guest do real verbs?" before the transport's own tests run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::transport::rdma::sys::{Cq, Device, Mr, Pd, Qp, VerbsError, Wc};

fn smoke(want: Option<&str>, len: usize) -> Result<serde_json::Value, String> {
    let e = |e: VerbsError| e.to_string();
    let dev = Device::open(want).map_err(e)?;
    let pd = Pd::new(&dev).map_err(e)?;
    let cq = Cq::new(&dev, 64, false).map_err(e)?;
    let a = Arc::new(Mr::alloc(&pd, 2 * len, false).map_err(e)?);
    let b = Arc::new(Mr::alloc(&pd, 2 * len, true).map_err(e)?);
    let pattern: Vec<u8> = (0..2 * len).map(|i| (i * 7 + 3) as u8).collect();
    a.write_at(0, &pattern);
    let (qa, qb) = (Qp::new(&pd, &cq, 16, 16).map_err(e)?, Qp::new(&pd, &cq, 16, 16).map_err(e)?);
    let (ea, eb) = (qa.endpoint(), qb.endpoint());
    let mut qa = qa.connect(&eb).map_err(e)?;
    let mut qb = qb.connect(&ea).map_err(e)?;
    qa.attach(&a);
    qb.attach(&b);
    // One receive for the WRITE's immediate, one for the SEND's bytes.
    qb.recv(10, b.addr() + len as u64, 16).map_err(e)?;
    let wait = |want: usize| -> Result<Vec<Wc>, String> {
        let (t, mut got) = (Instant::now(), Vec::new());
        while got.len() < want {
            cq.poll(&mut got, 16).map_err(e)?;
            if let Some(w) = got.iter().find(|w| w.status.is_err()) {
                return Err(format!("work request {} completed: {}", w.wr_id, w.status.unwrap_err()));
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err("no completion within 30 s".into());
            }
        }
        Ok(got)
    };
    let t0 = Instant::now();
    qa.write_imm(1, &[(a.addr(), len as u32)], b.addr(), b.rkey(), 7).map_err(e)?;
    let wcs = wait(2)?;
    let write_time = t0.elapsed();
    if !wcs.iter().any(|w| w.is_recv && w.imm == Some(7)) {
        return Err(format!("no receive completion with immediate 7: {wcs:?}"));
    }
    if b.read(0, len) != a.read(0, len) {
        return Err("RDMA WRITE completed but the target bytes differ".into());
    }
    qb.recv(11, b.addr() + len as u64, len as u32).map_err(e)?;
    qa.send(2, a.addr() + len as u64, len as u32).map_err(e)?;
    let wcs = wait(2)?;
    let recv = wcs.iter().find(|w| w.wr_id == 11).ok_or("no receive completion for the SEND")?;
    if recv.byte_len as usize != len || b.read(len, len) != a.read(len, len) {
        return Err(format!("SEND/RECV: {} bytes arrived, contents differ or short", recv.byte_len));
    }
    Ok(serde_json::json!({
        "device": dev.name, "gid_index": dev.gid_index, "write_bytes": len,
        "write_us": write_time.as_micros() as u64, "send_bytes": len, "ok": true,
    }))
}

fn main() {
    let dev = std::env::args().nth(1);
    match smoke(dev.as_deref(), 1 << 20) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("rdma-smoke: {e}");
            std::process::exit(1);
        }
    }
}
