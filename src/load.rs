//! Steady, bounded HTTP load with exact accounting: the independent client that proves a deploy
//! dropped nothing.
//!
//! Why it exists: "zero downtime" is a claim about requests, so `cutover demo` and the
//! integration tests send traffic through the balancer while a deploy runs and count every
//! request. The count must be honest: every request sent ends as exactly one of ok (2xx) or
//! failed (transport error, timeout, any other status), so `sent == ok + failed` once a run has
//! ended, and ok answers are tallied by the version that served them.
//!
//! Design choices:
//! - Pacing is a fixed schedule, not a token bucket: request slot `n` (0, 1, 2, ...) is due at
//!   `n / rate` seconds after the start, and worker `w` of `c` owns the slots `w, w+c, w+2c, ...`,
//!   so the workers interleave evenly and the total rate is `rate`. Each worker has one request in
//!   flight at a time over its own keep-alive connection. A worker that fell behind (a slow answer)
//!   catches up at no more than twice its own rate, so a stall is never followed by a burst.
//! - Hard bounds: slots stop at `max_requests`; nothing new starts after `max_duration`; each
//!   request has a 10 s timeout ([`REQUEST_TIMEOUT`]), which counts as a failure. Requests in
//!   flight when a bound is reached finish and are counted.
//! - The client is hyper-util's legacy pooled client over HTTP/1.1. It re-sends a request only
//!   when hyper knows the request never left (a pooled connection found closed before use), as
//!   any browser does; everything else is counted as seen.
//! - `rate == 0` means unpaced (each worker sends back to back); `concurrency == 0` means 1.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::sample_app::VERSION_HEADER;

/// Per-request timeout; a request that takes longer is a failure.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How many failure descriptions a report keeps (all failures are counted).
pub const MAX_FAILURES_KEPT: usize = 20;

/// What load to send, and its bounds.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Where to send, e.g. the balancer's listen address.
    pub target: SocketAddr,
    /// Request path, e.g. "/".
    pub path: String,
    /// Requests per second in total, spread evenly (0: unpaced).
    pub rate: u32,
    /// Hard bound on the requests sent.
    pub max_requests: u64,
    /// Hard bound on the time during which requests are started.
    pub max_duration: Duration,
    /// Workers, each with one connection and one request in flight at most.
    pub concurrency: usize,
    /// Extra request headers, e.g. a cookie.
    pub headers: Vec<(String, String)>,
}

impl LoadSpec {
    /// `GET /` on `target` at 100 requests/s by 4 workers, at most 1000 requests or 60 s.
    pub fn new(target: SocketAddr) -> Self {
        Self {
            target,
            path: "/".to_owned(),
            rate: 100,
            max_requests: 1000,
            max_duration: Duration::from_secs(60),
            concurrency: 4,
            headers: Vec::new(),
        }
    }
}

/// Counts of a load run, so far or final.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadReport {
    /// Requests started.
    pub sent: u64,
    /// Requests answered with a 2xx status.
    pub ok: u64,
    /// Requests that failed: transport error, timeout or a status other than 2xx.
    pub failed: u64,
    /// Ok answers per version: the `x-cutover-version` header, else the body's first line
    /// (`(empty)` for an empty body).
    pub by_version: BTreeMap<String, u64>,
    /// The first [`MAX_FAILURES_KEPT`] failures, each prefixed by the time since the start.
    pub failures: Vec<String>,
    /// Time since the start (until the last request ended, once the run is over).
    pub elapsed: Duration,
}

impl LoadReport {
    /// Share of ok answers served by `version`, in percent (0 when nothing succeeded).
    pub fn share(&self, version: &str) -> f64 {
        if self.ok == 0 {
            return 0.0;
        }
        let of_version = self.by_version.get(version).copied().unwrap_or(0);
        of_version as f64 * 100.0 / self.ok as f64
    }

    /// Requests sent whose outcome is not known yet.
    pub fn in_flight(&self) -> u64 {
        self.sent - self.ok - self.failed
    }
}

