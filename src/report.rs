//! The deploy report: one self-contained HTML file per deployment
//! (`<state_dir>/reports/<id>.html`) that a person can open, attach to a ticket or archive, with
//! the timeline of the traffic (share per release, errors, the moment of every step), the steps
//! table and the proof: "N served, F failed", by release, with the notes (the same lines as
//! the deploy's own summary and `cutover show`, [`Proof`]).
//!
//! Why self-contained and server-rendered: the file must still open in five years, offline,
//! from a mail attachment. So the chart is plain SVG written here (no script, no external asset,
//! no font), and every value is escaped.
//!
//! The timeline needs samples: the balancer's cumulative counters read every ~250 ms while the
//! deployment runs ([`Sampler`]); rates are differences of neighbours. `cutover serve` samples
//! every deploy it runs and stores the samples in the journal; a deploy from the CLI can use a
//! [`Sampler`] too, or pass no samples (the report then shows the steps without traffic).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[cfg(doc)]
use crate::balancer::Counters;
use crate::balancer::{Balancer, Stats};
use crate::journal::{DeploymentRow, EventRow, Journal, StepRow, now_ms};

/// Requests and failed requests (cumulative counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub requests: u64,
    /// Failed requests: 5xx answers from instances, responses cut off mid-body, requests
    /// abandoned by their client while the instance kept it waiting ([`Counters::failed`]).
    pub errors: u64,
}

/// The balancer's cumulative counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Per release.
    pub releases: BTreeMap<String, Count>,
    /// Requests the balancer answered itself (no backend could): failed, by definition.
    pub unrouted: u64,
}

impl Sample {
    pub fn from_stats(at_ms: u64, stats: &Stats) -> Sample {
        Sample {
            at_ms,
            releases: stats
                .releases
                .iter()
                .map(|(r, c)| {
                    (
                        r.clone(),
                        Count {
                            requests: c.served(),
                            errors: c.failed(),
                        },
                    )
                })
                .collect(),
            unrouted: stats.unrouted,
        }
    }

    /// Served and failed requests so far, counted as the deploy report counts them.
    pub fn totals(&self) -> (u64, u64) {
        let req: u64 = self.releases.values().map(|c| c.requests).sum();
        let err: u64 = self.releases.values().map(|c| c.errors).sum();
        (req + self.unrouted, err + self.unrouted)
    }

    /// The JSON stored in the journal's `samples` table.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "r": self.releases.iter().map(|(k, c)| (k.clone(), [c.requests, c.errors])).collect::<BTreeMap<_, _>>(), "u": self.unrouted })
    }

    pub fn from_json(at_ms: u64, v: &serde_json::Value) -> Sample {
        let releases = v
            .get("r")
            .and_then(|r| r.as_object())
            .map(|m| {
                m.iter()
                    .map(|(k, c)| {
                        let n = |i: usize| c.get(i).and_then(|x| x.as_u64()).unwrap_or(0);
                        (
                            k.clone(),
                            Count {
                                requests: n(0),
                                errors: n(1),
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Sample {
            at_ms,
            releases,
            unrouted: v.get("u").and_then(|u| u.as_u64()).unwrap_or(0),
        }
    }
}

/// Traffic between two neighbouring samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    /// End of the interval (ms since the Unix epoch).
    pub at_ms: u64,
    /// Requests per second per release.
    pub rps: BTreeMap<String, f64>,
    /// Failed requests per second (5xx and unrouted).
    pub errors_per_s: f64,
    /// Failed share of the interval's requests, 0..1 (0 without requests).
    pub error_rate: f64,
}

/// Rates between neighbouring samples (a counter that went down, a balancer restart, counts
/// as zero for that interval).
pub fn rates(samples: &[Sample]) -> Vec<Rate> {
    samples
        .windows(2)
        .filter(|w| w[1].at_ms > w[0].at_ms)
        .map(|w| {
            let (a, b) = (&w[0], &w[1]);
            let secs = (b.at_ms - a.at_ms) as f64 / 1000.0;
            let mut rps = BTreeMap::new();
            let mut req = 0u64;
            let mut err = 0u64;
            for (r, c) in &b.releases {
                let was = a.releases.get(r).copied().unwrap_or_default();
                let d = c.requests.saturating_sub(was.requests);
                req += d;
                err += c.errors.saturating_sub(was.errors);
                rps.insert(r.clone(), d as f64 / secs);
            }
            let unrouted = b.unrouted.saturating_sub(a.unrouted);
            req += unrouted;
            err += unrouted;
            Rate {
                at_ms: b.at_ms,
                rps,
                errors_per_s: err as f64 / secs,
                error_rate: if req == 0 {
                    0.0
                } else {
                    err as f64 / req as f64
                },
            }
        })
        .collect()
}

/// Reads the balancer's counters every `every` in the background until stopped.
pub struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
    balancer: Arc<dyn Balancer>,
}

impl Sampler {
    /// Starts sampling (the first sample is taken at once).
    pub fn start(balancer: Arc<dyn Balancer>, every: Duration) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let (balancer, samples) = (balancer.clone(), samples.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Ok(stats) = balancer.stats().await {
                        let s = Sample::from_stats(now_ms(), &stats);
                        samples.lock().unwrap_or_else(|p| p.into_inner()).push(s);
                    }
                }
            })
        };
        Sampler {
            samples,
            task,
            balancer,
        }
    }

    /// Stops sampling, takes a last sample, and returns them all, oldest first.
    pub async fn stop(self) -> Vec<Sample> {
        self.task.abort();
        let _ = self.task.await;
        let mut all = std::mem::take(&mut *self.samples.lock().unwrap_or_else(|p| p.into_inner()));
        if let Ok(stats) = self.balancer.stats().await {
            all.push(Sample::from_stats(now_ms(), &stats));
        }
        all
    }
}

