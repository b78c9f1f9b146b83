//! `cutover init`: a commented example config that works on this machine as is (local transport,
//! three loopback hosts, the built-in sample app as the release), so a new user can run
//! `cutover proxy` and `cutover deploy --version v1` in two terminals right away.

use std::fs;
use std::io::Read;
use std::path::Path;

use anyhow::Context;

/// The example config; `{exe}` is replaced with this binary's path and `{token}` with a fresh
/// random token.
pub const EXAMPLE: &str = r#"# cutover.toml: one app, its fleet, its balancer and how to roll.
# Durations are written like "500ms", "10s", "1m30s". Relative paths are relative to this file.

# How hosts are reached: "local" runs everything on this machine (each host is a directory and a
# loopback address), which is how the demo and the tests run.
transport = "local"
# Where cutover keeps its history and the deploy lock.
state_dir = ".cutover"

[app]
name = "hello"
# Run in the release directory. {port}, {address}, {version} and {host} are substituted;
# PORT, CUTOVER_VERSION, CUTOVER_HOST, CUTOVER_ADDRESS, CUTOVER_RELEASE_DIR and
# CUTOVER_INSTANCE (the instance's pid file) are set. Listen on $CUTOVER_ADDRESS:$PORT.
start = "exec sh ./run.sh"
stop_signal = "TERM"      # sent first; KILL follows after stop_timeout
stop_timeout = "10s"
drain_timeout = "30s"     # how long in-flight requests get to finish on a replaced instance
# The new instance starts beside the old one on a free port ({port}), so capacity never dips.
# An app stuck on a fixed port can be replaced in place instead (rolling only; each host leaves
# the balancer while it restarts):
# mode = "in-place"
# port = 8000

[app.health]
path = "/health"          # GET, 2xx = healthy
interval = "1s"
timeout = "2s"
healthy_threshold = 2     # passes in a row before an instance counts as healthy
unhealthy_threshold = 3   # answered failures in a row (after start_period) that fail the gate
start_period = "0s"
deadline = "60s"          # an instance not healthy by then fails its host

[release]
# The directory shipped as the release; {version} is the --version given to deploy.
path = "releases/{version}"
keep = 5                  # releases kept on each host for instant rollback

[[hosts]]
name = "web1"
address = "127.0.0.11"
root = "fleet/web1"

[[hosts]]
name = "web2"
address = "127.0.0.12"
root = "fleet/web2"

[[hosts]]
name = "web3"
address = "127.0.0.13"
root = "fleet/web3"

[balancer]
listen = "127.0.0.1:8080" # client traffic
admin = "127.0.0.1:8081"  # admin API; loopback only
token = "{token}"

[strategy]
kind = "rolling"
batch = [1, "50%"]        # a count, a share of all hosts, or a list (the last entry repeats)
max_fail_percentage = 0   # a batch fails when failed/size is strictly greater than this
on_failure = "rollback"   # or "halt"
"#;

/// Writes `cutover.toml` and sample releases v1 and v2 into `dir`.
pub fn run(dir: &Path, config_name: &Path, force: bool) -> anyhow::Result<()> {
    // `-c` names the file (relative to --dir); its paths are relative to it, so the sample
    // releases go beside it.
    let config = dir.join(config_name);
    let dir = config.parent().unwrap_or(dir);
    if config.exists() && !force {
        anyhow::bail!("{} exists: pass --force to overwrite it", config.display());
    }
    // `releases/<version>` is also where a user's own builds go: never written over unasked.
    if !force {
        for v in ["v1", "v2"] {
            let release = dir.join("releases").join(v);
            if release.exists() {
                anyhow::bail!(
                    "{} exists (a release of yours?): pass --force to replace it with the sample app, or run init in another directory (--dir)",
                    release.display()
                );
            }
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let exe = std::env::current_exe().context("cannot find this binary's path")?;
    let text = EXAMPLE.replace("{token}", &random_token()?);
    fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
    for v in ["v1", "v2"] {
        write_sample_release(&dir.join("releases").join(v), &exe, v, "")?;
    }
    println!(
        "wrote {} and sample releases in {}",
        config.display(),
        dir.join("releases").display()
    );
    // The commands as they must be typed from here: `-c` unless the config is ./cutover.toml.
    let c = if config == Path::new("cutover.toml") || config == Path::new("./cutover.toml") {
        String::new()
    } else {
        format!(
            "-c {} ",
            crate::transport::sh_quote(config.to_string_lossy())
        )
    };
    println!(
        "next: `cutover {c}proxy` in one terminal, then `cutover {c}deploy --version v1` and `--version v2` in another"
    );
    Ok(())
}

/// A release directory whose `run.sh` starts the built-in sample app at `version`, with extra
/// sample-app flags (e.g. `--unhealthy` for a broken release).
pub fn write_sample_release(
    dir: &Path,
    exe: &Path,
    version: &str,
    flags: &str,
) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let script = format!(
        "#!/bin/sh\n# Starts this release. cutover sets PORT and CUTOVER_ADDRESS.\nexec {exe} sample-app --listen \"$CUTOVER_ADDRESS:$PORT\" --version {version} {flags}\n",
        exe = crate::transport::sh_quote(exe.to_string_lossy()),
    );
    let path = dir.join("run.sh");
    fs::write(&path, script).with_context(|| format!("cannot write {}", path.display()))?;
    fs::write(dir.join("VERSION"), format!("{version}\n"))?;
    Ok(())
}

fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 24];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom for a token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_config_parses() {
        let text = super::EXAMPLE.replace("{token}", "0123456789abcdef0123");
        let c = crate::config::Config::parse(std::path::Path::new("/tmp/x/cutover.toml"), &text)
            .unwrap();
        assert_eq!(c.hosts.len(), 3);
    }

    /// Review finding: the template's comment left CUTOVER_INSTANCE out of what the start
    /// command gets. Every variable the instance's start script exports is named.
    #[test]
    fn the_template_names_every_variable_the_start_command_gets() {
        for var in crate::instance::START_ENV {
            assert!(super::EXAMPLE.contains(var), "{var} is not in the template");
        }
    }
}
