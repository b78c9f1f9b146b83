//! The backend table: which backends exist, their routing state and health, and which one the
//! next request goes to (smooth weighted round robin, as nginx does it).
//!
//! Design choices:
//! - One `std::sync::Mutex` over the table. Selection and the in-flight increment happen under
//!   it, and so does every state change (drain, remove), so once `drain` returns no request can
//!   be routed to that backend any more. The lock is never held across an `.await`.
//! - Everything a request touches after selection lives in an `Arc<BackendShared>` with atomic
//!   counters, so the hot path takes the lock once (to pick) and records its outcome lock-free.
//! - Release counters are `Arc<ReleaseStats>` kept in a map that outlives backends: removing
//!   a backend never loses the proof of what its release served.
//! - That map stays bounded in a proxy that lives through years of deploys. A release is *in
//!   use* while anything besides the map holds its stats (a backend of it, or a request still
//!   in flight on a removed one); such a release is never touched. An idle one drops its
//!   latency samples (128 KiB, [`super::samples`]) after [`RING_IDLE`], and only the
//!   [`IDLE_RELEASES`] most recently used idle releases keep an entry at all: older ones are
//!   folded into [`Table::retired`], so the totals of `/stats` never go back (a deploy's
//!   report counts from them) while the per-release lists of `/stats` and `/metrics` stop
//!   naming them. The upkeep runs when backends are added or removed, under the lock those
//!   calls take anyway, so the request path stays as it was.
//! - The in-flight count is released by [`InFlight`]'s `Drop`, which the forwarder keeps alive
//!   until the response body is finished or dropped; reaching zero wakes `wait-drained`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::http::uri::Authority;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::samples::SampleRing;
use crate::balancer::api::{
    BackendSpec, BackendState, BackendView, Counters, Health, LATENCY_BUCKETS_MS,
};

/// Buckets of the latency histogram: one per bound plus the overflow.
const BUCKETS: usize = LATENCY_BUCKETS_MS.len() + 1;

/// How long a release stays idle (no backend, no request in flight) before its latency
/// samples go. Not at once: a restore removes and re-adds backends, and whoever judged a
/// canary that was just rolled back may still want to read its samples.
pub(crate) const RING_IDLE: Duration = Duration::from_secs(10 * 60);

/// Idle releases that keep their entry (counters, and samples within [`RING_IDLE`]), the most
/// recently used first. Enough for every release a deploy or a rollback touches (the old
/// stable, a rolled-back canary, the releases kept on disk for an instant rollback, usually
/// 3 to 5) with room for several apps behind one proxy, and small: a release past it no longer
/// shows in `/stats` or `/metrics` (its counts stay in the totals), which bounds the label
/// cardinality a scraper sees to the live releases plus these.
pub(crate) const IDLE_RELEASES: usize = 16;

/// Counters updated lock-free by requests in flight.
#[derive(Debug, Default)]
pub(crate) struct AtomicCounters {
    requests: AtomicU64,
    status_1xx: AtomicU64,
    status_2xx: AtomicU64,
    status_3xx: AtomicU64,
    status_4xx: AtomicU64,
    status_5xx: AtomicU64,
    proxy_errors: AtomicU64,
    retries: AtomicU64,
    broken: AtomicU64,
    abandoned: AtomicU64,
    latency_us_sum: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

/// The histogram bucket of a latency: the first bound (ms, inclusive) it does not exceed.
fn bucket(latency_us: u64) -> usize {
    LATENCY_BUCKETS_MS
        .iter()
        .position(|ms| latency_us <= ms * 1000)
        .unwrap_or(LATENCY_BUCKETS_MS.len())
}

impl AtomicCounters {
    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn response(&self, status: u16, latency_us: u64) {
        let class = match status {
            ..=199 => &self.status_1xx,
            200..=299 => &self.status_2xx,
            300..=399 => &self.status_3xx,
            400..=499 => &self.status_4xx,
            _ => &self.status_5xx,
        };
        class.fetch_add(1, Ordering::Relaxed);
        self.add_latency(latency_us);
    }

