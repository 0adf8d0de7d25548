//! Placement: whether the host and the owner's quota can run a workspace, and which host
//! CPUs (for a `performance` workspace) and GPU it gets. No I/O: it decides from the
//! workspaces as the start's store transaction read them (see
//! [`Store::write_transition`](crate::store::Store::write_transition)), so two starts cannot
//! both take the last free CPU, memory or GPU.

use crate::caller::Caller;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hypervisor::gpu::Gpu;
use crate::model::WorkspaceId;
use crate::quota::{Claim, Quotas};
use crate::store::Workspace;

/// The host's CPUs, memory and GPUs, and the config that limits their use.
pub struct Placement {
    cpus: u32,
    memory_mib: u64,
    gpus: Vec<Gpu>,
    memory_overcommit: f64,
    reserved_host_cpus: Vec<u32>,
    quota: Quotas,
}

impl Placement {
    /// `host` is the host's (CPUs, memory in MiB), read once at start.
    pub fn new(host: (u32, u64), gpus: Vec<Gpu>, config: &Config) -> Self {
        Self {
            cpus: host.0,
            memory_mib: host.1,
            gpus,
            memory_overcommit: config.memory_overcommit,
            reserved_host_cpus: config.reserved_host_cpus.clone(),
            quota: config.quota.clone(),
        }
    }

    pub fn host_cpus(&self) -> u32 {
        self.cpus
    }

    pub fn host_memory_mib(&self) -> u64 {
        self.memory_mib
    }

    pub fn gpus(&self) -> &[Gpu] {
        &self.gpus
    }

    /// Picks what `ws` needs to run (for the runner's start transition, in its store
    /// transaction, given every workspace): refused when `caller`'s quota or the host cannot
    /// run it; otherwise the host CPUs dedicated to it and its GPU.
    pub fn place(
        &self,
        caller: Caller,
        ws: &Workspace,
        all: &[Workspace],
    ) -> Result<(Vec<u32>, Option<String>)> {
        self.check_quota_to_run(caller, ws, all)?;
        self.check_capacity(ws, all)?;
        let cpus = self.allocate_cpus(ws, all)?;
        let gpu = self.allocate_gpu(ws, all)?;
        Ok((cpus, gpu))
    }

    /// Whether the owner's quota lets `ws` run next to its other running workspaces.
    fn check_quota_to_run(&self, caller: Caller, ws: &Workspace, all: &[Workspace]) -> Result<()> {
        let hw = ws.pending_hardware.as_ref().unwrap_or(&ws.hardware);
        let running: Vec<&Workspace> = all
            .iter()
            .filter(|w| w.owner_uid == ws.owner_uid && w.id != ws.id && !w.state.vm_is_off())
            .collect();
        let vcpus: u64 = running.iter().map(|w| u64::from(w.hardware.cpus)).sum();
        self.quota
            .check_for(caller, vcpus, Claim::RunningVcpus(hw.cpus))?;
        let memory: u64 = running
            .iter()
            .map(|w| u64::from(w.hardware.memory_mb))
            .sum();
        self.quota.check_for(
            caller,
            memory,
            Claim::RunningMemoryMb(u64::from(hw.memory_mb)),
        )
    }

    /// Whether the host can run `ws` with the hardware it will start with, next to the
    /// workspaces whose VMs are on.
    fn check_capacity(&self, ws: &Workspace, all: &[Workspace]) -> Result<()> {
        let hw = ws.pending_hardware.as_ref().unwrap_or(&ws.hardware);
        let (host_cpus, host_mib) = (self.cpus, self.memory_mib);
        if hw.cpus > host_cpus {
            return Err(Error::ResourceExhausted(format!(
                "workspace {} needs {} vCPUs but this host has {host_cpus} CPUs",
                ws.id, hw.cpus
            )));
        }
        let allowed = (host_mib as f64 * self.memory_overcommit) as u64;
        let in_use: u64 = all
            .iter()
            .filter(|w| w.id != ws.id && !w.state.vm_is_off())
            .map(|w| u64::from(w.hardware.memory_mb))
            .sum();
        if in_use + u64::from(hw.memory_mb) > allowed {
            return Err(Error::ResourceExhausted(format!(
                "workspace {} needs {} MiB of memory; running workspaces use {in_use} of the {allowed} MiB allowed (memory_overcommit {} x {host_mib} MiB of host memory)",
                ws.id, hw.memory_mb, self.memory_overcommit
            )));
        }
        Ok(())
    }

