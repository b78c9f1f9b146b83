//! Replacing a running proxy without refusing or dropping a request (`cutover proxy
//! --takeover`).
//!
//! Why a socket hand-over and not two processes binding with `SO_REUSEPORT`: when a process
//! closes one of several reuse-port listeners, the connections already queued on it (accepted
//! by the kernel, not yet by the process) are reset. Handing over the listening sockets
//! themselves keeps one kernel queue throughout, so no connection is ever lost.
//!
//! The exchange, over the Unix socket `state_dir/proxy.sock` that every proxy listens on:
//! 1. the new proxy restores the routing state, checks its backends once, connects and sends
//!    `takeover`;
//! 2. the old proxy freezes its routing table (waits for the admin changes under way, refuses
//!    later ones with 503, persists the table), then answers with one byte carrying both
//!    listening sockets (traffic and admin) as `SCM_RIGHTS`; it keeps accepting meanwhile;
//! 3. the new proxy restores the routing state again (the frozen table), accepts traffic on
//!    the sockets and sends `ready`; both proxies now route by the same table. Until the old
//!    proxy's drain ends, the new one counts every backend the old one can still route to as
//!    busy (its client connections may still bring requests), so a retire waits for it;
//! 4. the old proxy stops accepting (both listeners), finishes its admin calls (their
//!    changes are persisted), sends `released` and its counters so far (`counts <json>`), then
//!    drains its client connections as at any shutdown (`drain_timeout`, long-lived
//!    connections closed and counted at the deadline), sends what it counted while draining
//!    (`drained <json>`) and exits;
//! 5. the new proxy adds the counters to its own and keeps the old one's counting start, so
//!    `/stats` counts on across the replacement and a deploy that spans it gets whole numbers;
//!    re-reads the routing state (changes made through the old admin API in the meantime),
//!    starts serving the admin API (calls queued in between are answered now) and binds a
//!    fresh control socket for the next replacement. It adds the drain's counts when they
//!    come; if they never come (the old proxy died draining), it keeps the counting start (the
//!    counts it got are still right) and counts one more lost drain in `/stats`, so a deploy's
//!    report says the requests that proxy was finishing are missing instead of quietly
//!    leaving them out.
//!
//! If the new proxy dies before `ready`, the old one unfreezes and keeps running as if nothing
//! happened. An
//! old proxy of a release before the counters' hand-over sends only `released`: the new one
//! then counts from zero, as after a restart.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::balancer::api::Counters;

/// Time the other side has for each step of the exchange.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest Unix socket path (`sun_path` holds 108 bytes with the terminating zero).
const MAX_PATH: usize = 107;
/// Longest line of the exchange: the counters of a few thousand backends.
const MAX_LINE: usize = 16 << 20;
/// How long the new proxy waits for the drain's counts beyond the drain timeout.
const DRAINED_GRACE: Duration = Duration::from_secs(30);

/// What a proxy counted, handed to its successor at a takeover so that `/stats` counts on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Carried {
    /// When the replaced proxy (or the one it replaced) began counting.
    pub(crate) started_ms: u64,
    pub(crate) backends: BTreeMap<String, Counters>,
    pub(crate) releases: BTreeMap<String, Counters>,
    /// What the releases it had let go of counted (see [`super::router::IDLE_RELEASES`]):
    /// without them the successor's totals would go back. (None from an older proxy: it let go
    /// of none.)
    #[serde(default)]
    pub(crate) retired: Counters,
    pub(crate) unrouted: u64,
    pub(crate) ejections: u64,
    pub(crate) closed_at_deadline: u64,
    /// Takeovers whose replaced proxy died before it reported its drain (see
    /// [`crate::balancer::api::Stats::lost_drains`]).
    #[serde(default)]
    pub(crate) lost_drains: u64,
    /// Backends with requests or long-lived connections in flight when the counts were taken:
    /// the successor's drain of such a backend also waits for the replaced proxy's drain.
    #[serde(default)]
    pub(crate) busy: std::collections::BTreeSet<String>,
}

