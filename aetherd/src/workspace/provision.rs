//! A workspace's host-side resources: its domain definition (from the row), root volume,
//! seed and address reservation, made in recorded steps at create and removed at delete (see
//! migration 11 in `store::migrations`); their changes at update; and the settling of a row
//! a crash left marked.
//!
//! Invariants: every step of [`Provisioner::provision`] can be undone by
//! [`Provisioner::deprovision`], which takes whatever is there (missing pieces are fine), so
//! a row marked `creating` or `deleting` is always settled by removing everything.

use std::sync::Arc;

use crate::cloudinit::{self, KeyPair};
use crate::error::{Error, Result};
use crate::files;
use crate::host::Layout;
use crate::hypervisor::{Boot, DomainSpec, DomainType, Hypervisor};
use crate::images::{BootMode, Image, ImageId};
use crate::model::Hardware;
use crate::network::Subnet;
use crate::store::{Provisioning as Mark, Store, Workspace};
use crate::tasks::Tasks;
use crate::workspace::pinning::Pinning;

/// Makes, changes and removes workspaces' host-side resources; everything is handed in.
pub struct Provisioner {
    store: Arc<Store>,
    hv: Arc<Hypervisor>,
    layout: Layout,
    subnet: Subnet,
    pinning: Arc<Pinning>,
    tasks: Arc<Tasks>,
}

impl Provisioner {
    pub fn new(
        store: Arc<Store>,
        hv: Arc<Hypervisor>,
        layout: Layout,
        subnet: Subnet,
        pinning: Arc<Pinning>,
        tasks: Arc<Tasks>,
    ) -> Self {
        Provisioner {
            store,
            hv,
            layout,
            subnet,
            pinning,
            tasks,
        }
    }

    /// The domain of `ws` as its row describes it.
    pub fn spec(&self, ws: &Workspace) -> Result<DomainSpec> {
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
            root_disk: has_disks.then(|| self.layout.pool().join(Layout::root_volume_name(&ws.id))),
            seed_disk: has_disks.then(|| self.layout.pool().join(Layout::seed_file_name(&ws.id))),
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
            shared_cpus: self.pinning.shared_cpus()?,
            dedicated_cpus: ws.dedicated_cpus.clone(),
            gpu: ws
                .gpu_device
                .as_ref()
                .and_then(|d| {
                    self.pinning
                        .placement()
                        .gpus()
                        .iter()
                        .find(|g| g.device == *d)
                })
                .map(|g| (g.domain, g.bus, g.slot, g.function)),
        })
    }

    /// Defines (or redefines) the domain of `ws` as the row describes it.
    pub async fn define(&self, ws: &Workspace) -> Result<()> {
        self.hv.define(&self.spec(ws)?).await
    }

    /// Makes the host-side resources of a new workspace; if a step fails, removes what the
    /// others made and the row.
    pub async fn provision_or_undo(&self, ws: &Workspace, p: &Provisioning) -> Result<()> {
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
            .create_overlay(
                &Layout::root_volume_name(&ws.id),
                ws.hardware.volume_size_gb,
                &base,
            )
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
        let seed_path = self.layout.pool().join(Layout::seed_file_name(&ws.id));
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
    /// `deleting` one is deleted. Both remove whatever of its resources is left, and the
    /// row.
    pub async fn settle(&self, ws: &Workspace) -> Result<()> {
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
        Ok(())
    }

    /// Writes the seed of a complete workspace again if it is missing (its key is stored).
    pub async fn ensure_seed(&self, ws: &Workspace) -> Result<()> {
        if ws.image.is_none()
            || self
                .layout
                .pool()
                .join(Layout::seed_file_name(&ws.id))
                .exists()
        {
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

    /// Removes everything [`Provisioner::provision`] made; missing pieces are fine.
    pub async fn deprovision(&self, ws: &Workspace) -> Result<()> {
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
        self.hv
            .delete_volume(&Layout::root_volume_name(&ws.id))
            .await?;
        self.hv
            .delete_volume(&Layout::seed_file_name(&ws.id))
            .await?;
        crate::fault::point("delete:volumes");
        // The console log with virtlogd's rotated files, the task logs and their `.1`s.
        files::remove_log(&self.layout.console_log(&ws.id))?;
        self.tasks.remove_logs_of(&ws.id)?;
        self.layout.remove_memory_image(&ws.id)?;
        for path in [self.layout.pool().join(Layout::seed_file_name(&ws.id))] {
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

    /// Changes the hardware of `ws` to `wanted` (validated): the volume grows at once, the
    /// rest at once while the VM is off and as pending hardware (for the next start)
    /// otherwise. A volume never shrinks.
    pub async fn change_hardware(&self, ws: &Workspace, wanted: Hardware) -> Result<Workspace> {
        let ws = ws.clone();
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
                    &Layout::root_volume_name(&ws.id),
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

/// What a new workspace's runner provisions (see [`Provisioner::provision_or_undo`]).
pub struct Provisioning {
    pub image: Image,
}
