//! The deploy lock on the fleet: a file `<root>/.cutover-lock` on the first host (in config
//! order) that answers, beside the journal's lock.
//!
//! Why on a host: the journal's lock lives in the state directory of the machine running
//! cutover, so two operators deploying the same app from two laptops (or a laptop and CI)
//! both got it and changed the fleet at once. The hosts are what both share (Kamal keeps its
//! lock on the servers for the same reason). The journal's lock is taken first, so deploys of
//! one machine queue there; then this one.
//!
//! The file is created with POSIX sh's noclobber (`set -C`): the shell opens it with
//! `O_CREAT|O_EXCL`, so of two contenders exactly one creates it. It holds the holder (user,
//! machine, pid, command, start: [`LockHolder`] as one JSON line, quoted with [`sh_quote`], so
//! whatever a user name holds stays data) and when its lease ends, in the holder's clock. The
//! holder rewrites the lease with the journal's (`lock_lease`, every third of it).
//!
//! A lock whose holder is gone (its process, on this machine) or whose lease ended (a holder
//! on another machine) is stale and taken over. Takeover, renewal and release change a lock
//! file that exists, so they run under a second file, `.cutover-lock.closing`, also created
//! with noclobber and removed at the end of the same script: a takeover replaces the lock only
//! if it still reads exactly as when it was judged stale (a holder that renewed meanwhile
//! keeps it), and two contenders for a stale lock take turns. Rewrites go through a new file
//! renamed over the old one, so a reader never sees half a lock.
//!
//! Cost: taking it is folded into the deploy's first read of the fleet (the read of the first
//! host carries it, see [`FleetLock::folded_script`]), so a deploy spends no round trip on it
//! unless the lock is contended or the first host does not answer; releasing it is one round
//! trip, run while the journal is pruned and the report written.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Config, Host};
use crate::journal::{Journal, LockHolder, now_ms};
use crate::transport::{TimedOut, Transport, sh_quote};

/// The lock file's name in a host's root.
pub const LOCK_FILE: &str = ".cutover-lock";
/// The file that guards a takeover, renewal or release (see the module's text).
pub const CLOSING_FILE: &str = ".cutover-lock.closing";
/// The first line of a lock file.
const MAGIC: &str = "cutover fleet lock 1";
/// The line that ends what the lock part of a script printed (before a fleet read's own).
pub const END: &str = "--lock-end";

/// What a lock file holds.
#[derive(Debug, Clone)]
pub struct Record {
    pub holder: LockHolder,
    /// When its lease ends (unix ms, the holder's clock); 0 when the file cannot be read.
    pub lease_until_ms: u64,
    /// The file as read, for a takeover's compare-and-swap.
    text: String,
}

impl Record {
    fn parse(text: &str) -> Record {
        let mut holder = None;
        let mut lease = 0;
        for line in text.lines() {
            if let Some(json) = line.strip_prefix("holder ") {
                holder = serde_json::from_str::<LockHolder>(json).ok();
            } else if let Some(ms) = line.strip_prefix("lease_until_ms ") {
                lease = ms.trim().parse().unwrap_or(0);
            }
        }
        let readable = text.lines().next() == Some(MAGIC) && holder.is_some();
        Record {
            // A file cut short (its writer died between creating and writing it, which is
            // one write call) or written by something else: stale once read as such twice.
            holder: holder.filter(|_| readable).unwrap_or_else(|| LockHolder {
                user: "unknown".into(),
                machine: "unknown".into(),
                pid: 0,
                started_ms: 0,
                what: format!("an unreadable lock file ({} bytes)", text.len()),
            }),
            lease_until_ms: if readable { lease } else { 0 },
            text: text.to_string(),
        }
    }

    /// Why the lock may be taken over from `me`'s side, if it may: its process is gone (a
    /// holder of this machine), or its lease ended (a holder elsewhere, whose process cannot be
    /// seen from here). A live holder on this machine keeps it whatever its lease, as the
    /// journal's lock does: a deployer stopped with Ctrl-Z still holds it.
    pub fn stale(&self, me: &LockHolder) -> Option<&'static str> {
        if self.holder.is_gone() {
            Some("its process is gone")
        } else if self.holder.machine != me.machine && self.lease_until_ms < now_ms() {
            Some("its lease expired")
        } else {
            None
        }
    }

    /// The file's `holder ...` line as written (what a command sent to this holder names).
    pub fn holder_line(&self) -> Option<&str> {
        self.text.lines().find(|l| l.starts_with("holder "))
    }

    #[cfg(test)]
    pub(crate) fn parse_for_test(text: &str) -> Record {
        Record::parse(text)
    }

    /// The holder and its lease, for messages.
    pub fn describe(&self) -> String {
        let now = now_ms();
        let lease = if self.lease_until_ms >= now {
            format!(
                "lease renewed until {} s from now",
                (self.lease_until_ms - now).div_ceil(1000)
            )
        } else {
            format!("lease expired {} s ago", (now - self.lease_until_ms) / 1000)
        };
        format!("{} ({lease})", self.holder.describe())
    }
}

