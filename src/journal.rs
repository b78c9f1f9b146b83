//! The durable journal: every deployment, every step (written before it acts and after it ends),
//! events, the deploy lock and commands from other terminals, in one SQLite file
//! (`<state_dir>/journal.db`).
//!
//! Why a database and not a log file: a deploy killed at any instant must leave a record that a
//! later `cutover deploy --resume` or `cutover rollback` can trust, and two processes (a deploy
//! and a `cutover promote` from another terminal) must be able to write at once. SQLite in WAL
//! mode gives atomic writes and a busy timeout for the second writer. Each write is its own
//! transaction, committed before the step's side effect starts.
//!
//! Durability comes in two strengths. Steps and events are committed with `synchronous =
//! NORMAL`: they survive the deployer being killed at any instant (the crash tests prove it),
//! and a power cut of the control machine can lose only the last few of them, which recovery
//! does not need, because it reads the hosts and the balancer rather than trusting steps. The
//! records recovery does rely on (a deployment's start with every host's previous release, its
//! outcome) are committed with `synchronous = FULL`, which also flushes every write before them.
//! An fsync per step would cost about 0.3 ms each, ten times per host. The lock is not synced on
//! its own: a power cut that loses it also ended the deploy that held it, and a deployment's
//! start (synced) keeps a later deploy from running over what that one left.
//!
//! The schema is versioned with `PRAGMA user_version`: older files are migrated in place, files
//! from a newer cutover are refused with a clear message, and a file that is not a database is
//! reported, never misread.
//!
//! Testing hook (debug builds only): with `CUTOVER_CRASH_AFTER_WRITE=k` in the environment, the
//! process kills itself with SIGKILL right after its k-th journal write. The crash tests use it to stop a deploy at
//! every step boundary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// The schema this cutover writes.
pub const SCHEMA_VERSION: i64 = 6;

/// Migrations from version N-1 to N, in order; index 0 creates version 1.
const MIGRATIONS: [&str; 6] = [
    // 1: deployments and steps.
    "CREATE TABLE deployments (
        id TEXT PRIMARY KEY,
        app TEXT NOT NULL,
        kind TEXT NOT NULL,
        strategy TEXT NOT NULL,
        version_from TEXT,
        version_to TEXT NOT NULL,
        who TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        ended_ms INTEGER,
        outcome TEXT,
        previous_json TEXT NOT NULL,
        report_json TEXT
    );
    CREATE TABLE steps (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        deployment TEXT NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
        host TEXT NOT NULL,
        action TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        started_ms INTEGER NOT NULL,
        ended_ms INTEGER,
        result TEXT
    );
    CREATE INDEX steps_by_deployment ON steps(deployment);",
    // 2: events, the lock, commands from other terminals, live status.
    "CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        deployment TEXT,
        at_ms INTEGER NOT NULL,
        message TEXT NOT NULL
    );
    CREATE TABLE lock (
        app TEXT PRIMARY KEY,
        holder_json TEXT NOT NULL,
        lease_until_ms INTEGER NOT NULL
    );
    CREATE TABLE commands (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        deployment TEXT NOT NULL,
        command TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        taken INTEGER NOT NULL DEFAULT 0
    );
    ALTER TABLE deployments ADD COLUMN status_json TEXT;",
    // 3: balancer counters sampled while a deployment runs (the deploy report's timeline).
    "CREATE TABLE samples (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        deployment TEXT NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
        at_ms INTEGER NOT NULL,
        data_json TEXT NOT NULL
    );
    CREATE INDEX samples_by_deployment ON samples(deployment, at_ms);",
    // 4: GitHub pushes `cutover serve` accepted, so a redelivered or replayed one is known as
    // such after a restart too.
    "CREATE TABLE pushes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        delivery TEXT UNIQUE,
        key TEXT NOT NULL,
        before_sha TEXT NOT NULL,
        after_sha TEXT NOT NULL,
        at_ms INTEGER NOT NULL
    );
    CREATE INDEX pushes_by_key ON pushes(key, id);",
    // 5: jobs waiting in `cutover serve`'s queue, so a restart runs them instead of losing
    // a push it had accepted. A job leaves the table when it starts, is replaced or cancelled;
    // AUTOINCREMENT keeps job ids unique across restarts.
    "CREATE TABLE serve_queue (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        app TEXT NOT NULL,
        work_json TEXT NOT NULL,
        key TEXT,
        trigger TEXT NOT NULL,
        queued_ms INTEGER NOT NULL
    );",
    // 6: a push is looked up by its (before, after) among every push kept for its branch, so
    // a replay of an old one is known however many pushes came since.
    "CREATE INDEX pushes_by_pair ON pushes(key, after_sha, before_sha);",
];

/// A job `cutover serve` had queued (see [`Journal::queue_job`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    pub id: u64,
    pub work_json: String,
    pub key: Option<String>,
    pub trigger: String,
    pub queued_ms: u64,
}

/// Accepted pushes kept in the journal (the oldest are dropped past this).
const PUSHES_KEPT: i64 = 10_000;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A deployment as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeploymentRow {
    pub id: String,
    pub app: String,
    pub kind: String,
    pub strategy: String,
    pub from: Option<String>,
    pub to: String,
    pub who: String,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    /// None while running, or when the deployment was interrupted.
    pub outcome: Option<String>,
    /// Release each host served before the deployment (None: nothing).
    pub previous: BTreeMap<String, Option<String>>,
    pub report: Option<serde_json::Value>,
    /// Live status of a running deployment (step, weight, last analysis verdict).
    pub status: Option<serde_json::Value>,
    /// Why `previous` could not be read, for an unfinished deployment: it is then read as
    /// empty, fine to show, but not to resume or undo from (see [`DeploymentRow::recoverable`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

impl DeploymentRow {
    /// Refuses to resume or undo from a record whose `previous` is damaged: read as empty,
    /// every host would look like it served nothing and be emptied.
    pub fn recoverable(&self) -> anyhow::Result<()> {
        match &self.damaged {
            Some(why) => anyhow::bail!("{why}"),
            None => Ok(()),
        }
    }
}

/// A step as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRow {
    pub id: i64,
    pub host: String,
    pub action: String,
    pub detail: String,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    /// `ok`, `failed: ...`, or None when the process died during the step.
    pub result: Option<String>,
}

/// An event as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRow {
    pub at_ms: u64,
    pub message: String,
}

/// Who holds the deploy lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    pub user: String,
    pub machine: String,
    pub pid: u32,
    pub started_ms: u64,
    pub what: String,
}

impl LockHolder {
    /// Known to be gone: a process of this machine that no longer runs, or whose pid a later
    /// process now has (after a reboot, say). A holder on another machine sharing the journal
    /// is not known to be gone; its lease tells. Every "is the deployer still there?" in
    /// cutover asks this, so the lock, `status`, the commands and `unlock` agree.
    pub fn is_gone(&self) -> bool {
        self.machine == machine_name()
            && (!process_alive(self.pid) || process_started_after(self.pid, self.started_ms))
    }

    /// This process, doing `what`.
    pub fn me(what: &str) -> LockHolder {
        LockHolder {
            user: user_name(),
            machine: machine_name(),
            pid: std::process::id(),
            started_ms: now_ms(),
            what: what.to_string(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} by {} on {} (pid {}), started {} s ago",
            self.what,
            self.user,
            self.machine,
            self.pid,
            now_ms().saturating_sub(self.started_ms) / 1000
        )
    }
}

