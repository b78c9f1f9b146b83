//! `GET /metrics`: the proxy's counters in the Prometheus text format (version 0.0.4).
//!
//! Written by hand from the same atomic counters `/stats` reads: a scrape takes the table lock
//! once to copy what it needs and formats outside it, and adds nothing to the request path.
//! Release series survive the removal of their backends, like the release counters of
//! `/stats`, so a finished canary's numbers stay visible; but only for the most recently used
//! idle releases (see [`super::router::IDLE_RELEASES`]): a proxy that lives through years of
//! deploys would otherwise name every release it ever saw in every scrape.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::Proxy;
use crate::balancer::api::{BackendState, Counters, Health, LATENCY_BUCKETS_MS};

/// Content type of the text format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct BackendRow {
    id: String,
    release: String,
    state: BackendState,
    health: Health,
    in_flight: u64,
    ejections: u64,
    counters: Counters,
}

/// The whole exposition.
pub(crate) fn render(proxy: &Proxy) -> String {
    let (backends, releases) = {
        let table = proxy.table();
        let backends: Vec<BackendRow> = table
            .entries()
            .map(|e| BackendRow {
                id: e.spec.id.clone(),
                release: e.spec.release.clone(),
                state: e.state,
                health: e.health.health,
                in_flight: e.shared.in_flight.load(Ordering::Relaxed),
                ejections: e.shared.ejections.load(Ordering::Relaxed),
                counters: e.shared.counters.snapshot(),
            })
            .collect();
        (backends, table.release_counters())
    };
    let mut out = String::with_capacity(4096 + backends.len() * 1024);
    let o = &mut out;

    header(
        o,
        "cutover_requests_total",
        "counter",
        "Responses from backends, by backend, release and status class.",
    );
    for b in &backends {
        for (class, n) in classes(&b.counters) {
            let _ = writeln!(
                o,
                "cutover_requests_total{{backend=\"{}\",release=\"{}\",class=\"{class}\"}} {n}",
                esc(&b.id),
                esc(&b.release)
            );
        }
    }
    header(
        o,
        "cutover_release_requests_total",
        "counter",
        "Responses by release and status class, including removed backends'.",
    );
    for (r, c) in &releases {
        for (class, n) in classes(c) {
            let _ = writeln!(
                o,
                "cutover_release_requests_total{{release=\"{}\",class=\"{class}\"}} {n}",
                esc(r)
            );
        }
    }
    header(
        o,
        "cutover_release_abandoned_total",
        "counter",
        "Requests whose client went away before the release answered, including removed backends' (counted as failed).",
    );
    for (r, c) in &releases {
        let _ = writeln!(
            o,
            "cutover_release_abandoned_total{{release=\"{}\"}} {}",
            esc(r),
            c.abandoned
        );
    }
    header(
        o,
        "cutover_request_duration_seconds",
        "histogram",
        "Time to the response head, by release; a request that got none (its client gave up waiting, or the backend timed out) counts with the time it waited.",
    );
    for (r, c) in &releases {
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS_MS.iter().enumerate() {
            cumulative += c.latency_buckets.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                o,
                "cutover_request_duration_seconds_bucket{{release=\"{}\",le=\"{}\"}} {cumulative}",
                esc(r),
                *bound as f64 / 1000.0
            );
        }
        let count: u64 = c.latency_buckets.iter().sum();
        let _ = writeln!(
            o,
            "cutover_request_duration_seconds_bucket{{release=\"{}\",le=\"+Inf\"}} {count}",
            esc(r)
        );
        let _ = writeln!(
            o,
            "cutover_request_duration_seconds_sum{{release=\"{}\"}} {}",
            esc(r),
            c.latency_us_sum as f64 / 1e6
        );
        let _ = writeln!(
            o,
            "cutover_request_duration_seconds_count{{release=\"{}\"}} {count}",
            esc(r)
        );
    }
    per_backend(
        o,
        &backends,
        "cutover_in_flight",
        "gauge",
        "Requests and long-lived connections in flight.",
        |b| b.in_flight,
    );
    header(
        o,
        "cutover_backend_state",
        "gauge",
        "Routing state of each backend (1 for its current state).",
    );
    for b in &backends {
        for (name, s) in [
            ("active", BackendState::Active),
            ("draining", BackendState::Draining),
            ("down", BackendState::Down),
            ("preview", BackendState::Preview),
        ] {
            let _ = writeln!(
                o,
                "cutover_backend_state{{backend=\"{}\",state=\"{name}\"}} {}",
                esc(&b.id),
                u8::from(b.state == s)
            );
        }
    }
    per_backend(
        o,
        &backends,
        "cutover_backend_healthy",
        "gauge",
        "1 when the balancer's health check admits the backend.",
        |b| u64::from(b.health == Health::Healthy),
    );
    per_backend(
        o,
        &backends,
        "cutover_retries_total",
        "counter",
        "Requests sent again elsewhere after this backend failed before answering.",
        |b| b.counters.retries,
    );
    per_backend(
        o,
        &backends,
        "cutover_proxy_errors_total",
        "counter",
        "Requests that failed against this backend (refused, reset, timed out).",
        |b| b.counters.proxy_errors,
    );
    per_backend(
        o,
        &backends,
        "cutover_broken_responses_total",
        "counter",
        "Responses whose body this backend broke off after the head (clients got them truncated).",
        |b| b.counters.broken,
    );
    per_backend(
        o,
        &backends,
        "cutover_abandoned_total",
        "counter",
        "Requests whose client went away while this backend had not yet answered (counted as failed; an upload the client broke off is cutover_client_aborted_total instead).",
        |b| b.counters.abandoned,
    );
    per_backend(
        o,
        &backends,
        "cutover_ejections_total",
        "counter",
        "Times passive health took the backend out of rotation.",
        |b| b.ejections,
    );
    let scalars = [
        (
            "cutover_unrouted_total",
            "counter",
            "Requests the proxy answered itself (502, 503, 504), including connections refused over max_connections (503, or closed with TLS).",
            proxy.unrouted.load(Ordering::Relaxed),
        ),
        (
            "cutover_ejections_all_total",
            "counter",
            "Passive ejections, all backends, including removed ones.",
            proxy.ejections.load(Ordering::Relaxed),
        ),
        (
            "cutover_client_aborted_total",
            "counter",
            "Requests whose client broke its request body off while it was being sent (not a backend failure).",
            proxy.client_aborted.load(Ordering::Relaxed),
        ),
        (
            "cutover_closed_at_deadline_total",
            "counter",
            "Requests and long-lived connections closed at a shutdown drain deadline.",
            proxy.closed_at_deadline.load(Ordering::Relaxed),
        ),
        (
            "cutover_lost_drains_total",
            "counter",
            "Takeovers whose replaced proxy died while draining, before it reported what it counted meanwhile (those requests are in no counter).",
            proxy.lost_drains.load(Ordering::Relaxed),
        ),
        (
            "cutover_client_connections",
            "gauge",
            "Client connections open.",
            proxy.connections.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, v) in scalars {
        header(o, name, kind, help);
        let _ = writeln!(o, "{name} {v}");
    }
    out
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn per_backend(
    o: &mut String,
    backends: &[BackendRow],
    name: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&BackendRow) -> u64,
) {
    header(o, name, kind, help);
    for b in backends {
        let _ = writeln!(
            o,
            "{name}{{backend=\"{}\",release=\"{}\"}} {}",
            esc(&b.id),
            esc(&b.release),
            value(b)
        );
    }
}

fn classes(c: &Counters) -> [(&'static str, u64); 5] {
    [
        ("1xx", c.status_1xx),
        ("2xx", c.status_2xx),
        ("3xx", c.status_3xx),
        ("4xx", c.status_4xx),
        ("5xx", c.status_5xx),
    ]
}

/// Escapes a label value (backslash, double quote, newline).
fn esc(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("plain"), "plain");
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
