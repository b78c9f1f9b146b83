//! `cutover serve`: push-button deployment for a team. One process holds a queue of deploys
//! and runs them one at a time, serves a JSON API and a dashboard, and turns GitHub pushes to
//! the configured branch into deploys.
//!
//! Why one process with a queue, rather than a deploy per request: the fleet can only move to
//! one release at a time, and the journal lock would make concurrent requests fail anyway. The
//! queue makes the order visible and lets a newer push replace an older one still waiting.
//!
//! The pieces:
//! - [`app`] builds the router from a [`ServeState`] (no socket), so tests call it directly;
//!   [`start`] binds and spawns the runner and the sampler;
//! - [`queue`]: the jobs; the runner takes the deploy lock per job, like `cutover deploy`, so a
//!   deploy from a terminal and one from `serve` never overlap;
//! - [`sampler`]: the balancer's counters over time, for the live chart and the deploy report;
//!   when they start again (an HAProxy reload or restart), [`readmitter`] queues a `readmit`
//!   job for the hosts whose servers the balancer lost;
//! - [`api`]: JSON endpoints behind a bearer token; [`github`]: the signed webhook;
//!   [`dashboard`]: the page, its script and style, embedded in the binary.
//!
//! Controls of a running deployment (promote, abort, pause, resume, rollback) are posted to the
//! journal as commands, exactly what `cutover promote` in another terminal does; the deployer
//! reads them between steps.

pub mod api;
pub mod dashboard;
pub mod github;
pub mod queue;
pub mod sampler;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use tokio::sync::watch;

use crate::balancer::Balancer;
use crate::config::{Config, ConfigError, KeyError, Name, read_serve_secret};
use crate::deploy::{Report, Request};
use crate::journal::{Journal, LockHolder};
use crate::progress::Progress;
use crate::report;
use crate::transport::Transport;

use queue::{Job, JobState, Queue, Work};

/// `[serve]` resolved: secrets read from their files.
#[derive(Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub token: String,
    pub github: Option<GithubSettings>,
}

#[derive(Clone)]
pub struct GithubSettings {
    pub secret: Vec<u8>,
    pub branch: String,
    /// `owner/name` (lower case) whose pushes deploy: `serve.github.repository`, or taken from
    /// a github.com `release.git`. `None`: any repository that has the secret.
    pub repository: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field(
                "github",
                &self.github.as_ref().map(|g| (&g.branch, &g.repository)),
            )
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// `[serve]` of a loaded config, its token and secret files read. The checks that need no
    /// file are the ones the config's load records in [`Config::serve_error`] (shared, not
    /// copied), made here again since serve refuses what other commands only noted.
    pub fn from_config(config: &Config) -> anyhow::Result<Settings> {
        let file = config.file.as_path();
        let err = |(key, message): KeyError| ConfigError::at_key(file, &key, message);
        let serve = config.serve.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no [serve] section: add one with listen = \"127.0.0.1:8480\" and token_file = \"serve.token\" (see docs/serve.md)",
                file.display()
            )
        })?;
        let token =
            read_serve_secret(&serve.token, &serve.token_file, "serve.token").map_err(err)?;
        let github = match &serve.github {
            None => None,
            Some(g) => {
                let secret = read_serve_secret(&g.secret, &g.secret_file, "serve.github.secret")
                    .map_err(err)?;
                let repository = match g.check().map_err(err)? {
                    Some(r) => Some(r),
                    None => config
                        .release
                        .git
                        .as_deref()
                        .and_then(github::repository_of_url),
                };
                Some(GithubSettings {
                    secret: secret.into_bytes(),
                    branch: g.branch.clone(),
                    repository,
                })
            }
        };
        Ok(Settings {
            listen: serve.listen,
            token,
            github,
        })
    }
}

