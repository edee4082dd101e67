//! `rdma-smoke [DEVICE]`: RDMA WRITE and SEND/RECV between two RC queue pairs on one device,
//! checked byte for byte. Prints one JSON line; exits non-zero with the reason on failure.

fn main() {
    let dev = std::env::args().nth(1);
    match hw_tests::sys::rdma::loopback_smoke(dev.as_deref(), 1 << 20) {
        Ok(r) => println!(
            "{}",
            serde_json::json!({
                "device": r.device, "gid_index": r.gid_index, "write_bytes": r.write_bytes,
                "write_us": r.write_time.as_micros() as u64, "send_bytes": r.send_bytes, "ok": true,
            })
        ),
        Err(e) => {
            eprintln!("rdma-smoke: {e}");
            std::process::exit(1);
        }
    }
}
