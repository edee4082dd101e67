//! ASS, internet mode: membership and failure detection between sites by SWIM gossip (foca),
//! each node's card (what it has, what its links measure) spread as a custom broadcast, the
//! staleness of every entry visible.
//!
//! - [`Gossip`] is the protocol, free of I/O: datagrams and timer expiries in, with the time
//!   passed in; datagrams to send out. Tested in simulation ([`sim`] tests: seeded loss, nodes
//!   killed and restarted, thousands of rounds in milliseconds).
//! - [`run`] drives it on a UDP socket, each packet sealed with a key derived from the fleet's
//!   key ([`dataplane::crypto::DatagramKey`]), so that only a holder of the key can join or
//!   speak, and a packet older than [`MAX_PACKET_AGE`] by its sender's clock is dropped.
//!
//! What gossip guarantees is weaker than Raft's and is said so: a view converges (every live
//! node ends up seeing every other, and a dead one as down, within a few probe periods), it is
//! never agreed at one instant, and nothing decided on it is exclusive. VM ownership across
//! sites is therefore not decided by gossip: it stays with each site's Raft group.

pub mod driver;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use foca::{BroadcastHandler, Foca, Invalidates, OwnedNotification, PostcardCodec, Runtime, Timer};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

pub use driver::{Handle, run};

/// How old (by its sender's clock) a packet may be and still be read.
pub const MAX_PACKET_AGE: Duration = Duration::from_secs(120);
/// Largest card, encoded (it travels inside one packet with foca's own messages).
pub const MAX_CARD: usize = 700;
/// Most links a card lists.
pub const MAX_LINKS: usize = 16;
/// Longest name (node, site, peer) on a card.
pub const MAX_NAME: usize = 64;
/// Most cards kept: one per node of the fleet.
pub const MAX_CARDS: usize = 4096;

/// A member's identity: where it listens, its node id, and a counter it bumps to rejoin after
/// being declared down.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Id {
    /// Its gossip address.
    pub addr: SocketAddr,
    /// Its node id (`[gossip] node`, or `[fleet] id`).
    pub node: u64,
    /// Bumped on each rejoin.
    pub bump: u16,
}

impl foca::Identity for Id {
    type Addr = SocketAddr;
    fn renew(&self) -> Option<Self> {
        Some(Self { bump: self.bump.wrapping_add(1), ..self.clone() })
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// What a link from a node measures (from its mode detector and transfers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// The peer's name.
    pub peer: String,
    /// Last RTT (ms).
    pub rtt_ms: f64,
    /// Last delivery rate or goodput (bit/s).
    pub bps: f64,
    /// Its mode: datacenter or internet.
    pub mode: String,
}

/// A node's card: what it has and what its links measure, versioned by its own clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Card {
    /// Its node id.
    pub node: u64,
    /// Its name.
    pub name: String,
    /// Its site.
    pub site: String,
    /// When it was written, in ms since the Unix epoch by the node's clock: a newer card
    /// replaces an older one.
    pub version: u64,
    /// Online cores.
    pub cores: u32,
    /// RDMA devices it can use.
    pub rdma: bool,
    /// Free bytes where it receives.
    pub free_bytes: u64,
    /// Its links.
    pub links: Vec<Link>,
}

impl Card {
    fn check(&self) -> Result<(), String> {
        for (what, s) in [("name", &self.name), ("site", &self.site)] {
            if s.len() > MAX_NAME || s.chars().any(char::is_control) {
                return Err(format!("card {what} too long or with control characters"));
            }
        }
        if self.links.len() > MAX_LINKS || self.links.iter().any(|l| l.peer.len() > MAX_NAME || l.mode.len() > 16 || !l.rtt_ms.is_finite() || !l.bps.is_finite()) {
            return Err("card links out of bounds".into());
        }
        Ok(())
    }

