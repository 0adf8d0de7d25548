//! Workspace and project operations: the daemon's core, independent of gRPC.
//!
//! Each operation decides its state change with [`state::transition`], writes it as a
//! compare-and-swap, and then does the slow libvirt work. Long work (booting, graceful
//! shutdown) runs in a background task that holds the workspace's operation lock, so the
//! libvirt steps of one workspace never interleave; its final transition is again a CAS, so a
//! user's later decision (say, a forced stop during boot) wins over a stale background task.
//!
//! Multi-step operations undo what they did when a later step fails: a workspace whose domain
//! cannot be defined is not left in the database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::hypervisor::{DomainSpec, DomainStatus, Hypervisor};
use crate::model::{
    Hardware, HardwareLimits, HardwareRequest, ProjectName, ProjectRef, WorkspaceId,
};
use crate::store::{Owner, Project, Store, Workspace, WorkspaceFilter};
use crate::tunnel::Connections;
use crate::workspace::state::{self, Event, State};

/// Who is asking, from the socket peer's credentials.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    /// Root (or the daemon's own user): sees and operates everything.
    pub admin: bool,
}

impl Caller {
    fn owner(&self) -> Owner {
        if self.admin {
            None
        } else {
            Some(self.uid)
        }
    }
}

#[derive(Clone, Debug)]
pub struct HostInfo {
    pub version: &'static str,
    pub libvirt_uri: String,
    pub libvirt_version: String,
    pub hypervisor: String,
    pub accelerator: &'static str,
    pub max_volume_size_gb: u32,
}

pub struct Manager {
    store: Store,
    hv: Hypervisor,
    config: Config,
    /// One lock per workspace, held by whatever is doing libvirt work on it.
    locks: Mutex<HashMap<WorkspaceId, Arc<tokio::sync::Mutex<()>>>>,
    /// Open tunnels per workspace.
    pub connections: Connections,
}

impl Manager {
    pub fn new(store: Store, hv: Hypervisor, config: Config) -> Arc<Manager> {
        Arc::new(Manager {
            store,
            hv,
            config,
            locks: Mutex::new(HashMap::new()),
            connections: Connections::default(),
        })
    }

