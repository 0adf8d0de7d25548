//! One runner per workspace: the task that owns all of a workspace's transitions.
//!
//! Its inbox takes the user's requests (start, stop, force stop, update, delete), the
//! workspace's provisioning at create, libvirt's lifecycle events for its domain, idle
//! expiry, and reconcile at daemon start. A boot or a graceful stop in flight (the *job*)
//! reports back to the runner when it ends. For each input the runner reads the row, lets
//! [`state::step`] decide, carries out the step's effects and writes the new state with
//! [`Store::write_transition`](crate::store::Store::write_transition): nothing else writes a
//! workspace's state.
//!
//! Invariants:
//! - Inputs are taken one at a time, so the libvirt work of one workspace never interleaves,
//!   and a decision is always made on the row as it is.
//! - Long waits (readiness, a guest's shutdown) run as the job, so the runner keeps taking
//!   inputs meanwhile; a step that supersedes the job cancels it and waits for it to end
//!   (it finishes the libvirt call it is in first), so a cancelled boot never starts a VM
//!   after a forced stop powered it off.
//! - A graceful stop ends on the guest's ShutOff event, or when the stop timeout passes.
//! - The inbox is bounded; a runner ends when its workspace is deleted (or not found).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::caller::Caller;
use crate::config::IdleAction;
use crate::error::{Error, Result};
use crate::hypervisor::events::DomainEvent;
use crate::images::snapshots::Snapshot;
use crate::model::{HardwareRequest, WorkspaceId};
use crate::store::{Holdings, Workspace};
use crate::workspace::jobs::Jobs;
use crate::workspace::provision::Provisioning;
use crate::workspace::readiness::{console_hint, BootOutcome};
use crate::workspace::snapshot::{self, SnapshotOp};
use crate::workspace::state::{self, Effect, Event, Hold, State};
use crate::workspace::Workspaces;

mod settle;

/// How many inputs may wait in a runner's inbox; senders wait beyond that.
pub const INBOX: usize = 64;

type Reply<T> = oneshot::Sender<Result<T>>;

/// What a runner is asked to do.
pub enum Input {
    Provision(Box<Provisioning>, Reply<Workspace>),
    Start(Caller, Reply<Workspace>),
    Stop(Reply<Workspace>),
    Suspend(Reply<Workspace>),
    ForceStop(Reply<Workspace>),
    Update {
        caller: Caller,
        hardware: HardwareRequest,
        idle_timeout_secs: Option<u64>,
        reply: Reply<Workspace>,
    },
    Delete {
        force: bool,
        reply: Reply<()>,
    },
    Domain(DomainEvent),
    /// The idle timer armed at `generation` fired.
    IdleExpired {
        generation: u64,
    },
    Reconcile(Reply<()>),
    Snapshot(SnapshotOp, Reply<Vec<Snapshot>>),
}

/// A boot or a graceful stop in flight.
struct Job {
    /// The generation the job was started at (its own transition's).
    generation: u64,
    cancel: watch::Sender<bool>,
    handle: JoinHandle<JobResult>,
}

enum JobResult {
    Boot(Result<BootOutcome>),
    /// Whether the VM is off.
    Shutdown(Result<bool>),
    Save(Result<()>),
}

/// Whether the runner goes on after an input.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Exit,
}

/// Starts the runner of `id`; it ends when every sender is gone or the workspace is deleted.
pub fn spawn(workspaces: Arc<Workspaces>, id: WorkspaceId) -> mpsc::Sender<Input> {
    let (tx, rx) = mpsc::channel(INBOX);
    let runner = Runner {
        id,
        w: workspaces,
        rx,
        job: None,
        stop_reason: "",
        boot_note: None,
    };
    let own = tx.clone();
    tokio::spawn(runner.run(own));
    tx
}

struct Runner {
    id: WorkspaceId,
    w: Arc<Workspaces>,
    rx: mpsc::Receiver<Input>,
    job: Option<Job>,
    /// The reason the graceful stop in flight records when it ends ("idle timeout").
    stop_reason: &'static str,
    /// What the boot in flight records as the reason when it is ready (why a suspended
    /// workspace booted afresh).
    boot_note: Option<String>,
}

