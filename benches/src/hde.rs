//! `make bench-hde`: HDE against zstd and xdelta3 on the real guest-RAM corpus (`make corpus`),
//! rounds 1 and 2, side by side in one run, one core each.
//!
//! Round 1 is the whole image `a.raw`; round 2 the pages the corpus bitmap marks changed in
//! `b.raw`. HDE runs in a child process pinned to one core (so its peak RSS is its own): it reads
//! the image in 1 MiB frames (256 pages, the transfer chunk), encodes, keeps a bounded cache of
//! the pages it sent (round 2 delta-encodes only cache hits, as QEMU's XBZRLE cache does) and
//! writes its frames to `target/bench/hde/`; this process then decodes them and checks both
//! rounds byte for byte. Peers, single-threaded (`-T1`, `taskset` to the same core): `zstd -1`,
//! `-3`, `-19 --long=27` of the whole image (round 1), `zstd -3` of the dirty pages and
//! `xdelta3 -B 1GiB` of image b against image a (round 2). Speeds are per core: round 1 in MB of
//! image per second, round 2 in MB of dirty pages per second (for xdelta3 too, which reads both
//! whole images to find them). Ratios: input bytes / output bytes.
//!
//! A fifth HDE run sends round 2 as a dirty log kept by 2 MiB huge page gives it: every 4 KiB page
//! of a huge page with any change is sent again. Its figure is its bytes over hde-3's for
//! the same round logged by 4 KiB page (`r2_hugepage_bytes_vs_4k`; 1.0 means the pages sent again
//! unchanged cost nothing).
//!
//! Then end to end (as root; the "HDE on and off"): one image through `dwcp send` to a
//! `dwcp recv --out DIR` over the WAN rig (`hw-tests/wan`, 1 Gbit/s, 50 ms, 0.1% loss), wall
//! time and bytes on the wire with `--hde off` and `--hde on` (round 1, image a), and round 2
//! (image b) sent whole with `--hde off` against `--round-of a` and against `--dirty` with the
//! corpus bitmap from a sender that does not have image a. Every run ends with the
//! receiver's digest check. The seed's figure is printed too: bytes of rounds 1 + 2 against raw.
//!
//!   bench-hde [--corpus DIR] [--images fileserver,database|none] [--e2e IMAGE|none]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use dataplane::hde::{Decoder, EncodeStats, Encoder, PAGE, PageCache, PageStore};
use serde_json::{Value, json};

use benches::{Proc, die, in_ns};

const FRAME_PAGES: usize = 256;
/// The variant whose round 2 is dirty-logged by 2 MiB huge page ([`huge_dirty`]).
const HUGE: &str = "hde-3 2MiB dirty log";
const CORE: &str = "0";

fn dirty_pages(dir: &Path, n: usize) -> Vec<u64> {
    let bm = std::fs::read(dir.join("changed.bitmap")).unwrap_or_else(|e| die(&format!("{}/changed.bitmap: {e} (run `make corpus`)", dir.display())));
    (0..n).filter(|&i| bm.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1)).map(|i| i as u64).collect()
}

fn kinds(s: &EncodeStats) -> Value {
    let m: BTreeMap<String, u64> = s.pages.iter().map(|(k, v)| (format!("{k:?}").to_lowercase(), *v)).collect();
    json!(m)
}

fn write_frame(out: &mut impl Write, f: &[u8]) {
    out.write_all(&(f.len() as u32).to_le_bytes()).and_then(|()| out.write_all(f)).unwrap_or_else(|e| die(&format!("writing frames: {e}")));
}

