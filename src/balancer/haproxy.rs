//! An existing HAProxy as cutover's balancer: [`HaproxyBalancer`] implements [`Balancer`] over
//! HAProxy's runtime API (the `stats socket ... level admin`, a Unix socket or `host:port`).
//!
//! Why it exists: many fleets already sit behind HAProxy, and the classic playbook disables a
//! server there while it is updated, then forgets it when the play fails. cutover drives HAProxy
//! natively and does better: drain by current sessions, never leave a live server disabled, and
//! read per-server counters for the deploy's proof and for analysis.
//!
//! Design choices (details and the HAProxy config it needs: `docs/haproxy.md`):
//! - One command per connection, blocking I/O on tokio's blocking pool: the runtime API closes a
//!   non-interactive connection after one answer, commands take microseconds, and a synchronous
//!   client also works from `Drop` (the cleanup path below).
//! - Servers are dynamic (`add server`, HAProxy 2.4+; 2.4 needs `experimental-mode on`, which
//!   is sent with each add/del there). The version is read at connect and older ones are refused.
//! - A server's name encodes the backend id and the release, `<host>:<port>:<release>`, so any
//!   later cutover process reads them back from `show stat` ([`server_name`], [`parse_server_name`]).
//!   Names are restricted to the characters HAProxy accepts: `_` is written `__` and `+` `_p`.
//!   Servers whose names do not decode (the operator's own) are left alone and not reported.
//! - HAProxy forgets a server's counters when it is deleted. Before `del server`, cutover adds
//!   the server's final counters to a per-release tally in `<state_dir>/haproxy-<backend>.json`,
//!   so per-release counters stay monotonic across a deploy. Totals come from the backend's own
//!   row, which survives deletions (and counts HAProxy's own 503s when no server is up).
//!   Every read-modify-write of that file holds an `flock` on `<file>.lock`, so two cutover
//!   processes driving one HAProxy (a deploy and `cutover status`) never lose each other's edit.
//! - Cleanup: every server cutover puts in drain or maint is written to the same state file
//!   first (with the pid and start time of the process). When the balancer is dropped (the end of
//!   every command, also after an error), and at connect for entries of processes that no longer
//!   run (a killed deploy), each such server whose instance still answers is set back to ready;
//!   each one that cannot be restored is named on stderr and by [`HaproxyBalancer::disabled`].
//! - A reload or restart of HAProxy drops every dynamic server. The balancer of a deployment
//!   puts the ones it knew back before its next step reads the backend ([`reload`]).

mod reload;

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::api::{BackendSpec, BackendState, BackendView, Counters, DrainReport, Health, Stats};
use super::{Balancer, SwitchReport, SwitchRequest, Unreachable};
use crate::atomic_file::EditLock;
use crate::config::{BalancerKind, Config};

/// Oldest HAProxy with dynamic servers (`add server` / `del server`).
pub const MIN_VERSION: (u32, u32) = (2, 4);
/// HAProxy's largest server weight.
pub const MAX_WEIGHT: u32 = 256;
/// Time allowed for one runtime API command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often waits poll `show stat`.
const POLL: Duration = Duration::from_millis(50);
/// How long `remove` retries `del server` while HAProxy still holds connections to the server.
const DELETE_DEADLINE: Duration = Duration::from_secs(10);

/// Where HAProxy's runtime API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddress {
    Unix(PathBuf),
    Tcp(String),
}

impl SocketAddress {
    /// `/path/admin.sock`, `unix@path`, `host:port` or `ipv4@host:port`; a relative Unix path is
    /// taken from `base` (the config file's directory).
    pub fn parse(s: &str, base: &Path) -> SocketAddress {
        let s = s.trim();
        let unix = |p: &str| SocketAddress::Unix(base.join(p));
        if let Some(p) = s.strip_prefix("unix@") {
            return unix(p);
        }
        if let Some(t) = s.strip_prefix("ipv4@").or_else(|| s.strip_prefix("ipv6@")) {
            return SocketAddress::Tcp(t.to_string());
        }
        if s.contains('/') || !s.contains(':') {
            unix(s)
        } else {
            SocketAddress::Tcp(s.to_string())
        }
    }
}

impl fmt::Display for SocketAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketAddress::Unix(p) => write!(f, "{}", p.display()),
            SocketAddress::Tcp(a) => f.write_str(a),
        }
    }
}

/// A client of HAProxy's runtime API: one command per connection.
#[derive(Debug, Clone)]
pub struct RuntimeApi {
    socket: SocketAddress,
    timeout: Duration,
}

impl RuntimeApi {
    pub fn new(socket: SocketAddress) -> Self {
        RuntimeApi {
            socket,
            timeout: COMMAND_TIMEOUT,
        }
    }

    pub fn socket(&self) -> &SocketAddress {
        &self.socket
    }

    /// Sends one command line and returns HAProxy's whole answer. Errors when the socket cannot
    /// be reached ([`Unreachable`]) or the socket is not at level admin.
    pub fn exec(&self, command: &str) -> anyhow::Result<String> {
        anyhow::ensure!(
            !command.contains('\n'),
            "internal error: a runtime API command contains a newline: {command:?}"
        );
        let t = self.timeout;
        let talk = |s: &mut dyn ReadWrite| -> std::io::Result<String> {
            s.write_all(format!("{command}\n").as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        };
        let answer = match &self.socket {
            SocketAddress::Unix(p) => UnixStream::connect(p).and_then(|mut s| {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
                talk(&mut s)
            }),
            SocketAddress::Tcp(a) => a
                .to_socket_addrs()
                .and_then(|mut it| {
                    it.next().ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                    })
                })
                .and_then(|addr| TcpStream::connect_timeout(&addr, t))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(t))?;
                    s.set_write_timeout(Some(t))?;
                    talk(&mut s)
                }),
        };
        let out = answer.map_err(|e| {
            anyhow::Error::new(Unreachable(format!(
                "cannot reach HAProxy's runtime API at {}: {e}: is HAProxy running with `stats socket {} level admin` in its global section? (balancer.socket in cutover.toml)",
                self.socket, self.socket
            )))
        })?;
        if out.starts_with("Permission denied") {
            anyhow::bail!(
                "HAProxy's runtime API at {} refused `{}`: the socket is not at level admin: use `stats socket {} level admin`",
                self.socket,
                command
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" "),
                self.socket
            );
        }
        if out.starts_with("Unknown command") {
            anyhow::bail!(
                "HAProxy at {} does not know `{command}`: it is too old or not HAProxy (cutover needs {}.{}+)",
                self.socket,
                MIN_VERSION.0,
                MIN_VERSION.1
            );
        }
        Ok(out)
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

// ---------------------------------------------------------------------------------------------
// Parsing `show info` and `show stat`.

/// `show info` as name → value.
pub fn parse_info(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Major and minor of a version string such as `2.6.12-1+deb12u4`.
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Refuses HAProxy versions without dynamic servers.
pub fn check_version(version: &str) -> Result<(u32, u32), String> {
    match parse_version(version) {
        Some(v) if v >= MIN_VERSION => Ok(v),
        Some(_) => Err(format!(
            "HAProxy {version} has no dynamic servers (`add server`): cutover needs HAProxy {}.{} or newer",
            MIN_VERSION.0, MIN_VERSION.1
        )),
        None => Err(format!(
            "cannot read HAProxy's version from `show info` (Version: {version:?})"
        )),
    }
}

/// One row of `show stat` (a server, or the backend's aggregate row `BACKEND`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatRow {
    /// Proxy (backend) name.
    pub proxy: String,
    /// Server name, or `BACKEND` / `FRONTEND`.
    pub name: String,
    /// `UP`, `DOWN`, `MAINT`, `DRAIN`, `NOLB`, `UP 1/3` (going down), `MAINT (via b/s)`, ...
    pub status: String,
    /// Effective weight (0 in maint); `uweight` is the user-set one.
    pub weight: u32,
    pub uweight: Option<u32>,
    /// Current sessions and queued requests.
    pub scur: u64,
    pub qcur: u64,
    /// Sessions in total; `req_tot` is HTTP requests (servers and backends, HTTP mode).
    pub stot: u64,
    pub req_tot: Option<u64>,
    /// HTTP responses by class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub hrsp: [u64; 5],
    /// Connection errors, response errors, retries and redispatches.
    pub econ: u64,
    pub eresp: u64,
    pub wretr: u64,
    pub wredis: u64,
    /// Last health check: `L7OK`, `L4CON`, `L7STS`, `INI`, ... (empty without checks).
    pub check_status: String,
    pub check_desc: String,
    /// Average response (head) time and total time over the last 1024 requests, in ms.
    pub rtime_ms: u64,
    pub ttime_ms: u64,
    /// Largest response time seen (HAProxy 2.4+).
    pub rtime_max_ms: Option<u64>,
    /// Server address (`127.0.0.1:4100`).
    pub addr: Option<String>,
    /// Balancing algorithm (backend row).
    pub algo: Option<String>,
    /// Proxy mode (`http`, `tcp`), where HAProxy reports it.
    pub mode: Option<String>,
}

