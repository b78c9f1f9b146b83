//! Commands run on this machine (builds, git, local hooks, verify commands) under a time limit.
//!
//! Why a module: each of them starts `sh` (or git), which may start more processes. Killing
//! only the top process on timeout left its children running after the deploy, and waiting
//! for the output pipes to close made a command that left a background process behind hold
//! the deploy until its timeout, then fail although it had exited 0. Here every command gets
//! its own process group, killed whole on timeout (or when the caller gives up), and its
//! output is read until it exits and then for at most [`PIPE_GRACE`].
//!
//! Of the output only the last [`TAIL_BYTES`] of each stream are kept (with a note of how much
//! came before): callers show the last lines, and a build printing 600 MB made cutover itself
//! grow to 1 GB. [`run_keeping_stdout`] keeps stdout whole, for output the caller parses (git).

use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// How long output is still read after the command exited, for what its last writes left in
/// the pipes; a background process holding them open is not waited for beyond this.
pub const PIPE_GRACE: Duration = Duration::from_millis(500);

/// How much of a stream's end [`run`] keeps: far more than the lines any message shows.
pub const TAIL_BYTES: usize = 64 * 1024;

/// What a bounded command printed and how it ended.
#[derive(Debug)]
pub struct Ran {
    /// `None`: killed at the timeout.
    pub status: Option<ExitStatus>,
    /// The last [`TAIL_BYTES`] (from a line's start), after a line saying how many bytes
    /// came before; all of it with [`run_keeping_stdout`].
    pub stdout: Vec<u8>,
    /// As `stdout`, always the tail.
    pub stderr: Vec<u8>,
}

impl Ran {
    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }

    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// The exit code, or why there is none, for messages.
    pub fn describe_exit(&self) -> String {
        match self.status {
            None => "killed at its timeout".into(),
            Some(s) => s
                .code()
                .map_or_else(|| "killed by a signal".into(), |c| format!("exit {c}")),
        }
    }
}

/// Process groups that run on our behalf right now: a command here, or a local session
/// (see `transport::session`). Leading its own group takes a command out of the terminal's
/// foreground group, so Ctrl-C no longer reaches it: [`stop_groups_on_signal`] does.
static LIVE_GROUPS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Records a live process group (its leader's pid).
pub fn register_group(pgid: u32) {
    LIVE_GROUPS.lock().expect("live groups").push(pgid);
}

/// Forgets a process group: it ended, or was killed.
pub fn forget_group(pgid: u32) {
    LIVE_GROUPS
        .lock()
        .expect("live groups")
        .retain(|g| *g != pgid);
}

/// Each cleanup with its id and whether it runs after the others (see [`at_signal_exit_last`]).
type ExitHooks = Mutex<Vec<(u64, bool, Box<dyn Fn() + Send>)>>;

/// Cleanups [`stop_groups_on_signal`] runs before it exits, which skips every destructor.
static EXIT_HOOKS: ExitHooks = Mutex::new(Vec::new());
static NEXT_HOOK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A cleanup run if a signal ends the process (see [`stop_groups_on_signal`]); unregistered
/// when dropped, for owners that clean up on their normal way out.
pub struct ExitHook(u64);

/// Registers `f` to run before a signal ends the process.
pub fn at_signal_exit(f: impl Fn() + Send + 'static) -> ExitHook {
    register_exit_hook(false, Box::new(f))
}

/// Registers `f` to run before a signal ends the process, after every [`at_signal_exit`]
/// cleanup: for closing what those may still use (SSH connections a fleet lock's release
/// goes through).
pub fn at_signal_exit_last(f: impl Fn() + Send + 'static) -> ExitHook {
    register_exit_hook(true, Box::new(f))
}

fn register_exit_hook(last: bool, f: Box<dyn Fn() + Send>) -> ExitHook {
    let id = NEXT_HOOK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    EXIT_HOOKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((id, last, f));
    ExitHook(id)
}

impl Drop for ExitHook {
    fn drop(&mut self) {
        EXIT_HOOKS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(id, _, _)| *id != self.0);
    }
}

