//! The daemon's record of each transfer in flight: one JSON file per job in `api.jobs_dir`,
//! written whole and renamed into place, removed when the job ends. A daemon restarted
//! mid-transfer reads them back ([`super::Jobs::recover`]) and takes the jobs up again.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::Request;

/// Largest record read back, bytes (a request is at most 64 KiB).
const MAX_RECORD: u64 = 128 << 10;
/// Most records read back: a daemon runs at most [`super::MAX_RUNNING`] at once.
const MAX_RECORDS: usize = 1024;

/// What a restarted daemon needs to take a job up again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub id: u64,
    /// The request as submitted.
    pub request: Request,
    /// When it was submitted, milliseconds since the Unix epoch (its deadline counts from then).
    pub submitted_ms: u64,
    /// The chunk size its plan chose: a resumed run must use it, since the receiver keeps its
    /// journal of what it holds for that chunk size only.
    pub chunk_size: Option<u32>,
    /// How many times a restarted daemon has taken it up.
    pub restarts: u32,
}

/// The records directory.
#[derive(Debug)]
pub struct Records {
    dir: PathBuf,
    /// Where each write and removal is told too (the fleet's replicated record of jobs).
    mirror: std::sync::OnceLock<crossbeam_channel::Sender<Mirror>>,
}

/// A change to the records, as the fleet is told of it.
#[derive(Debug, Clone)]
pub enum Mirror {
    /// Written (or rewritten).
    Put(Box<Record>),
    /// Ended, and how.
    End(u64, String),
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Records {
    /// Opens (or creates, mode 0700) the directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, String> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| format!("api.jobs_dir {}: {e}", dir.display()))?;
        // Probe that it is writable now rather than at the first job.
        let probe = dir.join(".probe");
        std::fs::write(&probe, b"").map_err(|e| format!("api.jobs_dir {}: {e}", dir.display()))?;
        let _ = std::fs::remove_file(probe);
        Ok(Self { dir: dir.to_owned(), mirror: std::sync::OnceLock::new() })
    }

    /// Tells `tx` of every write and removal from now on.
    pub fn mirror_to(&self, tx: crossbeam_channel::Sender<Mirror>) {
        let _ = self.mirror.set(tx);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `r` whole (a temporary renamed over the old one): it survives the daemon; with
    /// `sync`, the file and the directory are synced too, so that it survives the host (a few
    /// milliseconds to a second on a busy disk, which a job's start does not wait for).
    pub fn write(&self, r: &Record, sync: bool) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{}.tmp", r.id));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?)?;
        if sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.path(r.id))?;
        if sync {
            std::fs::File::open(&self.dir)?.sync_all()?;
        }
        if let Some(tx) = self.mirror.get() {
            let _ = tx.send(Mirror::Put(Box::new(r.clone())));
        }
        self.bump_last_id(r.id)
    }

    /// Rewrites job `id`'s record with `f` applied (nothing if it has none or it is unreadable).
    pub fn update(&self, id: u64, f: impl FnOnce(&mut Record)) -> std::io::Result<()> {
        let Ok(text) = std::fs::read(self.path(id)) else { return Ok(()) };
        let Ok(mut r) = serde_json::from_slice::<Record>(&text) else { return Ok(()) };
        f(&mut r);
        self.write(&r, true)
    }

    /// Forgets job `id`: it ended, as `outcome` says.
    pub fn remove(&self, id: u64, outcome: &str) {
        let _ = std::fs::remove_file(self.path(id));
        if let Some(tx) = self.mirror.get() {
            let _ = tx.send(Mirror::End(id, outcome.to_owned()));
        }
    }

    /// The records found, by id, and what was wrong with the files that are not records (each
    /// set aside as `NAME.bad`, so the next start does not trip on it again).
    pub fn load(&self) -> (Vec<Record>, Vec<String>) {
        let (mut found, mut bad) = (Vec::new(), Vec::new());
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return (found, bad) };
        for e in entries.flatten().take(MAX_RECORDS) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json").and_then(|s| s.parse::<u64>().ok()) else { continue };
            let r = (|| -> Result<Record, String> {
                let mut text = Vec::new();
                std::fs::File::open(e.path()).and_then(|f| f.take(MAX_RECORD + 1).read_to_end(&mut text)).map_err(|e| e.to_string())?;
                if text.len() as u64 > MAX_RECORD {
                    return Err(format!("longer than {MAX_RECORD} bytes"));
                }
                let r: Record = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
                if r.id != id {
                    return Err(format!("it names job {}", r.id));
                }
                Ok(r)
            })();
            match r {
                Ok(r) => found.push(r),
                Err(why) => {
                    let _ = std::fs::rename(e.path(), self.dir.join(format!("{name}.bad")));
                    bad.push(format!("{}: {why} (set aside as {name}.bad)", e.path().display()));
                }
            }
        }
        found.sort_by_key(|r| r.id);
        (found, bad)
    }

    /// The highest job id ever recorded here, so that a restarted daemon does not reuse one.
    pub fn last_id(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("last-id")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    fn bump_last_id(&self, id: u64) -> std::io::Result<()> {
        if id <= self.last_id() {
            return Ok(());
        }
        let tmp = self.dir.join(".last-id.tmp");
        std::fs::write(&tmp, format!("{id}\n"))?;
        std::fs::rename(tmp, self.dir.join("last-id"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64) -> Record {
        Record { id, request: Request { to: "127.0.0.1:1".into(), source: "gen:1MiB".into(), ..Request::default() }, submitted_ms: 5, chunk_size: Some(1 << 20), restarts: 0 }
    }

    #[test]
    fn records_round_trip_and_bad_files_are_set_aside_with_the_reason() {
        let d = tempfile::tempdir().unwrap();
        let rs = Records::open(&d.path().join("jobs")).unwrap();
        rs.write(&record(3), true).unwrap();
        rs.write(&record(1), false).unwrap();
        assert_eq!(rs.last_id(), 3);
        std::fs::write(rs.dir().join("7.json"), b"{not json").unwrap();
        std::fs::write(rs.dir().join("8.json"), serde_json::to_vec(&record(9)).unwrap()).unwrap();
        std::fs::write(rs.dir().join("9.json"), vec![b' '; MAX_RECORD as usize + 1]).unwrap();
        std::fs::write(rs.dir().join("notes.txt"), b"ignored").unwrap();
        let (found, bad) = rs.load();
        assert_eq!(found, vec![record(1), record(3)]);
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad.iter().any(|b| b.contains("7.json") && b.contains("set aside as 7.json.bad")), "{bad:?}");
        assert!(bad.iter().any(|b| b.contains("8.json") && b.contains("it names job 9")), "{bad:?}");
        assert!(bad.iter().any(|b| b.contains("9.json") && b.contains("longer than")), "{bad:?}");
        assert!(rs.dir().join("7.json.bad").exists() && !rs.dir().join("7.json").exists());
        assert_eq!(rs.load().1, Vec::<String>::new(), "set aside once");
        rs.remove(3, "verified");
        assert_eq!(rs.load().0, vec![record(1)]);
        assert_eq!(rs.last_id(), 3, "ids are not reused");
    }
}