impl Runner {
    async fn run(mut self, own: mpsc::Sender<Input>) {
        // Its own sender only identifies it in the registry; holding it would keep the
        // inbox open forever.
        let me = own.downgrade();
        drop(own);
        loop {
            let next = match &mut self.job {
                Some(job) => tokio::select! {
                    input = self.rx.recv() => Ok(input),
                    done = &mut job.handle => Err(done),
                },
                None => Ok(self.rx.recv().await),
            };
            match next {
                Ok(None) => break,
                Ok(Some(input)) => {
                    if self.on_input(input).await == Flow::Exit {
                        break;
                    }
                }
                Err(done) => {
                    let job = self.job.take().expect("a job was running");
                    let result = done.unwrap_or_else(|e| {
                        JobResult::Boot(Err(Error::Internal(format!("the job panicked: {e}"))))
                    });
                    self.on_job_done(job.generation, result).await;
                }
            }
        }
        self.cancel_job().await;
        if let Some(me) = me.upgrade() {
            self.w.runner_ended(&self.id, &me);
        }
    }

    async fn on_input(&mut self, input: Input) -> Flow {
        let ws = match self.w.d.store.get_workspace(&self.id, None) {
            Ok(ws) => ws,
            Err(e) => {
                reply_err(input, e);
                return Flow::Exit;
            }
        };
        match input {
            Input::Provision(p, reply) => {
                let result = self.w.d.provisioner.provision_or_undo(&ws, &p).await;
                let failed = result.is_err();
                let _ = reply.send(result.map(|()| ws));
                if failed {
                    return Flow::Exit;
                }
            }
            Input::Start(caller, reply) => {
                self.boot_note = None;
                if ws.state.vm_is_off() && ws.pending_hardware.is_some() {
                    self.discard_memory_image(&ws, "its hardware changed while it ran");
                }
                let _ = reply.send(self.apply(ws, Event::Start, "", Some(caller)).await);
            }
            Input::Stop(reply) => {
                self.stop_reason = "";
                if ws.state == State::Stopped {
                    self.discard_memory_image(&ws, "a plain stop was asked for");
                }
                let _ = reply.send(self.apply(ws, Event::Stop, "", None).await);
            }
            Input::Suspend(reply) => {
                self.stop_reason = "suspended";
                let _ = reply.send(self.apply(ws, Event::Suspend, "suspended", None).await);
            }
            Input::ForceStop(reply) => {
                let _ = reply.send(self.apply(ws, Event::ForceStop, "", None).await);
            }
            Input::Update {
                caller,
                hardware,
                idle_timeout_secs,
                reply,
            } => {
                let result = self
                    .w
                    .update_in_runner(caller, &ws, &hardware, idle_timeout_secs)
                    .await;
                let _ = reply.send(result);
            }
            Input::Delete { force, reply } => {
                let result = self.delete(ws, force).await;
                let deleted = result.is_ok();
                let _ = reply.send(result);
                if deleted {
                    return Flow::Exit;
                }
            }
            Input::Snapshot(op, reply) => {
                let result = snapshot::carry_out(&self.w.d.hv, &self.w.d.layout, &ws, op).await;
                let _ = reply.send(result);
            }
            Input::Domain(ev) => self.on_domain_event(ws, ev).await,
            Input::IdleExpired { generation } => self.on_idle_expired(ws, generation).await,
            Input::Reconcile(reply) => {
                let settled = ws.provisioning.is_some();
                let _ = reply.send(self.reconcile(ws).await);
                if settled {
                    return Flow::Exit;
                }
            }
        }
        Flow::Continue
    }

    /// Decides `event` for `ws` and carries it out: the effects that must come first, the
    /// transition in one store transaction (placing the VM for a start, as `caller`), then
    /// the rest. A request that is already satisfied returns the workspace unchanged.
    async fn apply(
        &mut self,
        ws: Workspace,
        event: Event,
        reason: &str,
        caller: Option<Caller>,
    ) -> Result<Workspace> {
        let step = state::step(ws.state, event)?;
        if step.is_noop(ws.state) {
            return Ok(ws);
        }
        if step.effects.contains(&Effect::CancelJob) {
            self.cancel_job().await;
        }
        if step.effects.contains(&Effect::PowerOff) {
            if let Err(e) = self.w.d.hv.destroy(&ws.id).await {
                // A forced stop that cannot power the VM off changes nothing; for a failure
                // or crash, the state is recorded all the same.
                if event == Event::ForceStop {
                    return Err(e);
                }
                tracing::warn!(workspace = %ws.id, error = %e, "cannot power off the VM");
            }
        }
        let place = |me: &Workspace, all: &[Workspace]| {
            let caller = caller.unwrap_or(Caller {
                uid: me.owner_uid,
                admin: true,
            });
            self.w.d.pinning.placement().place(caller, me, all)
        };
        let holdings = match step.hold {
            Hold::Keep => Holdings::Keep,
            Hold::Free => Holdings::Free,
            Hold::Take => Holdings::Take(&place),
        };
        let updated = self
            .w
            .d
            .store
            .write_transition(&ws, step.to, reason, holdings)?;
        if event == Event::Start {
            crate::fault::point("start:transition");
        }
        if step.effects.contains(&Effect::EndTasks) {
            self.w.d.tasks.lose_tasks_of(&ws.id);
        }
        // Published before a job starts, so watchers see the new state before its phases.
        self.w.transitioned(&ws, &updated);
        for effect in step.effects {
            match effect {
                Effect::CancelJob | Effect::PowerOff | Effect::EndTasks => {}
                Effect::Boot => self.spawn_boot(&updated),
                Effect::Shutdown => self.spawn_shutdown(&updated),
                Effect::Save => self.spawn_save(&updated),
            }
        }
        Ok(updated)
    }