fn hwm_kb(pid: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

fn vm_hwm_kb() -> u64 {
    hwm_kb("self")
}

/// Waits for `child`, sampling its peak RSS (VmHWM, which exec resets, unlike the rusage a
/// fork inherits from this large process) every 20 ms; returns (success, peak KiB).
fn wait_hwm(mut child: std::process::Child) -> (bool, u64) {
    let pid = child.id().to_string();
    let mut peak = 0;
    loop {
        peak = peak.max(hwm_kb(&pid));
        match child.try_wait() {
            Ok(Some(st)) => return (st.success(), peak),
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(_) => return (false, peak),
        }
    }
}

/// The dirty set of a round logged by 2 MiB huge page (soft-dirty or userfaultfd write
/// protection on a hugetlb mapping, QEMU's postcopy): every 4 KiB page of a huge page with any
/// change is sent again.
fn huge_dirty(dirty: &[u64], n: usize) -> Vec<u64> {
    const PER_HUGE: u64 = (2 << 20) / PAGE as u64;
    let mut huge: Vec<u64> = dirty.iter().map(|no| no / PER_HUGE).collect();
    huge.dedup();
    huge.iter().flat_map(|h| h * PER_HUGE..((h + 1) * PER_HUGE).min(n as u64)).collect()
}

/// The HDE sender, alone in its process:
/// `--worker DIR LEVEL CACHE_BYTES DICT(0|1) OUT_PREFIX [huge]` (`huge`: round 2's dirty set is
/// tracked by 2 MiB huge page, [`huge_dirty`]).
fn worker(args: &[String]) {
    let dir = PathBuf::from(&args[0]);
    let level: i32 = args[1].parse().expect("level");
    let cache_bytes: u64 = args[2].parse().expect("cache");
    let use_dict = args[3] == "1";
    let prefix = PathBuf::from(&args[4]);
    let a = std::fs::File::open(dir.join("a.raw")).expect("a.raw");
    let b = std::fs::File::open(dir.join("b.raw")).expect("b.raw");
    let size = a.metadata().expect("size").len() as usize;
    let n = size / PAGE;
    let mut cache = PageCache::new(cache_bytes);
    let mut buf = vec![0u8; FRAME_PAGES * PAGE];
    let t = Instant::now();
    let dict = use_dict.then(|| {
        // zstd's trainer on a sample of round-1 pages: every 64th non-zero page, up to 4 MiB.
        let mut samples = Vec::new();
        let mut p = vec![0u8; PAGE];
        for i in (0..n).step_by(64) {
            a.read_exact_at(&mut p, (i * PAGE) as u64).expect("read");
            if !dataplane::hde::is_zero(&p) {
                samples.push(p.clone());
            }
            if samples.len() * PAGE >= 4 << 20 {
                break;
            }
        }
        let refs: Vec<&[u8]> = samples.iter().map(Vec::as_slice).collect();
        Encoder::train(&refs, 112 << 10).expect("train")
    });
    let mut enc = Encoder::new(level, dict.clone()).expect("encoder");
    let mut out1 = std::io::BufWriter::new(std::fs::File::create(prefix.with_extension("r1")).expect("r1"));
    if let Some(d) = &dict {
        std::fs::write(prefix.with_extension("dict"), d).expect("dict");
    }
    let mut st1 = EncodeStats::default();
    let mut enc_s = 0.0;
    for f in 0..n.div_ceil(FRAME_PAGES) {
        let first = f * FRAME_PAGES;
        let count = FRAME_PAGES.min(n - first);
        let bytes = &mut buf[..count * PAGE];
        a.read_exact_at(bytes, (first * PAGE) as u64).expect("read a");
        let te = Instant::now();
        let pages: Vec<(u64, &[u8])> = bytes.chunks_exact(PAGE).enumerate().map(|(i, p)| ((first + i) as u64, p)).collect();
        // Frames decode in order here, so every page sent before (and still cached) is where
        // moved data may be found.
        let frame = enc.encode_with_refs(&pages, &|_| None, &|no| cache.peek(no), &mut st1);
        for &(no, p) in &pages {
            if !dataplane::hde::is_zero(p) {
                cache.put(no, p);
            }
        }
        enc_s += te.elapsed().as_secs_f64();
        write_frame(&mut out1, &frame);
    }
    let r1_wall = t.elapsed().as_secs_f64();
    drop(out1);

    let dirty = dirty_pages(&dir, n);
    let dirty = if args.get(5).is_some_and(|a| a == "huge") { huge_dirty(&dirty, n) } else { dirty };
    let mut out2 = std::io::BufWriter::new(std::fs::File::create(prefix.with_extension("r2")).expect("r2"));
    let mut st2 = EncodeStats::default();
    let t = Instant::now();
    let mut enc2_s = 0.0;
    let te = Instant::now();
    enc.begin_round(dirty.iter().copied());
    enc.freeze_index();
    enc2_s += te.elapsed().as_secs_f64();
    // The cache holds the receiver's image as round 2 began until the round is through (each
    // page is sent once in a round): `dwcp recv` keeps that image (the previous round's file)
    // beside the one it writes, so any page the cache holds is a reference, changed or not.
    let mut sent: Vec<u64> = Vec::with_capacity(dirty.len());
    for group in dirty.chunks(FRAME_PAGES) {
        let bytes = &mut buf[..group.len() * PAGE];
        for (i, &no) in group.iter().enumerate() {
            b.read_exact_at(&mut bytes[i * PAGE..(i + 1) * PAGE], no * PAGE as u64).expect("read b");
        }
        let te = Instant::now();
        let pages: Vec<(u64, &[u8])> = group.iter().zip(bytes.chunks_exact(PAGE)).map(|(&no, p)| (no, p)).collect();
        // A dirty page is delta-encoded against its cached copy; a miss (evicted, or zero in
        // round 1, which the cache does not copy) goes literal.
        let frame = enc.encode_with_refs(&pages, &|no| cache.lookup(no), &|no| cache.peek(no), &mut st2);
        sent.extend(group);
        enc2_s += te.elapsed().as_secs_f64();
        write_frame(&mut out2, &frame);
    }
    for no in sent {
        // Reading image b is the bench's, not the encoder's (as for the frames above).
        b.read_exact_at(&mut buf[..PAGE], no * PAGE as u64).expect("read b");
        let te = Instant::now();
        cache.put(no, &buf[..PAGE]);
        enc2_s += te.elapsed().as_secs_f64();
    }
    let r2_wall = t.elapsed().as_secs_f64();
    drop(out2);
    let (hits, misses) = cache.counts();
    println!(
        "{}",
        json!({
            "r1": {"input": st1.input, "output": st1.output, "encode_s": enc_s, "wall_s": r1_wall, "kinds": kinds(&st1), "refs": st1.refs},
            "r2": {"input": st2.input, "output": st2.output, "encode_s": enc2_s, "wall_s": r2_wall, "kinds": kinds(&st2), "refs": st2.refs,
                   "cache_hits": hits, "cache_misses": misses},
            "dict_bytes": dict.map_or(0, |d| d.len()),
            "vm_hwm_kb": vm_hwm_kb(),
        })
    );
}

/// The receiver's image, in memory for the bench, and in round 2 the image as the round began
/// (`dwcp recv` reads the previous round's file for it).
struct Image(Vec<u8>, Vec<bool>, Option<Vec<u8>>);
impl PageStore for Image {
    fn get(&self, no: u64) -> Option<&[u8]> {
        let i = no as usize;
        self.1.get(i).copied().unwrap_or(false).then(|| &self.0[i * PAGE..(i + 1) * PAGE])
    }
    fn base(&self, no: u64) -> Option<&[u8]> {
        let i = no as usize;
        match &self.2 {
            Some(start) => start.get(i * PAGE..(i + 1) * PAGE),
            None => self.get(no),
        }
    }
    fn put(&mut self, no: u64, page: &[u8]) {
        let i = no as usize;
        self.0[i * PAGE..(i + 1) * PAGE].copy_from_slice(page);
        self.1[i] = true;
    }
}

fn read_frames(path: &Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).unwrap_or_else(|e| die(&format!("{}: {e}", path.display())));
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= data.len() {
        let n = u32::from_le_bytes(data[at..at + 4].try_into().expect("4")) as usize;
        out.push(data[at + 4..at + 4 + n].to_vec());
        at += 4 + n;
    }
    out
}