    fn add_latency(&self, latency_us: u64) {
        self.latency_us_sum.fetch_add(latency_us, Ordering::Relaxed);
        self.buckets[bucket(latency_us)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn proxy_error(&self) {
        self.proxy_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn broke(&self) {
        self.broken.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn abandon(&self) {
        self.abandoned.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds counts another proxy made (its counters at a takeover).
    pub(crate) fn add(&self, c: &Counters) {
        let add = |a: &AtomicU64, n: u64| {
            a.fetch_add(n, Ordering::Relaxed);
        };
        add(&self.requests, c.requests);
        add(&self.status_1xx, c.status_1xx);
        add(&self.status_2xx, c.status_2xx);
        add(&self.status_3xx, c.status_3xx);
        add(&self.status_4xx, c.status_4xx);
        add(&self.status_5xx, c.status_5xx);
        add(&self.proxy_errors, c.proxy_errors);
        add(&self.retries, c.retries);
        add(&self.broken, c.broken);
        add(&self.abandoned, c.abandoned);
        add(&self.latency_us_sum, c.latency_us_sum);
        for (mine, n) in self.buckets.iter().zip(&c.latency_buckets) {
            add(mine, *n);
        }
    }

    pub(crate) fn snapshot(&self) -> Counters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            requests: get(&self.requests),
            status_1xx: get(&self.status_1xx),
            status_2xx: get(&self.status_2xx),
            status_3xx: get(&self.status_3xx),
            status_4xx: get(&self.status_4xx),
            status_5xx: get(&self.status_5xx),
            proxy_errors: get(&self.proxy_errors),
            retries: get(&self.retries),
            broken: get(&self.broken),
            abandoned: get(&self.abandoned),
            latency_us_sum: get(&self.latency_us_sum),
            latency_buckets: self.buckets.iter().map(get).collect(),
        }
    }
}

/// What a release keeps across its backends' lifetimes: counters and recent latencies.
#[derive(Debug, Default)]
pub(crate) struct ReleaseStats {
    pub(crate) counters: AtomicCounters,
    pub(crate) samples: SampleRing,
}

/// A release in the table's map.
#[derive(Debug)]
struct Release {
    stats: Arc<ReleaseStats>,
    /// When the table last saw it in use (a backend of it added or removed, or anything
    /// besides the map holding its stats): idle releases go by it.
    used_at: Instant,
}

impl Release {
    fn new(now: Instant) -> Self {
        Release {
            stats: Arc::default(),
            used_at: now,
        }
    }

    /// A backend of it, or a request still in flight on a removed one, holds its stats. Only
    /// the table hands them out, under its lock: a release seen idle there stays idle until
    /// the table itself adds a backend of it.
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.stats) > 1
    }
}

/// What requests need of a backend after it was picked; shared by the table and every request
/// in flight on it.
#[derive(Debug)]
pub(crate) struct BackendShared {
    /// Unique per add: a backend removed and added again under the same id is a new one.
    pub(crate) uid: u64,
    pub(crate) id: String,
    /// `host:port` for request URIs, parsed once.
    pub(crate) authority: Authority,
    pub(crate) in_flight: AtomicU64,
    pub(crate) counters: AtomicCounters,
    pub(crate) release: Arc<ReleaseStats>,
    /// The release name, for sticky routing and metrics.
    pub(crate) release_name: Arc<str>,
    /// `Set-Cookie` value pinning a client to this backend's release (sticky = "cookie").
    pub(crate) sticky_cookie: Option<hyper::header::HeaderValue>,
    /// Times passive health took this backend out.
    pub(crate) ejections: AtomicU64,
    /// Notified when `in_flight` drops to zero.
    pub(crate) idle: Notify,
    /// Bumped (and `cut` notified) when wait-drained hits its deadline: requests picked under
    /// an older epoch are closed.
    pub(crate) cut_epoch: AtomicU64,
    pub(crate) cut: Arc<Notify>,
    /// Requests a cut caught while they waited for a response head and that were then sent
    /// to another backend: their clients never knew, so a drain report does not count them
    /// as closed.
    pub(crate) cut_and_retried: AtomicU64,
    /// Failed requests in a row (passive health check): connection failures, 5xx with
    /// `eject_on_5xx`, and responses whose body broke off. A response clears it only once
    /// its body has ended whole.
    pub(crate) consecutive_errors: AtomicU64,
    /// Notified when a body broke off: the request's task cannot reach the table, so the
    /// backend's checker judges the ejection.
    pub(crate) body_broke: Notify,
}

impl BackendShared {
    /// Records a failed attempt; returns the number of failures in a row.
    pub(crate) fn failed(&self) -> u64 {
        self.counters.proxy_error();
        self.release.counters.proxy_error();
        self.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts a request sent to this backend.
    pub(crate) fn sent(&self) {
        self.counters.request();
        self.release.counters.request();
    }

    /// Records a response head. With `fail_on_5xx` a 5xx counts as a failure in a row for
    /// passive health: returns the failures in a row, 0 when the head is not one (its body
    /// may still break; [`BackendShared::completed`] clears the run).
    pub(crate) fn answered(&self, status: u16, latency_us: u64, fail_on_5xx: bool) -> u64 {
        self.counters.response(status, latency_us);
        self.release.counters.response(status, latency_us);
        self.release.samples.push(latency_us);
        if fail_on_5xx && status >= 500 {
            return self.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1;
        }
        0
    }

    /// A response that did not fail ended whole (or became a tunnel): the run of failures
    /// ends.
    pub(crate) fn completed(&self) {
        if self.consecutive_errors.load(Ordering::Relaxed) != 0 {
            self.consecutive_errors.store(0, Ordering::Relaxed);
        }
    }

    /// Records a response whose body the backend broke off after its head (with `status`)
    /// was counted, and tells the checker; returns the failures in a row (passive health).
    /// `head_failed`: the head already counted as one, and one response is one failure.
    pub(crate) fn broke(&self, status: u16, head_failed: bool) -> u64 {
        self.count_broken(status);
        if head_failed {
            return self.consecutive_errors.load(Ordering::Relaxed);
        }
        let failures = self.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1;
        self.body_broke.notify_one();
        failures
    }

    /// Records a response the drain deadline cut off mid-body: a failure for the client, not
    /// the backend's (passive health is left alone).
    pub(crate) fn cut_off(&self, status: u16) {
        self.count_broken(status);
    }

    /// A 5xx head already counts as a failure: its broken body is not a second one.
    fn count_broken(&self, status: u16) {
        if status < 500 {
            self.counters.broke();
            self.release.counters.broke();
        }
    }

    /// Records a request whose client went away while it waited for this backend's response
    /// head: a failure for the proof, but not for passive health (the client's patience, not
    /// the backend, decided when it ended).
    pub(crate) fn abandoned(&self) {
        self.counters.abandon();
        self.release.counters.abandon();
    }

    /// Records how long an attempt that got no response head waited (its client gave up, or
    /// the backend timed out): at least that long. The slowest requests are the ones never
    /// answered, and a p99 (or a judge) that left them out passed a release whose slow
    /// requests were all abandoned.
    pub(crate) fn waited_without_answer(&self, latency_us: u64) {
        self.counters.add_latency(latency_us);
        self.release.counters.add_latency(latency_us);
        self.release.samples.push(latency_us);
    }

    pub(crate) fn retried(&self) {
        self.counters.retry();
        self.release.counters.retry();
    }

    /// Closes every request picked before now.
    pub(crate) fn cut_in_flight(&self) {
        self.cut_epoch.fetch_add(1, Ordering::AcqRel);
        self.cut.notify_waiters();
    }
}

/// A request in flight on a backend; dropping it ends the request for draining purposes.
#[derive(Debug)]
pub(crate) struct InFlight {
    backend: Arc<BackendShared>,
    epoch: u64,
}

impl InFlight {
    pub(crate) fn backend(&self) -> &Arc<BackendShared> {
        &self.backend
    }

    /// True once wait-drained's deadline has cut this request.
    pub(crate) fn is_cut(&self) -> bool {
        self.backend.cut_epoch.load(Ordering::Acquire) != self.epoch
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.backend.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.backend.idle.notify_waiters();
        }
    }
}

/// Health as the active (and passive) checks track it.
#[derive(Debug)]
pub(crate) struct HealthTrack {
    pub(crate) health: Health,
    passes: u32,
    fails: u32,
    pub(crate) last_error: Option<String>,
    /// Admitted on the first passing check (a restored backend that served before).
    fast: bool,
    /// Taken out by passive health and not yet judged by an active check since: such a
    /// backend is readmitted on its first passing check, and counts against
    /// [`Table::may_eject`]'s limit.
    pub(crate) ejected: bool,
}

impl HealthTrack {
    fn new() -> Self {
        HealthTrack {
            health: Health::Unknown,
            passes: 0,
            fails: 0,
            last_error: None,
            fast: false,
            ejected: false,
        }
    }

