//! Instances: one running process of a release on a host.
//!
//! An instance is started detached (its own session via `setsid`, stdin from /dev/null, output to
//! `<root>/log/<version>-<port>.log`) so it outlives the deploy that started it and the SSH
//! connection that carried the command. Its pid file is the record of its existence; the process
//! also carries `CUTOVER_INSTANCE=<pid file>` in its environment, so a reused pid is never
//! mistaken for it; liveness compares the process start time recorded in the pid file.
//!
//! Liveness is read from `/proc/PID/stat` (a zombie counts as dead): on machines whose PID 1 does
//! not reap orphans, `kill -0` succeeds on a dead instance forever.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::{App, HealthConfig, Host, Name, StopSignal};
use crate::probe::{ProbeError, probe};
use crate::release::Layout;
use crate::transport::{Transport, run_ok, sh_quote};

/// How long a stopped instance's script waits after SIGKILL before it calls the process stuck.
const AFTER_KILL: Duration = Duration::from_secs(5);

/// A running (or recorded) instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub host: String,
    pub version: String,
    pub address: SocketAddr,
    pub pid: u32,
}

impl Instance {
    pub fn port(&self) -> u16 {
        self.address.port()
    }
    /// The id of this instance's backend in the balancer.
    pub fn backend_id(&self) -> String {
        backend_id(&self.host, self.port())
    }
}

pub fn backend_id(host: &str, port: u16) -> String {
    format!("{host}:{port}")
}

/// An instance as the host's pid files report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub instance: Instance,
    pub alive: bool,
    /// Alive only through its process group: the process the pid file names (the start
    /// command) exited and left the app running in the background (`cmd &`, a daemonizing
    /// app). cutover stops it by its group all the same, but cannot tell when it crashes.
    pub background: bool,
}

/// What `cutover status` and a deploy say about a [`Recorded::background`] instance.
pub const BACKGROUND_HINT: &str = "its start command exited and left the app running in the background: cutover stops it by its process group, but a crash of the app goes unnoticed until its health check fails; start it in the foreground (`exec app ...`, no `&`, no daemon mode)";

/// Shell function: `alive PIDFILE` succeeds when the process the pid file names is running and
/// is the one that was started (same start time, field 22 of /proc/PID/stat), so neither a
/// zombie nor a reused pid counts. The start time, unlike the environment, is fixed from fork on,
/// so a process caught between fork and exec is recognised too. Builtins only: it runs in every
/// tick of a stop loop, where a fork per check would cost more than the check.
const ALIVE_FN: &str = r#"alive() {
  [ -f "$1" ] || return 1
  read -r _pid _start < "$1" || [ -n "$_pid" ] || return 1
  read -r _stat 2>/dev/null < "/proc/$_pid/stat" || return 1
  _stat=${_stat##*") "}
  set -- $_stat
  [ "$1" != Z ] && [ "$1" != X ] || return 1
  [ -z "$_start" ] || [ "${20}" = "$_start" ]
}
"#;

/// Instances recorded on the host (pid files), with liveness.
pub async fn list(transport: &dyn Transport, host: &Host) -> anyhow::Result<Vec<Recorded>> {
    let script = format!("{ALIVE_FN}{}", list_script(host));
    let out = run_ok(
        transport,
        host,
        "listing instances",
        &script,
        transport.step_timeout(),
    )
    .await?;
    Ok(parse_list(host, &out))
}

/// A script (after [`ALIVE_FN`]; it changes directory, no subshell: a fork saved per host read)
/// printing `FILE PID up|down` per pid file.
pub(crate) fn list_script(host: &Host) -> String {
    let run = Layout::of(host).run_dir();
    // A process the pid file names that is gone may have left its group running (a start
    // command that backgrounds the app): one `/proc` read then, none for a live instance.
    format!(
        "{GROUP_LIVE_FN}if cd {run} 2>/dev/null; then\nfor f in *.pid; do\n  [ -e \"$f\" ] || continue\n  read -r pid _rest < \"$f\" || [ -n \"$pid\" ] || continue\n  if alive \"$PWD/$f\"; then s=up; elif [ -n \"$(group_live \"$pid\")\" ]; then s=background; else s=down; fi\n  echo \"$f $pid $s\"\ndone\nfi\n",
        run = sh_quote(run.to_string_lossy()),
    )
}

/// The shell function behind liveness checks, for scripts that combine them with other work.
pub(crate) const fn alive_fn() -> &'static str {
    ALIVE_FN
}

