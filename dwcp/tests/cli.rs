//! End-to-end tests of the `dwcp` binary: pipes, a killed receiver and `--resume`, errors a person reads.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The tests that load the machine (many senders or connections at once) or measure this
/// process's memory run alone (`heavy`); every other test holds `light`, so that its timings and
/// mode decisions are not those of a loaded machine. The harness runs tests in parallel.
static LOAD: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn heavy() -> std::sync::RwLockWriteGuard<'static, ()> {
    LOAD.write().unwrap_or_else(|e| e.into_inner())
}

fn light() -> std::sync::RwLockReadGuard<'static, ()> {
    LOAD.read().unwrap_or_else(|e| e.into_inner())
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dwcp")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn keygen(dir: &Path) -> PathBuf {
    let k = dir.join("key");
    assert!(Command::new(bin()).arg("keygen").arg(&k).status().unwrap().success());
    k
}

fn sha256_file(p: &Path) -> Vec<u8> {
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_vec()
}

fn write_image(p: &Path, size: usize) {
    let mut f = std::fs::File::create(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len());
        dataplane::source::generate(11, at as u64, &mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        at += n;
    }
}

/// A daemon started with `api.socket` = `sock`: its HTTP endpoint answers and its jobs socket is
/// bound (the two are separate boot components, and a client started between them finds none).
fn wait_daemon(api: u16, sock: &Path) {
    wait_listening(api);
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "the daemon did not bind {}", sock.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_listening(port: u16) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "receiver did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A receiver process, killed and reaped when dropped: a failing test leaves none behind.
struct Rx(Child);

impl std::ops::Deref for Rx {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Rx {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Rx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `dwcp send ARGS --json --key-file KEY` with its output piped.
fn spawn_send(key: &Path, args: &[&str]) -> Child {
    Command::new(bin()).arg("send").args(args).args(["--json", "--key-file"]).arg(key).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// A receiver with `sink` (`--out X` or `--discard`) and `extra` flags, started and listening;
/// its output piped for the test to read, or (`quiet`) discarded.
fn spawn_recv(key: &Path, port: u16, sink: &[&str], extra: &[&str], quiet: bool) -> Rx {
    let out = || if quiet { Stdio::null() } else { Stdio::piped() };
    let c =
        Command::new(bin()).args(["recv", "--listen", &format!("127.0.0.1:{port}")]).args(sink).arg("--key-file").arg(key).args(extra).stdout(out()).stderr(out()).spawn().unwrap();
    wait_listening(port);
    Rx(c)
}

/// A receiver that verifies and drops what it gets, its output discarded.
fn discarding(key: &Path, port: u16, extra: &[&str]) -> Rx {
    spawn_recv(key, port, &["--discard"], extra, true)
}

/// A receiver writing to `out`, its output piped.
fn receiver(key: &Path, port: u16, out: &str, extra: &[&str]) -> Rx {
    spawn_recv(key, port, &["--out", out], extra, false)
}

#[test]
fn stdin_to_stdout_pipe_is_byte_exact_and_ordered() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let src = d.path().join("src.bin");
    write_image(&src, (9 << 20) + 777);
    let port = free_port();
    let out = std::fs::File::create(d.path().join("out.bin")).unwrap();
    let mut rx = Rx(Command::new(bin())
        .args(["recv", "--listen", &format!("127.0.0.1:{port}"), "--out", "-", "--once", "--key-file"])
        .arg(&key)
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    wait_listening(port);
    let tx = Command::new(bin())
        .args(["send", "-", "--to", &format!("127.0.0.1:{port}"), "--streams", "4", "--chunk-size", "256k", "--json", "--key-file"])
        .arg(&key)
        .stdin(std::fs::File::open(&src).unwrap())
        .output()
        .unwrap();
    assert!(tx.status.success(), "{}", String::from_utf8_lossy(&tx.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&tx.stdout).unwrap();
    assert_eq!(rep["verified"], true);
    assert_eq!(rep["size"], (9 << 20) + 777);
    assert!(rx.wait().unwrap().success());
    assert_eq!(sha256_file(&src), sha256_file(&d.path().join("out.bin")));
}

/// Connects to the Unix socket at `path` once something listens there.
fn connect_unix(path: &Path) -> std::os::unix::net::UnixStream {
    let t = Instant::now();
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => assert!(t.elapsed() < Duration::from_secs(10), "nothing listens at {}: {e}", path.display()),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The endpoints libvirt's unix-socket migration uses: the producer connects to `dwcp send
/// unix:SRC`; the receiver connects to the reader listening at `--out unix:DST`. The bytes arrive
/// whole and in order, the source socket is gone once taken, and the reader sees the end.
#[test]
fn a_stream_between_unix_sockets_is_byte_exact() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let (src_sock, dst_sock) = (d.path().join("src.sock"), d.path().join("dst.sock"));
    // The reader (a destination QEMU's -incoming unix:DST) listens first.
    let reader = std::os::unix::net::UnixListener::bind(&dst_sock).unwrap();
    let port = free_port();
    let mut rx = receiver(&key, port, &format!("unix:{}", dst_sock.display()), &["--once"]);
    let tx = spawn_send(&key, &[&format!("unix:{}", src_sock.display()), "--to", &format!("127.0.0.1:{port}"), "--streams", "3", "--chunk-size", "64k"]);
    let data = image(7)[..(5 << 20) + 1234].to_vec();
    let mut producer = connect_unix(&src_sock);
    let read = std::thread::spawn(move || {
        let (mut c, _) = reader.accept().unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        got
    });
    producer.write_all(&data).unwrap();
    drop(producer);
    let out = tx.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["verified"], true, "{rep}");
    assert_eq!(rep["size"], data.len(), "{rep}");
    assert!(rx.wait().unwrap().success());
    assert!(read.join().unwrap() == data, "the reader got other bytes");
    assert!(!src_sock.exists(), "the source socket is removed once its producer is taken");
}

/// A receiver whose reader is not listening refuses the session, naming the socket and what
/// to start, and the sender says so with the receiver's exit code (7).
#[test]
fn a_unix_sink_without_its_reader_is_named() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let (src_sock, dst_sock) = (d.path().join("src.sock"), d.path().join("nobody.sock"));
    let port = free_port();
    let _rx = receiver(&key, port, &format!("unix:{}", dst_sock.display()), &[]);
    let tx = spawn_send(&key, &[&format!("unix:{}", src_sock.display()), "--to", &format!("127.0.0.1:{port}")]);
    let mut producer = connect_unix(&src_sock);
    let _ = producer.write_all(&[7u8; 1 << 16]);
    drop(producer);
    let out = tx.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains(&format!("cannot connect to unix:{}", dst_sock.display())) && err.contains("-incoming unix:"), "{err}");
}

/// A live producer's bytes reach the reader while the producer is still running, to the last
/// byte after the last newline (a migration's final bytes are what the destination waits for).
#[test]
fn piped_bytes_reach_the_reader_before_the_stream_ends() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let port = free_port();
    let mut rx = receiver(&key, port, "-", &["--once"]);
    let mut tx = Command::new(bin())
        .args(["send", "-", "--to", &format!("127.0.0.1:{port}"), "--streams", "2", "--chunk-size", "64k", "--key-file"])
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = tx.stdin.take().unwrap();
    // One whole chunk (plain stdin is sent a chunk at a time), its last newline 500 bytes
    // before its end.
    let mut msg = vec![b'a'; 64 << 10];
    msg[(64 << 10) - 500] = b'\n';
    input.write_all(&msg).unwrap();
    input.flush().unwrap();
    let mut output = rx.stdout.take().unwrap();
    let (got_tx, got) = std::sync::mpsc::channel();
    let want = msg.len();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; want];
        let r = output.read_exact(&mut buf).map(|()| buf);
        let _ = got_tx.send(r);
    });
    let r = got.recv_timeout(Duration::from_secs(15)).expect("all the bytes written so far reach the reader while the sender's input is open");
    assert_eq!(r.unwrap(), msg);
    drop(input);
    assert!(tx.wait().unwrap().success());
    assert!(rx.wait().unwrap().success());
}

#[test]
fn killed_receiver_then_resume_sends_only_what_is_missing() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let src = d.path().join("vm.img");
    let size = 1usize << 30;
    write_image(&src, size);
    let out = d.path().join("out");
    let port = free_port();
    let mut rx = receiver(&key, port, out.to_str().unwrap(), &[]);
    let mut tx = Command::new(bin())
        .args(["send", src.to_str().unwrap(), "--to", &format!("127.0.0.1:{port}"), "--streams", "2", "--json", "--key-file"])
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the receiver once its journal holds some placed chunks.
    let journal = temp(&out, "vm.img", "journal");
    let t = Instant::now();
    while std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0) < 32 + 24 * 20 {
        assert!(t.elapsed() < Duration::from_secs(60), "journal never grew");
        std::thread::sleep(Duration::from_millis(2));
    }
    rx.kill().unwrap();
    rx.wait().unwrap();
    let st = tx.wait().unwrap();
    let mut err = String::new();
    tx.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!st.success(), "the sender must fail when the receiver dies");
    assert!(err.contains("--resume"), "the error tells what to do: {err}");
    assert!(!out.join("vm.img").exists(), "no partial output presented as complete");

    let mut rx = receiver(&key, port, out.to_str().unwrap(), &["--once", "--json"]);
    let o = Command::new(bin()).args(["send", src.to_str().unwrap(), "--to", &format!("127.0.0.1:{port}"), "--resume", "--json", "--key-file"]).arg(&key).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let skipped = rep["skipped"].as_u64().unwrap();
    assert!(skipped > 0 && skipped < size as u64, "resume skipped {skipped}");
    assert!(rep["sent_bytes"].as_u64().unwrap() < size as u64, "only the missing part went on the wire");
    let line = BufReader::new(rx.stdout.take().unwrap()).lines().next().unwrap().unwrap();
    let outcome: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(outcome["verified"], true);
    assert!(rx.wait().unwrap().success());
    assert_eq!(sha256_file(&src), sha256_file(&out.join("vm.img")), "sha256 of the output equals the source's");
    assert!(!temp(&out, "vm.img", "journal").exists());
}

