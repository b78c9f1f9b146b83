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
//! - errors: a status (400, 401, 404, 409, 504) and an [`ApiError`] body.

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
}

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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub requests: u64,
    pub status_2xx: u64,
    pub status_3xx: u64,
    pub status_4xx: u64,
    pub status_5xx: u64,
    /// Requests the proxy could not complete against this backend (connect refused, reset, timeout).
    pub proxy_errors: u64,
    /// Requests sent again to another backend after this one failed before answering.
    pub retries: u64,
    /// Sum of response-head latencies in microseconds (mean = sum / responses).
    pub latency_us_sum: u64,
}

impl Counters {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Counters) {
        self.requests += other.requests;
        self.status_2xx += other.status_2xx;
        self.status_3xx += other.status_3xx;
        self.status_4xx += other.status_4xx;
        self.status_5xx += other.status_5xx;
        self.proxy_errors += other.proxy_errors;
        self.retries += other.retries;
        self.latency_us_sum += other.latency_us_sum;
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
    pub releases: BTreeMap<String, Counters>,
    /// Requests answered by the proxy itself because no backend could (502/503).
    pub unrouted: u64,
    pub total: Counters,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WeightRequest {
    pub weight: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WaitRequest {
    pub timeout_ms: u64,
}

/// Outcome of waiting for a draining backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// True when in-flight requests reached zero before the deadline.
    pub drained: bool,
    /// Requests (or long-lived connections) still open at the deadline and closed by the proxy.
    pub closed_at_deadline: u64,
    pub waited_ms: u64,
}

/// Body of every admin API error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}
