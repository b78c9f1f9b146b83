//! The admin API: how the deployer (through [`crate::balancer::builtin::AdminClient`]) changes
//! routing. The endpoints and bodies are listed in [`crate::balancer::api`].
//!
//! Design choices:
//! - [`admin_router`] builds the axum `Router` apart from any socket, so tests and embedders
//!   can serve it however they like.
//! - Every endpoint except `GET /healthz` sits behind a bearer-token layer that compares in
//!   constant time; a refused request changes nothing.
//! - Bodies are parsed by hand from bytes so that every bad body is a 400 with an [`ApiError`]
//!   JSON body (axum's own rejections are plain text with varied statuses).
//! - Every change is persisted before the call returns, so a success means the change survives
//!   a proxy restart.
//! - Waits (`wait-drained`, `wait-healthy`) observe notifications, never sleep loops.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::{info, warn};

use super::Proxy;
use super::router::Added;
use crate::balancer::api::{
    ApiError, BackendSpec, BackendState, BackendView, DrainReport, Health, Samples, Stats,
    SwitchReport, SwitchRequest, WaitRequest, WeightRequest, WeightsRequest,
};

/// Longest wait a caller may ask for.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
/// After a drain deadline cut, how long wait-drained lets the cut requests unwind.
const CUT_SETTLE: Duration = Duration::from_secs(1);

/// An admin API failure: a status and an [`ApiError`] body.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or wrong bearer token: send `Authorization: Bearer <balancer.token>`")]
    Unauthorized,
    #[error("no backend with id {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Internal(String),
    #[error(
        "this proxy is handing over to a new one (`cutover proxy --takeover`) and takes no more changes: retry, the new proxy answers in a moment"
    )]
    Replaced,
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = match self {
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::NotFound(_) | AdminError::Missing(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AdminError::Replaced => StatusCode::SERVICE_UNAVAILABLE,
        };
        let body = ApiError {
            error: self.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

type Result<T> = std::result::Result<T, AdminError>;

/// The admin API over a proxy core.
pub fn admin_router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route("/backends", get(list).post(add))
        .route("/backends/{id}", axum::routing::delete(remove))
        .route("/backends/{id}/weight", put(set_weight))
        .route("/backends/{id}/drain", post(drain))
        .route("/backends/{id}/activate", post(activate))
        .route("/backends/{id}/wait-drained", post(wait_drained))
        .route("/backends/{id}/retire", post(retire))
        .route("/backends/{id}/wait-healthy", post(wait_healthy))
        .route("/stats", get(stats))
        .route("/switch", post(switch))
        .route("/weights", put(set_weights))
        .route("/samples", get(samples))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(proxy.clone(), require_token))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(proxy)
}

async fn require_token(State(proxy): State<Arc<Proxy>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()));
    match given {
        Some(t) if constant_time_eq(t, proxy.settings.token.as_bytes()) => next.run(req).await,
        _ => {
            warn!(path = %req.uri().path(), "admin request refused: bad token");
            AdminError::Unauthorized.into_response()
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 9110 §11.1).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|b| *b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii_start();
    (!token.is_empty()).then_some(token)
}

/// Compares without an early exit, so timing reveals nothing about the token but its length.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| AdminError::BadRequest(format!("bad JSON body: {e}")))
}

/// A wait's timeout from an optional body, else `default`.
fn wait_timeout(body: &[u8], default: Duration) -> Result<Duration> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(default.min(MAX_WAIT));
    }
    let w: WaitRequest = parse(body)?;
    Ok(Duration::from_millis(w.timeout_ms).min(MAX_WAIT))
}

/// Held by an admin change while it changes the table and persists it: a takeover waits for
/// it, then freezes the table (see [`Proxy::freeze`]); a change after that is refused.
async fn change_gate(proxy: &Proxy) -> Result<tokio::sync::RwLockReadGuard<'_, bool>> {
    let frozen = proxy.frozen.read().await;
    if *frozen {
        return Err(AdminError::Replaced);
    }
    Ok(frozen)
}

async fn persist(proxy: &Proxy) -> Result<()> {
    proxy.persist().await.map_err(|e| {
        AdminError::Internal(format!(
            "the change is live but could not be saved, it will be lost on restart: {e:#}"
        ))
    })
}

