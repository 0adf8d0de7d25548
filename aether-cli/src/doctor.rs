//! `aether doctor`: one line per check of what creating and reaching a workspace needs, each
//! with a fix when it is not fine. The client's side is checked here (the socket, the
//! caller's group, versions, the SSH client and key); the daemon's side comes from its
//! `CheckHost` (libvirt, accelerator, qemu probe time, pool space, network, default image).
//! Exits 1 when something blocks creating or reaching a workspace.

use std::path::Path;
use std::process::ExitCode;

use aether_proto::v1 as pb;
use serde_json::json;

use crate::client;

use pb::host_check::Severity;

/// The client's own checks take the daemon's form ([`pb::HostCheck`]), so both print alike.
type Check = pb::HostCheck;

fn check(
    name: &str,
    severity: Severity,
    detail: impl Into<String>,
    hint: impl Into<String>,
) -> Check {
    Check {
        name: name.to_owned(),
        severity: severity as i32,
        detail: detail.into(),
        hint: hint.into(),
    }
}

/// A check's severity; one this client does not know counts as a failure.
fn severity(c: &Check) -> Severity {
    match Severity::try_from(c.severity) {
        Ok(Severity::Unspecified) | Err(_) => Severity::Fail,
        Ok(s) => s,
    }
}

pub async fn run(socket: &Path, config_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let mut checks = Vec::new();
    if let Some(daemon) = reach(socket, &mut checks).await {
        daemon_checks(daemon, &mut checks).await;
    }
    checks.extend(ssh_checks(config_dir));
    if json {
        let list: Vec<_> = checks
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "severity": match severity(c) { Severity::Ok => "ok", Severity::Warn => "warn", _ => "fail" },
                    "detail": c.detail,
                    "hint": c.hint,
                })
            })
            .collect();
        crate::emit_json(&serde_json::Value::Array(list))?;
    } else {
        let mut text = String::new();
        for c in &checks {
            let mark = match severity(c) {
                Severity::Ok => "ok  ",
                Severity::Warn => "WARN",
                _ => "FAIL",
            };
            text.push_str(&format!("{mark}  {:<14} {}\n", c.name, c.detail));
            if !c.hint.is_empty() {
                text.push_str(&format!("      {:<14} -> {}\n", "", c.hint));
            }
        }
        crate::emit(&text)?;
    }
    // For scripts reading stderr: the first thing that blocks, in one line.
    match checks.iter().find(|c| severity(c) == Severity::Fail) {
        Some(c) => {
            eprintln!("aether: doctor: {}: {}", c.name, c.detail);
            Ok(ExitCode::FAILURE)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

/// The socket, the caller's right to use it and the daemon's answer; the client if it
/// answered.
async fn reach(socket: &Path, checks: &mut Vec<Check>) -> Option<client::Client> {
    let start = "start aetherd: sudo systemctl start aetherd, or sudo scripts/install.sh (another socket: --socket or AETHER_SOCKET)";
    if !socket.exists() {
        checks.push(check(
            "daemon",
            Severity::Fail,
            format!("no aetherd socket at {}", socket.display()),
            start,
        ));
        return None;
    }
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            checks.push(check(
                "daemon",
                Severity::Fail,
                format!("permission denied on {}", socket.display()),
                group_hint(),
            ));
            return None;
        }
        Err(e) => {
            checks.push(check(
                "daemon",
                Severity::Fail,
                format!("nothing answers on {}: {e}", socket.display()),
                start,
            ));
            return None;
        }
    }
    let mut c = match client::connect(socket).await {
        Ok(c) => c,
        Err(e) => {
            checks.push(check("daemon", Severity::Fail, format!("{e:#}"), start));
            return None;
        }
    };
    match c.get_host_info(pb::GetHostInfoRequest {}).await {
        Ok(info) => {
            let daemon = info.into_inner().version;
            let mine = env!("CARGO_PKG_VERSION");
            checks.push(if daemon == mine {
                check(
                    "daemon",
                    Severity::Ok,
                    format!("aetherd {daemon} at {}", socket.display()),
                    "",
                )
            } else {
                check(
                    "daemon",
                    Severity::Warn,
                    format!(
                        "aetherd {daemon} at {}, but this aether is {mine}",
                        socket.display()
                    ),
                    "install both from one build (sudo scripts/install.sh)",
                )
            });
            Some(c)
        }
        Err(s) if s.code() == tonic::Code::PermissionDenied => {
            checks.push(check(
                "daemon",
                Severity::Fail,
                s.message().to_owned(),
                group_hint(),
            ));
            None
        }
        Err(s) => {
            checks.push(check(
                "daemon",
                Severity::Fail,
                s.message().to_owned(),
                start,
            ));
            None
        }
    }
}

/// What to do when the socket refuses the caller: join group `aether`, or log in again
/// when the membership is not active in this session yet.
fn group_hint() -> String {
    let Ok(Some(group)) = nix::unistd::Group::from_name("aether") else {
        return "group aether does not exist: sudo scripts/install.sh creates it".to_owned();
    };
    let me = nix::unistd::User::from_uid(nix::unistd::Uid::current())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_default();
    let active = nix::unistd::getgroups()
        .map(|g| g.contains(&group.gid))
        .unwrap_or(false);
    if group.mem.contains(&me) && !active {
        "you are in group aether, but this login session is not yet: log in again (or run newgrp aether)".to_owned()
    } else {
        format!("join group aether: sudo usermod -aG aether {me}, then log in again")
    }
}

async fn daemon_checks(mut c: client::Client, checks: &mut Vec<Check>) {
    match c.check_host(pb::CheckHostRequest {}).await {
        Ok(r) => checks.extend(r.into_inner().checks),
        Err(s) => checks.push(check(
            "host",
            Severity::Warn,
            format!("aetherd cannot check its host: {}", s.message()),
            "an older aetherd? install both from one build (sudo scripts/install.sh)",
        )),
    }
}

/// The OpenSSH client `workspace ssh` runs, and the key it uses.
fn ssh_checks(config_dir: &Path) -> Vec<Check> {
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
    };
    let mut checks = vec![if on_path("ssh") {
        check("ssh", Severity::Ok, "the OpenSSH client is installed", "")
    } else {
        check(
            "ssh",
            Severity::Fail,
            "no ssh on PATH: aether workspace ssh runs the OpenSSH client",
            "install openssh-client",
        )
    }];
    checks.push(match crate::identity::existing(config_dir) {
        Some(key) => check(
            "ssh-key",
            Severity::Ok,
            format!("{} is your key for workspaces", key.display()),
            "",
        ),
        None if on_path("ssh-keygen") => check(
            "ssh-key",
            Severity::Ok,
            format!(
                "no SSH key yet: the first create makes one in {}",
                config_dir.join("ssh").display()
            ),
            "",
        ),
        None => check(
            "ssh-key",
            Severity::Fail,
            "no SSH key and no ssh-keygen to make one",
            "install openssh-client, or create ~/.ssh/id_ed25519",
        ),
    });
    checks
}