impl Carried {
    /// What was counted since `earlier` (the same proxy's counters, sent at `released`).
    pub(crate) fn since(&self, earlier: &Carried) -> Carried {
        let diff = |now: &BTreeMap<String, Counters>, then: &BTreeMap<String, Counters>| {
            now.iter()
                .map(|(k, c)| {
                    let d = match then.get(k) {
                        Some(t) => c.since(t),
                        None => c.clone(),
                    };
                    (k.clone(), d)
                })
                .collect()
        };
        Carried {
            started_ms: self.started_ms,
            backends: diff(&self.backends, &earlier.backends),
            releases: diff(&self.releases, &earlier.releases),
            retired: self.retired.since(&earlier.retired),
            unrouted: self.unrouted.saturating_sub(earlier.unrouted),
            ejections: self.ejections.saturating_sub(earlier.ejections),
            closed_at_deadline: self
                .closed_at_deadline
                .saturating_sub(earlier.closed_at_deadline),
            lost_drains: self.lost_drains.saturating_sub(earlier.lost_drains),
            busy: self.busy.clone(),
        }
    }
}

/// Where the old proxy keeps the exchange until its admin API is released.
pub(crate) type ReleaseSlot = Arc<Mutex<Option<OldSession>>>;

/// Duplicates of the listening sockets, to hand over.
pub(crate) struct Listeners {
    traffic: OwnedFd,
    admin: OwnedFd,
}

impl Listeners {
    pub(crate) fn dup(traffic: &TcpListener, admin: &TcpListener) -> io::Result<Listeners> {
        Ok(Listeners {
            traffic: traffic.as_fd().try_clone_to_owned()?,
            admin: admin.as_fd().try_clone_to_owned()?,
        })
    }
}

fn check_len(path: &Path) -> anyhow::Result<()> {
    if path.as_os_str().len() > MAX_PATH {
        anyhow::bail!(
            "the proxy control socket path {} is longer than {MAX_PATH} bytes: use a shorter state_dir",
            path.display()
        );
    }
    Ok(())
}

/// Before binding normally: refuses when a proxy already answers on `path` (it should be
/// replaced with `--takeover`), removes a stale socket file otherwise.
pub(crate) fn ensure_free(path: &Path) -> anyhow::Result<()> {
    check_len(path)?;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "a cutover proxy is already running with this state directory (control socket {}): stop it, or replace it without dropping requests with `cutover proxy --takeover`",
            path.display()
        );
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("cannot remove the stale socket {}", path.display()))
        }
    }
}

/// Binds the control socket (replacing a file left at `path`).
pub(crate) fn bind(path: &Path) -> anyhow::Result<(UnixListener, PathBuf)> {
    check_len(path)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on the control socket {}", path.display()))?;
    Ok((l, path.to_path_buf()))
}

/// The old proxy's side: answers takeover requests until stop. After a hand-over it signals
/// stop itself and leaves the exchange in `released` for the admin task to finish.
pub(crate) async fn serve(
    control: (UnixListener, PathBuf),
    listeners: Listeners,
    proxy: Arc<super::Proxy>,
    stop: Arc<watch::Sender<bool>>,
    mut stop_rx: watch::Receiver<bool>,
    released: ReleaseSlot,
) {
    let (listener, path) = control;
    loop {
        let stream = tokio::select! {
            _ = async { stop_rx.wait_for(|s| *s).await.map(|_| ()) } => {
                // Stopped without a successor: the socket file is ours to remove.
                drop(listener);
                let _ = std::fs::remove_file(&path);
                return;
            }
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match hand_over(stream, &listeners, &proxy).await {
            Ok(None) => info!(
                "another cutover proxy started with this state directory and was told this one runs"
            ),
            Ok(Some(session)) => {
                *released.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
                info!("a new proxy took the listeners over: draining and stopping");
                let _ = stop.send(true);
                return;
            }
            Err(e) => warn!("a takeover attempt failed, still serving: {e:#}"),
        }
    }
}

/// Hands the listeners over to the proxy on `stream`; `None` when it closed without asking
/// (a plain `cutover proxy` checking whether one runs: see [`ensure_free`]).
async fn hand_over(
    mut stream: UnixStream,
    listeners: &Listeners,
    proxy: &super::Proxy,
) -> anyhow::Result<Option<OldSession>> {
    let hello = match read_line(&mut stream).await {
        Ok(hello) => hello,
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::UnexpectedEof) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if hello != "takeover" {
        anyhow::bail!("unexpected request {hello:?}");
    }
    proxy
        .freeze()
        .await
        .context("saving the routing state for the new proxy")?;
    let handed = async {
        send_fds(
            &stream,
            &[listeners.traffic.as_raw_fd(), listeners.admin.as_raw_fd()],
        )
        .await
        .context("sending the listening sockets")?;
        let ready = read_line(&mut stream).await?;
        if ready != "ready" {
            anyhow::bail!("the new proxy did not confirm ({ready:?})");
        }
        Ok(())
    }
    .await;
    if let Err(e) = handed {
        proxy.unfreeze().await;
        return Err(e);
    }
    Ok(Some(OldSession { stream, sent: None }))
}

/// The old proxy's end of a finished hand-over.
pub(crate) struct OldSession {
    stream: UnixStream,
    /// The counters sent with `released`.
    sent: Option<Carried>,
}

impl OldSession {
    /// Tells the new proxy that the admin API is released and the routing state final, and
    /// hands it the counters so far.
    pub(crate) async fn released(&mut self, counts: Carried) {
        let msg = format!("released\ncounts {}\n", json_line(&counts));
        if tokio::time::timeout(STEP_TIMEOUT, self.stream.write_all(msg.as_bytes()))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            self.sent = Some(counts);
        }
    }

    /// After the drain: hands over what was counted since [`OldSession::released`].
    pub(crate) async fn drained(mut self, counts: Carried) {
        let Some(sent) = self.sent.take() else {
            return;
        };
        let msg = format!("drained {}\n", json_line(&counts.since(&sent)));
        let _ = tokio::time::timeout(STEP_TIMEOUT, self.stream.write_all(msg.as_bytes())).await;
    }
}

