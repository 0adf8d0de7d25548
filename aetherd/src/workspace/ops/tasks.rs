//! Tasks: commands run in a workspace on a user's or agent's behalf, over the daemon's own
//! SSH connection (the system `ssh`, given an argument list, with the daemon's key and the
//! workspace's pinned host key, and no ssh config, agent or forwarding).
//!
//! Output is appended to `<state>/tasks/<id>.log` as frames (`O`|`E`, u32 big-endian length,
//! bytes) and broadcast to followers; writing a frame and broadcasting it happen under the
//! task's lock, and a follower reads the file and subscribes under the same lock, so it sees
//! every byte exactly once. A running task keeps its workspace from going idle. Tasks still
//! running when their workspace leaves `running`, or when the daemon restarts, end `lost`.

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::sync::{broadcast, oneshot};

use super::*;

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
    frames: broadcast::Sender<Frame>,
    /// Tells the driver to end the task with this state (`cancelled` or `lost`).
    end: Option<oneshot::Sender<&'static str>>,
    /// Held while a frame is written and broadcast, and while a follower catches up.
    log: Arc<std::sync::Mutex<std::fs::File>>,
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
    file.write_all(&[kind])?;
    file.write_all(&(data.len() as u32).to_be_bytes())?;
    file.write_all(data)
}

/// Parses a task log into frames (a torn last frame is ignored).
pub fn read_frames(bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut i = 0;
    while i + 5 <= bytes.len() {
        let len =
            u32::from_be_bytes([bytes[i + 1], bytes[i + 2], bytes[i + 3], bytes[i + 4]]) as usize;
        let Some(data) = bytes.get(i + 5..i + 5 + len) else {
            break;
        };
        frames.push(match bytes[i] {
            b'E' => Frame::Stderr(data.to_vec()),
            _ => Frame::Stdout(data.to_vec()),
        });
        i += 5 + len;
    }
    frames
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
    pub(super) fn lose_tasks_of(&self, id: &WorkspaceId) {
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
        // Also creates the tasks dir.
        let mut ssh = self.daemon_ssh(&ws, ip, &remote)?;
        let id = new_task_id();
        let log = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(self.task_log(&id))
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
        let log = Arc::new(std::sync::Mutex::new(log));
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id.clone(),
            RunningTask {
                workspace: ws.id.clone(),
                frames: frames.clone(),
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
                let mut file = log.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = write_frame(&mut file, kind, &data) {
                    tracing::warn!(error = %e, "cannot write task output");
                }
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
                let _held = log.lock().unwrap_or_else(|p| p.into_inner());
                this.tasks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                let _ = frames.send(Frame::End { state, exit_code });
            }
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

    /// The task's output so far, and (when `follow` and it still runs) a receiver of the
    /// rest. No frame is missed or repeated between the two.
    pub fn task_logs(
        &self,
        caller: Caller,
        id: &str,
        follow: bool,
    ) -> Result<(TaskRow, Vec<Frame>, Option<broadcast::Receiver<Frame>>)> {
        let task = self.get_task(caller, id)?;
        let running = {
            let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            tasks
                .get(id)
                .map(|t| (Arc::clone(&t.log), t.frames.clone()))
        };
        let read = |path: &std::path::Path| {
            std::fs::read(path).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(Vec::new())
                } else {
                    Err(Error::Internal(format!("cannot read the task log: {e}")))
                }
            })
        };
        match running {
            Some((log, frames)) if follow => {
                let _held = log.lock().unwrap_or_else(|p| p.into_inner());
                let rx = frames.subscribe();
                let so_far = read_frames(&read(&self.task_log(id))?);
                // The task may have ended between the lookup and the lock.
                let task = self.store.get_task(id, None)?;
                Ok((task, so_far, Some(rx)))
            }
            _ => Ok((task, read_frames(&read(&self.task_log(id))?), None)),
        }
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
    let mut ob = vec![0u8; 32 * 1024];
    let mut eb = vec![0u8; 32 * 1024];
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
        let frames = read_frames(&bytes);
        assert_eq!(frames.len(), 2);
        assert!(matches!(&frames[0], Frame::Stdout(d) if d == b"out"));
        assert!(matches!(&frames[1], Frame::Stderr(d) if d == b"err"));
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
