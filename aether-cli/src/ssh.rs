//! SSH into workspaces through the daemon: `aether workspace ssh` runs the system `ssh` with
//! `aether workspace proxy` as its ProxyCommand; the proxy bridges stdin/stdout to the
//! daemon's `Tunnel` RPC, which connects to the guest.
//!
//! ```text
//!  ssh ──stdin/stdout── aether workspace proxy ──Tunnel RPC── aetherd ──TCP── guest:22
//! ```
//!
//! The guest's host key comes from the daemon and is pinned in a known_hosts file of its own,
//! with `StrictHostKeyChecking=yes`: never trust on first use. ssh runs the ProxyCommand
//! through a shell, so everything in it is validated (workspace id) or single-quoted, and a
//! path that cannot be quoted safely is refused.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use aether_domain::{validate_login, ProjectName, WorkspaceId};
use aether_proto::v1 as pb;
use anyhow::{anyhow, bail, Context};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::client::Client;
use crate::{identity, output};

/// Largest chunk of stdin in one tunnel message.
const CHUNK: usize = 32 * 1024;

/// The daemon's workspace id rule, with its message.
fn check_workspace_id(id: &str) -> anyhow::Result<()> {
    WorkspaceId::parse(id)?;
    Ok(())
}

/// `path` as a single-quoted shell word. ssh expands `%` tokens in the ProxyCommand before the
/// shell sees it, so `%` is doubled. Refused: non-UTF-8, `'` (cannot be single-quoted), `\`
/// (some shells, e.g. fish, treat it specially inside single quotes) and control characters
/// (a newline would end ssh's option line).
fn shell_quote_path(what: &str, path: &Path) -> anyhow::Result<String> {
    let s = path
        .to_str()
        .ok_or_else(|| anyhow!("{what} {} is not valid UTF-8", path.display()))?;
    if let Some(c) = s
        .chars()
        .find(|c| *c == '\'' || *c == '\\' || c.is_control())
    {
        let c = match c {
            '\'' => "a single quote",
            '\\' => "a backslash",
            _ => "a control character",
        };
        bail!("{what} {s:?} contains {c}, which cannot be passed safely to ssh's ProxyCommand");
    }
    Ok(format!("'{}'", s.replace('%', "%%")))
}

/// `path` for ssh options that expand `%` tokens and `${VAR}` in paths (UserKnownHostsFile,
/// `-i`): `%` doubled; `${`, `"` and control characters refused (there is no escape for them).
fn ssh_path(what: &str, path: &Path) -> anyhow::Result<String> {
    let s = path
        .to_str()
        .ok_or_else(|| anyhow!("{what} {} is not valid UTF-8", path.display()))?;
    if s.contains("${") || s.chars().any(|c| c == '"' || c.is_control()) {
        bail!("{what} {s:?} contains `${{`, a double quote or a control character, which ssh cannot take");
    }
    Ok(s.replace('%', "%%"))
}

/// The ProxyCommand that reaches workspace `id` through the daemon at `socket`.
pub fn proxy_command(exe: &Path, socket: &Path, id: &str) -> anyhow::Result<String> {
    check_workspace_id(id)?;
    Ok(format!(
        "{} --socket {} workspace proxy {id}",
        shell_quote_path("the aether executable's path", exe)?,
        shell_quote_path("the socket path", socket)?,
    ))
}

/// What `ssh` is run with (without argv[0]).
pub struct SshInvocation<'a> {
    pub exe: &'a Path,
    pub socket: &'a Path,
    pub id: &'a str,
    pub known_hosts: &'a Path,
    pub private_key: &'a Path,
    pub login_user: &'a str,
    pub command: &'a [String],
}

