//! Progress lines while a deployment runs: what batch and host is doing what, with the time since
//! start. Plain lines on stderr (they read well on a terminal and in CI logs alike); with
//! `--json`, one JSON object per line on stderr instead, so a pipeline can follow along.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

/// Where progress lines go instead of stderr.
pub type Sink = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Clone)]
pub struct Progress {
    start: Instant,
    json: bool,
    quiet: bool,
    sink: Option<Sink>,
}

impl Progress {
    pub fn new(json: bool) -> Progress {
        Progress {
            start: Instant::now(),
            json,
            quiet: false,
            sink: None,
        }
    }

    /// Prints nothing (for callers that render their own output).
    pub fn quiet() -> Progress {
        Progress {
            start: Instant::now(),
            json: false,
            quiet: true,
            sink: None,
        }
    }

    /// Sends every line to `sink` instead of stderr (the demo prefixes its phase).
    pub fn to_sink(sink: Sink) -> Progress {
        Progress {
            start: Instant::now(),
            json: false,
            quiet: false,
            sink: Some(sink),
        }
    }

    pub fn say(&self, msg: &str) {
        if self.quiet {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64();
        if let Some(sink) = &self.sink {
            sink(&format!("[{secs:6.1}s] {msg}"));
            return;
        }
        let line = if self.json {
            serde_json::json!({ "t": (secs * 1000.0).round() / 1000.0, "event": "progress", "message": msg }).to_string()
        } else {
            format!("[{secs:6.1}s] {msg}")
        };
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
}
