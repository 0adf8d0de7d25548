//! Reconcile at daemon start, the part no runner owns: host resources that no row accounts
//! for (domains, DHCP reservations, pool files, memory images, boot dirs). (Each workspace's own row is brought in line with libvirt by its runner.)
//!
//! Every row's files and domain are made after the row is written (marked `creating`) and
//! removed before it goes (marked `deleting`), so anything aether-owned without a row was
//! left by a daemon that died, or by a libvirt call that timed out and went through later,
//! and nothing uses it, unless it runs: a running domain without a row is left alone, with
//! its volumes, and logged.

use std::collections::HashSet;

use crate::error::Result;
use crate::host::Layout;
use crate::hypervisor::Hypervisor;
use crate::images::ImageId;
use crate::model::WorkspaceId;
use crate::network::Subnet;
use crate::store::{Store, WorkspaceFilter};

/// Removes what no row owns: inactive aether domains, DHCP reservations (with their
/// leases), pool files (a workspace's volume or seed, an image), memory images and boot
/// dirs (an image's kernel and initrd).
pub async fn sweep_orphans(
    store: &Store,
    hv: &Hypervisor,
    layout: &Layout,
    subnet: Subnet,
) -> Result<()> {
    let mut workspaces: HashSet<WorkspaceId> = store
        .list_workspaces(&WorkspaceFilter::default(), None)?
        .into_iter()
        .map(|w| w.id)
        .collect();
    let images: HashSet<String> = store
        .list_images(None)?
        .into_iter()
        .map(|i| i.id.to_string())
        .collect();
    for (id, active) in hv.owned_domains().await? {
        if workspaces.contains(&id) {
            continue;
        }
        if active {
            tracing::warn!(workspace = %id, "an aether domain without a workspace is running; leaving it and its volumes alone (virsh destroy {} to let aetherd remove it)", id.domain_name());
            workspaces.insert(id);
        } else {
            tracing::warn!(workspace = %id, "removing a domain no workspace owns");
            hv.undefine(&id).await?;
        }
    }
    for (mac, ip, name) in hv.dhcp_hosts().await? {
        let Ok(id) = WorkspaceId::parse(&name) else {
            continue;
        };
        if workspaces.contains(&id) {
            continue;
        }
        tracing::warn!(workspace = %id, %ip, "removing a DHCP reservation no workspace owns");
        if let Err(e) = hv.release_lease(subnet.gateway(), ip, &mac).await {
            tracing::warn!(workspace = %id, %ip, error = %e, "cannot release the DHCP lease");
        }
        hv.remove_dhcp_host(&mac, ip, &name).await?;
    }
    let owner_of = |name: &str| -> Option<WorkspaceId> {
        let id = name
            .strip_suffix("-root.qcow2")
            .or_else(|| name.strip_suffix("-seed.img"))?;
        let id = WorkspaceId::parse(id).ok()?;
        (name == Layout::root_volume_name(&id) || name == Layout::seed_file_name(&id)).then_some(id)
    };
    let mut removed_volume = false;
    for name in names(&layout.pool()) {
        let orphan = if let Some(id) = owner_of(&name) {
            !workspaces.contains(&id)
        } else if let Some(id) = name
            .strip_prefix("image-")
            .and_then(|n| n.strip_suffix(".qcow2"))
            .and_then(|id| ImageId::parse(id).ok())
        {
            name == id.volume_name() && !images.contains(&id.to_string())
        } else {
            false
        };
        if orphan {
            tracing::warn!(file = %name, "removing a pool file no workspace or image owns");
            hv.delete_volume(&name).await?;
            let _ = std::fs::remove_file(layout.pool().join(&name));
            removed_volume = true;
        }
    }
    if removed_volume {
        hv.refresh_pool().await?;
    }
    for name in names(&layout.memory_dir()) {
        let owner = name
            .strip_suffix(".save")
            .and_then(|id| WorkspaceId::parse(id).ok());
        if owner.is_some_and(|id| !workspaces.contains(&id)) {
            tracing::warn!(file = %name, "removing a memory image no workspace owns");
            let _ = std::fs::remove_file(layout.memory_dir().join(&name));
        }
    }
    let boot = layout.state_dir.join("boot");
    for name in names(&boot) {
        if ImageId::parse(&name).is_ok() && !images.contains(&name) {
            tracing::warn!(dir = %name, "removing a boot dir no image owns");
            let _ = std::fs::remove_dir_all(boot.join(&name));
        }
    }
    Ok(())
}

/// The names of the entries of `dir` (none if it cannot be read).
fn names(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