    /// An unchecked backend is admitted on its first passing check instead of
    /// `healthy_threshold` of them: one restored from the state file (it served before the
    /// restart), or one whose deployer's health gate just passed.
    pub(crate) fn fast_admit(&mut self) {
        if self.health == Health::Unknown {
            self.fast = true;
        }
    }

    /// Applies one check result; returns true when `health` changed.
    pub(crate) fn record(
        &mut self,
        result: Result<(), String>,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> bool {
        let before = self.health;
        match result {
            Ok(()) => {
                self.fails = 0;
                self.passes = self.passes.saturating_add(1);
                // A passive ejection is a guess from requests (a client can provoke 5xx): the
                // first passing check overrules it.
                let need = if self.fast || self.ejected {
                    1
                } else {
                    healthy_threshold
                };
                if self.health != Health::Healthy && self.passes >= need {
                    self.health = Health::Healthy;
                    self.fast = false;
                    self.ejected = false;
                }
            }
            Err(e) => {
                self.passes = 0;
                self.fast = false;
                // The active check confirms it: unhealthy now, readmitted by the threshold.
                self.ejected = false;
                self.fails = self.fails.saturating_add(1);
                self.last_error = Some(e);
                // An unchecked backend fails at once; a healthy one after the threshold.
                if self.health == Health::Unknown
                    || (self.health == Health::Healthy && self.fails >= unhealthy_threshold)
                {
                    self.health = Health::Unhealthy;
                }
            }
        }
        before != self.health
    }

    /// Passive ejection: failures in a row seen by requests. The backend returns on its next
    /// passing active check.
    pub(crate) fn eject(&mut self, reason: String) -> bool {
        self.passes = 0;
        self.last_error = Some(reason);
        let changed = self.health == Health::Healthy;
        if changed {
            self.ejected = true;
        }
        self.health = Health::Unhealthy;
        changed
    }
}

/// One row of the table.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) spec: BackendSpec,
    pub(crate) state: BackendState,
    pub(crate) health: HealthTrack,
    pub(crate) shared: Arc<BackendShared>,
    /// Smooth weighted round robin's running weight.
    current: i64,
    /// The active health check task, stopped when the entry goes.
    checker: Option<AbortHandle>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(c) = self.checker.take() {
            c.abort();
        }
    }
}

impl Entry {
    /// May take a request of this kind: preview requests go to preview backends only, others
    /// to active ones only.
    fn eligible(&self, preview: bool) -> bool {
        let wanted = if preview {
            BackendState::Preview
        } else {
            BackendState::Active
        };
        self.state == wanted && self.health.health == Health::Healthy && self.spec.weight > 0
    }

    fn view(&self) -> BackendView {
        BackendView {
            spec: self.spec.clone(),
            state: self.state,
            health: self.health.health,
            in_flight: self.shared.in_flight.load(Ordering::Relaxed),
            counters: self.shared.counters.snapshot(),
        }
    }
}

/// Outcome of [`Table::add`].
#[derive(Debug)]
pub(crate) enum Added {
    Created(Arc<BackendShared>),
    /// Same id and same spec (weight aside): nothing to do.
    Exists,
    /// Same id, different spec; the message says what differs.
    Conflict(String),
}

/// How a request wants its backend chosen.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Route<'a> {
    /// The request carries `x-cutover-preview` with the deployer's secret value.
    pub(crate) preview: bool,
    /// Prefer this release (sticky cookie) when one of its backends is eligible.
    pub(crate) release: Option<&'a str>,
    /// Sticky header hash: picks a release in proportion to the releases' total weights.
    pub(crate) hash: Option<u64>,
}

/// All backends, in the order they were added, plus per-release counters.
#[derive(Debug, Default)]
pub(crate) struct Table {
    entries: Vec<Entry>,
    releases: BTreeMap<String, Release>,
    /// What the releases [`Table::tidy`] let go of had counted: still part of every total.
    retired: Counters,
    next_uid: u64,
    /// `Set-Cookie` values are made for new backends (sticky = "cookie").
    pub(crate) sticky_cookie: bool,
}

impl Table {
    /// Adds a backend (health `Unknown`). A spec equal to an existing one except for its weight
    /// is the same backend: the current weight stays (weights change through `set_weight`).
    pub(crate) fn add(&mut self, spec: BackendSpec, state: BackendState) -> Added {
        if let Some(e) = self.get(&spec.id) {
            let same = BackendSpec {
                weight: e.spec.weight,
                gated: e.spec.gated,
                ..spec.clone()
            };
            return if same == e.spec {
                Added::Exists
            } else {
                Added::Conflict(format!(
                    "backend {} already exists with a different spec (address {}, release {}, health_path {}): remove it first",
                    e.spec.id, e.spec.address, e.spec.release, e.spec.health_path
                ))
            };
        }
        let authority = match spec.address.to_string().parse::<Authority>() {
            Ok(a) => a,
            Err(e) => return Added::Conflict(format!("address {}: {e}", spec.address)),
        };
        let now = Instant::now();
        let slot = self
            .releases
            .entry(spec.release.clone())
            .or_insert_with(|| Release::new(now));
        if !slot.stats.samples.has_slots() {
            // Without slots the release was idle (see `tidy`), and nothing has taken its stats
            // since: they are the map's alone.
            if let Some(stats) = Arc::get_mut(&mut slot.stats) {
                stats.samples = SampleRing::with_slots();
            }
        }
        slot.used_at = now;
        let release = slot.stats.clone();
        self.next_uid += 1;
        let sticky_cookie = self
            .sticky_cookie
            .then(|| {
                hyper::header::HeaderValue::from_str(&format!(
                    "{}={}; Path=/; HttpOnly; SameSite=Lax",
                    crate::balancer::api::STICKY_COOKIE,
                    spec.release
                ))
                .ok()
            })
            .flatten();
        let shared = Arc::new(BackendShared {
            uid: self.next_uid,
            id: spec.id.clone(),
            authority,
            in_flight: AtomicU64::new(0),
            counters: AtomicCounters::default(),
            release,
            release_name: Arc::from(spec.release.as_str()),
            sticky_cookie,
            ejections: AtomicU64::new(0),
            idle: Notify::new(),
            cut_epoch: AtomicU64::new(0),
            cut: Arc::new(Notify::new()),
            cut_and_retried: AtomicU64::new(0),
            consecutive_errors: AtomicU64::new(0),
            body_broke: Notify::new(),
        });
        self.entries.push(Entry {
            spec,
            state,
            health: HealthTrack::new(),
            shared: shared.clone(),
            current: 0,
            checker: None,
        });
        self.tidy(now);
        Added::Created(shared)
    }

