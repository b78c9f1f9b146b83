//! `cutover.toml`: the one file that describes an app, its fleet, its balancer and how to roll.
//!
//! Parsing happens in two stages (as ripgrep does with flags): serde turns TOML into typed
//! values, rejecting unknown keys and checking each value where it is read (durations, batch
//! specs, names), so every error carries the TOML span; then [`Config::validate`] checks what
//! spans several keys (duplicate host names, token present). Every error names the file, line,
//! column and dotted key, and says what to write instead.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Settings of the SSH transport.
#[derive(Debug, Clone)]
pub struct SshSettings {
    pub host_key_checking: HostKeyChecking,
    pub connect_timeout: Duration,
    /// Default timeout of one remote command.
    pub command_timeout: Duration,
    /// How long SSH master connections outlive the command that opened them (0: closed at
    /// its end), so back-to-back commands skip the handshakes.
    pub persist: Duration,
}

/// Where the config came from, and what it says.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for error messages and relative paths).
    pub file: PathBuf,
    /// Directory that relative paths in the file are resolved against.
    pub base_dir: PathBuf,
    pub transport: TransportKind,
    pub state_dir: PathBuf,
    /// SSH settings (used with `transport = "ssh"`).
    pub ssh: SshSettings,
    /// Parallel host operations at most (staging, batches).
    pub forks: usize,
    /// The deploy lock's lease: renewed while a deploy runs; a lock not renewed for this long
    /// is stale and may be taken over.
    pub lock_lease: Duration,
    /// Finished deployments kept in the journal.
    pub history_keep: usize,
    pub hooks: Vec<Hook>,
    pub analysis: Option<Analysis>,
    pub verify: Vec<Verify>,
    pub app: App,
    pub release: Release,
    pub hosts: Vec<Host>,
    pub balancer: BalancerConfig,
    pub strategy: Strategy,
    /// `[serve]`: `cutover serve` (dashboard, JSON API, GitHub webhooks).
    pub serve: Option<ServeConfig>,
    /// Why `cutover serve` would refuse `[serve]`, found at load: `serve` and `plan` refuse the
    /// config for it, every other command goes on (a placeholder `[serve]` must not stop a
    /// rollback during an incident).
    pub serve_error: Option<String>,
}

/// `[serve]`: where `cutover serve` listens and the bearer token of its API and dashboard.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Address of the dashboard, JSON API and webhook endpoint (default 127.0.0.1:8480).
    #[serde(default = "default_serve_listen")]
    pub listen: SocketAddr,
    /// Bearer token of the API and dashboard. Set this or `token_file`.
    pub token: Option<String>,
    /// File holding the token (relative to the config file).
    pub token_file: Option<PathBuf>,
    /// `[serve.github]`: push-to-deploy from GitHub webhooks.
    pub github: Option<GithubConfig>,
}

/// `[serve.github]`: a push to `branch` deploys the pushed commit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubConfig {
    /// The webhook's secret (HMAC-SHA256 key of `X-Hub-Signature-256`). Set this or `secret_file`.
    pub secret: Option<String>,
    /// File holding the secret (relative to the config file).
    pub secret_file: Option<PathBuf>,
    /// Branch whose pushes deploy (default `main`).
    #[serde(default = "default_github_branch")]
    pub branch: String,
    /// `owner/name` of the repository whose pushes deploy; pushes from any other are ignored.
    /// Default: taken from `release.git` when that is a github.com URL.
    pub repository: Option<String>,
}

/// Shortest `[serve]` token and `[serve.github]` secret accepted: both guard a deploy button.
pub const MIN_SERVE_SECRET: usize = 16;

/// An error about one key found after parsing: the dotted key to point at, and what to do.
pub(crate) type KeyError = (String, String);

/// The checks of a `[serve]` secret (`key`: `serve.token` or `serve.github.secret`) that need
/// no file, made when the config loads and again by `cutover serve`: exactly one of the key and
/// `<key>_file` is set, and an inline value is long enough. Returns the inline value (trimmed),
/// `None` when it is in a file. The file is read only by `cutover serve` ([`read_serve_secret`]),
/// as `balancer.token_file` is only by the commands that call the balancer: it may exist only
/// on the machine that serves.
pub(crate) fn check_serve_secret<'a>(
    value: &'a Option<String>,
    path: &Option<PathBuf>,
    key: &str,
) -> Result<Option<&'a str>, KeyError> {
    let (table, short) = key.rsplit_once('.').unwrap_or(("", key));
    match (value, path) {
        (Some(_), Some(_)) => Err((
            key.to_string(),
            format!("set either {short} or {short}_file in [{table}], not both"),
        )),
        (None, None) => Err((
            table.to_string(),
            format!(
                "{key} is not set: set {short}_file = \"path\" (a file holding it) or {short} = \"...\" in [{table}]: a random string of at least {MIN_SERVE_SECRET} characters, e.g. from `openssl rand -hex 24`"
            ),
        )),
        (Some(v), None) => {
            let v = v.trim();
            serve_secret_length(key, v).map_err(|m| (key.to_string(), m))?;
            Ok(Some(v))
        }
        (None, Some(_)) => Ok(None),
    }
}

/// A `[serve]` secret's value: given inline, or read from its file (relative paths are already
/// resolved against the config file); checked as [`check_serve_secret`] does.
pub(crate) fn read_serve_secret(
    value: &Option<String>,
    path: &Option<PathBuf>,
    key: &str,
) -> Result<String, KeyError> {
    if let Some(v) = check_serve_secret(value, path, key)? {
        return Ok(v.to_string());
    }
    let path = path.as_ref().expect("checked: the secret or its file");
    let given = format!("{key}_file");
    let s = std::fs::read_to_string(path).map_err(|e| {
        (
            given.clone(),
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let s = s.trim();
    serve_secret_length(&format!("{key} in {}", path.display()), s).map_err(|m| (given, m))?;
    Ok(s.to_string())
}

/// `what`: the secret as the message names it (`serve.token`, `serve.token in PATH`). The
/// token travels in an HTTP header, which cannot carry a control character or non-ASCII: such
/// a token could never be sent, and every request would get 401. The webhook secret is only
/// an HMAC key, which may hold anything.
fn serve_secret_length(what: &str, s: &str) -> Result<(), String> {
    if s.len() < MIN_SERVE_SECRET {
        return Err(format!(
            "{what} is too short: use at least {MIN_SERVE_SECRET} characters (a random string, e.g. from `openssl rand -hex 24`)"
        ));
    }
    if what.starts_with("serve.token") && !s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(format!(
            "{what} holds a control character or non-ASCII: it is sent in an HTTP header, so use letters, digits, punctuation and spaces only (e.g. `openssl rand -hex 24`)"
        ));
    }
    Ok(())
}

impl GithubConfig {
    /// Checks `branch` and `repository`; returns the repository's `owner/name` (lower case)
    /// when one is set. Made when the config loads and by `cutover serve`.
    pub(crate) fn check(&self) -> Result<Option<String>, KeyError> {
        if self.branch.trim().is_empty() || self.branch.starts_with("refs/") {
            return Err((
                "serve.github.branch".into(),
                format!("{:?}: name the branch alone, e.g. \"main\"", self.branch),
            ));
        }
        match &self.repository {
            None => Ok(None),
            Some(r) => crate::server::github::repository_name(r)
                .map(Some)
                .ok_or_else(|| {
                    (
                        "serve.github.repository".into(),
                        format!("{r:?}: name the repository as owner/name, e.g. \"acme/web\""),
                    )
                }),
        }
    }
}

fn default_serve_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8480))
}

fn default_github_branch() -> String {
    "main".to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// Hosts are directories on this machine; instances bind to each host's loopback address.
    Local,
    /// Real servers through the system OpenSSH client (`~/.ssh/config`, agent, known_hosts).
    Ssh,
}

/// How strictly SSH checks host keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKeyChecking {
    /// Only hosts already in known_hosts (the default: a changed or unknown key is refused).
    #[default]
    Strict,
    /// Unknown hosts are added on first contact; a changed key is still refused.
    AcceptNew,
}

/// Where a hook runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookWhere {
    /// On the machine running cutover, in the config's directory.
    Local,
    /// On each host (or one host with `run_once`), in the release directory.
    #[default]
    Host,
}

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookPoint {
    /// Before anything is staged or changed.
    BeforeDeploy,
    /// After the release is staged on every host, before any traffic change.
    AfterStage,
    /// On a host, after the new instance is healthy and before traffic moves to it.
    BeforeSwitch,
    /// On a host, after traffic moved to the new instance.
    AfterSwitch,
    /// After every host moved.
    AfterDeploy,
    /// After a rollback returned the fleet.
    OnRollback,
}

/// `[[hooks]]`: a command run at a point of the deploy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    pub at: HookPoint,
    pub command: String,
    /// Run on one host only (schema migrations); with `at = "before_deploy"` or `"after_stage"`.
    #[serde(default)]
    pub run_once: bool,
    #[serde(default, rename = "where")]
    pub where_: HookWhere,
    #[serde(default = "secs::<300>")]
    pub timeout: Dur,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    pub name: Name,
    /// Shell command run in the release directory. `{port}`, `{address}`, `{version}` and
    /// `{host}` are substituted; `PORT`, `CUTOVER_VERSION`, `CUTOVER_HOST`, `CUTOVER_ADDRESS` and
    /// `CUTOVER_RELEASE_DIR` are set.
    pub start: String,
    #[serde(default)]
    pub stop_signal: StopSignal,
    #[serde(default = "secs::<10>")]
    pub stop_timeout: Dur,
    #[serde(default = "secs::<30>")]
    pub drain_timeout: Dur,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub mode: Mode,
    /// in-place mode: the fixed port the app listens on.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "secs::<1>")]
    pub interval: Dur,
    #[serde(default = "secs::<2>")]
    pub timeout: Dur,
    #[serde(default = "two")]
    pub healthy_threshold: Threshold,
    #[serde(default = "three")]
    pub unhealthy_threshold: Threshold,
    #[serde(default = "secs::<0>")]
    pub start_period: Dur,
    #[serde(default = "secs::<60>")]
    pub deadline: Dur,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            path: default_health_path(),
            interval: secs::<1>(),
            timeout: secs::<2>(),
            healthy_threshold: two(),
            unhealthy_threshold: three(),
            start_period: secs::<0>(),
            deadline: secs::<60>(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// Directory shipped as the release; `{version}` is substituted. Set this or `git`.
    pub path: Option<String>,
    /// Git repository the release is built from; the version is the ref (branch, tag, commit).
    pub git: Option<String>,
    /// Command run once in the checked-out tree (or the release directory) before shipping.
    pub build: Option<String>,
    /// Globs of what ships (default: everything but `.git`).
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default = "default_keep")]
    pub keep: Keep,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub name: Name,
    /// IP address instances bind to, the balancer connects to, and SSH reaches.
    #[serde(deserialize_with = "ip_address")]
    pub address: IpAddr,
    /// The host's directory: `releases/`, `current`, `run/`, `log/` live here (default: the
    /// top-level `root`).
    #[serde(default)]
    pub root: PathBuf,
    /// SSH port (default 22 or what ~/.ssh/config says).
    pub port: Option<u16>,
    /// SSH user (default: ~/.ssh/config or the current user).
    pub user: Option<String>,
    /// SSH private key file.
    pub identity: Option<PathBuf>,
    /// Where an inventory defined the host (`hosts.ini:12`), for errors about it; `None` for
    /// a `[[hosts]]` table.
    #[serde(skip)]
    pub origin: Option<String>,
}

/// An IP address; a host name gets told why not (instances bind to it and the balancer
/// connects to it, so it must be one address, known when the config loads).
fn ip_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "address {text:?} is not an IP address: write the host's IP address ({}instances bind to it and the balancer connects to it); an Ansible inventory's ansible_host may be a name, it is resolved when the inventory loads",
            if text.eq_ignore_ascii_case("localhost") { "`localhost` is 127.0.0.1; " } else { "" }
        ))
    })
}

