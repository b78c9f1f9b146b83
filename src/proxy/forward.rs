//! Forwarding one client request: pick a backend, rewrite the request, send it through the
//! pooled client, retry when that is safe, and stream the response back while the request
//! counts as in flight.
//!
//! Design choices:
//! - A retry is only safe when the request cannot have had an effect twice: an idempotent
//!   method, no body, and a failure before any response head arrived that is not a timeout
//!   (a backend that went quiet may still be working on the request). Such requests are sent
//!   with an empty body from the start, so a second attempt is identical to the first. Each
//!   other eligible backend gets at most one attempt. POST, PATCH and any request with a body
//!   are sent at most once: they go to another backend only when connecting to the first
//!   failed (refused, unreachable, connect timeout), so no byte of them left the proxy. Their
//!   body is kept for that: [`Upload`] hands the client's body back when hyper drops it
//!   unpolled (nginx's `proxy_next_upstream error` and HAProxy's `redispatch` do the same).
//! - A backend that stops reading a request body (hyper holds a chunk of it and asks for no
//!   more) for `backend_send` fails the request with 504, like a late head; time waiting on a
//!   slow client's body is the client's and never counts (nginx's `proxy_send_timeout`).
//! - The in-flight guard ([`InFlight`]) travels inside the response body ([`ProxyBody`]), so a
//!   streaming response (SSE, downloads) keeps its backend busy until the last byte is sent or
//!   the client goes away; draining therefore waits for it.
//! - At a drain deadline the backend's cut signal fires: bodies still streaming end with an
//!   error (the client connection is closed), requests still waiting for a head are retried
//!   on another backend when that is safe (their clients never know; the drain report does
//!   not count them as closed), else they get a 502.
//! - WebSocket (HTTP/1.1 `Upgrade`) requests are tunnelled; the tunnel holds the guard too and
//!   is closed by the cut signal, so upgraded connections drain like any other request. It
//!   also holds the client connection's [`Slot`]: a tunnel counts against `max_connections`.
//! - The hot path allocates little: the client's IP header value is built once per
//!   connection, headers are edited in place, and the cut notification is only registered when
//!   a body actually has to wait.

use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{self, PathAndQuery, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::sync::futures::OwnedNotified;
use tracing::{debug, warn};

use super::listener::Slot;
use super::router::{BackendShared, InFlight, Route};
use super::{Proxy, Sticky};
use crate::balancer::api::{PREVIEW_HEADER, STICKY_COOKIE};

/// Body of requests sent to backends: the client's own, or empty (for retryable requests).
pub(crate) type ForwardBody = Either<Upload, Empty<Bytes>>;

/// A client's request body on its way to a backend. It tells apart what the backend did from
/// what the client did: a body the client broke off (it closed mid-upload) fails the attempt
/// through no fault of the backend's, and the backend's head timeout only starts once the
/// body was sent whole (a slow upload is the client's time, not the backend's). While it is
/// being sent, the time the backend leaves a chunk untaken is the backend's: hyper asks the
/// body for its next chunk only once it could write what it has, so a chunk handed over and
/// not followed by another poll for `backend_send` means the backend stopped reading.
///
/// The client's body itself lives in [`UploadProgress::body`], where the request's task can
/// drop it when it gives up on a backend that stopped reading: hyper's client holds the
/// request body until its connection closes, and cannot close a connection it still has bytes
/// to flush to, so the client connection would otherwise wait on a body nobody reads.
pub(crate) struct Upload {
    progress: Arc<UploadProgress>,
    /// Set by the first `poll_frame`: from then on bytes of the body may have left.
    polled: bool,
}

/// What [`Upload`] saw, shared with the request's task.
#[derive(Debug)]
pub(crate) struct UploadProgress {
    /// Reading the client's body failed (closed early, reset, malformed).
    aborted: AtomicBool,
    /// Some attempt polled the body: bytes of it may have left.
    polled: AtomicBool,
    /// The body was read to its end.
    sent: AtomicBool,
    /// When the last chunk was handed to hyper (milliseconds after `epoch`), while hyper has
    /// not asked for the next one: the chunk waits on the backend. [`NOT_HANDED`] while hyper
    /// waits on the client for more.
    handed_at: AtomicU64,
    epoch: tokio::time::Instant,
    /// Notified when the body ends and when a chunk is handed over.
    changed: tokio::sync::Notify,
    /// The client's body. An attempt that polled it takes it away when dropped; one that never
    /// did (hyper drops the request when it cannot connect) leaves it whole, so another
    /// backend can be sent it. `None` once taken away or given up.
    body: std::sync::Mutex<Option<Incoming>>,
}

/// [`UploadProgress::handed_at`] when no chunk waits on the backend.
const NOT_HANDED: u64 = u64::MAX;

impl UploadProgress {
    fn new(body: Incoming) -> Self {
        UploadProgress {
            aborted: AtomicBool::new(false),
            polled: AtomicBool::new(false),
            sent: AtomicBool::new(false),
            handed_at: AtomicU64::new(NOT_HANDED),
            epoch: tokio::time::Instant::now(),
            changed: tokio::sync::Notify::new(),
            body: std::sync::Mutex::new(Some(body)),
        }
    }

    fn finish(&self) {
        if !self.sent.swap(true, Ordering::AcqRel) {
            self.changed.notify_waiters();
        }
    }

    /// hyper took a chunk: until it polls again, the chunk waits on the backend.
    fn handed(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(NOT_HANDED - 1);
        if self.handed_at.swap(now, Ordering::AcqRel) == NOT_HANDED {
            self.changed.notify_waiters();
        }
    }

    fn aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    fn is_sent(&self) -> bool {
        self.sent.load(Ordering::Acquire)
    }

    /// The body is still whole: no attempt read a byte of it.
    fn unsent(&self) -> bool {
        !self.polled.load(Ordering::Acquire) && self.body.lock().is_ok_and(|b| b.is_some())
    }

    /// Drops the client's body: no backend gets it any more, and the client connection stops
    /// waiting for it to be read (it closes once its response is out).
    fn give_up(&self) {
        let body = self.body.lock().ok().and_then(|mut b| b.take());
        drop(body);
    }

    /// Resolves once the body was read to its end (never, if the client breaks it off).
    async fn sent(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.sent.load(Ordering::Acquire) {
                return;
            }
            changed.await;
        }
    }

    /// Resolves once a chunk handed to hyper has waited `limit` for the backend to take it
    /// (hyper asks for the next chunk only when it could write). Never once the body was read
    /// whole: the head timeout takes over then. Time spent waiting on the client is not
    /// counted.
    async fn stalled(&self, limit: std::time::Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.is_sent() {
                return std::future::pending().await;
            }
            match self.handed_at.load(Ordering::Acquire) {
                NOT_HANDED => changed.await,
                at => {
                    let due = self.epoch + std::time::Duration::from_millis(at) + limit;
                    tokio::time::sleep_until(due).await;
                    if self.handed_at.load(Ordering::Acquire) == at && !self.is_sent() {
                        return;
                    }
                }
            }
        }
    }
}