    /// Encodes the card (at most [`MAX_CARD`] bytes, or why not).
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        self.check()?;
        let b = postcard::to_allocvec(self).map_err(|e| e.to_string())?;
        if b.len() > MAX_CARD {
            return Err(format!("card of {} bytes; at most {MAX_CARD}", b.len()));
        }
        Ok(b)
    }

    /// Decodes a card from another node (bounded, checked).
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() > MAX_CARD {
            return Err(format!("card of {} bytes; at most {MAX_CARD}", b.len()));
        }
        let c: Card = postcard::from_bytes(b).map_err(|e| format!("malformed card: {e}"))?;
        c.check()?;
        Ok(c)
    }
}

/// A card's key for foca's dissemination: a newer version of a node's card replaces the older.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CardKey {
    node: u64,
    version: u64,
}

impl Invalidates for CardKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node == other.node && self.version >= other.version
    }
}

/// The cards known, each with when it was last refreshed here.
#[derive(Debug, Default)]
struct Book {
    cards: BTreeMap<u64, (Card, Instant)>,
    now: Option<Instant>,
    refused: u64,
}

/// Foca's handler of cards: the book it shares with [`Gossip`] (foca owns its handler).
#[derive(Debug, Default, Clone)]
pub struct Cards(std::sync::Arc<std::sync::Mutex<Book>>);

/// Why a card was not taken.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CardError(String);

impl BroadcastHandler<Id> for Cards {
    type Key = CardKey;
    type Error = CardError;
    /// A card from the network (`sender` set) is kept and spread on if it is newer than the one
    /// held; this node's own card (no sender: [`Gossip::publish`]) also when it is the same
    /// version, so that republishing an unchanged card spreads it again (else a node that
    /// missed its first dissemination would never get it).
    fn receive_item(&mut self, data: &[u8], sender: Option<&Id>) -> Result<Option<CardKey>, CardError> {
        let mut b = self.0.lock().expect("cards lock");
        let c = match Card::decode(data) {
            Ok(c) => c,
            Err(w) => {
                b.refused += 1;
                return Err(CardError(w));
            }
        };
        let now = b.now.expect("the time is set before foca runs");
        match b.cards.get(&c.node) {
            Some((old, _)) if old.version > c.version || (old.version == c.version && sender.is_some()) => Ok(None),
            None if b.cards.len() >= MAX_CARDS => Err(CardError(format!("already {MAX_CARDS} cards"))),
            _ => {
                let key = CardKey { node: c.node, version: c.version };
                b.cards.insert(c.node, (c, now));
                Ok(Some(key))
            }
        }
    }
}

/// A member as this node sees it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    /// Its node id.
    pub node: u64,
    /// Its gossip address.
    pub addr: SocketAddr,
    /// alive, suspect or down.
    pub state: &'static str,
}

/// A card as this node holds it, with its staleness.
#[derive(Debug, Clone, Serialize)]
pub struct CardView {
    /// The card.
    pub card: Card,
    /// Seconds since this node last received a newer version of it.
    pub heard_s: f64,
}

/// This node's view of the gossip group, for `/status`, `/metrics` and `dwcp fleet status`.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    /// This node.
    pub me: u64,
    /// Members it knows (itself excluded).
    pub members: Vec<MemberView>,
    /// Members it believes alive (itself included).
    pub alive: usize,
    /// Cards it holds (its own included).
    pub cards: Vec<CardView>,
    /// The stalest card's age here (s).
    pub stalest_s: f64,
    /// Packets dropped: failed authentication, too old, or malformed.
    pub dropped: u64,
}

/// What the protocol asks of its driver.
#[derive(Debug, Default)]
pub struct Out {
    /// Datagrams to send (unsealed).
    pub send: Vec<(SocketAddr, Vec<u8>)>,
    /// Members that came up or went down.
    pub events: Vec<String>,
}

struct Rt<'a> {
    now: Instant,
    timers: &'a mut BTreeMap<(Instant, u64), Timer<Id>>,
    seq: &'a mut u64,
    out: &'a mut Out,
}