/// Reads what [`list_script`] printed.
pub(crate) fn parse_list(host: &Host, out: &str) -> Vec<Recorded> {
    let mut found = Vec::new();
    for line in out.lines() {
        let mut parts = line.split_whitespace();
        let (Some(file), Some(pid), Some(state)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Some(stem) = file.strip_suffix(".pid") else {
            continue;
        };
        let Some((version, port)) = stem.rsplit_once('-') else {
            continue;
        };
        let (Ok(port), Ok(pid)) = (port.parse::<u16>(), pid.parse::<u32>()) else {
            continue;
        };
        found.push(Recorded {
            instance: Instance {
                host: host.name.to_string(),
                version: version.to_string(),
                address: SocketAddr::new(host.address, port),
                pid,
            },
            alive: state == "up" || state == "background",
            background: state == "background",
        });
    }
    found
}

/// The environment the start command gets from cutover, in this order: the port, the
/// version, the host's name, its address, the release directory and the instance's pid file
/// (README's `[app] start` and the `cutover init` template name them all).
pub const START_ENV: [&str; 6] = [
    "PORT",
    "CUTOVER_VERSION",
    "CUTOVER_HOST",
    "CUTOVER_ADDRESS",
    "CUTOVER_RELEASE_DIR",
    "CUTOVER_INSTANCE",
];

/// Starts an instance of `version` on `port`, detached. Returns once the process exists; use
/// [`wait_healthy`] to know it serves.
pub async fn start(
    transport: &dyn Transport,
    app: &App,
    host: &Host,
    version: &Name,
    port: u16,
) -> anyhow::Result<Instance> {
    let layout = Layout::of(host);
    let v = version.as_str();
    let rel = layout.release(v);
    let pid_file = layout.pid_file(v, port);
    let log_file = layout.log_file(v, port);
    let command = app
        .start
        .replace("{port}", &port.to_string())
        .replace("{address}", &host.address.to_string())
        .replace("{version}", v)
        .replace("{host}", host.name.as_str());
    let rel = sh_quote(rel.to_string_lossy());
    let pid_file = sh_quote(pid_file.to_string_lossy());
    // As many values as names, or this does not compile (zip would drop the extra ones).
    let env_values: [String; START_ENV.len()] = [
        port.to_string(),
        sh_quote(v),
        sh_quote(host.name.as_str()),
        sh_quote(host.address.to_string()),
        rel.clone(),
        pid_file.clone(),
    ];
    let env = START_ENV
        .iter()
        .zip(&env_values)
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" ");
    let script = format!(
        "set -e\n\
         [ -d {rel} ] || {{ echo 'release {v} is not staged on this host' >&2; exit 3; }}\n\
         [ -d {run} ] && [ -d {log} ] || mkdir -p {run} {log}\n\
         cd {rel}\n\
         export {env}\n\
         setsid {launch} >>{log_file} 2>&1 </dev/null &\n\
         p=$!\n\
         st=\n\
         if read -r s 2>/dev/null </proc/$p/stat; then s=${{s##*\") \"}}; set -- $s; st=${{20}}; fi\n\
         echo \"$p $st\" >{pid_file}\n\
         echo $p\n",
        run = sh_quote(layout.run_dir().to_string_lossy()),
        log = sh_quote(layout.log_dir().to_string_lossy()),
        log_file = sh_quote(log_file.to_string_lossy()),
        launch = launch(&command),
    );
    let launched = Instance {
        host: host.name.to_string(),
        version: v.to_string(),
        address: SocketAddr::new(host.address, port),
        pid: 0,
    };
    let started = run_ok(
        transport,
        host,
        &format!("starting {v}"),
        &script,
        transport.step_timeout(),
    )
    .await
    .and_then(|out| {
        out.trim().parse::<u32>().map_err(|_| {
            anyhow::anyhow!(
                "host {}: starting {v} printed no pid: {:?}",
                host.name,
                out.trim()
            )
        })
    });
    let pid = match started {
        Ok(pid) => pid,
        Err(e) => {
            // The script may have launched the app before it failed (a timeout, a lost
            // connection, an answer that did not parse): stop what its pid file names, so a
            // failed start leaves no instance that nothing tracks.
            if !crate::transport::Unreachable::is(&e) {
                let _ = stop(
                    transport,
                    host,
                    &launched,
                    app.stop_signal,
                    *app.stop_timeout,
                )
                .await;
            }
            return Err(e);
        }
    };
    Ok(Instance { pid, ..launched })
}

/// What `setsid` runs for a start command: the command's own words when it is plain words (an
/// optional `exec`, then a program and arguments with nothing for a shell to interpret), else
/// `sh -c COMMAND`. Why: the extra shell is a process start (about a millisecond) on the
/// critical path of every switch, for nothing when there is nothing to interpret.
fn launch(command: &str) -> String {
    let shell = || format!("sh -c {}", sh_quote(command));
    if command.chars().any(|c| c.is_whitespace() && c != ' ') {
        // A newline separates commands; a tab is unusual enough to leave to the shell.
        return shell();
    }
    let words: Vec<&str> = command.split(' ').filter(|w| !w.is_empty()).collect();
    let words = match words.split_first() {
        Some((&"exec", rest)) => rest,
        _ => &words[..],
    };
    // A word a shell reads as itself is one `sh_quote` leaves alone.
    let plain = |w: &str| sh_quote(w) == w;
    // Words a shell runs itself rather than as a program (`setsid` could not), and
    // `NAME=value` prefixes, which only a shell understands.
    const SHELL_ONLY: &[&str] = &[
        ".", ":", "cd", "command", "eval", "exec", "export", "set", "source", "trap", "ulimit",
        "umask", "unset", "wait",
    ];
    match words.first() {
        Some(first)
            if words.iter().all(|w| plain(w))
                && !first.contains('=')
                && !first.starts_with('-')
                && !SHELL_ONLY.contains(first) =>
        {
            words.join(" ")
        }
        _ => shell(),
    }
}

