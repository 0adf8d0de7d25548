//! The gRPC service. Protobuf types stay in this module: requests are converted to the core's
//! validated types on the way in, core types to protobuf on the way out, and errors to a
//! `Status` in exactly one place ([`status()`], which `?` uses through `From`).
//!
//! Here: [`Service`] and what the rest of the daemon uses of the API. The parts: `auth` (who
//! may call), `handlers` (one method per RPC), `convert` (core types ↔ protobuf), `status`
//! (the error → `Status` mapping), `streams` (exec output, task logs, watches) and `upload`
//! (the image upload protocol).

mod auth;
mod convert;
mod handlers;
mod status;
mod streams;
mod upload;

pub use auth::GROUP;
pub use status::status;

use std::sync::Arc;

use aether_proto::v1 as pb;

use crate::daemon::Daemon;
use crate::store::Workspace;

use convert::workspace_to_pb;

pub use aether_proto::v1::aether_server::AetherServer;

pub struct Service {
    daemon: Arc<Daemon>,
}

impl Service {
    pub fn new(daemon: Arc<Daemon>) -> Self {
        Self { daemon }
    }

    fn view(&self, ws: Workspace) -> pb::Workspace {
        let rt = self.daemon.workspaces.runtime(&ws);
        workspace_to_pb(ws, rt)
    }
}
