//! The fleet's replicated state and the commands that change it: what every daemon of a Raft
//! group agrees on. Free of I/O and of time (a command carries the proposer's clock where one
//! is needed), so every replica that applies the same log holds the same state.
//!
//! VM ownership is the part that must never be wrong: a VM has at most one owner, and it moves
//! only by a [`Cmd::Handoff`] that names the owner and the epoch the caller saw (compare and
//! set). Every change of owner bumps the epoch, which is the fencing token a host shows before it
//! resumes a VM.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's id in the Raft group (`[fleet] id`).
pub type NodeId = u64;

/// Longest VM name or job key accepted (bytes).
pub const MAX_NAME: usize = 128;
/// Largest job record kept in the replicated state (bytes of JSON).
pub const MAX_JOB: usize = 16 << 10;
/// Most job records kept per node: a node that floods the log with records is refused, not
/// allowed to grow every replica's memory.
pub const MAX_JOBS_PER_NODE: usize = 1024;
/// Most VMs the fleet tracks.
pub const MAX_VMS: usize = 100_000;

/// What a node reports of itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps {
    /// The node's name (`[node] name`).
    pub name: String,
    /// Online cores.
    pub cores: u32,
    /// RDMA devices it can use.
    pub rdma: bool,
    /// Free bytes where it receives (`node.out`).
    pub free_bytes: u64,
    /// When it reported, in milliseconds since the Unix epoch, by its own clock.
    pub at_ms: u64,
}

/// Who owns a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The owning node.
    pub node: NodeId,
    /// Bumped on every change of owner: the fencing token.
    pub epoch: u64,
}

/// A job a node runs, as recorded for the fleet (the node's own record, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The node that runs it.
    pub node: NodeId,
    /// Its record (kind, object, peer, progress), opaque to the state machine.
    pub record: String,
}

/// A change to the fleet's state. Proposed by one node, applied by all in log order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cmd {
    /// A node reports what it has.
    Caps {
        /// The node.
        node: NodeId,
        /// What it has.
        caps: Caps,
    },
    /// `node` takes a VM nobody owns (a VM started there). Refused if another node owns it;
    /// a node claiming what it already owns gets its current epoch.
    Claim {
        /// The VM.
        vm: String,
        /// The claiming node.
        node: NodeId,
    },
    /// Ownership moves from `from` to `to`, only if `from` owns the VM at `epoch`.
    Handoff {
        /// The VM.
        vm: String,
        /// The owner the caller saw.
        from: NodeId,
        /// The new owner.
        to: NodeId,
        /// The epoch the caller saw.
        epoch: u64,
    },
    /// The owner at `epoch` is about to run the VM (resume a paused copy): committed only if it
    /// still owns it at that epoch, and the epoch moves on, so that no handoff proposed before
    /// (still in the log when the owner looked) nor after with the old epoch can move it away
    /// from under the running copy.
    Resume {
        /// The VM.
        vm: String,
        /// The owner that resumes it.
        node: NodeId,
        /// The epoch it read.
        epoch: u64,
    },
    /// The owner gives a VM up (it was shut down).
    Release {
        /// The VM.
        vm: String,
        /// The owner.
        node: NodeId,
        /// The epoch it holds.
        epoch: u64,
    },
    /// A job started or moved on.
    PutJob {
        /// `NODE/ID`.
        key: String,
        /// The record.
        job: Job,
    },
    /// A job ended (or was handed to another node): `outcome` says how, for the record.
    EndJob {
        /// `NODE/ID`.
        key: String,
        /// verified, failed: why, taken over by ...
        outcome: String,
    },
    /// The job of a node presumed gone moves to another, only if `from` still holds it.
    AdoptJob {
        /// `NODE/ID`.
        key: String,
        /// The node presumed gone.
        from: NodeId,
        /// The node that takes it.
        to: NodeId,
    },
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied (or nothing to do). For ownership commands, the owner's epoch after it.
    Done {
        /// The VM's epoch after the command, for ownership commands.
        epoch: Option<u64>,
    },
    /// Not applied, and why; the state is unchanged.
    Refused(String),
}

/// The replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetState {
    /// What each node last reported.
    pub nodes: BTreeMap<NodeId, Caps>,
    /// Who owns each VM.
    pub vms: BTreeMap<String, Owner>,
    /// Jobs in flight, by `NODE/ID`.
    pub jobs: BTreeMap<String, Job>,
    /// How the latest jobs ended (at most [`MAX_ENDED`]), oldest first.
    #[serde(default)]
    pub ended: std::collections::VecDeque<(String, String)>,
}

/// How many job outcomes the state keeps.
pub const MAX_ENDED: usize = 256;

fn check_name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME || s.chars().any(char::is_control) {
        return Err(format!("{what} must be 1 to {MAX_NAME} bytes without control characters"));
    }
    Ok(())
}

