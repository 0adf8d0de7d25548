//! `aether`: the command-line client of aetherd.
//!
//! Exit codes: 0 success; 1 the request failed (the daemon's one-line reason is printed on
//! stderr); 2 the command line was invalid.

mod autostart;
mod client;
mod docs;
mod doctor;
mod forward;
mod identity;
mod image;
mod output;
mod pull;
mod ssh;
mod task;
mod tty;
mod ui;
mod watch;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use aether_proto::v1 as pb;
use anyhow::{anyhow, bail, Context};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use client::Client;

#[derive(Parser, Debug)]
#[command(
    name = "aether",
    version,
    about = "Development workspaces as virtual machines on your own Linux box",
    after_help = "Exit codes: 0 success, 1 the request failed, 2 invalid command line."
)]
struct Cli {
    /// aetherd's Unix socket.
    #[arg(
        long,
        global = true,
        env = "AETHER_SOCKET",
        default_value = "/run/aether/aetherd.sock",
        value_name = "PATH"
    )]
    socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Aligned columns and key/value blocks for people.
    Table,
    /// JSON with the API's field names, for scripts.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Projects group workspaces.
    #[command(subcommand)]
    Project(ProjectCmd),
    /// Workspaces are virtual machines with a persistent volume.
    #[command(subcommand, visible_alias = "ws")]
    Workspace(WorkspaceCmd),
    /// Guest images that workspaces boot from.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Tasks: commands run in workspaces (see `aether workspace exec`).
    #[command(subcommand)]
    Task(TaskCmd),
    /// The host aetherd runs on.
    #[command(subcommand)]
    Host(HostCmd),
    /// Print OpenSSH config `Host` entries for workspaces and pin their host keys:
    /// `aether ssh-config >> ~/.ssh/config` makes `ssh ws-abc123`, scp, rsync and VS Code
    /// Remote-SSH work.
    SshConfig {
        /// Workspaces [default: all of yours].
        ids: Vec<String>,
    },
    /// Check what creating and reaching a workspace needs, one line each with a fix: the
    /// daemon and your access to it, libvirt, KVM, qemu's probe time, the pool's free space,
    /// the network, the default image, the SSH client and key. Exits 1 when something
    /// blocks.
    Doctor,
    /// Serve the web UI on 127.0.0.1 as you: projects, workspaces with a live status while
    /// they boot, create/start/stop/delete, console logs, tasks and a terminal. Prints a URL
    /// with a one-time token (it becomes a session cookie) and opens it in the browser when
    /// there is a desktop session. Runs until Ctrl-C.
    Ui {
        /// Port on 127.0.0.1 [default: a free one].
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Print the URL only; do not start a browser.
        #[arg(long)]
        no_browser: bool,
    },
    /// Print a shell completion script, e.g.
    /// `aether completions bash > /usr/share/bash-completion/completions/aether`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages into DIR: aether.1 and one per subcommand (aether-workspace-create.1,
    /// …), from the same definitions as --help.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Take a snapshot of a stopped workspace's disk and print its name.
    Create {
        id: String,
        /// 1-63 lowercase letters, digits, '.', '_' and '-'.
        name: String,
    },
    /// List a workspace's snapshots: NAME CREATED, oldest first.
    List { id: String },
    /// Put the workspace's disk back as it was at the snapshot (the snapshot stays).
    Restore {
        id: String,
        name: String,
        /// Power a running workspace off first instead of refusing.
        #[arg(long)]
        force: bool,
    },
    /// Delete a snapshot of a stopped workspace.
    Delete { id: String, name: String },
}