/// Where the report of deployment `id` is written: `<state_dir>/reports/<id>.html`.
pub fn report_path(journal: &Journal, id: &str) -> PathBuf {
    journal
        .path()
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default()
        .join("reports")
        .join(format!("{id}.html"))
}

/// Writes (or rewrites) the HTML report of deployment `id` from the journal: its row, steps,
/// events, and the timeline `samples` (when empty: the samples the journal holds for it).
/// Returns the file's path.
pub fn write_report(journal: &Journal, id: &str, samples: &[Sample]) -> anyhow::Result<PathBuf> {
    let row = journal
        .deployment(id)?
        .ok_or_else(|| anyhow::anyhow!("no deployment {id} in {}", journal.path().display()))?;
    let steps = journal.steps(id)?;
    let events = journal.events(id)?;
    let stored;
    let samples = if samples.is_empty() {
        stored = journal
            .samples(id)?
            .iter()
            .map(|(at, v)| Sample::from_json(*at, v))
            .collect::<Vec<_>>();
        &stored[..]
    } else {
        samples
    };
    let html = render(&row, &steps, &events, samples);
    let path = report_path(journal, id);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the report directory {}", dir.display()))?;
    }
    let tmp = path.with_extension("html.tmp");
    std::fs::write(&tmp, html)
        .with_context(|| format!("cannot write the deploy report {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("cannot write the deploy report {}", path.display()))?;
    Ok(path)
}

/// `cutover show [ID] --html`: prints the path of the deployment's report (the newest
/// deployment without an id), writing it first when it is missing or the deployment has not
/// ended yet.
pub fn show_html(config: &crate::config::Config, id: Option<&str>) -> anyhow::Result<()> {
    let journal = Journal::open(&config.state_dir)?;
    let row = journal.deployment_or_newest(config.app.name.as_str(), id)?;
    let mut path = report_path(&journal, &row.id);
    if row.outcome.is_none() || !path.exists() {
        path = write_report(&journal, &row.id, &[])?;
    }
    println!("{}", path.display());
    Ok(())
}

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Colours of releases, in order of first appearance (the dashboard uses the same list).
pub const PALETTE: [&str; 6] = [
    "#2563eb", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#db2777",
];
const ERROR_COLOUR: &str = "#dc2626";

/// Served and failed requests of a finished deployment, from its report.
pub fn served_failed(row: &DeploymentRow) -> Option<(u64, u64)> {
    let r = row.report.as_ref()?;
    Some((
        r.get("served")?.as_u64()?,
        r.get("failed_requests")?.as_u64()?,
    ))
}

/// How `Report::counts` begins when the balancer's counters could not be read at the end: the
/// numbers beside it are not known, not zero.
pub const COUNTS_NOT_KNOWN: &str = "not known";

/// Whether a `Report::counts` caveat says the counts are not known at all.
pub fn counts_unknown(caveat: &str) -> bool {
    caveat.starts_with(COUNTS_NOT_KNOWN)
}

/// Why a finished deployment's counts are not its whole traffic (a balancer restart, a
/// takeover of an interrupted deployment, counters unreadable at the end), if they are not.
pub fn counts_caveat(row: &DeploymentRow) -> Option<String> {
    row.report
        .as_ref()?
        .get("counts")?
        .as_str()
        .map(str::to_string)
}

/// What a finished deployment says about its traffic, as every summary of it shows it: the
/// deploy's own output, `cutover show` and the HTML report print the same [`Proof::lines`], so
/// none of them can drop a part (the requests no release is credited with, a note on what the
/// counts miss) that another shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Proof {
    pub served: u64,
    pub failed: u64,
    pub by_release: BTreeMap<String, u64>,
    /// [`crate::deploy::Report::counts`].
    pub counts: Option<String>,
    pub notes: Vec<String>,
}