/// Whether the instance's process is alive (zombies count as dead), or, once it is gone, a
/// process of its group (a start command that left the app in the background: see
/// [`Recorded::background`]).
pub async fn is_alive(
    transport: &dyn Transport,
    host: &Host,
    inst: &Instance,
) -> anyhow::Result<bool> {
    let pid_file = Layout::of(host).pid_file(&inst.version, inst.port());
    let script = format!(
        "{ALIVE_FN}{GROUP_LIVE_FN}if alive {pf}; then echo up\n\
         elif [ -n \"$_pid\" ] && [ -n \"$(group_live \"$_pid\")\" ]; then echo up\n\
         else echo down; fi",
        pf = sh_quote(pid_file.to_string_lossy())
    );
    let out = run_ok(
        transport,
        host,
        "checking an instance",
        &script,
        transport.step_timeout(),
    )
    .await?;
    Ok(out.trim() == "up")
}

/// The last `lines` lines of the instance's log.
pub async fn log_tail(
    transport: &dyn Transport,
    host: &Host,
    version: &str,
    port: u16,
    lines: usize,
) -> String {
    let log = Layout::of(host).log_file(version, port);
    if lines == 0 {
        return String::new();
    }
    // Exit 3: no log file; 4: an empty one (the app wrote nothing).
    let script = format!(
        "f={}\n[ -e \"$f\" ] || exit 3\n[ -s \"$f\" ] || exit 4\ntail -n {lines} \"$f\" 2>/dev/null || true",
        sh_quote(log.to_string_lossy())
    );
    match transport.run(host, &script, transport.step_timeout()).await {
        Ok(out) if out.status == 3 => format!("(no log file {})", log.display()),
        Ok(out) if out.status == 4 => format!(
            "(the log {} is empty: the app wrote nothing to stdout or stderr)",
            log.display()
        ),
        Ok(out) => out.stdout.trim_end().to_string(),
        Err(e) => format!("(log unavailable: {e})"),
    }
}

/// The instance logs on the host as `(version, port)`, newest first (`<version>-<port>.log`
/// in the log directory; other files are skipped).
pub async fn logs_newest_first(
    transport: &dyn Transport,
    host: &Host,
) -> anyhow::Result<Vec<(String, u16)>> {
    let dir = Layout::of(host).log_dir();
    let script = format!(
        "cd {} 2>/dev/null || exit 0\nls -1t 2>/dev/null || true\n",
        sh_quote(dir.to_string_lossy())
    );
    let out = run_ok(
        transport,
        host,
        "listing logs",
        &script,
        transport.step_timeout(),
    )
    .await?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(".log"))
        .filter_map(|l| l.rsplit_once('-'))
        .filter_map(|(v, p)| Some((v.to_string(), p.parse().ok()?)))
        .collect())
}

/// Why an instance did not pass its health gate.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("exited while starting (pid {pid}); last log lines:\n{log}")]
    Exited { pid: u32, log: String },
    #[error(
        "unhealthy: {failures} failed checks in a row after the start period; last: {last}; last log lines:\n{log}"
    )]
    Unhealthy {
        failures: u32,
        last: ProbeError,
        log: String,
    },
    #[error("not healthy within {deadline}; last check: {last}; last log lines:\n{log}")]
    Deadline {
        deadline: String,
        last: String,
        log: String,
    },
    #[error(transparent)]
    Transport(#[from] anyhow::Error),
}

