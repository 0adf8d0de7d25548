//! Workspace and project operations: the daemon's core, independent of gRPC.
//!
//! Requests that concern one workspace (start, stop, update, delete, and its provisioning at
//! create) are checked for visibility here and handed to the workspace's runner (see
//! `workspace::runner`), the only writer of its state; the work the runner needs done
//! (placement, boot, shutdown, provisioning) lives here.
//!
//! Multi-step operations undo what they did when a later step fails: a workspace whose domain
//! cannot be defined is not left in the database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::cloudinit::{self, KeyPair};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::files::{self, tail};
use crate::hypervisor::events::DomainEvent;
use crate::hypervisor::{Boot, DomainType};
use crate::hypervisor::{DomainSpec, DomainStatus, Hypervisor};
use crate::images::{self, BootMode, Image, ImageId, ImageName, Layout};
use crate::model::{
    Hardware, HardwareLimits, HardwareRequest, ProjectName, ProjectRef, WorkspaceId,
};
use crate::network::{self, Subnet};
use crate::quota::Claim;
use crate::store::{
    NewWorkspace, Owner, Project, Provisioning as Mark, SeedMaterial, Store, TaskRow, Workspace,
    WorkspaceFilter,
};
use crate::tunnel::Connections;
use crate::workspace::placement::Placement;
use crate::workspace::runner::{self, Input};
use crate::workspace::state::State;

mod image_ops;
mod lifecycle;
pub mod live;
pub mod tasks;

pub use image_ops::ImageUpload;
pub use lifecycle::Readiness;

/// Who is asking, from the socket peer's credentials.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    /// Root (or the daemon's own user): sees and operates everything.
    pub admin: bool,
}

