//! The SSH transport: real servers through the system OpenSSH client.
//!
//! Why the `ssh` binary and not a Rust SSH library: users already reach their servers with it,
//! so their `~/.ssh/config` (jump hosts, per-host users and keys), their agent and their
//! `known_hosts` apply unchanged, and host key checking is OpenSSH's own (strict by default).
//!
//! One multiplexed master connection per host (`ControlMaster`/`ControlPersist`, socket in a
//! short private temp dir because of the 108-byte limit of Unix socket paths) is opened once,
//! the first time a host is used. Scripts run in [`super::session`]s riding on it: long-lived
//! remote shells that take one script after another, so a step costs a round trip on an open
//! channel, not a new `ssh` process and login shell each. Idle sessions are kept per host and
//! reused; a session that failed is killed. Uploads use a channel of their own. The masters
//! are closed (`ssh -O exit`) when the transport is dropped. Opening masters is bounded by
//! `forks`.
//!
//! A script never travels on the ssh command line: it is sent on the session's stdin and run
//! with stdin from /dev/null, so a value in a script can only be data (it was quoted with
//! [`sh_quote`]), a script that reads stdin cannot swallow its own tail, and nothing runs
//! before the whole script arrived.
//!
//! `CUTOVER_SSH_CONFIG=path` passes `-F path` to every ssh call (an ssh_config used instead of
//! `~/.ssh/config`): for tests and CI that need their own known_hosts or keys.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use tokio::process::Command;
use tokio::sync::{OnceCell, Semaphore};

use super::session::{self, Session, SessionError};
use super::{Output, Transport, last_lines, sh_quote};
use crate::config::{Host, HostKeyChecking, SshSettings};

/// The environment variable naming an ssh_config file passed to ssh with `-F`.
pub const CONFIG_ENV: &str = "CUTOVER_SSH_CONFIG";

/// The environment variable that, set to anything but empty, makes every session an `ssh`
/// process rather than one opened on the master's control socket (see `mux`): an escape hatch
/// should a master not answer cutover the way OpenSSH's does.
pub const NO_MUX_ENV: &str = "CUTOVER_SSH_NO_MUX";

/// How long an idle master stays up after its last use when `ssh_persist = "0s"` (it is closed
/// explicitly when the transport is dropped).
const CONTROL_PERSIST: u64 = 120;

/// Ports tried by [`Transport::free_port`] on remote hosts: below Linux's ephemeral range, so
/// outgoing connections rarely sit on them.
const PORT_RANGE: (u16, u16) = (20000, 32767);

/// A host's master connection: opened once, or the error and when it was met.
type Master = Arc<OnceCell<Result<(), (String, std::time::Instant)>>>;

/// How long a failed connection is remembered: the steps of one deploy fail fast on a host
/// that is down, and a long-lived `cutover serve` tries again once it may be back.
const RETRY_CONNECT_AFTER: Duration = Duration::from_secs(10);

/// Reaches hosts through `ssh`, one multiplexed connection per host.
pub struct SshTransport {
    settings: SshSettings,
    config_file: Option<PathBuf>,
    control_dir: ControlDir,
    masters: Mutex<HashMap<String, (Host, Master)>>,
    connecting: Semaphore,
    /// Sessions through `ssh` processes only (see [`NO_MUX_ENV`]).
    no_mux: bool,
    /// Sessions waiting for their next script.
    idle: session::Pool,
    /// With a private control directory: closes its masters and removes it if a signal ends
    /// the process, which skips [`Drop`].
    _on_signal: Option<crate::bounded::ExitHook>,
}

