//! Workspaces: [`Workspaces`] is the facade the API calls (typed ids, visibility, validation,
//! quotas); each workspace's transitions belong to its runner ([`runner`]), decided by the
//! pure state machine ([`state`]). The work a runner hands out lives beside it:
//! [`provision`] (volume, seed, reservation, domain), [`placement`] (where a start goes),
//! [`pinning`] (running VMs kept off dedicated CPUs), [`jobs`] (boot and graceful stop),
//! [`readiness`] (when a guest can be used), [`reconcile`] (what no row owns, at start) and
//! [`snapshot`] (named points of the disk).
//!
//! Invariants: a request that concerns one workspace is checked for visibility here and then
//! handed to its runner, the only writer of its state; nothing here writes a state.

pub mod jobs;
pub mod pinning;
pub mod placement;
pub mod provision;
pub mod readiness;
pub mod reconcile;
pub mod runner;
pub mod snapshot;
pub mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::caller::Caller;
use crate::cloudinit;
use crate::error::{Error, Result};
use crate::feed::{ChangeKind, Feed};
use crate::files::tail;
use crate::host::{keys, Layout};
use crate::hypervisor::{DomainType, Hypervisor};
use crate::idle::{Idle, Nudge, Nudges};
use crate::model::{Hardware, HardwareLimits, HardwareRequest, WorkspaceId};
use crate::network::{self, Subnet};
use crate::projects::Projects;
use crate::quota::{Claim, Quotas};
use crate::store::{NewWorkspace, SeedMaterial, Store, Workspace, WorkspaceFilter};
use crate::tasks::Tasks;
use crate::tunnel::Connections;
use jobs::Jobs;
use pinning::Pinning;
use provision::{Provisioner, Provisioning};
use runner::Input;
use state::State;

/// What [`Workspaces`] is built from; everything is made (and the host prepared) by
/// `daemon::Daemon::new`.
pub struct Deps {
    pub store: Arc<Store>,
    pub hv: Arc<Hypervisor>,
    pub layout: Layout,
    pub subnet: Subnet,
    pub feed: Arc<Feed>,
    pub idle: Arc<Idle>,
    pub nudge: Nudge,
    pub tasks: Arc<Tasks>,
    pub connections: Connections,
    pub projects: Arc<Projects>,
    pub pinning: Arc<Pinning>,
    pub provisioner: Arc<Provisioner>,
    pub jobs: Arc<Jobs>,
    pub quota: Quotas,
    pub max_volume_size_gb: u32,
    /// The image of a create that names none ("": none).
    pub default_image: String,
    /// The daemon's SSH public key, authorized in every guest (for tasks and readiness).
    pub daemon_public_key: String,
    pub idle_action: crate::config::IdleAction,
}

pub struct Workspaces {
    d: Deps,
    /// The runner of each workspace that has one.
    runners: Mutex<HashMap<WorkspaceId, mpsc::Sender<Input>>>,
    /// Held from a create's quota check to its insert, so parallel creates of one user
    /// cannot all pass the check.
    creating: Mutex<()>,
}

/// What the daemon knows about a workspace beyond its row.
#[derive(Clone, Debug, Default)]
pub struct Runtime {
    pub phase: &'static str,
    pub connections: u32,
    pub tasks: u32,
    pub idle_timeout_secs: u64,
    pub idle_since: Option<i64>,
    pub stops_at: Option<i64>,
    /// The size of its memory image when it is suspended.
    pub memory_image_bytes: Option<u64>,
}

/// How a stop is carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopHow {
    /// ACPI shutdown.
    Graceful,
    /// The guest's memory saved, for a resume at the next start.
    Suspend,
    /// Power off at once.
    Force,
}

/// What `create` is asked for.
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

impl Workspaces {
    pub fn new(deps: Deps) -> Arc<Self> {
        Arc::new(Workspaces {
            d: deps,
            runners: Mutex::new(HashMap::new()),
            creating: Mutex::new(()),
        })
    }

