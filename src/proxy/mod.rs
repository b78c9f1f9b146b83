//! `cutover proxy`: the built-in load balancer (server side). The deployer drives it through the
//! admin API with [`crate::balancer::builtin::AdminClient`].
//!
//! Two listeners: client traffic (HTTP/1.1 and h2c through hyper-util's `auto` server) and the
//! admin API (axum, bearer token). One shared core, [`Proxy`], holds the backend table, the
//! pooled client to backends and the settings.
//!
//! Files, one concept each:
//! - `router`: the backend table, smooth weighted round robin, in-flight accounting, counters;
//! - `forward`: forwarding a request, header rewriting, retries, streaming bodies, upgrades;
//! - `health`: active health checks;
//! - `admin`: the admin API (endpoints listed in [`crate::balancer::api`]);
//! - `state`: routing state persisted to disk and restored at start.
//!
//! The traffic socket is bound with `SO_REUSEADDR` and `SO_REUSEPORT`, so a replacement proxy
//! can bind the same address while the old one finishes its connections: a restart drops no
//! connection. Shutdown stops accepting, lets in-flight requests finish (bounded by
//! `drain_timeout`), then returns.

mod admin;
mod forward;
mod health;
mod router;
mod state;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Notify, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

pub use admin::admin_router;
pub(crate) use health::describe as error_reason;

use crate::balancer::api::{BackendSpec, BackendState, Health};
use forward::{ForwardBody, Peer};
use router::{Added, BackendShared, Table};

/// Connect timeout to backends: a backend that does not accept within this is failed over.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle pooled connections are closed after this; kept below the 5 s keep-alive timeout common
/// in app servers (Node.js), so the proxy rarely reuses a connection the backend is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Upper bound on how long shutdown waits for the admin API's open requests.
const ADMIN_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Everything `cutover proxy` needs, resolved from the config.
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

/// The shared core of a running proxy.
pub struct Proxy {
    settings: ProxySettings,
    table: Mutex<Table>,
    client: Client<HttpConnector, ForwardBody>,
    /// Notified whenever a backend's health changes (wakes wait-healthy).
    health_changed: Notify,
    /// Requests answered by the proxy itself (502/503).
    unrouted: AtomicU64,
    /// Serializes state file writes so the last write holds the latest state.
    persist_lock: tokio::sync::Mutex<()>,
}