impl Upload {
    fn new(inner: Incoming) -> (Upload, Arc<UploadProgress>) {
        let progress = Arc::new(UploadProgress::new(inner));
        (Upload::resend(progress.clone()), progress)
    }

    /// The same client body again, for another backend after a failed connect.
    fn resend(progress: Arc<UploadProgress>) -> Upload {
        Upload {
            progress,
            polled: false,
        }
    }
}

impl Drop for Upload {
    /// An attempt that polled the body takes it away (part of it may have left); one that
    /// never did (its connection could not be made) leaves it, so the request can go to
    /// another backend with nothing lost.
    fn drop(&mut self) {
        if self.polled {
            self.progress.give_up();
        }
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if !this.polled {
            this.polled = true;
            this.progress.polled.store(true, Ordering::Release);
        }
        // hyper asks for more: it wrote what it had, so the backend is taking the body.
        this.progress.handed_at.store(NOT_HANDED, Ordering::Release);
        let Ok(mut body) = this.progress.body.lock() else {
            return Poll::Ready(None);
        };
        let Some(inner) = &mut *body else {
            return Poll::Ready(None);
        };
        let r = Pin::new(&mut *inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.progress.finish(),
            Poll::Ready(Some(Err(_))) => this.progress.aborted.store(true, Ordering::Release),
            Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => this.progress.finish(),
            Poll::Ready(Some(Ok(_))) => this.progress.handed(),
            Poll::Pending => {}
        }
        r
    }

    /// hyper stops polling a body that says it has ended (a fixed length all sent), so the
    /// end is recorded here too.
    fn is_end_stream(&self) -> bool {
        let Ok(body) = self.progress.body.lock() else {
            return true;
        };
        // A body given up on is not the client's whole body: no end of it is recorded.
        let Some(inner) = &*body else {
            return true;
        };
        let end = inner.is_end_stream();
        if end {
            self.progress.finish();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.progress.body.lock().ok().map_or_else(
            || SizeHint::with_exact(0),
            |b| {
                b.as_ref()
                    .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
            },
        )
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static PREVIEW: HeaderName = HeaderName::from_static(PREVIEW_HEADER);
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 cutover");

/// What the proxy knows about the client connection, computed once per connection.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    /// The client's IP, ready for `X-Forwarded-For`.
    pub(crate) ip: HeaderValue,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub(crate) proto: HeaderValue,
}

impl Peer {
    pub(crate) fn new(addr: std::net::SocketAddr, tls: bool) -> Self {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        let proto = HeaderValue::from_static(if tls { "https" } else { "http" });
        Peer { ip, proto }
    }
}

/// FNV-1a: a stable hash of a sticky header's value (the same value lands on the same release
/// in every proxy process).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The release named by the sticky cookie, if the request carries one.
fn sticky_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (name, value) = c.trim().split_once('=')?;
            (name == STICKY_COOKIE && !value.is_empty())
                .then(|| value.trim_matches('"').to_string())
        })
}

