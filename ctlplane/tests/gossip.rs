//! The fleet's gossip on real UDP sockets (loopback): nodes join through a seed and converge,
//! every packet sealed with the fleet's key (a host without it is neither heard nor let in),
//! a stopped node is declared down by the others.

use std::time::{Duration, Instant};

use ctlplane::gossip::{Card, Handle, driver::Options, run};
use dataplane::crypto::Psk;

fn node(id: u64, seeds: Vec<String>, psk: &Psk) -> Handle {
    let card = move || Card {
        node: id,
        name: format!("n{id}"),
        site: "lab".into(),
        // The same card every time: its republication must still reach a node that missed it.
        version: 1,
        cores: 2,
        rdma: false,
        free_bytes: 1,
        links: Vec::new(),
    };
    let o = Options { node: id, listen: "127.0.0.1:0".into(), seeds, period: Duration::from_millis(200), size_hint: 4, card: Box::new(card) };
    run(o, psk).unwrap()
}

fn until(what: &str, within: Duration, f: impl Fn() -> bool) -> f64 {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "{what} not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed().as_secs_f64()
}

#[test]
fn nodes_join_through_a_seed_converge_and_see_a_stopped_one_down() {
    let psk = Psk::generate();
    let first = node(1, Vec::new(), &psk);
    let seed = vec![first.addr.to_string()];
    let mut others: Vec<Option<Handle>> = (2..=4).map(|i| Some(node(i, seed.clone(), &psk))).collect();
    // A host with another key, pointed at the same seed.
    let stranger = node(9, seed.clone(), &Psk::generate());
    let all = |o: &Vec<Option<Handle>>| -> Vec<ctlplane::gossip::View> { std::iter::once(first.view()).chain(o.iter().flatten().map(Handle::view)).collect() };
    let t0 = Instant::now();
    while !all(&others).iter().all(|v| v.alive == 4 && v.cards.len() == 4) {
        if t0.elapsed() > Duration::from_secs(20) {
            for v in all(&others) {
                eprintln!(
                    "node {}: alive {} cards {:?} members {:?}",
                    v.me,
                    v.alive,
                    v.cards.iter().map(|c| c.card.node).collect::<Vec<_>>(),
                    v.members.iter().map(|m| (m.node, m.state)).collect::<Vec<_>>()
                );
            }
            panic!("four nodes seeing each other and every card not within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = t0.elapsed().as_secs_f64();
    eprintln!("4 nodes converged in {t:.2} s (probe period 200 ms)");
    assert!(all(&others).iter().all(|v| v.members.iter().all(|m| m.node != 9)), "the stranger got in");
    assert!(first.view().dropped > 0, "the stranger's packets were not counted as dropped");
    assert_eq!(stranger.view().alive, 1, "the stranger heard nobody");
    // Node 3 stops: the others see it down.
    others[1] = None;
    let t = until("node 3 declared down", Duration::from_secs(30), || all(&others).iter().all(|v| v.members.iter().any(|m| m.node == 3 && m.state == "down") && v.alive == 3));
    eprintln!("a stopped node declared down by the other 3 in {t:.2} s");
}