impl FleetState {
    /// Applies one command. Deterministic: the same state and command give the same result on
    /// every replica.
    pub fn apply(&mut self, cmd: &Cmd) -> Outcome {
        match self.try_apply(cmd) {
            Ok(epoch) => Outcome::Done { epoch },
            Err(why) => Outcome::Refused(why),
        }
    }

    fn try_apply(&mut self, cmd: &Cmd) -> Result<Option<u64>, String> {
        match cmd {
            Cmd::Caps { node, caps } => {
                check_name("a node name", &caps.name)?;
                self.nodes.insert(*node, caps.clone());
                Ok(None)
            }
            Cmd::Claim { vm, node } => {
                check_name("a VM name", vm)?;
                match self.vms.get(vm) {
                    Some(o) if o.node == *node => Ok(Some(o.epoch)),
                    Some(o) => Err(format!("VM {vm} is owned by node {} (epoch {})", o.node, o.epoch)),
                    None if self.vms.len() >= MAX_VMS => Err(format!("the fleet already tracks {MAX_VMS} VMs")),
                    None => {
                        self.vms.insert(vm.clone(), Owner { node: *node, epoch: 1 });
                        Ok(Some(1))
                    }
                }
            }
            Cmd::Handoff { vm, from, to, epoch } => {
                let Some(o) = self.vms.get_mut(vm) else { return Err(format!("VM {vm} has no owner: claim it first")) };
                if o.node != *from || o.epoch != *epoch {
                    return Err(format!("VM {vm} is owned by node {} at epoch {}, not node {from} at epoch {epoch}", o.node, o.epoch));
                }
                o.node = *to;
                o.epoch += 1;
                Ok(Some(o.epoch))
            }
            Cmd::Resume { vm, node, epoch } => match self.vms.get_mut(vm) {
                Some(o) if o.node == *node && o.epoch == *epoch => {
                    o.epoch += 1;
                    Ok(Some(o.epoch))
                }
                Some(o) => Err(format!("VM {vm} is owned by node {} at epoch {}, not node {node} at epoch {epoch}: not resuming it there", o.node, o.epoch)),
                None => Err(format!("VM {vm} has no owner: claim it first")),
            },
            Cmd::Release { vm, node, epoch } => match self.vms.get(vm) {
                Some(o) if o.node == *node && o.epoch == *epoch => {
                    self.vms.remove(vm);
                    Ok(None)
                }
                Some(o) => Err(format!("VM {vm} is owned by node {} at epoch {}, not node {node} at epoch {epoch}", o.node, o.epoch)),
                None => Ok(None),
            },
            Cmd::PutJob { key, job } => {
                check_name("a job key", key)?;
                if job.record.len() > MAX_JOB {
                    return Err(format!("job record of {} bytes; at most {MAX_JOB}", job.record.len()));
                }
                if !self.jobs.contains_key(key) && self.jobs.values().filter(|j| j.node == job.node).count() >= MAX_JOBS_PER_NODE {
                    return Err(format!("node {} already has {MAX_JOBS_PER_NODE} jobs recorded", job.node));
                }
                self.jobs.insert(key.clone(), job.clone());
                Ok(None)
            }
            Cmd::EndJob { key, outcome } => {
                if self.jobs.remove(key).is_some() {
                    let o: String = outcome.chars().take(512).collect();
                    self.ended.push_back((key.clone(), o));
                    while self.ended.len() > MAX_ENDED {
                        self.ended.pop_front();
                    }
                }
                Ok(None)
            }
            Cmd::AdoptJob { key, from, to } => match self.jobs.get_mut(key) {
                Some(j) if j.node == *from => {
                    j.node = *to;
                    Ok(None)
                }
                Some(j) => Err(format!("job {key} is node {}'s, not node {from}'s", j.node)),
                None => Err(format!("no job {key}")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(e: u64) -> Outcome {
        Outcome::Done { epoch: Some(e) }
    }

    #[test]
    fn a_vm_has_one_owner_and_moves_only_from_the_owner_at_its_epoch() {
        let mut s = FleetState::default();
        assert_eq!(s.apply(&Cmd::Claim { vm: "web1".into(), node: 1 }), done(1));
        assert_eq!(s.apply(&Cmd::Claim { vm: "web1".into(), node: 1 }), done(1), "claiming again is idempotent");
        assert!(matches!(s.apply(&Cmd::Claim { vm: "web1".into(), node: 2 }), Outcome::Refused(_)));
        // Two hosts race to take it from node 1: the first wins, the second saw a stale epoch.
        assert_eq!(s.apply(&Cmd::Handoff { vm: "web1".into(), from: 1, to: 2, epoch: 1 }), done(2));
        let r = s.apply(&Cmd::Handoff { vm: "web1".into(), from: 1, to: 3, epoch: 1 });
        assert!(matches!(&r, Outcome::Refused(w) if w.contains("owned by node 2 at epoch 2")), "{r:?}");
        assert_eq!(s.vms["web1"], Owner { node: 2, epoch: 2 });
        // Only the owner at its epoch releases it.
        assert!(matches!(s.apply(&Cmd::Release { vm: "web1".into(), node: 1, epoch: 1 }), Outcome::Refused(_)));
        assert_eq!(s.apply(&Cmd::Release { vm: "web1".into(), node: 2, epoch: 2 }), Outcome::Done { epoch: None });
        assert!(s.vms.is_empty());
        assert!(matches!(s.apply(&Cmd::Handoff { vm: "web1".into(), from: 2, to: 1, epoch: 2 }), Outcome::Refused(_)));
    }

    /// The double run found in `make test`: a handoff proposed while its node was cut off sat in
    /// the log; the old owner read itself as owner (the handoff not yet committed), resumed, and
    /// the handoff then committed and the new owner resumed too. A resume is now a committed
    /// compare-and-set that follows any handoff already in the log.
    #[test]
    fn a_resume_is_refused_after_a_handoff_in_the_log_and_fences_a_stale_one() {
        let mut s = FleetState::default();
        s.apply(&Cmd::Claim { vm: "vm".into(), node: 2 });
        // The old owner read epoch 1; the pending handoff commits first, then its resume.
        assert_eq!(s.apply(&Cmd::Handoff { vm: "vm".into(), from: 2, to: 1, epoch: 1 }), done(2));
        assert!(matches!(s.apply(&Cmd::Resume { vm: "vm".into(), node: 2, epoch: 1 }), Outcome::Refused(_)));
        assert_eq!(s.apply(&Cmd::Resume { vm: "vm".into(), node: 1, epoch: 2 }), done(3));
        // A handoff proposed with the epoch read before that resume is refused: the running copy
        // keeps its ownership.
        assert!(matches!(s.apply(&Cmd::Handoff { vm: "vm".into(), from: 1, to: 2, epoch: 2 }), Outcome::Refused(_)));
        assert_eq!(s.vms["vm"], Owner { node: 1, epoch: 3 });
    }

    #[test]
    fn a_job_is_adopted_once_and_its_end_recorded() {
        let mut s = FleetState::default();
        let put = Cmd::PutJob { key: "1/7".into(), job: Job { node: 1, record: "{}".into() } };
        assert_eq!(s.apply(&put), Outcome::Done { epoch: None });
        assert_eq!(s.apply(&Cmd::AdoptJob { key: "1/7".into(), from: 1, to: 2 }), Outcome::Done { epoch: None });
        // A second adoption from the same (stale) owner is refused: one node runs it.
        assert!(matches!(s.apply(&Cmd::AdoptJob { key: "1/7".into(), from: 1, to: 3 }), Outcome::Refused(_)));
        assert_eq!(s.jobs["1/7"].node, 2);
        s.apply(&Cmd::EndJob { key: "1/7".into(), outcome: "taken over by node 2 as 2/1".into() });
        assert!(s.jobs.is_empty());
        assert_eq!(s.ended.back().unwrap().1, "taken over by node 2 as 2/1");
        for i in 0..MAX_ENDED + 5 {
            s.apply(&Cmd::PutJob { key: format!("2/{i}"), job: Job { node: 2, record: "{}".into() } });
            s.apply(&Cmd::EndJob { key: format!("2/{i}"), outcome: "verified".into() });
        }
        assert_eq!(s.ended.len(), MAX_ENDED);
    }

    #[test]
    fn names_and_records_from_a_proposer_are_bounded() {
        let mut s = FleetState::default();
        assert!(matches!(s.apply(&Cmd::Claim { vm: "x".repeat(MAX_NAME + 1), node: 1 }), Outcome::Refused(_)));
        assert!(matches!(s.apply(&Cmd::Claim { vm: "a\nb".into(), node: 1 }), Outcome::Refused(_)));
        let big = Job { node: 1, record: "x".repeat(MAX_JOB + 1) };
        assert!(matches!(s.apply(&Cmd::PutJob { key: "1/1".into(), job: big }), Outcome::Refused(_)));
        for i in 0..MAX_JOBS_PER_NODE {
            assert_eq!(s.apply(&Cmd::PutJob { key: format!("1/{i}"), job: Job { node: 1, record: "{}".into() } }), Outcome::Done { epoch: None });
        }
        let r = s.apply(&Cmd::PutJob { key: "1/x".into(), job: Job { node: 1, record: "{}".into() } });
        assert!(matches!(r, Outcome::Refused(_)), "{r:?}");
        // Another node still has its share, and an existing record can still be updated.
        assert_eq!(s.apply(&Cmd::PutJob { key: "2/1".into(), job: Job { node: 2, record: "{}".into() } }), Outcome::Done { epoch: None });
        assert_eq!(s.apply(&Cmd::PutJob { key: "1/0".into(), job: Job { node: 1, record: "{\"a\":1}".into() } }), Outcome::Done { epoch: None });
        assert!(s.vms.is_empty());
    }
}