#[cfg(test)]
impl Host {
    /// `web1` at 127.0.0.1 with its directory at `root`, for unit tests.
    pub(crate) fn for_test(root: &std::path::Path) -> Host {
        Host {
            name: Name::parse("web1").unwrap(),
            address: "127.0.0.1".parse().unwrap(),
            root: root.to_path_buf(),
            port: None,
            user: None,
            identity: None,
            origin: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerConfig {
    #[serde(default)]
    pub kind: BalancerKind,
    /// Where client traffic arrives.
    pub listen: SocketAddr,
    /// Admin API of the built-in balancer (loopback by default; bearer token required).
    pub admin: Option<SocketAddr>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// HAProxy runtime API: a Unix socket path or `host:port` (stats socket at level admin).
    pub socket: Option<String>,
    /// HAProxy backend whose servers cutover manages.
    pub backend: Option<String>,
    /// How long a deploy waits for a balancer that went away (a restart) before it stops.
    #[serde(default = "secs::<30>")]
    pub unreachable_timeout: Dur,
    /// `[balancer.tls]`: the built-in balancer terminates TLS (HTTP/2 through ALPN).
    pub tls: Option<BalancerTls>,
    /// Built-in balancer: client connections open at once; more get a 503 and are closed
    /// (default 10000).
    pub max_connections: Option<u32>,
    /// Built-in balancer: largest request head in bytes, at least 8192 (default 65536); larger
    /// gets 431.
    pub max_header_bytes: Option<u32>,
    /// Built-in balancer: most request header fields (default 100); more gets 431.
    pub max_headers: Option<u32>,
    /// Built-in balancer: time a client has to send a request head, counted from when the
    /// connection waits for one (default 30s).
    pub client_header_timeout: Option<Dur>,
    /// Built-in balancer: a client connection with no request in progress and no bytes either
    /// way for this long is closed (default 75s).
    pub client_idle_timeout: Option<Dur>,
    /// Built-in balancer: time to connect to a backend before trying another (default 2s).
    pub backend_connect_timeout: Option<Dur>,
    /// Built-in balancer: time a backend has to send the response head (default 60s).
    pub backend_header_timeout: Option<Dur>,
    /// Built-in balancer: time a backend may leave the request body's next chunk untaken
    /// before the client gets 504 (default 60s).
    pub backend_send_timeout: Option<Dur>,
    /// Built-in balancer: pooled idle connections to backends are closed after this (default 4s).
    pub backend_idle_timeout: Option<Dur>,
    /// Built-in balancer: passive ejection after this many failed requests in a row (default
    /// `app.health.unhealthy_threshold`; 0 turns it off).
    pub eject_after: Option<u32>,
    /// Built-in balancer: 5xx answers count as failed requests for passive ejection (default
    /// true).
    pub eject_on_5xx: Option<bool>,
}

/// `[balancer.tls]`: PEM files for TLS termination (paths relative to the config file, `~/`
/// for the home directory).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerTls {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    /// `cutover proxy`.
    #[default]
    Builtin,
    /// An existing HAProxy (2.4+), driven through its runtime API.
    Haproxy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    pub kind: StrategyKind,
    /// rolling (and the final rollout of a canary): hosts per batch.
    #[serde(default)]
    pub batch: BatchSpec,
    #[serde(default)]
    pub max_fail_percentage: Percent,
    /// Cumulative budget across the whole deploy: more failed hosts than this fails the deploy
    /// even when every batch stayed within `max_fail_percentage`.
    pub max_failed_hosts: Option<u32>,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// blue-green: how long blue keeps running after the switch (instant switch back).
    #[serde(default = "secs::<30>")]
    pub scale_down_delay: Dur,
    /// blue-green: analysis of green after the switch for this long; failure switches back.
    pub post_switch_analysis: Option<Dur>,
    /// canary: traffic weight steps; a pause without a duration waits for `cutover promote`.
    #[serde(default)]
    pub steps: Vec<CanaryStep>,
    /// canary: instances that serve the canary share (default 1; see
    /// [`Strategy::canary_host_count`]).
    pub canary_hosts: Option<u32>,
    /// canary: keep a client on one release: `"cookie"` or the name of a request header.
    pub sticky: Option<String>,
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy {
            kind: StrategyKind::Rolling,
            batch: BatchSpec::default(),
            max_fail_percentage: Percent::default(),
            max_failed_hosts: None,
            on_failure: OnFailure::default(),
            scale_down_delay: secs::<30>(),
            post_switch_analysis: None,
            steps: Vec::new(),
            canary_hosts: None,
            sticky: None,
        }
    }
}

impl Strategy {
    /// How many hosts carry a canary instance.
    pub fn canary_host_count(&self) -> u32 {
        self.canary_hosts.unwrap_or(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    Rolling,
    BlueGreen,
    Canary,
}

impl StrategyKind {
    /// The name as written in the config.
    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::Rolling => "rolling",
            StrategyKind::BlueGreen => "blue-green",
            StrategyKind::Canary => "canary",
        }
    }
}

/// One canary step.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryStep {
    /// Share of requests (percent, 0-100) the canary release receives during this step.
    pub weight: u32,
    /// How long to hold this step (analysis runs meanwhile); absent: wait for `cutover promote`.
    pub pause: Option<Dur>,
}

/// `[analysis]`: automated judgement from the balancer's per-release counters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Analysis {
    #[serde(default = "secs::<10>")]
    pub interval: Dur,
    /// Minimum share of non-5xx responses, in percent.
    pub min_success_rate: Option<Percent>,
    pub max_p99_latency: Option<Dur>,
    /// Fewer requests in an interval make it inconclusive (the rollout pauses; never a pass).
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Failed intervals tolerated before the rollout aborts.
    #[serde(default)]
    pub failure_limit: u32,
    /// Canary success rate may be at most this many percentage points below stable's.
    pub max_degradation: Option<Percent>,
    /// Optional statistical judge of canary vs stable latency.
    pub judge: Option<Judge>,
}

/// Mann-Whitney U judge with Kayenta-style thresholds on a 0-100 score.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Judge {
    /// Significance level of the one-sided test "canary slower than stable".
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Score at or above which the interval passes.
    #[serde(default = "default_pass_score")]
    pub pass: f64,
    /// Score at or above which the interval is marginal (inconclusive), below: fail.
    #[serde(default = "default_marginal_score")]
    pub marginal: f64,
    /// Effect-size tolerance, a fraction (0.1 = 10%): how much slower than stable's the
    /// canary's latencies may be before the judge counts the canary as slower (the purpose of
    /// Kayenta's `allowedIncrease`, applied as a shift of the test rather than a check after it). The test becomes "canary slower than (1 + allowed_increase) ×
    /// stable" (stable's samples are scaled before the Mann-Whitney test), so a real but
    /// small difference, which many samples make significant, no longer fails intervals.
    ///
    /// Default 0.1: a canary more than 10% slower is worth stopping a rollout for, while a
    /// few percent is within the run-to-run noise of a real service (another host, a cold
    /// cache). It also cuts the false failures of a canary as fast as stable from 3.75% of
    /// intervals (0, no tolerance) to about 2% at the judge's minimum of 20 samples a side
    /// and 0.1% at 500, for latencies as spread as an exponential distribution's (simulated,
    /// see the README); the price is that a canary must be clearly more than 10% slower to
    /// fail reliably. 0 restores the plain test.
    /// Must be finite, 0 or more and below [`MAX_ALLOWED_INCREASE`].
    #[serde(default = "default_allowed_increase")]
    pub allowed_increase: f64,
}

/// Upper bound (exclusive) of `[analysis.judge] allowed_increase`: a canary twice as slow as
/// stable is beyond any tolerance worth judging with, and 1 or more is far more likely a
/// percentage (`5` for 5%, which would tolerate a canary six times as slow) than a fraction.
pub const MAX_ALLOWED_INCREASE: f64 = 1.0;

/// Where a verify command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyPoint {
    /// rolling: on each new instance, before it enters the balancer.
    BeforeTraffic,
    /// rolling: after each batch, through the balancer.
    AfterBatch,
    /// blue-green: on the green set through the preview route, before the switch.
    BeforeSwitch,
    /// blue-green: after the switch.
    AfterSwitch,
    /// canary: after each step's weight is set.
    AfterStep,
    /// rolling: after the whole fleet moved.
    AfterDeploy,
}

impl VerifyPoint {
    pub const ALL: [VerifyPoint; 6] = [
        VerifyPoint::BeforeTraffic,
        VerifyPoint::AfterBatch,
        VerifyPoint::BeforeSwitch,
        VerifyPoint::AfterSwitch,
        VerifyPoint::AfterStep,
        VerifyPoint::AfterDeploy,
    ];

    /// Whether a forward deploy of `kind` reaches this point. Every strategy starts new
    /// instances through the same gate, so `before_traffic` runs in all of them; a canary's
    /// very first deploy (nothing live to compare with) rolls out and skips its steps.
    pub fn runs_in(self, kind: StrategyKind) -> bool {
        match self {
            VerifyPoint::BeforeTraffic => true,
            VerifyPoint::AfterBatch | VerifyPoint::AfterDeploy => kind == StrategyKind::Rolling,
            VerifyPoint::BeforeSwitch | VerifyPoint::AfterSwitch => kind == StrategyKind::BlueGreen,
            VerifyPoint::AfterStep => kind == StrategyKind::Canary,
        }
    }

    /// The name as written in the config.
    pub fn name(self) -> &'static str {
        match self {
            VerifyPoint::BeforeTraffic => "before_traffic",
            VerifyPoint::AfterBatch => "after_batch",
            VerifyPoint::BeforeSwitch => "before_switch",
            VerifyPoint::AfterSwitch => "after_switch",
            VerifyPoint::AfterStep => "after_step",
            VerifyPoint::AfterDeploy => "after_deploy",
        }
    }
}

/// `[[verify]]`: an integration test run at gates; exit 0 passes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    pub command: String,
    #[serde(default = "secs::<30>")]
    pub timeout: Dur,
    pub at: Vec<VerifyPoint>,
}

/// `[app] mode`: how an instance is replaced on a host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// New instance beside the old one; capacity never dips.
    #[default]
    SideBySide,
    /// For apps that cannot run twice on a host (fixed port): drain, stop, start, add back.
    InPlace,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Every host already moved returns to the previous release.
    #[default]
    Rollback,
    /// Stop where it failed and leave the fleet for a person to decide.
    Halt,
}

impl fmt::Display for OnFailure {
    /// As written in the config.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnFailure::Rollback => "rollback",
            OnFailure::Halt => "halt",
        })
    }
}

/// One entry of `batch`: a host count or a share of all hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Count(u32),
    Percent(u32),
}

/// `batch`: a size, or a list of sizes used once each with the last one repeating (Ansible
/// `serial`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSpec(pub Vec<BatchSize>);

impl Default for BatchSpec {
    fn default() -> Self {
        BatchSpec(vec![BatchSize::Count(1)])
    }
}

impl fmt::Display for BatchSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchSize::Count(n) => write!(f, "{n}"),
            BatchSize::Percent(p) => write!(f, "\"{p}%\""),
        }
    }
}

impl fmt::Display for BatchSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                let parts: Vec<String> = many.iter().map(ToString::to_string).collect();
                write!(f, "[{}]", parts.join(", "))
            }
        }
    }
}

impl<'de> Deserialize<'de> for BatchSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Entry {
            Int(i64),
            Str(String),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(Entry),
            Many(Vec<Entry>),
        }
        fn entry(e: Entry) -> Result<BatchSize, String> {
            match e {
                Entry::Int(n) if n >= 1 && n <= u32::MAX as i64 => Ok(BatchSize::Count(n as u32)),
                Entry::Int(n) => Err(format!(
                    "batch size {n} is not allowed: use a host count of at least 1 or a share like \"25%\""
                )),
                Entry::Str(s) => parse_batch_str(&s),
            }
        }
        let raw = Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "batch must be a host count (1), a share of all hosts (\"25%\") or a list of them ([1, 5, \"20%\"])",
            )
        })?;
        let entries = match raw {
            Raw::One(e) => vec![e],
            Raw::Many(list) if list.is_empty() => {
                return Err(serde::de::Error::custom(
                    "batch list is empty: give at least one size, e.g. [1, \"50%\"]",
                ));
            }
            Raw::Many(list) => list,
        };
        entries
            .into_iter()
            .map(entry)
            .collect::<Result<Vec<_>, _>>()
            .map(BatchSpec)
            .map_err(serde::de::Error::custom)
    }
}

fn parse_batch_str(s: &str) -> Result<BatchSize, String> {
    let t = s.trim();
    if let Some(num) = t.strip_suffix('%') {
        return match num.trim().parse::<u32>() {
            Ok(p) if (1..=100).contains(&p) => Ok(BatchSize::Percent(p)),
            Ok(p) => Err(format!(
                "batch share \"{p}%\" is out of range: use 1% to 100%"
            )),
            Err(_) => Err(format!(
                "batch \"{s}\" is not a share: write it like \"25%\""
            )),
        };
    }
    match t.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(BatchSize::Count(n)),
        _ => Err(format!(
            "batch \"{s}\" is not a host count (at least 1) or a share like \"25%\""
        )),
    }
}

/// A percentage 0..=100 (e.g. `max_fail_percentage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, PartialOrd)]
pub struct Percent(pub f64);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Float(f64),
        }
        let v = match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a number from 0 to 100"))?
        {
            Raw::Int(i) => i as f64,
            Raw::Float(f) => f,
        };
        if !(0.0..=100.0).contains(&v) || v.is_nan() {
            return Err(serde::de::Error::custom(format!(
                "{v} is not a percentage: use a number from 0 to 100"
            )));
        }
        Ok(Percent(v))
    }
}

/// A duration written the human way: `"500ms"`, `"10s"`, `"1m30s"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl std::ops::Deref for Dur {
    type Target = Duration;
    fn deref(&self) -> &Duration {
        &self.0
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a duration string such as \"10s\" or \"500ms\"")
        })?;
        let d = humantime::parse_duration(s.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "\"{s}\" is not a duration ({e}): write it like \"10s\", \"500ms\" or \"1m30s\""
            ))
        })?;
        if d > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "\"{s}\" is longer than {}, the longest duration cutover takes: no deploy step waits that long",
                humantime::format_duration(MAX_DURATION)
            )));
        }
        Ok(Dur(d))
    }
}