#[test]
fn errors_say_what_to_do() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let o = Command::new(bin()).args(["send", "gen:1M", "--to", "127.0.0.1:1"]).env_remove("DWCP_KEY_FILE").output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("dwcp keygen"));

    let bad = d.path().join("bad.key");
    std::fs::write(&bad, "not a key").unwrap();
    // Readable by others: refused first, with the command that fixes it.
    let o = Command::new(bin()).args(["send", "gen:1M", "--to", "127.0.0.1:1", "--key-file"]).arg(&bad).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("chmod 600"), "{}", String::from_utf8_lossy(&o.stderr));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = Command::new(bin()).args(["send", "gen:1M", "--to", "127.0.0.1:1", "--key-file"]).arg(&bad).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("64 hex digits"));

    let key = keygen(d.path());
    let o = Command::new(bin()).args(["send", "gen:1M", "--to", &format!("127.0.0.1:{}", free_port()), "--key-file"]).arg(&key).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("cannot connect to 127.0.0.1:") && e.contains("refused") && e.contains("start `dwcp recv --listen"), "{e}");

    let o = Command::new(bin()).args(["send", "/nonexistent/x.img", "--to", "127.0.0.1:1", "--key-file"]).arg(&key).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read source /nonexistent/x.img"));

    let o = Command::new(bin()).args(["send", "gen:12parsecs", "--to", "127.0.0.1:1", "--key-file"]).arg(&key).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown size unit"));
}

#[test]
fn table_and_json_summaries() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let port = free_port();
    let mut rx =
        Rx(Command::new(bin()).args(["recv", "--listen", &format!("127.0.0.1:{port}"), "--discard", "--once", "--key-file"]).arg(&key).stderr(Stdio::null()).spawn().unwrap());
    wait_listening(port);
    let o = Command::new(bin()).args(["send", "gen:32M", "--to", &format!("127.0.0.1:{port}"), "--key-file"]).arg(&key).output().unwrap();
    assert!(o.status.success());
    let table = String::from_utf8_lossy(&o.stdout);
    for k in ["digest verified", "goodput", "streams", "re-sent", "wall time"] {
        assert!(table.contains(k), "summary shows {k}:\n{table}");
    }
    assert!(table.contains("datacenter (auto, loopback)") && table.contains("probe") && table.contains("rtt"), "the mode and the probe behind it are printed:\n{table}");
    assert!(table.contains("requires encryption"), "datacenter mode says why it still encrypts:\n{table}");
    assert!(rx.wait().unwrap().success());
}

/// The demo's job (`make demo`): 2 GiB over loopback to a receiver writing them to disk. The
/// streams wait on the receiver's window for much of it, and once every byte is acknowledged
/// the sender waits seconds for the receiver's digest and sync; neither is a thin path, and
/// the transfer stays in datacenter mode (it used to switch to internet during the wait).
/// It measures the path (probe and live RTT), so it runs alone: beside the 64-sender test its
/// RTT reached 19 ms and the transfer switched to internet mode.
#[test]
fn a_receiver_bound_loopback_transfer_stays_in_datacenter_mode() {
    let _load = heavy();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let port = free_port();
    let out = d.path().join("out");
    let mut rx = receiver(&key, port, out.to_str().unwrap(), &["--once"]);
    let o = Command::new(bin()).args(["send", "gen:2GiB", "--name", "vm.raw", "--json", "--to", &format!("127.0.0.1:{port}"), "--key-file"]).arg(&key).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(rx.0.wait().unwrap().success());
    let m = &j["mode"];
    assert_eq!(m["initial"], "datacenter", "{m}");
    assert_eq!(m["switches"], serde_json::json!([]), "no switch on loopback: {m}");
}

/// The opening probe measures loopback's bandwidth, so this runs alone: beside three other
/// transfers on CI's two cores it measured 0.80 Gbit/s, which rightly votes internet.
#[test]
fn mode_sets_streams_and_encryption() {
    let _load = heavy();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let port = free_port();
    // A receiver that allows plaintext: datacenter mode (loopback) then sends plaintext.
    let mut rx = Rx(Command::new(bin())
        .args(["recv", "--listen", &format!("127.0.0.1:{port}"), "--discard", "--no-encrypt", "--key-file"])
        .arg(&key)
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    wait_listening(port);
    let send = |extra: &[&str]| {
        // The source is gen:64M unless the first of `extra` is a path.
        let (src, extra) = match extra.first() {
            Some(f) if f.starts_with('/') => (*f, &extra[1..]),
            _ => ("gen:64M", extra),
        };
        let o = Command::new(bin()).args(["send", src, "--json", "--to", &format!("127.0.0.1:{port}"), "--key-file"]).arg(&key).args(extra).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    // A mapped file goes out from its mapping in plaintext.
    let file = d.path().join("img");
    write_image(&file, 64 << 20);
    let j = send(&[file.to_str().unwrap()]);
    let m = &j["mode"];
    assert_eq!(m["how"], "auto");
    assert_eq!(m["initial"], "datacenter", "{m}");
    assert!(m["probe_rtt_us"].as_u64().unwrap() < 2000, "{m}");
    assert!(m["probe_gbps"].as_f64().unwrap() > 0.0, "{m}");
    assert_eq!(j["encrypted"], false, "datacenter mode, plaintext allowed, a mapped file: {j}");
    // A generated source is copied anyway: encrypted exactly where sealing measured cheaper than
    // the plaintext tag on this host, and the plan says so.
    let g = send(&[]);
    let why = g["plan"]["why"]["encrypt"].as_str().unwrap_or_default().to_string();
    assert_eq!(g["encrypted"], why.contains("AES-GCM measured cheaper"), "{why}");
    assert!(m["opened"].as_u64().unwrap() >= m["active"].as_u64().unwrap(), "{m}");
    assert_eq!(j["streams"], m["opened"]);
    // Forced internet mode: encrypted, no bulk probe, every stream active.
    let j = send(&["--mode", "internet"]);
    assert_eq!(j["encrypted"], true, "{j}");
    assert_eq!(j["mode"]["initial"], "internet");
    assert!(j["mode"]["probe_gbps"].is_null());
    assert_eq!(j["mode"]["opened"], j["mode"]["active"]);
    // Flags win over the mode.
    let j = send(&["--encrypt", "--streams", "3"]);
    assert_eq!((j["encrypted"].clone(), j["streams"].clone()), (serde_json::json!(true), serde_json::json!(3)));
    let _ = rx.kill();
    let _ = rx.wait();
}

/// Mounts a tmpfs of `size` at `dir` (root only), unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Self {
        let uid = Command::new("id").arg("-u").output().unwrap();
        assert_eq!(String::from_utf8_lossy(&uid.stdout).trim(), "0", "this test needs root to mount a small tmpfs as a full disk");
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).status().unwrap();
        assert!(st.success(), "mount tmpfs");
        SmallDisk(dir.to_owned())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_is_named_and_the_receiver_keeps_serving() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let out = d.path().join("small");
    let _disk = SmallDisk::mount(&out, "4m");
    let port = free_port();
    let mut rx = receiver(&key, port, out.to_str().unwrap(), &[]);
    let to = format!("127.0.0.1:{port}");
    // Known size: refused at session start, before a byte of data is sent.
    let o = Command::new(bin()).args(["send", "gen:16M", "--name", "big.img", "--to", &to, "--key-file"]).arg(&key).output().unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("does not fit") && e.contains("big.img"), "{e}");
    // Unknown size (a pipe): the disk fills mid-transfer; the error names the write that failed.
    let src = d.path().join("pipe.bin");
    write_image(&src, 16 << 20);
    let o = Command::new(bin()).args(["send", "-", "--name", "piped.img", "--to", &to, "--key-file"]).arg(&key).stdin(std::fs::File::open(&src).unwrap()).output().unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("No space left on device") && e.contains("writing"), "{e}");
    assert!(!out.join("piped.img").exists(), "no partial output presented as complete");
    // A pipe cannot be resumed, so its partial output is removed once the session's streams close.
    let t = Instant::now();
    while temp(&out, "piped.img", "part").exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "the unresumable partial output was not removed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The same receiver still serves a session that fits (the space returns when the last
    // stream lets go of the removed file, a moment after the unlink).
    let mut last = String::new();
    let served = (0..25).any(|_| {
        let o = Command::new(bin()).args(["send", "gen:1M", "--name", "small.img", "--to", &to, "--key-file"]).arg(&key).output().unwrap();
        last = String::from_utf8_lossy(&o.stderr).into_owned();
        if !o.status.success() {
            std::thread::sleep(Duration::from_millis(200));
        }
        o.status.success()
    });
    assert!(served, "{last}");
    assert_eq!(std::fs::metadata(out.join("small.img")).unwrap().len(), 1 << 20);
    rx.kill().unwrap();
    rx.wait().unwrap();
}

