//! The JSON API of `cutover serve` (under `/api`, every endpoint needs
//! `Authorization: Bearer <token>`) and the GitHub webhook handler. docs/serve.md documents each
//! endpoint; docs/serve-openapi.yaml describes them formally.
//!
//! Errors are one enum ([`ApiError`]) mapped to a status and `{"error": "..."}`.

use std::collections::BTreeSet;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::ServeState;
use super::github::{self, PushDecision};
use super::queue::Work;
use crate::config::Name;
use crate::journal::DeploymentRow;
use crate::report;

/// Every error of the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The client did not send its request in time.
    #[error("{0}")]
    Timeout(String),
    /// Too many requests of this kind at once: retry later.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(format!("{e:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"cutover\""),
            );
        }
        resp
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The `/api` routes, behind the bearer token.
pub fn routes(state: ServeState) -> Router<ServeState> {
    Router::new()
        .route("/fleet", get(fleet))
        .route("/status", get(status))
        .route("/deployments", get(deployments).post(start_deploy))
        .route("/deployments/{id}", get(deployment))
        .route("/deployments/{id}/report", get(deployment_report))
        .route("/deployments/{id}/{command}", post(command))
        .route("/rollback", post(rollback))
        .route("/readmit", post(readmit))
        .route("/queue", get(queue))
        .route("/queue/{job}", get(queue_job).delete(cancel_job))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state, auth))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no endpoint {} {} (see docs/serve.md)",
        req.method(),
        req.uri().path()
    ))
}

/// Equal, in time that does not depend on where they differ (digests of both are compared).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 9110), so `bearer` and `BEARER` work too.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// A query string that does not parse is a 400 with the JSON error body, like every error.
fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> ApiResult<T> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::BadRequest(format!("bad query string: {}", e.body_text())))
}

async fn auth(State(state): State<ServeState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    match given {
        Some(t) if same_secret(t.trim().as_bytes(), state.settings.token.as_bytes()) => {
            next.run(req).await
        }
        Some(_) => ApiError::Unauthorized("wrong token".into()).into_response(),
        None => {
            ApiError::Unauthorized("missing token: send Authorization: Bearer <serve.token>".into())
                .into_response()
        }
    }
}

/// `GET /api/fleet`: one row per instance or backend, as `cutover status` shows them.
///
/// Without the balancer, the hosts are still read and shown, as `cutover status` does: what
/// runs where is known, only the balancer's side is not (`balancer_error` says why; those rows'
/// `state` and `health` are "unknown", their weight and counters null). It was a 502, and the
/// dashboard kept showing the rows it had before as if they were current.
async fn fleet(State(state): State<ServeState>) -> ApiResult<Json<Value>> {
    let (views, balancer_error) = crate::fleet::observe_even_without_balancer(
        &state.config,
        &state.transport,
        &state.balancer,
    )
    .await;
    let unknown = balancer_error.is_some();
    // A backend's counters; none at all without the balancer (not 0).
    let count = |n: Option<u64>| {
        if unknown {
            Value::Null
        } else {
            json!(n.unwrap_or(0))
        }
    };
    let mut rows = Vec::new();
    let mut hosts = Vec::new();
    for v in &views {
        hosts.push(json!({
            "host": v.host.name.as_str(), "address": v.host.address.to_string(),
            "current": v.current, "error": v.error,
        }));
        let mut seen = BTreeSet::new();
        for r in &v.instances {
            let b = v
                .backends
                .iter()
                .find(|b| b.spec.id == r.instance.backend_id());
            if let Some(b) = b {
                seen.insert(b.spec.id.clone());
            }
            // Without the balancer no backend is known: its side is unknown, not "absent".
            let (backend_state, health) = match b {
                Some(b) => (enum_name(&b.state), enum_name(&b.health)),
                None if unknown => ("unknown".to_string(), "unknown".to_string()),
                None => ("absent".to_string(), "-".to_string()),
            };
            rows.push(json!({
                "host": v.host.name.as_str(),
                "current": v.current,
                "release": r.instance.version,
                "instance": r.instance.address.to_string(),
                "pid": r.instance.pid,
                "alive": r.alive,
                "background": r.background,
                "backend": b.map(|b| b.spec.id.clone()),
                "state": backend_state,
                "health": health,
                "weight": b.map(|b| b.spec.weight),
                "in_flight": count(b.map(|b| b.in_flight)),
                "requests": count(b.map(|b| b.counters.requests)),
                "errors": count(b.map(|b| b.counters.failed_attempts())),
            }));
        }
        for b in v.backends.iter().filter(|b| !seen.contains(&b.spec.id)) {
            rows.push(json!({
                "host": v.host.name.as_str(),
                "current": v.current,
                "release": b.spec.release,
                "instance": b.spec.address.to_string(),
                "pid": null,
                "alive": null,
                "backend": b.spec.id,
                "state": enum_name(&b.state),
                "health": enum_name(&b.health),
                "weight": b.spec.weight,
                "in_flight": b.in_flight,
                "requests": b.counters.requests,
                "errors": b.counters.failed_attempts(),
            }));
        }
    }
    Ok(Json(json!({
        "app": state.config.app.name.as_str(),
        "hosts": hosts,
        "rows": rows,
        "balancer_error": balancer_error,
    })))
}