    fn spawn_job(
        &mut self,
        ws: &Workspace,
        work: impl FnOnce(Arc<Jobs>, Workspace, watch::Receiver<bool>) -> JoinHandle<JobResult>,
    ) {
        let (cancel, cancelled) = watch::channel(false);
        let handle = work(Arc::clone(&self.w.d.jobs), ws.clone(), cancelled);
        self.job = Some(Job {
            generation: ws.generation,
            cancel,
            handle,
        });
    }

    fn spawn_boot(&mut self, ws: &Workspace) {
        self.spawn_job(ws, |jobs, ws, cancelled| {
            tokio::spawn(async move { JobResult::Boot(jobs.boot(&ws, cancelled).await) })
        });
    }

    fn spawn_shutdown(&mut self, ws: &Workspace) {
        self.spawn_job(ws, |jobs, ws, cancelled| {
            tokio::spawn(
                async move { JobResult::Shutdown(jobs.shut_down(&ws.id, cancelled).await) },
            )
        });
    }

    fn spawn_save(&mut self, ws: &Workspace) {
        self.spawn_job(ws, |jobs, ws, cancelled| {
            tokio::spawn(async move { JobResult::Save(jobs.save(&ws.id, cancelled).await) })
        });
    }

    /// Removes the memory image of a suspended workspace, so its next start boots afresh,
    /// saying `why`; the change is published (it is no longer suspended).
    fn discard_memory_image(&mut self, ws: &Workspace, why: &str) {
        let layout = &self.w.d.layout;
        if layout.memory_image_bytes(&ws.id).is_none() {
            return;
        }
        match layout.remove_memory_image(&ws.id) {
            Ok(()) => {
                tracing::info!(workspace = %ws.id, "memory image discarded: {why}");
                self.boot_note = Some(format!(
                    "its memory image was discarded because {why}, so it booted afresh"
                ));
                self.w.transitioned(ws, ws);
            }
            Err(e) => {
                tracing::warn!(workspace = %ws.id, error = %e, "cannot discard the memory image")
            }
        }
    }

    /// Cancels the job in flight, if any, and waits for it to end.
    async fn cancel_job(&mut self) {
        if let Some(job) = self.job.take() {
            let _ = job.cancel.send(true);
            let _ = job.handle.await;
        }
    }

    async fn on_job_done(&mut self, generation: u64, result: JobResult) {
        let ws = match self.w.d.store.get_workspace(&self.id, None) {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!(workspace = %self.id, error = %e, "job ended for a workspace that is gone");
                return;
            }
        };
        if ws.generation != generation {
            return;
        }
        let (event, reason) = match result {
            JobResult::Boot(Ok(BootOutcome::Ready(note))) => (
                Event::Ready,
                note.or_else(|| self.boot_note.take()).unwrap_or_default(),
            ),
            JobResult::Boot(Ok(BootOutcome::Cancelled)) => return,
            JobResult::Boot(Err(e)) => {
                tracing::warn!(workspace = %ws.id, error = %e, "start failed");
                (
                    Event::BootFailed,
                    format!(
                        "start failed: {e}{}",
                        console_hint(&self.w.d.layout, &ws.id)
                    ),
                )
            }
            JobResult::Shutdown(Ok(true)) => (Event::PoweredOff, self.stop_reason.to_owned()),
            JobResult::Shutdown(Ok(false)) => (
                Event::StopTimedOut,
                format!(
                    "the guest did not power off within {} s of the ACPI shutdown request",
                    self.w.d.jobs.stop_timeout().as_secs()
                ),
            ),
            JobResult::Shutdown(Err(e)) => (Event::StopTimedOut, format!("stop failed: {e}")),
            JobResult::Save(Ok(())) => (Event::PoweredOff, self.stop_reason.to_owned()),
            JobResult::Save(Err(e)) => (
                Event::SaveFailed,
                format!("the suspend failed, so it keeps running: {e}"),
            ),
        };
        let result = self.apply(ws, event, &reason, None).await;
        log_result(&self.id, "job", result);
    }

    async fn on_domain_event(&mut self, ws: Workspace, ev: DomainEvent) {
        tracing::debug!(workspace = %ws.id, event = ?ev, "lifecycle event");
        let (event, reason) = match (&ev, ws.state) {
            (DomainEvent::ShutOff { .. }, State::Stopping) => {
                (Event::PoweredOff, self.stop_reason.to_owned())
            }
            (DomainEvent::ShutOff { .. }, _) => {
                (Event::PoweredOff, "the guest powered itself off".to_owned())
            }
            (DomainEvent::Destroyed { .. }, _) => (
                Event::PoweredOff,
                "the VM was powered off outside aether".to_owned(),
            ),
            (DomainEvent::Crashed { .. }, _) => (
                Event::Crashed,
                format!(
                    "qemu crashed or failed{}",
                    console_hint(&self.w.d.layout, &ws.id)
                ),
            ),
        };
        let result = self.apply(ws, event, &reason, None).await;
        log_result(&self.id, "lifecycle event", result);
    }

    async fn on_idle_expired(&mut self, ws: Workspace, generation: u64) {
        // Anything that changed the workspace or made it active re-armed or cancelled the
        // timer; these checks only close the race with a change in flight.
        if ws.generation != generation
            || ws.state != State::Running
            || self.w.d.idle.is_active(&ws.id)
        {
            return;
        }
        // A GPU cannot be saved with the guest: such a workspace is shut down.
        let suspend = self.w.d.idle_action == IdleAction::Suspend && ws.gpu_device.is_none();
        tracing::info!(workspace = %ws.id, suspend, "idle timeout: stopping");
        self.stop_reason = "idle timeout";
        let event = if suspend { Event::Suspend } else { Event::Stop };
        let result = self.apply(ws, event, "idle timeout", None).await;
        log_result(&self.id, "idle stop", result);
    }
}