/// The longest duration a config may give: sums and products of timeouts (a plan's worst
/// case, a deadline from now) stay far from overflowing.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// The most host operations at once: far beyond any fleet, far below what a semaphore holds.
const MAX_FORKS: usize = 10_000;

/// A count of consecutive checks, at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold(pub u32);

impl<'de> Deserialize<'de> for Threshold {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if !(1..=1000).contains(&n) {
            return Err(serde::de::Error::custom(format!(
                "{n} is not a valid threshold: use a count from 1 to 1000"
            )));
        }
        Ok(Threshold(n as u32))
    }
}

/// How many releases stay on each host (at least 1: the live one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep(pub usize);

impl<'de> Deserialize<'de> for Keep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if !(1..=1000).contains(&n) {
            return Err(serde::de::Error::custom(format!(
                "keep = {n} is not allowed: keep at least 1 release (the live one), at most 1000"
            )));
        }
        Ok(Keep(n as usize))
    }
}

/// Signal sent to stop an instance gracefully.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StopSignal {
    #[default]
    Term,
    Int,
    Quit,
    Hup,
    Usr1,
    Usr2,
}

impl StopSignal {
    pub fn number(self) -> i32 {
        match self {
            StopSignal::Term => libc::SIGTERM,
            StopSignal::Int => libc::SIGINT,
            StopSignal::Quit => libc::SIGQUIT,
            StopSignal::Hup => libc::SIGHUP,
            StopSignal::Usr1 => libc::SIGUSR1,
            StopSignal::Usr2 => libc::SIGUSR2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "TERM",
            StopSignal::Int => "INT",
            StopSignal::Quit => "QUIT",
            StopSignal::Hup => "HUP",
            StopSignal::Usr1 => "USR1",
            StopSignal::Usr2 => "USR2",
        }
    }
}

impl<'de> Deserialize<'de> for StopSignal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bare = s.trim().to_ascii_uppercase();
        let bare = bare.strip_prefix("SIG").unwrap_or(&bare);
        Ok(match bare {
            "TERM" => StopSignal::Term,
            "INT" => StopSignal::Int,
            "QUIT" => StopSignal::Quit,
            "HUP" => StopSignal::Hup,
            "USR1" => StopSignal::Usr1,
            "USR2" => StopSignal::Usr2,
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "\"{s}\" is not a stop signal: use TERM, INT, QUIT, HUP, USR1 or USR2"
                )));
            }
        })
    }
}

/// A name that is data, never shell: app, host and version names. Letters, digits and `._+-`,
/// starting with a letter or digit, at most 128 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    pub fn parse(s: &str) -> Result<Name, String> {
        let ok_first = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        let ok_rest = s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
        if s.is_empty() || s.len() > 128 || !ok_first || !ok_rest || s.contains("..") {
            return Err(format!(
                "{s:?} is not a valid name: use letters, digits and . _ + - (starting with a letter or digit, no \"..\", at most 128 characters)"
            ));
        }
        if s.ends_with(".partial") {
            return Err(format!(
                "{s:?} ends in .partial, which cutover uses for a release being unpacked: choose another name"
            ));
        }
        Ok(Name(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    /// Pads, so `{:<12}` lines up tables (`cutover status`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn secs<const N: u64>() -> Dur {
    Dur(Duration::from_secs(N))
}
fn two() -> Threshold {
    Threshold(2)
}
fn three() -> Threshold {
    Threshold(3)
}
fn default_keep() -> Keep {
    Keep(5)
}
fn default_min_requests() -> u64 {
    20
}
fn default_alpha() -> f64 {
    0.05
}
fn default_pass_score() -> f64 {
    95.0
}
fn default_marginal_score() -> f64 {
    75.0
}
fn default_allowed_increase() -> f64 {
    0.1
}
fn default_history_keep() -> usize {
    500
}
fn default_forks() -> usize {
    16
}
fn default_health_path() -> String {
    "/health".to_string()
}

/// The file's shape, exactly as serde reads it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    transport: Option<TransportKind>,
    state_dir: Option<PathBuf>,
    /// Default host root for hosts (and inventory hosts) that name none.
    root: Option<PathBuf>,
    /// Ansible inventory (INI, or YAML and its JSON form) to read hosts from, instead of or
    /// besides `[[hosts]]`.
    inventory: Option<PathBuf>,
    /// Inventory group whose hosts are the fleet (default: all).
    hosts_group: Option<String>,
    #[serde(default)]
    host_key_checking: HostKeyChecking,
    #[serde(default = "secs::<10>")]
    connect_timeout: Dur,
    #[serde(default = "secs::<300>")]
    command_timeout: Dur,
    #[serde(default = "secs::<60>")]
    ssh_persist: Dur,
    #[serde(default = "default_forks")]
    forks: usize,
    #[serde(default = "secs::<60>")]
    lock_lease: Dur,
    #[serde(default = "default_history_keep")]
    history_keep: usize,
    app: App,
    release: Release,
    #[serde(default)]
    hosts: Vec<Host>,
    balancer: BalancerConfig,
    #[serde(default)]
    strategy: Strategy,
    #[serde(default)]
    hooks: Vec<Hook>,
    analysis: Option<Analysis>,
    #[serde(default)]
    verify: Vec<Verify>,
    serve: Option<ServeConfig>,
}

/// A config error with its place in the file.
#[derive(Debug, thiserror::Error)]
#[error("{file}{place}: {message}")]
pub struct ConfigError {
    pub file: String,
    /// `:line:column: key` or empty when the error is about the whole file.
    place: String,
    pub message: String,
}

impl ConfigError {
    fn whole(file: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.display().to_string(),
            place: String::new(),
            message: message.into(),
        }
    }

    /// An error about `key` (dotted, e.g. `serve.github.branch`) found after the config
    /// loaded: placed at the key's line when the file still reads, else named by the key.
    pub fn at_key(file: &Path, key: &str, message: String) -> Self {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        match find_key(&text, key) {
            Some(offset) => ConfigError::at(file, &text, offset, Some(key.to_string()), message),
            None => ConfigError::whole(file, format!("{key}: {message}")),
        }
    }

    /// An error about a host an inventory defined, placed at its line there.
    fn in_inventory(origin: &str, message: String) -> Self {
        ConfigError {
            file: origin.to_string(),
            place: String::new(),
            message,
        }
    }

    fn at(file: &Path, text: &str, offset: usize, key: Option<String>, message: String) -> Self {
        let (line, col) = line_col(text, offset);
        let key = key.unwrap_or_else(|| key_at(text, offset));
        let place = if key.is_empty() {
            format!(":{line}:{col}")
        } else {
            format!(":{line}:{col}: {key}")
        };
        ConfigError {
            file: file.display().to_string(),
            place,
            message,
        }
    }
}