/// Another deployment holds the fleet lock: the deploy stops before it changes anything.
#[derive(Debug, thiserror::Error)]
#[error(
    "another deployment holds the fleet lock on host {host} ({path}): {}: {hint}",
    record.describe()
)]
pub struct FleetLockHeld {
    pub host: String,
    pub path: String,
    pub record: Record,
    hint: &'static str,
}

/// No host answered to hold the lock, with why each did not.
#[derive(Debug, thiserror::Error)]
#[error("cannot take the fleet lock: no host answered ({})", .0.join("; "))]
pub struct NoHostAnswered(pub Vec<String>);

/// The lock file content of `holder` with a lease until `until_ms`.
fn content(holder: &LockHolder, until_ms: u64) -> String {
    format!(
        "{MAGIC}\n{}\nlease_until_ms {until_ms}",
        holder_line(holder)
    )
}

/// The `holder ...` line of `holder`'s lock file.
pub(crate) fn holder_line(holder: &LockHolder) -> String {
    format!(
        "holder {}",
        serde_json::to_string(holder).unwrap_or_default()
    )
}

pub(crate) fn lock_path(host: &Host) -> String {
    host.root.join(LOCK_FILE).to_string_lossy().into_owned()
}

fn closing_path(host: &Host) -> String {
    host.root.join(CLOSING_FILE).to_string_lossy().into_owned()
}

/// Prints the file `$1` line by line, each after `$2` (builtins only: no `cat`).
const PRINT_FN: &str = "_cl_print() { [ -f \"$1\" ] || return 0; while IFS= read -r _cl_x || [ -n \"$_cl_x\" ]; do printf '%s%s\\n' \"$2\" \"$_cl_x\"; done < \"$1\"; }\n";

/// The script that creates the lock with noclobber, or prints what holds it. It does not
/// `exit`: it runs ahead of a fleet read's script in the same round trip.
fn take_script(host: &Host, text: &str) -> String {
    format!(
        "{PRINT_FN}_cl_l={lock}\n\
         [ -d {root} ] || mkdir -p {root}\n\
         set -C\n\
         if printf '%s\\n' {text} 2>/dev/null >\"$_cl_l\"; then set +C; echo 'lock taken'\n\
         elif set +C; [ -e \"$_cl_l\" ]; then echo 'lock held'; [ -e {closing} ] && echo 'lock closing'; _cl_print \"$_cl_l\" 'lock| '\n\
         else set +C; echo 'lock failed'; fi\n\
         echo {END}\n",
        lock = sh_quote(lock_path(host)),
        root = sh_quote(host.root.to_string_lossy()),
        closing = sh_quote(closing_path(host)),
        text = sh_quote(text),
    )
}

/// A script that runs `action` with the lock file read into `$_cl_cur` (its `holder` line in
/// `$_cl_h`) under the closing file, or prints `lock busy` and who holds that. `action` must
/// remove the closing file.
pub(crate) fn closing_script(
    host: &Host,
    me: &LockHolder,
    lease: Duration,
    action: &str,
) -> String {
    let closing = format!(
        "{MAGIC} closing\n{}\nlease_until_ms {}",
        holder_line(me),
        now_ms() + lease.as_millis() as u64
    );
    format!(
        "{PRINT_FN}_cl_l={lock}; _cl_c={closing_file}\n\
         set -C\n\
         if ! printf '%s\\n' {closing} 2>/dev/null >\"$_cl_c\"; then set +C; echo 'lock busy'; _cl_print \"$_cl_c\" 'closing| '; exit 0; fi\n\
         set +C\n\
         _cl_cur=; _cl_h=\n\
         if [ -f \"$_cl_l\" ]; then while IFS= read -r _cl_x || [ -n \"$_cl_x\" ]; do _cl_cur=\"$_cl_cur$_cl_x\n\"; case $_cl_x in 'holder '*) _cl_h=$_cl_x ;; esac; done < \"$_cl_l\"; fi\n\
         {action}",
        lock = sh_quote(lock_path(host)),
        closing_file = sh_quote(closing_path(host)),
        closing = sh_quote(closing),
    )
}

/// Replaces the lock file with `text` through a new file renamed over it.
fn rewrite(text: &str) -> String {
    format!(
        "printf '%s\\n' {} >\"$_cl_l.new\" && mv -f \"$_cl_l.new\" \"$_cl_l\"",
        sh_quote(text)
    )
}

/// The script that prints a host's lock file, if any, ahead of its fleet read (the hosts
/// after the one that takes the lock): a lock there means another machine could not reach
/// the first host and took it on this one. Builtins only.
pub fn peek_script(host: &Host) -> String {
    format!(
        "{PRINT_FN}if [ -e {lock} ]; then echo 'lock held'; _cl_print {lock} 'lock| '; else echo 'lock free'; fi\n\
         echo {END}\n",
        lock = sh_quote(lock_path(host)),
    )
}