/// Answers an input that cannot be handled (its workspace is gone) with `e`.
fn reply_err(input: Input, e: Error) {
    match input {
        Input::Provision(_, r)
        | Input::Start(_, r)
        | Input::Stop(r)
        | Input::Suspend(r)
        | Input::ForceStop(r)
        | Input::Update { reply: r, .. } => {
            let _ = r.send(Err(e));
        }
        Input::Delete { reply, .. } | Input::Reconcile(reply) => {
            let _ = reply.send(Err(e));
        }
        Input::Snapshot(_, reply) => {
            let _ = reply.send(Err(e));
        }
        Input::Domain(_) | Input::IdleExpired { .. } => {}
    }
}

fn log_result(id: &WorkspaceId, what: &str, result: Result<Workspace>) {
    match result {
        Ok(ws) => tracing::debug!(workspace = %id, state = %ws.state, "{what} handled"),
        Err(e) => tracing::warn!(workspace = %id, error = %e, "{what} could not be carried out"),
    }
}

/// Resolves when `cancelled` turns true (or its runner is gone).
pub async fn cancelled(cancelled: &mut watch::Receiver<bool>) {
    let _ = cancelled.wait_for(|c| *c).await;
}

/// Sleeps `d`, or less when cancelled; returns whether it was cancelled.
pub async fn sleep_or_cancel(d: Duration, cancel: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *cancel.borrow(),
        _ = cancelled(cancel) => true,
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The daemon's code outside `#[cfg(test)]` modules, per file (relative to `src/`).
    fn daemon_code() -> Vec<(String, String)> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        files
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).unwrap();
                let code = match text.find("#[cfg(test)]\nmod tests") {
                    Some(i) => text[..i].to_owned(),
                    None => text,
                };
                let name = p.strip_prefix(&src).unwrap().display().to_string();
                (name, code)
            })
            .collect()
    }

    /// Every state write goes runner → one store transaction: the SQL that sets a
    /// workspace's state is in `Store::write_transition` alone, and only the runner calls it.
    #[test]
    fn only_the_runner_writes_a_state_and_only_through_write_transition() {
        let code = daemon_code();
        assert!(code.len() > 20, "found only {} source files", code.len());
        let with = |needle: &str| -> Vec<String> {
            code.iter()
                .filter(|(_, c)| c.contains(needle))
                .map(|(f, c)| format!("{f} x{}", c.matches(needle).count()))
                .collect()
        };
        assert_eq!(
            with("UPDATE workspaces SET state"),
            ["store/transitions.rs x1"]
        );
        assert_eq!(with("fn write_transition"), ["store/transitions.rs x1"]);
        assert_eq!(with(".write_transition("), ["workspace/runner/mod.rs x1"]);
        // A new row starts `stopped`; no other statement names a state column value.
        assert_eq!(with("INSERT INTO workspaces "), ["store/workspaces.rs x1"]);
    }
}
