//! Jobs that survive their node. Each daemon of the group mirrors the jobs it records locally
//! into the replicated state (`NODE/ID` -> its record), and drops them when they end, with
//! how. The leader presumes a member gone when its log has stopped following the leader's for
//! `takeover_after`, and hands each of its jobs to a live member (compare-and-set, so one node
//! runs it); the member that gets one resumes it (the receiver keeps what arrived, publishes
//! only the whole verified object) or, when it cannot (not resumable, source not readable
//! there), ends it in the record with why.
//!
//! Said plainly: a member cut off but alive keeps running its job while another takes it over,
//! so a transfer is sent at least once, not exactly once; the receiver's digest check is what
//! keeps every published object whole. A migration's coordinator is the source host's own
//! `dwcp migrate`: if it dies, QEMU's migration fails and the source VM, which still owns its
//! ownership record (no handoff committed), keeps running; nothing is taken over.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::Fleet;
use super::state::{Cmd, Job, NodeId};
use crate::jobs::Jobs;
use crate::jobs::records::{Mirror, Record};

/// How often the loop looks.
const TICK: Duration = Duration::from_millis(500);

/// Mirrors `jobs` into the fleet, presumes members gone and takes their jobs over, until `stop`.
pub fn run(fleet: Arc<Fleet>, jobs: Arc<Jobs>, rx: Receiver<Mirror>, takeover_after: Duration, stop: Arc<AtomicBool>) {
    let me = fleet.id();
    // What is still to tell the fleet, by key (the latest change of each job wins).
    let mut pending: BTreeMap<String, Cmd> = BTreeMap::new();
    // On the leader: each member's replicated index and when it last moved.
    let mut progress: HashMap<NodeId, (u64, Instant)> = HashMap::new();
    let mut adopted: BTreeSet<String> = BTreeSet::new();
    let mut warned = false;
    while !stop.load(Relaxed) {
        if let Ok(m) = rx.recv_timeout(TICK) {
            for m in std::iter::once(m).chain(rx.try_iter()) {
                let (key, cmd) = match m {
                    Mirror::Put(r) => {
                        let key = format!("{me}/{}", r.id);
                        let record = serde_json::to_string(&r).unwrap_or_default();
                        (key.clone(), Cmd::PutJob { key, job: Job { node: me, record } })
                    }
                    Mirror::End(id, outcome) => {
                        let key = format!("{me}/{id}");
                        (key.clone(), Cmd::EndJob { key, outcome })
                    }
                };
                pending.insert(key, cmd);
            }
        }
        // Tell the fleet; what does not commit is tried again at the next tick.
        let keys: Vec<String> = pending.keys().cloned().collect();
        for k in keys {
            match fleet.propose(pending[&k].clone()) {
                Ok(_) => {
                    pending.remove(&k);
                    warned = false;
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!("fleet: recording job {k}: {e}; retrying");
                        warned = true;
                    }
                    break;
                }
            }
        }
        let st = fleet.status();
        let state = fleet.local_state();
        // The leader: members whose log stopped following are presumed gone; their jobs move.
        if st.leader == Some(me) {
            let now = Instant::now();
            let mut gone = BTreeSet::new();
            for (n, lag) in &st.replication_lag {
                let matched = lag.map_or(0, |l| st.last_log_index.saturating_sub(l));
                let e = progress.entry(*n).or_insert((matched, now));
                if matched != e.0 || lag == &Some(0) {
                    *e = (matched, now);
                } else if now - e.1 >= takeover_after {
                    gone.insert(*n);
                }
            }
            let live: Vec<NodeId> = st.voters.keys().copied().filter(|n| !gone.contains(n)).collect();
            let orphans: Vec<(String, NodeId)> = state.jobs.iter().filter(|(_, j)| gone.contains(&j.node)).map(|(k, j)| (k.clone(), j.node)).collect();
            // Only a leader that still has a quorum moves anything (the proposal needs one anyway).
            for (i, (key, from)) in orphans.iter().enumerate() {
                let Some(to) = live.get(i % live.len().max(1)).copied() else { break };
                tracing::warn!(job = %key, from, to, "fleet: node {from} presumed gone (its log stopped following for {takeover_after:?}): its job goes to node {to}");
                let _ = fleet.propose(Cmd::AdoptJob { key: key.clone(), from: *from, to });
            }
            // A member that holds jobs and is silent makes no log entries of its own: keep the
            // log moving while there are other members' jobs, so that a dead one shows.
            if state.jobs.values().any(|j| j.node != me) {
                let _ = fleet
                    .propose(Cmd::Caps { node: me, caps: state.nodes.get(&me).cloned().unwrap_or_else(|| super::state::Caps { name: format!("node{me}"), ..Default::default() }) });
            }
        } else {
            progress.clear();
        }
        // Jobs handed to this node that it does not run yet.
        for (key, j) in &state.jobs {
            if j.node != me || key.starts_with(&format!("{me}/")) || adopted.contains(key) {
                continue;
            }
            adopted.insert(key.clone());
            let outcome = match serde_json::from_str::<Record>(&j.record).map_err(|e| format!("its record is unreadable: {e}")).and_then(|r| jobs.adopt(&r)) {
                Ok(id) => format!("taken over by node {me} as job {me}/{id}"),
                Err(why) => format!("failed: its node went away and node {me} cannot take it over: {why}"),
            };
            tracing::info!(job = %key, "{outcome}");
            pending.insert(key.clone(), Cmd::EndJob { key: key.clone(), outcome });
        }
    }
}
