//! `corpus-stats A.raw B.raw [--changed BITMAP] [--workload NAME]`: page statistics of two RAM
//! captures of the same guest: per image, 4 KiB pages that are zero, duplicates of an earlier
//! page, distinct, and high-entropy (likely incompressible); between them, the pages that changed
//! (written as a bitmap, one bit per page, LSB first). Prints one JSON object.

use std::collections::HashSet;
use std::io::Read;

const PAGE: usize = 4096;

fn die(msg: &str) -> ! {
    eprintln!("corpus-stats: {msg}");
    std::process::exit(2);
}

/// Shannon entropy of a page in bits per byte.
fn entropy(p: &[u8]) -> f64 {
    let mut h = [0u32; 256];
    for &b in p {
        h[b as usize] += 1;
    }
    let n = p.len() as f64;
    h.iter()
        .filter(|c| **c > 0)
        .map(|&c| {
            let q = c as f64 / n;
            -q * q.log2()
        })
        .sum()
}

#[derive(Default)]
struct PageStats {
    pages: u64,
    zero: u64,
    duplicate: u64,
    distinct: u64,
    high_entropy: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        die("usage: corpus-stats A.raw B.raw [--changed BITMAP] [--workload NAME]");
    }
    let (a, b) = (&args[0], &args[1]);
    let mut changed_out = None;
    let mut workload = String::new();
    let mut it = args[2..].iter();
    while let Some(k) = it.next() {
        match k.as_str() {
            "--changed" => changed_out = it.next().cloned(),
            "--workload" => workload = it.next().cloned().unwrap_or_default(),
            o => die(&format!("unknown option {o}")),
        }
    }
    let open = |p: &str| std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(p).unwrap_or_else(|e| die(&format!("{p}: {e}"))));
    let (mut ra, mut rb) = (open(a), open(b));
    let (mut sa, mut sb) = (PageStats::default(), PageStats::default());
    let (mut seen_a, mut seen_b) = (HashSet::new(), HashSet::new());
    let mut bitmap = Vec::new();
    let mut changed = 0u64;
    let (mut pa, mut pb) = (vec![0u8; PAGE], vec![0u8; PAGE]);
    let mut idx = 0u64;
    loop {
        let na = ra.read_exact(&mut pa).is_ok();
        let nb = rb.read_exact(&mut pb).is_ok();
        if !na || !nb {
            if na != nb {
                die("the two images differ in size");
            }
            break;
        }
        for (p, s, seen) in [(&pa, &mut sa, &mut seen_a), (&pb, &mut sb, &mut seen_b)] {
            s.pages += 1;
            if p.iter().all(|x| *x == 0) {
                s.zero += 1;
            } else if !seen.insert(xxhash_rust::xxh3::xxh3_128(p)) {
                s.duplicate += 1;
            } else {
                s.distinct += 1;
                if entropy(p) > 7.5 {
                    s.high_entropy += 1;
                }
            }
        }
        if idx.is_multiple_of(8) {
            bitmap.push(0u8);
        }
        if pa != pb {
            changed += 1;
            *bitmap.last_mut().expect("pushed") |= 1 << (idx % 8);
        }
        idx += 1;
    }
    if let Some(p) = &changed_out {
        std::fs::write(p, &bitmap).unwrap_or_else(|e| die(&format!("{p}: {e}")));
    }
    let j = |s: &PageStats| {
        serde_json::json!({
            "pages": s.pages, "zero": s.zero, "duplicate": s.duplicate, "distinct": s.distinct,
            "high_entropy": s.high_entropy,
            "zero_share": s.zero as f64 / s.pages.max(1) as f64,
            "high_entropy_share": s.high_entropy as f64 / s.pages.max(1) as f64,
        })
    };
    println!(
        "{}",
        serde_json::json!({
            "workload": workload, "page_size": PAGE, "a": j(&sa), "b": j(&sb),
            "changed_pages": changed, "changed_share": changed as f64 / idx.max(1) as f64,
        })
    );
}