impl SshTransport {
    /// A transport with the config's SSH settings; `forks` bounds connections opened at once.
    /// Reads [`CONFIG_ENV`].
    pub fn new(settings: SshSettings, forks: usize) -> anyhow::Result<SshTransport> {
        let config_file = std::env::var_os(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        if let Some(f) = &config_file {
            anyhow::ensure!(
                f.is_file(),
                "{CONFIG_ENV}={}: no such ssh_config file",
                f.display()
            );
        }
        // Unix socket paths are limited to 108 bytes: keep the directory short.
        let tmp = std::env::temp_dir();
        let base = if tmp.as_os_str().len() <= 40 {
            tmp
        } else {
            PathBuf::from("/tmp")
        };
        let shared = (!settings.persist.is_zero())
            .then(|| shared_control_dir(&base))
            .flatten();
        let control_dir = match shared {
            Some(dir) => ControlDir::Shared(dir),
            None => ControlDir::Private(
                tempfile::Builder::new()
                    .prefix("cutover-ssh-")
                    .tempdir_in(&base)
                    .with_context(|| {
                        format!(
                            "cannot create a directory for SSH control sockets in {}",
                            base.display()
                        )
                    })?,
            ),
        };
        let on_signal = match &control_dir {
            ControlDir::Private(dir) => {
                let dir = dir.path().to_path_buf();
                // Last: other cleanups (the fleet lock's release) still go through them.
                Some(crate::bounded::at_signal_exit_last(move || {
                    close_masters_in(&dir);
                    let _ = std::fs::remove_dir_all(&dir);
                }))
            }
            ControlDir::Shared(_) => None,
        };
        Ok(SshTransport {
            _on_signal: on_signal,
            settings,
            config_file,
            control_dir,
            masters: Mutex::new(HashMap::new()),
            connecting: Semaphore::new(forks.max(1)),
            no_mux: std::env::var_os(NO_MUX_ENV).is_some_and(|v| !v.is_empty()),
            idle: session::Pool::default(),
        })
    }

    /// Options shared by every ssh call to `host` (the destination comes last).
    fn args(&self, host: &Host) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        if let Some(f) = &self.config_file {
            a.push("-F".into());
            a.push(f.into());
        }
        let checking = match self.settings.host_key_checking {
            HostKeyChecking::Strict => "yes",
            HostKeyChecking::AcceptNew => "accept-new",
        };
        let timeout = self.settings.connect_timeout.as_secs().max(1);
        for o in [
            "BatchMode=yes".to_string(),
            format!("StrictHostKeyChecking={checking}"),
            format!("ConnectTimeout={timeout}"),
            "ControlMaster=auto".to_string(),
            format!("ControlPersist={}", self.persist_secs()),
            "ServerAliveInterval=15".to_string(),
            "ServerAliveCountMax=4".to_string(),
        ] {
            a.push("-o".into());
            a.push(o.into());
        }
        let mut path = OsString::from("ControlPath=");
        path.push(self.control_path(host));
        a.push("-o".into());
        a.push(path);
        if let Some(p) = host.port {
            a.push("-p".into());
            a.push(p.to_string().into());
        }
        if let Some(u) = &host.user {
            a.push("-l".into());
            a.push(u.into());
        }
        if let Some(i) = &host.identity {
            a.push("-i".into());
            a.push(i.into());
        }
        a.push("-T".into());
        a
    }

