//! `cutover proxy`: the built-in load balancer (server side). The deployer drives it through the
//! admin API with [`crate::balancer::builtin::AdminClient`].
//!
//! Two listeners: client traffic (HTTP/1.1 and HTTP/2, cleartext or TLS) and the admin API
//! (axum, bearer token). One shared core, [`Proxy`], holds the backend table, the pooled client
//! to backends and the settings.
//!
//! Files, one concept each:
//! - `listener`: accepting client connections: TLS, connection limits, timeouts, draining;
//! - `tls`: the rustls server config from PEM files;
//! - `router`: the backend table, smooth weighted round robin, preview and sticky routing,
//!   in-flight accounting, counters;
//! - `forward`: forwarding a request, header rewriting, retries, streaming bodies, upgrades;
//! - `health`: active health checks;
//! - `admin`: the admin API (endpoints listed in [`crate::balancer::api`]);
//! - `metrics`: `/metrics` in Prometheus text format;
//! - `state`: routing state persisted to disk and restored at start;
//! - `takeover`: replacing a running proxy without dropping a request (listening sockets
//!   handed over through a Unix socket).
//!
//! Shutdown stops accepting, answers the next request of each busy HTTP/1.1 connection with
//! `Connection: close` (so clients never race a close), closes idle connections, lets in-flight
//! requests and long-lived connections (WebSocket, SSE) finish within `drain_timeout`, then
//! closes what is left and reports how many.

mod admin;
mod forward;
mod health;
mod listener;
mod metrics;
mod router;
mod samples;
mod state;
mod takeover;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use hyper::header::HeaderName;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use admin::admin_router;
pub(crate) use health::describe as error_reason;

use crate::balancer::api::{BackendSpec, BackendState, Health};
use forward::ForwardBody;
use router::{Added, BackendShared, Table};

/// Upper bound on how long shutdown waits for the admin API's open requests.
const ADMIN_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// After a drain deadline cut, how long shutdown lets the cut requests unwind.
const CUT_SETTLE: Duration = Duration::from_secs(1);

/// Everything `cutover proxy` needs, resolved from the config. The tuning beyond these
/// (TLS, limits, timeouts, stickiness, takeover) is in [`ProxyOptions`].
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Client traffic.
    pub listen: SocketAddr,
    /// Admin API.
    pub admin: SocketAddr,
    /// Bearer token for the admin API.
    pub token: String,
    /// Interval, timeout and thresholds of active checks (the path comes per backend).
    pub health: crate::config::HealthConfig,
    /// Default deadline of wait-drained when a caller gives none; also bounds shutdown.
    pub drain_timeout: Duration,
    /// Routing state is written here (JSON) on every change and restored at start.
    pub state_file: Option<PathBuf>,
}

impl ProxySettings {
    /// Settings from `cutover.toml`: `[balancer]`, `[app.health]`, `app.drain_timeout` and
    /// `state_dir/proxy-routes.json`.
    pub fn from_config(c: &crate::config::Config) -> anyhow::Result<Self> {
        Ok(ProxySettings {
            listen: c.balancer.listen,
            admin: c.admin_addr()?,
            token: c.admin_token()?,
            health: c.app.health.clone(),
            drain_timeout: *c.app.drain_timeout,
            state_file: Some(c.state_dir.join("proxy-routes.json")),
        })
    }
}

/// How clients are kept on one release during a canary (`[strategy] sticky`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// The response sets [`crate::balancer::api::STICKY_COOKIE`]; a request carrying it goes
    /// to a backend of that release while one is eligible.
    Cookie,
    /// A hash of this request header's value picks a release, in proportion to the releases'
    /// total weights; the same value keeps landing on the same release.
    Header(HeaderName),
}

impl Sticky {
    /// `"cookie"` or a header name.
    pub fn parse(s: &str) -> anyhow::Result<Sticky> {
        if s == "cookie" {
            return Ok(Sticky::Cookie);
        }
        HeaderName::from_bytes(s.as_bytes())
            .map(Sticky::Header)
            .map_err(|_| anyhow::anyhow!("sticky {s:?} is neither \"cookie\" nor a header name"))
    }
}

