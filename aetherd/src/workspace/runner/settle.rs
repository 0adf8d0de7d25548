//! The runner's two settling inputs: delete (everything of the workspace goes, in an order a
//! crash can resume) and reconcile at daemon start (the row and libvirt brought in line).

use crate::error::{Error, Result};
use crate::hypervisor::DomainStatus;
use crate::store::Workspace;
use crate::workspace::state::{Event, State};

use super::{log_result, Runner};

impl Runner {
    /// Deletes the domain, volume, seed, reservation and row. Without `force` the VM must be
    /// off; with it, it is powered off first.
    pub(super) async fn delete(&mut self, mut ws: Workspace, force: bool) -> Result<()> {
        if !ws.state.deletable() {
            if !force {
                return Err(Error::precondition(format!(
                    "workspace is {}: stop it first, or delete with --force",
                    ws.state
                )));
            }
            ws = self.apply(ws, Event::ForceStop, "", None).await?;
        }
        self.cancel_job().await;
        // Marked first: a daemon that dies from here on leaves a delete that reconcile
        // finishes.
        let ws = self.w.d.store.mark_deleting(&ws)?;
        crate::fault::point("delete:marked");
        self.w.d.provisioner.deprovision(&ws).await?;
        self.w.d.store.delete_workspace(&ws)?;
        self.w.deleted(&ws);
        Ok(())
    }

    /// Brings the row and libvirt in line after a daemon start: a missing domain is defined
    /// again, a transitional state is settled or its job resumed. Nothing is deleted.
    pub(super) async fn reconcile(&mut self, ws: Workspace) -> Result<()> {
        if ws.provisioning.is_some() {
            self.w.d.provisioner.settle(&ws).await?;
            self.w.deleted(&ws);
            return Ok(());
        }
        self.w.d.provisioner.ensure_seed(&ws).await?;
        let mut status = self.w.d.hv.status(&ws.id).await?;
        if status == DomainStatus::Missing {
            tracing::warn!(workspace = %ws.id, "domain missing; defining it again");
            self.w.d.provisioner.define(&ws).await?;
            status = DomainStatus::Off;
        }
        let active = status == DomainStatus::Active;
        if active && ws.state == State::Running {
            // A resume the daemon did not see through: the guest runs on, its image is stale.
            self.w.d.layout.remove_memory_image(&ws.id)?;
        }
        let result = match (ws.state, active) {
            // Booted while the daemon was away: wait for readiness again.
            (State::Starting, true) => {
                self.spawn_boot(&ws);
                Ok(ws)
            }
            (State::Starting, false) => {
                self.apply(
                    ws,
                    Event::BootFailed,
                    "aetherd restarted while the workspace was starting",
                    None,
                )
                .await
            }
            (State::Running | State::StopFailed, false) => {
                self.apply(
                    ws,
                    Event::PoweredOff,
                    "found powered off when aetherd started",
                    None,
                )
                .await
            }
            (State::Stopping, false) => self.apply(ws, Event::PoweredOff, "", None).await,
            (State::Stopping, true) => {
                self.stop_reason = "";
                self.spawn_shutdown(&ws);
                Ok(ws)
            }
            (State::Stopped | State::Error, true) => {
                tracing::warn!(workspace = %ws.id, state = %ws.state, "domain is running although the workspace is not; leaving it alone");
                Ok(ws)
            }
            (State::Running | State::StopFailed, true) | (State::Stopped | State::Error, false) => {
                Ok(ws)
            }
        };
        log_result(&self.id, "reconcile", result);
        Ok(())
    }
}
