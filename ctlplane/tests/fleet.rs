//! The fleet's Raft group, several nodes in one process over real loopback TCP (Noise
//! handshakes, redb stores on disk): elections, commits forwarded to the leader, a leader
//! killed, a minority that must not commit, a node removed and replaced.

use std::time::{Duration, Instant};

use ctlplane::fleet::state::{Cmd, Job, Owner};
use ctlplane::fleet::{Fleet, FleetError, Member, Options};
use dataplane::crypto::Psk;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Rig {
    dir: tempfile::TempDir,
    psk: Psk,
    members: Vec<Member>,
}

impl Rig {
    fn new(n: u64) -> Self {
        let members = (1..=n).map(|id| Member { id, addr: format!("127.0.0.1:{}", free_port()) }).collect();
        Self { dir: tempfile::tempdir().unwrap(), psk: Psk::generate(), members }
    }

    fn opts(&self, id: u64, addr: &str, members: Vec<Member>) -> Options {
        Options {
            id,
            listen: addr.into(),
            dir: self.dir.path().join(id.to_string()),
            members,
            heartbeat: Duration::from_millis(50),
            commit_timeout: Duration::from_secs(3),
            snapshot_every: 20,
        }
    }

    fn start(&self, id: u64) -> Fleet {
        let m = self.members.iter().find(|m| m.id == id).unwrap();
        Fleet::start(self.opts(id, &m.addr, self.members.clone()), self.psk.clone()).unwrap()
    }

    fn start_all(&self) -> Vec<Fleet> {
        self.members.iter().map(|m| self.start(m.id)).collect()
    }
}

