//! How the deployer reaches a host: run a shell script there, copy a directory there, find a free
//! port there.
//!
//! Everything the deployer does on a host (start an instance, check a pid, move `current`) is a
//! short POSIX shell script sent through this trait, so the local fleet used by the demo and the
//! tests runs the very same scripts that SSH runs on real servers. Values put into scripts are
//! quoted with [`sh_quote`]; names (versions, hosts) are validated as data before they get here.

pub mod local;
pub mod mux;
pub mod session;
pub mod ssh;

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::Host;

/// What a script printed and how it ended.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

#[async_trait]
pub trait Transport: Send + Sync {
    /// Runs `script` with `sh` on the host; fails when the host cannot be reached or the script
    /// exceeds `timeout`. A non-zero exit is not an error here: callers read [`Output::status`].
    async fn run(&self, host: &Host, script: &str, timeout: Duration) -> anyhow::Result<Output>;
    /// Copies the local directory `from` to `to` on the host; `to` appears complete or not at all.
    async fn copy_dir(&self, host: &Host, from: &Path, to: &Path) -> anyhow::Result<()>;
    /// A TCP port free on the host's address right now, for a new instance.
    async fn free_port(&self, host: &Host) -> anyhow::Result<u16>;
    /// Copies the local file `from` to the file `to` on the host (its directory must exist).
    /// Callers verify what arrived (release archives carry a sha256 digest).
    async fn upload(&self, host: &Host, from: &Path, to: &Path) -> anyhow::Result<()> {
        let _ = (from, to);
        anyhow::bail!("host {}: this transport cannot upload files", host.name)
    }
    /// Opens what the host's first script will need (a session), so that it is ready when the
    /// script comes. Failures are left for that script to report.
    async fn warm(&self, host: &Host) {
        let _ = host;
    }
    /// How long one remote step (a short script: read the host, start or list instances, move
    /// `current`) may take: the config's `command_timeout`. Steps that legitimately take
    /// longer (stopping an instance, unpacking a release) add to it or take more.
    fn step_timeout(&self) -> Duration {
        DEFAULT_STEP_TIMEOUT
    }
}

/// [`Transport::step_timeout`] of a transport that was given none (test doubles).
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The host did not answer within the step's time: a caller should not ask it the same again
/// at once, which would wait as long again. Find it with
/// `anyhow::Error::downcast_ref::<TimedOut>()`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TimedOut(pub String);

impl TimedOut {
    /// Whether `e` is a step that did not finish in time.
    pub fn is(e: &anyhow::Error) -> bool {
        e.downcast_ref::<TimedOut>().is_some()
    }
}

/// The host could not be reached, so nothing was sent to it: an error a caller may answer by
/// trying another host. Any other error of [`Transport::run`] (a timeout, a connection lost
/// mid-script) may come after the script began, so it may have run. Find it with
/// `anyhow::Error::downcast_ref::<Unreachable>()`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

impl Unreachable {
    /// Whether `e` says that nothing was sent.
    pub fn is(e: &anyhow::Error) -> bool {
        e.downcast_ref::<Unreachable>().is_some()
    }
}

/// What an SSH connection error says when the host's key differs from the one in known_hosts
/// (see `ssh::hint`): a deploy stops on it whatever its failure budget (the connection may be
/// intercepted; an operator must look before anything moves).
pub const HOST_KEY_CHANGED: &str = "the host presented a different key than the one in known_hosts";

/// Quotes `s` for POSIX sh: single quotes, with embedded single quotes closed and escaped.
pub fn sh_quote(s: impl AsRef<str>) -> String {
    let s = s.as_ref();
    if !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | ':' | '+' | '=')
        })
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs a script and turns a non-zero exit into an error that carries the script's stderr.
pub async fn run_ok(
    transport: &dyn Transport,
    host: &Host,
    what: &str,
    script: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    // A transport error ("did not finish within 30s", "SSH failed") says which step it was.
    let out = transport.run(host, script, timeout).await.map_err(|e| {
        if Unreachable::is(&e) {
            e // nothing was sent: which step does not matter, and the type must stay
        } else {
            anyhow::anyhow!("{what}: {e:#}")
        }
    })?;
    if !out.success() {
        let detail = out.stderr.trim();
        let detail = if detail.is_empty() {
            out.stdout.trim()
        } else {
            detail
        };
        anyhow::bail!(
            "host {}: {what} failed (exit {}): {}",
            host.name,
            out.status,
            last_lines(detail, 5)
        );
    }
    Ok(out.stdout)
}

/// The last `n` lines of `text`, for error messages.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::sh_quote;

    #[test]
    fn quoting_keeps_data_data() {
        assert_eq!(sh_quote("v1"), "v1");
        assert_eq!(sh_quote("/srv/app/releases/v1"), "/srv/app/releases/v1");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("v1;touch /tmp/x"), "'v1;touch /tmp/x'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote("$(id)"), "'$(id)'");
        assert_eq!(sh_quote(""), "''");
    }
}
