//! `aether workspace exec` and `aether task …`: commands run in workspaces as tasks.

use std::io::Write;
use std::process::ExitCode;

use aether_proto::v1 as pb;
use anyhow::{bail, Context};

use crate::client::Client;
use crate::output;

/// Parses `K=V`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

/// Writes a task's output to our stdout/stderr as it arrives; returns the last message.
async fn relay(
    mut stream: tonic::Streaming<pb::TaskOutput>,
) -> anyhow::Result<Option<pb::TaskOutput>> {
    let mut last = None;
    while let Some(m) = stream.message().await? {
        if !m.stdout.is_empty() {
            let mut out = std::io::stdout().lock();
            match out.write_all(&m.stdout).and_then(|_| out.flush()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other.context("cannot write to stdout")?,
            }
        }
        if !m.stderr.is_empty() {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(&m.stderr).and_then(|_| err.flush());
        }
        last = Some(m);
    }
    Ok(last)
}

/// The exit code of a finished task for our own exit: the command's, or 1 when it has none
/// (cancelled, lost, ssh failure without a code).
fn exit_of(last: Option<&pb::TaskOutput>) -> ExitCode {
    match last.and_then(|m| m.exit_code) {
        Some(code) => ExitCode::from(code.clamp(0, 255) as u8),
        None => ExitCode::FAILURE,
    }
}

pub struct ExecArgs {
    pub id: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub detach: bool,
}

pub async fn exec(c: &mut Client, json: bool, a: ExecArgs) -> anyhow::Result<ExitCode> {
    let req = pb::ExecRequest {
        workspace_id: a.id.clone(),
        argv: a.argv,
        env: a.env.into_iter().collect(),
        workdir: a.workdir.unwrap_or_default(),
        detach: a.detach,
    };
    // The daemon checks the request before the workspace's state, so bad input never starts
    // a workspace; a workspace that is merely not running is started, then asked again.
    let stream = match c.exec(req.clone()).await {
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            crate::autostart::ensure_running(c, &a.id).await?;
            c.exec(req).await?
        }
        r => r?,
    }
    .into_inner();
    if a.detach {
        let mut stream = stream;
        let first = stream
            .message()
            .await?
            .context("aetherd ended the exec stream without a task id")?;
        if json {
            println!(
                "{}",
                serde_json::json!({ "task_id": first.task_id, "state": first.state })
            );
        } else {
            println!("{}", first.task_id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let last = relay(stream).await?;
    if let Some(m) = &last {
        if m.exit_code.is_none() && m.state != "succeeded" {
            eprintln!("aether: task {} ended {}", m.task_id, m.state);
        }
    }
    Ok(exit_of(last.as_ref()))
}

pub async fn logs(c: &mut Client, id: String, follow: bool) -> anyhow::Result<ExitCode> {
    let stream = c
        .task_logs(pb::TaskLogsRequest {
            task_id: id,
            follow,
        })
        .await?
        .into_inner();
    relay(stream).await?;
    Ok(ExitCode::SUCCESS)
}

pub fn task_json(t: &pb::Task) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "workspace_id": t.workspace_id,
        "argv": t.argv,
        "state": t.state,
        "exit_code": t.exit_code,
        "started_at": t.started_at,
        "ended_at": t.ended_at,
    })
}

pub async fn list(
    c: &mut Client,
    json: bool,
    workspace: Option<String>,
) -> anyhow::Result<ExitCode> {
    let tasks = c
        .list_tasks(pb::ListTasksRequest {
            workspace_id: workspace.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .tasks;
    if json {
        let v: Vec<_> = tasks.iter().map(task_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.workspace_id.clone(),
                t.state.clone(),
                t.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                output::datetime(t.started_at),
                t.argv.join(" "),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(
            &["ID", "WORKSPACE", "STATE", "EXIT", "STARTED", "COMMAND"],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn cancel(c: &mut Client, json: bool, id: String) -> anyhow::Result<ExitCode> {
    let t = c
        .cancel_task(pb::CancelTaskRequest { task_id: id })
        .await?
        .into_inner();
    if json {
        println!("{}", task_json(&t));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn check_argv(argv: &[String]) -> anyhow::Result<()> {
    if argv.is_empty() {
        bail!("no command given: aether workspace exec ID -- CMD...");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_env;

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env("A=").unwrap(), ("A".into(), "".into()));
        assert!(parse_env("A").is_err());
        assert!(parse_env("=x").is_err());
    }
}