fn leader(nodes: &[&Fleet]) -> u64 {
    let t0 = Instant::now();
    loop {
        // A leader every live node agrees on.
        let ls: Vec<Option<u64>> = nodes.iter().map(|n| n.status().leader).collect();
        if let Some(Some(l)) = ls.first()
            && ls.iter().all(|x| *x == Some(*l))
            && nodes.iter().any(|n| n.id() == *l)
        {
            return *l;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no agreed leader: {ls:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn converge(nodes: &[&Fleet]) {
    let t0 = Instant::now();
    loop {
        let s: Vec<_> = nodes.iter().map(|n| n.local_state()).collect();
        if s.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "states never converged: {:?}", nodes.iter().map(|n| n.status()).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn job(node: u64, i: usize) -> Cmd {
    Cmd::PutJob { key: format!("{node}/{i}"), job: Job { node, record: format!("{{\"bytes\":{i}}}") } }
}

#[test]
fn three_nodes_elect_a_leader_and_ownership_moves_only_by_compare_and_set() {
    let rig = Rig::new(3);
    let n = rig.start_all();
    let all: Vec<&Fleet> = n.iter().collect();
    let l = leader(&all);
    let follower = n.iter().find(|f| f.id() != l).unwrap();
    // A follower's proposal is forwarded to the leader.
    assert_eq!(follower.claim("web1", follower.id()).unwrap(), 1);
    let e = n[0].handoff("web1", follower.id(), 3, 1).unwrap();
    assert_eq!(e, 2);
    // The same handoff again is stale: refused, and the state is unchanged.
    match n[1].handoff("web1", follower.id(), 1, 1) {
        Err(FleetError::Refused(w)) => assert!(w.contains("owned by node 3 at epoch 2"), "{w}"),
        r => panic!("a stale handoff gave {r:?}"),
    }
    for f in &n {
        assert_eq!(f.owner("web1").unwrap(), Some(Owner { node: 3, epoch: 2 }), "node {}", f.id());
    }
    converge(&all);
    let s = n[2].status();
    assert_eq!(s.voters.len(), 3);
    assert_eq!(s.vms, 1);
    for f in n {
        f.shutdown();
    }
}

#[test]
fn a_killed_leader_loses_no_committed_record_and_catches_up_when_it_returns() {
    let rig = Rig::new(3);
    let mut n: Vec<Option<Fleet>> = rig.start_all().into_iter().map(Some).collect();
    let l = leader(&n.iter().flatten().collect::<Vec<_>>());
    for i in 0..30 {
        n[(i % 3) as usize].as_ref().unwrap().propose(job(1, i as usize)).unwrap();
    }
    n[l as usize - 1].take().unwrap().shutdown();
    let rest: Vec<&Fleet> = n.iter().flatten().collect();
    let l2 = leader(&rest);
    assert_ne!(l2, l, "a new leader is elected among the two left");
    for i in 30..60 {
        rest[i % 2].propose(job(1, i)).unwrap();
    }
    // Every record committed before and after the kill is there.
    converge(&rest);
    assert_eq!(rest[0].local_state().jobs.len(), 60);
    // The old leader restarts from its store and catches up (by log or snapshot).
    n[l as usize - 1] = Some(rig.start(l));
    let all: Vec<&Fleet> = n.iter().flatten().collect();
    converge(&all);
    assert_eq!(all.iter().find(|f| f.id() == l).unwrap().local_state().jobs.len(), 60);
    for f in n.into_iter().flatten() {
        f.shutdown();
    }
}

#[test]
fn a_node_cut_off_from_the_majority_cannot_hand_a_vm_off_nor_vouch_for_its_owner() {
    let rig = Rig::new(3);
    let mut n: Vec<Option<Fleet>> = rig.start_all().into_iter().map(Some).collect();
    let _ = leader(&n.iter().flatten().collect::<Vec<_>>());
    assert_eq!(n[0].as_ref().unwrap().claim("db1", 1).unwrap(), 1);
    // Nodes 2 and 3 go away: node 1 alone is a minority, leader or not.
    n[1].take().unwrap().shutdown();
    n[2].take().unwrap().shutdown();
    let lone = n[0].as_ref().unwrap();
    let t0 = Instant::now();
    match lone.handoff("db1", 1, 2, 1) {
        Err(FleetError::NotCommitted { .. }) => {}
        r => panic!("a minority committed a handoff: {r:?}"),
    }
    assert!(t0.elapsed() >= Duration::from_secs(2), "gave up before its timeout");
    match lone.owner("db1") {
        Err(FleetError::NotCommitted { .. }) => {}
        r => panic!("a minority vouched for an owner: {r:?}"),
    }
    // With node 2 back there is a quorum again: the VM has exactly one owner, either the old
    // one (the handoff never committed) or the new one at the next epoch (it committed late),
    // and both nodes say the same.
    n[1] = Some(rig.start(2));
    let both: Vec<&Fleet> = n.iter().flatten().collect();
    let _ = leader(&both);
    let o = both[0].owner("db1").unwrap().unwrap();
    assert!(o == Owner { node: 1, epoch: 1 } || o == Owner { node: 2, epoch: 2 }, "{o:?}");
    assert_eq!(both[1].owner("db1").unwrap().unwrap(), o);
    for f in n.into_iter().flatten() {
        f.shutdown();
    }
}

#[test]
fn a_node_is_removed_and_a_new_one_joins_from_a_snapshot() {
    let rig = Rig::new(3);
    let mut n: Vec<Option<Fleet>> = rig.start_all().into_iter().map(Some).collect();
    let l = leader(&n.iter().flatten().collect::<Vec<_>>());
    // Enough entries that the leader snapshots and purges the start of its log.
    for i in 0..100 {
        n[0].as_ref().unwrap().propose(job(2, i)).unwrap();
    }
    let gone = if l == 3 { 2 } else { 3 };
    // Asked of a follower, the change is done by the leader.
    n.iter().flatten().find(|f| f.id() != l && f.id() != gone).unwrap().remove(gone).unwrap();
    n[gone as usize - 1].take().unwrap().shutdown();
    let leader_node = n.iter().flatten().find(|f| f.id() == l).unwrap();
    // The leader's log no longer starts at 1: node 4 can only be brought up by a snapshot.
    let t0 = Instant::now();
    while leader_node.status().purged_index.unwrap_or(0) < 20 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the leader never purged: {:?}", leader_node.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(leader_node.status().voters.len(), 2);
    // Node 4 starts empty (no members of its own) and is added by the leader.
    let addr4 = format!("127.0.0.1:{}", free_port());
    let four = Fleet::start(rig.opts(4, &addr4, Vec::new()), rig.psk.clone()).unwrap();
    leader_node.add(4, &addr4).unwrap();
    let live: Vec<&Fleet> = n.iter().flatten().chain([&four]).collect();
    converge(&live);
    assert_eq!(four.local_state().jobs.len(), 100);
    assert!(four.status().snapshot_index.is_some(), "node 4 caught up without a snapshot: {:?}", four.status());
    let s = leader_node.status();
    assert_eq!(s.voters.keys().copied().collect::<Vec<_>>(), {
        let mut v: Vec<u64> = [1, 2, 3].into_iter().filter(|x| *x != gone).chain([4]).collect();
        v.sort();
        v
    });
    // The new group commits with node 4 as one of its three.
    four.propose(job(4, 0)).unwrap();
    for f in n.into_iter().flatten().chain([four]) {
        f.shutdown();
    }
}

#[test]
fn a_host_without_the_fleet_key_cannot_join_or_speak() {
    let rig = Rig::new(1);
    let one = rig.start(1);
    let _ = leader(&[&one]);
    // A node with another key, configured as a member, gets no vote and no log from node 1.
    let c = ctlplane::fleet::net::Client::new(9, 1, rig.members[0].addr.clone(), Psk::generate());
    let r = c.call(&ctlplane::fleet::net::Request::Write(job(9, 0)), Duration::from_secs(2));
    assert!(matches!(r, Err(ctlplane::fleet::net::CallError::Connect { .. }) | Err(ctlplane::fleet::net::CallError::Lost { .. })), "{r:?}");
    // With the key but addressed to another node id: refused before it is looked at.
    let c = ctlplane::fleet::net::Client::new(9, 7, rig.members[0].addr.clone(), rig.psk.clone());
    match c.call(&ctlplane::fleet::net::Request::Write(job(9, 0)), Duration::from_secs(2)) {
        Ok(ctlplane::fleet::net::Reply::Refused(w)) => assert!(w.contains("this is node 1, not node 7"), "{w}"),
        r => panic!("{r:?}"),
    }
    assert_eq!(one.local_state().jobs.len(), 0);
    one.shutdown();
}