/// Certificate and key files (PEM) for TLS termination.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Limits on what clients may send and hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Client connections open at once; more get a 503 (cleartext) or are closed (TLS).
    pub max_connections: usize,
    /// Largest HTTP/1.1 request head (and HTTP/2 header list, as RFC 9113 §6.5.2 counts it)
    /// in bytes; larger gets 431. At least 8192.
    pub max_header_bytes: usize,
    /// Most header fields in a request (an HTTP/2 request's `Cookie` fields count as one);
    /// more gets 431.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
        }
    }
}

/// Client and backend timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Time to send a request head, counted from when the connection waits for one: from
    /// accept for a new connection's first head, TLS handshake included (for HTTP/1.1 this also
    /// bounds an idle keep-alive connection).
    pub client_header: Duration,
    /// A client connection with no bytes either way for this long is closed gracefully (and
    /// at once after a second such period).
    pub client_idle: Duration,
    /// Connecting to a backend; a backend that does not accept within this is failed over.
    pub backend_connect: Duration,
    /// A backend's response head, counted from when the request body was sent; after it the
    /// client gets 504 (never retried: the backend may still be working on the request).
    pub backend_header: Duration,
    /// A request body's next chunk waiting this long for the backend to take it (the backend
    /// stopped reading the upload): the client gets 504. A client slow to send its body is
    /// not timed by it: only time spent with a chunk in hand that the backend would not take.
    pub backend_send: Duration,
    /// Idle pooled backend connections are closed after this; kept below the 5 s keep-alive
    /// timeout common in app servers, so the proxy rarely reuses a connection being closed.
    pub backend_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            client_header: Duration::from_secs(30),
            client_idle: Duration::from_secs(75),
            backend_connect: Duration::from_secs(2),
            backend_header: Duration::from_secs(60),
            backend_send: Duration::from_secs(60),
            backend_idle: Duration::from_secs(4),
        }
    }
}

/// Tuning of a proxy beyond [`ProxySettings`]; `Default` is what a config without these keys
/// gets.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Terminate TLS on the traffic listener (HTTP/2 through ALPN).
    pub tls: Option<TlsFiles>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// Passive ejection after this many failed requests in a row (`None`: the health check's
    /// `unhealthy_threshold`; 0: never).
    pub eject_after: Option<u32>,
    /// 5xx answers count as failed requests for passive ejection.
    pub eject_on_5xx: bool,
    pub sticky: Option<Sticky>,
    /// Unix socket through which a replacement proxy takes the listeners over.
    pub control_socket: Option<PathBuf>,
    /// Take the listeners over from the proxy running on `control_socket` instead of binding.
    pub takeover: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            tls: None,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            eject_after: None,
            eject_on_5xx: true,
            sticky: None,
            control_socket: None,
            takeover: false,
        }
    }
}

impl ProxyOptions {
    /// Options from `cutover.toml`: `[balancer]` limits and timeouts, `[balancer.tls]` (paths
    /// relative to the config file), `[strategy] sticky`, and the control socket
    /// `state_dir/proxy.sock`.
    pub fn from_config(c: &crate::config::Config) -> anyhow::Result<Self> {
        let b = &c.balancer;
        let d = ProxyOptions::default();
        let (dl, dt) = (d.limits, d.timeouts);
        let dur = |v: Option<crate::config::Dur>, default: Duration| v.map_or(default, |d| *d);
        let max_header_bytes = b
            .max_header_bytes
            .map_or(dl.max_header_bytes, |v| v as usize);
        if max_header_bytes < 8192 {
            anyhow::bail!(
                "{}: balancer.max_header_bytes = {max_header_bytes} is too small: use at least 8192",
                c.file.display()
            );
        }
        Ok(ProxyOptions {
            // Resolved by the config parser (relative to the config file, `~/` expanded).
            tls: b.tls.as_ref().map(|t| TlsFiles {
                cert: t.cert.clone(),
                key: t.key.clone(),
            }),
            limits: Limits {
                max_connections: b
                    .max_connections
                    .map_or(dl.max_connections, |v| v.max(1) as usize),
                max_header_bytes,
                max_headers: b.max_headers.map_or(dl.max_headers, |v| v.max(1) as usize),
            },
            timeouts: Timeouts {
                client_header: dur(b.client_header_timeout, dt.client_header),
                client_idle: dur(b.client_idle_timeout, dt.client_idle),
                backend_connect: dur(b.backend_connect_timeout, dt.backend_connect),
                backend_header: dur(b.backend_header_timeout, dt.backend_header),
                backend_send: dur(b.backend_send_timeout, dt.backend_send),
                backend_idle: dur(b.backend_idle_timeout, dt.backend_idle),
            },
            eject_after: b.eject_after,
            eject_on_5xx: b.eject_on_5xx.unwrap_or(true),
            sticky: c
                .strategy
                .sticky
                .as_deref()
                .map(Sticky::parse)
                .transpose()
                .with_context(|| format!("{}: strategy.sticky", c.file.display()))?,
            control_socket: Some(c.state_dir.join("proxy.sock")),
            takeover: false,
        })
    }
}

