//! Progress while a deployment runs: what batch and host is doing what, with the time since
//! start. Plain lines on stderr (they read well on a terminal and in CI logs alike); with
//! `--json`, one JSON object per line on stderr instead, so a pipeline can follow along.
//!
//! On a terminal, a rolling deployment also keeps a live board under the lines: a bar of the
//! hosts already on the new release, and what each host of the current batch is doing. The
//! lines stay the record (they scroll above the board, as in a CI log); the board is redrawn in
//! place on every change and left on screen, with its final state, at the end.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Where progress lines go instead of stderr.
pub type Sink = Arc<dyn Fn(&str) + Send + Sync>;

/// What a host is doing, as the board shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// In a later batch.
    Waiting,
    /// Its new instance is being started.
    Starting,
    /// The health gate and the balancer's own check.
    Gate,
    /// The new instance serves; the old one is still being drained and stopped.
    Serving,
    /// On the new release, settled.
    Done,
    /// Serves the new release, but its old instances or `current` could not be settled.
    Unsettled,
    Failed,
}

impl Phase {
    fn word(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Starting => "starting",
            Phase::Gate => "health gate",
            Phase::Serving => "serving, stopping the old",
            Phase::Done => "done",
            Phase::Unsettled => "serving, NOT SETTLED",
            Phase::Failed => "FAILED",
        }
    }

    fn moved(self) -> bool {
        matches!(self, Phase::Serving | Phase::Done | Phase::Unsettled)
    }
}

#[derive(Clone)]
pub struct Progress {
    start: Instant,
    json: bool,
    quiet: bool,
    sink: Option<Sink>,
    /// The live board, on a terminal only.
    board: Option<Arc<Mutex<Board>>>,
}

impl Progress {
    /// Lines (or JSON lines) on stderr, with the live board when stderr is a terminal.
    pub fn new(json: bool) -> Progress {
        let terminal = std::io::stderr().is_terminal()
            && std::env::var("TERM").map_or(true, |t| t != "dumb")
            && !NO_BOARD.load(Ordering::Relaxed);
        Progress {
            start: Instant::now(),
            json,
            quiet: false,
            sink: None,
            board: (terminal && !json).then(|| Arc::new(Mutex::new(Board::default()))),
        }
    }

    /// Prints nothing (for callers that render their own output).
    pub fn quiet() -> Progress {
        Progress {
            start: Instant::now(),
            json: false,
            quiet: true,
            sink: None,
            board: None,
        }
    }

    /// Sends every line to `sink` instead of stderr (the demo prefixes its phase).
    pub fn to_sink(sink: Sink) -> Progress {
        Progress {
            start: Instant::now(),
            json: false,
            quiet: false,
            sink: Some(sink),
            board: None,
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
        self.draw(Some(&line));
    }

    /// The batches of a rolling deployment (host names, in order): the board shows them. An
    /// empty plan takes the board off the screen.
    pub fn plan(&self, batches: &[Vec<String>]) {
        if let Some(board) = &self.board {
            let mut b = board.lock().unwrap_or_else(|e| e.into_inner());
            let drawn = b.drawn;
            *b = Board::new(batches);
            // Still on screen: the next draw erases it.
            b.drawn = drawn;
        }
        self.draw(None);
    }

    /// `host` is now in `phase` (ignored for hosts the plan does not name).
    pub fn host(&self, host: &str, phase: Phase) {
        let Some(board) = &self.board else {
            return;
        };
        let changed = {
            let mut b = board.lock().unwrap_or_else(|e| e.into_inner());
            b.set(host, phase)
        };
        if changed {
            self.draw(None);
        }
    }

    /// Prints `line` (if any) above the board and redraws the board under it.
    fn draw(&self, line: Option<&str>) {
        let mut err = std::io::stderr().lock();
        let Some(board) = &self.board else {
            if let Some(line) = line {
                let _ = writeln!(err, "{line}");
            }
            return;
        };
        let mut b = board.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        if b.drawn > 0 {
            // Back to the board's first line, and clear from there down.
            out.push_str(&format!("\x1b[{}A\r\x1b[J", b.drawn));
        }
        if let Some(line) = line {
            // A carriage return or an escape sequence (an app's log tail) would move the cursor
            // under the board's feet.
            out.extend(line.chars().map(|c| match c {
                '\n' | '\t' => c,
                c if c.is_control() => '?',
                c => c,
            }));
            out.push('\n');
        }
        let lines = b.render(self.start.elapsed().as_secs_f64(), terminal_width());
        for l in &lines {
            out.push_str(l);
            out.push('\n');
        }
        b.drawn = lines.len();
        let _ = err.write_all(out.as_bytes());
        let _ = err.flush();
    }
}

/// Set when something else writes to stderr as it pleases (verbose logging): the board's
/// redraws would erase its lines.
static NO_BOARD: AtomicBool = AtomicBool::new(false);

/// No live board in this process (see [`NO_BOARD`]).
pub fn no_board() {
    NO_BOARD.store(true, Ordering::Relaxed);
}

/// The live board's state: pure, so what it shows is tested without a terminal.
#[derive(Debug, Default)]
struct Board {
    batches: Vec<Vec<String>>,
    phases: BTreeMap<String, Phase>,
    /// Lines of the board now on screen.
    drawn: usize,
}

impl Board {
    fn new(batches: &[Vec<String>]) -> Board {
        let phases = batches
            .iter()
            .flatten()
            .map(|h| (h.clone(), Phase::Waiting))
            .collect();
        Board {
            batches: batches.to_vec(),
            phases,
            drawn: 0,
        }
    }