impl Proof {
    pub fn of(r: &crate::deploy::Report) -> Proof {
        Proof {
            served: r.served,
            failed: r.failed_requests,
            by_release: r.served_by_release.clone(),
            counts: r.counts.clone(),
            notes: r.notes.clone(),
        }
    }

    /// From a report as the journal keeps it (JSON); `None` when it has no counts.
    pub fn from_json(r: &serde_json::Value) -> Option<Proof> {
        let strings = |k: &str| -> Vec<String> {
            r.get(k)
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect()
        };
        Some(Proof {
            served: r.get("served")?.as_u64()?,
            failed: r.get("failed_requests")?.as_u64()?,
            by_release: r
                .get("served_by_release")
                .and_then(|v| v.as_object())
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect(),
            counts: r.get("counts").and_then(|v| v.as_str()).map(str::to_string),
            notes: strings("notes"),
        })
    }

    /// "requests during the deploy: 519 served, 27 failed (v2: 459, v5: 33, not attributed
    /// to a release: 27)", and what the counts cover when it is not the whole deployment.
    pub fn requests(&self) -> String {
        if let Some(c) = self.counts.as_deref().filter(|c| counts_unknown(c)) {
            return format!("requests during the deploy: {c}");
        }
        let mut parts: Vec<String> = self
            .by_release
            .iter()
            .map(|(v, n)| format!("{v}: {n}"))
            .collect();
        // What no release is credited with (the balancer's own 502/503, connections over its
        // limit, servers of an existing HAProxy that cutover did not add) is in the total:
        // shown, so the parts add up.
        let credited: u64 = self.by_release.values().sum();
        if self.served > credited {
            parts.push(format!(
                "not attributed to a release: {}",
                self.served - credited
            ));
        }
        let mut line = format!(
            "requests during the deploy: {} served, {} failed",
            self.served, self.failed
        );
        if !parts.is_empty() {
            let _ = write!(line, " ({})", parts.join(", "));
        }
        if let Some(c) = &self.counts {
            let _ = write!(line, "; counted {c}");
        }
        line
    }

    /// [`Proof::requests`], then the notes.
    pub fn lines(&self) -> Vec<String> {
        std::iter::once(self.requests())
            .chain(self.notes.iter().cloned())
            .collect()
    }
}