impl Caller {
    pub(crate) fn owner(&self) -> Owner {
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
    pub cpus: u32,
    pub memory_mib: u64,
    pub gpus: Vec<(crate::hypervisor::gpu::Gpu, Option<WorkspaceId>)>,
    pub shared_cpus: Vec<u32>,
}

pub struct Manager {
    store: Store,
    hv: Hypervisor,
    config: Config,
    layout: Layout,
    subnet: Subnet,
    /// The daemon's own SSH key, authorized in every guest (for tasks).
    daemon_key: KeyPair,
    /// The runner of each workspace that has one (see `workspace::runner`).
    runners: Mutex<HashMap<WorkspaceId, tokio::sync::mpsc::Sender<Input>>>,
    /// Open tunnels per workspace.
    pub connections: Connections,
    /// The change feed (see `live`).
    changes: tokio::sync::broadcast::Sender<live::Change>,
    seq: std::sync::atomic::AtomicU64,
    /// Phase of workspaces in a transitional state.
    phases: Mutex<HashMap<WorkspaceId, &'static str>>,
    /// Armed idle timers.
    idle_timers: Mutex<HashMap<WorkspaceId, tokio::task::AbortHandle>>,
    /// Workspaces whose idleness must be re-evaluated.
    idle_tx: tokio::sync::mpsc::UnboundedSender<WorkspaceId>,
    idle_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<WorkspaceId>>>,
    /// Running tasks by id.
    tasks: Mutex<HashMap<String, tasks::RunningTask>>,
    /// The host's CPUs, memory and GPUs (read once at start), and where a start goes.
    placement: Placement,
    /// Woken when CPUs are dedicated or released (see `repin_running`).
    repin: tokio::sync::Notify,
    /// Domain starts in flight at once: libvirt launches qemu and instantiates a NIC's
    /// network filter per start, and twelve at once took one `virDomainCreate` past the
    /// call timeout. The rest wait here (phase `booting`), not inside libvirt.
    boot_slots: tokio::sync::Semaphore,
    /// The group files qemu must read are given to (see `privacy`), if any.
    qemu_gid: Option<u32>,
    /// Held from a create's quota check to its insert, so parallel creates of one user
    /// cannot all pass the check.
    creating: Mutex<()>,
}

impl Manager {
    /// Prepares the host side (directories, storage pool, network, the daemon's SSH key).
    pub async fn new(store: Store, hv: Hypervisor, config: Config) -> Result<Arc<Manager>> {
        let layout = Layout {
            state_dir: config.state_dir.clone(),
        };
        let qemu_gid = crate::privacy::qemu_gid(&config.qemu_group);
        layout.create(qemu_gid)?;
        hv.ensure_pool(&layout.pool()).await?;
        let preferred = config
            .network_cidr
            .as_deref()
            .map(Subnet::parse)
            .transpose()?;
        let subnet = hv.ensure_network(preferred).await?;
        hv.ensure_filters().await?;
        let daemon_key = daemon_key(&layout)?;
        let host = hv.host_resources().await?;
        let gpus = hv.gpus(&config.gpu_allow).await?;
        for g in &gpus {
            tracing::info!(kind = %g.kind, address = %g.address(), name = %g.name, "GPU found");
        }
        let lost = store.lose_running_tasks()?;
        if lost > 0 {
            tracing::warn!(
                tasks = lost,
                "tasks that were running when aetherd stopped are lost"
            );
        }
        let (idle_tx, idle_rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Arc::new(Manager {
            connections: Connections::with_notify(idle_tx.clone()),
            changes: tokio::sync::broadcast::channel(1024).0,
            seq: std::sync::atomic::AtomicU64::new(0),
            phases: Mutex::new(HashMap::new()),
            idle_timers: Mutex::new(HashMap::new()),
            idle_tx,
            idle_rx: Mutex::new(Some(idle_rx)),
            tasks: Mutex::new(HashMap::new()),
            placement: Placement::new(host, gpus, &config),
            repin: tokio::sync::Notify::new(),
            creating: Mutex::new(()),
            boot_slots: tokio::sync::Semaphore::new(BOOT_SLOTS),
            qemu_gid,
            store,
            hv,
            config,
            layout,
            subnet,
            daemon_key,
            runners: Mutex::new(HashMap::new()),
        }))
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn hv(&self) -> &Hypervisor {
        &self.hv
    }

    /// The runner of `id`, started if it has none.
    fn runner(self: &Arc<Self>, id: &WorkspaceId) -> tokio::sync::mpsc::Sender<Input> {
        let mut runners = self.runners.lock().unwrap_or_else(|p| p.into_inner());
        runners
            .entry(id.clone())
            .or_insert_with(|| runner::spawn(Arc::clone(self), id.clone()))
            .clone()
    }

    /// Forgets the runner `me` of `id`, which ended (its workspace is gone).
    pub(crate) fn runner_ended(&self, id: &WorkspaceId, me: &tokio::sync::mpsc::Sender<Input>) {
        let mut runners = self.runners.lock().unwrap_or_else(|p| p.into_inner());
        if runners.get(id).is_some_and(|r| r.same_channel(me)) {
            runners.remove(id);
        }
    }

    /// Hands an input to the runner of `id` (a new one if the last just ended).
    pub(crate) async fn send(self: &Arc<Self>, id: &WorkspaceId, input: Input) {
        let input = match self.runner(id).send(input).await {
            Ok(()) => return,
            Err(tokio::sync::mpsc::error::SendError(input)) => input,
        };
        self.runners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let _ = self.runner(id).send(input).await;
    }

    /// Asks the runner of `id` and waits for its answer.
    async fn ask<T>(
        self: &Arc<Self>,
        id: &WorkspaceId,
        input: impl FnOnce(tokio::sync::oneshot::Sender<Result<T>>) -> Input,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(id, input(tx)).await;
        rx.await
            .unwrap_or_else(|_| Err(Error::not_found("workspace", id.as_str())))
    }

    /// Refuses `claim` when it would take `caller` past its quota, given what it `used`.
    /// Root is not capped.
    pub(super) fn quota(&self, caller: Caller, used: u64, claim: Claim) -> Result<()> {
        if caller.admin {
            return Ok(());
        }
        self.config.quota.check(caller.uid, used, claim)
    }

    /// Refuses an image upload that has grown to `total` bytes past what `caller` may send:
    /// a member's `quota.upload_gb`, and for anyone the largest volume plus 1 GiB (for a
    /// kernel and initrd): no image can be larger and still be used.
    pub fn check_upload(&self, caller: Caller, total: u64) -> Result<()> {
        let largest = (u64::from(self.config.max_volume_size_gb) + 1) << 30;
        if total > largest {
            return Err(Error::invalid(format!(
                "the upload is larger than the largest volume ({} GiB, max_volume_size_gb) can hold",
                self.config.max_volume_size_gb
            )));
        }
        self.quota(caller, 0, Claim::UploadGb(total.div_ceil(1 << 30)))
    }

    /// Every workspace of `uid`.
    pub(super) fn owned_by(&self, uid: u32) -> Result<Vec<Workspace>> {
        self.store
            .list_workspaces(&WorkspaceFilter::default(), Some(uid))
    }

    fn limits(&self) -> HardwareLimits {
        let mut gpu_kinds: Vec<String> = self
            .placement
            .gpus()
            .iter()
            .map(|g| g.kind.clone())
            .collect();
        gpu_kinds.sort();
        gpu_kinds.dedup();
        HardwareLimits {
            max_volume_size_gb: self.config.max_volume_size_gb,
            gpu_kinds,
        }
    }

    fn spec(&self, ws: &Workspace) -> Result<DomainSpec> {
        let image = match &ws.image {
            Some(id) => Some(self.store.get_image(&ImageId::parse(id)?)?),
            None => None,
        };
        let boot = match &image {
            Some(Image {
                boot_mode: BootMode::Kernel,
                id,
                cmdline,
                ..
            }) => Boot::Kernel {
                kernel: self.layout.kernel(id),
                initrd: self.layout.initrd(id),
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
            filter: match (ws.ip, self.hv.domain_type()) {
                (_, DomainType::Test) | (None, _) => None,
                (Some(ip), _) => Some(crate::hypervisor::nwfilter::GuestFilter {
                    ip,
                    host_ips: crate::hypervisor::nwfilter::host_addresses(self.subnet.gateway()),
                    ephemeral: crate::hypervisor::nwfilter::ephemeral_ports(),
                }),
            },
            network: crate::network::NETWORK_NAME.to_owned(),
            console_log: Some(self.layout.console_log(&ws.id)),
            shared_cpus: self.shared_cpus()?,
            dedicated_cpus: ws.dedicated_cpus.clone(),
            gpu: ws
                .gpu_device
                .as_ref()
                .and_then(|d| self.placement.gpus().iter().find(|g| g.device == *d))
                .map(|g| (g.domain, g.bus, g.slot, g.function)),
        })
    }

    /// What follows a written transition from `old` to `new`: the phase ends with the
    /// transitional state, moved CPUs are re-pinned, watchers are told, idleness is
    /// re-evaluated.
    pub(crate) fn transitioned(&self, old: &Workspace, new: &Workspace) {
        if !matches!(new.state, State::Starting | State::Stopping) {
            self.phases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&new.id);
        }
        if old.gpu_device != new.gpu_device {
            if let Some(gpu) = &new.gpu_device {
                tracing::info!(workspace = %new.id, gpu = %gpu, "GPU attached");
            }
        }
        if old.dedicated_cpus != new.dedicated_cpus {
            if !new.dedicated_cpus.is_empty() {
                tracing::info!(workspace = %new.id, cpus = ?new.dedicated_cpus, "dedicated host CPUs");
            }
            self.cpus_changed();
        }
        self.publish(live::ChangeKind::Changed, new);
        self.idle_changed(&new.id);
    }

