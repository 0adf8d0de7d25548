//! Starting and stopping: placement (quota, capacity, dedicated CPUs, GPU), the boot and
//! readiness job, the graceful-stop job, libvirt lifecycle events and reconcile at daemon
//! start. The runner of each workspace (`workspace::runner`) decides and records every
//! transition; this is the work it hands out.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::*;
use crate::hypervisor::leases::LeaseCheck;
use crate::workspace::runner::{sleep_or_cancel, Input};

impl Manager {
    /// Moves the workspace to `starting` and boots it in the background. Refused (and
    /// nothing changed) when the host or the owner's quota lacks the CPUs or memory it
    /// needs; a workspace already starting or running is returned as it is.
    pub async fn start_workspace(self: &Arc<Self>, caller: Caller, id: &str) -> Result<Workspace> {
        let ws = self.get_workspace(caller, id)?;
        self.ask(&ws.id, |r| Input::Start(caller, r)).await
    }

    /// Picks what `ws` needs to run, for the runner's start transition (see
    /// [`Placement::place`]).
    pub(crate) fn place(
        &self,
        caller: Caller,
        ws: &Workspace,
        all: &[Workspace],
    ) -> Result<(Vec<u32>, Option<String>)> {
        self.placement.place(caller, ws, all)
    }

    /// Host CPUs dedicated to nobody (see [`Placement::shared_cpus`]).
    pub fn shared_cpus(&self) -> Result<Vec<u32>> {
        let all = self
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?;
        Ok(self.placement.shared_cpus(&all))
    }

    /// Asks the pinning task to bring the running VMs in line with the dedicated CPUs.
    pub(super) fn cpus_changed(&self) {
        self.repin.notify_one();
    }

    /// Confines every running VM to the shared CPUs (a shared workspace's vCPUs and emulator
    /// threads; a performance workspace's emulator threads), so no other VM runs on a CPU that
    /// was dedicated after it booted, and widens them again once it is released. Failures are
    /// logged: pinning is an optimisation of placement, not a reason to fail a start or stop.
    pub(super) async fn repin_running(&self) {
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

    /// The host's GPUs with the workspace holding each, if any.
    pub fn gpu_holders(&self) -> Result<Vec<(crate::hypervisor::gpu::Gpu, Option<WorkspaceId>)>> {
        let all = self
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?;
        Ok(self.placement.gpu_holders(&all))
    }

    /// The boot job: waits for a boot slot, defines and starts the domain, and waits until
    /// the guest is ready. Ends early (`Cancelled`) when its runner cancels it, between
    /// libvirt calls, so a cancelled boot never starts the VM afterwards.
    pub(crate) async fn boot(
        &self,
        ws: &Workspace,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<Readiness> {
        self.set_phase(&ws.id, "booting");
        let slot = tokio::select! {
            slot = self.boot_slots.acquire() => {
                slot.map_err(|_| Error::Internal("the daemon is shutting down".into()))?
            }
            _ = crate::workspace::runner::cancelled(&mut cancel) => return Ok(Readiness::Cancelled),
        };
        self.hv.define(&self.spec(ws)?).await?;
        crate::fault::point("start:defined");
        self.release_stale_leases(ws).await;
        // qemu appends to the console log: keep it bounded across boots.
        let console = self.layout.console_log(&ws.id);
        let capped =
            tokio::task::block_in_place(|| files::cap_log(&console, files::CONSOLE_LOG_MAX));
        if let Err(e) = capped {
            tracing::warn!(workspace = %ws.id, error = %e, "cannot cap the console log");
        }
        if *cancel.borrow() {
            return Ok(Readiness::Cancelled);
        }
        self.hv.start(&ws.id).await?;
        crate::fault::point("start:started");
        drop(slot);
        // The CPUs dedicated elsewhere may have changed since its XML was written.
        self.cpus_changed();
        self.wait_ready(ws, cancel).await
    }

    /// Releases leases that would keep the guest from its reserved address: another MAC's
    /// lease on it (a deleted workspace whose release was lost, say to a crash), and a lease
    /// of this MAC on any other address. Failures are logged; readiness tells the user if the
    /// guest then gets the wrong address.
    async fn release_stale_leases(&self, ws: &Workspace) {
        let (Some(mac), Some(ip)) = (&ws.mac, ws.ip) else {
            return;
        };
        let leases = match self.hv.dhcp_leases().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(workspace = %ws.id, error = %e, "cannot read the DHCP leases");
                return;
            }
        };
        for stale in leases.iter().filter(|l| (l.ip == ip) != (l.mac == *mac)) {
            tracing::info!(workspace = %ws.id, ip = %stale.ip, mac = %stale.mac, "releasing a stale DHCP lease");
            if let Err(e) = self
                .hv
                .release_lease(self.subnet.gateway(), stale.ip, &stale.mac)
                .await
            {
                tracing::warn!(workspace = %ws.id, error = %e, "cannot release a stale DHCP lease");
            }
        }
    }

