//! Guest-RAM corpus validation: `hw-tests/corpus` (cached under target/corpus) produced, for each
//! workload, two 1 GiB captures, a changed-page bitmap and page statistics; the statistics are
//! re-derived here independently, and each image must look like a busy server's memory: not
//! mostly zeros, a real share of incompressible (high-entropy) pages, and pages that changed
//! between the two captures.

use std::io::Read;
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_owned()
}

#[test]
fn corpus_images_are_real_server_memory() {
    let uid = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(String::from_utf8_lossy(&uid.stdout).trim(), "0", "the corpus guest needs root (QEMU exports the host root over 9p)");
    let st = Command::new(root().join("hw-tests/corpus")).status().expect("hw-tests/corpus");
    assert!(st.success(), "hw-tests/corpus failed");
    for w in ["fileserver", "database"] {
        let dir = root().join("target/corpus").join(w);
        let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("stats.json")).expect("stats.json")).expect("json");
        let a = &stats["a"];
        let pages = a["pages"].as_u64().unwrap();
        assert_eq!(pages, 262_144, "{w}: a 1 GiB capture");
        assert_eq!(a["zero"].as_u64().unwrap() + a["duplicate"].as_u64().unwrap() + a["distinct"].as_u64().unwrap(), pages);
        assert!(a["zero_share"].as_f64().unwrap() < 0.85, "{w}: mostly zero pages is not a busy server");
        assert!(a["high_entropy_share"].as_f64().unwrap() > 0.03, "{w}: no incompressible part");
        // Independent recount of zero pages and changed pages straight from the images.
        let (mut fa, mut fb) = (std::fs::File::open(dir.join("a.raw")).unwrap(), std::fs::File::open(dir.join("b.raw")).unwrap());
        let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        let (mut zero, mut changed) = (0u64, 0u64);
        while fa.read_exact(&mut ba).is_ok() && fb.read_exact(&mut bb).is_ok() {
            for (pa, pb) in ba.chunks_exact(4096).zip(bb.chunks_exact(4096)) {
                zero += u64::from(pa.iter().all(|x| *x == 0));
                changed += u64::from(pa != pb);
            }
        }
        assert_eq!(zero, a["zero"].as_u64().unwrap(), "{w}: zero pages recounted");
        assert_eq!(changed, stats["changed_pages"].as_u64().unwrap(), "{w}: changed pages recounted");
        assert!(changed > 0, "{w}: the workload kept writing between the captures");
        let bitmap = std::fs::read(dir.join("changed.bitmap")).unwrap();
        assert_eq!(bitmap.iter().map(|b| u64::from(b.count_ones())).sum::<u64>(), changed, "{w}: bitmap matches");
        eprintln!("corpus {w}: {stats}");
    }
}
