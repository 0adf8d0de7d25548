//! The gRPC service. Protobuf types stay in this module: requests are converted to the core's
//! validated types on the way in, core types to protobuf on the way out, and errors to a
//! `Status` in exactly one place ([`status`]).

mod auth;

pub use auth::GROUP;

use std::sync::Arc;

use aether_proto::v1 as pb;
use aether_proto::v1::aether_server::Aether;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::images::{BootMode, Image};
use crate::model::{Hardware, HardwareRequest};
use crate::store::TaskRow;
use crate::store::{Project, Workspace};
use crate::tunnel;
use crate::workspace::ops::live::{ChangeKind, Runtime};
use crate::workspace::ops::tasks::{ExecSpec, Frame};
use crate::workspace::ops::{Caller, CreateWorkspace, Manager};
use crate::workspace::state::State;

pub use aether_proto::v1::aether_server::AetherServer;

pub struct Service {
    manager: Arc<Manager>,
}

impl Service {
    pub fn new(manager: Arc<Manager>) -> Self {
        Self { manager }
    }

    fn view(&self, ws: Workspace) -> pb::Workspace {
        let rt = self.manager.runtime(&ws);
        workspace_to_pb(ws, rt)
    }
}

/// The single mapping from the daemon's errors to gRPC status codes.
pub fn status(e: Error) -> Status {
    let msg = e.to_string();
    match e {
        Error::InvalidArgument(_) => Status::invalid_argument(msg),
        Error::NotFound { .. } => Status::not_found(msg),
        Error::AlreadyExists(_) => Status::already_exists(msg),
        Error::FailedPrecondition(_) => Status::failed_precondition(msg),
        Error::Conflict { .. } => Status::aborted(msg),
        Error::PermissionDenied(_) => Status::permission_denied(msg),
        Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
        Error::Libvirt(_) | Error::LibvirtTimeout(..) => Status::unavailable(msg),
        Error::Store(_) | Error::Internal(_) => Status::internal(msg),
    }
}

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

