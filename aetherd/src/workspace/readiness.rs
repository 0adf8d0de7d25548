//! Readiness: when a booted guest can be used. The guest's SSH port must send its banner,
//! the daemon must log in with its own key, and cloud-init (if the guest has it) must have
//! finished. The network's DHCP leases tell a guest that never asked for its address, or
//! got another one, from one that is still booting.
//!
//! Driven by the guest: after each try it waits [`MIN_GAP`], then until the guest writes to
//! its serial console (watched with inotify: a booting guest prints as it goes, and its
//! login prompt follows sshd) or a growing pause passes (250 ms to 2 s, for a quiet guest).
//! Gives up when the boot timeout passes, when the VM stops, and (without error) when its
//! job is cancelled.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::feed::Feed;
use crate::files::tail;
use crate::host::guest_ssh::GuestSsh;
use crate::host::Layout;
use crate::hypervisor::leases::LeaseCheck;
use crate::hypervisor::{DomainStatus, DomainType, Hypervisor};
use crate::model::WorkspaceId;
use crate::network::Subnet;
use crate::store::Workspace;
use crate::workspace::runner::{cancelled, sleep_or_cancel};

/// How a boot job ended, when it did not fail.
pub enum BootOutcome {
    /// Ready, with a note for the workspace's reason when the boot was not the one asked
    /// for (a resume that fell back to a cold boot).
    Ready(Option<String>),
    /// Its runner cancelled it (the workspace was stopped meanwhile): nothing to record.
    Cancelled,
}

/// The least time between two tries, however much the guest prints.
const MIN_GAP: Duration = Duration::from_millis(250);
/// The longest pause between two tries of a guest that prints nothing.
const MAX_PAUSE: Duration = Duration::from_secs(2);

pub struct Readiness {
    hv: Arc<Hypervisor>,
    layout: Layout,
    subnet: Subnet,
    guest: GuestSsh,
    feed: Arc<Feed>,
    boot_timeout: Duration,
}

impl Readiness {
    pub fn new(
        hv: Arc<Hypervisor>,
        layout: Layout,
        subnet: Subnet,
        guest: GuestSsh,
        feed: Arc<Feed>,
        boot_timeout: Duration,
    ) -> Self {
        Readiness {
            hv,
            layout,
            subnet,
            guest,
            feed,
            boot_timeout,
        }
    }