/// The shared core of a running proxy.
pub struct Proxy {
    settings: ProxySettings,
    options: ProxyOptions,
    table: Mutex<Table>,
    client: Client<HttpConnector, ForwardBody>,
    /// The `x-cutover-preview` value that opens the preview route, derived from the admin
    /// token once (see [`crate::balancer::api::preview_value`]).
    preview_value: String,
    /// Notified whenever a backend's health changes (wakes wait-healthy).
    health_changed: Notify,
    /// Requests answered by the proxy itself (502/503/504), and connections refused over
    /// `max_connections` (see `listener`).
    unrouted: AtomicU64,
    /// Passive ejections, all backends.
    ejections: AtomicU64,
    /// Requests whose client broke the request body off while it was being forwarded (or
    /// went away before sending it whole): no backend's failure, so neither in
    /// `proxy_errors` nor in passive health. A client that goes away after its request was
    /// sent whole, while the backend keeps it waiting, is the backend's failure instead: it
    /// counts as `abandoned` in the backend's counters.
    client_aborted: AtomicU64,
    /// Requests and long-lived connections closed at a drain deadline, all backends.
    closed_at_deadline: AtomicU64,
    /// Takeovers whose replaced proxy died before it reported what it counted while draining
    /// (see [`crate::balancer::api::Stats::lost_drains`]).
    lost_drains: AtomicU64,
    /// Client connections open now.
    connections: AtomicU64,
    /// Shutting down: HTTP/1.1 responses carry `Connection: close`.
    draining: AtomicBool,
    /// Changes made to the routing table so far (see [`Proxy::persist`]).
    changes: AtomicU64,
    /// When counting began (unix ms): `/stats` says so, so a deployer can tell a restart
    /// (counters from zero) from quiet. A takeover keeps the replaced proxy's (see
    /// [`takeover::Carried`]).
    started_ms: AtomicU64,
    /// Backends the proxy this one took over still had requests in flight on, until that
    /// proxy's drain ends: a drain here waits for them too (see [`Proxy::wait_predecessor`]).
    predecessor_busy: watch::Sender<std::collections::BTreeSet<String>>,
    /// Serializes state file writes so the last write holds the latest state; holds the
    /// number of changes the file holds.
    persisted: tokio::sync::Mutex<u64>,
    /// Admin changes hold this for reading while they change the table and persist it; a
    /// takeover takes it for writing and sets it (see [`Proxy::freeze`]): from then on the
    /// table is what the state file says, and admin changes are refused.
    frozen: tokio::sync::RwLock<bool>,
}

impl Proxy {
    /// A proxy core with no backends and no listeners: [`start`] builds one and serves it;
    /// tests and embedders can serve [`admin_router`] over it themselves.
    pub fn new(settings: ProxySettings) -> Arc<Proxy> {
        Proxy::with_options(settings, ProxyOptions::default())
    }