/// The whole HTML document.
pub fn render(
    row: &DeploymentRow,
    steps: &[StepRow],
    events: &[EventRow],
    samples: &[Sample],
) -> String {
    let mut h = String::new();
    let title = format!(
        "{} {} {} → {}",
        row.app,
        row.kind,
        row.from.as_deref().unwrap_or("(nothing)"),
        row.to
    );
    // The class keeps the recorded value (`rolled_back`, a CSS name); the text reads as words.
    let outcome = row.outcome.as_deref().unwrap_or("running or interrupted");
    let outcome_text = crate::deploy::outcome_words(outcome);
    let took = row
        .ended_ms
        .map(|e| format!("{:.1} s", e.saturating_sub(row.started_ms) as f64 / 1000.0))
        .unwrap_or_else(|| "-".into());
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>cutover report {id}: {title}</title><style>{css}</style></head><body>\n\
         <h1>{title}</h1>\n<p class=\"meta\">deployment <code>{id}</code> · {strategy} · by {who} · started {started} · took {took} · \
         outcome <b class=\"outcome {outcome_class}\">{outcome}</b></p>\n",
        id = esc(&row.id),
        title = esc(&title),
        css = REPORT_CSS,
        strategy = esc(&row.strategy),
        who = esc(&row.who),
        started = esc(&utc(row.started_ms)),
        outcome_class = esc(outcome),
        outcome = esc(&outcome_text),
    );
    match row.report.as_ref().and_then(Proof::from_json) {
        Some(proof) => {
            let mut lines = proof.lines().into_iter();
            if let Some(requests) = lines.next() {
                let _ = writeln!(
                    h,
                    "<p class=\"proof\" id=\"served-failed\">{}</p>",
                    esc(&requests)
                );
            }
            for note in lines {
                let _ = writeln!(h, "<p class=\"meta note\">{}</p>", esc(&note));
            }
        }
        None => h.push_str("<p class=\"proof\">no report yet: the deployment did not finish</p>\n"),
    }
    if let Some(r) = &row.report {
        for (key, label) in [
            ("failed_hosts", "failed host"),
            ("stuck_hosts", "NOT ROLLED BACK"),
        ] {
            for f in r.get(key).and_then(|v| v.as_array()).into_iter().flatten() {
                let host = f.get("host").and_then(|v| v.as_str()).unwrap_or("?");
                let reason = esc(f.get("reason").and_then(|v| v.as_str()).unwrap_or(""));
                // "fleet": the build, a hook or a fleet-wide check, no host's failure.
                let _ = if host == "fleet" && key == "failed_hosts" {
                    writeln!(h, "<p class=\"bad\">failed: {reason}</p>")
                } else {
                    writeln!(h, "<p class=\"bad\">{label} {}: {reason}</p>", esc(host))
                };
            }
        }
    }
    h.push_str("<h2>Timeline</h2>\n");
    h.push_str(&timeline_svg(row, steps, samples));
    h.push_str("<h2>Steps</h2>\n<table><thead><tr><th>at (s)</th><th>took (ms)</th><th>host</th><th>step</th><th>detail</th><th>result</th></tr></thead><tbody>\n");
    for s in steps {
        let result = s
            .result
            .as_deref()
            .unwrap_or("INTERRUPTED (the process died here)");
        let _ = writeln!(
            h,
            "<tr class=\"{cls}\"><td>{at:.1}</td><td>{took}</td><td>{host}</td><td>{action}</td><td>{detail}</td><td>{result}</td></tr>",
            cls = if result == "ok" { "ok" } else { "bad" },
            at = s.started_ms.saturating_sub(row.started_ms) as f64 / 1000.0,
            took = s
                .ended_ms
                .map_or("-".into(), |e| e.saturating_sub(s.started_ms).to_string()),
            host = esc(&s.host),
            action = esc(&s.action),
            detail = esc(&s.detail),
            result = esc(result),
        );
    }
    h.push_str("</tbody></table>\n");
    if !events.is_empty() {
        h.push_str("<h2>Events</h2>\n<ul class=\"events\">\n");
        for e in events {
            let _ = writeln!(
                h,
                "<li><span class=\"at\">{:.1} s</span> {}</li>",
                e.at_ms.saturating_sub(row.started_ms) as f64 / 1000.0,
                esc(&e.message)
            );
        }
        h.push_str("</ul>\n");
    }
    let _ = write!(
        h,
        "<p class=\"foot\">written by cutover {} at {}</p>\n</body></html>\n",
        env!("CARGO_PKG_VERSION"),
        esc(&utc(now_ms()))
    );
    h
}