impl SshInvocation<'_> {
    pub fn args(&self) -> anyhow::Result<Vec<OsString>> {
        let proxy = proxy_command(self.exe, self.socket, self.id)?;
        if validate_login(self.login_user).is_err() {
            bail!(
                "workspace {} has an invalid login user {:?}",
                self.id,
                self.login_user
            );
        }
        // UserKnownHostsFile takes several paths separated by spaces, so one is double-quoted;
        // `-i` takes its argument as one path.
        let known_hosts = format!(
            "\"{}\"",
            ssh_path("the known_hosts path", self.known_hosts)?
        );
        let key = ssh_path("the private key path", self.private_key)?;
        let mut args: Vec<OsString> = [
            "-o".to_owned(),
            format!("ProxyCommand={proxy}"),
            "-o".to_owned(),
            format!("HostKeyAlias={}", self.id),
            "-o".to_owned(),
            format!("UserKnownHostsFile={known_hosts}"),
            "-o".to_owned(),
            "StrictHostKeyChecking=yes".to_owned(),
            "-o".to_owned(),
            "IdentitiesOnly=yes".to_owned(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        args.push("-i".into());
        args.push(key.into());
        for a in ["-l", self.login_user, "-o", "LogLevel=ERROR", self.id] {
            args.push(a.into());
        }
        if !self.command.is_empty() {
            args.push("--".into());
            args.extend(self.command.iter().map(OsString::from));
        }
        Ok(args)
    }
}

/// Why `w` cannot be reached over SSH, if it cannot.
fn ssh_refusal(w: &pb::Workspace) -> Option<String> {
    if w.state != pb::WorkspaceState::Running as i32 {
        return Some(format!(
            "workspace {} is {}: start it with `aether workspace start {}`",
            w.id,
            output::state_name(w.state),
            w.id
        ));
    }
    if w.ip_addresses.is_empty() {
        return Some(format!("workspace {} has no IP address", w.id));
    }
    if w.ssh_host_public_key.trim().is_empty() {
        // Without the key ssh would have to trust whatever answers: refuse instead.
        return Some(format!(
            "workspace {} has no SSH host key; it was not created with SSH access",
            w.id
        ));
    }
    None
}

/// Writes the known_hosts file pinning `w`'s host key under its id (the HostKeyAlias).
fn write_known_hosts(config_dir: &Path, w: &pb::Workspace) -> anyhow::Result<PathBuf> {
    let key = w.ssh_host_public_key.trim();
    if key.contains(['\n', '\r']) {
        bail!("workspace {} has a malformed SSH host key", w.id);
    }
    let dir = config_dir.join("known_hosts");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(&w.id);
    std::fs::write(&path, format!("{} {key}\n", w.id))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// `aether workspace ssh`: replaces this process with the system `ssh`.
pub async fn ssh(
    c: &mut Client,
    socket: &Path,
    config_dir: &Path,
    id: String,
    command: &[String],
) -> anyhow::Result<()> {
    check_workspace_id(&id)?;
    let w = crate::autostart::ensure_running(c, &id).await?;
    check_workspace_id(&w.id)?;
    if let Some(why) = ssh_refusal(&w) {
        bail!(why);
    }
    let known_hosts = write_known_hosts(config_dir, &w)?;
    let identity = identity::find_or_create(config_dir)?;
    let exe = std::env::current_exe().context("cannot find the aether executable's path")?;
    // The ProxyCommand runs in ssh's working directory, which is ours; an absolute socket
    // path keeps working wherever that is.
    let socket = std::path::absolute(socket)
        .with_context(|| format!("cannot resolve {}", socket.display()))?;
    let args = SshInvocation {
        exe: &exe,
        socket: &socket,
        id: &w.id,
        known_hosts: &known_hosts,
        private_key: &identity.private_key,
        login_user: &w.login_user,
        command,
    }
    .args()?;
    let e = Command::new("ssh").args(&args).exec();
    Err(anyhow!(e).context("cannot run ssh (install openssh-client)"))
}

/// A path for an ssh_config file option that expands `%` tokens (IdentityFile,
/// UserKnownHostsFile): double-quoted (it may contain spaces), `%` doubled; refused besides
/// what [`ssh_path`] refuses: `\`, an escape character in ssh_config.
fn config_path(what: &str, path: &Path) -> anyhow::Result<String> {
    let s = ssh_path(what, path)?;
    if s.contains('\\') {
        bail!("{what} {s:?} contains a backslash, which ssh_config cannot take");
    }
    Ok(format!("\"{s}\""))
}

/// One `Host` block of `aether ssh-config`.
#[derive(Debug)]
pub struct HostEntry {
    pub id: String,
    pub project: String,
    /// `<project>.aether`, when the workspace is the only one of its project.
    pub project_alias: Option<String>,
    pub user: String,
    pub identity_file: PathBuf,
    pub known_hosts: PathBuf,
    pub proxy_command: String,
    /// `identity_file` and `known_hosts` as ssh_config values.
    identity_value: String,
    known_hosts_value: String,
}

impl HostEntry {
    /// Validates and quotes everything that goes into the block.
    pub fn new(
        w: &pb::Workspace,
        only_one_in_project: bool,
        exe: &Path,
        socket: &Path,
        identity_file: &Path,
        known_hosts: &Path,
    ) -> anyhow::Result<HostEntry> {
        let proxy_command = proxy_command(exe, socket, &w.id)?;
        if validate_login(&w.login_user).is_err() {
            bail!(
                "workspace {} has an invalid login user {:?}",
                w.id,
                w.login_user
            );
        }
        // Project names are [a-z0-9-]: nothing in them means anything to a Host pattern.
        let project_alias = (only_one_in_project && ProjectName::parse(&w.project_name).is_ok())
            .then(|| format!("{}.aether", w.project_name));
        Ok(HostEntry {
            id: w.id.clone(),
            project: w.project_name.clone(),
            project_alias,
            user: w.login_user.clone(),
            identity_value: config_path("the private key path", identity_file)?,
            known_hosts_value: config_path("the known_hosts path", known_hosts)?,
            identity_file: identity_file.to_owned(),
            known_hosts: known_hosts.to_owned(),
            proxy_command,
        })
    }

    /// The names ssh matches: the id, then `<project>.aether` if there is one.
    pub fn aliases(&self) -> Vec<String> {
        std::iter::once(self.id.clone())
            .chain(self.project_alias.clone())
            .collect()
    }

    /// The OpenSSH `Host` block. ProxyCommand takes the rest of its line, as a shell command.
    pub fn config_block(&self) -> String {
        format!(
            "# aether workspace {id} (project {project})\n\
             Host {hosts}\n\
             \x20   User {user}\n\
             \x20   IdentityFile {identity}\n\
             \x20   IdentitiesOnly yes\n\
             \x20   UserKnownHostsFile {known_hosts}\n\
             \x20   StrictHostKeyChecking yes\n\
             \x20   HostKeyAlias {id}\n\
             \x20   ProxyCommand {proxy}\n",
            id = self.id,
            project = self.project,
            hosts = self.aliases().join(" "),
            user = self.user,
            identity = self.identity_value,
            known_hosts = self.known_hosts_value,
            proxy = self.proxy_command,
        )
    }

    /// The same data for `-o json`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "workspace_id": self.id,
            "project_name": self.project,
            "hosts": self.aliases(),
            "user": self.user,
            "identity_file": self.identity_file.to_string_lossy(),
            "identities_only": true,
            "user_known_hosts_file": self.known_hosts.to_string_lossy(),
            "strict_host_key_checking": true,
            "host_key_alias": self.id,
            "proxy_command": self.proxy_command,
        })
    }
}