/// Decodes both rounds, checks them against the images; returns (r1 decode s, r2 decode s).
fn decode_and_check(dir: &Path, prefix: &Path) -> (f64, f64) {
    let a = std::fs::read(dir.join("a.raw")).expect("a.raw");
    let dict = std::fs::read(prefix.with_extension("dict")).ok();
    let mut dec = Decoder::new(dict.as_deref()).expect("decoder");
    let n = a.len() / PAGE;
    let mut img = Image(vec![0u8; a.len()], vec![false; n], None);
    let mut timed = |frames: Vec<Vec<u8>>, img: &mut Image| {
        let t = Instant::now();
        let mut deferred = Vec::new();
        for f in &frames {
            let r = dec.decode(f, img).unwrap_or_else(|e| die(&format!("decode: {e}")));
            if let Some((no, why)) = r.rejected.first() {
                die(&format!("page {no} refused: {why}"));
            }
            deferred.extend(r.deferred);
        }
        let r = Decoder::retry(&deferred, img);
        if let Some((no, why)) = r.rejected.first() {
            die(&format!("page {no} refused: {why}"));
        }
        t.elapsed().as_secs_f64()
    };
    let d1 = timed(read_frames(&prefix.with_extension("r1")), &mut img);
    if img.0 != a {
        die(&format!("{}: round 1 does not decode to a.raw", dir.display()));
    }
    img.2 = Some(a);
    let d2 = timed(read_frames(&prefix.with_extension("r2")), &mut img);
    let b = std::fs::read(dir.join("b.raw")).expect("b.raw");
    if img.0 != b {
        die(&format!("{}: round 2 does not decode to b.raw", dir.display()));
    }
    (d1, d2)
}

