//! The daemon's side of `aether doctor`: what creating and reaching a workspace needs of
//! this host, one [`Check`] each, with what was found and what to do. Nothing changes; each
//! check is bounded by the libvirt call timeout.

use std::time::Duration;

use crate::hypervisor::{DomainType, Hypervisor};
use crate::store::Store;

/// Free space in the pool below which creates may fail soon, and below which they will.
const POOL_LOW: u64 = 10 << 30;
const POOL_FULL: u64 = 1 << 30;
/// A capability lookup slower than this is a re-probe of qemu (the cached answer takes
/// milliseconds).
const PROBE_SLOW: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub severity: Severity,
    pub detail: String,
    pub hint: String,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Check {
            name,
            severity: Severity::Ok,
            detail: detail.into(),
            hint: String::new(),
        }
    }

    fn bad(
        name: &'static str,
        severity: Severity,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Check {
            name,
            severity,
            detail: detail.into(),
            hint: hint.into(),
        }
    }
}

/// Runs every check: `pool` is the pool's directory, `default_image` the config's ("" for
/// none).
pub async fn run(
    hv: &Hypervisor,
    store: &Store,
    pool: &std::path::Path,
    default_image: &str,
) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(match hv.versions().await {
        Ok(v) => Check::ok(
            "libvirt",
            format!(
                "libvirt {} ({}) at {}",
                v.libvirt_version,
                v.hypervisor,
                hv.uri()
            ),
        ),
        Err(e) => Check::bad(
            "libvirt",
            Severity::Fail,
            format!("{} does not answer: {e}", hv.uri()),
            "start libvirtd (systemctl start libvirtd, or sudo scripts/install.sh)",
        ),
    });
    checks.push(match hv.domain_type() {
        DomainType::Kvm => Check::ok("accelerator", format!("kvm ({})", hv.accel_reason())),
        DomainType::Qemu => Check::bad(
            "accelerator",
            Severity::Warn,
            format!(
                "tcg, software emulation: guests run several times slower ({})",
                hv.accel_reason()
            ),
            "for KVM: enable virtualization in the firmware (or nested virtualization on a VM host), load kvm_intel or kvm_amd, and restart aetherd",
        ),
        DomainType::Test => Check::bad(
            "accelerator",
            Severity::Warn,
            "libvirt's test driver: no VM runs",
            "point libvirt_uri at qemu:///system to run guests",
        ),
    });
    if hv.domain_type() != DomainType::Test {
        checks.push(match hv.time_domain_capabilities().await {
            Ok(t) if t < PROBE_SLOW => Check::ok(
                "qemu-probe",
                format!("libvirt describes qemu in {} ms", t.as_millis()),
            ),
            Ok(t) => Check::bad(
                "qemu-probe",
                Severity::Warn,
                format!(
                    "libvirt took {:.1} s to describe qemu: it probes qemu again on every lookup, and each create waits for it",
                    t.as_secs_f64()
                ),
                "make /dev/kvm root:kvm 0660 (chgrp kvm /dev/kvm; chmod 0660 /dev/kvm), as udev does, then restart libvirtd",
            ),
            Err(e) => Check::bad(
                "qemu-probe",
                Severity::Fail,
                format!("libvirt cannot describe qemu: {e}"),
                "install qemu-system-x86 and restart libvirtd",
            ),
        });
    }
    checks.push(pool_check(pool));
    checks.push(match hv.network_state().await {
        Ok(Some((true, bridge))) => {
            let leases = hv.dhcp_leases().await.map(|l| l.len()).unwrap_or(0);
            Check::ok(
                "network",
                format!("network aether is active on {bridge} ({leases} DHCP leases)"),
            )
        }
        Ok(Some((false, _))) => Check::bad(
            "network",
            Severity::Fail,
            "network aether is defined but not active",
            "restart aetherd (it starts the network), or virsh net-start aether",
        ),
        Ok(None) => Check::bad(
            "network",
            Severity::Fail,
            "network aether is missing",
            "restart aetherd: it defines the network at start",
        ),
        Err(e) => Check::bad(
            "network",
            Severity::Fail,
            format!("cannot read network aether: {e}"),
            "see libvirtd's log",
        ),
    });
    checks.push(if default_image.is_empty() {
        Check::bad(
            "default-image",
            Severity::Warn,
            "no default_image configured: every create needs --image",
            "set default_image in /etc/aether/aetherd.toml (see aether image list)",
        )
    } else {
        match store.resolve_image(default_image, None) {
            Ok(image) => Check::ok(
                "default-image",
                format!("default image {} is present", image.id),
            ),
            Err(_) => Check::bad(
                "default-image",
                Severity::Fail,
                format!("default_image {default_image} is not imported: a create without --image fails"),
                format!("aether image import {default_image} FILE (or sudo scripts/install.sh), or change default_image"),
            ),
        }
    });
    checks
}

/// Free space where volumes grow.
fn pool_check(pool: &std::path::Path) -> Check {
    let stat = match nix::sys::statvfs::statvfs(pool) {
        Ok(s) => s,
        Err(e) => {
            return Check::bad(
                "pool",
                Severity::Fail,
                format!("cannot read {}: {e}", pool.display()),
                "restart aetherd: it creates the pool at start",
            )
        }
    };
    let free = stat.blocks_available() * stat.fragment_size();
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    let detail = format!("{:.1} GiB free in {}", gib(free), pool.display());
    match free {
        f if f < POOL_FULL => Check::bad(
            "pool",
            Severity::Fail,
            detail,
            "free disk space there: volumes grow as guests write",
        ),
        f if f < POOL_LOW => Check::bad(
            "pool",
            Severity::Warn,
            detail,
            "volumes grow as guests write: free some space there",
        ),
        _ => Check::ok("pool", detail),
    }
}
