//! Starting and stopping: boot and readiness, graceful and forced stop, libvirt lifecycle
//! events, and reconciliation at daemon start. Long work runs in background tasks that hold
//! the workspace's operation lock; their final transition is a CAS, so a newer decision by
//! the user (a forced stop during boot, say) always wins over a stale background task.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::hypervisor::leases::LeaseCheck;

impl Manager {
    /// Moves the workspace to `starting` and boots it in the background. Refused (and
    /// nothing changed) when the host lacks the CPUs or memory it needs.
    pub async fn start_workspace(self: &Arc<Self>, caller: Caller, id: &str) -> Result<Workspace> {
        let _admission = self.admission.lock().await;
        let ws = self.get_workspace(caller, id)?;
        state::transition(ws.state, Event::Start)?;
        self.check_quota_to_run(caller, &ws)?;
        self.check_capacity(&ws)?;
        let dedicated = self.allocate_cpus(&ws)?;
        let gpu = self.allocate_gpu(&ws)?;
        let mut ws = self.apply(&ws, Event::Start, "")?;
        if let Some(device) = gpu {
            self.store.set_gpu_device(&ws.id, Some(&device))?;
            tracing::info!(workspace = %ws.id, gpu = %device, "GPU attached");
            ws.gpu_device = Some(device);
        }
        if !dedicated.is_empty() {
            self.store.set_dedicated_cpus(&ws.id, &dedicated)?;
            tracing::info!(workspace = %ws.id, cpus = ?dedicated, "dedicated host CPUs");
            ws.dedicated_cpus = dedicated;
            self.cpus_changed();
        }
        let this = Arc::clone(self);
        let starting = ws.clone();
        tokio::spawn(async move { this.run_start(starting).await });
        Ok(ws)
    }

    /// Whether the owner's quota lets `ws` run next to its other running workspaces.
    fn check_quota_to_run(&self, caller: Caller, ws: &Workspace) -> Result<()> {
        let hw = ws.pending_hardware.as_ref().unwrap_or(&ws.hardware);
        let running: Vec<Workspace> = self
            .owned_by(ws.owner_uid)?
            .into_iter()
            .filter(|w| w.id != ws.id && !w.state.vm_is_off())
            .collect();
        let vcpus: u64 = running.iter().map(|w| u64::from(w.hardware.cpus)).sum();
        self.quota(caller, vcpus, Claim::RunningVcpus(hw.cpus))?;
        let memory: u64 = running
            .iter()
            .map(|w| u64::from(w.hardware.memory_mb))
            .sum();
        self.quota(
            caller,
            memory,
            Claim::RunningMemoryMb(u64::from(hw.memory_mb)),
        )
    }

    /// Whether the host can run `ws` with the hardware it will start with, next to the
    /// workspaces whose VMs are on.
    fn check_capacity(&self, ws: &Workspace) -> Result<()> {
        let hw = ws.pending_hardware.as_ref().unwrap_or(&ws.hardware);
        let (host_cpus, host_mib) = self.host;
        if hw.cpus > host_cpus {
            return Err(Error::ResourceExhausted(format!(
                "workspace {} needs {} vCPUs but this host has {host_cpus} CPUs",
                ws.id, hw.cpus
            )));
        }
        let allowed = (host_mib as f64 * self.config.memory_overcommit) as u64;
        let in_use: u64 = self
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?
            .iter()
            .filter(|w| w.id != ws.id && !w.state.vm_is_off())
            .map(|w| u64::from(w.hardware.memory_mb))
            .sum();
        if in_use + u64::from(hw.memory_mb) > allowed {
            return Err(Error::ResourceExhausted(format!(
                "workspace {} needs {} MiB of memory; running workspaces use {in_use} of the {allowed} MiB allowed (memory_overcommit {} x {host_mib} MiB of host memory)",
                ws.id, hw.memory_mb, self.config.memory_overcommit
            )));
        }
        Ok(())
    }

    /// Host CPUs that performance workspaces may be given: all but `reserved_host_cpus`.
    fn dedicatable_cpus(&self) -> Vec<u32> {
        (0..self.host.0)
            .filter(|c| !self.config.reserved_host_cpus.contains(c))
            .collect()
    }

    /// Host CPUs held by workspaces whose VM is on (other than `except`).
    fn dedicated_elsewhere(&self, except: &WorkspaceId) -> Result<Vec<u32>> {
        let all = self
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?;
        Ok(held_cpus(&all, Some(except)))
    }