/// Waits until the instance passes `healthy_threshold` checks in a row.
///
/// Fails fast when the process exits, or when it *answers* with failures `unhealthy_threshold`
/// times in a row after `start_period`; a refused connection (still booting) only counts against
/// the `deadline`.
///
/// While nothing answers yet, probes come quickly (every 0.5 to 2 ms for the first 200 ms, see
/// [`quick_pause`], then doubling up to 50 ms or `interval`): a refused connection costs
/// microseconds, and the gate's clock should start when the app does, not up to an interval
/// later. Whether the process still lives is asked of the host only once the app has had
/// [`LIVENESS_GRACE`] to start, so a fast app never pays that round trip.
///
/// `answered` is told when the app first answers a check (passing or not), or dropped when the
/// gate ends without an answer.
pub async fn wait_healthy(
    transport: &dyn Transport,
    host: &Host,
    inst: &Instance,
    health: &HealthConfig,
    mut answered: Option<Answered>,
) -> Result<(), GateError> {
    let started = Instant::now();
    let deadline = started + *health.deadline;
    let quick_cap = (*health.interval).min(Duration::from_millis(50));
    let mut quick = Duration::from_millis(1);
    let mut passes = 0u32;
    let mut answered_failures = 0u32;
    let mut last;
    let mut next_liveness = started + LIVENESS_GRACE;
    let mut booting = Booting::enter();
    loop {
        // Checks are `interval` apart start to start, as a balancer's checker runs them: the
        // probe's own round trip is not added to every interval.
        let probe_started = tokio::time::Instant::now();
        let result = probe(inst.address, &health.path, *health.timeout).await;
        if result.as_ref().map_or_else(ProbeError::answered, |_| true) {
            booting.leave();
            if let Some(tell) = answered.take() {
                let _ = tell.send(());
            }
        }
        match result {
            Ok(_) => {
                passes += 1;
                answered_failures = 0;
                if passes >= health.healthy_threshold.0 {
                    return Ok(());
                }
                if (probe_started + *health.interval).into_std() <= deadline {
                    sleep_precisely_until(probe_started + *health.interval).await;
                    continue;
                }
                // The next check would come after the deadline: the gate cannot pass in time.
                let log = log_tail(transport, host, &inst.version, inst.port(), 10).await;
                return Err(GateError::Deadline {
                    deadline: humantime::format_duration(*health.deadline).to_string(),
                    last: format!(
                        "{passes} of {} passing checks, and the next is due after the deadline",
                        health.healthy_threshold.0
                    ),
                    log,
                });
            }
            Err(e) => {
                passes = 0;
                if e.answered() && started.elapsed() >= *health.start_period {
                    answered_failures += 1;
                    if answered_failures >= health.unhealthy_threshold.0 {
                        let log = log_tail(transport, host, &inst.version, inst.port(), 10).await;
                        return Err(GateError::Unhealthy {
                            failures: answered_failures,
                            last: e,
                            log,
                        });
                    }
                }
                last = e.to_string();
            }
        }
        if Instant::now() >= next_liveness {
            next_liveness = Instant::now() + Duration::from_millis(300);
            if !is_alive(transport, host, inst).await? {
                let log = log_tail(transport, host, &inst.version, inst.port(), 10).await;
                return Err(GateError::Exited { pid: inst.pid, log });
            }
        }
        if Instant::now() >= deadline {
            let log = log_tail(transport, host, &inst.version, inst.port(), 10).await;
            return Err(GateError::Deadline {
                deadline: humantime::format_duration(*health.deadline).to_string(),
                last,
                log,
            });
        }
        if answered_failures > 0 {
            tokio::time::sleep(*health.interval).await;
        } else if started.elapsed() < QUICK_PHASE {
            let pause = quick_pause(booting.count());
            sleep_precisely_until(tokio::time::Instant::now() + pause).await;
        } else {
            booting.leave();
            quick = (quick * 2).min(quick_cap);
            tokio::time::sleep(quick).await;
        }
    }
}

/// How many gates in this process are probing an instance that does not answer yet: they share
/// the probe rate, so that many instances starting at once are not slowed by a storm of refused
/// connections on the same cores.
static BOOTING: AtomicUsize = AtomicUsize::new(0);

/// One gate's place in [`BOOTING`], left when it gets an answer, gives up the quick phase or
/// ends.
struct Booting(bool);

impl Booting {
    fn enter() -> Booting {
        BOOTING.fetch_add(1, Ordering::Relaxed);
        Booting(true)
    }

    /// Gates booting now, this one included.
    fn count(&self) -> usize {
        BOOTING.load(Ordering::Relaxed).max(1)
    }

