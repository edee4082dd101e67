//! The receiver's output directory: where objects are published under the sender's names, and a
//! private state directory inside it (`.dwcp-state`, mode 0700) where sessions keep their
//! partial outputs and resume journals until publication.
//!
//! Every file is reached relative to a directory descriptor opened once, never by a path a peer
//! can influence: temporary files are created `O_EXCL | O_NOFOLLOW` under a name derived from
//! the object name's hash (fixed length, so any accepted name has a creatable temporary), and
//! published with one `renameat` into the output directory, which is then synced. An object's
//! name therefore never reaches the receiver's own files: `x.part` is an object like any other,
//! and a symbolic link in the output directory is never followed (a rename replaces the link
//! itself; the previous round of a delta round is opened `O_NOFOLLOW`).

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags, RenameFlags};

/// The state directory's name inside the output directory: the one object name refused besides
/// those `wire::check_name` refuses.
pub const STATE_DIR: &str = ".dwcp-state";

/// What a temporary file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The partial output, renamed to the object's name when verified.
    Part,
    /// The resume journal.
    Journal,
}

impl Kind {
    fn ext(self) -> &'static str {
        match self {
            Kind::Part => "part",
            Kind::Journal => "journal",
        }
    }
}

/// The output directory and its state directory, held open.
#[derive(Debug)]
pub struct OutDir {
    path: PathBuf,
    dir: OwnedFd,
    state: OwnedFd,
    name_max: usize,
    mode: Mode,
    /// Held for the receiver's life: a second receiver process on the same directory is refused.
    _lock: OwnedFd,
}

/// The file name of `name`'s temporary of `kind` in the state directory.
fn temp_name(name: &str, kind: Kind) -> String {
    format!("{}.{}", key(name), kind.ext())
}

/// The fixed-length key of an object name in the state directory.
pub fn key(name: &str) -> String {
    let h = blake3::hash(name.as_bytes());
    crate::recv::hex(&h.as_bytes()[..16])
}

impl OutDir {
    /// Opens (creating if needed) `path` and its state directory. `mode` is the permission of
    /// published objects (and of their temporaries).
    pub fn open(path: &Path, mode: u32) -> io::Result<OutDir> {
        std::fs::create_dir_all(path)?;
        let dir = rustix::fs::open(path, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
        match rustix::fs::mkdirat(&dir, STATE_DIR, Mode::RWXU) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let state = rustix::fs::openat(&dir, STATE_DIR, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{STATE_DIR} in {} is not a directory dwcp can use ({e})", path.display())))?;
        let st = rustix::fs::fstat(&state)?;
        if st.st_uid != rustix::process::geteuid().as_raw() {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("{}/{STATE_DIR} belongs to another user", path.display())));
        }
        rustix::fs::fchmod(&state, Mode::RWXU)?;
        let lockf = rustix::fs::openat(&state, "lock", OFlags::CREATE | OFlags::NOFOLLOW | OFlags::RDWR | OFlags::CLOEXEC, Mode::RUSR | Mode::WUSR)?;
        rustix::fs::flock(&lockf, FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| io::Error::new(io::ErrorKind::AddrInUse, format!("another dwcp receiver uses {} (its {STATE_DIR}/lock is held)", path.display())))?;
        let name_max = rustix::fs::fstatvfs(&dir).map(|v| v.f_namemax as usize).unwrap_or(255).min(crate::wire::MAX_NAME);
        Ok(OutDir { path: path.to_owned(), dir, state, name_max, mode: Mode::from_raw_mode(mode & 0o7777), _lock: lockf })
    }

    /// The directory's path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where an object is published (for messages and outcomes).
    pub fn final_path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Where a temporary file lives (for messages).
    pub fn temp_path(&self, name: &str, kind: Kind) -> PathBuf {
        self.path.join(STATE_DIR).join(temp_name(name, kind))
    }

