//! The latency samples of a release: what `GET /samples` answers and the canary judge
//! ([`crate::analysis`]) compares, the canary's latencies against stable's.
//!
//! Design choices:
//! - A ring of the newest [`SAMPLES`], lock-free: a writer claims a slot with one `fetch_add`
//!   and stores into it. A reader racing a writer may see a slot's previous value, which is
//!   harmless for a sample.
//! - Each slot is one `u64` holding the latency (µs, saturating at `u32::MAX`: 71 minutes) and
//!   when it was recorded (10 ms ticks since the process's first reading of [`clock_ms`],
//!   wrapping after 497 days). One atomic store keeps the pair whole (a ring is 128 KiB).
//! - A busy release records every `stride`-th response, not every one: the stride follows the
//!   release's rate (measured every 100 ms) so that the ring reaches back about [`SPAN_MS`]
//!   (5 minutes) whatever the traffic; while the ring has room (its oldest sample is older
//!   than that, or it has not gone round yet) every response is recorded. Without it a
//!   release at 2,000 requests/s kept its last 2 seconds, the judge (which narrows both sides
//!   to what both rings still have) judged the last 2 seconds of every interval, and a canary
//!   at 0.5% of the traffic got fewer than its 20 samples. Every k-th response is as fair a
//!   sample of the latencies as all of them.
//! - [`SampleRing::window`] answers the samples of a stretch of time: all of them, or when
//!   there are more than asked for, an even thinning across the stretch, never just the
//!   newest. Under heavy traffic stable's newest 2000 are its last second while a canary's
//!   reach over the whole interval, and a judge of the two compared different times. It also
//!   says from when the stretch is whole: a busy release's ring may already have lost its
//!   beginning, and the judge then narrows both sides to what both have.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Latencies kept per release (a power of two).
pub(crate) const SAMPLES: usize = 16384;

/// Milliseconds per tick of a sample's time.
const TICK_MS: u64 = 10;

/// How far back a ring should reach: the stride grows with the rate so that [`SAMPLES`]
/// recorded responses take about this long (more than the judge's longest sensible interval).
const SPAN_MS: u64 = 300_000;

/// How often (in ticks: 100 ms) the rate, and with it the stride, is measured again. Often,
/// so that a release going from quiet to busy (a canary step) records at its quiet stride
/// for at most that long.
const RATE_TICKS: u32 = 10;

/// The stride for a release that answered `seen` responses in `ticks` ticks: 1 up to
/// [`SAMPLES`] per [`SPAN_MS`] (about 55 a second), then whatever keeps the ring's reach there.
fn stride_for(seen: u64, ticks: u64) -> u64 {
    let per_span = u128::from(seen) * u128::from(SPAN_MS / TICK_MS);
    let kept = u128::from(ticks.max(1)) * SAMPLES as u128;
    u64::try_from(per_span.div_ceil(kept))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The first reading of the clock: a monotonic instant and the Unix time (ms) it was.
fn epoch() -> &'static (Instant, u64) {
    static EPOCH: OnceLock<(Instant, u64)> = OnceLock::new();
    EPOCH.get_or_init(|| {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        (Instant::now(), unix)
    })
}