#[derive(Subcommand, Debug)]
enum TaskCmd {
    /// List tasks: ID WORKSPACE STATE EXIT STARTED COMMAND, newest first.
    List {
        /// Only this workspace's tasks.
        #[arg(long)]
        workspace: Option<String>,
    },
    /// Print a task's output; with --follow, keep printing until it ends.
    Logs {
        id: String,
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a running task.
    Cancel { id: String },
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Import a qcow2 or raw disk image (raw is converted to qcow2) from a file or an
    /// http(s) URL. Root's images are shared with everyone; a member's are its own.
    Import {
        /// 1-63 lowercase letters, digits, '.', '_' and '-'; unique per owner.
        name: String,
        /// File path or http(s) URL of the disk image.
        source: String,
        /// Kernel for direct kernel boot (with --initrd).
        #[arg(long, value_name = "FILE")]
        kernel: Option<PathBuf>,
        /// Initrd for direct kernel boot.
        #[arg(long, value_name = "FILE")]
        initrd: Option<PathBuf>,
        /// Kernel command line for direct kernel boot.
        #[arg(long, value_name = "ARGS")]
        cmdline: Option<String>,
        /// Firmware for disk boot: bios or uefi [default: bios; ignored with --kernel].
        #[arg(long, value_name = "MODE")]
        boot: Option<String>,
    },
    /// List your own images and the shared ones (root: all): NAME OWNER FORMAT SIZE BOOT
    /// IN-USE CREATED. NAME is the image's id: NAME@UID for a member's own image.
    List,
    /// List the stock images `image pull` knows: NAME BOOT MIN-DISK DESCRIPTION (the
    /// daemon's catalog, plus the files in its image_catalog_dir).
    Catalog,
    /// Download a catalog image from its publisher, verify it against the published
    /// checksum file (a mismatch keeps nothing), and import it. An interrupted pull resumes
    /// where it stopped.
    Pull {
        /// A catalog entry (see `aether image catalog`), e.g. ubuntu-22.04.
        name: String,
        /// Import it under this name instead.
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
        /// Seconds without a byte before a download is resumed on a new connection.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        stall_timeout: u64,
    },
    /// Delete one of your images (root: any), refused while a workspace uses it.
    Delete {
        /// A name (your own image, else the shared one) or NAME@UID.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum ProjectCmd {
    /// Create a project and print its id.
    Create {
        /// 1-63 lowercase letters, digits and '-', starting with a letter or digit.
        name: String,
    },
    /// List projects.
    List,
    /// Show a project.
    Get {
        /// Project id or name.
        project: String,
    },
    /// Delete a project (it must have no workspaces).
    Delete {
        /// Project id or name.
        project: String,
    },
    /// Make a project the current one (the default for --project).
    Use {
        /// Project id or name.
        project: String,
    },
    /// Show the current project.
    Current,
}

#[derive(Subcommand, Debug)]
enum WorkspaceCmd {
    /// Create a workspace (state stopped) and print its id.
    Create {
        /// Project id or name [default: the current project].
        #[arg(long)]
        project: Option<String>,
        /// Image to boot: a name (your own image, else the shared one) or NAME@UID (see
        /// `aether image list`) [default: the daemon's default_image].
        #[arg(long)]
        image: Option<String>,
        #[command(flatten)]
        hardware: HardwareArgs,
    },
    /// List workspaces.
    List {
        #[arg(long, help = status_help())]
        status: Option<String>,
        /// Only workspaces of this project (id or name).
        #[arg(long)]
        project: Option<String>,
    },
    /// Show a workspace: state, hardware, pending changes, addresses, last error.
    Get { id: String },
    /// Start a workspace and wait until it is running.
    Start {
        id: String,
        /// Return as soon as the daemon accepted the request.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop a workspace (ACPI shutdown) and wait until it is stopped. The volume is kept.
    Stop {
        id: String,
        /// Power the VM off at once instead of asking the guest to shut down.
        #[arg(long, conflicts_with = "suspend")]
        force: bool,
        /// Save the guest's memory (in the daemon's state dir) and power the VM off instead
        /// of shutting it down: the next start resumes it where it was, open programs and
        /// all, in seconds. A plain stop of a suspended workspace discards the memory image.
        #[arg(long)]
        suspend: bool,
        /// Return as soon as the daemon accepted the request.
        #[arg(long)]
        no_wait: bool,
    },
    /// Named points of a workspace's disk, kept inside its volume (no copy): create, list,
    /// restore, delete. Changing them needs the workspace stopped.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Delete a workspace: its VM and its volume.
    Delete {
        id: String,
        /// Power the VM off first if it is running.
        #[arg(long)]
        force: bool,
    },
    /// Run a command in a workspace (starting the workspace first if it is stopped) and
    /// stream its output; exits with the command's exit code. Without a terminal it runs as a
    /// task, stdout and stderr apart; with --detach, print the task id and return at once.
    /// With a terminal (--tty, the default when stdin and stdout are terminals) it runs on a
    /// PTY in the guest: keystrokes, ^C included, go to it and window-size changes follow.
    Exec {
        id: String,
        /// Print the task id and return; the task keeps running (see `aether task`).
        #[arg(long, conflicts_with = "tty")]
        detach: bool,
        /// Run the command on a terminal (PTY) in the guest, even if ours is not one.
        #[arg(short = 't', long, conflicts_with = "no_tty")]
        tty: bool,
        /// Never a terminal: run as a task even when stdin and stdout are terminals.
        #[arg(short = 'T', long)]
        no_tty: bool,
        /// Environment variable for the command (repeatable).
        #[arg(long = "env", value_name = "NAME=VALUE", value_parser = task::parse_env)]
        env: Vec<(String, String)>,
        /// Working directory in the guest [default: the login user's home].
        #[arg(long, value_name = "DIR")]
        workdir: Option<String>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        argv: Vec<String>,
    },
    /// Print the workspaces' state as it changes: a snapshot, then every change (state,
    /// phase, reason, connections, idle clock) with an increasing sequence number, until
    /// interrupted. `-o json` prints one JSON object per line.
    Watch {
        /// Only this workspace.
        id: Option<String>,
        /// Only workspaces of this project (id or name).
        #[arg(long)]
        project: Option<String>,
    },
    /// Show the workspace's serial console log (kept on disk across boots).
    Logs {
        id: String,
        /// The serial console (the only log so far; required for forward compatibility).
        #[arg(long)]
        console: bool,
        /// At most this many bytes from the end (the daemon refuses more than 1048576).
        #[arg(long, default_value_t = 65536)]
        bytes: u32,
    },
    /// Change hardware: at once when stopped, at the next start when running.
    Update {
        id: String,
        #[command(flatten)]
        hardware: HardwareArgs,
    },
    /// Open an SSH session in a workspace, starting it first if it is stopped (runs the system
    /// `ssh` through the daemon, with the workspace's host key pinned).
    Ssh {
        /// Workspace [default: the only workspace of the current project].
        id: Option<String>,
        /// Command to run instead of a login shell.
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Bridge stdin and stdout to a TCP port of a workspace through the daemon, starting it
    /// first if it is stopped (ssh's ProxyCommand).
    Proxy {
        id: String,
        /// Guest TCP port.
        #[arg(long, default_value_t = 22, value_parser = clap::value_parser!(u16).range(1..))]
        port: u16,
    },
    /// Forward ports of 127.0.0.1 to ports of a workspace (starting it first if it is
    /// stopped) until interrupted.
    PortForward {
        id: String,
        /// LOCAL:REMOTE port pairs, e.g. 8080:80.
        #[arg(required = true, value_name = "LOCAL:REMOTE", value_parser = forward::parse_forward)]
        forwards: Vec<forward::Forward>,
    },
}

/// `--status`'s help: the daemon's state names.
fn status_help() -> String {
    format!(
        "Only workspaces in this state: {}",
        aether_domain::STATE_NAMES.join(", ")
    )
}

#[derive(Args, Debug)]
struct HardwareArgs {
    /// Number of vCPUs, 1-8 [create default: 2].
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory in MiB, 256-16384 [create default: 2048].
    #[arg(long)]
    memory: Option<u32>,
    /// Root volume size in GiB, up to the daemon's max_volume_size_gb; it can only grow
    /// [create default: 20].
    #[arg(long)]
    volume_size: Option<u32>,
    /// shared (vCPUs float over the host CPUs no performance workspace holds) or performance (dedicated host CPUs) [create default: shared].
    #[arg(long)]
    cpu_kind: Option<String>,
    /// A GPU kind this host has (see `aether host info`); "" removes the GPU.
    #[arg(long)]
    gpu_kind: Option<String>,
    /// Stop the workspace after this long with no connection and no task: 90s, 30m, 2h, or
    /// 0 for never [create default: the daemon's idle_timeout, 10m].
    #[arg(long, value_name = "DURATION")]
    idle_timeout: Option<String>,
}

#[derive(Subcommand, Debug)]
enum HostCmd {
    /// Show versions, the libvirt connection and the accelerator.
    Info,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("can start the tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aether: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error chain as one readable line; a gRPC status shows only its message.
fn one_line(e: &anyhow::Error) -> String {
    if let Some(status) = e.downcast_ref::<tonic::Status>() {
        return status.message().to_owned();
    }
    format!("{e:#}")
}

/// Prints text, treating a closed pipe (`aether … | head`) as success.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}

fn emit_json(v: &serde_json::Value) -> anyhow::Result<()> {
    emit(&format!("{}\n", serde_json::to_string_pretty(v)?))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let format = cli.output;
    // `project current` needs no daemon when nothing is set.
    match cli.command {
        Command::Doctor => doctor::run(&cli.socket, &config_dir()?, format == Format::Json).await,
        Command::Completions { shell } => {
            docs::completions(&mut Cli::command(), shell)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            let n = docs::man_pages(Cli::command(), &dir)?;
            eprintln!("wrote {n} man pages to {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Ui { port, no_browser } => {
            let c = client::connect(&cli.socket).await?;
            let opts = ui::Options {
                port,
                open_browser: !no_browser,
            };
            ui::serve(c, config_dir()?, opts).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Project(cmd) => project(&cli.socket, format, cmd).await,
        Command::Workspace(cmd) => {
            let mut c = client::connect(&cli.socket).await?;
            workspace(&mut c, &cli.socket, format, cmd).await
        }
        Command::Task(cmd) => {
            let mut c = client::connect(&cli.socket).await?;
            let json = format == Format::Json;
            match cmd {
                TaskCmd::List { workspace } => task::list(&mut c, json, workspace).await,
                TaskCmd::Logs { id, follow } => task::logs(&mut c, id, follow).await,
                TaskCmd::Cancel { id } => task::cancel(&mut c, json, id).await,
            }
        }
        Command::Image(cmd) => {
            let mut c = client::connect(&cli.socket).await?;
            image_cmd(&mut c, format, cmd).await
        }
        Command::Host(HostCmd::Info) => {
            let mut c = client::connect(&cli.socket).await?;
            let h = c
                .get_host_info(pb::GetHostInfoRequest {})
                .await?
                .into_inner();
            match format {
                Format::Json => emit_json(&output::host_json(&h))?,
                Format::Table => emit(&output::host_details(&h))?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::SshConfig { ids } => {
            let mut c = client::connect(&cli.socket).await?;
            let entries = ssh::ssh_config(&mut c, &cli.socket, &config_dir()?, &ids).await?;
            match format {
                Format::Json => emit_json(&entries.iter().map(ssh::HostEntry::json).collect())?,
                Format::Table => emit(
                    &entries
                        .iter()
                        .map(ssh::HostEntry::config_block)
                        .collect::<Vec<_>>()
                        .join("\n"),
                )?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

// ---- current project ----

/// aether's per-user config dir (`~/.config/aether`): current project, SSH key, known hosts.
fn config_dir() -> anyhow::Result<PathBuf> {
    let dirs = directories::ProjectDirs::from("", "", "aether")
        .ok_or_else(|| anyhow!("cannot find your home directory for aether's config dir"))?;
    Ok(dirs.config_dir().to_owned())
}

fn current_project_file() -> anyhow::Result<PathBuf> {
    Ok(config_dir()?.join("current-project"))
}

fn read_current_project() -> anyhow::Result<Option<String>> {
    let path = current_project_file()?;
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_current_project(id: &str) -> anyhow::Result<()> {
    let path = current_project_file()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&path, format!("{id}\n"))
        .with_context(|| format!("cannot write {}", path.display()))
}

async fn project(
    socket: &std::path::Path,
    format: Format,
    cmd: ProjectCmd,
) -> anyhow::Result<ExitCode> {
    let mut c = client::connect(socket).await?;
    match cmd {
        ProjectCmd::Create { name } => {
            let p = c
                .create_project(pb::CreateProjectRequest { name })
                .await?
                .into_inner();
            match format {
                Format::Json => emit_json(&output::project_json(&p))?,
                Format::Table => emit(&format!("{}\n", p.id))?,
            }
        }
        ProjectCmd::List => {
            let list = c
                .list_projects(pb::ListProjectsRequest {})
                .await?
                .into_inner()
                .projects;
            match format {
                Format::Json => emit_json(&list.iter().map(output::project_json).collect())?,
                Format::Table => emit(&output::project_table(&list))?,
            }
        }
        ProjectCmd::Get { project } => {
            let p = c
                .get_project(pb::GetProjectRequest { project })
                .await?
                .into_inner();
            show_project(format, &p)?;
        }
        ProjectCmd::Delete { project } => {
            let p = c
                .get_project(pb::GetProjectRequest {
                    project: project.clone(),
                })
                .await?
                .into_inner();
            c.delete_project(pb::DeleteProjectRequest {
                project: p.id.clone(),
            })
            .await?;
            if read_current_project()?.as_deref() == Some(p.id.as_str()) {
                std::fs::remove_file(current_project_file()?)?;
            }
            if format == Format::Json {
                emit_json(&output::project_json(&p))?;
            }
        }
        ProjectCmd::Use { project } => {
            let p = c
                .get_project(pb::GetProjectRequest { project })
                .await?
                .into_inner();
            write_current_project(&p.id)?;
            match format {
                Format::Json => emit_json(&output::project_json(&p))?,
                Format::Table => emit(&format!("now using project {} ({})\n", p.name, p.id))?,
            }
        }
        ProjectCmd::Current => {
            let Some(id) = read_current_project()? else {
                bail!("no current project; run `aether project use NAME`");
            };
            let p = c
                .get_project(pb::GetProjectRequest {
                    project: id.clone(),
                })
                .await
                .map_err(|_| {
                    anyhow!(
                        "the current project {id} no longer exists; run `aether project use NAME`"
                    )
                })?
                .into_inner();
            match format {
                Format::Json => emit_json(&output::project_json(&p))?,
                Format::Table => emit(&format!("{}\n", p.name))?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An imported image, as `image import` and `image pull` print it.
fn print_image(format: Format, img: &pb::Image) -> anyhow::Result<()> {
    match format {
        Format::Json => emit_json(&output::image_json(img)),
        Format::Table => emit(&output::image_table(std::slice::from_ref(img))),
    }
}

async fn image_cmd(c: &mut Client, format: Format, cmd: ImageCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCmd::Import {
            name,
            source,
            kernel,
            initrd,
            cmdline,
            boot,
        } => {
            let boot_mode = match boot.as_deref() {
                None => pb::BootMode::Unspecified,
                Some("bios") => pb::BootMode::Bios,
                Some("uefi") => pb::BootMode::Uefi,
                Some(other) => bail!("invalid boot mode {other:?}: expected bios or uefi"),
            };
            let img = image::import(
                c,
                image::ImportArgs {
                    name,
                    source,
                    kernel,
                    initrd,
                    cmdline,
                    boot_mode,
                },
            )
            .await?;
            print_image(format, &img)?;
        }
        ImageCmd::Catalog => {
            let entries = c
                .list_catalog(pb::ListCatalogRequest {})
                .await?
                .into_inner()
                .entries;
            match format {
                Format::Json => emit_json(&entries.iter().map(output::catalog_json).collect())?,
                Format::Table => emit(&output::catalog_table(&entries))?,
            }
        }
        ImageCmd::Pull {
            name,
            as_name,
            stall_timeout,
        } => {
            if stall_timeout == 0 {
                bail!("--stall-timeout must be at least 1 second");
            }
            let entries = c
                .list_catalog(pb::ListCatalogRequest {})
                .await?
                .into_inner()
                .entries;
            let entry = entries
                .into_iter()
                .find(|e| e.name == name)
                .ok_or_else(|| {
                    anyhow!("{name} is not in the image catalog; see aether image catalog")
                })?;
            let boot_mode = pb::BootMode::try_from(entry.boot_mode).unwrap_or(pb::BootMode::Bios);
            let stall = std::time::Duration::from_secs(stall_timeout);
            let fetched = {
                let entry = entry.clone();
                tokio::task::spawn_blocking(move || pull::download(&entry, stall))
                    .await
                    .context("the download thread failed")??
            };
            let imported = image::import(
                c,
                image::ImportArgs {
                    name: as_name.unwrap_or(entry.name),
                    source: fetched.path.to_string_lossy().into_owned(),
                    kernel: None,
                    initrd: None,
                    cmdline: None,
                    boot_mode,
                },
            )
            .await;
            // Verified and sent (or refused by the daemon): the download has served.
            let _ = std::fs::remove_file(&fetched.path);
            let img = imported?;
            print_image(format, &img)?;
        }
        ImageCmd::List => {
            let list = c
                .list_images(pb::ListImagesRequest {})
                .await?
                .into_inner()
                .images;
            match format {
                Format::Json => emit_json(&list.iter().map(output::image_json).collect())?,
                Format::Table => emit(&output::image_table(&list))?,
            }
        }
        ImageCmd::Delete { name } => {
            c.delete_image(pb::DeleteImageRequest { name: name.clone() })
                .await?;
            if format == Format::Json {
                emit_json(&serde_json::json!({ "name": name, "deleted": true }))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show_project(format: Format, p: &pb::Project) -> anyhow::Result<()> {
    match format {
        Format::Json => emit_json(&output::project_json(p)),
        Format::Table => emit(&output::project_details(p)),
    }
}

fn show_workspace(format: Format, w: &pb::Workspace) -> anyhow::Result<()> {
    match format {
        Format::Json => emit_json(&output::workspace_json(w)),
        Format::Table => emit(&output::workspace_details(w)),
    }
}

async fn workspace(
    c: &mut Client,
    socket: &Path,
    format: Format,
    cmd: WorkspaceCmd,
) -> anyhow::Result<ExitCode> {
    match cmd {
        WorkspaceCmd::Create {
            project,
            image,
            hardware,
        } => {
            let project = match project {
                Some(p) => p,
                None => read_current_project()?.ok_or_else(|| {
                    anyhow!("no --project given and no current project; run `aether project use NAME` or pass --project")
                })?,
            };
            let w = c
                .create_workspace(pb::CreateWorkspaceRequest {
                    project,
                    cpu_kind: hardware.cpu_kind,
                    cpus: hardware.cpus,
                    memory_mb: hardware.memory,
                    volume_size_gb: hardware.volume_size,
                    gpu_kind: hardware.gpu_kind,
                    image: image.unwrap_or_default(),
                    login_user: identity::login_user(),
                    ssh_authorized_keys: vec![identity::find_or_create(&config_dir()?)?.public_key],
                    idle_timeout: hardware.idle_timeout,
                })
                .await?
                .into_inner();
            match format {
                Format::Json => emit_json(&output::workspace_json(&w))?,
                Format::Table => emit(&format!("{}\n", w.id))?,
            }
        }
        WorkspaceCmd::List { status, project } => {
            let state = match status.as_deref() {
                None => pb::WorkspaceState::Unspecified,
                Some(s) => output::state_from_name(s)?,
            };
            let list = c
                .list_workspaces(pb::ListWorkspacesRequest {
                    state: state as i32,
                    project: project.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .workspaces;
            match format {
                Format::Json => emit_json(&list.iter().map(output::workspace_json).collect())?,
                Format::Table => emit(&output::workspace_table(&list))?,
            }
        }
        WorkspaceCmd::Get { id } => {
            let w = c
                .get_workspace(pb::GetWorkspaceRequest { id })
                .await?
                .into_inner();
            show_workspace(format, &w)?;
        }
        WorkspaceCmd::Start { id, no_wait } => {
            let w = c
                .start_workspace(pb::StartWorkspaceRequest { id })
                .await?
                .into_inner();
            let w = if no_wait {
                w
            } else {
                wait_while(c, format, w, pb::WorkspaceState::Starting).await?
            };
            return finish(format, &w, pb::WorkspaceState::Running, no_wait);
        }
        WorkspaceCmd::Stop {
            id,
            force,
            suspend,
            no_wait,
        } => {
            let w = c
                .stop_workspace(pb::StopWorkspaceRequest { id, force, suspend })
                .await?
                .into_inner();
            let w = if no_wait {
                w
            } else {
                wait_while(c, format, w, pb::WorkspaceState::Stopping).await?
            };
            return finish(format, &w, pb::WorkspaceState::Stopped, no_wait);
        }
        WorkspaceCmd::Snapshot(cmd) => {
            use pb::snapshot_workspace_request::Op;
            let (id, op, name, force) = match cmd {
                SnapshotCmd::Create { id, name } => (id, Op::Create, name, false),
                SnapshotCmd::List { id } => (id, Op::List, String::new(), false),
                SnapshotCmd::Restore { id, name, force } => (id, Op::Restore, name, force),
                SnapshotCmd::Delete { id, name } => (id, Op::Delete, name, false),
            };
            let list = c
                .snapshot_workspace(pb::SnapshotWorkspaceRequest {
                    workspace_id: id,
                    op: op as i32,
                    name: name.clone(),
                    force,
                })
                .await?
                .into_inner()
                .snapshots;
            match (format, op) {
                (Format::Json, _) => emit_json(&list.iter().map(output::snapshot_json).collect())?,
                (Format::Table, Op::List) => emit(&output::snapshot_table(&list))?,
                (Format::Table, Op::Create) => emit(&format!("{name}\n"))?,
                (Format::Table, _) => {}
            }
        }
        WorkspaceCmd::Delete { id, force } => {
            c.delete_workspace(pb::DeleteWorkspaceRequest {
                id: id.clone(),
                force,
            })
            .await?;
            if format == Format::Json {
                emit_json(&serde_json::json!({ "id": id, "deleted": true }))?;
            }
        }
        WorkspaceCmd::Exec {
            id,
            detach,
            tty,
            no_tty,
            env,
            workdir,
            argv,
        } => {
            task::check_argv(&argv)?;
            if !detach && tty::wanted(tty, no_tty) {
                return tty::exec(
                    c,
                    tty::TtyArgs {
                        id,
                        argv,
                        env,
                        workdir,
                    },
                )
                .await;
            }
            return task::exec(
                c,
                format == Format::Json,
                task::ExecArgs {
                    id,
                    argv,
                    env,
                    workdir,
                    detach,
                },
            )
            .await;
        }
        WorkspaceCmd::Watch { id, project } => {
            watch::watch(
                c,
                format == Format::Json,
                id.as_deref().unwrap_or(""),
                project.as_deref().unwrap_or(""),
            )
            .await?;
        }
        WorkspaceCmd::Logs { id, console, bytes } => {
            if !console {
                bail!("say which log: --console");
            }
            let log = c
                .get_console_log(pb::GetConsoleLogRequest {
                    id,
                    max_bytes: bytes,
                })
                .await?
                .into_inner();
            match format {
                Format::Json => {
                    emit_json(&serde_json::json!({ "data": String::from_utf8_lossy(&log.data) }))?
                }
                Format::Table => emit(&String::from_utf8_lossy(&log.data))?,
            }
        }
        WorkspaceCmd::Update { id, hardware } => {
            let w = c
                .update_workspace(pb::UpdateWorkspaceRequest {
                    id,
                    cpu_kind: hardware.cpu_kind,
                    cpus: hardware.cpus,
                    memory_mb: hardware.memory,
                    volume_size_gb: hardware.volume_size,
                    gpu_kind: hardware.gpu_kind,
                    idle_timeout: hardware.idle_timeout,
                })
                .await?
                .into_inner();
            show_workspace(format, &w)?;
        }
        WorkspaceCmd::Ssh { id, command } => {
            let id = match id {
                Some(id) => id,
                None => autostart::only_workspace_of_current_project(c).await?,
            };
            ssh::ssh(c, socket, &config_dir()?, id, &command).await?;
        }
        WorkspaceCmd::Proxy { id, port } => ssh::proxy(c, id, port).await?,
        WorkspaceCmd::PortForward { id, forwards } => {
            forward::port_forward(c, &id, &forwards).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits until the workspace leaves `transitional`, with live progress on stderr for
/// people (see `watch::wait_while`).
async fn wait_while(
    c: &mut Client,
    format: Format,
    w: pb::Workspace,
    transitional: pb::WorkspaceState,
) -> anyhow::Result<pb::Workspace> {
    watch::wait_while(c, w, transitional, format == Format::Table).await
}

/// Reports the outcome of start/stop; anything but `wanted` (after waiting) is a failure.
fn finish(
    format: Format,
    w: &pb::Workspace,
    wanted: pb::WorkspaceState,
    no_wait: bool,
) -> anyhow::Result<ExitCode> {
    match format {
        Format::Json => emit_json(&output::workspace_json(w))?,
        Format::Table => emit(&format!("{} {}\n", w.id, output::state_name(w.state)))?,
    }
    if no_wait || w.state == wanted as i32 {
        return Ok(ExitCode::SUCCESS);
    }
    let reason = if w.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", w.reason)
    };
    eprintln!(
        "aether: workspace {} is {}{reason}",
        w.id,
        output::state_name(w.state)
    );
    Ok(ExitCode::FAILURE)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    fn arg_help(path: &[&str], arg: &str) -> String {
        let mut cmd = Cli::command();
        for name in path {
            cmd = cmd.find_subcommand(name).expect("a subcommand").clone();
        }
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == arg)
            .expect("an argument");
        arg.get_help().expect("a help text").to_string()
    }

    /// The help texts state the rules the daemon applies (`aether-domain`'s).
    #[test]
    fn help_texts_state_the_shared_rules() {
        Cli::command().debug_assert();
        assert_eq!(
            arg_help(&["workspace", "list"], "status"),
            "Only workspaces in this state: stopped, starting, running, stopping, error, stop_failed"
        );
        let name = arg_help(&["project", "create"], "name");
        let rule = aether_domain::ProjectName::parse("A")
            .unwrap_err()
            .to_string();
        assert!(
            rule.ends_with(&format!(": use {name}")),
            "{name:?} is not the rule in {rule:?}"
        );
    }
}
