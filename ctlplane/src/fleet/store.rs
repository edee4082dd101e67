//! The Raft log, vote and snapshots on disk, in one redb file per node; the state machine in
//! memory, rebuilt at start from the last snapshot and the committed log after it.
//!
//! Why redb: an embedded, transactional key-value store in pure Rust (no C++ to build, unlike
//! RocksDB), whose commit is durable when it returns (fsync per transaction, copy-on-write
//! B-trees, a crash leaves the last committed state). The fleet's log is small (ownership,
//! capabilities, job records) and written at the rate jobs start and end, so one fsync per
//! append is the right trade: a vote or an entry openraft was told is on disk is on disk.

// openraft's StorageError is what its traits return; boxing it in private helpers would only move the copy.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::state::{FleetState, NodeId, Outcome};
use super::{Node, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

type SErr = StorageError<NodeId>;

fn rd<E: std::error::Error + 'static>(e: E) -> SErr {
    StorageIOError::read(&e).into()
}
fn wr<E: std::error::Error + 'static>(e: E) -> SErr {
    StorageIOError::write(&e).into()
}

/// Opens (creating if needed) a node's store in `dir`: its log storage and its state machine.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachine), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("fleet.dir {}: {e}", dir.display()))?;
    let path = dir.join("raft.redb");
    let db = Database::create(&path).map_err(|e| format!("fleet store {}: {e}", path.display()))?;
    let db = Arc::new(db);
    {
        // Both tables exist from the start, so a reader never finds one missing.
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        tx.open_table(LOG).map_err(|e| e.to_string())?;
        tx.open_table(META).map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
    }
    let sm = StateMachine::load(db.clone()).map_err(|e| format!("fleet store {}: {e}", path.display()))?;
    Ok((LogStore { db }, sm))
}

