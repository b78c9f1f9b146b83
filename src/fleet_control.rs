//! `pause`, `resume`, `promote` and `abort` for a deployment that another machine runs,
//! delivered through the host that holds its fleet lock.
//!
//! Why: a command reaches a rollout through the journal of the machine that runs it (see
//! [`crate::control`]), and an operator on another machine (the on-call engineer, while a
//! colleague's laptop deploys) could only read who held the lock. The lock's host is what both
//! machines reach, so the command goes there: one line appended to `<root>/.cutover-control`,
//! addressed to the holder the lock file names, written only if the lock file still names it
//! (checked in the same script: a command never lands for a lock that changed hands). The
//! holder reads the file every [`POLL`] (one round trip, builtins only, beside its rollout) and
//! posts what is addressed to it into its own journal, where its rollout reads it at the next
//! batch boundary as if it had been typed there. Releasing the lock removes the file.
//!
//! A line is one JSON object ([`Sent`]), written as a single-quoted literal: whatever a user
//! name holds stays data.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Host};
use crate::fleet_lock::{self, Record};
use crate::journal::{LockHolder, now_ms};
use crate::transport::{Transport, run_ok, sh_quote};

/// The file commands are appended to, in the root of the host holding the fleet lock.
pub const CONTROL_FILE: &str = ".cutover-control";

/// How often the holder of the fleet lock reads the file: a command sent from elsewhere acts
/// at most this much later than one typed on the deploying machine.
pub const POLL: Duration = Duration::from_secs(1);

/// The commands that may be sent from another machine: those a rollout reads at its batch
/// boundaries. (`rollback` from elsewhere waits for the lock and then undoes the deployment.)
pub const REMOTE_COMMANDS: &[&str] = &["pause", "resume", "promote", "promote-full", "abort"];

/// One command in the control file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    pub command: String,
    /// The `holder ...` line of the lock file it was sent to: only that holder acts on it.
    pub to: String,
    /// Who sent it (`user@machine`).
    pub from: String,
    pub sent_ms: u64,
}

pub(crate) fn control_path(host: &Host) -> String {
    host.root.join(CONTROL_FILE).to_string_lossy().into_owned()
}

/// Appends `command` for the holder of `record`, the lock found on `host`. Fails, saying why,
/// when the lock no longer names that holder (the deployment ended, or another took it over)
/// or the file cannot be written.
pub async fn send(
    transport: &dyn Transport,
    host: &Host,
    record: &Record,
    command: &str,
) -> anyhow::Result<()> {
    let Some(to) = record.holder_line() else {
        anyhow::bail!(
            "host {}: the fleet lock file cannot be read, so no deployment can be addressed (see `cutover lock`)",
            host.name
        );
    };
    let me = LockHolder::me(&format!("cutover {command}"));
    let sent = Sent {
        command: command.to_string(),
        to: to.to_string(),
        from: format!("{}@{}", me.user, me.machine),
        sent_ms: now_ms(),
    };
    let line = serde_json::to_string(&sent)?;
    // Under the lock's closing file, as a renewal or a release: the lock cannot change hands,
    // nor its release remove the control file, between the check and the append.
    let action = format!(
        "if [ \"$_cl_h\" != {to} ]; then echo 'control gone'\n\
         elif printf '%s\\n' {line} >> {control}; then echo 'control sent'\n\
         else echo 'control failed'; fi\n\
         rm -f \"$_cl_c\"\n",
        to = sh_quote(to),
        line = sh_quote(&line),
        control = sh_quote(control_path(host)),
    );
    for _ in 0..20 {
        let script = fleet_lock::closing_script(host, &me, CLOSING_LEASE, &action);
        let out = run_ok(
            transport,
            host,
            &format!("sending {command}"),
            &script,
            transport.step_timeout(),
        )
        .await?;
        match out.lines().find_map(|l| l.strip_prefix("control ")) {
            Some("sent") => return Ok(()),
            Some("gone") => anyhow::bail!(
                "host {}: the fleet lock changed hands before `{command}` could be written: the deployment it named has ended or was taken over (see `cutover lock` and `cutover status`)",
                host.name
            ),
            Some(_) => anyhow::bail!(
                "host {}: cannot append to {} (is the host's root writable by this user?)",
                host.name,
                control_path(host)
            ),
            // The holder renews or releases its lock right now: a moment.
            None if out.lines().any(|l| l == "lock busy") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None => anyhow::bail!(
                "host {}: sending `{command}` printed no verdict: {}",
                host.name,
                crate::transport::last_lines(out.trim(), 3)
            ),
        }
    }
    anyhow::bail!(
        "host {}: the fleet lock stayed busy (being renewed, released or taken over) for a second: send `{command}` again",
        host.name
    )
}