/// A live, non-zombie process with this pid on this machine.
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next())
        })
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// When the process running as `pid` started, in clock ticks since boot (field 22 of
/// /proc/PID/stat): with the pid, it names one process, where a pid alone may be reused.
pub(crate) fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's ") " comes field 3 (state): field 22 is index 19.
    stat.rsplit_once(") ")?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Whether the process now running as `pid` started after `ms` (unix ms): then it is not the
/// one that took a lock at `ms`, but a later one that reuses its pid.
pub(crate) fn process_started_after(pid: u32, ms: u64) -> bool {
    let start_ticks = process_start_ticks(pid);
    let boot_secs = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    // SAFETY: sysconf has no preconditions.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    match (start_ticks, boot_secs, u64::try_from(ticks_per_sec)) {
        (Some(t), Some(boot), Ok(hz)) if hz > 0 => {
            let started_ms = boot * 1000 + t * 1000 / hz;
            // Clock ticks and btime are coarse (10 ms, 1 s): only a clear margin counts.
            started_ms > ms + 2000
        }
        _ => false,
    }
}

/// Who runs this process, for the journal's `who`, lock messages and reports: `$USER` or
/// `$LOGNAME` as a login sets them; else (cron, systemd units, containers set neither) the name
/// the password database gives the real uid; else the uid itself, which still tells who it was
/// where "unknown" would not.
fn user_name() -> String {
    let from_env = ["USER", "LOGNAME"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.trim().is_empty());
    if let Some(name) = from_env {
        return name;
    }
    // SAFETY: getuid(2) cannot fail.
    let uid = unsafe { libc::getuid() };
    passwd_name(uid).unwrap_or_else(|| uid.to_string())
}

/// The login name of `uid` in the password database (files, LDAP, ... as nsswitch says).
fn passwd_name(uid: libc::uid_t) -> Option<String> {
    let mut buf = vec![0u8; 1024];
    // Large groups of LDAP users can need more than the first guess: grow on ERANGE, bounded.
    while buf.len() <= 1 << 20 {
        // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids); getpwuid_r fills it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `pwd`, `buf` and `found` outlive the call and `buf.len()` is its size; on
        // success `found` points at `pwd`, whose strings point into `buf`.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || found.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        // SAFETY: getpwuid_r succeeded: `pw_name` is a NUL-terminated string inside `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
        let name = name.to_string_lossy().into_owned();
        return (!name.is_empty()).then_some(name);
    }
    None
}

pub(crate) fn machine_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
#[error("another deployment holds the lock: {}", holder.describe())]
pub struct LockHeld {
    pub holder: LockHolder,
}

/// What taking the lock found.
#[derive(Debug)]
pub enum Taken {
    Free,
    /// A stale holder (dead process on this machine, or expired lease) was replaced.
    TookOver(LockHolder, &'static str),
}

/// The journal of one state directory.
pub struct Journal {
    conn: Mutex<Connection>,
    path: PathBuf,
    writes: AtomicU64,
    crash_after: Option<u64>,
}

impl Journal {
    /// Opens (creating or migrating) `<state_dir>/journal.db`.
    pub fn open(state_dir: &Path) -> anyhow::Result<Journal> {
        if state_dir.exists() && !state_dir.is_dir() {
            anyhow::bail!(
                "the state directory {} is a file: set state_dir in the config to a directory (default: .cutover beside the config)",
                state_dir.display()
            );
        }
        std::fs::create_dir_all(state_dir).with_context(|| {
            format!(
                "cannot create the state directory {} (state_dir in the config; default: .cutover beside it)",
                state_dir.display()
            )
        })?;
        Journal::open_file(&state_dir.join("journal.db"))
    }