    /// Attaches the health check task of the backend `uid` (aborted if it is already gone).
    pub(crate) fn set_checker(&mut self, uid: u64, checker: AbortHandle) {
        match self.entries.iter_mut().find(|e| e.shared.uid == uid) {
            Some(e) => e.checker = Some(checker),
            None => checker.abort(),
        }
    }

    pub(crate) fn remove(&mut self, id: &str) -> Option<Entry> {
        let i = self.entries.iter().position(|e| e.spec.id == id)?;
        let entry = self.entries.remove(i);
        self.reset_rotation();
        // The entry still holds its release's stats here: the release counts as used now, and
        // its samples stay for `RING_IDLE` from this moment.
        self.tidy(Instant::now());
        Some(entry)
    }

    /// Keeps the release map bounded (see the module docs): an idle release drops its samples
    /// once it has been idle for [`RING_IDLE`], and beyond the [`IDLE_RELEASES`] most recently
    /// used idle ones its entry goes, its counts added to [`Table::retired`]. A release in use
    /// is left alone. `now` is a parameter for tests.
    fn tidy(&mut self, now: Instant) {
        let mut idle: Vec<(Instant, String)> = Vec::new();
        for (name, r) in &mut self.releases {
            if r.in_use() {
                r.used_at = now;
                continue;
            }
            if now.saturating_duration_since(r.used_at) >= RING_IDLE {
                if let Some(stats) = Arc::get_mut(&mut r.stats) {
                    stats.samples = SampleRing::default();
                }
            }
            idle.push((r.used_at, name.clone()));
        }
        if idle.len() <= IDLE_RELEASES {
            return;
        }
        // The most recently used first; a tie goes by name, so that the outcome is the same
        // on every run.
        idle.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (_, name) in idle.drain(IDLE_RELEASES..) {
            if let Some(r) = self.releases.remove(&name) {
                self.retired.add(&r.stats.counters.snapshot());
            }
        }
    }