    // ---- runners ----

    /// The runner of `id`, started if it has none.
    fn runner(self: &Arc<Self>, id: &WorkspaceId) -> mpsc::Sender<Input> {
        let mut runners = self.runners.lock().unwrap_or_else(|p| p.into_inner());
        runners
            .entry(id.clone())
            .or_insert_with(|| runner::spawn(Arc::clone(self), id.clone()))
            .clone()
    }

    /// Forgets the runner `me` of `id`, which ended (its workspace is gone).
    fn runner_ended(&self, id: &WorkspaceId, me: &mpsc::Sender<Input>) {
        let mut runners = self.runners.lock().unwrap_or_else(|p| p.into_inner());
        if runners.get(id).is_some_and(|r| r.same_channel(me)) {
            runners.remove(id);
        }
    }

    /// Hands an input to the runner of `id` (a new one if the last just ended).
    async fn send(self: &Arc<Self>, id: &WorkspaceId, input: Input) {
        let input = match self.runner(id).send(input).await {
            Ok(()) => return,
            Err(mpsc::error::SendError(input)) => input,
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
        input: impl FnOnce(oneshot::Sender<Result<T>>) -> Input,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send(id, input(tx)).await;
        rx.await
            .unwrap_or_else(|_| Err(Error::not_found("workspace", id.as_str())))
    }

    // ---- what runners call ----

    /// What follows a written transition from `old` to `new`: the phase ends with the
    /// transitional state, moved CPUs are re-pinned, watchers are told, idleness is
    /// re-evaluated.
    fn transitioned(&self, old: &Workspace, new: &Workspace) {
        if !matches!(new.state, State::Starting | State::Stopping) {
            self.d.feed.end_phase(&new.id);
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
            self.d.pinning.changed();
        }
        self.d.feed.publish(ChangeKind::Changed, new);
        self.d.nudge.changed(&new.id);
    }

    /// What follows the deletion of `ws`'s row.
    fn deleted(&self, ws: &Workspace) {
        tracing::info!(workspace = %ws.id, "workspace deleted");
        self.d.feed.publish(ChangeKind::Deleted, ws);
        self.d.nudge.changed(&ws.id);
    }

    /// An update of `ws` for `caller`, in its runner: hardware (see
    /// [`Provisioner::change_hardware`]) and the idle timeout. Everything is validated
    /// before anything changes.
    async fn update_in_runner(
        &self,
        caller: Caller,
        ws: &Workspace,
        req: &HardwareRequest,
        idle: Option<u64>,
    ) -> Result<Workspace> {
        let base = ws.pending_hardware.as_ref().unwrap_or(&ws.hardware);
        let wanted = base.with(req, &self.limits())?;
        if wanted.volume_size_gb > ws.hardware.volume_size_gb {
            self.d.quota.check_for(
                caller,
                volume_gb(&self.owned_by(ws.owner_uid)?),
                Claim::VolumeGb(u64::from(
                    wanted.volume_size_gb - ws.hardware.volume_size_gb,
                )),
            )?;
        }
        let ws = if req.is_empty() {
            ws.clone()
        } else {
            if ws.state.vm_is_off() && self.d.layout.memory_image_bytes(&ws.id).is_some() {
                // The saved guest has the old hardware: it boots afresh with the new.
                self.d.layout.remove_memory_image(&ws.id)?;
                tracing::info!(workspace = %ws.id, "memory image discarded: hardware changed");
            }
            self.d.provisioner.change_hardware(ws, wanted).await?
        };
        if let Some(secs) = idle {
            self.d.store.set_idle_timeout(&ws.id, Some(secs))?;
            tracing::info!(workspace = %ws.id, idle_timeout_secs = secs, "idle timeout updated");
            self.d.nudge.changed(&ws.id);
        }
        let updated = self.d.store.get_workspace(&ws.id, None)?;
        self.d.feed.publish(ChangeKind::Changed, &updated);
        Ok(updated)
    }

    // ---- requests ----

    /// Every workspace of `uid`.
    fn owned_by(&self, uid: u32) -> Result<Vec<Workspace>> {
        self.d
            .store
            .list_workspaces(&WorkspaceFilter::default(), Some(uid))
    }

    fn limits(&self) -> HardwareLimits {
        let mut gpu_kinds: Vec<String> = self
            .d
            .pinning
            .placement()
            .gpus()
            .iter()
            .map(|g| g.kind.clone())
            .collect();
        gpu_kinds.sort();
        gpu_kinds.dedup();
        HardwareLimits {
            max_volume_size_gb: self.d.max_volume_size_gb,
            gpu_kinds,
        }
    }

    /// Creates a workspace: its row (marked `creating`), then, in its runner, root volume (a
    /// qcow2 overlay on the image), seed, DHCP reservation and domain. A failed step undoes
    /// the ones before it.
    pub async fn create(
        self: &Arc<Self>,
        caller: Caller,
        req: &CreateWorkspace,
    ) -> Result<Workspace> {
        let project = self.d.projects.get(caller, &req.project)?;
        let hardware = Hardware::DEFAULT.with(&req.hardware, &self.limits())?;
        let idle_timeout_secs = req
            .idle_timeout
            .as_deref()
            .map(crate::model::parse_duration_secs)
            .transpose()?;
        let image_ref = match (req.image.as_str(), self.d.default_image.as_str()) {
            ("", "") => {
                return Err(Error::invalid(
                    "no image given and no default_image configured; pass --image (see `aether image list`)",
                ))
            }
            ("", default) => default,
            (name, _) => name,
        };
        let image = match self.d.store.resolve_image(image_ref, caller.owner()) {
            Err(Error::NotFound { .. }) => {
                return Err(Error::not_found_hint(
                    "image",
                    image_ref,
                    "see aether image list, or import it with aether image import NAME FILE",
                ))
            }
            other => other?,
        };
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
        keys.push(self.d.daemon_public_key.clone());

        let id = WorkspaceId::generate();
        let host_key = cloudinit::generate_ed25519(&self.d.layout.tmp(), id.as_str())?;
        let mac = network::random_mac();
        let uuid = keys::new_uuid();
        let creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        let mine = self.owned_by(caller.uid)?;
        let quota = &self.d.quota;
        quota.check_for(caller, mine.len() as u64, Claim::Workspaces(1))?;
        quota.check_for(
            caller,
            volume_gb(&mine),
            Claim::VolumeGb(u64::from(hardware.volume_size_gb)),
        )?;
        let image_id = image.id.to_string();
        let seed = SeedMaterial {
            host_private_key: host_key.private.clone(),
            authorized_keys: keys,
        };
        let ws = self.d.store.insert_workspace(&NewWorkspace {
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
            subnet: Some(self.d.subnet),
            idle_timeout_secs,
        })?;
        drop(creating);
        let provisioning = Provisioning { image };
        let ws = self
            .ask(&ws.id, |r| Input::Provision(Box::new(provisioning), r))
            .await?;
        tracing::info!(workspace = %ws.id, project = %project.id, image = ?ws.image, ip = ?ws.ip, hardware = %hardware, "workspace created");
        self.d.feed.publish(ChangeKind::Changed, &ws);
        Ok(ws)
    }

    pub fn list(
        &self,
        caller: Caller,
        state: Option<State>,
        project: Option<&str>,
    ) -> Result<Vec<Workspace>> {
        let project = match project {
            Some(p) => Some(self.d.projects.get(caller, p)?.id),
            None => None,
        };
        self.d
            .store
            .list_workspaces(&WorkspaceFilter { state, project }, caller.owner())
    }

    pub fn get(&self, caller: Caller, id: &str) -> Result<Workspace> {
        self.d
            .store
            .get_workspace(&WorkspaceId::parse(id)?, caller.owner())
    }

    /// Moves the workspace to `starting` and boots it in the background. Refused (and
    /// nothing changed) when the host or the owner's quota lacks the CPUs or memory it
    /// needs; a workspace already starting or running is returned as it is.
    pub async fn start(self: &Arc<Self>, caller: Caller, id: &str) -> Result<Workspace> {
        let ws = self.get(caller, id)?;
        self.ask(&ws.id, |r| Input::Start(caller, r)).await
    }

    /// A graceful stop moves the workspace to `stopping` and waits for the guest in the
    /// background; a suspend does the same while the guest's memory is saved; a forced stop
    /// powers the VM off and returns `stopped`. A workspace already stopping or stopped is
    /// returned as it is (a plain stop discards the memory image of a suspended one).
    pub async fn stop(
        self: &Arc<Self>,
        caller: Caller,
        id: &str,
        how: StopHow,
    ) -> Result<Workspace> {
        let ws = self.get(caller, id)?;
        let input = match how {
            StopHow::Graceful => Input::Stop,
            StopHow::Suspend => Input::Suspend,
            StopHow::Force => Input::ForceStop,
        };
        self.ask(&ws.id, input).await
    }

    /// Changes hardware: at once while the VM is off, as pending changes otherwise.
    /// The idle timeout, if given, applies at once.
    pub async fn update(
        self: &Arc<Self>,
        caller: Caller,
        id: &str,
        req: &HardwareRequest,
        idle_timeout: Option<&str>,
    ) -> Result<Workspace> {
        let ws = self.get(caller, id)?;
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

    /// Lists, takes, restores or deletes a snapshot of the workspace's disk, in its runner;
    /// the snapshots afterwards. With `force`, a restore powers a running VM off first.
    pub async fn snapshot(
        self: &Arc<Self>,
        caller: Caller,
        id: &str,
        op: snapshot::SnapshotOp,
        force: bool,
    ) -> Result<Vec<crate::images::snapshots::Snapshot>> {
        let ws = self.get(caller, id)?;
        if force && matches!(op, snapshot::SnapshotOp::Restore(_)) && !ws.state.vm_is_off() {
            self.ask(&ws.id, Input::ForceStop).await?;
        }
        self.ask(&ws.id, |reply| Input::Snapshot(op, reply)).await
    }

    /// Deletes the domain and the row. Without `force` the VM must not be running.
    pub async fn delete(self: &Arc<Self>, caller: Caller, id: &str, force: bool) -> Result<()> {
        let ws = self.get(caller, id)?;
        self.ask(&ws.id, |reply| Input::Delete { force, reply })
            .await
    }

    /// The last `max` bytes of the workspace's serial console log.
    pub fn console_log(&self, caller: Caller, id: &str, max: usize) -> Result<Vec<u8>> {
        let ws = self.get(caller, id)?;
        tail(&self.d.layout.console_log(&ws.id), max)
    }

    /// Where a tunnel to `port` of workspace `id` connects: the guest's address, while the
    /// workspace is running.
    pub fn tunnel_target(
        &self,
        caller: Caller,
        id: &str,
        port: u16,
    ) -> Result<(WorkspaceId, std::net::SocketAddr)> {
        let (ws, addr) = self.connection_target(caller, id, port)?;
        Ok((ws.id, addr))
    }

    /// [`Workspaces::tunnel_target`] with the whole workspace (a terminal needs its login
    /// user and pinned host key); checked against the same quota.
    pub fn connection_target(
        &self,
        caller: Caller,
        id: &str,
        port: u16,
    ) -> Result<(Workspace, std::net::SocketAddr)> {
        let (ws, ip) = self.running_with_address(caller, id)?;
        let open: usize = self
            .owned_by(ws.owner_uid)?
            .iter()
            .map(|w| self.d.connections.count(&w.id))
            .sum();
        self.d
            .quota
            .check_for(caller, open as u64, Claim::Tunnels(1))?;
        Ok((ws, std::net::SocketAddr::from((ip, port))))
    }

    /// The workspace, if it is running and has an address (what tunnels and tasks need).
    pub fn running_with_address(
        &self,
        caller: Caller,
        id: &str,
    ) -> Result<(Workspace, std::net::Ipv4Addr)> {
        let ws = self.get(caller, id)?;
        if ws.state != State::Running {
            return Err(Error::precondition(format!(
                "workspace is {}: start it first",
                ws.state
            )));
        }
        // No guest behind the address: connecting would send traffic to an address that is
        // nobody's (and tests must not).
        if self.d.hv.domain_type() == DomainType::Test {
            return Err(Error::precondition(
                "libvirt's test driver runs no guest: there is nothing to connect to",
            ));
        }
        let ip = ws
            .ip
            .ok_or_else(|| Error::precondition(format!("workspace {} has no IP address", ws.id)))?;
        Ok((ws, ip))
    }

    /// What the daemon knows about `ws` beyond its row.
    pub fn runtime(&self, ws: &Workspace) -> Runtime {
        let timeout = self.d.idle.timeout_of(ws);
        Runtime {
            phase: self.d.feed.phase_of(&ws.id),
            connections: self.d.connections.count(&ws.id) as u32,
            tasks: self.d.tasks.running_in(&ws.id),
            idle_timeout_secs: timeout,
            idle_since: ws.idle_since,
            stops_at: ws
                .idle_since
                .filter(|_| timeout > 0)
                .map(|since| since + timeout as i64),
            memory_image_bytes: self.d.layout.memory_image_bytes(&ws.id),
        }
    }

    // ---- daemon start ----

    /// Resolves every workspace against libvirt before the API is served (each in its
    /// runner: missing domains are defined again from the database, transitional states
    /// are settled), then removes what no row owns (see [`reconcile`]).
    pub async fn reconcile(self: &Arc<Self>) -> Result<()> {
        let all = self
            .d
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?;
        for ws in all {
            self.ask(&ws.id, Input::Reconcile).await?;
        }
        reconcile::sweep_orphans(&self.d.store, &self.d.hv, &self.d.layout, self.d.subnet).await
    }

    /// Starts the background tasks: libvirt lifecycle events to runners, idle
    /// re-evaluation (taking `nudges`) and its expiries to runners, CPU pinning, and the
    /// console-log cap.
    pub fn start_background(self: &Arc<Self>, nudges: Nudges) -> Result<()> {
        if let Some(mut events) = self.d.hv.take_events() {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                while let Some(ev) = events.recv().await {
                    let Some(id) = WorkspaceId::from_domain_name(ev.domain()) else {
                        continue;
                    };
                    if this.d.store.get_workspace(&id, None).is_ok() {
                        this.send(&id, Input::Domain(ev)).await;
                    }
                }
            });
        }
        let (expired, mut expiries) = mpsc::unbounded_channel();
        let all = self
            .d
            .store
            .list_workspaces(&WorkspaceFilter::default(), None)?;
        self.d.idle.start(nudges, expired, &all);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            while let Some((id, generation)) = expiries.recv().await {
                this.send(&id, Input::IdleExpired { generation }).await;
            }
        });
        self.d.pinning.start();
        // While VMs run, their console logs grow: cut any past the cap once a minute (a few
        // stat calls; virtlogd, when libvirt uses it, rotates them sooner anyway).
        let console = self.d.layout.console_dir();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                let dir = console.clone();
                let cut = tokio::task::spawn_blocking(move || {
                    crate::files::cap_logs_in(&dir, crate::files::CONSOLE_LOG_MAX)
                })
                .await;
                if let Ok(Err(e)) = cut {
                    tracing::warn!(error = %e, "cannot cap the console logs");
                }
            }
        });
        Ok(())
    }
}

/// GiB of the root volumes of `workspaces`, together (what `quota.volume_gb` caps).
fn volume_gb(workspaces: &[Workspace]) -> u64 {
    workspaces
        .iter()
        .map(|w| u64::from(w.hardware.volume_size_gb))
        .sum()
}