    /// What follows the deletion of `ws`'s row.
    pub(crate) fn deleted(&self, ws: &Workspace) {
        tracing::info!(workspace = %ws.id, "workspace deleted");
        self.publish(live::ChangeKind::Deleted, ws);
        self.idle_changed(&ws.id);
    }

    /// Defines (or redefines) the domain of `ws` as the row describes it.
    pub(crate) async fn define(&self, ws: &Workspace) -> Result<()> {
        self.hv.define(&self.spec(ws)?).await
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
            cpus: self.placement.host_cpus(),
            memory_mib: self.placement.host_memory_mib(),
            gpus: self.gpu_holders()?,
            shared_cpus: self.shared_cpus()?,
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
            .find_project(&ProjectRef::parse(project)?, caller.owner(), caller.uid)
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
        self: &Arc<Self>,
        caller: Caller,
        req: &CreateWorkspace,
    ) -> Result<Workspace> {
        let project = self.get_project(caller, &req.project)?;
        let hardware = Hardware::DEFAULT.with(&req.hardware, &self.limits())?;
        let idle_timeout_secs = req
            .idle_timeout
            .as_deref()
            .map(crate::model::parse_duration_secs)
            .transpose()?;
        let image_ref = match (req.image.as_str(), self.config.default_image.as_str()) {
            ("", "") => {
                return Err(Error::invalid(
                    "no image given and no default_image configured; pass --image (see `aether image list`)",
                ))
            }
            ("", default) => default,
            (name, _) => name,
        };
        let image = self.store.resolve_image(image_ref, caller.owner())?;
        let size_bytes = u64::from(hardware.volume_size_gb) << 30;
        if size_bytes < image.virtual_size {
            return Err(Error::invalid(format!(
                "volume size {} GiB is smaller than image {} ({} GiB); use --volume-size {} or more",
                hardware.volume_size_gb,
                image.id.name(),
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
        let uuid = new_uuid();
        let creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        let mine = self.owned_by(caller.uid)?;
        self.quota(caller, mine.len() as u64, Claim::Workspaces(1))?;
        self.quota(
            caller,
            volume_gb(&mine),
            Claim::VolumeGb(u64::from(hardware.volume_size_gb)),
        )?;
        let image_id = image.id.to_string();
        let seed = SeedMaterial {
            host_private_key: host_key.private.clone(),
            authorized_keys: keys,
        };
        let ws = self.store.insert_workspace(&NewWorkspace {
            id,
            project: &project,
            owner_uid: caller.uid,
            uuid: &uuid,
            hardware: &hardware,
            image: Some(&image_id),
            login_user: &req.login_user,
            ssh_host_public_key: &host_key.public,
            seed: &seed,
            mac: Some(&mac),
            subnet: Some(self.subnet),
            idle_timeout_secs,
        })?;
        drop(creating);
        let provisioning = Provisioning { image };
        let ws = self
            .ask(&ws.id, |r| Input::Provision(Box::new(provisioning), r))
            .await?;
        tracing::info!(workspace = %ws.id, project = %project.id, image = ?ws.image, ip = ?ws.ip, hardware = %hardware, "workspace created");
        self.publish(live::ChangeKind::Changed, &ws);
        Ok(ws)
    }

    /// Makes the host-side resources of a new workspace; if a step fails, removes what the
    /// others made and the row.
    pub(crate) async fn provision_or_undo(&self, ws: &Workspace, p: &Provisioning) -> Result<()> {
        let Err(e) = self.provision(ws, &p.image).await else {
            return Ok(());
        };
        tracing::warn!(workspace = %ws.id, error = %e, "create failed; undoing");
        if let Err(undo) = self.deprovision(ws).await {
            tracing::error!(workspace = %ws.id, error = %undo, "could not undo all of create");
        }
        if let Err(undo) = self.store.delete_workspace(ws) {
            tracing::error!(workspace = %ws.id, error = %undo, "could not undo workspace row");
        }
        Err(e)
    }

    /// The host-side resources of a workspace whose row is marked `creating`, in order:
    /// root volume, seed, address reservation, domain; then the mark goes. A daemon that dies
    /// on the way leaves the mark, and reconcile undoes what was made.
    async fn provision(&self, ws: &Workspace, image: &Image) -> Result<()> {
        let base = self.layout.pool().join(image.id.volume_name());
        self.hv
            .create_overlay(&root_volume_name(&ws.id), ws.hardware.volume_size_gb, &base)
            .await?;
        crate::fault::point("create:volume");
        self.write_seed(ws).await?;
        crate::fault::point("create:seed");
        if let (Some(mac), Some(ip)) = (&ws.mac, ws.ip) {
            self.hv.add_dhcp_host(mac, ip, ws.id.as_str()).await?;
        }
        crate::fault::point("create:reservation");
        self.hv.define(&self.spec(ws)?).await?;
        crate::fault::point("create:domain");
        self.store.finish_provisioning(&ws.id)?;
        crate::fault::point("create:done");
        Ok(())
    }

    /// Writes the seed of `ws` (cloud-init NoCloud) from its row and stored keys.
    async fn write_seed(&self, ws: &Workspace) -> Result<()> {
        let material = self.store.seed_material(&ws.id)?;
        let host_key = KeyPair {
            private: material.host_private_key,
            public: ws.ssh_host_public_key.clone(),
        };
        let seed_path = self.layout.pool().join(seed_file_name(&ws.id));
        let seed = cloudinit::Seed {
            workspace: &ws.id,
            login_user: &ws.login_user,
            authorized_keys: &material.authorized_keys,
            host_key: &host_key,
        };
        tokio::task::block_in_place(|| cloudinit::write_seed(&seed_path, &seed))?;
        // It holds the guest's private host key: root only; libvirt hands it to qemu by
        // relabelling it while the VM runs.
        files::set_mode(&seed_path, 0o600)?;
        self.hv.refresh_pool().await
    }

    /// Settles a row a daemon left marked (it died while making or removing its host
    /// resources): a `creating` workspace is undone (its create never answered), a
    /// `deleting` one is deleted. Both remove whatever of its resources is left.
    pub(crate) async fn settle_provisioning(&self, ws: &Workspace) -> Result<()> {
        let Some(mark) = ws.provisioning else {
            return Ok(());
        };
        self.deprovision(ws).await?;
        self.store.delete_workspace(ws)?;
        match mark {
            Mark::Creating => {
                tracing::warn!(workspace = %ws.id, "removed a workspace whose create was cut short")
            }
            Mark::Deleting => {
                tracing::warn!(workspace = %ws.id, "finished a delete that was cut short")
            }
        }
        self.deleted(ws);
        Ok(())
    }

    /// Writes the seed of a complete workspace again if it is missing (its key is stored).
    pub(crate) async fn ensure_seed(&self, ws: &Workspace) -> Result<()> {
        if ws.image.is_none() || self.layout.pool().join(seed_file_name(&ws.id)).exists() {
            return Ok(());
        }
        if self
            .store
            .seed_material(&ws.id)?
            .host_private_key
            .is_empty()
        {
            tracing::warn!(workspace = %ws.id, "the seed is missing and cannot be written again (made before aetherd kept host keys)");
            return Ok(());
        }
        tracing::warn!(workspace = %ws.id, "the seed is missing; writing it again");
        self.write_seed(ws).await
    }

    /// Removes everything [`Manager::provision`] made; missing pieces are fine.
    pub(crate) async fn deprovision(&self, ws: &Workspace) -> Result<()> {
        self.hv.undefine(&ws.id).await?;
        crate::fault::point("delete:domain");
        if let (Some(mac), Some(ip)) = (&ws.mac, ws.ip) {
            // dnsmasq would keep the lease for its lifetime and refuse the address to the
            // next workspace given it. Released first: without reservations left, libvirt
            // restarts dnsmasq with DHCP off, and it would read the lease back later. Not
            // fatal: a start releases stale leases of its address too.
            if let Err(e) = self.hv.release_lease(self.subnet.gateway(), ip, mac).await {
                tracing::warn!(workspace = %ws.id, %ip, error = %e, "cannot release the DHCP lease");
            }
            self.hv.remove_dhcp_host(mac, ip, ws.id.as_str()).await?;
        }
        crate::fault::point("delete:reservation");
        self.hv.delete_volume(&root_volume_name(&ws.id)).await?;
        self.hv.delete_volume(&seed_file_name(&ws.id)).await?;
        crate::fault::point("delete:volumes");
        // The console log with virtlogd's rotated files, the task logs and their `.1`s.
        files::remove_log(&self.layout.console_log(&ws.id))?;
        self.remove_task_logs_of(&ws.id)?;
        for path in [self.layout.pool().join(seed_file_name(&ws.id))] {
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
        let (ws, ip) = self.running_with_address(caller, id)?;
        let open: usize = self
            .owned_by(ws.owner_uid)?
            .iter()
            .map(|w| self.connections.count(&w.id))
            .sum();
        self.quota(caller, open as u64, Claim::Tunnels(1))?;
        Ok((ws.id, std::net::SocketAddr::from((ip, port))))
    }

    /// The workspace, if it is running and has an address (what tunnels and tasks need).
    fn running_with_address(
        &self,
        caller: Caller,
        id: &str,
    ) -> Result<(Workspace, std::net::Ipv4Addr)> {
        let ws = self.get_workspace(caller, id)?;
        if ws.state != State::Running {
            return Err(Error::precondition(format!(
                "workspace is {}: start it first",
                ws.state
            )));
        }
        // No guest behind the address: connecting would send traffic to an address that is
        // nobody's (and tests must not).
        if self.hv.domain_type() == DomainType::Test {
            return Err(Error::precondition(
                "libvirt's test driver runs no guest: there is nothing to connect to",
            ));
        }
        let ip = ws
            .ip
            .ok_or_else(|| Error::precondition(format!("workspace {} has no IP address", ws.id)))?;
        Ok((ws, ip))
    }

    /// Deletes the domain and the row. Without `force` the VM must not be running.
    pub async fn delete_workspace(
        self: &Arc<Self>,
        caller: Caller,
        id: &str,
        force: bool,
    ) -> Result<()> {
        let ws = self.get_workspace(caller, id)?;
        self.ask(&ws.id, |reply| Input::Delete { force, reply })
            .await
    }

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

/// How many domains are started at once (see `Manager::boot_slots`).
const BOOT_SLOTS: usize = 2;

/// GiB of the root volumes of `workspaces`, together (what `quota.volume_gb` caps).
fn volume_gb(workspaces: &[Workspace]) -> u64 {
    workspaces
        .iter()
        .map(|w| u64::from(w.hardware.volume_size_gb))
        .sum()
}

/// What a new workspace's runner provisions (see [`Manager::provision_or_undo`]).
pub struct Provisioning {
    pub image: Image,
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
    /// "90s", "30m", "2h", "0"; `None`: the daemon's idle timeout.
    pub idle_timeout: Option<String>,
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
        files::set_mode(p, mode)
    };
    write(&private, &pair.private, 0o600)?;
    write(&public, &format!("{}\n", pair.public), 0o600)?;
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
