//! JSON bodies of the built-in balancer's admin API, shared by the proxy (server) and
//! [`super::builtin::AdminClient`] (client).
//!
//! Endpoints (all but `GET /healthz` need `Authorization: Bearer <token>`; without it: 401):
//! - `GET /backends` → `[BackendView]`
//! - `POST /backends` with a [`BackendSpec`] → 201 (200 if an identical backend exists)
//! - `DELETE /backends/{id}` → 204
//! - `PUT /backends/{id}/weight` with [`WeightRequest`] → 204
//! - `POST /backends/{id}/drain` → 204; `POST /backends/{id}/activate` → 204
//! - `POST /backends/{id}/wait-drained` with [`WaitRequest`] → [`DrainReport`]
//! - `POST /backends/{id}/wait-healthy` with [`WaitRequest`] → 204, or 504 on timeout
//! - `GET /stats` → [`Stats`]
//! - `POST /switch` with [`SwitchRequest`] → [`SwitchReport`]: one atomic routing change (blue-green)
//! - `PUT /weights` with [`WeightsRequest`] → 204: several weights at once, atomically (canary)
//! - `GET /samples?release=R&max=N` → [`Samples`]: the most recent latencies of a release;
//!   with `since_ms=S` (and optionally `until_ms=U`, default now) those recorded from `S` to
//!   `U` instead ([`SampleWindow`]: times on the proxy's clock, as [`Stats::at_ms`]), evenly
//!   thinned to `N` across that stretch when there are more
//! - `GET /metrics` → Prometheus text format
//! - errors: a status (400, 401, 404, 409, 504) and an [`ApiError`] body.
//!
//! Preview routing: a backend added with `preview: true` starts in state
//! [`BackendState::Preview`] and receives only requests that carry the header
//! [`PREVIEW_HEADER`] with the value [`preview_value`] of the admin token (and such requests go
//! only to preview backends). `activate` or a switch makes it a normal active backend.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A backend as the deployer asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// Stable id, unique per instance: `<host>:<port>`.
    pub id: String,
    pub address: SocketAddr,
    /// Host name from the config, for reports.
    pub host: String,
    /// Release (version) the instance runs: the label counters are grouped by.
    pub release: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Path the balancer's active health check requests.
    pub health_path: String,
    /// Start in [`BackendState::Preview`]: only requests with [`PREVIEW_HEADER`] set to
    /// [`preview_value`] reach it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preview: bool,
    /// The deployer's health gate has just passed (`healthy_threshold` checks in a row): the
    /// balancer admits the backend on its own first passing check instead of waiting for
    /// `healthy_threshold` more, which would only repeat the gate an interval later. An
    /// admission hint, not part of the backend's identity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gated: bool,
}

/// Requests with this header set to [`preview_value`] are routed to preview backends only.
pub const PREVIEW_HEADER: &str = "x-cutover-preview";

/// The value of [`PREVIEW_HEADER`] that reaches preview backends: hex HMAC-SHA256 of a fixed
/// label keyed with the balancer's admin token. Only who holds the token (the deployer, whose
/// verify commands get it in `CUTOVER_PREVIEW_HEADER`) can reach an unreleased release: with
/// a fixed value, any client could, and could make every deploy's preview count 503s. Derived
/// rather than the token itself, so a verify command that logs its headers leaks no admin
/// access; the proxy and the deployer compute it alike from the same config.
pub fn preview_value(token: &str) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(token.trim().as_bytes())
        .expect("HMAC takes any key length");
    mac.update(b"cutover preview route v1");
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Cookie the balancer sets with `sticky = "cookie"`: the release that served the client.
pub const STICKY_COOKIE: &str = "cutover_release";

pub fn default_weight() -> u32 {
    100
}

/// Routing state of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Receives new requests (when healthy).
    Active,
    /// Receives no new requests; in-flight ones finish.
    Draining,
    /// Out of rotation by operator choice.
    Down,
    /// Receives only preview requests (a green set being verified before the switch).
    Preview,
}

/// Health as the balancer's own checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Added but not yet passed `healthy_threshold` checks in a row.
    Unknown,
    Healthy,
    Unhealthy,
}