async fn list(State(proxy): State<Arc<Proxy>>) -> Json<Vec<BackendView>> {
    Json(proxy.table().views())
}

fn validate(spec: &BackendSpec) -> Result<()> {
    let bad = |m: String| Err(AdminError::BadRequest(m));
    if spec.id.trim().is_empty() || spec.id.len() > 256 {
        return bad("id must be 1 to 256 characters".into());
    }
    if !spec.health_path.starts_with('/') {
        return bad(format!(
            "health_path {:?} must start with '/'",
            spec.health_path
        ));
    }
    // The check sends it as a request target: what cannot be one could never pass.
    if let Err(e) = spec.health_path.parse::<hyper::http::uri::PathAndQuery>() {
        return bad(format!(
            "health_path {:?} is not a request path ({e}): percent-encode spaces and other such characters",
            spec.health_path
        ));
    }
    if spec.address.port() == 0 || spec.address.ip().is_unspecified() {
        return bad(format!(
            "address {} is not a backend address: give a concrete IP and port",
            spec.address
        ));
    }
    if spec.release.is_empty() || spec.release.len() > 256 {
        return bad("release must be 1 to 256 characters".into());
    }
    // The release names the sticky cookie's value: only cookie-safe characters (RFC 6265
    // cookie-octet: no control character, space, '"', ',', ';' or '\\').
    if let Some(c) = spec.release.chars().find(|c| !is_cookie_octet(*c)) {
        return bad(format!(
            "release {:?} contains {c:?}: use letters, digits and punctuation other than '\"', ',', ';' and '\\'",
            spec.release
        ));
    }
    Ok(())
}

fn is_cookie_octet(c: char) -> bool {
    matches!(c, '!' | '#'..='+' | '-'..=':' | '<'..='[' | ']'..='~')
}

async fn add(State(proxy): State<Arc<Proxy>>, body: Bytes) -> Result<StatusCode> {
    let spec: BackendSpec = parse(&body)?;
    validate(&spec)?;
    let _gate = change_gate(&proxy).await?;
    let id = spec.id.clone();
    let (address, release, weight) = (spec.address, spec.release.clone(), spec.weight);
    let state = if spec.preview {
        BackendState::Preview
    } else {
        BackendState::Active
    };
    match proxy.insert(spec, state) {
        Added::Created(_) => {
            info!(backend = %id, %address, %release, weight, "backend added");
            persist(&proxy).await?;
            Ok(StatusCode::CREATED)
        }
        Added::Exists => Ok(StatusCode::OK),
        Added::Conflict(m) => Err(AdminError::Conflict(m)),
    }
}

