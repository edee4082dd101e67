//! dwcp's RDMA transport inside the soft-RoCE guest (rxe0 over the guest's eth0): a 256 MiB
//! file byte-exact, a wrong rkey and a write past the region named, the receiver still serving,
//! a killed receiver named without a hang, and a resume after it that completes with a matching
//! digest. Both ends run in one guest, as perftest's own loopback runs do.

use std::sync::Mutex;

use serde_json::Value;

static GUEST: Mutex<()> = Mutex::new(());

fn require() {
    let uid = std::process::Command::new("id").arg("-u").output().expect("id");
    assert_eq!(String::from_utf8_lossy(&uid.stdout).trim(), "0", "the soft-RoCE guest needs root");
    let dwcp = hw_tests::root().join("target/release/dwcp");
    assert!(dwcp.exists(), "{} missing: cargo build --release -p dwcp", dwcp.display());
}

fn script(body: &str) -> String {
    let d = hw_tests::root().join("target/release/dwcp");
    format!(
        "D={d}; K=/tmp/k; A=10.0.2.15:7470; $D keygen --force $K 2>/dev/null; mkdir -p /tmp/o; \
         head -c 268435456 /dev/urandom > /tmp/src.img; \
         rx() {{ $D recv --listen $A --out /tmp/o --no-encrypt --key-file $K > /tmp/rx.out 2>&1 & }}; \
         tx() {{ $D send --to $A --key-file $K --transport rdma --json \"$@\"; }}; {body}",
        d = d.display()
    )
}

/// The text after `KEY=` on its own line.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("no {key}= in the guest's output:\n{out}"))
}

fn json_after(out: &str, marker: &str) -> Value {
    let line = out.lines().skip_while(|l| !l.starts_with(marker)).nth(1).unwrap_or_else(|| panic!("nothing after {marker}:\n{out}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}\n{out}"))
}

#[test]
fn rdma_moves_256_mib_exactly_and_names_bad_keys_and_regions() {
    let _g = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    require();
    let body = "rx; sleep 0.5; \
        echo '#S1'; tx /tmp/src.img 2>/tmp/s1.err; echo \"S1RC=$?\"; \
        echo \"SRC=$(sha256sum < /tmp/src.img | cut -c1-64)\"; echo \"DST=$(sha256sum < /tmp/o/src.img | cut -c1-64)\"; \
        tx gen:8M --name bad1.img --fault-rdma wrong-rkey > /dev/null 2>/tmp/s2.err; echo \"S2RC=$?\"; echo \"S2ERR=$(tail -1 /tmp/s2.err)\"; \
        tx gen:8M --name bad2.img --fault-rdma past-region > /dev/null 2>/tmp/s3.err; echo \"S3RC=$?\"; echo \"S3ERR=$(tail -1 /tmp/s3.err)\"; \
        tx gen:8M --name bad3.img --fault-rdma bad-tag > /dev/null 2>/tmp/s5.err; echo \"S5RC=$?\"; echo \"S5ERR=$(tail -1 /tmp/s5.err)\"; \
        echo '#S4'; tx gen:8M --name good.img --rdma-poll event 2>/dev/null; echo \"S4RC=$?\"; \
        ls /tmp/o; echo '#RX'; cat /tmp/rx.out";
    let (rc, out) = hw_tests::in_guest(&script(body), 2048, 400);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(field(&out, "S1RC"), "0", "{out}");
    let s1 = json_after(&out, "#S1");
    assert_eq!(s1["transport"], "rdma", "{s1}");
    assert_eq!(s1["verified"], true);
    assert_eq!(s1["size"], 268_435_456);
    assert_eq!(field(&out, "SRC"), field(&out, "DST"), "byte-exact over rxe");
    eprintln!("256 MiB over rxe: {:.3} Gbit/s, {} queue pairs", s1["goodput_gbps"].as_f64().unwrap_or(0.0), s1["rdma_qps"]);
    assert_ne!(field(&out, "S2RC"), "0");
    assert!(field(&out, "S2ERR").contains("remote access error (wrong rkey"), "{out}");
    assert_ne!(field(&out, "S3RC"), "0");
    assert!(field(&out, "S3ERR").contains("RDMA WRITE of a chunk failed: remote"), "{out}");
    // A chunk whose tag does not match (a forgery on the fabric) is refused before it is written.
    assert_ne!(field(&out, "S5RC"), "0");
    assert!(field(&out, "S5ERR").contains("refused the chunk") && field(&out, "S5ERR").contains("Checksum"), "{out}");
    assert!(out.contains("its tag does not match"), "the receiver names the forgery: {out}");
    // The receiver served the next session after both (this one waiting on the completion
    // channel instead of spinning).
    assert_eq!(field(&out, "S4RC"), "0", "{out}");
    assert_eq!(json_after(&out, "#S4")["verified"], true);
    let listing: Vec<&str> = out.lines().skip_while(|l| !l.starts_with("S4RC=")).skip(1).take_while(|l| *l != "#RX").collect();
    assert!(listing.contains(&"good.img") && listing.contains(&"src.img"), "{listing:?}");
    assert!(!listing.iter().any(|f| f.starts_with("bad")), "nothing published from a failed session: {listing:?}");
}