#[test]
fn concurrent_sessions_on_one_receiver() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let out = d.path().join("out");
    let port = free_port();
    let mut rx = receiver(&key, port, out.to_str().unwrap(), &[]);
    let to = format!("127.0.0.1:{port}");
    let senders: Vec<_> = (0..3).map(|i| spawn_send(&key, &[&format!("gen:24M:{i}"), "--name", &format!("vm{i}.img"), "--to", &to, "--streams", "3"])).collect();
    for (i, s) in senders.into_iter().enumerate() {
        let o = s.wait_with_output().unwrap();
        assert!(o.status.success(), "sender {i}: {}", String::from_utf8_lossy(&o.stderr));
        let mut expect = vec![0u8; 24 << 20];
        dataplane::source::generate(i as u64, 0, &mut expect);
        assert_eq!(std::fs::read(out.join(format!("vm{i}.img"))).unwrap(), expect, "vm{i}.img byte-exact");
    }
    rx.kill().unwrap();
    rx.wait().unwrap();
}

/// `dwcp send SRC --name vm.img --json` to the receiver on `port`: success, standard output,
/// standard error.
fn send_image(port: u16, key: &Path, src: &Path, extra: &[&str]) -> (bool, String, String) {
    let o =
        Command::new(bin()).arg("send").arg(src).args(["--name", "vm.img", "--json", "--to", &format!("127.0.0.1:{port}"), "--key-file"]).arg(key).args(extra).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A 16 MiB memory-like image: zero pages, repeated pages, text and noise.
fn image(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; 16 << 20];
    let mut x = seed | 1;
    for (i, page) in v.chunks_mut(4096).enumerate() {
        match i % 5 {
            0 => {}
            1 => page.copy_from_slice(&[0x5a; 4096]),
            2 => {
                for (j, b) in page.iter_mut().enumerate() {
                    *b = b"the quick brown fox jumps over "[(j + i) % 31];
                }
            }
            _ => {
                for b in page.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
        }
    }
    v
}

#[test]
fn hde_rounds_reach_the_receiver_exactly() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let out = d.path().join("out");
    let (a, mut b) = (image(1), image(1));
    // Round 2 dirties a tenth of the pages: small edits, rewrites, zeroing, and pages that take
    // the old bytes of another page this round rewrites (a chunk earlier), shifted by 5 bytes:
    // the receiver must read references from the previous image, whatever order frames land in.
    let other = image(7);
    for (i, page) in b.chunks_mut(4096).enumerate().filter(|(i, _)| i % 10 == 3) {
        match (i / 10) % 4 {
            0 => page[100..140].fill(0xee),
            1 => page.fill(0),
            3 if i >= 300 => {
                page[..5].copy_from_slice(b"x123 ");
                page[5..].copy_from_slice(&a[(i - 300) * 4096..(i - 299) * 4096 - 5]);
            }
            _ => page.copy_from_slice(&other[i * 4096..(i + 1) * 4096]),
        }
    }
    let (pa, pb) = (d.path().join("a.img"), d.path().join("b.img"));
    std::fs::write(&pa, &a).unwrap();
    std::fs::write(&pb, &b).unwrap();
    let port = free_port();
    let mut rx =
        Rx(Command::new(bin()).args(["recv", "--listen", &format!("127.0.0.1:{port}"), "--out"]).arg(&out).arg("--key-file").arg(&key).stderr(Stdio::null()).spawn().unwrap());
    wait_listening(port);
    let send = |src: &Path, extra: &[&str]| send_image(port, &key, src, extra);
    let (ok, j, e) = send(&pa, &["--hde", "on", "--compress", "3"]);
    assert!(ok, "{e}");
    let j: serde_json::Value = serde_json::from_str(&j).unwrap();
    let h = &j["hde"];
    assert!(h["output"].as_u64().unwrap() * 2 < h["input"].as_u64().unwrap(), "round 1 compresses: {h}");
    assert_eq!(std::fs::read(out.join("vm.img")).unwrap(), a, "round 1 exact");
    let (ok, j, e) = send(&pb, &["--round-of", pa.to_str().unwrap(), "--compress", "3"]);
    assert!(ok, "{e}");
    let j: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(j["hde"]["input"], (16 << 20) / 4096 / 10 * 4096 + 4096 * u64::from((16 << 20) / 4096 % 10 > 3), "only dirty pages travel: {j}");
    assert_eq!(std::fs::read(out.join("vm.img")).unwrap(), b, "round 2 exact");
    // The moved pages were sent against their sources' old copies, which the receiver read from
    // the previous image whatever order the frames were applied in.
    assert!(j["hde"]["refs"].as_u64().unwrap() > 0, "moved pages found their sources: {}", j["hde"]);
    // A round against a previous image the receiver does not hold (a copy of a, while it holds
    // b): no page differs, so nothing is sent and only the whole-image check can catch it.
    // Named, and nothing published.
    let pc = d.path().join("c.img");
    std::fs::write(&pc, &a).unwrap();
    let (ok, _, e) = send(&pa, &["--round-of", pc.to_str().unwrap(), "--compress", "off"]);
    assert!(!ok);
    assert!(e.contains("output not published") && (e.contains("HDE pages did not apply") || e.contains("decoded image differs")), "{e}");
    assert_eq!(std::fs::read(out.join("vm.img")).unwrap(), b, "the published image is untouched");
    let _ = rx.kill();
    let _ = rx.wait();
}

#[test]
fn an_hde_session_survives_a_dropped_stream() {
    let _load = light();
    // A stream shut down mid-send: its unacknowledged chunks go again on the other streams. The
    // receiver decoded some of them already (the chunk arrives twice), and some only partly
    // (the frame was cut off); both rounds must still land exactly. Stream 0, the first up,
    // always sends (a later one may find a small round taken before it joins); in round 2,
    // whose frames are small, it is shut down after its first.
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let out = d.path().join("out");
    let mut a = vec![0u8; 64 << 20];
    dataplane::source::generate(5, 0, &mut a);
    // Pages in pairs: a chunk encoded again by an encoder that believes its first frame arrived
    // finds each page a duplicate of its twin, both ways.
    for pair in a.chunks_mut(8192) {
        let (x, y) = pair.split_at_mut(4096);
        y.copy_from_slice(x);
    }
    let mut b = a.clone();
    for (i, page) in b.chunks_mut(4096).enumerate().filter(|(i, _)| i % 7 == 2) {
        page[..64].fill(i as u8);
    }
    let (pa, pb) = (d.path().join("a.img"), d.path().join("b.img"));
    std::fs::write(&pa, &a).unwrap();
    std::fs::write(&pb, &b).unwrap();
    let log = d.path().join("recv.log");
    let port = free_port();
    let mut rx = Rx(Command::new(bin())
        .args(["recv", "--listen", &format!("127.0.0.1:{port}"), "--out"])
        .arg(&out)
        .arg("--key-file")
        .arg(&key)
        .env("RUST_LOG", "dataplane::recv=debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap());
    wait_listening(port);
    let send = |src: &Path, extra: &[&str]| send_image(port, &key, src, &[&["--streams", "4"], extra].concat());
    let (ok, _, e) = send(&pa, &["--hde", "on", "--compress", "3", "--fault-kill-stream", "0:1MiB"]);
    assert!(ok && e.contains("re-queued"), "{e}");
    assert_eq!(std::fs::read(out.join("vm.img")).unwrap(), a, "round 1 exact");
    let (ok, _, e) = send(&pb, &["--round-of", pa.to_str().unwrap(), "--compress", "3", "--fault-kill-stream", "0:1"]);
    assert!(ok && e.contains("re-queued"), "{e}");
    assert_eq!(std::fs::read(out.join("vm.img")).unwrap(), b, "round 2 exact");
    let _ = rx.kill();
    let _ = rx.wait();
    // The chunk sent just before each shutdown had reached the receiver whole, unacknowledged.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("HDE chunk arrived again"), "{log}");
}

/// A bitmap with bit `i` set (least significant first) for each unit in `units`.
fn bitmap(bits: usize, units: impl IntoIterator<Item = usize>) -> Vec<u8> {
    let mut v = vec![0u8; bits.div_ceil(8)];
    for u in units {
        v[u / 8] |= 1 << (u % 8);
    }
    v
}

#[test]
fn a_round_from_a_dirty_log_reaches_the_receiver_exactly() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let out = d.path().join("out");
    let pages = (16 << 20) / 4096;
    let a = image(3);
    // Round 2: every 37th page changed, logged by 4 KiB page. Round 3: pages in two 2 MiB huge
    // pages changed, logged by huge page. The sender has no previous round: the receiver does.
    let mut b = a.clone();
    let changed: Vec<usize> = (5..pages).step_by(37).collect();
    for &i in &changed {
        if i % 2 == 0 { b[i * 4096..(i + 1) * 4096].fill(0) } else { b[i * 4096 + 9..i * 4096 + 90].fill(0x77) }
    }
    let mut c = b.clone();
    for i in [600, 601, 3000] {
        c[i * 4096..i * 4096 + 4096].copy_from_slice(&[i as u8 | 1; 4096]);
    }
    let (pa, pb, pc) = (d.path().join("a.img"), d.path().join("b.img"), d.path().join("c.img"));
    for (p, v) in [(&pa, &a), (&pb, &b), (&pc, &c)] {
        std::fs::write(p, v).unwrap();
    }
    let (log_b, log_c) = (d.path().join("b.log"), d.path().join("c.log"));
    std::fs::write(&log_b, bitmap(pages, changed.iter().copied())).unwrap();
    std::fs::write(&log_c, bitmap(8, [600 / 512, 3000 / 512])).unwrap();
    let port = free_port();
    let mut rx = receiver(&key, port, out.to_str().unwrap(), &[]);
    let send = |src: &Path, extra: &[&str]| send_image(port, &key, src, extra);
    let (ok, _, e) = send(&pa, &["--hde", "on", "--compress", "3"]);
    assert!(ok, "{e}");
    let (ok, j, e) = send(&pb, &["--dirty", log_b.to_str().unwrap(), "--compress", "3"]);
    assert!(ok, "{e}");
    let j: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(j["hde"]["input"], (changed.len() * 4096) as u64, "only the logged pages travel: {j}");
    assert_eq!(std::fs::read(out.join("vm.img")).unwrap(), b, "round 2 exact");
    let (ok, j, e) = send(&pc, &["--dirty", log_c.to_str().unwrap(), "--dirty-unit", "2MiB", "--compress", "3"]);
    assert!(ok, "{e}");
    let j: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(j["hde"]["input"], 2u64 << 21, "two huge pages travel: {j}");
    assert_eq!(std::fs::read(out.join("vm.img")).unwrap(), c, "round 3 exact");
    // A log that missed a change: named at commit, and nothing published.
    let mut e4 = c.clone();
    e4[100 * 4096] ^= 1;
    let pe = d.path().join("e.img");
    std::fs::write(&pe, &e4).unwrap();
    let (ok, _, e) = send(&pe, &["--dirty", log_c.to_str().unwrap(), "--dirty-unit", "2MiB"]);
    assert!(!ok);
    assert!(e.contains("dirty log that missed changed pages") && e.contains("output not published"), "{e}");
    assert_eq!(std::fs::read(out.join("vm.img")).unwrap(), c, "the published image is untouched");
    // A bitmap too short for the image is refused before anything is sent, and says why.
    let (ok, _, e) = send(&pe, &["--dirty", log_c.to_str().unwrap()]);
    assert!(!ok);
    assert!(e.contains("--dirty") && e.contains("needs 512"), "{e}");
    assert!(rx.try_wait().unwrap().is_none(), "the receiver keeps serving");
}

/// Where the receiver keeps an object's partial output or journal.
fn temp(out: &std::path::Path, name: &str, ext: &str) -> std::path::PathBuf {
    out.join(".dwcp-state").join(format!("{}.{ext}", dataplane::recv::outdir::key(name)))
}

/// The receiver's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap();
    kb * 1024
}