    pub(crate) fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.spec.id == id)
    }

    pub(crate) fn get_mut(&mut self, id: &str) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.spec.id == id)
    }

    /// Whether passive health may take backend `uid` out: it is healthy, its pool (the
    /// backends in the same routing state: active, preview, ...) keeps another eligible
    /// backend, and at most half the pool would be passively ejected at once (nginx/Envoy's
    /// `max_ejection_percent` at 50 %). Requests can make a backend look failed (a client
    /// can provoke 5xx on purpose), so they must never be able to empty a pool: the active
    /// check is the only judge that can take the last backend out.
    pub(crate) fn may_eject(&self, uid: u64) -> bool {
        let Some(e) = self.entries.iter().find(|e| e.shared.uid == uid) else {
            return false;
        };
        if e.health.health != Health::Healthy {
            return false;
        }
        let pool = || self.entries.iter().filter(|o| o.state == e.state);
        let others_eligible = pool()
            .filter(|o| {
                o.shared.uid != uid && o.health.health == Health::Healthy && o.spec.weight > 0
            })
            .count();
        let ejected = pool().filter(|o| o.health.ejected).count();
        others_eligible >= 1 && (ejected + 1) * 2 <= pool().count()
    }

    pub(crate) fn by_uid_mut(&mut self, uid: u64) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.shared.uid == uid)
    }

    /// Returns false when the id is unknown.
    pub(crate) fn set_weight(&mut self, id: &str, weight: u32) -> bool {
        let Some(e) = self.get_mut(id) else {
            return false;
        };
        e.spec.weight = weight;
        self.reset_rotation();
        true
    }

    /// Returns the previous state, or `None` when the id is unknown.
    pub(crate) fn set_state(&mut self, id: &str, state: BackendState) -> Option<BackendState> {
        let e = self.get_mut(id)?;
        Some(std::mem::replace(&mut e.state, state))
    }

    /// nginx resets running weights when the set of peers or weights changes.
    fn reset_rotation(&mut self) {
        for e in &mut self.entries {
            e.current = 0;
        }
    }

    /// Picks a backend for a request: the sticky release when it has an eligible backend, else
    /// any eligible backend of the request's kind (preview or not). Counts the request in flight
    /// on it. Also returns how many backends were eligible for the request's kind, sticky or
    /// not: a retry needs several, and falls back to another release when the sticky one has
    /// no other backend (a canary usually has one).
    pub(crate) fn pick(&mut self, exclude: &[u64], route: Route<'_>) -> Option<(InFlight, usize)> {
        let hashed;
        let sticky = match route.hash {
            Some(hash) => {
                hashed = self.release_by_hash(exclude, route.preview, hash);
                hashed.as_deref()
            }
            None => route.release,
        };
        if let Some(release) = sticky {
            let picked = self.pick_where(exclude, |e| {
                e.eligible(route.preview) && *e.shared.release_name == *release
            });
            if let Some((guard, _)) = picked {
                let eligible = self
                    .entries
                    .iter()
                    .filter(|e| e.eligible(route.preview) && !exclude.contains(&e.shared.uid))
                    .count();
                return Some((guard, eligible));
            }
        }
        if let Some(picked) = self.pick_where(exclude, |e| e.eligible(route.preview)) {
            return Some(picked);
        }
        // The active backends are all failing: a healthy one being drained still runs and can
        // answer, as a balancer falls back to its backup servers. Better than "no backend
        // available" when the release just switched to dies (a blue-green window, an unhealthy
        // batch). With no active backend at all the drains are meant to empty the fleet (in
        // place, every host at once): they are left to finish.
        // Whether the active backends are failing is asked of all of them: a retry that has
        // tried every healthy one does not go on to the old release.
        if route.preview || !self.actives_all_failing() {
            return None;
        }
        self.pick_where(exclude, |e| {
            e.state == BackendState::Draining
                && e.health.health == Health::Healthy
                && e.spec.weight > 0
        })
    }

    /// Whether the draining backend `id` takes new requests because no active backend can
    /// (see [`Table::pick`]).
    pub(crate) fn stands_in(&self, id: &str) -> bool {
        self.get(id).is_some_and(|e| {
            e.state == BackendState::Draining
                && e.health.health == Health::Healthy
                && e.spec.weight > 0
        }) && self.actives_all_failing()
    }

    /// There are active backends, and none of them can take a request.
    fn actives_all_failing(&self) -> bool {
        self.entries.iter().any(|e| e.state == BackendState::Active)
            && !self.entries.iter().any(|e| e.eligible(false))
    }

    /// The release a sticky hash lands on: releases in name order, each with a share of the
    /// hash space equal to its eligible backends' total weight.
    fn release_by_hash(&self, exclude: &[u64], preview: bool, hash: u64) -> Option<Arc<str>> {
        let mut totals: Vec<(&Arc<str>, u64)> = Vec::new();
        for e in &self.entries {
            if !e.eligible(preview) || exclude.contains(&e.shared.uid) {
                continue;
            }
            let w = u64::from(e.spec.weight);
            match totals
                .iter_mut()
                .find(|(r, _)| **r == e.shared.release_name)
            {
                Some((_, t)) => *t += w,
                None => totals.push((&e.shared.release_name, w)),
            }
        }
        totals.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let sum: u64 = totals.iter().map(|(_, w)| w).sum();
        if sum == 0 {
            return None;
        }
        let mut point = hash % sum;
        for (r, w) in totals {
            if point < w {
                return Some(r.clone());
            }
            point -= w;
        }
        None
    }

    /// Smooth weighted round robin among the backends `ok` accepts and `exclude` does not name.
    fn pick_where(
        &mut self,
        exclude: &[u64],
        ok: impl Fn(&Entry) -> bool,
    ) -> Option<(InFlight, usize)> {
        let mut total: i64 = 0;
        let mut best: Option<(usize, i64)> = None;
        let mut eligible = 0;
        for (i, e) in self.entries.iter_mut().enumerate() {
            if !ok(e) || exclude.contains(&e.shared.uid) {
                continue;
            }
            eligible += 1;
            let w = i64::from(e.spec.weight);
            e.current += w;
            total += w;
            if best.is_none_or(|(_, c)| e.current > c) {
                best = Some((i, e.current));
            }
        }
        let (i, _) = best?;
        let e = &mut self.entries[i];
        e.current -= total;
        let backend = e.shared.clone();
        backend.in_flight.fetch_add(1, Ordering::AcqRel);
        let epoch = backend.cut_epoch.load(Ordering::Acquire);
        Some((InFlight { backend, epoch }, eligible))
    }

    /// Blue-green switch in one step: `activate` become active, `standby` draining. Nothing
    /// changes when an id is unknown (returned) or named in both lists.
    pub(crate) fn switch(&mut self, activate: &[String], standby: &[String]) -> Result<(), String> {
        if let Some(id) = activate.iter().find(|id| standby.contains(id)) {
            return Err(format!("backend {id:?} is in both activate and standby"));
        }
        if let Some(id) = activate
            .iter()
            .chain(standby)
            .find(|id| self.get(id).is_none())
        {
            return Err(id.clone());
        }
        for e in &mut self.entries {
            if activate.contains(&e.spec.id) {
                e.state = BackendState::Active;
                // Live now: `/backends` must not still call it a preview.
                e.spec.preview = false;
            } else if standby.contains(&e.spec.id) {
                e.state = BackendState::Draining;
            }
        }
        self.reset_rotation();
        Ok(())
    }

    /// Sets several weights at once; nothing changes when an id is unknown (returned).
    pub(crate) fn set_weights(&mut self, weights: &BTreeMap<String, u32>) -> Result<(), String> {
        if let Some(id) = weights.keys().find(|id| self.get(id).is_none()) {
            return Err(id.clone());
        }
        for e in &mut self.entries {
            if let Some(w) = weights.get(&e.spec.id) {
                e.spec.weight = *w;
            }
        }
        self.reset_rotation();
        Ok(())
    }

    /// Recent latencies of a release, `None` when the release was never seen (or was idle long
    /// enough to be let go of, see [`Table::tidy`]).
    pub(crate) fn samples(&self, release: &str, max: usize) -> Option<Vec<u64>> {
        self.releases
            .get(release)
            .map(|r| r.stats.samples.recent(max))
    }

    /// The latencies a release recorded from `since_ms` to `until_ms` (see
    /// [`SampleRing::window`]), `None` as for [`Table::samples`].
    pub(crate) fn sample_window(
        &self,
        release: &str,
        since_ms: u64,
        until_ms: u64,
        max: usize,
    ) -> Option<super::samples::Window> {
        self.releases
            .get(release)
            .map(|r| r.stats.samples.window(since_ms, until_ms, max))
    }

    /// Every backend's shared part, for metrics and shutdown.
    pub(crate) fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// Stops every health check (at shutdown).
    pub(crate) fn stop_checkers(&mut self) {
        for e in &mut self.entries {
            if let Some(c) = e.checker.take() {
                c.abort();
            }
        }
    }

    pub(crate) fn views(&self) -> Vec<BackendView> {
        self.entries.iter().map(Entry::view).collect()
    }

    /// Counters of every backend present, by id.
    pub(crate) fn backend_counters(&self) -> BTreeMap<String, Counters> {
        self.entries
            .iter()
            .map(|e| (e.spec.id.clone(), e.shared.counters.snapshot()))
            .collect()
    }

    /// Counters of every release in use or recently used, including removed backends'.
    pub(crate) fn release_counters(&self) -> BTreeMap<String, Counters> {
        self.releases
            .iter()
            .map(|(r, c)| (r.clone(), c.stats.counters.snapshot()))
            .collect()
    }

    /// What the releases no longer listed by [`Table::release_counters`] had counted: a total
    /// is theirs plus this.
    pub(crate) fn retired_counters(&self) -> Counters {
        self.retired.clone()
    }

    /// Adds another proxy's counts (see [`super::takeover::Carried`]): per backend where this
    /// table has the backend, per release always (release counters include removed backends'),
    /// and what its retired releases had counted.
    pub(crate) fn add_counts(
        &mut self,
        backends: &BTreeMap<String, Counters>,
        releases: &BTreeMap<String, Counters>,
        retired: &Counters,
    ) {
        for e in &self.entries {
            if let Some(c) = backends.get(&e.spec.id) {
                e.shared.counters.add(c);
            }
        }
        let now = Instant::now();
        for (release, c) in releases {
            self.releases
                .entry(release.clone())
                .or_insert_with(|| Release::new(now))
                .stats
                .counters
                .add(c);
        }
        self.retired.add(retired);
        self.tidy(now);
    }

    /// Specs and states, for persistence.
    pub(crate) fn routes(&self) -> Vec<(BackendSpec, BackendState)> {
        self.entries
            .iter()
            .map(|e| (e.spec.clone(), e.state))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, weight: u32, port: u16) -> BackendSpec {
        BackendSpec {
            id: id.into(),
            address: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            host: "h".into(),
            release: format!("r-{id}"),
            weight,
            health_path: "/health".into(),
            preview: false,
            gated: false,
        }
    }

    fn healthy(table: &mut Table, id: &str) {
        let e = table.get_mut(id).unwrap();
        e.health.record(Ok(()), 1, 1);
    }

    fn table(weights: &[(&str, u32)]) -> Table {
        let mut t = Table::default();
        for (i, (id, w)) in weights.iter().enumerate() {
            assert!(matches!(
                t.add(spec(id, *w, 4000 + i as u16), BackendState::Active),
                Added::Created(_)
            ));
            healthy(&mut t, id);
        }
        t
    }

    fn pick_id(t: &mut Table) -> String {
        let (guard, _) = t.pick(&[], Route::default()).expect("a backend");
        guard.backend().id.clone()
    }

    /// Review finding: when green died in a blue-green window, clients got 502s and 503s for
    /// half a second while blue, draining but healthy, could still have answered.
    #[test]
    fn draining_backends_answer_when_no_active_one_can() {
        let mut t = table(&[("blue", 1), ("green", 1)]);
        t.set_state("blue", BackendState::Draining);
        assert_eq!(pick_id(&mut t), "green", "an active backend first");
        t.get_mut("green").unwrap().health.health = Health::Unhealthy;
        assert_eq!(pick_id(&mut t), "blue", "then a healthy draining one");
        let preview = Route {
            preview: true,
            ..Route::default()
        };
        assert!(
            t.pick(&[], preview).is_none(),
            "never for a preview request"
        );
        // Review finding: a retry that has tried every healthy active backend does not fall
        // back to the old release.
        t.get_mut("green").unwrap().health.health = Health::Healthy;
        let green = t.get("green").unwrap().shared.uid;
        assert!(
            t.pick(&[green], Route::default()).is_none(),
            "green was only tried"
        );
        t.get_mut("green").unwrap().health.health = Health::Unhealthy;
        t.set_state("green", BackendState::Draining);
        assert!(
            t.pick(&[], Route::default()).is_none(),
            "with no active backend at all, the drains are meant to empty the fleet"
        );
        t.set_state("green", BackendState::Active);
        t.get_mut("blue").unwrap().health.health = Health::Unhealthy;
        assert!(
            t.pick(&[], Route::default()).is_none(),
            "an unhealthy one never"
        );
    }

    #[test]
    fn swrr_matches_nginx_order() {
        let mut t = table(&[("a", 5), ("b", 1), ("c", 1)]);
        let order: Vec<String> = (0..7).map(|_| pick_id(&mut t)).collect();
        assert_eq!(order, ["a", "a", "b", "a", "c", "a", "a"]);
    }

    #[test]
    fn swrr_respects_weights_over_many_picks() {
        let mut t = table(&[("a", 3), ("b", 2), ("c", 0), ("d", 5)]);
        let mut seen = BTreeMap::<String, u32>::new();
        for _ in 0..1000 {
            *seen.entry(pick_id(&mut t)).or_default() += 1;
        }
        assert_eq!(seen.get("a"), Some(&300));
        assert_eq!(seen.get("b"), Some(&200));
        assert_eq!(seen.get("c"), None);
        assert_eq!(seen.get("d"), Some(&500));
    }

    #[test]
    fn only_active_healthy_backends_are_picked() {
        let mut t = table(&[("a", 1), ("b", 1)]);
        t.add(spec("new", 1, 4999), BackendState::Active);
        t.set_state("a", BackendState::Draining);
        for _ in 0..10 {
            assert_eq!(pick_id(&mut t), "b");
        }
        // Only an unchecked active backend is left: a healthy draining one answers meanwhile
        // (see `draining_backends_answer_when_no_active_one_can`), until none is active.
        t.set_state("b", BackendState::Draining);
        assert!(["a", "b"].contains(&pick_id(&mut t).as_str()));
        t.set_state("new", BackendState::Draining);
        assert!(t.pick(&[], Route::default()).is_none());
    }

    #[test]
    fn in_flight_is_counted_until_the_guard_drops() {
        let mut t = table(&[("a", 1)]);
        let (g1, _) = t.pick(&[], Route::default()).unwrap();
        let (g2, _) = t.pick(&[], Route::default()).unwrap();
        let shared = g1.backend().clone();
        assert_eq!(shared.in_flight.load(Ordering::Relaxed), 2);
        drop(g1);
        drop(g2);
        assert_eq!(shared.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn one_broken_response_is_one_failure_in_a_row() {
        let t = table(&[("a", 1)]);
        let b = &t.get("a").unwrap().shared;
        // A 5xx head that counted (eject_on_5xx), then its body broke: still one.
        assert_eq!(b.answered(503, 10, true), 1);
        assert_eq!(b.broke(503, true), 1);
        // Bodies that break after good heads add up: the heads do not clear the run...
        assert_eq!(b.answered(200, 10, true), 0);
        assert_eq!(b.broke(200, false), 2);
        assert_eq!(b.answered(200, 10, true), 0);
        assert_eq!(b.broke(200, false), 3);
        // ...a whole response does.
        assert_eq!(b.answered(200, 10, true), 0);
        b.completed();
        assert_eq!(b.consecutive_errors.load(Ordering::Relaxed), 0);
        // Without eject_on_5xx the 5xx head does not count, its broken body does.
        assert_eq!(b.answered(502, 10, false), 0);
        assert_eq!(b.broke(502, false), 1);
    }

    #[test]
    fn excluded_backends_are_skipped() {
        let mut t = table(&[("a", 10), ("b", 1)]);
        let uid_a = t.get("a").unwrap().shared.uid;
        let (g, eligible) = t.pick(&[uid_a], Route::default()).unwrap();
        assert_eq!(g.backend().id, "b");
        assert_eq!(eligible, 1);
    }

    #[test]
    fn add_is_idempotent_and_conflicts_are_reported() {
        let mut t = table(&[("a", 1)]);
        assert!(matches!(
            t.add(spec("a", 1, 4000), BackendState::Active),
            Added::Exists
        ));
        // A different weight is the same backend.
        assert!(matches!(
            t.add(spec("a", 7, 4000), BackendState::Active),
            Added::Exists
        ));
        assert!(matches!(
            t.add(spec("a", 1, 4001), BackendState::Active),
            Added::Conflict(_)
        ));
    }

    #[test]
    fn health_thresholds() {
        let mut h = HealthTrack::new();
        assert!(!h.record(Ok(()), 2, 3));
        assert_eq!(h.health, Health::Unknown);
        assert!(h.record(Ok(()), 2, 3));
        assert_eq!(h.health, Health::Healthy);
        h.record(Err("x".into()), 2, 3);
        h.record(Err("x".into()), 2, 3);
        assert_eq!(h.health, Health::Healthy);
        assert!(h.record(Err("x".into()), 2, 3));
        assert_eq!(h.health, Health::Unhealthy);
        h.record(Ok(()), 2, 3);
        assert_eq!(h.health, Health::Unhealthy);
        h.record(Ok(()), 2, 3);
        assert_eq!(h.health, Health::Healthy);
    }

    fn eject(t: &mut Table, id: &str) -> bool {
        let uid = t.get(id).unwrap().shared.uid;
        t.may_eject(uid) && t.get_mut(id).unwrap().health.eject("5xx".into())
    }

    #[test]
    fn passive_ejection_leaves_half_the_pool_and_never_the_last_backend() {
        // One backend: never ejected by requests, whatever they see.
        let mut t = table(&[("a", 1)]);
        assert!(!eject(&mut t, "a"));
        assert!(t.pick(&[], Route::default()).is_some());
        // Two: one may go, the other stays.
        let mut t = table(&[("a", 1), ("b", 1)]);
        assert!(eject(&mut t, "a"));
        assert!(!eject(&mut t, "b"));
        assert_eq!(pick_id(&mut t), "b");
        // Four: two at most; a pool is its routing state (a preview backend is not a spare).
        let mut t = table(&[("a", 1), ("b", 1), ("c", 1), ("d", 1), ("p", 1)]);
        t.set_state("p", BackendState::Preview);
        assert!(eject(&mut t, "a"));
        assert!(eject(&mut t, "b"));
        assert!(!eject(&mut t, "c"));
        // A backend the active check took out is no spare either.
        let mut t = table(&[("a", 1), ("b", 1), ("c", 1)]);
        t.get_mut("b")
            .unwrap()
            .health
            .record(Err("down".into()), 1, 1);
        assert!(eject(&mut t, "a"), "c is still eligible");
        assert!(!eject(&mut t, "c"), "c is the last eligible one");
        t.get_mut("a").unwrap().health.record(Ok(()), 1, 1);
        t.set_weight("a", 0);
        assert!(!eject(&mut t, "c"), "a weight-0 backend takes no request");
    }

    #[test]
    fn a_passively_ejected_backend_returns_on_one_passing_check() {
        let mut t = table(&[("a", 1), ("b", 1)]);
        assert!(eject(&mut t, "a"));
        let h = &mut t.get_mut("a").unwrap().health;
        assert!(h.record(Ok(()), 3, 3), "one pass readmits it");
        assert_eq!(h.health, Health::Healthy);
        // Once the active check confirms the failure, the threshold applies again.
        assert!(eject(&mut t, "a"));
        let h = &mut t.get_mut("a").unwrap().health;
        h.record(Err("down".into()), 3, 3);
        assert!(!h.record(Ok(()), 3, 3));
        assert!(!h.record(Ok(()), 3, 3));
        assert!(h.record(Ok(()), 3, 3));
    }

    #[test]
    fn release_counters_outlive_the_backend() {
        let mut t = table(&[("a", 1)]);
        {
            let (g, _) = t.pick(&[], Route::default()).unwrap();
            g.backend().sent();
            g.backend().answered(200, 10, true);
            g.backend().sent();
            g.backend().abandoned();
            assert_eq!(g.backend().counters.snapshot().abandoned, 1);
            // Given up on after 1.5 s: in the 2 s bucket, not in none.
            g.backend().waited_without_answer(1_500_000);
            let c = g.backend().counters.snapshot();
            let at = LATENCY_BUCKETS_MS.iter().position(|b| *b == 2000).unwrap();
            assert_eq!(c.latency_buckets[at], 1, "{c:?}");
        }
        t.remove("a");
        assert!(t.backend_counters().is_empty());
        let r = t.release_counters();
        assert_eq!(r["r-a"].requests, 2);
        assert_eq!(r["r-a"].status_2xx, 1);
        assert_eq!(r["r-a"].abandoned, 1);
        // A takeover's carried counts keep them too.
        t.add_counts(&BTreeMap::new(), &r, &Counters::default());
        assert_eq!(t.release_counters()["r-a"].abandoned, 2);
    }

    /// Adds backend `id` of release `release`, healthy, and has it answer `n` requests.
    fn serve(t: &mut Table, id: &str, release: &str, n: u64) {
        let s = BackendSpec {
            release: release.into(),
            ..spec(id, 1, 4000)
        };
        assert!(matches!(t.add(s, BackendState::Active), Added::Created(_)));
        healthy(t, id);
        let b = t.get(id).unwrap().shared.clone();
        for _ in 0..n {
            b.sent();
            b.answered(200, 10, false);
        }
    }

    /// Every count the table holds: the listed releases' and the retired ones'.
    fn total_requests(t: &Table) -> u64 {
        let listed: u64 = t.release_counters().values().map(|c| c.requests).sum();
        listed + t.retired_counters().requests
    }

    /// Review finding: a long-lived proxy kept every release it ever saw, each with its ring
    /// of samples, and `/metrics` named them all.
    #[test]
    fn the_release_map_stays_bounded_and_the_totals_stay_whole() {
        let mut t = Table::default();
        serve(&mut t, "live", "r-live", 3);
        for i in 0..100 {
            serve(&mut t, "b", &format!("r{i:03}"), 2);
            t.remove("b");
            // The live one, the idle ones, and the one just removed (its entry, in the
            // caller's hands, still holds it: it goes at the table's next look).
            assert!(
                t.releases.len() <= IDLE_RELEASES + 2,
                "{}",
                t.releases.len()
            );
        }
        t.tidy(Instant::now());
        assert_eq!(t.releases.len(), IDLE_RELEASES + 1);
        assert_eq!(total_requests(&t), 3 + 200, "no count is lost");
        assert_eq!(
            t.retired_counters().requests,
            2 * (100 - IDLE_RELEASES as u64)
        );
        let kept = t.release_counters();
        assert!(kept.contains_key("r-live"), "in use");
        assert!(kept.contains_key("r099"), "the most recently used idle one");
        assert!(!kept.contains_key("r000"), "the least recently used");
        // Past `RING_IDLE` the idle ones keep their counts but no samples; the live one keeps
        // both.
        t.tidy(Instant::now() + RING_IDLE);
        assert_eq!(t.samples("r099", 10), Some(Vec::new()));
        assert_eq!(t.release_counters()["r099"].requests, 2);
        assert_eq!(t.samples("r-live", 10).unwrap().len(), 3);
        let with_slots = t
            .releases
            .values()
            .filter(|r| r.stats.samples.has_slots())
            .count();
        assert_eq!(with_slots, 1, "only the live release's ring remains");
    }

    #[test]
    fn a_release_in_use_keeps_its_samples() {
        let mut t = Table::default();
        serve(&mut t, "a", "r1", 1);
        serve(&mut t, "b", "r2", 1);
        // A request still in flight on a removed backend holds its release.
        let (in_flight, _) = t.pick(&[], Route::default()).unwrap();
        let held = in_flight.backend().id.clone();
        t.remove(&held);
        let later = Instant::now() + RING_IDLE * 100;
        t.tidy(later);
        assert_eq!(t.samples("r1", 10).unwrap().len(), 1);
        assert_eq!(t.samples("r2", 10).unwrap().len(), 1);
        // Its late answer still counts and samples.
        in_flight.backend().answered(200, 20, false);
        drop(in_flight);
        let released = if held == "a" { "r1" } else { "r2" };
        assert_eq!(t.samples(released, 10).unwrap(), [10, 20]);
        // Idle since the request ended, which the table learns at its next look.
        t.tidy(later);
        t.tidy(later + RING_IDLE);
        assert_eq!(t.samples(released, 10), Some(Vec::new()));
        let other = if held == "a" { "r2" } else { "r1" };
        assert_eq!(t.samples(other, 10).unwrap().len(), 1);
    }

    /// Review finding: a rollback to a release that had gone idle must count on from where it
    /// was, and sample again.
    #[test]
    fn a_release_added_again_after_going_idle_counts_on() {
        let mut t = Table::default();
        serve(&mut t, "a", "r1", 5);
        t.remove("a");
        t.tidy(Instant::now() + RING_IDLE);
        assert_eq!(t.samples("r1", 10), Some(Vec::new()));
        serve(&mut t, "a", "r1", 2);
        assert_eq!(t.release_counters()["r1"].requests, 7);
        assert_eq!(t.samples("r1", 10).unwrap(), [10, 10]);
        // Let go of entirely: it counts again from zero, the totals go on.
        t.remove("a");
        for i in 0..IDLE_RELEASES {
            serve(&mut t, "b", &format!("other{i}"), 1);
            t.remove("b");
        }
        t.tidy(Instant::now());
        assert!(!t.release_counters().contains_key("r1"));
        assert_eq!(t.retired_counters().requests, 7);
        serve(&mut t, "a", "r1", 1);
        assert_eq!(t.release_counters()["r1"].requests, 1);
        assert_eq!(total_requests(&t), 7 + IDLE_RELEASES as u64 + 1);
        // And a takeover hands the retired counts on.
        let mut next = Table::default();
        next.add_counts(
            &BTreeMap::new(),
            &t.release_counters(),
            &t.retired_counters(),
        );
        assert_eq!(total_requests(&next), total_requests(&t));
    }

    #[test]
    fn latency_buckets_use_inclusive_ms_bounds() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1000), 0);
        assert_eq!(bucket(1001), 1);
        assert_eq!(bucket(10_000_000), LATENCY_BUCKETS_MS.len() - 1);
        assert_eq!(bucket(10_000_001), LATENCY_BUCKETS_MS.len());
        let c = AtomicCounters::default();
        c.response(200, 1500);
        c.response(500, 20_000_000);
        let s = c.snapshot();
        assert_eq!(s.latency_buckets.len(), LATENCY_BUCKETS_MS.len() + 1);
        assert_eq!(
            (
                s.latency_buckets[1],
                s.latency_buckets[LATENCY_BUCKETS_MS.len()]
            ),
            (1, 1)
        );
    }

    #[test]
    fn preview_and_sticky_routes() {
        let mut t = table(&[("a", 1), ("b", 1)]);
        t.set_state("b", BackendState::Preview);
        let preview = Route {
            preview: true,
            ..Route::default()
        };
        for _ in 0..4 {
            assert_eq!(t.pick(&[], preview).unwrap().0.backend().id, "b");
            assert_eq!(pick_id(&mut t), "a");
        }
        t.set_state("b", BackendState::Active);
        // The release of a sticky cookie wins while it has an eligible backend.
        let sticky = Route {
            release: Some("r-b"),
            ..Route::default()
        };
        for _ in 0..4 {
            let (guard, eligible) = t.pick(&[], sticky).unwrap();
            assert_eq!(guard.backend().id, "b");
            // Both count: a retry may fall back to "a" when "b" fails.
            assert_eq!(eligible, 2);
        }
        let b = t.get("b").unwrap().shared.uid;
        assert_eq!(t.pick(&[b], sticky).unwrap().0.backend().id, "a");
        t.set_state("b", BackendState::Draining);
        assert_eq!(t.pick(&[], sticky).unwrap().0.backend().id, "a");
    }

    #[test]
    fn sticky_hash_splits_by_release_weight() {
        let mut t = table(&[("a", 3), ("b", 1)]);
        let mut on_b = 0;
        for h in 0..400u64 {
            let route = Route {
                hash: Some(h),
                ..Route::default()
            };
            let (guard, eligible) = t.pick(&[], route).unwrap();
            let first = guard.backend().id.clone();
            assert_eq!(eligible, 2, "a retry can fall back to the other release");
            assert_eq!(t.pick(&[], route).unwrap().0.backend().id, first);
            if first == "b" {
                on_b += 1;
            }
        }
        assert_eq!(on_b, 100);
    }

    #[test]
    fn switch_and_weights_are_all_or_nothing() {
        let mut t = table(&[("a", 1), ("b", 1)]);
        t.set_state("b", BackendState::Preview);
        assert_eq!(t.switch(&["b".into()], &["zz".into()]), Err("zz".into()));
        assert_eq!(t.get("b").unwrap().state, BackendState::Preview);
        assert!(t.switch(&["a".into()], &["a".into()]).is_err());
        for e in t.entries.iter_mut().filter(|e| e.spec.id == "b") {
            e.spec.preview = true;
        }
        t.switch(&["b".into()], &["a".into()]).unwrap();
        assert_eq!(t.get("a").unwrap().state, BackendState::Draining);
        assert_eq!(t.get("b").unwrap().state, BackendState::Active);
        assert!(
            !t.get("b").unwrap().spec.preview,
            "switched in, no longer a preview"
        );
        let w = BTreeMap::from([("a".to_string(), 9), ("q".to_string(), 1)]);
        assert_eq!(t.set_weights(&w), Err("q".into()));
        assert_eq!(t.get("a").unwrap().spec.weight, 1);
    }
}
