//! One live run per store: an OS file lock beside the store, released by the kernel when the holder
//! dies, so a lock left by a killed run is taken over without any guessing about PIDs.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Debug)]
pub struct RunLock {
    _file: File,
    pub path: PathBuf,
    /// Who held the lock last, if they left without releasing it cleanly (killed).
    pub taken_over_from: Option<String>,
}

pub fn lock_path(store: &Path) -> PathBuf {
    let mut p = store.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

impl RunLock {
    pub fn acquire(store: &Path) -> Result<RunLock> {
        crate::store::check_location(store)?;
        let path = lock_path(store);
        let unusable = |e: std::io::Error| {
            crate::store::unusable_location(store, &format!("its lock file {}: {e}", path.display()))
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(unusable)?;
        }
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(unusable)?;
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = previous.trim();
                return Err(Error::Locked {
                    store: store.to_path_buf(),
                    holder: if holder.is_empty() { "another flow process".into() } else { holder.to_string() },
                });
            }
            Err(TryLockError::Error(e)) => return Err(Error::Io { path, source: e }),
        }
        let taken_over_from = Some(previous.trim().to_string()).filter(|s| !s.is_empty());
        let me = format!("flow run (pid {}) since {}\n", std::process::id(), chrono::Local::now().format("%F %T"));
        file.set_len(0).map_err(Error::io(&path))?;
        file.seek(SeekFrom::Start(0)).map_err(Error::io(&path))?;
        file.write_all(me.as_bytes()).map_err(Error::io(&path))?;
        file.flush().map_err(Error::io(&path))?;
        Ok(RunLock { _file: file, path, taken_over_from })
    }
}

/// Whether a live process holds the store's lock, found without taking it: the lock file names the
/// holder's pid while it runs and is emptied on a clean exit. Read-only commands use this, so they
/// never stand in the way of a run that is starting.
pub fn holder_alive(store: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(lock_path(store)) else { return false };
    let pid = text.split("(pid ").nth(1).and_then(|r| r.split(')').next()).and_then(|p| p.trim().parse::<u32>().ok());
    match pid {
        Some(pid) if pid == std::process::id() => true,
        // /proc is Linux's; elsewhere a named holder is taken to be alive.
        Some(pid) => !Path::new("/proc").exists() || Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // An empty lock file means "released cleanly"; the kernel drops the lock itself on close.
        let _ = self._file.set_len(0);
    }
}
