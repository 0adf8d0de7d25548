//! Tasks: commands run in a workspace on a user's or agent's behalf, over the daemon's own
//! SSH session ([`GuestSsh`]). [`Tasks`] runs them and keeps the running ones; [`command`]
//! builds what runs (the remote command line, the `ssh` arguments, task ids); [`log`] keeps
//! a task's output (capped, rotated), [`reader`] reads it back in bounded chunks and follows
//! it.
//!
//! Output is appended to `<state>/tasks/<id>.log` as frames (`O`|`E`, u32 big-endian length,
//! bytes) and broadcast to the `Exec` stream. A log is capped: before a frame would take it
//! past [`TASK_LOG_MAX`] it is renamed to `<id>.log.1` (replacing the previous one) and a new
//! file begun, so a task keeps its most recent output, at most twice the cap. `TaskLogs`
//! reads `.1` then the current file in chunks of [`LOG_CHUNK`] on the blocking pool, and a
//! follower then tails the file as it grows (woken by the writer), so a slow reader never
//! holds a lock, misses a frame or makes the daemon buffer more than a chunk. A running task
//! keeps its workspace from going idle. Tasks still running when their workspace leaves
//! `running`, or when the daemon restarts, end `lost`.

use std::process::Stdio;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, oneshot};

use std::collections::HashMap;
use std::sync::Mutex;

use crate::caller::Caller;
use crate::error::{Error, Result};
use crate::feed::Feed;
use crate::files;
use crate::host::guest_ssh::GuestSsh;
use crate::host::Layout;
use crate::idle::Nudge;
use crate::model::{TaskId, WorkspaceId};
use crate::quota::{Claim, Quotas};
use crate::store::{Store, TaskRow, Workspace};
use log::{SharedLog, TaskLog, MAX_FRAME, TASK_LOG_MAX};
use reader::Source;

pub mod command;
pub mod log;
pub mod reader;

pub use command::ExecSpec;
pub use log::Frame;
pub use reader::TaskLogReader;

/// The running tasks and what running one needs; everything is handed in.
pub struct Tasks {
    store: Arc<Store>,
    dir: std::path::PathBuf,
    guest: GuestSsh,
    quota: Quotas,
    /// Told when a workspace's task count changes (idleness is re-evaluated).
    nudge: Nudge,
    feed: Arc<Feed>,
    running: Mutex<HashMap<String, RunningTask>>,
}

struct RunningTask {
    workspace: WorkspaceId,
    owner: u32,
    /// Tells the driver to end the task with this state (`cancelled` or `lost`).
    end: Option<oneshot::Sender<&'static str>>,
    log: Arc<SharedLog>,
}

impl Tasks {
    pub fn new(
        store: Arc<Store>,
        layout: &Layout,
        guest: GuestSsh,
        quota: Quotas,
        nudge: Nudge,
        feed: Arc<Feed>,
    ) -> Self {
        Tasks {
            store,
            dir: layout.tasks_dir(),
            guest,
            quota,
            nudge,
            feed,
            running: Mutex::new(HashMap::new()),
        }
    }