impl fmt::Display for LoadReport {
    /// One line, e.g. `200 sent, 200 ok, 0 failed in 0.50s (v1 40.0%, v2 60.0%)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} sent, {} ok, {} failed in {:.2}s",
            self.sent,
            self.ok,
            self.failed,
            self.elapsed.as_secs_f64()
        )?;
        if !self.by_version.is_empty() {
            let shares: Vec<String> = self
                .by_version
                .keys()
                .map(|v| format!("{v} {:.1}%", self.share(v)))
                .collect();
            write!(f, " ({})", shares.join(", "))?;
        }
        Ok(())
    }
}

/// A load run in progress; dropping it stops issuing new requests.
#[derive(Debug)]
pub struct LoadRun {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
}

/// Starts a load run on the current tokio runtime and returns at once.
///
/// # Panics
/// When called outside a tokio runtime.
pub fn start(spec: LoadSpec) -> LoadRun {
    let started = Instant::now();
    let concurrency = spec.concurrency.max(1);
    let request = RequestTemplate::new(&spec);
    let (progress, _) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        started,
        tally: Mutex::new(LoadReport::default()),
        ended: Mutex::new(None),
        workers_left: AtomicUsize::new(concurrency),
        progress,
    });
    let (stop, _) = watch::channel(false);
    let schedule = Schedule {
        started,
        rate: spec.rate,
        concurrency: concurrency as u64,
        max_requests: spec.max_requests,
        deadline: started + spec.max_duration,
    };
    let workers = (0..concurrency as u64)
        .map(|worker| {
            let run = Worker {
                index: worker,
                schedule: schedule.clone(),
                request: request.clone(),
                shared: shared.clone(),
                stop: stop.subscribe(),
            };
            tokio::spawn(run.run())
        })
        .collect();
    LoadRun {
        shared,
        stop,
        workers,
    }
}

impl LoadRun {
    /// Counts so far; `sent` may exceed `ok + failed` by the requests in flight.
    pub fn snapshot(&self) -> LoadReport {
        self.shared.report()
    }

    /// Waits until `done` holds for the counts (checked after every completed request) or the run
    /// has ended, and returns the counts then. Bound it with a timeout where the run is long.
    pub async fn wait_until(&self, mut done: impl FnMut(&LoadReport) -> bool) -> LoadReport {
        let mut progress = self.shared.progress.subscribe();
        loop {
            progress.borrow_and_update();
            let report = self.shared.report();
            if done(&report) || self.shared.is_over() {
                return report;
            }
            if progress.changed().await.is_err() {
                return self.shared.report();
            }
        }
    }

    /// Stops issuing new requests, waits for those in flight, and returns the final counts.
    pub async fn stop(mut self) -> LoadReport {
        self.stop.send_replace(true);
        self.join().await
    }

    /// Waits until the run ends by itself (`max_requests` sent or `max_duration` over) and returns
    /// the final counts.
    pub async fn finish(mut self) -> LoadReport {
        self.join().await
    }

    async fn join(&mut self) -> LoadReport {
        for worker in std::mem::take(&mut self.workers) {
            if let Err(error) = worker.await {
                // A worker never panics by design; if one did, its request is still counted as
                // sent, so the report shows the gap rather than hiding it.
                tracing::error!(error = %error, "load worker failed");
            }
        }
        self.shared.report()
    }
}

impl Drop for LoadRun {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// State shared between the workers and the [`LoadRun`].
#[derive(Debug)]
struct Shared {
    started: Instant,
    tally: Mutex<LoadReport>,
    /// When the last worker ended.
    ended: Mutex<Option<Instant>>,
    workers_left: AtomicUsize,
    /// Bumped after every completed request and when a worker ends.
    progress: watch::Sender<u64>,
}

impl Shared {
    fn tally(&self) -> MutexGuard<'_, LoadReport> {
        // A poisoned lock only means a panic elsewhere; the counts themselves stay consistent.
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self) -> LoadReport {
        let mut report = self.tally().clone();
        let ended = *self.ended.lock().unwrap_or_else(|e| e.into_inner());
        report.elapsed = ended.unwrap_or_else(Instant::now) - self.started;
        report
    }

