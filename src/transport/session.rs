//! A long-lived remote shell that runs one script after another, so a step costs a round trip
//! on an open channel (about a millisecond) instead of a new `ssh` process, a new channel and a
//! new login shell (about 20 ms, more where the login shell reads a heavy rc file).
//!
//! The remote side is a plain `sh -s` reading commands from the pipe. Each request is a fixed
//! frame written by [`request`]: the script as a single-quoted literal assigned to a variable
//! (quoted by [`sh_quote`], so no byte of it can end the literal: it stays data to the driver),
//! `eval` of that variable in a subshell with stdin from /dev/null, then a marker line
//! `\n<token> <status>` on both stdout and stderr. The token is 128 random bits chosen per
//! session and appears only in the frame, never in a variable or an argument, so a script can
//! neither see it nor fake the end of a response.
//!
//! Why a literal and not a line-counted body read with `read -r`: `read` takes one byte per
//! system call from a pipe (it must not read past the line), about 0.75 µs a byte, and a
//! settle script is 2 KB; the shell's own parser reads its input in blocks. (Where `sh` is
//! bash, bash reads a pipe a byte at a time either way; the frame is still correct.)
//!
//! A session that fails, times out or is abandoned mid-script is killed, never reused: its
//! stream may be out of step.

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncWrite;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::{Output, sh_quote};

/// The remote command that starts a session: a shell reading the frames of [`request`] from
/// its stdin. `cutover-session` is only `$1`, so `ps` on the host says what the shell is.
pub fn remote_command() -> String {
    "exec sh -s cutover-session".to_string()
}

/// A session on this machine: the same shell, started directly.
pub fn local_command() -> tokio::process::Command {
    let mut c = Command::new("/bin/sh");
    c.args(["-s", "cutover-session"]);
    c
}

/// The frame that runs `script` once and ends its output on both streams with the `token`
/// marker. The script runs in a subshell of the driver (a fork, not a new `sh`), which keeps the
/// script's `cd`, `set`, functions and `exit` to itself, and sees no positional parameters and
/// not the variable that carried it.
fn request(script: &str, token: &str) -> String {
    let script = sh_quote(script);
    format!(
        "_co_s={script}\n\
         (eval \"unset _co_s _co_r; set --\n$_co_s\") </dev/null\n\
         _co_r=$?\n\
         printf '\\n%s %s\\n' {token} \"$_co_r\"\n\
         printf '\\n%s %s\\n' {token} \"$_co_r\" >&2\n"
    )
}

/// A fresh random token (32 hex digits).
pub fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom for an SSH session token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Sessions waiting for their next script, per host name. A session goes back only after a
/// complete exchange; one that failed is dropped (and killed).
#[derive(Default)]
pub struct Pool {
    idle: std::sync::Mutex<std::collections::HashMap<String, Vec<Session>>>,
}

