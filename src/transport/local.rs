//! The local transport: each host is a directory on this machine and a loopback address
//! (127.0.0.11, 127.0.0.12, ...), so a whole fleet fits on one machine for the demo and the tests
//! while exercising the same scripts as SSH.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use tokio::process::Command;

use super::{Output, Transport, sh_quote};
use crate::config::Host;

#[derive(Debug, Default, Clone)]
pub struct LocalTransport;

#[async_trait]
impl Transport for LocalTransport {
    async fn run(&self, host: &Host, script: &str, timeout: Duration) -> anyhow::Result<Output> {
        // By path: no search through a long $PATH for every script.
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .env("CUTOVER_HOST", host.name.as_str())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("host {}: cannot run sh", host.name))?;
        let out = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "host {}: command did not finish within {}",
                    host.name,
                    humantime::format_duration(timeout)
                )
            })?
            .with_context(|| format!("host {}: waiting for sh", host.name))?;
        Ok(Output {
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
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

    /// The host is this machine: an upload is a copy.
    async fn upload(&self, host: &Host, from: &Path, to: &Path) -> anyhow::Result<()> {
        tokio::fs::copy(from, to).await.with_context(|| {
            format!(
                "host {}: copying {} to {}",
                host.name,
                from.display(),
                to.display()
            )
        })?;
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
