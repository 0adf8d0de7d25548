//! Live status from the `WatchWorkspaces` stream: `aether workspace watch`, and the waiting
//! of `start`/`stop` (a redrawn status line on a terminal, plain lines otherwise).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use aether_proto::v1 as pb;
use anyhow::{bail, Context};
use pb::workspace_event::Kind;

use crate::client::Client;
use crate::output;

/// Opens a watch and returns the stream positioned after the snapshot, with the snapshot.
async fn open(
    c: &mut Client,
    id: &str,
    project: &str,
) -> anyhow::Result<(
    tonic::Streaming<pb::WorkspaceEvent>,
    Vec<pb::WorkspaceEvent>,
)> {
    let mut stream = c
        .watch_workspaces(pb::WatchWorkspacesRequest {
            workspace_id: id.to_owned(),
            project: project.to_owned(),
        })
        .await?
        .into_inner();
    let mut snapshot = Vec::new();
    while let Some(e) = stream.message().await? {
        if e.kind == Kind::SnapshotEnd as i32 {
            return Ok((stream, snapshot));
        }
        snapshot.push(e);
    }
    bail!("aetherd closed the watch before its snapshot ended")
}

fn kind_name(k: i32) -> &'static str {
    match Kind::try_from(k) {
        Ok(Kind::Snapshot) => "snapshot",
        Ok(Kind::SnapshotEnd) => "snapshot_end",
        Ok(Kind::Changed) => "changed",
        Ok(Kind::Deleted) => "deleted",
        Ok(Kind::Unspecified) | Err(_) => "unknown",
    }
}

fn status_words(w: &pb::Workspace) -> String {
    let mut s = output::state_name(w.state).to_owned();
    if !w.phase.is_empty() {
        s.push_str(&format!(" ({})", w.phase));
    }
    s
}

/// One line per event: `SEQ KIND ID STATE [PHASE] conns=N [reason]`.
fn event_line(e: &pb::WorkspaceEvent) -> Option<String> {
    let w = e.workspace.as_ref()?;
    let mut line = format!(
        "{:>6} {:<8} {} {} conns={}",
        e.seq,
        kind_name(e.kind),
        w.id,
        status_words(w),
        w.active_connections
    );
    if w.stops_at > 0 {
        line.push_str(&format!(" stops_at={}", output::datetime(w.stops_at)));
    }
    if !w.reason.is_empty() {
        line.push_str(&format!(" reason={:?}", w.reason));
    }
    Some(line)
}

pub fn event_json(e: &pb::WorkspaceEvent) -> serde_json::Value {
    serde_json::json!({
        "seq": e.seq,
        "kind": kind_name(e.kind),
        "workspace": e.workspace.as_ref().map(output::workspace_json),
    })
}

/// `aether workspace watch`: the snapshot, then every change, until interrupted.
pub async fn watch(c: &mut Client, json: bool, id: &str, project: &str) -> anyhow::Result<()> {
    let (mut stream, snapshot) = open(c, id, project).await?;
    let print = |e: &pb::WorkspaceEvent| -> anyhow::Result<()> {
        let text = if json {
            serde_json::to_string(&event_json(e))?
        } else {
            match event_line(e) {
                Some(l) => l,
                None => return Ok(()),
            }
        };
        let mut out = std::io::stdout().lock();
        match writeln!(out, "{text}").and_then(|_| out.flush()) {
            // A closed pipe (`… | head`) ends the watch quietly.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
            other => other.context("cannot write to stdout"),
        }
    };
    for e in &snapshot {
        print(e)?;
    }
    while let Some(e) = stream.message().await? {
        print(&e)?;
    }
    Ok(())
}

const SPINNER: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// Waits until `w` leaves `transitional`, showing its progress on stderr when `show`:
/// a redrawn status line (state, phase, elapsed time) on a terminal, a line per change
/// otherwise. The daemon bounds every transitional state, so this ends.
pub async fn wait_while(
    c: &mut Client,
    w: pb::Workspace,
    transitional: pb::WorkspaceState,
    show: bool,
) -> anyhow::Result<pb::Workspace> {
    let (mut stream, snapshot) = open(c, &w.id, "").await?;
    let mut current = snapshot.into_iter().find_map(|e| e.workspace).unwrap_or(w);
    let tty = show && std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_words = String::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut frame = 0usize;
    while current.state == transitional as i32 {
        let words = status_words(&current);
        if tty {
            eprint!(
                "\r\x1b[2K{} {} {} {}s",
                SPINNER[frame % SPINNER.len()],
                current.id,
                words,
                started.elapsed().as_secs()
            );
        } else if show && words != last_words {
            eprintln!(
                "{}: {} ({} s)",
                current.id,
                words,
                started.elapsed().as_secs()
            );
        }
        last_words = words;
        tokio::select! {
            _ = tick.tick() => frame += 1,
            msg = stream.message() => match msg? {
                Some(e) if e.kind == Kind::Deleted as i32 => {
                    bail!("workspace {} was deleted", current.id)
                }
                Some(e) => {
                    if let Some(ws) = e.workspace {
                        current = ws;
                    }
                }
                None => bail!("aetherd closed the watch"),
            },
        }
    }
    if tty {
        eprint!("\r\x1b[2K");
    }
    Ok(current)
}