/// The lock [`peek_script`] found, if any.
pub fn parse_peek(out: &str, host: &Host) -> Option<Record> {
    match parse_take(out, host) {
        Attempt::Held(r) => Some(r),
        _ => None,
    }
}

/// What one attempt to take the lock on a host found.
#[derive(Debug)]
enum Attempt {
    Taken,
    Held(Record),
    /// Changed under us (released, renewed, taken over meanwhile), or another contender is in
    /// the middle of a takeover: look again.
    Again,
    Failed(String),
}

fn parse_take(out: &str, host: &Host) -> Attempt {
    let mut text = String::new();
    let mut verdict = None;
    for line in out.lines() {
        if let Some(l) = line.strip_prefix("lock| ") {
            text.push_str(l);
            text.push('\n');
        } else if let Some(v) = line.strip_prefix("lock ") {
            verdict.get_or_insert(v.to_string());
        }
    }
    match verdict.as_deref() {
        Some("taken") => Attempt::Taken,
        Some("held") => Attempt::Held(Record::parse(&text)),
        Some("failed") => Attempt::Failed(format!(
            "cannot create {} on host {} (does the host's root exist, writable by this user?)",
            lock_path(host),
            host.name
        )),
        _ => Attempt::Failed(format!(
            "host {}: the fleet lock script printed no verdict: {}",
            host.name,
            crate::transport::last_lines(out.trim(), 3)
        )),
    }
}

/// Where the lock stands in this process.
#[derive(Debug, Clone)]
enum State {
    /// Not taken yet.
    Pending,
    /// Ours, on this host.
    Held(Host),
    /// Released (or never taken, and now never will be).
    Done,
}

/// Says once that a deploy waits for `record`'s holder on `host`.
fn say_waiting(host: &Host, record: &Record) {
    eprintln!(
        "waiting for the fleet lock on host {}: {}",
        host.name,
        record.holder.describe()
    );
}

/// This process's lock on the fleet (one per command that takes the journal's lock).
pub struct FleetLock {
    hosts: Vec<Host>,
    me: LockHolder,
    lease: Duration,
    /// Whether a live holder is waited for (`--lock-wait`), and until when.
    wait: Option<Duration>,
    deadline: Instant,
    journal: Arc<Journal>,
    state: Mutex<State>,
    /// Hosts whose take did not answer in time: the script may have run there, so the release
    /// removes our lock there too (only if it is ours).
    maybe: Mutex<Vec<Host>>,
    /// Whether the wait for a lock held on another host was said (see [`FleetLock::yield_to`]).
    told_elsewhere: std::sync::atomic::AtomicBool,
}

impl FleetLock {
    /// The lock `me` will take on `config`'s fleet (not yet taken: see [`FleetLock::take`]),
    /// waiting for a live holder up to `wait` from now.
    pub fn new(
        config: &Config,
        me: LockHolder,
        wait: Option<Duration>,
        journal: Arc<Journal>,
    ) -> FleetLock {
        FleetLock::with_hosts(config.hosts.clone(), me, config.lock_lease, wait, journal)
    }

    fn with_hosts(
        hosts: Vec<Host>,
        me: LockHolder,
        lease: Duration,
        wait: Option<Duration>,
        journal: Arc<Journal>,
    ) -> FleetLock {
        let now = Instant::now();
        // A wait beyond what an Instant can hold waits as long as it can.
        let deadline = now
            .checked_add(wait.unwrap_or_default())
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        FleetLock {
            hosts,
            me,
            lease,
            wait,
            deadline,
            journal,
            state: Mutex::new(State::Pending),
            maybe: Mutex::new(Vec::new()),
            told_elsewhere: Default::default(),
        }
    }

    fn state(&self) -> State {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, s: State) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// The host that holds it, while we do.
    pub fn held_on(&self) -> Option<Host> {
        match self.state() {
            State::Held(h) => Some(h),
            _ => None,
        }
    }

    /// The `holder ...` line this process writes in its lock file.
    pub fn holder_line(&self) -> String {
        holder_line(&self.me)
    }

    /// Whether we hold it now.
    pub fn is_held(&self) -> bool {
        matches!(self.state(), State::Held(..))
    }

    /// While the lock is not taken yet: the first host's name and the script that takes it
    /// there, to run ahead of that host's fleet read (see [`FleetLock::settle`]).
    pub fn folded_script(&self) -> Option<(String, String)> {
        if !matches!(self.state(), State::Pending) {
            return None;
        }
        let host = self.hosts.first()?;
        let text = content(&self.me, now_ms() + self.lease.as_millis() as u64);
        Some((host.name.to_string(), take_script(host, &text)))
    }

