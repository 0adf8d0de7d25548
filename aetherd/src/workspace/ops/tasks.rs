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

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, oneshot, watch};

use super::*;

/// Largest a task's log file grows before it is rotated to `<id>.log.1`.
pub const TASK_LOG_MAX: u64 = 16 << 20;

/// `TaskLogs` reads a log in chunks of at most this many bytes.
pub const LOG_CHUNK: usize = 64 << 10;

/// Largest frame the writer makes (one read of the child's output) and a reader accepts.
const MAX_FRAME: usize = 32 << 10;

/// A piece of a task's life, as followers see it.
#[derive(Clone, Debug)]
pub enum Frame {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    End {
        state: &'static str,
        exit_code: Option<i32>,
    },
}

pub(super) struct RunningTask {
    workspace: WorkspaceId,
    /// Tells the driver to end the task with this state (`cancelled` or `lost`).
    end: Option<oneshot::Sender<&'static str>>,
    log: Arc<SharedLog>,
}

/// A running task's log, shared by its writer and its followers.
pub struct SharedLog {
    /// Held only for a write, a rotation, or a follower's look at where the log is (plus
    /// opening the file it moves on to); never across an await.
    log: std::sync::Mutex<TaskLog>,
    /// Bumped after every write and at the end: followers wait for it.
    wake: watch::Sender<u64>,
}

