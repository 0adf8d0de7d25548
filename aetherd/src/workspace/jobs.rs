//! The two long jobs a runner hands out: the boot (a boot slot, define, start, readiness)
//! and the graceful stop (an ACPI shutdown, then the stop timeout). Each ends early when
//! its runner cancels it, between libvirt calls, so a cancelled boot never starts the VM
//! afterwards.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::feed::Feed;
use crate::files;
use crate::host::Layout;
use crate::hypervisor::{DomainStatus, Hypervisor};
use crate::model::WorkspaceId;
use crate::store::Workspace;
use crate::workspace::pinning::Pinning;
use crate::workspace::provision::Provisioner;
use crate::workspace::readiness::{BootOutcome, Readiness};
use crate::workspace::runner::{cancelled, sleep_or_cancel};

/// How many domains are started at once: libvirt launches qemu and instantiates a NIC's
/// network filter per start, and twelve at once took one `virDomainCreate` past the call
/// timeout. The rest wait for a slot (phase `booting`), not inside libvirt.
const BOOT_SLOTS: usize = 2;

pub struct Jobs {
    hv: Arc<Hypervisor>,
    layout: Layout,
    feed: Arc<Feed>,
    pinning: Arc<Pinning>,
    provisioner: Arc<Provisioner>,
    readiness: Readiness,
    boot_slots: tokio::sync::Semaphore,
    stop_timeout: Duration,
}

impl Jobs {
    pub fn new(
        hv: Arc<Hypervisor>,
        layout: Layout,
        feed: Arc<Feed>,
        pinning: Arc<Pinning>,
        provisioner: Arc<Provisioner>,
        readiness: Readiness,
        stop_timeout: Duration,
    ) -> Self {
        Jobs {
            hv,
            layout,
            feed,
            pinning,
            provisioner,
            readiness,
            boot_slots: tokio::sync::Semaphore::new(BOOT_SLOTS),
            stop_timeout,
        }
    }

    /// How long a graceful stop waits for the guest.
    pub fn stop_timeout(&self) -> Duration {
        self.stop_timeout
    }

    /// The boot job: waits for a boot slot, defines and starts the domain, and waits until
    /// the guest is ready. Ends early (`Cancelled`) when its runner cancels it, between
    /// libvirt calls, so a cancelled boot never starts the VM afterwards.
    pub async fn boot(
        &self,
        ws: &Workspace,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<BootOutcome> {
        self.feed.set_phase(&ws.id, "booting");
        let slot = tokio::select! {
            slot = self.boot_slots.acquire() => {
                slot.map_err(|_| Error::Internal("the daemon is shutting down".into()))?
            }
            _ = cancelled(&mut cancel) => return Ok(BootOutcome::Cancelled),
        };
        self.provisioner.define(ws).await?;
        crate::fault::point("start:defined");
        self.readiness.release_stale_leases(ws).await;
        // qemu appends to the console log: keep it bounded across boots.
        let console = self.layout.console_log(&ws.id);
        let capped =
            tokio::task::block_in_place(|| files::cap_log(&console, files::CONSOLE_LOG_MAX));
        if let Err(e) = capped {
            tracing::warn!(workspace = %ws.id, error = %e, "cannot cap the console log");
        }
        if *cancel.borrow() {
            return Ok(BootOutcome::Cancelled);
        }
        self.hv.start(&ws.id).await?;
        crate::fault::point("start:started");
        drop(slot);
        // The CPUs dedicated elsewhere may have changed since its XML was written.
        self.pinning.changed();
        self.readiness.wait_ready(ws, cancel).await
    }

    /// The graceful-stop job: asks for an ACPI shutdown and waits until the stop timeout
    /// passes; whether the VM is off then. The guest's ShutOff event, which the runner gets,
    /// is what normally ends a stop (the runner then cancels this job).
    pub async fn shut_down(
        &self,
        id: &WorkspaceId,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<bool> {
        self.feed.set_phase(id, "shutting down");
        if self.hv.status(id).await? != DomainStatus::Active {
            return Ok(true);
        }
        self.hv.shutdown(id).await?;
        if sleep_or_cancel(self.stop_timeout, &mut cancel).await {
            return Ok(true);
        }
        // The timeout passed without the event: it may have been missed.
        Ok(self.hv.status(id).await? != DomainStatus::Active)
    }
}
