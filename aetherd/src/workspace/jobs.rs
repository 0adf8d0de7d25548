//! The long jobs a runner hands out: the boot (a boot slot, then a resume from the memory
//! image if there is one, else define and start; then readiness), the graceful stop (an
//! ACPI shutdown, then the stop timeout) and the suspend (the guest's memory saved to its
//! memory image). Each ends early when its runner cancels it, between libvirt calls, so a
//! cancelled boot never starts the VM afterwards.

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

    /// The boot job: waits for a boot slot; resumes the guest from its memory image if it
    /// has one, else defines and starts the domain; and waits until the guest is ready. A
    /// resume that fails falls back to a cold boot, and says so in the outcome. Ends early
    /// (`Cancelled`) when its runner cancels it, between libvirt calls, so a cancelled boot
    /// never starts the VM afterwards.
    pub async fn boot(
        &self,
        ws: &Workspace,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<BootOutcome> {
        let image = self.layout.memory_image(&ws.id);
        let resume = image.exists();
        self.feed
            .set_phase(&ws.id, if resume { "resuming" } else { "booting" });
        let slot = tokio::select! {
            slot = self.boot_slots.acquire() => {
                slot.map_err(|_| Error::Internal("the daemon is shutting down".into()))?
            }
            _ = cancelled(&mut cancel) => return Ok(BootOutcome::Cancelled),
        };
        let mut note = None;
        if resume {
            match self.resume(ws, &image).await {
                Ok(()) => {
                    drop(slot);
                    self.pinning.changed();
                    return Ok(match self.readiness.wait_ready(ws, cancel).await? {
                        BootOutcome::Ready(_) => BootOutcome::Ready(None),
                        BootOutcome::Cancelled => BootOutcome::Cancelled,
                    });
                }
                Err(e) => {
                    tracing::warn!(workspace = %ws.id, error = %e, "resume failed; booting afresh");
                    note = Some(format!("the resume failed ({e}), so it booted afresh"));
                    self.feed.set_phase(&ws.id, "booting");
                }
            }
        }
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
        Ok(match self.readiness.wait_ready(ws, cancel).await? {
            BootOutcome::Ready(_) => BootOutcome::Ready(note),
            BootOutcome::Cancelled => BootOutcome::Cancelled,
        })
    }

    /// Restores the guest from `image` and removes the image, which is stale once the guest
    /// runs on. A VM found running already (a resume the daemon did not see finish) only
    /// loses its stale image. An image that cannot be restored is removed too: the next
    /// boot is a cold one.
    async fn resume(&self, ws: &Workspace, image: &std::path::Path) -> Result<()> {
        let result = if self.hv.status(&ws.id).await? == DomainStatus::Active {
            Ok(())
        } else {
            self.hv.restore(&ws.id, image).await
        };
        crate::fault::point("resume:restored");
        if let Err(e) = self.layout.remove_memory_image(&ws.id) {
            tracing::warn!(workspace = %ws.id, error = %e, "cannot remove the memory image");
        }
        result
    }

    /// The suspend job: saves the guest's memory to its memory image, which powers the VM
    /// off. Cancelled (a forced stop), it powers the VM off, which ends the save at once.
    pub async fn save(&self, id: &WorkspaceId, mut cancel: watch::Receiver<bool>) -> Result<()> {
        self.feed.set_phase(id, "suspending");
        let image = self.layout.memory_image(id);
        let save = self.hv.save(id, &image);
        tokio::pin!(save);
        tokio::select! {
            result = &mut save => result,
            _ = cancelled(&mut cancel) => {
                let _ = self.hv.destroy(id).await;
                let _ = save.await;
                let _ = self.layout.remove_memory_image(id);
                Ok(())
            }
        }
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