/// Handles one client request; never fails (errors become 502/503 responses). `slot`: the
/// client connection's, kept by a tunnel if the request is upgraded.
pub(crate) async fn handle(
    proxy: &Arc<Proxy>,
    mut req: Request<Incoming>,
    peer: &Peer,
    slot: &Arc<Slot>,
) -> Response<ProxyBody> {
    let upgrade = req.version() == Version::HTTP_11 && wants_upgrade(req.headers());
    if let Some(refused) = refuse_request(&req, &proxy.options.limits) {
        return refused;
    }
    let client_upgrade = upgrade.then(|| (hyper::upgrade::on(&mut req), slot.clone()));
    let (mut parts, body) = req.into_parts();
    // A WebSocket handshake is a GET like any other until a backend answers 101: retried alike.
    let retryable = is_idempotent(&parts.method) && has_no_body(&parts.headers, &body);

    let h2 = parts.version == Version::HTTP_2;
    prepare_request_headers(&mut parts.headers, &parts.uri, peer, upgrade, h2);
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));

    // Only the deployer's secret value opens the preview route; any other value is an ordinary
    // request. Never passed on: a backend has no use for it, and must not learn the secret.
    let preview = parts
        .headers
        .remove(&PREVIEW)
        .is_some_and(|v| proxy.is_preview_value(v.as_bytes()));
    let (cookie, hash) = match &proxy.options.sticky {
        None => (None, None),
        Some(Sticky::Cookie) => (sticky_cookie(&parts.headers), None),
        Some(Sticky::Header(name)) => (None, parts.headers.get(name).map(|v| fnv1a(v.as_bytes()))),
    };
    let cookie_mode = matches!(proxy.options.sticky, Some(Sticky::Cookie));
    let route = Route {
        preview,
        release: cookie.as_deref(),
        hash,
    };

    let Some((mut guard, eligible)) = proxy.table().pick(&[], route) else {
        proxy.unrouted.fetch_add(1, Ordering::Relaxed);
        debug!(method = %parts.method, path = %pq, "no backend available: 503");
        return plain(StatusCode::SERVICE_UNAVAILABLE, "no backend available\n");
    };

    // Keep what a second attempt needs only when one is possible (a request with a body gets
    // one only if its first connect fails).
    let template = (eligible > 1).then(|| (parts.method.clone(), parts.headers.clone()));
    let (body, upload) = if retryable {
        (Either::Right(Empty::new()), None)
    } else {
        let (body, progress) = Upload::new(body);
        (Either::Left(body), Some(progress))
    };
    let mut req = Request::from_parts(parts, body);
    *req.version_mut() = Version::HTTP_11;
    let mut tried: Vec<u64> = Vec::new();

    loop {
        let backend = guard.backend().clone();
        *req.uri_mut() = match backend_uri(&backend, &pq) {
            Some(u) => u,
            None => return bad_gateway(proxy, false),
        };
        backend.sent();
        let started = Instant::now();
        let method = req.method().clone();
        let waiting = Waiting::new(proxy, &backend, upload.as_deref(), started);
        let sent = send(proxy, &guard, req, upload.as_deref()).await;
        waiting.ended();
        match sent {
            Ok(resp)
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS && client_upgrade.is_none() =>
            {
                // A switch the client never asked for: the client cannot speak whatever the
                // backend switched to, so this is the backend failing the request.
                let failures = backend.failed();
                proxy.passive_failure(&backend, failures, "101 to a request without Upgrade");
                debug!(backend = %backend.id, %method, path = %pq, "unsolicited 101: 502");
                return bad_gateway(proxy, false);
            }
            Ok(mut resp) => {
                let latency = micros_since(started);
                let status = resp.status().as_u16();
                let failures = backend.answered(status, latency, proxy.options.eject_on_5xx);
                if failures > 0 {
                    proxy.passive_failure(&backend, failures, &format!("status {status}"));
                }
                debug!(backend = %backend.id, %method, path = %pq, status, latency_us = latency, "forwarded");
                if cookie_mode && cookie.as_deref() != Some(&*backend.release_name) {
                    if let Some(c) = &backend.sticky_cookie {
                        resp.headers_mut().append(header::SET_COOKIE, c.clone());
                    }
                }
                let idle = proxy.options.timeouts.client_idle;
                let version = if h2 {
                    Version::HTTP_2
                } else {
                    Version::HTTP_11
                };
                return respond(resp, guard, client_upgrade, failures > 0, idle, version);
            }
            Err(e) if upload.as_ref().is_some_and(|u| u.aborted()) => {
                // The client broke its body off: no failure of the backend's (it would fail a
                // canary's analysis and count towards ejecting a healthy backend).
                proxy.client_aborted.fetch_add(1, Ordering::Relaxed);
                debug!(backend = %backend.id, %method, path = %pq, "the client broke its request body off: {e}");
                return plain(StatusCode::BAD_REQUEST, "the request body was broken off\n");
            }
            Err(e) => {
                let failures = backend.failed();
                let reason = e.to_string();
                let timed_out = matches!(e, SendError::Timeout(_) | SendError::SendStalled(_));
                let cut = matches!(e, SendError::Cut);
                let not_connected = matches!(&e, SendError::Client(c) if c.is_connect());
                debug!(backend = %backend.id, %method, path = %pq, "backend failed: {reason}");
                proxy.passive_failure(&backend, failures, &reason);
                // The client's body goes with the request: a connection still trying to write
                // it to a backend that stopped reading must not keep the client waiting.
                let fail = |timed_out| {
                    if let Some(u) = &upload {
                        u.give_up();
                    }
                    bad_gateway(proxy, timed_out)
                };
                // A backend that took the request and went quiet may still be working on it:
                // only a refusal or a reset before any answer is retried (a timeout retried on
                // every backend would also make the client wait N times the timeout).
                if timed_out {
                    backend.waited_without_answer(micros_since(started));
                    return fail(true);
                }
                let Some((method, headers)) = &template else {
                    return fail(false);
                };
                // A request with a body goes on only if no byte of it can have left: the
                // connect failed, and hyper handed its body back untouched.
                let body = match &upload {
                    None => Either::Right(Empty::new()),
                    Some(progress) if not_connected && progress.unsent() => {
                        Either::Left(Upload::resend(progress.clone()))
                    }
                    Some(_) => return fail(false),
                };
                tried.push(backend.uid);
                let Some((next, _)) = proxy.table().pick(&tried, route) else {
                    return fail(false);
                };
                if cut {
                    // Counted while the cut backend still has the request in flight, so a
                    // drain report that waits for it to settle sees the count.
                    backend.cut_and_retried.fetch_add(1, Ordering::Relaxed);
                }
                drop(guard);
                backend.retried();
                guard = next;
                req = Request::new(body);
                *req.method_mut() = method.clone();
                *req.headers_mut() = headers.clone();
            }
        }
    }
}