/// Milliseconds since the first reading.
fn elapsed_ms() -> u64 {
    u64::try_from(epoch().0.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The proxy's clock (Unix ms) for sample times and `/stats`' `at_ms`: the system clock at its
/// first reading plus the monotonic time since, so that the two always agree (a step of the
/// system clock moves neither against the other).
pub(crate) fn clock_ms() -> u64 {
    epoch().1.saturating_add(elapsed_ms())
}

/// The tick of a time on [`clock_ms`] (0 for anything before the first reading).
fn tick_of(ms: u64) -> u64 {
    ms.saturating_sub(epoch().1) / TICK_MS
}

fn pack(tick: u64, latency_us: u64) -> u64 {
    // The tick wraps (see the module docs); readers compare ticks by their distance to now.
    ((tick & u64::from(u32::MAX)) << 32) | latency_us.min(u64::from(u32::MAX))
}

fn latency_of(slot: u64) -> u64 {
    slot & u64::from(u32::MAX)
}

/// How many ticks before `now` a slot was recorded.
fn age_of(slot: u64, now: u64) -> u64 {
    u64::from((now as u32).wrapping_sub((slot >> 32) as u32))
}

/// What [`SampleRing::window`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Window {
    /// Latencies (µs), oldest first: every sample of the stretch, or an even thinning of them.
    pub(crate) latencies_us: Vec<u64>,
    /// From when (on [`clock_ms`]) they are the stretch's whole: its beginning, or later when
    /// the ring no longer had the samples before.
    pub(crate) from_ms: u64,
}

/// The most recent latencies of a release, with when each was recorded.
#[derive(Debug)]
pub(crate) struct SampleRing {
    next: AtomicU64,
    slots: Box<[AtomicU64]>,
    /// Responses seen, recorded or not.
    seen: AtomicU64,
    /// When the rate was last measured: its tick (high 32 bits) and `seen` then (low 32).
    measured: AtomicU64,
    /// Every how many responses one is recorded (see the module docs).
    stride: AtomicU64,
}

/// An empty ring without slots: what an idle release keeps (see
/// [`super::router::RING_IDLE`]).
impl Default for SampleRing {
    fn default() -> Self {
        SampleRing {
            next: AtomicU64::new(0),
            slots: Box::default(),
            seen: AtomicU64::new(0),
            measured: AtomicU64::new(0),
            stride: AtomicU64::new(1),
        }
    }
}

impl SampleRing {
    /// A ring with room for [`SAMPLES`] latencies.
    pub(crate) fn with_slots() -> Self {
        SampleRing {
            slots: (0..SAMPLES).map(|_| AtomicU64::new(0)).collect(),
            ..SampleRing::default()
        }
    }

    pub(crate) fn has_slots(&self) -> bool {
        !self.slots.is_empty()
    }

    pub(crate) fn push(&self, latency_us: u64) {
        self.push_at(elapsed_ms() / TICK_MS, latency_us);
    }

    fn push_at(&self, tick: u64, latency_us: u64) {
        // Never empty while a backend can push (see `Table::tidy`); a sample is not worth a
        // panic if that ever changed.
        if !self.has_slots() {
            return;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        self.measure_rate(tick, n);
        if n % self.stride.load(Ordering::Relaxed) == 0 || self.has_room(tick) {
            self.record_at(tick, latency_us);
        }
    }

    /// Whether the slot written next holds nothing worth keeping: the ring has not gone round
    /// yet, or its oldest sample is older than [`SPAN_MS`]. A response is skipped only to keep
    /// a sample the span needs (a short burst of a quiet release keeps every one).
    fn has_room(&self, tick: u64) -> bool {
        let next = self.next.load(Ordering::Relaxed);
        next < SAMPLES as u64
            || age_of(
                self.slots[next as usize & (SAMPLES - 1)].load(Ordering::Relaxed),
                tick,
            ) > SPAN_MS / TICK_MS
    }

    /// Records one latency whatever the stride.
    fn record_at(&self, tick: u64, latency_us: u64) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        self.slots[i & (SAMPLES - 1)].store(pack(tick, latency_us), Ordering::Relaxed);
    }

    /// Sets the stride from the rate since the last measurement, once [`RATE_TICKS`] have
    /// passed: the first response after that measures (one compare-exchange per 100 ms; the
    /// others read one atomic). `n` is this response's place in `seen`.
    fn measure_rate(&self, tick: u64, n: u64) {
        let last = self.measured.load(Ordering::Relaxed);
        let (last_tick, last_seen) = ((last >> 32) as u32, last as u32);
        // Signed: a writer that read the clock just before another measured is not a wrap.
        let ticks = (tick as u32).wrapping_sub(last_tick) as i32;
        if ticks < RATE_TICKS as i32 {
            return;
        }
        let now = (u64::from(tick as u32) << 32) | u64::from(n as u32);
        if self
            .measured
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let seen = u64::from((n as u32).wrapping_sub(last_seen));
            self.stride
                .store(stride_for(seen, ticks as u64), Ordering::Relaxed);
        }
    }

    /// The slots written so far that the ring still has, oldest first.
    fn kept(&self) -> (impl Iterator<Item = u64> + '_, bool) {
        let n = self.next.load(Ordering::Acquire);
        let kept = n.min(self.slots.len() as u64);
        let slots =
            (n - kept..n).map(|i| self.slots[i as usize & (SAMPLES - 1)].load(Ordering::Relaxed));
        (slots, n > kept)
    }

    /// Up to `max` latencies, the newest, oldest first.
    pub(crate) fn recent(&self, max: usize) -> Vec<u64> {
        let (slots, _) = self.kept();
        let all: Vec<u64> = slots.map(latency_of).collect();
        all[all.len().saturating_sub(max)..].to_vec()
    }

    /// The latencies recorded from `since_ms` to `until_ms` (on [`clock_ms`], both included, to
    /// the tick), at most `max`: evenly thinned across the stretch when there are more.
    pub(crate) fn window(&self, since_ms: u64, until_ms: u64, max: usize) -> Window {
        let since = tick_of(since_ms);
        let (latencies_us, from) =
            self.window_at(elapsed_ms() / TICK_MS, since, tick_of(until_ms), max);
        let from_ms = if from == since {
            since_ms
        } else {
            epoch().1 + from * TICK_MS
        };
        Window {
            latencies_us,
            from_ms,
        }
    }

    /// [`SampleRing::window`] in ticks, at tick `now`; returns the latencies and the tick from
    /// which they are whole.
    fn window_at(&self, now: u64, since: u64, until: u64, max: usize) -> (Vec<u64>, u64) {
        // Compared by age, so that a wrapped tick still reads right.
        let (youngest, oldest) = (now.saturating_sub(until), now.saturating_sub(since));
        let (slots, lost_some) = self.kept();
        let slots: Vec<u64> = slots.collect();
        let mut from = since;
        let mut oldest = oldest;
        // Past its oldest sample the ring lost what came before, and maybe some of that
        // sample's own tick: the stretch is whole only from the next tick. (The oldest by age,
        // not by position: a writer racing this read may have just replaced the first slot.)
        let oldest_kept = slots.iter().map(|s| age_of(*s, now)).max();
        if let Some(age) = oldest_kept.filter(|age| lost_some && *age <= oldest) {
            from = now - age + 1;
            match age.checked_sub(1) {
                Some(younger) => oldest = younger,
                None => return (Vec::new(), from),
            }
        }
        let inside: Vec<u64> = slots
            .into_iter()
            .filter(|s| (youngest..=oldest).contains(&age_of(*s, now)))
            .map(latency_of)
            .collect();
        (thin(inside, max), from)
    }
}

