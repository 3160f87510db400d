//! A training run's directory, held by one process at a time.
//!
//! Opening a run directory takes an exclusive lock on `RUN/.lock` (an OS file lock, so a process that crashes
//! or is killed releases it with its file handles; the file itself may stay behind and is reused). A second
//! `trainer train` on the same directory fails at once, naming the pid that holds it. A fresh run refuses a
//! directory that already holds something, so a finished run is never overwritten by accident: continue it
//! ([`OpenMode::Resume`]) or clear it first ([`OpenMode::Overwrite`]). Temporary files that a killed process
//! left (`.NAME.tmp-PID`, from atomic writes) are removed when their process is gone.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file inside a run directory.
pub const LOCK_FILE: &str = ".lock";

/// How to open a run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// A new run: the directory must be missing or empty.
    New,
    /// Continue the run in the directory from its newest checkpoint.
    Resume,
    /// Delete whatever the directory holds, then start a new run.
    Overwrite,
}

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error(
        "{dir} is in use by another trainer process (pid {pid}); wait for it to finish or stop it"
    )]
    Locked { dir: String, pid: String },
    #[error(
        "{dir} already holds {found}: pass --resume to continue that run, or --overwrite to delete it and start over"
    )]
    NotEmpty { dir: String, found: String },
    #[error("{dir}: --resume: there is no run to resume here")]
    NothingToResume { dir: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError + '_ {
    move |source| RunDirError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// An open, locked run directory. The lock lasts as long as this value.
#[derive(Debug)]
pub struct RunDir {
    dir: PathBuf,
    mode: OpenMode,
    _lock: File,
}

impl RunDir {
    /// Creates (if needed) and locks `dir`, then checks it against `mode`; `Overwrite` empties it.
    pub fn open(dir: &Path, mode: OpenMode) -> Result<Self, RunDirError> {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = lock.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(RunDirError::Locked {
                    dir: dir.display().to_string(),
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.into()
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        // The holder's pid, for the message a second process prints.
        lock.set_len(0).map_err(io(&lock_path))?;
        lock.seek(SeekFrom::Start(0)).map_err(io(&lock_path))?;
        write!(lock, "{}", std::process::id()).map_err(io(&lock_path))?;
        lock.flush().map_err(io(&lock_path))?;

        let run = Self {
            dir,
            mode,
            _lock: lock,
        };
        let entries = run.entries()?;
        match mode {
            OpenMode::New if !entries.is_empty() => {
                let mut names: Vec<String> = entries
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect();
                names.sort();
                let shown = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
                let more = names.len().saturating_sub(5);
                return Err(RunDirError::NotEmpty {
                    dir: run.dir.display().to_string(),
                    found: if more > 0 {
                        format!("{shown} and {more} more")
                    } else {
                        shown
                    },
                });
            }
            OpenMode::Resume if entries.is_empty() => {
                return Err(RunDirError::NothingToResume {
                    dir: run.dir.display().to_string(),
                });
            }
            OpenMode::Overwrite => {
                for p in entries {
                    remove(&p, p.is_dir())?;
                }
            }
            _ => run.remove_stale_temporaries()?,
        }
        Ok(run)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether this run continues an earlier one.
    pub fn resumes(&self) -> bool {
        self.mode == OpenMode::Resume
    }

    /// Everything in the directory but the lock file.
    fn entries(&self) -> Result<Vec<PathBuf>, RunDirError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let e = e.map_err(io(&self.dir))?;
            if e.file_name() != LOCK_FILE {
                out.push(e.path());
            }
        }
        Ok(out)
    }

    /// Removes stale temporaries anywhere below the run (see [`remove_stale_temporaries`]).
    fn remove_stale_temporaries(&self) -> Result<(), RunDirError> {
        let mut stack = vec![self.dir.clone()];
        while let Some(dir) = stack.pop() {
            stack.extend(remove_stale_temporaries(&dir)?);
        }
        Ok(())
    }
}

/// The pid in a temporary name `.NAME.tmp-PID`.
fn temporary_owner(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    name.rsplit_once(".tmp-")?.1.parse().ok()
}

/// Whether process `pid` still runs. Where that cannot be told (no `/proc`), every process counts as alive, so
/// nothing is removed.
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc_dir = Path::new("/proc");
    !proc_dir.is_dir() || proc_dir.join(pid.to_string()).exists()
}

/// Removes the `.NAME.tmp-PID` files and folders in `dir` whose process is gone (an atomic write interrupted by
/// a kill leaves one behind); returns the other folders in `dir`, for a caller that goes deeper.
pub fn remove_stale_temporaries(dir: &Path) -> Result<Vec<PathBuf>, RunDirError> {
    let mut folders = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if temporary_owner(&name).is_some_and(|pid| !process_alive(pid)) {
            remove(&path, is_dir)?;
        } else if is_dir {
            folders.push(path);
        }
    }
    Ok(folders)
}

fn remove(path: &Path, is_dir: bool) -> Result<(), RunDirError> {
    let removed = if is_dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    removed.map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("aj-rundir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let d = temp("lock");
        let first = RunDir::open(&d, OpenMode::New).unwrap();
        let e = RunDir::open(&d, OpenMode::Resume).unwrap_err().to_string();
        assert!(
            e.contains("in use") && e.contains(&std::process::id().to_string()),
            "{e}"
        );
        drop(first);
        // Released with its holder: the lock file left behind is no obstacle.
        assert!(d.join(LOCK_FILE).is_file());
        RunDir::open(&d, OpenMode::New).unwrap();
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_new_run_refuses_a_used_directory_and_overwrite_clears_it() {
        let d = temp("used");
        std::fs::create_dir_all(d.join("checkpoint-4")).unwrap();
        std::fs::write(d.join("run.json"), b"{}").unwrap();
        let e = RunDir::open(&d, OpenMode::New).unwrap_err().to_string();
        assert!(
            e.contains("checkpoint-4") && e.contains("run.json") && e.contains("--overwrite"),
            "{e}"
        );
        let run = RunDir::open(&d, OpenMode::Overwrite).unwrap();
        assert!(!run.join("run.json").exists() && !run.join("checkpoint-4").exists());
        drop(run);
        let e = RunDir::open(&d, OpenMode::Resume).unwrap_err().to_string();
        assert!(e.contains("no run to resume"), "{e}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn temporaries_of_dead_processes_are_removed() {
        let d = temp("tmp");
        std::fs::create_dir_all(d.join("prepared")).unwrap();
        std::fs::write(d.join("run.json"), b"{}").unwrap();
        // pid 0 is no user process; our own pid is alive.
        let dead = d.join("prepared/.train.bin.tmp-0");
        let dead_dir = d.join(".checkpoint-8.tmp-0");
        let alive = d.join(format!(".log.jsonl.tmp-{}", std::process::id()));
        std::fs::write(&dead, b"x").unwrap();
        std::fs::create_dir_all(&dead_dir).unwrap();
        std::fs::write(&alive, b"x").unwrap();
        let _run = RunDir::open(&d, OpenMode::Resume).unwrap();
        assert!(!dead.exists() && !dead_dir.exists());
        assert!(alive.exists());
        std::fs::remove_dir_all(&d).ok();
    }
}
