//! Changing a workspace: hardware (at once while its VM is off, as pending changes that the
//! next start applies otherwise; the volume grows at once either way) and its idle timeout.

use super::*;

impl Manager {
    /// Changes hardware: at once while the VM is off, as pending changes otherwise.
    /// The idle timeout, if given, applies at once.
    pub async fn update_workspace(
        self: &Arc<Self>,
        caller: Caller,
        id: &str,
        req: &HardwareRequest,
        idle_timeout: Option<&str>,
    ) -> Result<Workspace> {
        let ws = self.get_workspace(caller, id)?;
        let idle_timeout_secs = idle_timeout
            .map(crate::model::parse_duration_secs)
            .transpose()?;
        self.ask(&ws.id, |reply| Input::Update {
            caller,
            hardware: req.clone(),
            idle_timeout_secs,
            reply,
        })
        .await
    }

    /// [`Manager::update_workspace`], in the workspace's runner. Everything is validated
    /// before anything changes.
    pub(crate) async fn update(
        &self,
        caller: Caller,
        ws: &Workspace,
        req: &HardwareRequest,
        idle: Option<u64>,
    ) -> Result<Workspace> {
        let ws = ws.clone();
        let base = ws.pending_hardware.as_ref().unwrap_or(&ws.hardware);
        let wanted = base.with(req, &self.limits())?;
        if wanted.volume_size_gb > ws.hardware.volume_size_gb {
            self.quota(
                caller,
                volume_gb(&self.owned_by(ws.owner_uid)?),
                Claim::VolumeGb(u64::from(
                    wanted.volume_size_gb - ws.hardware.volume_size_gb,
                )),
            )?;
        }
        let ws = if req.is_empty() {
            ws
        } else {
            self.update_hardware(&ws, req).await?
        };
        if let Some(secs) = idle {
            self.store.set_idle_timeout(&ws.id, Some(secs))?;
            tracing::info!(workspace = %ws.id, idle_timeout_secs = secs, "idle timeout updated");
            self.idle_changed(&ws.id);
        }
        let updated = self.store.get_workspace(&ws.id, None)?;
        self.publish(live::ChangeKind::Changed, &updated);
        Ok(updated)
    }

    async fn update_hardware(&self, ws: &Workspace, req: &HardwareRequest) -> Result<Workspace> {
        let ws = ws.clone();
        let base = ws.pending_hardware.as_ref().unwrap_or(&ws.hardware);
        let wanted = base.with(req, &self.limits())?;
        if wanted.volume_size_gb < ws.hardware.volume_size_gb {
            return Err(Error::invalid(format!(
                "volume size can only grow: it is {} GiB, requested {} GiB",
                ws.hardware.volume_size_gb, wanted.volume_size_gb
            )));
        }
        if wanted.volume_size_gb > ws.hardware.volume_size_gb {
            // The volume grows now, running or not; the guest's filesystem grows at its next
            // boot (cloud-init's resizefs, or the test guest's resize2fs).
            let running = !ws.state.vm_is_off();
            self.hv
                .grow_root(
                    &ws.id,
                    &root_volume_name(&ws.id),
                    u64::from(wanted.volume_size_gb) << 30,
                    running,
                )
                .await?;
            tracing::info!(workspace = %ws.id, volume_size_gb = wanted.volume_size_gb, live = running, "root volume grown");
        }
        if ws.state.vm_is_off() {
            let updated = self.store.set_hardware(&ws, &wanted, None)?;
            if let Err(e) = self.hv.define(&self.spec(&updated)?).await {
                // Undo, so the database keeps describing the defined domain.
                let _ =
                    self.store
                        .set_hardware(&updated, &ws.hardware, ws.pending_hardware.as_ref());
                return Err(e);
            }
            tracing::info!(workspace = %ws.id, hardware = %wanted, "hardware updated");
            Ok(updated)
        } else {
            // The volume size took effect already; the rest waits for the next start.
            let current = Hardware {
                volume_size_gb: wanted.volume_size_gb,
                ..ws.hardware.clone()
            };
            let pending = (wanted != current).then_some(&wanted);
            let updated = self.store.set_hardware(&ws, &current, pending)?;
            if pending.is_some() {
                tracing::info!(workspace = %ws.id, pending = %wanted, "hardware change pending until next start");
            }
            Ok(updated)
        }
    }
}