/// The proxy's own answer to a request it must not forward, if this is one. These are the
/// client's errors, answered before any backend is picked: no backend's failure, and not
/// counted in `unrouted` (like hyper's own 400 to a malformed head).
fn refuse_request<B>(req: &Request<B>, limits: &super::Limits) -> Option<Response<ProxyBody>> {
    // hyper enforces both head limits on HTTP/1.1 (431, not counted either); on HTTP/2 it
    // counts no fields, and lets a header list through up to a multiple of the byte limit
    // (see the listener) so that one over it gets this 431 rather than a stream reset.
    if req.version() == Version::HTTP_2 && h2_head_too_large(req, limits) {
        return Some(plain(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header fields too large\n",
        ));
    }
    // hyper decodes `chunked` (it must come last) and leaves any coding before it in the
    // header, which is hop-by-hop and removed: the backend would get a body still encoded
    // with no word of it. RFC 9112 §6.1: a coding the server does not understand gets 501.
    let mut codings = req
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim);
    let chunked_alone = codings
        .next()
        .is_some_and(|c| c.eq_ignore_ascii_case("chunked"))
        && codings.next().is_none();
    if req.headers().contains_key(header::TRANSFER_ENCODING) && !chunked_alone {
        return Some(plain(
            StatusCode::NOT_IMPLEMENTED,
            "transfer codings other than chunked are not supported: send the body with Content-Length or Transfer-Encoding: chunked alone\n",
        ));
    }
    // A reverse proxy is no tunnel to anywhere a client names: CONNECT is never forwarded.
    if req.method() == Method::CONNECT {
        return Some(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported: this is a reverse proxy, not a forward proxy\n",
        ));
    }
    // The asterisk-form target means the server as a whole, and only for OPTIONS (RFC 9112
    // §3.2.4).
    if req.uri().path() == "*" && req.method() != Method::OPTIONS {
        return Some(plain(
            StatusCode::BAD_REQUEST,
            "the request-target `*` is only for OPTIONS\n",
        ));
    }
    // RFC 9112 §3.2: an HTTP/1.1 request without Host, or with more than one, gets 400 (nginx
    // and HAProxy do): which site it is for would be the backend's guess.
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && req.version() == Version::HTTP_11) {
        return Some(plain(
            StatusCode::BAD_REQUEST,
            "an HTTP/1.1 request needs exactly one Host header\n",
        ));
    }
    None
}

