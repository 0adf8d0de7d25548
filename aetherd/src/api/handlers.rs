//! The gRPC handlers: `impl Aether for Service`, one method per RPC. Each checks the
//! caller, converts the request to the core's types, calls the [`Manager`] and converts
//! what it returns (streams are built in `streams`, uploads read in `upload`).

use std::sync::Arc;

use aether_proto::v1 as pb;
use aether_proto::v1::aether_server::Aether;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::model::HardwareRequest;
use crate::tunnel;
use crate::workspace::ops::tasks::ExecSpec;
use crate::workspace::ops::CreateWorkspace;

use super::auth;
use super::convert::{image_to_pb, project_to_pb, state_from_pb, task_to_pb};
use super::status::status;
use super::streams::{follow_frames, snapshot_project, task_log_stream, watch_stream, ByteStream};
use super::upload::{receive_image_header, receive_image_parts};
use super::Service;

type Reply<T> = Result<Response<T>, Status>;

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
        let (task, reader) = self
            .manager
            .task_logs(caller, &r.task_id, r.follow)
            .map_err(status)?;
        Ok(Response::new(task_log_stream(task, reader)))
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
        let changes = self.manager.subscribe();
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
        Ok(Response::new(watch_stream(
            Arc::clone(&self.manager),
            caller,
            changes,
            snapshot,
            only,
            project_id,
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
            .map_err(|e| status(Error::Internal(format!("cannot read the console log: {e}"))))?
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
                return Err(status(Error::invalid(
                    "the first tunnel message must be `open` (workspace id and port)",
                )))
            }
            None => {
                return Err(status(Error::invalid(
                    "the tunnel request stream ended before `open`",
                )))
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