    /// [`Proxy::new`] with options.
    pub fn with_options(settings: ProxySettings, options: ProxyOptions) -> Arc<Proxy> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(options.timeouts.backend_connect));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(options.timeouts.backend_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let mut table = Table::default();
        table.sticky_cookie = options.sticky == Some(Sticky::Cookie);
        let preview_value = crate::balancer::api::preview_value(&settings.token);
        Arc::new(Proxy {
            settings,
            options,
            table: Mutex::new(table),
            client,
            preview_value,
            health_changed: Notify::new(),
            unrouted: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            client_aborted: AtomicU64::new(0),
            closed_at_deadline: AtomicU64::new(0),
            lost_drains: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            changes: AtomicU64::new(0),
            started_ms: AtomicU64::new(crate::journal::now_ms()),
            predecessor_busy: watch::Sender::new(Default::default()),
            persisted: tokio::sync::Mutex::new(0),
            frozen: tokio::sync::RwLock::new(false),
        })
    }

    /// Whether a request's `x-cutover-preview` value is the deployer's secret (compared in
    /// constant time, like the admin token it is derived from).
    fn is_preview_value(&self, value: &[u8]) -> bool {
        admin::constant_time_eq(value, self.preview_value.as_bytes())
    }

    /// The backend table. A poisoned lock is recovered: the table stays consistent because no
    /// code path panics half-way through a change.
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a backend to the table and starts its health checks.
    fn insert(self: &Arc<Self>, spec: BackendSpec, state: BackendState) -> Added {
        let path = spec.health_path.clone();
        let (id, gated) = (spec.id.clone(), spec.gated);
        let added = {
            let mut table = self.table();
            let added = table.add(spec, state);
            // Before its checker starts, so the first check already counts as enough.
            if gated && matches!(added, Added::Created(_)) {
                if let Some(e) = table.get_mut(&id) {
                    e.health.fast_admit();
                }
            }
            added
        };
        if let Added::Created(shared) = &added {
            health::spawn(self, shared.clone(), &path);
        }
        added
    }

    /// Passive health: after `eject_after` failed requests in a row (connection errors, and
    /// 5xx with `eject_on_5xx`) a healthy backend is taken out until its next passing active
    /// check, unless that would leave its pool without an eligible backend or with more than
    /// half of it ejected (see [`Table::may_eject`]).
    fn passive_failure(&self, backend: &BackendShared, failures: u64, reason: &str) {
        let threshold = self
            .options
            .eject_after
            .unwrap_or(self.settings.health.unhealthy_threshold.0);
        if threshold == 0 || failures < u64::from(threshold) {
            return;
        }
        let ejected = {
            let mut table = self.table();
            if !table.may_eject(backend.uid) {
                debug!(backend = %backend.id, "{failures} requests failed in a row ({reason}), not ejected: too few backends would be left");
                return;
            }
            match table.by_uid_mut(backend.uid) {
                Some(e) => e
                    .health
                    .eject(format!("{failures} requests failed in a row: {reason}")),
                None => false,
            }
        };
        if ejected {
            backend.consecutive_errors.store(0, Ordering::Relaxed);
            backend.ejections.fetch_add(1, Ordering::Relaxed);
            self.ejections.fetch_add(1, Ordering::Relaxed);
            warn!(backend = %backend.id, "ejected after {failures} failed requests in a row: {reason}");
            self.health_changed.notify_waiters();
        }
    }

    /// Writes the routing state to the state file, if there is one; called after a change to
    /// the table. Writes are grouped: callers that queue behind a write wait for the next one,
    /// which covers all their changes, so 16 backends retired at once cost two writes, not 16
    /// in a row (each the whole table).
    async fn persist(&self) -> anyhow::Result<()> {
        let Some(path) = self.settings.state_file.clone() else {
            return Ok(());
        };
        // This caller's change is in the table already, so any snapshot taken after this count
        // holds it.
        let change = self.changes.fetch_add(1, Ordering::SeqCst) + 1;
        let mut persisted = self.persisted.lock().await;
        if *persisted >= change {
            return Ok(());
        }
        let through = self.changes.load(Ordering::SeqCst);
        let routes = self
            .table()
            .routes()
            .into_iter()
            .map(|(spec, state)| state::Route { spec, state })
            .collect();
        tokio::task::spawn_blocking(move || state::save(&path, routes))
            .await
            .context("the state writer stopped")??;
        *persisted = through;
        Ok(())
    }

    /// Before handing the listeners to a replacement: waits for the admin changes under way
    /// (they are persisted when they return), refuses any later one and persists the table.
    /// The replacement restores the state file after receiving the listeners and before
    /// routing, so both proxies route by the same table from the first request on.
    async fn freeze(&self) -> anyhow::Result<()> {
        let mut frozen = self.frozen.write().await;
        *frozen = true;
        if let Err(e) = self.persist().await {
            *frozen = false;
            return Err(e);
        }
        Ok(())
    }

    /// The replacement went away before taking over: admin changes are accepted again.
    async fn unfreeze(&self) {
        *self.frozen.write().await = false;
    }

    /// Reads the state file and makes the table match it: backends are added (health
    /// `Unknown`, checked at once, admitted on their first passing check since they served
    /// before), updated (state, weight) or removed.
    fn restore(self: &Arc<Self>) -> anyhow::Result<()> {
        let Some(path) = &self.settings.state_file else {
            return Ok(());
        };
        let routes = state::load(path)?;
        if !routes.is_empty() {
            info!(backends = routes.len(), file = %path.display(), "restored routing state");
        }
        let keep: Vec<String> = routes.iter().map(|r| r.spec.id.clone()).collect();
        for r in routes {
            let id = r.spec.id.clone();
            let weight = r.spec.weight;
            if let Added::Conflict(_) = self.insert(r.spec.clone(), r.state) {
                self.table().remove(&id);
                self.insert(r.spec, r.state);
            }
            let mut table = self.table();
            table.set_weight(&id, weight);
            table.set_state(&id, r.state);
            if let Some(e) = table.get_mut(&id) {
                e.health.fast_admit();
            }
        }
        let mut table = self.table();
        let gone: Vec<String> = table
            .entries()
            .map(|e| e.spec.id.clone())
            .filter(|id| !keep.contains(id))
            .collect();
        for id in gone {
            table.remove(&id);
        }
        Ok(())
    }

    /// When the counters of `/stats` began (unix ms).
    pub(crate) fn counting_since_ms(&self) -> u64 {
        self.started_ms.load(Ordering::Relaxed)
    }

    /// Everything this proxy counted, for its successor at a takeover.
    fn carried(&self) -> takeover::Carried {
        let table = self.table();
        takeover::Carried {
            started_ms: self.counting_since_ms(),
            backends: table.backend_counters(),
            releases: table.release_counters(),
            retired: table.retired_counters(),
            unrouted: self.unrouted.load(Ordering::Relaxed),
            ejections: self.ejections.load(Ordering::Relaxed),
            closed_at_deadline: self.closed_at_deadline.load(Ordering::Relaxed),
            lost_drains: self.lost_drains.load(Ordering::Relaxed),
            // Its table is frozen (see `freeze`), but connections it already holds may still
            // bring requests until its drain ends: every backend it can route to is busy for
            // the successor, not only those with a request in flight now.
            busy: table
                .entries()
                .filter(|e| {
                    e.shared.in_flight.load(Ordering::Acquire) > 0
                        || matches!(e.state, BackendState::Active | BackendState::Preview)
                })
                .map(|e| e.spec.id.clone())
                .collect(),
        }
    }

    /// Waits until the proxy this one took over has finished with backend `id` (its drain
    /// ended), or the deadline: false then. Without this, a deployer retiring a backend
    /// right after a takeover would see it idle here and stop its instance while the old
    /// proxy still finishes requests on it, or still sends it new ones on the client
    /// connections it keeps until its drain ends.
    pub(crate) async fn wait_predecessor(&self, id: &str, deadline: Instant) -> bool {
        let mut busy = self.predecessor_busy.subscribe();
        tokio::time::timeout_at(deadline, busy.wait_for(|b| !b.contains(id)))
            .await
            .is_ok()
    }

    /// Adds a replaced proxy's counts to this one's.
    fn carry_in(&self, c: &takeover::Carried) {
        self.table()
            .add_counts(&c.backends, &c.releases, &c.retired);
        self.unrouted.fetch_add(c.unrouted, Ordering::Relaxed);
        self.ejections.fetch_add(c.ejections, Ordering::Relaxed);
        self.closed_at_deadline
            .fetch_add(c.closed_at_deadline, Ordering::Relaxed);
        self.lost_drains.fetch_add(c.lost_drains, Ordering::Relaxed);
    }

    /// Waits (at most one health check timeout, plus a little) until every backend has a
    /// health result, so a restarted proxy routes at once instead of answering 503.
    async fn wait_checked(&self) {
        let deadline = Instant::now() + *self.settings.health.timeout + Duration::from_millis(500);
        loop {
            let changed = self.health_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let unknown = self
                .table()
                .entries()
                .any(|e| e.health.health == Health::Unknown && e.state != BackendState::Down);
            if !unknown || tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }

    /// Waits until no backend has a request or long-lived connection in flight, or the
    /// deadline; then closes what is still open and returns how many were closed.
    async fn drain_all(&self, deadline: Instant) -> u64 {
        let backends: Vec<Arc<BackendShared>> =
            self.table().entries().map(|e| e.shared.clone()).collect();
        for b in &backends {
            admin::wait_idle(b, deadline).await;
        }
        let mut closed = 0;
        for b in &backends {
            let open = b.in_flight.load(Ordering::Acquire);
            if open > 0 {
                closed += open;
                b.cut_in_flight();
            }
        }
        if closed > 0 {
            self.closed_at_deadline.fetch_add(closed, Ordering::Relaxed);
            warn!(
                closed,
                "drain deadline reached at shutdown: closed requests and long-lived connections still open"
            );
            let settle = Instant::now() + CUT_SETTLE;
            for b in &backends {
                admin::wait_idle(b, settle).await;
            }
        }
        closed
    }
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Requests and long-lived connections (WebSocket, SSE) still open at the drain deadline,
    /// closed by the proxy.
    pub closed_at_deadline: u64,
}

