//! Start-up and serving: state dir, database, libvirt, reconcile, then the Unix socket.
//!
//! The socket is created with mode 0660 (group `aether` when that group exists). A socket
//! file left by a dead daemon is replaced; one that a live daemon still answers on is not.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::api::{AetherServer, Service};
use crate::config::Config;
use crate::daemon::Daemon;
use crate::hypervisor::Hypervisor;
use crate::store::Store;

/// Runs the daemon until SIGINT/SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Claim the socket before touching anything, so a second daemon does no harm.
    let listener = bind_socket(&config.socket)?;
    // (0700 under the daemon's umask; `Daemon::new` gives it its final mode.)
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create state dir {}", config.state_dir.display()))?;
    let db = config.state_dir.join("aetherd.db");
    let store = Store::open(&db).with_context(|| format!("cannot open {}", db.display()))?;
    crate::privacy::restrict_database(&db)?;
    let hv = Hypervisor::connect(
        &config.libvirt_uri,
        Duration::from_secs(config.libvirt_timeout_secs),
        config.accel,
    )
    .await
    .with_context(|| format!("cannot connect to libvirt at {}", config.libvirt_uri))?;
    let socket = config.socket.clone();
    let daemon = Daemon::new(store, hv, config)
        .await
        .context("cannot prepare storage pool, network or keys")?;
    daemon.reconcile().await.context("reconcile failed")?;
    daemon
        .start_background()
        .context("cannot start background tasks")?;

    tracing::info!(socket = %socket.display(), "serving");
    crate::notify::ready();
    let result = tonic::transport::Server::builder()
        .add_service(AetherServer::new(Service::new(Arc::new(daemon))))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal())
        .await;
    let _ = std::fs::remove_file(&socket);
    result.context("gRPC server failed")?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}

fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create socket dir {}", dir.display()))?;
    }
    if path.exists() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => anyhow::bail!(
                "another aetherd is already serving on {}; stop it first",
                path.display()
            ),
            Err(_) => {
                tracing::info!(socket = %path.display(), "removing stale socket");
                std::fs::remove_file(path)
                    .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
            }
        }
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Ok(Some(group)) = nix::unistd::Group::from_name(crate::api::GROUP) {
        nix::unistd::chown(path, None, Some(group.gid))
            .with_context(|| format!("cannot give {} to group aether", path.display()))?;
    }
    Ok(listener)
}

/// Paths as given on the command line, before the config file is read.
#[derive(Debug, Default)]
pub struct Overrides {
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub libvirt_uri: Option<String>,
}

impl Overrides {
    pub fn apply(self, config: &mut Config) {
        if let Some(s) = self.socket {
            config.socket = s;
        }
        if let Some(s) = self.state_dir {
            config.state_dir = s;
        }
        if let Some(u) = self.libvirt_uri {
            config.libvirt_uri = u;
        }
    }
}