    fn lock_of(&self, id: &WorkspaceId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.clone()).or_default().clone()
    }

    fn limits(&self) -> HardwareLimits {
        HardwareLimits {
            max_volume_size_gb: self.config.max_volume_size_gb,
            // GPU discovery through libvirt node devices is not implemented yet, so no kind
            // is accepted.
            gpu_kinds: Vec::new(),
        }
    }

    fn spec(&self, ws: &Workspace) -> DomainSpec {
        DomainSpec {
            workspace: ws.id.clone(),
            project: ws.project_id.clone(),
            uuid: ws.uuid.clone(),
            domain_type: self.hv.domain_type(),
            cpus: ws.hardware.cpus,
            memory_mb: ws.hardware.memory_mb,
        }
    }

    /// Decides `event` for `ws` and writes it as a CAS.
    fn apply(&self, ws: &Workspace, event: Event, reason: &str) -> Result<Workspace> {
        let to = state::transition(ws.state, event)?;
        if to == ws.state {
            return Ok(ws.clone());
        }
        self.store.cas_state(ws, to, reason, event == Event::Start)
    }

    pub async fn host_info(&self) -> Result<HostInfo> {
        let v = self.hv.versions().await?;
        Ok(HostInfo {
            version: env!("CARGO_PKG_VERSION"),
            libvirt_uri: self.hv.uri().to_owned(),
            libvirt_version: v.libvirt_version,
            hypervisor: v.hypervisor,
            accelerator: self.hv.domain_type().accelerator(),
            max_volume_size_gb: self.config.max_volume_size_gb,
        })
    }

    // ---- projects ----

    pub fn create_project(&self, caller: Caller, name: &str) -> Result<Project> {
        let name = ProjectName::parse(name)?;
        let p = self.store.insert_project(&name, caller.uid)?;
        tracing::info!(project = %p.id, name = %p.name, uid = caller.uid, "project created");
        Ok(p)
    }

    pub fn list_projects(&self, caller: Caller) -> Result<Vec<Project>> {
        self.store.list_projects(caller.owner())
    }

    pub fn get_project(&self, caller: Caller, project: &str) -> Result<Project> {
        self.store
            .find_project(&ProjectRef::parse(project)?, caller.owner())
    }

    pub fn delete_project(&self, caller: Caller, project: &str) -> Result<()> {
        let p = self.get_project(caller, project)?;
        self.store.delete_project(&p)?;
        tracing::info!(project = %p.id, name = %p.name, "project deleted");
        Ok(())
    }

    // ---- workspaces ----

    pub async fn create_workspace(
        &self,
        caller: Caller,
        project: &str,
        req: &HardwareRequest,
    ) -> Result<Workspace> {
        let project = self.get_project(caller, project)?;
        let hardware = Hardware::DEFAULT.with(req, &self.limits())?;
        let uuid = new_uuid();
        let ws = self
            .store
            .insert_workspace(&project, caller.uid, &uuid, &hardware)?;
        if let Err(e) = self.hv.define(&self.spec(&ws)).await {
            // Undo: a workspace without a domain must not stay behind.
            if let Err(undo) = self.store.delete_workspace(&ws) {
                tracing::error!(workspace = %ws.id, error = %undo, "could not undo workspace row");
            }
            return Err(e);
        }
        tracing::info!(workspace = %ws.id, project = %project.id, hardware = %hardware, "workspace created");
        Ok(ws)
    }

    pub fn list_workspaces(
        &self,
        caller: Caller,
        state: Option<State>,
        project: Option<&str>,
    ) -> Result<Vec<Workspace>> {
        let project = match project {
            Some(p) => Some(self.get_project(caller, p)?.id),
            None => None,
        };
        self.store
            .list_workspaces(&WorkspaceFilter { state, project }, caller.owner())
    }

    pub fn get_workspace(&self, caller: Caller, id: &str) -> Result<Workspace> {
        self.store
            .get_workspace(&WorkspaceId::parse(id)?, caller.owner())
    }

    /// Where a tunnel to `port` of workspace `id` connects: the guest's address, while the
    /// workspace is running.
    pub fn tunnel_target(
        &self,
        caller: Caller,
        id: &str,
        port: u16,
    ) -> Result<(WorkspaceId, std::net::SocketAddr)> {
        let ws = self.get_workspace(caller, id)?;
        if ws.state != State::Running {
            return Err(Error::precondition(format!(
                "workspace is {}: start it first",
                ws.state
            )));
        }
        let ip = ws
            .ip
            .ok_or_else(|| Error::precondition(format!("workspace {} has no IP address", ws.id)))?;
        Ok((ws.id, std::net::SocketAddr::from((ip, port))))
    }

    /// Moves the workspace to `starting` and boots it in the background.
    pub fn start_workspace(self: &Arc<Self>, caller: Caller, id: &str) -> Result<Workspace> {
        let ws = self.get_workspace(caller, id)?;
        let ws = self.apply(&ws, Event::Start, "")?;
        let this = Arc::clone(self);
        let starting = ws.clone();
        tokio::spawn(async move { this.run_start(starting).await });
        Ok(ws)
    }

    async fn run_start(&self, ws: Workspace) {
        let lock = self.lock_of(&ws.id);
        let _guard = lock.lock().await;
        let booted = async {
            self.hv.define(&self.spec(&ws)).await?;
            self.hv.start(&ws.id).await?;
            match self.hv.status(&ws.id).await? {
                DomainStatus::Active => Ok(()),
                other => Err(Error::Libvirt(format!(
                    "domain is {other:?} right after it was started"
                ))),
            }
        }
        .await;
        let result = match booted {
            Ok(()) => self.apply(&ws, Event::Ready, ""),
            Err(e) => {
                tracing::warn!(workspace = %ws.id, error = %e, "start failed");
                self.apply(&ws, Event::BootFailed, &format!("start failed: {e}"))
            }
        };
        log_background(&ws.id, "start", result);
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
        tokio::spawn(async move { this.run_stop(stopping).await });
        Ok(ws)
    }

    async fn force_stop(&self, ws: &Workspace) -> Result<Workspace> {
        // Decide first, so a refused request changes nothing.
        state::transition(ws.state, Event::ForceStop)?;
        self.hv.destroy(&ws.id).await?;
        self.apply(ws, Event::ForceStop, "")
    }

    async fn run_stop(&self, ws: Workspace) {
        let lock = self.lock_of(&ws.id);
        let _guard = lock.lock().await;
        let timeout = Duration::from_secs(self.config.stop_timeout_secs);
        let result = match self.shutdown_and_wait(&ws.id, timeout).await {
            Ok(true) => self.apply(&ws, Event::PoweredOff, ""),
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

    /// Deletes the domain and the row. Without `force` the VM must not be running.
    pub async fn delete_workspace(&self, caller: Caller, id: &str, force: bool) -> Result<()> {
        let mut ws = self.get_workspace(caller, id)?;
        if !ws.state.deletable() {
            if !force {
                return Err(Error::precondition(format!(
                    "workspace is {}: stop it first, or delete with --force",
                    ws.state
                )));
            }
            ws = self.force_stop(&ws).await?;
        }
        let lock = self.lock_of(&ws.id);
        let _guard = lock.lock().await;
        self.hv.undefine(&ws.id).await?;
        self.store.delete_workspace(&ws)?;
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ws.id);
        tracing::info!(workspace = %ws.id, "workspace deleted");
        Ok(())
    }

    /// Changes hardware: at once while the VM is off, as pending changes otherwise.
    pub async fn update_workspace(
        &self,
        caller: Caller,
        id: &str,
        req: &HardwareRequest,
    ) -> Result<Workspace> {
        let ws = self.get_workspace(caller, id)?;
        let base = ws.pending_hardware.as_ref().unwrap_or(&ws.hardware);
        let wanted = base.with(req, &self.limits())?;
        if wanted.volume_size_gb < ws.hardware.volume_size_gb {
            return Err(Error::invalid(format!(
                "volume size can only grow: it is {} GiB, requested {} GiB",
                ws.hardware.volume_size_gb, wanted.volume_size_gb
            )));
        }
        if ws.state.vm_is_off() {
            let lock = self.lock_of(&ws.id);
            let _guard = lock.lock().await;
            let updated = self.store.set_hardware(&ws, &wanted, None)?;
            if let Err(e) = self.hv.define(&self.spec(&updated)).await {
                // Undo, so the database keeps describing the defined domain.
                let _ =
                    self.store
                        .set_hardware(&updated, &ws.hardware, ws.pending_hardware.as_ref());
                return Err(e);
            }
            tracing::info!(workspace = %ws.id, hardware = %wanted, "hardware updated");
            Ok(updated)
        } else {
            let pending = (wanted != ws.hardware).then_some(&wanted);
            let updated = self.store.set_hardware(&ws, &ws.hardware, pending)?;
            tracing::info!(workspace = %ws.id, pending = %wanted, "hardware change pending until next start");
            Ok(updated)
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
                self.hv.define(&self.spec(&ws)).await?;
                status = DomainStatus::Off;
            }
            let active = status == DomainStatus::Active;
            let result = match (ws.state, active) {
                (State::Starting, true) => self.apply(&ws, Event::Ready, ""),
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
                    tokio::spawn(async move { this.run_stop(stopping).await });
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

fn log_background(id: &WorkspaceId, what: &str, result: Result<Workspace>) {
    match result {
        Ok(ws) => tracing::debug!(workspace = %id, state = %ws.state, "{what} finished"),
        // Losing the CAS means a newer decision (e.g. a forced stop) already won: not an error.
        Err(Error::Conflict { now, .. }) => {
            tracing::info!(workspace = %id, now = %now, "{what} superseded by a newer change")
        }
        Err(e) => {
            tracing::error!(workspace = %id, error = %e, "{what} could not record its result")
        }
    }
}

/// A random (version 4) UUID for a new domain.
fn new_uuid() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the kernel's random source is available");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