fn enum_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The deployment without an outcome, and whether something is carrying it out right now.
fn current(state: &ServeState) -> ApiResult<Option<(DeploymentRow, bool)>> {
    let Some(row) = state.journal.unfinished(state.config.app.name.as_str())? else {
        return Ok(None);
    };
    let ours = state.queue.view().running.is_some_and(|j| {
        j.deployment.as_deref() == Some(row.id.as_str()) || j.deployment.is_none()
    });
    let holder_alive = state
        .journal
        .lock_holder(state.config.app.name.as_str())?
        .is_some_and(|h| !h.is_gone());
    Ok(Some((row, ours || holder_alive)))
}

/// `row` as the API shows it, with its `state`: "ended" (it has an outcome), "running" (it is
/// `current`'s and carried out now) or "interrupted" (no outcome, and nothing carries it on:
/// it waits to be resolved from the command line). The history showed an interrupted
/// deployment as running, for good.
fn with_state(row: &DeploymentRow, current: Option<&(DeploymentRow, bool)>) -> Value {
    let running = current.is_some_and(|(c, running)| *running && c.id == row.id);
    let mut v = serde_json::to_value(row).unwrap_or(Value::Null);
    v["state"] = json!(match (&row.outcome, running) {
        (Some(_), _) => "ended",
        (None, true) => "running",
        (None, false) => "interrupted",
    });
    v
}