impl SharedLog {
    fn new(log: TaskLog) -> Arc<Self> {
        Arc::new(SharedLog {
            log: std::sync::Mutex::new(log),
            wake: watch::Sender::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TaskLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn woken(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The writer's side of a task log: the current file, capped by rotation.
pub struct TaskLog {
    path: PathBuf,
    file: std::fs::File,
    /// Bytes in the current file; always at a frame boundary.
    len: u64,
    /// Rotations so far: the current file is generation `rotations`, `.1` the one before.
    rotations: u64,
    cap: u64,
    /// How the task ended, once it has.
    end: Option<(&'static str, Option<i32>)>,
    /// A write failed already (warned about once).
    failed: bool,
}

impl TaskLog {
    /// Creates the log file (which must not exist yet).
    pub fn create(path: &Path, cap: u64) -> std::io::Result<TaskLog> {
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(path)?;
        Ok(TaskLog {
            path: path.to_owned(),
            file,
            len: 0,
            rotations: 0,
            cap,
            end: None,
            failed: false,
        })
    }

    /// Appends one frame, first rotating the file if the frame would take it past the cap.
    /// A failed write is cut off again, so readers never see a torn frame.
    pub fn append(&mut self, kind: u8, data: &[u8]) -> std::io::Result<()> {
        let size = 5 + data.len() as u64;
        if self.len > 0 && self.len + size > self.cap {
            std::fs::rename(&self.path, files::rotated(&self.path, 1))?;
            self.file = std::fs::OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&self.path)?;
            self.len = 0;
            self.rotations += 1;
        }
        if let Err(e) = write_frame(&mut self.file, kind, data) {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += size;
        Ok(())
    }
}

/// What `exec` is asked to run.
#[derive(Clone, Debug, Default)]
pub struct ExecSpec {
    pub workspace: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: String,
}

/// POSIX shell single-quoting: the guest's login shell gets each word back unchanged.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The remote command line for `spec` (validated: no NUL anywhere, sane env names).
pub fn remote_command(spec: &ExecSpec) -> Result<String> {
    if spec.argv.is_empty() {
        return Err(Error::invalid(
            "no command given: aether workspace exec ID -- CMD...",
        ));
    }
    let nul = |s: &str| s.contains('\0');
    if spec.argv.iter().any(|a| nul(a)) || nul(&spec.workdir) {
        return Err(Error::invalid(
            "commands and paths cannot contain NUL bytes",
        ));
    }
    let mut cmd = String::new();
    if !spec.workdir.is_empty() {
        cmd.push_str(&format!("cd {} && ", sh_quote(&spec.workdir)));
    }
    if !spec.env.is_empty() {
        cmd.push_str("env ");
        for (k, v) in &spec.env {
            let ok = k
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok || nul(v) {
                return Err(Error::invalid(format!(
                    "invalid environment variable {k:?}: names match ^[A-Za-z_][A-Za-z0-9_]*$"
                )));
            }
            cmd.push_str(&sh_quote(&format!("{k}={v}")));
            cmd.push(' ');
        }
    }
    let words: Vec<String> = spec.argv.iter().map(|a| sh_quote(a)).collect();
    cmd.push_str(&words.join(" "));
    Ok(cmd)
}

fn new_task_id() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the kernel's random source is available");
    let abc = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let s: String = b
        .iter()
        .map(|x| abc[*x as usize % abc.len()] as char)
        .collect();
    format!("task-{s}")
}

fn valid_task_id(id: &str) -> Result<()> {
    let ok = id.len() == 13
        && id.starts_with("task-")
        && id[5..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid task id {id:?}: expected task- followed by 8 lowercase letters or digits"
        )))
    }
}

fn write_frame(file: &mut std::fs::File, kind: u8, data: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(5 + data.len());
    frame.push(kind);
    frame.extend_from_slice(&(data.len() as u32).to_be_bytes());
    frame.extend_from_slice(data);
    file.write_all(&frame)
}

/// Takes the whole frames off the front of `buf`, leaving an incomplete last one there.
/// `true` with them when a frame claims more than the writer ever makes: the rest of that
/// file is damaged.
fn take_frames(buf: &mut Vec<u8>) -> (Vec<Frame>, bool) {
    let mut frames = Vec::new();
    let mut i = 0;
    let mut damaged = false;
    while buf.len() - i >= 5 {
        let len = u32::from_be_bytes([buf[i + 1], buf[i + 2], buf[i + 3], buf[i + 4]]) as usize;
        if len > MAX_FRAME {
            damaged = true;
            break;
        }
        let Some(data) = buf.get(i + 5..i + 5 + len) else {
            break;
        };
        frames.push(match buf[i] {
            b'E' => Frame::Stderr(data.to_vec()),
            _ => Frame::Stdout(data.to_vec()),
        });
        i += 5 + len;
    }
    buf.drain(..i);
    (frames, damaged)
}

/// One file of a log, opened before it could be renamed away, read from `pos` to `until`
/// (or its end).
struct Part {
    file: std::fs::File,
    pos: u64,
    until: Option<u64>,
}

impl Part {
    fn new(file: std::fs::File, until: Option<u64>) -> Part {
        Part {
            file,
            pos: 0,
            until,
        }
    }
}

/// Opens `path`; `None` if it does not exist.
fn open_if_there(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What one blocking step of a reader produced.
enum Step {
    Frames(Vec<Frame>),
    /// Caught up with a running task: wait for its writer.
    Wait,
    /// Nothing more; how the task ended when a follower saw it end.
    End(Option<(&'static str, Option<i32>)>),
}

/// Which log a reader reads, and how.
enum Source {
    /// A finished task: `.1`, then the current file, each to its end.
    Finished(PathBuf),
    /// A running task, up to where its log was when the reader opened it.
    Snapshot(Arc<SharedLog>),
    /// A running task, then what it writes next until it ends.
    Follow(Arc<SharedLog>),
}

/// The blocking half of a [`TaskLogReader`]: runs on the blocking pool, one step at a time.
struct ReaderState {
    source: Source,
    opened: bool,
    /// Files still to read, oldest first. Following, the last one is the writer's current
    /// file of generation `generation`, read as far as the writer has written.
    parts: VecDeque<Part>,
    generation: u64,
    /// Bytes read but not yet returned: the start of a frame.
    buf: Vec<u8>,
}

impl ReaderState {
    fn new(source: Source) -> ReaderState {
        ReaderState {
            source,
            opened: false,
            parts: VecDeque::new(),
            generation: 0,
            buf: Vec::new(),
        }
    }

    /// Opens the files to read: `.1` (when there is one) and the current file.
    fn open(&mut self) -> std::io::Result<()> {
        match &self.source {
            Source::Finished(path) => {
                for p in [files::rotated(path, 1), path.clone()] {
                    if let Some(f) = open_if_there(&p)? {
                        self.parts.push_back(Part::new(f, None));
                    }
                }
            }
            Source::Snapshot(shared) | Source::Follow(shared) => {
                let follow = matches!(self.source, Source::Follow(_));
                // Under the lock, so no rotation falls between the two opens.
                let log = shared.lock();
                if log.rotations > 0 {
                    if let Some(f) = open_if_there(&files::rotated(&log.path, 1))? {
                        self.parts.push_back(Part::new(f, None));
                    }
                }
                let current = std::fs::File::open(&log.path)?;
                let until = (!follow).then_some(log.len);
                self.parts.push_back(Part::new(current, until));
                self.generation = log.rotations;
            }
        }
        Ok(())
    }

    /// Reads on until it has frames to return (from one read of at most [`LOG_CHUNK`]
    /// bytes, plus the start of a frame left from the read before), has to wait for the
    /// writer, or is at the end.
    fn step(&mut self) -> std::io::Result<Step> {
        use std::os::unix::fs::FileExt;
        if !self.opened {
            self.open()?;
            self.opened = true;
        }
        let mut chunk = vec![0u8; LOG_CHUNK];
        loop {
            let live = match &self.source {
                Source::Follow(shared) if self.parts.len() == 1 => Some(Arc::clone(shared)),
                _ => None,
            };
            let Some(part) = self.parts.front_mut() else {
                return Ok(Step::End(None));
            };
            // How far this part may be read.
            let until = match &live {
                Some(shared) => {
                    let log = shared.lock();
                    if log.rotations == self.generation {
                        if part.pos >= log.len {
                            return Ok(match log.end {
                                Some(end) => Step::End(Some(end)),
                                None => Step::Wait,
                            });
                        }
                        Some(log.len)
                    } else {
                        // Rotated away: complete, read it to its end.
                        None
                    }
                }
                None => part.until,
            };
            let want = match until {
                Some(u) => (u.saturating_sub(part.pos) as usize).min(LOG_CHUNK),
                None => LOG_CHUNK,
            };
            let n = if want == 0 {
                0
            } else {
                part.file.read_at(&mut chunk[..want], part.pos)?
            };
            if n == 0 && live.is_some() && until.is_some() {
                // Shorter than its writer says (a failed write being cut off): not done.
                return Ok(Step::Wait);
            }
            let mut done = n == 0;
            if n > 0 {
                part.pos += n as u64;
                self.buf.extend_from_slice(&chunk[..n]);
                let (frames, damaged) = take_frames(&mut self.buf);
                if damaged {
                    self.buf.clear();
                    match (&live, until) {
                        // The writer's length is a frame boundary: carry on from there.
                        (Some(_), Some(u)) => part.pos = u,
                        _ => done = true,
                    }
                }
                if done {
                    self.next_part(live.as_deref())?;
                }
                if !frames.is_empty() {
                    return Ok(Step::Frames(frames));
                }
                continue;
            }
            self.next_part(live.as_deref())?;
        }
    }

    /// Done with the first part: a torn frame at its end is dropped (frames never span
    /// files). Following, when it was the writer's old file, opens what the writer wrote
    /// since, under its lock so it cannot rotate in between; after more than one rotation
    /// the files between are gone and `.1` is the oldest output left.
    fn next_part(&mut self, live: Option<&SharedLog>) -> std::io::Result<()> {
        self.buf.clear();
        self.parts.pop_front();
        if let Some(shared) = live {
            let log = shared.lock();
            if log.rotations > self.generation + 1 {
                if let Some(f) = open_if_there(&files::rotated(&log.path, 1))? {
                    self.parts.push_back(Part::new(f, None));
                }
            }
            self.parts
                .push_back(Part::new(std::fs::File::open(&log.path)?, None));
            self.generation = log.rotations;
        }
        Ok(())
    }
}

/// Reads a task's log in bounded chunks, oldest output first (`.1`, then the current file);
/// following a running task, then what it writes next, until it ends. File I/O runs on the
/// blocking pool; waiting for output is a plain await.
pub struct TaskLogReader {
    /// Taken while a step runs.
    state: Option<ReaderState>,
    wake: Option<watch::Receiver<u64>>,
    end: Option<(&'static str, Option<i32>)>,
    done: bool,
}

impl TaskLogReader {
    fn new(source: Source) -> TaskLogReader {
        let wake = match &source {
            Source::Follow(shared) => Some(shared.wake.subscribe()),
            _ => None,
        };
        TaskLogReader {
            state: Some(ReaderState::new(source)),
            wake,
            end: None,
            done: false,
        }
    }

    /// The log of a task that has ended, read to its end.
    pub fn finished(path: &Path) -> TaskLogReader {
        Self::new(Source::Finished(path.to_owned()))
    }

    /// The next frames (about [`LOG_CHUNK`] bytes of output at most), or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Vec<Frame>>> {
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some(w) = &mut self.wake {
                // Seen before the step looks, so a write after its look wakes the wait below.
                w.borrow_and_update();
            }
            let Some(mut state) = self.state.take() else {
                self.done = true;
                return Err(Error::Internal("the task log reader failed".into()));
            };
            let (state, step) = tokio::task::spawn_blocking(move || {
                let step = state.step();
                (state, step)
            })
            .await
            .map_err(|e| Error::Internal(format!("the task log reader failed: {e}")))?;
            self.state = Some(state);
            match step {
                Err(e) => {
                    self.done = true;
                    return Err(Error::Internal(format!("cannot read the task log: {e}")));
                }
                Ok(Step::Frames(frames)) => return Ok(Some(frames)),
                Ok(Step::Wait) => {
                    if let Some(w) = &mut self.wake {
                        // The sender lives in the log this reader holds: this cannot fail.
                        let _ = w.changed().await;
                    }
                }
                Ok(Step::End(end)) => {
                    self.end = end;
                    self.done = true;
                    return Ok(None);
                }
            }
        }
    }

    /// How the task ended, when this reader followed it to its end.
    pub fn end(&self) -> Option<(&'static str, Option<i32>)> {
        self.end
    }
}

/// The arguments of the daemon's `ssh` to a workspace. Nothing of the host's or root's ssh
/// setup applies: no config file (`-F /dev/null`, neither `/etc/ssh/ssh_config` nor
/// `~/.ssh/config`), no agent (`IdentityAgent=none`), only the daemon's key
/// (`IdentitiesOnly`), no agent or X11 forwarding (`-a`, `-x`) or any other forwarding, no
/// tty, never a prompt (`BatchMode`), and only the workspace's pinned host key
/// (`known_hosts`, under `alias`; the system's known hosts are not read).
pub fn ssh_args(
    key: &Path,
    known_hosts: &Path,
    alias: &str,
    user: &str,
    ip: std::net::Ipv4Addr,
    remote: &str,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["-F", "/dev/null", "-a", "-x", "-T", "-i"]
        .iter()
        .map(OsString::from)
        .collect();
    args.push(key.as_os_str().to_owned());
    let mut known = OsString::from("UserKnownHostsFile=");
    known.push(known_hosts.as_os_str());
    for opt in [
        OsString::from("IdentitiesOnly=yes"),
        "IdentityAgent=none".into(),
        "BatchMode=yes".into(),
        "ForwardAgent=no".into(),
        "ForwardX11=no".into(),
        "ClearAllForwardings=yes".into(),
        "PermitLocalCommand=no".into(),
        "StrictHostKeyChecking=yes".into(),
        known,
        "GlobalKnownHostsFile=/dev/null".into(),
        format!("HostKeyAlias={alias}").into(),
        "UpdateHostKeys=no".into(),
        "ConnectTimeout=10".into(),
        "LogLevel=ERROR".into(),
    ] {
        args.push("-o".into());
        args.push(opt);
    }
    for a in ["-l", user, "-p", "22", &ip.to_string(), "--", remote] {
        args.push(a.into());
    }
    args
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_every_word() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        let spec = ExecSpec {
            workspace: "ws-abc123".into(),
            argv: vec!["echo".into(), "$(rm -rf /)".into(), "a'b".into()],
            env: vec![("GREETING".into(), "hi there".into())],
            workdir: "/tmp/x y".into(),
        };
        assert_eq!(
            remote_command(&spec).unwrap(),
            r"cd '/tmp/x y' && env 'GREETING=hi there' 'echo' '$(rm -rf /)' 'a'\''b'"
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        let spec = |argv: Vec<&str>, env: Vec<(&str, &str)>| ExecSpec {
            workspace: "ws-abc123".into(),
            argv: argv.into_iter().map(Into::into).collect(),
            env: env.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
            workdir: String::new(),
        };
        assert!(remote_command(&spec(vec![], vec![])).is_err());
        assert!(remote_command(&spec(vec!["a\0b"], vec![])).is_err());
        for bad in ["1X", "A-B", "", "A B", "A=B"] {
            assert!(
                remote_command(&spec(vec!["true"], vec![(bad, "v")])).is_err(),
                "{bad}"
            );
        }
        assert!(valid_task_id("task-abc12345").is_ok());
        for bad in ["task-ABC12345", "task-abc1234", "ws-abc123", "../x"] {
            assert!(valid_task_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn frames_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let mut f = std::fs::File::create(&p).unwrap();
        write_frame(&mut f, b'O', b"out").unwrap();
        write_frame(&mut f, b'E', b"err").unwrap();
        drop(f);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.extend_from_slice(&[b'O', 0, 0, 0, 9, b'x']); // torn last frame
        let (frames, damaged) = take_frames(&mut bytes);
        assert!(!damaged);
        assert_eq!(frames.len(), 2);
        assert!(matches!(&frames[0], Frame::Stdout(d) if d == b"out"));
        assert!(matches!(&frames[1], Frame::Stderr(d) if d == b"err"));
        assert_eq!(
            bytes,
            [b'O', 0, 0, 0, 9, b'x'],
            "the torn frame is kept for later"
        );
        // A length no writer makes: damaged, and nothing is buffered for it.
        let mut bad = vec![b'O', 0x7f, 0xff, 0xff, 0xff, b'x'];
        let (frames, damaged) = take_frames(&mut bad);
        assert!(frames.is_empty() && damaged);
    }

    /// The output in `frames`, `O:`/`E:` prefixed, and whether an end was seen.
    fn text(frames: &[Frame]) -> String {
        frames
            .iter()
            .map(|f| match f {
                Frame::Stdout(d) => format!("O:{}", String::from_utf8_lossy(d)),
                Frame::Stderr(d) => format!("E:{}", String::from_utf8_lossy(d)),
                Frame::End { state, .. } => format!("END:{state}"),
            })
            .collect()
    }

    /// Output bytes carried by `frames`.
    fn payload(frames: &[Frame]) -> usize {
        frames
            .iter()
            .map(|f| match f {
                Frame::Stdout(d) | Frame::Stderr(d) => d.len(),
                Frame::End { .. } => 0,
            })
            .sum()
    }

    /// Steps `r` until it waits or ends; returns the frames and the last step's kind.
    fn drain(r: &mut ReaderState) -> (Vec<Frame>, &'static str) {
        let mut all = Vec::new();
        loop {
            match r.step().unwrap() {
                Step::Frames(f) => {
                    let bytes = payload(&f);
                    assert!(
                        bytes <= LOG_CHUNK + MAX_FRAME,
                        "one step returned {bytes} bytes"
                    );
                    all.extend(f);
                }
                Step::Wait => return (all, "wait"),
                Step::End(_) => return (all, "end"),
            }
        }
    }

    fn frame(i: usize) -> String {
        format!("{i:04}.")
    }

    #[test]
    fn a_task_log_rotates_at_its_cap_keeping_the_newest_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-abc12345.log");
        // Frames of 5 + 5 bytes; 100 bytes hold 10 of them.
        let mut log = TaskLog::create(&path, 100).unwrap();
        assert!(TaskLog::create(&path, 100).is_err(), "never reuses a log");
        for i in 0..35 {
            log.append(b'O', frame(i).as_bytes()).unwrap();
            let cur = std::fs::metadata(&path).unwrap().len();
            assert!(cur <= 100, "{cur}");
            assert_eq!(cur, log.len);
        }
        assert_eq!(log.rotations, 3);
        let rotated = files::rotated(&path, 1);
        assert_eq!(std::fs::metadata(&rotated).unwrap().len(), 100);
        assert!(
            !files::rotated(&path, 2).exists(),
            "one rotated file, replaced each time"
        );
        let mut r = ReaderState::new(Source::Finished(path.clone()));
        let (frames, how) = drain(&mut r);
        assert_eq!(how, "end");
        let want: String = (20..35).map(|i| format!("O:{}", frame(i))).collect();
        assert_eq!(
            text(&frames),
            want,
            ".1 then the current file: the last 15 frames"
        );

        // Deleting the task's logs takes the rotated one too.
        files::remove_log(&path).unwrap();
        assert!(!path.exists() && !rotated.exists());
    }

    #[test]
    fn a_big_log_is_read_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-abc12345.log");
        let mut log = TaskLog::create(&path, TASK_LOG_MAX).unwrap();
        // 40 MiB of full-size frames: rotated twice, 32 MiB kept at most.
        let data = vec![b'x'; MAX_FRAME];
        let n = (40 << 20) / MAX_FRAME;
        for i in 0..n {
            let mut d = data.clone();
            d[..8].copy_from_slice(format!("{i:08}").as_bytes());
            log.append(if i % 2 == 0 { b'O' } else { b'E' }, &d)
                .unwrap();
        }
        assert_eq!(log.rotations, 2);
        let mut r = ReaderState::new(Source::Finished(path.clone()));
        let mut first = None;
        let mut last = None;
        let mut count = 0;
        let mut total = 0;
        loop {
            match r.step().unwrap() {
                Step::Frames(f) => {
                    let bytes = payload(&f);
                    assert!(bytes <= LOG_CHUNK + MAX_FRAME, "{bytes}");
                    assert!(r.buf.len() < MAX_FRAME + 5, "buffered {}", r.buf.len());
                    total += bytes;
                    for f in f {
                        let (Frame::Stdout(d) | Frame::Stderr(d)) = f else {
                            panic!("no end frame in a log")
                        };
                        let i: usize = std::str::from_utf8(&d[..8]).unwrap().parse().unwrap();
                        if let Some(prev) = last {
                            assert_eq!(i, prev + 1, "in order, none missing or repeated");
                        }
                        first.get_or_insert(i);
                        last = Some(i);
                        count += 1;
                    }
                }
                Step::Wait => panic!("a finished log never waits"),
                Step::End(end) => {
                    assert!(end.is_none());
                    break;
                }
            }
        }
        assert_eq!(last, Some(n - 1), "ends with the newest output");
        assert!(total as u64 <= 2 * TASK_LOG_MAX && total as u64 > TASK_LOG_MAX);
        assert_eq!(count, n - first.unwrap());
    }

    #[test]
    fn a_follower_sees_every_frame_once_across_rotations_then_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-abc12345.log");
        let shared = SharedLog::new(TaskLog::create(&path, 100).unwrap());
        for i in 0..5 {
            shared.lock().append(b'O', frame(i).as_bytes()).unwrap();
        }
        let mut r = ReaderState::new(Source::Follow(Arc::clone(&shared)));
        let mut seen = Vec::new();
        let mut next = 5;
        // The writer runs ahead by up to one rotation (13 frames) between reads.
        for burst in [0, 1, 7, 13, 3, 13, 0, 9] {
            for _ in 0..burst {
                shared.lock().append(b'E', frame(next).as_bytes()).unwrap();
                next += 1;
            }
            let (frames, how) = drain(&mut r);
            assert_eq!(how, "wait");
            seen.extend(frames);
        }
        assert!(shared.lock().rotations >= 4);
        let want: String = (0..next)
            .map(|i| format!("{}:{}", if i < 5 { "O" } else { "E" }, frame(i)))
            .collect();
        assert_eq!(text(&seen), want);

        // The end, after the last output.
        shared.lock().append(b'O', b"bye").unwrap();
        shared.lock().end = Some(("succeeded", Some(0)));
        match r.step().unwrap() {
            Step::Frames(f) => assert_eq!(text(&f), "O:bye"),
            _ => panic!("the last output comes before the end"),
        }
        assert!(matches!(
            r.step().unwrap(),
            Step::End(Some(("succeeded", Some(0))))
        ));
    }

    #[test]
    fn a_follower_far_behind_finishes_its_file_then_gets_the_newest_output_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-abc12345.log");
        let shared = SharedLog::new(TaskLog::create(&path, 100).unwrap());
        for i in 0..5 {
            shared.lock().append(b'O', frame(i).as_bytes()).unwrap();
        }
        let mut slow = ReaderState::new(Source::Follow(Arc::clone(&shared)));
        let (frames, _) = drain(&mut slow);
        assert_eq!(frames.len(), 5);
        // Three rotations: files of frames 0..9, 10..19, 20..29, and 30..39 (current).
        for i in 5..40 {
            shared.lock().append(b'O', frame(i).as_bytes()).unwrap();
        }
        assert_eq!(shared.lock().rotations, 3);
        let (frames, how) = drain(&mut slow);
        assert_eq!(how, "wait");
        // Its open file is read to its end though renamed and replaced; 10..19 were rotated
        // out; then `.1` and the current file.
        let want: String = (5..10)
            .chain(20..40)
            .map(|i| format!("O:{}", frame(i)))
            .collect();
        assert_eq!(text(&frames), want);
    }

    #[test]
    fn a_snapshot_stops_where_the_log_was_even_as_it_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-abc12345.log");
        let shared = SharedLog::new(TaskLog::create(&path, 100).unwrap());
        for i in 0..14 {
            shared.lock().append(b'O', frame(i).as_bytes()).unwrap();
        }
        let mut r = ReaderState::new(Source::Snapshot(Arc::clone(&shared)));
        r.open().unwrap();
        r.opened = true;
        // Two more rotations after the reader opened its files.
        for i in 14..40 {
            shared.lock().append(b'O', frame(i).as_bytes()).unwrap();
        }
        let (frames, how) = drain(&mut r);
        assert_eq!(how, "end");
        let want: String = (0..14).map(|i| format!("O:{}", frame(i))).collect();
        assert_eq!(text(&frames), want);
    }

    #[tokio::test]
    async fn a_follower_waits_for_output_without_holding_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-abc12345.log");
        let shared = SharedLog::new(TaskLog::create(&path, 1 << 20).unwrap());
        let mut reader = TaskLogReader::new(Source::Follow(Arc::clone(&shared)));
        let writer = {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                for i in 0..50 {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    // The log's lock is free: the follower waits on the watch, not on it.
                    shared.lock().append(b'O', frame(i).as_bytes()).unwrap();
                    shared.woken();
                }
                shared.lock().end = Some(("failed", Some(3)));
                shared.woken();
            })
        };
        let mut got = Vec::new();
        while let Some(frames) =
            tokio::time::timeout(std::time::Duration::from_secs(10), reader.next())
                .await
                .expect("the follower is woken")
                .unwrap()
        {
            got.extend(frames);
        }
        writer.await.unwrap();
        let want: String = (0..50).map(|i| format!("O:{}", frame(i))).collect();
        assert_eq!(text(&got), want);
        assert_eq!(reader.end(), Some(("failed", Some(3))));
        assert!(reader.next().await.unwrap().is_none());
    }

    #[test]
    fn the_daemons_ssh_reads_no_config_and_forwards_nothing() {
        let args = ssh_args(
            Path::new("/var/lib/aether/keys/id_ed25519"),
            Path::new("/var/lib/aether/tasks/known_hosts-ws-abc123"),
            "ws-abc123",
            "alice",
            std::net::Ipv4Addr::new(192, 168, 150, 7),
            "'echo' 'hi'",
        );
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        let opts: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-o")
            .map(|w| w[1])
            .collect();
        assert_eq!(
            &args[..2],
            ["-F", "/dev/null"],
            "no system or user ssh config"
        );
        for flag in ["-a", "-x", "-T"] {
            assert!(args.contains(&flag), "{flag}: {args:?}");
        }
        for opt in [
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
            "BatchMode=yes",
            "ForwardAgent=no",
            "ForwardX11=no",
            "ClearAllForwardings=yes",
            "StrictHostKeyChecking=yes",
            "UserKnownHostsFile=/var/lib/aether/tasks/known_hosts-ws-abc123",
            "GlobalKnownHostsFile=/dev/null",
            "HostKeyAlias=ws-abc123",
        ] {
            assert!(opts.contains(&opt), "{opt}: {args:?}");
        }
        let keys: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-i")
            .map(|w| w[1])
            .collect();
        assert_eq!(
            keys,
            ["/var/lib/aether/keys/id_ed25519"],
            "only the daemon's key"
        );
        assert!(
            !args
                .iter()
                .any(|a| a.starts_with("-A") || a.starts_with("-X") || a.starts_with("-Y")),
            "{args:?}"
        );
        // The remote command is one word after `--`, as quoted for the guest's shell.
        let n = args.len();
        assert_eq!(
            &args[n - 7..],
            [
                "-l",
                "alice",
                "-p",
                "22",
                "192.168.150.7",
                "--",
                "'echo' 'hi'"
            ]
        );
    }
}