impl StatRow {
    /// The last health check passed (layer 4, 6 or 7).
    pub fn check_passed(&self) -> bool {
        matches!(self.check_status.as_str(), "L4OK" | "L6OK" | "L7OK")
    }

    /// HAProxy sends it traffic and its check passes.
    pub fn is_up(&self) -> bool {
        self.status == "UP" && self.check_passed()
    }

    /// Responses counted by status class.
    pub fn responses(&self) -> u64 {
        self.hrsp.iter().sum()
    }

    /// The row as cutover's counters. `latency_us_sum` is left 0 (see [`LatencyTracker`]).
    pub fn counters(&self) -> Counters {
        Counters {
            requests: self.req_tot.unwrap_or(self.stot),
            status_1xx: self.hrsp[0],
            status_2xx: self.hrsp[1],
            status_3xx: self.hrsp[2],
            status_4xx: self.hrsp[3],
            status_5xx: self.hrsp[4],
            proxy_errors: self.econ + self.eresp,
            retries: self.wretr + self.wredis,
            broken: 0,
            abandoned: 0,
            latency_us_sum: 0,
            latency_buckets: Vec::new(),
        }
    }

    fn state(&self) -> BackendState {
        if self.status.starts_with("MAINT") {
            BackendState::Down
        } else if self.status.starts_with("DRAIN") || self.status.starts_with("NOLB") {
            BackendState::Draining
        } else {
            BackendState::Active
        }
    }

    fn health(&self) -> Health {
        if self.check_passed() && !self.status.starts_with("DOWN") {
            Health::Healthy
        } else if self.check_status.is_empty() || self.check_status == "INI" {
            Health::Unknown
        } else {
            Health::Unhealthy
        }
    }
}

/// Splits one CSV line (HAProxy quotes fields that contain commas).
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