impl Proxy {
    /// A proxy core with no backends and no listeners: [`start`] builds one and serves it;
    /// tests and embedders can serve [`admin_router`] over it themselves.
    pub fn new(settings: ProxySettings) -> Arc<Proxy> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Arc::new(Proxy {
            settings,
            table: Mutex::new(Table::default()),
            client,
            health_changed: Notify::new(),
            unrouted: AtomicU64::new(0),
            persist_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The backend table. A poisoned lock is recovered: the table stays consistent because no
    /// code path panics half-way through a change.
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a backend to the table and starts its health checks.
    fn insert(self: &Arc<Self>, spec: BackendSpec, state: BackendState) -> Added {
        let path = spec.health_path.clone();
        let added = self.table().add(spec, state);
        if let Added::Created(shared) = &added {
            health::spawn(self, shared.clone(), &path);
        }
        added
    }

    /// Passive health: after `unhealthy_threshold` connection failures in a row a healthy
    /// backend is taken out until the active check admits it again.
    fn passive_failure(&self, backend: &BackendShared, failures: u64, reason: &str) {
        if failures < u64::from(self.settings.health.unhealthy_threshold.0) {
            return;
        }
        let ejected = {
            let mut table = self.table();
            match table.by_uid_mut(backend.uid) {
                Some(e) if e.health.health == Health::Healthy => e
                    .health
                    .eject(format!("{failures} requests failed in a row: {reason}")),
                _ => false,
            }
        };
        if ejected {
            backend.consecutive_errors.store(0, Ordering::Relaxed);
            warn!(backend = %backend.id, "ejected after {failures} failed requests in a row: {reason}");
            self.health_changed.notify_waiters();
        }
    }

    /// Writes the routing state to the state file, if there is one.
    async fn persist(&self) -> anyhow::Result<()> {
        let Some(path) = self.settings.state_file.clone() else {
            return Ok(());
        };
        let _serial = self.persist_lock.lock().await;
        let routes = self
            .table()
            .routes()
            .into_iter()
            .map(|(spec, state)| state::Route { spec, state })
            .collect();
        tokio::task::spawn_blocking(move || state::save(&path, routes))
            .await
            .context("the state writer stopped")?
    }

    /// Reads the state file and adds its backends (health `Unknown`, checked at once).
    fn restore(self: &Arc<Self>) -> anyhow::Result<()> {
        let Some(path) = &self.settings.state_file else {
            return Ok(());
        };
        let routes = state::load(path)?;
        if !routes.is_empty() {
            info!(backends = routes.len(), file = %path.display(), "restored routing state");
        }
        for r in routes {
            self.insert(r.spec, r.state);
        }
        Ok(())
    }
}

/// A running proxy. Dropping it signals shutdown without waiting; call
/// [`ProxyHandle::shutdown`] to wait.
pub struct ProxyHandle {
    /// The real traffic address (useful when the settings said port 0).
    pub listen: SocketAddr,
    /// The real admin API address.
    pub admin: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    proxy: Arc<Proxy>,
}

impl ProxyHandle {
    /// Stops accepting, lets in-flight requests finish (at most `drain_timeout`), stops the
    /// health checks and returns.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        self.proxy.table().stop_checkers();
        info!("proxy stopped");
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Binds both listeners (port 0 allowed), restores the state file, starts serving and returns.
pub async fn start(settings: ProxySettings) -> anyhow::Result<ProxyHandle> {
    let traffic = bind_traffic(settings.listen)?;
    let admin = bind_admin(settings.admin)?;
    let listen = traffic.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let drain_timeout = settings.drain_timeout;
    let proxy = Proxy::new(settings);
    proxy.restore()?;
    let (stop, stop_rx) = watch::channel(false);

    let traffic_task = tokio::spawn(accept_loop(
        traffic,
        proxy.clone(),
        stop_rx.clone(),
        drain_timeout,
    ));
    let router = admin_router(proxy.clone());
    let mut admin_stop = stop_rx;
    let admin_task = tokio::spawn(async move {
        let mut signal = admin_stop.clone();
        let server = axum::serve(admin, router).with_graceful_shutdown(async move {
            let _ = signal.wait_for(|s| *s).await;
        });
        let server = tokio::spawn(server.into_future());
        let abort = server.abort_handle();
        let _ = admin_stop.wait_for(|s| *s).await;
        // Long-polling admin calls (wait-drained) get a short grace, then are cut.
        if tokio::time::timeout(ADMIN_SHUTDOWN_GRACE, server)
            .await
            .is_err()
        {
            abort.abort();
        }
    });
    info!(%listen, admin = %admin_addr, "proxy listening");
    Ok(ProxyHandle {
        listen,
        admin: admin_addr,
        stop,
        tasks: vec![traffic_task, admin_task],
        proxy,
    })
}

/// Runs the proxy until `shutdown` completes, then shuts down gracefully (`cutover proxy`).
pub async fn serve(
    settings: ProxySettings,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let handle = start(settings).await?;
    shutdown.await;
    info!("shutting down: finishing in-flight requests");
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
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.set_nodelay(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    bind().with_context(|| {
        format!(
            "cannot listen for traffic on {addr} (balancer.listen): is another program using it?"
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
            "cannot listen for the admin API on {addr} (balancer.admin): is another `cutover proxy` running?"
        )
    })
}

/// Accepts client connections until `stop`, then waits (at most `grace`) for open
/// connections to finish their requests.
async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer_addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let peer = Peer::new(peer_addr);
                let p = proxy.clone();
                let service = service_fn(move |req| {
                    let p = p.clone();
                    let peer = peer.clone();
                    async move { Ok::<_, Infallible>(forward::handle(&p, req, &peer).await) }
                });
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                conns.spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(client = %peer_addr, "connection ended: {e}");
                    }
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            open = conns.len(),
            "connections still open after {grace:?}: closing them"
        );
    }
    conns.shutdown().await;
}