/// At most `max` of `all`, spread evenly over it: the middle one of each of `max` equal parts.
fn thin(all: Vec<u64>, max: usize) -> Vec<u64> {
    if all.len() <= max {
        return all;
    }
    let n = all.len();
    (0..max).map(|j| all[(2 * j + 1) * n / (2 * max)]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest() {
        let r = SampleRing::with_slots();
        assert!(r.recent(10).is_empty());
        for i in 0..(SAMPLES as u64 + 10) {
            r.push_at(0, i);
        }
        let all = r.recent(usize::MAX);
        assert_eq!(all.len(), SAMPLES);
        assert_eq!(all[0], 10);
        assert_eq!(r.recent(2), [SAMPLES as u64 + 8, SAMPLES as u64 + 9]);
    }

    #[test]
    fn thinning_spreads_evenly() {
        assert_eq!(thin((0..10).collect(), 5), [1, 3, 5, 7, 9]);
        assert_eq!(thin((0..10).collect(), 10), (0..10).collect::<Vec<_>>());
        assert_eq!(thin((0..1000).collect(), 1), [500]);
        assert!(thin((0..10).collect(), 0).is_empty());
    }

    /// A ring whose samples' latency is the tick they were recorded at, every one recorded
    /// (a ring whose stride has not caught up with a burst yet).
    fn ring_of(ticks: impl Iterator<Item = u64>) -> SampleRing {
        let r = SampleRing::with_slots();
        for t in ticks {
            r.record_at(t, t);
        }
        r
    }

    /// A ring that saw `per_tick` responses a tick over `ticks`, each with its tick as its
    /// latency.
    fn served(r: &SampleRing, ticks: std::ops::Range<u64>, per_tick: usize) {
        for t in ticks {
            for _ in 0..per_tick {
                r.push_at(t, t);
            }
        }
    }

    /// Review finding: a ring of a release's newest 4096 responses reached back 2 seconds at
    /// 2,000 requests/s, so the judge, which narrows both sides to what both rings have,
    /// judged the last 2 seconds of each interval.
    #[test]
    fn a_busy_release_keeps_minutes_of_samples() {
        let r = SampleRing::with_slots();
        // 2,000 requests/s (20 a tick) for 6 minutes.
        let end = 36_000;
        served(&r, 0..end, 20);
        // A 10 s interval at the end, and one 4 minutes earlier, are whole, each with about
        // 55 samples a second spread across it.
        for since in [end - 1_000, end - 24_000] {
            let (v, from) = r.window_at(end, since, since + 999, usize::MAX);
            assert_eq!(from, since, "whole from its beginning");
            assert!((450..=650).contains(&v.len()), "{}", v.len());
            assert!(v[0] < since + 5 && v[v.len() - 1] > since + 994, "{v:?}");
        }
    }

    /// A quiet release's burst (a few requests within 100 ms read as a high rate) keeps every
    /// response while the ring has room: a stride only saves room the span needs.
    #[test]
    fn a_ring_with_room_records_every_response() {
        let r = SampleRing::with_slots();
        served(&r, 0..30, 20);
        assert!(r.stride.load(Ordering::Relaxed) > 1);
        assert_eq!(r.recent(usize::MAX).len(), 600);
    }

    #[test]
    fn a_release_that_goes_quiet_records_every_response_again() {
        let r = SampleRing::with_slots();
        served(&r, 0..1_000, 20);
        assert!(r.stride.load(Ordering::Relaxed) > 1);
        // Then 5 a second: one every 20 ticks.
        for t in (1_000..2_000).step_by(20) {
            r.push_at(t, t);
        }
        let (v, _) = r.window_at(2_000, 1_100, 1_999, usize::MAX);
        assert_eq!(v, (1_100..2_000).step_by(20).collect::<Vec<_>>());
    }

    #[test]
    fn a_writer_behind_the_last_measurement_leaves_the_stride_alone() {
        let r = SampleRing::with_slots();
        served(&r, 0..100, 20);
        let stride = r.stride.load(Ordering::Relaxed);
        assert!(stride > 1);
        // It read the clock a tick before another writer measured (at tick 90): not four billion ticks
        // of silence.
        r.push_at(89, 89);
        assert_eq!(r.stride.load(Ordering::Relaxed), stride);
    }

    #[test]
    fn the_stride_keeps_the_reach_at_the_span() {
        assert_eq!(stride_for(0, 10), 1);
        assert_eq!(stride_for(5, 10), 1, "50 a second: every one");
        // 2,000 a second: 16384 recorded over 5 minutes needs every 37th.
        assert_eq!(stride_for(200, 10), 37);
        assert_eq!(
            stride_for(u64::MAX, 0),
            u64::MAX,
            "no overflow, no division by zero"
        );
    }

    #[test]
    fn a_window_holds_its_stretch_of_time_thinned_evenly() {
        let r = ring_of(0..1000);
        let (v, from) = r.window_at(1000, 200, 799, 10_000);
        assert_eq!(from, 200);
        assert_eq!(v, (200..800).collect::<Vec<_>>(), "both ends included");
        let (v, _) = r.window_at(1000, 200, 799, 100);
        assert_eq!(v.len(), 100);
        assert_eq!(
            (v[0], v[99]),
            (203, 797),
            "spread over the stretch, not its end"
        );
        assert!(v.windows(2).all(|w| w[1] - w[0] == 6), "{v:?}");
        // A tick past the 32 bits of a slot still reads right.
        let base = u64::from(u32::MAX) - 5;
        let r = SampleRing::with_slots();
        for i in 0..10 {
            r.push_at(base + i, i);
        }
        let (v, from) = r.window_at(base + 10, base + 3, base + 7, 100);
        assert_eq!((v, from), (vec![3, 4, 5, 6, 7], base + 3));
        // And a latency past its 32 bits (71 minutes) reads as that much.
        r.push_at(base, u64::MAX);
        assert_eq!(r.recent(1), [u64::from(u32::MAX)]);
    }

    /// Review finding: under heavy stable traffic the judge compared stable's last second with
    /// the canary's whole interval. The newest samples cover different times; a window covers
    /// the same, and says from when it is whole.
    #[test]
    fn a_busy_and_a_quiet_release_give_the_same_stretch() {
        // Over ticks 0..1000 stable answered 40 a tick, the canary one, and the stride had not
        // caught up with stable (a sudden peak).
        let stable = ring_of((0..1000).flat_map(|t| [t; 40]));
        let canary = ring_of(0..1000);
        let span = |v: &[u64]| (v[0], v[v.len() - 1]);
        // What the judge took before: the newest 2000 of each.
        let (old_s, old_c) = (stable.recent(2000), canary.recent(2000));
        assert_eq!(span(&old_s), (950, 999), "stable's last twentieth");
        assert_eq!(span(&old_c), (0, 999), "the canary's whole interval");
        // A window of the interval: stable's ring has only its last 1639 ticks (16384 samples),
        // so its window is whole from later on, and the canary's is asked from there too.
        let (s, s_from) = stable.window_at(1000, 0, 999, 2000);
        let (_, c_from) = canary.window_at(1000, 0, 999, 2000);
        assert_eq!((c_from, s_from), (0, 591));
        let (c, c_from) = canary.window_at(1000, s_from, 999, 2000);
        assert_eq!(c_from, s_from);
        assert_eq!(span(&c), (591, 999));
        // Stable's 16360 samples of that stretch thinned to 2000 across it, not the newest.
        assert_eq!(s.len(), 2000);
        let (first, last) = span(&s);
        assert!(first <= 592 && last >= 998, "{first}..{last}");
        // The older half of the stretch has half the samples.
        let older = s.iter().filter(|t| **t < 795).count();
        assert!((990..=1010).contains(&older), "{older}");
    }
}