/// Everything the handlers and the runner share.
pub struct Inner {
    pub config: Arc<Config>,
    pub settings: Settings,
    pub journal: Arc<Journal>,
    pub transport: Arc<dyn Transport>,
    pub balancer: Arc<dyn Balancer>,
    pub queue: Queue,
    pub live: Arc<sampler::Live>,
    /// Progress lines of the running job (newest last, bounded).
    pub log: Mutex<std::collections::VecDeque<String>>,
    /// Held while a push is checked against the ones accepted before (in the journal) and
    /// queued, so two deliveries of one push cannot both pass.
    pub pushes: Mutex<()>,
    /// Webhook bodies being read right now (see `api::read_webhook_body`).
    pub webhook_bodies: tokio::sync::Semaphore,
    /// The deploy lock on the fleet as last read (see [`fleet_lock_watch`]): `/api/status`'s
    /// `fleet_lock`, `fleet_lock_others` and `fleet_lock_read_ms`.
    pub fleet_lock: Mutex<serde_json::Value>,
}

/// The server's shared state (cheap to clone).
#[derive(Clone)]
pub struct ServeState(pub Arc<Inner>);

impl std::ops::Deref for ServeState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Progress lines kept for the dashboard.
const LOG_KEPT: usize = 200;

impl ServeState {
    /// Opens the journal and connects to the fleet's transport and balancer. Starts nothing.
    pub fn new(config: Config) -> anyhow::Result<ServeState> {
        let settings = Settings::from_config(&config)?;
        let journal = Arc::new(Journal::open(&config.state_dir)?);
        let (transport, balancer) = crate::cli::connect(&config)?;
        let (queue, unreadable) = Queue::kept_in(journal.clone(), config.app.name.as_str())?;
        let state = ServeState(Arc::new(Inner {
            config: Arc::new(config),
            settings,
            journal,
            transport,
            live: Arc::new(sampler::Live::new(balancer.clone())),
            balancer,
            queue,
            log: Mutex::new(Default::default()),
            pushes: Mutex::new(()),
            webhook_bodies: tokio::sync::Semaphore::new(api::WEBHOOK_BODIES),
            fleet_lock: Mutex::new(serde_json::Value::Null),
        }));
        for line in unreadable {
            state.say(&line);
        }
        Ok(state)
    }

    fn say(&self, line: &str) {
        tracing::info!("{line}");
        self.log_line(line);
    }

    /// Adds a line to the log the dashboard shows (`/api/status`), without tracing it.
    fn log_line(&self, line: &str) {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.push_back(line.to_string());
        while log.len() > LOG_KEPT {
            log.pop_front();
        }
    }
}

/// Time a client has to send a request's headers; past it the connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The whole HTTP surface: dashboard, JSON API, webhook.
pub fn app(state: ServeState) -> Router {
    Router::new()
        .merge(dashboard::routes())
        // The webhook reads its body itself (see `api::read_webhook_body`): bounded in size,
        // time and in how many are read at once, before anything is authenticated.
        .route(
            "/hooks/github",
            axum::routing::post(api::github_hook).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .nest("/api", api::routes(state.clone()))
        .with_state(state)
        .layer(axum::middleware::from_fn(json_errors))
}

/// The router's own answers (a wrong method, an unknown path outside `/api`, a body over the
/// 2 MB limit) come with an empty or plain-text body; every error of this server is JSON
/// (`{"error": ...}`) that says what to do, these included.
async fn json_errors(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(resp.status().is_client_error()) {
        return resp;
    }
    let error = match resp.status() {
        // The router adds the `Allow` header once this layer is done.
        StatusCode::METHOD_NOT_ALLOWED => format!(
            "{method} is not allowed on {path}: the Allow header lists the methods it takes (see docs/serve.md)"
        ),
        StatusCode::PAYLOAD_TOO_LARGE => {
            "the request body is over the 2 MB limit: send a smaller one".to_string()
        }
        StatusCode::NOT_FOUND => format!("no page or endpoint {method} {path} (see docs/serve.md)"),
        _ => return resp,
    };
    let (mut parts, _) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    let body = serde_json::json!({ "error": error }).to_string();
    axum::response::Response::from_parts(parts, axum::body::Body::from(body))
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets requests in flight
/// finish. Unlike `axum::serve`, a client that opens a connection and sends its headers
/// slowly (or never) is cut off after `header_read`: an unauthenticated client must not hold
/// a connection, a task and its buffers for as long as it likes.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    router: Router,
    header_read: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    use hyper_util::server::conn::auto;
    use tower_service::Service;

    // HTTP/1 only: browsers and GitHub speak it, and an HTTP/2 connection (cleartext, with
    // prior knowledge) escaped the header timeout: one that sent its preface and nothing else
    // stayed open for good, and a few thousand of them used up the descriptors deploys need.
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read);
    let graceful = crate::accept::serve_until(
        listener,
        &builder,
        || {
            let router = router.clone();
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let mut router = router.clone();
                router.call(req.map(axum::body::Body::new))
            })
        },
        shutdown,
        "serve",
        Duration::from_millis(50),
    )
    .await;
    graceful.shutdown().await;
}