    /// Takes the lock, if it is not ours yet, from the first host that answers.
    pub async fn take(&self, transport: &dyn Transport) -> anyhow::Result<()> {
        if matches!(self.state(), State::Pending) {
            self.acquire(transport, None).await?;
        }
        Ok(())
    }

    /// Finishes the take that [`FleetLock::folded_script`] began: `reply` is what the first
    /// host's read gave (its lock part, or why it could not be read). True when it waited for
    /// another holder: the fleet it read may have changed since, so read it again.
    pub async fn settle(
        &self,
        transport: &dyn Transport,
        reply: anyhow::Result<String>,
    ) -> anyhow::Result<bool> {
        let first = match (reply, self.hosts.first()) {
            (Ok(out), Some(h)) => Ok(parse_take(&out, h)),
            (Err(e), _) => Err(e),
            (Ok(_), None) => anyhow::bail!("no host to hold the fleet lock"),
        };
        self.acquire(transport, Some(first)).await
    }

    async fn attempt(&self, transport: &dyn Transport, host: &Host) -> anyhow::Result<Attempt> {
        let text = content(&self.me, now_ms() + self.lease.as_millis() as u64);
        let out = crate::transport::run_ok(
            transport,
            host,
            "taking the fleet lock",
            &take_script(host, &text),
            transport.step_timeout(),
        )
        .await?;
        Ok(parse_take(&out, host))
    }

    /// Replaces the stale lock `stale` on `host` with ours, if it still reads the same.
    async fn take_over(
        &self,
        transport: &dyn Transport,
        host: &Host,
        stale: &Record,
    ) -> anyhow::Result<Attempt> {
        let text = content(&self.me, now_ms() + self.lease.as_millis() as u64);
        let action = format!(
            "if [ -f \"$_cl_l\" ] && [ \"$_cl_cur\" = {expected} ]; then {write} && echo 'lock taken' || echo 'lock failed'; else echo 'lock changed'; fi\n\
             rm -f \"$_cl_c\"\n",
            expected = sh_quote(&stale.text),
            write = rewrite(&text),
        );
        let script = closing_script(host, &self.me, self.lease, &action);
        let out = crate::transport::run_ok(
            transport,
            host,
            "taking over the fleet lock",
            &script,
            transport.step_timeout(),
        )
        .await?;
        if out.lines().any(|l| l == "lock taken") {
            self.set(State::Held(host.clone()));
            Ok(Attempt::Taken)
        } else if out.lines().any(|l| l == "lock busy") {
            self.clear_stale_closing(transport, host, &out).await;
            Ok(Attempt::Again)
        } else if out.lines().any(|l| l == "lock changed") {
            Ok(Attempt::Again)
        } else {
            Ok(Attempt::Failed(format!(
                "cannot replace {} on host {}: {}",
                lock_path(host),
                host.name,
                crate::transport::last_lines(out.trim(), 3)
            )))
        }
    }

    /// A closing file left by a script that was killed half-way (its session ended at a
    /// timeout) would hold every takeover, renewal and release back: once its writer is gone
    /// or its lease over, it is removed (only if it still reads the same).
    async fn clear_stale_closing(&self, transport: &dyn Transport, host: &Host, busy: &str) {
        let text: String = busy
            .lines()
            .filter_map(|l| l.strip_prefix("closing| "))
            .map(|l| format!("{l}\n"))
            .collect();
        let record = Record::parse(&text.replacen(" closing\n", "\n", 1));
        if text.is_empty() || record.stale(&self.me).is_none() {
            return;
        }
        let script = format!(
            "_cl_c={closing}; _cl_cur=\n\
             if [ -f \"$_cl_c\" ]; then while IFS= read -r _cl_x || [ -n \"$_cl_x\" ]; do _cl_cur=\"$_cl_cur$_cl_x\n\"; done < \"$_cl_c\"; fi\n\
             [ \"$_cl_cur\" = {expected} ] && rm -f \"$_cl_c\"\nexit 0\n",
            closing = sh_quote(closing_path(host)),
            expected = sh_quote(&text),
        );
        let _ = transport.run(host, &script, transport.step_timeout()).await;
    }