impl Runtime<Id> for Rt<'_> {
    fn notify(&mut self, n: foca::Notification<'_, Id>) {
        match n.to_owned() {
            OwnedNotification::MemberUp(id) => self.out.events.push(format!("node {} at {} is up", id.node, id.addr)),
            OwnedNotification::MemberDown(id) => self.out.events.push(format!("node {} at {} is down", id.node, id.addr)),
            OwnedNotification::Defunct => self.out.events.push("this node was declared down; rejoining".into()),
            _ => {}
        }
    }
    fn send_to(&mut self, to: Id, data: &[u8]) {
        self.out.send.push((to.addr, data.to_vec()));
    }
    fn submit_after(&mut self, event: Timer<Id>, after: Duration) {
        *self.seq += 1;
        self.timers.insert((self.now + after, *self.seq), event);
    }
}

/// The gossip protocol of one node, free of I/O.
pub struct Gossip {
    foca: Foca<Id, PostcardCodec, StdRng, Cards>,
    cards: Cards,
    timers: BTreeMap<(Instant, u64), Timer<Id>>,
    seq: u64,
    dropped: u64,
    seeds: Vec<SocketAddr>,
    joined: Option<Instant>,
    /// The first time it was given (an input), from which the first announcement is due.
    first: Option<Instant>,
    period: Duration,
}

impl std::fmt::Debug for Gossip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gossip").field("me", self.foca.identity()).finish_non_exhaustive()
    }
}

/// Foca's settings for a group of about `size` nodes: its WAN profile (memberlist's) scaled by
/// `period` (5 s on the internet; shorter in tests).
pub fn config(size: u32, period: Duration) -> foca::Config {
    let mut c = foca::Config::new_wan(NonZeroU32::new(size.max(2)).expect("at least 2"));
    let scale = period.as_secs_f64() / c.probe_period.as_secs_f64();
    let s = |d: Duration| Duration::from_secs_f64(d.as_secs_f64() * scale);
    c.probe_period = s(c.probe_period);
    c.probe_rtt = s(c.probe_rtt);
    c.suspect_to_down_after = s(c.suspect_to_down_after);
    for p in [&mut c.periodic_announce, &mut c.periodic_announce_to_down_members, &mut c.periodic_gossip].into_iter().flatten() {
        p.frequency = s(p.frequency);
    }
    c.max_packet_size = std::num::NonZeroUsize::new(1400 - dataplane::crypto::DATAGRAM_OVERHEAD).expect("positive");
    c
}

impl Gossip {
    /// A node `me` with foca settings `cfg` and random choices from `seed`.
    pub fn new(me: Id, cfg: foca::Config, seed: u64) -> Self {
        let cfg_period = cfg.probe_period;
        let cards = Cards::default();
        let foca = Foca::with_custom_broadcast(me, cfg, StdRng::seed_from_u64(seed), PostcardCodec, cards.clone());
        let period = cfg_period;
        Self { foca, cards, timers: BTreeMap::new(), seq: 0, dropped: 0, seeds: Vec::new(), joined: None, first: None, period }
    }

    fn set_now(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.cards.0.lock().expect("cards lock").now = Some(now);
    }