    /// Releases leases that would keep the guest from its reserved address: another MAC's
    /// lease on it (a deleted workspace whose release was lost, say to a crash), and a lease
    /// of this MAC on any other address. Failures are logged; readiness tells the user if the
    /// guest then gets the wrong address.
    pub async fn release_stale_leases(&self, ws: &Workspace) {
        let (Some(mac), Some(ip)) = (&ws.mac, ws.ip) else {
            return;
        };
        let leases = match self.hv.dhcp_leases().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(workspace = %ws.id, error = %e, "cannot read the DHCP leases");
                return;
            }
        };
        for stale in leases.iter().filter(|l| (l.ip == ip) != (l.mac == *mac)) {
            tracing::info!(workspace = %ws.id, ip = %stale.ip, mac = %stale.mac, "releasing a stale DHCP lease");
            if let Err(e) = self
                .hv
                .release_lease(self.subnet.gateway(), stale.ip, &stale.mac)
                .await
            {
                tracing::warn!(workspace = %ws.id, error = %e, "cannot release a stale DHCP lease");
            }
        }
    }

    /// What the network's leases say about `ws`'s guest; `Reserved` when they cannot be read
    /// (then readiness just waits for SSH, as without this check).
    async fn lease_check(&self, ws: &Workspace, ip: std::net::Ipv4Addr) -> LeaseCheck {
        let Some(mac) = &ws.mac else {
            return LeaseCheck::Reserved;
        };
        match self.hv.dhcp_leases().await {
            Ok(leases) => crate::hypervisor::leases::check(&leases, mac, ip),
            Err(e) => {
                tracing::debug!(workspace = %ws.id, error = %e, "cannot read the DHCP leases");
                LeaseCheck::Reserved
            }
        }
    }

    /// Waits until the guest's SSH port sends its banner and the guest has settled, trying
    /// again as the module doc says. The test driver has no guest, so there the running
    /// domain is ready.
    pub async fn wait_ready(
        &self,
        ws: &Workspace,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<BootOutcome> {
        if self.hv.domain_type() == DomainType::Test {
            return match self.hv.status(&ws.id).await? {
                DomainStatus::Active => Ok(BootOutcome::Ready(None)),
                other => Err(Error::libvirt(format!(
                    "domain is {other:?} right after it was started"
                ))),
            };
        }
        let ip = ws
            .ip
            .ok_or_else(|| Error::precondition(format!("workspace {} has no IP address", ws.id)))?;
        self.feed.set_phase(&ws.id, "waiting for ssh");
        let mut waiting_for_cloud_init = false;
        let timeout = self.boot_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let console = ConsoleWatch::new(&self.layout.console_log(&ws.id));
        let mut pause = MIN_GAP;
        loop {
            if *cancel.borrow() {
                return Ok(BootOutcome::Cancelled);
            }
            if self.hv.status(&ws.id).await? != DomainStatus::Active {
                return Err(Error::Internal("the VM stopped while booting".into()));
            }
            let lease = self.lease_check(ws, ip).await;
            if let LeaseCheck::Elsewhere(other) = lease {
                // Free both addresses now, so the next start gets the reserved one.
                self.release_stale_leases(ws).await;
                return Err(Error::Internal(format!(
                    "the guest got {other} from DHCP instead of its reserved address {ip}, so aetherd cannot reach it; the stale leases were released: start it again"
                )));
            }
            if ssh_banner(std::net::SocketAddr::from((ip, 22))).await {
                if !waiting_for_cloud_init {
                    waiting_for_cloud_init = true;
                    self.feed.set_phase(&ws.id, "waiting for cloud-init");
                }
                if self.guest_settled(ws, ip, deadline).await {
                    return Ok(BootOutcome::Ready(None));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Internal(if waiting_for_cloud_init {
                    format!(
                        "the guest answered SSH on {ip}:22 but aetherd could not log in, or cloud-init did not finish, within {} s",
                        timeout.as_secs()
                    )
                } else if lease == LeaseCheck::Missing {
                    format!(
                        "the guest did not answer SSH on {ip}:22 within {} s; it never asked for that address by DHCP (no lease)",
                        timeout.as_secs()
                    )
                } else {
                    format!(
                        "the guest did not answer SSH on {ip}:22 within {} s",
                        timeout.as_secs()
                    )
                }));
            }
            if sleep_or_cancel(MIN_GAP, &mut cancel).await {
                return Ok(BootOutcome::Cancelled);
            }
            let printed = async {
                match &console {
                    Some(c) => c.written().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep(pause.saturating_sub(MIN_GAP)) => {
                    pause = (pause * 2).min(MAX_PAUSE);
                }
                () = printed => pause = MIN_GAP,
                () = cancelled(&mut cancel) => return Ok(BootOutcome::Cancelled),
            }
        }
    }

    /// Whether the daemon can log in to the guest with its own key and cloud-init (if the
    /// guest has it) has finished: until then cloud-init may still install keys or restart
    /// sshd, and a user's first connections would fail. Bounded by `deadline`.
    async fn guest_settled(
        &self,
        ws: &Workspace,
        ip: std::net::Ipv4Addr,
        deadline: tokio::time::Instant,
    ) -> bool {
        const SETTLE: &str = "if command -v cloud-init >/dev/null 2>&1; then cloud-init status --wait >/dev/null 2>&1; fi; true";
        let Ok(mut ssh) = self.guest.command(ws, ip, SETTLE) else {
            return false;
        };
        let run = ssh
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status();
        matches!(
            tokio::time::timeout_at(deadline, run).await,
            Ok(Ok(status)) if status.success()
        )
    }
}

/// " (last console lines: …)" for reasons, or "" without a console log.
pub fn console_hint(layout: &Layout, id: &WorkspaceId) -> String {
    let tail = tail(&layout.console_log(id), 4096).unwrap_or_default();
    let text = String::from_utf8_lossy(&tail);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    let last = lines[lines.len().saturating_sub(3)..].join(" | ");
    let last: String = last.chars().filter(|c| !c.is_control()).take(300).collect();
    format!("; console: {last} (aether workspace logs {id} --console)")
}

/// Wakes when something is written to a guest's console log (inotify `IN_MODIFY` on the
/// file qemu or virtlogd appends to). Events only wake a waiter: their content is never
/// read, and each read takes what is queued at once, so nothing builds up.
struct ConsoleWatch {
    fd: tokio::io::unix::AsyncFd<InotifyFd>,
}

struct InotifyFd(nix::sys::inotify::Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl ConsoleWatch {
    /// A watch of `path`, or `None` (then readiness just uses its pauses) if it cannot be
    /// watched, e.g. because the log does not exist.
    fn new(path: &std::path::Path) -> Option<Self> {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let watch = || -> std::io::Result<Self> {
            let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
            inotify.add_watch(path, AddWatchFlags::IN_MODIFY)?;
            // SAFETY: the fd is owned by the `Inotify` that the `AsyncFd` owns, so it stays
            // open exactly as long as it is registered.
            let fd = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    InotifyFd(inotify),
                    tokio::io::Interest::READABLE,
                )
            }?;
            Ok(ConsoleWatch { fd })
        };
        match watch() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot watch the console log");
                None
            }
        }
    }

    /// Resolves once the log was written to since the last call (or since the watch began).
    async fn written(&self) {
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            match ready.get_inner().0.read_events() {
                Ok(events) if !events.is_empty() => return,
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read console log events");
                    return std::future::pending().await;
                }
            }
        }
    }
}

/// Whether something at `addr` accepts a TCP connection and sends an SSH banner.
async fn ssh_banner(addr: std::net::SocketAddr) -> bool {
    use tokio::io::AsyncReadExt;
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"SSH-")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Some(true))
    )
}

#[cfg(test)]
mod tests {
    use super::ConsoleWatch;
    use std::io::Write;
    use std::time::Duration;

    /// The watch wakes on a write to the log, not before, and again on the next write.
    #[tokio::test]
    async fn a_console_watch_wakes_when_the_guest_prints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ws-abc123.log");
        let mut log = std::fs::File::create(&path).unwrap();
        let watch = ConsoleWatch::new(&path).expect("an existing log can be watched");
        let quiet = tokio::time::timeout(Duration::from_millis(200), watch.written()).await;
        assert!(quiet.is_err(), "woke although nothing was written");
        for line in ["[    0.000000] Linux version\n", "login: \n"] {
            log.write_all(line.as_bytes()).unwrap();
            tokio::time::timeout(Duration::from_secs(10), watch.written())
                .await
                .expect("a write wakes the watch");
        }
        assert!(ConsoleWatch::new(&dir.path().join("missing.log")).is_none());
    }
}
