//! ASS, datacenter mode: the daemons of a site form a Raft group (openraft) whose replicated
//! state holds each node's capabilities, the jobs in flight and who owns each VM.
//!
//! - [`state`]: the state and its commands, free of I/O (VM ownership moves by compare and set).
//! - [`store`]: the log, vote and snapshots on disk (redb), the state machine in memory.
//! - [`net`]: Raft's messages over Noise-authenticated TCP, the daemons' own handshake.
//!
//! [`Fleet`] is a running node: it forms the group on first start (every initial member proposes
//! the same membership, which openraft makes safe), forwards proposals to the leader, and answers
//! ownership queries only after the leader has confirmed it still leads.

pub mod api;
pub mod jobs;
pub mod net;
pub mod state;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dataplane::crypto::Psk;
use openraft::Raft;
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use serde::{Deserialize, Serialize};

use self::net::{Client, Reply, Request};
use self::state::{Cmd, FleetState, NodeId, Outcome, Owner};

openraft::declare_raft_types!(
    /// The fleet's Raft types: commands in, outcomes out, nodes addressed by their fleet address.
    pub TypeConfig: D = Cmd, R = Outcome
);

/// A node of the group: its fleet address.
pub type Node = openraft::BasicNode;

/// A member of the group as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Its id.
    pub id: NodeId,
    /// Its fleet address (`host:port`).
    pub addr: String,
}

/// How a node runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// This node's id (unique in the group, never reused for another host).
    pub id: NodeId,
    /// Where it listens for other members.
    pub listen: String,
    /// Where its log and snapshots are kept.
    pub dir: PathBuf,
    /// The group's first members (the same list on each of them); empty for a node that will
    /// be added to a running group.
    pub members: Vec<Member>,
    /// Heartbeat period; elections time out after 5 to 10 of them.
    pub heartbeat: Duration,
    /// How long a proposal may wait to be committed.
    pub commit_timeout: Duration,
    /// A snapshot is taken every this many entries, and the log before it (but this many
    /// entries) purged.
    pub snapshot_every: u64,
}

/// Why the fleet could not do what was asked.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum FleetError {
    /// Not committed in time: no quorum answered (this node may be cut off from the majority).
    /// The proposal may still commit later; read the state before acting as if it did not.
    #[error("not committed within {secs:.1} s: {why}")]
    NotCommitted {
        /// How long it waited.
        secs: f64,
        /// The last thing that went wrong.
        why: String,
    },
    /// Committed, and the state machine refused it (the state is unchanged).
    #[error("{0}")]
    Refused(String),
    /// Anything else.
    #[error("fleet: {0}")]
    Other(String),
}

/// A node's view of the group, for `/status`, `/metrics` and `dwcp fleet status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Leader, Follower, Candidate or Learner.
    pub role: String,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: u64,
    /// Its last log index.
    pub last_log_index: u64,
    /// The last index applied to its state.
    pub applied_index: u64,
    /// Entries in its log not yet applied.
    pub apply_lag: u64,
    /// The last index its latest snapshot covers.
    pub snapshot_index: Option<u64>,
    /// The last index purged from its log (kept only in the snapshot).
    pub purged_index: Option<u64>,
    /// On the leader: how far behind each other member's log is, in entries (None: unknown).
    pub replication_lag: BTreeMap<NodeId, Option<u64>>,
    /// On the leader: milliseconds since a quorum last acknowledged it.
    pub ms_since_quorum_ack: Option<u64>,
    /// Voting members and their addresses.
    pub voters: BTreeMap<NodeId, String>,
    /// Non-voting members (being added).
    pub learners: BTreeMap<NodeId, String>,
    /// VMs with an owner.
    pub vms: usize,
    /// Jobs recorded.
    pub jobs: usize,
    /// Nodes that reported capabilities.
    pub nodes: usize,
}

/// A running fleet node.
pub struct Fleet {
    id: NodeId,
    raft: Raft<TypeConfig>,
    rt: tokio::runtime::Runtime,
    applied: Arc<RwLock<store::Applied>>,
    server: net::Server,
    psk: Psk,
    timeout: Duration,
    /// The connection to the leader that forwarded requests go over, kept between them.
    to_leader: std::sync::Mutex<Option<(NodeId, String, Client)>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("id", &self.id).field("addr", &self.server.addr).finish_non_exhaustive()
    }
}

