//! `[[verify]]` commands: the integration tests of the classic playbook, run at gates on the
//! control machine. Exit 0 passes; a non-zero exit or the timeout fails the gate.
//!
//! The command gets `CUTOVER_URL` (where to test: an instance, the balancer, or the balancer
//! with the preview header), `CUTOVER_VERSION`, `CUTOVER_POINT`, and for blue-green previews
//! `CUTOVER_PREVIEW_HEADER` (`x-cutover-preview: <secret>`, the secret derived from the admin
//! token by [`crate::balancer::api::preview_value`]), to pass to curl with `-H`.

use std::process::Stdio;

use tokio::process::Command;

use crate::config::{Config, VerifyPoint};
use crate::transport::last_lines;

/// Where a verify command should point.
pub struct Target<'a> {
    pub url: String,
    pub version: &'a str,
    /// Send the preview header (blue-green, before the switch).
    pub preview: bool,
}

/// Runs every verify command configured for `point`; the first failure is returned with the
/// command, its exit and its last output lines.
pub async fn run(config: &Config, point: VerifyPoint, target: &Target<'_>) -> Result<(), String> {
    let mut preview_header = None;
    for v in config.verify.iter().filter(|v| v.at.contains(&point)) {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(&v.command)
            .current_dir(&config.base_dir)
            .env("CUTOVER_URL", &target.url)
            .env("CUTOVER_VERSION", target.version)
            .env("CUTOVER_POINT", point.name())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if target.preview {
            if preview_header.is_none() {
                let token = config.admin_token().map_err(|e| {
                    format!(
                        "verify `{}`: the preview header is derived from the balancer's admin token, which cannot be read: {e:#}",
                        v.command
                    )
                })?;
                preview_header = Some(format!(
                    "{}: {}",
                    crate::balancer::api::PREVIEW_HEADER,
                    crate::balancer::api::preview_value(&token)
                ));
            }
            cmd.env(
                "CUTOVER_PREVIEW_HEADER",
                preview_header.as_deref().unwrap_or(""),
            );
        }
        let out = crate::bounded::run(cmd, *v.timeout)
            .await
            .map_err(|e| format!("verify `{}`: cannot start sh: {e}", v.command))?;
        if out.timed_out() {
            return Err(format!(
                "verify `{}` did not finish within {} (it and everything it started were stopped)",
                v.command, v.timeout
            ));
        }
        if !out.success() {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let said = match text.trim() {
                "" => "it printed nothing".to_string(),
                text => last_lines(text, 5),
            };
            return Err(format!(
                "verify `{}` failed at {} ({}): {said}",
                v.command,
                point.name(),
                out.describe_exit(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding: a failing command that printed nothing read "(exit 1): )".
    #[tokio::test]
    async fn a_silent_failure_says_it_printed_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[app]\nname = \"x\"\nstart = \"./app\"\n\
                    [release]\npath = \"r/{version}\"\n\
                    [balancer]\nlisten = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\ntoken = \"0123456789abcdef\"\n\
                    [[verify]]\ncommand = \"exit 3\"\nat = [\"before_traffic\"]\n\
                    [[hosts]]\nname = \"h\"\naddress = \"127.0.0.1\"\nroot = \"h\"\n";
        let config = Config::parse(&dir.path().join("c.toml"), text).unwrap();
        let target = Target {
            url: "http://127.0.0.1:1".into(),
            version: "v1",
            preview: false,
        };
        let e = run(&config, VerifyPoint::BeforeTraffic, &target)
            .await
            .unwrap_err();
        assert!(e.ends_with("(exit 3): it printed nothing"), "{e}");
    }
}
