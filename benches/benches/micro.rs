//! Microbenchmarks of the hot paths (criterion): frame header encode/decode, XXH3-64 and BLAKE3
//! over a chunk, AES-GCM seal and open in place, HDE encode and decode per page kind, the
//! reorder buffer. `make bench-micro`; `make report` puts their estimates in the report.

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dataplane::crypto::{FrameCodec, Initiator, Psk, Responder};
use dataplane::hde::{Decoder, EncodeStats, Encoder, MemStore, PAGE};
use dataplane::recv::reorder::Reorder;
use dataplane::wire::{FrameHeader, FrameType};

const CHUNK: usize = 1 << 20;

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn frames(c: &mut Criterion) {
    let payload = bytes(CHUNK, 1);
    let h = FrameHeader::for_payload(FrameType::Chunk, 3, 7 << 20, &payload);
    let enc = h.encode();
    let mut g = c.benchmark_group("frame_header");
    g.bench_function("encode", |b| b.iter(|| black_box(black_box(&h).encode())));
    g.bench_function("decode", |b| b.iter(|| FrameHeader::decode(black_box(&enc)).unwrap()));
    g.finish();
}

fn hashes(c: &mut Criterion) {
    let data = bytes(CHUNK, 2);
    let mut g = c.benchmark_group("hash_1MiB");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("xxh3_64", |b| b.iter(|| xxhash_rust::xxh3::xxh3_64(black_box(&data))));
    g.bench_function("blake3", |b| b.iter(|| blake3::hash(black_box(&data))));
    g.finish();
}

fn aead(c: &mut Criterion) {
    let psk = Psk::generate();
    let (init, m1) = Initiator::start(&psk).unwrap();
    let (m2, rk) = Responder::accept(&psk, &m1).unwrap();
    let ik = init.finish(&m2).unwrap();
    let tag = 16;
    let mut g = c.benchmark_group("aes_gcm_1MiB");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let mut tx = FrameCodec::new(0, Some(&ik));
    let mut buf = bytes(CHUNK + tag, 3);
    g.bench_function("seal_in_place", |b| b.iter(|| tx.seal_payload(black_box(&mut buf), CHUNK)));
    // Open needs each frame sealed by the peer in order: seal and open as a pair, the pair's
    // time less the seal's above is the open's.
    let (mut tx, mut rx) = (FrameCodec::new(0, Some(&ik)), FrameCodec::new(0, Some(&rk)));
    let plain = bytes(CHUNK + tag, 4);
    g.bench_function("seal_then_open", |b| {
        b.iter(|| {
            let mut w = plain.clone();
            tx.seal_payload(&mut w, CHUNK);
            black_box(rx.open_payload(&mut w, CHUNK as u32).unwrap().len());
        })
    });
    g.finish();
}

/// 256 pages of one kind (1 MiB), and the old copies a delta is against.
fn pages(kind: &str) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let text: Vec<u8> = b"INSERT INTO t VALUES (42, 'the quick brown fox jumps over the lazy dog');\n".iter().copied().cycle().take(PAGE).collect();
    (0..256u64)
        .map(|i| {
            let old = match kind {
                "zero" => vec![0u8; PAGE],
                "duplicate" => text.clone(),
                "random" => bytes(PAGE, 100 + i),
                _ => {
                    let mut t = text.clone();
                    t[..8].copy_from_slice(&i.to_le_bytes());
                    t
                }
            };
            let new = match kind {
                // A record updated in place: a few bytes differ from the old copy.
                "delta" => {
                    let mut p = old.clone();
                    p[100..108].copy_from_slice(&(i * 7919).to_le_bytes());
                    p
                }
                _ => old.clone(),
            };
            (new, old)
        })
        .unzip()
}

fn hde(c: &mut Criterion) {
    let mut g = c.benchmark_group("hde_1MiB");
    g.throughput(Throughput::Bytes((256 * PAGE) as u64));
    for kind in ["zero", "duplicate", "text", "random", "delta"] {
        let (new, old) = pages(kind);
        let input: Vec<(u64, &[u8])> = new.iter().enumerate().map(|(i, p)| (i as u64, p.as_slice())).collect();
        let old_of = |no: u64| (kind == "delta").then(|| old.get(no as usize).map(Vec::as_slice)).flatten();
        let mut e = Encoder::new(3, None).unwrap();
        g.bench_with_input(BenchmarkId::new("encode", kind), &input, |b, input| {
            b.iter(|| {
                e.reset();
                black_box(e.encode(input, &old_of, &mut EncodeStats::default()).len())
            })
        });
        let mut e = Encoder::new(3, None).unwrap();
        let frame = e.encode(&input, &old_of, &mut EncodeStats::default());
        let start: HashMap<u64, Vec<u8>> = if kind == "delta" { old.iter().cloned().enumerate().map(|(i, p)| (i as u64, p)).collect() } else { HashMap::new() };
        let mut d = Decoder::new(None).unwrap();
        g.bench_with_input(BenchmarkId::new("decode", kind), &frame, |b, frame| {
            b.iter(|| {
                let mut store = MemStore(start.clone());
                black_box(d.decode(frame, &mut store).unwrap());
            })
        });
    }
    g.finish();
}

fn reorder(c: &mut Criterion) {
    // 64 chunks of 64 KiB arriving two streams interleaved, out of order by one: each arrives,
    // then whatever is in order is taken.
    let chunk = 64 << 10;
    let data = bytes(chunk, 5);
    let order: Vec<u64> = (0..64u64).map(|i| if i % 2 == 0 { i + 1 } else { i - 1 }).collect();
    c.bench_function("reorder_64_chunks", |b| {
        b.iter(|| {
            let mut r: Reorder<u16> = Reorder::new(64 * chunk);
            let mut taken = 0;
            for &i in &order {
                black_box(r.arrive(i * chunk as u64, data.clone(), 0, 0));
                while let Some((_, h)) = r.pop() {
                    taken += h.data.len();
                }
            }
            assert_eq!(taken, 64 * chunk);
        })
    });
}

criterion_group!(benches, frames, hashes, aead, hde, reorder);
criterion_main!(benches);
