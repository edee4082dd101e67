//! `rdma-lat [DEVICE] [ITERS] [BYTES]`: small-message latency through dwcp's verbs layer
//! (`dataplane::transport::rdma::sys`), measured as `ib_send_lat` does: two RC queue pairs on one
//! device, each side busy-polling its own completion queue on its own thread, SEND/RECV
//! ping-pong; one-way latency = round trip / 2. Prints one JSON line (run in the soft-RoCE guest
//! by `bench-rdma`).

use std::sync::Arc;
use std::time::Instant;

use dataplane::transport::rdma::sys::{Cq, Device, Mr, Pd, Qp, Rts, Wc};

fn side(qp: &mut Qp<Rts>, cq: &Cq, buf: &Mr, len: u32, iters: usize, first: bool, times: &mut Vec<f64>) {
    let mut wcs: Vec<Wc> = Vec::new();
    // Waits for the next receive and posts its replacement at once, before anything is sent,
    // so the peer never meets an empty receive queue.
    let mut next_recv = |qp: &mut Qp<Rts>| loop {
        wcs.clear();
        cq.poll(&mut wcs, 16).expect("poll");
        let mut got = false;
        for w in &wcs {
            assert!(w.status.is_ok(), "{:?}", w.status);
            got |= w.is_recv;
        }
        if got {
            qp.recv(2, buf.addr() + 4096, len).expect("recv");
            return;
        }
    };
    for _ in 0..iters {
        let t = Instant::now();
        if first {
            qp.send(1, buf.addr(), len).expect("send");
            next_recv(qp);
            times.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
        } else {
            next_recv(qp);
            qp.send(1, buf.addr(), len).expect("send");
        }
    }
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let dev = Device::open(a.first().map(String::as_str)).unwrap_or_else(|e| {
        eprintln!("rdma-lat: {e}");
        std::process::exit(1)
    });
    let iters: usize = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let len: u32 = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let pd = Pd::new(&dev).expect("pd");
    let mk = || -> (Arc<Cq>, Qp<dataplane::transport::rdma::sys::Init>, Arc<Mr>) {
        let cq = Cq::new(&dev, 64, false).expect("cq");
        let qp = Qp::new(&pd, &cq, 16, 16).expect("qp");
        (cq, qp, Arc::new(Mr::alloc(&pd, 8192, false).expect("mr")))
    };
    let (cqa, qa, ma) = mk();
    let (cqb, qb, mb) = mk();
    let (ea, eb) = (qa.endpoint(), qb.endpoint());
    let mut qa = qa.connect(&eb).expect("connect a");
    let mut qb = qb.connect(&ea).expect("connect b");
    qa.attach(&ma);
    qb.attach(&mb);
    // Receives posted before either side sends (a send with no receive waits for RNR retries).
    for (q, m) in [(&mut qa, &ma), (&mut qb, &mb)] {
        for _ in 0..4 {
            q.recv(2, m.addr() + 4096, len).expect("recv");
        }
    }
    let warm = 100;
    let mut times = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| side(&mut qb, &cqb, &mb, len, iters + warm, false, &mut Vec::new()));
        side(&mut qa, &cqa, &ma, len, iters + warm, true, &mut times);
    });
    let mut t: Vec<f64> = times.split_off(warm);
    t.sort_by(f64::total_cmp);
    let q = |p: f64| t[((t.len() as f64 * p) as usize).min(t.len() - 1)];
    println!("{}", serde_json::json!({"device": dev.name, "bytes": len, "iters": t.len(), "min_us": t[0], "p50_us": q(0.5), "p99_us": q(0.99), "p999_us": q(0.999)}));
}
