//! The deploy queue of `cutover serve`: jobs run one at a time, in order.
//!
//! A job may carry a *key* (a GitHub push carries `push:<ref>`): a newer job with the same key
//! replaces a queued older one, because deploying a commit that is already superseded only
//! delays the one people want. The running job is never replaced or cancelled from here:
//! stopping a deployment mid-way is a decision (`abort`, `rollback`) that goes through the
//! journal to the deployer, which knows how to leave the fleet whole.
//!
//! Kept in the journal ([`Queue::kept_in`]), waiting jobs outlive the process: a push accepted
//! just before a restart (an upgrade of cutover, a reboot) is deployed when `cutover serve`
//! starts again, instead of being lost where nobody reads the shutdown message.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::journal::{Journal, now_ms};

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Work {
    /// Deploy a version.
    Deploy { version: String },
    /// Return the fleet to `to`, or to the release before the live one.
    Rollback { to: Option<String> },
    /// Put the live release's running instances that have no server back into the balancer
    /// (`cutover readmit`): queued by serve itself after the balancer restarted.
    Readmit,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    /// Ran to an outcome (see `outcome`).
    Done,
    /// Could not run or the deployer returned an error (see `error`).
    Failed,
    /// A newer job with the same key took its place before it ran.
    Replaced,
    /// Removed from the queue through the API before it ran.
    Cancelled,
}

/// One request to deploy (or roll back), from the API or a webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Job {
    pub id: u64,
    #[serde(flatten)]
    pub work: Work,
    /// Jobs with the same key replace each other while queued.
    pub key: Option<String>,
    /// Who asked, for people: `api`, `github push abc1234 by alice`.
    pub trigger: String,
    pub state: JobState,
    pub queued_ms: u64,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    /// The deployment's id in the journal, once it started.
    pub deployment: Option<String>,
    /// `succeeded`, `rolled_back`, ... for a job that ran.
    pub outcome: Option<String>,
    pub error: Option<String>,
    /// The job that replaced this one.
    pub replaced_by: Option<u64>,
}

/// What the queue holds: the running job, the queued ones (next first), the finished ones
/// (newest first), and why queued jobs wait when nothing runs (`blocked`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueView {
    pub running: Option<Job>,
    pub queued: Vec<Job>,
    pub finished: Vec<Job>,
    /// Why no queued job starts (an interrupted deployment waits to be resolved), and what to
    /// run; `None` when jobs start in turn.
    pub blocked: Option<String>,
}

/// Why a job cannot be cancelled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CancelError {
    #[error("job {0} is not in the queue")]
    NotFound(u64),
    #[error(
        "job {0} is running: it is not cancelled from the queue; abort or roll back its deployment instead"
    )]
    Running(u64),
    #[error("job {0} already ended")]
    Ended(u64),
}

/// Finished jobs remembered for the API.
const FINISHED_KEPT: usize = 200;

#[derive(Default)]
struct Inner {
    next_id: u64,
    queued: VecDeque<Job>,
    running: Option<Job>,
    finished: VecDeque<Job>,
    blocked: Option<String>,
}

/// The queue, shared by the API (push, cancel, view) and the runner (next, finish).
#[derive(Default)]
pub struct Queue {
    inner: Mutex<Inner>,
    wake: Notify,
    /// Where waiting jobs are kept across restarts, and whose (the app's name); `None`: in
    /// memory only.
    store: Option<(Arc<Journal>, String)>,
}

impl Queue {
    /// A queue in memory only.
    pub fn new() -> Queue {
        Queue::default()
    }