    /// [`hint`] for `host`, resolving its port and known_hosts file with `ssh -G` (no
    /// connection) only when the error is about its key.
    fn hint(&self, stderr: &str, host: &Host) -> String {
        let mut resolved = Resolved {
            port: host.port.unwrap_or(22),
            known_hosts: None,
        };
        if stderr.contains("host key") || stderr.contains("HOST IDENTIFICATION") {
            let printed = std::process::Command::new("ssh")
                .arg("-G")
                .args(self.args(host))
                .arg(host.address.to_string())
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output();
            if let Ok(out) = printed {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    match line.split_once(' ') {
                        Some(("port", p)) => {
                            resolved.port = p.trim().parse().unwrap_or(resolved.port)
                        }
                        Some(("userknownhostsfile", f)) => {
                            resolved.known_hosts = f.split_whitespace().next().map(str::to_string)
                        }
                        _ => {}
                    }
                }
            }
        }
        hint(stderr, host, self.settings.host_key_checking, &resolved)
    }

    fn command(&self, host: &Host, remote: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.args(host))
            .arg(host.address.to_string())
            .arg(remote)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// The master's socket for `host`: named by everything that makes a different connection
    /// (address, port, user, key, ssh_config), so cutover can tell whether one is up without
    /// asking ssh. (ssh's own `%C` hashes the local host name too, which we would have to
    /// reproduce.)
    fn control_path(&self, host: &Host) -> PathBuf {
        use sha2::Digest;
        let key = format!(
            "{}|{}|{}|{}|{}",
            host.address,
            host.port.unwrap_or(22),
            host.user.as_deref().unwrap_or(""),
            host.identity
                .as_deref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            self.config_file
                .as_deref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let digest = sha2::Sha256::digest(key.as_bytes());
        let name: String = digest[..10].iter().map(|b| format!("{b:02x}")).collect();
        self.control_dir.path().join(name)
    }

    /// Opens the host's master connection once; later calls reuse its outcome (a failure only
    /// for [`RETRY_CONNECT_AFTER`], then they try again).
    /// A master left by an earlier command (`ssh_persist`) is used as it is: its socket is
    /// there, so the first session rides on it at once, without a `true` round trip first (a
    /// login on the host, ~10 ms a host). Should that master have died, ssh removes its stale
    /// socket and connects afresh, and a failure shows as the session's, with the same hints.
    async fn connect(&self, host: &Host) -> anyhow::Result<()> {
        let cell = {
            let mut masters = self.masters.lock().expect("masters lock");
            let entry = masters
                .entry(host.name.to_string())
                .or_insert_with(|| (host.clone(), Arc::new(OnceCell::new())));
            if matches!(entry.1.get(), Some(Err((_, at))) if at.elapsed() >= RETRY_CONNECT_AFTER) {
                entry.1 = Arc::new(OnceCell::new());
            }
            entry.1.clone()
        };
        let outcome = cell
            .get_or_init(|| async {
                self.open_master(host)
                    .await
                    .map_err(|e| (e, std::time::Instant::now()))
            })
            .await;
        outcome
            .clone()
            .map_err(|(e, _)| anyhow::Error::new(super::Unreachable(e)))
    }

    /// Opens the host's master connection (or finds a persisting one).
    async fn open_master(&self, host: &Host) -> Result<(), String> {
        if matches!(self.control_dir, ControlDir::Shared(_)) {
            let path = self.control_path(host);
            // A persisting master answers on its socket. A socket left by a master that died
            // (the host went down, the machine slept) must not pass for one: every step would
            // then fail as a lost session instead of "cannot connect", and ssh would not
            // start a new master over the stale file.
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Ok(());
            }
            let _ = std::fs::remove_file(&path);
        }
        let _permit = self.connecting.acquire().await;
        let mut c = self.command(host, "true");
        c.stdin(Stdio::null());
        let limit = self.settings.connect_timeout * 2 + Duration::from_secs(5);
        let out = match tokio::time::timeout(limit, c.output()).await {
            Err(_) => {
                return Err(format!(
                    "host {}: no SSH connection within {}",
                    describe(host),
                    humantime::format_duration(limit)
                ));
            }
            Ok(Err(e)) => {
                return Err(format!(
                    "host {}: cannot run ssh (is the OpenSSH client installed?): {e}",
                    describe(host)
                ));
            }
            Ok(Ok(out)) => out,
        };
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        // What the login printed on stdout, often the real reason: a `nologin` shell says
        // "This account is currently not available." there, while stderr holds only sshd's
        // "Could not chdir to home directory".
        let stdout = String::from_utf8_lossy(&out.stdout);
        let printed = match stdout.trim() {
            "" => String::new(),
            s if s.contains("currently not available") => format!(
                "\nthe host printed: {}\nhint: the user's login shell refuses logins (nologin): \
                 set the host's `user` (in cutover.toml, the inventory or ~/.ssh/config) to an \
                 account with a shell",
                last_lines(s, 6)
            ),
            s => format!("\nthe host printed: {}", last_lines(s, 6)),
        };
        Err(format!(
            "host {}: cannot connect over SSH: {}{printed}{}",
            describe(host),
            last_lines(stderr.trim(), 6),
            self.hint(&stderr, host)
        ))
    }

    /// Runs `remote` on the host with `stdin`, within `timeout`.
    async fn exec(
        &self,
        host: &Host,
        remote: &str,
        stdin: Input,
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        self.connect(host).await?;
        let mut c = self.command(host, remote);
        match stdin {
            Input::File(f) => {
                c.stdin(Stdio::from(f));
            }
            Input::Pipe(p) => {
                c.stdin(p);
            }
        }
        let child = c
            .spawn()
            .with_context(|| format!("host {}: cannot run ssh", describe(host)))?;
        let out = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                anyhow::Error::new(super::TimedOut(format!(
                    "host {}: command did not finish within {}",
                    describe(host),
                    humantime::format_duration(timeout)
                )))
            })?
            .with_context(|| format!("host {}: waiting for ssh", describe(host)))?;
        let status = out.status.code().unwrap_or(-1);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // 255 is ssh's own failure (the connection), never a script's: our scripts do not use it.
        if status == 255 {
            anyhow::bail!(
                "host {}: SSH failed: {}{}",
                describe(host),
                last_lines(stderr.trim(), 6),
                self.hint(&stderr, host)
            );
        }
        Ok(Output {
            status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        })
    }

    fn persist_secs(&self) -> u64 {
        match self.control_dir {
            ControlDir::Shared(_) => self.settings.persist.as_secs().max(1),
            ControlDir::Private(_) => CONTROL_PERSIST,
        }
    }

    /// An idle session to the host, or a new one.
    async fn session(&self, host: &Host) -> anyhow::Result<Session> {
        self.connect(host).await?;
        if let Some(s) = self.idle.take(host.name.as_str()) {
            return Ok(s);
        }
        let token = session::new_token()?;
        // Straight to the master when it is there (see `mux`): no `ssh` process per session.
        if !self.no_mux {
            let path = self.control_path(host);
            let timeout = self.settings.connect_timeout;
            let opened = tokio::task::spawn_blocking(move || {
                super::mux::open(&path, &session::remote_command(), timeout)
            })
            .await;
            match opened {
                Ok(Ok(m)) => return Session::from_mux(m, token),
                Ok(Err(e)) => {
                    tracing::debug!(host = %host.name, "no session through the control socket, starting ssh: {e:#}")
                }
                Err(e) => {
                    tracing::debug!(host = %host.name, "no session through the control socket, starting ssh: {e}")
                }
            }
        }
        let mut c = Command::new("ssh");
        c.args(self.args(host))
            .arg(host.address.to_string())
            .arg(session::remote_command());
        Session::spawn(c, token).map_err(|e| {
            anyhow::Error::new(super::Unreachable(format!(
                "host {}: {e:#}",
                describe(host)
            )))
        })
    }

    /// Runs a script in a session of the host; the session goes back to the pool only when the
    /// exchange completed.
    async fn run_in_session(
        &self,
        host: &Host,
        script: &str,
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        let s = self.session(host).await?;
        let body = format!(
            "CUTOVER_HOST={}; export CUTOVER_HOST\n{script}",
            sh_quote(host.name.as_str())
        );
        match self
            .idle
            .run_in(host.name.as_str(), s, &body, timeout)
            .await
        {
            Ok(out) => Ok(out),
            Err(SessionError::Timeout) => Err(anyhow::Error::new(super::TimedOut(format!(
                "host {}: command did not finish within {}",
                describe(host),
                humantime::format_duration(timeout)
            )))),
            Err(SessionError::Ended { stderr }) => Err(anyhow::anyhow!(
                "host {}: SSH failed: {}{}",
                describe(host),
                if stderr.trim().is_empty() {
                    "the connection closed".to_string()
                } else {
                    last_lines(stderr.trim(), 6)
                },
                self.hint(&stderr, host)
            )),
            Err(SessionError::Io(e)) => {
                Err(anyhow::anyhow!("host {}: SSH session: {e}", describe(host)))
            }
        }
    }

    fn fail(host: &Host, what: &str, out: &Output) -> anyhow::Error {
        let detail = if out.stderr.trim().is_empty() {
            out.stdout.trim()
        } else {
            out.stderr.trim()
        };
        anyhow::anyhow!(
            "host {}: {what} failed (exit {}): {}",
            describe(host),
            out.status,
            last_lines(detail, 5)
        )
    }
}