/// An HTTP/2 request over `max_headers` fields or `max_header_bytes`. Fields are counted as
/// they reach the backend: the `Cookie` fields an HTTP/2 client sends apart (RFC 9113 §8.2.3)
/// are joined into one. Bytes are counted as HTTP/2 does (RFC 9113 §6.5.2: name, value and 32
/// per field, pseudo-header fields included).
fn h2_head_too_large<B>(req: &Request<B>, limits: &super::Limits) -> bool {
    let headers = req.headers();
    let cookies = headers.get_all(header::COOKIE).iter().count();
    let fields = headers.len() - cookies.saturating_sub(1);
    if fields > limits.max_headers {
        return true;
    }
    let uri = req.uri();
    let pseudo = [
        (":method", req.method().as_str().len()),
        (":scheme", uri.scheme_str().map_or(0, str::len)),
        (
            ":authority",
            uri.authority().map_or(0, |a| a.as_str().len()),
        ),
        (
            ":path",
            uri.path_and_query().map_or(0, |p| p.as_str().len()),
        ),
    ];
    let bytes = pseudo.iter().map(|(n, v)| n.len() + v + 32).sum::<usize>()
        + headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum::<usize>();
    bytes > limits.max_header_bytes
}

/// Watches an attempt while it waits for its backend's response head, so that every request
/// ends with an outcome in the counters. When the client goes away meanwhile (its own timeout
/// ran out, it closed the connection, it reset an HTTP/2 stream), hyper drops the request's
/// future at its `.await`: no status, no proxy error, no 502 is counted. This guard's `Drop`
/// sees that it was not [`Waiting::ended`] and records the outcome:
/// - the request had been sent whole: **abandoned**, a failure of the backend's (it kept the
///   client waiting past its patience; a backend stalled during a deploy must not look clean
///   to clients whose timeout is shorter than `backend_header_timeout`);
/// - the client had not finished sending its body: **client aborted**, the client's doing
///   and no failure, like an upload broken off (see [`Upload`]).
///
/// Neither counts against passive health: when the client leaves is the client's choice.
struct Waiting<'a> {
    proxy: &'a Proxy,
    /// `None` once the attempt ended with an outcome of its own.
    backend: Option<&'a Arc<BackendShared>>,
    upload: Option<&'a UploadProgress>,
    started: Instant,
}

impl<'a> Waiting<'a> {
    fn new(
        proxy: &'a Proxy,
        backend: &'a Arc<BackendShared>,
        upload: Option<&'a UploadProgress>,
        started: Instant,
    ) -> Self {
        Waiting {
            proxy,
            backend: Some(backend),
            upload,
            started,
        }
    }

    /// The attempt ended (a head, or an error): its outcome is counted where it is handled.
    fn ended(mut self) {
        self.backend = None;
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(backend) = self.backend.take() else {
            return;
        };
        if self.upload.is_some_and(|u| !u.is_sent()) {
            self.proxy.client_aborted.fetch_add(1, Ordering::Relaxed);
            debug!(backend = %backend.id, "the client went away before sending its request body whole");
        } else {
            backend.abandoned();
            backend.waited_without_answer(micros_since(self.started));
            debug!(backend = %backend.id, "the client went away while waiting for the response head");
        }
    }
}

fn micros_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Why an attempt produced no response head.
#[derive(Debug)]
enum SendError {
    Client(hyper_util::client::legacy::Error),
    Cut,
    /// No response head within `backend_header_timeout`.
    Timeout(std::time::Duration),
    /// The backend took none of the request body for `backend_send_timeout`.
    SendStalled(std::time::Duration),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Client(e) => f.write_str(&super::health::describe(e)),
            SendError::Cut => f.write_str("closed at the drain deadline"),
            SendError::Timeout(d) => write!(f, "no response head within {d:?}"),
            SendError::SendStalled(d) => write!(f, "took none of the request body for {d:?}"),
        }
    }
}

