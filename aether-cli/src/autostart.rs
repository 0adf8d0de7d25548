//! Reaching a workspace that may be stopped: `workspace ssh`, `workspace proxy` (so ssh's
//! ProxyCommand, and with it `aether ssh-config` hosts), `workspace port-forward` and
//! `workspace exec` start it first. Progress goes to stderr only: the proxy's stdout is the
//! connection, exec's is the command's.

use aether_proto::v1 as pb;
use anyhow::{anyhow, bail};

use crate::client::Client;
use crate::{output, Format};

/// Makes sure workspace `id` runs: starts it when it is `stopped` or in `error`, waits while it
/// is `starting` (or `stopping`, then starts it). Fails when it cannot be made to run, with
/// the workspace's state and reason.
pub async fn ensure_running(c: &mut Client, id: &str) -> anyhow::Result<pb::Workspace> {
    use pb::WorkspaceState as S;
    let mut w = c
        .get_workspace(pb::GetWorkspaceRequest { id: id.to_owned() })
        .await?
        .into_inner();
    // Started (or found starting) once: a second stop or error is final.
    let mut started = false;
    loop {
        match S::try_from(w.state) {
            Ok(S::Running) => {
                if started {
                    eprintln!("{} running", w.id);
                }
                return Ok(w);
            }
            Ok(S::Stopped | S::Error) if !started => {
                eprintln!("{} is {}: starting it", w.id, output::state_name(w.state));
                started = true;
                w = match c
                    .start_workspace(pb::StartWorkspaceRequest { id: w.id.clone() })
                    .await
                {
                    Ok(r) => r.into_inner(),
                    // Someone else may have started it meanwhile: look again.
                    Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                        let now = c
                            .get_workspace(pb::GetWorkspaceRequest { id: w.id.clone() })
                            .await?
                            .into_inner();
                        if now.state == S::Stopped as i32 || now.state == S::Error as i32 {
                            return Err(e.into());
                        }
                        now
                    }
                    Err(e) => return Err(e.into()),
                };
            }
            Ok(S::Starting) => {
                if !started {
                    eprintln!("{} is starting: waiting", w.id);
                    started = true;
                }
                w = crate::wait_while(c, Format::Table, w, S::Starting).await?;
            }
            Ok(S::Stopping) if !started => {
                eprintln!("{} is stopping: waiting to start it again", w.id);
                w = crate::wait_while(c, Format::Table, w, S::Stopping).await?;
            }
            _ => bail!(not_running(&w)),
        }
    }
}

/// Why `w` cannot be used, with a hint for `stop_failed`.
fn not_running(w: &pb::Workspace) -> String {
    let reason = if w.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", w.reason)
    };
    let hint = if w.state == pb::WorkspaceState::StopFailed as i32 {
        format!("; stop it with `aether workspace stop --force {}`", w.id)
    } else {
        String::new()
    };
    format!(
        "workspace {} is {}{reason}{hint}",
        w.id,
        output::state_name(w.state)
    )
}

/// The workspace `aether workspace ssh` without an id means: the only one of the current
/// project.
pub async fn only_workspace_of_current_project(c: &mut Client) -> anyhow::Result<String> {
    let Some(project) = crate::read_current_project()? else {
        bail!("no workspace id given and no current project: name one (aether workspace ssh ID) or run `aether project use NAME`");
    };
    let p = c
        .get_project(pb::GetProjectRequest {
            project: project.clone(),
        })
        .await
        .map_err(|_| {
            anyhow!("the current project {project} no longer exists; run `aether project use NAME`")
        })?
        .into_inner();
    let list = c
        .list_workspaces(pb::ListWorkspacesRequest {
            state: pb::WorkspaceState::Unspecified as i32,
            project: p.id.clone(),
        })
        .await?
        .into_inner()
        .workspaces;
    pick_one(&p.name, &list)
}

fn pick_one(project: &str, list: &[pb::Workspace]) -> anyhow::Result<String> {
    match list {
        [] => bail!(
            "project {project} has no workspaces; create one with `aether workspace create --project {project}`"
        ),
        [w] => Ok(w.id.clone()),
        several => bail!(
            "project {project} has {} workspaces: {}; name one: aether workspace ssh ID",
            several.len(),
            several
                .iter()
                .map(|w| format!("{} ({})", w.id, output::state_name(w.state)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use aether_proto::v1 as pb;

    use super::{not_running, pick_one};

    fn ws(id: &str, state: pb::WorkspaceState) -> pb::Workspace {
        pb::Workspace {
            id: id.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn one_workspace_is_picked_otherwise_the_error_says_what_to_do() {
        let a = ws("ws-aaaaaa", pb::WorkspaceState::Running);
        let b = ws("ws-bbbbbb", pb::WorkspaceState::Stopped);
        assert_eq!(
            pick_one("my-app", std::slice::from_ref(&a)).unwrap(),
            "ws-aaaaaa"
        );
        assert_eq!(
            pick_one("my-app", &[]).unwrap_err().to_string(),
            "project my-app has no workspaces; create one with `aether workspace create --project my-app`"
        );
        assert_eq!(
            pick_one("my-app", &[a, b]).unwrap_err().to_string(),
            "project my-app has 2 workspaces: ws-aaaaaa (running), ws-bbbbbb (stopped); name one: aether workspace ssh ID"
        );
    }

    #[test]
    fn refusals_name_the_state_the_reason_and_the_way_out() {
        let mut w = ws("ws-abc123", pb::WorkspaceState::StopFailed);
        w.reason = "the guest did not power off within 60 s".into();
        assert_eq!(
            not_running(&w),
            "workspace ws-abc123 is stop_failed: the guest did not power off within 60 s; stop it with `aether workspace stop --force ws-abc123`"
        );
        let w = ws("ws-abc123", pb::WorkspaceState::Error);
        assert_eq!(not_running(&w), "workspace ws-abc123 is error");
    }
}
