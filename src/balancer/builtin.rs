//! The deployer's side of the built-in balancer: [`AdminClient`] speaks the admin API of
//! `cutover proxy` (endpoints in [`super::api`]) and implements [`Balancer`].
//!
//! Every method is one HTTP call. Errors name the balancer's admin address and say what to do
//! next: unreachable means "is `cutover proxy` running?", 401 means "check the token", and any
//! other API error carries the server's own message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Balancer;
use super::api::{
    ApiError, BackendSpec, BackendView, DrainReport, SampleWindow, Samples, Stats, SwitchReport,
    SwitchRequest, WaitRequest, WeightRequest, WeightsRequest,
};

/// Time allowed for an admin call that does not wait on purpose.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Client of the built-in balancer's admin API.
#[derive(Clone)]
pub struct AdminClient {
    admin: SocketAddr,
    auth: HeaderValue,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// A client for the admin API at `admin`, authenticating with `token`.
    pub fn new(admin: SocketAddr, token: String) -> Self {
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid-token-characters"));
        auth.set_sensitive(true);
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        AdminClient {
            admin,
            auth,
            client,
        }
    }

    /// One call; returns the status and body of a 2xx answer.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let what = format!("{method} {path}");
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.admin, path))
            .header(header::AUTHORIZATION, self.auth.clone());
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| anyhow::anyhow!("balancer at {}: {what}: bad request: {e}", self.admin))?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                anyhow::Error::new(super::Unreachable(format!(
                    "cannot reach the balancer admin API at {}: {}: is `cutover proxy` running? start it with `cutover proxy` and this command's config",
                    self.admin,
                    crate::proxy::error_reason(&e)
                )))
            })?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await.map_err(|e| {
                anyhow::anyhow!(
                    "balancer at {}: {what}: reading the answer: {e}",
                    self.admin
                )
            })?;
            Ok::<_, anyhow::Error>((status, bytes.to_bytes()))
        };
        let (status, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| {
                anyhow::Error::new(super::Unreachable(format!(
                    "balancer at {}: {what}: no answer within {timeout:?}: is `cutover proxy` running and responsive?",
                    self.admin
                )))
            })??;
        if status.is_success() {
            return Ok((status, bytes));
        }
        let message = serde_json::from_slice::<ApiError>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_string());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // The proxy is handing over to a replacement: as good as away for a moment.
            return Err(anyhow::Error::new(super::Unreachable(format!(
                "balancer at {}: {what}: {message}",
                self.admin
            ))));
        }
        let hint = if status == StatusCode::UNAUTHORIZED {
            ": check that balancer.token in cutover.toml matches the running proxy's"
        } else {
            ""
        };
        anyhow::bail!(
            "balancer at {}: {what} failed ({status}): {message}{hint}",
            self.admin
        )
    }

    async fn json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let (_, bytes) = self.call(Method::GET, path, None, CALL_TIMEOUT).await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "balancer at {}: GET {path}: unexpected answer ({e}): is it a `cutover proxy` of the same version?",
                self.admin
            )
        })
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> anyhow::Result<Bytes> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| anyhow::anyhow!("cannot encode the request to the balancer: {e}"))?;
        Ok(self.call(method, path, body, timeout).await?.1)
    }
}

impl AdminClient {
    /// `POST /backends/{id}<action>` with a wait timeout, answered by a drain report
    /// (`/wait-drained`, `/retire`).
    async fn drain_report(
        &self,
        id: &str,
        action: &str,
        timeout: Duration,
    ) -> anyhow::Result<DrainReport> {
        let path = backend_path(id, action);
        let body = WaitRequest {
            timeout_ms: millis(timeout),
        };
        let bytes = self
            .send(Method::POST, &path, Some(&body), wait_call_timeout(timeout))
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "balancer at {}: POST {path}: unexpected answer ({e})",
                self.admin
            )
        })
    }

    /// `POST /switch`: activates and stands by backends in one atomic step.
    pub async fn switch(&self, req: &SwitchRequest) -> anyhow::Result<SwitchReport> {
        let bytes = self
            .send(Method::POST, "/switch", Some(req), CALL_TIMEOUT)
            .await?;
        self.decode("POST /switch", &bytes)
    }

    /// `PUT /weights`: sets several weights in one atomic step.
    pub async fn set_weights(&self, weights: &BTreeMap<String, u32>) -> anyhow::Result<()> {
        let body = WeightsRequest {
            weights: weights.clone(),
        };
        self.send(Method::PUT, "/weights", Some(&body), CALL_TIMEOUT)
            .await
            .map(drop)
    }

    /// `GET /samples`: the most recent latencies (µs, oldest first) of a release, at most `max`.
    pub async fn samples(&self, release: &str, max: usize) -> anyhow::Result<Vec<u64>> {
        let path = format!("{}&max={max}", samples_path(release));
        let s: Samples = self.json(&path).await?;
        Ok(s.latencies_us)
    }

    /// `GET /samples` with `since_ms`: the latencies of a stretch of time (see
    /// [`SampleWindow`]).
    pub async fn sample_window(
        &self,
        release: &str,
        window: &SampleWindow,
    ) -> anyhow::Result<Samples> {
        let path = format!(
            "{}&max={}&since_ms={}&until_ms={}",
            samples_path(release),
            window.max,
            window.since_ms,
            window.until_ms
        );
        self.json(&path).await
    }

    /// `GET /metrics`: the Prometheus text exposition.
    pub async fn metrics_text(&self) -> anyhow::Result<String> {
        let (_, bytes) = self
            .call(Method::GET, "/metrics", None, CALL_TIMEOUT)
            .await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn decode<T: DeserializeOwned>(&self, what: &str, bytes: &[u8]) -> anyhow::Result<T> {
        serde_json::from_slice(bytes).map_err(|e| {
            anyhow::anyhow!(
                "balancer at {}: {what}: unexpected answer ({e}): is it a `cutover proxy` of the same version?",
                self.admin
            )
        })
    }
}