/// How long a sender's closing file stands before another may judge it stale (a send takes
/// one round trip).
const CLOSING_LEASE: Duration = Duration::from_secs(10);

/// Where [`send_elsewhere`] sent a command.
#[derive(Debug)]
pub struct SentTo {
    pub host: String,
    /// "the fleet lock on host web1 is held by ...", for messages.
    pub holder: String,
}

/// Sends `command` to the deployment another machine runs (the live holder of the fleet lock
/// on `config`'s hosts), for a machine where none runs. `Ok(None)`: no live lock, so no
/// deployment runs anywhere (or the hosts cannot say). Refuses, naming the holder, a command
/// that cannot be sent or that would mean nothing to that deployment.
pub async fn send_elsewhere(
    config: &Config,
    transport: &dyn Transport,
    command: &str,
) -> anyhow::Result<Option<SentTo>> {
    let (seen, others) = fleet_lock::read_all(config, transport).await;
    let me = LockHolder::me("");
    let Some((host, record)) = seen.locks(&others).find(|(_, r)| r.stale(&me).is_none()) else {
        return Ok(None);
    };
    let holder = format!(
        "the fleet lock on host {} is held by {}",
        host.name,
        record.describe()
    );
    if !REMOTE_COMMANDS.contains(&command) {
        anyhow::bail!(
            "no deployment of this machine is running, but {holder}: `cutover {command}` reaches a deployment only from the machine that runs it: run it there (or through its `cutover serve` API)"
        );
    }
    // The holder's command line says what it runs (`deploy v2`, `rollback`); the strategy is
    // this config's, which both machines deploy from.
    let kind = if record.holder.what.starts_with("rollback") {
        "rollback"
    } else {
        "deploy"
    };
    if let Some(why) = crate::control::pointless(config.strategy.kind.name(), kind, command) {
        anyhow::bail!("{holder}: {why}");
    }
    send(transport, host, record, command).await?;
    Ok(Some(SentTo {
        host: host.name.to_string(),
        holder,
    }))
}

/// What the holder of a fleet lock has read of its control file so far.
#[derive(Debug, Default)]
pub struct Inbox {
    /// Lines read (the file is only appended to while the lock is held).
    read: usize,
}

impl Inbox {
    /// The commands appended to `host`'s control file since the last call that are addressed
    /// to `holder_line` (the lock file's `holder ...` line of this process). Lines for another
    /// holder (left by a race with an earlier holder's release) and lines that do not parse are
    /// skipped.
    pub async fn poll(
        &mut self,
        transport: &dyn Transport,
        host: &Host,
        holder_line: &str,
    ) -> anyhow::Result<Vec<Sent>> {
        let script = format!(
            "_cl_f={control}\n\
             [ -f \"$_cl_f\" ] || exit 0\n\
             while IFS= read -r _cl_x || [ -n \"$_cl_x\" ]; do printf 'control| %s\\n' \"$_cl_x\"; done < \"$_cl_f\"\n",
            control = sh_quote(control_path(host)),
        );
        let out = run_ok(
            transport,
            host,
            "reading commands sent from other machines",
            &script,
            transport.step_timeout(),
        )
        .await?;
        Ok(self.take_new(&out, holder_line))
    }