/// A running proxy. Dropping it signals shutdown without waiting; call
/// [`ProxyHandle::shutdown`] to wait.
pub struct ProxyHandle {
    /// The real traffic address (useful when the settings said port 0).
    pub listen: SocketAddr,
    /// The real admin API address.
    pub admin: SocketAddr,
    stop: Arc<watch::Sender<bool>>,
    tasks: Vec<JoinHandle<()>>,
    proxy: Arc<Proxy>,
    /// A successor's end of the takeover exchange, once the admin API is released: it gets
    /// the drain's counts.
    released: takeover::ReleaseSlot,
}

impl ProxyHandle {
    /// Stops accepting, lets in-flight requests and long-lived connections finish (at most
    /// `drain_timeout`, then closes them), stops the health checks and returns what it closed.
    pub async fn shutdown(mut self) -> ShutdownReport {
        let _ = self.stop.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        self.proxy.table().stop_checkers();
        let successor = self
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(session) = successor {
            session.drained(self.proxy.carried()).await;
        }
        let closed_at_deadline = self.proxy.closed_at_deadline.load(Ordering::Relaxed);
        info!(closed_at_deadline, "proxy stopped");
        ShutdownReport { closed_at_deadline }
    }

    /// Resolves once the proxy stops accepting on its own: a replacement took it over
    /// (`cutover proxy --takeover`). Then call [`ProxyHandle::shutdown`] to drain and stop.
    pub async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// The proxy core (counters, table), for embedders and tests.
    pub fn core(&self) -> &Arc<Proxy> {
        &self.proxy
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Binds both listeners (port 0 allowed), restores the state file, starts serving and returns.
pub async fn start(settings: ProxySettings) -> anyhow::Result<ProxyHandle> {
    start_with(settings, ProxyOptions::default()).await
}

/// [`start`] with options. With `options.takeover`, the listeners are taken over from the
/// proxy running on `options.control_socket` (see the `takeover` module): that proxy stops
/// accepting, drains and stops; no client connection is refused or dropped in between.
pub async fn start_with(
    settings: ProxySettings,
    options: ProxyOptions,
) -> anyhow::Result<ProxyHandle> {
    let tls = match &options.tls {
        Some(files) => Some(tls::acceptor(files)?),
        None => None,
    };
    let control = options.control_socket.clone();
    let takeover = options.takeover;
    if takeover && control.is_none() {
        anyhow::bail!("takeover needs a control socket (the state directory's proxy.sock)");
    }
    if !takeover {
        if let Some(path) = &control {
            takeover::ensure_free(path)?;
        }
    }
    let proxy = Proxy::with_options(settings, options);
    proxy.restore()?;
    proxy.wait_checked().await;
    let (stop, stop_rx) = watch::channel(false);
    let stop = Arc::new(stop);
    let released: takeover::ReleaseSlot = Arc::new(Mutex::new(None));

    let (traffic, admin, handover) = if takeover {
        let path = control.as_deref().expect("checked above");
        let got = takeover::request(path).await?;
        // The old proxy froze and persisted its table before handing the listeners over:
        // route by that table from the first request (admin changes made since the first
        // restore are in it).
        proxy.restore()?;
        proxy.wait_checked().await;
        (got.traffic, got.admin, Some(got.session))
    } else {
        (
            bind_traffic(proxy.settings.listen)?,
            bind_admin(proxy.settings.admin)?,
            None,
        )
    };
    let listen = traffic.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let handed = takeover::Listeners::dup(&traffic, &admin)?;

    let traffic_task = tokio::spawn(listener::accept_loop(
        traffic,
        tls,
        proxy.clone(),
        stop_rx.clone(),
    ));
    if let Some(session) = handover {
        // The old proxy stops accepting now. Its table was frozen before the hand-over; an
        // old proxy of an earlier release without the freeze has its last admin changes on
        // disk once it says it released the admin API, so restore again.
        let from_old = session.finish().await;
        proxy.restore()?;
        if let Some(from_old) = from_old {
            proxy.carry_in(&from_old.counts);
            proxy
                .started_ms
                .store(from_old.counts.started_ms, Ordering::Relaxed);
            proxy
                .predecessor_busy
                .send_replace(from_old.counts.busy.clone());
            let core = proxy.clone();
            let drain_timeout = proxy.settings.drain_timeout;
            tokio::spawn(async move {
                match from_old.drained.wait(drain_timeout).await {
                    Some(c) => core.carry_in(&c),
                    // What the old proxy finished (or cut) while it drained is not known. The
                    // counts it handed over are still right, and so is their start: keep it
                    // (a new start would make a deployer drop its baseline and report this
                    // proxy's whole history as its own), and say that some are missing.
                    None => {
                        core.lost_drains.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Finished or gone: nothing of the old proxy's is in flight any more.
                core.predecessor_busy.send_replace(Default::default());
            });
        }
    }
    let admin_task = tokio::spawn(serve_admin(
        admin,
        proxy.clone(),
        stop_rx.clone(),
        released.clone(),
    ));
    let mut tasks = vec![traffic_task, admin_task];
    if let Some(path) = control {
        let control = takeover::bind(&path)?;
        tasks.push(tokio::spawn(takeover::serve(
            control,
            handed,
            proxy.clone(),
            stop.clone(),
            stop_rx,
            released.clone(),
        )));
    }
    info!(%listen, admin = %admin_addr, takeover, "proxy listening");
    Ok(ProxyHandle {
        listen,
        admin: admin_addr,
        stop,
        tasks,
        proxy,
        released,
    })
}

/// Serves the admin API until stop; then tells a replacement proxy waiting on the handover
/// that the admin API is released (its last changes are persisted).
async fn serve_admin(
    admin: TcpListener,
    proxy: Arc<Proxy>,
    mut stop: watch::Receiver<bool>,
    released: takeover::ReleaseSlot,
) {
    let router = admin_router(proxy.clone());
    let mut signal = stop.clone();
    let server = axum::serve(admin, router).with_graceful_shutdown(async move {
        let _ = signal.wait_for(|s| *s).await;
    });
    let server = tokio::spawn(server.into_future());
    let abort = server.abort_handle();
    let _ = stop.wait_for(|s| *s).await;
    // Long-polling admin calls (wait-drained) get a short grace, then are cut.
    if tokio::time::timeout(ADMIN_SHUTDOWN_GRACE, server)
        .await
        .is_err()
    {
        abort.abort();
    }
    // The admin API is done: hand the successor the counters so far, and keep the exchange
    // for the drain's counts (see `ProxyHandle::shutdown`).
    let mut slot = released.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(session) = &mut slot {
        session.released(proxy.carried()).await;
    }
    *released.lock().unwrap_or_else(|p| p.into_inner()) = slot;
}

/// Runs the proxy until `shutdown` completes or a replacement takes over, then shuts down
/// gracefully (`cutover proxy`).
pub async fn serve(
    settings: ProxySettings,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    serve_with(settings, ProxyOptions::default(), shutdown).await
}

/// [`serve`] with options.
pub async fn serve_with(
    settings: ProxySettings,
    options: ProxyOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let handle = start_with(settings, options).await?;
    tokio::select! {
        _ = shutdown => info!("shutting down: finishing in-flight requests"),
        _ = handle.stopped() => info!("taken over by a new proxy: finishing in-flight requests"),
    }
    handle.shutdown().await;
    Ok(())
}

fn bind_traffic(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // No SO_REUSEPORT: a replacement takes the listening socket over (see `takeover`),
        // and with it a second proxy (another state_dir) would silently share the port, the
        // kernel splitting clients between two routing tables.
        socket.set_reuseaddr(true)?;
        socket.set_nodelay(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    bind().with_context(|| {
        format!(
            "cannot listen for traffic on {addr} (balancer.listen): another program uses it, or another `cutover proxy` does (replace a running proxy with `cutover proxy --takeover`)"
        )
    })
}

fn bind_admin(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(128)
    };
    bind().with_context(|| {
        format!(
            "cannot listen for the admin API on {addr} (balancer.admin): is another `cutover proxy` running? replace it with `cutover proxy --takeover`"
        )
    })
}
