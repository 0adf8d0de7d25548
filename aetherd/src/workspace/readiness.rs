//! Readiness: when a booted guest can be used. The guest's SSH port must send its banner,
//! the daemon must log in with its own key, and cloud-init (if the guest has it) must have
//! finished. The network's DHCP leases tell a guest that never asked for its address, or
//! got another one, from one that is still booting.
//!
//! Tries again with a growing pause (250 ms to 2 s), never a fixed loop; gives up when the
//! boot timeout passes, when the VM stops, and (without error) when its job is cancelled.

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
use crate::workspace::runner::sleep_or_cancel;

/// How a boot job ended, when it did not fail.
pub enum BootOutcome {
    Ready,
    /// Its runner cancelled it (the workspace was stopped meanwhile): nothing to record.
    Cancelled,
}

pub struct Readiness {
    hv: Arc<Hypervisor>,
    subnet: Subnet,
    guest: GuestSsh,
    feed: Arc<Feed>,
    boot_timeout: Duration,
}

impl Readiness {
    pub fn new(
        hv: Arc<Hypervisor>,
        subnet: Subnet,
        guest: GuestSsh,
        feed: Arc<Feed>,
        boot_timeout: Duration,
    ) -> Self {
        Readiness {
            hv,
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

    /// Waits until the guest's SSH port sends its banner, trying again with a growing pause
    /// (from 250 ms to 2 s). The test driver has no guest, so there the running domain is
    /// ready. Gives up when the boot timeout passes, when the VM stops, and (without error)
    /// when its runner cancels it.
    pub async fn wait_ready(
        &self,
        ws: &Workspace,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<BootOutcome> {
        if self.hv.domain_type() == DomainType::Test {
            return match self.hv.status(&ws.id).await? {
                DomainStatus::Active => Ok(BootOutcome::Ready),
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
        let mut pause = Duration::from_millis(250);
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
                    return Ok(BootOutcome::Ready);
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
            if sleep_or_cancel(pause, &mut cancel).await {
                return Ok(BootOutcome::Cancelled);
            }
            pause = (pause * 2).min(Duration::from_secs(2));
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
