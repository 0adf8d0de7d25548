//! The gRPC handlers: `impl Aether for Service`, one method per RPC. Each checks the
//! caller, converts the request to the core's types, calls the part of the [`Daemon`](crate::daemon::Daemon) it is for and converts
//! what it returns (streams are built in `streams`, uploads read in `upload`).

use std::sync::Arc;

use aether_proto::v1 as pb;
use aether_proto::v1::aether_server::Aether;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::model::HardwareRequest;
use crate::tasks::ExecSpec;
use crate::tunnel;
use crate::workspace::{CreateWorkspace, StopHow};

use super::auth;
use super::convert::{
    catalog_entry_to_pb, check_to_pb, image_to_pb, project_to_pb, state_from_pb, task_to_pb,
};
use super::streams::{follow_frames, snapshot_project, task_log_stream, watch_stream, ByteStream};
use super::upload::{receive_image_header, receive_image_parts};
use super::Service;

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Aether for Service {
    async fn get_host_info(&self, req: Request<pb::GetHostInfoRequest>) -> Reply<pb::HostInfo> {
        auth::caller(&req)?;
        let h = self.daemon.host_info().await?;
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

    async fn check_host(&self, req: Request<pb::CheckHostRequest>) -> Reply<pb::CheckHostResponse> {
        auth::caller(&req)?;
        let checks = self.daemon.check_host().await;
        Ok(Response::new(pb::CheckHostResponse {
            checks: checks.into_iter().map(check_to_pb).collect(),
        }))
    }

    async fn create_project(&self, req: Request<pb::CreateProjectRequest>) -> Reply<pb::Project> {
        let caller = auth::caller(&req)?;
        let p = self.daemon.projects.create(caller, &req.get_ref().name)?;
        Ok(Response::new(project_to_pb(p)))
    }

    async fn list_projects(
        &self,
        req: Request<pb::ListProjectsRequest>,
    ) -> Reply<pb::ListProjectsResponse> {
        let caller = auth::caller(&req)?;
        let projects = self.daemon.projects.list(caller)?;
        Ok(Response::new(pb::ListProjectsResponse {
            projects: projects.into_iter().map(project_to_pb).collect(),
        }))
    }

    async fn get_project(&self, req: Request<pb::GetProjectRequest>) -> Reply<pb::Project> {
        let caller = auth::caller(&req)?;
        let p = self.daemon.projects.get(caller, &req.get_ref().project)?;
        Ok(Response::new(project_to_pb(p)))
    }

    async fn delete_project(
        &self,
        req: Request<pb::DeleteProjectRequest>,
    ) -> Reply<pb::DeleteProjectResponse> {
        let caller = auth::caller(&req)?;
        self.daemon
            .projects
            .delete(caller, &req.get_ref().project)?;
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
        let ws = self.daemon.workspaces.create(caller, &create).await?;
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
        let list = self.daemon.workspaces.list(caller, state, project)?;
        Ok(Response::new(pb::ListWorkspacesResponse {
            workspaces: list.into_iter().map(|w| self.view(w)).collect(),
        }))
    }

    async fn get_workspace(&self, req: Request<pb::GetWorkspaceRequest>) -> Reply<pb::Workspace> {
        let caller = auth::caller(&req)?;
        let ws = self.daemon.workspaces.get(caller, &req.get_ref().id)?;
        Ok(Response::new(self.view(ws)))
    }

    async fn start_workspace(
        &self,
        req: Request<pb::StartWorkspaceRequest>,
    ) -> Reply<pb::Workspace> {
        let caller = auth::caller(&req)?;
        let ws = self
            .daemon
            .workspaces
            .start(caller, &req.get_ref().id)
            .await?;
        Ok(Response::new(self.view(ws)))
    }

    async fn stop_workspace(&self, req: Request<pb::StopWorkspaceRequest>) -> Reply<pb::Workspace> {
        let caller = auth::caller(&req)?;
        let r = req.get_ref();
        let how = match (r.force, r.suspend) {
            (false, false) => StopHow::Graceful,
            (false, true) => StopHow::Suspend,
            (true, false) => StopHow::Force,
            (true, true) => {
                return Err(Status::invalid_argument(
                    "force and suspend exclude each other: a forced stop powers off without saving memory",
                ))
            }
        };
        let ws = self.daemon.workspaces.stop(caller, &r.id, how).await?;
        Ok(Response::new(self.view(ws)))
    }

    async fn delete_workspace(
        &self,
        req: Request<pb::DeleteWorkspaceRequest>,
    ) -> Reply<pb::DeleteWorkspaceResponse> {
        let caller = auth::caller(&req)?;
        let r = req.get_ref();
        self.daemon
            .workspaces
            .delete(caller, &r.id, r.force)
            .await?;
        Ok(Response::new(pb::DeleteWorkspaceResponse {}))
    }

    async fn snapshot_workspace(
        &self,
        req: Request<pb::SnapshotWorkspaceRequest>,
    ) -> Reply<pb::SnapshotList> {
        use crate::images::snapshots::SnapshotName;
        use crate::workspace::snapshot::SnapshotOp;
        use pb::snapshot_workspace_request::Op;
        let caller = auth::caller(&req)?;
        let r = req.into_inner();
        let name = || SnapshotName::parse(&r.name);
        let op = match Op::try_from(r.op) {
            Ok(Op::List) => SnapshotOp::List,
            Ok(Op::Create) => SnapshotOp::Create(name()?),
            Ok(Op::Restore) => SnapshotOp::Restore(name()?),
            Ok(Op::Delete) => SnapshotOp::Delete(name()?),
            Ok(Op::Unspecified) | Err(_) => {
                return Err(Error::invalid("op must be list, create, restore or delete").into())
            }
        };
        let list = self
            .daemon
            .workspaces
            .snapshot(caller, &r.workspace_id, op, r.force)
            .await?;
        Ok(Response::new(pb::SnapshotList {
            snapshots: list
                .into_iter()
                .map(|s| pb::Snapshot {
                    name: s.name,
                    created_at: s.created_at,
                })
                .collect(),
        }))
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
            .daemon
            .workspaces
            .update(caller, &r.id, &hw, r.idle_timeout.as_deref())
            .await?;
        Ok(Response::new(self.view(ws)))
    }

    type ExecStream = ByteStream<pb::TaskOutput>;

    async fn exec(&self, req: Request<pb::ExecRequest>) -> Reply<Self::ExecStream> {
        let caller = auth::caller(&req)?;
        let r = req.into_inner();
        let mut env: Vec<(String, String)> = r.env.into_iter().collect();
        env.sort();
        let spec = ExecSpec {
            argv: r.argv,
            env,
            workdir: r.workdir,
        };
        // Bad input is refused before the workspace is looked at.
        let remote = crate::tasks::command::remote_command(&spec)?;
        let (ws, ip) = self
            .daemon
            .workspaces
            .running_with_address(caller, &r.workspace_id)?;
        let (task, rx) = self
            .daemon
            .tasks
            .exec(caller, &ws, ip, &spec, &remote)
            .await?;
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
        let ws = match r.workspace_id.as_str() {
            "" => None,
            id => Some(self.daemon.workspaces.get(caller, id)?.id),
        };
        let tasks = self.daemon.tasks.list(caller, ws.as_ref())?;
        Ok(Response::new(pb::ListTasksResponse {
            tasks: tasks.into_iter().map(task_to_pb).collect(),
        }))
    }

    type TaskLogsStream = ByteStream<pb::TaskOutput>;

    async fn task_logs(&self, req: Request<pb::TaskLogsRequest>) -> Reply<Self::TaskLogsStream> {
        let caller = auth::caller(&req)?;
        let r = req.get_ref();
        let (task, reader) = self.daemon.tasks.logs(caller, &r.task_id, r.follow)?;
        Ok(Response::new(task_log_stream(task, reader)))
    }

    async fn cancel_task(&self, req: Request<pb::CancelTaskRequest>) -> Reply<pb::Task> {
        let caller = auth::caller(&req)?;
        let task = self.daemon.tasks.cancel(caller, &req.get_ref().task_id)?;
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
        let changes = self.daemon.feed.subscribe();
        let project = (!r.project.is_empty()).then_some(r.project.as_str());
        let mut snapshot = self.daemon.workspaces.list(caller, None, project)?;
        let only = if r.workspace_id.is_empty() {
            None
        } else {
            let ws = self.daemon.workspaces.get(caller, &r.workspace_id)?;
            snapshot.retain(|w| w.id == ws.id);
            Some(ws.id)
        };
        let project_id = snapshot_project(&self.daemon.projects, caller, project)?;
        Ok(Response::new(watch_stream(
            Arc::clone(&self.daemon),
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
                return Err(e.into());
            }
        };
        let daemon = Arc::clone(&self.daemon);
        let data =
            tokio::task::spawn_blocking(move || daemon.workspaces.console_log(caller, &r.id, max))
                .await
                .map_err(|e| Error::Internal(format!("cannot read the console log: {e}")))??;
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
                return Err(Status::from(Error::invalid(
                    "the first tunnel message must be `open` (workspace id and port)",
                )))
            }
            None => {
                return Err(Status::from(Error::invalid(
                    "the tunnel request stream ended before `open`",
                )))
            }
        };
        let port = tunnel::port(open.port)?;
        let (id, addr) = self
            .daemon
            .workspaces
            .tunnel_target(caller, &open.workspace_id, port)?;
        let guest = tunnel::connect(addr).await.map_err(|e| {
            Status::unavailable(format!(
                "cannot connect to port {port} of workspace {id} ({addr}): {e}"
            ))
        })?;
        let guard = self.daemon.connections.open(&id);
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

    type TerminalStream = ByteStream<pb::TerminalResponse>;

    async fn terminal(
        &self,
        req: Request<tonic::Streaming<pb::TerminalRequest>>,
    ) -> Reply<Self::TerminalStream> {
        use crate::terminal::{self, Input, Output, Size, TermSpec};
        use pb::terminal_request::Msg;

        let caller = auth::caller(&req)?;
        let mut incoming = req.into_inner();
        let open = match incoming.message().await? {
            Some(pb::TerminalRequest {
                msg: Some(Msg::Open(open)),
            }) => open,
            Some(_) => {
                return Err(Status::from(Error::invalid(
                    "the first terminal message must be `open`",
                )))
            }
            None => {
                return Err(Status::from(Error::invalid(
                    "the terminal request stream ended before `open`",
                )))
            }
        };
        let mut env: Vec<(String, String)> = open.env.into_iter().collect();
        env.sort();
        let exec = ExecSpec {
            argv: open.argv,
            env,
            workdir: open.workdir,
        };
        // Bad input is refused before the workspace is looked at.
        let spec = TermSpec::new(&exec, &open.term, open.size.map(|s| (s.cols, s.rows)))?;
        let (ws, addr) = self.daemon.workspaces.connection_target(
            caller,
            &open.workspace_id,
            tunnel::DEFAULT_PORT,
        )?;
        let guard = self.daemon.connections.open(&ws.id);
        let term = terminal::open(
            terminal::Login {
                key: self.daemon.guest.key(),
                user: &ws.login_user,
                host_key: &ws.ssh_host_public_key,
                addr,
            },
            &spec,
        )
        .await
        .map_err(|e| Status::from(Error::Unavailable(format!("workspace {}: {e}", ws.id))))?;
        tracing::info!(workspace = %ws.id, "terminal opened");
        let from_client = incoming.filter_map(|r| {
            let bad = |m: &str| {
                Some(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    m,
                )))
            };
            match r {
                Ok(pb::TerminalRequest {
                    msg: Some(Msg::Input(data)),
                }) if data.len() > terminal::MAX_INPUT => bad("a keystroke message over 64 KiB"),
                Ok(pb::TerminalRequest {
                    msg: Some(Msg::Input(data)),
                }) => Some(Ok(Input::Data(data))),
                Ok(pb::TerminalRequest {
                    msg: Some(Msg::Resize(s)),
                }) => match Size::new(Some((s.cols, s.rows))) {
                    Ok(size) => Some(Ok(Input::Resize(size))),
                    Err(e) => Some(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        e.to_string(),
                    ))),
                },
                Ok(pb::TerminalRequest { msg: None }) => None,
                Ok(pb::TerminalRequest {
                    msg: Some(Msg::Open(_)),
                }) => bad("the terminal is already open"),
                Err(s) => Some(Err(std::io::Error::other(format!(
                    "client stream: {}",
                    s.message()
                )))),
            }
        });
        let id = ws.id.clone();
        let to_client =
            ReceiverStream::new(terminal::spawn(guard, term, from_client)).map(move |r| match r {
                Ok(Output::Data(output)) => Ok(pb::TerminalResponse {
                    output,
                    exit_code: None,
                }),
                Ok(Output::Exit(code)) => Ok(pb::TerminalResponse {
                    output: Vec::new(),
                    exit_code: Some(code),
                }),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                    Err(Status::invalid_argument(format!("terminal: {e}")))
                }
                Err(e) => Err(Status::unavailable(format!("terminal of {id}: {e}"))),
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
        let upload = self.daemon.images.begin_import(
            caller,
            &header.name,
            header.boot_mode,
            header.cmdline,
            header.source_name,
        )?;
        let images = &self.daemon.images;
        receive_image_parts(&mut stream, &upload.dir, |total| {
            Ok(images.check_upload(caller, total)?)
        })
        .await?;
        let image = self.daemon.images.import(upload).await?;
        Ok(Response::new(image_to_pb(&image)))
    }

    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Reply<pb::ListImagesResponse> {
        let caller = auth::caller(&req)?;
        let images = self.daemon.images.list(caller)?;
        Ok(Response::new(pb::ListImagesResponse {
            images: images.iter().map(image_to_pb).collect(),
        }))
    }

    async fn list_catalog(
        &self,
        req: Request<pb::ListCatalogRequest>,
    ) -> Reply<pb::ListCatalogResponse> {
        auth::caller(&req)?;
        Ok(Response::new(pb::ListCatalogResponse {
            entries: self
                .daemon
                .images
                .catalog()
                .into_iter()
                .map(catalog_entry_to_pb)
                .collect(),
        }))
    }

    async fn delete_image(
        &self,
        req: Request<pb::DeleteImageRequest>,
    ) -> Reply<pb::DeleteImageResponse> {
        let caller = auth::caller(&req)?;
        self.daemon
            .images
            .delete(caller, &req.get_ref().name)
            .await?;
        Ok(Response::new(pb::DeleteImageResponse {}))
    }
}