    /// Records a phase; true when the board changed.
    fn set(&mut self, host: &str, phase: Phase) -> bool {
        match self.phases.get_mut(host) {
            Some(p) if *p != phase => {
                *p = phase;
                true
            }
            _ => false,
        }
    }

    /// The board's lines (none before there is a plan): the bar, then the current batch (the
    /// last one with a host past waiting), each cut to `width` columns.
    fn render(&self, secs: f64, width: usize) -> Vec<String> {
        let total = self.phases.len();
        if total == 0 {
            return Vec::new();
        }
        let moved = self.phases.values().filter(|p| p.moved()).count();
        let failed = self
            .phases
            .values()
            .filter(|p| **p == Phase::Failed)
            .count();
        const BAR: usize = 24;
        let filled = moved * BAR / total;
        let mut bar = format!(
            "[{secs:6.1}s] {}{} {moved}/{total} hosts on the new release",
            "█".repeat(filled),
            "░".repeat(BAR - filled)
        );
        if failed > 0 {
            bar.push_str(&format!(", {failed} failed"));
        }
        let current = self.batches.iter().enumerate().rev().find(|(_, hosts)| {
            hosts
                .iter()
                .any(|h| self.phases.get(h).is_some_and(|p| *p != Phase::Waiting))
        });
        let mut lines = vec![bar];
        if let Some((i, hosts)) = current {
            let each: Vec<String> = hosts
                .iter()
                .map(|h| {
                    let p = self.phases.get(h).copied().unwrap_or(Phase::Waiting);
                    format!("{h} {}", p.word())
                })
                .collect();
            lines.push(format!(
                "  batch {}/{}: {}",
                i + 1,
                self.batches.len(),
                each.join(" · ")
            ));
        }
        lines.into_iter().map(|l| cut(&l, width)).collect()
    }
}

/// `line` cut to `width` characters (a wrapped line would break the redraw), with `…` when cut.
fn cut(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_string();
    }
    let mut s: String = line.chars().take(width.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// The terminal's width in columns (80 when it cannot be read).
fn terminal_width() -> usize {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills a winsize; the fd is stderr, open for the whole process.
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        usize::from(size.ws_col)
    } else {
        80
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Vec<Vec<String>> {
        vec![vec!["web1".into()], vec!["web2".into(), "web3".into()]]
    }

    #[test]
    fn the_board_shows_moved_hosts_and_the_current_batch() {
        let mut b = Board::new(&plan());
        assert!(b.set("web1", Phase::Done));
        assert!(b.set("web2", Phase::Gate));
        assert!(b.set("web3", Phase::Starting));
        assert!(!b.set("web3", Phase::Starting), "no change, no redraw");
        assert!(
            !b.set("db1", Phase::Done),
            "hosts outside the plan are ignored"
        );
        let lines = b.render(1.5, 200);
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].contains("1/3 hosts on the new release") && lines[0].contains("█"),
            "{lines:?}"
        );
        assert_eq!(lines[1], "  batch 2/2: web2 health gate · web3 starting");
    }

    #[test]
    fn failures_are_counted_and_long_lines_cut() {
        let mut b = Board::new(&plan());
        b.set("web1", Phase::Failed);
        let lines = b.render(0.0, 40);
        assert!(
            lines[0].ends_with('…') && lines[0].chars().count() == 40,
            "{lines:?}"
        );
        let wide = b.render(0.0, 200);
        assert!(
            wide[0].ends_with("0/3 hosts on the new release, 1 failed"),
            "{wide:?}"
        );
        assert_eq!(wide[1], "  batch 1/2: web1 FAILED");
    }

    #[test]
    fn no_plan_no_board() {
        assert!(Board::default().render(0.0, 80).is_empty());
    }
}