/// A running `cutover serve`.
pub struct Handle {
    /// The bound address (the port is known here when `listen` asked for port 0).
    pub addr: SocketAddr,
    pub state: ServeState,
    stop: watch::Sender<bool>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Handle {
    /// Stops accepting, lets the running job finish its current await point, and returns.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Binds `[serve] listen`, starts the runner and the sampler, serves.
pub async fn start(state: ServeState) -> anyhow::Result<Handle> {
    let listener = tokio::net::TcpListener::bind(state.settings.listen)
        .await
        .with_context(|| format!("cannot listen on {} (serve.listen)", state.settings.listen))?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(state.live.clone().run(stopped.clone()));
    tokio::spawn(runner(state.clone(), stopped.clone()));
    tokio::spawn(readmitter(state.clone(), stopped.clone()));
    tokio::spawn(fleet_lock_watch(state.clone(), stopped.clone()));
    let router = app(state.clone());
    let server = {
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            serve_http(listener, router, HEADER_READ_TIMEOUT, shutdown).await;
        })
    };
    Ok(Handle {
        addr,
        state,
        stop,
        server: Some(server),
    })
}

/// `cutover serve`: runs until SIGINT or SIGTERM. A running deployment is not interrupted by
/// the first signal: the process waits for it (a second signal exits at once; the journal
/// then lets `cutover deploy --resume` or `cutover rollback` finish the job).
///
/// Jobs still queued at the end stay in the journal and run when `cutover serve` starts again;
/// `drop_queued` drops such jobs instead, printing for each the command that runs it by hand.
pub async fn run(config: Config, drop_queued: bool) -> anyhow::Result<()> {
    let state = ServeState::new(config)?;
    let kept = if drop_queued {
        for line in dropped_jobs(&state, "dropped (--drop-queued)") {
            state.say(&line);
        }
        Vec::new()
    } else {
        state.queue.view().queued
    };
    for job in &kept {
        state.say(&format!(
            "job {} ({}) was queued when cutover serve last stopped: it runs in turn (`cutover serve --drop-queued` drops such jobs instead)",
            job.id,
            describe(job)
        ));
    }
    let handle = start(state).await?;
    let github = match &handle.state.settings.github {
        Some(g) => match &g.repository {
            Some(r) => format!(", GitHub pushes to {r} {} deploy", g.branch),
            None => format!(", GitHub pushes to {} deploy", g.branch),
        },
        None => String::new(),
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(
            out,
            "cutover serve: dashboard and API on http://{}/{github}",
            handle.addr
        );
        let _ = out.flush();
    }
    wait_for_signal().await;
    let _ = handle.stop.send(true);
    if handle.state.queue.view().running.is_some() {
        eprintln!(
            "cutover serve: waiting for the running deployment to finish (signal again to exit now)"
        );
        let state = handle.state.clone();
        tokio::select! {
            _ = async { while state.queue.view().running.is_some() { tokio::time::sleep(Duration::from_millis(200)).await } } => {}
            _ = wait_for_signal() => {}
        }
    }
    // Queued jobs stay in the journal for the next start: say so, so that nobody waits for them.
    for job in handle.state.queue.view().queued {
        let line = format!(
            "job {} ({}) stays queued: it runs when cutover serve starts again (`cutover serve --drop-queued` drops it instead)",
            job.id,
            describe(&job)
        );
        eprintln!("cutover serve: {line}");
        handle.state.log_line(&line);
    }
    Ok(())
}