/// `/backends/{id}{suffix}` with the id percent-encoded as one path segment.
fn backend_path(id: &str, suffix: &str) -> String {
    let mut p = String::from("/backends/");
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            p.push(char::from(b));
        } else {
            p.push_str(&format!("%{b:02X}"));
        }
    }
    p.push_str(suffix);
    p
}

/// A wait's HTTP timeout: the server's wait plus room for the answer.
fn wait_call_timeout(wait: Duration) -> Duration {
    wait.saturating_add(Duration::from_secs(5))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait]
impl Balancer for AdminClient {
    async fn backends(&self) -> anyhow::Result<Vec<BackendView>> {
        self.json("/backends").await
    }

    async fn add(&self, spec: &BackendSpec) -> anyhow::Result<()> {
        self.send(Method::POST, "/backends", Some(spec), CALL_TIMEOUT)
            .await
            .map(drop)
    }

    async fn remove(&self, id: &str) -> anyhow::Result<()> {
        self.send::<()>(Method::DELETE, &backend_path(id, ""), None, CALL_TIMEOUT)
            .await
            .map(drop)
    }

    async fn set_weight(&self, id: &str, weight: u32) -> anyhow::Result<()> {
        let body = WeightRequest { weight };
        self.send(
            Method::PUT,
            &backend_path(id, "/weight"),
            Some(&body),
            CALL_TIMEOUT,
        )
        .await
        .map(drop)
    }

    async fn drain(&self, id: &str) -> anyhow::Result<()> {
        self.send::<()>(
            Method::POST,
            &backend_path(id, "/drain"),
            None,
            CALL_TIMEOUT,
        )
        .await
        .map(drop)
    }

    async fn activate(&self, id: &str) -> anyhow::Result<()> {
        self.send::<()>(
            Method::POST,
            &backend_path(id, "/activate"),
            None,
            CALL_TIMEOUT,
        )
        .await
        .map(drop)
    }

    async fn wait_drained(&self, id: &str, timeout: Duration) -> anyhow::Result<DrainReport> {
        self.drain_report(id, "/wait-drained", timeout).await
    }

    async fn retire(&self, id: &str, timeout: Duration) -> anyhow::Result<DrainReport> {
        self.drain_report(id, "/retire", timeout).await
    }

    async fn wait_healthy(&self, id: &str, timeout: Duration) -> anyhow::Result<()> {
        let body = WaitRequest {
            timeout_ms: millis(timeout),
        };
        self.send(
            Method::POST,
            &backend_path(id, "/wait-healthy"),
            Some(&body),
            wait_call_timeout(timeout),
        )
        .await
        .map(drop)
    }

    async fn stats(&self) -> anyhow::Result<Stats> {
        self.json("/stats").await
    }

    async fn switch(&self, req: &SwitchRequest) -> anyhow::Result<SwitchReport> {
        AdminClient::switch(self, req).await
    }

    async fn set_weights(&self, weights: &BTreeMap<String, u32>) -> anyhow::Result<()> {
        AdminClient::set_weights(self, weights).await
    }

    async fn samples(&self, release: &str, max: usize) -> anyhow::Result<Vec<u64>> {
        AdminClient::samples(self, release, max).await
    }

    async fn sample_window(&self, release: &str, window: &SampleWindow) -> anyhow::Result<Samples> {
        AdminClient::sample_window(self, release, window).await
    }
}

/// `/samples?release=` and the release, percent-encoded.
fn samples_path(release: &str) -> String {
    let mut path = String::from("/samples?release=");
    for b in release.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            path.push(char::from(b));
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_one_path_segment() {
        assert_eq!(
            backend_path("web1:4100", "/drain"),
            "/backends/web1:4100/drain"
        );
        assert_eq!(backend_path("a/b c", ""), "/backends/a%2Fb%20c");
    }

    #[tokio::test]
    async fn unreachable_balancer_says_what_to_do() {
        // Bind and drop to get a port nobody listens on.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let c = AdminClient::new(addr, "0123456789abcdef".into());
        let e = format!("{:#}", c.backends().await.unwrap_err());
        assert!(e.contains(&addr.to_string()), "{e}");
        assert!(
            e.contains("start it with `cutover proxy` and this command"),
            "{e}"
        );
    }
}
