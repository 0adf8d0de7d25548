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

use crate::cloudinit::{self, KeyPair};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hypervisor::events::DomainEvent;
use crate::hypervisor::{Boot, DomainType};
use crate::hypervisor::{DomainSpec, DomainStatus, Hypervisor};
use crate::images::{self, BootMode, Image, ImageName, Layout};
use crate::model::{
    Hardware, HardwareLimits, HardwareRequest, ProjectName, ProjectRef, WorkspaceId,
};
use crate::network::{self, Subnet};
use crate::store::{NewWorkspace, Owner, Project, Store, Workspace, WorkspaceFilter};
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
    layout: Layout,
    subnet: Subnet,
    /// The daemon's own SSH key, authorized in every guest (for tasks).
    daemon_key: KeyPair,
    /// One lock per workspace, held by whatever is doing libvirt work on it.
    locks: Mutex<HashMap<WorkspaceId, Arc<tokio::sync::Mutex<()>>>>,
    /// Open tunnels per workspace.
    pub connections: Connections,
}

impl Manager {
    /// Prepares the host side (directories, storage pool, network, the daemon's SSH key).
    pub async fn new(store: Store, hv: Hypervisor, config: Config) -> Result<Arc<Manager>> {
        let layout = Layout {
            state_dir: config.state_dir.clone(),
        };
        layout.create()?;
        hv.ensure_pool(&layout.pool()).await?;
        let preferred = config
            .network_cidr
            .as_deref()
            .map(Subnet::parse)
            .transpose()?;
        let subnet = hv.ensure_network(preferred).await?;
        let daemon_key = daemon_key(&layout)?;
        Ok(Arc::new(Manager {
            store,
            hv,
            config,
            layout,
            subnet,
            daemon_key,
            locks: Mutex::new(HashMap::new()),
            connections: Connections::default(),
        }))
    }

