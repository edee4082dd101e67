fn main() {
    let mut buf = vec![0u8; 1 << 20];
    let t = std::time::Instant::now();
    let n = 1024u64;
    for i in 0..n {
        dataplane::source::generate(1, i << 20, &mut buf);
    }
    let dt = t.elapsed().as_secs_f64();
    println!("generate: {:.2} GB/s", (n << 20) as f64 / dt / 1e9);
    let t = std::time::Instant::now();
    let mut x = 0u64;
    for _ in 0..n {
        x ^= dataplane::wire::checksum(&buf);
    }
    println!("xxh3: {:.2} GB/s {x}", (n << 20) as f64 / t.elapsed().as_secs_f64() / 1e9);
}