/// `aether ssh-config`: a `Host` entry for each of the workspaces `ids` (all the caller's
/// when empty), with their host keys pinned in known_hosts files under `config_dir`. A
/// workspace without a host key is an error when named, and skipped (with a note on stderr)
/// otherwise.
pub async fn ssh_config(
    c: &mut Client,
    socket: &Path,
    config_dir: &Path,
    ids: &[String],
) -> anyhow::Result<Vec<HostEntry>> {
    for id in ids {
        check_workspace_id(id)?;
    }
    let all = c
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await?
        .into_inner()
        .workspaces;
    let mut per_project = std::collections::HashMap::<&str, usize>::new();
    for w in &all {
        *per_project.entry(w.project_id.as_str()).or_default() += 1;
    }
    let mut chosen: Vec<pb::Workspace> = Vec::new();
    if ids.is_empty() {
        chosen.extend(all.iter().cloned());
    } else {
        for id in ids {
            if chosen.iter().any(|w| &w.id == id) {
                continue;
            }
            // Asked one by one, so an unknown id fails as it does everywhere else.
            let w = c
                .get_workspace(pb::GetWorkspaceRequest { id: id.clone() })
                .await?
                .into_inner();
            chosen.push(w);
        }
    }
    let identity = identity::find_or_create(config_dir)?;
    let exe = std::env::current_exe().context("cannot find the aether executable's path")?;
    let socket = std::path::absolute(socket)
        .with_context(|| format!("cannot resolve {}", socket.display()))?;
    let mut entries = Vec::new();
    for w in &chosen {
        check_workspace_id(&w.id)?;
        if w.ssh_host_public_key.trim().is_empty() {
            let why = format!(
                "workspace {} has no SSH host key; it was not created with SSH access",
                w.id
            );
            if ids.is_empty() {
                eprintln!("aether: skipped: {why}");
                continue;
            }
            bail!(why);
        }
        let only_one = per_project
            .get(w.project_id.as_str())
            .is_none_or(|n| *n == 1);
        let known_hosts = config_dir.join("known_hosts").join(&w.id);
        entries.push(HostEntry::new(
            w,
            only_one,
            &exe,
            &socket,
            &identity.private_key,
            &known_hosts,
        )?);
    }
    // Everything is valid: now pin the keys.
    for w in chosen
        .iter()
        .filter(|w| entries.iter().any(|e| e.id == w.id))
    {
        write_known_hosts(config_dir, w)?;
    }
    Ok(entries)
}

