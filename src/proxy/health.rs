//! Active health checks: the balancer's own view of whether a backend may receive traffic.
//!
//! One task per backend, started when the backend is added (or restored) and aborted when it is
//! removed. The first check runs at once, then one every `interval`; a check is a `GET` of the
//! backend's `health_path` through the shared client pool, passing on any 2xx within `timeout`.
//! Thresholds turn single results into state changes (see [`HealthTrack::record`]), so one slow
//! answer does not eject a backend and one lucky answer does not admit it.
//!
//! The task holds only a `Weak` reference to the proxy, so a dropped proxy stops its checks.
//!
//! [`HealthTrack::record`]: super::router::HealthTrack::record

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Empty};
use hyper::Request;
use hyper::http::uri::{self, PathAndQuery, Scheme};
use tracing::{debug, info, warn};

use super::Health;
use super::Proxy;
use super::router::BackendShared;

/// Starts the checks of a freshly added backend.
pub(crate) fn spawn(proxy: &Arc<Proxy>, backend: Arc<BackendShared>, path: &str) {
    let uid = backend.uid;
    let weak = Arc::downgrade(proxy);
    let path = path.to_string();
    let task = tokio::spawn(run(weak, backend, path));
    proxy.table().set_checker(uid, task.abort_handle());
}

async fn run(proxy: Weak<Proxy>, backend: Arc<BackendShared>, path: String) {
    let target = format!("http://{}{}", backend.authority, path);
    loop {
        let Some(p) = proxy.upgrade() else { return };
        let interval = *p.settings.health.interval;
        let result = check(&p, &backend, &path, &target).await;
        let changed = {
            let mut table = p.table();
            let Some(entry) = table.by_uid_mut(backend.uid) else {
                return;
            };
            let changed = entry.health.record(
                result.clone(),
                p.settings.health.healthy_threshold.0,
                p.settings.health.unhealthy_threshold.0,
            );
            changed.then_some(entry.health.health)
        };
        match (changed, &result) {
            (Some(h), Ok(())) => info!(backend = %backend.id, health = ?h, "health check passed"),
            (Some(h), Err(e)) => {
                warn!(backend = %backend.id, health = ?h, "health check failed: {e}")
            }
            (None, Err(e)) => debug!(backend = %backend.id, "health check failed: {e}"),
            (None, Ok(())) => {}
        }
        if changed.is_some() {
            p.health_changed.notify_waiters();
        }
        if changed == Some(Health::Healthy) {
            // (Re)admitted: failures counted while it was out (streams breaking after an
            // ejection, a break judged after this check) start no new run.
            backend.consecutive_errors.store(0, Ordering::Relaxed);
        }
        drop(p);
        // Between checks, judge the ejections a broken body asks for (its request cannot
        // reach the table).
        let pause = tokio::time::sleep(interval.max(Duration::from_millis(10)));
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                () = backend.body_broke.notified() => {
                    let Some(p) = proxy.upgrade() else { return };
                    let failures = backend.consecutive_errors.load(Ordering::Relaxed);
                    p.passive_failure(&backend, failures, "the response body broke off");
                }
            }
        }
    }
}

/// One check; the error reads like "GET http://127.0.0.11:4100/health: connection refused".
async fn check(
    proxy: &Proxy,
    backend: &BackendShared,
    path: &str,
    target: &str,
) -> Result<(), String> {
    let timeout = *proxy.settings.health.timeout;
    let fail = |what: String| Err(format!("GET {target}: {what}"));
    let pq = match path.parse::<PathAndQuery>() {
        Ok(pq) => pq,
        Err(e) => return fail(format!("bad health path: {e}")),
    };
    let mut parts = uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(backend.authority.clone());
    parts.path_and_query = Some(pq);
    let uri = match hyper::Uri::from_parts(parts) {
        Ok(u) => u,
        Err(e) => return fail(format!("bad address: {e}")),
    };
    let mut req = Request::new(Either::Right(Empty::<Bytes>::new()));
    *req.uri_mut() = uri;
    req.headers_mut().insert(
        hyper::header::USER_AGENT,
        hyper::header::HeaderValue::from_static("cutover-health"),
    );
    let attempt = async {
        let resp = proxy.client.request(req).await.map_err(|e| describe(&e))?;
        let status = resp.status();
        // Read the (small) body so the pooled connection can be reused.
        resp.into_body().collect().await.map_err(|e| describe(&e))?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => fail(e),
        Err(_) => fail(format!("no answer within {timeout:?}")),
    }
}

/// A short reason from an error chain: the io error kind when there is one ("connection
/// refused"), else the innermost message.
pub(crate) fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut last = err;
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return match io.kind() {
                ConnectionRefused => "connection refused".into(),
                ConnectionReset => "connection reset".into(),
                ConnectionAborted => "connection aborted".into(),
                TimedOut => "connect timed out".into(),
                _ => io.to_string(),
            };
        }
        last = e;
        cur = e.source();
    }
    last.to_string()
}