/// Parses `show stat` CSV output by column name (so columns added by newer versions are fine).
pub fn parse_stat(text: &str) -> anyhow::Result<Vec<StatRow>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines
        .next()
        .and_then(|l| l.strip_prefix("# "))
        .with_context(|| {
            format!(
                "HAProxy answered `show stat` without a CSV header: {:?}",
                text.trim()
            )
        })?;
    let columns: BTreeMap<&str, usize> =
        header.split(',').enumerate().map(|(i, c)| (c, i)).collect();
    for needed in ["pxname", "svname", "status", "scur", "stot"] {
        anyhow::ensure!(
            columns.contains_key(needed),
            "HAProxy's `show stat` has no {needed} column"
        );
    }
    let mut rows = Vec::new();
    for line in lines {
        let f = split_csv(line);
        let text = |name: &str| {
            columns
                .get(name)
                .and_then(|&i| f.get(i))
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let opt = |name: &str| text(name).parse::<u64>().ok();
        let num = |name: &str| opt(name).unwrap_or(0);
        let non_empty = |name: &str| Some(text(name)).filter(|s| !s.is_empty());
        rows.push(StatRow {
            proxy: text("pxname"),
            name: text("svname"),
            status: text("status"),
            weight: num("weight") as u32,
            uweight: opt("uweight").map(|w| w as u32),
            scur: num("scur"),
            qcur: num("qcur"),
            stot: num("stot"),
            req_tot: opt("req_tot"),
            hrsp: [
                num("hrsp_1xx"),
                num("hrsp_2xx"),
                num("hrsp_3xx"),
                num("hrsp_4xx"),
                num("hrsp_5xx"),
            ],
            econ: num("econ"),
            eresp: num("eresp"),
            wretr: num("wretr"),
            wredis: num("wredis"),
            // "* L7OK": a check is running now; the status is still the last result.
            check_status: text("check_status").trim_start_matches("* ").to_string(),
            check_desc: text("check_desc"),
            rtime_ms: num("rtime"),
            ttime_ms: num("ttime"),
            rtime_max_ms: opt("rtime_max"),
            addr: non_empty("addr"),
            algo: non_empty("algo"),
            mode: non_empty("mode"),
        });
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// Server names.

fn escape(s: &str) -> String {
    s.replace('_', "__").replace('+', "_p")
}

fn unescape(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '_' {
            match chars.next()? {
                '_' => out.push('_'),
                'p' => out.push('+'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// The HAProxy server name of a backend id (`<host>:<port>`) and release: `web1:41234:v2`.
pub fn server_name(id: &str, release: &str) -> String {
    format!("{}:{}", escape(id), escape(release))
}

/// Backend id, host and release read back from a server name; `None` for names cutover did not
/// write.
pub fn parse_server_name(name: &str) -> Option<(String, String, String)> {
    let (id, release) = name.rsplit_once(':')?;
    let (host, port) = id.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = unescape(host)?;
    let release = unescape(release)?;
    if host.is_empty() || release.is_empty() {
        return None;
    }
    Some((format!("{host}:{port}"), host, release))
}

// ---------------------------------------------------------------------------------------------
// State file: retired counters and servers cutover disabled.

/// A server cutover put in drain or maint and has not yet removed or restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disabled {
    pub id: String,
    pub address: Option<SocketAddr>,
    /// `drain` or `maint`.
    pub state: String,
    /// The cutover process that disabled it, and that process's start time (clock ticks since
    /// boot, from /proc), so a reused pid is not mistaken for it.
    pub pid: u32,
    pub pid_start: Option<u64>,
    /// The pid namespace `pid` is in ([`pid_namespace`]): a cutover in another container
    /// sees other pids, so it cannot tell whether that process still runs. `None` in files
    /// written before it was recorded.
    #[serde(default)]
    pub pid_ns: Option<u64>,
    pub since_unix: u64,
}

impl Disabled {
    /// Whether the cutover process that disabled the server is known to have ended, seen
    /// from a process in pid namespace `my_ns`: never when it ran in another namespace, where
    /// its pid means another process here (restoring then would undo a running deploy's drain).
    fn left_by_ended_process(&self, my_ns: Option<u64>) -> bool {
        if self.pid_ns.is_some() && self.pid_ns != my_ns {
            return false;
        }
        process_start(self.pid) != self.pid_start
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    /// Final counters of deleted servers, per release.
    #[serde(default)]
    retired: BTreeMap<String, Counters>,
    /// The HAProxy process (`pid@start`, see [`Inner::process`]) whose servers `retired`
    /// counted: a restarted HAProxy counts from zero, and so does the tally. `None` in files
    /// written before it was recorded: taken as the running one.
    #[serde(default)]
    retired_for: Option<String>,
    /// Per release, responses cut at a drain deadline that HAProxy counted as no failure (a
    /// stream whose head it had already passed on counts as its status): counted as broken,
    /// as the built-in balancer counts them. Tied to `retired_for` like `retired`.
    #[serde(default)]
    cut: BTreeMap<String, u64>,
    /// Server name → what cutover disabled.
    #[serde(default)]
    disabled: BTreeMap<String, Disabled>,
}

impl StateFile {
    /// The tallies, made the running HAProxy `process`'s: one that has since restarted
    /// counted into counters that are gone, so its tallies go with them.
    fn tally_for(&mut self, process: String) -> &mut StateFile {
        if self.retired_for.as_ref().is_some_and(|p| *p != process) {
            self.retired.clear();
            self.cut.clear();
        }
        self.retired_for = Some(process);
        self
    }
}

fn load_state(path: &Path) -> anyhow::Result<StateFile> {
    let parse = |bytes: &[u8]| -> anyhow::Result<StateFile> {
        serde_json::from_slice(bytes).with_context(|| {
            format!(
                "{} is not a valid cutover HAProxy state file: move it away (it holds counters of deleted servers and the servers cutover disabled)",
                path.display()
            )
        })
    };
    Ok(crate::atomic_file::read_either(path, parse)?.unwrap_or_default())
}

fn save_state(path: &Path, state: &StateFile) -> anyhow::Result<()> {
    crate::atomic_file::replace(path, &serde_json::to_vec_pretty(state)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// This process's pid namespace (the inode /proc/self/ns/pid names), `None` without /proc.
fn pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Start time of a process (field 22 of /proc/PID/stat), `None` when it does not run (or is a
/// zombie).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    // `rest` starts at field 3 (state): field 22 is index 19.
    fields.get(19)?.parse().ok()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Estimates a latency sum from HAProxy's moving averages: between two readings of a server,
/// `responses added × rtime now` is added. HAProxy has no sum and no histogram; `rtime` is the
/// mean of its last 1024 requests, so diffs of two [`Stats`] read by one process give an
/// interval mean close to `rtime` (exact when the latency is steady).
#[derive(Debug, Default)]
struct LatencyTracker {
    /// Row key → (responses at the last reading, latency sum so far in µs).
    seen: BTreeMap<String, (u64, u64)>,
}

impl LatencyTracker {
    fn update(&mut self, key: &str, row: &StatRow) -> u64 {
        let responses = row.responses();
        let rtime_us = row.rtime_ms * 1000;
        let entry = self
            .seen
            .entry(key.to_string())
            .or_insert((responses, responses * rtime_us));
        if responses < entry.0 {
            // The counters were reset (a reload, or a server re-added under the same name).
            *entry = (responses, responses * rtime_us);
        } else {
            entry.1 += (responses - entry.0) * rtime_us;
            entry.0 = responses;
        }
        entry.1
    }
}

// ---------------------------------------------------------------------------------------------
// The balancer.

/// What [`HaproxyBalancer::connect`] needs, from `[balancer]` and `[app.health]`.
#[derive(Debug, Clone)]
pub struct HaproxySettings {
    pub socket: SocketAddress,
    pub backend: String,
    /// Path of the app's health check, for cutover's own liveness probe (HAProxy's check uses
    /// the backend's `option httpchk`).
    pub health_path: String,
    /// Health check cadence of added servers (`check inter .. rise .. fall ..`): dynamic
    /// servers do not inherit `default-server`.
    pub check_interval: Duration,
    pub rise: u32,
    pub fall: u32,
    /// `<state_dir>/haproxy-<backend>.json`.
    pub state_file: PathBuf,
    /// Put back the servers a reload or restart of HAProxy drops ([`reload`]): for a command
    /// that holds the deploy lock (a deployment), whose view of the backend is the current one.
    pub put_back_lost_servers: bool,
}

impl HaproxySettings {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let b = &config.balancer;
        anyhow::ensure!(
            b.kind == BalancerKind::Haproxy,
            "{}: balancer.kind is not \"haproxy\"",
            config.file.display()
        );
        let socket = b.socket.as_deref().with_context(|| {
            format!(
                "{}: kind = \"haproxy\" needs balancer.socket",
                config.file.display()
            )
        })?;
        let backend = b.backend.clone().with_context(|| {
            format!(
                "{}: kind = \"haproxy\" needs balancer.backend",
                config.file.display()
            )
        })?;
        let h = &config.app.health;
        Ok(HaproxySettings {
            socket: SocketAddress::parse(socket, &config.base_dir),
            state_file: config.state_dir.join(format!("haproxy-{backend}.json")),
            backend,
            health_path: h.path.clone(),
            check_interval: *h.interval,
            rise: h.healthy_threshold.0.max(1),
            fall: h.unhealthy_threshold.0.max(1),
            put_back_lost_servers: false,
        })
    }
}

/// What happened to a server cutover had disabled, at cleanup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restoration {
    /// Set back to ready: its instance still answers.
    Restored { server: String },
    /// Left in drain or maint: its instance does not answer (or HAProxy refused); a person or
    /// the next deploy of that host must remove it.
    Left { server: String, reason: String },
}

impl fmt::Display for Restoration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Restoration::Restored { server } => write!(
                f,
                "restored HAProxy server {server} to ready: cutover had disabled it and its instance still answers"
            ),
            Restoration::Left { server, reason } => write!(
                f,
                "HAProxy server {server} is LEFT DISABLED: {reason}; the next deploy of its host removes it, or remove it by hand (`set server {server} state maint`, `del server {server}`)"
            ),
        }
    }
}

struct Inner {
    api: RuntimeApi,
    settings: HaproxySettings,
    version: String,
    /// `experimental-mode on;` before add/del on HAProxy 2.4.
    prefix: &'static str,
    latency: Mutex<LatencyTracker>,
    me: (u32, Option<u64>),
    /// Weights of servers added at weight 0, given once HAProxy's own check passes (see `add`).
    pending_weights: Mutex<BTreeMap<String, u32>>,
    /// The HAProxy process last seen, and the `counting_since_ms` given for it.
    seen_process: Mutex<Option<(String, u64)>>,
    /// The backend's servers as last known, to put back after a reload: only with
    /// `put_back_lost_servers` ([`reload`]).
    known: Option<Mutex<reload::Known>>,
    /// What this balancer did by itself, for [`Balancer::notices`].
    notices: Mutex<Vec<String>>,
}

/// The [`Balancer`] of an existing HAProxy.
pub struct HaproxyBalancer {
    inner: Arc<Inner>,
    /// Ctrl-C ends a deploy without unwinding: what `Drop` restores is restored then too.
    _at_signal: crate::bounded::ExitHook,
}

impl fmt::Debug for HaproxyBalancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HaproxyBalancer")
            .field("socket", &self.inner.api.socket)
            .field("backend", &self.inner.settings.backend)
            .field("version", &self.inner.version)
            .finish_non_exhaustive()
    }
}

impl HaproxyBalancer {
    /// Connects (blocking, a few milliseconds): reads the version, checks the backend, and
    /// restores servers left disabled by cutover processes that no longer run.
    pub fn connect(settings: HaproxySettings) -> anyhow::Result<Self> {
        let api = RuntimeApi::new(settings.socket.clone());
        let info = parse_info(&api.exec("show info")?);
        let version = info.get("Version").cloned().unwrap_or_default();
        let (major, minor) = check_version(&version)
            .map_err(|e| anyhow::anyhow!("HAProxy at {}: {e}", api.socket))?;
        let me = std::process::id();
        let inner = Inner {
            api,
            version,
            prefix: if (major, minor) == (2, 4) {
                "experimental-mode on; "
            } else {
                ""
            },
            latency: Mutex::new(LatencyTracker::default()),
            me: (me, process_start(me)),
            pending_weights: Mutex::default(),
            seen_process: Mutex::default(),
            known: settings
                .put_back_lost_servers
                .then(|| Mutex::new(reload::Known::default())),
            notices: Mutex::default(),
            settings,
        };
        inner.check_backend()?;
        let inner = Arc::new(inner);
        if inner.known.is_some() {
            reload::watch(Arc::downgrade(&inner));
        }
        let at_signal = {
            let inner = inner.clone();
            crate::bounded::at_signal_exit(move || inner.restore_mine_now())
        };
        let balancer = HaproxyBalancer {
            inner,
            _at_signal: at_signal,
        };
        let orphans = balancer
            .inner
            .restore(|d| d.left_by_ended_process(pid_namespace()))?;
        for r in &orphans {
            eprintln!("haproxy: {r} (left by cutover pid that no longer runs)");
        }
        // Left alone, and said: a deployer in another container may still run, or may have
        // been killed there, leaving the server drained for good.
        let here = pid_namespace();
        for (name, d) in balancer.disabled().unwrap_or_default() {
            if d.pid_ns.is_some() && d.pid_ns != here {
                eprintln!(
                    "haproxy: server {} is in {} since {}s ago, put there by cutover pid {} in another pid namespace (container): left as it is, since whether that process still runs cannot be told from here; if no deploy runs (`cutover lock`), the next deploy of its host replaces the server",
                    balancer.inner.full(&name),
                    d.state,
                    now_unix().saturating_sub(d.since_unix),
                    d.pid
                );
            }
        }
        Ok(balancer)
    }

    /// HAProxy's version as `show info` reports it.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// Servers cutover put in drain or maint and has not removed or restored yet (name →
    /// record), as the state file holds them.
    pub fn disabled(&self) -> anyhow::Result<BTreeMap<String, Disabled>> {
        let _g = self.inner.lock_state()?;
        Ok(load_state(&self.inner.settings.state_file)?.disabled)
    }

    /// Raw `show stat` rows of the backend (servers and the `BACKEND` row): response times,
    /// check details and everything else HAProxy reports, for analysis beyond [`Counters`].
    pub async fn rows(&self) -> anyhow::Result<Vec<StatRow>> {
        self.blocking(|i| i.rows()).await
    }

    /// Restores every server this process disabled and did not remove (see the module docs);
    /// also runs on drop. Returns what happened to each.
    pub async fn restore_mine(&self) -> anyhow::Result<Vec<Restoration>> {
        self.blocking(|i| {
            let me = i.me;
            i.restore(move |d| (d.pid, d.pid_start) == me && d.pid_ns == pid_namespace())
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .context("a HAProxy runtime API call panicked")?
    }
}

impl Drop for HaproxyBalancer {
    fn drop(&mut self) {
        self.inner.restore_mine_now();
    }
}

impl Inner {
    /// Restores what this process disabled and did not remove, saying what happened (the
    /// end of every command: dropped, or at Ctrl-C).
    fn restore_mine_now(&self) {
        let me = self.me;
        match self.restore(|d| (d.pid, d.pid_start) == me && d.pid_ns == pid_namespace()) {
            Ok(list) => list.iter().for_each(|r| eprintln!("haproxy: {r}")),
            Err(e) => eprintln!(
                "haproxy: WARNING: cannot check for servers cutover left disabled: {e:#}; run `cutover status` to retry"
            ),
        }
    }

    /// Serialises read-modify-write of the state file with this process's other threads and
    /// with other cutover processes driving the same HAProxy (a deploy, `cutover status`, the
    /// dashboard): the deploy lock alone does not cover those.
    /// Refuses, before anything changes, what would make a deploy fail half-way or a status
    /// look clean while it sees nothing: a socket below level admin (which hides server
    /// addresses and refuses changes), a `backend` that names no backend, a TCP backend
    /// (no HTTP status counts, so no proof) and a static algorithm.
    fn check_backend(&self) -> anyhow::Result<()> {
        let (b, socket) = (&self.settings.backend, &self.api.socket);
        // `show cli level` exists since HAProxy 2.0; cutover needs 2.4.
        let level = self.api.exec("show cli level")?;
        let level = level.trim();
        anyhow::ensure!(
            level == "admin",
            "HAProxy's socket {socket} is at level {level:?}: cutover adds, drains and removes servers, which needs `level admin` on the `stats socket` line of haproxy.cfg"
        );
        let rows = self.rows()?;
        let Some(be) = rows.iter().find(|r| r.name == "BACKEND") else {
            anyhow::bail!(
                "HAProxy at {socket}: {b:?} is not a backend (a frontend takes no servers): set [balancer] backend to the name of a `backend` section of haproxy.cfg"
            );
        };
        if let Some(mode) = be.mode.as_deref().filter(|m| *m != "http") {
            anyhow::bail!(
                "HAProxy backend {b} at {socket} is in `mode {mode}`: cutover proves a deploy with HTTP status counts, which HAProxy keeps only in `mode http`"
            );
        }
        // Hash-based algorithms take dynamic servers with `hash-type consistent`: HAProxy's
        // answer to `add server` decides. static-rr never does.
        if be.algo.as_deref() == Some("static-rr") {
            anyhow::bail!(
                "HAProxy backend {b} at {socket} uses `balance static-rr`, which cannot take dynamic servers: use `balance roundrobin`"
            );
        }
        Ok(())
    }

    /// The running HAProxy process, as `pid@start` (its identity: a reload or restart makes a
    /// new one, whose counters start from zero), and when its counters started, in ms since the
    /// epoch. HAProxy says when it started to the second (`Start_time_sec`, 2.5+; on 2.4 now
    /// minus `Uptime_sec`, fixed per pid): a new process seen within the same second as the
    /// last is given the next millisecond, so a restart always shows as a new count.
    fn process(&self) -> anyhow::Result<(String, u64)> {
        Ok(self.identify(&parse_info(&self.api.exec("show info")?)))
    }

    /// [`Inner::process`] from an answer to `show info`.
    fn identify(&self, info: &BTreeMap<String, String>) -> (String, u64) {
        let field = |k: &str| info.get(k).and_then(|v| v.trim().parse::<u64>().ok());
        let pid = info.get("Pid").map_or("", |p| p.trim()).to_string();
        let mut seen = self.seen_process.lock().unwrap_or_else(|p| p.into_inner());
        let start_sec = match (field("Start_time_sec"), &*seen) {
            (Some(s), _) => s,
            (None, Some((id, ms))) if id.starts_with(&format!("{pid}@")) => ms / 1000,
            (None, _) => now_unix().saturating_sub(field("Uptime_sec").unwrap_or(0)),
        };
        let id = format!("{pid}@{start_sec}");
        let mut ms = start_sec * 1000;
        match &*seen {
            Some((last, last_ms)) if *last == id => ms = *last_ms,
            Some((_, last_ms)) if ms <= *last_ms => ms = last_ms + 1,
            _ => {}
        }
        *seen = Some((id.clone(), ms));
        (id, ms)
    }

    fn lock_state(&self) -> anyhow::Result<EditLock> {
        crate::atomic_file::lock_for_edit(&self.settings.state_file)
    }

    fn full(&self, server: &str) -> String {
        format!("{}/{}", self.settings.backend, server)
    }

    /// `show stat` of the backend: server rows and the `BACKEND` row. A reading that sees a
    /// server up gives it its pending weight (see `add`); a deployment's reading puts back what
    /// a reload of HAProxy dropped first ([`reload`]).
    fn rows(&self) -> anyhow::Result<Vec<StatRow>> {
        let rows = match &self.known {
            Some(known) => self.rows_kept(known)?,
            None => self.read()?.1,
        };
        let due: Vec<(String, u32)> = {
            let pending = self
                .pending_weights
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            rows.iter()
                .filter(|r| r.is_up())
                .filter_map(|r| {
                    let (id, _, _) = parse_server_name(&r.name)?;
                    Some((r.name.clone(), *pending.get(&id)?))
                })
                .collect()
        };
        for (name, weight) in due {
            self.set_weight(&name, weight)?;
            if let Some((id, _, _)) = parse_server_name(&name) {
                self.pending(&id, None);
            }
        }
        Ok(rows)
    }

    /// `show info` and `show stat` of the backend on one connection, so both come from one
    /// HAProxy process (a reload hands the socket over between two connections): that
    /// process ([`Inner::process`]) and the rows.
    fn read(&self) -> anyhow::Result<(String, Vec<StatRow>)> {
        let b = &self.settings.backend;
        let out = self.api.exec(&format!("show info;show stat {b} 6 -1"))?;
        if out.contains("No such proxy") {
            anyhow::bail!(
                "HAProxy at {} has no backend {b:?}: add `backend {b}` with `balance roundrobin` and `option httpchk` to its config (docs/haproxy.md), or fix balancer.backend",
                self.api.socket
            );
        }
        // The CSV begins at its header line, after the lines of `show info`.
        let (info, stat) = out.split_at(out.find("\n# ").map_or(0, |i| i + 1));
        let (process, _) = self.identify(&parse_info(info));
        let rows = parse_stat(stat)?
            .into_iter()
            .filter(|r| &r.proxy == b)
            .collect();
        Ok((process, rows))
    }

    /// The row of the server holding backend `id`.
    fn find(&self, rows: &[StatRow], id: &str) -> Option<StatRow> {
        rows.iter()
            .find(|r| parse_server_name(&r.name).is_some_and(|(i, _, _)| i == id))
            .cloned()
    }

    fn find_by_name(&self, rows: &[StatRow], name: &str) -> Option<StatRow> {
        rows.iter().find(|r| r.name == name).cloned()
    }

    fn server_of(&self, id: &str) -> anyhow::Result<StatRow> {
        self.find(&self.rows()?, id).with_context(|| {
            format!(
                "HAProxy backend {} at {} has no server for {id}",
                self.settings.backend, self.api.socket
            )
        })
    }

    /// Runs a command whose success is an empty answer (or one of `ok`).
    fn command(&self, cmd: &str, ok: &[&str]) -> anyhow::Result<()> {
        let out = self.api.exec(cmd)?;
        let text = out.trim();
        if text.is_empty() || ok.iter().any(|o| text.contains(o)) {
            return Ok(());
        }
        anyhow::bail!("HAProxy at {} refused `{cmd}`: {text}", self.api.socket)
    }

    fn set_state(&self, server: &str, state: &str) -> anyhow::Result<()> {
        self.change(
            || {
                self.command(
                    &format!("set server {} state {state}", self.full(server)),
                    &[],
                )
            },
            |k| k.set_ready(server, state == "ready"),
        )
    }

    fn set_weight(&self, server: &str, weight: u32) -> anyhow::Result<()> {
        self.change(
            || {
                self.command(
                    &format!("set server {} weight {weight}", self.full(server)),
                    &[],
                )
            },
            |k| k.set_weight(server, weight),
        )
    }

    fn edit_state<T>(&self, f: impl FnOnce(&mut StateFile) -> T) -> anyhow::Result<T> {
        let held = self.lock_state()?;
        self.edit_state_held(&held, f)
    }

    /// [`Inner::edit_state`] under a state lock the caller holds.
    fn edit_state_held<T>(
        &self,
        _held: &EditLock,
        f: impl FnOnce(&mut StateFile) -> T,
    ) -> anyhow::Result<T> {
        let path = &self.settings.state_file;
        let mut state = load_state(path)?;
        let r = f(&mut state);
        save_state(path, &state)?;
        Ok(r)
    }

    /// Closes what `row`'s server (in maint) still has open at its drain deadline, and returns
    /// how many streams that was. HAProxy answers a stream still waiting for its response
    /// head with a 502 and counts it, but a stream whose head it had passed on (a download,
    /// an event stream) ends cut and counted as its status: those are tallied as broken, as
    /// the built-in balancer counts a cut response. A WebSocket cut here counts too (HAProxy's
    /// counts cannot tell it from a stream; the built-in balancer does not count one). Measured
    /// with HAProxy 2.6: 6 cut `GET /sleep` gave the server `eresp` +6 and the backend
    /// `hrsp_5xx` +6; 6 cut event streams changed neither.
    fn cut_sessions(&self, row: &StatRow) -> anyhow::Result<u64> {
        let open = row.scur + row.qcur;
        self.command(
            &format!("shutdown sessions server {}", self.full(&row.name)),
            &[],
        )?;
        // HAProxy ends the streams at once, counting a response error on the server (and the
        // 502 it answers on the backend) for each still waiting for its head; nothing new
        // reaches a server in maint, so what the server's counts gain meanwhile is theirs.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut after = row.clone();
        loop {
            match self.find_by_name(&self.rows()?, &row.name) {
                Some(now) => after = now,
                None => break,
            }
            if after.scur + after.qcur == 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(POLL);
        }
        let counted =
            after.eresp.saturating_sub(row.eresp) + after.hrsp[4].saturating_sub(row.hrsp[4]);
        let uncounted = open.saturating_sub(counted);
        let Some((_, _, release)) = parse_server_name(&row.name) else {
            return Ok(open);
        };
        if uncounted == 0 {
            return Ok(open);
        }
        let (process, _) = self.process()?;
        self.edit_state(|s| {
            *s.tally_for(process).cut.entry(release).or_default() += uncounted;
        })?;
        Ok(open)
    }

    fn record_disabled(&self, row: &StatRow, id: &str, state: &str) -> anyhow::Result<()> {
        let entry = Disabled {
            id: id.to_string(),
            address: row.addr.as_deref().and_then(|a| a.parse().ok()),
            state: state.to_string(),
            pid: self.me.0,
            pid_start: self.me.1,
            pid_ns: pid_namespace(),
            since_unix: now_unix(),
        };
        self.edit_state(|s| {
            s.disabled.insert(row.name.clone(), entry);
        })
    }

    fn views(&self, rows: &[StatRow]) -> Vec<BackendView> {
        let mut latency = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        rows.iter()
            .filter_map(|r| {
                let (id, host, release) = parse_server_name(&r.name)?;
                let address = r.addr.as_deref()?.parse().ok()?;
                let mut counters = r.counters();
                counters.latency_us_sum = latency.update(&r.name, r);
                Some(BackendView {
                    spec: BackendSpec {
                        id,
                        address,
                        host,
                        release,
                        weight: r.uweight.unwrap_or(r.weight),
                        health_path: self.settings.health_path.clone(),
                        preview: false,
                        gated: false,
                    },
                    state: r.state(),
                    health: r.health(),
                    in_flight: r.scur + r.qcur,
                    counters,
                })
            })
            .collect()
    }

    fn add(&self, spec: &BackendSpec) -> anyhow::Result<()> {
        let b = &self.settings.backend;
        if spec.preview {
            anyhow::bail!(
                "HAProxy backend {b}: preview backends ({}) need a preview route, which cutover cannot create in HAProxy; use the built-in balancer for blue-green with preview, or verify instances directly",
                spec.id
            );
        }
        if spec.weight > MAX_WEIGHT {
            anyhow::bail!(
                "HAProxy backend {b}: weight {} of {} is above HAProxy's maximum {MAX_WEIGHT}",
                spec.weight,
                spec.id
            );
        }
        let name = server_name(&spec.id, &spec.release);
        let rows = self.rows()?;
        if let Some(r) = self.find(&rows, &spec.id) {
            let same = r.name == name
                && r.addr.as_deref().and_then(|a| a.parse().ok()) == Some(spec.address);
            anyhow::ensure!(
                same,
                "HAProxy backend {b} already has server {} for {}: remove it first",
                r.name,
                spec.id
            );
            // Added by a deployer that stopped before HAProxy's check passed: still waiting.
            if r.weight == 0 && spec.weight > 0 && !r.is_up() {
                self.pending(&spec.id, Some(spec.weight));
            }
            return Ok(());
        }
        self.change(
            || self.add_server(&name, spec.address),
            |k| k.added(&name, spec.address),
        )
        .map_err(|e| {
            e.context(format!(
                "adding {} to HAProxy backend {b} (needs HAProxy 2.4+, a dynamic algorithm such as `balance roundrobin` or a hash with `hash-type consistent`, and a server name HAProxy accepts)",
                spec.id
            ))
        })?;
        self.pending(&spec.id, (spec.weight > 0).then_some(spec.weight));
        Ok(())
    }

    /// `add server` at weight 0 with the configured checks, then `enable health` and `enable
    /// server`; deleted again when those fail. At weight 0 until HAProxy's own check passes
    /// (the first reading that sees it up gives it its weight: see `rows`): a server leaving
    /// maintenance counts as up before its first check has run, so an address HAProxy cannot
    /// reach would otherwise take requests and fail them.
    fn add_server(&self, name: &str, address: SocketAddr) -> anyhow::Result<()> {
        let c = &self.settings;
        let add = format!(
            "{}add server {} {address} check inter {}ms rise {} fall {} weight 0",
            self.prefix,
            self.full(name),
            c.check_interval.as_millis().max(1),
            c.rise,
            c.fall,
        );
        self.command(&add, &["New server registered"])?;
        let enable = self
            .command(&format!("enable health {}", self.full(name)), &[])
            .and_then(|_| self.command(&format!("enable server {}", self.full(name)), &[]));
        if let Err(e) = enable {
            let _ = self.command(
                &format!("{}del server {}", self.prefix, self.full(name)),
                &["Server deleted"],
            );
            return Err(e);
        }
        Ok(())
    }

    /// Records (or forgets, with `None`) the weight `id` gets once HAProxy sees it up.
    fn pending(&self, id: &str, weight: Option<u32>) {
        let mut pending = self
            .pending_weights
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match weight {
            Some(w) => pending.insert(id.to_string(), w),
            None => pending.remove(id),
        };
    }

    fn delete(&self, server: &str) -> anyhow::Result<()> {
        self.change(
            || {
                self.command(
                    &format!("{}del server {}", self.prefix, self.full(server)),
                    &["Server deleted"],
                )
            },
            |k| k.deleted(server),
        )
    }

    fn remove(&self, id: &str) -> anyhow::Result<()> {
        self.pending(id, None);
        let Some(row) = self.find(&self.rows()?, id) else {
            // Already gone; forget a stale record.
            return self.edit_state(|s| s.disabled.retain(|_, d| d.id != id));
        };
        let name = row.name.clone();
        self.set_state(&name, "maint")?;
        let deadline = Instant::now() + DELETE_DEADLINE;
        loop {
            // Counters are final: no new traffic reaches a server in maint. The state lock
            // spans the read, the delete and the tally, so a `stats` never sees the server
            // both live and retired (counted twice).
            let held = self.lock_state()?;
            let (process, _) = self.process()?;
            let last = self.find(&self.rows()?, id);
            match self.delete(&name) {
                Ok(()) => {
                    if let Some(last) = last {
                        let release = parse_server_name(&name).map(|(_, _, r)| r);
                        let mut c = last.counters();
                        c.latency_us_sum = self
                            .latency
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .update(&name, &last);
                        self.edit_state_held(&held, |s| {
                            s.disabled.remove(&name);
                            let s = s.tally_for(process);
                            if let Some(r) = release {
                                s.retired.entry(r).or_default().add(&c);
                            }
                        })?;
                    }
                    drop(held);
                    self.latency
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .seen
                        .remove(&name);
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!(
                        "HAProxy still holds connections to {} after {DELETE_DEADLINE:?}; it stays in maint",
                        self.full(&name)
                    )));
                }
                Err(_) => {
                    drop(held);
                    std::thread::sleep(POLL)
                }
            }
        }
    }

    /// Restores the disabled servers `which` selects (see the module docs).
    fn restore(&self, which: impl Fn(&Disabled) -> bool) -> anyhow::Result<Vec<Restoration>> {
        let chosen: Vec<(String, Disabled)> = {
            let _g = self.lock_state()?;
            load_state(&self.settings.state_file)?
                .disabled
                .into_iter()
                .filter(|(_, d)| which(d))
                .collect()
        };
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self.rows()?;
        let mut out = Vec::new();
        for (name, d) in chosen {
            let full = self.full(&name);
            let Some(row) = rows.iter().find(|r| r.name == name) else {
                self.edit_state(|s| s.disabled.remove(&name))?;
                continue;
            };
            let verdict = match d.address {
                Some(addr) => alive(addr, &self.settings.health_path, row),
                None => Err("its address is unknown".to_string()),
            };
            let result = verdict.and_then(|()| {
                self.set_state(&name, "ready")
                    .map_err(|e| format!("setting it ready failed: {e:#}"))
            });
            match result {
                Ok(()) => {
                    self.edit_state(|s| s.disabled.remove(&name))?;
                    out.push(Restoration::Restored { server: full });
                }
                Err(reason) => out.push(Restoration::Left {
                    server: full,
                    reason,
                }),
            }
        }
        Ok(out)
    }
}

/// Whether a disabled server's instance still serves: a direct `GET health_path` answering
/// 2xx says yes, a refused connection or another status says no; when cutover cannot reach the
/// address itself, HAProxy's own last check decides.
fn alive(addr: SocketAddr, path: &str, row: &StatRow) -> Result<(), String> {
    match probe_blocking(addr, path, Duration::from_secs(1)) {
        Ok(()) => Ok(()),
        Err(Probe::Dead(why)) => Err(format!("its instance does not answer: {why}")),
        Err(Probe::Unknown(why)) if row.check_passed() => {
            tracing::debug!("{addr}: {why}; HAProxy's check passes");
            Ok(())
        }
        Err(Probe::Unknown(why)) => Err(format!(
            "its instance does not answer ({why}) and HAProxy's check says {} {}",
            row.check_status, row.check_desc
        )),
    }
}

enum Probe {
    Dead(String),
    Unknown(String),
}

/// `GET path` over HTTP/1.0 on a fresh connection (synchronous, for the cleanup path).
fn probe_blocking(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), Probe> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Probe::Dead(format!("GET http://{addr}{path}: {e}"))
        } else {
            Probe::Unknown(format!("GET http://{addr}{path}: {e}"))
        }
    })?;
    let io = |e: std::io::Error| Probe::Unknown(format!("GET http://{addr}{path}: {e}"));
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    s.write_all(
        format!(
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: cutover-cleanup\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .map_err(io)?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).map_err(io)?;
    let line = String::from_utf8_lossy(&head[..n]);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(s) if (200..300).contains(&s) => Ok(()),
        Some(s) => Err(Probe::Dead(format!("GET http://{addr}{path}: status {s}"))),
        None => Err(Probe::Dead(format!(
            "GET http://{addr}{path}: not an HTTP answer"
        ))),
    }
}