/// Cancels the jobs still queued, as `what`, and says, for each, the command that runs it from
/// a terminal.
fn dropped_jobs(state: &ServeState, what: &str) -> Vec<String> {
    let config = crate::transport::sh_quote(state.config.file.display().to_string());
    state
        .queue
        .cancel_queued(&format!("not run: {what}"))
        .iter()
        .map(|job| {
            let command = match &job.work {
                Work::Deploy { version } => {
                    format!("cutover -c {config} deploy --version {version}")
                }
                Work::Rollback { to: Some(v) } => format!("cutover -c {config} rollback --to {v}"),
                Work::Rollback { to: None } => format!("cutover -c {config} rollback"),
                Work::Readmit => format!("cutover -c {config} readmit"),
            };
            format!(
                "job {} ({}) was queued and is {what}; to run it: {command}",
                job.id,
                describe(job)
            )
        })
        .collect()
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
    }
}

/// How often a blocked runner looks whether the interrupted deployment was resolved.
pub const BLOCKED_POLL: Duration = Duration::from_secs(2);

/// Takes jobs one at a time until stopped (a running job is finished first). While an
/// interrupted deployment waits to be resolved from the command line, queued jobs stay queued
/// (and kept in the journal): the runner says it is blocked and goes on by itself once the
/// deployment is resumed or rolled back.
async fn runner(state: ServeState, mut stop: watch::Receiver<bool>) {
    loop {
        // A stop wins over a queued job: after SIGTERM the HTTP side is gone (no dashboard, no
        // abort button), so no new deployment may start.
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            _ = state.queue.ready() => {}
        }
        match blocker(&state) {
            Some(why) => {
                if state.queue.set_blocked(Some(why.clone())) {
                    state.say(&why);
                }
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(BLOCKED_POLL) => {}
                }
                continue;
            }
            None => {
                if state.queue.set_blocked(None) {
                    state.say("the interrupted deployment was resolved: queued jobs run in turn");
                }
            }
        }
        let Some(mut job) = state.queue.start_next() else {
            continue;
        };
        state.say(&format!("job {} starts: {}", job.id, describe(&job)));
        state.live.set_fast(true);
        let from = crate::journal::now_ms();
        state.live.sample_now().await;
        let result = run_job(&state, &job).await;
        state.live.sample_now().await;
        state.live.set_fast(false);
        if let Err(e) = &result {
            if e.is::<Interrupted>() {
                // Found under the lock (it was interrupted after the runner looked): the job
                // did not begin; it waits at the head of the queue like the others.
                state.say(&format!("job {} goes back to the queue: {e:#}", job.id));
                state.queue.requeue(job);
                continue;
            }
        }
        job.ended_ms = Some(crate::journal::now_ms());
        match result {
            Ok(Ran::Nothing(why)) => {
                job.state = JobState::Done;
                job.outcome = Some(NOTHING_TO_READMIT.to_string());
                state.say(&format!("job {}: {why}", job.id));
            }
            Ok(Ran::Deployed(report)) => {
                job.state = JobState::Done;
                job.outcome = Some(report.outcome.label().to_string());
                job.deployment = Some(report.id.clone());
                let samples = state.live.since(from);
                let stored: Vec<_> = samples.iter().map(|s| (s.at_ms, s.to_json())).collect();
                if let Err(e) = state.journal.add_samples(&report.id, &stored) {
                    state.say(&format!("cannot store the timeline samples: {e:#}"));
                }
                match report::write_report(&state.journal, &report.id, &samples) {
                    Ok(p) => state.say(&format!("report: {}", p.display())),
                    Err(e) => state.say(&format!("cannot write the report: {e:#}")),
                }
                let _ = state
                    .journal
                    .prune(state.config.app.name.as_str(), state.config.history_keep);
                state.say(&format!(
                    "job {} {}: served {}, failed {} (deployment {})",
                    job.id,
                    report.outcome.words(),
                    report.served,
                    report.failed_requests,
                    report.id
                ));
            }
            Err(e) => {
                job.state = JobState::Failed;
                job.error = Some(format!("{e:#}"));
                state.say(&format!("job {} failed: {e:#}", job.id));
            }
        }
        state.queue.finish(job);
    }
}