fn json_line(c: &Carried) -> String {
    // JSON without pretty-printing has no raw newline: strings escape theirs.
    serde_json::to_string(c).unwrap_or_else(|_| "{}".into())
}

/// What the new proxy gets from the old one.
pub(crate) struct Received {
    pub(crate) traffic: TcpListener,
    pub(crate) admin: TcpListener,
    pub(crate) session: NewSession,
}

/// The new proxy's side, step 1 and 2: asks for the listeners.
pub(crate) async fn request(path: &Path) -> anyhow::Result<Received> {
    check_len(path)?;
    let mut stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "no running cutover proxy answered on {}: start without --takeover",
            path.display()
        )
    })?;
    stream.write_all(b"takeover\n").await?;
    let fds = tokio::time::timeout(STEP_TIMEOUT, recv_fds(&stream))
        .await
        .map_err(|_| anyhow::anyhow!("the running proxy did not hand over its listeners"))?
        .context("receiving the listening sockets")?;
    let [traffic, admin]: [OwnedFd; 2] = fds.try_into().map_err(|v: Vec<OwnedFd>| {
        anyhow::anyhow!(
            "expected 2 listening sockets from the running proxy, got {}",
            v.len()
        )
    })?;
    let tcp = |fd: OwnedFd| -> io::Result<TcpListener> {
        let l = std::net::TcpListener::from(fd);
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    };
    Ok(Received {
        traffic: tcp(traffic)?,
        admin: tcp(admin)?,
        session: NewSession { stream },
    })
}

/// The new proxy's end of the exchange.
pub(crate) struct NewSession {
    stream: UnixStream,
}

/// The old proxy's counters, as [`NewSession::finish`] got them.
pub(crate) struct Handed {
    pub(crate) counts: Carried,
    /// Where the counts of the old proxy's drain arrive.
    pub(crate) drained: DrainedCounts,
}

impl NewSession {
    /// Step 3 and 5: confirms (the new proxy is accepting) and waits until the old proxy has
    /// released its admin API; returns its counters when it sent them.
    pub(crate) async fn finish(mut self) -> Option<Handed> {
        let wait = async {
            self.stream.write_all(b"ready\n").await?;
            read_line(&mut self.stream).await
        };
        match tokio::time::timeout(STEP_TIMEOUT, wait).await {
            Ok(Ok(l)) if l == "released" => info!("took over the listeners of the running proxy"),
            Ok(Ok(l)) => {
                warn!("unexpected answer from the old proxy: {l:?}");
                return None;
            }
            Ok(Err(e)) => {
                warn!("the old proxy went away during the takeover: {e:#}");
                return None;
            }
            Err(_) => {
                warn!("the old proxy did not release its admin API in time");
                return None;
            }
        }
        let mut rest = BufReader::new(self.stream);
        let counts = match read_message(&mut rest, "counts").await {
            Ok(c) => c,
            Err(e) => {
                info!("the old proxy handed over no counters ({e:#}): counting from zero");
                return None;
            }
        };
        Some(Handed {
            counts,
            drained: DrainedCounts { stream: rest },
        })
    }
}