    /// What the network's leases say about `ws`'s guest; `Reserved` when they cannot be read
    /// (then readiness just waits for SSH, as without this check).
    async fn lease_check(&self, ws: &Workspace, ip: std::net::Ipv4Addr) -> LeaseCheck {
        let Some(mac) = &ws.mac else {
            return LeaseCheck::Reserved;
        };
        match self.hv.dhcp_leases().await {
            Ok(leases) => crate::hypervisor::leases::check(&leases, mac, ip),
            Err(e) => {
                tracing::debug!(workspace = %ws.id, error = %e, "cannot read the DHCP leases");
                LeaseCheck::Reserved
            }
        }
    }

    fn boot_timeout(&self) -> Duration {
        let secs = self
            .config
            .boot_timeout_secs
            .unwrap_or(match self.hv.domain_type() {
                DomainType::Kvm => 120,
                DomainType::Qemu | DomainType::Test => 300,
            });
        Duration::from_secs(secs)
    }

    /// Waits until the guest's SSH port sends its banner, trying again with a growing pause
    /// (from 250 ms to 2 s). The test driver has no guest, so there the running domain is
    /// ready. Gives up when the boot timeout passes, when the VM stops, and (without error)
    /// when its runner cancels it.
    async fn wait_ready(
        &self,
        ws: &Workspace,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<Readiness> {
        if self.hv.domain_type() == DomainType::Test {
            return match self.hv.status(&ws.id).await? {
                DomainStatus::Active => Ok(Readiness::Ready),
                other => Err(Error::libvirt(format!(
                    "domain is {other:?} right after it was started"
                ))),
            };
        }
        let ip = ws
            .ip
            .ok_or_else(|| Error::precondition(format!("workspace {} has no IP address", ws.id)))?;
        self.set_phase(&ws.id, "waiting for ssh");
        let mut waiting_for_cloud_init = false;
        let timeout = self.boot_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(250);
        loop {
            if *cancel.borrow() {
                return Ok(Readiness::Cancelled);
            }
            if self.hv.status(&ws.id).await? != DomainStatus::Active {
                return Err(Error::Internal("the VM stopped while booting".into()));
            }
            let lease = self.lease_check(ws, ip).await;
            if let LeaseCheck::Elsewhere(other) = lease {
                // Free both addresses now, so the next start gets the reserved one.
                self.release_stale_leases(ws).await;
                return Err(Error::Internal(format!(
                    "the guest got {other} from DHCP instead of its reserved address {ip}, so aetherd cannot reach it; the stale leases were released: start it again"
                )));
            }
            if ssh_banner(std::net::SocketAddr::from((ip, 22))).await {
                if !waiting_for_cloud_init {
                    waiting_for_cloud_init = true;
                    self.set_phase(&ws.id, "waiting for cloud-init");
                }
                if self.guest_settled(ws, ip, deadline).await {
                    return Ok(Readiness::Ready);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Internal(if waiting_for_cloud_init {
                    format!(
                        "the guest answered SSH on {ip}:22 but aetherd could not log in, or cloud-init did not finish, within {} s",
                        timeout.as_secs()
                    )
                } else if lease == LeaseCheck::Missing {
                    format!(
                        "the guest did not answer SSH on {ip}:22 within {} s; it never asked for that address by DHCP (no lease)",
                        timeout.as_secs()
                    )
                } else {
                    format!(
                        "the guest did not answer SSH on {ip}:22 within {} s",
                        timeout.as_secs()
                    )
                }));
            }
            if sleep_or_cancel(pause, &mut cancel).await {
                return Ok(Readiness::Cancelled);
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Whether the daemon can log in to the guest with its own key and cloud-init (if the
    /// guest has it) has finished: until then cloud-init may still install keys or restart
    /// sshd, and a user's first connections would fail. Bounded by `deadline`.
    async fn guest_settled(
        &self,
        ws: &Workspace,
        ip: std::net::Ipv4Addr,
        deadline: tokio::time::Instant,
    ) -> bool {
        const SETTLE: &str = "if command -v cloud-init >/dev/null 2>&1; then cloud-init status --wait >/dev/null 2>&1; fi; true";
        let Ok(mut ssh) = self.daemon_ssh(ws, ip, SETTLE) else {
            return false;
        };
        let run = ssh
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status();
        matches!(
            tokio::time::timeout_at(deadline, run).await,
            Ok(Ok(status)) if status.success()
        )
    }

    /// " (last console lines: …)" for reasons, or "" without a console log.
    pub(crate) fn console_hint(&self, id: &WorkspaceId) -> String {
        let tail = tail(&self.layout.console_log(id), 4096).unwrap_or_default();
        let text = String::from_utf8_lossy(&tail);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if lines.is_empty() {
            return String::new();
        }
        let last = lines[lines.len().saturating_sub(3)..].join(" | ");
        let last: String = last.chars().filter(|c| !c.is_control()).take(300).collect();
        format!("; console: {last} (aether workspace logs {id} --console)")
    }

    /// Applies libvirt lifecycle events to the workspaces they concern, until the stream ends.
    pub fn watch_events(self: &Arc<Self>) {
        let Some(mut rx) = self.hv.take_events() else {
            return;
        };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                this.on_event(ev).await;
            }
        });
    }

    /// Hands a lifecycle event to the runner of the workspace whose domain it concerns.
    async fn on_event(self: &Arc<Self>, ev: DomainEvent) {
        let Some(id) = ev
            .domain()
            .strip_prefix("aether-")
            .and_then(|id| WorkspaceId::parse(id).ok())
        else {
            return;
        };
        if self.store.get_workspace(&id, None).is_err() {
            return;
        }
        self.send(&id, Input::Domain(ev)).await;
    }

    /// A graceful stop moves the workspace to `stopping` and waits for the guest in the
    /// background; a forced stop powers the VM off and returns `stopped`. A workspace already
    /// stopping or stopped is returned as it is.
    pub async fn stop_workspace(
        self: &Arc<Self>,
        caller: Caller,
        id: &str,
        force: bool,
    ) -> Result<Workspace> {
        let ws = self.get_workspace(caller, id)?;
        if force {
            self.ask(&ws.id, Input::ForceStop).await
        } else {
            self.ask(&ws.id, Input::Stop).await
        }
    }

    pub(crate) fn stop_timeout(&self) -> Duration {
        Duration::from_secs(self.config.stop_timeout_secs)
    }

    /// The graceful-stop job: asks for an ACPI shutdown and waits until the stop timeout
    /// passes; whether the VM is off then. The guest's ShutOff event, which the runner gets,
    /// is what normally ends a stop (the runner then cancels this job).
    pub(crate) async fn shut_down(
        &self,
        id: &WorkspaceId,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<bool> {
        self.set_phase(id, "shutting down");
        if self.hv.status(id).await? != DomainStatus::Active {
            return Ok(true);
        }
        self.hv.shutdown(id).await?;
        if sleep_or_cancel(self.stop_timeout(), &mut cancel).await {
            return Ok(true);
        }
        // The timeout passed without the event: it may have been missed.
        Ok(self.hv.status(id).await? != DomainStatus::Active)
    }

    /// Resolves every workspace against libvirt before the API is served: missing domains are
    /// defined again from the database, transitional states are settled. Nothing is deleted.
    pub async fn reconcile(self: &Arc<Self>) -> Result<()> {
        let all = self
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?;
        for ws in all {
            self.ask(&ws.id, Input::Reconcile).await?;
        }
        self.sweep_orphans().await
    }

    /// Removes files in the pool and boot dirs that no row accounts for: a workspace's
    /// volume or seed, an image or its kernel and initrd, left by a daemon that died between
    /// making or removing a file and writing its row. Every row's files are made after the
    /// row is written and removed before it goes, so none of these can be in use.
    async fn sweep_orphans(&self) -> Result<()> {
        let workspaces: std::collections::HashSet<String> = self
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?
            .into_iter()
            .map(|w| w.id.to_string())
            .collect();
        let images: std::collections::HashSet<String> = self
            .store
            .list_images(None)?
            .into_iter()
            .map(|i| i.id.to_string())
            .collect();
        let names = |dir: &std::path::Path| -> Vec<String> {
            std::fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut removed_volume = false;
        for name in names(&self.layout.pool()) {
            let orphan = if let Some(id) = name
                .strip_suffix("-root.qcow2")
                .or_else(|| name.strip_suffix("-seed.img"))
            {
                WorkspaceId::parse(id).is_ok() && !workspaces.contains(id)
            } else if let Some(id) = name
                .strip_prefix("image-")
                .and_then(|n| n.strip_suffix(".qcow2"))
            {
                ImageId::parse(id).is_ok() && !images.contains(id)
            } else {
                false
            };
            if orphan {
                tracing::warn!(file = %name, "removing a pool file no workspace or image owns");
                self.hv.delete_volume(&name).await?;
                let _ = std::fs::remove_file(self.layout.pool().join(&name));
                removed_volume = true;
            }
        }
        if removed_volume {
            self.hv.refresh_pool().await?;
        }
        let boot = self.layout.state_dir.join("boot");
        for name in names(&boot) {
            if ImageId::parse(&name).is_ok() && !images.contains(&name) {
                tracing::warn!(dir = %name, "removing a boot dir no image owns");
                let _ = std::fs::remove_dir_all(boot.join(&name));
            }
        }
        Ok(())
    }
}

/// How a boot job ended, when it did not fail.
pub enum Readiness {
    Ready,
    /// Its runner cancelled it (the workspace was stopped meanwhile): nothing to record.
    Cancelled,
}

/// Whether something at `addr` accepts a TCP connection and sends an SSH banner.
async fn ssh_banner(addr: std::net::SocketAddr) -> bool {
    use tokio::io::AsyncReadExt;
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"SSH-")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Some(true))
    )
}