    /// Checks that the receiver can publish `name` here (beyond `wire::check_name`, which the
    /// Hello's decoder already applied): not the state directory, and no longer than this file
    /// system's longest name.
    pub fn check_name(&self, name: &str) -> Result<(), String> {
        if name == STATE_DIR {
            return Err(format!("{STATE_DIR:?} is the receiver's own state directory"));
        }
        if name.len() > self.name_max {
            return Err(format!("the name is {} bytes; this receiver's file system takes at most {}", name.len(), self.name_max));
        }
        Ok(())
    }

    /// Bytes free to this process in the directory's file system.
    pub fn free_space(&self) -> io::Result<u64> {
        let v = rustix::fs::fstatvfs(&self.dir)?;
        Ok(v.f_bavail.saturating_mul(v.f_frsize))
    }

    /// Creates `name`'s temporary of `kind` anew (removing a stale one first): exclusive, never
    /// through a link, with the receiver's file mode, locked against a second receiver process
    /// on the same directory.
    pub fn create(&self, name: &str, kind: Kind) -> io::Result<File> {
        let file = temp_name(name, kind);
        match rustix::fs::unlinkat(&self.state, &file, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = rustix::fs::openat(&self.state, &file, OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::RDWR | OFlags::CLOEXEC, self.mode)?;
        rustix::fs::fchmod(&fd, self.mode)?;
        Ok(File::from(fd))
    }

    /// Opens `name`'s existing temporary of `kind` (a resume), if it is a regular file.
    pub fn open_existing(&self, name: &str, kind: Kind) -> io::Result<File> {
        let file = temp_name(name, kind);
        let fd = rustix::fs::openat(&self.state, &file, OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
        regular(&fd)?;
        Ok(File::from(fd))
    }

    /// Removes `name`'s temporary of `kind`, if any.
    pub fn remove(&self, name: &str, kind: Kind) {
        let _ = rustix::fs::unlinkat(&self.state, temp_name(name, kind), AtFlags::empty());
    }

    /// Opens the published object `name` for reading (a delta round's previous round): a
    /// regular file, never through a link.
    pub fn open_published(&self, name: &str) -> io::Result<File> {
        let fd = rustix::fs::openat(&self.dir, name, OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
        regular(&fd)?;
        Ok(File::from(fd))
    }

    /// An anonymous file in the state directory (`O_TMPFILE`): no name, so no other process can
    /// open, truncate or replace it. Falls back to a created-and-unlinked file where the file
    /// system lacks `O_TMPFILE`.
    pub fn anonymous(&self) -> io::Result<File> {
        match rustix::fs::openat(&self.state, ".", OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC, Mode::RUSR | Mode::WUSR) {
            Ok(fd) => Ok(File::from(fd)),
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL) => {
                let mut r = [0u8; 8];
                getrandom::fill(&mut r).map_err(io::Error::other)?;
                let n = format!("anon-{}", crate::recv::hex(&r));
                let fd = rustix::fs::openat(&self.state, &n, OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::RDWR | OFlags::CLOEXEC, Mode::RUSR | Mode::WUSR)?;
                let _ = rustix::fs::unlinkat(&self.state, &n, AtFlags::empty());
                Ok(File::from(fd))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Publishes `name`'s partial output under `name`: one rename (replacing whatever entry had
    /// that name, a link included, never following it), then the directories are synced so the
    /// new name survives a crash.
    pub fn publish(&self, name: &str) -> io::Result<()> {
        let file = temp_name(name, Kind::Part);
        rustix::fs::renameat_with(&self.state, &file, &self.dir, name, RenameFlags::empty())?;
        rustix::fs::fsync(&self.dir)?;
        rustix::fs::fsync(&self.state)?;
        Ok(())
    }

    /// Removes temporaries last modified before `now - keep` whose key is not in `live`: the
    /// partial outputs of interrupted sessions nobody resumed in time. Returns how many.
    pub fn expire(&self, keep: Duration, live: &dyn Fn(&str) -> bool) -> usize {
        let Ok(rd) = std::fs::read_dir(self.path.join(STATE_DIR)) else { return 0 };
        let cutoff = SystemTime::now().checked_sub(keep).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut n = 0;
        for e in rd.flatten() {
            let fname = e.file_name();
            let Some(f) = fname.to_str() else { continue };
            let Some((k, _)) = f.split_once('.') else { continue };
            if k.len() != 32 {
                continue;
            }
            if live(k) {
                continue;
            }
            let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < cutoff);
            if old && rustix::fs::unlinkat(&self.state, f, AtFlags::empty()).is_ok() {
                n += 1;
            }
        }
        n
    }
}

/// Checks that a file opened `O_NONBLOCK` (so that a FIFO or device planted under the name
/// cannot block the open) is a regular file, then makes its I/O blocking again.
fn regular(fd: &OwnedFd) -> io::Result<()> {
    let st = rustix::fs::fstat(fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    let fl = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, fl - OFlags::NONBLOCK)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn temporaries_live_apart_from_objects_and_publish_by_rename() {
        let t = tempfile::tempdir().unwrap();
        let d = OutDir::open(t.path(), 0o600).unwrap();
        // An object named like another's temporary is just an object.
        std::fs::write(t.path().join("x.part"), b"other").unwrap();
        let mut f = d.create("x", Kind::Part).unwrap();
        f.write_all(b"hello").unwrap();
        d.publish("x").unwrap();
        assert_eq!(std::fs::read(t.path().join("x")).unwrap(), b"hello");
        assert_eq!(std::fs::read(t.path().join("x.part")).unwrap(), b"other");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(t.path().join("x")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(t.path().join(STATE_DIR)).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn links_are_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), b"precious").unwrap();
        let d = OutDir::open(t.path(), 0o600).unwrap();
        // A link where the object is published is replaced, not written through.
        std::os::unix::fs::symlink(outside.path(), t.path().join("y")).unwrap();
        d.create("y", Kind::Part).unwrap().write_all(b"new").unwrap();
        d.publish("y").unwrap();
        assert!(!std::fs::symlink_metadata(t.path().join("y")).unwrap().file_type().is_symlink());
        let mut s = String::new();
        File::open(outside.path()).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "precious");
        // A link as the previous round is refused.
        assert!(d.open_published("y").is_ok());
        std::os::unix::fs::symlink(outside.path(), t.path().join("z")).unwrap();
        assert!(d.open_published("z").is_err());
        // A link planted at a temporary's place is removed, not followed.
        std::os::unix::fs::symlink(outside.path(), d.temp_path("w", Kind::Part)).unwrap();
        d.create("w", Kind::Part).unwrap().write_all(b"w").unwrap();
        assert_eq!(std::fs::read(outside.path()).unwrap(), b"precious");
        std::os::unix::fs::symlink(outside.path(), d.temp_path("v", Kind::Journal)).unwrap();
        assert!(d.open_existing("v", Kind::Journal).is_err());
        // A FIFO where a file is expected is refused at once, not waited on.
        let fifo = |p: &Path| assert!(std::process::Command::new("mkfifo").arg(p).status().unwrap().success());
        fifo(&t.path().join("f"));
        assert!(d.open_published("f").is_err());
        fifo(&d.temp_path("f", Kind::Journal));
        assert!(d.open_existing("f", Kind::Journal).is_err());
    }

    #[test]
    fn a_second_receiver_is_refused_and_expiry_spares_live_sessions() {
        let t = tempfile::tempdir().unwrap();
        let d = OutDir::open(t.path(), 0o600).unwrap();
        let e = OutDir::open(t.path(), 0o600).unwrap_err();
        assert!(e.to_string().contains("another dwcp receiver"), "{e}");
        let _held = d.create("a", Kind::Part).unwrap();
        let _b = d.create("b", Kind::Journal).unwrap();
        let ka = key("a");
        assert_eq!(d.expire(Duration::ZERO, &|k| k == ka), 1);
        assert!(d.temp_path("a", Kind::Part).exists());
        assert!(!d.temp_path("b", Kind::Journal).exists());
        assert!(d.check_name(STATE_DIR).is_err());
        assert!(d.check_name(&"n".repeat(255)).is_ok());
    }
}
