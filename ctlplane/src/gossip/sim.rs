//! Deterministic simulations of the gossip protocol: several [`Gossip`] nodes, a simulated
//! clock and a network with seeded loss and delay, nodes killed and restarted. No sockets,
//! no sleeping: minutes of gossip run in milliseconds, the same every time for a seed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::{Card, Gossip, Id, Out, config};

const PERIOD: Duration = Duration::from_secs(1);

struct Net {
    now: Instant,
    nodes: Vec<Option<Gossip>>,
    /// In flight: (deliver at, sequence) -> (to, bytes).
    wire: BTreeMap<(Instant, u64), (SocketAddr, Vec<u8>)>,
    seq: u64,
    rng: StdRng,
    loss: f64,
    delay: (Duration, Duration),
    version: u64,
}

fn addr(i: usize) -> SocketAddr {
    format!("10.0.0.{}:7473", i + 1).parse().unwrap()
}

fn card(i: usize, version: u64) -> Card {
    Card { node: i as u64 + 1, name: format!("n{}", i + 1), site: format!("site{}", i % 2), version, cores: 2, rdma: false, free_bytes: 1 << 30, links: Vec::new() }
}

impl Net {
    fn new(n: usize, seed: u64, loss: f64) -> Self {
        let t0 = Instant::now();
        let mut net = Self {
            now: t0,
            nodes: Vec::new(),
            wire: BTreeMap::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(seed),
            loss,
            delay: (Duration::from_millis(20), Duration::from_millis(80)),
            version: 1,
        };
        for i in 0..n {
            net.start(i, seed);
        }
        net
    }

    fn start(&mut self, i: usize, seed: u64) {
        let mut g = Gossip::new(Id { addr: addr(i), node: i as u64 + 1, bump: 0 }, config(8, PERIOD), seed.wrapping_mul(31).wrapping_add(i as u64));
        self.version += 1;
        g.publish(&card(i, self.version), self.now).unwrap();
        // Every node's seeds: node 1 and node 2 (as a deployment lists a few).
        g.set_seeds(vec![addr(0), addr(1)]);
        let out = Out::default();
        if self.nodes.len() <= i {
            self.nodes.resize_with(i + 1, || None);
        }
        self.nodes[i] = Some(g);
        self.emit(out);
    }

    fn emit(&mut self, out: Out) {
        for (to, data) in out.send {
            // With DWCP_GOSSIP_SEEDS=DIR, the first packets are written there as fuzz seeds.
            if let Ok(d) = std::env::var("DWCP_GOSSIP_SEEDS")
                && self.seq < 24
            {
                let _ = std::fs::write(std::path::Path::new(&d).join(format!("pkt{}", self.seq)), &data);
            }
            if self.rng.random::<f64>() < self.loss {
                continue;
            }
            let d = self.delay.0 + (self.delay.1 - self.delay.0).mul_f64(self.rng.random::<f64>());
            self.seq += 1;
            self.wire.insert((self.now + d, self.seq), (to, data));
        }
    }

    /// Runs the simulation for `d` of simulated time.
    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let next_timer = self.nodes.iter().flatten().filter_map(Gossip::next_timer).min().map(|t| t.max(self.now));
            let next_pkt = self.wire.keys().next().map(|k| k.0);
            let Some(next) = [next_timer, next_pkt].into_iter().flatten().min() else { break };
            if next > end {
                break;
            }
            self.now = self.now.max(next);
            while let Some(e) = self.wire.first_entry() {
                if e.key().0 > self.now {
                    break;
                }
                let (to, data) = e.remove();
                let i = (0..self.nodes.len()).find(|i| addr(*i) == to);
                if let Some(g) = i.and_then(|i| self.nodes[i].as_mut()) {
                    let out = g.handle(&data, self.now);
                    self.emit(out);
                }
            }
            for i in 0..self.nodes.len() {
                if let Some(g) = self.nodes[i].as_mut() {
                    let out = g.tick(self.now);
                    self.emit(out);
                }
            }
        }
        self.now = end;
    }

    /// Node `i`'s view of which nodes are alive (itself included).
    fn alive_seen_by(&self, i: usize) -> Vec<u64> {
        let v = self.nodes[i].as_ref().unwrap().view(self.now);
        let mut a: Vec<u64> = v.members.iter().filter(|m| m.state != "down").map(|m| m.node).chain([v.me]).collect();
        a.sort();
        a.dedup();
        a
    }

    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_some()).collect()
    }

    /// Simulated seconds until every live node sees exactly the live nodes alive (None within `max`).
    fn converge(&mut self, max: Duration) -> Option<f64> {
        let start = self.now;
        let want: Vec<u64> = self.live().iter().map(|i| *i as u64 + 1).collect();
        while self.now - start < max {
            if self.live().iter().all(|i| self.alive_seen_by(*i) == want) {
                return Some((self.now - start).as_secs_f64());
            }
            self.run(Duration::from_millis(100));
        }
        None
    }
}

