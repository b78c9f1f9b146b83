//! An operator's say in a rollout that moves hosts in batches (a rolling deploy, a canary's
//! promotion): `cutover pause`, `resume`, `promote`, `abort` and `rollback` (or the dashboard's
//! buttons) are read at each boundary between two batches.
//!
//! Why at the boundary and nowhere else: a batch in flight has instances starting and backends
//! changing; stopping it half-way would leave hosts in a state no one chose. Between batches
//! every moved host serves the new release and every other host the old one, so holding there
//! costs nothing (capacity is whole) and going back is the ordinary undo.
//!
//! - `pause` holds the rollout before the next batch until `resume` (or `promote`, as Argo
//!   Rollouts' promote ends a pause); there is no time limit, as with `kubectl rollout pause`.
//! - `abort` and `rollback` stop it and return every moved host, whatever `on_failure` says:
//!   `on_failure` is for failures the deployer finds, not for an operator's decision.
//! - The end of the last batch is a boundary too: `abort` or `rollback` sent while it ran still
//!   returns every host (the deployment has not ended); a `pause` there has nothing left to hold.

use std::time::Duration;

use crate::deploy::{Deployer, Run};

/// How often a paused rollout looks for the command that ends the pause.
const POLL: Duration = Duration::from_millis(10);

/// Why `command` means nothing to a running deployment (`kind`, `strategy`), if it does not: a
/// blue-green deploy has no batches to hold, so `pause` and `resume` would be accepted and
/// then ignored. The CLI and the API refuse such a command rather than say "sent".
pub(crate) fn pointless(strategy: &str, kind: &str, command: &str) -> Option<String> {
    // A rollback runs in rolling batches whatever the strategy: it can be paused.
    (strategy == "blue-green" && kind != "rollback" && matches!(command, "pause" | "resume")).then(|| {
        "a blue-green deployment has no batches to pause: its switch-back window ends early with `cutover promote`, or goes back with `cutover rollback`".to_string()
    })
}

/// A command as an operator types it: `promote-full` is `cutover promote --full`.
pub(crate) fn typed(command: &str) -> String {
    match command {
        "promote-full" => "promote --full".to_string(),
        other => other.to_string(),
    }
}

/// What the rollout does after a boundary.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Boundary {
    /// Go on with the next batch.
    Next,
    /// Stop and return every moved host; says why.
    Stop(String),
}

impl Deployer {
    /// Reads the operator's commands between `done` (the batch that just ended) and `next`
    /// (the one about to start, `None` after the last); holds while paused (the next batch
    /// publishes its own status). `strategy` labels the status the dashboard and `cutover
    /// status` show while paused. A rollout that is itself a rollback (`rolling_back`) takes
    /// `rollback` as said already. `on_hold` runs once when a pause begins: work the rollout
    /// would have left to the next batch must finish now (a rolling deploy's old backends).
    pub(crate) async fn at_boundary(
        &self,
        run: &Run,
        strategy: &str,
        rolling_back: bool,
        done: &str,
        next: Option<&str>,
        on_hold: impl FnOnce(),
    ) -> anyhow::Result<Boundary> {
        let mut paused = false;
        let mut on_hold = Some(on_hold);
        let Some(next) = next else {
            return self.after_last(run, &format!("{done}, the last batch"), rolling_back);
        };
        loop {
            let Some(command) = self.journal.take_command(&run.id)? else {
                if !paused {
                    return Ok(Boundary::Next);
                }
                tokio::time::sleep(POLL).await;
                continue;
            };
            match command.as_str() {
                "pause" if !paused => {
                    paused = true;
                    if let Some(f) = on_hold.take() {
                        f();
                    }
                    self.progress.say(&format!(
                        "{done} done; paused before {next}: `cutover resume` goes on, `cutover abort` returns every moved host"
                    ));
                    self.status(
                        run,
                        serde_json::json!({
                            "strategy": strategy, "phase": "paused by an operator",
                            "batch": done, "next": next,
                        }),
                    );
                }
                "pause" => {}
                "resume" | "promote" | "promote-full" if paused => {
                    paused = false;
                    self.progress
                        .say(&format!("{command}: going on with {next}"));
                }
                "resume" | "promote" | "promote-full" => self
                    .progress
                    .say(&format!("{command}: the rollout is not paused; going on")),
                "rollback" if rolling_back => self
                    .progress
                    .say("rollback: this deployment is the rollback; it goes on"),
                "abort" | "rollback" => {
                    return Ok(Boundary::Stop(format!(
                        "{command} requested by an operator after {done}"
                    )));
                }
                other => self
                    .progress
                    .say(&format!("{done}: ignoring unknown command {other:?}")),
            }
        }
    }

    /// The boundary after the last batch (or the verification after it, `during`): only a stop
    /// has anything left to act on.
    pub(crate) fn after_last(
        &self,
        run: &Run,
        during: &str,
        rolling_back: bool,
    ) -> anyhow::Result<Boundary> {
        while let Some(command) = self.journal.take_command(&run.id)? {
            match command.as_str() {
                "rollback" if rolling_back => self
                    .progress
                    .say("rollback: this deployment is the rollback; it ends as it is"),
                "abort" | "rollback" => {
                    return Ok(Boundary::Stop(format!(
                        "{command} requested by an operator during {during}"
                    )));
                }
                other => self.progress.say(&format!(
                    "{other} arrived during {during}: nothing is left to hold"
                )),
            }
        }
        Ok(Boundary::Next)
    }
}
