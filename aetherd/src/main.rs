use std::path::PathBuf;
use std::process::ExitCode;

use aetherd::config::{Config, DEFAULT_CONFIG};
use aetherd::server::Overrides;
use clap::Parser;

/// aetherd: serves the aether API (development workspaces as libvirt/qemu VMs) on a Unix socket.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// TOML config file; a missing file at the default path means all defaults.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Unix socket to serve on [default: /run/aether/aetherd.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Directory for the state database [default: /var/lib/aether].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// libvirt connection URI [default: qemu:///system].
    #[arg(long, value_name = "URI")]
    libvirt_uri: Option<String>,
}

fn main() -> ExitCode {
    // Before any thread or file exists: nothing the daemon writes is readable by others.
    aetherd::privacy::private_umask();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AETHERD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let mut config = match Config::load(&path, explicit) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aetherd: {e:#}");
            return ExitCode::from(2);
        }
    };
    Overrides {
        socket: args.socket,
        state_dir: args.state_dir,
        libvirt_uri: args.libvirt_uri,
    }
    .apply(&mut config);
    let runtime = tokio::runtime::Runtime::new().expect("can start the tokio runtime");
    match runtime.block_on(aetherd::server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aetherd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