#[test]
fn five_nodes_converge_and_see_a_killed_one_down_and_back() {
    let mut net = Net::new(5, 7, 0.0);
    let t = net.converge(Duration::from_secs(60)).expect("five nodes never converged");
    assert!(t < 15.0, "converged only after {t} s");
    // Every node holds every card.
    net.run(Duration::from_secs(5));
    for i in 0..5 {
        assert_eq!(net.nodes[i].as_ref().unwrap().view(net.now).cards.len(), 5, "node {i}");
    }
    // Node 3 dies: the others declare it down.
    net.nodes[2] = None;
    let t = net.converge(Duration::from_secs(120)).expect("the dead node was never declared down");
    eprintln!("a dead node declared down by all in {t:.1} simulated s");
    // It restarts (a fresh process, same address): it rejoins and is alive to all.
    net.start(2, 99);
    let t = net.converge(Duration::from_secs(120)).expect("the restarted node never rejoined");
    eprintln!("the restarted node seen alive by all in {t:.1} simulated s");
}

#[test]
fn under_loss_every_seed_converges_and_no_live_node_stays_down() {
    let mut worst: f64 = 0.0;
    for seed in 0..40 {
        let mut net = Net::new(5, seed, 0.10);
        let t = net.converge(Duration::from_secs(180)).unwrap_or_else(|| panic!("seed {seed}: never converged with 10% loss"));
        worst = worst.max(t);
        // After convergence, a minute more of lossy gossip: views stay right at the end (a
        // suspicion raised by lost probes is refuted).
        net.run(Duration::from_secs(60));
        let t2 = net.converge(Duration::from_secs(60)).unwrap_or_else(|| panic!("seed {seed}: a live node stayed down"));
        worst = worst.max(t2);
    }
    eprintln!("with 10% loss, 40 seeds: worst convergence {worst:.1} simulated s");
}

#[test]
fn a_newer_card_replaces_the_older_everywhere_and_staleness_shows() {
    let mut net = Net::new(4, 3, 0.0);
    net.converge(Duration::from_secs(60)).unwrap();
    let mut c = card(1, 1_000_000);
    c.links.push(super::Link { peer: "n3".into(), rtt_ms: 150.0, bps: 2e8, mode: "internet".into() });
    let now = net.now;
    net.nodes[1].as_mut().unwrap().publish(&c, now).unwrap();
    net.run(Duration::from_secs(10));
    for i in 0..4 {
        let v = net.nodes[i].as_ref().unwrap().view(net.now);
        let got = super::cards_by_node(&v)[&2];
        assert_eq!(got.links, c.links, "node {i} holds the newer card");
    }
    // An older version arriving later does not replace it.
    let now = net.now;
    net.nodes[1].as_mut().unwrap().publish(&card(1, 5), now).unwrap();
    net.run(Duration::from_secs(10));
    let v = net.nodes[3].as_ref().unwrap().view(net.now);
    assert_eq!(super::cards_by_node(&v)[&2].version, 1_000_000);
    // Staleness: nothing newer from node 2 for 10 s shows as about 20 s.
    assert!(v.cards.iter().find(|c| c.card.node == 2).unwrap().heard_s >= 19.0, "{:?}", v.cards);
    assert!(v.stalest_s >= 19.0);
}

#[test]
fn bad_cards_are_refused_and_counted() {
    assert!(super::Card::decode(&[0xff; 10]).is_err());
    assert!(super::Card::decode(&vec![0u8; super::MAX_CARD + 1]).is_err());
    let mut c = card(0, 1);
    c.name = "x".repeat(super::MAX_NAME + 1);
    assert!(c.encode().is_err());
    let mut c = card(0, 1);
    c.links = (0..=super::MAX_LINKS).map(|i| super::Link { peer: format!("p{i}"), rtt_ms: 1.0, bps: 1.0, mode: "internet".into() }).collect();
    assert!(c.encode().is_err());
    let mut c = card(0, 1);
    c.links = vec![super::Link { peer: "p".into(), rtt_ms: f64::NAN, bps: 1.0, mode: "internet".into() }];
    assert!(c.encode().is_err());
}