pub(crate) fn describe(job: &Job) -> String {
    match &job.work {
        Work::Deploy { version } => format!("deploy {version} ({})", job.trigger),
        Work::Rollback { to: Some(v) } => format!("rollback to {v} ({})", job.trigger),
        Work::Rollback { to: None } => format!("rollback ({})", job.trigger),
        Work::Readmit => format!("readmit ({})", job.trigger),
    }
}

/// A deployment of the app was interrupted (the one who ran it is gone): what to run.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Interrupted(String);

/// Why queued jobs cannot start now, if they cannot: a deployment was interrupted and nobody
/// carries it on (a live holder of the lock, a `cutover deploy --resume` in a terminal, is
/// waited for by the job instead). A journal that cannot be read blocks too, with the error.
fn blocker(state: &ServeState) -> Option<String> {
    let app = state.config.app.name.as_str();
    let row = match state.journal.unfinished(app) {
        Ok(row) => row?,
        Err(e) => {
            return Some(format!(
                "queued jobs wait: cannot read the journal ({e:#}); serve retries every {}",
                humantime::format_duration(BLOCKED_POLL)
            ));
        }
    };
    let carried_on = state
        .journal
        .lock_holder(app)
        .ok()
        .flatten()
        .is_some_and(|h| !h.is_gone());
    (!carried_on).then(|| blocked_by(state, &row))
}

/// The message for queued jobs held back by the interrupted deployment `row`.
pub(crate) fn blocked_by(state: &ServeState, row: &crate::journal::DeploymentRow) -> String {
    format!(
        "queued jobs wait: {}; serve does not guess which, and goes on by itself once it is resolved",
        resolve_hint(state, row)
    )
}

/// What the interrupted deployment `row` is and the commands that resolve it, for the queue's
/// `blocked`, the API's refusals and the dashboard.
pub(crate) fn resolve_hint(state: &ServeState, row: &crate::journal::DeploymentRow) -> String {
    let config = crate::transport::sh_quote(state.config.file.display().to_string());
    format!(
        "deployment {} ({} -> {}) was interrupted; resolve it from the command line: `cutover -c {config} deploy --resume` finishes it, `cutover -c {config} rollback` returns the hosts (or finishes it when it was already going back; `cutover -c {config} status` says which applies)",
        row.id,
        row.from.as_deref().unwrap_or("(nothing)"),
        row.to
    )
}

/// A job's `outcome` when a readmit found every server in place (the fleet read under the lock
/// can differ from the one that queued it).
pub const NOTHING_TO_READMIT: &str = "nothing_to_readmit";

/// What a job that did not fail did.
enum Ran {
    /// Its deployment ran to this report.
    Deployed(Box<Report>),
    /// There was nothing to do (a readmit that found nothing missing): why.
    Nothing(String),
}