/// `GET /api/status`: the running (or interrupted) deployment with its live status, the
/// queue, the lock, the last progress lines.
async fn status(State(state): State<ServeState>) -> ApiResult<Json<Value>> {
    let deployment = current(&state)?.map(|unfinished| {
        let (row, running) = &unfinished;
        let mut v = with_state(row, Some(&unfinished));
        if !running {
            v["resolve"] = json!(super::resolve_hint(&state, row));
        }
        v
    });
    let log: Vec<String> = {
        let log = state.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().rev().take(50).rev().cloned().collect()
    };
    let fleet_lock = state
        .fleet_lock
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(Json(json!({
        "app": state.config.app.name.as_str(),
        "deployment": deployment,
        "queue": state.queue.view(),
        "lock": state.journal.lock_holder(state.config.app.name.as_str())?,
        // Read every 5 s (null until the first reading): see `fleet_lock_watch`.
        "fleet_lock": fleet_lock["fleet_lock"],
        "fleet_lock_others": fleet_lock["fleet_lock_others"],
        "fleet_lock_read_ms": fleet_lock["fleet_lock_read_ms"],
        "github": state.settings.github.as_ref().map(|g| json!({ "branch": g.branch, "repository": g.repository })),
        "balancer_error": state.live.error(),
        "log": log,
    })))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

/// `GET /api/deployments?limit=N`: newest first, each with its `state` (see [`with_state`]).
async fn deployments(
    State(state): State<ServeState>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let q = query(q)?;
    let rows = state.journal.deployments(
        state.config.app.name.as_str(),
        q.limit.unwrap_or(50).min(1000),
    )?;
    let current = current(&state)?;
    let rows: Vec<Value> = rows
        .iter()
        .map(|row| with_state(row, current.as_ref()))
        .collect();
    Ok(Json(json!({ "deployments": rows })))
}

fn find(state: &ServeState, id: &str) -> ApiResult<DeploymentRow> {
    if id == "current" {
        return current(state)?
            .map(|(row, _)| row)
            .ok_or_else(|| ApiError::NotFound("no deployment is running or interrupted".into()));
    }
    state
        .journal
        .deployment(id)?
        .ok_or_else(|| ApiError::NotFound(format!("no deployment {id} in the journal")))
}

/// `GET /api/deployments/{id}` (`current` for the running one): row, steps, events, samples.
async fn deployment(
    State(state): State<ServeState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let row = find(&state, &id)?;
    let steps = state.journal.steps(&row.id)?;
    let events = state.journal.events(&row.id)?;
    let samples: Vec<report::Sample> = state
        .journal
        .samples(&row.id)?
        .iter()
        .map(|(at, v)| report::Sample::from_json(*at, v))
        .collect();
    let report_path = report::report_path(&state.journal, &row.id);
    Ok(Json(json!({
        "deployment": with_state(&row, current(&state)?.as_ref()),
        "steps": steps,
        "events": events,
        "rates": report::rates(&samples),
        "report_file": report_path.exists().then(|| report_path.display().to_string()),
    })))
}

/// `GET /api/deployments/{id}/report`: the HTML deploy report (written if missing).
async fn deployment_report(
    State(state): State<ServeState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let row = find(&state, &id)?;
    let path = report::report_path(&state.journal, &row.id);
    if row.outcome.is_none() || !path.exists() {
        report::write_report(&state.journal, &row.id, &[])?;
    }
    let html = std::fs::read_to_string(&path)
        .map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
    Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response())
}

fn parse_body<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> ApiResult<T> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not the JSON expected: {e}")))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    version: Option<String>,
}

/// `POST /api/deployments` `{"version": "v2"}`: queues a deploy; 202 with the job. When the
/// last queued job already deploys that version (from the API), 200 with that job instead.
async fn start_deploy(
    State(state): State<ServeState>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let b: DeployBody = parse_body(&body)?;
    let version = b
        .version
        .ok_or_else(|| ApiError::BadRequest("missing \"version\"".into()))?;
    let name = Name::parse(&version).map_err(ApiError::BadRequest)?;
    if state.config.release.git.is_none() {
        let dir = state.config.release_source(&name);
        if !dir.is_dir() {
            return Err(ApiError::BadRequest(format!(
                "no release {version}: {} is not a directory (release.path)",
                dir.display()
            )));
        }
    }
    let (job, new) = state.queue.push_once(
        Work::Deploy {
            version: name.to_string(),
        },
        "api".into(),
    )?;
    // While a deployment is interrupted the job waits for it to be resolved (see `runner`):
    // a deploy names its release, so it goes there however that is resolved. Say so.
    let blocked = match current(&state)? {
        Some((row, false)) => Some(super::blocked_by(&state, &row)),
        _ => None,
    };
    if !new {
        // A double click, or a retry of a request that was queued: the job already waits.
        let why = format!(
            "deploy {name} is queued already as the last job (job {}): not queued again; it runs in turn",
            job.id
        );
        return Ok((
            StatusCode::OK,
            Json(json!({ "job": job, "queued": false, "ignored": why, "blocked": blocked })),
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "job": job, "queued": true, "blocked": blocked })),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    to: Option<String>,
}