async fn remove(State(proxy): State<Arc<Proxy>>, Path(id): Path<String>) -> Result<StatusCode> {
    let _gate = change_gate(&proxy).await?;
    let entry = proxy.table().remove(&id);
    let Some(entry) = entry else {
        return Err(AdminError::NotFound(id));
    };
    let in_flight = entry.shared.in_flight.load(Ordering::Relaxed);
    drop(entry);
    info!(backend = %id, in_flight, "backend removed");
    persist(&proxy).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_weight(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode> {
    let w: WeightRequest = parse(&body)?;
    let _gate = change_gate(&proxy).await?;
    if !proxy.table().set_weight(&id, w.weight) {
        return Err(AdminError::NotFound(id));
    }
    info!(backend = %id, weight = w.weight, "weight set");
    persist(&proxy).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_state(proxy: &Proxy, id: String, state: BackendState) -> Result<StatusCode> {
    let _gate = change_gate(proxy).await?;
    let before = proxy.table().set_state(&id, state);
    match before {
        None => Err(AdminError::NotFound(id)),
        Some(b) if b == state => Ok(StatusCode::NO_CONTENT),
        Some(b) => {
            info!(backend = %id, from = ?b, to = ?state, "backend state changed");
            persist(proxy).await?;
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

async fn drain(State(proxy): State<Arc<Proxy>>, Path(id): Path<String>) -> Result<StatusCode> {
    set_state(&proxy, id, BackendState::Draining).await
}

async fn activate(State(proxy): State<Arc<Proxy>>, Path(id): Path<String>) -> Result<StatusCode> {
    set_state(&proxy, id, BackendState::Active).await
}

async fn wait_drained(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DrainReport>> {
    let timeout = wait_timeout(&body, proxy.settings.drain_timeout)?;
    settle_drain(&proxy, &id, timeout).await.map(Json)
}

/// Drain, wait, remove in one call (what a deployer does with an old backend): one round trip
/// and one save of the routing state instead of three, when nothing is in flight. When there
/// is something to wait for, the draining state is saved first: a proxy that takes over during
/// the wait (`--takeover` cuts this call) must not route to the backend again.
async fn retire(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<DrainReport>> {
    let timeout = wait_timeout(&body, proxy.settings.drain_timeout)?;
    let gate = change_gate(&proxy).await?;
    let busy = {
        let mut table = proxy.table();
        if table.set_state(&id, BackendState::Draining).is_none() {
            return Err(AdminError::NotFound(id));
        }
        table
            .get(&id)
            .is_some_and(|e| e.shared.in_flight.load(Ordering::Acquire) > 0)
    };
    if busy {
        persist(&proxy).await?;
    }
    // Not held while waiting: a takeover must not wait for a drain. A takeover meanwhile
    // refuses the removal below; the deployer retries on the new proxy, where the backend is
    // draining (the frozen table had it so).
    drop(gate);
    let report = settle_drain(&proxy, &id, timeout).await?;
    let _gate = change_gate(&proxy).await?;
    if proxy
        .table()
        .get(&id)
        .is_some_and(|e| e.state == BackendState::Active)
    {
        return Err(AdminError::Conflict(format!(
            "backend {id} was put back into service while it drained: left in place"
        )));
    }
    if proxy.table().remove(&id).is_some() {
        info!(backend = %id, drained = report.drained, waited_ms = report.waited_ms, "backend retired");
    }
    persist(&proxy).await?;
    Ok(Json(report))
}

/// Waits until a draining backend is idle, up to `timeout`; then closes what is still open.
async fn settle_drain(proxy: &Proxy, id: &str, timeout: Duration) -> Result<DrainReport> {
    let id = id.to_string();
    let shared = {
        let table = proxy.table();
        let entry = table
            .get(&id)
            .ok_or_else(|| AdminError::NotFound(id.clone()))?;
        if entry.state == BackendState::Active {
            return Err(AdminError::Conflict(format!(
                "backend {id} is active and still receives requests: drain it first"
            )));
        }
        entry.shared.clone()
    };
    let started = Instant::now();
    let waited_ms = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    // Put back into service meanwhile (`activate`: a deployer's switch back, an operator):
    // the drain is over, and nothing of it may be cut or removed.
    let reactivated = || {
        proxy
            .table()
            .get(&id)
            .is_some_and(|e| e.state == BackendState::Active)
    };
    let put_back = || {
        AdminError::Conflict(format!(
            "backend {id} was put back into service while it drained: left in place"
        ))
    };
    let deadline = started + timeout;
    // While the backend stands in for failing active ones (see `Table::pick`), an idle moment
    // does not end its drain: new requests keep coming until the deadline.
    let idle = loop {
        let check = (Instant::now() + REACTIVATION_CHECK).min(deadline);
        let idle = wait_idle(&shared, check).await;
        if reactivated() {
            return Err(put_back());
        }
        if idle && !proxy.table().stands_in(&id) {
            break true;
        }
        if Instant::now() >= deadline {
            break idle;
        }
        if idle {
            tokio::time::sleep_until(check).await;
        }
    };
    if reactivated() {
        return Err(put_back());
    }
    if idle {
        // Idle here; a proxy this one took over may still be finishing requests on it (it
        // closes them itself at its own drain deadline, and counts them).
        let drained = proxy.wait_predecessor(&id, started + timeout).await;
        return Ok(DrainReport {
            drained,
            closed_at_deadline: 0,
            waited_ms: waited_ms(),
        });
    }
    let retried_before = shared.cut_and_retried.load(Ordering::Relaxed);
    let open = shared.in_flight.load(Ordering::Acquire);
    shared.cut_in_flight();
    let waited = waited_ms();
    if open > 0 {
        warn!(backend = %id, open, "drain deadline reached: closing requests still in flight");
        wait_idle(&shared, Instant::now() + CUT_SETTLE).await;
    }
    // Requests cut while still waiting for a head and answered by another backend were not
    // closed on their clients: the report counts what a client saw end early.
    let retried = shared
        .cut_and_retried
        .load(Ordering::Relaxed)
        .saturating_sub(retried_before);
    Ok(DrainReport {
        drained: open == 0,
        closed_at_deadline: open.saturating_sub(retried),
        waited_ms: waited,
    })
}

/// How often a drain waiting for requests in flight looks whether its backend was put back
/// into service.
const REACTIVATION_CHECK: Duration = Duration::from_millis(100);

/// Waits until the backend has no request in flight; false at the deadline.
pub(crate) async fn wait_idle(shared: &super::router::BackendShared, deadline: Instant) -> bool {
    loop {
        let idle = shared.idle.notified();
        tokio::pin!(idle);
        idle.as_mut().enable();
        if shared.in_flight.load(Ordering::Acquire) == 0 {
            return true;
        }
        if tokio::time::timeout_at(deadline, idle).await.is_err() {
            return shared.in_flight.load(Ordering::Acquire) == 0;
        }
    }
}

async fn wait_healthy(
    State(proxy): State<Arc<Proxy>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode> {
    let timeout = wait_timeout(&body, *proxy.settings.health.deadline)?;
    let deadline = Instant::now() + timeout;
    loop {
        let changed = proxy.health_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (health, last_error) = {
            let table = proxy.table();
            let entry = table
                .get(&id)
                .ok_or_else(|| AdminError::NotFound(id.clone()))?;
            (entry.health.health, entry.health.last_error.clone())
        };
        if health == Health::Healthy {
            return Ok(StatusCode::NO_CONTENT);
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            let last = last_error.unwrap_or_else(|| "no check has finished yet".into());
            return Err(AdminError::Timeout(format!(
                "backend {id} is not healthy after {}ms (health {}): last check: {last}",
                timeout.as_millis(),
                match health {
                    Health::Unknown => "unknown",
                    Health::Unhealthy => "unhealthy",
                    Health::Healthy => "healthy",
                }
            )));
        }
    }
}

async fn stats(State(proxy): State<Arc<Proxy>>) -> Json<Stats> {
    let (backends, releases, retired) = {
        let table = proxy.table();
        (
            table.backend_counters(),
            table.release_counters(),
            table.retired_counters(),
        )
    };
    let mut total = retired.clone();
    for c in releases.values() {
        total.add(c);
    }
    Json(Stats {
        backends,
        releases,
        retired,
        unrouted: proxy.unrouted.load(Ordering::Relaxed),
        total,
        counting_since_ms: proxy.counting_since_ms(),
        at_ms: super::samples::clock_ms(),
        lost_drains: proxy.lost_drains.load(Ordering::Relaxed),
    })
}

/// Blue-green in one step: one lock acquisition, so no request sees a half-switched set.
async fn switch(State(proxy): State<Arc<Proxy>>, body: Bytes) -> Result<Json<SwitchReport>> {
    let req: SwitchRequest = parse(&body)?;
    let _gate = change_gate(&proxy).await?;
    let (result, took) = {
        let mut table = proxy.table();
        let started = std::time::Instant::now();
        let r = table.switch(&req.activate, &req.standby);
        (r, started.elapsed())
    };
    if let Err(e) = result {
        return Err(if e.contains("both") {
            AdminError::BadRequest(e)
        } else {
            AdminError::NotFound(e)
        });
    }
    let took_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    let at_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    info!(activate = ?req.activate, standby = ?req.standby, took_us, "switched");
    persist(&proxy).await?;
    Ok(Json(SwitchReport {
        took_us,
        at_unix_ms,
    }))
}

async fn set_weights(State(proxy): State<Arc<Proxy>>, body: Bytes) -> Result<StatusCode> {
    let req: WeightsRequest = parse(&body)?;
    let _gate = change_gate(&proxy).await?;
    proxy
        .table()
        .set_weights(&req.weights)
        .map_err(AdminError::NotFound)?;
    info!(weights = ?req.weights, "weights set");
    persist(&proxy).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, serde::Deserialize)]
struct SamplesQuery {
    release: String,
    max: Option<usize>,
    /// With it, the samples of a stretch of time rather than the newest (see
    /// [`crate::balancer::api::SampleWindow`]).
    since_ms: Option<u64>,
    until_ms: Option<u64>,
}

async fn samples(
    State(proxy): State<Arc<Proxy>>,
    query: std::result::Result<Query<SamplesQuery>, QueryRejection>,
) -> Result<Json<Samples>> {
    let Query(q) = query.map_err(|e| {
        AdminError::BadRequest(format!(
            "{e}: use /samples?release=R&max=N, optionally with &since_ms=S&until_ms=U"
        ))
    })?;
    let max = q.max.unwrap_or(super::samples::SAMPLES);
    let found = {
        let table = proxy.table();
        match q.since_ms {
            Some(since) => table
                .sample_window(&q.release, since, q.until_ms.unwrap_or(u64::MAX), max)
                .map(|w| (w.latencies_us, Some(w.from_ms))),
            None => table.samples(&q.release, max).map(|v| (v, None)),
        }
    };
    let (latencies_us, from_ms) = found.ok_or_else(|| {
        AdminError::Missing(format!(
            "no request of release {:?} has been seen",
            q.release
        ))
    })?;
    Ok(Json(Samples {
        release: q.release,
        latencies_us,
        from_ms,
    }))
}

async fn metrics(State(proxy): State<Arc<Proxy>>) -> Response {
    (
        [(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)],
        super::metrics::render(&proxy),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BackendSpec {
        BackendSpec {
            id: "h:1".into(),
            address: "127.0.0.1:4000".parse().unwrap(),
            host: "h".into(),
            release: "v1.2_abc-2024+1".into(),
            weight: 100,
            health_path: "/health?deep=1".into(),
            preview: false,
            gated: false,
        }
    }

    #[test]
    fn health_paths_must_be_request_paths() {
        assert!(validate(&spec()).is_ok());
        for bad in ["/he alth", "health", "/a\nb", "/a\u{7f}"] {
            let s = BackendSpec {
                health_path: bad.into(),
                ..spec()
            };
            match validate(&s) {
                Err(AdminError::BadRequest(m)) => assert!(m.contains("health_path"), "{m}"),
                other => panic!("{bad:?} accepted: {other:?}"),
            }
        }
    }

    #[test]
    fn releases_must_be_cookie_safe() {
        for bad in [
            "v1\nSet-Cookie: x=1",
            "v 1",
            "v1;x",
            "a,b",
            "\"v1\"",
            "a\\b",
            "v\u{e9}",
        ] {
            let s = BackendSpec {
                release: bad.into(),
                ..spec()
            };
            match validate(&s) {
                Err(AdminError::BadRequest(m)) => assert!(m.contains("release"), "{m}"),
                other => panic!("{bad:?} accepted: {other:?}"),
            }
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"BEARER  abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bearerabc"), None);
    }

    #[test]
    fn request_bodies_refuse_unknown_fields() {
        assert!(parse::<WaitRequest>(br#"{"timeout_ms":1,"timeout":2}"#).is_err());
        assert!(parse::<WeightRequest>(br#"{"weight":1,"wieght":2}"#).is_err());
        assert!(parse::<SwitchRequest>(br#"{"activate":[],"standby":[],"x":1}"#).is_err());
        assert!(parse::<WeightsRequest>(br#"{"weights":{},"x":1}"#).is_err());
        // What the deployer sends passes.
        let sent = serde_json::to_vec(&SwitchRequest {
            activate: vec!["a".into()],
            standby: vec!["b".into()],
        })
        .unwrap();
        assert!(parse::<SwitchRequest>(&sent).is_ok());
        let sent = serde_json::to_vec(&WaitRequest { timeout_ms: 5 }).unwrap();
        assert!(parse::<WaitRequest>(&sent).is_ok());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-tokex", b"secret-token"));
        assert!(!constant_time_eq(b"secret", b"secret-token"));
    }

    #[test]
    fn wait_body_is_optional() {
        let d = Duration::from_secs(5);
        assert_eq!(wait_timeout(b"", d).unwrap(), d);
        assert_eq!(
            wait_timeout(br#"{"timeout_ms":250}"#, d).unwrap(),
            Duration::from_millis(250)
        );
        assert!(matches!(
            wait_timeout(b"{", d),
            Err(AdminError::BadRequest(_))
        ));
    }
}