    fn leave(&mut self) {
        if std::mem::take(&mut self.0) {
            BOOTING.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Booting {
    fn drop(&mut self) {
        self.leave();
    }
}

/// The pause before a refused probe is retried in the quick phase: 0.5 ms for one booting
/// instance (an app that starts in 3 ms is seen within a sixth of that), 1 ms each for two, 2
/// ms each for four or more, so a batch of 16 booting at once makes 8 probes per millisecond
/// rather than 32. Slept precisely: the runtime's timer would round 0.5 ms up to 1-2 ms. The
/// count is per process, which runs one deployment at a time (`serve` queues them).
fn quick_pause(booting: usize) -> Duration {
    (Duration::from_micros(500) * booting as u32).min(Duration::from_millis(2))
}

/// Sleeps until `deadline` to within a fraction of a millisecond. The runtime's timer rounds up
/// to whole milliseconds and wakes late by one or two more; the health gate's interval (once
/// per batch) and its quick probes while an app boots are on the critical path of the whole
/// deploy, so the last stretch is slept on a blocking thread, where the kernel's timer is
/// precise.
async fn sleep_precisely_until(deadline: tokio::time::Instant) {
    const SLACK: Duration = Duration::from_millis(3);
    if let Some(coarse) = deadline.checked_sub(SLACK) {
        tokio::time::sleep_until(coarse).await;
    }
    let rest = deadline.saturating_duration_since(tokio::time::Instant::now());
    if !rest.is_zero() {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    }
}

/// Told when a starting instance first answers a health check (see [`wait_healthy`]); dropped
/// unsent when its gate ends without an answer. Work held back so as not to compete with the
/// app's start for the cores can go ahead then.
pub type Answered = tokio::sync::oneshot::Sender<()>;

/// While an instance is this young, a refused probe is retried after [`quick_pause`] (most apps
/// start within it); later the pause doubles up to 50 ms.
const QUICK_PHASE: Duration = Duration::from_millis(200);

/// How long a starting instance may refuse connections before the gate asks the host whether
/// its process still lives.
pub const LIVENESS_GRACE: Duration = Duration::from_millis(250);

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Exited after the stop signal.
    Gracefully,
    /// Still running at `stop_timeout`: killed.
    Killed,
}

/// Shell functions for stopping instances, in two halves so a script can do other work while the
/// processes exit (see `settle`): `signal_all PIDFILE...` sends the stop signal to the process
/// group of every live instance and prints `signalled PF`; `await_all PIDFILE...` waits until all
/// are gone (checking at once, then every millisecond for the first 10 ms, where a well-behaved
/// app exits, then every 10 ms up to 100 ms, then every 100 ms) up to `timeout`, KILLs what is
/// left, prints `down PF` or `killed PF` for each and removes the pid files (one
/// `rm` for all) except of a process still alive 5 s after SIGKILL (`stuck PF`: a process
/// stuck in the kernel stays recorded, never silently forgotten). `stop_all` is both.
pub(crate) fn stop_all_fn(signal: StopSignal, timeout: Duration) -> String {
    let limit_ms = timeout.as_millis().max(1);
    // `kill -s SIG -- -PGID`: dash (Debian's and Ubuntu's /bin/sh) refuses `kill -SIG -- -PGID`
    // ("Illegal number: -"), which used to leave only the group's leader signalled.
    format!(
        r#"{ALIVE_FN}{GROUP_LIVE_FN}leader_gone() {{
  read -r _s 2>/dev/null < "/proc/$1/stat" || return 0
  _s=${{_s##*") "}}
  case $_s in Z*|X*) return 0 ;; esac
  return 1
}}
_family=
signal_all() {{
  for _pf in "$@"; do
    _pid=
    if alive "$_pf"; then
      # A leader with children (any thread's; unknown where the kernel does not say) has a
      # group worth watching once the leader is gone.
      _kids=1
      if [ -r "/proc/$_pid/task/$_pid/children" ]; then
        _kids=
        for _c in /proc/"$_pid"/task/*/children; do
          _k=; read -r _k < "$_c" 2>/dev/null; [ -z "$_k" ] || {{ _kids=1; break; }}
        done
      fi
      [ -z "$_kids" ] || _family="$_family $_pid"
      kill -s {sig} -- "-$_pid" 2>/dev/null || kill -s {sig} "$_pid" 2>/dev/null || true
      echo "signalled $_pf"
    elif [ -n "$_pid" ] && leader_gone "$_pid" && [ -n "$(group_live "$_pid")" ]; then
      # The leader died first (the app's main process crashed) and left members of its
      # group running: they are the instance's too. No process has the leader's pid, so
      # the group is still the one it led (a pid is not handed out while a group uses it).
      _family="$_family $_pid"
      kill -s {sig} -- "-$_pid" 2>/dev/null || true
      echo "signalled $_pf"
    fi
  done
}}
await_all() {{
  _t=0
  _groups=$_family
  while :; do
    _up=
    _left=
    for _pf in "$@"; do if alive "$_pf"; then _up=1; break; fi; done
    if [ -z "$_up" ]; then
      _left=$(group_live $_groups)
      [ -z "$_left" ] || _up=1
    fi
    [ -n "$_up" ] && [ $_t -lt {limit_ms} ] || break
    if [ $_t -lt 10 ]; then sleep 0.001; _t=$((_t+1))
    elif [ $_t -lt 100 ]; then sleep 0.01; _t=$((_t+10))
    else sleep 0.1; _t=$((_t+100)); fi
  done
  [ -z "$_up" ] || _left=$(group_live $_groups)
  _killed=
  for _pf in "$@"; do
    _pid=; read -r _pid _rest < "$_pf" 2>/dev/null
    _held=
    case " $_left " in *" $_pid "*) _held=1 ;; esac
    if alive "$_pf" || [ -n "$_held" ]; then
      kill -s KILL -- "-$_pid" 2>/dev/null || kill -s KILL "$_pid" 2>/dev/null || true
      echo "killed $_pf"
      _killed=1
    else
      echo "down $_pf"
    fi
  done
  if [ -n "$_killed" ]; then
    _j=0
    while [ $_j -lt 50 ]; do
      _up=
      _left=
      for _pf in "$@"; do if alive "$_pf"; then _up=1; break; fi; done
      if [ -z "$_up" ]; then _left=$(group_live $_groups); [ -z "$_left" ] || _up=1; fi
      [ -n "$_up" ] || break
      sleep 0.1; _j=$((_j+1))
    done
  fi
  _n=$#
  for _pf in "$@"; do
    _pid=; read -r _pid _rest < "$_pf" 2>/dev/null
    _held=
    case " $_left " in *" $_pid "*) _held=1 ;; esac
    if alive "$_pf" || [ -n "$_held" ]; then echo "stuck $_pf"; else set -- "$@" "$_pf"; fi
  done
  shift $_n
  [ $# -eq 0 ] || rm -f -- "$@"
}}
stop_all() {{ signal_all "$@"; await_all "$@"; }}
"#,
        sig = signal.name(),
    )
}

/// `group_live PGID...` prints each process group among its arguments that still has a live
/// (not zombie) member: an instance's children outlive its leader when the start command forks
/// (`sh -c`, a `run.sh` without `exec`, a master with workers). One `/proc` read for all groups
/// (about 5 ms), only for leaders that had children when signalled and only once they are gone:
/// an app that `exec`s pays nothing. (`kill -0 -PGID` cannot tell: zombies count, and on hosts
/// whose init does not reap, the leader stays one.)
const GROUP_LIVE_FN: &str = r#"group_live() {
  [ $# -gt 0 ] || return 0
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v want=" $* " '{ sub(/^.*\) /, ""); if ($1 != "Z" && $1 != "X" && index(want, " " $3 " ") && !seen[$3]++) print $3 }'
}
"#;

/// How one pid file fared in `stop_all` (see [`stop_all_fn`]).
pub(crate) fn stop_outcome(output: &str, pid_file: &str) -> Option<Stopped> {
    let mut signalled = false;
    let mut outcome = None;
    for line in output.lines() {
        match line.split_once(' ') {
            Some(("signalled", f)) if f == pid_file => signalled = true,
            Some(("killed", f)) if f == pid_file => outcome = Some(Stopped::Killed),
            Some(("down", f)) if f == pid_file => outcome = Some(Stopped::Gracefully),
            _ => {}
        }
    }
    // Not signalled: it was gone already, and its pid file was only forgotten.
    outcome.filter(|_| signalled)
}

/// Stops the instance: the stop signal to its process group, up to `timeout`, then SIGKILL. The
/// pid file is removed. Stopping an instance that is already gone succeeds.
pub async fn stop(
    transport: &dyn Transport,
    host: &Host,
    inst: &Instance,
    signal: StopSignal,
    timeout: Duration,
) -> anyhow::Result<Stopped> {
    let pid_file = Layout::of(host)
        .pid_file(&inst.version, inst.port())
        .to_string_lossy()
        .into_owned();
    let script = format!(
        "{}stop_all {}\n",
        stop_all_fn(signal, timeout),
        sh_quote(&pid_file)
    );
    let out = run_ok(
        transport,
        host,
        &format!("stopping {} (pid {})", inst.version, inst.pid),
        &script,
        // The stop may take its whole timeout and the wait after SIGKILL, then a step's time.
        timeout + AFTER_KILL + transport.step_timeout(),
    )
    .await?;
    if out
        .lines()
        .any(|l| l.strip_prefix("stuck ") == Some(pid_file.as_str()))
    {
        // Its pid file stays, so `cutover status` and the next settle still see it.
        anyhow::bail!(
            "{} (pid {}) on {} is still alive 5 s after SIGKILL (a process stuck in the kernel, e.g. on a hung disk or NFS mount): it stays recorded; look at it on the host",
            inst.version,
            inst.pid,
            host.name
        );
    }
    Ok(stop_outcome(&out, &pid_file).unwrap_or(Stopped::Gracefully))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booting_gates_share_the_probe_rate() {
        assert_eq!(quick_pause(1), Duration::from_micros(500));
        assert_eq!(quick_pause(2), Duration::from_millis(1));
        assert_eq!(quick_pause(16), Duration::from_millis(2));
    }

    /// `answered` fires at the app's first answer, an interval before the gate passes: what the
    /// rolling loop waits for before the previous batch's settles may use the cores.
    /// The local transport, with junk added to what a start script prints: the answer no
    /// longer parses though the app was launched.
    struct Garbled(crate::transport::local::LocalTransport);

    #[async_trait::async_trait]
    impl Transport for Garbled {
        async fn run(
            &self,
            host: &Host,
            script: &str,
            timeout: Duration,
        ) -> anyhow::Result<crate::transport::Output> {
            let mut out = self.0.run(host, script, timeout).await?;
            if script.contains("setsid") {
                out.stdout.insert_str(0, "JUNK\n");
            }
            Ok(out)
        }
        async fn copy_dir(
            &self,
            host: &Host,
            from: &std::path::Path,
            to: &std::path::Path,
        ) -> anyhow::Result<()> {
            self.0.copy_dir(host, from, to).await
        }
        async fn free_port(&self, host: &Host) -> anyhow::Result<u16> {
            self.0.free_port(host).await
        }
    }

    #[tokio::test]
    async fn a_start_that_fails_after_launching_leaves_no_instance() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::for_test(dir.path());
        std::fs::create_dir_all(dir.path().join("releases/v1")).unwrap();
        let app: App =
            toml::from_str("name = \"a\"\nstart = \"sleep 30\"\nstop_timeout = \"2s\"\n").unwrap();
        let t = Garbled(crate::transport::local::LocalTransport::new());
        let v = Name::parse("v1").unwrap();
        let e = start(&t, &app, &host, &v, 45_678).await.unwrap_err();
        assert!(format!("{e:#}").contains("printed no pid"), "{e:#}");
        let pid_file = Layout::of(&host).pid_file("v1", 45_678);
        assert!(
            !pid_file.exists(),
            "the launched instance is still recorded"
        );
        let left = list(&t.0, &host).await.unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    /// Live (not zombie) processes of process group `pgid`.
    fn group_members(pgid: u32) -> Vec<u32> {
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let f: Vec<&str> = rest.split(' ').collect();
            if f.len() > 2 && !matches!(f[0], "Z" | "X") && f[2] == pgid.to_string() {
                found.push(pid);
            }
        }
        found
    }

    /// An instance on `port` whose start command forks a child that ignores SIGTERM, once both
    /// run in its process group.
    async fn start_forking_instance(
        port: u16,
    ) -> (
        tempfile::TempDir,
        Host,
        crate::transport::local::LocalTransport,
        Instance,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::for_test(dir.path());
        std::fs::create_dir_all(dir.path().join("releases/v1")).unwrap();
        let app: App = toml::from_str(
            "name = \"a\"\nstart = \"(trap '' TERM; exec sleep 300) & exec sleep 301\"\n",
        )
        .unwrap();
        let t = crate::transport::local::LocalTransport::new();
        let v = Name::parse("v1").unwrap();
        let inst = start(&t, &app, &host, &v, port).await.unwrap();
        // Both must run `sleep`: the child's subshell shows in the group before it has run
        // its `trap`, and a stop then would end it gracefully (the race a loaded machine won).
        let sleeping = |pids: &[u32]| {
            pids.iter().all(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "sleep")
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let members = group_members(inst.pid);
            if (members.len() == 2 && sleeping(&members)) || std::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let members = group_members(inst.pid);
        assert_eq!(members.len(), 2, "{members:?}");
        assert!(sleeping(&members), "{members:?} do not all run sleep yet");
        (dir, host, t, inst)
    }

    /// A start command that forks (here a child that ignores SIGTERM) leaves children in the
    /// instance's process group: the stop signals the whole group, and what is left at the
    /// timeout is killed, though the leader itself went at the first signal.
    #[tokio::test]
    async fn a_stop_reaches_every_process_of_the_instance() {
        let (_dir, host, t, inst) = start_forking_instance(45_679).await;
        let stopped = stop(
            &t,
            &host,
            &inst,
            StopSignal::Term,
            Duration::from_millis(300),
        )
        .await
        .unwrap();
        let after = group_members(inst.pid);
        for pid in &after {
            // SAFETY: kill(2) on a process this test started; cleanup after a failure.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        assert!(after.is_empty(), "left running: {after:?}");
        assert_eq!(stopped, Stopped::Killed);
    }

    /// An instance whose leader died first (the app's main process crashed) leaves the rest
    /// of its process group running: the stop still finds and ends them, by the group the
    /// pid file names, instead of forgetting the pid file and leaking them.
    #[tokio::test]
    async fn a_stop_ends_what_a_dead_leader_left_running() {
        let (_dir, host, t, inst) = start_forking_instance(45_680).await;
        // The leader dies alone; its child stays in the group.
        // SAFETY: kill(2) on a process this test started.
        unsafe { libc::kill(inst.pid as i32, libc::SIGKILL) };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while group_members(inst.pid).len() != 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let orphans = group_members(inst.pid);
        assert_eq!(orphans.len(), 1, "{orphans:?}");
        assert!(!orphans.contains(&inst.pid));
        let stopped = stop(
            &t,
            &host,
            &inst,
            StopSignal::Term,
            Duration::from_millis(300),
        )
        .await
        .unwrap();
        let after = group_members(inst.pid);
        for pid in &after {
            // SAFETY: kill(2) on a process this test started; cleanup after a failure.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        assert!(after.is_empty(), "left running: {after:?}");
        assert_eq!(stopped, Stopped::Killed);
    }

    /// Answers every request on `listener` with 200, one connection at a time.
    async fn answer_ok(listener: tokio::net::TcpListener) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
    }

    /// A one-host local config rooted in `dir`, with `health` lines under `[app.health]`.
    fn gate_config(dir: &std::path::Path, health: &str) -> crate::config::Config {
        let text = format!(
            "transport = \"local\"\n[app]\nname = \"x\"\nstart = \"./app\"\n\
             [app.health]\n{health}\n\
             [release]\npath = \"r/{{version}}\"\n\
             [balancer]\nlisten = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\ntoken = \"0123456789abcdef\"\n\
             [[hosts]]\nname = \"h\"\naddress = \"127.0.0.1\"\nroot = {:?}\n",
            dir.display().to_string()
        );
        crate::config::Config::parse(&dir.join("c.toml"), &text).unwrap()
    }

    #[tokio::test]
    async fn the_gate_tells_of_the_first_answer_before_it_passes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(answer_ok(listener));
        let dir = tempfile::tempdir().unwrap();
        let config = gate_config(dir.path(), "interval = \"300ms\"\nhealthy_threshold = 2");
        let inst = Instance {
            host: "h".into(),
            version: "v1".into(),
            address,
            pid: std::process::id(),
        };
        let (tell, told) = tokio::sync::oneshot::channel();
        let transport = crate::transport::local::LocalTransport::new();
        let t = Instant::now();
        let gate = wait_healthy(
            &transport,
            &config.hosts[0],
            &inst,
            &config.app.health,
            Some(tell),
        );
        let told_at = tokio::spawn(async move {
            told.await.unwrap();
            t.elapsed()
        });
        gate.await.unwrap();
        let passed_at = t.elapsed();
        let told_at = told_at.await.unwrap();
        assert!(
            told_at < Duration::from_millis(150) && passed_at >= Duration::from_millis(300),
            "told at {told_at:?}, passed at {passed_at:?}"
        );
        server.abort();
    }

    /// Review finding: with passes due after the deadline, the gate slept past it and passed.
    #[tokio::test]
    async fn the_gate_gives_up_when_its_next_pass_would_come_after_the_deadline() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = free.local_addr().unwrap();
        drop(free);
        // Answers from 400ms on: passes at ~400 and ~700ms, the third would be due at ~1000ms.
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            answer_ok(tokio::net::TcpListener::bind(address).await.unwrap()).await;
        });
        let dir = tempfile::tempdir().unwrap();
        let config = gate_config(
            dir.path(),
            "interval = \"300ms\"\nhealthy_threshold = 3\ndeadline = \"850ms\"",
        );
        let inst = Instance {
            host: "h".into(),
            version: "v1".into(),
            address,
            pid: std::process::id(),
        };
        // The gate checks that the instance's process lives: this test's process stands for it.
        let pid_file = Layout::of(&config.hosts[0]).pid_file("v1", address.port());
        std::fs::create_dir_all(pid_file.parent().unwrap()).unwrap();
        let me = std::process::id();
        let start = crate::journal::process_start_ticks(me).unwrap();
        std::fs::write(&pid_file, format!("{me} {start}\n")).unwrap();
        let transport = crate::transport::local::LocalTransport::new();
        let t = Instant::now();
        let gate = wait_healthy(
            &transport,
            &config.hosts[0],
            &inst,
            &config.app.health,
            None,
        )
        .await;
        let ended = t.elapsed();
        server.abort();
        let e = gate.unwrap_err().to_string();
        assert!(e.contains("not healthy within 850ms"), "{e}");
        assert!(e.contains("2 of 3 passing checks"), "{e}");
        assert!(ended < Duration::from_millis(850), "gave up at {ended:?}");
    }

    #[test]
    fn plain_commands_skip_the_extra_shell() {
        assert_eq!(launch("exec sh ./run.sh"), "sh ./run.sh");
        assert_eq!(
            launch("./bin/app --port 4100 --listen 127.0.0.1:4100"),
            "./bin/app --port 4100 --listen 127.0.0.1:4100"
        );
        assert_eq!(launch("exec  node  server.js"), "node server.js");
    }

    #[test]
    fn anything_a_shell_must_read_keeps_the_shell() {
        for cmd in [
            "exec ./app > out.log",
            "PORT=1 ./app",
            "./app; touch /tmp/x",
            "./app $(id)",
            "./app 'quoted arg'",
            "./app\ntouch /tmp/x",
            ". ./env && ./app",
            "ulimit -n 4096",
            "exec",
            "",
            "./app *",
            "cd /srv && ./app",
        ] {
            assert_eq!(
                launch(cmd),
                format!("sh -c {}", crate::transport::sh_quote(cmd)),
                "{cmd:?}"
            );
        }
    }
}
