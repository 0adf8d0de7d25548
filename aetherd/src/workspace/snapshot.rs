//! Snapshots of a workspace's disk (internal qcow2 snapshots of its root volume, see
//! `images::snapshots`): what each request checks and does. Run by the workspace's runner,
//! so a snapshot never interleaves with a start; qemu holds the volume's write lock while the
//! VM runs, so only a stopped workspace's snapshots change. A forced restore is a forced stop
//! (its own runner input) followed by the restore.

use crate::error::{Error, Result};
use crate::host::Layout;
use crate::hypervisor::{DomainType, Hypervisor};
use crate::images::snapshots::{self, Snapshot, SnapshotName, MAX_SNAPSHOTS};
use crate::store::Workspace;

/// What a snapshot request does.
pub enum SnapshotOp {
    List,
    Create(SnapshotName),
    Restore(SnapshotName),
    Delete(SnapshotName),
}

/// Lists, takes, restores or deletes a snapshot of `ws`'s root volume, in its runner (so no
/// start interleaves); the snapshots afterwards. Changing them needs the VM off.
pub async fn carry_out(
    hv: &Hypervisor,
    layout: &Layout,
    ws: &Workspace,
    op: SnapshotOp,
) -> Result<Vec<Snapshot>> {
    if hv.domain_type() == DomainType::Test || ws.image.is_none() {
        return Err(Error::precondition(
            "libvirt's test driver keeps no volume files: snapshots need a real libvirt",
        ));
    }
    let volume = layout.pool().join(Layout::root_volume_name(&ws.id));
    let off = |ws: &Workspace, hint: &str| {
        if ws.state.vm_is_off() {
            Ok(())
        } else {
            Err(Error::precondition(format!(
                "workspace is {}: stop it first{hint}",
                ws.state
            )))
        }
    };
    let existing = snapshots::list(&volume).await?;
    let find = |name: &SnapshotName| {
        existing
            .iter()
            .any(|s| s.name == name.as_str())
            .then_some(())
            .ok_or_else(|| Error::not_found("snapshot", name.as_str()))
    };
    match op {
        SnapshotOp::List => return Ok(existing),
        SnapshotOp::Create(name) => {
            off(ws, "; a snapshot is taken of a stopped workspace's disk")?;
            if existing.iter().any(|s| s.name == name.as_str()) {
                return Err(Error::AlreadyExists(format!(
                    "workspace {} has a snapshot {} already",
                    ws.id,
                    name.as_str()
                )));
            }
            if existing.len() >= MAX_SNAPSHOTS {
                return Err(Error::ResourceExhausted(format!(
                    "workspace {} has {MAX_SNAPSHOTS} snapshots, the most it keeps; delete one first",
                    ws.id
                )));
            }
            snapshots::change(&volume, "-c", &name).await?;
            tracing::info!(workspace = %ws.id, snapshot = name.as_str(), "snapshot taken");
        }
        SnapshotOp::Restore(name) => {
            find(&name)?;
            off(ws, ", or restore with --force")?;
            snapshots::change(&volume, "-a", &name).await?;
            tracing::info!(workspace = %ws.id, snapshot = name.as_str(), "snapshot restored");
        }
        SnapshotOp::Delete(name) => {
            find(&name)?;
            off(ws, "; its disk's snapshots change only while it is off")?;
            snapshots::change(&volume, "-d", &name).await?;
            tracing::info!(workspace = %ws.id, snapshot = name.as_str(), "snapshot deleted");
        }
    }
    snapshots::list(&volume).await
}