    fn rt<'a>(now: Instant, timers: &'a mut BTreeMap<(Instant, u64), Timer<Id>>, seq: &'a mut u64, out: &'a mut Out) -> Rt<'a> {
        Rt { now, timers, seq, out }
    }

    /// Members to join through: while this node knows no live member (first start, a partition
    /// healed, everyone else restarted), [`Gossip::tick`] announces it to them every probe period.
    pub fn set_seeds(&mut self, seeds: Vec<SocketAddr>) {
        let me = self.foca.identity().addr;
        self.seeds = seeds.into_iter().filter(|s| *s != me).collect();
    }

    /// Asks the node at `seed` to let this one in.
    pub fn join(&mut self, seed: SocketAddr, now: Instant) -> Out {
        let mut out = Out::default();
        self.set_now(now);
        let dst = Id { addr: seed, node: 0, bump: 0 };
        if let Err(e) = self.foca.announce(dst, Self::rt(now, &mut self.timers, &mut self.seq, &mut out)) {
            out.events.push(format!("announcing to {seed}: {e}"));
        }
        out
    }

    /// Spreads this node's card. Each call spreads it anew, changed or not (the driver calls it
    /// every two periods, so a node that joined after the last round of dissemination, or
    /// missed it, gets the card then); an older version than the one held is not spread.
    pub fn publish(&mut self, card: &Card, now: Instant) -> Result<(), String> {
        let b = card.encode()?;
        self.set_now(now);
        self.foca.add_broadcast(&b).map(|_| ()).map_err(|e| e.to_string())
    }

    /// A datagram (already opened and authenticated) from another node.
    pub fn handle(&mut self, data: &[u8], now: Instant) -> Out {
        let mut out = Out::default();
        self.set_now(now);
        if self.foca.handle_data(data, Self::rt(now, &mut self.timers, &mut self.seq, &mut out)).is_err() {
            self.dropped += 1;
        }
        out
    }

    /// A packet dropped before it reached the protocol (authentication, age).
    pub fn count_dropped(&mut self) {
        self.dropped += 1;
    }

    /// Fires every timer due at `now` (and announces to the seeds while alone).
    pub fn tick(&mut self, now: Instant) -> Out {
        let mut out = Out::default();
        self.set_now(now);
        if !self.seeds.is_empty() && self.foca.num_members() == 0 && self.joined.is_none_or(|t| now.saturating_duration_since(t) >= self.period) {
            self.joined = Some(now);
            for sd in self.seeds.clone() {
                let dst = Id { addr: sd, node: 0, bump: 0 };
                let _ = self.foca.announce(dst, Self::rt(now, &mut self.timers, &mut self.seq, &mut out));
            }
        }
        while let Some(e) = self.timers.first_entry() {
            if e.key().0 > now {
                break;
            }
            let t = e.remove();
            let _ = self.foca.handle_timer(t, Self::rt(now, &mut self.timers, &mut self.seq, &mut out));
        }
        out
    }

    /// When the next timer is due (while alone with seeds, the next announcement).
    pub fn next_timer(&self) -> Option<Instant> {
        let rejoin = (!self.seeds.is_empty() && self.foca.num_members() == 0).then(|| self.joined.map(|t| t + self.period).or(self.first)).flatten();
        [self.timers.keys().next().map(|k| k.0), rejoin].into_iter().flatten().min()
    }

    /// This node's view at `now`.
    pub fn view(&self, now: Instant) -> View {
        let members: Vec<MemberView> = self
            .foca
            .iter_membership_state()
            .map(|m| MemberView {
                node: m.id().node,
                addr: m.id().addr,
                state: match m.state() {
                    foca::State::Alive => "alive",
                    foca::State::Suspect => "suspect",
                    foca::State::Down => "down",
                },
            })
            .collect();
        let alive = 1 + members.iter().filter(|m| m.state != "down").count();
        let b = self.cards.0.lock().expect("cards lock");
        let cards: Vec<CardView> = b.cards.values().map(|(c, t)| CardView { card: c.clone(), heard_s: now.saturating_duration_since(*t).as_secs_f64() }).collect();
        let stalest_s = cards.iter().map(|c| c.heard_s).fold(0.0, f64::max);
        View { me: self.foca.identity().node, members, alive, cards, stalest_s, dropped: self.dropped + b.refused }
    }

    /// This node's identity.
    pub fn id(&self) -> &Id {
        self.foca.identity()
    }
}

/// The cards by node, as a map (for tests and callers that look one up).
pub fn cards_by_node(v: &View) -> HashMap<u64, &Card> {
    v.cards.iter().map(|c| (c.card.node, &c.card)).collect()
}

#[cfg(test)]
mod sim;
