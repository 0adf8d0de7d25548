//! Tasks: commands run in a workspace on a user's or agent's behalf, over the daemon's own
//! SSH connection (the system `ssh`, given an argument list, with the daemon's key and the
//! workspace's pinned host key, and no ssh config, agent or forwarding).
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

use super::*;
use crate::tasks::command::{new_task_id, remote_command, ssh_args, valid_task_id};
use crate::tasks::log::{SharedLog, TaskLog, TASK_LOG_MAX};

pub use crate::tasks::command::ExecSpec;
pub use crate::tasks::log::Frame;
use crate::tasks::log::MAX_FRAME;
use crate::tasks::reader::Source;
pub use crate::tasks::reader::TaskLogReader;

pub struct RunningTask {
    workspace: WorkspaceId,
    /// Tells the driver to end the task with this state (`cancelled` or `lost`).
    end: Option<oneshot::Sender<&'static str>>,
    log: Arc<SharedLog>,
}

impl Manager {
    fn tasks_dir(&self) -> std::path::PathBuf {
        self.layout.state_dir.join("tasks")
    }

    fn task_log(&self, id: &str) -> std::path::PathBuf {
        self.tasks_dir().join(format!("{id}.log"))
    }

    /// `ssh` to the workspace as its login user with the daemon's key and the pinned host
    /// key, running `remote` (already quoted for the guest's shell). An argument list: no
    /// local shell is involved. See [`ssh_args`].
    pub(super) fn daemon_ssh(
        &self,
        ws: &Workspace,
        ip: std::net::Ipv4Addr,
        remote: &str,
    ) -> Result<tokio::process::Command> {
        std::fs::create_dir_all(self.tasks_dir())
            .map_err(|e| Error::Internal(format!("cannot create the tasks dir: {e}")))?;
        files::set_mode(&self.tasks_dir(), 0o700)?;
        let known_hosts = self.tasks_dir().join(format!("known_hosts-{}", ws.id));
        std::fs::write(
            &known_hosts,
            format!("{} {}\n", ws.id, ws.ssh_host_public_key),
        )
        .map_err(|e| Error::Internal(format!("cannot write {}: {e}", known_hosts.display())))?;
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args(ssh_args(
            &self.layout.keys().join("id_ed25519"),
            &known_hosts,
            ws.id.as_str(),
            &ws.login_user,
            ip,
            remote,
        ));
        Ok(cmd)
    }

    /// Number of running tasks of a workspace.
    pub(super) fn running_tasks(&self, id: &WorkspaceId) -> u32 {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|t| t.workspace == *id)
            .count() as u32
    }

    /// Ends the running tasks of a workspace that left `running`: they are `lost`.
    pub(crate) fn lose_tasks_of(&self, id: &WorkspaceId) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        for t in tasks.values_mut().filter(|t| t.workspace == *id) {
            if let Some(end) = t.end.take() {
                let _ = end.send("lost");
            }
        }
    }

    /// Starts a task; returns it and a receiver of its frames (subscribed before any output).
    pub async fn exec(
        self: &Arc<Self>,
        caller: Caller,
        spec: &ExecSpec,
    ) -> Result<(TaskRow, broadcast::Receiver<Frame>)> {
        let remote = remote_command(spec)?;
        let (ws, ip) = self.running_with_address(caller, &spec.workspace)?;
        let owned: std::collections::HashSet<WorkspaceId> = self
            .owned_by(ws.owner_uid)?
            .into_iter()
            .map(|w| w.id)
            .collect();
        let running = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|t| owned.contains(&t.workspace))
            .count();
        self.quota(caller, running as u64, crate::quota::Claim::Tasks(1))?;
        // Also creates the tasks dir.
        let mut ssh = self.daemon_ssh(&ws, ip, &remote)?;
        let id = new_task_id();
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
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id.clone(),
            RunningTask {
                workspace: ws.id.clone(),
                end: Some(end_tx),
                log: Arc::clone(&log),
            },
        );
        // Only the program: the arguments may hold secrets (the owner sees them in `task
        // list`; the daemon's log is for the host's admin).
        tracing::info!(task = %id, workspace = %ws.id, program = %spec.argv[0], args = spec.argv.len() - 1, "task started");
        self.idle_changed(&ws.id);
        self.publish_current(&ws.id);

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
                this.tasks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                let _ = frames.send(Frame::End { state, exit_code });
            }
            log.woken();
            tracing::info!(task = %id, workspace = %ws_id, state, ?exit_code, "task ended");
            this.idle_changed(&ws_id);
            this.publish_current(&ws_id);
        });
        Ok((row, rx))
    }

    pub fn list_tasks(&self, caller: Caller, workspace: Option<&str>) -> Result<Vec<TaskRow>> {
        let ws = match workspace {
            Some(w) => Some(self.get_workspace(caller, w)?.id),
            None => None,
        };
        self.store.list_tasks(ws.as_ref(), caller.owner())
    }

    pub fn get_task(&self, caller: Caller, id: &str) -> Result<TaskRow> {
        valid_task_id(id)?;
        self.store.get_task(id, caller.owner())
    }

    pub fn cancel_task(&self, caller: Caller, id: &str) -> Result<TaskRow> {
        let task = self.get_task(caller, id)?;
        let sent = {
            let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
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
    pub fn task_logs(
        &self,
        caller: Caller,
        id: &str,
        follow: bool,
    ) -> Result<(TaskRow, TaskLogReader)> {
        let task = self.get_task(caller, id)?;
        let running = {
            let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
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
    pub fn remove_task_logs_of(&self, ws: &WorkspaceId) -> Result<()> {
        for t in self.store.list_tasks(Some(ws), None)? {
            files::remove_log(&self.task_log(&t.id))?;
        }
        files::remove_log(&self.tasks_dir().join(format!("known_hosts-{ws}")))
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