/// One job: the lock (the journal's, then the fleet's, waited for as long), the
/// interrupted-deployment check, the deploy; the fleet lock is released before the job ends.
async fn run_job(state: &ServeState, job: &Job) -> anyhow::Result<Ran> {
    let config = &state.config;
    let what = format!("serve: {}", describe(job));
    let progress = {
        let state = state.clone();
        Progress::to_sink(Arc::new(move |line: &str| state.say(line)))
    };
    let mut deployer = crate::cli::deployer(config.clone(), state.journal.clone(), progress)?;
    let lock = crate::cli::take_lock(
        &state.journal,
        config,
        &what,
        Some(Duration::from_secs(3600)),
        deployer.transport.clone(),
    )
    .await?;
    deployer.fleet_lock = Some(lock.fleet());
    let result = run_locked_job(state, job, deployer).await;
    lock.release().await;
    result
}

/// [`run_job`] once the journal's lock is held.
async fn run_locked_job(
    state: &ServeState,
    job: &Job,
    mut deployer: crate::deploy::Deployer,
) -> anyhow::Result<Ran> {
    let config = &state.config;
    if let Some(row) = state.journal.unfinished(state.config.app.name.as_str())? {
        return Err(Interrupted(blocked_by(state, &row)).into());
    }
    if let Some(warning) = state.queue.unkeep_started(job.id) {
        state.say(&warning);
    }
    let request = match &job.work {
        Work::Readmit => {
            // Read under the lock (the fleet's too): no deployment moves the fleet meanwhile.
            deployer.hold_fleet_lock().await?;
            let plan = crate::readmit::plan(
                config,
                &state.journal,
                &deployer.transport,
                &deployer.balancer,
            )
            .await?;
            let said = plan.describe(config);
            let crate::readmit::Plan::Readmit { version, hosts } = plan else {
                return Ok(Ran::Nothing(said));
            };
            deployer.progress.say(&said);
            let fleet_lock = deployer.fleet_lock.clone();
            deployer = crate::deploy::Deployer::new(
                Arc::new(crate::readmit::config_for(config, &hosts)),
                deployer.transport.clone(),
                deployer.balancer.clone(),
                state.journal.clone(),
                deployer.progress.clone(),
            );
            deployer.fleet_lock = fleet_lock;
            Request::readmit(version)
        }
        Work::Deploy { version } => Request::deploy(name(version)?),
        Work::Rollback { to } => {
            let target = match to {
                Some(v) => name(v)?,
                None => name(&state.journal.previous_release(state.config.app.name.as_str())?.ok_or_else(|| {
                    anyhow::anyhow!(
                        "no earlier release is recorded in the journal: name one (\"to\": VERSION)"
                    )
                })?)?,
            };
            Request {
                version: target,
                kind: "rollback",
                resume: None,
            }
        }
    };
    // Tell the queue the deployment's id as soon as the journal has it.
    let watcher = {
        let state = state.clone();
        let since = job.started_ms.unwrap_or(0).saturating_sub(1000);
        tokio::spawn(async move {
            loop {
                if let Ok(Some(row)) = state.journal.unfinished(state.config.app.name.as_str()) {
                    if row.started_ms >= since {
                        state.queue.set_deployment(&row.id);
                        return;
                    }
                }
                tokio::time::sleep(sampler::FAST).await;
            }
        })
    };
    let result = deployer.run(&request).await;
    watcher.abort();
    result.map(|r| Ran::Deployed(Box::new(r)))
}

/// How often a restart of the balancer seen while a deployment runs (or waits) is looked at
/// again, and a fleet read that failed is tried again.
pub const READMIT_RETRY: Duration = sampler::SLOW;

/// Why a readmit may be due: the balancer's counting began again, or serve just started (the
/// machine rebooted with HAProxy, say).
fn readmit_reason(state: &ServeState, restarted: bool) -> &'static str {
    match (restarted, state.config.balancer.kind) {
        (false, _) => "serve started",
        (true, crate::config::BalancerKind::Haproxy) => "HAProxy restarted or reloaded",
        (true, crate::config::BalancerKind::Builtin) => "the balancer restarted",
    }
}

