//! Per-user caps: what one member of group `aether` may take of a shared host.
//!
//! Caps apply to every caller but root (and the daemon's own user), and are checked before
//! anything changes, against what the user already has: a refused request changes nothing
//! and fails with RESOURCE_EXHAUSTED naming the cap, its config key and the usage.
//! Configured in the `[quota]` table of aetherd.toml; every key has a default.

use serde::Deserialize;

use crate::caller::Caller;
use crate::error::{Error, Result};

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Quotas {
    /// Workspaces a user may have (in any state).
    pub workspaces: u32,
    /// vCPUs of a user's running workspaces, together.
    pub running_vcpus: u32,
    /// Memory (MiB) of a user's running workspaces, together.
    pub running_memory_mb: u64,
    /// Root volume GiB of all of a user's workspaces, together.
    pub volume_gb: u64,
    /// A user's running tasks, together.
    pub tasks: u32,
    /// A user's open tunnels (ssh, proxy, port-forward connections), together.
    pub tunnels: u32,
    /// Size of one image upload, in GiB.
    pub upload_gb: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            workspaces: 10,
            running_vcpus: 16,
            running_memory_mb: 32768,
            volume_gb: 1024,
            tasks: 32,
            tunnels: 128,
            upload_gb: 64,
        }
    }
}

/// One thing a request would add to a user's usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    Workspaces(u32),
    RunningVcpus(u32),
    RunningMemoryMb(u64),
    VolumeGb(u64),
    Tasks(u32),
    Tunnels(u32),
    UploadGb(u64),
}

impl Quotas {
    /// Refuses when `used + claim` would pass the cap for `uid`'s `claim`.
    pub fn check(&self, uid: u32, used: u64, claim: Claim) -> Result<()> {
        let (adding, cap, key, unit) = match claim {
            Claim::Workspaces(n) => (
                u64::from(n),
                u64::from(self.workspaces),
                "workspaces",
                "workspaces",
            ),
            Claim::RunningVcpus(n) => (
                u64::from(n),
                u64::from(self.running_vcpus),
                "running_vcpus",
                "vCPUs running",
            ),
            Claim::RunningMemoryMb(n) => (
                n,
                self.running_memory_mb,
                "running_memory_mb",
                "MiB of memory running",
            ),
            Claim::VolumeGb(n) => (n, self.volume_gb, "volume_gb", "GiB of volumes"),
            Claim::Tasks(n) => (
                u64::from(n),
                u64::from(self.tasks),
                "tasks",
                "tasks running",
            ),
            Claim::Tunnels(n) => (
                u64::from(n),
                u64::from(self.tunnels),
                "tunnels",
                "tunnels open",
            ),
            Claim::UploadGb(n) => (n, self.upload_gb, "upload_gb", "GiB in one upload"),
        };
        if used.saturating_add(adding) > cap {
            return Err(Error::ResourceExhausted(format!(
                "quota exceeded: uid {uid} would have {} {unit} (has {used}, asks for {adding}); the cap is {cap} (quota.{key} in the daemon's config)",
                used.saturating_add(adding)
            )));
        }
        Ok(())
    }

    /// [`Quotas::check`] for `caller`, whose usage is `used`: root is not capped.
    pub fn check_for(&self, caller: Caller, used: u64, claim: Claim) -> Result<()> {
        if caller.admin {
            return Ok(());
        }
        self.check(caller.uid, used, claim)
    }
}

#[cfg(test)]
mod tests {
    use super::{Claim, Quotas};
    use crate::error::Error;

    #[test]
    fn caps_refuse_past_the_limit_naming_key_and_usage() {
        let q = Quotas {
            workspaces: 2,
            ..Quotas::default()
        };
        assert!(q.check(1000, 1, Claim::Workspaces(1)).is_ok());
        let err = q.check(1000, 2, Claim::Workspaces(1)).unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)));
        assert_eq!(
            err.to_string(),
            "quota exceeded: uid 1000 would have 3 workspaces (has 2, asks for 1); the cap is 2 (quota.workspaces in the daemon's config)"
        );
        assert!(q.check(1000, u64::MAX, Claim::VolumeGb(1)).is_err());
        let t: Quotas = toml::from_str("tasks = 3").unwrap();
        assert_eq!(t.tasks, 3);
        assert_eq!(t.workspaces, 10);
        assert!(toml::from_str::<Quotas>("task = 3").is_err());
    }
}