/// The timeline's text when it has no samples, one SVG line each.
pub const EMPTY_TIMELINE: [&str; 2] = [
    "No traffic samples were recorded: traffic over time is sampled only while `cutover serve` runs a deployment.",
    "A deploy or rollback run from the command line has its steps and request counts here, but no timeline.",
];

/// The timeline: traffic share per release (stacked to 100 %), requests/s and errors, and a
/// marker at the start of every step.
fn timeline_svg(row: &DeploymentRow, steps: &[StepRow], samples: &[Sample]) -> String {
    const W: f64 = 960.0;
    const LEFT: f64 = 48.0;
    const RIGHT: f64 = 16.0;
    const SHARE_TOP: f64 = 20.0;
    const SHARE_H: f64 = 160.0;
    const RATE_TOP: f64 = 210.0;
    const RATE_H: f64 = 110.0;
    const H: f64 = 350.0;
    let rates = rates(samples);
    let t0 = samples
        .first()
        .map_or(row.started_ms, |s| s.at_ms.min(row.started_ms));
    let t1 = [
        row.ended_ms.unwrap_or(0),
        samples.last().map_or(0, |s| s.at_ms),
        steps
            .iter()
            .map(|s| s.ended_ms.unwrap_or(s.started_ms))
            .max()
            .unwrap_or(0),
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
    .max(t0 + 1000);
    let x = |t: u64| LEFT + (t.saturating_sub(t0)) as f64 / (t1 - t0) as f64 * (W - LEFT - RIGHT);
    let mut releases: Vec<String> = Vec::new();
    for r in &rates {
        for (k, v) in &r.rps {
            if *v > 0.0 && !releases.contains(k) {
                releases.push(k.clone());
            }
        }
    }
    let colour = |i: usize| PALETTE[i % PALETTE.len()];
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg id=\"timeline\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" width=\"100%\" role=\"img\" aria-label=\"traffic share per release, requests per second and errors during the deployment\">"
    );
    let _ = write!(
        svg,
        "<rect x=\"{LEFT}\" y=\"{SHARE_TOP}\" width=\"{w}\" height=\"{SHARE_H}\" fill=\"#f3f4f6\"/>\n\
         <rect x=\"{LEFT}\" y=\"{RATE_TOP}\" width=\"{w}\" height=\"{RATE_H}\" fill=\"#f9fafb\"/>\n\
         <text x=\"4\" y=\"{sy}\" class=\"ax\">share</text><text x=\"4\" y=\"{ry}\" class=\"ax\">req/s</text>\n",
        w = W - LEFT - RIGHT,
        sy = SHARE_TOP + SHARE_H / 2.0,
        ry = RATE_TOP + RATE_H / 2.0,
    );
    if rates.is_empty() {
        // Says why, since it is the usual case: only `cutover serve` samples, and a report of a
        // deploy from the terminal is none the worse for it. The row does not say who ran the
        // deployment, so the text holds either way.
        for (i, line) in EMPTY_TIMELINE.iter().enumerate() {
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\" class=\"note\">{}</text>",
                LEFT + 12.0,
                SHARE_TOP + SHARE_H / 2.0 + 20.0 * i as f64,
                esc(line)
            );
        }
    } else {
        // Share: stacked areas, one polygon per release (bottom edge = the previous top).
        let mut lower = vec![0.0f64; rates.len()];
        for (i, rel) in releases.iter().enumerate() {
            let upper: Vec<f64> = rates
                .iter()
                .zip(&lower)
                .map(|(r, lo)| {
                    let total: f64 = r.rps.values().sum();
                    let mine = r.rps.get(rel).copied().unwrap_or(0.0);
                    lo + if total > 0.0 { mine / total } else { 0.0 }
                })
                .collect();
            let mut pts = String::new();
            for (r, up) in rates.iter().zip(&upper) {
                let _ = write!(
                    pts,
                    "{:.1},{:.1} ",
                    x(r.at_ms),
                    SHARE_TOP + SHARE_H * (1.0 - up)
                );
            }
            for (r, lo) in rates.iter().zip(&lower).rev() {
                let _ = write!(
                    pts,
                    "{:.1},{:.1} ",
                    x(r.at_ms),
                    SHARE_TOP + SHARE_H * (1.0 - lo)
                );
            }
            let _ = writeln!(
                svg,
                "<polygon class=\"share\" data-release=\"{rel}\" points=\"{pts}\" fill=\"{c}\" fill-opacity=\"0.75\"><title>{rel}</title></polygon>",
                rel = esc(rel),
                c = colour(i)
            );
            lower = upper;
        }
        // Rates: one line per release, errors in red.
        let max = rates
            .iter()
            .map(|r| r.rps.values().copied().fold(r.errors_per_s, f64::max))
            .fold(1.0, f64::max);
        let y = |v: f64| RATE_TOP + RATE_H * (1.0 - v / max);
        for (i, rel) in releases.iter().enumerate() {
            let pts: Vec<String> = rates
                .iter()
                .map(|r| {
                    format!(
                        "{:.1},{:.1}",
                        x(r.at_ms),
                        y(r.rps.get(rel).copied().unwrap_or(0.0))
                    )
                })
                .collect();
            let _ = writeln!(
                svg,
                "<polyline class=\"rps\" data-release=\"{}\" points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"/>",
                esc(rel),
                pts.join(" "),
                colour(i)
            );
        }
        let pts: Vec<String> = rates
            .iter()
            .map(|r| format!("{:.1},{:.1}", x(r.at_ms), y(r.errors_per_s)))
            .collect();
        let _ = write!(
            svg,
            "<polyline class=\"errors\" points=\"{}\" fill=\"none\" stroke=\"{ERROR_COLOUR}\" stroke-width=\"1.5\" stroke-dasharray=\"4 2\"/>\n\
             <text x=\"{}\" y=\"{}\" class=\"ax\" text-anchor=\"end\">{:.0}</text>\n",
            pts.join(" "),
            LEFT - 4.0,
            RATE_TOP + 10.0,
            max
        );
        for r in rates.iter().filter(|r| r.errors_per_s > 0.0) {
            let _ = writeln!(
                svg,
                "<circle class=\"error-mark\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{ERROR_COLOUR}\"><title>{:.1} failed/s ({:.2} %)</title></circle>",
                x(r.at_ms),
                y(r.errors_per_s),
                r.errors_per_s,
                r.error_rate * 100.0
            );
        }
    }
    // Step markers: a thin line at each step's start, its name on hover.
    for s in steps {
        let sx = x(s.started_ms);
        let bad = s.result.as_deref().is_some_and(|r| r != "ok");
        let _ = writeln!(
            svg,
            "<line class=\"step\" x1=\"{sx:.1}\" x2=\"{sx:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"{}\" stroke-width=\"1\" stroke-opacity=\"0.6\"><title>{:.1} s: {} {} {} ({})</title></line>",
            SHARE_TOP,
            RATE_TOP + RATE_H,
            if bad { ERROR_COLOUR } else { "#111827" },
            s.started_ms.saturating_sub(row.started_ms) as f64 / 1000.0,
            esc(&s.host),
            esc(&s.action),
            esc(&s.detail),
            esc(s.result.as_deref().unwrap_or("unfinished"))
        );
    }
    // Time axis.
    let secs = (t1 - t0) as f64 / 1000.0;
    let tick = [
        1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    ]
    .into_iter()
    .find(|t| secs / t <= 12.0)
    .unwrap_or(3600.0);
    let mut t = 0.0;
    while t <= secs {
        let tx = x(t0 + (t * 1000.0) as u64);
        let _ = writeln!(
            svg,
            "<text x=\"{tx:.1}\" y=\"{}\" class=\"ax\" text-anchor=\"middle\">{t:.0}s</text>",
            H - 14.0
        );
        t += tick;
    }
    // Legend.
    let mut lx = LEFT;
    for (i, rel) in releases.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<rect x=\"{lx}\" y=\"4\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"13\" class=\"legend\">{}</text>",
            colour(i),
            lx + 14.0,
            esc(rel)
        );
        lx += 24.0 + 8.0 * rel.chars().count().min(24) as f64;
    }
    let _ = write!(
        svg,
        "<line x1=\"{lx}\" x2=\"{}\" y1=\"9\" y2=\"9\" stroke=\"{ERROR_COLOUR}\" stroke-dasharray=\"4 2\"/><text x=\"{}\" y=\"13\" class=\"legend\">failed/s</text>\n\
         <line x1=\"{}\" x2=\"{}\" y1=\"4\" y2=\"14\" stroke=\"#111827\"/><text x=\"{}\" y=\"13\" class=\"legend\">step</text>\n</svg>\n",
        lx + 14.0,
        lx + 18.0,
        lx + 90.0,
        lx + 90.0,
        lx + 96.0
    );
    svg
}

