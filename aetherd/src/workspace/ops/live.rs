//! What changes while workspaces run: the change feed behind `WatchWorkspaces`, the phase of
//! a transitional state, and idle auto-stop.
//!
//! Idle auto-stop uses one timer per idle running workspace, never a polling loop: whenever
//! something that decides idleness changes (a state transition, a tunnel opening or
//! closing, a new idle timeout), the workspace's id is sent to one background task, which
//! re-evaluates it: active (a connection or a task) -> the idle clock is cleared and the
//! timer cancelled; idle -> the clock (`idle_since`, persisted so it survives restarts)
//! is set if it was not, and a timer is armed for `idle_since + idle_timeout`. When the timer
//! fires the workspace is stopped gracefully with the reason `idle timeout`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::*;

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

/// What the daemon knows about a workspace beyond its row.
#[derive(Clone, Debug, Default)]
pub struct Runtime {
    pub phase: &'static str,
    pub connections: u32,
    pub tasks: u32,
    pub idle_timeout_secs: u64,
    pub idle_since: Option<i64>,
    pub stops_at: Option<i64>,
}

impl Manager {
    /// Subscribes to changes; events published before the call are not delivered.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// The next sequence number, for a snapshot taken now.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub(super) fn publish(&self, kind: ChangeKind, workspace: &Workspace) {
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
    pub(super) fn publish_current(&self, id: &WorkspaceId) {
        if let Ok(ws) = self.store.get_workspace(id, None) {
            self.publish(ChangeKind::Changed, &ws);
        }
    }

    pub(super) fn set_phase(&self, id: &WorkspaceId, phase: &'static str) {
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

    fn idle_timeout_of(&self, ws: &Workspace) -> u64 {
        ws.idle_timeout_secs
            .unwrap_or_else(|| self.config.idle_timeout_secs())
    }

    fn phase_of(&self, id: &WorkspaceId) -> &'static str {
        self.phases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
            .unwrap_or("")
    }

    pub fn runtime(&self, ws: &Workspace) -> Runtime {
        let phase = self.phase_of(&ws.id);
        let timeout = self.idle_timeout_of(ws);
        Runtime {
            phase,
            connections: self.connections.count(&ws.id) as u32,
            tasks: self.running_tasks(&ws.id),
            idle_timeout_secs: timeout,
            idle_since: ws.idle_since,
            stops_at: ws
                .idle_since
                .filter(|_| timeout > 0)
                .map(|since| since + timeout as i64),
        }
    }

    /// Asks the idle task to re-evaluate `id`.
    pub(super) fn idle_changed(&self, id: &WorkspaceId) {
        let _ = self.idle_tx.send(id.clone());
    }

    /// Starts the background tasks: lifecycle events, idle re-evaluation and CPU pinning. Every running
    /// workspace is evaluated once (after a restart its persisted idle clock is kept; one that
    /// was active starts its idle clock now).
    pub fn start_background(self: &Arc<Self>) -> Result<()> {
        self.watch_events();
        // While VMs run, their console logs grow: cut any past the cap once a minute (a few
        // stat calls; virtlogd, when libvirt uses it, rotates them sooner anyway).
        let console = self.layout.console_dir();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                let dir = console.clone();
                let cut = tokio::task::spawn_blocking(move || {
                    crate::files::cap_logs_in(&dir, crate::files::CONSOLE_LOG_MAX)
                })
                .await;
                if let Ok(Err(e)) = cut {
                    tracing::warn!(error = %e, "cannot cap the console logs");
                }
            }
        });
        let rx = self
            .idle_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut rx) = rx {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                while let Some(id) = rx.recv().await {
                    this.reevaluate_idle(&id);
                }
            });
        }
        for ws in self
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?
        {
            self.idle_changed(&ws.id);
        }
        // CPU pinning: once now (what was dedicated may have changed while the daemon was
        // down), then whenever CPUs are dedicated or released. Notify coalesces bursts.
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                this.repin_running().await;
                this.repin.notified().await;
            }
        });
        Ok(())
    }

    fn cancel_idle_timer(&self, id: &WorkspaceId) {
        if let Some(t) = self
            .idle_timers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
        {
            t.abort();
        }
    }

    fn reevaluate_idle(self: &Arc<Self>, id: &WorkspaceId) {
        let Ok(ws) = self.store.get_workspace(id, None) else {
            self.cancel_idle_timer(id);
            return;
        };
        let active = self.is_active(id);
        if ws.state != State::Running || active {
            self.cancel_idle_timer(id);
            if ws.idle_since.is_some() {
                if let Err(e) = self.store.set_idle_since(id, None) {
                    tracing::warn!(workspace = %id, error = %e, "cannot clear the idle clock");
                }
                self.publish_current(id);
            }
            return;
        }
        let since = match ws.idle_since {
            Some(s) => s,
            None => {
                let now = crate::store::now();
                if let Err(e) = self.store.set_idle_since(id, Some(now)) {
                    tracing::warn!(workspace = %id, error = %e, "cannot record the idle clock");
                }
                self.publish_current(id);
                now
            }
        };
        let timeout = self.idle_timeout_of(&ws);
        self.cancel_idle_timer(id);
        if timeout == 0 {
            return;
        }
        let deadline = since + timeout as i64;
        let wait = Duration::from_secs(deadline.saturating_sub(crate::store::now()).max(0) as u64);
        tracing::debug!(workspace = %id, idle_since = since, stops_at = deadline, "idle timer armed");
        let this = Arc::clone(self);
        let ws_id = id.clone();
        let handle = tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            this.idle_expired(&ws_id, ws.generation).await;
        });
        self.idle_timers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), handle.abort_handle());
    }

    /// The idle timer armed at `generation` fired: the runner stops the workspace if it is
    /// still that idle, running workspace.
    async fn idle_expired(self: &Arc<Self>, id: &WorkspaceId, generation: u64) {
        self.idle_timers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.send(
            id,
            crate::workspace::runner::Input::IdleExpired { generation },
        )
        .await;
    }

    /// Whether a connection or a task keeps `id` from idling.
    pub(crate) fn is_active(&self, id: &WorkspaceId) -> bool {
        self.connections.count(id) > 0 || self.running_tasks(id) > 0
    }
}