/// Sends one attempt, giving up when the backend's drain deadline cuts it, when it left a chunk
/// of the request body untaken for `backend_send`, or when no response head came within
/// `backend_header` of the request body's end (`upload`: the client's body, when it has one).
async fn send(
    proxy: &Proxy,
    guard: &InFlight,
    req: Request<ForwardBody>,
    upload: Option<&UploadProgress>,
) -> Result<Response<Incoming>, SendError> {
    // Waiting on the cut signal before looking at the flag: a cut between the two is seen.
    let cut = guard.backend().cut.notified();
    if guard.is_cut() {
        return Err(SendError::Cut);
    }
    let response = proxy.client.request(req);
    let limit = proxy.options.timeouts.backend_header;
    let timeout = async {
        if let Some(u) = upload {
            u.sent().await;
        }
        tokio::time::sleep(limit).await;
    };
    let send_limit = proxy.options.timeouts.backend_send;
    let stalled = async {
        match upload {
            Some(u) => u.stalled(send_limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(response, cut, timeout, stalled);
    // Fast path: a pooled connection may answer without ever waiting on the cut signal.
    tokio::select! {
        biased;
        r = &mut response => r.map_err(SendError::Client),
        _ = &mut cut => Err(SendError::Cut),
        _ = &mut timeout => Err(SendError::Timeout(limit)),
        _ = &mut stalled => Err(SendError::SendStalled(send_limit)),
    }
    .and_then(|r| {
        if guard.is_cut() {
            Err(SendError::Cut)
        } else {
            Ok(r)
        }
    })
}

/// `client_upgrade`: the client side of an upgrade and its connection's slot, when the client
/// asked for one. `head_failed`: the head already counted against the backend's passive
/// health (a 5xx with `eject_on_5xx`). `version`: the client connection's; the response goes
/// out in it, whatever the backend spoke (RFC 9110 §2.5: an intermediary sends its own
/// version; hyper would otherwise write a backend's `HTTP/1.0` to an HTTP/1.1 client, which
/// then treats the connection as HTTP/1.0).
fn respond(
    mut resp: Response<Incoming>,
    guard: InFlight,
    client_upgrade: Option<(hyper::upgrade::OnUpgrade, Arc<Slot>)>,
    head_failed: bool,
    idle: std::time::Duration,
    version: Version,
) -> Response<ProxyBody> {
    *resp.version_mut() = version;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some((client, slot)) = client_upgrade {
            let backend = hyper::upgrade::on(&mut resp);
            let (mut parts, _) = resp.into_parts();
            let proto = parts.headers.get(header::UPGRADE).cloned();
            strip_hop_by_hop(&mut parts.headers);
            if let Some(p) = proto {
                parts.headers.insert(header::UPGRADE, p);
            }
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            guard.backend().completed();
            tokio::spawn(tunnel(client, backend, guard, slot, idle));
            return Response::from_parts(parts, ProxyBody::Static(None));
        }
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let status = parts.status.as_u16();
    Response::from_parts(
        parts,
        ProxyBody::Upstream(Upstream::new(body, guard, status, head_failed)),
    )
}

/// Copies bytes both ways for an upgraded connection until either side closes or the backend's
/// drain deadline cuts it; the client connection's `slot` is given back when it ends.
/// An upgraded connection (a WebSocket) carried both ways until either side closes it, the
/// backend's drain deadline cuts it, or nothing moves either way for `idle` (`client_idle`,
/// as nginx's `proxy_read_timeout` does): a tunnel holds a `max_connections` place, and idle
/// ones left open would fill them for good. Apps that keep WebSockets open ping well within it.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    guard: InFlight,
    _slot: Arc<Slot>,
    idle: std::time::Duration,
) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(pair) => pair,
        Err(e) => {
            debug!(backend = %guard.backend().id, "upgrade failed: {e}");
            return;
        }
    };
    let moved = Arc::new(LastMoved::new());
    let mut client = Watched {
        io: TokioIo::new(client),
        moved: moved.clone(),
    };
    let mut upstream = Watched {
        io: TokioIo::new(backend),
        moved: moved.clone(),
    };
    let cut = guard.backend().cut.notified();
    tokio::pin!(cut);
    cut.as_mut().enable();
    if guard.is_cut() {
        return;
    }
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = r {
                debug!(backend = %guard.backend().id, "upgraded connection ended: {e}");
            }
        }
        _ = &mut cut => debug!(backend = %guard.backend().id, "upgraded connection closed at the drain deadline"),
        _ = moved.idle_for(idle) => debug!(backend = %guard.backend().id, "upgraded connection closed: idle for client_idle"),
    }
}

/// When bytes last moved through a tunnel, either way.
struct LastMoved {
    start: tokio::time::Instant,
    /// Milliseconds after `start`.
    at_ms: std::sync::atomic::AtomicU64,
}

