//! The fleet over real links: three daemons, each in its own namespace of the WAN rig's mesh
//! (`hw-tests/wan mesh 3`, 10 ms between any two), Raft and gossip between them. The leader's
//! link is cut (`ip link set wan0 down` in its namespace, a real partition): the majority elects
//! another leader and moves a VM; the cut-off node can neither move it nor vouch for its owner;
//! its gossip sees the others down and theirs sees it down. Healed, it follows the majority's
//! state and every gossip view is whole again.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Mesh(PathBuf);
impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = Command::new(self.0.join("hw-tests/wan")).arg("mesh-down").status();
    }
}

struct Daemon {
    sock: PathBuf,
    child: Child,
}
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn http(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.sock) else { return (0, Value::Null) };
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let _ = write!(s, "{method} {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, out.split_once("\r\n\r\n").and_then(|(_, b)| serde_json::from_str(b).ok()).unwrap_or(Value::Null))
    }
    fn view(&self) -> Value {
        self.http("GET", "/fleet", "").1
    }
}

fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "{what} not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn link(ns: &str, up: bool) {
    assert!(Command::new("ip").args(["-n", ns, "link", "set", "wan0", if up { "up" } else { "down" }]).status().unwrap().success());
}

#[test]
fn a_partitioned_leader_cannot_move_a_vm_and_follows_the_majority_once_healed() {
    let uid = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(String::from_utf8_lossy(&uid.stdout).trim(), "0", "the mesh rig needs root");
    let root = hw_tests::root();
    let dwcp = root.join("target/release/dwcp");
    assert!(dwcp.exists(), "{} missing: cargo build --release -p dwcp", dwcp.display());
    let up = Command::new(root.join("hw-tests/wan")).args(["mesh", "3", "--rtt", "10ms", "--rate", "1gbit"]).output().unwrap();
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let _mesh = Mesh(root.clone());
    let dir = std::env::temp_dir().join(format!("dwcp-fleet-rig-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key");
    assert!(Command::new(&dwcp).args(["keygen", "--force"]).arg(&key).stderr(Stdio::null()).status().unwrap().success());
    let members = "[{ id = 1, addr = \"10.78.0.1:7472\" }, { id = 2, addr = \"10.78.0.2:7472\" }, { id = 3, addr = \"10.78.0.3:7472\" }]";
    let ds: Vec<Daemon> = (1..=3)
        .map(|i| {
            let d = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let (cfg, sock) = (d.join("dwcp.toml"), d.join("api.sock"));
            std::fs::write(
                &cfg,
                format!(
                    "[node]\nname = \"n{i}\"\nlisten = \"10.78.0.{i}:7470\"\nout = \"{}\"\nkey_file = \"{}\"\n[api]\nlisten = \"127.0.0.1:7471\"\nsocket = \"{}\"\n\
                     [fleet]\nid = {i}\nlisten = \"10.78.0.{i}:7472\"\nmembers = {members}\nheartbeat_ms = 50\ncommit_timeout_s = 2\n\
                     [gossip]\nlisten = \"10.78.0.{i}:7473\"\nseeds = [\"10.78.0.1:7473\", \"10.78.0.2:7473\"]\nsite = \"s{i}\"\nperiod_ms = 300\nsize = 3\n",
                    d.join("out").display(),
                    key.display(),
                    sock.display()
                ),
            )
            .unwrap();
            let child = Command::new("ip")
                .args(["netns", "exec", &format!("dwcp-m{i}")])
                .arg(&dwcp)
                .args(["daemon", "--config"])
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let dm = Daemon { sock: sock.clone(), child };
            until(&format!("daemon {i}'s socket"), Duration::from_secs(20), || sock.exists());
            dm
        })
        .collect();
    let leader = |ds: &[&Daemon], not: u64| -> u64 {
        let mut l = 0;
        until("an agreed leader", Duration::from_secs(30), || {
            let ls: Vec<Option<u64>> = ds.iter().map(|d| d.view()["status"]["leader"].as_u64()).collect();
            match ls.first() {
                Some(Some(x)) if *x != not && ls.iter().all(|y| *y == Some(*x)) => {
                    l = *x;
                    true
                }
                _ => false,
            }
        });
        l
    };
    let all: Vec<&Daemon> = ds.iter().collect();
    let l = leader(&all, 0);
    until("gossip among all three", Duration::from_secs(30), || ds.iter().all(|d| d.view()["gossip"]["alive"] == 3));
    let (code, v) = ds[0].http("POST", "/fleet/vms/vm1/claim", "{}");
    assert_eq!(code, 200, "{v}");

    // The leader's link goes down.
    let cut = &ds[l as usize - 1];
    link(&format!("dwcp-m{l}"), false);
    let rest: Vec<&Daemon> = (1..=3u64).filter(|i| *i != l).map(|i| &ds[i as usize - 1]).collect();
    let l2 = leader(&rest, l);
    let other = (1..=3u64).find(|i| *i != l && *i != 1).unwrap_or(if l == 2 { 3 } else { 2 });
    let to = if l2 == 1 { other } else { l2 };
    let (code, v) = rest[0].http("POST", "/fleet/vms/vm1/handoff", &format!("{{\"from\": 1, \"to\": {to}, \"epoch\": 1}}"));
    assert_eq!(code, 200, "the majority moves the VM: {v}");
    let (code, v) = cut.http("POST", "/fleet/vms/vm1/handoff", &format!("{{\"from\": 1, \"to\": {l}, \"epoch\": 1}}"));
    assert_eq!(code, 503, "the cut-off node moved the VM: {v}");
    assert_eq!(v["unknown_outcome"], true, "{v}");
    let (code, v) = cut.http("GET", "/fleet/vms/vm1", "");
    assert_eq!(code, 503, "the cut-off node vouched for an owner: {v}");
    until("gossip on both sides of the cut", Duration::from_secs(60), || cut.view()["gossip"]["alive"] == 1 && rest.iter().all(|d| d.view()["gossip"]["alive"] == 2));

    // Healed: the old leader follows the majority, and the gossip views are whole again.
    link(&format!("dwcp-m{l}"), true);
    let l3 = leader(&all, 0);
    let (code, v) = cut.http("GET", "/fleet/vms/vm1", "");
    assert_eq!(code, 200, "{v}");
    assert_eq!((v["owner"]["node"].as_u64(), v["owner"]["epoch"].as_u64()), (Some(to), Some(2)), "the majority's handoff, and no other: {v}");
    until("gossip among all three again", Duration::from_secs(60), || ds.iter().all(|d| d.view()["gossip"]["alive"] == 3));
    eprintln!("partitioned leader node {l}; the majority elected node {l2} and moved vm1 to node {to}; healed, node {l3} leads and all agree");
    drop(ds);
    let _ = std::fs::remove_dir_all(&dir);
}
