//! Idle auto-stop: one timer per idle running workspace, never a polling loop.
//!
//! Whenever something that decides idleness changes (a state transition, a tunnel opening
//! or closing, a task starting or ending, a new idle timeout), the workspace's id is sent
//! ([`Nudge`]) to one background task, which re-evaluates it: active (a connection or a
//! task) -> the idle clock is cleared and the timer cancelled; idle -> the clock
//! (`idle_since`, persisted so it survives restarts) is set if it was not, and a timer is
//! armed for `idle_since + idle_timeout`. When a timer fires, the workspace id and the
//! generation it was armed at go to the `expired` channel; the workspace's runner stops it
//! if it is still that idle, running workspace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::feed::Feed;
use crate::model::WorkspaceId;
use crate::store::{Store, Workspace};
use crate::tasks::Tasks;
use crate::tunnel::Connections;
use crate::workspace::state::State;

/// Tells the idle task that something deciding a workspace's idleness changed.
#[derive(Clone)]
pub struct Nudge(mpsc::UnboundedSender<WorkspaceId>);

impl Nudge {
    pub fn changed(&self, id: &WorkspaceId) {
        let _ = self.0.send(id.clone());
    }

    /// The channel itself, for [`Connections::with_notify`].
    pub fn sender(&self) -> mpsc::UnboundedSender<WorkspaceId> {
        self.0.clone()
    }
}

/// The receiving end of the nudges, which [`Idle::start`] takes.
pub struct Nudges(mpsc::UnboundedReceiver<WorkspaceId>);

pub fn channel() -> (Nudge, Nudges) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Nudge(tx), Nudges(rx))
}

/// An idle timer fired: the workspace and the generation it was armed at.
pub type Expired = (WorkspaceId, u64);

pub struct Idle {
    store: Arc<Store>,
    feed: Arc<Feed>,
    connections: Connections,
    tasks: Arc<Tasks>,
    /// The daemon's idle timeout (seconds, 0: never), for workspaces without their own.
    default_timeout_secs: u64,
    timers: Mutex<HashMap<WorkspaceId, tokio::task::AbortHandle>>,
}

impl Idle {
    pub fn new(
        store: Arc<Store>,
        feed: Arc<Feed>,
        connections: Connections,
        tasks: Arc<Tasks>,
        default_timeout_secs: u64,
    ) -> Self {
        Idle {
            store,
            feed,
            connections,
            tasks,
            default_timeout_secs,
            timers: Mutex::new(HashMap::new()),
        }
    }

    /// The idle timeout of `ws` in seconds (0: never).
    pub fn timeout_of(&self, ws: &Workspace) -> u64 {
        ws.idle_timeout_secs.unwrap_or(self.default_timeout_secs)
    }

    /// Whether a connection or a task keeps `id` from idling.
    pub fn is_active(&self, id: &WorkspaceId) -> bool {
        self.connections.count(id) > 0 || self.tasks.running_in(id) > 0
    }

    /// Starts the task that takes `nudges` and re-evaluates each workspace named, sending
    /// fired timers to `expired`. Every workspace in `all` is evaluated once (after a restart
    /// its persisted idle clock is kept; one that was active starts its idle clock now).
    pub fn start(
        self: &Arc<Self>,
        nudges: Nudges,
        expired: mpsc::UnboundedSender<Expired>,
        all: &[Workspace],
    ) {
        let Nudges(mut rx) = nudges;
        let this = Arc::clone(self);
        let first: Vec<WorkspaceId> = all.iter().map(|w| w.id.clone()).collect();
        tokio::spawn(async move {
            for id in &first {
                this.reevaluate(id, &expired);
            }
            while let Some(id) = rx.recv().await {
                this.reevaluate(&id, &expired);
            }
        });
    }

    fn cancel_timer(&self, id: &WorkspaceId) {
        if let Some(t) = self
            .timers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
        {
            t.abort();
        }
    }

    fn reevaluate(&self, id: &WorkspaceId, expired: &mpsc::UnboundedSender<Expired>) {
        let Ok(ws) = self.store.get_workspace(id, None) else {
            self.cancel_timer(id);
            return;
        };
        if ws.state != State::Running || self.is_active(id) {
            self.cancel_timer(id);
            if ws.idle_since.is_some() {
                if let Err(e) = self.store.set_idle_since(id, None) {
                    tracing::warn!(workspace = %id, error = %e, "cannot clear the idle clock");
                }
                self.feed.publish_current(id);
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
                self.feed.publish_current(id);
                now
            }
        };
        let timeout = self.timeout_of(&ws);
        self.cancel_timer(id);
        if timeout == 0 {
            return;
        }
        let deadline = since + timeout as i64;
        let wait = Duration::from_secs(deadline.saturating_sub(crate::store::now()).max(0) as u64);
        tracing::debug!(workspace = %id, idle_since = since, stops_at = deadline, "idle timer armed");
        let expired = expired.clone();
        let fired = (id.clone(), ws.generation);
        let handle = tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = expired.send(fired);
        });
        self.timers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), handle.abort_handle());
    }
}