impl LastMoved {
    fn new() -> LastMoved {
        LastMoved {
            start: tokio::time::Instant::now(),
            at_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.at_ms.store(ms, Ordering::Relaxed);
    }

    /// Returns once nothing has moved for `idle`.
    async fn idle_for(&self, idle: std::time::Duration) {
        loop {
            let last = self.at_ms.load(Ordering::Relaxed);
            let due = self.start + std::time::Duration::from_millis(last) + idle;
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// One side of a tunnel, noting every read that brought bytes (what one side reads, the other
/// is written: reads on both sides see all traffic).
struct Watched<T> {
    io: T,
    moved: Arc<LastMoved>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.moved.touch();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn backend_uri(backend: &BackendShared, pq: &PathAndQuery) -> Option<Uri> {
    let mut parts = uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(backend.authority.clone());
    parts.path_and_query = Some(pq.clone());
    Uri::from_parts(parts).ok()
}

/// 502 when no backend could answer; 504 when the last one tried timed out.
fn bad_gateway(proxy: &Proxy, timed_out: bool) -> Response<ProxyBody> {
    proxy.unrouted.fetch_add(1, Ordering::Relaxed);
    if timed_out {
        plain(StatusCode::GATEWAY_TIMEOUT, "no backend answered in time\n")
    } else {
        plain(StatusCode::BAD_GATEWAY, "no backend could answer\n")
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Static(Some(Bytes::from_static(text.as_bytes()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// No `Content-Length` above zero, no `Transfer-Encoding`, and (for HTTP/2) no data frames.
fn has_no_body(headers: &HeaderMap, body: &Incoming) -> bool {
    let length_zero = headers
        .get(header::CONTENT_LENGTH)
        .is_none_or(|v| v.as_bytes() == b"0");
    length_zero && !headers.contains_key(header::TRANSFER_ENCODING) && body.is_end_stream()
}

/// An `Upgrade` the proxy passes on. `h2c` is not one: the proxy speaks HTTP/1.1 to backends
/// and counts each request, so such a request is answered as plain HTTP/1.1 (which RFC 9110
/// allows a server to do), its `Upgrade` dropped with the other hop-by-hop headers.
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(tokens)
        .any(|t| !t.eq_ignore_ascii_case("h2c"))
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case("upgrade")))
}

fn tokens(v: &HeaderValue) -> impl Iterator<Item = &str> {
    v.to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers: the fixed list and every header the `Connection` header names.
/// `Trailer` is not one (RFC 9110 §6.6.2): it says which trailer fields follow a chunked body,
/// and hyper sends trailers only for the fields it lists, so it must pass both ways.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(tokens)
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            // `Connection` may name only hop-by-hop fields (RFC 9110 §7.6.1): the ones every
            // hop needs are never taken out on its word (`Connection: close, host` would send
            // the backend no Host, and a named `Content-Length` would reframe the body).
            .filter(|n| *n != header::HOST && *n != header::CONTENT_LENGTH)
            .collect();
        for n in named {
            headers.remove(n);
        }
        headers.remove(header::CONNECTION);
    }
    for h in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        if headers.contains_key(h) {
            headers.remove(h);
        }
    }
}

/// Edits a client's request headers for the backend: hop-by-hop headers out (an upgrade's
/// kept), `Host` from an HTTP/2 `:authority`, the `Cookie` fields an HTTP/2 client sends apart
/// joined into one (RFC 9113 §8.2.3: HTTP/1.1 servers read one), `X-Forwarded-*` and `Via`.
fn prepare_request_headers(
    headers: &mut HeaderMap,
    uri: &Uri,
    peer: &Peer,
    upgrade: bool,
    h2: bool,
) {
    let upgrade_to = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    // `TE` is hop-by-hop, but the proxy passes trailers on: a client that accepts them has
    // the backend told so for this hop too (a hyper backend sends trailers only then).
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .flat_map(tokens)
        .any(|t| t.eq_ignore_ascii_case("trailers"));
    strip_hop_by_hop(headers);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(proto) = upgrade_to {
        headers.insert(header::UPGRADE, proto);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if h2 {
        join_cookies(headers);
    }
    // HTTP/2 clients send the host as :authority; HTTP/1.1 backends want a Host header. An
    // HTTP/1.1 absolute-form target's authority wins over its Host too (RFC 9112 §3.2.2).
    if let Some(a) = uri.authority() {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            headers.insert(header::HOST, v);
        }
    }
    let xff = match headers.get(&X_FORWARDED_FOR) {
        None => peer.ip.clone(),
        Some(old) => {
            let mut v = Vec::with_capacity(old.len() + 2 + peer.ip.len());
            v.extend_from_slice(old.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer.ip.as_bytes());
            HeaderValue::from_bytes(&v).unwrap_or_else(|_| peer.ip.clone())
        }
    };
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    headers.insert(X_FORWARDED_PROTO.clone(), peer.proto.clone());
    headers.append(header::VIA, VIA_VALUE.clone());
}

/// Joins several `Cookie` fields into one, separated by `; `.
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Body of every response the proxy sends.
#[derive(Debug)]
pub enum ProxyBody {
    /// A backend's response, streamed while its request counts as in flight.
    Upstream(Upstream),
    /// A response the proxy made itself.
    Static(Option<Bytes>),
}

/// A backend's response body plus the request's in-flight guard.
#[derive(Debug)]
pub struct Upstream {
    inner: Incoming,
    guard: Option<InFlight>,
    /// Registered on the backend's cut signal the first time the body has to wait.
    cut: Option<Pin<Box<OwnedNotified>>>,
    /// The response head's status, already counted: a body that breaks after a 5xx is not a
    /// second failure.
    status: u16,
    /// The head already counted against passive health: a broken body is not a second
    /// failure in a row either.
    head_failed: bool,
}

impl Drop for Upstream {
    /// hyper stops polling a body whose length says it has ended (an empty or fixed-length
    /// one), so its end may never be polled; and a client may leave mid-body, which is no
    /// failure of the backend's. Either way the backend did not fail this response (a cut or
    /// a break took the guard already).
    fn drop(&mut self) {
        self.end_unfailed();
    }
}

impl Upstream {
    fn new(inner: Incoming, guard: InFlight, status: u16, head_failed: bool) -> Self {
        Upstream {
            inner,
            guard: Some(guard),
            cut: None,
            status,
            head_failed,
        }
    }

    /// The body ended without the backend failing it (whole, or the client left): the request
    /// is no longer in flight, and a response that did not fail (a 5xx head with
    /// `eject_on_5xx` did) ends the backend's run of failures.
    fn end_unfailed(&mut self) {
        if let Some(guard) = self.guard.take() {
            if !self.head_failed {
                guard.backend().completed();
            }
        }
    }

    /// Ends the body at the drain deadline. The client gets a truncated response: counted as
    /// broken, so the deploy's proof shows it as failed.
    fn cut(&mut self) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(guard) = self.guard.take() {
            guard.backend().cut_off(self.status);
        }
        Poll::Ready(Some(Err(BodyError::Cut)))
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Some(guard) = &self.guard else {
            return Poll::Ready(None);
        };
        if guard.is_cut() {
            return self.cut();
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.end_unfailed();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => {
                guard.backend().broke(self.status, self.head_failed);
                warn!(backend = %guard.backend().id, "response body failed: {e}");
                self.guard = None;
                Poll::Ready(Some(Err(BodyError::Upstream(e))))
            }
            Poll::Pending => {
                let cut = match &mut self.cut {
                    Some(c) => c,
                    None => {
                        let mut n = Box::pin(guard.backend().cut.clone().notified_owned());
                        n.as_mut().enable();
                        if guard.is_cut() {
                            return self.cut();
                        }
                        self.cut.insert(n)
                    }
                };
                if cut.as_mut().poll(cx).is_ready() {
                    return self.cut();
                }
                Poll::Pending
            }
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(u) => u.poll(cx),
            ProxyBody::Static(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(u) => u.guard.is_none() || u.inner.is_end_stream(),
            ProxyBody::Static(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(u) => u.inner.size_hint(),
            ProxyBody::Static(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// Why a response body ended early.
#[derive(Debug)]
pub enum BodyError {
    /// The backend failed while sending the body.
    Upstream(hyper::Error),
    /// The drain deadline closed the request.
    Cut,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::Upstream(e) => write!(f, "backend response failed: {e}"),
            BodyError::Cut => f.write_str("closed at the drain deadline"),
        }
    }
}

impl StdError for BodyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            BodyError::Upstream(e) => Some(e),
            BodyError::Cut => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_for_appends_and_via_is_added() {
        let peer = Peer::new("10.0.0.7:5555".parse().unwrap(), true);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        prepare_request_headers(&mut h, &Uri::from_static("/x"), &peer, false, false);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "1.2.3.4, 10.0.0.7");
        assert_eq!(h.get("via").unwrap(), "1.1 cutover");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
    }

    #[test]
    fn sticky_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; cutover_release=v2; b=2"),
        );
        assert_eq!(sticky_cookie(&h).as_deref(), Some("v2"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("cutover_releasex=v2"),
        );
        assert_eq!(sticky_cookie(&h), None);
        assert_eq!(fnv1a(b"user-1"), fnv1a(b"user-1"));
        assert_ne!(fnv1a(b"user-1"), fnv1a(b"user-2"));
    }

    #[test]
    fn cookie_fields_of_an_http2_request_reach_the_backend_as_one() {
        let peer = Peer::new("10.0.0.7:5555".parse().unwrap(), false);
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        let mut h1 = h.clone();
        prepare_request_headers(&mut h, &Uri::from_static("/x"), &peer, false, true);
        let cookies: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        // An HTTP/1.1 client's fields are its own business: passed on as they came.
        prepare_request_headers(&mut h1, &Uri::from_static("/x"), &peer, false, false);
        assert_eq!(h1.get_all(header::COOKIE).iter().count(), 3);
    }

    #[test]
    fn an_h2c_upgrade_is_not_passed_on() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAARAAAAAAAIAAAAA"),
        );
        assert!(!wants_upgrade(&h));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
        let mut ws = HeaderMap::new();
        ws.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        ws.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&ws));
    }

    #[test]
    fn idempotent_methods() {
        assert!(is_idempotent(&Method::GET) && is_idempotent(&Method::DELETE));
        assert!(!is_idempotent(&Method::POST) && !is_idempotent(&Method::PATCH));
    }
}