    fn is_over(&self) -> bool {
        self.workers_left.load(Ordering::Acquire) == 0
    }

    fn record_sent(&self) {
        self.tally().sent += 1;
    }

    fn record(&self, outcome: Outcome) {
        {
            let mut tally = self.tally();
            match outcome {
                Outcome::Ok { version } => {
                    tally.ok += 1;
                    *tally.by_version.entry(version).or_default() += 1;
                }
                Outcome::Failed { description } => {
                    tally.failed += 1;
                    if tally.failures.len() < MAX_FAILURES_KEPT {
                        let at = self.started.elapsed().as_secs_f64();
                        tally.failures.push(format!("{at:.3}s {description}"));
                    }
                }
            }
        }
        self.progress.send_modify(|n| *n += 1);
    }

    fn worker_ended(&self) {
        if self.workers_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        self.progress.send_modify(|n| *n += 1);
    }
}

/// When each request slot is due.
#[derive(Debug, Clone)]
struct Schedule {
    started: Instant,
    rate: u32,
    concurrency: u64,
    max_requests: u64,
    deadline: Instant,
}

impl Schedule {
    /// When slot `n` is due (`None` when unpaced).
    fn due(&self, slot: u64) -> Option<Instant> {
        if self.rate == 0 {
            return None;
        }
        let nanos = u128::from(slot) * 1_000_000_000 / u128::from(self.rate);
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX);
        Some(self.started + Duration::from_nanos(nanos))
    }

    /// Smallest gap between two sends of one worker: half its own interval, so a late worker
    /// catches up at twice its rate at most.
    fn min_gap(&self) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.concurrency * 1_000_000_000 / u64::from(self.rate) / 2)
    }

    /// When the worker sends slot `slot`, given when it sent its previous one; `None` once the
    /// slot is beyond the bounds.
    fn send_at(&self, slot: u64, previous: Option<Instant>, now: Instant) -> Option<Instant> {
        if slot >= self.max_requests {
            return None;
        }
        let due = self.due(slot).unwrap_or(now);
        let at = match previous {
            Some(previous) => due.max(previous + self.min_gap()),
            None => due,
        };
        (at < self.deadline).then_some(at)
    }
}

/// The parts of the request every worker sends.
#[derive(Debug, Clone)]
struct RequestTemplate {
    uri: Uri,
    headers: HeaderMap,
    /// Why no request can be built (an invalid path or header): every request fails with it.
    invalid: Option<String>,
}

impl RequestTemplate {
    fn new(spec: &LoadSpec) -> Self {
        let mut invalid = None;
        let path = if spec.path.starts_with('/') {
            spec.path.clone()
        } else {
            format!("/{}", spec.path)
        };
        let uri = format!("http://{}{path}", spec.target)
            .parse::<Uri>()
            .unwrap_or_else(|e| {
                invalid = Some(format!("invalid path {:?}: {e}", spec.path));
                Uri::default()
            });
        let headers = header_map(&spec.headers).unwrap_or_else(|e| {
            invalid = Some(format!("{e:#}"));
            HeaderMap::new()
        });
        Self {
            uri,
            headers,
            invalid,
        }
    }

    fn build(&self) -> Result<Request<Empty<Bytes>>, String> {
        if let Some(invalid) = &self.invalid {
            return Err(invalid.clone());
        }
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        Ok(request)
    }
}

/// How one request ended.
#[derive(Debug)]
enum Outcome {
    Ok { version: String },
    Failed { description: String },
}

/// One worker: its share of the slots, one request at a time over its own connection.
struct Worker {
    index: u64,
    schedule: Schedule,
    request: RequestTemplate,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
}