/// Request and response counters: the input of analysis and of every deploy's proof.
///
/// `requests` counts attempts sent to a backend, so a request retried on a second backend
/// counts on both; what clients got is [`Counters::responses`] (one per answered request)
/// plus the proxy's own answers ([`Stats::unrouted`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub requests: u64,
    /// Informational answers that end a request: `101 Switching Protocols` (WebSocket).
    #[serde(default)]
    pub status_1xx: u64,
    pub status_2xx: u64,
    pub status_3xx: u64,
    pub status_4xx: u64,
    pub status_5xx: u64,
    /// Requests the proxy could not complete against this backend (connect refused, reset, timeout).
    pub proxy_errors: u64,
    /// Requests sent again to another backend after this one failed before answering.
    pub retries: u64,
    /// Responses counted by a non-5xx status whose body then broke off (the backend failed, or
    /// the drain deadline closed it): the client got a truncated response, a failure whatever
    /// the status said. A 5xx whose body breaks is counted once, as a 5xx.
    #[serde(default)]
    pub broken: u64,
    /// Requests whose client went away while waiting for this backend's response head (a
    /// client timeout shorter than the backend's slowness): no status was ever counted for
    /// them, yet the client got nothing, so they count as failed. Not to be confused with a
    /// client that breaks its *upload* off (`cutover_client_aborted_total` in `/metrics`): that
    /// is the client's doing and no failure; abandonment happens once the request was sent
    /// whole, while the backend is the one keeping the client waiting. (Older snapshots and
    /// HAProxy have no such count: 0.)
    #[serde(default)]
    pub abandoned: u64,
    /// Sum of response-head latencies in microseconds (mean = sum / responses).
    pub latency_us_sum: u64,
    /// Response-head latency histogram: counts per bucket of [`LATENCY_BUCKETS_MS`] (the last
    /// count is everything above the last bound). Diff two snapshots for an interval's p99.
    #[serde(default)]
    pub latency_buckets: Vec<u64>,
}

/// Upper bounds (ms, inclusive) of the latency histogram buckets, shared by `/stats` and
/// `/metrics`.
pub const LATENCY_BUCKETS_MS: [u64; 14] = [
    1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000, 10000,
];

impl Counters {
    /// Requests answered by the backend (a head of any status): each client request that
    /// reached a backend counts once here, however many attempts it took.
    pub fn responses(&self) -> u64 {
        self.status_1xx + self.status_2xx + self.status_3xx + self.status_4xx + self.status_5xx
    }

    /// Client requests that reached a backend and ended there: answered (a head of any
    /// status) or abandoned by the client while waiting for the head. What a deploy report
    /// calls served (plus the proxy's own answers, [`Stats::unrouted`]).
    pub fn served(&self) -> u64 {
        self.responses() + self.abandoned
    }

    /// Requests among [`Counters::served`] that failed the client: a 5xx, a response whose
    /// body broke off, or no answer before the client gave up.
    pub fn failed(&self) -> u64 {
        self.status_5xx + self.broken + self.abandoned
    }

    /// Attempts at a backend that went wrong: [`Counters::failed`] and the attempts that got
    /// no answer at all (refused, reset, timed out, cut at a drain deadline), which the client
    /// may not have seen (a retry on another backend) but the backend's operator should.
    pub fn failed_attempts(&self) -> u64 {
        self.failed() + self.proxy_errors
    }