/// The log and the vote.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    fn meta<T: for<'a> Deserialize<'a>>(&self, key: &str) -> Result<Option<T>, SErr> {
        let tx = self.db.begin_read().map_err(rd)?;
        let t = tx.open_table(META).map_err(rd)?;
        match t.get(key).map_err(rd)? {
            Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(rd),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<(), SErr> {
        let bytes = serde_json::to_vec(v).map_err(wr)?;
        let tx = self.db.begin_write().map_err(wr)?;
        tx.open_table(META).map_err(wr)?.insert(key, bytes.as_slice()).map_err(wr)?;
        tx.commit().map_err(wr)
    }

    /// Removes the log entries in `range`, in one transaction.
    fn remove(&self, range: (Bound<u64>, Bound<u64>), purged: Option<&LogId<NodeId>>) -> Result<(), SErr> {
        let tx = self.db.begin_write().map_err(wr)?;
        {
            let mut t = tx.open_table(LOG).map_err(wr)?;
            t.retain_in(range, |_, _| false).map_err(wr)?;
            if let Some(p) = purged {
                let bytes = serde_json::to_vec(p).map_err(wr)?;
                tx.open_table(META).map_err(wr)?.insert("purged", bytes.as_slice()).map_err(wr)?;
            }
        }
        tx.commit().map_err(wr)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(&mut self, range: RB) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let tx = self.db.begin_read().map_err(rd)?;
        let t = tx.open_table(LOG).map_err(rd)?;
        let mut out = Vec::new();
        for r in t.range((range.start_bound().cloned(), range.end_bound().cloned())).map_err(rd)? {
            let (_, v) = r.map_err(rd)?;
            out.push(serde_json::from_slice(v.value()).map_err(rd)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let purged: Option<LogId<NodeId>> = self.meta("purged")?;
        let tx = self.db.begin_read().map_err(rd)?;
        let t = tx.open_table(LOG).map_err(rd)?;
        let last = match t.last().map_err(rd)? {
            Some((_, v)) => Some(serde_json::from_slice::<Entry<TypeConfig>>(v.value()).map_err(rd)?.log_id),
            None => purged,
        };
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        self.put_meta("vote", vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        self.put_meta("committed", &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self.meta::<Option<LogId<NodeId>>>("committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
    {
        let tx = self.db.begin_write().map_err(wr)?;
        {
            let mut t = tx.open_table(LOG).map_err(wr)?;
            for e in entries {
                let bytes = serde_json::to_vec(&e).map_err(wr)?;
                t.insert(e.log_id.index, bytes.as_slice()).map_err(wr)?;
            }
        }
        // redb's commit returns once the transaction is on disk.
        let r = tx.commit();
        callback.log_io_completed(r.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
        r.map_err(wr)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.remove((Bound::Included(log_id.index), Bound::Unbounded), None)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.remove((Bound::Unbounded, Bound::Included(log_id.index)), Some(&log_id))
    }
}

/// The state machine as applied so far.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    /// The last entry applied.
    pub last_applied: Option<LogId<NodeId>>,
    /// The membership in force.
    pub membership: StoredMembership<NodeId, Node>,
    /// The fleet's state.
    pub state: FleetState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// The state machine: [`Applied`] in memory (shared with the node's readers), its snapshots in
/// the store.
#[derive(Debug, Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    /// What has been applied; read by the fleet's status and queries.
    pub applied: Arc<RwLock<Applied>>,
}

impl StateMachine {
    fn load(db: Arc<Database>) -> Result<Self, String> {
        let sm = Self { db, applied: Arc::default() };
        if let Some(s) = sm.stored_snapshot().map_err(|e| e.to_string())? {
            let state: FleetState = serde_json::from_slice(&s.data).map_err(|e| format!("snapshot {}: {e}", s.meta.snapshot_id))?;
            *sm.applied.write().expect("fleet state lock") = Applied { last_applied: s.meta.last_log_id, membership: s.meta.last_membership.clone(), state };
        }
        Ok(sm)
    }

    fn stored_snapshot(&self) -> Result<Option<StoredSnapshot>, SErr> {
        let tx = self.db.begin_read().map_err(rd)?;
        let t = tx.open_table(META).map_err(rd)?;
        match t.get("snapshot").map_err(rd)? {
            Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(rd),
            None => Ok(None),
        }
    }

    fn store_snapshot(&self, s: &StoredSnapshot) -> Result<(), SErr> {
        let bytes = serde_json::to_vec(s).map_err(wr)?;
        let tx = self.db.begin_write().map_err(wr)?;
        tx.open_table(META).map_err(wr)?.insert("snapshot", bytes.as_slice()).map_err(wr)?;
        tx.commit().map_err(wr)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let (meta, data) = {
            let a = self.applied.read().expect("fleet state lock");
            let data = serde_json::to_vec(&a.state).map_err(rd)?;
            let id = match a.last_applied {
                Some(l) => format!("{}-{}", l.leader_id, l.index),
                None => "empty".into(),
            };
            (SnapshotMeta { last_log_id: a.last_applied, last_membership: a.membership.clone(), snapshot_id: id }, data)
        };
        self.store_snapshot(&StoredSnapshot { meta: meta.clone(), data: data.clone() })?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), SErr> {
        let a = self.applied.read().expect("fleet state lock");
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
    {
        let mut a = self.applied.write().expect("fleet state lock");
        let mut out = Vec::new();
        for e in entries {
            a.last_applied = Some(e.log_id);
            out.push(match e.payload {
                EntryPayload::Blank => Outcome::Done { epoch: None },
                EntryPayload::Normal(cmd) => a.state.apply(&cmd),
                EntryPayload::Membership(m) => {
                    a.membership = StoredMembership::new(Some(e.log_id), m);
                    Outcome::Done { epoch: None }
                }
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<NodeId, Node>, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let state: FleetState = serde_json::from_slice(&data).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        self.store_snapshot(&StoredSnapshot { meta: meta.clone(), data })?;
        *self.applied.write().expect("fleet state lock") = Applied { last_applied: meta.last_log_id, membership: meta.last_membership.clone(), state };
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        Ok(self.stored_snapshot()?.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::StorageError;
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
            let d = tempfile::tempdir().expect("tempdir");
            let (l, s) = open(d.path()).expect("open");
            Ok((d, l, s))
        }
    }

    /// openraft's own conformance suite for storage (logs, votes, membership from log and
    /// snapshot, purge and truncate, snapshots) against this store on disk.
    #[test]
    fn the_store_passes_openraft_s_storage_suite() {
        Suite::test_all(Builder).expect("openraft storage suite");
    }
}