/// A page-aware stream (the destination of a migration, `dwcp recv --out -`) whose batch record
/// declares 4 GiB of output and carries a skeleton of 30 KiB that decompresses to 256 MiB, sent
/// by a peer that holds the key: the receiver process must stay under its budget, end only that
/// session with an error naming the record, and serve the next sender. Without the batch bound
/// the decoder sized its buffer from the declared length and decompressed the skeleton.
#[test]
fn a_qemu_stream_bomb_ends_its_session_and_the_receiver_stays_small() {
    use dataplane::{crypto::Psk, handshake, wire};
    let _load = heavy();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let port = free_port();
    let mut rx = Rx(Command::new(bin())
        .args(["recv", "--listen", &format!("127.0.0.1:{port}"), "--out", "-", "--key-file"])
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());
    wait_listening(port);
    // The stream: a header record, then a batch record (tag, u32 length, body) whose body is
    // the declared output length, its checksum, the skeleton's length and the skeleton.
    let mut skel = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    std::io::copy(&mut std::io::repeat(0).take(256 << 20), &mut skel).unwrap();
    let skel = skel.finish().unwrap();
    let mut body = u32::MAX.to_le_bytes().to_vec();
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&(skel.len() as u32).to_le_bytes());
    body.extend_from_slice(&skel);
    let mut stream = Vec::new();
    for (tag, b) in [(b'H', &b"DWQ1"[..]), (b'F', &body)] {
        stream.push(tag);
        stream.extend_from_slice(&(b.len() as u32).to_le_bytes());
        stream.extend_from_slice(b);
    }
    let psk = Psk::from_file(&key).unwrap();
    let (mut c, _) = handshake::connect(&format!("127.0.0.1:{port}"), &psk, true, 0, Duration::from_secs(5)).unwrap();
    let hello = wire::Hello::Open {
        caps: wire::Caps { max_streams: 1, max_chunk: 1 << 20, codecs: wire::CODEC_RAW | wire::CODEC_QEMU, transports: 1 },
        chunk_size: 1 << 20,
        streams: 1,
        object_size: wire::SIZE_UNKNOWN,
        object_id: 1,
        resume: false,
        name: "vm.migration".into(),
    };
    c.write_frame(wire::FrameType::Hello, 0, &hello.encode()).unwrap();
    let (_, w) = c.expect(wire::FrameType::Welcome, "welcome").unwrap();
    assert!(wire::Welcome::decode(&w).unwrap().caps.codecs & wire::CODEC_QEMU != 0, "page-aware mode granted");
    let before = peak_rss(rx.id());
    c.write_frame(wire::FrameType::Chunk, 0, &stream).unwrap();
    let refusal = loop {
        match c.read_frame("the receiver's answer to the bomb") {
            Ok((h, _)) if h.kind == wire::FrameType::Ack => continue,
            Err(handshake::HandshakeError::Refused { message, .. }) => break message,
            other => panic!("expected the session ended with an error, got {other:?}"),
        }
    };
    assert!(refusal.contains("more than a batch can rebuild"), "{refusal}");
    drop(c);
    let peak = peak_rss(rx.id());
    eprintln!("receiver peak RSS {} MiB before the bomb, {} MiB after", before >> 20, peak >> 20);
    assert!(peak < before + (64 << 20), "peak RSS grew from {} to {} MiB", before >> 20, peak >> 20);
    // The next sender is served.
    let next = d.path().join("next.img");
    write_image(&next, 1 << 20);
    let (ok, _, e) = send_image(port, &key, &next, &[]);
    assert!(ok, "{e}");
    assert!(rx.try_wait().unwrap().is_none(), "the receiver keeps serving");
}

/// Jain's fairness index of `x`: 1 when all are equal, 1/n when one has everything.
fn jain(x: &[f64]) -> f64 {
    let (s, q) = x.iter().fold((0.0, 0.0), |(s, q), v| (s + v, q + v * v));
    s * s / (x.len() as f64 * q)
}

