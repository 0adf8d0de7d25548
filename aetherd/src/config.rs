//! Daemon configuration: a TOML file (default `/etc/aether/aetherd.toml`) overridden by flags.
//!
//! A missing file at the default path means "all defaults"; a missing file that was named with
//! `--config` is an error, and so is an unknown key (a typo must not be silently ignored).

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/aether/aetherd.toml";

/// Which accelerator new domains use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when it can run a guest, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

/// What the idle timeout does to a running workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdleAction {
    /// Save the guest's memory and power the VM off; the next start resumes it. A
    /// workspace with a GPU (which cannot be saved) is shut down instead.
    Suspend,
    /// Shut the guest down (ACPI); the next start boots it afresh.
    Shutdown,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Unix socket the API is served on.
    pub socket: PathBuf,
    /// Directory for the state database (and, later, volumes and logs).
    pub state_dir: PathBuf,
    /// libvirt connection URI.
    pub libvirt_uri: String,
    /// Largest volume a workspace may have, in GiB.
    pub max_volume_size_gb: u32,
    /// Seconds a graceful (ACPI) stop may take before the workspace becomes `stop_failed`.
    pub stop_timeout_secs: u64,
    /// Seconds any single libvirt call may take.
    pub libvirt_timeout_secs: u64,
    pub accel: Accel,
    /// Image used by `workspace create` without `--image`; empty: `--image` is required.
    pub default_image: String,
    /// IPv4 subnet of the `aether` NAT network, e.g. "192.168.150.0/24" (a /24). Unset: the
    /// first of a few candidates that overlaps no route of the host. Only used when the
    /// daemon creates the network.
    pub network_cidr: Option<String>,
    /// Seconds from boot until the guest must answer SSH, else the workspace goes to `error`.
    /// Unset: 120 with KVM, 300 with TCG (software emulation is much slower).
    pub boot_timeout_secs: Option<u64>,
    /// Stop a running workspace after this long with no connection and no task: "90s",
    /// "30m", "2h", "0" (never). Workspaces can override it.
    pub idle_timeout: String,
    /// What the idle timeout does: "suspend" (the default) or "shutdown".
    pub idle_action: IdleAction,
    /// Memory of all running workspaces may add up to this many times the host's RAM.
    pub memory_overcommit: f64,
    /// Host CPUs never dedicated to performance workspaces (they stay for the host).
    pub reserved_host_cpus: Vec<u32>,
    /// GPUs offered to workspaces although the host uses them (its boot VGA device, or one
    /// a host driver is bound to), by PCI address ("0000:01:00.0") or kind.
    pub gpu_allow: Vec<String>,
    /// The group libvirt runs qemu with (`group` in libvirt's qemu.conf): the only group
    /// that may traverse the state dir and read base images. Empty: none.
    pub qemu_group: String,
    /// Directory of image catalog files (`*.toml`) that add to or replace the shipped
    /// entries of `aether image pull` (see `images::catalog`).
    pub image_catalog_dir: PathBuf,
    /// Per-user caps (the `[quota]` table).
    pub quota: crate::quota::Quotas,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/aether/aetherd.sock"),
            state_dir: PathBuf::from("/var/lib/aether"),
            libvirt_uri: "qemu:///system".to_owned(),
            max_volume_size_gb: 2048,
            stop_timeout_secs: 60,
            libvirt_timeout_secs: 30,
            accel: Accel::Auto,
            default_image: String::new(),
            network_cidr: None,
            boot_timeout_secs: None,
            idle_timeout: "10m".to_owned(),
            idle_action: IdleAction::Suspend,
            memory_overcommit: 1.0,
            reserved_host_cpus: vec![0],
            gpu_allow: Vec::new(),
            image_catalog_dir: PathBuf::from("/etc/aether/images.d"),
            qemu_group: "libvirt-qemu".to_owned(),
            quota: crate::quota::Quotas::default(),
        }
    }
}

impl Config {
    /// Reads `path`; when `explicit` is false a missing file yields the defaults.
    pub fn load(path: &Path, explicit: bool) -> anyhow::Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default())
            }
            Err(e) => anyhow::bail!("cannot read config file {}: {e}", path.display()),
        };
        let config: Config = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_volume_size_gb >= 1,
            "max_volume_size_gb must be at least 1"
        );
        anyhow::ensure!(
            self.libvirt_timeout_secs >= 1,
            "libvirt_timeout_secs must be at least 1"
        );
        anyhow::ensure!(
            self.memory_overcommit > 0.0 && self.memory_overcommit <= 16.0,
            "memory_overcommit must be more than 0 and at most 16"
        );
        crate::model::parse_duration_secs(&self.idle_timeout)
            .map_err(|e| anyhow::anyhow!("idle_timeout: {e}"))?;
        for entry in &self.gpu_allow {
            anyhow::ensure!(
                crate::hypervisor::gpu::valid_allow_entry(entry),
                "gpu_allow: {entry:?} is neither a PCI address such as \"0000:01:00.0\" nor a GPU kind such as \"nvidia-tesla-t4\""
            );
        }
        Ok(())
    }

    /// The default idle timeout in seconds (0: never); validated at load.
    pub fn idle_timeout_secs(&self) -> u64 {
        crate::model::parse_duration_secs(&self.idle_timeout).unwrap_or(600)
    }
}

#[cfg(test)]
mod tests {
    use super::{Accel, Config};

    #[test]
    fn missing_default_file_gives_defaults_but_explicit_one_fails() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none.toml");
        let c = Config::load(&p, false).unwrap();
        assert_eq!(c.max_volume_size_gb, 2048);
        assert_eq!(c.libvirt_uri, "qemu:///system");
        assert!(Config::load(&p, true).is_err());
    }

    #[test]
    fn file_values_and_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "max_volume_size_gb = 64\naccel = \"tcg\"\n").unwrap();
        let c = Config::load(&p, true).unwrap();
        assert_eq!(c.max_volume_size_gb, 64);
        assert_eq!(c.accel, Accel::Tcg);
        assert_eq!(c.stop_timeout_secs, 60);
        std::fs::write(&p, "max_volume_sise_gb = 64\n").unwrap();
        let err = Config::load(&p, true).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
        std::fs::write(&p, "max_volume_size_gb = 0\n").unwrap();
        assert!(Config::load(&p, true).is_err());
    }

    #[test]
    fn gpu_allow_takes_addresses_and_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        assert!(Config::load(&p, false).unwrap().gpu_allow.is_empty());
        std::fs::write(&p, "gpu_allow = [\"0000:01:00.0\", \"nvidia-tesla-t4\"]\n").unwrap();
        let c = Config::load(&p, true).unwrap();
        assert_eq!(c.gpu_allow, ["0000:01:00.0", "nvidia-tesla-t4"]);
        std::fs::write(&p, "gpu_allow = [\"0000:01:00.0, 0000:02:00.0\"]\n").unwrap();
        let err = Config::load(&p, true).unwrap_err().to_string();
        assert!(err.starts_with("gpu_allow: "), "{err}");
    }
}
