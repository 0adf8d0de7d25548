//! The server streams: an exec's output followed live, a task's log read on as the client
//! takes it, and a workspace watch (snapshot, then the changes its caller may see).

use std::sync::Arc;

use aether_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::caller::Caller;
use crate::daemon::Daemon;
use crate::feed::{Change, ChangeKind};
use crate::model::{ProjectId, WorkspaceId};
use crate::projects::Projects;
use crate::store::{TaskRow, Workspace};
use crate::tasks::{Frame, TaskLogReader};
use crate::workspace::Runtime;

use super::convert::{frame_to_pb, workspace_to_pb};

pub(super) type ByteStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// `head`, then the frames from `rx` until the task ends, then `tail`.
pub(super) fn follow_frames(
    task_id: String,
    head: Vec<pb::TaskOutput>,
    tail: Vec<pb::TaskOutput>,
    rx: Option<tokio::sync::broadcast::Receiver<Frame>>,
) -> ByteStream<pb::TaskOutput> {
    let (tx, out) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        for m in head {
            if tx.send(Ok(m)).await.is_err() {
                return;
            }
        }
        if let Some(mut rx) = rx {
            loop {
                match rx.recv().await {
                    Ok(f) => {
                        let end = matches!(f, Frame::End { .. });
                        if let Some(m) = frame_to_pb(&task_id, f) {
                            if tx.send(Ok(m)).await.is_err() {
                                return;
                            }
                        }
                        if end {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "missed {n} output chunks; the task log has them all"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        }
        for m in tail {
            if tx.send(Ok(m)).await.is_err() {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))
}

/// The project id a watch is filtered to, if any.
pub(super) fn snapshot_project(
    projects: &Projects,
    caller: Caller,
    project: Option<&str>,
) -> Result<Option<crate::model::ProjectId>, Status> {
    match project {
        Some(p) => Ok(Some(projects.get(caller, p)?.id)),
        None => Ok(None),
    }
}

/// A task's output as `reader` reads it, then how the task ended (followed to its end) or
/// the task as recorded.
pub(super) fn task_log_stream(
    task: TaskRow,
    mut reader: TaskLogReader,
) -> ByteStream<pb::TaskOutput> {
    // A few chunks in flight at most: the reader reads on only as the client takes them.
    let (tx, out) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            match reader.next().await {
                Ok(Some(frames)) => {
                    for f in frames {
                        if let Some(m) = frame_to_pb(&task.id, f) {
                            if tx.send(Ok(m)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
        // Followed to its end: how it ended; otherwise the task as recorded.
        let last = match reader.end() {
            Some((state, exit_code)) => pb::TaskOutput {
                task_id: task.id.clone(),
                exit_code,
                state: state.to_owned(),
                ..Default::default()
            },
            None => pb::TaskOutput {
                task_id: task.id.clone(),
                exit_code: task.exit_code,
                state: task.state.clone(),
                ..Default::default()
            },
        };
        let _ = tx.send(Ok(last)).await;
    });
    Box::pin(ReceiverStream::new(out))
}

/// A watch: the `snapshot`, its end, then each change in `changes` that `caller` may see,
/// narrowed to the workspace `only` and the project `project_id` when given.
pub(super) fn watch_stream(
    daemon: Arc<Daemon>,
    caller: Caller,
    mut changes: tokio::sync::broadcast::Receiver<Change>,
    snapshot: Vec<Workspace>,
    only: Option<WorkspaceId>,
    project_id: Option<ProjectId>,
) -> ByteStream<pb::WorkspaceEvent> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let event = |seq, kind: pb::workspace_event::Kind, ws: Option<pb::Workspace>| {
            Ok(pb::WorkspaceEvent {
                seq,
                kind: kind as i32,
                workspace: ws,
            })
        };
        for ws in snapshot {
            let rt = daemon.workspaces.runtime(&ws);
            let seq = daemon.feed.next_seq();
            let e = event(
                seq,
                pb::workspace_event::Kind::Snapshot,
                Some(workspace_to_pb(ws, rt)),
            );
            if tx.send(e).await.is_err() {
                return;
            }
        }
        let seq = daemon.feed.next_seq();
        if tx
            .send(event(seq, pb::workspace_event::Kind::SnapshotEnd, None))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let change = match changes.recv().await {
                Ok(c) => c,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let _ = tx
                        .send(Err(Status::data_loss(format!(
                            "this watcher fell {n} events behind; watch again"
                        ))))
                        .await;
                    return;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let ws = change.workspace;
            let visible = caller.sees(ws.owner_uid)
                && only.as_ref().is_none_or(|id| *id == ws.id)
                && project_id.as_ref().is_none_or(|p| *p == ws.project_id);
            if !visible {
                continue;
            }
            let kind = match change.kind {
                ChangeKind::Changed => pb::workspace_event::Kind::Changed,
                ChangeKind::Deleted => pb::workspace_event::Kind::Deleted,
            };
            let rt = Runtime {
                phase: change.phase,
                ..daemon.workspaces.runtime(&ws)
            };
            if tx
                .send(event(change.seq, kind, Some(workspace_to_pb(ws, rt))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}