/// Queues a `readmit` job when the balancer lost the servers of hosts whose live release runs:
/// looked at when serve starts and whenever the sampler sees the balancer's counting begin
/// again (an HAProxy reload or restart drops every server cutover added; cutover's own proxy
/// restores its backends, so after its restart the look finds nothing). Not while a deployment
/// runs, is queued or was interrupted: a running one puts back what a reload dropped itself
/// (`balancer::haproxy::reload`), an interrupted one is a person's to resolve; serve looks again once none is left, and queues
/// the job only if servers are still missing. Never two at once: the job is queued only when
/// nothing else is.
/// How often serve reads the deploy lock on the fleet.
const FLEET_LOCK_EVERY: Duration = Duration::from_secs(5);

/// Reads the deploy lock on the fleet every [`FLEET_LOCK_EVERY`] for `/api/status` and the
/// dashboard: a deployment run from another machine is in no journal here, and this is its
/// only sign. A reading is one builtin-only script per host, in parallel.
async fn fleet_lock_watch(state: ServeState, mut stop: watch::Receiver<bool>) {
    loop {
        let (seen, others) =
            crate::fleet_lock::read_all(&state.config, state.transport.as_ref()).await;
        let (first, others) = crate::fleet_lock::to_json(&seen, &others);
        *state.fleet_lock.lock().unwrap_or_else(|p| p.into_inner()) = serde_json::json!({
            "fleet_lock": first,
            "fleet_lock_others": others,
            "fleet_lock_read_ms": crate::journal::now_ms(),
        });
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(FLEET_LOCK_EVERY) => {}
        }
    }
}

async fn readmitter(state: ServeState, mut stop: watch::Receiver<bool>) {
    let mut restarts = state.live.restarts();
    let mut due: Option<&'static str> = Some(readmit_reason(&state, false));
    let mut told = false;
    loop {
        if let Some(reason) = due {
            match readmit_check(&state, reason, !told).await {
                Some(waits) => told |= waits,
                None => {
                    due = None;
                    told = false;
                }
            }
        }
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            changed = restarts.changed() => {
                if changed.is_err() {
                    return;
                }
                due = Some(readmit_reason(&state, true));
                told = false;
            }
            _ = tokio::time::sleep(READMIT_RETRY), if due.is_some() => {}
        }
    }
}

/// One look for lost servers (see [`readmitter`]): `None` when it is done (a job queued, or
/// nothing missing); `Some(said)` to look again later, `said` when it said why (only when
/// `tell`).
async fn readmit_check(state: &ServeState, reason: &str, tell: bool) -> Option<bool> {
    let wait = |why: String| {
        if tell {
            state.say(&format!("{reason}: {why}"));
        }
        Some(tell)
    };
    let after = "serve looks for hosts the balancer lost once it has ended";
    let again = format!(
        "serve tries again every {}",
        humantime::format_duration(READMIT_RETRY)
    );
    let view = state.queue.view();
    if let Some(job) = view.running.iter().chain(view.queued.iter()).next() {
        return wait(format!(
            "job {} ({}) is {}: {after}",
            job.id,
            describe(job),
            if job.state == JobState::Running {
                "running"
            } else {
                "queued"
            }
        ));
    }
    match state.journal.unfinished(state.config.app.name.as_str()) {
        Ok(Some(row)) => {
            return wait(format!(
                "deployment {} ({} -> {}) is unfinished (running, or interrupted: then resolve it with `cutover deploy --resume` or `cutover rollback`): {after}",
                row.id,
                row.from.as_deref().unwrap_or("(nothing)"),
                row.to
            ));
        }
        Ok(None) => {}
        Err(e) => return wait(format!("cannot read the journal ({e:#}): {again}")),
    }
    let views = match crate::fleet::observe(&state.config, &state.transport, &state.balancer).await
    {
        Ok(views) => views,
        // The balancer may still be coming up: the next look reads it again.
        Err(e) => return wait(format!("cannot read the fleet ({e:#}): {again}")),
    };
    let lost = crate::readmit::lost(&views);
    if lost.is_empty() {
        if reason != readmit_reason(state, false) {
            state.say(&format!(
                "{reason}: every host whose live release runs has a server in the balancer"
            ));
        }
        return None;
    }
    let trigger = format!(
        "{reason}: {} had no server in the balancer",
        crate::readmit::names(&lost)
    );
    match state.queue.push(Work::Readmit, None, trigger.clone()) {
        Ok((job, _)) => {
            state.say(&format!(
                "{trigger}: queued job {} to put the running instances back (readmit)",
                job.id
            ));
            None
        }
        Err(e) => wait(format!("cannot queue a readmit ({e:#}): {again}")),
    }
}