/// Runs a peer tool on one core; returns (stdout bytes, wall seconds, peak RSS KiB).
fn tool(args: &[&str], stdin: Option<&Path>) -> (u64, f64, u64) {
    let mut c = Command::new("taskset");
    c.args(["-c", CORE]).args(args).stdout(Stdio::piped()).stderr(Stdio::null());
    if let Some(p) = stdin {
        c.stdin(std::fs::File::open(p).expect("stdin file"));
    }
    let t = Instant::now();
    let mut child = c.spawn().unwrap_or_else(|e| die(&format!("{}: {e} (run `make bench-deps`)", args[0])));
    let out = child.stdout.take().expect("stdout");
    // Count stdout on a thread while this one samples the peak RSS.
    let counter = std::thread::spawn(move || {
        let (mut out, mut n, mut buf) = (out, 0u64, vec![0u8; 1 << 20]);
        while let Ok(k) = out.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    });
    let (ok, rss) = wait_hwm(child);
    let n = counter.join().expect("counter");
    let secs = t.elapsed().as_secs_f64();
    if !ok {
        die(&format!("{} failed", args.join(" ")));
    }
    (n, secs, rss)
}

/// Like `tool`, writing stdout to `out`.
fn tool_to(args: &[&str], out: &Path) -> (f64, u64) {
    let t = Instant::now();
    let child = Command::new("taskset")
        .args(["-c", CORE])
        .args(args)
        .stdout(std::fs::File::create(out).expect("out"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| die(&format!("{}: {e} (run `make bench-deps`)", args[0])));
    let (ok, rss) = wait_hwm(child);
    if !ok {
        die(&format!("{} failed", args.join(" ")));
    }
    (t.elapsed().as_secs_f64(), rss)
}

struct Row {
    image: String,
    round: u8,
    codec: String,
    ratio: f64,
    enc_mbps: f64,
    dec_mbps: f64,
    rss_mb: f64,
    note: String,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worker") {
        return worker(&args[1..]);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_owned();
    let mut corpus = root.join("target/corpus");
    let mut images = vec!["fileserver".to_string(), "database".to_string()];
    let mut e2e_image = Some("fileserver".to_string());
    let full = (images.clone(), e2e_image.clone());
    let mut it = args.iter();
    while let Some(k) = it.next() {
        match (k.as_str(), it.next()) {
            ("--corpus", Some(v)) => corpus = PathBuf::from(v),
            ("--images", Some(v)) => images = v.split(',').filter(|i| *i != "none").map(str::to_owned).collect(),
            ("--e2e", Some(v)) => e2e_image = (v != "none").then(|| v.clone()),
            _ => die("usage: bench-hde [--corpus DIR] [--images fileserver,database|none] [--e2e IMAGE|none]"),
        }
    }
    if e2e_image.is_some() && !ebpf::sys::is_root() {
        die("the end-to-end runs need root (the WAN rig's network namespaces); or pass --e2e none");
    }
    let work = root.join("target/bench/hde");
    std::fs::create_dir_all(&work).expect("target/bench/hde");
    let me = std::env::current_exe().expect("exe");
    let mut rows: Vec<Row> = Vec::new();
    let mut per_image = serde_json::Map::new();
    for name in &images {
        let dir = corpus.join(name);
        let a_path = dir.join("a.raw");
        let b_path = dir.join("b.raw");
        let size = std::fs::metadata(&a_path).unwrap_or_else(|e| die(&format!("{}: {e} (run `make corpus`)", a_path.display()))).len();
        let dirty = dirty_pages(&dir, size as usize / PAGE);
        let dirty_bytes = (dirty.len() * PAGE) as f64;
        let mb = |bytes: f64, s: f64| bytes / s / 1e6;
        let mut fig = serde_json::Map::new();
        // HDE variants: (label, level, cache bytes, dictionary, round 2's dirty log by huge page).
        for (label, level, cache, dict, huge) in [
            ("hde-3", 3, size, false, false),
            ("hde-1", 1, size, false, false),
            ("hde-3 dict", 3, size, true, false),
            ("hde-3 cache 256MiB", 3, 256 << 20, false, false),
            (HUGE, 3, size, false, true),
        ] {
            let prefix = work.join(format!("{name}-{}", label.replace([' ', '-'], "_")));
            let child = Command::new("taskset")
                .args(["-c", CORE])
                .arg(&me)
                .args(["--worker", dir.to_str().expect("utf8"), &level.to_string(), &cache.to_string(), if dict { "1" } else { "0" }])
                .arg(&prefix)
                .args(huge.then_some("huge"))
                .stdout(Stdio::piped())
                .spawn()
                .expect("worker");
            let mut out = String::new();
            let mut child = child;
            child.stdout.take().expect("stdout").read_to_string(&mut out).expect("worker output");
            if !child.wait().is_ok_and(|s| s.success()) {
                die(&format!("HDE worker for {name} failed"));
            }
            let w: Value = serde_json::from_str(out.trim()).expect("worker json");
            // The worker reports its own VmHWM at the end.
            let max_rss_kb = w["vm_hwm_kb"].as_u64().unwrap_or(0);
            let (d1, d2) = decode_and_check(&dir, &prefix);
            let f = |r: &str, k: &str| w[r][k].as_f64().unwrap_or(f64::NAN);
            let rss_mb = max_rss_kb as f64 / 1024.0;
            let hits = f("r2", "cache_hits");
            let hit_rate = hits / (hits + f("r2", "cache_misses"));
            // Its round 1 is hde-3's.
            if !huge {
                rows.push(Row {
                    image: name.clone(),
                    round: 1,
                    codec: label.into(),
                    ratio: f("r1", "input") / f("r1", "output"),
                    enc_mbps: mb(f("r1", "input"), f("r1", "encode_s")),
                    dec_mbps: mb(f("r1", "input"), d1),
                    rss_mb,
                    note: w["r1"]["kinds"].to_string(),
                });
            }
            let note = if huge {
                let r2_4k = fig["hde-3"]["worker"]["r2"]["output"].as_f64().unwrap_or(f64::NAN);
                format!("{:.0} MB of pages sent again, {:.3}x hde-3's bytes {}", f("r2", "input") / 1e6, f("r2", "output") / r2_4k, w["r2"]["kinds"])
            } else {
                format!("cache hit {:.0}% {}", hit_rate * 100.0, w["r2"]["kinds"])
            };
            rows.push(Row {
                image: name.clone(),
                round: 2,
                codec: label.into(),
                ratio: f("r2", "input") / f("r2", "output"),
                enc_mbps: mb(f("r2", "input"), f("r2", "encode_s")),
                dec_mbps: mb(f("r2", "input"), d2),
                rss_mb,
                note,
            });
            fig.insert(label.to_string(), json!({"worker": w, "decode_r1_s": d1, "decode_r2_s": d2, "max_rss_kb": max_rss_kb, "cache_hit_rate_r2": hit_rate}));
        }
        // zstd on the whole image.
        let zfile = work.join(format!("{name}.zst"));
        for (label, zargs) in [("zstd -1", vec!["-1"]), ("zstd -3", vec!["-3"]), ("zstd -19 --long=27", vec!["-19", "--long=27"])] {
            let mut a: Vec<&str> = vec!["zstd", "-T1", "-q", "-c"];
            a.extend(zargs.iter());
            a.push(a_path.to_str().expect("utf8"));
            let (secs, rss) = tool_to(&a, &zfile);
            let out = std::fs::metadata(&zfile).expect("zst").len() as f64;
            let (_, dsecs, _) = tool(&["zstd", "-d", "-q", "-c", "--long=27", zfile.to_str().expect("utf8")], None);
            rows.push(Row {
                image: name.clone(),
                round: 1,
                codec: label.into(),
                ratio: size as f64 / out,
                enc_mbps: mb(size as f64, secs),
                dec_mbps: mb(size as f64, dsecs),
                rss_mb: rss as f64 / 1024.0,
                note: String::new(),
            });
            fig.insert(label.to_string(), json!({"ratio": size as f64 / out, "encode_s": secs, "decode_s": dsecs, "max_rss_kb": rss}));
        }
        // Round 2 peers: zstd -3 of the dirty pages, xdelta3 of image b against image a.
        let plain = work.join(format!("{name}.dirty"));
        {
            let a = std::fs::File::open(&b_path).expect("b.raw");
            let mut w = std::io::BufWriter::new(std::fs::File::create(&plain).expect("dirty"));
            let mut p = vec![0u8; PAGE];
            for &no in &dirty {
                a.read_exact_at(&mut p, no * PAGE as u64).expect("read");
                w.write_all(&p).expect("write");
            }
        }
        let (zn, zs, zrss) = tool(&["zstd", "-T1", "-3", "-q", "-c", plain.to_str().expect("utf8")], None);
        rows.push(Row {
            image: name.clone(),
            round: 2,
            codec: "zstd -3 (dirty pages)".into(),
            ratio: dirty_bytes / zn as f64,
            enc_mbps: mb(dirty_bytes, zs),
            dec_mbps: f64::NAN,
            rss_mb: zrss as f64 / 1024.0,
            note: String::new(),
        });
        fig.insert("zstd -3 dirty".into(), json!({"ratio": dirty_bytes / zn as f64, "encode_s": zs, "max_rss_kb": zrss}));
        let vc = work.join(format!("{name}.vcdiff"));
        let (xs, xrss) = tool_to(&["xdelta3", "-e", "-c", "-B", "1073741824", "-s", a_path.to_str().expect("utf8"), b_path.to_str().expect("utf8")], &vc);
        let xout = std::fs::metadata(&vc).expect("vcdiff").len() as f64;
        let (_, xds, _) = tool(&["xdelta3", "-d", "-c", "-B", "1073741824", "-s", a_path.to_str().expect("utf8"), vc.to_str().expect("utf8")], None);
        rows.push(Row {
            image: name.clone(),
            round: 2,
            codec: "xdelta3 -B 1GiB".into(),
            ratio: dirty_bytes / xout,
            enc_mbps: mb(dirty_bytes, xs),
            dec_mbps: mb(dirty_bytes, xds),
            rss_mb: xrss as f64 / 1024.0,
            note: "reads both whole images".into(),
        });
        fig.insert("xdelta3".into(), json!({"ratio": dirty_bytes / xout, "encode_s": xs, "decode_s": xds, "max_rss_kb": xrss}));
        let _ = std::fs::remove_file(&plain);
        fig.insert("image_bytes".into(), json!(size));
        fig.insert("dirty_bytes".into(), json!(dirty_bytes));
        per_image.insert(name.clone(), Value::Object(fig));
    }

    // End to end last: its receiver leaves gigabytes for the kernel to write back, which would
    // slow whatever ran next on this two-core host.
    let partial = (&images, &e2e_image) != (&full.0, &full.1);
    let e2e_fig = e2e_image.map(|im| e2e(&root, &corpus.join(&im), &im));

    println!("{:<11} {:>2} {:<22} {:>7} {:>10} {:>10} {:>8}  notes", "image", "rd", "codec", "ratio", "enc MB/s", "dec MB/s", "RSS MB");
    for r in &rows {
        println!("{:<11} {:>2} {:<22} {:>7.2} {:>10.0} {:>10.0} {:>8.0}  {}", r.image, r.round, r.codec, r.ratio, r.enc_mbps, r.dec_mbps, r.rss_mb, r.note);
    }
    // Headline figures over all images (total input / total output; total bytes / total time).
    // Input bytes, output bytes and encode seconds of one codec's round over every image.
    let totals = |round: u8, codec: &str| {
        let (mut inp, mut out, mut secs) = (0.0, 0.0, 0.0);
        for r in rows.iter().filter(|r| r.round == round && r.codec == codec) {
            let bytes = if round == 1 { per_image[&r.image]["image_bytes"].as_f64().unwrap_or(0.0) } else { per_image[&r.image]["dirty_bytes"].as_f64().unwrap_or(0.0) };
            inp += bytes;
            out += bytes / r.ratio;
            secs += bytes / (r.enc_mbps * 1e6);
        }
        (inp, out, secs)
    };
    let agg = |round: u8, codec: &str| {
        let (inp, out, secs) = totals(round, codec);
        (inp / out, inp / secs / 1e6)
    };
    let (ratio_r1, speed_r1) = agg(1, "hde-3");
    let (z3, z3s) = agg(1, "zstd -3");
    let (z19, _) = agg(1, "zstd -19 --long=27");
    let (ratio_r2, speed_r2) = agg(2, "hde-3");
    let (x3, x3s) = agg(2, "xdelta3 -B 1GiB");
    let (zd, _) = agg(2, "zstd -3 (dirty pages)");
    let (h1r, h1s) = agg(1, "hde-1");
    // Round 2 of a guest on huge pages: HDE's bytes against the same round dirty-logged by 4 KiB
    // page (1.0: the pages sent again unchanged cost nothing).
    let r2_out = |codec: &str| per_image.values().map(|f| f[codec]["worker"]["r2"]["output"].as_f64().unwrap_or(f64::NAN)).sum::<f64>();
    let huge_vs_4k = r2_out(HUGE) / r2_out("hde-3");
    println!();
    println!(
        "round 1: HDE-3 ratio {ratio_r1:.2} = {:.2}x zstd -3 (target 1.1x) at {:.2}x its speed (target 2x); HDE-1 {:.2}x at {:.2}x",
        ratio_r1 / z3,
        speed_r1 / z3s,
        h1r / z3,
        h1s / z3s
    );
    println!("round 2: HDE-3 ratio {ratio_r2:.2} vs xdelta3 {x3:.2} (target >= 1x) at {:.1}x its speed (target 10x); zstd -3 of the dirty pages {zd:.2}", speed_r2 / x3s);
    println!("round 2 dirty-logged by 2 MiB huge page: {huge_vs_4k:.3}x the bytes of the same round logged by 4 KiB page");
    // The seed's figure: everything rounds 1 and 2 move, raw against HDE-3, every image.
    let ((in1, out1, _), (in2, out2, _)) = (totals(1, "hde-3"), totals(2, "hde-3"));
    let (raw12, hde12) = (in1 + in2, out1 + out2);
    let seed_ratio = raw12 / hde12;
    println!("rounds 1 + 2 (the seed's figure, claimed > 10x): {:.0} MB raw, {:.0} MB HDE-3: {seed_ratio:.2}x", raw12 / 1e6, hde12 / 1e6);
    if let Some(e) = &e2e_fig {
        println!();
        println!("end to end over the WAN rig ({}, {}): dwcp send -> dwcp recv --out", e["image"].as_str().unwrap_or("?"), e["link"].as_str().unwrap_or("?"));
        println!("{:<34} {:>8} {:>12} {:>10} {:>8}", "run", "wall s", "wire MB", "Gbit/s*", "streams");
        for r in e["runs"].as_array().into_iter().flatten() {
            println!(
                "{:<34} {:>8.2} {:>12.1} {:>10.2} {:>8}",
                r["run"].as_str().unwrap_or(""),
                r["wall_s"].as_f64().unwrap_or(f64::NAN),
                r["wire_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
                r["image_gbps"].as_f64().unwrap_or(f64::NAN),
                r["streams"]
            );
        }
        println!("* image bytes (round 2: the whole image b) over wall time");
        println!(
            "round 1: HDE on {:.2}x faster than off; round 2: --round-of {:.2}x and --dirty without a {:.2}x faster than the whole image",
            e["speedup_r1"].as_f64().unwrap_or(f64::NAN),
            e["speedup_r2"].as_f64().unwrap_or(f64::NAN),
            e["speedup_r2_dirty"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let j = json!({
        "ratio_r1": ratio_r1, "zstd3_ratio_r1": z3, "zstd19long_ratio_r1": z19, "speed_r1_mbps": speed_r1, "zstd3_speed_mbps": z3s,
        "hde1_ratio_r1": h1r, "hde1_speed_r1_mbps": h1s,
        "ratio_r2": ratio_r2, "xdelta3_ratio_r2": x3, "r2_hugepage_bytes_vs_4k": huge_vs_4k, "speed_r2_mbps": speed_r2, "xdelta3_speed_mbps": x3s, "zstd3_dirty_ratio_r2": zd,
        "seed_ratio_r1_r2": seed_ratio,
        "e2e_speedup_r1": e2e_fig.as_ref().map(|e| e["speedup_r1"].clone()), "e2e_speedup_r2": e2e_fig.as_ref().map(|e| e["speedup_r2"].clone()), "e2e_speedup_r2_dirty": e2e_fig.as_ref().map(|e| e["speedup_r2_dirty"].clone()),
        "e2e": e2e_fig,
        "images": per_image,
    });
    // A run narrowed by --images or --e2e leaves the last full run's figures where they are.
    let name = if partial { "hde-partial.json" } else { "hde.json" };
    if name != "hde.json" {
        println!("a partial run: its figures go to target/bench/{name} (hde.json keeps the last full run's)");
    }
    benches::emit(&root.join("target/bench").join(name), j);
}

/// The WAN rig's link for the end-to-end runs.
const E2E_LINK: [&str; 8] = ["--rtt", "50ms", "--rate", "1gbit", "--loss", "0.1%", "--queue", "1bdp"];

/// One image through dwcp over the WAN rig, HDE off and on (see the module doc).
fn e2e(root: &Path, dir: &Path, image: &str) -> Value {
    let dwcp = root.join("target/release/dwcp");
    let work = root.join("target/bench/hde/e2e");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("out")).expect("target/bench/hde/e2e");
    let key = work.join("key");
    let st = Command::new(&dwcp).args(["keygen", "--force"]).arg(&key).stderr(Stdio::null()).status().expect("dwcp keygen");
    assert!(st.success(), "dwcp keygen failed");
    let wan = root.join("hw-tests/wan");
    let up = Command::new(&wan).arg("up").args(E2E_LINK).output().expect("hw-tests/wan up");
    if !up.status.success() {
        die(&format!("hw-tests/wan up: {}", String::from_utf8_lossy(&up.stderr)));
    }
    let addrs = String::from_utf8_lossy(&up.stdout).to_string();
    let rx_addr = format!("{}:7480", addrs.split_whitespace().nth(1).unwrap_or("10.77.0.2"));
    let rx_log = std::fs::File::create(work.join("recv.log")).expect("recv.log");
    let rx = Proc(
        in_ns("dwcp-b", &dwcp)
            .args(["recv", "--listen", &rx_addr, "--out"])
            .arg(work.join("out"))
            .arg("--key-file")
            .arg(&key)
            .stdout(Stdio::null())
            .stderr(rx_log)
            .spawn()
            .expect("dwcp recv"),
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (a, b) = (dir.join("a.raw"), dir.join("b.raw"));
    let size = std::fs::metadata(&a).unwrap_or_else(|e| die(&format!("{}: {e} (run `make corpus`)", a.display()))).len() as f64;
    // (label, file, name at the receiver, options). The last one is round 2 from the corpus's
    // dirty bitmap by a sender that has no previous round; the receiver is given round 1 back
    // first (copied into its output directory).
    let bitmap = dir.join("changed.bitmap").to_string_lossy().into_owned();
    let plan: [(&str, &Path, &str, Vec<String>); 5] = [
        ("round 1 (image a), --hde off", &a, "off.raw", vec!["--hde".into(), "off".into()]),
        ("round 1 (image a), --hde on", &a, "vm.raw", vec!["--hde".into(), "on".into()]),
        ("round 2 (image b), --hde off", &b, "off.raw", vec!["--hde".into(), "off".into()]),
        ("round 2 (image b), --round-of a", &b, "vm.raw", vec!["--round-of".into(), a.to_string_lossy().into_owned()]),
        ("round 2 (image b), --dirty, no a at the sender", &b, "vm.raw", vec!["--dirty".into(), bitmap]),
    ];
    let mut runs = Vec::new();
    let mut walls = Vec::new();
    for (label, file, name, opts) in plan {
        if opts.iter().any(|o| o == "--dirty") {
            std::fs::copy(&a, work.join("out").join(name)).unwrap_or_else(|e| die(&format!("restoring round 1 at the receiver: {e}")));
        }
        // What the last run left for writeback is not this run's cost.
        let _ = Command::new("sync").status();
        let t = Instant::now();
        let out = in_ns("dwcp-a", &dwcp)
            .arg("send")
            .arg(file)
            .args(["--name", name, "--to", &rx_addr, "--key-file"])
            .arg(&key)
            .args(&opts)
            .arg("--json")
            .stderr(Stdio::piped())
            .output()
            .expect("dwcp send");
        let wall = t.elapsed().as_secs_f64();
        if !out.status.success() {
            die(&format!("end to end, {label}: dwcp send failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")));
        }
        let j: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap_or_else(|e| die(&format!("end to end, {label}: dwcp send --json: {e}")));
        // The receiver published the object only after its digest matched; compare it anyway.
        let got = std::fs::read(work.join("out").join(name)).unwrap_or_else(|e| die(&format!("end to end, {label}: the received {name}: {e}")));
        if got != std::fs::read(file).expect("image") {
            die(&format!("end to end, {label}: the received {name} differs from {}", file.display()));
        }
        drop(got);
        eprintln!("  e2e {label}: {wall:.2} s, {:.1} MB on the wire", j["sent_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6);
        walls.push(wall);
        runs.push(json!({"run": label, "wall_s": wall, "wire_bytes": j["sent_bytes"], "image_gbps": size * 8.0 / wall / 1e9, "hde": j["hde"], "streams": j["streams"], "send_wall_s": j["wall_s"]}));
    }
    drop(rx);
    let _ = Command::new(&wan).arg("down").status();
    let _ = std::fs::remove_dir_all(work.join("out"));
    json!({"image": image, "link": E2E_LINK.join(" "), "runs": runs, "speedup_r1": walls[0] / walls[1], "speedup_r2": walls[2] / walls[3], "speedup_r2_dirty": walls[2] / walls[4]})
}
