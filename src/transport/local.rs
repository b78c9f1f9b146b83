//! The local transport: each host is a directory on this machine and a loopback address
//! (127.0.0.11, 127.0.0.12, ...), so a whole fleet fits on one machine for the demo and the tests
//! while exercising the same scripts as SSH.
//!
//! Scripts run in the same session driver as over SSH ([`super::session`]), here a local `sh`
//! per host: a step costs a fork of that shell instead of a new process started from cutover,
//! and the demo and the tests exercise the SSH transport's protocol on every step.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;

use super::session::{self, Pool, Session, SessionError};
use super::{Output, Transport, Unreachable, last_lines, sh_quote};
use crate::config::Host;

#[derive(Clone)]
pub struct LocalTransport {
    /// Idle session shells per host, shared by clones; killed when the last clone goes.
    idle: Arc<Pool>,
    /// See [`Transport::step_timeout`].
    step_timeout: Duration,
}

impl Default for LocalTransport {
    fn default() -> LocalTransport {
        LocalTransport {
            idle: Arc::default(),
            step_timeout: super::DEFAULT_STEP_TIMEOUT,
        }
    }
}

impl LocalTransport {
    pub fn new() -> LocalTransport {
        LocalTransport::default()
    }

    /// A transport whose remote steps get `step_timeout` (the config's `command_timeout`).
    pub fn with_step_timeout(step_timeout: Duration) -> LocalTransport {
        LocalTransport {
            step_timeout,
            ..LocalTransport::default()
        }
    }

    fn session(&self, host: &Host) -> anyhow::Result<Session> {
        if let Some(s) = self.idle.take(host.name.as_str()) {
            return Ok(s);
        }
        let token = session::new_token()?;
        let mut c = session::local_command();
        c.env("CUTOVER_HOST", host.name.as_str());
        Session::spawn_group(c, token)
            .map_err(|e| anyhow::Error::new(Unreachable(format!("host {}: {e:#}", host.name))))
    }
}

#[async_trait]
impl Transport for LocalTransport {
    async fn run(&self, host: &Host, script: &str, timeout: Duration) -> anyhow::Result<Output> {
        let s = self.session(host)?;
        match self
            .idle
            .run_in(host.name.as_str(), s, script, timeout)
            .await
        {
            Ok(out) => Ok(out),
            Err(SessionError::Timeout) => Err(anyhow::Error::new(super::TimedOut(format!(
                "host {}: command did not finish within {}",
                host.name,
                humantime::format_duration(timeout)
            )))),
            Err(SessionError::Ended { stderr }) => Err(anyhow::anyhow!(
                "host {}: the shell running the script ended{}",
                host.name,
                if stderr.trim().is_empty() {
                    String::new()
                } else {
                    format!(": {}", last_lines(stderr.trim(), 6))
                }
            )),
            Err(SessionError::Io(e)) => {
                Err(anyhow::anyhow!("host {}: shell session: {e}", host.name))
            }
        }
    }

    async fn warm(&self, host: &Host) {
        if let Ok(s) = self.session(host) {
            self.idle.put(host.name.as_str(), s);
        }
    }

    fn step_timeout(&self) -> Duration {
        self.step_timeout
    }

    async fn copy_dir(&self, host: &Host, from: &Path, to: &Path) -> anyhow::Result<()> {
        let from_s = from.to_string_lossy();
        let to_s = to.to_string_lossy();
        let tmp = format!("{to_s}.partial");
        let script = format!(
            "set -e\nrm -rf {tmp}\nmkdir -p {tmp}\ncp -a {from}/. {tmp}/\nrm -rf {to}\nmv {tmp} {to}\n",
            tmp = sh_quote(&tmp),
            from = sh_quote(&from_s),
            to = sh_quote(&to_s),
        );
        let out = self.run(host, &script, Duration::from_secs(300)).await?;
        if !out.success() {
            anyhow::bail!(
                "host {}: copying {} to {} failed: {}",
                host.name,
                from.display(),
                to.display(),
                out.stderr.trim()
            );
        }
        Ok(())
    }

    /// The host is this machine: an upload is a copy, into `<to>.upload` first and renamed
    /// once complete, as over SSH. A copy that fails (a full disk) removes its partial file:
    /// left behind, it kept the disk full.
    async fn upload(&self, host: &Host, from: &Path, to: &Path) -> anyhow::Result<()> {
        let mut tmp = to.as_os_str().to_owned();
        tmp.push(".upload");
        let tmp = std::path::PathBuf::from(tmp);
        let copied = match tokio::fs::copy(from, &tmp).await {
            Ok(_) => tokio::fs::rename(&tmp, to).await,
            Err(e) => Err(e),
        };
        if let Err(e) = copied {
            let left = match tokio::fs::remove_file(&tmp).await {
                Ok(()) => " (the partial file was removed)".to_string(),
                Err(r) if r.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(r) => format!(" ({} could not be removed: {r})", tmp.display()),
            };
            return Err(anyhow::Error::new(e).context(format!(
                "host {}: copying {} to {}{left}",
                host.name,
                from.display(),
                to.display()
            )));
        }
        Ok(())
    }

    async fn free_port(&self, host: &Host) -> anyhow::Result<u16> {
        let listener = std::net::TcpListener::bind((host.address, 0)).with_context(|| {
            format!(
                "host {}: cannot bind {} to find a free port (is it a loopback address of this machine?)",
                host.name, host.address
            )
        })?;
        Ok(listener.local_addr()?.port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a copy that failed on a full disk left its partial file. A symlink to
    /// /dev/full stands for the full disk.
    #[tokio::test]
    async fn a_failed_upload_leaves_no_partial_file() {
        let d = tempfile::tempdir().unwrap();
        let host = Host::for_test(d.path());
        let from = d.path().join("release.tar.gz");
        std::fs::write(&from, "data").unwrap();
        let to = d.path().join(".v1.tar.gz");
        let tmp = d.path().join(".v1.tar.gz.upload");
        std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
        let t = LocalTransport::new();
        let e = format!("{:#}", t.upload(&host, &from, &to).await.unwrap_err());
        assert!(e.contains("host web1") && e.contains(".v1.tar.gz"), "{e}");
        assert!(tmp.symlink_metadata().is_err(), "the partial file stays");
        assert!(!to.exists());
        t.upload(&host, &from, &to).await.unwrap();
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "data");
        assert!(!tmp.exists());
    }

    #[tokio::test]
    async fn a_timed_out_script_leaves_no_process_behind() {
        let d = tempfile::tempdir().unwrap();
        let host = Host::for_test(d.path());
        let pid_file = d.path().join("pid");
        let script = format!(
            "sleep 30 & echo $! > {}; wait",
            sh_quote(pid_file.to_string_lossy())
        );
        let t = LocalTransport::new();
        let e = t
            .run(&host, &script, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("did not finish within"), "{e:#}");
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let started = std::time::Instant::now();
        while crate::journal::process_alive(pid) && started.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !crate::journal::process_alive(pid),
            "the script's child {pid} outlived its timeout"
        );
    }
}