/// Resolves at the first SIGINT (Ctrl-C), SIGTERM (`kill`, `timeout`, a CI job cancelled) or
/// SIGHUP (a closed terminal), with the signal's name: for commands that clean up after
/// themselves before exiting. A signal that cannot be watched is not waited for.
pub async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    async fn next(s: &mut Option<Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let mut int = signal(SignalKind::interrupt()).ok();
    let mut term = signal(SignalKind::terminate()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    tokio::select! {
        _ = next(&mut int) => "SIGINT",
        _ = next(&mut term) => "SIGTERM",
        _ = next(&mut hup) => "SIGHUP",
    }
}

/// Set once [`stop_groups_on_signal`] saw its signal: the process is ending, and what the
/// cleanups said (a deployment interrupted, to resume or undo) must stay true while they run.
static SIGNALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a signal is ending this process (see [`stop_groups_on_signal`]): a deployer starts
/// no new step and records no outcome from then on.
pub fn signalled() -> bool {
    SIGNALLED.load(std::sync::atomic::Ordering::SeqCst)
}

/// On SIGINT or SIGTERM, kills every live group, runs the [`at_signal_exit`] cleanups and
/// exits as the signal would have (130 or 143). For commands that have no shutdown of their own (`deploy`, `rollback`); `proxy` and
/// `serve` handle their signals themselves.
pub async fn stop_groups_on_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    let code = tokio::select! {
        _ = int.recv() => 130,
        _ = term.recv() => 143,
    };
    SIGNALLED.store(true, std::sync::atomic::Ordering::SeqCst);
    kill_live_groups();
    // The cleanups may wait on a balancer (seconds at worst): a second Ctrl-C ends at once,
    // and a cleanup that panics does not keep the others from running.
    let cleanups = tokio::task::spawn_blocking(|| {
        let hooks = EXIT_HOOKS.lock().unwrap_or_else(|p| p.into_inner());
        for last in [false, true] {
            for (_, _, hook) in hooks.iter().filter(|(_, l, _)| *l == last) {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(hook));
            }
        }
    });
    tokio::select! {
        _ = cleanups => {}
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    // What the deployment started while the cleanups ran.
    kill_live_groups();
    std::process::exit(code);
}

fn kill_live_groups() {
    for pgid in LIVE_GROUPS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
    {
        // SAFETY: kill(2) on a group that is registered only while its leader is unreaped.
        unsafe {
            libc::kill(-(pgid as i32), libc::SIGKILL);
        }
    }
}

/// Where this process lists the process groups of its running commands, so that the next
/// deployer can stop what this one left if it is killed (`kill -9` runs no cleanup): a verify
/// suite or a hook would otherwise run on, unowned. See [`stop_groups_left_behind`].
static GROUPS_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The groups listed in [`GROUPS_FILE`], each with its leader's start time (so that a pid
/// used again later is never taken for the group).
static LISTED: Mutex<Vec<(u32, u64)>> = Mutex::new(Vec::new());

/// Lists this process's command groups under `state_dir` from now on (a deploy, a rollback).
pub fn list_groups_under(state_dir: &std::path::Path) {
    let dir = state_dir.join("groups");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = GROUPS_FILE.set(dir.join(format!(
            "{}-{}",
            std::process::id(),
            crate::journal::now_ms()
        )));
    }
}

/// Adds (`live`) or removes a group in this process's list, if it keeps one.
fn list_group(pgid: u32, live: bool) {
    let Some(path) = GROUPS_FILE.get() else {
        return;
    };
    let mut listed = LISTED.lock().unwrap_or_else(|p| p.into_inner());
    if live {
        if let Some(start) = crate::journal::process_start_ticks(pgid) {
            listed.push((pgid, start));
        }
    } else {
        listed.retain(|(g, _)| *g != pgid);
    }
    if listed.is_empty() {
        let _ = std::fs::remove_file(path);
        return;
    }
    let mut text = format!("machine {}\n", crate::journal::machine_name());
    for (g, start) in listed.iter() {
        text.push_str(&format!("{g} {start}\n"));
    }
    let _ = crate::atomic_file::replace(path, text.as_bytes());
}