impl Config {
    /// Reads and checks the config at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        // Bounded: `-c /dev/zero` (or a log file passed by mistake) must not read forever.
        const MAX_CONFIG_BYTES: u64 = 4 << 20;
        let text = read_at_most(path, MAX_CONFIG_BYTES).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::NotFound => {
                    " (run `cutover init` to write an example, or pass -c PATH)"
                }
                std::io::ErrorKind::InvalidData => " (is it a cutover.toml? it is not UTF-8 text)",
                std::io::ErrorKind::IsADirectory => " (pass the file: -c DIR/cutover.toml)",
                _ => "",
            };
            ConfigError::whole(path, format!("cannot read the config: {e}{hint}"))
        })?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::whole(
                path,
                "the config is larger than 4 MiB: is this the right file? (hosts of a large fleet belong in an inventory file)",
            ));
        }
        if text.trim().is_empty() {
            return Err(ConfigError::whole(
                path,
                "the config is empty: run `cutover init` to write an example, or pass -c PATH",
            ));
        }
        Config::parse(path, &text)
    }

    /// Parses config text; `path` is used for messages and relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let message = plain_message(e.message().trim());
            match e.span() {
                Some(span) => {
                    let key = missing_field_key(text, span.start, &message);
                    ConfigError::at(path, text, span.start, key, message)
                }
                None => ConfigError::whole(path, message),
            }
        })?;
        let base_dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    p.to_path_buf()
                }
            })
            .unwrap_or_else(|| PathBuf::from("."));
        let base_dir = std::path::absolute(&base_dir).unwrap_or(base_dir);
        // A path on this machine: `~/` is the user's home (as a shell would read it), a
        // relative one is relative to the config file.
        let resolve = |p: &Path| local_path(&base_dir, p);
        let transport = raw.transport.unwrap_or(TransportKind::Local);
        let mut hosts = raw.hosts;
        if let Some(inv) = &raw.inventory {
            let inv_path = resolve(inv);
            let mut found =
                crate::inventory::load(&inv_path, raw.hosts_group.as_deref()).map_err(|e| {
                    let offset = find_key(text, "inventory").unwrap_or(0);
                    ConfigError::at(
                        path,
                        text,
                        offset,
                        Some("inventory".into()),
                        format!("{e:#}"),
                    )
                })?;
            if transport == TransportKind::Local {
                // A local root is a path on this machine, relative to the inventory.
                let inv_dir = inv_path.parent().unwrap_or(Path::new("."));
                for h in found.iter_mut().filter(|h| !h.root.as_os_str().is_empty()) {
                    h.root = local_path(inv_dir, &h.root);
                }
            }
            hosts.extend(found);
        } else if raw.hosts_group.is_some() {
            let offset = find_key(text, "hosts_group").unwrap_or(0);
            return Err(ConfigError::at(
                path,
                text,
                offset,
                Some("hosts_group".into()),
                "hosts_group picks a group of an inventory: set inventory = \"path\" too".into(),
            ));
        }
        for (i, h) in hosts.iter_mut().enumerate() {
            if h.root.as_os_str().is_empty() {
                match (&raw.root, &h.origin) {
                    (Some(r), _) => h.root = r.clone(),
                    (None, Some(origin)) => {
                        return Err(ConfigError::in_inventory(
                            origin,
                            format!(
                                "host {} has no root: set cutover_root=/srv/app for it here (on its line or in its group's vars), or root = \"/srv/app\" at the top level of {}",
                                h.name,
                                path.display()
                            ),
                        ));
                    }
                    (None, None) => {
                        let offset = find_entry_key(text, "hosts", i, "root")
                            .or_else(|| find_key(text, "hosts"))
                            .unwrap_or(0);
                        return Err(ConfigError::at(
                            path,
                            text,
                            offset,
                            Some("hosts.root".into()),
                            format!(
                                "host {} has no root: set root = \"/srv/app\" on the host or at the top level",
                                h.name
                            ),
                        ));
                    }
                }
            }
            if transport == TransportKind::Ssh {
                // A path on the host: nothing on this machine can say what `~` or a relative
                // path means there.
                if !h.root.is_absolute() {
                    let offset = find_entry_key(text, "hosts", i, "root")
                        .or_else(|| find_key(text, "root"))
                        .unwrap_or(0);
                    return Err(ConfigError::at(
                        path,
                        text,
                        offset,
                        Some("hosts.root".into()),
                        format!(
                            "host {}: root {} is not absolute; over SSH it is a path on the host: write it in full, e.g. \"/srv/app\"",
                            h.name,
                            h.root.display()
                        ),
                    ));
                }
            } else {
                h.root = resolve(&h.root);
            }
            h.identity = h.identity.as_deref().map(resolve);
        }
        let mut balancer = raw.balancer;
        balancer.token_file = balancer.token_file.as_deref().map(resolve);
        if let Some(t) = &mut balancer.tls {
            t.cert = resolve(&t.cert);
            t.key = resolve(&t.key);
        }
        let mut serve = raw.serve;
        if let Some(s) = &mut serve {
            s.token_file = s.token_file.as_deref().map(resolve);
            if let Some(g) = &mut s.github {
                g.secret_file = g.secret_file.as_deref().map(resolve);
            }
        }
        let state_dir = resolve(raw.state_dir.as_deref().unwrap_or(Path::new(".cutover")));
        let mut config = Config {
            file: path.to_path_buf(),
            transport,
            state_dir,
            ssh: SshSettings {
                host_key_checking: raw.host_key_checking,
                connect_timeout: *raw.connect_timeout,
                command_timeout: *raw.command_timeout,
                persist: *raw.ssh_persist,
            },
            forks: raw.forks,
            lock_lease: *raw.lock_lease,
            history_keep: raw.history_keep,
            hooks: raw.hooks,
            analysis: raw.analysis,
            verify: raw.verify,
            app: raw.app,
            release: raw.release,
            hosts,
            balancer,
            strategy: raw.strategy,
            serve,
            base_dir,
            serve_error: None,
        };
        config.validate(text)?;
        config.serve_error = config.validate_serve(text).err().map(|e| e.to_string());
        Ok(config)
    }

    /// Checks that span several keys.
    fn validate(&self, text: &str) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| {
            let offset = find_key(text, key).unwrap_or(0);
            ConfigError::at(&self.file, text, offset, Some(key.to_string()), message)
        };
        if self.hosts.is_empty() {
            return Err(err(
                "hosts",
                "no hosts: add at least one [[hosts]] table with name, address and root".into(),
            ));
        }
        let at_host = |i: usize, key: &str, message: String| self.host_error(text, i, key, message);
        let mut names = HashSet::new();
        // Local hosts share this machine, so each needs its own root; SSH hosts share a
        // root path only when they are the same machine (address and port).
        let mut roots = HashSet::new();
        // In place, every host's app holds app.port on the host's address: two hosts on one
        // address would fight over it (and the balancer could not tell them apart).
        let mut fixed_ports = std::collections::HashMap::new();
        let local = self.transport == TransportKind::Local;
        for (i, h) in self.hosts.iter().enumerate() {
            if !names.insert(h.name.as_str()) {
                return Err(at_host(
                    i,
                    "name",
                    format!(
                        "host name {} appears twice: every host needs its own name",
                        h.name
                    ),
                ));
            }
            let place = (!local).then_some((h.address, h.port));
            if !roots.insert((place, h.root.clone())) {
                let (key, what) = if local {
                    ("root", "local hosts share this machine")
                } else {
                    (
                        "address",
                        "these hosts are the same machine (address and port)",
                    )
                };
                return Err(at_host(
                    i,
                    key,
                    format!(
                        "host {} and another share the root {}: {what}; give every host its own directory",
                        h.name,
                        h.root.display()
                    ),
                ));
            }
            if !local {
                if h.port == Some(0) {
                    return Err(at_host(
                        i,
                        "port",
                        format!(
                            "host {}: SSH port 0 cannot be connected to: leave port out for 22, or set sshd's port",
                            h.name
                        ),
                    ));
                }
                // Passed to ssh as `-l USER`: one that looks like an option, or none, is a mistake.
                if let Some(user) = h.user.as_deref() {
                    if user.is_empty()
                        || user.starts_with('-')
                        || user.chars().any(char::is_whitespace)
                    {
                        return Err(at_host(
                            i,
                            "user",
                            format!(
                                "host {}: {user:?} is not a user name: leave user out for your SSH default, or write the login name",
                                h.name
                            ),
                        ));
                    }
                }
            }
            if local {
                // Every local host runs here: an address this machine does not have would
                // only fail when its batch comes, after the hosts before it moved.
                if let Err(e) = std::net::TcpListener::bind((h.address, 0)) {
                    if e.kind() == std::io::ErrorKind::AddrNotAvailable {
                        return Err(at_host(
                            i,
                            "address",
                            format!(
                                "host {}: {} is not an address of this machine, and transport = \"local\" runs every host here: use a loopback address such as 127.0.0.{} (or transport = \"ssh\" for a server)",
                                h.name,
                                h.address,
                                11 + i.min(200)
                            ),
                        ));
                    }
                }
            }
            if self.app.mode == Mode::InPlace {
                if let Some(other) = fixed_ports.insert(h.address, h.name.as_str()) {
                    return Err(at_host(
                        i,
                        "address",
                        format!(
                            "hosts {other} and {} are on one address ({}), and in place each app holds app.port there: give each host its own address, or use mode = \"side-by-side\"",
                            h.name, h.address
                        ),
                    ));
                }
            }
        }
        if local {
            self.check_local_roots(text)?;
        }
        if self.app.start.trim().is_empty() {
            return Err(err("app.start", "the start command is empty".into()));
        }
        let health = &self.app.health;
        if !health.path.starts_with('/') {
            return Err(err(
                "app.health.path",
                format!("{:?} must start with '/'", health.path),
            ));
        }
        if format!("http://127.0.0.1{}", health.path)
            .parse::<hyper::Uri>()
            .is_err()
        {
            return Err(err(
                "app.health.path",
                format!(
                    "{:?} is not a valid request path: spaces and non-ASCII characters must be percent-encoded (e.g. %20)",
                    health.path
                ),
            ));
        }
        if *health.interval < Duration::from_millis(10) {
            return Err(err(
                "app.health.interval",
                format!(
                    "interval = {} is too short: at least 10ms between checks (default 1s)",
                    health.interval
                ),
            ));
        }
        for (key, value, default) in [
            ("app.health.timeout", health.timeout, "2s"),
            ("app.health.deadline", health.deadline, "60s"),
        ] {
            if value.is_zero() {
                return Err(err(
                    key,
                    format!("{key} must be longer than 0s (default {default})"),
                ));
            }
        }
        // The gate needs healthy_threshold passes, `interval` apart, before its deadline.
        let passing = *health.interval * health.healthy_threshold.0.saturating_sub(1);
        if passing >= *health.deadline {
            return Err(err(
                "app.health.deadline",
                format!(
                    "deadline = {} leaves no time to pass the health gate: {} passing checks {} apart take {} (raise deadline, or shorten interval)",
                    health.deadline,
                    health.healthy_threshold.0,
                    health.interval,
                    humantime::format_duration(passing)
                ),
            ));
        }
        if self.app.port == Some(0) {
            return Err(err(
                "app.port",
                "port = 0 is not a port the app can be reached on: set the fixed port your app listens on (1-65535)".into(),
            ));
        }
        match (&self.release.path, &self.release.git) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "release.git",
                    "set either release.path or release.git, not both".into(),
                ));
            }
            (None, None) => {
                return Err(err(
                    "release",
                    "no release source: set path = \"builds/{version}\" (a directory) or git = \"URL\"".into(),
                ));
            }
            (Some(p), None) if p.trim().is_empty() => {
                return Err(err("release.path", "the release path is empty".into()));
            }
            _ => {}
        }
        if self
            .release
            .build
            .as_deref()
            .is_some_and(|b| b.trim().is_empty())
        {
            return Err(err(
                "release.build",
                "the build command is empty: remove build to ship the tree as it is".into(),
            ));
        }
        self.validate_strategy(text)?;
        if self.forks == 0 || self.forks > MAX_FORKS {
            return Err(err(
                "forks",
                format!("forks must be between 1 and {MAX_FORKS}"),
            ));
        }
        for (key, value, default) in [
            ("command_timeout", self.ssh.command_timeout, "5m"),
            ("connect_timeout", self.ssh.connect_timeout, "10s"),
        ] {
            if value.is_zero() {
                return Err(err(
                    key,
                    format!(
                        "{key} must be longer than 0s: leave it out for the default ({default})"
                    ),
                ));
            }
        }
        if self.history_keep == 0 {
            return Err(err(
                "history_keep",
                "history_keep must be at least 1: the journal's newest deployments are what `cutover rollback`, `status` and `show` read (0 would forget each deployment as it ends)".into(),
            ));
        }
        if self.lock_lease < Duration::from_secs(1) {
            return Err(err(
                "lock_lease",
                "lock_lease must be at least 1s: the running deploy renews it every third of it, and a shorter one lets a second deploy take a lock that is still held".into(),
            ));
        }
        for (i, hook) in self.hooks.iter().enumerate() {
            let err = |key: &str, message: String| {
                let key = key.strip_prefix("hooks.").unwrap_or(key);
                self.entry_error(text, "hooks", i, key, message)
            };
            if hook.command.trim().is_empty() {
                return Err(err("hooks.command", "a hook's command is empty".into()));
            }
            if hook.at == HookPoint::AfterSwitch && self.strategy.kind == StrategyKind::BlueGreen {
                return Err(err(
                    "hooks.at",
                    "after_switch hooks run per host as its traffic moves (rolling, a canary's promotion); a blue-green switch moves every host at once: use at = \"after_deploy\"".into(),
                ));
            }
            if hook.timeout.is_zero() {
                return Err(err(
                    "hooks.timeout",
                    "a hook's timeout must be longer than 0s (it is how long the hook may run; default 5m)".into(),
                ));
            }
            if hook.run_once && !matches!(hook.at, HookPoint::BeforeDeploy | HookPoint::AfterStage)
            {
                return Err(err(
                    "hooks.run_once",
                    "run_once hooks run before the first batch: use at = \"before_deploy\" or \"after_stage\"".into(),
                ));
            }
            if hook.run_once && hook.where_ == HookWhere::Local {
                return Err(err(
                    "hooks.run_once",
                    "run_once picks one host for a where = \"host\" hook; a local hook already runs once, on this machine: remove run_once, or set where = \"host\"".into(),
                ));
            }
        }
        if self.balancer.kind == BalancerKind::Haproxy {
            if self
                .balancer
                .socket
                .as_deref()
                .is_none_or(|s| s.trim().is_empty())
            {
                return Err(err("balancer.socket", "kind = \"haproxy\" needs socket = \"/run/haproxy/admin.sock\" (or \"host:port\")".into()));
            }
            let Some(backend) = &self.balancer.backend else {
                return Err(err("balancer.backend", "kind = \"haproxy\" needs backend = \"NAME\": the HAProxy backend cutover manages".into()));
            };
            // HAProxy's own rule for proxy names; it also keeps the name from ending a
            // runtime-API command (`;`) or leaving the state directory (`/`).
            let valid = !backend.is_empty()
                && backend
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
            if !valid {
                return Err(err(
                    "balancer.backend",
                    format!(
                        "{backend:?} is not an HAProxy backend name: use the name after `backend` in haproxy.cfg (letters, digits, '-', '_', '.', ':')"
                    ),
                ));
            }
            return Ok(());
        }
        let Some(admin) = self.balancer.admin else {
            return Err(err(
                "balancer.admin",
                "the built-in balancer needs admin = \"127.0.0.1:8081\" for its admin API".into(),
            ));
        };
        match (&self.balancer.token, &self.balancer.token_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "balancer.token",
                    "set either token or token_file, not both".into(),
                ));
            }
            (None, None) => {
                return Err(err(
                    "balancer",
                    "the admin API needs a token: set token = \"...\" or token_file = \"path\""
                        .into(),
                ));
            }
            (Some(t), None) => {
                if let Some(problem) = token_problem(t) {
                    return Err(err("balancer.token", format!("the token {problem}")));
                }
            }
            _ => {}
        }
        let b = &self.balancer;
        if b.max_header_bytes.is_some_and(|v| v < 8192) {
            return Err(err(
                "balancer.max_header_bytes",
                "max_header_bytes must be at least 8192 (browsers send cookies and headers of several KB; default 65536)".into(),
            ));
        }
        for (key, value) in [
            ("balancer.max_connections", b.max_connections),
            ("balancer.max_headers", b.max_headers),
        ] {
            if value == Some(0) {
                return Err(err(
                    key,
                    format!("{key} = 0 would refuse every request: leave it out for the default"),
                ));
            }
        }
        for (key, value) in [
            ("balancer.client_header_timeout", b.client_header_timeout),
            ("balancer.client_idle_timeout", b.client_idle_timeout),
            (
                "balancer.backend_connect_timeout",
                b.backend_connect_timeout,
            ),
            ("balancer.backend_header_timeout", b.backend_header_timeout),
            ("balancer.backend_send_timeout", b.backend_send_timeout),
        ] {
            if value.is_some_and(|d| d.is_zero()) {
                return Err(err(
                    key,
                    format!("{key} must be longer than 0s: leave it out for the default"),
                ));
            }
        }
        for (key, addr) in [
            ("balancer.listen", self.balancer.listen),
            ("balancer.admin", admin),
        ] {
            if addr.port() == 0 {
                return Err(err(
                    key,
                    format!(
                        "port 0 would make the proxy take a random port that deploys and clients cannot find: give {key} a fixed port, e.g. {}:{}",
                        addr.ip(),
                        if key == "balancer.admin" { 8081 } else { 8080 }
                    ),
                ));
            }
        }
        // 0.0.0.0:P (or [::]:P) takes port P on every address, so it cannot share P with either.
        let listen = self.balancer.listen;
        let clash = listen.port() == admin.port()
            && (listen.ip() == admin.ip()
                || listen.ip().is_unspecified()
                || admin.ip().is_unspecified());
        if clash {
            return Err(err(
                "balancer.admin",
                format!(
                    "admin ({admin}) and listen ({listen}) would take the same port: give the admin API its own port"
                ),
            ));
        }
        Ok(())
    }

    /// `[serve]`, when the config has one: what `cutover serve` would refuse, found at load
    /// (see [`Config::serve_error`]). The token and secret files are read only by `cutover
    /// serve` (see [`check_serve_secret`]).
    fn validate_serve(&self, text: &str) -> Result<(), ConfigError> {
        let Some(serve) = &self.serve else {
            return Ok(());
        };
        let err = |(key, message): KeyError| {
            let offset = find_key(text, &key).unwrap_or(0);
            ConfigError::at(&self.file, text, offset, Some(key), message)
        };
        check_serve_secret(&serve.token, &serve.token_file, "serve.token").map_err(err)?;
        if let Some(g) = &serve.github {
            check_serve_secret(&g.secret, &g.secret_file, "serve.github.secret").map_err(err)?;
            g.check().map_err(err)?;
        }
        Ok(())
    }

    /// A local host's root must not overlap another host's, and the release source (the
    /// versions' directory) or the state directory must not be, or lie inside, its
    /// `releases/`: a deploy prunes old releases there with `rm -rf`, and took a user's own
    /// builds for staged releases. (A root inside the release source is fine: roots never
    /// ship.) Paths are compared as directories (`a/../b` is `b`; symlinks are followed where
    /// the path exists), each resolved once (a fleet of hundreds is compared pairwise).
    fn check_local_roots(&self, text: &str) -> Result<(), ConfigError> {
        let places: Vec<PathBuf> = self.hosts.iter().map(|h| place_of(&h.root)).collect();
        let overlap = |a: &Path, b: &Path| a.starts_with(b) || b.starts_with(a);
        let mut guarded = vec![("the state directory (state_dir)", place_of(&self.state_dir))];
        if let Some(path) = &self.release.path {
            // The directory the versions live in: `builds/{version}` -> `builds`.
            let dir = match path.find("{version}") {
                Some(at) if path[..at].ends_with('/') => PathBuf::from(&path[..at]),
                Some(at) => Path::new(&path[..at])
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
                None => PathBuf::from(path),
            };
            guarded.push((
                "the release source (release.path)",
                place_of(&local_path(&self.base_dir, &dir)),
            ));
        }
        for (i, (h, root)) in self.hosts.iter().zip(&places).enumerate() {
            for (other, theirs) in self.hosts[..i].iter().zip(&places) {
                if !overlap(root, theirs) {
                    continue;
                }
                let how = if root == theirs {
                    "is the same directory as"
                } else if root.starts_with(theirs) {
                    "lies inside"
                } else {
                    "contains"
                };
                return Err(self.host_error(
                    text,
                    i,
                    "root",
                    format!(
                        "host {}'s root {} {how} host {}'s root {}: local hosts share this machine, and each prunes its own releases; give each host its own directory, none inside another (e.g. {} beside {})",
                        h.name,
                        root.display(),
                        other.name,
                        theirs.display(),
                        self.root_setting(other, &format!("fleet/{}", other.name)),
                        self.root_setting(h, &format!("fleet/{}", h.name)),
                    ),
                ));
            }
            let releases = root.join("releases");
            for (what, dir) in &guarded {
                if dir.starts_with(&releases) {
                    return Err(self.host_error(
                        text,
                        i,
                        "root",
                        format!(
                            "host {}'s root {} keeps its staged releases in {}, where {what} {} is: a deploy removes old releases there. Give the host a root of its own, e.g. {}",
                            h.name,
                            root.display(),
                            releases.display(),
                            dir.display(),
                            self.root_setting(h, &format!("fleet/{}", h.name))
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// How the user sets `host`'s root to `root`: in cutover.toml, or on its inventory line.
    fn root_setting(&self, host: &Host, root: &str) -> String {
        match host.origin {
            Some(_) => format!("cutover_root={root}"),
            None => format!("root = \"{root}\""),
        }
    }

    /// An error about the `i`-th host's `key`: at its `[[hosts]]` entry, or at its line in the
    /// inventory that defined it.
    fn host_error(&self, text: &str, i: usize, key: &str, message: String) -> ConfigError {
        match &self.hosts[i].origin {
            Some(origin) => ConfigError::in_inventory(origin, message),
            None => self.entry_error(text, "hosts", i, key, message),
        }
    }

    /// An error about `key` of the `i`-th `[[table]]` entry, placed at that entry's line.
    fn entry_error(
        &self,
        text: &str,
        table: &str,
        i: usize,
        key: &str,
        message: String,
    ) -> ConfigError {
        let offset = find_entry_key(text, table, i, key).unwrap_or(0);
        ConfigError::at(
            &self.file,
            text,
            offset,
            Some(format!("{table}.{key}")),
            message,
        )
    }

    /// Checks each strategy's spec, so a wrong one is a load-time error, never a silent success.
    fn validate_strategy(&self, text: &str) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| {
            let offset = find_key(text, key).unwrap_or(0);
            ConfigError::at(&self.file, text, offset, Some(key.to_string()), message)
        };
        let s = &self.strategy;
        let hosts = self.hosts.len() as u32;
        if self.app.mode == Mode::InPlace && self.app.port.is_none() {
            return Err(err(
                "app.port",
                "mode = \"in-place\" needs the app's fixed port: port = 8000".into(),
            ));
        }
        if self.app.mode == Mode::SideBySide && self.app.port.is_some() {
            return Err(err(
                "app.port",
                "a fixed port leaves no room for the new instance beside the old one: remove port (cutover picks a free one and passes {port}/PORT) or set mode = \"in-place\"".into(),
            ));
        }
        match s.kind {
            StrategyKind::Rolling => {
                if !s.steps.is_empty() {
                    return Err(err(
                        "strategy.steps",
                        "steps belong to kind = \"canary\"; a rolling deploy uses batch".into(),
                    ));
                }
            }
            StrategyKind::BlueGreen => {
                if self.balancer.kind == BalancerKind::Haproxy {
                    return Err(err(
                        "strategy.kind",
                        "blue-green verifies green through the built-in balancer's preview route and switches with one admin call; HAProxy has neither: use the built-in balancer (kind = \"builtin\"), or a rolling or canary strategy".into(),
                    ));
                }
                if self.app.mode == Mode::InPlace {
                    return Err(err(
                        "strategy.kind",
                        "blue-green needs room for a second (green) instance on every host, but app.mode = \"in-place\": use rolling, or side-by-side mode".into(),
                    ));
                }
                if s.post_switch_analysis.is_some() && self.analysis.is_none() {
                    return Err(err(
                        "strategy.post_switch_analysis",
                        "post_switch_analysis needs an [analysis] section saying what to check"
                            .into(),
                    ));
                }
                if let (Some(d), Some(a)) = (s.post_switch_analysis, &self.analysis) {
                    if *d < *a.interval {
                        return Err(err(
                            "strategy.post_switch_analysis",
                            format!(
                                "post_switch_analysis ({d}) is shorter than analysis.interval ({}): not one interval would be judged",
                                a.interval
                            ),
                        ));
                    }
                }
                if let Some(d) = s.post_switch_analysis {
                    if *d > *s.scale_down_delay {
                        return Err(err(
                            "strategy.post_switch_analysis",
                            format!(
                                "post_switch_analysis ({d}) is longer than scale_down_delay ({}): blue would be gone before the analysis could switch back",
                                s.scale_down_delay
                            ),
                        ));
                    }
                }
            }
            StrategyKind::Canary => {
                if s.steps.is_empty() {
                    return Err(err("strategy.steps", "a canary needs steps, e.g. steps = [{ weight = 10, pause = \"1m\" }, { weight = 50, pause = \"5m\" }, { weight = 100 }]".into()));
                }
                let mut last = 0;
                for (i, step) in s.steps.iter().enumerate() {
                    if step.weight > 100 {
                        return Err(err(
                            "strategy.steps",
                            format!("step {}: weight {} is above 100", i + 1, step.weight),
                        ));
                    }
                    if step.pause.is_some_and(|p| p.is_zero()) {
                        return Err(err(
                            "strategy.steps",
                            format!(
                                "step {}: pause = \"0s\" holds the step for no time, so nothing judges it: give a duration, or leave pause out to wait for `cutover promote`",
                                i + 1
                            ),
                        ));
                    }
                    if step.weight == 0 || step.weight <= last {
                        return Err(err(
                            "strategy.steps",
                            format!(
                                "step {}: weight {} does not increase (previous {last}): weights must rise step by step",
                                i + 1,
                                step.weight
                            ),
                        ));
                    }
                    last = step.weight;
                }
                if last != 100 {
                    return Err(err(
                        "strategy.steps",
                        format!(
                            "the last step's weight is {last}, not 100: the canary would never be promoted; end with {{ weight = 100 }}"
                        ),
                    ));
                }
                // One host may carry a canary beside its stable instance; with more, some
                // hosts must stay on the stable release.
                let most = if hosts > 1 { hosts - 1 } else { 1 };
                let count = s.canary_host_count();
                if count == 0 || count > most {
                    return Err(err(
                        "strategy.canary_hosts",
                        format!(
                            "canary_hosts = {count} must be between 1 and {most} with {hosts} host(s) (with several hosts, the rest serve the stable release)"
                        ),
                    ));
                }
                if self.app.mode == Mode::InPlace {
                    return Err(err(
                        "strategy.kind",
                        "a canary runs beside the stable release: it needs side-by-side mode"
                            .into(),
                    ));
                }
                if let Some(sticky) = &s.sticky {
                    if sticky != "cookie"
                        && (sticky.is_empty()
                            || !sticky
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                    {
                        return Err(err(
                            "strategy.sticky",
                            format!("{sticky:?} is neither \"cookie\" nor a header name"),
                        ));
                    }
                    if sticky != "cookie" && sticky.eq_ignore_ascii_case("cookie") {
                        return Err(err(
                            "strategy.sticky",
                            format!(
                                "{sticky:?} would hash the whole Cookie header (every cookie the client holds), not pin a release with cutover's cookie: write sticky = \"cookie\""
                            ),
                        ));
                    }
                    if self.balancer.kind == BalancerKind::Haproxy {
                        return Err(err(
                            "strategy.sticky",
                            "HAProxy splits a canary's traffic by server weight, and cutover cannot add a stickiness rule to haproxy.cfg, so every request would be routed afresh: remove sticky, or use the built-in balancer".into(),
                        ));
                    }
                }
            }
        }
        // Keys only another kind reads would be silently ignored: name them instead.
        // Keys written in [strategy] (those with defaults cannot tell otherwise).
        let written: Vec<String> = toml::from_str::<toml::Table>(text)
            .ok()
            .and_then(|t| t.get("strategy").and_then(|s| s.as_table()).cloned())
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        let written = |key: &str| written.iter().any(|k| k == key);
        use StrategyKind::{BlueGreen, Canary, Rolling};
        let batched: &[StrategyKind] = &[Rolling, Canary];
        let foreign: [(&str, bool, &[StrategyKind]); 9] = [
            ("steps", !s.steps.is_empty(), &[Canary]),
            ("canary_hosts", s.canary_hosts.is_some(), &[Canary]),
            ("sticky", s.sticky.is_some(), &[Canary]),
            (
                "post_switch_analysis",
                s.post_switch_analysis.is_some(),
                &[BlueGreen],
            ),
            (
                "scale_down_delay",
                written("scale_down_delay"),
                &[BlueGreen],
            ),
            // Blue-green starts every host's green at once and switches them together.
            ("batch", written("batch"), batched),
            (
                "max_fail_percentage",
                written("max_fail_percentage"),
                batched,
            ),
            ("max_failed_hosts", s.max_failed_hosts.is_some(), batched),
            ("on_failure", written("on_failure"), batched),
        ];
        for (key, set, owners) in foreign {
            if set && !owners.contains(&s.kind) {
                let owners: Vec<String> = owners
                    .iter()
                    .map(|o| format!("kind = \"{}\"", o.name()))
                    .collect();
                return Err(err(
                    &format!("strategy.{key}"),
                    format!(
                        "{key} belongs to {}; this deploy is {} and would ignore it: remove it or change kind",
                        owners.join(" and "),
                        s.kind.name()
                    ),
                ));
            }
        }
        let analysed = match s.kind {
            StrategyKind::Canary => true,
            StrategyKind::BlueGreen => s.post_switch_analysis.is_some(),
            StrategyKind::Rolling => false,
        };
        if self.analysis.is_some() && !analysed {
            let fix = match s.kind {
                StrategyKind::BlueGreen => {
                    "set strategy.post_switch_analysis = \"1m\" to judge green after the switch, or remove [analysis]"
                }
                _ => {
                    "a rolling deploy gates on health checks and [[verify]] commands: remove [analysis], or use kind = \"canary\""
                }
            };
            return Err(err(
                "analysis",
                format!(
                    "[analysis] is never run in this {} deploy: {fix}",
                    s.kind.name()
                ),
            ));
        }
        if let Some(a) = &self.analysis {
            if a.min_success_rate.is_none()
                && a.max_p99_latency.is_none()
                && a.max_degradation.is_none()
                && a.judge.is_none()
            {
                return Err(err("analysis", "[analysis] checks nothing: set min_success_rate, max_p99_latency, max_degradation or judge".into()));
            }
            if a.min_success_rate.is_none() && a.max_p99_latency.is_none() {
                let key = if a.max_degradation.is_some() {
                    "analysis.max_degradation"
                } else {
                    "analysis.judge"
                };
                return Err(err(key, "max_degradation and judge compare with the stable release, which serves nothing at a canary's 100% step or after a blue-green switch: add min_success_rate or max_p99_latency, so every interval has something to judge".into()));
            }
            if self.balancer.kind == BalancerKind::Haproxy && a.max_p99_latency.is_some() {
                return Err(err(
                    "analysis.max_p99_latency",
                    "HAProxy gives no latency histogram, so this check could never be made and every interval would be inconclusive (the rollout would hold): remove max_p99_latency and judge by min_success_rate, or use the built-in balancer".into(),
                ));
            }
            if let Some(rate) = a.min_success_rate {
                if rate.0 > 0.0 && rate.0 < 1.0 {
                    return Err(err(
                        "analysis.min_success_rate",
                        format!(
                            "min_success_rate is a percentage: {} would pass with almost every request failing; write {} for {}%",
                            rate.0,
                            (rate.0 * 1e8).round() / 1e6,
                            (rate.0 * 1e8).round() / 1e6
                        ),
                    ));
                }
            }
            if a.max_p99_latency.is_some_and(|d| d.is_zero()) {
                return Err(err(
                    "analysis.max_p99_latency",
                    "max_p99_latency = 0s fails every interval: set the slowest p99 you accept, e.g. \"500ms\"".into(),
                ));
            }
            if let Some(max) = a.max_p99_latency {
                // The p99 is read as the upper bound of its histogram bucket: between two
                // bounds, a p99 within the limit (120 ms under 150 ms) reads as the next bound
                // (200 ms) and fails.
                let bounds = crate::balancer::api::LATENCY_BUCKETS_MS;
                let exact = max.subsec_nanos() % 1_000_000 == 0
                    && bounds.iter().any(|b| u128::from(*b) == max.as_millis());
                if !exact {
                    let ms = max.as_secs_f64() * 1000.0;
                    let below = bounds.iter().rev().find(|b| (**b as f64) < ms);
                    let above = bounds.iter().find(|b| (**b as f64) > ms);
                    let choice = match (below, above) {
                        (Some(b), Some(a)) => format!("write \"{b}ms\" or \"{a}ms\""),
                        (Some(b), None) => format!("write at most \"{b}ms\""),
                        (None, Some(a)) => format!("write \"{a}ms\""),
                        (None, None) => String::new(),
                    };
                    return Err(err(
                        "analysis.max_p99_latency",
                        format!(
                            "{max} is not a bound of the latency histogram the p99 is read from ({} ms): a p99 within it would read as the next bound up and fail; {choice}",
                            bounds.map(|b| b.to_string()).join(", ")
                        ),
                    ));
                }
            }
            if *a.interval < Duration::from_millis(100) {
                return Err(err(
                    "analysis.interval",
                    "the analysis interval must be at least 100ms".into(),
                ));
            }
            if let Some(j) = &a.judge {
                let valid = 0.0 < j.alpha
                    && j.alpha < 1.0
                    && (0.0..=100.0).contains(&j.pass)
                    && (0.0..=j.pass).contains(&j.marginal);
                if !valid {
                    return Err(err(
                        "analysis.judge",
                        "judge needs 0 < alpha < 1 and 0 <= marginal <= pass <= 100".into(),
                    ));
                }
                if !(0.0..MAX_ALLOWED_INCREASE).contains(&j.allowed_increase) {
                    return Err(err(
                        "analysis.judge.allowed_increase",
                        format!(
                            "allowed_increase = {} is out of range: it is the fraction by which canary latency may exceed stable's (0.1 = 10%), a number at least 0 (no tolerance) and below {MAX_ALLOWED_INCREASE} ({}%); write e.g. allowed_increase = 0.1, or 0.05 for 5%, or leave it out for the default 0.1",
                            j.allowed_increase,
                            MAX_ALLOWED_INCREASE * 100.0
                        ),
                    ));
                }
                if self.balancer.kind == BalancerKind::Haproxy {
                    return Err(err(
                        "analysis.judge",
                        "the judge compares latency samples, which HAProxy does not give: every interval would be inconclusive; remove [analysis.judge] or use the built-in balancer".into(),
                    ));
                }
            }
        }
        for (i, v) in self.verify.iter().enumerate() {
            let at_verify =
                |key: &str, message: String| self.entry_error(text, "verify", i, key, message);
            if v.command.trim().is_empty() {
                return Err(at_verify(
                    "command",
                    "the verify command is empty: it would pass every gate without testing anything".into(),
                ));
            }
            if v.timeout.is_zero() {
                return Err(at_verify(
                    "timeout",
                    "a verify command's timeout must be longer than 0s (default 30s)".into(),
                ));
            }
            if v.at.is_empty() {
                return Err(at_verify(
                    "at",
                    "a verify command needs at least one point in at = [...]".into(),
                ));
            }
            if let Some(point) = v.at.iter().find(|p| !p.runs_in(s.kind)) {
                return Err(at_verify(
                    "at",
                    format!(
                        "{} never runs in a {} deploy, so this check would be skipped; points of {}: {}",
                        point.name(),
                        s.kind.name(),
                        s.kind.name(),
                        VerifyPoint::ALL
                            .iter()
                            .filter(|p| p.runs_in(s.kind))
                            .map(|p| p.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The admin token, read from `token` or `token_file`.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        if let Some(t) = &self.balancer.token {
            return Ok(t.trim().to_string());
        }
        let path = self
            .balancer
            .token_file
            .as_ref()
            .expect("validated: token or token_file");
        let t = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!(
                "{}: balancer.token_file {}: {e}",
                self.file.display(),
                path.display()
            )
        })?;
        let t = t.trim().to_string();
        if t.is_empty() {
            anyhow::bail!(
                "{}: balancer.token_file {} is empty: write a long random token into it",
                self.file.display(),
                path.display()
            );
        }
        if let Some(problem) = token_problem(&t) {
            anyhow::bail!(
                "{}: balancer.token_file: the token in {} {problem}",
                self.file.display(),
                path.display()
            );
        }
        Ok(t)
    }

    /// The admin API address of the built-in balancer.
    pub fn admin_addr(&self) -> anyhow::Result<SocketAddr> {
        self.balancer
            .admin
            .ok_or_else(|| anyhow::anyhow!("{}: balancer.admin is not set", self.file.display()))
    }

    /// The release source directory for a version (with `release.path`).
    pub fn release_source(&self, version: &Name) -> PathBuf {
        let p = self
            .release
            .path
            .as_deref()
            .unwrap_or("")
            .replace("{version}", version.as_str());
        local_path(&self.base_dir, Path::new(&p))
    }

    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name.as_str() == name)
    }
}

/// A path on this machine as the config file means it: `~/` is the user's home (as a shell
/// would read it), a relative path is relative to the config file's directory `base_dir`.
fn local_path(base_dir: &Path, p: &Path) -> PathBuf {
    let p = match (p.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => p.to_path_buf(),
    };
    if p.is_absolute() { p } else { base_dir.join(p) }
}

/// A TOML or serde error message in the words of the config file: serde names Rust types
/// ("expected u32"), which a user cannot act on.
fn plain_message(message: &str) -> String {
    let mut message = message.to_string();
    if message.starts_with("invalid type: string") && message.contains("expected ") {
        let number = [
            "i64", "u64", "u32", "u16", "usize", "f64", "integer", "a number",
        ]
        .iter()
        .any(|t| message.ends_with(t));
        if number {
            message.push_str(": write the number without quotes");
        }
    } else if message.starts_with("invalid type: integer") && message.contains("expected a string")
    {
        message.push_str(": put the value in quotes");
    }
    for (rust, words) in [
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected u64", "expected a whole number, 0 or more"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
    ] {
        if let Some(head) = message.strip_suffix(rust) {
            message = format!("{head}{words}");
            break;
        }
        if let Some(at) = message.find(&format!("{rust}:")) {
            message.replace_range(at..at + rust.len(), words);
            break;
        }
    }
    if let Some(head) = message.strip_suffix("expected struct Judge") {
        message = format!(
            "{head}expected a table: [analysis.judge] with pass, marginal, alpha and allowed_increase"
        );
    }
    if message.ends_with("expected a sequence") {
        if message.starts_with("invalid type: map") {
            message.push_str(": write each entry as [[name]] (double brackets), or a list [...]");
        } else {
            message.push_str(": write a list in brackets, e.g. [\"value\"]");
        }
    }
    if message == "duplicate key" {
        message.push_str(": it is set twice in the file (entries of a list such as hosts or hooks are each written [[hosts]], with double brackets)");
    }
    if message == "invalid socket address syntax" {
        message.push_str(": write IP:port, e.g. \"127.0.0.1:8080\" (names are not looked up)");
    }
    message
}

/// The text of the file at `path`, read up to `limit + 1` bytes (the caller refuses more):
/// a file given by mistake (`/dev/zero`, a log) must not be read forever.
pub(crate) fn read_at_most(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// What is wrong with an admin token, if anything: it travels in an HTTP header, so only
/// visible ASCII can be sent as written (anything else used to turn into a baffling 401).
fn token_problem(token: &str) -> Option<&'static str> {
    let t = token.trim();
    if t.len() < 8 {
        return Some(
            "is shorter than 8 characters: use a long random string (e.g. `openssl rand -hex 32`)",
        );
    }
    // A space inside is fine (a passphrase): the header keeps it, and the admin API reads
    // everything after "Bearer ".
    if !t.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Some(
            "holds a control character or non-ASCII: it is sent in an HTTP header, so use letters, digits, punctuation and spaces only (e.g. `openssl rand -hex 32`)",
        );
    }
    None
}

/// Where `p` is on this machine, for telling whether two paths overlap: `p` with `.` and `..`
/// taken out as written, then its longest existing part replaced by its real path (symlinks
/// followed), so that one directory reached two ways compares equal.
fn place_of(p: &Path) -> PathBuf {
    let mut lexical = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                lexical.pop();
            }
            c => lexical.push(c),
        }
    }
    let mut rest = Vec::new();
    let mut existing = lexical.as_path();
    loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            return rest.iter().rev().fold(real, |path, part| path.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return lexical,
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The dotted key at `offset`: the nearest table header above plus the key on the line.
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[line_start..line_end];
    let table = table_above(text, line_start);
    if let Some(header) = table_header(line) {
        return header;
    }
    match line.trim().split_once('=') {
        Some((k, _)) => join_key(&table, k.trim()),
        None => table,
    }
}

fn table_above(text: &str, before: usize) -> String {
    text[..before]
        .lines()
        .rev()
        .find_map(table_header)
        .unwrap_or_default()
}

/// The table a header line opens (`[a.b]` or `[[a]]`, a trailing `# comment` allowed), or
/// `None` for any other line.
fn table_header(line: &str) -> Option<String> {
    let t = line.trim();
    if !t.starts_with('[') {
        return None;
    }
    // A comment starts at a `#` outside quotes (a quoted key may hold one).
    let mut quote = None;
    let mut end = t.len();
    for (i, c) in t.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    Some(
        t[..end]
            .trim()
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string(),
    )
}

fn join_key(table: &str, key: &str) -> String {
    if table.is_empty() {
        key.to_string()
    } else {
        format!("{table}.{key}")
    }
}

/// For "missing field `x`", the span is the enclosing table: name the key that is missing.
fn missing_field_key(text: &str, offset: usize, message: &str) -> Option<String> {
    let field = message
        .strip_prefix("missing field `")?
        .split('`')
        .next()?
        .to_string();
    let at = key_at(text, offset);
    // A span on a header line names the table itself; on a `key = {` line the inline table.
    Some(if at.is_empty() || at == field {
        field
    } else {
        format!("{at}.{field}")
    })
}

/// Byte offset of `dotted` (e.g. `balancer.token`) in the text, best effort, for errors found
/// after parsing.
fn find_key(text: &str, dotted: &str) -> Option<usize> {
    let (table, key) = match dotted.rsplit_once('.') {
        Some((t, k)) => (t, k),
        None => ("", dotted),
    };
    let mut offset = 0;
    let mut current = String::new();
    let mut table_offset = None;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if let Some(header) = table_header(line) {
            current = header;
            if current == dotted {
                return Some(offset + line.find('[').unwrap_or(0));
            }
            if current == table && table_offset.is_none() {
                table_offset = Some(offset);
            }
        } else if current == table && t.split_once('=').map(|(k, _)| k.trim()) == Some(key) {
            return Some(offset + line.len() - line.trim_start().len());
        }
        offset += line.len();
    }
    table_offset
}

/// Where `key` of the `n`-th `[[table]]` entry (counting from 0) is: the key's line, else the
/// entry's header, else (an entry written inline or read from an inventory) the first `key` of
/// any entry, so an error about the second host points at the second host.
fn find_entry_key(text: &str, table: &str, n: usize, key: &str) -> Option<usize> {
    let mut offset = 0;
    let mut seen = 0;
    let mut entry = None;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if let Some(header) = table_header(line) {
            if entry.is_some() {
                break;
            }
            if t.starts_with("[[") && header == table {
                if seen == n {
                    entry = Some(offset + line.find('[').unwrap_or(0));
                }
                seen += 1;
            }
        } else if entry.is_some() && t.split_once('=').map(|(k, _)| k.trim()) == Some(key) {
            return Some(offset + line.len() - line.trim_start().len());
        }
        offset += line.len();
    }
    entry.or_else(|| find_key(text, &format!("{table}.{key}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[app]
name = "shop"
start = "exec ./server --port {port}"

[release]
path = "builds/{version}"

[[hosts]]
name = "web1"
address = "127.0.0.11"
root = "fleet/web1"

[balancer]
listen = "127.0.0.1:8080"
admin = "127.0.0.1:8081"
token = "0123456789abcdef"

[strategy]
kind = "rolling"
batch = [1, "50%"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("cutover.toml"), text)
    }

    #[test]
    fn names_pad_in_tables() {
        assert_eq!(format!("[{:<6}]", Name::parse("web1").unwrap()), "[web1  ]");
    }

    #[test]
    fn good_config_gets_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(*c.app.stop_timeout, Duration::from_secs(10));
        assert_eq!(*c.app.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.app.health.healthy_threshold, Threshold(2));
        assert_eq!(c.app.health.unhealthy_threshold, Threshold(3));
        assert_eq!(*c.app.health.deadline, Duration::from_secs(60));
        assert_eq!(c.release.keep, Keep(5));
        assert_eq!(c.strategy.max_fail_percentage, Percent(0.0));
        assert_eq!(c.strategy.on_failure, OnFailure::Rollback);
        assert_eq!(
            c.strategy.batch,
            BatchSpec(vec![BatchSize::Count(1), BatchSize::Percent(50)])
        );
        assert!(c.hosts[0].root.is_absolute());
    }

    /// Review finding: README says paths on this machine may start with `~/`, but
    /// `release.path = "~/builds/{version}"` looked for a directory named `~` beside the config.
    #[test]
    fn release_path_may_start_with_home() {
        let Some(home) = std::env::var_os("HOME") else {
            return;
        };
        let c = parse(&GOOD.replace("builds/{version}", "~/builds/{version}")).unwrap();
        let v = Name::parse("v2").unwrap();
        assert_eq!(c.release_source(&v), PathBuf::from(home).join("builds/v2"));
        let c = parse(GOOD).unwrap();
        assert_eq!(c.release_source(&v), c.base_dir.join("builds/v2"));
    }

    /// Review finding: `cert = "~/certs/cert.pem"` passed `plan` but the proxy looked for a
    /// directory named `~` beside the config.
    #[test]
    fn tls_files_may_start_with_home_or_be_relative() {
        let Some(home) = std::env::var_os("HOME") else {
            return;
        };
        let text = GOOD.replace(
            "token = \"0123456789abcdef\"",
            "token = \"0123456789abcdef\"\n\n[balancer.tls]\ncert = \"~/certs/cert.pem\"\nkey = \"tls/key.pem\"",
        );
        let c = parse(&text).unwrap();
        let tls = c.balancer.tls.as_ref().unwrap();
        assert_eq!(tls.cert, PathBuf::from(&home).join("certs/cert.pem"));
        assert_eq!(tls.key, c.base_dir.join("tls/key.pem"));
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = GOOD.replace("name = \"shop\"", "name = \"shop\"\nstrat = 1");
        let e = error_of(&text);
        assert!(e.starts_with("cutover.toml:4:1: app.strat:"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn values_that_would_overflow_or_break_the_lock_are_refused() {
        let e = error_of(&GOOD.replace(
            "name = \"shop\"",
            "name = \"shop\"\ndrain_timeout = \"500000000000y\"",
        ));
        assert!(
            e.contains("app.drain_timeout") && e.contains("longest duration"),
            "{e}"
        );
        let top = |line: &str| GOOD.replacen("[app]", &format!("{line}\n\n[app]"), 1);
        let e = error_of(&top("forks = 4611686018427387904"));
        assert!(e.contains("forks must be between 1 and 10000"), "{e}");
        let e = error_of(&top("history_keep = 0"));
        assert!(e.contains("history_keep must be at least 1"), "{e}");
        let e = error_of(&top("lock_lease = \"0s\""));
        assert!(e.contains("lock_lease must be at least 1s"), "{e}");
        assert!(parse(&top("lock_lease = \"1s\"\nforks = 10000")).is_ok());
    }

    /// Review findings: each of these was accepted, then failed late or misleadingly (a gate
    /// that ignored its deadline, a 401 for a token with a newline, a proxy on a random
    /// port, a build that "did not finish within 0s", a host that failed in its batch).
    #[test]
    fn values_that_could_only_fail_later_are_refused_at_load() {
        let health =
            |lines: &str| GOOD.replace("[release]", &format!("[app.health]\n{lines}\n\n[release]"));
        let e = error_of(&health("interval = \"10s\"\ndeadline = \"5s\""));
        assert!(
            e.contains("app.health.deadline") && e.contains("2 passing checks 10s apart take 10s"),
            "{e}"
        );
        assert!(parse(&health("interval = \"2s\"\ndeadline = \"5s\"")).is_ok());
        let e = error_of(&GOOD.replace("0123456789abcdef", "0123456789\\nabcdef"));
        assert!(
            e.contains("balancer.token") && e.contains("control character"),
            "{e}"
        );
        // A passphrase with spaces still works (it did before the check came).
        assert!(parse(&GOOD.replace("0123456789abcdef", "correct horse battery staple")).is_ok());
        let e = error_of(&GOOD.replace("127.0.0.1:8081", "127.0.0.1:0"));
        assert!(e.contains("balancer.admin") && e.contains("port 0"), "{e}");
        let e = error_of(&GOOD.replace("127.0.0.1:8080", "127.0.0.1:0"));
        assert!(e.contains("balancer.listen") && e.contains("port 0"), "{e}");
        let e = error_of(&GOOD.replace("127.0.0.1:8081", "0.0.0.0:8080"));
        assert!(e.contains("would take the same port"), "{e}");
        let e = error_of(&format!("command_timeout = \"0s\"\n{GOOD}"));
        assert!(e.contains("command_timeout must be longer than 0s"), "{e}");
        let e = error_of(&GOOD.replace("127.0.0.11", "192.0.2.1"));
        assert!(
            e.contains("hosts.address") && e.contains("not an address of this machine"),
            "{e}"
        );
        let empty = tempfile::NamedTempFile::new().unwrap();
        let e = Config::load(empty.path()).unwrap_err().to_string();
        assert!(e.contains("the config is empty: run `cutover init`"), "{e}");
    }

    /// Review finding: a `[serve]` section that `cutover serve` would refuse (a short or
    /// missing token, a missing webhook secret) passed `cutover plan` and every other command,
    /// and failed only when serve started. It is found on load now, at its line and key, for
    /// `plan` and `serve` to refuse; the token and secret files are read by `cutover serve`
    /// alone.
    #[test]
    fn an_invalid_serve_section_is_refused_at_load() {
        let with = |serve: &str| format!("{GOOD}\n{serve}");
        let line_of = |text: &str, needle: &str| {
            text.lines().position(|l| l.starts_with(needle)).unwrap() + 1
        };
        let token = "token = \"serve-0123456789abcdef\"\n";
        let cases = [
            (
                with("[serve]\ntoken = \"short\"\n"),
                "token = \"short\"",
                "serve.token: serve.token is too short: use at least 16 characters",
            ),
            (
                with("[serve]\nlisten = \"127.0.0.1:8480\"\n"),
                "[serve]",
                "serve: serve.token is not set: set token_file = \"path\" (a file holding it) or token = \"...\" in [serve]",
            ),
            (
                with("[serve]\ntoken = \"serve-0123456789\\tabcdef\"\n"),
                "token = \"serve-",
                "serve.token: serve.token holds a control character or non-ASCII: it is sent in an HTTP header",
            ),
            (
                with("[serve]\ntoken = \"serve-0123456789-café\"\n"),
                "token = \"serve-",
                "serve.token: serve.token holds a control character or non-ASCII",
            ),
            (
                with(&format!("[serve]\n{token}token_file = \"t\"\n")),
                "token = \"serve-",
                "serve.token: set either token or token_file in [serve], not both",
            ),
            (
                with(&format!(
                    "[serve]\n{token}\n[serve.github]\nbranch = \"main\"\n"
                )),
                "[serve.github]",
                "serve.github: serve.github.secret is not set: set secret_file = \"path\"",
            ),
            (
                with(&format!(
                    "[serve]\n{token}\n[serve.github]\nsecret = \"0123456789\"\n"
                )),
                "secret = ",
                "serve.github.secret: serve.github.secret is too short: use at least 16",
            ),
            (
                with(&format!(
                    "[serve]\n{token}\n[serve.github]\nsecret = \"0123456789abcdef\"\nbranch = \"refs/heads/main\"\n"
                )),
                "branch = ",
                "serve.github.branch: \"refs/heads/main\": name the branch alone, e.g. \"main\"",
            ),
            (
                with(&format!(
                    "[serve]\n{token}\n[serve.github]\nsecret = \"0123456789abcdef\"\nrepository = \"acme\"\n"
                )),
                "repository = ",
                "serve.github.repository: \"acme\": name the repository as owner/name",
            ),
        ];
        for (text, needle, expected) in cases {
            let e = parse(&text).unwrap().serve_error.unwrap();
            let place = format!("cutover.toml:{}:1: ", line_of(&text, needle));
            assert!(e.starts_with(&format!("{place}{expected}")), "{e}");
        }
        // Valid sections load, and so do files that only the serving machine may have.
        assert!(parse(GOOD).unwrap().serve.is_none());
        let files = with(
            "[serve]\ntoken_file = \"missing.token\"\n\n[serve.github]\nsecret_file = \"missing.secret\"\n",
        );
        assert_eq!(parse(&files).unwrap().serve_error, None);
        let inline = with(&format!(
            "[serve]\n{token}\n[serve.github]\nsecret = \" 0123456789abcdef \"\nrepository = \"Acme/Web\"\n"
        ));
        assert_eq!(parse(&inline).unwrap().serve_error, None);
        // The webhook secret is an HMAC key, never sent: anything goes.
        let hmac_key = with(&format!(
            "[serve]\n{token}\n[serve.github]\nsecret = \"0123456789\\tabcdef-é\"\n"
        ));
        assert_eq!(parse(&hmac_key).unwrap().serve_error, None);
    }

    /// Review finding: serde's words ("expected u32", "expected struct Judge") reached users.
    #[test]
    fn type_errors_say_what_to_write_not_which_rust_type() {
        let top = |line: &str| GOOD.replacen("[app]", &format!("{line}\n\n[app]"), 1);
        let e = error_of(&top("forks = -1"));
        assert!(e.ends_with("expected a whole number, 0 or more"), "{e}");
        let e = error_of(&GOOD.replace("127.0.0.11\"", "127.0.0.11\"\nport = 70000"));
        assert!(
            e.ends_with("expected a whole number from 0 to 65535"),
            "{e}"
        );
        let e = error_of(&GOOD.replace("127.0.0.1:8081", "localhost:8081"));
        assert!(e.contains("write IP:port"), "{e}");
        let e = error_of(
            &GOOD
                .replacen("[[hosts]]", "[hosts]", 1)
                .replace("[balancer]", "[[hosts]]\nname = \"w\"\n\n[balancer]"),
        );
        assert!(e.contains("[[hosts]], with double brackets"), "{e}");
        for e in [&e, &error_of(&top("forks = 1.5"))] {
            assert!(!e.contains("usize") && !e.contains("u16"), "{e}");
        }
    }

    /// Review finding: errors about inventory hosts pointed at `cutover.toml:1:1` and told the
    /// user to set `root = ...` on a `[[hosts]]` table that does not exist.
    #[test]
    fn errors_about_inventory_hosts_point_into_the_inventory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("hosts.ini"),
            "[web]\nw1 ansible_host=127.0.0.21\nw2 ansible_host=127.0.0.22 cutover_root=fleet/w1\n",
        )
        .unwrap();
        // GOOD without its [[hosts]] table, the hosts coming from the inventory.
        let text = format!(
            "inventory = \"hosts.ini\"\n{}{}",
            GOOD.split("[[hosts]]").next().unwrap(),
            &GOOD[GOOD.find("[balancer]").unwrap()..]
        );
        let file = dir.path().join("cutover.toml");
        let e = Config::parse(&file, &text).unwrap_err().to_string();
        let ini = dir.path().join("hosts.ini").display().to_string();
        assert!(
            e.starts_with(&format!("{ini}:2: host w1 has no root: set cutover_root=")),
            "{e}"
        );
        std::fs::write(
            dir.path().join("hosts.ini"),
            "[web]\nw1 ansible_host=127.0.0.21 cutover_root=fleet/w1\nw2 ansible_host=127.0.0.22 cutover_root=fleet/w1/x/..\n",
        )
        .unwrap();
        let e = Config::parse(&file, &text).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{ini}:3: host w2")), "{e}");
    }

    /// Review findings: settings that were accepted and then did nothing, or nonsense.
    #[test]
    fn settings_that_would_do_nothing_or_nonsense_are_refused() {
        let e = error_of(&GOOD.replace("[release]", "[[hooks]]\nat = \"before_deploy\"\ncommand = \"true\"\nrun_once = true\nwhere = \"local\"\n\n[release]"));
        assert!(
            e.contains("hooks.run_once") && e.contains("already runs once"),
            "{e}"
        );
        let e = error_of(&GOOD.replace(
            "path = \"builds/{version}\"",
            "path = \"builds/{version}\"\nbuild = \" \"",
        ));
        assert!(e.contains("release.build") && e.contains("empty"), "{e}");
        let canary = GOOD.replace(
            "kind = \"rolling\"\nbatch = [1, \"50%\"]",
            "kind = \"canary\"\nsteps = [{ weight = 50 }, { weight = 100 }]",
        ) + "\n[analysis]\ninterval = \"1s\"\n";
        let e = error_of(&format!("{canary}min_success_rate = 0.995\n"));
        assert!(
            e.contains("is a percentage") && e.contains("write 99.5 for 99.5%"),
            "{e}"
        );
        assert!(parse(&format!("{canary}min_success_rate = 99.5\n")).is_ok());
        let e = error_of(&format!("{canary}max_p99_latency = \"0s\"\n"));
        assert!(e.contains("fails every interval"), "{e}");
        let e = error_of(&format!("{canary}max_p99_latency = \"150ms\"\n"));
        assert!(
            e.contains("analysis.max_p99_latency")
                && e.contains("150ms is not a bound")
                && e.contains("write \"100ms\" or \"200ms\""),
            "{e}"
        );
        assert!(parse(&format!("{canary}max_p99_latency = \"200ms\"\n")).is_ok());
        assert!(parse(&format!("{canary}max_p99_latency = \"2s\"\n")).is_ok());
        let e = error_of(&format!("{canary}max_p99_latency = \"20s\"\n"));
        assert!(e.contains("write at most \"10000ms\""), "{e}");
        let e = error_of(&canary.replace(
            "kind = \"canary\"",
            "kind = \"canary\"\nsticky = \"Cookie\"",
        ));
        assert!(e.contains("write sticky = \"cookie\""), "{e}");
        let haproxy =
            |strategy: &str| {
                canary
                .replace("kind = \"canary\"", &format!("kind = \"canary\"\n{strategy}"))
                .replace(
                    "admin = \"127.0.0.1:8081\"\ntoken = \"0123456789abcdef\"",
                    "kind = \"haproxy\"\nsocket = \"/run/haproxy/admin.sock\"\nbackend = \"app\"",
                )
                + "min_success_rate = 99.5\n"
            };
        assert!(parse(&haproxy("")).is_ok(), "{}", error_of(&haproxy("")));
        let e = error_of(&haproxy("sticky = \"cookie\""));
        assert!(
            e.contains("strategy.sticky") && e.contains("HAProxy splits"),
            "{e}"
        );
        let ssh = |host: &str| {
            format!(
                "transport = \"ssh\"\n{}",
                GOOD.replace(
                    "root = \"fleet/web1\"",
                    &format!("root = \"/srv/shop\"\n{host}")
                )
            )
        };
        assert!(parse(&ssh("user = \"deploy\"")).is_ok());
        let e = error_of(&ssh("user = \"-oProxyCommand=x\""));
        assert!(
            e.contains("hosts.user") && e.contains("not a user name"),
            "{e}"
        );
        let e = error_of(&ssh("port = 0"));
        assert!(e.contains("hosts.port") && e.contains("port 0"), "{e}");
    }

    /// Review finding: `root = "."` beside `path = "releases/{version}"` let a deploy prune
    /// (`rm -rf`) the user's own builds, and `a/../b` or a root inside another passed.
    #[test]
    fn local_roots_may_not_overlap_each_other_the_builds_or_the_state() {
        let with = |web1: &str, web2: &str| {
            GOOD.replace("builds/{version}", "releases/{version}")
                .replace("root = \"fleet/web1\"", &format!("root = \"{web1}\""))
                + &format!(
                    "\n[[hosts]]\nname = \"web2\"\naddress = \"127.0.0.12\"\nroot = \"{web2}\"\n"
                )
        };
        assert!(parse(&with("fleet/web1", "fleet/web2")).is_ok());
        // The config's own directory holds releases/, the builds.
        let e = error_of(&with(".", "fleet/web2"));
        assert!(
            e.contains("hosts.root") && e.contains("release source") && e.contains("fleet/web1"),
            "{e}"
        );
        let e = error_of(&with("fleet/web1", "fleet/x/../web1"));
        assert!(e.contains("is the same directory as host web1's"), "{e}");
        let e = error_of(&with("fleet/web1", "fleet/web1/releases/w"));
        assert!(e.contains("lies inside host web1's root"), "{e}");
        let e = error_of(&with("fleet/web1", "fleet"));
        assert!(e.contains("contains host web1's root"), "{e}");
        let e = error_of(&format!(
            "state_dir = \"fleet/web2/releases/state\"\n{}",
            with("fleet/web1", "fleet/web2")
        ));
        assert!(e.contains("state directory") && e.contains("web2"), "{e}");
        // Review finding: roots inside a release source that ships the config's directory
        // (path = ".", or "{version}") are fine: roots never ship, and no build is in them.
        for path in [".", "{version}", "{version}/dist"] {
            let text = with("fleet/web1", "fleet/web2")
                .replace("\"releases/{version}\"", &format!("\"{path}\""));
            assert!(parse(&text).is_ok(), "path = {path:?}: {}", error_of(&text));
        }
        // A `{version}` inside a name: the versions live in builds/.
        let e = error_of(
            &with("fleet/web1", "fleet/web2")
                .replace("releases/{version}", "fleet/web2/releases/app-{version}"),
        );
        assert!(e.contains("release source") && e.contains("web2"), "{e}");
    }

    #[test]
    fn ssh_hosts_may_share_a_root_path_but_one_machine_may_not() {
        let ssh = |hosts: &str| {
            format!(
                "transport = \"ssh\"\nroot = \"/srv/shop\"\n{}{hosts}",
                GOOD.split("[[hosts]]").next().unwrap().to_string()
                    + &GOOD[GOOD.find("[balancer]").unwrap()..]
            )
        };
        let two = "\n[[hosts]]\nname = \"web1\"\naddress = \"10.0.0.11\"\nidentity = \"~/.ssh/deploy\"\n\
                   \n[[hosts]]\nname = \"web2\"\naddress = \"10.0.0.12\"\n";
        let c = parse(&ssh(two)).unwrap();
        assert_eq!(c.hosts[0].root, PathBuf::from("/srv/shop"));
        assert_eq!(c.hosts[1].root, PathBuf::from("/srv/shop"));
        // `~/` in a local path is the home directory, not a directory named `~`.
        if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(
                c.hosts[0].identity.as_deref(),
                Some(PathBuf::from(home).join(".ssh/deploy").as_path())
            );
        }
        let same = two.replace("10.0.0.12", "10.0.0.11");
        let e = error_of(&ssh(&same));
        assert!(
            e.contains("same machine") && e.contains("hosts.address"),
            "{e}"
        );
        let relative = ssh(two).replace("root = \"/srv/shop\"", "root = \"srv/shop\"");
        let e = error_of(&relative);
        assert!(e.contains("not absolute") && e.contains("/srv/app"), "{e}");
        // Local hosts are all this machine.
        let local = GOOD.replace(
            "[balancer]",
            "[[hosts]]\nname = \"web2\"\naddress = \"127.0.0.12\"\nroot = \"fleet/web1\"\n\n[balancer]",
        );
        let e = error_of(&local);
        assert!(e.contains("local hosts share this machine"), "{e}");
    }

    #[test]
    fn missing_key_names_the_key() {
        let text = GOOD.replace("start = \"exec ./server --port {port}\"\n", "");
        let e = error_of(&text);
        assert!(e.starts_with("cutover.toml:2:"), "{e}");
        assert!(e.contains("app.start"), "{e}");
        assert!(e.contains("missing field"), "{e}");
    }

    #[test]
    fn in_place_mode_needs_its_port_and_a_rolling_deploy() {
        let with = |app: &str, kind: &str| {
            GOOD.replace("name = \"shop\"", &format!("name = \"shop\"\n{app}"))
                .replace("kind = \"rolling\"", &format!("kind = \"{kind}\""))
        };
        let c = parse(&with("mode = \"in-place\"\nport = 8000", "rolling")).unwrap();
        assert_eq!((c.app.mode, c.app.port), (Mode::InPlace, Some(8000)));
        let e = error_of(&with("mode = \"in-place\"", "rolling"));
        assert!(e.contains("app.port") && e.contains("port = 8000"), "{e}");
        let e = error_of(&with("port = 8000", "rolling"));
        assert!(
            e.contains("app.port") && e.contains("mode = \"in-place\""),
            "{e}"
        );
        let e = error_of(&with("mode = \"in-place\"\nport = 8000", "blue-green"));
        assert!(
            e.contains("strategy.kind") && e.contains("side-by-side"),
            "{e}"
        );
    }

    #[test]
    fn batch_over_100_percent_is_refused() {
        let e = error_of(&GOOD.replace("batch = [1, \"50%\"]", "batch = \"120%\""));
        assert!(e.starts_with("cutover.toml:21:9: strategy.batch:"), "{e}");
        assert!(e.contains("120%"), "{e}");
    }

    #[test]
    fn a_comment_after_a_table_header_keeps_errors_in_place() {
        let commented = GOOD
            .replace("[strategy]", "[strategy]   # how to roll")
            .replace("[balancer]", "[balancer] # LB")
            .replace("[[hosts]]", "[[hosts]] # first, [not a table]");
        let e = error_of(&commented.replace("batch = [1, \"50%\"]", "batch = \"120%\""));
        assert!(e.starts_with("cutover.toml:21:9: strategy.batch:"), "{e}");
        let e = error_of(
            &commented.replace("admin = \"127.0.0.1:8081\"", "admin = \"127.0.0.1:8080\""),
        );
        assert!(e.starts_with("cutover.toml:16:1: balancer.admin:"), "{e}");
        let e = error_of(&commented.replace("\"127.0.0.11\"", "\"127.0.0.999\""));
        assert!(e.starts_with("cutover.toml:11:"), "{e}");
        assert!(
            e.contains(" hosts.address:") || e.contains(" hosts[0].address:"),
            "{e}"
        );
    }

    #[test]
    fn batch_zero_is_refused() {
        let e = error_of(&GOOD.replace("batch = [1, \"50%\"]", "batch = 0"));
        assert!(e.starts_with("cutover.toml:21:9: strategy.batch:"), "{e}");
        assert!(e.contains("at least 1"), "{e}");
    }

    #[test]
    fn bad_duration_and_signal_are_explained() {
        let e =
            error_of(&GOOD.replace("name = \"shop\"", "name = \"shop\"\nstop_timeout = \"ten\""));
        assert!(
            e.contains("app.stop_timeout") && e.contains("not a duration"),
            "{e}"
        );
        let e = error_of(&GOOD.replace(
            "name = \"shop\"",
            "name = \"shop\"\nstop_signal = \"KILLME\"",
        ));
        assert!(e.contains("app.stop_signal") && e.contains("TERM"), "{e}");
    }

    #[test]
    fn shell_in_names_is_refused() {
        let e = error_of(&GOOD.replace("name = \"web1\"", "name = \"web1;rm -rf /\""));
        assert!(
            e.contains("hosts.name") && e.contains("not a valid name"),
            "{e}"
        );
        assert!(Name::parse("v1;touch /tmp/x").is_err());
        assert!(Name::parse("$(id)").is_err());
        assert!(Name::parse("v1\n").is_err());
        assert!(Name::parse("../etc").is_err());
        assert!(Name::parse("v2.1.0-rc1+build5").is_ok());
    }

    #[test]
    fn duplicate_hosts_and_missing_token_are_refused() {
        let dup = GOOD.replace(
            "[balancer]",
            "[[hosts]]\nname = \"web1\"\naddress = \"127.0.0.12\"\nroot = \"x\"\n\n[balancer]",
        );
        assert!(error_of(&dup).contains("appears twice"));
        let no_token = GOOD.replace("token = \"0123456789abcdef\"\n", "");
        let e = error_of(&no_token);
        assert!(e.contains("balancer") && e.contains("token"), "{e}");
    }

    #[test]
    fn max_fail_percentage_is_bounded() {
        let e = error_of(&GOOD.replace("batch = [1, \"50%\"]", "max_fail_percentage = 150"));
        assert!(e.contains("strategy.max_fail_percentage"), "{e}");
    }

    #[test]
    fn judge_allowed_increase_is_a_bounded_fraction() {
        let judged = GOOD.replace(
            "kind = \"rolling\"\nbatch = [1, \"50%\"]",
            "kind = \"canary\"\nsteps = [{ weight = 50 }, { weight = 100 }]",
        ) + "\n[analysis]\nmin_success_rate = 99.0\n\n[analysis.judge]\n";
        let tolerance = |c: &Config| {
            c.analysis
                .as_ref()
                .unwrap()
                .judge
                .as_ref()
                .unwrap()
                .allowed_increase
        };
        assert_eq!(tolerance(&parse(&judged).unwrap()), 0.1);
        for ok in ["0", "0.0", "0.25", "0.99"] {
            let c = parse(&format!("{judged}allowed_increase = {ok}\n"));
            assert_eq!(tolerance(&c.unwrap()), ok.parse::<f64>().unwrap());
        }
        let line = judged.lines().count() + 1;
        for bad in ["-0.1", "-1", "nan", "inf", "-inf", "1", "5", "10", "1e300"] {
            let e = error_of(&format!("{judged}allowed_increase = {bad}\n"));
            assert!(
                e.starts_with(&format!(
                    "cutover.toml:{line}:1: analysis.judge.allowed_increase: allowed_increase = "
                )) && e.contains("(0.1 = 10%)")
                    && e.contains("write e.g. allowed_increase = 0.1"),
                "{bad}: {e}"
            );
        }
        let e = error_of(&format!("{judged}allowed_increase = \"10%\"\n"));
        assert!(
            e.contains("analysis.judge.allowed_increase") && e.contains("expected a number"),
            "{e}"
        );
        let e = error_of(&judged.replace("[analysis.judge]\n", "judge = 0.1\n"));
        assert!(e.contains("alpha and allowed_increase"), "{e}");
    }
}