    /// The daemon's public SSH key (authorized in every guest).
    pub fn daemon_public_key(&self) -> &str {
        &self.daemon_key.public
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
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

    fn spec(&self, ws: &Workspace) -> Result<DomainSpec> {
        let image = match &ws.image {
            Some(name) => Some(self.store.get_image(&ImageName::parse(name)?)?),
            None => None,
        };
        let boot = match &image {
            Some(Image {
                boot_mode: BootMode::Kernel,
                name,
                cmdline,
                ..
            }) => Boot::Kernel {
                kernel: self.layout.kernel(name),
                initrd: self.layout.initrd(name),
                cmdline: cmdline.clone(),
            },
            Some(Image {
                boot_mode: BootMode::Uefi,
                ..
            }) => Boot::Uefi,
            Some(Image {
                boot_mode: BootMode::Bios,
                ..
            })
            | None => Boot::Bios,
        };
        let has_disks = image.is_some();
        Ok(DomainSpec {
            workspace: ws.id.clone(),
            project: ws.project_id.clone(),
            uuid: ws.uuid.clone(),
            domain_type: self.hv.domain_type(),
            cpus: ws.hardware.cpus,
            memory_mb: ws.hardware.memory_mb,
            boot,
            root_disk: has_disks.then(|| self.layout.pool().join(root_volume_name(&ws.id))),
            seed_disk: has_disks.then(|| self.layout.pool().join(seed_file_name(&ws.id))),
            mac: ws.mac.clone(),
            network: crate::network::NETWORK_NAME.to_owned(),
            console_log: Some(self.layout.console_log(&ws.id)),
        })
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

    /// Creates a workspace: database row, root volume (a qcow2 overlay on the image), seed,
    /// DHCP reservation and domain. A failed step undoes the ones before it.
    pub async fn create_workspace(
        &self,
        caller: Caller,
        req: &CreateWorkspace,
    ) -> Result<Workspace> {
        let project = self.get_project(caller, &req.project)?;
        let hardware = Hardware::DEFAULT.with(&req.hardware, &self.limits())?;
        let image_name = match (req.image.as_str(), self.config.default_image.as_str()) {
            ("", "") => {
                return Err(Error::invalid(
                    "no image given and no default_image configured; pass --image (see `aether image list`)",
                ))
            }
            ("", default) => ImageName::parse(default)?,
            (name, _) => ImageName::parse(name)?,
        };
        let image = self.store.get_image(&image_name)?;
        let size_bytes = u64::from(hardware.volume_size_gb) << 30;
        if size_bytes < image.virtual_size {
            return Err(Error::invalid(format!(
                "volume size {} GiB is smaller than image {} ({} GiB); use --volume-size {} or more",
                hardware.volume_size_gb,
                image.name,
                image.virtual_size.div_ceil(1 << 30),
                image.virtual_size.div_ceil(1 << 30)
            )));
        }
        cloudinit::validate_login(&req.login_user)?;
        if req.ssh_authorized_keys.is_empty() {
            return Err(Error::invalid("at least one SSH public key is required"));
        }
        let mut keys = req
            .ssh_authorized_keys
            .iter()
            .map(|k| cloudinit::normalize_public_key(k))
            .collect::<Result<Vec<_>>>()?;
        keys.push(self.daemon_key.public.clone());

        let id = WorkspaceId::generate();
        let host_key = cloudinit::generate_ed25519(&self.layout.tmp(), id.as_str())?;
        let mac = network::random_mac();
        let ip = self.subnet.allocate(&self.store.used_ips()?)?;
        let uuid = new_uuid();
        let ws = self.store.insert_workspace(&NewWorkspace {
            id,
            project: &project,
            owner_uid: caller.uid,
            uuid: &uuid,
            hardware: &hardware,
            image: Some(image.name.as_str()),
            login_user: &req.login_user,
            ssh_host_public_key: &host_key.public,
            mac: Some(&mac),
            ip: Some(ip),
        })?;
        let lock = self.lock_of(&ws.id);
        let _guard = lock.lock().await;
        if let Err(e) = self.provision(&ws, &image, &keys, &host_key).await {
            tracing::warn!(workspace = %ws.id, error = %e, "create failed; undoing");
            if let Err(undo) = self.deprovision(&ws).await {
                tracing::error!(workspace = %ws.id, error = %undo, "could not undo all of create");
            }
            if let Err(undo) = self.store.delete_workspace(&ws) {
                tracing::error!(workspace = %ws.id, error = %undo, "could not undo workspace row");
            }
            return Err(e);
        }
        tracing::info!(workspace = %ws.id, project = %project.id, image = %image.name, %ip, hardware = %hardware, "workspace created");
        Ok(ws)
    }

    /// The host-side resources of a workspace, each step idempotent.
    async fn provision(
        &self,
        ws: &Workspace,
        image: &Image,
        keys: &[String],
        host_key: &cloudinit::KeyPair,
    ) -> Result<()> {
        let base = self.layout.pool().join(image.name.volume_name());
        self.hv
            .create_overlay(&root_volume_name(&ws.id), ws.hardware.volume_size_gb, &base)
            .await?;
        let seed_path = self.layout.pool().join(seed_file_name(&ws.id));
        let seed = cloudinit::Seed {
            workspace: &ws.id,
            login_user: &ws.login_user,
            authorized_keys: keys,
            host_key,
        };
        tokio::task::block_in_place(|| cloudinit::write_seed(&seed_path, &seed))?;
        images::set_mode(&seed_path, 0o644)?;
        self.hv.refresh_pool().await?;
        if let (Some(mac), Some(ip)) = (&ws.mac, ws.ip) {
            self.hv.add_dhcp_host(mac, ip, ws.id.as_str()).await?;
        }
        self.hv.define(&self.spec(ws)?).await
    }

    /// Removes everything [`Manager::provision`] made; missing pieces are fine.
    async fn deprovision(&self, ws: &Workspace) -> Result<()> {
        self.hv.undefine(&ws.id).await?;
        if let (Some(mac), Some(ip)) = (&ws.mac, ws.ip) {
            self.hv.remove_dhcp_host(mac, ip, ws.id.as_str()).await?;
        }
        self.hv.delete_volume(&root_volume_name(&ws.id)).await?;
        self.hv.delete_volume(&seed_file_name(&ws.id)).await?;
        for path in [
            self.layout.pool().join(seed_file_name(&ws.id)),
            self.layout.console_log(&ws.id),
        ] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::Internal(format!(
                        "cannot remove {}: {e}",
                        path.display()
                    )))
                }
            }
        }
        Ok(())
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

    // ---- images ----

    /// Finishes an upload: `dir` holds `disk` and, for direct kernel boot, `kernel` and
    /// `initrd`. Checks and installs them; the upload dir is removed in every case.
    pub async fn import_image(&self, upload: ImageUpload) -> Result<Image> {
        let result = self.install_image(&upload).await;
        let _ = std::fs::remove_dir_all(&upload.dir);
        result
    }

    async fn install_image(&self, up: &ImageUpload) -> Result<Image> {
        let name = ImageName::parse(&up.name)?;
        images::validate_cmdline(&up.cmdline)?;
        if let Ok(existing) = self.store.get_image(&name) {
            return Err(Error::AlreadyExists(format!(
                "image {} already exists",
                existing.name
            )));
        }
        let kernel = up.dir.join("kernel");
        let initrd = up.dir.join("initrd");
        let boot_mode = match (up.boot_mode, kernel.exists()) {
            (Some(BootMode::Kernel) | None, true) => BootMode::Kernel,
            (Some(BootMode::Kernel), false) => {
                return Err(Error::invalid(
                    "direct kernel boot needs a kernel (--kernel)",
                ))
            }
            (Some(mode), true) => {
                return Err(Error::invalid(format!(
                    "a kernel was sent but the boot mode is {}",
                    mode.as_str()
                )))
            }
            (Some(mode), false) => mode,
            (None, false) => BootMode::Bios,
        };
        if boot_mode != BootMode::Kernel && !up.cmdline.is_empty() {
            return Err(Error::invalid(
                "a kernel command line needs direct kernel boot (--kernel)",
            ));
        }
        let disk = up.dir.join("disk");
        if !disk.exists() {
            return Err(Error::invalid("no disk data was sent"));
        }
        let dest = self.layout.pool().join(name.volume_name());
        let source_name = up.source_name.clone();
        let info = tokio::task::block_in_place(|| -> Result<images::QemuImgInfo> {
            let info = images::qemu_img_info(&disk)?;
            images::check_disk(&info, &source_name)?;
            images::install_disk(&info, &disk, &dest)?;
            Ok(info)
        })?;
        let installed = tokio::task::block_in_place(|| images::qemu_img_info(&dest))?;
        let cleanup = |e: Error| {
            let _ = std::fs::remove_file(&dest);
            let _ = std::fs::remove_dir_all(self.layout.boot_dir(&name));
            e
        };
        if boot_mode == BootMode::Kernel {
            let dir = self.layout.boot_dir(&name);
            std::fs::create_dir_all(&dir).map_err(|e| {
                cleanup(Error::Internal(format!(
                    "cannot create {}: {e}",
                    dir.display()
                )))
            })?;
            images::set_mode(&dir, 0o755).map_err(cleanup)?;
            for (from, to) in [
                (&kernel, self.layout.kernel(&name)),
                (&initrd, self.layout.initrd(&name)),
            ] {
                if !from.exists() {
                    return Err(cleanup(Error::invalid(
                        "direct kernel boot needs an initrd (--initrd)",
                    )));
                }
                std::fs::rename(from, &to).map_err(|e| {
                    cleanup(Error::Internal(format!(
                        "cannot move {}: {e}",
                        to.display()
                    )))
                })?;
                images::set_mode(&to, 0o644).map_err(cleanup)?;
            }
        }
        let image = Image {
            name: name.clone(),
            boot_mode,
            cmdline: up.cmdline.clone(),
            virtual_size: info.virtual_size,
            disk_size: installed.actual_size,
            created_at: crate::store::now(),
            in_use: 0,
        };
        self.store.insert_image(&image).map_err(cleanup)?;
        self.hv.refresh_pool().await?;
        tracing::info!(image = %name, boot = boot_mode.as_str(), virtual_size = info.virtual_size, "image imported");
        Ok(image)
    }

    pub fn list_images(&self) -> Result<Vec<Image>> {
        self.store.list_images()
    }

    pub async fn delete_image(&self, caller: Caller, name: &str) -> Result<()> {
        let name = ImageName::parse(name)?;
        if !caller.admin {
            return Err(Error::PermissionDenied(
                "only root may delete images".into(),
            ));
        }
        self.store.delete_image(&name)?;
        self.hv.delete_volume(&name.volume_name()).await?;
        let _ = std::fs::remove_file(self.layout.pool().join(name.volume_name()));
        let _ = std::fs::remove_dir_all(self.layout.boot_dir(&name));
        tracing::info!(image = %name, "image deleted");
        Ok(())
    }

    /// The last `max` bytes of the workspace's serial console log.
    pub fn console_log(&self, caller: Caller, id: &str, max: usize) -> Result<Vec<u8>> {
        let ws = self.get_workspace(caller, id)?;
        tail(&self.layout.console_log(&ws.id), max)
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
            self.hv.define(&self.spec(&ws)?).await?;
            self.hv.start(&ws.id).await?;
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
        let timeout = self.boot_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.store.get_workspace(&ws.id, None)?.generation != ws.generation {
                return Ok(Readiness::Superseded);
            }
            if self.hv.status(&ws.id).await? != DomainStatus::Active {
                return Err(Error::Internal("the VM stopped while booting".into()));
            }
            if ssh_banner(std::net::SocketAddr::from((ip, 22))).await {
                return Ok(Readiness::Ready);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Internal(format!(
                    "the guest did not answer SSH on {ip}:22 within {} s",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
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
            (DomainEvent::ShutOff { .. }, State::Stopping) => {
                self.apply(&ws, Event::PoweredOff, "")
            }
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
        tokio::spawn(async move { this.run_stop(stopping).await });
        Ok(ws)
    }

    async fn force_stop(&self, ws: &Workspace) -> Result<Workspace> {
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
        self.deprovision(&ws).await?;
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

/// An uploaded image waiting to be checked and installed.
#[derive(Clone, Debug)]
pub struct ImageUpload {
    /// Directory with `disk`, and `kernel` + `initrd` for direct kernel boot.
    pub dir: std::path::PathBuf,
    pub name: String,
    pub boot_mode: Option<BootMode>,
    pub cmdline: String,
    pub source_name: String,
}

/// The last `max` bytes of a file; a missing file is empty.
pub fn tail(path: &std::path::Path, max: usize) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Internal(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    let io = |e: std::io::Error| Error::Internal(format!("cannot read {}: {e}", path.display()));
    let len = f.metadata().map_err(io)?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max as u64)))
        .map_err(io)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(io)?;
    Ok(buf)
}

/// What `create_workspace` is asked for.
#[derive(Clone, Debug, Default)]
pub struct CreateWorkspace {
    pub project: String,
    pub hardware: HardwareRequest,
    /// Image name; empty: the daemon's `default_image`.
    pub image: String,
    pub login_user: String,
    pub ssh_authorized_keys: Vec<String>,
}

pub fn root_volume_name(id: &WorkspaceId) -> String {
    format!("{id}-root.qcow2")
}

pub fn seed_file_name(id: &WorkspaceId) -> String {
    format!("{id}-seed.img")
}

/// Loads the daemon's SSH key from the state dir, generating it on first start.
fn daemon_key(layout: &Layout) -> Result<KeyPair> {
    let private = layout.keys().join("id_ed25519");
    let public = layout.keys().join("id_ed25519.pub");
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map_err(|e| Error::Internal(format!("cannot read {}: {e}", p.display())))
    };
    if private.exists() && public.exists() {
        return Ok(KeyPair {
            private: read(&private)?,
            public: read(&public)?.trim().to_owned(),
        });
    }
    let pair = cloudinit::generate_ed25519(&layout.tmp(), "aetherd")?;
    let write = |p: &std::path::Path, s: &str, mode: u32| -> Result<()> {
        std::fs::write(p, s)
            .map_err(|e| Error::Internal(format!("cannot write {}: {e}", p.display())))?;
        images::set_mode(p, mode)
    };
    write(&private, &pair.private, 0o600)?;
    write(&public, &format!("{}\n", pair.public), 0o644)?;
    tracing::info!(key = %public.display(), "generated the daemon's SSH key");
    Ok(pair)
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