    /// A queue whose waiting jobs are kept in `journal`, holding the jobs that waited when
    /// the last `cutover serve` stopped (next first). A kept job this cutover cannot read (a
    /// newer one wrote it) is dropped and returned as a message.
    pub fn kept_in(journal: Arc<Journal>, app: &str) -> anyhow::Result<(Queue, Vec<String>)> {
        let mut unreadable = Vec::new();
        let mut inner = Inner::default();
        for kept in journal.queued_jobs(app)? {
            match serde_json::from_str::<Work>(&kept.work_json) {
                Ok(work) => inner.queued.push_back(Job::queued(
                    kept.id,
                    work,
                    kept.key,
                    kept.trigger,
                    kept.queued_ms,
                )),
                Err(e) => {
                    journal.unqueue_job(kept.id)?;
                    unreadable.push(format!(
                        "job {} ({}) kept in {} cannot be read ({e}): dropped",
                        kept.id,
                        kept.work_json,
                        journal.path().display()
                    ));
                }
            }
        }
        let queue = Queue {
            inner: Mutex::new(inner),
            wake: Notify::new(),
            store: Some((journal, app.to_string())),
        };
        Ok((queue, unreadable))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets a job that no longer waits. A failure only means the job would run again
    /// after a restart, so it is returned to say, not to stop anything.
    fn unkeep(&self, id: u64) -> Option<String> {
        let (store, _) = self.store.as_ref()?;
        store.unqueue_job(id).err().map(|e| {
            format!("job {id} left the queue, but the journal could not record it: it would run again after a restart: {e:#}")
        })
    }

    /// Queues a job; returns it and the queued job it replaced, if any. Fails only when the
    /// job cannot be kept in the journal.
    pub fn push(
        &self,
        work: Work,
        key: Option<String>,
        trigger: String,
    ) -> anyhow::Result<(Job, Option<Job>)> {
        let mut q = self.lock();
        let pushed = self.push_locked(&mut q, work, key, trigger);
        drop(q);
        self.wake.notify_one();
        pushed
    }

    /// Queues `work` asked for without a key (the API, the dashboard), unless the last queued
    /// job is that same work asked for the same way: queuing it again would change nothing but
    /// the time it takes (a double click on the dashboard's form). Returns the job and whether
    /// it is new (false: the one already queued).
    pub fn push_once(&self, work: Work, trigger: String) -> anyhow::Result<(Job, bool)> {
        let mut q = self.lock();
        if let Some(last) = q.queued.back() {
            if last.key.is_none() && last.work == work {
                return Ok((last.clone(), false));
            }
        }
        let pushed = self.push_locked(&mut q, work, None, trigger);
        drop(q);
        self.wake.notify_one();
        pushed.map(|(job, _)| (job, true))
    }

    fn push_locked(
        &self,
        q: &mut Inner,
        work: Work,
        key: Option<String>,
        trigger: String,
    ) -> anyhow::Result<(Job, Option<Job>)> {
        let queued_ms = now_ms();
        let id = match &self.store {
            Some((store, app)) => {
                let work_json = serde_json::to_string(&work)?;
                store.queue_job(app, &work_json, key.as_deref(), &trigger, queued_ms)?
            }
            None => q.next_id + 1,
        };
        q.next_id = q.next_id.max(id);
        let job = Job::queued(id, work, key, trigger, queued_ms);
        let mut replaced = None;
        let same = job
            .key
            .as_ref()
            .and_then(|k| q.queued.iter().position(|j| j.key.as_ref() == Some(k)));
        match same {
            Some(i) => {
                // Take the older one's place in line (it was waiting longer), unless a job that
                // is not a push waits behind it: a rollback or a deploy asked for after the old
                // push was meant to act on top of it, and must not be undone by the new push
                // overtaking it. Then the new push goes to the end.
                let overtakes = q
                    .queued
                    .iter()
                    .skip(i + 1)
                    .any(|j| !j.key.as_deref().is_some_and(|k| k.starts_with("push:")));
                let mut old = if overtakes {
                    let old = q.queued.remove(i).expect("position is in range");
                    q.queued.push_back(job.clone());
                    old
                } else {
                    std::mem::replace(&mut q.queued[i], job.clone())
                };
                old.state = JobState::Replaced;
                old.ended_ms = Some(now_ms());
                old.replaced_by = Some(job.id);
                old.error = self.unkeep(old.id);
                replaced = Some(old.clone());
                remember(q, old);
            }
            None => q.queued.push_back(job.clone()),
        }
        Ok((job, replaced))
    }

    /// Removes a queued job.
    pub fn cancel(&self, id: u64) -> Result<Job, CancelError> {
        let mut q = self.lock();
        if q.running.as_ref().is_some_and(|j| j.id == id) {
            return Err(CancelError::Running(id));
        }
        if q.finished.iter().any(|j| j.id == id) {
            return Err(CancelError::Ended(id));
        }
        let i = q
            .queued
            .iter()
            .position(|j| j.id == id)
            .ok_or(CancelError::NotFound(id))?;
        let mut job = q.queued.remove(i).expect("position is in range");
        job.state = JobState::Cancelled;
        job.ended_ms = Some(now_ms());
        job.error = self.unkeep(id);
        remember(&mut q, job.clone());
        Ok(job)
    }

    /// Marks the next queued job running and returns it, if there is one and nothing runs.
    /// The job stays kept in the journal until [`Queue::unkeep_started`]: until its deployment
    /// really begins, it may go back to the queue ([`Queue::requeue`]) or be cut short by a
    /// crash, and must then run later.
    pub fn start_next(&self) -> Option<Job> {
        let mut q = self.lock();
        if q.running.is_some() {
            return None;
        }
        let mut job = q.queued.pop_front()?;
        job.state = JobState::Running;
        job.started_ms = Some(now_ms());
        q.running = Some(job.clone());
        Some(job)
    }

    /// Forgets the running job `id` in the journal: its deployment begins, so a restart must
    /// not run it again. Returns a warning when the journal could not record it.
    pub fn unkeep_started(&self, id: u64) -> Option<String> {
        self.unkeep(id)
    }

    /// Puts the running `job`, which did not begin (an interrupted deployment was found),
    /// back at the head of the queue as it was. It is still kept in the journal.
    pub fn requeue(&self, mut job: Job) {
        let mut q = self.lock();
        if q.running.as_ref().is_some_and(|j| j.id == job.id) {
            q.running = None;
        }
        job.state = JobState::Queued;
        job.started_ms = None;
        job.deployment = None;
        q.queued.push_front(job);
        drop(q);
        self.wake.notify_one();
    }

    /// Records why queued jobs wait (`None`: they no longer do); true when that changed.
    pub fn set_blocked(&self, why: Option<String>) -> bool {
        let mut q = self.lock();
        let changed = q.blocked != why;
        q.blocked = why;
        changed
    }

    /// Waits until a job is queued and nothing runs, without starting it.
    pub async fn ready(&self) {
        loop {
            let woken = self.wake.notified();
            {
                let q = self.lock();
                if q.running.is_none() && !q.queued.is_empty() {
                    return;
                }
            }
            woken.await;
        }
    }

    /// Waits for a job to run (see [`Queue::start_next`]).
    pub async fn next(&self) -> Job {
        loop {
            let woken = self.wake.notified();
            if let Some(job) = self.start_next() {
                return job;
            }
            woken.await;
        }
    }

    /// Ends every queued job as cancelled with `why` (the server stops); returns them, next
    /// first.
    pub fn cancel_queued(&self, why: &str) -> Vec<Job> {
        let mut q = self.lock();
        let jobs: Vec<Job> = q.queued.drain(..).collect();
        let mut out = Vec::with_capacity(jobs.len());
        for mut job in jobs {
            job.state = JobState::Cancelled;
            job.ended_ms = Some(now_ms());
            job.error = Some(match self.unkeep(job.id) {
                Some(e) => format!("{why}; {e}"),
                None => why.to_string(),
            });
            remember(&mut q, job.clone());
            out.push(job);
        }
        out
    }

    /// Records the running job's deployment id once it is known.
    pub fn set_deployment(&self, id: &str) {
        if let Some(j) = self.lock().running.as_mut() {
            j.deployment = Some(id.to_string());
        }
    }

    /// Ends the running job.
    pub fn finish(&self, job: Job) {
        let mut q = self.lock();
        if q.running.as_ref().is_some_and(|j| j.id == job.id) {
            q.running = None;
        }
        remember(&mut q, job);
        drop(q);
        self.wake.notify_one();
    }

    pub fn view(&self) -> QueueView {
        let q = self.lock();
        QueueView {
            running: q.running.clone(),
            queued: q.queued.iter().cloned().collect(),
            finished: q.finished.iter().cloned().collect(),
            // Said only while it holds a job back.
            blocked: q
                .blocked
                .clone()
                .filter(|_| q.running.is_none() && !q.queued.is_empty()),
        }
    }

    /// A job by id, wherever it is.
    pub fn job(&self, id: u64) -> Option<Job> {
        let q = self.lock();
        q.running
            .iter()
            .chain(q.queued.iter())
            .chain(q.finished.iter())
            .find(|j| j.id == id)
            .cloned()
    }
}

impl Job {
    fn queued(id: u64, work: Work, key: Option<String>, trigger: String, queued_ms: u64) -> Job {
        Job {
            id,
            work,
            key,
            trigger,
            state: JobState::Queued,
            queued_ms,
            started_ms: None,
            ended_ms: None,
            deployment: None,
            outcome: None,
            error: None,
            replaced_by: None,
        }
    }
}

fn remember(q: &mut Inner, job: Job) {
    q.finished.push_front(job);
    q.finished.truncate(FINISHED_KEPT);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(v: &str) -> Work {
        Work::Deploy {
            version: v.to_string(),
        }
    }

    #[test]
    fn newer_push_replaces_the_queued_one_never_the_running_one() {
        let q = Queue::new();
        let key = || Some("push:refs/heads/main".to_string());
        let (a, _) = q.push(deploy("a"), key(), "push a".into()).unwrap();
        let running = q.start_next().unwrap();
        assert_eq!(running.id, a.id);
        let (b, none) = q.push(deploy("b"), key(), "push b".into()).unwrap();
        assert!(none.is_none(), "the running job is not replaced");
        let (other, _) = q.push(deploy("x"), None, "api".into()).unwrap();
        let (c, replaced) = q.push(deploy("c"), key(), "push c".into()).unwrap();
        let replaced = replaced.unwrap();
        assert_eq!(replaced.id, b.id);
        assert_eq!(replaced.state, JobState::Replaced);
        assert_eq!(replaced.replaced_by, Some(c.id));
        // c does not overtake the API job that was queued after b: it goes to the end.
        let v = q.view();
        assert_eq!(v.running.unwrap().id, a.id);
        assert_eq!(
            v.queued.iter().map(|j| j.id).collect::<Vec<_>>(),
            vec![other.id, c.id]
        );
        assert!(q.start_next().is_none(), "one at a time");
        let mut done = running;
        done.state = JobState::Done;
        q.finish(done);
        assert_eq!(q.start_next().unwrap().id, other.id);
    }

    /// Review finding 6: a newer push never jumps ahead of a rollback queued after the push
    /// it replaces (the rollback would then undo it); with only pushes behind, it keeps the
    /// old push's place.
    #[test]
    fn a_newer_push_does_not_overtake_a_queued_rollback() {
        let q = Queue::new();
        let key = || Some("push:acme/web:refs/heads/main".to_string());
        q.push(deploy("running"), None, "api".into()).unwrap();
        q.start_next().unwrap();
        let (b, _) = q.push(deploy("b"), key(), "push b".into()).unwrap();
        let (back, _) = q
            .push(Work::Rollback { to: None }, None, "api".into())
            .unwrap();
        let (c, replaced) = q.push(deploy("c"), key(), "push c".into()).unwrap();
        assert_eq!(replaced.unwrap().id, b.id);
        let order = |q: &Queue| q.view().queued.iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(order(&q), vec![back.id, c.id]);
        // Only pushes (another branch's) behind it: the place in line is kept.
        let other = Some("push:acme/web:refs/heads/other".to_string());
        let q = Queue::new();
        let (b, _) = q.push(deploy("b"), key(), "push b".into()).unwrap();
        let (o, _) = q.push(deploy("o"), other, "push o".into()).unwrap();
        let (c, _) = q.push(deploy("c"), key(), "push c".into()).unwrap();
        assert_eq!(q.job(b.id).unwrap().state, JobState::Replaced);
        assert_eq!(order(&q), vec![c.id, o.id]);
    }

    #[test]
    fn cancel_only_queued_jobs() {
        let q = Queue::new();
        let (a, _) = q.push(deploy("a"), None, "api".into()).unwrap();
        let (b, _) = q.push(deploy("b"), None, "api".into()).unwrap();
        q.start_next().unwrap();
        assert_eq!(q.cancel(a.id), Err(CancelError::Running(a.id)));
        assert_eq!(q.cancel(b.id).unwrap().state, JobState::Cancelled);
        assert_eq!(q.cancel(b.id), Err(CancelError::Ended(b.id)));
        assert_eq!(q.cancel(99), Err(CancelError::NotFound(99)));
    }

    #[test]
    fn cancel_queued_ends_every_waiting_job_not_the_running_one() {
        let q = Queue::new();
        let (a, _) = q.push(deploy("a"), None, "api".into()).unwrap();
        let (b, _) = q.push(deploy("b"), None, "api".into()).unwrap();
        let (c, _) = q
            .push(Work::Rollback { to: None }, None, "api".into())
            .unwrap();
        q.start_next().unwrap();
        let dropped = q.cancel_queued("serve stopped");
        assert_eq!(
            dropped.iter().map(|j| j.id).collect::<Vec<_>>(),
            vec![b.id, c.id]
        );
        assert!(dropped.iter().all(|j| j.state == JobState::Cancelled));
        let v = q.view();
        assert_eq!(v.running.unwrap().id, a.id);
        assert!(v.queued.is_empty());
        assert_eq!(q.job(b.id).unwrap().error.as_deref(), Some("serve stopped"));
    }

    /// Waiting jobs outlive the process: a second queue on the same journal holds them, next
    /// first, with their ids, and new ids never reuse an old one.
    #[test]
    fn waiting_jobs_are_kept_in_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(Journal::open(dir.path()).unwrap());
        let (q, unreadable) = Queue::kept_in(journal.clone(), "a").unwrap();
        assert!(unreadable.is_empty());
        // Another app sharing the state directory keeps its own queue.
        let (other, _) = Queue::kept_in(journal.clone(), "b").unwrap();
        other.push(deploy("b1"), None, "api".into()).unwrap();
        let key = || Some("push:acme/web:refs/heads/main".to_string());
        let (ran, _) = q.push(deploy("a"), None, "api".into()).unwrap();
        let (back, _) = q
            .push(Work::Rollback { to: None }, None, "api".into())
            .unwrap();
        let (old, _) = q.push(deploy("b"), key(), "push b".into()).unwrap();
        let (cancelled, _) = q.push(deploy("x"), None, "api".into()).unwrap();
        let (new, _) = q.push(deploy("c"), key(), "push c".into()).unwrap();
        assert_eq!(q.start_next().unwrap().id, ran.id);
        assert!(q.unkeep_started(ran.id).is_none());
        q.cancel(cancelled.id).unwrap();
        drop(q);

        let (q, _) = Queue::kept_in(journal.clone(), "a").unwrap();
        let v = q.view();
        assert!(v.running.is_none(), "a started job is not run again");
        let kept: Vec<_> = v.queued.iter().map(|j| (j.id, j.work.clone())).collect();
        assert_eq!(
            kept,
            vec![
                (back.id, Work::Rollback { to: None }),
                (new.id, deploy("c"))
            ],
            "replaced and cancelled jobs are gone; the rest keep their order"
        );
        assert_eq!(v.queued[1].key, key());
        assert_eq!(v.queued[1].trigger, "push c");
        assert!(old.id < new.id);
        let (later, _) = q.push(deploy("d"), None, "api".into()).unwrap();
        assert!(later.id > new.id, "{} after {}", later.id, new.id);
        // A newer push still replaces a kept one.
        let (_, replaced) = q.push(deploy("e"), key(), "push e".into()).unwrap();
        assert_eq!(replaced.unwrap().id, new.id);
        assert_eq!(q.cancel_queued("dropped").len(), 3);
        let (q, _) = Queue::kept_in(journal.clone(), "a").unwrap();
        assert!(q.view().queued.is_empty(), "dropped jobs are forgotten");
        let (other, _) = Queue::kept_in(journal, "b").unwrap();
        let kept: Vec<_> = other.view().queued.iter().map(|j| j.work.clone()).collect();
        assert_eq!(kept, vec![deploy("b1")], "b's job is b's alone");
    }