/// Finding 6 of the integrity issue: of 64 senders at once (default streams and encryption),
/// 32 failed after 30 s as "stalled": the receiver's first streams kept its buffers. Now a
/// stream holds a buffer only while bytes of a frame are there, and buffers go to readable
/// streams in turn, each session at most its share: every session verifies, with the
/// receiver's memory bounded.
#[test]
fn sixty_four_senders_at_once_all_verify_with_bounded_memory() {
    let _load = heavy();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let port = free_port();
    let rx = Rx(Command::new(bin())
        .args(["recv", "--listen", &format!("127.0.0.1:{port}"), "--discard", "--key-file"])
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    wait_listening(port);
    let n = 64;
    let t = Instant::now();
    let kids: Vec<Child> = (0..n).map(|k| spawn_send(&key, &[&format!("gen:32MiB:{k}"), "--name", &format!("s{k}.img"), "--to", &format!("127.0.0.1:{port}")])).collect();
    let mut rates = Vec::new();
    let mut failed = Vec::new();
    for (k, c) in kids.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        if !o.status.success() {
            failed.push(format!("s{k}: {}", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")));
            continue;
        }
        let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(rep["verified"], true);
        rates.push(rep["goodput_gbps"].as_f64().unwrap());
    }
    let wall = t.elapsed();
    let peak = peak_rss(rx.id());
    eprintln!(
        "{n} senders of 32 MiB: {} verified in {wall:.1?}; goodput per session min {:.3} max {:.3} Gbit/s, Jain's index {:.3}; receiver peak RSS {} MiB",
        rates.len(),
        rates.iter().cloned().fold(f64::MAX, f64::min),
        rates.iter().cloned().fold(0.0, f64::max),
        jain(&rates),
        peak >> 20
    );
    assert!(failed.is_empty(), "{} of {n} failed: {failed:?}", failed.len());
    assert!(peak < 512 << 20, "receiver peak RSS {} MiB", peak >> 20);
}

/// Under systemd (Type=notify, WatchdogSec=) the daemon says READY=1 once booted and then feeds
/// the watchdog (it does so only while its HTTP endpoint answers /healthz).
#[test]
fn the_daemon_tells_systemd_it_is_ready_and_feeds_the_watchdog() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let (port, api) = (free_port(), free_port());
    let cfg = daemon_config(d.path(), &key, port, api, None);
    let notify = d.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _daemon = Rx(Command::new(bin())
        .args(["daemon", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !(seen.iter().any(|m: &String| m.contains("READY=1")) && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2) {
        let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("no more notifications ({e}); got {seen:?}"));
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(seen[0].contains("READY=1"), "ready first: {seen:?}");
}

/// A daemon's config in `dir`: its listener on `port`, its HTTP endpoint on `api`, its jobs
/// socket at `socket` if given.
fn daemon_config(dir: &Path, key: &Path, port: u16, api: u16, socket: Option<&Path>) -> PathBuf {
    let cfg = dir.join("dwcp.toml");
    let mut t = format!(
        "[node]\nname = \"t\"\nlisten = \"127.0.0.1:{port}\"\nout = \"{}\"\nkey_file = \"{}\"\n[api]\nlisten = \"127.0.0.1:{api}\"\n",
        dir.join("out").display(),
        key.display()
    );
    if let Some(s) = socket {
        t.push_str(&format!("socket = \"{}\"\n", s.display()));
    }
    std::fs::write(&cfg, t).unwrap();
    cfg
}

/// `dwcp send --via-daemon`: the daemon sends the file with its own key through the same engine
/// (here to its own listener), the CLI follows it and prints the daemon's summary; `dwcp job
/// list` shows it; a bad request is refused with the daemon's reason and a missing daemon is
/// named.
#[test]
fn a_send_through_the_daemon_is_planned_sent_and_listed() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let (port, api) = (free_port(), free_port());
    let sock = d.path().join("api.sock");
    let cfg = daemon_config(d.path(), &key, port, api, Some(&sock));
    let _daemon = Rx(Command::new(bin()).args(["daemon", "--config"]).arg(&cfg).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    wait_daemon(api, &sock);
    let src = d.path().join("disk.img");
    write_image(&src, 3 << 20);
    // A relative source: the CLI names it absolutely for the daemon.
    let o = Command::new(bin())
        .current_dir(d.path())
        .args(["send", "disk.img", "--to", &format!("127.0.0.1:{port}"), "--streams", "2", "--json", "--via-daemon"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["state"], "verified", "{j}");
    assert_eq!(j["result"]["plan"]["streams"], 2, "{j}");
    assert!(std::fs::read(d.path().join("out/disk.img")).unwrap() == std::fs::read(&src).unwrap(), "published byte-exact");
    assert_eq!(j["result"]["schema"], 1, "the JSON says its schema version: {j}");
    let st = Command::new(bin()).args(["status", "--api", &format!("127.0.0.1:{api}")]).output().unwrap();
    assert!(st.status.success() && String::from_utf8_lossy(&st.stdout).contains("ready"), "a ready daemon's status exits 0");
    let o = Command::new(bin()).args(["job", "list", "--json", "--socket"]).arg(&sock).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list[0]["name"], "disk.img", "{list}");
    // For a person: the line, and where ITP placed it and why.
    let o = Command::new(bin()).args(["job", "list", "--socket"]).arg(&sock).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("verified") && text.contains("disk.img") && text.contains("cores ") && text.contains("lo has no NUMA node"), "{text}");
    // Refused by the daemon, with its reason.
    let o = Command::new(bin()).args(["send", "/nonexistent/x.img", "--to", "127.0.0.1:1", "--via-daemon"]).arg(&sock).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("failed") && e.contains("/nonexistent/x.img"), "{e}");
    let o = Command::new(bin()).args(["job", "list", "--socket"]).arg(d.path().join("nope.sock")).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("no dwcp daemon answers on"), "{e}");
}

/// A daemon with a jobs socket, and a discarding receiver for its jobs to send to.
struct JobRig {
    sock: PathBuf,
    rx_port: u16,
    _daemon: Rx,
    _rx: Rx,
    // Last: removed once the processes are gone.
    _dir: tempfile::TempDir,
}

impl JobRig {
    fn new() -> Self {
        let d = tempfile::tempdir().unwrap();
        let key = keygen(d.path());
        let (port, api, rx_port) = (free_port(), free_port(), free_port());
        let sock = d.path().join("api.sock");
        let cfg = daemon_config(d.path(), &key, port, api, Some(&sock));
        let daemon = Rx(Command::new(bin()).args(["daemon", "--config"]).arg(&cfg).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
        wait_daemon(api, &sock);
        let rx = spawn_recv(&key, rx_port, &["--discard"], &[], true);
        Self { sock, rx_port, _daemon: daemon, _rx: rx, _dir: d }
    }

    /// `dwcp job list --json`.
    fn jobs(&self) -> Vec<serde_json::Value> {
        let o = Command::new(bin()).args(["job", "list", "--json", "--socket"]).arg(&self.sock).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap().as_array().cloned().unwrap_or_default()
    }

    /// The job named `name`, as `dwcp job list --json` shows it.
    fn job(&self, name: &str) -> Option<serde_json::Value> {
        self.jobs().into_iter().find(|j| j["name"] == name)
    }

    /// `dwcp job list`, for a person.
    fn list_text(&self) -> String {
        let o = Command::new(bin()).args(["job", "list", "--socket"]).arg(&self.sock).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `dwcp job cancel` of job `j`; whether it succeeded.
    fn cancel(&self, j: &serde_json::Value) -> bool {
        let id = j["id"].as_u64().unwrap().to_string();
        Command::new(bin()).args(["job", "cancel", &id, "--socket"]).arg(&self.sock).output().unwrap().status.success()
    }
}

/// A job with a deadline says, from PBA's 80% interval of the next second, whether it will be
/// met: a 64 GiB send to a discarding receiver due in 2000 s is on track, one due in 6 s will
/// miss (both cancelled once judged); a small one verified in time has met it.
#[test]
fn a_jobs_deadline_is_judged_from_pbas_interval() {
    let _load = heavy();
    let rig = JobRig::new();
    let (sock, rx_port) = (rig.sock.clone(), rig.rx_port);
    for (due, name, want) in [("2000s", "far.img", "on track"), ("6s", "near.img", "will miss")] {
        let mut send = Rx(Command::new(bin())
            .args(["send", "gen:64GiB", "--name", name, "--to", &format!("127.0.0.1:{rx_port}"), "--streams", "1", "--deadline", due, "--json", "--via-daemon"])
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap());
        let t = Instant::now();
        let j = loop {
            if let Some(j) = rig.job(name).filter(|j| j["deadline"]["verdict"].as_str().is_some_and(|v| v != "not predicted yet")) {
                break j;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no verdict for {name}: {:?}", rig.jobs());
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(j["deadline"]["verdict"], want, "{j}");
        let bounds = j["next_second_bps"].as_array().expect("PBA's interval").iter().map(|b| b.as_f64().unwrap()).collect::<Vec<_>>();
        assert!(bounds[0] > 0.0 && bounds[0] <= bounds[1], "{j}");
        let text = rig.list_text();
        assert!(text.contains(&format!("deadline: {want}")), "{text}");
        assert!(rig.cancel(&j));
        assert!(!send.0.wait().unwrap().success(), "a cancelled job's send does not succeed");
    }
    // A small one, verified well within its deadline.
    let o = Command::new(bin())
        .args(["send", "gen:4MiB", "--name", "small.img", "--to", &format!("127.0.0.1:{rx_port}"), "--deadline", "60s", "--json", "--via-daemon"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = rig.job("small.img").unwrap();
    assert_eq!(j["deadline"]["verdict"], "met", "{j}");
    // A deadline that is not a duration is refused by name.
    let o = Command::new(bin()).args(["send", "gen:4MiB", "--to", &format!("127.0.0.1:{rx_port}"), "--deadline", "soon", "--via-daemon"]).arg(&sock).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--deadline"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Two jobs to one peer, one with a deadline it needs the whole link for: ITP caps the other
/// (its share and the reason in its JSON) and the capped one's rate falls well below the
/// deadline job's; once the deadline job is gone, the cap is lifted.
#[test]
fn a_deadline_job_is_favoured_on_a_shared_link() {
    let _load = heavy();
    let rig = JobRig::new();
    let (sock, rx_port) = (rig.sock.clone(), rig.rx_port);
    let to = format!("127.0.0.1:{rx_port}");
    let spawn = |name: &str, deadline: Option<&str>| {
        let mut c = Command::new(bin());
        c.args(["send", "gen:64GiB", "--name", name, "--to", &to, "--streams", "2", "--json"]);
        if let Some(d) = deadline {
            c.args(["--deadline", d]);
        }
        Rx(c.arg("--via-daemon").arg(&sock).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
    };
    let _copy = spawn("copy.img", None);
    let _urgent = spawn("urgent.img", Some("20s"));
    // 64 GiB in 20 s needs more than this link: the copy is held to its floor.
    let t = Instant::now();
    let capped = loop {
        if let Some(j) = rig.job("copy.img").filter(|j| j["share"]["cap_bps"].as_f64().is_some()) {
            break j;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the copy was never capped: {:?}", rig.jobs());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(capped["share"]["why"].as_str().unwrap().contains("no deadline"), "{capped}");
    let text = rig.list_text();
    assert!(text.contains("paced at "), "{text}");
    let urgent = rig.job("urgent.img").unwrap();
    assert!(urgent["share"]["why"].as_str().unwrap().contains("earliest deadline"), "{urgent}");
    // Over two seconds under the cap, the copy moves a fraction of what the deadline job does.
    std::thread::sleep(Duration::from_millis(500));
    let acked = |name: &str| rig.job(name).and_then(|j| j["acked_bytes"].as_u64()).unwrap_or(0);
    let (c0, u0) = (acked("copy.img"), acked("urgent.img"));
    std::thread::sleep(Duration::from_secs(2));
    let (c1, u1) = (acked("copy.img"), acked("urgent.img"));
    assert!((c1 - c0) * 4 < u1 - u0, "copy moved {} bytes, the deadline job {}", c1 - c0, u1 - u0);
    // The deadline job cancelled: the copy's cap is lifted.
    assert!(rig.cancel(&urgent));
    let t = Instant::now();
    while rig.job("copy.img").is_some_and(|j| j["share"]["cap_bps"].as_f64().is_some()) {
        assert!(t.elapsed() < Duration::from_secs(10), "the copy stayed capped");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(rig.cancel(&rig.job("copy.img").unwrap()));
}

/// Exit statuses a script can tell apart: a usage error, a key file that cannot be used, a
/// wrong key, a receiver not reached, a source that cannot be read.
#[test]
fn exit_codes_tell_failures_apart() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let other = d.path().join("other");
    assert!(Command::new(bin()).arg("keygen").arg(&other).status().unwrap().success());
    let port = free_port();
    let mut rx = receiver(&key, port, d.path().join("out").to_str().unwrap(), &[]);
    let to = format!("127.0.0.1:{port}");
    let code = |args: &[&str], key: &Path| Command::new(bin()).arg("send").args(args).args(["--key-file"]).arg(key).output().unwrap().status.code();
    assert_eq!(code(&["gen:1MiB", "--to", &to, "--compress", "99"], &key), Some(2), "usage");
    assert_eq!(code(&["gen:1MiB", "--to", &to], &d.path().join("missing-key")), Some(3), "key file");
    assert_eq!(code(&["gen:1MiB", "--to", &to], &other), Some(4), "wrong key");
    assert_eq!(code(&["gen:1MiB", "--to", &format!("127.0.0.1:{}", free_port())], &key), Some(5), "nobody listening");
    assert_eq!(code(&["/nonexistent/disk.img", "--to", &to], &key), Some(9), "unreadable source");
    assert_eq!(code(&["gen:1MiB", "--to", &to], &key), Some(0));
    let _ = rx.kill();
    let _ = rx.wait();
}

/// A short sweep on loopback: its CSV has every run, its plots are images, its recommended
/// config is one `dwcp config check` accepts, and --resume runs only what is missing.
#[test]
fn a_short_tune_sweep_writes_its_csv_plots_and_a_config_that_checks() {
    let _load = heavy();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("tune");
    let tune = |extra: &[&str]| {
        Command::new(bin())
            .args(["tune", "--source", "gen:16MiB", "--knob", "streams=1,2", "--min-runs", "2", "--max-runs", "2", "--json", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    // A budget that runs out: the first point's runs and no more.
    let o = tune(&["--budget", "0.001s"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(o.stdout.split(|&b| b == b'\n').rfind(|l| !l.is_empty()).unwrap()).unwrap();
    assert_eq!(j["outcome"]["budget_exhausted"], true, "{j}");
    let first = j["outcome"]["new_runs"].as_u64().unwrap();
    // Without --resume the CSV is not overwritten.
    let o = tune(&["--budget", "5m"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--resume"));
    let o = tune(&["--budget", "5m", "--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(o.stdout.split(|&b| b == b'\n').rfind(|l| !l.is_empty()).unwrap()).unwrap();
    let outcome = &j["outcome"];
    // Three points (defaults, streams=1, streams=2), two runs each: the first run's are kept.
    assert_eq!(outcome["points"].as_array().unwrap().len(), 3, "{j}");
    assert_eq!(outcome["new_runs"].as_u64().unwrap() + first, 6, "{j}");
    let csv = std::fs::read_to_string(out.join("runs.csv")).unwrap();
    assert!(csv.starts_with("point,run,goodput_gbps,cpu_s_per_gb,rtt_ms,wall_s,bytes\n"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + 6, "{csv}");
    let img = image::open(out.join("streams.png")).unwrap_or_else(|e| panic!("streams.png: {e}"));
    assert!(img.width() > 400 && img.height() > 200);
    assert!(std::fs::read_to_string(out.join("streams.svg")).unwrap().contains("<svg"));
    let toml = out.join("recommended.toml");
    assert!(std::fs::read_to_string(&toml).unwrap().contains("[transfer]"));
    let c = Command::new(bin()).args(["config", "check"]).arg(&toml).output().unwrap();
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
}

/// A --trace-out CSV becomes a plot (an image), its columns found by name.
#[test]
fn a_trace_becomes_a_plot() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let port = free_port();
    let _rx = discarding(&key, port, &["--once"]);
    let trace = d.path().join("t.csv");
    let o = Command::new(bin())
        .args(["send", "gen:256MiB", "--to", &format!("127.0.0.1:{port}"), "--mode", "internet", "--key-file"])
        .arg(&key)
        .arg("--trace-out")
        .arg(&trace)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Columns in another order are still found by their names.
    let text = std::fs::read_to_string(&trace).unwrap();
    let mut lines = text.lines().map(|l| l.split(',').rev().collect::<Vec<_>>().join(","));
    let reversed: String = lines.by_ref().map(|l| l + "\n").collect();
    std::fs::write(d.path().join("r.csv"), reversed).unwrap();
    for csv in ["t.csv", "r.csv"] {
        let o = Command::new(bin()).arg("plot-trace").arg(d.path().join(csv)).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let img = image::open(d.path().join(csv).with_extension("png")).unwrap();
        assert!(img.height() >= 600, "at least goodput, RTT and streams: {}", img.height());
    }
    let o = Command::new(bin()).arg("plot-trace").arg(d.path().join("nothing.csv")).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("nothing.csv"));
}

/// A daemon killed (SIGKILL) while a job runs: the receiver publishes nothing of it; the daemon
/// started again takes the job up from its record under the same id and resumes it, sending
/// only what the receiver does not hold, and the object is verified whole. A job that cannot
/// resume (HDE) ends failed with the reason instead.
#[test]
fn a_daemon_restarted_mid_job_resumes_it_and_never_half_publishes() {
    let _load = heavy();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let (port, api, rx_port) = (free_port(), free_port(), free_port());
    let sock = d.path().join("api.sock");
    let cfg = daemon_config(d.path(), &key, port, api, Some(&sock));
    let start = || {
        let dm = Rx(Command::new(bin()).args(["daemon", "--config"]).arg(&cfg).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
        wait_daemon(api, &sock);
        dm
    };
    let out = d.path().join("received");
    std::fs::create_dir(&out).unwrap();
    let _rx = spawn_recv(&key, rx_port, &["--out", out.to_str().unwrap()], &[], true);
    let list = || -> Vec<serde_json::Value> {
        let o = Command::new(bin()).args(["job", "list", "--json", "--socket"]).arg(&sock).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&o.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
    };
    let until = |name: &str, what: &str, f: &dyn Fn(&serde_json::Value) -> bool| -> serde_json::Value {
        let t = Instant::now();
        loop {
            if let Some(j) = list().into_iter().find(|j| j["name"] == name && f(j)) {
                return j;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "{name} never {what}: {:?}", list());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let mut dm = start();
    let to = format!("127.0.0.1:{rx_port}");
    let submit = |src: &str, name: &str, extra: &[&str]| {
        Rx(Command::new(bin())
            .args(["send", src, "--name", name, "--to", &to, "--streams", "1", "--json"])
            .args(extra)
            .arg("--via-daemon")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap())
    };
    let _big = submit("gen:6GiB:5", "big.img", &[]);
    let _hde = submit("gen:4GiB:6", "paged.img", &["--hde", "on"]);
    let running = until("big.img", "ran", &|j| j["state"] == "running" && j["acked_bytes"].as_u64().unwrap_or(0) > 64 << 20);
    until("paged.img", "ran", &|j| j["state"] == "running");
    assert!(running["acked_bytes"].as_u64().unwrap() < 3 << 30, "killed in its first half: {running}");
    dm.0.kill().unwrap();
    dm.0.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!out.join("big.img").exists() && !out.join("paged.img").exists(), "nothing published by a killed sender");

    let _dm = start();
    let j = until("big.img", "ended", &|j| !matches!(j["state"].as_str(), Some("starting" | "running")));
    assert_eq!(j["state"], "verified", "{j}");
    assert_eq!(j["id"], running["id"], "taken up under its id: {j}");
    assert_eq!(j["restarts"], 1, "{j}");
    let skipped = j["result"]["skipped"].as_u64().unwrap();
    assert!((64 << 20..6 << 30).contains(&skipped), "resumed from what the receiver held, not from zero: {j}");
    assert_eq!(std::fs::metadata(out.join("big.img")).unwrap().len(), 6 << 30);
    let p = until("paged.img", "ended", &|j| j["state"] != "running" && j["state"] != "starting");
    assert_eq!(p["state"], "failed", "{p}");
    assert!(p["result"]["error"].as_str().unwrap().contains("an HDE transfer cannot resume"), "{p}");
    assert!(!out.join("paged.img").exists());
    let text = String::from_utf8(Command::new(bin()).args(["job", "list", "--socket"]).arg(&sock).output().unwrap().stdout).unwrap();
    assert!(text.contains("taken up again after 1 daemon restart"), "{text}");
    let records: Vec<_> = std::fs::read_dir(d.path().join("jobs")).unwrap().flatten().map(|e| e.file_name()).filter(|n| n.to_string_lossy().ends_with(".json")).collect();
    assert!(records.is_empty(), "ended jobs leave no record: {records:?}");
    // Ids go on from the last one recorded, not from 1 again.
    let o = Command::new(bin()).args(["send", "gen:1MiB", "--name", "after.img", "--to", &to, "--json", "--via-daemon"]).arg(&sock).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = list().into_iter().find(|j| j["name"] == "after.img").unwrap();
    assert!(after["id"].as_u64() > p["id"].as_u64().max(j["id"].as_u64()), "{after}");
}

/// `GET /status` of the daemon whose API listens on `api`.
fn daemon_status(api: u16) -> serde_json::Value {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", api)).unwrap();
    write!(s, "GET /status HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    serde_json::from_str(out.split_once("\r\n\r\n").map_or("", |x| x.1)).unwrap()
}

/// Local ports of the established TCP connections to `port` on loopback (`ss`).
fn connections_to(port: u16) -> Vec<u16> {
    let o = Command::new("ss").args(["-Htn", "state", "established", &format!("dst = 127.0.0.1:{port}")]).output().unwrap();
    let mut v: Vec<u16> = String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.split_whitespace().nth(2)?.rsplit_once(':')?.1.parse().ok()).collect();
    v.sort();
    v
}

/// Warm peers: the daemon keeps streams parked at a configured peer's receiver (as many as a cold
/// send would open on the path: two on loopback here); a job to it runs on them (no probe, no new
/// connection: the same connections before and after two jobs) and says so; once the peer's
/// receiver restarts, the next job finds the streams closed and connects anew, and the pool
/// fills again with new ones, which the job after uses.
#[test]
fn jobs_to_a_configured_peer_run_on_its_warm_streams() {
    let _load = heavy();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let (port, api, rx_port) = (free_port(), free_port(), free_port());
    let sock = d.path().join("api.sock");
    let cfg = daemon_config(d.path(), &key, port, api, Some(&sock));
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!("[[peers]]\nname = \"rx\"\naddr = \"127.0.0.1:{rx_port}\"\n"));
    std::fs::write(&cfg, text).unwrap();
    let out = d.path().join("received");
    std::fs::create_dir(&out).unwrap();
    let mut rx = spawn_recv(&key, rx_port, &["--out", out.to_str().unwrap()], &[], true);
    let _dm = Rx(Command::new(bin()).args(["daemon", "--config"]).arg(&cfg).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    wait_daemon(api, &sock);
    let pool_ready = |what: &str| {
        let t = Instant::now();
        loop {
            let st = daemon_status(api);
            let p = &st["warm_peers"][0];
            if p["parked"].as_u64().is_some_and(|n| n >= 2) && p["parked"] == p["want"] && !p["rtt_ms"].is_null() && p["lent"] == false {
                return p.clone();
            }
            assert!(t.elapsed() < Duration::from_secs(30), "the warm pool never filled {what}: {st}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let p = pool_ready("at start");
    assert_eq!(p["name"], "rx", "{p}");
    let n = p["want"].as_u64().unwrap() as usize;
    let before = connections_to(rx_port);
    assert_eq!(before.len(), n, "the warm streams: {before:?}");
    let job = |name: &str| -> serde_json::Value {
        let o = Command::new(bin()).args(["send", "gen:32MiB:3", "--name", name, "--to", &format!("127.0.0.1:{rx_port}"), "--json", "--via-daemon"]).arg(&sock).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    for name in ["w1.img", "w2.img"] {
        let j = job(name);
        assert!(j["result"]["warm"].as_str().is_some_and(|w| w.contains(&format!("{n} parked streams"))), "{j}");
        assert_eq!(j["result"]["streams"], n, "{j}");
        assert_eq!(std::fs::metadata(out.join(name)).unwrap().len(), 32 << 20);
        pool_ready("after a job");
    }
    assert_eq!(connections_to(rx_port), before, "the same connections carried both jobs and nothing else connected");
    let text = String::from_utf8(Command::new(bin()).args(["job", "list", "--socket"]).arg(&sock).output().unwrap().stdout).unwrap();
    assert!(text.contains(&format!("warm: {n} parked streams")), "{text}");

    // Two jobs asked for at the same moment, a copy first and then one with a deadline: the one
    // due draws the warm streams, whichever request arrived first; the copy connects anew and
    // says why.
    let post = |body: String| -> u64 {
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        write!(c, "POST /transfers HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut r = String::new();
        c.read_to_string(&mut r).unwrap();
        let v: serde_json::Value = serde_json::from_str(r.split_once("\r\n\r\n").map_or("", |x| x.1)).unwrap();
        v["id"].as_u64().unwrap_or_else(|| panic!("{r}"))
    };
    let to = format!("127.0.0.1:{rx_port}");
    let copy = post(format!(r#"{{"to": "{to}", "source": "gen:32MiB:4", "name": "copy.img"}}"#));
    let due = post(format!(r#"{{"to": "{to}", "source": "gen:32MiB:5", "name": "due.img", "deadline_s": 60}}"#));
    let ended = |id: u64| -> serde_json::Value {
        let o = Command::new(bin()).args(["job", "watch", &id.to_string(), "--json", "--socket"]).arg(&sock).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let (c, u) = (ended(copy), ended(due));
    assert!(u["warm"].as_str().is_some_and(|w| w.contains("parked streams")), "the job due drew the warm streams: {u}");
    assert!(c["warm"].as_str().is_some_and(|w| w.contains(&format!("job {due}"))), "the copy says which job drew them: {c}");
    pool_ready("after the draw");

    // The peer's receiver restarts: its streams are closed; the next job connects anew.
    let _ = rx.0.kill();
    let _ = rx.0.wait();
    rx = spawn_recv(&key, rx_port, &["--out", out.to_str().unwrap()], &[], true);
    std::thread::sleep(Duration::from_millis(300));
    let j = job("cold.img");
    assert!(j["result"]["warm"].as_str().is_some_and(|w| w.starts_with("not lent")), "the closed streams were not lent: {j}");
    let p = pool_ready("after the peer restarted");
    let again = connections_to(rx_port);
    assert_eq!(again.len(), n, "{again:?}");
    assert!(again.iter().all(|c| !before.contains(c)), "new connections: {again:?} (before {before:?})");
    let j = job("w3.img");
    assert!(j["result"]["warm"].as_str().is_some_and(|w| w.contains(&format!("{n} parked streams"))), "{j} {p}");
    drop(rx);
}

/// A daemon of a three-member fleet on loopback ([`fleet_of_three`]).
struct FleetNode {
    cfg: PathBuf,
    api: u16,
    sock: PathBuf,
}

impl FleetNode {
    /// Starts it and waits for its sockets.
    fn start(&self) -> Rx {
        // A SIGKILLed daemon leaves its socket file: waiting for the file is waiting for the new one.
        let _ = std::fs::remove_file(&self.sock);
        let dm = Rx(Command::new(bin()).args(["daemon", "--config"]).arg(&self.cfg).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
        wait_daemon(self.api, &self.sock);
        dm
    }
    /// `dwcp fleet ARGS` against it.
    fn fleet(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin()).arg("fleet").args(args).arg("--socket").arg(&self.sock).output().unwrap()
    }
    /// `dwcp fleet status --json`.
    fn view(&self) -> serde_json::Value {
        serde_json::from_slice(&self.fleet(&["status", "--json"]).stdout).unwrap_or_default()
    }
}

/// Configs for three daemons in `dir` forming one fleet (`[fleet]` with `fleet_extra` added),
/// `extra(i)` appended to member i's (from 0).
fn fleet_of_three(dir: &Path, key: &Path, fleet_extra: &str, extra: impl Fn(usize) -> String) -> Vec<FleetNode> {
    let fleet_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let members: Vec<String> = fleet_ports.iter().enumerate().map(|(i, p)| format!("{{ id = {}, addr = \"127.0.0.1:{p}\" }}", i + 1)).collect();
    (0..3)
        .map(|i| {
            let d = dir.join(format!("n{}", i + 1));
            std::fs::create_dir(&d).unwrap();
            let (api, sock) = (free_port(), d.join("api.sock"));
            let cfg = daemon_config(&d, key, free_port(), api, Some(&sock));
            let mut t = std::fs::read_to_string(&cfg).unwrap();
            t.push_str(&format!(
                "[fleet]\nid = {}\nlisten = \"127.0.0.1:{}\"\nmembers = [{}]\nheartbeat_ms = 50\ncommit_timeout_s = 3\n{fleet_extra}",
                i + 1,
                fleet_ports[i],
                members.join(", ")
            ));
            t.push_str(&extra(i));
            std::fs::write(&cfg, t).unwrap();
            FleetNode { cfg, api, sock }
        })
        .collect()
}

/// ASS on three daemons (one process each, loopback): the group forms from `[fleet]`, `dwcp
/// fleet` claims a VM and moves it by compare-and-set, the leader is SIGKILLed and the other
/// two go on, it returns and catches up from its store, and a lone survivor cannot move a VM.
#[test]
fn three_daemons_form_a_fleet_that_survives_its_leader_and_refuses_a_minority() {
    let _load = light();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let gossip_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let nodes = fleet_of_three(d.path(), &key, "", |i| {
        format!("[gossip]\nlisten = \"127.0.0.1:{}\"\nseeds = [\"127.0.0.1:{}\"]\nsite = \"lab\"\nperiod_ms = 200\nsize = 3\n", gossip_ports[i], gossip_ports[0])
    });
    let start = FleetNode::start;
    let fleet = FleetNode::fleet;
    let view = FleetNode::view;
    // A leader all of `live` agree on, other than `not` (one killed, still remembered a moment).
    let leader_of = |live: &[&FleetNode], not: u64| -> u64 {
        let t = Instant::now();
        loop {
            let ls: Vec<Option<u64>> = live.iter().map(|n| view(n)["status"]["leader"].as_u64()).collect();
            if let Some(Some(l)) = ls.first()
                && *l != not
                && ls.iter().all(|x| *x == Some(*l))
            {
                return *l;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no agreed leader: {ls:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut procs: Vec<Option<Rx>> = nodes.iter().map(|n| Some(start(n))).collect();
    let l = leader_of(&nodes.iter().collect::<Vec<_>>(), 0);

    // A claim on node 1, read back (linearizably) on node 3; a person's status names the leader.
    let o = fleet(&nodes[0], &["claim", "web1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "web1: node 1 (epoch 1)");
    let o = fleet(&nodes[2], &["owner", "web1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["owner"]["node"].as_u64(), v["owner"]["epoch"].as_u64()), (Some(1), Some(1)), "{v}");
    // The gossip between the same daemons converges too (every node alive, every card held).
    let t = Instant::now();
    while !nodes.iter().all(|n| view(n)["gossip"]["alive"] == 3 && view(n)["gossip"]["cards"].as_array().map_or(0, Vec::len) == 3) {
        assert!(t.elapsed() < Duration::from_secs(20), "gossip never converged: {}", view(&nodes[1])["gossip"]);
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = String::from_utf8_lossy(&fleet(&nodes[1], &["status"]).stdout).into_owned();
    assert!(text.contains(&format!("leader node {l}")) && text.contains("web1") && text.contains("voter"), "{text}");
    assert!(text.contains("gossip: node 2, 3 alive of 3 known") && text.contains("(this node)"), "{text}");
    // Every member reported its capabilities; /status and /metrics carry the fleet.
    let t = Instant::now();
    while view(&nodes[1])["nodes"].as_object().map_or(0, |m| m.len()) < 3 {
        assert!(t.elapsed() < Duration::from_secs(20), "capabilities missing: {}", view(&nodes[1]));
        std::thread::sleep(Duration::from_millis(50));
    }
    let get = |port: u16, path: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(get(nodes[1].api, "/status").contains(&format!("\"leader\":{l}")));
    assert!(get(nodes[1].api, "/metrics").contains(&format!("dwcp_fleet_leader {l}")));

    // The leader is killed: the other two elect one and move the VM; a stale handoff is refused.
    drop(procs[l as usize - 1].take());
    let rest: Vec<&FleetNode> = (0..3).filter(|i| *i != l as usize - 1).map(|i| &nodes[i]).collect();
    let _ = leader_of(&rest, l);
    let o = fleet(rest[0], &["handoff", "web1", "--from", "1", "--to", "2", "--epoch", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = fleet(rest[1], &["handoff", "web1", "--from", "1", "--to", "3", "--epoch", "1"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("owned by node 2 at epoch 2"), "{}", String::from_utf8_lossy(&o.stderr));

    // It comes back and catches up from its own store.
    procs[l as usize - 1] = Some(start(&nodes[l as usize - 1]));
    let o = fleet(&nodes[l as usize - 1], &["owner", "web1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["owner"]["node"].as_u64(), v["owner"]["epoch"].as_u64()), (Some(2), Some(2)), "{v}");

    // Two of three gone: the survivor can neither move the VM nor vouch for its owner.
    let survivor = if l == 1 { 1 } else { 0 };
    for i in (0..3).filter(|i| *i != survivor) {
        drop(procs[i].take());
    }
    let o = fleet(&nodes[survivor], &["handoff", "web1", "--from", "2", "--to", "1", "--epoch", "2"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not committed") && err.contains("may still commit"), "{err}");
    assert!(!fleet(&nodes[survivor], &["owner", "web1"]).status.success());
}

/// ASS item 4: a job whose daemon dies is taken over by another member of the fleet, from the
/// replicated record: the resumable one resumes there and is verified whole; the one that cannot
/// resume (HDE) ends in the record with why; nothing half-published, no record left behind.
#[test]
fn a_job_whose_daemon_dies_is_taken_over_by_another_member_and_verified() {
    let _load = heavy();
    let d = tempfile::tempdir().unwrap();
    let key = keygen(d.path());
    let nodes = fleet_of_three(d.path(), &key, "takeover_after_s = 2\n", |_| String::new());
    let mut procs: Vec<Option<Rx>> = nodes.iter().map(|n| Some(n.start())).collect();
    let view = |i: usize| nodes[i].view();
    let list = |i: usize| -> Vec<serde_json::Value> {
        let o = Command::new(bin()).args(["job", "list", "--json", "--socket"]).arg(&nodes[i].sock).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&o.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
    };
    let t = Instant::now();
    while view(1)["status"]["leader"].is_null() {
        assert!(t.elapsed() < Duration::from_secs(20), "no leader");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (rx_port, out) = (free_port(), d.path().join("received"));
    std::fs::create_dir(&out).unwrap();
    let _rx = spawn_recv(&key, rx_port, &["--out", out.to_str().unwrap()], &[], true);
    let to = format!("127.0.0.1:{rx_port}");
    let submit = |src: &str, name: &str, extra: &[&str]| {
        Rx(Command::new(bin())
            .args(["send", src, "--name", name, "--to", &to, "--streams", "1", "--json"])
            .args(extra)
            .arg("--via-daemon")
            .arg(&nodes[0].sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap())
    };
    let _big = submit("gen:4GiB:11", "big.img", &[]);
    let _hde = submit("gen:2GiB:12", "paged.img", &["--hde", "on"]);
    let t = Instant::now();
    let running = loop {
        let l = list(0);
        if let Some(j) = l.iter().find(|j| j["name"] == "big.img" && j["acked_bytes"].as_u64().unwrap_or(0) > 64 << 20)
            && l.iter().any(|j| j["name"] == "paged.img" && j["state"] == "running")
        {
            break j.clone();
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the jobs never ran: {l:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(running["acked_bytes"].as_u64().unwrap() < 2 << 30, "killed in its first half: {running}");
    // Both jobs are in the replicated record, under node 1.
    let t = Instant::now();
    while view(2)["jobs"].as_u64().unwrap_or(0) < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "the jobs never reached the fleet's record: {}", view(2));
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(procs[0].take());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!out.join("big.img").exists() && !out.join("paged.img").exists(), "nothing published by a killed sender");

    // Another member takes the big one over and it is verified whole; the HDE one ends with why.
    let t = Instant::now();
    let (taker, j) = loop {
        if let Some(f) = (1..3).find_map(|i| list(i).into_iter().find(|j| j["name"] == "big.img" && !matches!(j["state"].as_str(), Some("starting" | "running"))).map(|j| (i, j))) {
            break f;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no member took the job over: {}", view(1));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(j["state"], "verified", "node {}: {j}", taker + 1);
    let skipped = j["result"]["skipped"].as_u64().unwrap();
    assert!((64 << 20..4 << 30).contains(&skipped), "resumed from what the receiver held, not from zero: {j}");
    assert_eq!(std::fs::metadata(out.join("big.img")).unwrap().len(), 4 << 30);
    assert!(!out.join("paged.img").exists());
    let t = Instant::now();
    let ended = loop {
        let v = view(1);
        let e = v["ended"].as_array().cloned().unwrap_or_default();
        if v["jobs"] == 0 && e.iter().filter(|o| o[0].as_str().is_some_and(|k| k.starts_with("1/"))).count() == 2 {
            break e;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "records left or outcomes missing: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let outcome = |k: &str| ended.iter().find(|o| o[0] == k).map(|o| o[1].as_str().unwrap_or("").to_owned()).unwrap_or_default();
    let big = format!("1/{}", running["id"]);
    assert!(outcome(&big).contains(&format!("taken over by node {}", taker + 1)), "{ended:?}");
    let hde = ended.iter().find(|o| o[0].as_str().is_some_and(|k| k.starts_with("1/")) && o[0] != big.as_str()).unwrap();
    assert!(hde[1].as_str().unwrap().contains("cannot take it over") && hde[1].as_str().unwrap().contains("HDE"), "{ended:?}");
}