    fn task_log(&self, id: &str) -> std::path::PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    /// Number of running tasks of a workspace.
    pub fn running_in(&self, id: &WorkspaceId) -> u32 {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|t| t.workspace == *id)
            .count() as u32
    }

    /// Ends the running tasks of a workspace that left `running`: they are `lost`.
    pub fn lose_tasks_of(&self, id: &WorkspaceId) {
        let mut tasks = self.running.lock().unwrap_or_else(|p| p.into_inner());
        for t in tasks.values_mut().filter(|t| t.workspace == *id) {
            if let Some(end) = t.end.take() {
                let _ = end.send("lost");
            }
        }
    }

    /// Starts the task `spec` (its command line `remote`, from [`command::remote_command`]) in
    /// `ws`, running at `ip`, for `caller`; returns it and a receiver of its frames
    /// (subscribed before any output).
    pub async fn exec(
        self: &Arc<Self>,
        caller: Caller,
        ws: &Workspace,
        ip: std::net::Ipv4Addr,
        spec: &ExecSpec,
        remote: &str,
    ) -> Result<(TaskRow, broadcast::Receiver<Frame>)> {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|t| t.owner == ws.owner_uid)
            .count();
        self.quota
            .check_for(caller, running as u64, Claim::Tasks(1))?;
        // Also creates the tasks dir.
        let mut ssh = self.guest.command(ws, ip, remote)?;
        let id = TaskId::generate().to_string();
        let log = TaskLog::create(&self.task_log(&id), TASK_LOG_MAX)
            .map_err(|e| Error::Internal(format!("cannot create the task log: {e}")))?;
        let mut child = ssh
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                Error::Internal(format!("cannot run ssh (install openssh-client): {e}"))
            })?;
        let row = self.store.insert_task(&id, &ws.id, &spec.argv)?;
        let (frames, rx) = broadcast::channel(256);
        let (end_tx, end_rx) = oneshot::channel();
        let log = SharedLog::new(log);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.clone(),
                RunningTask {
                    workspace: ws.id.clone(),
                    owner: ws.owner_uid,
                    end: Some(end_tx),
                    log: Arc::clone(&log),
                },
            );
        // Only the program: the arguments may hold secrets (the owner sees them in `task
        // list`; the daemon's log is for the host's admin).
        tracing::info!(task = %id, workspace = %ws.id, program = %spec.argv[0], args = spec.argv.len() - 1, "task started");
        self.nudge.changed(&ws.id);
        self.feed.publish_current(&ws.id);

        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let this = Arc::clone(self);
        let ws_id = ws.id.clone();
        tokio::spawn(async move {
            let emit = |kind: u8, data: Vec<u8>| {
                {
                    let mut l = log.lock();
                    if let Err(e) = l.append(kind, &data) {
                        if !std::mem::replace(&mut l.failed, true) {
                            tracing::warn!(task = %id, error = %e, "cannot write task output to its log");
                        }
                    }
                }
                log.woken();
                let _ = frames.send(if kind == b'E' {
                    Frame::Stderr(data)
                } else {
                    Frame::Stdout(data)
                });
            };
            let (state, exit_code) = drive(&mut child, stdout, stderr, end_rx, &emit).await;
            if let Err(e) = this.store.finish_task(&id, state, exit_code) {
                tracing::error!(task = %id, error = %e, "cannot record the task's end");
            }
            {
                log.lock().end = Some((state, exit_code));
                this.running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                let _ = frames.send(Frame::End { state, exit_code });
            }
            log.woken();
            tracing::info!(task = %id, workspace = %ws_id, state, ?exit_code, "task ended");
            this.nudge.changed(&ws_id);
            this.feed.publish_current(&ws_id);
        });
        Ok((row, rx))
    }

    /// The tasks `caller` may see, of `workspace` (already checked visible to the caller) or
    /// of all.
    pub fn list(&self, caller: Caller, workspace: Option<&WorkspaceId>) -> Result<Vec<TaskRow>> {
        self.store.list_tasks(workspace, caller.owner())
    }

    pub fn get(&self, caller: Caller, id: &str) -> Result<TaskRow> {
        TaskId::parse(id)?;
        self.store.get_task(id, caller.owner())
    }

    pub fn cancel(&self, caller: Caller, id: &str) -> Result<TaskRow> {
        let task = self.get(caller, id)?;
        let sent = {
            let mut tasks = self.running.lock().unwrap_or_else(|p| p.into_inner());
            tasks
                .get_mut(id)
                .and_then(|t| t.end.take())
                .map(|end| end.send("cancelled"))
                .is_some()
        };
        if !sent {
            return Err(Error::precondition(format!(
                "task {id} is {}: only a running task can be cancelled",
                task.state
            )));
        }
        Ok(task)
    }

    /// A reader of the task's output: what it has written so far (at most its most recent
    /// two log files) and, when `follow` and it still runs, what it writes next until it
    /// ends.
    pub fn logs(&self, caller: Caller, id: &str, follow: bool) -> Result<(TaskRow, TaskLogReader)> {
        let task = self.get(caller, id)?;
        let running = {
            let tasks = self.running.lock().unwrap_or_else(|p| p.into_inner());
            tasks.get(id).map(|t| Arc::clone(&t.log))
        };
        let reader = match running {
            Some(log) if follow => TaskLogReader::new(Source::Follow(log)),
            Some(log) => TaskLogReader::new(Source::Snapshot(log)),
            None => TaskLogReader::finished(&self.task_log(id)),
        };
        Ok((task, reader))
    }

    /// Removes the logs of a workspace's tasks (with their rotated parts) and its pinned
    /// host key file: for deleting the workspace, whose task rows go with it.
    pub fn remove_logs_of(&self, ws: &WorkspaceId) -> Result<()> {
        for t in self.store.list_tasks(Some(ws), None)? {
            files::remove_log(&self.task_log(&t.id))?;
        }
        files::remove_log(&self.guest.known_hosts(ws))
    }
}

/// Pumps the child's output to `emit` until it exits or `end` asks to stop it.
async fn drive(
    child: &mut tokio::process::Child,
    mut stdout: tokio::process::ChildStdout,
    mut stderr: tokio::process::ChildStderr,
    mut end: oneshot::Receiver<&'static str>,
    emit: &impl Fn(u8, Vec<u8>),
) -> (&'static str, Option<i32>) {
    let (mut out_open, mut err_open) = (true, true);
    let mut ob = vec![0u8; MAX_FRAME];
    let mut eb = vec![0u8; MAX_FRAME];
    while out_open || err_open {
        tokio::select! {
            n = stdout.read(&mut ob), if out_open => match n {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => emit(b'O', ob[..n].to_vec()),
            },
            n = stderr.read(&mut eb), if err_open => match n {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => emit(b'E', eb[..n].to_vec()),
            },
            why = &mut end => {
                let _ = child.kill().await;
                return (why.unwrap_or("lost"), None);
            }
        }
    }
    tokio::select! {
        status = child.wait() => match status {
            Ok(s) => match s.code() {
                Some(0) => ("succeeded", Some(0)),
                Some(code) => ("failed", Some(code)),
                None => ("failed", None),
            },
            Err(_) => ("failed", None),
        },
        why = &mut end => {
            let _ = child.kill().await;
            (why.unwrap_or("lost"), None)
        }
    }
}