/// `POST /api/rollback` `{"to": "v1"}` (optional): queues a fleet rollback; 202 with the job.
/// To undo the *running* deployment, post `rollback` to it instead.
///
/// The job's target is fixed here, never worked out when the job runs: by then "the release
/// before the live one" can be another release than the one asked about. (A rollback accepted
/// while a deployment was interrupted waited in the queue; the operator resolved it with
/// `cutover rollback`, and then the job rolled the fleet back a second time.) So:
/// - while a deployment is interrupted: 409 with the commands that resolve it, `to` or not.
///   Undoing it or finishing it is the command line's call: serve never guesses between them;
/// - without `to`, while a deployment runs or a job is queued: 409, since the live release
///   the job would go back from is not known yet (name it, or post rollback to the running
///   deployment);
/// - without `to` otherwise: `to` is the release before the live one, now.
async fn rollback(
    State(state): State<ServeState>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let b: RollbackBody = parse_body(&body)?;
    let to =
        b.to.map(|v| Name::parse(&v).map(|n| n.to_string()))
            .transpose()
            .map_err(ApiError::BadRequest)?;
    let unfinished = current(&state)?;
    if let Some((row, false)) = &unfinished {
        return Err(ApiError::Conflict(format!(
            "{}; serve does not guess which, so it queues no rollback meanwhile (it could undo the wrong release): once it is resolved, roll back from here if it is still needed",
            super::resolve_hint(&state, row)
        )));
    }
    let to = match to {
        Some(to) => to,
        None => {
            let ahead = match &unfinished {
                Some((row, _)) => Some(format!(
                    "deployment {} ({} -> {}) is running: to undo it, post rollback to it (POST /api/deployments/{}/rollback, the dashboard's Roll back)",
                    row.id,
                    row.from.as_deref().unwrap_or("(nothing)"),
                    row.to,
                    row.id
                )),
                None => {
                    let view = state.queue.view();
                    view.running
                        .iter()
                        .chain(view.queued.iter())
                        .next()
                        .map(|j| {
                            format!(
                                "job {} ({}) is {}",
                                j.id,
                                super::describe(j),
                                enum_name(&j.state)
                            )
                        })
                }
            };
            if let Some(ahead) = ahead {
                return Err(ApiError::Conflict(format!(
                    "{ahead}; which release is live once it is done is not known yet, so a rollback to the one before it is not queued: name the release to return to with {{\"to\": VERSION}}"
                )));
            }
            state
                .journal
                .previous_release(state.config.app.name.as_str())?
                .ok_or_else(|| {
                    ApiError::Conflict(
                        "no earlier release is recorded in the journal: name one with {\"to\": VERSION}"
                            .into(),
                    )
                })?
        }
    };
    let (job, _) = state
        .queue
        .push(Work::Rollback { to: Some(to) }, None, "api".into())?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "job": job }))))
}

/// `POST /api/readmit`: queues what `cutover readmit` does (serve queues it by itself when
/// HAProxy's counters start again; this is for a reload it could not see, or a script run by
/// HAProxy's unit). A readmit already queued last is not queued again.
async fn readmit(State(state): State<ServeState>) -> ApiResult<(StatusCode, Json<Value>)> {
    let (job, new) = state.queue.push_once(Work::Readmit, "api".into())?;
    let status = if new {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({ "job": job, "queued": new }))))
}

/// Commands a running deployment understands.
const COMMANDS: [&str; 6] = [
    "promote",
    "promote-full",
    "abort",
    "pause",
    "resume",
    "rollback",
];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CommandBody {
    /// `promote` only: skip the remaining steps (same as `promote-full`).
    #[serde(default)]
    full: bool,
}