fn name(v: &str) -> anyhow::Result<Name> {
    Name::parse(v).map_err(|e| anyhow::anyhow!("version: {e}"))
}

/// The holder of the deploy lock when it is not this process (a deploy from a terminal).
pub fn other_holder(state: &ServeState) -> Option<LockHolder> {
    state
        .journal
        .lock_holder(state.config.app.name.as_str())
        .ok()
        .flatten()
        .filter(|h| h.pid != std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[app]\nname = \"shop\"\nstart = \"exec ./server --port {port}\"\n\n\
        [release]\npath = \"builds/{version}\"\n\n\
        [[hosts]]\nname = \"web1\"\naddress = \"127.0.0.11\"\nroot = \"fleet/web1\"\n\n\
        [balancer]\nlisten = \"127.0.0.1:8080\"\nadmin = \"127.0.0.1:8081\"\ntoken = \"0123456789abcdef\"\n\n";

    /// The error `[serve]` (appended to a good config) gives, and the line where `needle` is.
    fn error_of(serve: &str, needle: &str) -> (String, usize) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cutover.toml");
        let text = format!("{BASE}{serve}");
        std::fs::write(&path, &text).unwrap();
        let config = Config::load(&path).unwrap();
        let line = text.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
        let e = Settings::from_config(&config).unwrap_err().to_string();
        (e.replace(&path.display().to_string(), "FILE"), line)
    }

    /// Review finding 5: a client that never finishes its request headers is cut off after
    /// the header read timeout (axum::serve waits forever).
    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.16:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_http(
            listener,
            router,
            Duration::from_millis(300),
            async move {
                let _ = stopped.await;
            },
        ));
        // A complete request is served.
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        ok.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
        // Half a request line, then nothing: the server closes the connection.
        let started = std::time::Instant::now();
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"POST /hooks/github HTTP/1.1\r\nx-github-event: pu")
            .await
            .unwrap();
        let mut rest = Vec::new();
        // Closed (cleanly or by a reset) rather than held open: `read_to_end` returns.
        let _ = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut rest))
            .await
            .expect("the server closes a connection whose headers do not come");
        assert!(started.elapsed() >= Duration::from_millis(300));
        let _ = stop.send(());
        server.await.unwrap();
    }

    /// What only `cutover serve` can check, the token and secret files, is checked when it
    /// starts, with the line and key; the rest is refused when the config loads (see
    /// `config::tests::an_invalid_serve_section_is_refused_at_load`).
    #[test]
    fn serve_errors_name_the_line_and_key() {
        let (e, line) = error_of("[serve]\ntoken_file = \"missing.token\"\n", "token_file = ");
        assert!(
            e.starts_with(&format!("FILE:{line}:1: serve.token_file: cannot read ")),
            "{e}"
        );
        let (e, line) = error_of(
            "[serve]\ntoken = \"0123456789abcdef0\"\n\n[serve.github]\nsecret_file = \"/dev/null\"\n",
            "secret_file = ",
        );
        assert_eq!(
            e,
            format!(
                "FILE:{line}:1: serve.github.secret_file: serve.github.secret in /dev/null is too short: use at least 16 characters (a random string, e.g. from `openssl rand -hex 24`)"
            )
        );
    }
}