    /// What was counted since `earlier`, a snapshot of the same counters (saturating at 0).
    pub fn since(&self, earlier: &Counters) -> Counters {
        let d = |now: u64, then: u64| now.saturating_sub(then);
        Counters {
            requests: d(self.requests, earlier.requests),
            status_1xx: d(self.status_1xx, earlier.status_1xx),
            status_2xx: d(self.status_2xx, earlier.status_2xx),
            status_3xx: d(self.status_3xx, earlier.status_3xx),
            status_4xx: d(self.status_4xx, earlier.status_4xx),
            status_5xx: d(self.status_5xx, earlier.status_5xx),
            proxy_errors: d(self.proxy_errors, earlier.proxy_errors),
            retries: d(self.retries, earlier.retries),
            broken: d(self.broken, earlier.broken),
            abandoned: d(self.abandoned, earlier.abandoned),
            latency_us_sum: d(self.latency_us_sum, earlier.latency_us_sum),
            latency_buckets: self
                .latency_buckets
                .iter()
                .enumerate()
                .map(|(i, n)| d(*n, earlier.latency_buckets.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Counters) {
        self.requests += other.requests;
        self.status_1xx += other.status_1xx;
        self.status_2xx += other.status_2xx;
        self.status_3xx += other.status_3xx;
        self.status_4xx += other.status_4xx;
        self.status_5xx += other.status_5xx;
        self.proxy_errors += other.proxy_errors;
        self.retries += other.retries;
        self.broken += other.broken;
        self.abandoned += other.abandoned;
        self.latency_us_sum += other.latency_us_sum;
        if self.latency_buckets.len() < other.latency_buckets.len() {
            self.latency_buckets.resize(other.latency_buckets.len(), 0);
        }
        for (mine, theirs) in self.latency_buckets.iter_mut().zip(&other.latency_buckets) {
            *mine += theirs;
        }
    }
}

/// A backend as the balancer reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    #[serde(flatten)]
    pub spec: BackendSpec,
    pub state: BackendState,
    pub health: Health,
    pub in_flight: u64,
    pub counters: Counters,
}

/// Counters per backend id and per release, plus the totals the proxy answered itself (no
/// backend: 502/503).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub backends: BTreeMap<String, Counters>,
    /// The releases in use and the most recently used idle ones (the built-in proxy lets go
    /// of older idle releases: their counts move to [`Stats::retired`]).
    pub releases: BTreeMap<String, Counters>,
    /// What the releases no longer listed in `releases` had counted (0 with HAProxy and older
    /// proxies). Part of `total`, which therefore never goes back while the counting goes on.
    #[serde(default)]
    pub retired: Counters,
    /// Requests answered by the proxy itself because no backend could (502/503/504), and
    /// connections refused over `max_connections` (503, or closed with TLS): failed, and no
    /// release's.
    pub unrouted: u64,
    /// Every release's counts: those in `releases` plus `retired`.
    pub total: Counters,
    /// When the process counting began (unix ms; 0: not known, as with HAProxy): two
    /// snapshots with different values straddle a restart, so their difference is partial.
    #[serde(default)]
    pub counting_since_ms: u64,
    /// When the proxy took this snapshot (unix ms on its own clock; 0: not known, as with
    /// HAProxy and older proxies). The stretch between two snapshots, in the terms
    /// [`SampleWindow`] asks for.
    #[serde(default)]
    pub at_ms: u64,
    /// Takeovers (`cutover proxy --takeover`) whose replaced proxy died while it drained,
    /// before it reported what it counted meanwhile: the requests it was finishing then are in
    /// no counter here, and how many there were and how they ended is not known. Two snapshots
    /// with different values miss some requests between them. (0 with HAProxy.)
    #[serde(default)]
    pub lost_drains: u64,
}

impl Stats {
    /// Whether the counting began again between `earlier` and this snapshot, from the same
    /// balancer: a restart, an HAProxy reload, a `--takeover` that lost the old proxy's counts,
    /// or a replaced proxy that died while draining. Then the difference of the two is no
    /// count of anything: some counters are below their old values (and floor at 0), others
    /// have passed them again. (A release the built-in proxy let go of while idle and that
    /// came back counts again from zero, and reads as such a restart too: rare, and the
    /// caller skips the interval, which is safe.)
    pub fn counts_began_again_since(&self, earlier: &Stats) -> bool {
        self.counting_since_ms != earlier.counting_since_ms
            || self.lost_drains != earlier.lost_drains
            || self.total.requests < earlier.total.requests
            || self.unrouted < earlier.unrouted
            || earlier.releases.iter().any(|(release, then)| {
                self.releases
                    .get(release)
                    .is_some_and(|now| now.requests < then.requests)
            })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightRequest {
    pub weight: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitRequest {
    pub timeout_ms: u64,
}

/// Outcome of waiting for a draining backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// True when in-flight requests reached zero before the deadline.
    pub drained: bool,
    /// Requests (or long-lived connections) still open at the deadline and closed on their
    /// clients by the proxy: responses cut mid-body, upgraded connections (WebSocket) closed,
    /// requests answered 502. A request cut while it still waited for its response head and
    /// then answered by another backend (a safe retry) is not one: its client never knew.
    pub closed_at_deadline: u64,
    pub waited_ms: u64,
}

/// `POST /switch`: in one step (one lock acquisition, so no request sees a half-switched
/// set), `activate` become Active and `standby` become Draining (their in-flight requests
/// finish; they keep running for an instant switch back).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchRequest {
    pub activate: Vec<String>,
    pub standby: Vec<String>,
}

/// What a switch did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwitchReport {
    /// Time the routing table was locked for the change, in microseconds.
    pub took_us: u64,
    /// Wall-clock time of the switch (ms since the Unix epoch).
    pub at_unix_ms: u64,
}

/// `PUT /weights`: weight per backend id, applied atomically.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsRequest {
    pub weights: BTreeMap<String, u32>,
}