/// Opens a tunnel to `port` of workspace `id`: the bytes sent into `to_guest` go to the guest
/// (dropping its sender half-closes the guest connection), the guest's bytes come out of the
/// returned stream, which ends after the guest's EOF. Fails as the daemon refuses (unknown
/// workspace, not running, nothing listening on the port).
pub async fn open_tunnel(
    c: &mut Client,
    id: &str,
    port: u16,
    to_guest: mpsc::Receiver<Vec<u8>>,
) -> anyhow::Result<tonic::Streaming<pb::TunnelResponse>> {
    let open = pb::TunnelRequest {
        msg: Some(pb::tunnel_request::Msg::Open(pb::TunnelOpen {
            workspace_id: id.to_owned(),
            port: port.into(),
        })),
    };
    let data = ReceiverStream::new(to_guest).map(|data| pb::TunnelRequest {
        msg: Some(pb::tunnel_request::Msg::Data(data)),
    });
    Ok(c.tunnel(tokio_stream::once(open).chain(data))
        .await?
        .into_inner())
}

/// `aether workspace proxy`: starts the workspace if it is stopped (progress on stderr: stdout
/// carries the connection), then bridges stdin and stdout to `port` of the workspace until the
/// tunnel ends (the guest closed the connection). The end of stdin half-closes it.
pub async fn proxy(c: &mut Client, id: String, port: u16) -> anyhow::Result<()> {
    check_workspace_id(&id)?;
    let w = crate::autostart::ensure_running(c, &id).await?;
    let (tx, rx) = mpsc::channel(8);
    // Plain blocking reads on a thread of their own: tokio's stdin cannot be cancelled, and a
    // read still pending when the guest closes must not keep the process alive.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; CHUNK];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("aether: cannot read stdin: {e}");
                    break;
                }
            }
        }
        // Dropping `tx` ends the request stream: the daemon half-closes the guest connection.
    });
    let mut responses = open_tunnel(c, &w.id, port, rx).await?;
    // Blocking writes are fine here: they only hold back reading more of the tunnel, which is
    // the back-pressure we want, and ssh reads its ProxyCommand's output in its own loop.
    let mut stdout = std::io::stdout();
    while let Some(msg) = responses.message().await? {
        match stdout.write_all(&msg.data).and_then(|()| stdout.flush()) {
            Ok(()) => {}
            // Nobody reads any more (ssh exited): the tunnel has no purpose left.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("cannot write to stdout"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use aether_domain::WorkspaceId;
    use aether_proto::v1 as pb;

    use super::{
        check_workspace_id, proxy_command, ssh_refusal, write_known_hosts, HostEntry, SshInvocation,
    };

    fn workspace(state: pb::WorkspaceState) -> pb::Workspace {
        pb::Workspace {
            id: "ws-abc123".into(),
            state: state as i32,
            ip_addresses: vec!["192.168.122.10".into()],
            login_user: "dev".into(),
            ssh_host_public_key: "ssh-ed25519 AAAAC3Nza host".into(),
            ..Default::default()
        }
    }

    /// Ids are checked by the daemon's rule, with its message, before anything reaches ssh.
    #[test]
    fn workspace_ids() {
        let exe = Path::new("/usr/bin/aether");
        let sock = Path::new("/run/aether/aetherd.sock");
        assert!(proxy_command(exe, sock, "ws-abc123").is_ok());
        for bad in [
            "ws-ABC123",
            "ws-abc12",
            "ws-abc1234",
            "xx-abc123",
            "ws-abc12;",
            "",
        ] {
            let e = proxy_command(exe, sock, bad).unwrap_err();
            assert_eq!(
                e.to_string(),
                WorkspaceId::parse(bad).unwrap_err().to_string(),
                "{bad:?}"
            );
        }
        assert_eq!(
            check_workspace_id("../etc").unwrap_err().to_string(),
            "invalid workspace id \"../etc\": expected ws- followed by 6 lowercase letters or digits"
        );
    }

    #[test]
    fn proxy_command_quotes_paths() {
        let cmd = proxy_command(
            Path::new("/usr/local/bin/aether"),
            Path::new("/run/aether/aetherd.sock"),
            "ws-abc123",
        )
        .unwrap();
        assert_eq!(
            cmd,
            "'/usr/local/bin/aether' --socket '/run/aether/aetherd.sock' workspace proxy ws-abc123"
        );
        // Spaces and shell syntax stay inside the quotes; `%` survives ssh's token expansion.
        let cmd = proxy_command(
            Path::new("/home/a b/$(x)/aether"),
            Path::new("/tmp/100%/s;ock"),
            "ws-abc123",
        )
        .unwrap();
        assert_eq!(
            cmd,
            "'/home/a b/$(x)/aether' --socket '/tmp/100%%/s;ock' workspace proxy ws-abc123"
        );
    }

    #[test]
    fn proxy_command_refuses_what_it_cannot_quote() {
        let exe = Path::new("/usr/bin/aether");
        let sock = Path::new("/run/aether/aetherd.sock");
        let e = proxy_command(Path::new("/tmp/it's/aether"), sock, "ws-abc123").unwrap_err();
        assert!(e.to_string().contains("executable"), "{e}");
        assert!(e.to_string().contains("single quote"), "{e}");
        let e = proxy_command(exe, Path::new("/tmp/o'neil.sock"), "ws-abc123").unwrap_err();
        assert!(e.to_string().contains("socket path"), "{e}");
        assert!(proxy_command(exe, Path::new("/tmp/a\nb"), "ws-abc123").is_err());
        assert!(proxy_command(exe, Path::new("/tmp/a\\b"), "ws-abc123").is_err());
        let e = proxy_command(exe, sock, "ws-abc123; rm -rf ~").unwrap_err();
        assert!(e.to_string().contains("invalid workspace id"), "{e}");
    }

    #[test]
    fn ssh_arguments() {
        let command = vec!["uname".to_owned(), "-a".to_owned()];
        let inv = SshInvocation {
            exe: Path::new("/usr/bin/aether"),
            socket: Path::new("/run/aether/aetherd.sock"),
            id: "ws-abc123",
            known_hosts: Path::new("/home/dev/.config/aether/known_hosts/ws-abc123"),
            private_key: Path::new("/home/dev/.ssh/id_ed25519"),
            login_user: "dev",
            command: &command,
        };
        let args = inv.args().unwrap();
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "-o",
                "ProxyCommand='/usr/bin/aether' --socket '/run/aether/aetherd.sock' workspace proxy ws-abc123",
                "-o",
                "HostKeyAlias=ws-abc123",
                "-o",
                "UserKnownHostsFile=\"/home/dev/.config/aether/known_hosts/ws-abc123\"",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-i",
                "/home/dev/.ssh/id_ed25519",
                "-l",
                "dev",
                "-o",
                "LogLevel=ERROR",
                "ws-abc123",
                "--",
                "uname",
                "-a",
            ]
        );
        let no_command = SshInvocation {
            command: &[],
            ..inv
        };
        let args = no_command.args().unwrap();
        assert_eq!(args.last().unwrap(), "ws-abc123");
        let odd_paths = SshInvocation {
            known_hosts: Path::new("/home/a b/100%/known_hosts/ws-abc123"),
            private_key: Path::new("/home/a b/100%/id"),
            command: &[],
            ..inv
        };
        let args = odd_paths.args().unwrap();
        assert_eq!(
            args[5],
            "UserKnownHostsFile=\"/home/a b/100%%/known_hosts/ws-abc123\""
        );
        assert_eq!(args[11], "/home/a b/100%%/id");
        let env_in_path = SshInvocation {
            private_key: Path::new("/home/${USER}/id"),
            command: &[],
            ..inv
        };
        assert!(env_in_path.args().is_err());
        let bad_user = SshInvocation {
            login_user: "-oProxyCommand=x",
            command: &[],
            ..inv
        };
        assert!(bad_user.args().is_err());
    }

    #[test]
    fn ssh_needs_a_running_workspace_with_an_address_and_a_host_key() {
        assert_eq!(ssh_refusal(&workspace(pb::WorkspaceState::Running)), None);
        let why = ssh_refusal(&workspace(pb::WorkspaceState::Stopped)).unwrap();
        assert_eq!(
            why,
            "workspace ws-abc123 is stopped: start it with `aether workspace start ws-abc123`"
        );
        let mut w = workspace(pb::WorkspaceState::Running);
        w.ip_addresses.clear();
        assert!(ssh_refusal(&w).unwrap().contains("has no IP address"));
        let mut w = workspace(pb::WorkspaceState::Running);
        w.ssh_host_public_key.clear();
        assert!(ssh_refusal(&w).unwrap().contains("no SSH host key"));
    }

    fn entry(only_one: bool, key: &str, known_hosts: &str) -> anyhow::Result<HostEntry> {
        let mut w = workspace(pb::WorkspaceState::Stopped);
        w.project_name = "my-app".into();
        HostEntry::new(
            &w,
            only_one,
            Path::new("/usr/local/bin/aether"),
            Path::new("/run/aether/aetherd.sock"),
            Path::new(key),
            Path::new(known_hosts),
        )
    }

    #[test]
    fn ssh_config_block() {
        let e = entry(
            true,
            "/home/dev/.ssh/id_ed25519",
            "/home/dev/.config/aether/known_hosts/ws-abc123",
        )
        .unwrap();
        assert_eq!(
            e.config_block(),
            "# aether workspace ws-abc123 (project my-app)\n\
             Host ws-abc123 my-app.aether\n\
             \x20   User dev\n\
             \x20   IdentityFile \"/home/dev/.ssh/id_ed25519\"\n\
             \x20   IdentitiesOnly yes\n\
             \x20   UserKnownHostsFile \"/home/dev/.config/aether/known_hosts/ws-abc123\"\n\
             \x20   StrictHostKeyChecking yes\n\
             \x20   HostKeyAlias ws-abc123\n\
             \x20   ProxyCommand '/usr/local/bin/aether' --socket '/run/aether/aetherd.sock' workspace proxy ws-abc123\n"
        );
        let j = e.json();
        assert_eq!(
            j["hosts"],
            serde_json::json!(["ws-abc123", "my-app.aether"])
        );
        assert_eq!(j["identity_file"], "/home/dev/.ssh/id_ed25519");
        assert_eq!(j["host_key_alias"], "ws-abc123");
        assert_eq!(j["proxy_command"], e.proxy_command.as_str());
        // Not the only workspace of its project: no project alias.
        let e = entry(false, "/k", "/kh").unwrap();
        assert!(e.config_block().contains("\nHost ws-abc123\n"));
        assert_eq!(e.aliases(), ["ws-abc123"]);
    }

    #[test]
    fn ssh_config_paths_are_quoted_or_refused() {
        let e = entry(true, "/home/a b/100%/id", "/home/a b/kh").unwrap();
        let block = e.config_block();
        assert!(
            block.contains("    IdentityFile \"/home/a b/100%%/id\"\n"),
            "{block}"
        );
        assert!(block.contains("    UserKnownHostsFile \"/home/a b/kh\"\n"));
        for (key, kh) in [
            ("/home/a\\b/id", "/kh"),
            ("/home/\"x\"/id", "/kh"),
            ("/home/${USER}/id", "/kh"),
            ("/k", "/home/a\nb/kh"),
        ] {
            assert!(entry(true, key, kh).is_err(), "{key:?} {kh:?}");
        }
        // Login users the daemon refuses, root among them (the CLI's old copy of the rule
        // let root through).
        for user in ["-oProxyCommand=x", "root"] {
            let mut w = workspace(pb::WorkspaceState::Running);
            w.login_user = user.into();
            let e = HostEntry::new(
                &w,
                true,
                Path::new("/a"),
                Path::new("/s"),
                Path::new("/k"),
                Path::new("/kh"),
            );
            assert!(e.is_err(), "{user}");
        }
        // A project name the daemon would refuse gets no alias.
        let mut w = workspace(pb::WorkspaceState::Running);
        w.project_name = "*".into();
        let e = HostEntry::new(
            &w,
            true,
            Path::new("/a"),
            Path::new("/s"),
            Path::new("/k"),
            Path::new("/kh"),
        )
        .unwrap();
        assert_eq!(e.aliases(), ["ws-abc123"]);
    }

    #[test]
    fn known_hosts_pins_the_key_under_the_workspace_id() {
        let dir = std::env::temp_dir().join(format!("aether-ssh-test-{}", std::process::id()));
        let w = workspace(pb::WorkspaceState::Running);
        let path = write_known_hosts(&dir, &w).unwrap();
        assert_eq!(path, dir.join("known_hosts").join("ws-abc123"));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "ws-abc123 ssh-ed25519 AAAAC3Nza host\n"
        );
        let mut w = w;
        w.ssh_host_public_key = "ssh-ed25519 AAAA\nws-evil ssh-ed25519 BBBB".into();
        assert!(write_known_hosts(&dir, &w).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