    /// Host CPUs that performance workspaces may be given: all but `reserved_host_cpus`.
    fn dedicatable_cpus(&self) -> Vec<u32> {
        (0..self.cpus)
            .filter(|c| !self.reserved_host_cpus.contains(c))
            .collect()
    }

    /// Host CPUs dedicated to nobody: where shared workspaces' vCPUs and every workspace's
    /// emulator threads run. Empty while nothing is dedicated (then they float over all CPUs),
    /// and also when everything is (`reserved_host_cpus = []`): nothing is left to confine to.
    pub fn shared_cpus(&self, workspaces: &[Workspace]) -> Vec<u32> {
        let held = held_cpus(workspaces, None);
        if held.is_empty() {
            return Vec::new();
        }
        (0..self.cpus).filter(|c| !held.contains(c)).collect()
    }

    /// For a performance workspace, picks one free dedicatable host CPU per vCPU (lowest
    /// first); refused when too few are free. Shared workspaces get none.
    fn allocate_cpus(&self, ws: &Workspace, all: &[Workspace]) -> Result<Vec<u32>> {
        let hw = ws.pending_hardware.as_ref().unwrap_or(&ws.hardware);
        if hw.cpu_kind != crate::model::CpuKind::Performance {
            return Ok(Vec::new());
        }
        let held = held_cpus(all, Some(&ws.id));
        let dedicatable = self.dedicatable_cpus();
        let free: Vec<u32> = dedicatable
            .iter()
            .copied()
            .filter(|c| !held.contains(c))
            .collect();
        if (free.len() as u32) < hw.cpus {
            return Err(Error::ResourceExhausted(format!(
                "workspace {} needs {} dedicated CPUs (cpu kind performance); {} of this host's {} dedicatable CPUs are free (reserved_host_cpus {:?})",
                ws.id,
                hw.cpus,
                free.len(),
                dedicatable.len(),
                self.reserved_host_cpus
            )));
        }
        Ok(free[..hw.cpus as usize].to_vec())
    }

    /// For a workspace with a GPU kind, picks a GPU of that kind that no running workspace
    /// holds; refused when all are held.
    fn allocate_gpu(&self, ws: &Workspace, all: &[Workspace]) -> Result<Option<String>> {
        let hw = ws.pending_hardware.as_ref().unwrap_or(&ws.hardware);
        let Some(kind) = &hw.gpu_kind else {
            return Ok(None);
        };
        let holders: Vec<(&str, &WorkspaceId)> = all
            .iter()
            .filter(|w| w.id != ws.id && !w.state.vm_is_off())
            .filter_map(|w| w.gpu_device.as_deref().map(|d| (d, &w.id)))
            .collect();
        let of_kind: Vec<_> = self.gpus.iter().filter(|g| g.kind == *kind).collect();
        if of_kind.is_empty() {
            return Err(Error::ResourceExhausted(format!(
                "this host has no GPU of kind {kind} (any more)"
            )));
        }
        match of_kind
            .iter()
            .find(|g| !holders.iter().any(|(d, _)| *d == g.device))
        {
            Some(g) => Ok(Some(g.device.clone())),
            None => {
                // In the order of the GPUs' addresses.
                let users: Vec<String> = of_kind
                    .iter()
                    .filter_map(|g| holders.iter().find(|(d, _)| *d == g.device))
                    .map(|(_, w)| w.to_string())
                    .collect();
                Err(Error::ResourceExhausted(format!(
                    "all {} GPU(s) of kind {kind} are in use (by {}); stop one of those workspaces first",
                    of_kind.len(),
                    users.join(", ")
                )))
            }
        }
    }

    /// The host's GPUs with the workspace holding each, if any.
    pub fn gpu_holders(&self, all: &[Workspace]) -> Vec<(Gpu, Option<WorkspaceId>)> {
        self.gpus
            .iter()
            .map(|g| {
                let holder = all
                    .iter()
                    .find(|w| {
                        !w.state.vm_is_off() && w.gpu_device.as_deref() == Some(g.device.as_str())
                    })
                    .map(|w| w.id.clone());
                (g.clone(), holder)
            })
            .collect()
    }
}

/// Host CPUs dedicated to the workspaces whose VM is on, `except` one.
fn held_cpus(workspaces: &[Workspace], except: Option<&WorkspaceId>) -> Vec<u32> {
    workspaces
        .iter()
        .filter(|w| Some(&w.id) != except && !w.state.vm_is_off())
        .flat_map(|w| w.dedicated_cpus.iter().copied())
        .collect()
}