    fn take_new(&mut self, out: &str, holder_line: &str) -> Vec<Sent> {
        let lines: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("control| "))
            .collect();
        // Fewer lines than read: the file was removed and started again (a force unlock and a
        // new lock); read it from its start.
        if lines.len() < self.read {
            self.read = 0;
        }
        let new = lines[self.read..]
            .iter()
            .filter_map(|l| serde_json::from_str::<Sent>(l).ok())
            .filter(|s| s.to == holder_line && REMOTE_COMMANDS.contains(&s.command.as_str()))
            .collect();
        self.read = lines.len();
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::local::LocalTransport;

    fn lock_file(holder: &LockHolder) -> String {
        format!(
            "cutover fleet lock 1\n{}\nlease_until_ms {}\n",
            fleet_lock::holder_line(holder),
            now_ms() + 60_000
        )
    }

    #[tokio::test]
    async fn a_command_reaches_only_the_holder_it_was_sent_to_and_stays_data() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::for_test(dir.path());
        std::fs::create_dir_all(dir.path()).unwrap();
        let t = LocalTransport::new();
        let mut holder = LockHolder::me("deploy v2");
        holder.user = "o'brien $(touch pwned) `x`\nnext".into();
        std::fs::write(dir.path().join(fleet_lock::LOCK_FILE), lock_file(&holder)).unwrap();
        let record = fleet_lock::Record::parse_for_test(
            &std::fs::read_to_string(dir.path().join(fleet_lock::LOCK_FILE)).unwrap(),
        );
        let mine = fleet_lock::holder_line(&holder);

        let mut inbox = Inbox::default();
        assert!(inbox.poll(&t, &host, &mine).await.unwrap().is_empty());
        send(&t, &host, &record, "pause").await.unwrap();
        send(&t, &host, &record, "abort").await.unwrap();
        let got = inbox.poll(&t, &host, &mine).await.unwrap();
        let commands: Vec<&str> = got.iter().map(|s| s.command.as_str()).collect();
        assert_eq!(commands, ["pause", "abort"]);
        assert!(got[0].from.contains('@'), "{got:?}");
        // Read once.
        assert!(inbox.poll(&t, &host, &mine).await.unwrap().is_empty());
        assert!(!dir.path().join("pwned").exists());
        assert!(!std::path::Path::new("pwned").exists());

        // Another holder's inbox skips them; a new line for it is its own.
        let other = fleet_lock::holder_line(&LockHolder::me("deploy v3"));
        let mut theirs = Inbox::default();
        assert!(theirs.poll(&t, &host, &other).await.unwrap().is_empty());

        // Once the lock names someone else, nothing more is written for the old holder.
        let mut next = LockHolder::me("deploy v3");
        next.pid += 1;
        std::fs::write(dir.path().join(fleet_lock::LOCK_FILE), lock_file(&next)).unwrap();
        let e = send(&t, &host, &record, "resume").await.unwrap_err();
        assert!(e.to_string().contains("changed hands"), "{e:#}");
        assert!(inbox.poll(&t, &host, &mine).await.unwrap().is_empty());
    }

    #[test]
    fn a_restarted_file_is_read_from_its_start_and_unknown_commands_are_skipped() {
        let line = |c: &str| {
            format!(
                "control| {}\n",
                serde_json::to_string(&Sent {
                    command: c.into(),
                    to: "holder x".into(),
                    from: "a@b".into(),
                    sent_ms: 1,
                })
                .unwrap()
            )
        };
        let mut inbox = Inbox::default();
        let two = format!("{}{}", line("pause"), line("deploy"));
        assert_eq!(
            inbox.take_new(&two, "holder x").len(),
            1,
            "deploy is not a command"
        );
        assert_eq!(inbox.take_new(&two, "holder x").len(), 0);
        // Removed and started again (a force unlock, then a new lock): read from its start.
        let again = line("abort");
        let got = inbox.take_new(&again, "holder x");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].command, "abort");
        let more = format!("{again}control| not json\n");
        assert_eq!(inbox.take_new(&more, "holder x").len(), 0);
    }
}