    /// The readmit serve queues by itself is kept like any job: after a restart of serve it
    /// still runs (and reads `{"kind": "readmit"}` back).
    #[test]
    fn a_queued_readmit_is_kept_in_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(Journal::open(dir.path()).unwrap());
        let (q, _) = Queue::kept_in(journal.clone(), "a").unwrap();
        let (job, _) = q
            .push(Work::Readmit, None, "HAProxy restarted or reloaded".into())
            .unwrap();
        assert_eq!(
            serde_json::to_value(&job).unwrap()["kind"],
            serde_json::json!("readmit")
        );
        drop(q);
        let (q, unreadable) = Queue::kept_in(journal, "a").unwrap();
        assert!(unreadable.is_empty(), "{unreadable:?}");
        let kept = q.view().queued;
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].work, Work::Readmit);
        assert_eq!(kept[0].trigger, "HAProxy restarted or reloaded");
    }

    /// A job that starts stays kept in the journal until its deployment begins: put back
    /// (an interrupted deployment was found), it waits at the head of the queue and would run
    /// after a restart too.
    #[test]
    fn a_started_job_stays_kept_until_its_deployment_begins() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(Journal::open(dir.path()).unwrap());
        let (q, _) = Queue::kept_in(journal.clone(), "a").unwrap();
        let (a, _) = q.push(deploy("a"), None, "api".into()).unwrap();
        let (b, _) = q.push(deploy("b"), None, "api".into()).unwrap();
        let started = q.start_next().unwrap();
        assert_eq!(started.id, a.id);
        let (kept, _) = Queue::kept_in(journal.clone(), "a").unwrap();
        let ids = |q: &Queue| q.view().queued.iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(ids(&kept), vec![a.id, b.id], "not begun: still kept");
        assert!(q.set_blocked(Some("interrupted".into())));
        assert!(!q.set_blocked(Some("interrupted".into())), "no change");
        q.requeue(started);
        let v = q.view();
        assert!(v.running.is_none());
        assert_eq!(v.blocked.as_deref(), Some("interrupted"));
        assert_eq!(v.queued[0].state, JobState::Queued);
        assert_eq!(v.queued[0].started_ms, None);
        assert_eq!(ids(&q), vec![a.id, b.id]);
        assert!(q.set_blocked(None));
        assert_eq!(q.start_next().unwrap().id, a.id);
        assert!(q.unkeep_started(a.id).is_none());
        let (kept, _) = Queue::kept_in(journal, "a").unwrap();
        assert_eq!(ids(&kept), vec![b.id], "begun: forgotten");
    }

    /// Review finding (double click): the same deploy asked for again while it is the last
    /// queued job is that job; asked for after something else, or while it runs, it is new.
    #[test]
    fn the_same_request_twice_in_a_row_is_queued_once() {
        let q = Queue::new();
        let (a, new) = q.push_once(deploy("a"), "api".into()).unwrap();
        assert!(new);
        let (again, new) = q.push_once(deploy("a"), "api".into()).unwrap();
        assert_eq!((again.id, new), (a.id, false));
        let (b, _) = q.push_once(deploy("b"), "api".into()).unwrap();
        let (a2, new) = q.push_once(deploy("a"), "api".into()).unwrap();
        assert!(new && a2.id > b.id, "a after b is not a duplicate");
        let key = Some("push:acme/web:refs/heads/main".to_string());
        let (p, _) = q.push(deploy("c"), key, "push c".into()).unwrap();
        let (c, new) = q.push_once(deploy("c"), "api".into()).unwrap();
        assert!(
            new && c.id != p.id,
            "a push may be replaced: not the same request"
        );
        assert_eq!(q.view().queued.len(), 5);
    }

    #[tokio::test]
    async fn next_waits_for_a_push() {
        let q = std::sync::Arc::new(Queue::new());
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.next().await })
        };
        tokio::task::yield_now().await;
        q.push(deploy("a"), None, "api".into()).unwrap();
        let job = waiter.await.unwrap();
        assert_eq!(job.work, deploy("a"));
        assert_eq!(job.state, JobState::Running);
    }
}