enum Input {
    File(std::fs::File),
    Pipe(Stdio),
}

#[async_trait]
impl Transport for SshTransport {
    async fn run(&self, host: &Host, script: &str, timeout: Duration) -> anyhow::Result<Output> {
        self.run_in_session(host, script, timeout).await
    }

    async fn warm(&self, host: &Host) {
        if let Ok(s) = self.session(host).await {
            self.idle.put(host.name.as_str(), s);
        }
    }

    fn step_timeout(&self) -> Duration {
        self.settings.command_timeout
    }

    async fn copy_dir(&self, host: &Host, from: &Path, to: &Path) -> anyhow::Result<()> {
        let to_s = to.to_string_lossy();
        let tmp = format!("{to_s}.partial");
        let remote = format!(
            "sh -c {}",
            sh_quote(format!(
                "set -e; rm -rf {tmp}; mkdir -p {tmp}; tar -C {tmp} -xf -; rm -rf {to}; mv {tmp} {to}",
                tmp = sh_quote(&tmp),
                to = sh_quote(&to_s),
            ))
        );
        let mut tar = std::process::Command::new("tar")
            .arg("-C")
            .arg(from)
            .args(["-cf", "-", "."])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run tar")?;
        let pipe = Stdio::from(tar.stdout.take().expect("piped stdout"));
        let out = self
            .exec(
                host,
                &remote,
                Input::Pipe(pipe),
                self.settings.command_timeout,
            )
            .await;
        let tar_out = tokio::task::spawn_blocking(move || tar.wait_with_output())
            .await
            .context("waiting for tar")??;
        let out = out?;
        if !tar_out.status.success() {
            anyhow::bail!(
                "packing {} failed: {}",
                from.display(),
                String::from_utf8_lossy(&tar_out.stderr).trim()
            );
        }
        if !out.success() {
            return Err(Self::fail(
                host,
                &format!("copying {} to {}", from.display(), to.display()),
                &out,
            ));
        }
        Ok(())
    }