/// `GET /samples`: recent response latencies of one release (newest last), for statistical
/// comparison of a canary with the stable release.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Samples {
    pub release: String,
    pub latencies_us: Vec<u64>,
    /// Asked with `since_ms`: from when the latencies are the whole of the stretch asked for
    /// (thinned evenly when there were more than `max`). That is `since_ms`, or later when the
    /// proxy no longer had the stretch's beginning (it keeps about the last 5 minutes of a release): to
    /// compare two releases over the same time, ask the other one from here too. Absent
    /// without `since_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ms: Option<u64>,
}

/// `GET /samples?release=R&max=N&since_ms=S&until_ms=U`: the latencies a release recorded
/// over a stretch of time on the proxy's clock (see [`Stats::at_ms`]), both ends included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SampleWindow {
    pub since_ms: u64,
    pub until_ms: u64,
    /// At most this many, evenly thinned across the stretch when there are more.
    pub max: usize,
}

/// Body of every admin API error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding: a canary interval across a proxy restart read 1000 -> 600 requests
    /// (598 2xx, 2 5xx) as 0 requests and 2 failures, failing a canary that served 99.7%.
    #[test]
    fn a_restart_between_two_snapshots_is_seen() {
        let snapshot = |since: u64, requests: u64, ok: u64, bad: u64| {
            let c = Counters {
                requests,
                status_2xx: ok,
                status_5xx: bad,
                ..Counters::default()
            };
            Stats {
                releases: [("v2".to_string(), c.clone())].into(),
                total: c,
                counting_since_ms: since,
                ..Stats::default()
            }
        };
        let before = snapshot(1, 1000, 1000, 0);
        assert!(!snapshot(1, 1200, 1198, 2).counts_began_again_since(&before));
        // A restart the balancer says (a new counting start), or one it cannot (HAProxy: 0).
        assert!(snapshot(2, 1200, 1198, 2).counts_began_again_since(&before));
        let (before, after) = (snapshot(0, 1000, 1000, 0), snapshot(0, 600, 598, 2));
        assert!(after.counts_began_again_since(&before));
        // A release's count going back is one too, whatever the total does.
        let mut grown = snapshot(1, 2000, 2000, 0);
        grown.releases.insert("v2".into(), Counters::default());
        assert!(grown.counts_began_again_since(&snapshot(1, 1000, 1000, 0)));
        // And a replaced proxy that died while draining: what it was finishing is missing.
        let mut lost = snapshot(1, 1200, 1200, 0);
        lost.lost_drains = 1;
        assert!(lost.counts_began_again_since(&snapshot(1, 1000, 1000, 0)));
    }

    /// Review finding: `status` and the dashboard showed only a backend's 5xx answers, so a
    /// backend that timed out, reset or was cut at its drain deadline looked spotless.
    #[test]
    fn failed_attempts_count_what_got_no_answer_too() {
        let c = Counters {
            requests: 10,
            status_2xx: 4,
            status_5xx: 1,
            broken: 1,
            abandoned: 1,
            proxy_errors: 3,
            ..Counters::default()
        };
        assert_eq!(c.failed(), 3);
        assert_eq!(c.failed_attempts(), 6);
    }

    /// The proxy and the deployer derive the preview secret alike, from the token alone.
    #[test]
    fn the_preview_value_is_a_secret_of_the_token() {
        let v = preview_value("test-token-0123456789");
        assert_eq!(v.len(), 64);
        assert!(v.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(v, preview_value(" test-token-0123456789\n"));
        assert_ne!(v, preview_value("test-token-0123456780"));
        assert!(!v.contains("0123456789abc"),);
    }
}