/// Kills the command groups that deployers of this machine which are gone (killed) left
/// running, as their lists under `state_dir` say; returns how many it stopped. Called with
/// the deploy lock held, before anything else runs.
pub fn stop_groups_left_behind(state_dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(state_dir.join("groups")) else {
        return 0;
    };
    let mut stopped = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((pid, since)) = name.split_once('-') else {
            continue;
        };
        let (Ok(pid), Ok(since)) = (pid.parse::<u32>(), since.parse::<u64>()) else {
            continue; // not a list (a temporary file of one being written)
        };
        let gone = !crate::journal::process_alive(pid)
            || crate::journal::process_started_after(pid, since);
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let mut lines = text.lines();
        let here = lines.next() == Some(&format!("machine {}", crate::journal::machine_name()));
        if !gone || !here {
            continue; // still running, or another machine's (sharing the state directory)
        }
        for line in lines {
            let Some((group, start)) = line.split_once(' ') else {
                continue;
            };
            let (Ok(group), Ok(start)) = (group.parse::<u32>(), start.parse::<u64>()) else {
                continue;
            };
            // A leader that runs with another start time is a new process with a used pid:
            // not the group. Without a leader, its members keep the group id from reuse.
            if crate::journal::process_start_ticks(group).is_some_and(|s| s != start) {
                continue;
            }
            // SAFETY: kill(2) on a group a killed deployer of this machine led for a command;
            // checked above not to be another process's.
            if unsafe { libc::kill(-(group as i32), libc::SIGKILL) } == 0 {
                stopped += 1;
            }
        }
        let _ = std::fs::remove_file(entry.path());
    }
    stopped
}

/// Kills the command's process group when dropped while it runs.
struct Group {
    pid: Option<u32>,
}

impl Group {
    fn new(pid: Option<u32>) -> Group {
        if let Some(p) = pid {
            register_group(p);
            list_group(p, true);
        }
        Group { pid }
    }

    /// The leader exited (and is about to be reaped): the group is no longer ours to kill.
    fn disarm(&mut self) {
        if let Some(pid) = self.pid.take() {
            forget_group(pid);
            list_group(pid, false);
        }
    }

    fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            forget_group(pid);
            list_group(pid, false);
            // SAFETY: kill(2) on the process group this module created for the command, whose
            // leader has not been reaped yet (so the group id cannot have been reused).
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` for at most `timeout`. Pipe its stdout and stderr to capture them (their last
/// [`TAIL_BYTES`] each); stdin is the caller's to set. Errors only when the command cannot be
/// started.
pub async fn run(cmd: Command, timeout: Duration) -> std::io::Result<Ran> {
    run_with(cmd, timeout, Some(TAIL_BYTES)).await
}

/// [`run`], keeping all of stdout: for a command whose output the caller parses (git's list
/// of refs, a commit id), which is not the unbounded log of a build.
pub async fn run_keeping_stdout(cmd: Command, timeout: Duration) -> std::io::Result<Ran> {
    run_with(cmd, timeout, None).await
}

async fn run_with(
    mut cmd: Command,
    timeout: Duration,
    stdout_limit: Option<usize>,
) -> std::io::Result<Ran> {
    cmd.process_group(0).kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let mut group = Group::new(child.id());
    let stdout = Arc::new(Mutex::new(Tail::new(stdout_limit)));
    let stderr = Arc::new(Mutex::new(Tail::new(Some(TAIL_BYTES))));
    let readers = [
        child.stdout.take().map(|p| reader(p, stdout.clone())),
        child.stderr.take().map(|p| reader(p, stderr.clone())),
    ];
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => {
            let status = status?;
            // Exited: the group may still hold its background processes, which are the
            // command's business now.
            group.disarm();
            Some(status)
        }
        Err(_) => {
            group.kill();
            let _ = child.wait().await;
            None
        }
    };
    // Past the grace, a pipe still open is held by a process the command left behind: stop
    // reading (dropping a reader aborts it, keeping what it read).
    let _ = tokio::time::timeout(
        PIPE_GRACE,
        futures_util::future::join_all(readers.into_iter().flatten()),
    )
    .await;
    let take = |b: &Arc<Mutex<Tail>>| {
        std::mem::replace(&mut *b.lock().expect("output buffer"), Tail::new(None)).into_bytes()
    };
    Ok(Ran {
        status,
        stdout: take(&stdout),
        stderr: take(&stderr),
    })
}

/// The end of a stream: at most `limit` bytes (none: all), and how many came before them.
struct Tail {
    kept: Vec<u8>,
    dropped: u64,
    limit: Option<usize>,
}

impl Tail {
    fn new(limit: Option<usize>) -> Tail {
        Tail {
            kept: Vec::new(),
            dropped: 0,
            limit,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.kept.extend_from_slice(bytes);
        // Trimmed once twice the limit is held, so that a stream costs a copy of the limit
        // per limit's worth of output, not one per read.
        if let Some(limit) = self.limit.filter(|l| self.kept.len() > 2 * l) {
            self.trim(limit);
        }
    }

    fn trim(&mut self, limit: usize) {
        let cut = self.kept.len().saturating_sub(limit);
        self.kept.drain(..cut);
        self.dropped += cut as u64;
    }

    /// What was kept, from the first whole line, after a line saying what was dropped.
    fn into_bytes(mut self) -> Vec<u8> {
        if let Some(limit) = self.limit {
            self.trim(limit);
        }
        if self.dropped == 0 {
            return self.kept;
        }
        let start = match self.kept.iter().position(|&b| b == b'\n') {
            Some(i) if i + 1 < self.kept.len() => i + 1,
            _ => 0,
        };
        let dropped = self.dropped + start as u64;
        let mut out = format!("[{dropped} bytes of earlier output not kept]\n").into_bytes();
        out.extend_from_slice(&self.kept[start..]);
        out
    }
}

/// Reads `pipe` into `into` until end of file; aborted (with what it read kept) when the
/// handle is dropped.
fn reader(
    mut pipe: impl AsyncRead + Unpin + Send + 'static,
    into: Arc<Mutex<Tail>>,
) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf).await {
            if n == 0 {
                break;
            }
            into.lock().expect("output buffer").push(&buf[..n]);
        }
    }))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::future::Future for AbortOnDrop {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit(") ").next().is_some_and(|r| !r.starts_with('Z')))
    }

    #[tokio::test]
    async fn output_and_exit_code() {
        let r = run(sh("echo out; echo err >&2; exit 3"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(r.stdout, b"out\n");
        assert_eq!(r.stderr, b"err\n");
        assert_eq!(r.describe_exit(), "exit 3");
        assert!(!r.success() && !r.timed_out());
    }

    /// Regression: a build printing 600 MB was held whole, and cutover grew to 1 GB; only its
    /// last lines are ever shown.
    #[tokio::test]
    async fn only_the_tail_of_a_flood_is_kept() {
        let flood = "yes 'a line of build output' | head -n 1000000; echo last; \
                     yes err | head -n 1000000 >&2; echo done >&2";
        let r = run(sh(flood), Duration::from_secs(30)).await.unwrap();
        assert!(r.success(), "{}", r.describe_exit());
        for (out, end) in [
            (&r.stdout, "a line of build output\nlast\n"),
            (&r.stderr, "err\ndone\n"),
        ] {
            assert!(out.len() <= TAIL_BYTES + 64, "{} bytes kept", out.len());
            let text = String::from_utf8_lossy(out);
            assert!(text.ends_with(end), "{}", &text[text.len() - 100..]);
            let (note, rest) = text.split_once('\n').unwrap();
            assert!(
                note.ends_with(" bytes of earlier output not kept]"),
                "{note}"
            );
            // The note counts every byte not kept; what follows starts at a line's start.
            let dropped: usize = note[1..].split(' ').next().unwrap().parse().unwrap();
            let total = if end.starts_with('a') {
                23_000_005
            } else {
                4_000_005
            };
            assert_eq!(dropped + rest.len(), total);
            assert!(
                rest.starts_with("a line") || rest.starts_with("err"),
                "{rest:.40}"
            );
        }
        // Whole when the caller parses it.
        let r = run_keeping_stdout(sh("yes ref | head -c 200000"), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(r.stdout.len(), 200_000);
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let d = tempfile::tempdir().unwrap();
        let pid_file = d.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let r = run(sh(&script), Duration::from_secs(1)).await.unwrap();
        assert!(r.timed_out(), "{r:?}");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let t = std::time::Instant::now();
        while alive(pid) && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !alive(pid),
            "the timed-out command's child {pid} still runs"
        );
    }

    #[tokio::test]
    async fn a_background_process_holding_the_pipes_does_not_hold_the_caller() {
        let t = std::time::Instant::now();
        let r = run(sh("sleep 5 & echo $!"), Duration::from_secs(20))
            .await
            .unwrap();
        assert!(r.success(), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        let pid: i32 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
        assert!(alive(pid), "left alone after a successful exit");
        // SAFETY: kill(2) on the sleep this test started.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
