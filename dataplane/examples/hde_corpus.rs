//! A first look at HDE on the guest-RAM corpus (not `make bench-hde`, which the HDE issue owns):
//! round 1 = every page of `a.raw`, round 2 = the pages that changed in `b.raw`, HDE at zstd level 3
//! on one core, against zstd -3 of the whole image (round 1) and of the changed pages (round 2).
//!   cargo run --release -p dataplane --example hde_corpus -- target/corpus/fileserver

use std::collections::HashMap;
use std::time::Instant;

use dataplane::hde::{Decoder, EncodeStats, Encoder, PAGE, PageStore};

struct Mem(Vec<u8>, Vec<bool>);
impl PageStore for Mem {
    fn get(&self, no: u64) -> Option<&[u8]> {
        let i = no as usize;
        self.1.get(i).copied().unwrap_or(false).then(|| &self.0[i * PAGE..(i + 1) * PAGE])
    }
    fn put(&mut self, no: u64, page: &[u8]) {
        let i = no as usize;
        self.0[i * PAGE..(i + 1) * PAGE].copy_from_slice(page);
        self.1[i] = true;
    }
}

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("corpus dir"));
    let a = std::fs::read(dir.join("a.raw")).expect("a.raw");
    let b = std::fs::read(dir.join("b.raw")).expect("b.raw");
    let n = a.len() / PAGE;
    let mut enc = Encoder::new(3, None).expect("encoder");
    let mut dec = Decoder::new(None).expect("decoder");
    let mut rx = Mem(vec![0u8; a.len()], vec![false; n]);
    let mut st1 = EncodeStats::default();
    let t = Instant::now();
    let mut frames1 = Vec::new();
    for c in (0..n).collect::<Vec<_>>().chunks(256) {
        let pages: Vec<(u64, &[u8])> = c.iter().map(|&i| (i as u64, &a[i * PAGE..(i + 1) * PAGE])).collect();
        frames1.push(enc.encode(&pages, &|_| None, &mut st1));
    }
    let enc1 = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for f in &frames1 {
        assert!(dec.decode(f, &mut rx).expect("decode").rejected.is_empty());
    }
    let dec1 = t.elapsed().as_secs_f64();
    assert!(rx.0 == a, "round 1 byte-exact");
    let t = Instant::now();
    let z1 = zstd::bulk::compress(&a, 3).expect("zstd").len();
    let zt1 = t.elapsed().as_secs_f64();

    let dirty: Vec<usize> = (0..n).filter(|&i| a[i * PAGE..(i + 1) * PAGE] != b[i * PAGE..(i + 1) * PAGE]).collect();
    let mut st2 = EncodeStats::default();
    let snapshot = rx.0.clone();
    let t = Instant::now();
    let mut frames2 = Vec::new();
    for c in dirty.chunks(256) {
        let pages: Vec<(u64, &[u8])> = c.iter().map(|&i| (i as u64, &b[i * PAGE..(i + 1) * PAGE])).collect();
        frames2.push(enc.encode(&pages, &|no| Some(&snapshot[no as usize * PAGE..(no as usize + 1) * PAGE]), &mut st2));
    }
    let enc2 = t.elapsed().as_secs_f64();
    for f in &frames2 {
        assert!(dec.decode(f, &mut rx).expect("decode").rejected.is_empty());
    }
    assert!(rx.0 == b, "round 2 byte-exact");
    let plain: Vec<u8> = dirty.iter().flat_map(|&i| b[i * PAGE..(i + 1) * PAGE].to_vec()).collect();
    let t = Instant::now();
    let z2 = zstd::bulk::compress(&plain, 3).expect("zstd").len();
    let zt2 = t.elapsed().as_secs_f64();
    let mb = |bytes: usize, s: f64| bytes as f64 / s / 1e6;
    let kinds = |s: &EncodeStats| s.pages.iter().map(|(k, v)| (format!("{k:?}"), *v)).collect::<HashMap<_, _>>();
    println!("{}", serde_like(&[
        ("image", dir.display().to_string()),
        ("r1_hde_ratio", format!("{:.2}", a.len() as f64 / st1.output as f64)),
        ("r1_zstd3_ratio", format!("{:.2}", a.len() as f64 / z1 as f64)),
        ("r1_hde_encode_mbps", format!("{:.0}", mb(a.len(), enc1))),
        ("r1_hde_decode_mbps", format!("{:.0}", mb(a.len(), dec1))),
        ("r1_zstd3_mbps", format!("{:.0}", mb(a.len(), zt1))),
        ("r1_kinds", format!("{:?}", kinds(&st1))),
        ("r2_dirty_pages", dirty.len().to_string()),
        ("r2_hde_ratio", format!("{:.2}", plain.len() as f64 / st2.output as f64)),
        ("r2_zstd3_ratio", format!("{:.2}", plain.len() as f64 / z2 as f64)),
        ("r2_hde_encode_mbps", format!("{:.0}", mb(plain.len(), enc2))),
        ("r2_zstd3_mbps", format!("{:.0}", mb(plain.len(), zt2))),
        ("r2_kinds", format!("{:?}", kinds(&st2))),
    ]));
}

fn serde_like(kv: &[(&str, String)]) -> String {
    kv.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("\n")
}
