//! Conversions between the core's types and protobuf: workspace state, hardware, projects,
//! workspaces, tasks and their output frames, boot modes and images.

use aether_proto::v1 as pb;
use tonic::Status;

use crate::doctor::{Check, Severity};
use crate::error::Error;
use crate::images::{BootMode, Image};
use crate::model::Hardware;
use crate::store::TaskRow;
use crate::store::{Project, Workspace};
use crate::tasks::Frame;
use crate::workspace::state::State;
use crate::workspace::Runtime;

use super::status::status;

fn state_to_pb(s: State) -> pb::WorkspaceState {
    match s {
        State::Stopped => pb::WorkspaceState::Stopped,
        State::Starting => pb::WorkspaceState::Starting,
        State::Running => pb::WorkspaceState::Running,
        State::Stopping => pb::WorkspaceState::Stopping,
        State::Error => pb::WorkspaceState::Error,
        State::StopFailed => pb::WorkspaceState::StopFailed,
    }
}

pub(super) fn state_from_pb(v: i32) -> Result<Option<State>, Status> {
    match pb::WorkspaceState::try_from(v) {
        Ok(pb::WorkspaceState::Unspecified) => Ok(None),
        Ok(pb::WorkspaceState::Stopped) => Ok(Some(State::Stopped)),
        Ok(pb::WorkspaceState::Starting) => Ok(Some(State::Starting)),
        Ok(pb::WorkspaceState::Running) => Ok(Some(State::Running)),
        Ok(pb::WorkspaceState::Stopping) => Ok(Some(State::Stopping)),
        Ok(pb::WorkspaceState::Error) => Ok(Some(State::Error)),
        Ok(pb::WorkspaceState::StopFailed) => Ok(Some(State::StopFailed)),
        Err(_) => Err(status(Error::invalid(format!(
            "invalid workspace state {v}"
        )))),
    }
}

fn hardware_to_pb(h: &Hardware) -> pb::Hardware {
    pb::Hardware {
        cpu_kind: h.cpu_kind.as_str().to_owned(),
        cpus: h.cpus,
        memory_mb: h.memory_mb,
        volume_size_gb: h.volume_size_gb,
        gpu_kind: h.gpu_kind.clone().unwrap_or_default(),
    }
}

pub(super) fn project_to_pb(p: Project) -> pb::Project {
    pb::Project {
        id: p.id.to_string(),
        name: p.name.to_string(),
        owner_uid: p.owner_uid,
        created_at: p.created_at,
        workspace_count: p.workspace_count,
    }
}

pub(super) fn workspace_to_pb(w: Workspace, rt: Runtime) -> pb::Workspace {
    pb::Workspace {
        phase: rt.phase.to_owned(),
        idle_timeout_secs: rt.idle_timeout_secs,
        active_connections: rt.connections,
        running_tasks: rt.tasks,
        idle_since: rt.idle_since.unwrap_or(0),
        stops_at: rt.stops_at.unwrap_or(0),
        suspended: rt.memory_image_bytes.is_some(),
        memory_image_bytes: rt.memory_image_bytes.unwrap_or(0),
        dedicated_cpus: w.dedicated_cpus.clone(),
        domain_name: w.id.domain_name(),
        id: w.id.to_string(),
        project_id: w.project_id.to_string(),
        project_name: w.project_name.to_string(),
        state: state_to_pb(w.state) as i32,
        hardware: Some(hardware_to_pb(&w.hardware)),
        pending_hardware: w.pending_hardware.as_ref().map(hardware_to_pb),
        ip_addresses: w.ip.iter().map(|ip| ip.to_string()).collect(),
        created_at: w.created_at,
        reason: w.reason,
        generation: w.generation,
        owner_uid: w.owner_uid,
        image: w.image.unwrap_or_default(),
        login_user: w.login_user,
        ssh_host_public_key: w.ssh_host_public_key,
    }
}

pub(super) fn task_to_pb(t: TaskRow) -> pb::Task {
    pb::Task {
        id: t.id,
        workspace_id: t.workspace_id.to_string(),
        argv: t.argv,
        state: t.state,
        exit_code: t.exit_code,
        started_at: t.started_at,
        ended_at: t.ended_at.unwrap_or(0),
    }
}

pub(super) fn frame_to_pb(task_id: &str, f: Frame) -> Option<pb::TaskOutput> {
    let base = pb::TaskOutput {
        task_id: task_id.to_owned(),
        state: "running".to_owned(),
        ..Default::default()
    };
    Some(match f {
        Frame::Stdout(d) => pb::TaskOutput { stdout: d, ..base },
        Frame::Stderr(d) => pb::TaskOutput { stderr: d, ..base },
        Frame::End { state, exit_code } => pb::TaskOutput {
            state: state.to_owned(),
            exit_code,
            ..base
        },
    })
}

fn boot_mode_to_pb(m: BootMode) -> pb::BootMode {
    match m {
        BootMode::Bios => pb::BootMode::Bios,
        BootMode::Uefi => pb::BootMode::Uefi,
        BootMode::Kernel => pb::BootMode::Kernel,
    }
}

pub(super) fn image_to_pb(i: &Image) -> pb::Image {
    pb::Image {
        name: i.id.name().to_string(),
        id: i.id.to_string(),
        owner_uid: i.id.owner_uid(),
        format: "qcow2".to_owned(),
        virtual_size_bytes: i.virtual_size,
        boot_mode: boot_mode_to_pb(i.boot_mode) as i32,
        cmdline: i.cmdline.clone(),
        in_use: i.in_use,
        created_at: i.created_at,
        disk_size_bytes: i.disk_size,
    }
}

pub(super) fn check_to_pb(c: Check) -> pb::HostCheck {
    use pb::host_check::Severity as S;
    let severity = match c.severity {
        Severity::Ok => S::Ok,
        Severity::Warn => S::Warn,
        Severity::Fail => S::Fail,
    };
    pb::HostCheck {
        name: c.name.to_owned(),
        severity: severity as i32,
        detail: c.detail,
        hint: c.hint,
    }
}

pub(super) fn catalog_entry_to_pb(e: crate::images::catalog::Entry) -> pb::CatalogEntry {
    pb::CatalogEntry {
        name: e.name.to_string(),
        description: e.description,
        url: e.url,
        checksum_url: e.checksum_url,
        checksum_algorithm: e.checksum.to_owned(),
        boot_mode: boot_mode_to_pb(e.boot) as i32,
        login_user: e.login_user,
        min_disk_gb: e.min_disk_gb,
    }
}
