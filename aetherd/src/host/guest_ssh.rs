//! The daemon's SSH sessions into guests (tasks, and the readiness check that cloud-init
//! has finished): the system `ssh`, given an argument list (no local shell), with the
//! daemon's key, the workspace's pinned host key, and no ssh config, agent or forwarding
//! (see [`ssh_args`]).

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::files;
use crate::host::Layout;
use crate::model::WorkspaceId;
use crate::store::Workspace;
use crate::tasks::command::ssh_args;

/// Where the daemon's key and the pinned host keys are.
#[derive(Clone, Debug)]
pub struct GuestSsh {
    key: PathBuf,
    /// 0700; holds `known_hosts-<workspace>` (and the task logs, see `tasks`).
    dir: PathBuf,
}

impl GuestSsh {
    pub fn new(layout: &Layout) -> Self {
        GuestSsh {
            key: layout.keys().join("id_ed25519"),
            dir: layout.tasks_dir(),
        }
    }

    /// `ssh` to `ws` at `ip` as its login user, running `remote` (already quoted for the
    /// guest's shell).
    pub fn command(
        &self,
        ws: &Workspace,
        ip: std::net::Ipv4Addr,
        remote: &str,
    ) -> Result<tokio::process::Command> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::Internal(format!("cannot create the tasks dir: {e}")))?;
        files::set_mode(&self.dir, 0o700)?;
        let known_hosts = self.known_hosts(&ws.id);
        std::fs::write(
            &known_hosts,
            format!("{} {}\n", ws.id, ws.ssh_host_public_key),
        )
        .map_err(|e| Error::Internal(format!("cannot write {}: {e}", known_hosts.display())))?;
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args(ssh_args(
            &self.key,
            &known_hosts,
            ws.id.as_str(),
            &ws.login_user,
            ip,
            remote,
        ));
        Ok(cmd)
    }

    /// The daemon's private key (OpenSSH format, ed25519).
    pub fn key(&self) -> &std::path::Path {
        &self.key
    }

    /// The pinned host key file of `ws` (removed with the workspace).
    pub fn known_hosts(&self, ws: &WorkspaceId) -> PathBuf {
        self.dir.join(format!("known_hosts-{ws}"))
    }
}
