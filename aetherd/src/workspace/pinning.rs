//! CPU pinning of running VMs: every running VM is confined to the shared CPUs (a shared
//! workspace's vCPUs and emulator threads; a performance workspace's emulator threads), so
//! no VM runs on a CPU that was dedicated after it booted, and they widen again once it is
//! released. One background task re-pins whenever CPUs are dedicated or released
//! ([`Pinning::changed`]; bursts coalesce). Failures are logged: pinning is an optimisation
//! of placement, not a reason to fail a start or stop.

use std::sync::Arc;

use crate::error::Result;
use crate::hypervisor::Hypervisor;
use crate::store::{Store, WorkspaceFilter};
use crate::workspace::placement::Placement;

pub struct Pinning {
    store: Arc<Store>,
    hv: Arc<Hypervisor>,
    placement: Arc<Placement>,
    wake: tokio::sync::Notify,
}

impl Pinning {
    pub fn new(store: Arc<Store>, hv: Arc<Hypervisor>, placement: Arc<Placement>) -> Self {
        Pinning {
            store,
            hv,
            placement,
            wake: tokio::sync::Notify::new(),
        }
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Host CPUs dedicated to nobody (see [`Placement::shared_cpus`]).
    pub fn shared_cpus(&self) -> Result<Vec<u32>> {
        let all = self
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?;
        Ok(self.placement.shared_cpus(&all))
    }

    /// Asks the pinning task to bring the running VMs in line with the dedicated CPUs.
    pub fn changed(&self) {
        self.wake.notify_one();
    }

    /// Pins once now (what was dedicated may have changed while the daemon was down), then
    /// whenever [`Pinning::changed`] is called.
    pub fn start(self: &Arc<Self>) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                this.repin_running().await;
                this.wake.notified().await;
            }
        });
    }

    async fn repin_running(&self) {
        let workspaces = match self
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)
        {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list workspaces to pin their CPUs");
                return;
            }
        };
        let mut cpus = self.placement.shared_cpus(&workspaces);
        if cpus.is_empty() {
            cpus = (0..self.placement.host_cpus()).collect();
        }
        for ws in workspaces.iter().filter(|w| !w.state.vm_is_off()) {
            let shared = ws.dedicated_cpus.is_empty();
            match self.hv.pin_to(&ws.id, &cpus, shared).await {
                Ok(()) => tracing::debug!(workspace = %ws.id, cpus = ?cpus, shared, "pinned"),
                Err(e) => {
                    tracing::warn!(workspace = %ws.id, error = %e, "cannot pin the VM's CPUs")
                }
            }
        }
    }
}