    async fn upload(&self, host: &Host, from: &Path, to: &Path) -> anyhow::Result<()> {
        let file = std::fs::File::open(from)
            .with_context(|| format!("cannot open {} to upload it", from.display()))?;
        let size = file
            .metadata()
            .with_context(|| format!("cannot read the size of {}", from.display()))?
            .len();
        let remote = format!("sh -c {}", sh_quote(upload_script(to, size)));
        let out = self
            .exec(
                host,
                &remote,
                Input::File(file),
                self.settings.command_timeout,
            )
            .await
            .with_context(|| format!("uploading {} to {}", from.display(), to.display()))?;
        if !out.success() {
            return Err(Self::fail(
                host,
                &format!(
                    "uploading {} to {} (the partial file was removed)",
                    from.display(),
                    to.display()
                ),
                &out,
            ));
        }
        Ok(())
    }

    async fn free_port(&self, host: &Host) -> anyhow::Result<u16> {
        let out = self
            .run(host, &free_port_script(), self.settings.command_timeout)
            .await?;
        if !out.success() {
            return Err(Self::fail(host, "finding a free port", &out));
        }
        out.stdout.trim().parse::<u16>().map_err(|_| {
            anyhow::anyhow!(
                "host {}: finding a free port printed {:?}",
                describe(host),
                out.stdout.trim()
            )
        })
    }
}