/// `POST /api/deployments/{id}/{command}`: posts promote / promote-full / abort / pause /
/// resume / rollback to a running deployment (id or `current`) through the journal.
async fn command(
    State(state): State<ServeState>,
    Path((id, command)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let b: CommandBody = parse_body(&body)?;
    let mut command = command;
    if !COMMANDS.contains(&command.as_str()) {
        return Err(ApiError::NotFound(format!(
            "no command {command:?}: use one of {}",
            COMMANDS.join(", ")
        )));
    }
    if command == "promote" && b.full {
        command = "promote-full".into();
    }
    // A deployment another machine runs is in no journal here: `current` reaches it through
    // the host that holds its fleet lock, as `cutover abort` typed here would.
    if id == "current" && current(&state)?.is_none() {
        let sent =
            crate::fleet_control::send_elsewhere(&state.config, state.transport.as_ref(), &command)
                .await
                .map_err(|e| ApiError::Conflict(format!("{e:#}")))?;
        if let Some(to) = sent {
            tracing::info!("command {command} sent to another machine: {}", to.holder);
            return Ok((
                StatusCode::ACCEPTED,
                Json(json!({
                    "command": command,
                    "sent_to": { "host": to.host, "holder": to.holder },
                })),
            ));
        }
    }
    let row = find(&state, &id)?;
    if let Some(outcome) = &row.outcome {
        return Err(ApiError::Conflict(format!(
            "deployment {} already ended ({})",
            row.id,
            crate::deploy::outcome_words(outcome)
        )));
    }
    let running = current(&state)?.is_some_and(|(r, running)| r.id == row.id && running);
    if !running {
        return Err(ApiError::Conflict(format!(
            "deployment {} was interrupted and nothing runs it: `cutover status` says how to resolve it (`cutover deploy --resume` or `cutover rollback`)",
            row.id
        )));
    }
    if row.kind == "rollback" && command == "rollback" {
        return Err(ApiError::Conflict(format!(
            "deployment {} is a rollback already (to {}): it goes on; abort stops it where it is",
            row.id, row.to
        )));
    }
    if let Some(why) = crate::control::pointless(&row.strategy, &row.kind, &command) {
        return Err(ApiError::Conflict(format!("deployment {}: {why}", row.id)));
    }
    state.journal.post_command(&row.id, &command)?;
    tracing::info!("command {command} posted to deployment {}", row.id);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "deployment": row.id, "command": command })),
    ))
}

/// `GET /api/queue`: running, queued and recently finished jobs.
async fn queue(State(state): State<ServeState>) -> Json<Value> {
    Json(serde_json::to_value(state.queue.view()).unwrap_or(Value::Null))
}

fn job_id(s: &str) -> ApiResult<u64> {
    s.parse()
        .map_err(|_| ApiError::BadRequest(format!("{s:?} is not a job id")))
}

/// `GET /api/queue/{job}`.
async fn queue_job(
    State(state): State<ServeState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = job_id(&id)?;
    let job = state
        .queue
        .job(id)
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    Ok(Json(json!({ "job": job })))
}

/// `DELETE /api/queue/{job}`: removes a queued job (never the running one).
async fn cancel_job(
    State(state): State<ServeState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    use super::queue::CancelError;
    let id = job_id(&id)?;
    match state.queue.cancel(id) {
        Ok(job) => Ok(Json(json!({ "job": job }))),
        Err(e @ CancelError::NotFound(_)) => Err(ApiError::NotFound(e.to_string())),
        Err(e) => Err(ApiError::Conflict(e.to_string())),
    }
}

#[derive(Deserialize)]
struct MetricsQuery {
    /// Rates after this moment (ms since the Unix epoch); default: the last two minutes.
    since: Option<u64>,
}

/// `GET /api/metrics?since=MS`: requests/s per release and failed share over time.
async fn metrics(
    State(state): State<ServeState>,
    q: Result<Query<MetricsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let q = query(q)?;
    let now = crate::journal::now_ms();
    let since = q.since.unwrap_or(now.saturating_sub(120_000));
    let rates = report::rates(&state.live.window(since));
    let rates: Vec<_> = rates.into_iter().filter(|r| r.at_ms > since).collect();
    Ok(Json(json!({
        "now_ms": now,
        "rates": rates,
        "balancer_error": state.live.error(),
    })))
}