    /// Takes the lock on the first host that answers, `first` being what the first host
    /// already answered (folded into its fleet read). Waits for a live holder up to `wait`.
    /// True when it waited.
    async fn acquire(
        &self,
        transport: &dyn Transport,
        mut first: Option<anyhow::Result<Attempt>>,
    ) -> anyhow::Result<bool> {
        let deadline = self.deadline;
        let mut silent: Vec<String> = Vec::new();
        let (mut waited, mut told, mut again) = (false, false, 0u32);
        let mut i = 0;
        loop {
            let Some(host) = self.hosts.get(i) else {
                self.set(State::Done);
                return Err(NoHostAnswered(silent).into());
            };
            let attempt = match first.take() {
                Some(a) => a,
                None => self.attempt(transport, host).await,
            };
            let attempt = match attempt {
                Ok(a) => a,
                Err(e) => {
                    // A host that did not answer in time may have run the script.
                    if TimedOut::is(&e) || !crate::transport::Unreachable::is(&e) {
                        self.maybe
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(host.clone());
                    }
                    silent.push(format!("{e:#}"));
                    i += 1;
                    continue;
                }
            };
            let attempt = match attempt {
                Attempt::Held(r) if r.holder == self.me => Attempt::Taken,
                Attempt::Held(r) => match r.stale(&self.me) {
                    Some(why) => match self.take_over(transport, host, &r).await? {
                        Attempt::Taken => {
                            let said = format!(
                                "took over a stale fleet lock on host {} ({why}): {}",
                                host.name,
                                r.holder.describe()
                            );
                            eprintln!("{said}");
                            let _ = self.journal.event(None, &said);
                            Attempt::Taken
                        }
                        other => other,
                    },
                    None => Attempt::Held(r),
                },
                other => other,
            };
            match attempt {
                Attempt::Taken => {
                    self.set(State::Held(host.clone()));
                    if i > 0 {
                        eprintln!(
                            "the fleet lock is held on host {} (the first that answered): {}",
                            host.name,
                            silent.join("; ")
                        );
                    }
                    return Ok(waited);
                }
                Attempt::Again => {
                    again += 1;
                    anyhow::ensure!(
                        again < 200,
                        "cannot take the fleet lock on host {}: it kept changing under this deploy",
                        host.name
                    );
                    tokio::time::sleep(Duration::from_millis(20 + 5 * u64::from(again))).await;
                }
                Attempt::Failed(why) => {
                    self.set(State::Done);
                    anyhow::bail!("{why}");
                }
                Attempt::Held(record) => {
                    if Instant::now() >= deadline {
                        self.set(State::Done);
                        return Err(self.held_error(host, record, false));
                    }
                    if !told {
                        say_waiting(host, &record);
                        told = true;
                    }
                    waited = true;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// The error of a lock held by `record` on `host` once the wait (if any) is over;
    /// `elsewhere`: on another host than the first (see [`FleetLock::held_elsewhere`]).
    fn held_error(&self, host: &Host, record: Record, elsewhere: bool) -> anyhow::Error {
        let hint = match (self.wait.is_some(), elsewhere) {
            (true, _) => "it was still held when --lock-wait ran out",
            (false, false) => {
                "wait for it to finish, pass --lock-wait 10m to wait, or `cutover unlock --force` if you are sure it is gone"
            }
            (false, true) => {
                "it is held on another host than the first, so the machine that holds it could not reach the first: wait for it to finish, pass --lock-wait 10m to wait, or `cutover unlock --force` if you are sure it is gone"
            }
        };
        FleetLockHeld {
            host: host.name.to_string(),
            path: lock_path(host),
            record,
            hint,
        }
        .into()
    }

    /// A live lock of someone else's on another host than ours, among `peeks` (what
    /// [`peek_script`] found on each host): two machines that saw different hosts down took it
    /// on different hosts.
    pub fn held_elsewhere<'a>(&self, peeks: &'a [(Host, Record)]) -> Option<&'a (Host, Record)> {
        let ours = self.held_on();
        peeks.iter().find(|(host, record)| {
            ours.as_ref().is_none_or(|o| o.name != host.name)
                && record.holder != self.me
                && record.stale(&self.me).is_none()
        })
    }

    /// Gives our lock back because `held` (see [`FleetLock::held_elsewhere`]) was there first:
    /// past the wait, the error says who holds it and where; within it, the caller reads the
    /// fleet again (and takes the lock again) after a pause.
    pub async fn yield_to(
        &self,
        transport: &dyn Transport,
        (host, record): &(Host, Record),
    ) -> anyhow::Result<()> {
        self.release(transport).await;
        if Instant::now() >= self.deadline {
            return Err(self.held_error(host, record.clone(), true));
        }
        if !self
            .told_elsewhere
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            say_waiting(host, record);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        self.set(State::Pending);
        Ok(())
    }

    /// Rewrites our lease. `Ok(false)`: the lock is no longer ours (taken over after our lease
    /// ended, or removed with `unlock --force`). Nothing to do while it is not held.
    pub async fn renew(&self, transport: &dyn Transport) -> anyhow::Result<bool> {
        let State::Held(host) = self.state() else {
            return Ok(true);
        };
        let text = content(&self.me, now_ms() + self.lease.as_millis() as u64);
        let action = format!(
            "if [ \"$_cl_h\" = {mine} ]; then {write} && echo 'lock renewed' || echo 'lock failed'; else echo 'lock lost'; fi\n\
             rm -f \"$_cl_c\"\n",
            mine = sh_quote(holder_line(&self.me)),
            write = rewrite(&text),
        );
        for _ in 0..20 {
            let script = closing_script(&host, &self.me, self.lease, &action);
            let out = transport
                .run(&host, &script, transport.step_timeout())
                .await?
                .stdout;
            if out.lines().any(|l| l == "lock renewed") {
                return Ok(true);
            }
            if out.lines().any(|l| l == "lock lost") {
                return Ok(false);
            }
            if out.lines().any(|l| l == "lock busy") {
                self.clear_stale_closing(transport, &host, &out).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("host {}: could not renew the fleet lock", host.name)
    }

    /// Removes our lock (where it is held, and where a take may have run unanswered). A lock
    /// that is no longer ours is left alone. Best effort: a lock left behind is stale once
    /// this process is gone, and taken over.
    pub async fn release(&self, transport: &dyn Transport) {
        let mut hosts: Vec<Host> =
            std::mem::take(&mut *self.maybe.lock().unwrap_or_else(|p| p.into_inner()));
        match std::mem::replace(
            &mut *self.state.lock().unwrap_or_else(|p| p.into_inner()),
            State::Done,
        ) {
            State::Held(h) => hosts.push(h),
            // A take may be under way (a signal came meanwhile): remove it if it landed.
            State::Pending => hosts.extend(self.hosts.first().cloned()),
            State::Done => {}
        }
        let releases = hosts.iter().map(|host| {
            // Commands sent from other machines to this holder go with its lock.
            let action = format!(
                "if [ \"$_cl_h\" = {mine} ]; then rm -f \"$_cl_l\" \"$_cl_c\" {control}; echo 'lock released'; else rm -f \"$_cl_c\"; echo 'lock not ours'; fi\n",
                mine = sh_quote(holder_line(&self.me)),
                control = sh_quote(crate::fleet_control::control_path(host)),
            );
            async move {
                for _ in 0..20 {
                    let script = closing_script(host, &self.me, self.lease, &action);
                    match transport.run(host, &script, transport.step_timeout()).await {
                        Ok(out) if out.stdout.lines().any(|l| l == "lock busy") => {
                            self.clear_stale_closing(transport, host, &out.stdout).await;
                        }
                        Ok(_) => return,
                        // A session killed by the signal that ends us: a new one is opened.
                        Err(_) => {}
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        futures_util::future::join_all(releases).await;
    }
}

/// The fleet lock as the first host that answers holds it, for `cutover lock`.
pub struct Seen {
    /// The host read, and its lock (`None`: free); `None` when no host answered.
    pub on: Option<(Host, Option<Record>)>,
    /// Hosts before it that did not answer, with why.
    pub silent: Vec<String>,
}

impl Seen {
    /// Every lock [`read_all`] found, the first host's first (`others` is what it returned
    /// beside `self`).
    pub fn locks<'a>(
        &'a self,
        others: &'a [(Host, Record)],
    ) -> impl Iterator<Item = (&'a Host, &'a Record)> {
        let first = self
            .on
            .as_ref()
            .and_then(|(h, r)| r.as_ref().map(|r| (h, r)));
        first.into_iter().chain(others.iter().map(|(h, r)| (h, r)))
    }

    /// The line `cutover lock` prints.
    pub fn line(&self) -> String {
        let skipped = if self.silent.is_empty() {
            String::new()
        } else {
            format!("; {}", self.silent.join("; "))
        };
        match &self.on {
            None => format!("fleet: not known: no host answered{skipped}"),
            Some((h, None)) => format!("fleet: unlocked (host {}{skipped})", h.name),
            Some((h, Some(r))) => {
                let me = LockHolder::me("");
                let stale = match r.stale(&me) {
                    Some(why) => format!(" ({why}: the next deploy takes it over)"),
                    None => String::new(),
                };
                format!(
                    "fleet: held by {}{stale} (host {}{skipped})",
                    r.describe(),
                    h.name
                )
            }
        }
    }
}

/// Reads the fleet lock on every host at once: where the first host (in config order) that
/// answers holds it, and the locks on the hosts after it (a machine that could not reach the
/// first took it on another). In parallel, so that hosts that do not answer cost one
/// connection timeout, not one each (`cutover status` reads it during an outage too).
pub async fn read_all(config: &Config, transport: &dyn Transport) -> (Seen, Vec<(Host, Record)>) {
    read_all_hosts(&config.hosts, transport).await
}

async fn read_all_hosts(hosts: &[Host], transport: &dyn Transport) -> (Seen, Vec<(Host, Record)>) {
    let reads = hosts.iter().map(|host| async move {
        let out = crate::transport::run_ok(
            transport,
            host,
            "reading the fleet lock",
            &peek_script(host),
            transport.step_timeout(),
        )
        .await;
        (host, out)
    });
    let mut seen = Seen {
        on: None,
        silent: Vec::new(),
    };
    let mut others = Vec::new();
    for (host, out) in futures_util::future::join_all(reads).await {
        match (out, &seen.on) {
            (Err(e), None) => seen.silent.push(format!("{e:#}")),
            (Err(_), Some(_)) => {}
            (Ok(out), None) => seen.on = Some((host.clone(), parse_peek(&out, host))),
            (Ok(out), Some(_)) => {
                if let Some(r) = parse_peek(&out, host) {
                    others.push((host.clone(), r));
                }
            }
        }
    }
    (seen, others)
}

/// What [`read_all`] found, as `cutover status --json` and serve's `/api/status` give it:
/// `fleet_lock` null when free, the holder where held, or `{"unknown": [why...]}` when no host
/// answered; `fleet_lock_others` the locks on later hosts.
pub fn to_json(seen: &Seen, others: &[(Host, Record)]) -> (serde_json::Value, serde_json::Value) {
    let held = |host: &Host, r: &Record| {
        serde_json::json!({
            "host": host.name.as_str(),
            "holder": r.holder,
            "lease_until_ms": r.lease_until_ms,
            "stale": r.stale(&LockHolder::me("")),
        })
    };
    let first = match &seen.on {
        None => serde_json::json!({ "unknown": seen.silent }),
        Some((_, None)) => serde_json::Value::Null,
        Some((host, Some(r))) => held(host, r),
    };
    let others = others.iter().map(|(h, r)| held(h, r)).collect();
    (first, serde_json::Value::Array(others))
}

/// Removes the fleet lock whoever holds it (`cutover unlock --force`) on `host`, where
/// [`read_all`] found one; returns what it removed. A closing file goes too.
pub async fn force_clear(transport: &dyn Transport, host: &Host) -> anyhow::Result<Option<Record>> {
    let script = format!(
        "{}rm -f {} {} {}\n",
        peek_script(host),
        sh_quote(lock_path(host)),
        sh_quote(closing_path(host)),
        sh_quote(crate::fleet_control::control_path(host)),
    );
    let out = crate::transport::run_ok(
        transport,
        host,
        "removing the fleet lock",
        &script,
        transport.step_timeout(),
    )
    .await?;
    Ok(parse_peek(&out, host))
}

/// Splits what a fleet read printed when [`FleetLock::folded_script`] ran ahead of it: the lock
/// part, and the read's own.
pub fn split(out: &str) -> (&str, &str) {
    let marker = format!("\n{END}\n");
    match out.find(&marker) {
        Some(at) => (&out[..at + 1], &out[at + marker.len()..]),
        None => ("", out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::local::LocalTransport;

    fn lock_at(root: &std::path::Path, holder: LockHolder, lease: Duration) -> FleetLock {
        let journal = Arc::new(Journal::open(&root.join("state")).unwrap());
        FleetLock::with_hosts(vec![Host::for_test(root)], holder, lease, None, journal)
    }

    fn held(e: anyhow::Error) -> FleetLockHeld {
        e.downcast::<FleetLockHeld>()
            .unwrap_or_else(|e| panic!("not a held lock: {e:#}"))
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_release_frees_it() {
        let d = tempfile::tempdir().unwrap();
        let t = LocalTransport::new();
        let a = lock_at(
            d.path(),
            LockHolder::me("deploy v1"),
            Duration::from_secs(60),
        );
        a.take(&t).await.unwrap();
        let file = d.path().join(LOCK_FILE);
        assert!(file.is_file());
        // Another live process of this machine (pid 1 always runs) must wait.
        let b = lock_at(
            d.path(),
            LockHolder {
                pid: 1,
                ..LockHolder::me("deploy v2")
            },
            Duration::from_secs(60),
        );
        let e = held(b.take(&t).await.unwrap_err());
        assert!(e.record.holder.what == "deploy v1", "{e}");
        assert!(e.to_string().contains("--lock-wait"), "{e}");
        // Renewing keeps it ours.
        assert!(a.renew(&t).await.unwrap());
        a.release(&t).await;
        assert!(!file.exists());
        assert!(!d.path().join(CLOSING_FILE).exists());
        let b = lock_at(
            d.path(),
            LockHolder::me("deploy v2"),
            Duration::from_secs(60),
        );
        b.take(&t).await.unwrap();
        assert_eq!(b.held_on().unwrap().name.as_str(), "web1");
    }

    #[tokio::test]
    async fn stale_locks_are_taken_over_and_live_ones_elsewhere_kept() {
        let d = tempfile::tempdir().unwrap();
        let t = LocalTransport::new();
        let file = d.path().join(LOCK_FILE);
        let me = LockHolder::me("deploy v3");
        // A holder of this machine whose process is gone.
        let dead = LockHolder {
            pid: u32::MAX - 1,
            ..LockHolder::me("deploy v1")
        };
        std::fs::write(&file, content(&dead, now_ms() + 60_000) + "\n").unwrap();
        let lock = lock_at(d.path(), me.clone(), Duration::from_secs(60));
        lock.take(&t).await.unwrap();
        assert!(
            std::fs::read_to_string(&file)
                .unwrap()
                .contains("deploy v3")
        );
        lock.release(&t).await;
        // A holder on another machine: its lease decides.
        let remote = LockHolder {
            machine: "elsewhere".into(),
            ..LockHolder::me("deploy v1")
        };
        std::fs::write(&file, content(&remote, now_ms() + 60_000) + "\n").unwrap();
        let e = held(
            lock_at(d.path(), me.clone(), Duration::from_secs(60))
                .take(&t)
                .await
                .unwrap_err(),
        );
        assert_eq!(e.record.holder.machine, "elsewhere");
        std::fs::write(&file, content(&remote, now_ms() - 1) + "\n").unwrap();
        let lock = lock_at(d.path(), me, Duration::from_secs(60));
        lock.take(&t).await.unwrap();
        assert!(
            std::fs::read_to_string(&file)
                .unwrap()
                .contains("deploy v3")
        );
    }

    /// Two contenders for one stale lock: exactly one takes it over.
    #[tokio::test]
    async fn two_contenders_for_a_stale_lock_do_not_both_win() {
        for _ in 0..5 {
            let d = tempfile::tempdir().unwrap();
            let t = LocalTransport::new();
            let remote = LockHolder {
                machine: "elsewhere".into(),
                ..LockHolder::me("deploy v1")
            };
            std::fs::write(d.path().join(LOCK_FILE), content(&remote, 1) + "\n").unwrap();
            let a = lock_at(
                d.path(),
                LockHolder {
                    pid: 1,
                    ..LockHolder::me("deploy a")
                },
                Duration::from_secs(60),
            );
            let b = lock_at(
                d.path(),
                LockHolder::me("deploy b"),
                Duration::from_secs(60),
            );
            let (ra, rb) = tokio::join!(a.take(&t), b.take(&t));
            assert!(ra.is_ok() != rb.is_ok(), "{ra:?} {rb:?}");
            assert!(!d.path().join(CLOSING_FILE).exists());
        }
    }

    /// The holder is data: a user name or command with quotes and `$(...)` is stored as is
    /// and runs nothing.
    #[tokio::test]
    async fn a_holder_with_shell_metacharacters_is_stored_as_data() {
        let d = tempfile::tempdir().unwrap();
        let t = LocalTransport::new();
        let canary = d.path().join("pwned");
        let evil = format!(
            "x'; touch {0}; echo '$(touch {0})`touch {0}`\\n\"",
            canary.display()
        );
        let holder = LockHolder {
            user: evil.clone(),
            what: evil.clone(),
            ..LockHolder::me("")
        };
        let lock = lock_at(d.path(), holder.clone(), Duration::from_secs(60));
        lock.take(&t).await.unwrap();
        assert!(lock.renew(&t).await.unwrap());
        assert!(!canary.exists(), "the holder ran as shell");
        let text = std::fs::read_to_string(d.path().join(LOCK_FILE)).unwrap();
        assert_eq!(Record::parse(&text).holder, holder, "{text}");
        let config_hosts = vec![Host::for_test(d.path())];
        let (seen, _) = read_all_hosts(&config_hosts, &t).await;
        assert_eq!(seen.on.unwrap().1.unwrap().holder, holder);
        lock.release(&t).await;
        assert!(!d.path().join(LOCK_FILE).exists());
        assert!(!canary.exists());
    }

    #[tokio::test]
    async fn a_lock_removed_by_force_is_lost_not_renewed() {
        let d = tempfile::tempdir().unwrap();
        let t = LocalTransport::new();
        let lock = lock_at(
            d.path(),
            LockHolder::me("deploy v1"),
            Duration::from_secs(60),
        );
        lock.take(&t).await.unwrap();
        let removed = force_clear(&t, &Host::for_test(d.path())).await.unwrap();
        assert_eq!(removed.unwrap().holder.what, "deploy v1");
        assert!(!lock.renew(&t).await.unwrap());
        // Another's lock is never released by us.
        let other = LockHolder {
            pid: 1,
            ..LockHolder::me("deploy v2")
        };
        let theirs = lock_at(d.path(), other, Duration::from_secs(60));
        theirs.take(&t).await.unwrap();
        lock.release(&t).await;
        assert!(d.path().join(LOCK_FILE).exists());
    }

    #[test]
    fn a_fleet_read_is_split_from_the_lock_part() {
        let out = "lock held\nlock| x\n--lock-end\ncurrent v1\n--instances\n";
        let (lock, rest) = split(out);
        assert_eq!(lock, "lock held\nlock| x\n");
        assert_eq!(rest, "current v1\n--instances\n");
        assert_eq!(split("current v1\n"), ("", "current v1\n"));
    }
}
