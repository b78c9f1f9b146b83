//! The record of finished deployments (`<state_dir>/history.jsonl`, one JSON report a line) and
//! the deploy lock (`<state_dir>/deploy.lock`).
//!
//! Append-only JSON lines keep this readable with standard tools; a line that does not parse is
//! reported with its line number rather than skipped silently.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::deploy::{Outcome, Report};

fn history_file(state_dir: &Path) -> PathBuf {
    state_dir.join("history.jsonl")
}

/// Appends a report and flushes it to disk.
pub fn record(state_dir: &Path, report: &Report) -> anyhow::Result<()> {
    fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
    let path = history_file(state_dir);
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut line = serde_json::to_string(report)?;
    line.push('\n');
    f.write_all(line.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Every recorded deployment, oldest first.
pub fn load(state_dir: &Path) -> anyhow::Result<Vec<Report>> {
    let path = history_file(state_dir);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "{}:{}: not a deployment record (edit or remove that line)",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// The release before the live one: the `from` of the newest successful deployment.
pub fn previous_release(state_dir: &Path) -> anyhow::Result<Option<String>> {
    Ok(load(state_dir)?
        .into_iter()
        .rev()
        .find(|r| r.outcome == Outcome::Succeeded)
        .and_then(|r| r.from))
}

/// Who holds the deploy lock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockHolder {
    pub pid: u32,
    pub user: String,
    pub machine: String,
    pub started_unix: u64,
    pub what: String,
}

/// The held lock; released (file removed) on drop.
pub struct Lock {
    path: PathBuf,
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Takes the deploy lock, or says who holds it. A lock whose process is gone is taken over.
pub fn lock(state_dir: &Path, what: &str) -> anyhow::Result<Lock> {
    fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
    let path = state_dir.join("deploy.lock");
    let me = LockHolder {
        pid: std::process::id(),
        user: std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
        machine: fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        what: what.to_string(),
    };
    for _ in 0..2 {
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                f.write_all(serde_json::to_string(&me)?.as_bytes())?;
                f.sync_all()?;
                return Ok(Lock { path });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder: Option<LockHolder> = fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
                match holder {
                    Some(h) if process_alive(h.pid) && h.machine == me.machine => {
                        anyhow::bail!(
                            "another deployment holds the lock: {} by {} on {} (pid {}), started {} s ago ({})",
                            h.what,
                            h.user,
                            h.machine,
                            h.pid,
                            me.started_unix.saturating_sub(h.started_unix),
                            path.display()
                        );
                    }
                    _ => {
                        eprintln!(
                            "taking over a stale deploy lock ({}): its holder is gone",
                            path.display()
                        );
                        let _ = fs::remove_file(&path);
                    }
                }
            }
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
        }
    }
    anyhow::bail!("could not take the deploy lock {}", path.display())
}

/// A live, non-zombie process with this pid on this machine.
pub fn process_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.chars().next()))
        .flatten()
        .is_some_and(|state| state != 'Z' && state != 'X')
}