    pub fn open_file(path: &Path) -> anyhow::Result<Journal> {
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the journal {}", path.display()))?;
        let corrupt = |e: rusqlite::Error| {
            use rusqlite::ErrorCode::{CannotOpen, PermissionDenied, ReadOnly};
            // A file this user may not write is not a damaged one: moving it aside would lose
            // an interrupted deployment's record for nothing.
            if let rusqlite::Error::SqliteFailure(f, _) = &e {
                if matches!(f.code, ReadOnly | PermissionDenied | CannotOpen) {
                    return anyhow::anyhow!(
                        "cannot write the journal {} ({e}): cutover writes it even to read it (the deploy lock, commands); run as the user that owns it, or fix the permissions of the file, its -wal and -shm files and its directory",
                        path.display()
                    );
                }
            }
            anyhow::anyhow!(
                "the journal {} is not a readable cutover journal ({e}): move it aside to start a new one (history is lost) or restore it from a backup",
                path.display()
            )
        };
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(corrupt)?;
        // Turning a new file to WAL needs it alone for an instant, and SQLite does not wait
        // for that (no busy handler): two commands opening a new journal at once retry here.
        let mut tries = 0;
        loop {
            match conn.pragma_update(None, "journal_mode", "WAL") {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy && tries < 200 =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(corrupt(e)),
            }
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(corrupt)?;
        // The WAL stays between commands (checkpointed as it grows, not at every close): every
        // command would otherwise pay a checkpoint with its fsyncs when it exits, and the next
        // one the creation of a new WAL with a directory fsync.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .map_err(corrupt)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(corrupt)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(corrupt)?;
        if version > SCHEMA_VERSION {
            anyhow::bail!(
                "the journal {} has schema version {version}, newer than this cutover understands ({SCHEMA_VERSION}): upgrade cutover, or move the file aside",
                path.display()
            );
        }
        if version < SCHEMA_VERSION {
            if version > 0 {
                // A check that the file really is what its version says before changing it.
                conn.query_row("SELECT count(*) FROM deployments", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(corrupt)?;
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                let to = i as i64 + 1;
                // Another command may be migrating the same file (two commands right after an
                // upgrade): take the write lock first, then look again at what is done.
                let tx = rusqlite::Transaction::new_unchecked(
                    &conn,
                    rusqlite::TransactionBehavior::Immediate,
                )
                .map_err(corrupt)?;
                let done: i64 = tx
                    .pragma_query_value(None, "user_version", |r| r.get(0))
                    .map_err(corrupt)?;
                if done >= to {
                    continue;
                }
                tx.execute_batch(sql).with_context(|| {
                    format!(
                        "migrating the journal {} to schema version {to}",
                        path.display()
                    )
                })?;
                tx.pragma_update(None, "user_version", to)
                    .map_err(corrupt)?;
                tx.commit().map_err(corrupt)?;
            }
        }
        // Only in debug builds (the test suite's): a release binary ignores the variable, so
        // nothing a user's environment holds can make a deploy kill itself.
        let crash_after = if cfg!(debug_assertions) {
            std::env::var("CUTOVER_CRASH_AFTER_WRITE")
                .ok()
                .and_then(|v| v.parse().ok())
        } else {
            None
        };
        Ok(Journal {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            writes: AtomicU64::new(0),
            crash_after,
        })
    }

    /// Copies the WAL into the database file on a thread of its own, while the caller goes on.
    /// Why: the WAL stays between commands (see `open_file`), and every command's open reads
    /// all of it to rebuild its index, about 5 ms at the 4 MB where SQLite would checkpoint by
    /// itself. Checkpointed during a deployment's idle waits, the next command finds only that
    /// deployment's few pages. A checkpoint cut short by the process's exit is safe: SQLite
    /// repeats it.
    pub fn checkpoint_in_background(&self) {
        let path = self.path.clone();
        std::thread::spawn(move || {
            let Ok(conn) = Connection::open(&path) else {
                return;
            };
            let _ = conn.set_db_config(
                rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
                true,
            );
            let _ = conn.busy_timeout(Duration::from_secs(10));
            let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        });
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> anyhow::Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).with_context(|| format!("journal {}", self.path.display()))
    }

    /// A write: committed before it returns; it survives the process being killed.
    fn write<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> anyhow::Result<T> {
        self.write_with(false, f)
    }

    /// A write that also survives a power cut (and flushes every write before it).
    fn write_synced<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> anyhow::Result<T> {
        self.write_with(true, f)
    }

    fn write_with<T>(
        &self,
        synced: bool,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> anyhow::Result<T> {
        let out = self.with(|c| {
            if !synced {
                return f(c);
            }
            c.pragma_update(None, "synchronous", "FULL")?;
            let out = f(c);
            c.pragma_update(None, "synchronous", "NORMAL")?;
            out
        })?;
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if self.crash_after == Some(n) {
            // Testing hook: die exactly here, as a kill -9 would.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        Ok(out)
    }

    /// Records a new deployment.
    pub fn begin(&self, d: &DeploymentRow) -> anyhow::Result<()> {
        let previous = serde_json::to_string(&d.previous)?;
        self.write_synced(|c| {
            c.execute(
                "INSERT INTO deployments (id, app, kind, strategy, version_from, version_to, who, started_ms, previous_json)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![d.id, d.app, d.kind, d.strategy, d.from, d.to, d.who, d.started_ms as i64, previous],
            )
        })?;
        Ok(())
    }

    /// Records that a step starts; returns its id for [`Journal::step_end`].
    pub fn step_start(
        &self,
        deployment: &str,
        host: &str,
        action: &str,
        detail: &str,
    ) -> anyhow::Result<i64> {
        self.write(|c| {
            c.prepare_cached(
                "INSERT INTO steps (deployment, host, action, detail, started_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![deployment, host, action, detail, now_ms() as i64])?;
            Ok(c.last_insert_rowid())
        })
    }

    /// Records how a step ended (`ok` or `failed: reason`), with an updated detail.
    pub fn step_end(&self, step: i64, result: &str, detail: Option<&str>) -> anyhow::Result<()> {
        self.write(|c| match detail {
            Some(d) => c
                .prepare_cached(
                    "UPDATE steps SET ended_ms = ?1, result = ?2, detail = ?3 WHERE id = ?4",
                )?
                .execute(params![now_ms() as i64, result, d, step]),
            None => c
                .prepare_cached("UPDATE steps SET ended_ms = ?1, result = ?2 WHERE id = ?3")?
                .execute(params![now_ms() as i64, result, step]),
        })?;
        Ok(())
    }

    pub fn event(&self, deployment: Option<&str>, message: &str) -> anyhow::Result<()> {
        self.write(|c| {
            c.execute(
                "INSERT INTO events (deployment, at_ms, message) VALUES (?1, ?2, ?3)",
                params![deployment, now_ms() as i64, message],
            )
        })?;
        Ok(())
    }

    /// Records the outcome (and the report) of a deployment.
    pub fn finish(
        &self,
        id: &str,
        outcome: &str,
        report: &serde_json::Value,
    ) -> anyhow::Result<()> {
        let report = report.to_string();
        self.write_synced(|c| {
            c.execute(
                // The live status was the running deployment's; once it ended, its outcome and
                // report say what happened, and a last "verifying" phase would only mislead.
                "UPDATE deployments SET ended_ms = ?1, outcome = ?2, report_json = ?3, status_json = NULL WHERE id = ?4",
                params![now_ms() as i64, outcome, report, id],
            )
        })?;
        Ok(())
    }

    /// Live status of a running deployment, for `cutover status` in another terminal.
    pub fn set_status(&self, id: &str, status: &serde_json::Value) -> anyhow::Result<()> {
        let status = status.to_string();
        self.with(|c| {
            c.execute(
                "UPDATE deployments SET status_json = ?1 WHERE id = ?2",
                params![status, id],
            )
        })?;
        Ok(())
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeploymentRow> {
        let id: String = r.get(0)?;
        let outcome: Option<String> = r.get(9)?;
        let previous: String = r.get(10)?;
        let report: Option<String> = r.get(11)?;
        let status: Option<String> = r.get(12)?;
        let mut damaged = None;
        let previous = match serde_json::from_str(&previous) {
            Ok(p) => p,
            Err(e) => {
                if outcome.is_none() {
                    damaged = Some(format!(
                        "the unfinished deployment {id} has a damaged record of what each host served before it (previous_json: {e}), so it cannot be resumed or rolled back safely: check every host with `cutover status`, then mark it ended with `sqlite3 <journal> \"UPDATE deployments SET outcome = 'failed' WHERE id = '{id}'\"`"
                    ));
                }
                BTreeMap::new()
            }
        };
        Ok(DeploymentRow {
            id,
            app: r.get(1)?,
            kind: r.get(2)?,
            strategy: r.get(3)?,
            from: r.get(4)?,
            to: r.get(5)?,
            who: r.get(6)?,
            started_ms: r.get::<_, i64>(7)? as u64,
            ended_ms: r.get::<_, Option<i64>>(8)?.map(|v| v as u64),
            outcome,
            previous,
            report: report.and_then(|r| serde_json::from_str(&r).ok()),
            status: status.and_then(|s| serde_json::from_str(&s).ok()),
            damaged,
        })
    }

    const COLUMNS: &'static str = "id, app, kind, strategy, version_from, version_to, who, started_ms, ended_ms, outcome, previous_json, report_json, status_json";

    /// The deployment `id`, or the newest without one (`cutover show [ID]`); the error says
    /// where to look.
    pub fn deployment_or_newest(
        &self,
        app: &str,
        id: Option<&str>,
    ) -> anyhow::Result<DeploymentRow> {
        match id {
            Some(id) => self.deployment(id)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "no deployment {id} in {} (see `cutover history`)",
                    self.path().display()
                )
            }),
            None => self.deployments(app, 1)?.into_iter().next().ok_or_else(|| {
                anyhow::anyhow!(
                    "no deployments of {app} recorded in {}",
                    self.path().display()
                )
            }),
        }
    }

    /// Releases `app`'s recorded deployments went to or found on a host, newest first, each
    /// once: what may still be staged on the hosts, under its name.
    pub fn known_releases(&self, app: &str) -> anyhow::Result<Vec<String>> {
        let mut known: Vec<String> = Vec::new();
        for row in self.deployments(app, usize::MAX >> 1)? {
            for v in std::iter::once(row.to).chain(row.previous.into_values().flatten()) {
                if !known.contains(&v) {
                    known.push(v);
                }
            }
        }
        Ok(known)
    }

    /// `app`'s deployments, newest first (apps may share a state directory).
    pub fn deployments(&self, app: &str, limit: usize) -> anyhow::Result<Vec<DeploymentRow>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {} FROM deployments WHERE app = ?2 ORDER BY started_ms DESC, rowid DESC LIMIT ?1",
                Self::COLUMNS
            ))?;
            let rows = stmt.query_map(params![limit as i64, app], Self::row)?;
            rows.collect()
        })
    }

    pub fn deployment(&self, id: &str) -> anyhow::Result<Option<DeploymentRow>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {} FROM deployments WHERE id = ?1", Self::COLUMNS),
                params![id],
                Self::row,
            )
            .optional()
        })
    }

    /// `app`'s deployment without an outcome, if any: running now, or interrupted. Apps that
    /// share a state directory share the journal, never each other's deployments.
    pub fn unfinished(&self, app: &str) -> anyhow::Result<Option<DeploymentRow>> {
        self.with(|c| {
            c.query_row(
                &format!(
                    "SELECT {} FROM deployments WHERE outcome IS NULL AND app = ?1 ORDER BY started_ms DESC LIMIT 1",
                    Self::COLUMNS
                ),
                params![app],
                Self::row,
            )
            .optional()
        })
    }

    pub fn steps(&self, deployment: &str) -> anyhow::Result<Vec<StepRow>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, host, action, detail, started_ms, ended_ms, result FROM steps WHERE deployment = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![deployment], |r| {
                Ok(StepRow {
                    id: r.get(0)?,
                    host: r.get(1)?,
                    action: r.get(2)?,
                    detail: r.get(3)?,
                    started_ms: r.get::<_, i64>(4)? as u64,
                    ended_ms: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
                    result: r.get(6)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn events(&self, deployment: &str) -> anyhow::Result<Vec<EventRow>> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT at_ms, message FROM events WHERE deployment = ?1 ORDER BY id")?;
            let rows = stmt.query_map(params![deployment], |r| {
                Ok(EventRow {
                    at_ms: r.get::<_, i64>(0)? as u64,
                    message: r.get(1)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Where `cutover rollback` returns: the `from` of the newest deploy that changed the fleet
    /// (succeeded, or halted with some hosts moved) and that no later rollback has undone.
    /// Deployments that rolled back left the fleet where it was, and a deploy of the live
    /// release changed nothing. Rollbacks are not counted: the release a rollback left is
    /// the one it was taking the fleet away from, so a second `cutover rollback` goes further
    /// back instead of redeploying it; a rollback to where most hosts already were (after a
    /// failed deploy) undid nothing before it. When the newest deployment is a deploy that
    /// failed, it may have left hosts on its release (one it could not return): the way back
    /// is its `from`; when it is a rollback that failed, the way back is where it was going.
    /// Deployments that moved no host (halted before any, or rolled back) are passed over in
    /// that look: a mending rollback that could not reach its hosts leaves the failed deploy
    /// before it as the newest change.
    pub fn previous_release(&self, app: &str) -> anyhow::Result<Option<String>> {
        self.with(|c| {
            let newest: Option<(String, String, Option<String>, String)> = c
                .query_row(
                    "SELECT kind, outcome, version_from, version_to FROM deployments \
                     WHERE app = ?1 AND outcome IS NOT NULL \
                     AND NOT (outcome IN ('halted', 'rolled_back') \
                       AND coalesce(json_array_length(report_json, '$.moved_hosts'), 0) = 0) \
                     ORDER BY started_ms DESC, rowid DESC LIMIT 1",
                    params![app],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            if let Some((kind, outcome, from, to)) = newest {
                match (kind.as_str(), outcome.as_str(), from) {
                    ("deploy", "failed", Some(from)) if from != to => return Ok(Some(from)),
                    ("rollback", "failed", _) => return Ok(Some(to)),
                    _ => {}
                }
            }
            c.query_row(
                "SELECT version_from FROM deployments d WHERE app = ?1 AND kind = 'deploy' \
                 AND (outcome = 'succeeded' \
                   OR (outcome = 'halted' AND json_array_length(report_json, '$.moved_hosts') > 0)) \
                 AND (version_from IS NULL OR version_from != version_to) \
                 AND NOT EXISTS (SELECT 1 FROM deployments r WHERE r.app = d.app AND r.kind = 'rollback' \
                   AND r.outcome = 'succeeded' AND r.version_from = d.version_to \
                   AND r.version_from != r.version_to AND r.started_ms >= d.started_ms) \
                 ORDER BY started_ms DESC, rowid DESC LIMIT 1",
                params![app],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .map(Option::flatten)
        })
    }

    /// Instances deployments started: `(host, version, port)`, from the `start` steps.
    pub fn started_instances(&self) -> anyhow::Result<Vec<(String, String, u16)>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT host, detail FROM steps WHERE action = 'start' AND result = 'ok'",
            )?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (host, detail) = row?;
                // detail: "<version>@<address>:<port>"
                if let Some((version, addr)) = detail.split_once('@') {
                    if let Some(port) = addr.rsplit(':').next().and_then(|p| p.parse().ok()) {
                        out.push((host, version.to_string(), port));
                    }
                }
            }
            Ok(out)
        })
    }

    /// Keeps the newest `keep` finished deployments (and their steps and events), the newest
    /// deploy or rollback that succeeded, and on each host the one that last started an
    /// instance there: those started the instances the fleet most likely still runs, and
    /// without their `start` steps `cutover status` would call them drift. (A readmit starts
    /// nothing, and an HAProxy reload a day would otherwise push the deploy that started the
    /// live instances out of the history.)
    pub fn prune(&self, app: &str, keep: usize) -> anyhow::Result<usize> {
        self.with(|c| {
            let n = c.execute(
                "DELETE FROM deployments WHERE app = ?2 AND outcome IS NOT NULL AND id NOT IN
                 (SELECT id FROM deployments WHERE app = ?2 ORDER BY started_ms DESC, rowid DESC LIMIT ?1)
                 AND id NOT IN (SELECT id FROM deployments WHERE app = ?2 AND outcome = 'succeeded'
                 AND kind != 'readmit' ORDER BY started_ms DESC, rowid DESC LIMIT 1)
                 AND id NOT IN (SELECT deployment FROM steps WHERE id IN
                   (SELECT MAX(s.id) FROM steps s JOIN deployments d ON d.id = s.deployment
                    WHERE d.app = ?2 AND s.action = 'start' AND s.result = 'ok' GROUP BY s.host))",
                params![keep as i64, app],
            )?;
            c.execute(
                "DELETE FROM events WHERE deployment IS NOT NULL AND deployment NOT IN (SELECT id FROM deployments)",
                [],
            )?;
            Ok(n)
        })
    }

    /// Takes the deploy lock for `app`, or fails with [`LockHeld`]. A holder whose process is
    /// gone (same machine) or whose lease expired is stale and is replaced.
    pub fn lock(&self, app: &str, me: &LockHolder, lease: Duration) -> anyhow::Result<Taken> {
        let taken = self.write(|c| {
            // IMMEDIATE: take the write lock before reading, so a concurrent writer makes us wait
            // (busy_timeout) instead of failing the upgrade from read to write (BUSY_SNAPSHOT).
            let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
            let current: Option<(String, i64)> = tx
                .query_row(
                    "SELECT holder_json, lease_until_ms FROM lock WHERE app = ?1",
                    params![app],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let outcome = match current {
                None => Ok(Taken::Free),
                Some((json, lease_until)) => {
                    let holder: LockHolder = serde_json::from_str(&json).unwrap_or(LockHolder {
                        user: "unknown".into(),
                        machine: "unknown".into(),
                        pid: 0,
                        started_ms: 0,
                        what: "unreadable lock".into(),
                    });
                    if holder.machine == me.machine && holder.pid == me.pid {
                        Ok(Taken::Free)
                    } else if holder.is_gone() {
                        Ok(Taken::TookOver(holder, "its process is gone"))
                    } else if holder.machine != me.machine && (lease_until as u64) < now_ms() {
                        // On this machine a live holder keeps its lock whatever its lease: a
                        // stopped (Ctrl-Z) or slow deployer would otherwise lose it and carry
                        // on beside the deploy that took it. Only a holder elsewhere, whose
                        // process cannot be seen from here, is judged by its lease.
                        Ok(Taken::TookOver(holder, "its lease expired"))
                    } else {
                        Err(holder)
                    }
                }
            };
            if outcome.is_ok() {
                tx.execute(
                    "INSERT INTO lock (app, holder_json, lease_until_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT(app) DO UPDATE SET holder_json = excluded.holder_json, lease_until_ms = excluded.lease_until_ms",
                    params![app, serde_json::to_string(me).unwrap_or_default(), (now_ms() + lease.as_millis() as u64) as i64],
                )?;
            }
            tx.commit()?;
            Ok(outcome)
        })?;
        match taken {
            Ok(t) => {
                if let Taken::TookOver(h, why) = &t {
                    self.event(
                        None,
                        &format!("took over a stale deploy lock ({why}): {}", h.describe()),
                    )?;
                }
                Ok(t)
            }
            Err(holder) => Err(LockHeld { holder }.into()),
        }
    }

    /// Extends our lease; false when the lock is no longer ours (another machine's deploy
    /// took it over after our lease expired).
    pub fn renew(&self, app: &str, me: &LockHolder, lease: Duration) -> anyhow::Result<bool> {
        let updated = self.with(|c| {
            c.execute(
                "UPDATE lock SET lease_until_ms = ?1 WHERE app = ?2 AND holder_json = ?3",
                params![
                    (now_ms() + lease.as_millis() as u64) as i64,
                    app,
                    serde_json::to_string(me).unwrap_or_default()
                ],
            )
        })?;
        Ok(updated > 0)
    }

    /// Releases our lock.
    pub fn unlock(&self, app: &str, me: &LockHolder) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM lock WHERE app = ?1 AND holder_json = ?2",
                params![app, serde_json::to_string(me).unwrap_or_default()],
            )
        })?;
        Ok(())
    }

    /// Removes whoever holds the lock, and records it.
    pub fn force_unlock(&self, app: &str, by: &LockHolder) -> anyhow::Result<Option<LockHolder>> {
        let held = self.lock_holder(app)?;
        self.write(|c| c.execute("DELETE FROM lock WHERE app = ?1", params![app]))?;
        let what = match &held {
            Some(h) => format!(
                "lock forcibly released by {} on {}: was held by {}",
                by.user,
                by.machine,
                h.describe()
            ),
            None => format!(
                "unlock --force by {} on {}: the lock was free",
                by.user, by.machine
            ),
        };
        self.event(None, &what)?;
        Ok(held)
    }

    pub fn lock_holder(&self, app: &str) -> anyhow::Result<Option<LockHolder>> {
        self.with(|c| {
            c.query_row(
                "SELECT holder_json FROM lock WHERE app = ?1",
                params![app],
                |r| r.get::<_, String>(0),
            )
            .optional()
        })
        .map(|j| j.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// Leaves a command (promote, abort, pause, resume, rollback) for a running deployment.
    pub fn post_command(&self, deployment: &str, command: &str) -> anyhow::Result<()> {
        self.write(|c| {
            c.execute(
                "INSERT INTO commands (deployment, command, at_ms) VALUES (?1, ?2, ?3)",
                params![deployment, command, now_ms() as i64],
            )
        })?;
        self.event(Some(deployment), &format!("command received: {command}"))
    }

    /// The first `abort` or `rollback` posted for `deployment` at or after `since_ms`, read or
    /// not (an operator's command that a waiting terminal may already have taken).
    pub fn stop_posted_since(
        &self,
        deployment: &str,
        since_ms: u64,
    ) -> anyhow::Result<Option<String>> {
        self.with(|c| {
            c.query_row(
                "SELECT command FROM commands WHERE deployment = ?1 AND at_ms >= ?2
                 AND command IN ('abort', 'rollback') ORDER BY id LIMIT 1",
                params![deployment, since_ms as i64],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Stores timeline samples `(at_ms, data)` of a deployment (not counted as a step write:
    /// samples are observations, not decisions).
    pub fn add_samples(
        &self,
        deployment: &str,
        samples: &[(u64, serde_json::Value)],
    ) -> anyhow::Result<()> {
        if samples.is_empty() {
            return Ok(());
        }
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO samples (deployment, at_ms, data_json) VALUES (?1, ?2, ?3)",
                )?;
                for (at, data) in samples {
                    stmt.execute(params![deployment, *at as i64, data.to_string()])?;
                }
            }
            tx.commit()
        })
    }

    /// Timeline samples of a deployment, oldest first.
    pub fn samples(&self, deployment: &str) -> anyhow::Result<Vec<(u64, serde_json::Value)>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT at_ms, data_json FROM samples WHERE deployment = ?1 ORDER BY at_ms, id",
            )?;
            let rows = stmt.query_map(params![deployment], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (at, json) = row?;
                if let Ok(v) = serde_json::from_str(&json) {
                    out.push((at, v));
                }
            }
            Ok(out)
        })
    }

    /// Whether a webhook delivery (`X-GitHub-Delivery`) was accepted before.
    pub fn push_delivered(&self, delivery: &str) -> anyhow::Result<bool> {
        self.with(|c| {
            c.query_row(
                "SELECT 1 FROM pushes WHERE delivery = ?1",
                params![delivery],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
        })
    }

    /// The newest `limit` pushes accepted for `key` (repository and ref) as `(before, after)`,
    /// oldest first.
    pub fn pushes(&self, key: &str, limit: usize) -> anyhow::Result<Vec<(String, String)>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT before_sha, after_sha FROM pushes WHERE key = ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![key, limit as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            out.reverse();
            Ok(out)
        })
    }

    /// Whether a push from `before` to `after` was accepted for `key` (repository and ref),
    /// among every push the journal keeps (not only the newest): `X-GitHub-Delivery` is not
    /// signed, so a replay comes under a fresh id and only this pair tells it.
    pub fn push_accepted(&self, key: &str, before: &str, after: &str) -> anyhow::Result<bool> {
        self.with(|c| {
            c.query_row(
                "SELECT 1 FROM pushes WHERE key = ?1 AND after_sha = ?2 AND before_sha = ?3 LIMIT 1",
                params![key, after, before],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
        })
    }

    /// Records an accepted push (`delivery`: its `X-GitHub-Delivery`, when it had one).
    pub fn add_push(
        &self,
        delivery: Option<&str>,
        key: &str,
        before: &str,
        after: &str,
    ) -> anyhow::Result<()> {
        self.write(|c| {
            c.execute(
                "INSERT INTO pushes (delivery, key, before_sha, after_sha, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![delivery, key, before, after, now_ms() as i64],
            )?;
            c.execute(
                "DELETE FROM pushes WHERE id <= (SELECT max(id) FROM pushes) - ?1",
                params![PUSHES_KEPT],
            )
        })?;
        Ok(())
    }

    /// Keeps a job `app`'s `cutover serve` queued; returns its id.
    pub fn queue_job(
        &self,
        app: &str,
        work_json: &str,
        key: Option<&str>,
        trigger: &str,
        queued_ms: u64,
    ) -> anyhow::Result<u64> {
        self.write(|c| {
            c.execute(
                "INSERT INTO serve_queue (app, work_json, key, trigger, queued_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![app, work_json, key, trigger, queued_ms as i64],
            )?;
            Ok(c.last_insert_rowid() as u64)
        })
    }

    /// Forgets a queued job (it started, was replaced or cancelled).
    pub fn unqueue_job(&self, id: u64) -> anyhow::Result<()> {
        self.write(|c| c.execute("DELETE FROM serve_queue WHERE id = ?1", params![id as i64]))?;
        Ok(())
    }

    /// The jobs `app`'s `cutover serve` had queued, oldest first (apps may share a state
    /// directory: each runs only its own).
    pub fn queued_jobs(&self, app: &str) -> anyhow::Result<Vec<QueuedJob>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, work_json, key, trigger, queued_ms FROM serve_queue WHERE app = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![app], |r| {
                Ok(QueuedJob {
                    id: r.get::<_, i64>(0)? as u64,
                    work_json: r.get(1)?,
                    key: r.get(2)?,
                    trigger: r.get(3)?,
                    queued_ms: r.get::<_, i64>(4)? as u64,
                })
            })?;
            rows.collect()
        })
    }

    /// The release the fleet was left on by the newest finished deployment, as far as the
    /// journal knows: its target when it succeeded, its start when it rolled back; `None`
    /// when it halted or failed part-way (hosts may differ) or nothing ran yet.
    pub fn live_release(&self, app: &str) -> anyhow::Result<Option<String>> {
        self.with(|c| {
            c.query_row(
                "SELECT outcome, version_from, version_to FROM deployments \
                 WHERE app = ?1 AND outcome IS NOT NULL ORDER BY started_ms DESC, rowid DESC LIMIT 1",
                params![app],
                |r| {
                    let outcome: String = r.get(0)?;
                    Ok(match outcome.as_str() {
                        "succeeded" => Some(r.get::<_, String>(2)?),
                        "rolled_back" => r.get::<_, Option<String>>(1)?,
                        _ => None,
                    })
                },
            )
            .optional()
            .map(Option::flatten)
        })
    }

    /// Commands a deployment never read, marked taken so nothing acts on them later: for a
    /// deployment that has ended, they came too late.
    pub fn drop_unread_commands(&self, deployment: &str) -> anyhow::Result<Vec<String>> {
        self.with(|c| {
            let tx =
                rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
            let unread = {
                let mut stmt = tx.prepare(
                    "SELECT command FROM commands WHERE deployment = ?1 AND taken = 0 ORDER BY id",
                )?;
                let rows = stmt.query_map(params![deployment], |r| r.get::<_, String>(0))?;
                rows.collect::<rusqlite::Result<Vec<String>>>()?
            };
            tx.execute(
                "UPDATE commands SET taken = 1 WHERE deployment = ?1 AND taken = 0",
                params![deployment],
            )?;
            tx.commit()?;
            Ok(unread)
        })
    }

    /// Takes the oldest untaken command for a deployment.
    pub fn take_command(&self, deployment: &str) -> anyhow::Result<Option<String>> {
        Ok(self.take_first(deployment, "")?.map(|(c, _)| c))
    }

    /// As [`Journal::take_command`], with when the command was posted (unix ms): a command
    /// aimed at one moment (the canary step on screen) can be told from one that arrives late.
    pub fn take_command_at(&self, deployment: &str) -> anyhow::Result<Option<(String, u64)>> {
        self.take_first(deployment, "")
    }

    /// Takes the oldest `abort` or `rollback` queued for `deployment`, leaving any other
    /// command queued for the moment it means something (a strategy checks this before it
    /// moves traffic, where `promote` or `pause` would be premature).
    pub fn take_stop_command(&self, deployment: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .take_first(deployment, "AND command IN ('abort', 'rollback')")?
            .map(|(c, _)| c))
    }

    /// Whether an `abort` (or, with `rollback_stops`, a `rollback`) waits for `deployment`. It
    /// stays queued: work that may run for minutes (a verification command) watches for one
    /// to end early, and the usual reader then takes and acts on it.
    pub fn stop_command_waiting(
        &self,
        deployment: &str,
        rollback_stops: bool,
    ) -> anyhow::Result<bool> {
        let commands = if rollback_stops {
            "('abort', 'rollback')"
        } else {
            "('abort')"
        };
        let query = format!(
            "SELECT EXISTS (SELECT 1 FROM commands WHERE deployment = ?1 AND taken = 0 AND command IN {commands})"
        );
        self.with(|c| c.query_row(&query, params![deployment], |r| r.get(0)))
    }

    /// Marks the oldest untaken command of `deployment` that matches `filter` (SQL, a
    /// constant) taken, and returns it with when it was posted.
    fn take_first(&self, deployment: &str, filter: &str) -> anyhow::Result<Option<(String, u64)>> {
        let query = format!(
            "SELECT id, command, at_ms FROM commands WHERE deployment = ?1 AND taken = 0 {filter} ORDER BY id LIMIT 1"
        );
        self.with(|c| {
            let tx =
                rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
            let cmd: Option<(i64, String, i64)> = tx
                .query_row(&query, params![deployment], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            if let Some((id, _, _)) = &cmd {
                tx.execute("UPDATE commands SET taken = 1 WHERE id = ?1", params![id])?;
            }
            tx.commit()?;
            Ok(cmd.map(|(_, c, at)| (c, at.max(0) as u64)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, to: &str) -> DeploymentRow {
        DeploymentRow {
            id: id.into(),
            app: "a".into(),
            kind: "deploy".into(),
            strategy: "rolling".into(),
            from: Some("v1".into()),
            to: to.into(),
            who: "t".into(),
            started_ms: now_ms(),
            ended_ms: None,
            outcome: None,
            previous: BTreeMap::from([("web1".to_string(), Some("v1".to_string()))]),
            report: None,
            status: None,
            damaged: None,
        }
    }

    /// A finished deployment keeps no live status: its last phase would read as current.
    #[test]
    fn a_finished_deployment_has_no_live_status() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.begin(&row("d1", "v2")).unwrap();
        j.set_status(
            "d1",
            &serde_json::json!({"phase": "verifying (after_batch)"}),
        )
        .unwrap();
        assert!(j.deployment("d1").unwrap().unwrap().status.is_some());
        j.finish("d1", "failed", &serde_json::json!({})).unwrap();
        assert!(j.deployment("d1").unwrap().unwrap().status.is_none());
    }

    /// A stop posted while a resume undid an interrupted deployment is seen even when the
    /// terminal that sent it took it first; older ones and other commands are not.
    #[test]
    fn stops_posted_since_a_moment_are_found_read_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.begin(&row("d1", "v2")).unwrap();
        j.post_command("d1", "abort").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let since = now_ms();
        assert_eq!(j.stop_posted_since("d1", since).unwrap(), None);
        j.post_command("d1", "pause").unwrap();
        assert_eq!(j.stop_posted_since("d1", since).unwrap(), None);
        j.post_command("d1", "rollback").unwrap();
        j.drop_unread_commands("d1").unwrap();
        assert_eq!(
            j.stop_posted_since("d1", since).unwrap().as_deref(),
            Some("rollback")
        );
        assert_eq!(j.stop_posted_since("d2", since).unwrap(), None);
    }

    /// A lock holder whose pid a later process now has (a reboot, pid reuse) is gone, though
    /// that pid is alive: the lock, `status`, the commands and `unlock` must all see it so.
    #[test]
    fn a_holder_whose_pid_a_later_process_has_is_gone() {
        let mut holder = LockHolder::me("deploy v2");
        assert!(!holder.is_gone(), "this process holds it");
        holder.started_ms = now_ms() - 3_600_000;
        assert!(
            holder.is_gone(),
            "this process started long after: a reused pid"
        );
        holder.started_ms = now_ms();
        holder.machine = "elsewhere".into();
        assert!(
            !holder.is_gone(),
            "another machine's holder is judged by its lease"
        );
    }

    /// Apps may share a state directory: each sees, and prunes, only its own deployments.
    #[test]
    fn apps_sharing_a_journal_see_and_prune_only_their_own_deployments() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let ended = |id: &str, app: &str| {
            let mut r = row(id, "v2");
            r.app = app.into();
            j.begin(&r).unwrap();
            j.finish(id, "succeeded", &serde_json::json!({})).unwrap();
        };
        ended("a1", "a");
        ended("a2", "a");
        ended("b1", "b");
        ended("b2", "b");
        let ids = |app: &str| {
            j.deployments(app, 10)
                .unwrap()
                .into_iter()
                .map(|d| d.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids("a"), ["a2", "a1"]);
        assert_eq!(j.deployment_or_newest("a", None).unwrap().id, "a2");
        assert_eq!(j.prune("b", 1).unwrap(), 1);
        assert_eq!(ids("b"), ["b2"]);
        assert_eq!(ids("a"), ["a2", "a1"], "b's history_keep left a's alone");
        // The newest success outlives failures after it: its instances are the live ones.
        for id in ["a3", "a4"] {
            let r = row(id, "v3");
            j.begin(&r).unwrap();
            j.finish(id, "rolled_back", &serde_json::json!({})).unwrap();
        }
        j.prune("a", 2).unwrap();
        assert_eq!(ids("a"), ["a4", "a3", "a2"]);
    }

    /// Regression: readmits succeed and start nothing; after `history_keep` of them the
    /// deploy that started the running instances was pruned, and `status` called them drift.
    #[test]
    fn pruning_keeps_the_deployments_that_started_the_running_instances() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let ended = |id: &str, kind: &str, outcome: &str, starts: &[(&str, &str)]| {
            let mut r = row(id, "v2");
            r.kind = kind.into();
            j.begin(&r).unwrap();
            for (host, detail) in starts {
                let step = j.step_start(id, host, "start", detail).unwrap();
                j.step_end(step, "ok", None).unwrap();
            }
            j.finish(id, outcome, &serde_json::json!({})).unwrap();
        };
        let started = || {
            let mut s = j.started_instances().unwrap();
            s.sort();
            s
        };
        // d1 starts v2 on both hosts; d2 fails on web2 (its v3 there is what web2 runs:
        // the rollback of the rest left it), then readmits and failed deploys pile up.
        ended(
            "d1",
            "deploy",
            "succeeded",
            &[
                ("web1", "v2@127.0.0.11:4001"),
                ("web2", "v2@127.0.0.12:4001"),
            ],
        );
        ended("d2", "deploy", "failed", &[("web2", "v3@127.0.0.12:4002")]);
        for i in 0..5 {
            ended(&format!("r{i}"), "readmit", "succeeded", &[]);
        }
        j.prune("a", 2).unwrap();
        assert_eq!(
            started(),
            [
                ("web1".to_string(), "v2".to_string(), 4001),
                ("web2".to_string(), "v2".to_string(), 4001),
                ("web2".to_string(), "v3".to_string(), 4002),
            ]
        );
        let kept: Vec<String> = j
            .deployments("a", 10)
            .unwrap()
            .into_iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(kept, ["r4", "r3", "d2", "d1"]);
    }

    #[test]
    fn commands_a_deployment_never_read_are_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.begin(&row("d1", "v2")).unwrap();
        j.post_command("d1", "pause").unwrap();
        j.post_command("d1", "rollback").unwrap();
        assert_eq!(j.take_command("d1").unwrap().as_deref(), Some("pause"));
        assert_eq!(j.drop_unread_commands("d1").unwrap(), vec!["rollback"]);
        assert!(j.drop_unread_commands("d1").unwrap().is_empty());
        assert!(j.take_command("d1").unwrap().is_none());
    }

    /// Records a finished deployment `id` of `kind`, `from` -> `to`, that moved `moved`.
    fn finished(
        j: &Journal,
        id: &str,
        kind: &str,
        from: &str,
        to: &str,
        outcome: &str,
        moved: &[&str],
    ) {
        // Deployments start one after another: a rollback started in the same millisecond as
        // a deploy would count as undoing it.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut r = row(id, to);
        r.from = Some(from.into());
        r.kind = kind.into();
        j.begin(&r).unwrap();
        j.finish(id, outcome, &serde_json::json!({ "moved_hosts": moved }))
            .unwrap();
    }

    #[test]
    fn records_deployments_and_steps() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.begin(&row("d1", "v2")).unwrap();
        let s = j.step_start("d1", "web1", "start", "v2").unwrap();
        assert!(j.unfinished("a").unwrap().is_some());
        j.step_end(s, "ok", Some("v2@127.0.0.11:4000")).unwrap();
        j.finish("d1", "succeeded", &serde_json::json!({"served": 5}))
            .unwrap();
        assert!(j.unfinished("a").unwrap().is_none());
        // Another app sharing the state directory: its deployments are not this app's.
        let mut other = row("o1", "v9");
        other.app = "b".into();
        other.from = Some("v7".into());
        j.begin(&other).unwrap();
        assert!(j.unfinished("a").unwrap().is_none());
        assert_eq!(j.unfinished("b").unwrap().unwrap().id, "o1");
        j.finish("o1", "succeeded", &serde_json::json!({})).unwrap();
        assert_eq!(j.previous_release("b").unwrap().as_deref(), Some("v7"));
        assert_eq!(j.previous_release("a").unwrap().as_deref(), Some("v1"));
        let steps = j.steps("d1").unwrap();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].result.as_deref(), Some("ok"));
        assert_eq!(
            j.started_instances().unwrap(),
            vec![("web1".into(), "v2".into(), 4000)]
        );
        assert_eq!(j.previous_release("a").unwrap().as_deref(), Some("v1"));
        // A deploy of the live release changed nothing; a rolled-back one left the fleet where
        // it was; a halted one moved hosts, so a rollback returns to its `from`.
        finished(&j, "d2", "deploy", "v2", "v2", "succeeded", &["web1"]);
        assert_eq!(j.previous_release("a").unwrap().as_deref(), Some("v1"));
        finished(&j, "d3", "deploy", "v2", "v3", "rolled_back", &[]);
        assert_eq!(j.previous_release("a").unwrap().as_deref(), Some("v1"));
        // Halted before any host moved, or a halted rollback: not a change to return from.
        finished(&j, "d3b", "deploy", "v2", "v3", "halted", &[]);
        finished(&j, "d3c", "rollback", "v2", "v1", "halted", &["web1"]);
        assert_eq!(j.previous_release("a").unwrap().as_deref(), Some("v1"));
        finished(&j, "d4", "deploy", "v2", "v3", "halted", &["web1"]);
        assert_eq!(j.previous_release("a").unwrap().as_deref(), Some("v2"));
        // Reopening reads the same.
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(
            j.deployments("a", 10).unwrap()[0].outcome.as_deref(),
            Some("halted")
        );
        assert_eq!(j.previous_release("a").unwrap().as_deref(), Some("v2"));
        // A rollback away from v3 undid the deploy that brought it: the next rollback goes
        // further back (to v1, where the deploy of v2 came from), never forward to v3.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut back = row("d5", "v2");
        back.from = Some("v3".into());
        back.kind = "rollback".into();
        j.begin(&back).unwrap();
        j.finish(
            "d5",
            "succeeded",
            &serde_json::json!({ "moved_hosts": ["web1"] }),
        )
        .unwrap();
        assert_eq!(j.previous_release("a").unwrap().as_deref(), Some("v1"));
        // Review finding: a deploy of v4 failed and left a host on v4 (most stayed on v3). The
        // way back is v3, not v2; and a rollback "v3 -> v3" to mend it undid no deploy, so
        // the next rollback still goes to v2.
        finished(&j, "d6", "deploy", "v2", "v3", "succeeded", &["web1"]);
        finished(&j, "d7", "deploy", "v3", "v4", "failed", &["web1"]);
        assert_eq!(j.previous_release("a").unwrap().as_deref(), Some("v3"));
        finished(&j, "d8", "rollback", "v3", "v3", "succeeded", &["web1"]);
        assert_eq!(j.previous_release("a").unwrap().as_deref(), Some("v2"));
        // Review finding: the mending rollback halted with nothing moved (the stranded host
        // was unreachable). The failed deploy is still the newest change: the way back stays
        // v4's `from`, not two releases back.
        finished(&j, "d9", "deploy", "v3", "v4", "failed", &["web1"]);
        finished(&j, "d10", "rollback", "v3", "v3", "halted", &[]);
        assert_eq!(j.previous_release("a").unwrap().as_deref(), Some("v3"));
        // A mending rollback that failed (it moved some hosts, not all) goes on to its target.
        finished(&j, "d11", "rollback", "v3", "v3", "failed", &[]);
        assert_eq!(j.previous_release("a").unwrap().as_deref(), Some("v3"));
    }

    #[test]
    fn lock_is_exclusive_and_stale_holders_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let me = LockHolder::me("deploy v2");
        assert!(matches!(
            j.lock("a", &me, Duration::from_secs(60)).unwrap(),
            Taken::Free
        ));
        // A live holder on this machine (pid 1 is always alive) blocks.
        let other = LockHolder {
            pid: 1,
            ..LockHolder::me("deploy v3")
        };
        let err = j.lock("a", &other, Duration::from_secs(60)).unwrap_err();
        assert!(err.to_string().contains("deploy v2 by"), "{err}");
        // A dead holder is taken over.
        j.force_unlock("a", &me).unwrap();
        let dead = LockHolder {
            pid: 999_999_999,
            ..LockHolder::me("deploy v1")
        };
        j.lock("a", &dead, Duration::from_secs(60)).unwrap();
        assert!(matches!(
            j.lock("a", &me, Duration::from_secs(60)).unwrap(),
            Taken::TookOver(_, "its process is gone")
        ));
        // An expired lease is taken over even if the holder is alive elsewhere.
        j.force_unlock("a", &me).unwrap();
        let remote = LockHolder {
            machine: "elsewhere".into(),
            ..LockHolder::me("deploy v1")
        };
        j.lock("a", &remote, Duration::from_millis(0)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(
            j.lock("a", &me, Duration::from_secs(60)).unwrap(),
            Taken::TookOver(_, "its lease expired")
        ));
        // The remote holder learns it at its next renewal.
        assert!(!j.renew("a", &remote, Duration::from_secs(60)).unwrap());
        assert!(j.renew("a", &me, Duration::from_secs(60)).unwrap());
        // On this machine a live holder keeps the lock past its lease (a deployer stopped
        // with Ctrl-Z must not find another deploy running beside it when it continues)...
        j.force_unlock("a", &me).unwrap();
        j.lock("a", &other, Duration::from_millis(0)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(j.lock("a", &me, Duration::from_secs(60)).is_err());
        // ...unless its pid now belongs to a later process (pid 1 began after 1970).
        j.force_unlock("a", &me).unwrap();
        let reused = LockHolder {
            pid: 1,
            started_ms: 1_000,
            ..LockHolder::me("deploy v0")
        };
        j.lock("a", &reused, Duration::from_secs(60)).unwrap();
        assert!(matches!(
            j.lock("a", &me, Duration::from_secs(60)).unwrap(),
            Taken::TookOver(_, "its process is gone")
        ));
    }

    #[test]
    fn older_schema_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute(
                "INSERT INTO deployments (id, app, kind, strategy, version_to, who, started_ms, outcome, previous_json)
                 VALUES ('old', 'a', 'deploy', 'rolling', 'v1', 't', 1, 'succeeded', '{}')",
                [],
            )
            .unwrap();
        }
        let j = Journal::open_file(&path).unwrap();
        assert_eq!(j.deployments("a", 10).unwrap()[0].id, "old");
        j.post_command("old", "promote").unwrap();
        assert_eq!(j.take_command("old").unwrap().as_deref(), Some("promote"));
        // A stop command is taken ahead of the others, which stay queued in order.
        for c in ["pause", "promote", "rollback"] {
            j.post_command("old", c).unwrap();
        }
        // Seen without being taken; a rollback only where it stops the run.
        assert!(j.stop_command_waiting("old", true).unwrap());
        assert!(!j.stop_command_waiting("old", false).unwrap());
        assert!(j.stop_command_waiting("old", true).unwrap());
        assert_eq!(
            j.take_stop_command("old").unwrap().as_deref(),
            Some("rollback")
        );
        assert!(!j.stop_command_waiting("old", true).unwrap());
        assert_eq!(j.take_stop_command("old").unwrap(), None);
        assert_eq!(j.take_command("old").unwrap().as_deref(), Some("pause"));
        assert_eq!(j.take_command("old").unwrap().as_deref(), Some("promote"));
        assert_eq!(j.take_command("old").unwrap(), None);
    }

    #[test]
    fn commands_opening_a_new_journal_at_once_all_succeed() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let opened: Vec<_> = (0..4)
                .map(|_| {
                    let path = dir.path().to_path_buf();
                    std::thread::spawn(move || Journal::open(&path).map(drop))
                })
                .collect();
            for o in opened {
                let r = o.join().unwrap();
                assert!(r.is_ok(), "{:#}", r.unwrap_err());
            }
        }
    }

    #[test]
    fn accepted_pushes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        {
            let j = Journal::open_file(&path).unwrap();
            j.add_push(Some("d1"), "k", "0", "a").unwrap();
            j.add_push(None, "k", "a", "b").unwrap();
            j.add_push(None, "other", "x", "y").unwrap();
            assert!(
                j.add_push(Some("d1"), "k", "b", "c").is_err(),
                "one row per delivery"
            );
        }
        let j = Journal::open_file(&path).unwrap();
        assert!(j.push_delivered("d1").unwrap());
        assert!(j.push_accepted("k", "0", "a").unwrap());
        assert!(!j.push_accepted("k", "a", "0").unwrap());
        assert!(!j.push_accepted("other", "0", "a").unwrap());
        assert!(!j.push_delivered("d2").unwrap());
        let pair = |b: &str, a: &str| (b.to_string(), a.to_string());
        assert_eq!(
            j.pushes("k", 10).unwrap(),
            vec![pair("0", "a"), pair("a", "b")]
        );
        assert_eq!(j.pushes("k", 1).unwrap(), vec![pair("a", "b")]);
    }

    #[test]
    fn newer_schema_and_garbage_are_refused_with_a_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        let e = Journal::open_file(&path).err().unwrap().to_string();
        assert!(e.contains("newer than this cutover"), "{e}");
        std::fs::write(
            &path,
            b"this is not a database, just some bytes that go on and on ........",
        )
        .unwrap();
        let e = format!("{:#}", Journal::open_file(&path).err().unwrap());
        assert!(e.contains("not a readable cutover journal"), "{e}");
    }
}
