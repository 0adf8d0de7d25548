//! The JSON calls of `ui/API.md`: each is one daemon RPC made as the user, its answer in the
//! shape `aether -o json` prints, its error the daemon's own words.

use aether_proto::v1 as pb;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::Shared;
use crate::{identity, output, task};

/// Console text sent to the page: the newest 64 KiB.
const CONSOLE_BYTES: u32 = 64 * 1024;
/// Task output sent to the page: the newest 256 KiB.
const TASK_LOG_BYTES: usize = 256 * 1024;

/// A failed call: an HTTP status and the daemon's message.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let (status, code) = match s.code() {
            Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_argument"),
            Code::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
            Code::AlreadyExists => (StatusCode::CONFLICT, "already_exists"),
            Code::FailedPrecondition => (StatusCode::CONFLICT, "failed_precondition"),
            Code::Aborted => (StatusCode::CONFLICT, "aborted"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError {
            status,
            code,
            message: s.message().to_owned(),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: format!("{e:#}"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": self.message, "code": self.code })),
        )
            .into_response()
    }
}

type Answer = Result<Json<Value>, ApiError>;

pub async fn session(State(s): State<Shared>) -> Answer {
    let host = s
        .client
        .clone()
        .get_host_info(pb::GetHostInfoRequest {})
        .await?
        .into_inner();
    Ok(Json(json!({
        "login_user": identity::login_user(),
        "version": env!("CARGO_PKG_VERSION"),
        "daemon_version": host.version,
    })))
}

pub async fn projects(State(s): State<Shared>) -> Answer {
    let list = s
        .client
        .clone()
        .list_projects(pb::ListProjectsRequest {})
        .await?
        .into_inner()
        .projects;
    Ok(Json(list.iter().map(output::project_json).collect()))
}

pub async fn images(State(s): State<Shared>) -> Answer {
    let list = s
        .client
        .clone()
        .list_images(pb::ListImagesRequest {})
        .await?
        .into_inner()
        .images;
    Ok(Json(list.iter().map(output::image_json).collect()))
}

pub async fn workspaces(State(s): State<Shared>) -> Answer {
    let list = s
        .client
        .clone()
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await?
        .into_inner()
        .workspaces;
    Ok(Json(list.iter().map(output::workspace_json).collect()))
}

pub async fn workspace(State(s): State<Shared>, Path(id): Path<String>) -> Answer {
    let w = s
        .client
        .clone()
        .get_workspace(pb::GetWorkspaceRequest { id })
        .await?
        .into_inner();
    Ok(Json(output::workspace_json(&w)))
}

/// The create form. Nothing is checked here: the daemon's rules and words apply.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    project: String,
    #[serde(default)]
    image: String,
    cpus: Option<u32>,
    memory_mb: Option<u32>,
    volume_size_gb: Option<u32>,
    cpu_kind: Option<String>,
    gpu_kind: Option<String>,
    idle_timeout: Option<String>,
}

pub async fn create(
    State(s): State<Shared>,
    Json(b): Json<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let key = identity::find_or_create(&s.config_dir)?.public_key;
    let w = s
        .client
        .clone()
        .create_workspace(pb::CreateWorkspaceRequest {
            project: b.project,
            cpu_kind: b.cpu_kind,
            cpus: b.cpus,
            memory_mb: b.memory_mb,
            volume_size_gb: b.volume_size_gb,
            gpu_kind: b.gpu_kind,
            image: b.image,
            login_user: identity::login_user(),
            ssh_authorized_keys: vec![key],
            idle_timeout: b.idle_timeout,
        })
        .await?
        .into_inner();
    Ok((StatusCode::CREATED, Json(output::workspace_json(&w))))
}

pub async fn start(State(s): State<Shared>, Path(id): Path<String>) -> Answer {
    let w = s
        .client
        .clone()
        .start_workspace(pb::StartWorkspaceRequest { id })
        .await?
        .into_inner();
    Ok(Json(output::workspace_json(&w)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StopBody {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    suspend: bool,
}

pub async fn stop(
    State(s): State<Shared>,
    Path(id): Path<String>,
    body: Option<Json<StopBody>>,
) -> Answer {
    let Json(StopBody { force, suspend }) = body.unwrap_or_default();
    let w = s
        .client
        .clone()
        .stop_workspace(pb::StopWorkspaceRequest { id, force, suspend })
        .await?
        .into_inner();
    Ok(Json(output::workspace_json(&w)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

pub async fn delete(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    s.client
        .clone()
        .delete_workspace(pb::DeleteWorkspaceRequest { id, force: q.force })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn text(body: Vec<u8>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        String::from_utf8_lossy(&body).into_owned(),
    )
        .into_response()
}

pub async fn console(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let log = s
        .client
        .clone()
        .get_console_log(pb::GetConsoleLogRequest {
            id,
            max_bytes: CONSOLE_BYTES,
        })
        .await?
        .into_inner();
    Ok(text(log.data))
}

pub async fn tasks(State(s): State<Shared>, Path(id): Path<String>) -> Answer {
    let list = s
        .client
        .clone()
        .list_tasks(pb::ListTasksRequest { workspace_id: id })
        .await?
        .into_inner()
        .tasks;
    Ok(Json(list.iter().map(task::task_json).collect()))
}

/// Appends `more` and keeps the newest `limit` bytes.
fn keep_tail(buf: &mut Vec<u8>, more: &[u8], limit: usize) {
    buf.extend_from_slice(more);
    if buf.len() > limit {
        buf.drain(..buf.len() - limit);
    }
}

pub async fn task_log(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let mut stream = s
        .client
        .clone()
        .task_logs(pb::TaskLogsRequest {
            task_id: id,
            follow: false,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        keep_tail(&mut out, &m.stdout, TASK_LOG_BYTES);
        keep_tail(&mut out, &m.stderr, TASK_LOG_BYTES);
    }
    Ok(text(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_log_keeps_only_its_newest_bytes() {
        let mut b = Vec::new();
        keep_tail(&mut b, b"abcdef", 4);
        assert_eq!(b, b"cdef");
        keep_tail(&mut b, b"gh", 4);
        assert_eq!(b, b"efgh");
    }

    #[test]
    fn daemon_errors_keep_their_words_and_get_a_fitting_status() {
        let e = ApiError::from(tonic::Status::invalid_argument(
            "memory_mb must be 256-16384",
        ));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.message, "memory_mb must be 256-16384");
        let e = ApiError::from(tonic::Status::failed_precondition("is running"));
        assert_eq!(e.status, StatusCode::CONFLICT);
    }
}