impl Pool {
    /// A live idle session of `host`, if there is one.
    pub fn take(&self, host: &str) -> Option<Session> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let sessions = idle.get_mut(host)?;
        while let Some(mut s) = sessions.pop() {
            if s.alive() {
                return Some(s);
            }
        }
        None
    }

    /// Runs `script` in `session` (one of `host`'s), which goes back to the pool only after a
    /// complete exchange.
    pub async fn run_in(
        &self,
        host: &str,
        mut session: Session,
        script: &str,
        timeout: Duration,
    ) -> Result<Output, SessionError> {
        let out = session.run(script, timeout).await?;
        self.put(host, session);
        Ok(out)
    }

    /// Puts an idle `session` of `host` in the pool.
    pub fn put(&self, host: &str, session: Session) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(host.to_string())
            .or_default()
            .push(session);
    }

    /// Ends every idle session.
    pub fn clear(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Why an exchange did not produce an [`Output`].
#[derive(Debug)]
pub enum SessionError {
    /// The stream ended before the marker: the connection or the remote shell is gone. Carries
    /// what arrived on stderr (ssh's own messages).
    Ended {
        stderr: String,
    },
    /// No marker within the timeout.
    Timeout,
    Io(std::io::Error),
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;
type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// One running session: what keeps it open, and its pipes.
pub struct Session {
    process: Process,
    stdin: Writer,
    stdout: Stream<Reader>,
    stderr: Stream<Reader>,
    token: String,
    /// Between exchanges: the shell waits for its next script, so closing its stdin ends it.
    idle: bool,
    /// The process group the session leads (local sessions): killed whole when the session
    /// is dropped mid-exchange.
    group: Option<u32>,
}

impl Drop for Session {
    /// An idle session ends by itself when its stdin closes (the shell reads end of file, as
    /// does `ssh`, which then closes the channel): nothing to kill or wait for, which saved a
    /// kill and a reap per host at every command's exit. A session dropped mid-exchange (a
    /// timeout, an abandoned step) may be running anything: its process is killed.
    fn drop(&mut self) {
        if let Some(pgid) = self.group {
            crate::bounded::forget_group(pgid);
        }
        if !self.idle {
            if let Process::Child(child) = &mut self.process {
                if let Some(pgid) = self.group {
                    // The script's own children too (a `sleep` a timed-out hook left).
                    // SAFETY: kill(2) on the process group this session leads; its leader
                    // is not reaped yet, so the id is still ours.
                    unsafe {
                        libc::kill(-(pgid as i32), libc::SIGKILL);
                    }
                }
                let _ = child.start_kill();
            }
        }
    }
}

/// What keeps a session open; dropping it ends the session.
enum Process {
    /// A child: `ssh`, or `sh` for the local transport (killed on drop).
    Child(Child),
    /// The control connection of a session opened on an OpenSSH master (see `mux`).
    Mux(std::os::unix::net::UnixStream),
}

impl Session {
    /// Starts `command` (an `ssh ... host <remote_command()>`, or [`local_command`]) with
    /// piped stdio; `token` marks the end of every response.
    pub fn spawn(mut command: Command, token: String) -> anyhow::Result<Session> {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        let mut child = command.spawn().context("cannot start a shell session")?;
        let stdin = child.stdin.take().context("session stdin")?;
        let stdout = child.stdout.take().context("session stdout")?;
        let stderr = child.stderr.take().context("session stderr")?;
        Ok(Session {
            process: Process::Child(child),
            stdin: Box::new(stdin),
            stdout: Stream::new(Box::new(stdout)),
            stderr: Stream::new(Box::new(stderr)),
            token,
            idle: true,
            group: None,
        })
    }

    /// Like [`Session::spawn`], with the session in a process group of its own, killed whole
    /// (every script's children included) when it is dropped mid-exchange.
    pub fn spawn_group(mut command: Command, token: String) -> anyhow::Result<Session> {
        command.process_group(0);
        let mut s = Session::spawn(command, token)?;
        if let Process::Child(child) = &s.process {
            s.group = child.id();
        }
        if let Some(pgid) = s.group {
            crate::bounded::register_group(pgid);
        }
        Ok(s)
    }

    /// A session opened on an OpenSSH master by [`super::mux::open`] with
    /// [`remote_command`]; `token` marks the end of every response.
    pub fn from_mux(m: super::mux::MuxSession, token: String) -> anyhow::Result<Session> {
        use tokio::net::unix::pipe;
        m.control.set_nonblocking(true)?;
        Ok(Session {
            process: Process::Mux(m.control),
            stdin: Box::new(pipe::Sender::from_owned_fd(m.stdin)?),
            stdout: Stream::new(Box::new(pipe::Receiver::from_owned_fd(m.stdout)?)),
            stderr: Stream::new(Box::new(pipe::Receiver::from_owned_fd(m.stderr)?)),
            token,
            idle: true,
            group: None,
        })
    }

    /// Runs one script; the session may be reused only after `Ok`.
    pub async fn run(&mut self, script: &str, timeout: Duration) -> Result<Output, SessionError> {
        let request = request(script, &self.token);
        self.idle = false;
        let exchange = async {
            self.stdin
                .write_all(request.as_bytes())
                .await
                .map_err(SessionError::Io)?;
            self.stdin.flush().await.map_err(SessionError::Io)?;
            let marker = format!("\n{} ", self.token);
            let (out, err) = tokio::join!(
                self.stdout.until(marker.as_bytes()),
                self.stderr.until(marker.as_bytes())
            );
            match (out, err) {
                (Ok((stdout, status)), Ok((stderr, _))) => Ok(Output {
                    status,
                    stdout: String::from_utf8_lossy(&stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&stderr).into_owned(),
                }),
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Err(SessionError::Ended { .. })) => Err(SessionError::Ended {
                stderr: self.stderr.rest(),
            }),
            Ok(Ok(out)) => {
                self.idle = true;
                Ok(out)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SessionError::Timeout),
        }
    }

    /// Whether the session is still open: its process runs, or its master has neither closed
    /// the control connection nor reported the session's exit on it.
    pub fn alive(&mut self) -> bool {
        match &mut self.process {
            Process::Child(child) => matches!(child.try_wait(), Ok(None)),
            Process::Mux(control) => {
                let mut byte = [0u8; 1];
                // SAFETY: a one-byte peek into a live buffer on an open socket.
                let n = unsafe {
                    libc::recv(
                        std::os::fd::AsRawFd::as_raw_fd(control),
                        byte.as_mut_ptr() as *mut libc::c_void,
                        1,
                        libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    )
                };
                n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
            }
        }
    }
}

/// A pipe read up to markers, keeping what follows a marker for the next response.
struct Stream<R> {
    reader: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Stream<R> {
    fn new(reader: R) -> Self {
        Stream {
            reader,
            buf: Vec::new(),
        }
    }

    /// Reads until `\n<token> <status>\n`; returns what came before it, and the status.
    async fn until(&mut self, marker: &[u8]) -> Result<(Vec<u8>, i32), SessionError> {
        let mut scanned = 0;
        loop {
            if let Some(found) = self.buf[scanned..]
                .windows(marker.len())
                .position(|w| w == marker)
            {
                let at = scanned + found;
                let after = at + marker.len();
                if let Some(nl) = self.buf[after..].iter().position(|b| *b == b'\n') {
                    let status = std::str::from_utf8(&self.buf[after..after + nl])
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(-1);
                    let body = self.buf[..at].to_vec();
                    self.buf.drain(..after + nl + 1);
                    return Ok((body, status));
                }
            }
            scanned = self.buf.len().saturating_sub(marker.len() + 16);
            let mut chunk = [0u8; 8192];
            let n = self
                .reader
                .read(&mut chunk)
                .await
                .map_err(SessionError::Io)?;
            if n == 0 {
                return Err(SessionError::Ended {
                    stderr: String::new(),
                });
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Whatever arrived and was not part of a response (ssh's messages when a session dies).
    fn rest(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session whose "ssh" is a local `sh` running the driver: the protocol without a network.
    fn local_session() -> Session {
        let token = new_token().unwrap();
        Session::spawn(local_command(), token).unwrap()
    }

    #[tokio::test]
    async fn runs_scripts_one_after_another_with_status_and_both_streams() {
        let mut s = local_session();
        let t = Duration::from_secs(10);
        let o = s.run("echo hello; echo oops >&2; exit 3", t).await.unwrap();
        assert_eq!(
            (o.status, o.stdout.as_str(), o.stderr.as_str()),
            (3, "hello\n", "oops\n")
        );
        // No trailing newline, backslashes, quotes and a multi-line quoted string stay data.
        let o = s
            .run(
                "printf 'a\\\\b'; x='line1\nline2'; printf '%s' \"$x\" >&2",
                t,
            )
            .await
            .unwrap();
        assert_eq!((o.status, o.stdout.as_str()), (0, "a\\b"));
        assert_eq!(o.stderr, "line1\nline2");
        // A script that reads stdin gets /dev/null, not the next request.
        let o = s.run("cat; echo done", t).await.unwrap();
        assert_eq!(o.stdout, "done\n");
        // Large output in both streams does not deadlock.
        let o = s
            .run("i=0; while [ $i -lt 20000 ]; do echo \"out $i\"; echo \"err $i\" >&2; i=$((i+1)); done", t)
            .await
            .unwrap();
        assert_eq!(o.stdout.lines().count(), 20000);
        assert_eq!(o.stderr.lines().count(), 20000);
        assert!(s.alive());
    }

    #[tokio::test]
    async fn a_script_cannot_fake_the_end_of_its_output() {
        let mut s = local_session();
        let t = Duration::from_secs(10);
        let o = s
            .run("printf '\\nnot-the-token 0\\n'; echo after", t)
            .await
            .unwrap();
        assert_eq!(o.stdout, "\nnot-the-token 0\nafter\n");
        let o = s.run("exit 7", t).await.unwrap();
        assert_eq!(o.status, 7);
        // The script sees neither the token nor the driver's arguments, and what it changes
        // stays in its subshell.
        let o = s
            .run(
                "echo \"[$_co_t$_co_s$_co_r][$1][$#]\"; cd /; set -e; f() { :; }; false",
                t,
            )
            .await
            .unwrap();
        assert_eq!((o.status, o.stdout.as_str()), (1, "[][][0]\n"));
        let o = s
            .run("pwd; type f >/dev/null 2>&1 || echo no-f", t)
            .await
            .unwrap();
        assert_ne!(o.stdout.lines().next(), Some("/"));
        assert!(o.stdout.ends_with("no-f\n"), "{}", o.stdout);
        // A script that is not valid shell (an unbalanced quote, a quote that would end the
        // frame's literal) fails on its own; the driver stays in step.
        let o = s.run("echo 'unbalanced", t).await.unwrap();
        assert_ne!(o.status, 0);
        let o = s.run("echo '\\'; echo \"x'y\"", t).await.unwrap();
        assert_eq!((o.status, o.stdout.as_str()), (0, "\\\nx'y\n"));
        assert_eq!(s.run("echo still", t).await.unwrap().stdout, "still\n");
    }

    /// Whether process `pid` has ended (gone, or a zombie waiting to be reaped).
    fn ended(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
        }
    }

    async fn wait_ended(pid: u32) -> bool {
        for _ in 0..200 {
            if ended(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// The pid of the session's shell (`$$` in a subshell is the shell's).
    async fn shell_pid(s: &mut Session) -> u32 {
        let out = s.run("echo $$", Duration::from_secs(5)).await.unwrap();
        out.stdout.trim().parse().unwrap()
    }

    #[tokio::test]
    async fn a_dropped_session_ends_idle_by_itself_and_busy_by_kill() {
        let mut s = local_session();
        let pid = shell_pid(&mut s).await;
        drop(s);
        assert!(
            wait_ended(pid).await,
            "an idle session's shell must exit on EOF"
        );

        let mut s = local_session();
        let pid = shell_pid(&mut s).await;
        let e = s
            .run("sleep 5", Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(e, SessionError::Timeout), "{e:?}");
        assert!(!ended(pid));
        drop(s);
        assert!(
            wait_ended(pid).await,
            "a busy session must be killed when dropped"
        );
    }

    #[tokio::test]
    async fn a_dead_session_or_a_slow_script_is_reported() {
        let mut s = local_session();
        let e = s
            .run("sleep 5", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, SessionError::Timeout), "{e:?}");
        let mut s = local_session();
        // `exit` in the script ends only the script's own shell, not the driver.
        assert_eq!(
            s.run("exit 0", Duration::from_secs(5))
                .await
                .unwrap()
                .status,
            0
        );
        // The script runs in a subshell of the driver, where `$$` is the driver.
        let e = s
            .run("kill -KILL $$", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, SessionError::Ended { .. }), "{e:?}");
    }
}