impl Fleet {
    /// Starts this node: opens its store, serves other members, and forms the group if this is
    /// a first start.
    pub fn start(o: Options, psk: Psk) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("dwcp-raft").enable_all().build().map_err(|e| format!("fleet runtime: {e}"))?;
        let (log, sm) = store::open(&o.dir)?;
        let applied = sm.applied.clone();
        let hb = o.heartbeat.as_millis().max(10) as u64;
        let cfg = openraft::Config {
            cluster_name: "dwcp".into(),
            heartbeat_interval: hb,
            election_timeout_min: hb * 5,
            election_timeout_max: hb * 10,
            // A batch of entries, or a snapshot chunk, stays well inside one fleet frame.
            max_payload_entries: 64,
            snapshot_max_chunk_size: 1 << 20,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(o.snapshot_every.max(1)),
            max_in_snapshot_log_to_keep: o.snapshot_every,
            ..Default::default()
        };
        let cfg = Arc::new(cfg.validate().map_err(|e| format!("fleet: {e}"))?);
        let factory = net::Factory { me: o.id, psk: psk.clone() };
        let raft = rt.block_on(Raft::new(o.id, cfg, factory, log, sm)).map_err(|e| format!("fleet: {e}"))?;
        let handler = Arc::new(net::RaftHandler { id: o.id, raft: raft.clone(), rt: rt.handle().clone(), state: applied.clone(), timeout: o.commit_timeout });
        let server = net::serve(&o.listen, psk.clone(), handler)?;
        let f = Self { id: o.id, raft, rt, applied, server, psk, timeout: o.commit_timeout, to_leader: std::sync::Mutex::new(None) };
        if o.members.iter().any(|m| m.id == o.id) {
            let members: BTreeMap<NodeId, Node> = o.members.iter().map(|m| (m.id, Node { addr: m.addr.clone() })).collect();
            match f.rt.block_on(f.raft.initialize(members)) {
                Ok(()) => tracing::info!(id = o.id, "fleet formed with {} members", o.members.len()),
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => tracing::info!(id = o.id, "fleet: rejoining the group from the stored log"),
                Err(e) => return Err(format!("fleet: forming the group: {e}")),
            }
        } else if !o.members.is_empty() {
            return Err(format!("fleet.members does not list this node (id {}): list it, or leave members empty on a node to be added with `dwcp fleet add`", o.id));
        }
        Ok(f)
    }

    /// A client to the leader `id` at `addr`: the kept one while the leader is the same (a
    /// forwarded request then costs one round trip, not a connection and a handshake more).
    fn leader_client(&self, id: NodeId, addr: &str) -> Client {
        let mut g = self.to_leader.lock().expect("leader client lock");
        match &*g {
            Some((i, a, c)) if *i == id && a == addr => c.clone(),
            _ => {
                let c = Client::new(self.id, id, addr.to_owned(), self.psk.clone());
                *g = Some((id, addr.to_owned(), c.clone()));
                c
            }
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Where it listens for other members.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr
    }

    /// Commits `cmd` (through the leader, wherever it is) and returns what applying it did.
    pub fn propose(&self, cmd: Cmd) -> Result<Outcome, FleetError> {
        let t0 = Instant::now();
        let mut why = String::from("no leader yet");
        loop {
            let left = self.timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return Err(FleetError::NotCommitted { secs: t0.elapsed().as_secs_f64(), why });
            }
            let r = self.rt.block_on(async { tokio::time::timeout(left, self.raft.client_write(cmd.clone())).await });
            match r {
                Err(_) => why = "no quorum acknowledged it".into(),
                Ok(Ok(w)) => return Ok(w.data),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => match (f.leader_id, f.leader_node) {
                    (Some(id), Some(n)) => match self.leader_client(id, &n.addr).call(&Request::Write(cmd.clone()), left) {
                        Ok(Reply::Write(Ok(o))) => return Ok(o),
                        Ok(Reply::Write(Err(w))) => why = format!("the leader (node {id}): {w}"),
                        Ok(other) => why = format!("the leader (node {id}) answered {other:?}"),
                        Err(e) => why = format!("the leader: {e}"),
                    },
                    _ => why = "no leader known: an election is under way or no quorum is reachable".into(),
                },
                Ok(Err(e)) => why = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50).min(self.timeout.saturating_sub(t0.elapsed())));
        }
    }

    /// Commits `cmd` and maps a refusal to [`FleetError::Refused`], returning the VM's epoch.
    fn commit(&self, cmd: Cmd) -> Result<Option<u64>, FleetError> {
        match self.propose(cmd)? {
            Outcome::Done { epoch } => Ok(epoch),
            Outcome::Refused(w) => Err(FleetError::Refused(w)),
        }
    }

    /// `node` takes the VM `vm`; returns its epoch.
    pub fn claim(&self, vm: &str, node: NodeId) -> Result<u64, FleetError> {
        self.commit(Cmd::Claim { vm: vm.into(), node })?.ok_or_else(|| FleetError::Other("claim returned no epoch".into()))
    }

    /// Moves `vm` from `from` at `epoch` to `to`; returns the new epoch. A proposal retried
    /// after a lost reply that had in fact committed is recognised (the VM is `to`'s at
    /// `epoch + 1`) and reported as done.
    pub fn handoff(&self, vm: &str, from: NodeId, to: NodeId, epoch: u64) -> Result<u64, FleetError> {
        match self.commit(Cmd::Handoff { vm: vm.into(), from, to, epoch }) {
            Ok(e) => e.ok_or_else(|| FleetError::Other("handoff returned no epoch".into())),
            Err(FleetError::Refused(w)) => match self.owner(vm) {
                Ok(Some(o)) if o.node == to && o.epoch == epoch + 1 => Ok(o.epoch),
                _ => Err(FleetError::Refused(w)),
            },
            Err(e) => Err(e),
        }
    }

    /// `node`, owning `vm` at `epoch`, is about to run it: committed only if that is still so
    /// (see [`Cmd::Resume`]); returns the new epoch.
    pub fn resume(&self, vm: &str, node: NodeId, epoch: u64) -> Result<u64, FleetError> {
        self.commit(Cmd::Resume { vm: vm.into(), node, epoch })?.ok_or_else(|| FleetError::Other("resume returned no epoch".into()))
    }

    /// Who owns `vm`, as the leader knows it after confirming it still leads (linearizable):
    /// an answer no later commit has overtaken when it was given.
    pub fn owner(&self, vm: &str) -> Result<Option<Owner>, FleetError> {
        let t0 = Instant::now();
        let not = |why: String| FleetError::NotCommitted { secs: t0.elapsed().as_secs_f64(), why };
        loop {
            let left = self.timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return Err(not("no leader known: an election is under way or no quorum is reachable".into()));
            }
            let r = self.rt.block_on(async { tokio::time::timeout(left, self.raft.ensure_linearizable()).await });
            return match r {
                Err(_) => Err(not("no quorum confirmed the leader".into())),
                Ok(Ok(_)) => Ok(self.applied.read().expect("fleet state lock").state.vms.get(vm).cloned()),
                Ok(Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)))) => match (f.leader_id, f.leader_node) {
                    (Some(id), Some(n)) => match self.leader_client(id, &n.addr).call(&Request::Owner(vm.into()), left) {
                        Ok(Reply::Owner(r)) => r.map_err(not),
                        Ok(other) => Err(FleetError::Other(format!("the leader answered {other:?}"))),
                        Err(e) => Err(not(e.to_string())),
                    },
                    // No leader known yet (just started, or an election): wait for one.
                    _ => {
                        std::thread::sleep(Duration::from_millis(50).min(left));
                        continue;
                    }
                },
                Ok(Err(e)) => Err(not(e.to_string())),
            };
        }
    }

    /// This node's copy of the state (it may lag the leader's by what it has not applied yet).
    pub fn local_state(&self) -> FleetState {
        self.applied.read().expect("fleet state lock").state.clone()
    }

    /// Adds node `id` at `addr` as a voter: it first catches up as a learner. Done by the
    /// leader, wherever it is.
    pub fn add(&self, id: NodeId, addr: &str) -> Result<(), FleetError> {
        self.change(Request::AddMember(id, addr.into()))
    }

    /// Removes node `id` from the group. Done by the leader, wherever it is.
    pub fn remove(&self, id: NodeId) -> Result<(), FleetError> {
        self.change(Request::RemoveMember(id))
    }

    fn change(&self, req: Request) -> Result<(), FleetError> {
        let r = match &req {
            Request::AddMember(id, addr) => self.rt.block_on(add_member(&self.raft, *id, addr, self.timeout)),
            Request::RemoveMember(id) => self.rt.block_on(remove_member(&self.raft, *id, self.timeout)),
            _ => unreachable!("only membership changes"),
        };
        let Err(why) = r else { return Ok(()) };
        let m = self.raft.metrics().borrow().clone();
        match m.current_leader.filter(|l| *l != self.id) {
            Some(l) => {
                let addr = m.membership_config.membership().get_node(&l).map(|n| n.addr.clone()).unwrap_or_default();
                match self.leader_client(l, &addr).call(&req, self.timeout) {
                    Ok(Reply::Members(r)) => r.map_err(FleetError::Other),
                    Ok(other) => Err(FleetError::Other(format!("the leader answered {other:?}"))),
                    Err(e) => Err(FleetError::Other(format!("the leader: {e}"))),
                }
            }
            None => Err(FleetError::Other(why)),
        }
    }

    /// This node's view of the group.
    pub fn status(&self) -> Status {
        let m = self.raft.metrics().borrow().clone();
        let last = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map_or(0, |l| l.index);
        let mem = m.membership_config.membership();
        let voters: BTreeMap<NodeId, String> = mem.voter_ids().map(|id| (id, mem.get_node(&id).map(|n| n.addr.clone()).unwrap_or_default())).collect();
        let learners = mem.learner_ids().map(|id| (id, mem.get_node(&id).map(|n| n.addr.clone()).unwrap_or_default())).collect();
        let replication =
            m.replication.as_ref().map(|r| r.iter().filter(|(id, _)| **id != self.id).map(|(id, l)| (*id, l.map(|l| last.saturating_sub(l.index)))).collect()).unwrap_or_default();
        let s = self.applied.read().expect("fleet state lock");
        Status {
            id: self.id,
            role: format!("{:?}", m.state),
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: last,
            applied_index: applied,
            apply_lag: last.saturating_sub(applied),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            replication_lag: replication,
            ms_since_quorum_ack: m.millis_since_quorum_ack,
            voters,
            learners,
            vms: s.state.vms.len(),
            jobs: s.state.jobs.len(),
            nodes: s.state.nodes.len(),
        }
    }

    /// Waits until this node knows a leader (or `within` passes); returns it.
    pub fn wait_leader(&self, within: Duration) -> Option<NodeId> {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if let Some(l) = self.raft.metrics().borrow().current_leader {
                return Some(l);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Stops this node (its store stays; a restart rejoins from it).
    pub fn shutdown(self) {
        self.stop();
        self.rt.shutdown_timeout(Duration::from_secs(1));
    }

    /// Stops Raft and the listener, where the node is shared (its runtime goes with the last
    /// reference).
    pub fn stop(&self) {
        self.server.halt();
        let _ = self.rt.block_on(self.raft.shutdown());
    }
}

fn voters(raft: &Raft<TypeConfig>) -> BTreeSet<NodeId> {
    raft.metrics().borrow().membership_config.membership().voter_ids().collect()
}

/// On the leader: adds `id` as a learner, waits for it to catch up, then makes it a voter.
async fn add_member(raft: &Raft<TypeConfig>, id: NodeId, addr: &str, to: Duration) -> Result<(), String> {
    tokio::time::timeout(to, raft.add_learner(id, Node { addr: addr.into() }, true))
        .await
        .map_err(|_| format!("node {id} at {addr} did not catch up within {to:?}"))?
        .map_err(|e| e.to_string())?;
    let mut v = voters(raft);
    v.insert(id);
    tokio::time::timeout(to, raft.change_membership(v, false)).await.map_err(|_| "the membership change did not commit in time".to_string())?.map_err(|e| e.to_string())?;
    Ok(())
}

/// On the leader: removes `id` from the group.
async fn remove_member(raft: &Raft<TypeConfig>, id: NodeId, to: Duration) -> Result<(), String> {
    let mut v = voters(raft);
    if !v.remove(&id) {
        return Err(format!("node {id} is not a voter"));
    }
    tokio::time::timeout(to, raft.change_membership(v, false)).await.map_err(|_| "the membership change did not commit in time".to_string())?.map_err(|e| e.to_string())?;
    Ok(())
}