/// `YYYY-MM-DD HH:MM:SS UTC` (civil-from-days, no time zone database needed).
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The CSP source that allows the report's own stylesheet and nothing else (`'sha256-…'`): a
/// report opened from the dashboard is a `blob:` page that inherits the dashboard's policy,
/// which would otherwise block its inline `<style>`.
pub fn style_source() -> String {
    use sha2::Digest;
    format!(
        "'sha256-{}'",
        base64(&sha2::Sha256::digest(REPORT_CSS.as_bytes()))
    )
}

/// Standard base64 with padding (RFC 4648), for the CSP hash.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

const REPORT_CSS: &str = "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1000px;color:#111827;padding:0 12px}\
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}code{font-size:13px}\
.meta{color:#4b5563;margin:2px 0}.proof{font-size:18px;font-weight:600;margin:12px 0 4px}\
.outcome.succeeded{color:#15803d}.outcome.rolled_back,.outcome.halted,.outcome.failed,.outcome.aborted{color:#b91c1c}\
.bad{color:#b91c1c}table{border-collapse:collapse;width:100%;font-size:13px}\
th,td{border-bottom:1px solid #e5e7eb;padding:3px 6px;text-align:left;vertical-align:top}\
tr.bad td{background:#fef2f2}svg{background:#fff;border:1px solid #e5e7eb}\
svg .ax{font-size:10px;fill:#6b7280}svg .legend{font-size:11px;fill:#111827}svg .note{font-size:13px;fill:#6b7280}\
.events{font-size:13px;padding-left:18px}.events .at{color:#6b7280;display:inline-block;min-width:60px}.foot{color:#9ca3af;font-size:12px;margin-top:24px}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_rfc_4648() {
        for (raw, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), want, "{raw:?}");
        }
    }

    /// The hash the dashboard's policy allows is the hash of the stylesheet a report carries,
    /// checked against `openssl` (what a browser computes is the same sha256, base64).
    #[test]
    fn the_style_source_is_the_hash_of_the_reports_stylesheet() {
        let dir = tempfile::tempdir().unwrap();
        let css = dir.path().join("report.css");
        std::fs::write(&css, REPORT_CSS).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl dgst -sha256 -binary '{}' | openssl base64 -A",
                css.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let want = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(style_source(), format!("'sha256-{want}'"));
    }

    fn sample(at: u64, v1: u64, v2: u64, err: u64) -> Sample {
        Sample {
            at_ms: at,
            releases: BTreeMap::from([
                (
                    "v1".into(),
                    Count {
                        requests: v1,
                        errors: 0,
                    },
                ),
                (
                    "v2".into(),
                    Count {
                        requests: v2,
                        errors: err,
                    },
                ),
            ]),
            unrouted: 0,
        }
    }

    #[test]
    fn rates_are_differences_per_second() {
        let r = rates(&[
            sample(1_000, 100, 0, 0),
            sample(1_500, 150, 50, 5),
            sample(1_500, 150, 50, 5),
        ]);
        assert_eq!(r.len(), 1, "equal timestamps are skipped");
        assert_eq!(r[0].rps["v1"], 100.0);
        assert_eq!(r[0].rps["v2"], 100.0);
        assert_eq!(r[0].errors_per_s, 10.0);
        assert!((r[0].error_rate - 0.05).abs() < 1e-9);
    }

    #[test]
    fn samples_round_trip_through_json() {
        let s = sample(5, 1, 2, 3);
        assert_eq!(Sample::from_json(5, &s.to_json()), s);
    }

    #[test]
    fn utc_formats_civil_time() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14 22:13:20 UTC");
    }

    /// A finished deployment of app `app`, v1 -> v2, with `report`.
    fn finished(app: &str, outcome: &str, report: serde_json::Value) -> DeploymentRow {
        DeploymentRow {
            id: "1-2".into(),
            app: app.into(),
            kind: "deploy".into(),
            strategy: "rolling".into(),
            from: Some("v1".into()),
            to: "v2".into(),
            who: "me".into(),
            started_ms: 1_000,
            ended_ms: Some(3_000),
            outcome: Some(outcome.into()),
            previous: BTreeMap::new(),
            report: Some(report),
            status: None,
            damaged: None,
        }
    }

    /// Regression: the deploy's report said 519 served, 27 failed, and that 27 requests were
    /// closed at a drain deadline; the HTML report (and `cutover show`) said only "v2: 459,
    /// v5: 33", parts that did not add up, and no note. Every summary prints the same lines.
    #[test]
    fn the_html_report_says_what_the_deploy_said() {
        let json = serde_json::json!({
            "id": "1-2", "app": "a", "kind": "deploy", "from": "v2", "to": "v5",
            "outcome": "succeeded", "started_unix": 0, "duration_ms": 1000, "batches": [],
            "moved_hosts": ["web1"], "failed_hosts": [], "stuck_hosts": [],
            "served": 519, "failed_requests": 27, "served_by_release": {"v2": 459, "v5": 33},
            "counts": "only since <then>",
            "notes": ["27 request(s) were closed at a drain deadline"],
        });
        let report: crate::deploy::Report = serde_json::from_value(json.clone()).unwrap();
        let lines = Proof::of(&report).lines();
        assert_eq!(Proof::from_json(&json).unwrap().lines(), lines);
        assert_eq!(
            lines,
            [
                "requests during the deploy: 519 served, 27 failed (v2: 459, v5: 33, not attributed to a release: 27); counted only since <then>",
                "27 request(s) were closed at a drain deadline",
            ]
        );
        let html = render(&finished("a", "succeeded", json), &[], &[], &[]);
        for line in &lines {
            assert!(html.contains(&esc(line)), "{line}\n{html}");
        }
    }

    #[test]
    fn report_escapes_and_has_the_chart() {
        let row = finished(
            "a<b",
            "succeeded",
            serde_json::json!({"served": 7, "failed_requests": 1}),
        );
        let html = render(
            &row,
            &[],
            &[],
            &[sample(1_000, 0, 0, 0), sample(2_000, 5, 5, 1)],
        );
        assert!(html.contains("a&lt;b"));
        assert!(html.contains("7 served, 1 failed (not attributed to a release: 7)"));
        assert!(html.contains("<svg id=\"timeline\""));
        assert!(html.contains("data-release=\"v2\""));
        assert!(!html.contains("http://") || !html.contains("src=\"http"));
    }

    /// A failure of the build, a hook or a fleet-wide check is recorded under the host name
    /// "fleet": the report says "failed", not "failed host fleet".
    #[test]
    fn a_failure_that_is_no_hosts_names_no_host() {
        let failed = |host: &str| serde_json::json!({"host": host, "reason": "boom"});
        let report = serde_json::json!({
            "failed_hosts": [failed("fleet"), failed("web1")],
            "stuck_hosts": [],
        });
        let row = finished("a", "halted", report);
        let html = render(&row, &[], &[], &[]);
        assert!(html.contains("<p class=\"bad\">failed: boom</p>"), "{html}");
        assert!(html.contains("failed host web1: boom"), "{html}");
        assert!(!html.contains("host fleet"), "{html}");
    }

    /// A deployment run from the command line has no samples: the report says why there is
    /// no timeline instead of leaving it to look like a fault.
    #[test]
    fn a_report_without_samples_says_only_serve_samples() {
        let row = finished(
            "a",
            "succeeded",
            serde_json::json!({"served": 7, "failed_requests": 0}),
        );
        let html = render(&row, &[], &[], &[]);
        assert!(
            html.contains(
                "traffic over time is sampled only while `cutover serve` runs a deployment"
            ),
            "{html}"
        );
        assert!(
            html.contains("run from the command line has its steps and request counts here"),
            "{html}"
        );
    }
}