impl Worker {
    async fn run(mut self) {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build(connector);
        let mut slot = self.index;
        let mut previous = None;
        while let Some(at) = self.schedule.send_at(slot, previous, Instant::now()) {
            tokio::select! {
                biased;
                _ = self.stop.wait_for(|stop| *stop) => break,
                () = tokio::time::sleep_until(at) => {}
            }
            previous = Some(Instant::now());
            self.shared.record_sent();
            let outcome = send(&client, &self.request).await;
            self.shared.record(outcome);
            slot += self.schedule.concurrency;
        }
        self.shared.worker_ended();
    }
}

/// Sends one request and classifies the answer.
async fn send(client: &Client<HttpConnector, Empty<Bytes>>, template: &RequestTemplate) -> Outcome {
    let request = match template.build() {
        Ok(request) => request,
        Err(description) => return Outcome::Failed { description },
    };
    let exchange = async {
        let response = client.request(request).await.map_err(|e| error_chain(&e))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| {
                format!(
                    "status {} then body error: {}",
                    parts.status.as_u16(),
                    error_chain(&e)
                )
            })?
            .to_bytes();
        Ok::<_, String>((parts, body))
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Err(_) => Outcome::Failed {
            description: format!("timeout: no answer within {REQUEST_TIMEOUT:?}"),
        },
        Ok(Err(description)) => Outcome::Failed { description },
        Ok(Ok((parts, _))) if !parts.status.is_success() => Outcome::Failed {
            description: format!("status {}", parts.status.as_u16()),
        },
        Ok(Ok((parts, body))) => Outcome::Ok {
            version: version_of(&parts.headers, &body),
        },
    }
}

/// The version that answered: the `x-cutover-version` header, else the body's first line.
fn version_of(headers: &HeaderMap, body: &[u8]) -> String {
    if let Some(version) = headers.get(VERSION_HEADER).and_then(|v| v.to_str().ok()) {
        return version.to_owned();
    }
    let text = String::from_utf8_lossy(body);
    match text.lines().next().map(str::trim) {
        Some(line) if !line.is_empty() => line.to_owned(),
        _ => "(empty)".to_owned(),
    }
}

