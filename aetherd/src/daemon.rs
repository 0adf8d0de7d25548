//! The daemon's parts, made once at start and handed to each other: [`Daemon::new`]
//! prepares the host (directories, storage pool, network, filters, the daemon's SSH key),
//! reads what it has (CPUs, memory, GPUs) and builds the feed, tasks, idle, images,
//! projects and workspaces. The API holds a [`Daemon`] and calls the part a request is for.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::Config;
use crate::doctor;
use crate::error::{Error, Result};
use crate::feed::Feed;
use crate::host::guest_ssh::GuestSsh;
use crate::host::{keys, Layout};
use crate::hypervisor::gpu::Gpu;
use crate::hypervisor::{DomainType, Hypervisor};
use crate::idle::{self, Idle, Nudges};
use crate::images::Images;
use crate::model::WorkspaceId;
use crate::network::Subnet;
use crate::projects::Projects;
use crate::store::{Store, WorkspaceFilter};
use crate::tasks::Tasks;
use crate::tunnel::Connections;
use crate::workspace::jobs::Jobs;
use crate::workspace::pinning::Pinning;
use crate::workspace::placement::Placement;
use crate::workspace::provision::Provisioner;
use crate::workspace::readiness::Readiness;
use crate::workspace::{Deps, Workspaces};

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
    pub gpus: Vec<(Gpu, Option<WorkspaceId>)>,
    pub shared_cpus: Vec<u32>,
}

pub struct Daemon {
    pub workspaces: Arc<Workspaces>,
    pub projects: Arc<Projects>,
    pub images: Arc<Images>,
    pub tasks: Arc<Tasks>,
    pub feed: Arc<Feed>,
    /// Open tunnels per workspace.
    pub connections: Connections,
    /// The daemon's key and pinned host keys, for its own SSH connections (terminals).
    pub guest: GuestSsh,
    store: Arc<Store>,
    hv: Arc<Hypervisor>,
    placement: Arc<Placement>,
    max_volume_size_gb: u32,
    pool: std::path::PathBuf,
    default_image: String,
    /// Until [`Daemon::start_background`] hands them to the idle task.
    nudges: Mutex<Option<Nudges>>,
}

impl Daemon {
    /// Prepares the host side and builds the parts.
    pub async fn new(store: Store, hv: Hypervisor, config: Config) -> Result<Daemon> {
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
        let daemon_key = keys::daemon_key(&layout)?;
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
        let boot_timeout =
            Duration::from_secs(config.boot_timeout_secs.unwrap_or(match hv.domain_type() {
                DomainType::Kvm => 120,
                DomainType::Qemu | DomainType::Test => 300,
            }));

        let store = Arc::new(store);
        let hv = Arc::new(hv);
        let guest = GuestSsh::new(&layout);
        let feed = Arc::new(Feed::new(Arc::clone(&store)));
        let (nudge, nudges) = idle::channel();
        let connections = Connections::with_notify(nudge.sender());
        let tasks = Arc::new(Tasks::new(
            Arc::clone(&store),
            &layout,
            guest.clone(),
            config.quota.clone(),
            nudge.clone(),
            Arc::clone(&feed),
        ));
        let idle = Arc::new(Idle::new(
            Arc::clone(&store),
            Arc::clone(&feed),
            connections.clone(),
            Arc::clone(&tasks),
            config.idle_timeout_secs(),
        ));
        let images = Arc::new(Images::new(
            Arc::clone(&store),
            Arc::clone(&hv),
            layout.clone(),
            qemu_gid,
            config.max_volume_size_gb,
            config.quota.clone(),
            config.image_catalog_dir.clone(),
        ));
        let projects = Arc::new(Projects::new(Arc::clone(&store)));
        let placement = Arc::new(Placement::new(host, gpus, &config));
        let pinning = Arc::new(Pinning::new(
            Arc::clone(&store),
            Arc::clone(&hv),
            Arc::clone(&placement),
        ));
        let provisioner = Arc::new(Provisioner::new(
            Arc::clone(&store),
            Arc::clone(&hv),
            layout.clone(),
            subnet,
            Arc::clone(&pinning),
            Arc::clone(&tasks),
        ));
        let readiness = Readiness::new(
            Arc::clone(&hv),
            layout.clone(),
            subnet,
            guest.clone(),
            Arc::clone(&feed),
            boot_timeout,
        );
        let jobs = Arc::new(Jobs::new(
            Arc::clone(&hv),
            layout.clone(),
            Arc::clone(&feed),
            Arc::clone(&pinning),
            Arc::clone(&provisioner),
            readiness,
            Duration::from_secs(config.stop_timeout_secs),
        ));
        let pool = layout.pool();
        let workspaces = Workspaces::new(Deps {
            store: Arc::clone(&store),
            hv: Arc::clone(&hv),
            layout,
            subnet,
            feed: Arc::clone(&feed),
            idle,
            nudge,
            tasks: Arc::clone(&tasks),
            connections: connections.clone(),
            projects: Arc::clone(&projects),
            pinning,
            provisioner,
            jobs,
            quota: config.quota.clone(),
            max_volume_size_gb: config.max_volume_size_gb,
            default_image: config.default_image.clone(),
            daemon_public_key: daemon_key.public,
            idle_action: config.idle_action,
        });
        Ok(Daemon {
            workspaces,
            projects,
            images,
            tasks,
            feed,
            connections,
            guest,
            store,
            hv,
            placement,
            max_volume_size_gb: config.max_volume_size_gb,
            pool,
            default_image: config.default_image.clone(),
            nudges: Mutex::new(Some(nudges)),
        })
    }

    /// Resolves every workspace against libvirt, before the API is served (see
    /// [`Workspaces::reconcile`]).
    pub async fn reconcile(&self) -> Result<()> {
        self.workspaces.reconcile().await
    }

    /// Starts the background tasks (see [`Workspaces::start_background`]); once.
    pub fn start_background(&self) -> Result<()> {
        let nudges = self
            .nudges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| Error::Internal("the background tasks run already".into()))?;
        self.workspaces.start_background(nudges)
    }

    /// What creating and reaching a workspace needs of this host (see [`doctor`]).
    pub async fn check_host(&self) -> Vec<doctor::Check> {
        doctor::run(&self.hv, &self.store, &self.pool, &self.default_image).await
    }

    pub async fn host_info(&self) -> Result<HostInfo> {
        let v = self.hv.versions().await?;
        let all = self
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?;
        Ok(HostInfo {
            version: env!("CARGO_PKG_VERSION"),
            libvirt_uri: self.hv.uri().to_owned(),
            libvirt_version: v.libvirt_version,
            hypervisor: v.hypervisor,
            accelerator: self.hv.domain_type().accelerator(),
            max_volume_size_gb: self.max_volume_size_gb,
            cpus: self.placement.host_cpus(),
            memory_mib: self.placement.host_memory_mib(),
            gpus: self.placement.gpu_holders(&all),
            shared_cpus: self.placement.shared_cpus(&all),
        })
    }
}
