//! `aether ui`: the web UI, served on 127.0.0.1 to the user who runs it.
//!
//! The server talks to aetherd over the Unix socket with the user's own credentials, so the
//! daemon's authorization applies unchanged. Access is guarded three ways (see [`guard`]): a
//! one-time token in the printed URL becomes an HttpOnly, SameSite=Strict session cookie;
//! the `Host` header must name the loopback address and port (DNS rebinding); the `Origin`,
//! required for anything that changes state, must be this server (CSRF). The page's assets
//! are embedded in the binary ([`assets`]). The calls are described in `ui/API.md`.

mod api;
mod assets;
mod events;
mod guard;
mod terminal;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::routing::{get, post};
use axum::Router;

use crate::client::Client;

/// What every request handler shares.
pub struct UiState {
    /// The daemon connection (a tonic channel: cheap to clone, multiplexed).
    pub client: Client,
    /// aether's per-user config dir, for the SSH identity.
    pub config_dir: PathBuf,
    pub guard: guard::Guard,
    /// Open terminals, kept a while across reconnects.
    pub terminals: terminal::Sessions,
}

pub type Shared = Arc<UiState>;

pub struct Options {
    /// 0 picks a free port.
    pub port: u16,
    pub open_browser: bool,
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/api/session", get(api::session))
        .route("/api/projects", get(api::projects))
        .route("/api/images", get(api::images))
        .route("/api/workspaces", get(api::workspaces).post(api::create))
        .route(
            "/api/workspaces/{id}",
            get(api::workspace).delete(api::delete),
        )
        .route("/api/workspaces/{id}/start", post(api::start))
        .route("/api/workspaces/{id}/stop", post(api::stop))
        .route("/api/workspaces/{id}/console", get(api::console))
        .route("/api/workspaces/{id}/tasks", get(api::tasks))
        .route("/api/workspaces/{id}/terminal", get(terminal::terminal))
        .route("/api/tasks/{id}/log", get(api::task_log))
        .route("/api/events", get(events::events))
        .fallback(get(assets::serve))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::check,
        ))
        .with_state(state)
}

/// Runs the UI server until Ctrl-C or SIGTERM.
pub async fn serve(client: Client, config_dir: PathBuf, opts: Options) -> anyhow::Result<()> {
    if !assets::built() {
        anyhow::bail!(
            "this aether was built without the web UI's assets: run `npm ci && npm run build` in ui/ (scripts/install.sh does), then build aether again"
        );
    }
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, opts.port)))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{}", opts.port))?;
    let port = listener.local_addr()?.port();
    let guard = guard::Guard::new(port)?;
    let url = format!("http://127.0.0.1:{port}/?token={}", guard.token());
    let state = Arc::new(UiState {
        client,
        config_dir,
        guard,
        terminals: terminal::Sessions::default(),
    });
    // The URL is the one line on stdout, so a script (or a test) can read it.
    println!("{url}");
    eprintln!(
        "aether ui: serving on 127.0.0.1:{port}; open the URL above (it works once); Ctrl-C stops"
    );
    if opts.open_browser {
        open_browser(&url);
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown())
        .await
        .context("the UI server failed")
}

/// Opens `url` with `xdg-open` when there is a desktop session; says nothing otherwise.
fn open_browser(url: &str) {
    let desktop =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    if !desktop {
        return;
    }
    // An argument list, no shell; the URL is ours (address, port, hex token).
    let spawned = std::process::Command::new("xdg-open")
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if spawned.is_err() {
        eprintln!("aether ui: could not start xdg-open; open the URL yourself");
    }
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("can watch SIGTERM");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