#[async_trait]
impl Balancer for HaproxyBalancer {
    fn max_weight(&self) -> u32 {
        MAX_WEIGHT
    }

    fn notices(&self) -> Vec<String> {
        std::mem::take(&mut *self.inner.notices.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn backends(&self) -> anyhow::Result<Vec<BackendView>> {
        self.blocking(|i| {
            let rows = i.rows()?;
            Ok(i.views(&rows))
        })
        .await
    }

    async fn add(&self, spec: &BackendSpec) -> anyhow::Result<()> {
        let spec = spec.clone();
        self.blocking(move |i| i.add(&spec)).await
    }

    async fn remove(&self, id: &str) -> anyhow::Result<()> {
        let id = id.to_string();
        self.blocking(move |i| i.remove(&id)).await
    }

    async fn set_weight(&self, id: &str, weight: u32) -> anyhow::Result<()> {
        let id = id.to_string();
        self.blocking(move |i| {
            anyhow::ensure!(
                weight <= MAX_WEIGHT,
                "HAProxy backend {}: weight {weight} of {id} is above HAProxy's maximum {MAX_WEIGHT}",
                i.settings.backend
            );
            let row = i.server_of(&id)?;
            i.set_weight(&row.name, weight)
        })
        .await
    }

    async fn drain(&self, id: &str) -> anyhow::Result<()> {
        let id = id.to_string();
        self.blocking(move |i| {
            let row = i.server_of(&id)?;
            if row.state() == BackendState::Down {
                return Ok(()); // already further out than draining
            }
            // Written before acting, so a crash right after still leaves a record.
            i.record_disabled(&row, &id, "drain")?;
            i.set_state(&row.name, "drain")
        })
        .await
    }

    async fn activate(&self, id: &str) -> anyhow::Result<()> {
        let id = id.to_string();
        self.blocking(move |i| {
            let row = i.server_of(&id)?;
            i.set_state(&row.name, "ready")?;
            i.edit_state(|s| s.disabled.remove(&row.name))?;
            Ok(())
        })
        .await
    }

    async fn wait_drained(&self, id: &str, timeout: Duration) -> anyhow::Result<DrainReport> {
        let started = Instant::now();
        let mut drained = true;
        let row = loop {
            let id2 = id.to_string();
            let Some(row) = self.blocking(move |i| Ok(i.find(&i.rows()?, &id2))).await? else {
                // Gone: nothing is in flight.
                return Ok(DrainReport {
                    drained: true,
                    closed_at_deadline: 0,
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            };
            if row.scur + row.qcur == 0 {
                break row;
            }
            if started.elapsed() >= timeout {
                drained = false;
                break row;
            }
            tokio::time::sleep(POLL).await;
        };
        let id = id.to_string();
        let closed = self
            .blocking(move |i| {
                i.record_disabled(&row, &id, "maint")?;
                i.set_state(&row.name, "maint")?;
                if drained {
                    return Ok(0);
                }
                // What is still open now, in maint: a request that ended since the deadline's
                // reading was not cut.
                let now = i.find_by_name(&i.rows()?, &row.name).unwrap_or(row);
                i.cut_sessions(&now)
            })
            .await?;
        Ok(DrainReport {
            drained,
            closed_at_deadline: closed,
            waited_ms: started.elapsed().as_millis() as u64,
        })
    }

    async fn wait_healthy(&self, id: &str, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let id2 = id.to_string();
            // The reading that sees it up gives it its pending weight (see `Inner::rows`).
            let row = self.blocking(move |i| i.server_of(&id2)).await?;
            if row.is_up() {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                anyhow::bail!(
                    "HAProxy does not see {}/{} up after {}: status {}, last check {} {}; check that the backend's `option httpchk` matches app.health.path",
                    self.inner.settings.backend,
                    row.name,
                    humantime::format_duration(timeout),
                    row.status,
                    row.check_status,
                    row.check_desc
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn stats(&self) -> anyhow::Result<Stats> {
        self.blocking(|i| {
            // One state lock over both reads: a server deleted in between would be counted
            // live and retired (see `remove`).
            let (rows, state, (process, since)) = {
                let _g = i.lock_state()?;
                (i.rows()?, load_state(&i.settings.state_file)?, i.process()?)
            };
            let mut stats = Stats {
                counting_since_ms: since,
                ..Stats::default()
            };
            // What servers of an HAProxy that has since restarted served is not in its counts.
            let (retired, cut) = if state.retired_for.as_ref().is_none_or(|p| *p == process) {
                (state.retired, state.cut)
            } else {
                Default::default()
            };
            if let Some(be) = rows.iter().find(|r| r.name == "BACKEND") {
                stats.total = be.counters();
                stats.total.latency_us_sum = i
                    .latency
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .update("BACKEND", be);
            }
            for v in i.views(&rows) {
                stats
                    .releases
                    .entry(v.spec.release.clone())
                    .or_default()
                    .add(&v.counters);
                stats.backends.insert(v.spec.id, v.counters);
            }
            for (release, c) in retired {
                stats.releases.entry(release).or_default().add(&c);
            }
            for (release, n) in cut {
                stats.releases.entry(release).or_default().broken += n;
                stats.total.broken += n;
            }
            Ok(stats)
        })
        .await
    }
}

/// An HAProxy connected at its first use, and at each use after until that succeeds: a
/// `cutover status` or `cutover serve` started while HAProxy is down still shows the hosts and
/// says the balancer cannot be reached, and a deploy waits HAProxy out (`unreachable_timeout`)
/// as it waits out a restart, instead of failing before it begins.
pub struct LazyHaproxy {
    settings: HaproxySettings,
    /// Where the balancer is configured, for errors found on connecting (`mode tcp`, ...).
    configured_in: String,
    connected: tokio::sync::OnceCell<HaproxyBalancer>,
}

impl LazyHaproxy {
    pub fn new(settings: HaproxySettings, config_file: &std::path::Path) -> Self {
        LazyHaproxy {
            settings,
            configured_in: format!("{}: [balancer] kind = \"haproxy\"", config_file.display()),
            connected: tokio::sync::OnceCell::new(),
        }
    }

    async fn get(&self) -> anyhow::Result<&HaproxyBalancer> {
        self.connected
            .get_or_try_init(|| async {
                let settings = self.settings.clone();
                tokio::task::spawn_blocking(move || HaproxyBalancer::connect(settings))
                    .await
                    .context("the HAProxy connection task stopped")?
                    .with_context(|| self.configured_in.clone())
            })
            .await
    }
}

#[async_trait]
impl Balancer for LazyHaproxy {
    fn max_weight(&self) -> u32 {
        MAX_WEIGHT
    }
    fn notices(&self) -> Vec<String> {
        self.connected
            .get()
            .map(|b| b.notices())
            .unwrap_or_default()
    }
    async fn backends(&self) -> anyhow::Result<Vec<BackendView>> {
        self.get().await?.backends().await
    }
    async fn add(&self, spec: &BackendSpec) -> anyhow::Result<()> {
        self.get().await?.add(spec).await
    }
    async fn remove(&self, id: &str) -> anyhow::Result<()> {
        self.get().await?.remove(id).await
    }
    async fn set_weight(&self, id: &str, weight: u32) -> anyhow::Result<()> {
        self.get().await?.set_weight(id, weight).await
    }
    async fn drain(&self, id: &str) -> anyhow::Result<()> {
        self.get().await?.drain(id).await
    }
    async fn activate(&self, id: &str) -> anyhow::Result<()> {
        self.get().await?.activate(id).await
    }
    async fn wait_drained(&self, id: &str, timeout: Duration) -> anyhow::Result<DrainReport> {
        self.get().await?.wait_drained(id, timeout).await
    }
    async fn retire(&self, id: &str, timeout: Duration) -> anyhow::Result<DrainReport> {
        self.get().await?.retire(id, timeout).await
    }
    async fn wait_healthy(&self, id: &str, timeout: Duration) -> anyhow::Result<()> {
        self.get().await?.wait_healthy(id, timeout).await
    }
    async fn stats(&self) -> anyhow::Result<Stats> {
        self.get().await?.stats().await
    }
    async fn switch(&self, req: &SwitchRequest) -> anyhow::Result<SwitchReport> {
        self.get().await?.switch(req).await
    }
    async fn set_weights(&self, weights: &BTreeMap<String, u32>) -> anyhow::Result<()> {
        self.get().await?.set_weights(weights).await
    }
    async fn samples(&self, release: &str, max: usize) -> anyhow::Result<Vec<u64>> {
        self.get().await?.samples(release, max).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `show info` of HAProxy 2.6.12 (Debian 12), first lines.
    const INFO_2_6: &str = "Name: HAProxy\nVersion: 2.6.12-1+deb12u4\nRelease_date: 2026/10/17\nNbthread: 2\nNbproc: 1\nProcess_num: 1\nPid: 27027\nUptime: 0d 0h00m01s\nUptime_sec: 1\n\n";

    /// `show stat app 6 -1` of HAProxy 2.6.12: a dead server, a live one after 7 requests, and
    /// the backend row (which also counted a 503 while no server was up).
    const STAT_2_6: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,agg_server_status,agg_server_check_status,agg_check_status,-,ssl_sess,ssl_reused_sess,ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,h2_rst_stream_rcvd,h2_goaway_rcvd,h2_detected_conn_protocol_errors,h2_detected_strm_protocol_errors,h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,h2_backend_open_streams,h2_total_connections,h2_backend_total_streams,h1_open_connections,h1_open_streams,h1_total_connections,h1_total_streams,h1_bytes_in,h1_bytes_out,h1_spliced_bytes_in,h1_spliced_bytes_out,
app,dead:19009:v1,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN,100,1,0,2,2,1,1,,1,3,2,,0,,2,0,,0,L4CON,,0,0,0,0,0,0,0,,,,0,0,0,,,,,-1,Connection refused,,0,0,0,0,,,,Layer4 connection problem,,2,3,0,,,,127.0.0.1:19009,,http,,,,,,,,0,0,0,,,0,0,0,0,0,0,0,0,0,0,1,100,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
app,web1:19001:v1,0,0,0,1,,7,574,987,,0,,0,0,0,0,UP,100,1,0,0,0,0,0,,1,3,1,,7,,2,7,,7,L7OK,200,0,0,7,0,0,0,0,,,,7,0,0,,,,,0,,,0,0,0,0,,,,Layer7 check passed,,2,3,4,,,,127.0.0.1:19001,,http,,,,,,,,0,7,0,,,0,0,0,0,0,0,0,0,0,0,1,100,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,
app,BACKEND,0,0,0,1,999,28,2306,4024,0,0,,1,0,0,0,UP,100,1,0,,3,0,0,,1,3,0,,27,,1,7,,20,,,,0,27,0,0,1,0,,,,28,0,0,0,0,0,0,0,,,0,0,0,0,,,,,,,,,,,,,,http,roundrobin,,,,,,,0,27,0,0,0,,,0,0,0,0,0,,,,,100,0,0,0,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,545,545,12354,3573,0,0,

";

    #[test]
    fn show_info_gives_the_version() {
        let info = parse_info(INFO_2_6);
        assert_eq!(info["Version"], "2.6.12-1+deb12u4");
        assert_eq!(check_version(&info["Version"]), Ok((2, 6)));
    }

    #[test]
    fn versions_without_dynamic_servers_are_refused() {
        assert_eq!(check_version("2.4.0"), Ok((2, 4)));
        assert_eq!(check_version("3.0.5-1"), Ok((3, 0)));
        let e = check_version("2.2.9-2+deb11u6").unwrap_err();
        assert!(e.contains("2.4 or newer"), "{e}");
        assert!(check_version("").unwrap_err().contains("cannot read"));
        assert!(check_version("1.8.19").is_err());
    }

    #[test]
    fn show_stat_rows_map_to_views_and_counters() {
        let rows = parse_stat(STAT_2_6).unwrap();
        assert_eq!(rows.len(), 3);
        let dead = &rows[0];
        assert_eq!(dead.name, "dead:19009:v1");
        assert_eq!(dead.status, "DOWN");
        assert_eq!(dead.check_status, "L4CON");
        assert_eq!(dead.check_desc, "Layer4 connection problem");
        assert_eq!(dead.health(), Health::Unhealthy);
        assert!(!dead.is_up());

        let live = &rows[1];
        assert!(live.is_up());
        assert_eq!(live.health(), Health::Healthy);
        assert_eq!(live.state(), BackendState::Active);
        assert_eq!(live.addr.as_deref(), Some("127.0.0.1:19001"));
        assert_eq!(live.uweight, Some(100));
        assert_eq!(live.stot, 7);
        assert_eq!(live.rtime_max_ms, Some(0));
        let c = live.counters();
        assert_eq!((c.requests, c.status_2xx, c.status_5xx), (7, 7, 0));

        let be = &rows[2];
        assert_eq!(be.name, "BACKEND");
        assert_eq!(be.algo.as_deref(), Some("roundrobin"));
        let c = be.counters();
        assert_eq!((c.requests, c.status_2xx, c.status_5xx), (28, 27, 1));
        assert_eq!(c.proxy_errors, 1, "econ of the dead server's attempt");
    }

    #[test]
    fn states_map_from_status() {
        let row = |status: &str, check: &str| StatRow {
            status: status.into(),
            check_status: check.into(),
            ..StatRow::default()
        };
        assert_eq!(row("DRAIN", "L7OK").state(), BackendState::Draining);
        assert_eq!(row("MAINT", "L7OK").state(), BackendState::Down);
        assert_eq!(row("MAINT (via app/x)", "").state(), BackendState::Down);
        assert_eq!(row("UP 1/3", "L7STS").state(), BackendState::Active);
        assert!(!row("UP 1/3", "L7STS").is_up());
        assert_eq!(row("UP", "INI").health(), Health::Unknown);
        assert_eq!(row("DOWN", "L7OK").health(), Health::Unhealthy);
        let running = STAT_2_6.replace(",L7OK,200,", ",* L7OK,200,");
        let rows = parse_stat(&running).unwrap();
        assert!(rows[1].is_up(), "a check in progress keeps the last result");
    }

    #[test]
    fn quoted_csv_fields_keep_their_commas() {
        assert_eq!(split_csv("a,\"b,c\",,d"), vec!["a", "b,c", "", "d"]);
    }

    #[test]
    fn server_names_round_trip() {
        for (id, release) in [
            ("web1:41234", "v2"),
            ("my_host:8080", "1.0+build_3"),
            ("a-b.c:1", "x__p"),
        ] {
            let name = server_name(id, release);
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)),
                "{name}"
            );
            let (i, host, r) = parse_server_name(&name).unwrap();
            assert_eq!((i.as_str(), r.as_str()), (id, release));
            assert_eq!(host, id.rsplit_once(':').unwrap().0);
        }
        assert_eq!(server_name("web1:41234", "v2"), "web1:41234:v2");
        for foreign in ["srv1", "app1:80", "web1:x:v2", "web1:80:_z", "BACKEND"] {
            assert_eq!(parse_server_name(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn latency_sum_grows_with_responses_at_the_current_average() {
        let mut t = LatencyTracker::default();
        let mut row = StatRow {
            hrsp: [0, 100, 0, 0, 0],
            rtime_ms: 10,
            ..StatRow::default()
        };
        assert_eq!(t.update("s", &row), 1_000_000);
        row.hrsp[1] = 150;
        row.rtime_ms = 20;
        assert_eq!(t.update("s", &row), 1_000_000 + 50 * 20_000);
        row.hrsp[1] = 5; // reset
        assert_eq!(t.update("s", &row), 5 * 20_000);
    }

    #[test]
    fn socket_addresses() {
        let base = Path::new("/etc/cutover");
        assert_eq!(
            SocketAddress::parse("/run/haproxy/admin.sock", base),
            SocketAddress::Unix("/run/haproxy/admin.sock".into())
        );
        assert_eq!(
            SocketAddress::parse("admin.sock", base),
            SocketAddress::Unix("/etc/cutover/admin.sock".into())
        );
        assert_eq!(
            SocketAddress::parse("127.0.0.1:9999", base),
            SocketAddress::Tcp("127.0.0.1:9999".into())
        );
        assert_eq!(
            SocketAddress::parse("ipv4@10.0.0.1:9999", base),
            SocketAddress::Tcp("10.0.0.1:9999".into())
        );
    }

    #[test]
    fn a_record_from_another_pid_namespace_is_never_taken_as_orphaned() {
        let mine = pid_namespace();
        assert!(mine.is_some());
        let record = |pid: u32, pid_start: Option<u64>, pid_ns: Option<u64>| Disabled {
            id: "web1-v2".into(),
            address: None,
            state: "drain".into(),
            pid,
            pid_start,
            pid_ns,
            since_unix: 0,
        };
        let me = std::process::id();
        let gone = u32::MAX;
        // Here: judged by whether the process still runs.
        assert!(record(gone, Some(1), mine).left_by_ended_process(mine));
        assert!(!record(me, process_start(me), mine).left_by_ended_process(mine));
        // Written before namespaces were recorded: as before.
        assert!(record(gone, Some(1), None).left_by_ended_process(mine));
        // Another container's deployer: its pid says nothing here, running or not.
        let other = mine.map(|n| n + 1);
        assert!(!record(gone, Some(1), other).left_by_ended_process(mine));
        assert!(!record(me, Some(1), other).left_by_ended_process(mine));
    }

    #[test]
    fn process_start_of_self_and_of_nothing() {
        assert!(process_start(std::process::id()).is_some());
        assert_eq!(process_start(u32::MAX), None);
    }
}
