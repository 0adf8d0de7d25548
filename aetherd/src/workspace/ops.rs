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
    NewWorkspace, Owner, Project, SeedMaterial, Store, TaskRow, Workspace, WorkspaceFilter,
};
use crate::tunnel::Connections;
use crate::workspace::placement::Placement;
use crate::workspace::runner::{self, Input};
use crate::workspace::state::State;

mod image_ops;
mod lifecycle;
pub mod live;
mod provision;
pub mod tasks;
mod update;

pub use image_ops::ImageUpload;
pub use lifecycle::Readiness;
pub use provision::{root_volume_name, seed_file_name, Provisioning};

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