    /// Host CPUs dedicated to nobody: where shared workspaces' vCPUs and every workspace's
    /// emulator threads run. Empty while nothing is dedicated (then they float over all CPUs),
    /// and also when everything is (`reserved_host_cpus = []`): nothing is left to confine to.
    pub fn shared_cpus(&self) -> Result<Vec<u32>> {
        let all = self
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?;
        Ok(self.shared_cpus_of(&all))
    }

    /// [`Manager::shared_cpus`] given every workspace.
    fn shared_cpus_of(&self, workspaces: &[Workspace]) -> Vec<u32> {
        let held = held_cpus(workspaces, None);
        if held.is_empty() {
            return Vec::new();
        }
        (0..self.host.0).filter(|c| !held.contains(c)).collect()
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
        let mut cpus = self.shared_cpus_of(&workspaces);
        if cpus.is_empty() {
            cpus = (0..self.host.0).collect();
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

    /// For a performance workspace, picks one free dedicatable host CPU per vCPU (lowest
    /// first); refused when too few are free. Shared workspaces get none.
    fn allocate_cpus(&self, ws: &Workspace) -> Result<Vec<u32>> {
        let hw = ws.pending_hardware.as_ref().unwrap_or(&ws.hardware);
        if hw.cpu_kind != crate::model::CpuKind::Performance {
            return Ok(Vec::new());
        }
        let held = self.dedicated_elsewhere(&ws.id)?;
        let dedicatable = self.dedicatable_cpus();
        let free: Vec<u32> = dedicatable
            .iter()
            .copied()
            .filter(|c| !held.contains(c))
            .collect();
        if (free.len() as u32) < hw.cpus {
            return Err(Error::ResourceExhausted(format!(
                "workspace {} needs {} dedicated CPUs (cpu kind performance); {} of this host's {} dedicatable CPUs are free (reserved_host_cpus {:?})",
                ws.id,
                hw.cpus,
                free.len(),
                dedicatable.len(),
                self.config.reserved_host_cpus
            )));
        }
        Ok(free[..hw.cpus as usize].to_vec())
    }

    /// For a workspace with a GPU kind, picks a GPU of that kind that no running workspace
    /// holds; refused when all are held.
    fn allocate_gpu(&self, ws: &Workspace) -> Result<Option<String>> {
        let hw = ws.pending_hardware.as_ref().unwrap_or(&ws.hardware);
        let Some(kind) = &hw.gpu_kind else {
            return Ok(None);
        };
        let holders: Vec<(String, WorkspaceId)> = self
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?
            .into_iter()
            .filter(|w| w.id != ws.id && !w.state.vm_is_off())
            .filter_map(|w| w.gpu_device.map(|d| (d, w.id)))
            .collect();
        let of_kind: Vec<_> = self.gpus.iter().filter(|g| g.kind == *kind).collect();
        if of_kind.is_empty() {
            return Err(Error::ResourceExhausted(format!(
                "this host has no GPU of kind {kind} (any more)"
            )));
        }
        match of_kind
            .iter()
            .find(|g| !holders.iter().any(|(d, _)| *d == g.device))
        {
            Some(g) => Ok(Some(g.device.clone())),
            None => {
                // In the order of the GPUs' addresses.
                let users: Vec<String> = of_kind
                    .iter()
                    .filter_map(|g| holders.iter().find(|(d, _)| *d == g.device))
                    .map(|(_, w)| w.to_string())
                    .collect();
                Err(Error::ResourceExhausted(format!(
                    "all {} GPU(s) of kind {kind} are in use (by {}); stop one of those workspaces first",
                    of_kind.len(),
                    users.join(", ")
                )))
            }
        }
    }

    /// The host's GPUs with the workspace holding each, if any.
    pub fn gpu_holders(&self) -> Result<Vec<(crate::hypervisor::gpu::Gpu, Option<WorkspaceId>)>> {
        let all = self
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?;
        Ok(self
            .gpus
            .iter()
            .map(|g| {
                let holder = all
                    .iter()
                    .find(|w| {
                        !w.state.vm_is_off() && w.gpu_device.as_deref() == Some(g.device.as_str())
                    })
                    .map(|w| w.id.clone());
                (g.clone(), holder)
            })
            .collect())
    }

    async fn run_start(&self, ws: Workspace) {
        let lock = self.lock_of(&ws.id);
        let _guard = lock.lock().await;
        let booted = async {
            self.set_phase(&ws.id, "booting");
            let slot = self
                .boot_slots
                .acquire()
                .await
                .map_err(|_| Error::Internal("the daemon is shutting down".into()))?;
            // A stop or delete while it waited for a slot wins: boot nothing.
            if self.store.get_workspace(&ws.id, None)?.generation != ws.generation {
                return Ok(Readiness::Superseded);
            }
            self.hv.define(&self.spec(&ws)?).await?;
            self.release_stale_leases(&ws).await;
            // qemu appends to the console log: keep it bounded across boots.
            let console = self.layout.console_log(&ws.id);
            let capped =
                tokio::task::block_in_place(|| files::cap_log(&console, files::CONSOLE_LOG_MAX));
            if let Err(e) = capped {
                tracing::warn!(workspace = %ws.id, error = %e, "cannot cap the console log");
            }
            self.hv.start(&ws.id).await?;
            drop(slot);
            // The CPUs dedicated elsewhere may have changed since its XML was written.
            self.cpus_changed();
            self.wait_ready(&ws).await
        }
        .await;
        let result = match booted {
            Ok(Readiness::Ready) => self.apply(&ws, Event::Ready, ""),
            Ok(Readiness::Superseded) => return,
            Err(e) => {
                tracing::warn!(workspace = %ws.id, error = %e, "start failed");
                let reason = format!("start failed: {e}{}", self.console_hint(&ws.id));
                // Record the failure before powering off, so the power-off event finds the
                // workspace already in `error`.
                let recorded = self.apply(&ws, Event::BootFailed, &reason);
                if recorded.is_ok() {
                    if let Err(e) = self.hv.destroy(&ws.id).await {
                        tracing::warn!(workspace = %ws.id, error = %e, "cannot power off the failed VM");
                    }
                }
                recorded
            }
        };
        log_background(&ws.id, "start", result);
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

    /// Waits until the guest's SSH port sends its banner. The test driver has no guest, so
    /// there the running domain is ready. Gives up when the boot timeout passes, when the VM
    /// stops, and (without error) when someone else changed the workspace's state.
    async fn wait_ready(&self, ws: &Workspace) -> Result<Readiness> {
        if self.hv.domain_type() == DomainType::Test {
            return match self.hv.status(&ws.id).await? {
                DomainStatus::Active => Ok(Readiness::Ready),
                other => Err(Error::Libvirt(format!(
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
        loop {
            if self.store.get_workspace(&ws.id, None)?.generation != ws.generation {
                return Ok(Readiness::Superseded);
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
            tokio::time::sleep(Duration::from_secs(1)).await;
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
    fn console_hint(&self, id: &WorkspaceId) -> String {
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
                this.on_event(ev);
            }
        });
    }

    fn on_event(&self, ev: DomainEvent) {
        let Some(id) = ev
            .domain()
            .strip_prefix("aether-")
            .and_then(|id| WorkspaceId::parse(id).ok())
        else {
            return;
        };
        let Ok(ws) = self.store.get_workspace(&id, None) else {
            return;
        };
        let result = match (&ev, ws.state) {
            // The stop task waiting for this records it, with its reason.
            (DomainEvent::ShutOff { .. }, State::Stopping) => return,
            (DomainEvent::ShutOff { .. }, _) => {
                self.apply(&ws, Event::PoweredOff, "the guest powered itself off")
            }
            (DomainEvent::Destroyed { .. }, _) => self.apply(
                &ws,
                Event::PoweredOff,
                "the VM was powered off outside aether",
            ),
            (DomainEvent::Crashed { .. }, _) => self.apply(
                &ws,
                Event::Crashed,
                &format!("qemu crashed or failed{}", self.console_hint(&ws.id)),
            ),
        };
        tracing::debug!(workspace = %id, event = ?ev, "lifecycle event");
        log_background(&id, "lifecycle event", result);
    }

    /// A graceful stop moves the workspace to `stopping` and waits for the guest in the
    /// background; a forced stop destroys the VM and returns `stopped`.
    pub async fn stop_workspace(
        self: &Arc<Self>,
        caller: Caller,
        id: &str,
        force: bool,
    ) -> Result<Workspace> {
        let ws = self.get_workspace(caller, id)?;
        if force {
            return self.force_stop(&ws).await;
        }
        let ws = self.apply(&ws, Event::Stop, "")?;
        let this = Arc::clone(self);
        let stopping = ws.clone();
        tokio::spawn(async move { this.run_stop(stopping, "").await });
        Ok(ws)
    }

    pub(super) async fn force_stop(&self, ws: &Workspace) -> Result<Workspace> {
        // Decide first, so a refused request changes nothing.
        state::transition(ws.state, Event::ForceStop)?;
        self.hv.destroy(&ws.id).await?;
        match self.apply(ws, Event::ForceStop, "") {
            // The power-off event (or a boot failure) was recorded first: the VM is off,
            // which is what was asked for.
            Err(Error::Conflict { now, .. }) if now.vm_is_off() => {
                self.store.get_workspace(&ws.id, None)
            }
            other => other,
        }
    }

    /// `reason` is recorded with the final `stopped` state ("idle timeout" for idle stops).
    pub(super) async fn run_stop(&self, ws: Workspace, reason: &str) {
        let lock = self.lock_of(&ws.id);
        let _guard = lock.lock().await;
        let timeout = Duration::from_secs(self.config.stop_timeout_secs);
        self.set_phase(&ws.id, "shutting down");
        let result = match self.shutdown_and_wait(&ws.id, timeout).await {
            Ok(true) => self.apply(&ws, Event::PoweredOff, reason),
            Ok(false) => self.apply(
                &ws,
                Event::StopTimedOut,
                &format!(
                    "the guest did not power off within {} s of the ACPI shutdown request",
                    timeout.as_secs()
                ),
            ),
            Err(e) => self.apply(&ws, Event::StopTimedOut, &format!("stop failed: {e}")),
        };
        log_background(&ws.id, "stop", result);
    }

    /// Asks for an ACPI shutdown and waits (bounded by `timeout`) for the domain to be off.
    async fn shutdown_and_wait(&self, id: &WorkspaceId, timeout: Duration) -> Result<bool> {
        self.hv.shutdown(id).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.hv.status(id).await? != DomainStatus::Active {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Resolves every workspace against libvirt before the API is served: missing domains are
    /// defined again from the database, transitional states are settled. Nothing is deleted.
    pub async fn reconcile(self: &Arc<Self>) -> Result<()> {
        let all = self
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?;
        for ws in all {
            let mut status = self.hv.status(&ws.id).await?;
            if status == DomainStatus::Missing {
                tracing::warn!(workspace = %ws.id, "domain missing; defining it again");
                self.hv.define(&self.spec(&ws)?).await?;
                status = DomainStatus::Off;
            }
            let active = status == DomainStatus::Active;
            let result = match (ws.state, active) {
                // Booted while the daemon was away: wait for readiness again.
                (State::Starting, true) => {
                    let this = Arc::clone(self);
                    let starting = ws.clone();
                    tokio::spawn(async move { this.run_start(starting).await });
                    Ok(ws.clone())
                }
                (State::Starting, false) => self.apply(
                    &ws,
                    Event::BootFailed,
                    "aetherd restarted while the workspace was starting",
                ),
                (State::Running | State::StopFailed, false) => self.apply(
                    &ws,
                    Event::PoweredOff,
                    "found powered off when aetherd started",
                ),
                (State::Stopping, false) => self.apply(&ws, Event::PoweredOff, ""),
                (State::Stopping, true) => {
                    let this = Arc::clone(self);
                    let stopping = ws.clone();
                    tokio::spawn(async move { this.run_stop(stopping, "").await });
                    Ok(ws.clone())
                }
                (State::Stopped | State::Error, true) => {
                    tracing::warn!(workspace = %ws.id, state = %ws.state, "domain is running although the workspace is not; leaving it alone");
                    Ok(ws.clone())
                }
                (State::Running | State::StopFailed, true)
                | (State::Stopped | State::Error, false) => Ok(ws.clone()),
            };
            log_background(&ws.id, "reconcile", result);
        }
        Ok(())
    }
}

/// Host CPUs dedicated to the workspaces whose VM is on, `except` one.
fn held_cpus(workspaces: &[Workspace], except: Option<&WorkspaceId>) -> Vec<u32> {
    workspaces
        .iter()
        .filter(|w| Some(&w.id) != except && !w.state.vm_is_off())
        .flat_map(|w| w.dedicated_cpus.iter().copied())
        .collect()
}

enum Readiness {
    Ready,
    /// The workspace's state changed while booting (e.g. it was stopped): not ours to record.
    Superseded,
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