#[test]
fn a_killed_receiver_is_named_and_resume_completes() {
    let _g = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    require();
    // The receiver dies once its journal holds placed chunks (its header plus at least one flush
    // of records), not after a fixed time: in the emulated guest the start of a transfer took
    // from under 2.5 s to over it, and a receiver killed before any flush leaves nothing to
    // resume from.
    let body = "rx; RX=$!; sleep 0.5; \
        ( tx /tmp/src.img > /tmp/s1.json 2>/tmp/s1.err; echo $? > /tmp/s1.rc ) & \
        for i in $(seq 300); do [ $(cat /tmp/o/.dwcp-state/*.journal 2>/dev/null | wc -c) -gt 4096 ] && break; sleep 0.1; done; kill -9 $RX; T0=$(date +%s%N); \
        for i in $(seq 300); do [ -f /tmp/s1.rc ] && break; sleep 0.1; done; \
        echo \"S1RC=$(cat /tmp/s1.rc 2>/dev/null || echo hung)\"; echo \"S1MS=$(( ($(date +%s%N) - T0) / 1000000 ))\"; \
        echo \"S1ERR=$(tail -1 /tmp/s1.err)\"; \
        rx; sleep 0.5; echo '#S2'; tx /tmp/src.img --resume 2>/tmp/s2.err; echo \"S2RC=$?\"; \
        echo \"SRC=$(sha256sum < /tmp/src.img | cut -c1-64)\"; echo \"DST=$(sha256sum < /tmp/o/src.img | cut -c1-64)\"; \
        $D send gen:256M --name victim.img --to $A --key-file $K --transport rdma > /dev/null 2>&1 & TX=$!; \
        for i in $(seq 300); do [ $(cat /tmp/o/.dwcp-state/*.journal 2>/dev/null | wc -c) -gt 4096 ] && break; sleep 0.1; done; kill -9 $TX; sleep 2; \
        echo \"RXSAW=$(grep -c 'victim.img FAILED' /tmp/rx.out)\"; echo \"RXWHY=$(grep 'RDMA data path ended' /tmp/rx.out | tail -1 | sed 's/.*ended: //')\"; echo '#RXLOG'; tail -4 /tmp/rx.out; \
        tx gen:8M --name after.img > /dev/null 2>&1; echo \"S3RC=$?\"";
    let (rc, out) = hw_tests::in_guest(&script(body), 2048, 400);
    assert_eq!(rc, 0, "{out}");
    // A killed sender is named by the receiver within 2 s, which serves the next session. It is
    // killed once its data path runs (the receiver's journal holds placed chunks), not after a
    // fixed time: in the emulated guest its probe, connection and queue-pair exchange took over
    // 2 s in one CI run, and killed then it is refused as a connection, not named as a session.
    assert_ne!(field(&out, "RXSAW"), "0", "{out}");
    eprintln!("killed sender, as the receiver names it: {}", field(&out, "RXWHY"));
    assert_eq!(field(&out, "S3RC"), "0", "{out}");
    let s1rc = field(&out, "S1RC");
    assert!(s1rc != "0" && s1rc != "hung", "the sender must fail, not hang: {out}");
    let ms: u64 = field(&out, "S1MS").parse().unwrap_or(u64::MAX);
    assert!(ms < 10_000, "named within {ms} ms of the kill");
    let err = field(&out, "S1ERR");
    assert!(err.contains("RDMA") && (err.contains("closed the control stream") || err.contains("retry count exceeded")), "{err}");
    assert_eq!(field(&out, "S2RC"), "0", "{out}");
    let s2 = json_after(&out, "#S2");
    assert_eq!(s2["transport"], "rdma");
    let skipped = s2["skipped"].as_u64().unwrap_or(0);
    assert!(skipped > 0, "resume sent only the rest: {s2}");
    assert_eq!(field(&out, "SRC"), field(&out, "DST"), "the resumed file matches");
    eprintln!("killed receiver named in {ms} ms ({err}); resume skipped {skipped} bytes");
}
