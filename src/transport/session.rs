//! A long-lived remote shell that runs one script after another, so a step costs a round trip
//! on an open channel (about a millisecond) instead of a new `ssh` process, a new channel and a
//! new login shell (about 20 ms, more where the login shell reads a heavy rc file).
//!
//! The remote side is a small POSIX `sh` loop (the driver). Requests are framed by line count:
//! the client writes `N`, then the script as N lines; the driver reads them with `read -r`
//! (byte by byte, so it never reads past the script), runs the script in a subshell with stdin
//! from /dev/null, then writes a marker line `\n<token> <status>` on both stdout and stderr. The
//! token is 128 random bits chosen per session, so a script's output cannot fake the end of a
//! response. A script is still only data to the driver: it is a variable handed to `eval` in a
//! subshell, never spliced into the driver's own text.
//!
//! A session that fails, times out or is abandoned mid-script is killed, never reused: its
//! stream may be out of step.

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

use super::{Output, sh_quote};

/// The remote loop. `$1` is the session's token. Each script runs in a subshell of the driver
/// (`eval` of the received text), not in a new `sh`: a fork instead of a fork and an exec, about
/// half a millisecond of a remote core saved per step. The subshell keeps the script's `cd`,
/// `set`, functions and `exit` to itself, and sees no positional parameters and none of the
/// driver's variables (so not the token, which only marks the end of a response).
const DRIVER: &str = r#"_co_t=$1
while IFS= read -r _co_n; do
  _co_s=
  while [ "$_co_n" -gt 0 ] 2>/dev/null; do
    IFS= read -r _co_l || exit 0
    _co_s="$_co_s$_co_l
"
    _co_n=$((_co_n - 1))
  done
  (unset _co_t _co_n _co_l; set --; eval "$_co_s") </dev/null
  _co_r=$?
  printf '\n%s %s\n' "$_co_t" "$_co_r"
  printf '\n%s %s\n' "$_co_t" "$_co_r" >&2
done
"#;

/// The remote command that starts a session with `token`.
pub fn remote_command(token: &str) -> String {
    format!("exec sh -c {} cutover-session {token}", sh_quote(DRIVER))
}

/// A session on this machine: `sh` running the driver directly.
pub fn local_command(token: &str) -> tokio::process::Command {
    let mut c = Command::new("/bin/sh");
    c.args(["-c", DRIVER, "cutover-session", token]);
    c
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

    fn put(&self, host: &str, session: Session) {
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

/// One running session: the child (`ssh`, or `sh` for the local transport) and its pipes.
pub struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: Stream<ChildStdout>,
    stderr: Stream<ChildStderr>,
    token: String,
}

impl Session {
    /// Starts `command` (an `ssh ... host <remote_command(token)>`, or a local `sh -c
    /// <remote_command(token)>`) with piped stdio.
    pub fn spawn(mut command: Command, token: String) -> anyhow::Result<Session> {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().context("cannot start a shell session")?;
        let stdin = child.stdin.take().context("session stdin")?;
        let stdout = child.stdout.take().context("session stdout")?;
        let stderr = child.stderr.take().context("session stderr")?;
        Ok(Session {
            child,
            stdin,
            stdout: Stream::new(stdout),
            stderr: Stream::new(stderr),
            token,
        })
    }

    /// Runs one script; the session may be reused only after `Ok`.
    pub async fn run(&mut self, script: &str, timeout: Duration) -> Result<Output, SessionError> {
        let mut body = script.to_string();
        if !body.ends_with('\n') {
            body.push('\n');
        }
        let lines = body.bytes().filter(|b| *b == b'\n').count();
        let request = format!("{lines}\n{body}");
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
            Ok(r) => r,
            Err(_) => Err(SessionError::Timeout),
        }
    }

    /// Whether the session's process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
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
        Session::spawn(local_command(&token), token).unwrap()
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
                "echo \"[$_co_t][$1][$#]\"; cd /; set -e; f() { :; }; false",
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