/// An error with its causes, e.g. `client error (Connect): tcp connect error: Connection refused`.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Request headers from name/value pairs (repeated names are kept).
fn header_map(pairs: &[(String, String)]) -> anyhow::Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        let name = HeaderName::from_bytes(name.as_bytes())
            .with_context(|| format!("invalid header name {name:?}"))?;
        let value = HeaderValue::from_str(value)
            .with_context(|| format!("invalid value for header {name}: {value:?}"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// One-off `GET path` on `target` (own connection, 10 s timeout), for tests and probes: returns
/// the status, the body (lossy UTF-8) and the `x-cutover-version` header.
pub async fn get(
    target: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> anyhow::Result<(u16, String, Option<String>)> {
    let exchange = async {
        let mut request = Request::new(Empty::<Bytes>::new());
        *request.uri_mut() = path
            .parse::<Uri>()
            .with_context(|| format!("invalid path {path:?}"))?;
        *request.headers_mut() = header_map(headers)?;
        if !request.headers().contains_key(header::HOST) {
            let host = HeaderValue::from_str(&target.to_string())?;
            request.headers_mut().insert(header::HOST, host);
        }
        let stream = tokio::net::TcpStream::connect(target)
            .await
            .with_context(|| format!("cannot connect to {target}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP handshake with {target} failed"))?;
        let connection = tokio::spawn(connection);
        let result = async {
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let version = response
                .headers()
                .get(VERSION_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&body).into_owned(), version))
        }
        .await;
        connection.abort();
        result.with_context(|| format!("GET {path} on {target} failed"))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("GET {path} on {target}: no answer within {REQUEST_TIMEOUT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(rate: u32, concurrency: u64, max_requests: u64) -> Schedule {
        let started = Instant::now();
        Schedule {
            started,
            rate,
            concurrency,
            max_requests,
            deadline: started + Duration::from_secs(10),
        }
    }

    #[test]
    fn slots_are_spread_evenly() {
        let s = schedule(400, 4, 100);
        assert_eq!(s.due(0), Some(s.started));
        assert_eq!(s.due(1).unwrap() - s.started, Duration::from_micros(2500));
        assert_eq!(s.due(400).unwrap() - s.started, Duration::from_secs(1));
        assert_eq!(s.min_gap(), Duration::from_millis(5));
    }

    #[test]
    fn bounds_end_the_schedule() {
        let s = schedule(10, 1, 5);
        assert!(s.send_at(4, None, s.started).is_some());
        assert_eq!(s.send_at(5, None, s.started), None, "max_requests");
        // Slot 100 is due at 10 s, the deadline: not sent.
        let s = schedule(10, 1, 1000);
        assert!(s.send_at(99, None, s.started).is_some());
        assert_eq!(s.send_at(100, None, s.started), None, "max_duration");
    }

    #[test]
    fn late_worker_catches_up_without_burst() {
        let s = schedule(100, 1, 1000);
        // Slot 5 was due at 50 ms but the previous send was at 48 ms: wait for half an interval.
        let previous = s.started + Duration::from_millis(48);
        let at = s.send_at(5, Some(previous), s.started).unwrap();
        assert_eq!(at - s.started, Duration::from_millis(53));
        // On time: the schedule wins.
        let previous = s.started + Duration::from_millis(40);
        let at = s.send_at(5, Some(previous), s.started).unwrap();
        assert_eq!(at - s.started, Duration::from_millis(50));
    }

    #[test]
    fn unpaced_sends_at_once() {
        let s = schedule(0, 2, 10);
        let now = s.started + Duration::from_millis(7);
        assert_eq!(s.send_at(3, Some(s.started), now), Some(now));
    }

    #[test]
    fn share_and_display() {
        let mut report = LoadReport {
            sent: 5,
            ok: 4,
            failed: 1,
            ..LoadReport::default()
        };
        assert_eq!(report.share("v1"), 0.0);
        report.by_version.insert("v1".into(), 1);
        report.by_version.insert("v2".into(), 3);
        assert_eq!(report.share("v1"), 25.0);
        assert_eq!(report.share("v2"), 75.0);
        assert_eq!(report.in_flight(), 0);
        assert_eq!(
            report.to_string(),
            "5 sent, 4 ok, 1 failed in 0.00s (v1 25.0%, v2 75.0%)"
        );
        assert_eq!(LoadReport::default().share("v1"), 0.0);
    }

    #[test]
    fn version_from_header_else_first_line() {
        let mut headers = HeaderMap::new();
        assert_eq!(version_of(&headers, b"v3\nmore"), "v3");
        assert_eq!(version_of(&headers, b""), "(empty)");
        headers.insert(VERSION_HEADER, HeaderValue::from_static("v4"));
        assert_eq!(version_of(&headers, b"v3\n"), "v4");
    }

    #[test]
    fn invalid_headers_fail_every_request() {
        let mut spec = LoadSpec::new(([127, 0, 0, 1], 1).into());
        spec.headers = vec![("bad name".into(), "x".into())];
        let template = RequestTemplate::new(&spec);
        let error = template.build().unwrap_err();
        assert!(error.contains("invalid header name"), "{error}");
    }

    /// A port nobody listens on: every request fails, and every failure is counted.
    #[tokio::test]
    async fn refused_connections_are_counted() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spec = LoadSpec {
            rate: 1000,
            max_requests: 20,
            concurrency: 2,
            ..LoadSpec::new(([127, 0, 0, 1], port).into())
        };
        let report = start(spec).finish().await;
        assert_eq!(report.sent, 20);
        assert_eq!(report.failed, 20);
        assert_eq!(report.ok, 0);
        assert_eq!(report.failures.len(), 20);
        assert!(
            report.failures[0].contains("onnect"),
            "{:?}",
            report.failures
        );
    }
}