/// Whether a verified push for `version` is queued: `Some(why not)` for a delivery accepted
/// before, a redelivered, replayed or late push ([`github::judge`] over the pushes the journal
/// keeps), or a commit already live or already queued or running. An accepted push is recorded
/// in the journal before it is queued. The caller holds `state.pushes`.
fn admit(
    state: &ServeState,
    delivery: Option<&str>,
    key: &str,
    version: &str,
    push: &github::PushEvent,
) -> ApiResult<Option<String>> {
    if let Some(d) = delivery {
        if state.journal.push_delivered(d)? {
            return Ok(Some(format!(
                "delivery {d} was accepted before (a redelivery): not queued again"
            )));
        }
    }
    // The pair is looked up among every push the journal keeps: a replay comes under a fresh
    // delivery id, possibly long after (the newest `REMEMBERED` are for the lateness check).
    let accepted_before = state.journal.push_accepted(
        key,
        &push.before.to_ascii_lowercase(),
        &push.after.to_ascii_lowercase(),
    )?;
    let seen = state.journal.pushes(key, github::REMEMBERED)?;
    if let Err(why) = github::judge(&seen, push, accepted_before) {
        return Ok(Some(why));
    }
    let view = state.queue.view();
    let waiting = view
        .running
        .iter()
        .chain(view.queued.iter())
        .find(|j| matches!(&j.work, Work::Deploy { version: v } if v == version));
    if let Some(job) = waiting {
        return Ok(Some(format!(
            "{version} is already {} (job {}): not queued again",
            if job.state == super::queue::JobState::Running {
                "being deployed"
            } else {
                "queued"
            },
            job.id
        )));
    }
    let live = state.journal.live_release(state.config.app.name.as_str())?;
    if live.as_deref() == Some(version) {
        return Ok(Some(format!(
            "{version} is live already: not deployed again"
        )));
    }
    state.journal.add_push(
        delivery,
        key,
        &push.before.to_ascii_lowercase(),
        &push.after.to_ascii_lowercase(),
    )?;
    Ok(None)
}

/// Largest webhook body read: GitHub caps payloads at 25 MB (a push with a long file list).
pub const WEBHOOK_BODY_LIMIT: usize = 25 << 20;
/// Time a client has to send a webhook body once its headers are in.
pub const WEBHOOK_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Time a webhook body may go without a byte arriving: a client that stalls gives its slot
/// back then, not at [`WEBHOOK_BODY_TIMEOUT`].
pub const WEBHOOK_BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(5);
/// Webhook bodies read at once. GitHub delivers one push at a time per hook, so a real sender
/// rarely needs more than one; the rest bounds what unauthenticated clients can hold.
pub const WEBHOOK_BODIES: usize = 32;
/// How long a webhook waits for a free slot before the 503: a burst of stalled clients (a
/// few used to block every delivery at once) must not cost a real push that comes meanwhile.
pub const WEBHOOK_SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a webhook body may take: in all, between two of its bytes, and to find a free slot.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimes {
    pub total: std::time::Duration,
    pub idle: std::time::Duration,
    pub slot_wait: std::time::Duration,
}

impl BodyTimes {
    pub const WEBHOOK: BodyTimes = BodyTimes {
        total: WEBHOOK_BODY_TIMEOUT,
        idle: WEBHOOK_BODY_IDLE,
        slot_wait: WEBHOOK_SLOT_WAIT,
    };
}

/// Reads a webhook body before anything in it can be authenticated, so within bounds: at
/// most `limit` bytes (413), within `times.total` and with no pause longer than `times.idle`
/// (408), and only while one of `slots` is free (503, after waiting `times.slot_wait` for
/// one). A stalled client holds a slot for `times.idle` at most.
pub async fn read_webhook_body(
    slots: &tokio::sync::Semaphore,
    headers: &HeaderMap,
    body: axum::body::Body,
    limit: usize,
    times: BodyTimes,
) -> ApiResult<Bytes> {
    use http_body_util::BodyExt;
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "the body is larger than {} MB, more than GitHub sends",
            limit >> 20
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let Ok(Ok(_slot)) = tokio::time::timeout(times.slot_wait, slots.acquire()).await else {
        return Err(ApiError::Busy(
            "too many webhook bodies are being read at once: retry shortly".into(),
        ));
    };
    let timed_out = |what: &str, t: std::time::Duration| {
        ApiError::Timeout(format!("{what} {}", humantime::format_duration(t)))
    };
    let read = async {
        let mut body = http_body_util::Limited::new(body, limit);
        let mut got = bytes::BytesMut::new();
        loop {
            match tokio::time::timeout(times.idle, body.frame()).await {
                Err(_) => return Err(timed_out("no byte of the body came for", times.idle)),
                Ok(None) => return Ok(got.freeze()),
                Ok(Some(Err(e))) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(too_large());
                }
                Ok(Some(Err(e))) => {
                    return Err(ApiError::BadRequest(format!("cannot read the body: {e}")));
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        got.extend_from_slice(&data);
                    }
                }
            }
        }
    };
    tokio::time::timeout(times.total, read)
        .await
        .unwrap_or_else(|_| Err(timed_out("the body did not arrive within", times.total)))
}