/// The rest of the exchange: the old proxy's counts while it drained.
pub(crate) struct DrainedCounts {
    stream: BufReader<UnixStream>,
}

impl DrainedCounts {
    /// Waits for them, at most `drain_timeout` plus a grace; `None` when they do not come.
    pub(crate) async fn wait(mut self, drain_timeout: Duration) -> Option<Carried> {
        let read = read_message_untimed(&mut self.stream, "drained");
        match tokio::time::timeout(drain_timeout + DRAINED_GRACE, read).await {
            Ok(Ok(c)) => Some(c),
            Ok(Err(e)) => {
                warn!("the replaced proxy sent no counts of its drain: {e:#}");
                None
            }
            Err(_) => {
                warn!("the replaced proxy did not finish draining in time");
                None
            }
        }
    }
}

/// Reads `<kind> <json>`, one line, within [`STEP_TIMEOUT`].
async fn read_message(stream: &mut BufReader<UnixStream>, kind: &str) -> anyhow::Result<Carried> {
    tokio::time::timeout(STEP_TIMEOUT, read_message_untimed(stream, kind))
        .await
        .map_err(|_| anyhow::anyhow!("no {kind} within {STEP_TIMEOUT:?}"))?
}

async fn read_message_untimed(
    stream: &mut BufReader<UnixStream>,
    kind: &str,
) -> anyhow::Result<Carried> {
    let mut line = Vec::new();
    (&mut *stream)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if line.pop() != Some(b'\n') {
        anyhow::bail!("{kind}: the line ended early or is too long");
    }
    let line = String::from_utf8_lossy(&line);
    let json = line
        .strip_prefix(kind)
        .and_then(|rest| rest.strip_prefix(' '))
        .ok_or_else(|| anyhow::anyhow!("expected {kind}, got {:?}", truncate(&line)))?;
    serde_json::from_str(json).with_context(|| format!("{kind}: not valid counters"))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

async fn read_line(stream: &mut UnixStream) -> anyhow::Result<String> {
    let read = async {
        let mut line = Vec::new();
        loop {
            let b = match stream.read_u8().await {
                // Closed before a whole line: only a peer that sent nothing is a probe
                // (`UnexpectedEof`, see `hand_over`); one that stopped mid-line failed.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !line.is_empty() => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the peer closed the connection in the middle of a line",
                    ));
                }
                r => r?,
            };
            if b == b'\n' {
                return Ok::<_, io::Error>(String::from_utf8_lossy(&line).into_owned());
            }
            line.push(b);
            if line.len() > 64 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
        }
    };
    Ok(tokio::time::timeout(STEP_TIMEOUT, read)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {STEP_TIMEOUT:?}"))??)
}

async fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    loop {
        stream.writable().await?;
        match stream.try_io(Interest::WRITABLE, || sendmsg_fds(stream.as_raw_fd(), fds)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn recv_fds(stream: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    loop {
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || recvmsg_fds(stream.as_raw_fd())) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Most descriptors one message carries.
const MAX_FDS: usize = 4;

/// Control message buffer, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Sends one byte with `fds` attached.
fn sendmsg_fds(sock: RawFd, fds: &[RawFd]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS);
    let byte = [b'F'];
    let mut iov = libc::iovec {
        iov_base: byte.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let mut buf = CmsgBuf([0; 64]);
    let data_len = std::mem::size_of_val(fds);
    // SAFETY: plain C calls on a zeroed msghdr whose pointers (iov, buf) outlive the call; the
    // control buffer is aligned and large enough for CMSG_SPACE(4 fds), checked below.
    unsafe {
        let space = libc::CMSG_SPACE(data_len as u32) as usize;
        assert!(space <= buf.0.len());
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = buf.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), data_len);
        let n = libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives one byte and the descriptors attached to it (close-on-exec).
fn recvmsg_fds(sock: RawFd) -> io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut buf = CmsgBuf([0; 64]);
    let mut fds = Vec::new();
    // SAFETY: as in `sendmsg_fds`; the kernel wrote `msg_controllen` bytes of control data,
    // which the CMSG macros walk within, and each descriptor received is owned by us alone.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = buf.0.as_mut_ptr().cast();
        msg.msg_controllen = buf.0.len() as _;
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the running proxy closed the control connection",
            ));
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = len / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if byte[0] != b'F' {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected control message",
        ));
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain `cutover proxy` checking whether one runs closes without a byte: harmless. A
    /// takeover that dies mid-line is a failed takeover, and must still read as one.
    #[tokio::test]
    async fn a_peer_that_sent_nothing_differs_from_one_cut_mid_line() {
        let (mut a, b) = UnixStream::pair().unwrap();
        drop(b);
        let e = read_line(&mut a).await.unwrap_err();
        let kind = e.downcast_ref::<io::Error>().map(io::Error::kind);
        assert_eq!(kind, Some(io::ErrorKind::UnexpectedEof), "{e:#}");
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"take").await.unwrap();
        drop(b);
        let e = read_line(&mut a).await.unwrap_err();
        let kind = e.downcast_ref::<io::Error>().map(io::Error::kind);
        assert_eq!(kind, Some(io::ErrorKind::InvalidData), "{e:#}");
    }

    #[tokio::test]
    async fn listening_sockets_pass_through_a_unix_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        send_fds(&a, &[l.as_raw_fd(), l.as_raw_fd()]).await.unwrap();
        let fds = recv_fds(&b).await.unwrap();
        assert_eq!(fds.len(), 2);
        let got = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(got.local_addr().unwrap(), addr);
    }

    fn counts(release: &str, ok: u64) -> Carried {
        let c = Counters {
            requests: ok + 1,
            status_2xx: ok,
            abandoned: 1,
            latency_buckets: vec![ok, 0],
            ..Counters::default()
        };
        Carried {
            started_ms: 7,
            backends: [("b1".to_string(), c.clone())].into(),
            releases: [(release.to_string(), c.clone())].into(),
            retired: c,
            unrouted: 1,
            ..Carried::default()
        }
    }

    #[tokio::test]
    async fn counts_follow_the_release_and_the_drain() {
        let (old, new) = UnixStream::pair().unwrap();
        let mut old = OldSession {
            stream: old,
            sent: None,
        };
        let new = NewSession { stream: new };
        let finish = tokio::spawn(new.finish());
        // The new side writes `ready` first; read it as the old side would.
        assert_eq!(read_line(&mut old.stream).await.unwrap(), "ready");
        old.released(counts("v1", 10)).await;
        let handed = finish.await.unwrap().expect("counts handed over");
        assert_eq!(handed.counts, counts("v1", 10));
        // While draining: 5 more of v1 and a release the first message did not have.
        let mut last = counts("v1", 15);
        last.releases.get_mut("v1").unwrap().abandoned = 3;
        last.releases
            .insert("v2".into(), counts("v2", 2).releases["v2"].clone());
        old.drained(last).await;
        let delta = handed.drained.wait(Duration::from_secs(1)).await.unwrap();
        assert_eq!(delta.releases["v1"].status_2xx, 5);
        assert_eq!(delta.releases["v1"].latency_buckets, vec![5, 0]);
        // Requests given up on are failures to carry over like any other.
        assert_eq!(delta.releases["v1"].abandoned, 2);
        assert_eq!(delta.releases["v2"].abandoned, 1);
        assert_eq!(delta.releases["v2"].status_2xx, 2);
        assert_eq!(delta.backends["b1"].requests, 5);
        assert_eq!(delta.unrouted, 0);
        // What the releases the proxy let go of counted is carried too (its totals would go
        // back without it), at the release and after the drain alike.
        assert_eq!(handed.counts.retired.status_2xx, 10);
        assert_eq!(delta.retired.status_2xx, 5);
    }

    /// A proxy of a release that let go of no release sends no `retired`: none, not an error.
    #[test]
    fn counts_without_retired_parse() {
        let mut json = serde_json::to_value(counts("v1", 1)).unwrap();
        json.as_object_mut().unwrap().remove("retired");
        let c: Carried = serde_json::from_value(json).unwrap();
        assert_eq!(c.retired, Counters::default());
    }

    #[tokio::test]
    async fn an_old_proxy_without_counts_means_counting_from_zero() {
        let (mut old, new) = UnixStream::pair().unwrap();
        let finish = tokio::spawn(NewSession { stream: new }.finish());
        assert_eq!(read_line(&mut old).await.unwrap(), "ready");
        old.write_all(b"released\n").await.unwrap();
        drop(old);
        assert!(finish.await.unwrap().is_none());
    }

    #[test]
    fn long_paths_are_refused_with_advice() {
        let p = PathBuf::from(format!("/tmp/{}/proxy.sock", "x".repeat(120)));
        let e = format!("{:#}", ensure_free(&p).unwrap_err());
        assert!(e.contains("shorter state_dir"), "{e}");
    }
}
