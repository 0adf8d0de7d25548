//! The change feed behind `WatchWorkspaces`: every change of a workspace's row (or of what
//! the daemon knows beside it: its phase, its tasks, its idle clock) is published here with
//! a sequence number, and the phase of each workspace in a transitional state is kept here.
//!
//! Invariants: sequence numbers only grow, so a watcher can drop a change older than its
//! snapshot; publishing never waits (a slow watcher lags and is told so by the broadcast);
//! a phase lives only while its workspace is `starting` or `stopping`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::model::WorkspaceId;
use crate::store::{Store, Workspace};

/// Changes that may wait for a slow watcher before it lags.
const CAPACITY: usize = 1024;

/// One published change of a workspace.
#[derive(Clone, Debug)]
pub struct Change {
    pub seq: u64,
    pub kind: ChangeKind,
    pub workspace: Workspace,
    /// The phase when the change was published (a watcher may send it later, when the
    /// phase has moved on).
    pub phase: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Changed,
    Deleted,
}

pub struct Feed {
    store: Arc<Store>,
    changes: broadcast::Sender<Change>,
    seq: AtomicU64,
    /// Phase of workspaces in a transitional state ("booting", "waiting for ssh", …).
    phases: Mutex<HashMap<WorkspaceId, &'static str>>,
}

impl Feed {
    /// A feed that reads rows from `store` for [`Feed::publish_current`].
    pub fn new(store: Arc<Store>) -> Self {
        Feed {
            store,
            changes: broadcast::channel(CAPACITY).0,
            seq: AtomicU64::new(0),
            phases: Mutex::new(HashMap::new()),
        }
    }

    /// Subscribes to changes; changes published before the call are not delivered.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// The next sequence number, for a snapshot taken now.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn publish(&self, kind: ChangeKind, workspace: &Workspace) {
        let phase = self.phase_of(&workspace.id);
        let seq = self.next_seq();
        // No subscriber is fine.
        let _ = self.changes.send(Change {
            seq,
            kind,
            workspace: workspace.clone(),
            phase,
        });
    }

    /// Publishes the current row of `id` (after a change that is not a transition).
    pub fn publish_current(&self, id: &WorkspaceId) {
        if let Ok(ws) = self.store.get_workspace(id, None) {
            self.publish(ChangeKind::Changed, &ws);
        }
    }

    /// Sets the phase of `id` ("" clears it) and publishes the workspace.
    pub fn set_phase(&self, id: &WorkspaceId, phase: &'static str) {
        {
            let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
            if phase.is_empty() {
                phases.remove(id);
            } else {
                phases.insert(id.clone(), phase);
            }
        }
        self.publish_current(id);
    }

    /// Forgets the phase of `id` without publishing (its transition is published next).
    pub fn end_phase(&self, id: &WorkspaceId) {
        self.phases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    pub fn phase_of(&self, id: &WorkspaceId) -> &'static str {
        self.phases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
            .unwrap_or("")
    }
}