/// `POST /hooks/github`: see [`github`].
pub async fn github_hook(
    State(state): State<ServeState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let Some(gh) = &state.settings.github else {
        return ApiError::NotFound(
            "GitHub webhooks are not configured: add [serve.github] with secret and branch".into(),
        )
        .into_response();
    };
    let body = match read_webhook_body(
        &state.webhook_bodies,
        &headers,
        body,
        WEBHOOK_BODY_LIMIT,
        BodyTimes::WEBHOOK,
    )
    .await
    {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("github webhook: {e}");
            return e.into_response();
        }
    };
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    let delivery = headers
        .get("x-github-delivery")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    if !github::verify_signature(&gh.secret, &body, signature) {
        tracing::warn!(
            "github webhook {delivery}: {} signature: rejected",
            if signature.is_some() { "wrong" } else { "no" }
        );
        return ApiError::Unauthorized(
            "X-Hub-Signature-256 is missing or does not match the body (check serve.github.secret)"
                .into(),
        )
        .into_response();
    }
    let event = headers
        .get("x-github-event")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match event {
        "ping" => (StatusCode::OK, Json(json!({ "ok": true, "event": "ping" }))).into_response(),
        "push" => {
            let push: github::PushEvent = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => {
                    let form = headers
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
                    let hint = if form {
                        ": the webhook sends form-encoded payloads; set its Content type to application/json in GitHub"
                    } else {
                        ""
                    };
                    return ApiError::BadRequest(format!("not a push payload: {e}{hint}"))
                        .into_response();
                }
            };
            match github::decide(&push, gh, state.config.release.git.is_some()) {
                PushDecision::Deploy {
                    version,
                    key,
                    trigger,
                } => {
                    if let Err(e) = Name::parse(&version) {
                        return ApiError::BadRequest(e).into_response();
                    }
                    let _one_at_a_time = state.pushes.lock().unwrap_or_else(|p| p.into_inner());
                    let given = headers
                        .get("x-github-delivery")
                        .and_then(|v| v.to_str().ok())
                        .map(str::trim)
                        .filter(|d| !d.is_empty());
                    match admit(&state, given, &key, &version, &push) {
                        Ok(None) => {}
                        Ok(Some(why)) => {
                            state.say(&format!("github webhook {delivery}: {why}"));
                            return (
                                StatusCode::ACCEPTED,
                                Json(json!({ "queued": false, "ignored": why })),
                            )
                                .into_response();
                        }
                        Err(e) => return e.into_response(),
                    }
                    let (job, replaced) =
                        match state
                            .queue
                            .push(Work::Deploy { version }, Some(key), trigger)
                        {
                            Ok(queued) => queued,
                            Err(e) => return ApiError::from(e).into_response(),
                        };
                    state.say(&format!(
                        "github webhook {delivery}: queued job {} ({}){}",
                        job.id,
                        job.trigger,
                        replaced
                            .as_ref()
                            .map(|r| format!(", replacing queued job {}", r.id))
                            .unwrap_or_default()
                    ));
                    (
                        StatusCode::ACCEPTED,
                        Json(json!({ "queued": true, "job": job, "replaced": replaced })),
                    )
                        .into_response()
                }
                PushDecision::Ignore(why) => {
                    state.say(&format!("github webhook {delivery}: {why}"));
                    (
                        StatusCode::ACCEPTED,
                        Json(json!({ "queued": false, "ignored": why })),
                    )
                        .into_response()
                }
            }
        }
        other => {
            let why = format!("event {other:?} ignored: only push deploys");
            state.say(&format!("github webhook {delivery}: {why}"));
            (
                StatusCode::ACCEPTED,
                Json(json!({ "queued": false, "ignored": why })),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("abc"), None);
    }

    fn stalled() -> axum::body::Body {
        axum::body::Body::from_stream(
            futures_util::stream::pending::<Result<Bytes, std::io::Error>>(),
        )
    }

    /// Review finding 5: a webhook body is read within a time limit, a size limit, and only
    /// while a slot is free; stalled clients cannot pin memory and tasks.
    #[tokio::test]
    async fn webhook_bodies_are_bounded_in_time_size_and_number() {
        let slots = tokio::sync::Semaphore::new(2);
        let none = HeaderMap::new();
        let t = Duration::from_millis(200);
        let times = |total: Duration| BodyTimes {
            total,
            idle: total,
            slot_wait: Duration::from_millis(100),
        };
        // A body that never comes: 408 once the time is up, not later, and the slot is free again.
        let started = Instant::now();
        let e = read_webhook_body(&slots, &none, stalled(), 1 << 20, times(t))
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::Timeout(_)), "{e:?}");
        assert_eq!(e.status(), StatusCode::REQUEST_TIMEOUT);
        let waited = started.elapsed();
        assert!(
            waited >= t && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        assert_eq!(slots.available_permits(), 2);
        // Too large: by Content-Length at once, or as it arrives.
        let mut big = HeaderMap::new();
        big.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2000"));
        let e = read_webhook_body(&slots, &big, stalled(), 1000, times(t))
            .await
            .unwrap_err();
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE, "{e:?}");
        let e = read_webhook_body(&slots, &none, vec![b'x'; 1001].into(), 1000, times(t))
            .await
            .unwrap_err();
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE, "{e:?}");
        let ok = read_webhook_body(&slots, &none, "{}".into(), 1000, times(t))
            .await
            .unwrap();
        assert_eq!(&ok[..], b"{}");
        // Every slot taken by a stalled body: the next waits `slot_wait` for one, then 503.
        let long = times(Duration::from_secs(600));
        let a = read_webhook_body(&slots, &none, stalled(), 1000, long);
        let b = read_webhook_body(&slots, &none, stalled(), 1000, long);
        let third = async {
            tokio::task::yield_now().await;
            read_webhook_body(&slots, &none, "{}".into(), 1000, long).await
        };
        tokio::select! {
            _ = a => panic!("a stalled body ended"),
            _ = b => panic!("a stalled body ended"),
            r = third => {
                let e = r.unwrap_err();
                assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
                let resp = e.into_response();
                assert!(resp.headers().contains_key(header::RETRY_AFTER), "{resp:?}");
            }
        }
    }

    /// Review finding: four clients that sent a byte of body and stalled blocked every push
    /// for 30 s. A stalled body gives its slot back at `idle`, and a push waits for a slot.
    #[tokio::test]
    async fn a_stalled_body_gives_its_slot_back_and_a_push_waits_for_it() {
        let slots = tokio::sync::Semaphore::new(1);
        let none = HeaderMap::new();
        let times = BodyTimes {
            total: Duration::from_secs(600),
            idle: Duration::from_millis(300),
            slot_wait: Duration::from_secs(5),
        };
        let started = Instant::now();
        let stalled = read_webhook_body(&slots, &none, stalled(), 1000, times);
        let push = async {
            tokio::task::yield_now().await;
            read_webhook_body(&slots, &none, "{}".into(), 1000, times).await
        };
        let (stalled, push) = tokio::join!(stalled, push);
        let e = stalled.unwrap_err();
        assert_eq!(e.status(), StatusCode::REQUEST_TIMEOUT, "{e:?}");
        assert!(
            e.to_string().contains("no byte of the body came for 300ms"),
            "{e}"
        );
        assert_eq!(&push.unwrap()[..], b"{}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