fn state_from_pb(v: i32) -> Result<Option<State>, Status> {
    match pb::WorkspaceState::try_from(v) {
        Ok(pb::WorkspaceState::Unspecified) => Ok(None),
        Ok(pb::WorkspaceState::Stopped) => Ok(Some(State::Stopped)),
        Ok(pb::WorkspaceState::Starting) => Ok(Some(State::Starting)),
        Ok(pb::WorkspaceState::Running) => Ok(Some(State::Running)),
        Ok(pb::WorkspaceState::Stopping) => Ok(Some(State::Stopping)),
        Ok(pb::WorkspaceState::Error) => Ok(Some(State::Error)),
        Ok(pb::WorkspaceState::StopFailed) => Ok(Some(State::StopFailed)),
        Err(_) => Err(Status::invalid_argument(format!(
            "invalid workspace state {v}"
        ))),
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

fn project_to_pb(p: Project) -> pb::Project {
    pb::Project {
        id: p.id.to_string(),
        name: p.name.to_string(),
        owner_uid: p.owner_uid,
        created_at: p.created_at,
        workspace_count: p.workspace_count,
    }
}

fn workspace_to_pb(w: Workspace, rt: Runtime) -> pb::Workspace {
    pb::Workspace {
        phase: rt.phase.to_owned(),
        idle_timeout_secs: rt.idle_timeout_secs,
        active_connections: rt.connections,
        running_tasks: rt.tasks,
        idle_since: rt.idle_since.unwrap_or(0),
        stops_at: rt.stops_at.unwrap_or(0),
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

type Reply<T> = Result<Response<T>, Status>;

type ByteStream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Aether for Service {
    async fn get_host_info(&self, req: Request<pb::GetHostInfoRequest>) -> Reply<pb::HostInfo> {
        auth::caller(&req)?;
        let h = self.manager.host_info().await.map_err(status)?;
        Ok(Response::new(pb::HostInfo {
            version: h.version.to_owned(),
            libvirt_uri: h.libvirt_uri,
            libvirt_version: h.libvirt_version,
            hypervisor: h.hypervisor,
            accelerator: h.accelerator.to_owned(),
            max_volume_size_gb: h.max_volume_size_gb,
            cpus: h.cpus,
            memory_mib: h.memory_mib,
            gpus: h
                .gpus
                .into_iter()
                .map(|(g, holder)| pb::Gpu {
                    address: g.address(),
                    kind: g.kind,
                    name: g.name,
                    iommu_group: g.iommu_group.map(|n| n as i32).unwrap_or(-1),
                    driver: g.driver,
                    held_by: holder.map(|w| w.to_string()).unwrap_or_default(),
                })
                .collect(),
            shared_cpus: h.shared_cpus,
        }))
    }

    async fn create_project(&self, req: Request<pb::CreateProjectRequest>) -> Reply<pb::Project> {
        let caller = auth::caller(&req)?;
        let p = self
            .manager
            .create_project(caller, &req.get_ref().name)
            .map_err(status)?;
        Ok(Response::new(project_to_pb(p)))
    }

    async fn list_projects(
        &self,
        req: Request<pb::ListProjectsRequest>,
    ) -> Reply<pb::ListProjectsResponse> {
        let caller = auth::caller(&req)?;
        let projects = self.manager.list_projects(caller).map_err(status)?;
        Ok(Response::new(pb::ListProjectsResponse {
            projects: projects.into_iter().map(project_to_pb).collect(),
        }))
    }

    async fn get_project(&self, req: Request<pb::GetProjectRequest>) -> Reply<pb::Project> {
        let caller = auth::caller(&req)?;
        let p = self
            .manager
            .get_project(caller, &req.get_ref().project)
            .map_err(status)?;
        Ok(Response::new(project_to_pb(p)))
    }

    async fn delete_project(
        &self,
        req: Request<pb::DeleteProjectRequest>,
    ) -> Reply<pb::DeleteProjectResponse> {
        let caller = auth::caller(&req)?;
        self.manager
            .delete_project(caller, &req.get_ref().project)
            .map_err(status)?;
        Ok(Response::new(pb::DeleteProjectResponse {}))
    }

    async fn create_workspace(
        &self,
        req: Request<pb::CreateWorkspaceRequest>,
    ) -> Reply<pb::Workspace> {
        let caller = auth::caller(&req)?;
        let r = req.into_inner();
        let create = CreateWorkspace {
            project: r.project,
            hardware: HardwareRequest {
                cpu_kind: r.cpu_kind,
                cpus: r.cpus,
                memory_mb: r.memory_mb,
                volume_size_gb: r.volume_size_gb,
                gpu_kind: r.gpu_kind,
            },
            image: r.image,
            login_user: r.login_user,
            ssh_authorized_keys: r.ssh_authorized_keys,
            idle_timeout: r.idle_timeout,
        };
        let ws = self
            .manager
            .create_workspace(caller, &create)
            .await
            .map_err(status)?;
        Ok(Response::new(self.view(ws)))
    }

    async fn list_workspaces(
        &self,
        req: Request<pb::ListWorkspacesRequest>,
    ) -> Reply<pb::ListWorkspacesResponse> {
        let caller = auth::caller(&req)?;
        let r = req.get_ref();
        let state = state_from_pb(r.state)?;
        let project = (!r.project.is_empty()).then_some(r.project.as_str());
        let list = self
            .manager
            .list_workspaces(caller, state, project)
            .map_err(status)?;
        Ok(Response::new(pb::ListWorkspacesResponse {
            workspaces: list.into_iter().map(|w| self.view(w)).collect(),
        }))
    }

    async fn get_workspace(&self, req: Request<pb::GetWorkspaceRequest>) -> Reply<pb::Workspace> {
        let caller = auth::caller(&req)?;
        let ws = self
            .manager
            .get_workspace(caller, &req.get_ref().id)
            .map_err(status)?;
        Ok(Response::new(self.view(ws)))
    }

    async fn start_workspace(
        &self,
        req: Request<pb::StartWorkspaceRequest>,
    ) -> Reply<pb::Workspace> {
        let caller = auth::caller(&req)?;
        let ws = self
            .manager
            .start_workspace(caller, &req.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(self.view(ws)))
    }

    async fn stop_workspace(&self, req: Request<pb::StopWorkspaceRequest>) -> Reply<pb::Workspace> {
        let caller = auth::caller(&req)?;
        let r = req.get_ref();
        let ws = self
            .manager
            .stop_workspace(caller, &r.id, r.force)
            .await
            .map_err(status)?;
        Ok(Response::new(self.view(ws)))
    }

    async fn delete_workspace(
        &self,
        req: Request<pb::DeleteWorkspaceRequest>,
    ) -> Reply<pb::DeleteWorkspaceResponse> {
        let caller = auth::caller(&req)?;
        let r = req.get_ref();
        self.manager
            .delete_workspace(caller, &r.id, r.force)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteWorkspaceResponse {}))
    }

    async fn update_workspace(
        &self,
        req: Request<pb::UpdateWorkspaceRequest>,
    ) -> Reply<pb::Workspace> {
        let caller = auth::caller(&req)?;
        let r = req.into_inner();
        let hw = HardwareRequest {
            cpu_kind: r.cpu_kind,
            cpus: r.cpus,
            memory_mb: r.memory_mb,
            volume_size_gb: r.volume_size_gb,
            gpu_kind: r.gpu_kind,
        };
        let ws = self
            .manager
            .update_workspace(caller, &r.id, &hw, r.idle_timeout.as_deref())
            .await
            .map_err(status)?;
        Ok(Response::new(self.view(ws)))
    }

    type ExecStream = ByteStream<pb::TaskOutput>;

    async fn exec(&self, req: Request<pb::ExecRequest>) -> Reply<Self::ExecStream> {
        let caller = auth::caller(&req)?;
        let r = req.into_inner();
        let mut env: Vec<(String, String)> = r.env.into_iter().collect();
        env.sort();
        let spec = ExecSpec {
            workspace: r.workspace_id,
            argv: r.argv,
            env,
            workdir: r.workdir,
        };
        let (task, rx) = self.manager.exec(caller, &spec).await.map_err(status)?;
        let first = pb::TaskOutput {
            task_id: task.id.clone(),
            state: task.state.clone(),
            ..Default::default()
        };
        if r.detach {
            return Ok(Response::new(Box::pin(tokio_stream::iter([Ok(first)]))));
        }
        Ok(Response::new(follow_frames(
            task.id,
            vec![first],
            Vec::new(),
            Some(rx),
        )))
    }

    async fn list_tasks(&self, req: Request<pb::ListTasksRequest>) -> Reply<pb::ListTasksResponse> {
        let caller = auth::caller(&req)?;
        let r = req.get_ref();
        let ws = (!r.workspace_id.is_empty()).then_some(r.workspace_id.as_str());
        let tasks = self.manager.list_tasks(caller, ws).map_err(status)?;
        Ok(Response::new(pb::ListTasksResponse {
            tasks: tasks.into_iter().map(task_to_pb).collect(),
        }))
    }

    type TaskLogsStream = ByteStream<pb::TaskOutput>;

    async fn task_logs(&self, req: Request<pb::TaskLogsRequest>) -> Reply<Self::TaskLogsStream> {
        let caller = auth::caller(&req)?;
        let r = req.get_ref();
        let (task, mut reader) = self
            .manager
            .task_logs(caller, &r.task_id, r.follow)
            .map_err(status)?;
        // A few chunks in flight at most: the reader reads on only as the client takes them.
        let (tx, out) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            loop {
                match reader.next().await {
                    Ok(Some(frames)) => {
                        for f in frames {
                            if let Some(m) = frame_to_pb(&task.id, f) {
                                if tx.send(Ok(m)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                }
            }
            // Followed to its end: how it ended; otherwise the task as recorded.
            let last = match reader.end() {
                Some((state, exit_code)) => pb::TaskOutput {
                    task_id: task.id.clone(),
                    exit_code,
                    state: state.to_owned(),
                    ..Default::default()
                },
                None => pb::TaskOutput {
                    task_id: task.id.clone(),
                    exit_code: task.exit_code,
                    state: task.state.clone(),
                    ..Default::default()
                },
            };
            let _ = tx.send(Ok(last)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn cancel_task(&self, req: Request<pb::CancelTaskRequest>) -> Reply<pb::Task> {
        let caller = auth::caller(&req)?;
        let task = self
            .manager
            .cancel_task(caller, &req.get_ref().task_id)
            .map_err(status)?;
        Ok(Response::new(task_to_pb(task)))
    }

    type WatchWorkspacesStream = ByteStream<pb::WorkspaceEvent>;

    async fn watch_workspaces(
        &self,
        req: Request<pb::WatchWorkspacesRequest>,
    ) -> Reply<Self::WatchWorkspacesStream> {
        let caller = auth::caller(&req)?;
        let r = req.into_inner();
        // Subscribe before the snapshot, so no change falls between them.
        let mut changes = self.manager.subscribe();
        let project = (!r.project.is_empty()).then_some(r.project.as_str());
        let mut snapshot = self
            .manager
            .list_workspaces(caller, None, project)
            .map_err(status)?;
        let only = if r.workspace_id.is_empty() {
            None
        } else {
            let ws = self
                .manager
                .get_workspace(caller, &r.workspace_id)
                .map_err(status)?;
            snapshot.retain(|w| w.id == ws.id);
            Some(ws.id)
        };
        let project_id = snapshot_project(&self.manager, caller, project)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let manager = Arc::clone(&self.manager);
        tokio::spawn(async move {
            let event = |seq, kind: pb::workspace_event::Kind, ws: Option<pb::Workspace>| {
                Ok(pb::WorkspaceEvent {
                    seq,
                    kind: kind as i32,
                    workspace: ws,
                })
            };
            for ws in snapshot {
                let rt = manager.runtime(&ws);
                let seq = manager.next_seq();
                let e = event(
                    seq,
                    pb::workspace_event::Kind::Snapshot,
                    Some(workspace_to_pb(ws, rt)),
                );
                if tx.send(e).await.is_err() {
                    return;
                }
            }
            let seq = manager.next_seq();
            if tx
                .send(event(seq, pb::workspace_event::Kind::SnapshotEnd, None))
                .await
                .is_err()
            {
                return;
            }
            loop {
                let change = match changes.recv().await {
                    Ok(c) => c,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "this watcher fell {n} events behind; watch again"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let ws = change.workspace;
                let visible = (caller.admin || ws.owner_uid == caller.uid)
                    && only.as_ref().is_none_or(|id| *id == ws.id)
                    && project_id.as_ref().is_none_or(|p| *p == ws.project_id);
                if !visible {
                    continue;
                }
                let kind = match change.kind {
                    ChangeKind::Changed => pb::workspace_event::Kind::Changed,
                    ChangeKind::Deleted => pb::workspace_event::Kind::Deleted,
                };
                let rt = manager.runtime(&ws);
                if tx
                    .send(event(change.seq, kind, Some(workspace_to_pb(ws, rt))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_console_log(
        &self,
        req: Request<pb::GetConsoleLogRequest>,
    ) -> Reply<pb::ConsoleLog> {
        let caller = auth::caller(&req)?;
        let r = req.into_inner();
        let max = match r.max_bytes as usize {
            0 => 64 * 1024,
            n if n <= crate::files::MAX_LOG_READ => n,
            n => {
                let e = Error::invalid(format!(
                    "max_bytes {n} is too large: a console log read returns at most {} bytes (1 MiB)",
                    crate::files::MAX_LOG_READ
                ));
                return Err(status(e));
            }
        };
        let manager = Arc::clone(&self.manager);
        let data = tokio::task::spawn_blocking(move || manager.console_log(caller, &r.id, max))
            .await
            .map_err(|e| Status::internal(format!("cannot read the console log: {e}")))?
            .map_err(status)?;
        Ok(Response::new(pb::ConsoleLog { data }))
    }

    type TunnelStream = ByteStream<pb::TunnelResponse>;

    async fn tunnel(
        &self,
        req: Request<tonic::Streaming<pb::TunnelRequest>>,
    ) -> Reply<Self::TunnelStream> {
        use pb::tunnel_request::Msg;

        let caller = auth::caller(&req)?;
        let mut incoming = req.into_inner();
        let open = match incoming.message().await? {
            Some(pb::TunnelRequest {
                msg: Some(Msg::Open(open)),
            }) => open,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first tunnel message must be `open` (workspace id and port)",
                ))
            }
            None => {
                return Err(Status::invalid_argument(
                    "the tunnel request stream ended before `open`",
                ))
            }
        };
        let port = tunnel::port(open.port).map_err(status)?;
        let (id, addr) = self
            .manager
            .tunnel_target(caller, &open.workspace_id, port)
            .map_err(status)?;
        let guest = tunnel::connect(addr).await.map_err(|e| {
            Status::unavailable(format!(
                "cannot connect to port {port} of workspace {id} ({addr}): {e}"
            ))
        })?;
        let guard = self.manager.connections.open(&id);
        tracing::info!(workspace = %id, port, "tunnel opened");
        let from_client = incoming.filter_map(|r| match r {
            Ok(pb::TunnelRequest {
                msg: Some(Msg::Data(data)),
            }) => Some(Ok(data)),
            Ok(pb::TunnelRequest { msg: None }) => None,
            Ok(pb::TunnelRequest {
                msg: Some(Msg::Open(_)),
            }) => Some(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the tunnel is already open",
            ))),
            Err(s) => Some(Err(std::io::Error::other(format!(
                "client stream: {}",
                s.message()
            )))),
        });
        let to_client = ReceiverStream::new(tunnel::spawn(guard, guest, from_client)).map(|r| {
            r.map(|data| pb::TunnelResponse { data })
                .map_err(|e| Status::unavailable(format!("tunnel: {e}")))
        });
        Ok(Response::new(Box::pin(to_client)))
    }

    async fn import_image(
        &self,
        req: Request<tonic::Streaming<pb::ImportImageRequest>>,
    ) -> Reply<pb::Image> {
        let caller = auth::caller(&req)?;
        let mut stream = req.into_inner();
        let header = receive_image_header(&mut stream).await?;
        // The name is reserved before anything is written: a concurrent import of it is
        // refused here, at once. Dropping `upload` (on any error below, or a cancelled
        // request) removes its staging dir and frees the name.
        let upload = self
            .manager
            .begin_image_import(
                caller,
                &header.name,
                header.boot_mode,
                header.cmdline,
                header.source_name,
            )
            .map_err(status)?;
        let manager = &self.manager;
        receive_image_parts(&mut stream, &upload.dir, |total| {
            manager.check_upload(caller, total).map_err(status)
        })
        .await?;
        let image = self.manager.import_image(upload).await.map_err(status)?;
        Ok(Response::new(image_to_pb(&image)))
    }

    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Reply<pb::ListImagesResponse> {
        let caller = auth::caller(&req)?;
        let images = self.manager.list_images(caller).map_err(status)?;
        Ok(Response::new(pb::ListImagesResponse {
            images: images.iter().map(image_to_pb).collect(),
        }))
    }

    async fn delete_image(
        &self,
        req: Request<pb::DeleteImageRequest>,
    ) -> Reply<pb::DeleteImageResponse> {
        let caller = auth::caller(&req)?;
        self.manager
            .delete_image(caller, &req.get_ref().name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteImageResponse {}))
    }
}

fn task_to_pb(t: TaskRow) -> pb::Task {
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

fn frame_to_pb(task_id: &str, f: Frame) -> Option<pb::TaskOutput> {
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

/// `head`, then the frames from `rx` until the task ends, then `tail`.
fn follow_frames(
    task_id: String,
    head: Vec<pb::TaskOutput>,
    tail: Vec<pb::TaskOutput>,
    rx: Option<tokio::sync::broadcast::Receiver<Frame>>,
) -> ByteStream<pb::TaskOutput> {
    let (tx, out) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        for m in head {
            if tx.send(Ok(m)).await.is_err() {
                return;
            }
        }
        if let Some(mut rx) = rx {
            loop {
                match rx.recv().await {
                    Ok(f) => {
                        let end = matches!(f, Frame::End { .. });
                        if let Some(m) = frame_to_pb(&task_id, f) {
                            if tx.send(Ok(m)).await.is_err() {
                                return;
                            }
                        }
                        if end {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "missed {n} output chunks; the task log has them all"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        }
        for m in tail {
            if tx.send(Ok(m)).await.is_err() {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))
}

/// The project id a watch is filtered to, if any.
fn snapshot_project(
    manager: &Manager,
    caller: Caller,
    project: Option<&str>,
) -> Result<Option<crate::model::ProjectId>, Status> {
    match project {
        Some(p) => Ok(Some(manager.get_project(caller, p).map_err(status)?.id)),
        None => Ok(None),
    }
}

fn boot_mode_to_pb(m: BootMode) -> pb::BootMode {
    match m {
        BootMode::Bios => pb::BootMode::Bios,
        BootMode::Uefi => pb::BootMode::Uefi,
        BootMode::Kernel => pb::BootMode::Kernel,
    }
}

fn image_to_pb(i: &Image) -> pb::Image {
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

/// The header of an image upload, checked.
struct ImageHeader {
    name: String,
    boot_mode: Option<BootMode>,
    cmdline: String,
    source_name: String,
}

/// Reads the first message of an image upload, which must be its header.
async fn receive_image_header(
    stream: &mut tonic::Streaming<pb::ImportImageRequest>,
) -> Result<ImageHeader, Status> {
    use pb::import_image_request::Part;

    let header = match stream.message().await? {
        Some(pb::ImportImageRequest {
            part: Some(Part::Header(h)),
        }) => h,
        _ => {
            return Err(Status::invalid_argument(
                "the first message must be the image header",
            ))
        }
    };
    let boot_mode = match pb::BootMode::try_from(header.boot_mode) {
        Ok(pb::BootMode::Unspecified) => None,
        Ok(pb::BootMode::Bios) => Some(BootMode::Bios),
        Ok(pb::BootMode::Uefi) => Some(BootMode::Uefi),
        Ok(pb::BootMode::Kernel) => Some(BootMode::Kernel),
        Err(_) => return Err(Status::invalid_argument("invalid boot mode")),
    };
    Ok(ImageHeader {
        name: header.name,
        boot_mode,
        cmdline: header.cmdline,
        source_name: header.source_name,
    })
}

/// Writes the parts after the header to `dir` (`kernel`, `initrd`, `disk`), enforcing the
/// order kernel, initrd, disk; `allowed(total bytes so far)` refuses an upload grown too big.
async fn receive_image_parts(
    stream: &mut tonic::Streaming<pb::ImportImageRequest>,
    dir: &std::path::Path,
    allowed: impl Fn(u64) -> Result<(), Status>,
) -> Result<(), Status> {
    use pb::import_image_request::Part;
    use tokio::io::AsyncWriteExt;

    let mut stage = 0; // 1 kernel, 2 initrd, 3 disk
    let mut file: Option<tokio::fs::File> = None;
    let mut total: u64 = 0;
    while let Some(msg) = stream.message().await? {
        let (want, name, data) = match msg.part {
            Some(Part::Kernel(d)) => (1, "kernel", d),
            Some(Part::Initrd(d)) => (2, "initrd", d),
            Some(Part::Disk(d)) => (3, "disk", d),
            Some(Part::Header(_)) | None => {
                return Err(Status::invalid_argument("only one header is allowed"))
            }
        };
        if want < stage {
            return Err(Status::invalid_argument(
                "image parts must come in the order kernel, initrd, disk",
            ));
        }
        total = total.saturating_add(data.len() as u64);
        allowed(total)?;
        if want > stage {
            if let Some(mut f) = file.take() {
                f.flush()
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?;
            }
            stage = want;
            file = Some(
                tokio::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(dir.join(name))
                    .await
                    .map_err(|e| Status::internal(format!("cannot store upload: {e}")))?,
            );
        }
        if let Some(f) = file.as_mut() {
            f.write_all(&data)
                .await
                .map_err(|e| Status::internal(format!("cannot store upload: {e}")))?;
        }
    }
    if let Some(mut f) = file.take() {
        f.flush()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        f.sync_all()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
    }
    Ok(())
}