impl Drop for SshTransport {
    /// Closes every master connection this transport opened.
    fn drop(&mut self) {
        // Sessions first (killed on drop), then the masters they rode on, unless they are
        // meant to outlive us (`ssh_persist`).
        self.idle.clear();
        if matches!(self.control_dir, ControlDir::Shared(_)) {
            return;
        }
        let masters = std::mem::take(&mut *self.masters.lock().expect("masters lock"));
        for (_, (host, cell)) in masters {
            if !matches!(cell.get(), Some(Ok(()))) {
                continue;
            }
            let _ = std::process::Command::new("ssh")
                .args(self.args(&host))
                .args(["-O", "exit"])
                .arg(host.address.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Asks the master behind every control socket in `dir` to exit (`ssh -O exit`).
fn close_masters_in(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for socket in entries.flatten() {
        // The destination is required but unused: the control socket names the connection.
        let _ = std::process::Command::new("ssh")
            .arg("-o")
            .arg(format!("ControlPath={}", socket.path().display()))
            .args(["-O", "exit", "cutover-master"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Where the control sockets live: a per-user directory shared by every cutover command when
/// masters persist between commands, else a private one removed with the transport.
enum ControlDir {
    Shared(PathBuf),
    Private(tempfile::TempDir),
}

impl ControlDir {
    fn path(&self) -> &Path {
        match self {
            ControlDir::Shared(p) => p,
            ControlDir::Private(t) => t.path(),
        }
    }
}

/// `<base>/cutover-ssh-<uid>`, created mode 0700, used only when it is a real directory owned
/// by us and closed to others (a socket there grants use of our logged-in connections).
fn shared_control_dir(base: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let dir = base.join(format!("cutover-ssh-{uid}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    (meta.is_dir() && meta.uid() == uid && meta.mode() & 0o077 == 0).then_some(dir)
}

/// `web1 (root@10.0.0.5 port 2222)`, for messages.
pub fn describe(host: &Host) -> String {
    let user = host
        .user
        .as_deref()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let port = host.port.map(|p| format!(" port {p}")).unwrap_or_default();
    format!("{} ({user}{}{port})", host.name, host.address)
}

/// Where ssh connects and which known_hosts file it reads, as its config resolves them (the
/// port may come from `~/.ssh/config`): what a host key hint must name to be of any use.
struct Resolved {
    port: u16,
    known_hosts: Option<String>,
}

/// What to do about a failed ssh call, from its stderr.
fn hint(stderr: &str, host: &Host, checking: HostKeyChecking, resolved: &Resolved) -> String {
    let port = resolved.port;
    let target = if port == 22 {
        host.address.to_string()
    } else {
        format!("[{}]:{port}", host.address)
    };
    let file = resolved
        .known_hosts
        .as_deref()
        .unwrap_or("~/.ssh/known_hosts");
    let keygen_file = match &resolved.known_hosts {
        Some(f) => format!(" -f {}", sh_quote(f)),
        None => String::new(),
    };
    if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || stderr.contains("differs from the key for")
    {
        return format!(
            "\nhint: {}. If the server was reinstalled, confirm its new key fingerprint with its administrator, then remove the old entry with `ssh-keygen -R '{target}'{keygen_file}` and add the new one; if not, someone may be intercepting the connection: do not deploy.",
            super::HOST_KEY_CHANGED
        );
    }
    if stderr.contains("Host key verification failed")
        || (stderr.contains("No ") && stderr.contains("host key is known"))
    {
        let accept = if checking == HostKeyChecking::Strict {
            ", or set host_key_checking = \"accept-new\" in cutover.toml to trust a host's key on first contact"
        } else {
            ""
        };
        return format!(
            "\nhint: the host's key is not in known_hosts and host_key_checking is strict. Confirm its fingerprint with the server's administrator, then add it with `ssh-keyscan -p {port} {addr} >> {file}` (or connect once with ssh by hand){accept}.",
            addr = host.address,
            file = sh_quote(file),
        );
    }
    if stderr.contains("Permission denied") {
        return "\nhint: the server refused the login: check the host's user and identity in cutover.toml (or ~/.ssh/config), that ssh-agent holds the key, and that its public key is in the server's authorized_keys.".to_string();
    }
    if stderr.contains("Connection refused")
        || stderr.contains("timed out")
        || stderr.contains("No route to host")
    {
        return "\nhint: is the server up, sshd running, and the address and port right? (`ssh -v` shows the details)".to_string();
    }
    String::new()
}

/// The host's side of an upload of `size` bytes: stdin into `<to>.upload`, renamed to `to`
/// once it is all there. A failed write (a full disk), a short one (the connection closed
/// midway, which `cat` takes for the end) or a signal removes the partial file: left behind,
/// it kept the disk at 100% until the next deploy settled the host.
fn upload_script(to: &Path, size: u64) -> String {
    let to_s = to.to_string_lossy();
    format!(
        "set -e; t={tmp}; trap 'rm -f \"$t\"' EXIT; trap 'exit 129' HUP; trap 'exit 143' TERM\n\
         cat > \"$t\"\n\
         n=$(wc -c < \"$t\"); [ \"$n\" -eq {size} ] || {{ echo \"received $n of {size} bytes\" >&2; exit 1; }}\n\
         mv \"$t\" {to}; trap - EXIT\n",
        tmp = sh_quote(format!("{to_s}.upload")),
        to = sh_quote(&to_s),
    )
}

/// A shell script printing one TCP port that no socket of the host uses, from random
/// candidates in [`PORT_RANGE`] (usually the first is free). It asks `ss` for sockets on the
/// candidate port, falling back to `grep` over /proc/net/tcp and tcp6 where `ss` (iproute2) is
/// missing. Both make the kernel walk its whole connection table, whose size follows the
/// host's memory, not its connections: `ss` walks it once (about 4 ms on a 24 GiB host), the
/// two files once each (about 9 ms), and the first batch of a deploy waits for it.
fn free_port_script() -> String {
    let seed = session::new_token()
        .ok()
        .and_then(|t| u64::from_str_radix(&t[..12], 16).ok())
        .unwrap_or_else(|| u64::from(std::process::id()));
    free_port_script_trying(&port_candidates(seed))
}

/// 32 ports of [`PORT_RANGE`] drawn from `seed`, in the order to try them.
fn port_candidates(seed: u64) -> Vec<u16> {
    let (lo, hi) = PORT_RANGE;
    let span = u64::from(hi - lo) + 1;
    (0..32u64)
        .map(|i| lo + ((seed.wrapping_mul(2_654_435_761).wrapping_add(i * 7919)) % span) as u16)
        .collect()
}

fn free_port_script_trying(ports: &[u16]) -> String {
    let (lo, hi) = PORT_RANGE;
    let candidates: Vec<String> = ports.iter().map(|p| format!("{p}:{p:04X}")).collect();
    // `ss` prints a header (older ones have no -H to drop it), then one line per socket whose
    // local address ends in `:PORT`.
    format!(
        r#"command -v ss >/dev/null 2>&1 && use_ss=1
for c in {candidates}; do
  p=${{c%%:*}}
  if [ -n "$use_ss" ] && used=$(ss -atn "sport = :$p" 2>/dev/null); then
    case $used in *":$p "*) continue ;; esac
    echo "$p"; exit 0
  fi
  use_ss=
  if ! grep -qi ":${{c#*:}} " /proc/net/tcp /proc/net/tcp6 2>/dev/null; then echo "$p"; exit 0; fi
done
echo "no free TCP port found in {lo}-{hi} after {n} tries" >&2
exit 1
"#,
        candidates = candidates.join(" "),
        n = ports.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_script_skips_used_ports_with_ss_and_without() {
        // Run the script here, with the first candidates taken: it must print the first port
        // nobody uses, asking `ss`, and asking /proc/net/tcp where there is no `ss`.
        let candidates = port_candidates(0x5eed);
        let taken: Vec<std::net::TcpListener> = candidates[..3]
            .iter()
            .filter_map(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).ok())
            .collect();
        assert_eq!(taken.len(), 3, "the test's candidate ports are in use here");
        let only_grep = tempfile::tempdir().unwrap();
        let grep = String::from_utf8(
            std::process::Command::new("sh")
                .args(["-c", "command -v grep"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        std::os::unix::fs::symlink(grep.trim(), only_grep.path().join("grep")).unwrap();
        for path in [std::env::var_os("PATH").unwrap(), only_grep.path().into()] {
            let out = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(free_port_script_trying(&candidates))
                .env("PATH", &path)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let port: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            let first_free = candidates[3..]
                .iter()
                .find(|p| std::net::TcpListener::bind(("127.0.0.1", **p)).is_ok())
                .copied();
            assert_eq!(Some(port), first_free, "PATH={path:?}");
        }
        drop(taken);
    }

    #[test]
    fn a_dead_masters_socket_does_not_pass_for_a_connection() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let t = SshTransport::new(
            crate::config::SshSettings {
                host_key_checking: crate::config::HostKeyChecking::Strict,
                connect_timeout: Duration::from_secs(2),
                command_timeout: Duration::from_secs(5),
                persist: Duration::from_secs(60),
            },
            1,
        )
        .unwrap();
        if !matches!(t.control_dir, ControlDir::Shared(_)) {
            return; // no shared directory on this machine: nothing persists to go stale
        }
        // A closed port on loopback: nothing answers SSH there.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let mut host = Host::for_test(std::path::Path::new("/nonexistent"));
        host.port = Some(port);
        let path = t.control_path(&host);
        // What a master that died leaves: the socket file, with nobody listening.
        let _ = std::fs::remove_file(&path);
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let e = rt.block_on(t.open_master(&host)).unwrap_err();
        assert!(e.contains("cannot connect over SSH"), "{e}");
        assert!(!path.exists(), "the stale socket is gone");
    }

    /// Regression: on a full disk the half-written `<archive>.upload` stayed on the host,
    /// keeping the disk full. A symlink to /dev/full stands for the full disk.
    #[test]
    fn a_failed_upload_leaves_no_partial_file() {
        let d = tempfile::tempdir().unwrap();
        let to = d.path().join(".v1.tar.gz");
        let tmp = d.path().join(".v1.tar.gz.upload");
        let upload = |size: u64, data: &str| {
            let mut c = std::process::Command::new("sh")
                .arg("-c")
                .arg(upload_script(&to, size))
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            c.stdin.take().unwrap().write_all(data.as_bytes()).unwrap();
            c.wait_with_output().unwrap()
        };
        std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
        let out = upload(4, "data");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("No space left"), "{stderr}");
        assert!(tmp.symlink_metadata().is_err(), "the partial file stays");
        assert!(!to.exists());
        // A short upload (the connection closed midway) is not renamed into place either.
        let out = upload(10, "data");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("received 4 of 10 bytes"), "{stderr}");
        assert!(!tmp.exists() && !to.exists());
        let out = upload(4, "data");
        assert!(out.status.success());
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "data");
        assert!(!tmp.exists());
    }

    #[test]
    fn hints_say_what_to_do() {
        let host = Host {
            name: crate::config::Name::parse("web1").unwrap(),
            address: "10.0.0.5".parse().unwrap(),
            root: PathBuf::from("/srv/app"),
            port: Some(2222),
            user: None,
            identity: None,
            origin: None,
        };
        // The port and file as `ssh -G` resolved them (the config may set the port).
        let resolved = Resolved {
            port: 2222,
            known_hosts: Some("/tmp/k h/known_hosts".into()),
        };
        let h = hint(
            "No ED25519 host key is known for [10.0.0.5]:2222 and you have requested strict checking.\nHost key verification failed.",
            &host,
            HostKeyChecking::Strict,
            &resolved,
        );
        assert!(
            h.contains("ssh-keyscan -p 2222 10.0.0.5 >> '/tmp/k h/known_hosts'"),
            "{h}"
        );
        assert!(h.contains("accept-new"), "{h}");
        let h = hint(
            "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@",
            &host,
            HostKeyChecking::Strict,
            &resolved,
        );
        assert!(
            h.contains("ssh-keygen -R '[10.0.0.5]:2222' -f '/tmp/k h/known_hosts'"),
            "{h}"
        );
    }
}
