//! A thin layer over the `virt` crate: one libvirt connection for the daemon's lifetime, every
//! call run off the async runtime (`spawn_blocking`) with a timeout.
//!
//! Invariant: the daemon only touches domains named `aether-<workspace id>` whose `<metadata>`
//! carries the aether element with that same id. A domain with the right name but without the
//! element belongs to someone else and is never redefined, stopped or undefined.

pub mod accel;
pub mod error;
pub mod events;
pub mod gpu;
pub mod leases;
mod net;
pub mod nwfilter;
mod save;
pub mod xml;

use std::time::Duration;

use std::path::{Path, PathBuf};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::sys;

use crate::config::Accel;
use crate::error::{Error, Result};
use crate::model::WorkspaceId;
pub use xml::{Boot, DomainSpec, DomainType};

/// Name of the storage pool aether keeps its volumes in.
pub const POOL_NAME: &str = "aether";

/// `VIR_DOMAIN_METADATA_ELEMENT`: metadata stored as a custom XML element.
const METADATA_ELEMENT: i32 = 2;

/// What libvirt says about a workspace's domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainStatus {
    /// No domain with that name.
    Missing,
    /// Defined and not running.
    Off,
    /// Running (or paused, or in any other active state).
    Active,
}

#[derive(Clone, Debug)]
pub struct HostVersions {
    pub libvirt_version: String,
    pub hypervisor: String,
}

pub struct Hypervisor {
    conn: Connect,
    /// Lifecycle events, until [`Hypervisor::take_events`] hands them to their consumer.
    events: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<events::DomainEvent>>>,
    uri: String,
    timeout: Duration,
    domain_type: DomainType,
    /// Why the accelerator is what it is ("configured", or the probe's finding).
    accel_reason: String,
}

fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    e.code().is(ErrorNumber::NoDomain)
}

fn pool(conn: &Connect) -> Result<StoragePool> {
    conn.lookup_storage_pool_by_name(POOL_NAME)
        .map_err(|e| Error::libvirt(format!("storage pool {POOL_NAME}: {}", e.message())))
}

fn find_volume(conn: &Connect, name: &str) -> Result<Option<StorageVol>> {
    match pool(conn)?.lookup_storage_vol_by_name(name) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.code().is(ErrorNumber::NoStorageVolume) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Looks up the domain of `ws`, checking that it carries aether's metadata for `ws`.
fn owned_domain(conn: &Connect, ws: &WorkspaceId) -> Result<Option<Domain>> {
    let name = ws.domain_name();
    let dom = match conn.lookup_domain_by_name(&name) {
        Ok(d) => d,
        Err(e) if is_no_domain(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if !made_for(&dom, ws) {
        return Err(Error::FailedPrecondition(format!(
            "libvirt domain {name} exists but is not managed by aether for {ws}; refusing to touch it"
        )));
    }
    Ok(Some(dom))
}

/// Whether `dom` carries aether's metadata for `ws`.
fn made_for(dom: &Domain, ws: &WorkspaceId) -> bool {
    let owner = dom
        .metadata(METADATA_ELEMENT, Some(xml::METADATA_NS), 0)
        .ok()
        .and_then(|m: String| xml::metadata_workspace_id(&m));
    owner.as_deref() == Some(ws.as_str())
}

impl Hypervisor {
    /// Opens the connection. The test driver (`test://…`) always uses domain type `test`.
    pub async fn connect(uri: &str, timeout: Duration, accel: Accel) -> Result<Self> {
        // libvirt's default handler prints every error (including the expected "domain not
        // found" of a lookup) to stderr; errors reach us as return values instead.
        virt::error::clear_error_callback();
        events::start_event_loop();
        let owned_uri = uri.to_owned();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let conn = run_blocking("virConnectOpen", timeout, move || {
            let conn = Connect::open(Some(&owned_uri)).map_err(Error::from)?;
            events::subscribe(&conn, tx)?;
            Ok(conn)
        })
        .await?;
        let (domain_type, accel_reason) = if uri.starts_with("test:") {
            (DomainType::Test, "libvirt's test driver".to_owned())
        } else {
            match accel {
                Accel::Kvm => (DomainType::Kvm, "accel = \"kvm\" in the config".to_owned()),
                Accel::Tcg => (DomainType::Qemu, "accel = \"tcg\" in the config".to_owned()),
                Accel::Auto => {
                    let scratch = std::env::temp_dir();
                    let (kvm, why) = tokio::task::spawn_blocking(move || {
                        accel::auto_choose(Path::new("/usr/bin/qemu-system-x86_64"), &scratch)
                    })
                    .await
                    .map_err(|e| Error::Internal(format!("accelerator probe panicked: {e}")))?;
                    if kvm {
                        tracing::info!(reason = %why, "accelerator: kvm");
                        (DomainType::Kvm, why)
                    } else {
                        tracing::warn!(reason = %why, "accelerator: tcg (software emulation, slower)");
                        (DomainType::Qemu, why)
                    }
                }
            }
        };
        Ok(Self {
            conn,
            events: std::sync::Mutex::new(Some(rx)),
            uri: uri.to_owned(),
            timeout,
            domain_type,
            accel_reason,
        })
    }

    /// Why the accelerator is what it is.
    pub fn accel_reason(&self) -> &str {
        &self.accel_reason
    }

    /// How long libvirt takes to describe what qemu can do for a domain (what every define
    /// asks): a few milliseconds from its cache, seconds when it re-probes qemu each time
    /// (it does while `/dev/kvm` is not usable by its qemu user).
    pub async fn time_domain_capabilities(&self) -> Result<Duration> {
        let virttype = match self.domain_type {
            DomainType::Kvm => "kvm",
            DomainType::Qemu | DomainType::Test => "qemu",
        };
        self.call("virConnectGetDomainCapabilities", move |c| {
            let started = std::time::Instant::now();
            c.domain_capabilities(None, Some("x86_64"), None, Some(virttype), 0)?;
            Ok(started.elapsed())
        })
        .await
    }

    /// The lifecycle event stream (once).
    pub fn take_events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<events::DomainEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn domain_type(&self) -> DomainType {
        self.domain_type
    }

    async fn call<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Connect) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        run_blocking(what, self.timeout, move || f(&conn)).await
    }

    pub async fn versions(&self) -> Result<HostVersions> {
        self.call("virConnectGetVersion", |c| {
            Ok(HostVersions {
                libvirt_version: version_string(c.lib_version()?),
                hypervisor: format!("{} {}", c.driver_type()?, version_string(c.hyp_version()?)),
            })
        })
        .await
    }

    /// The host's GPUs (PCI display controllers among libvirt's node devices).
    pub async fn gpus(&self, allow: &[String]) -> Result<Vec<gpu::Gpu>> {
        let allow = allow.to_vec();
        self.call("virConnectListAllNodeDevices", move |c| {
            // No capability filter: the test driver refuses every flag.
            let mut gpus = Vec::new();
            for dev in c.list_all_node_devices(0)? {
                let (name, xml) = (dev.name()?, dev.xml_desc(0)?);
                gpus.extend(gpu::parse(&name, &xml, &allow));
            }
            gpus.sort_by_key(|g| g.address());
            Ok(gpus)
        })
        .await
    }

    /// The host's CPU count and memory (MiB), as libvirt sees them.
    pub async fn host_resources(&self) -> Result<(u32, u64)> {
        self.call("virNodeGetInfo", |c| {
            let info = c.node_info()?;
            Ok((info.cpus, info.memory / 1024))
        })
        .await
    }

    /// Makes sure the dir pool `aether` at `path` exists, is active and autostarts.
    pub async fn ensure_pool(&self, path: &Path) -> Result<()> {
        let xml = xml::pool_xml(POOL_NAME, path);
        let path = path.to_owned();
        self.call("virStoragePoolCreate", move |c| {
            let p = match c.lookup_storage_pool_by_name(POOL_NAME) {
                Ok(p) => p,
                Err(e) if e.code().is(ErrorNumber::NoStoragePool) => {
                    tracing::info!(pool = POOL_NAME, "defining storage pool");
                    let p = c.define_storage_pool_xml(&xml, 0)?;
                    p.build(sys::VIR_STORAGE_POOL_BUILD_NEW)?;
                    p
                }
                Err(e) => return Err(e.into()),
            };
            let xml_now = p.xml_desc(0)?;
            let want = format!("<path>{}</path>", path.display());
            if !xml_now.contains(&want) {
                return Err(Error::FailedPrecondition(format!(
                    "libvirt storage pool {POOL_NAME} exists but is not at {}; remove it (virsh pool-destroy {POOL_NAME}; virsh pool-undefine {POOL_NAME}) or point state_dir at it",
                    path.display()
                )));
            }
            if !p.is_active()? {
                p.create(0)?;
            }
            if !p.autostart()? {
                p.set_autostart(true)?;
            }
            p.refresh(0)?;
            Ok(())
        })
        .await
    }

    /// Rescans the pool so libvirt knows volumes the daemon wrote itself.
    pub async fn refresh_pool(&self) -> Result<()> {
        self.call("virStoragePoolRefresh", |c| Ok(pool(c)?.refresh(0)?))
            .await
    }

    /// Creates the qcow2 overlay `name` on `backing` (idempotent) and returns its path.
    pub async fn create_overlay(
        &self,
        name: &str,
        capacity_gib: u32,
        backing: &Path,
    ) -> Result<PathBuf> {
        let xml = xml::overlay_volume_xml(name, capacity_gib, backing);
        let name = name.to_owned();
        self.call("virStorageVolCreateXML", move |c| {
            let vol = match find_volume(c, &name)? {
                Some(v) => v,
                None => StorageVol::create_xml(&pool(c)?, &xml, 0)?,
            };
            Ok(PathBuf::from(vol.path()?))
        })
        .await
    }

    /// Grows the workspace's root volume `name` to `bytes`: a live block resize while the
    /// domain runs, a volume resize otherwise. libvirt's test driver can do neither, so
    /// there this only records nothing and succeeds (the end-to-end tests cover it).
    pub async fn grow_root(
        &self,
        ws: &WorkspaceId,
        name: &str,
        bytes: u64,
        running: bool,
    ) -> Result<()> {
        if self.domain_type == DomainType::Test {
            return Ok(());
        }
        let ws = ws.clone();
        let name = name.to_owned();
        self.call("virStorageVolResize", move |c| {
            if running {
                let dom = owned_domain(c, &ws)?.ok_or_else(|| {
                    Error::libvirt(format!("domain {} is not defined", ws.domain_name()))
                })?;
                dom.block_resize("vda", bytes, sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES)?;
            } else {
                let vol = find_volume(c, &name)?
                    .ok_or_else(|| Error::libvirt(format!("volume {name} not found")))?;
                vol.resize(bytes, 0)?;
            }
            Ok(())
        })
        .await
    }

    /// Deletes volume `name`; a missing volume is fine.
    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.call("virStorageVolDelete", move |c| {
            if let Some(v) = find_volume(c, &name)? {
                v.delete(0)?;
            }
            Ok(())
        })
        .await
    }

    /// Defines (or redefines) the domain from `spec`. Idempotent.
    pub async fn define(&self, spec: &DomainSpec) -> Result<()> {
        let xml = xml::domain_xml(spec);
        let ws = spec.workspace.clone();
        self.call("virDomainDefineXML", move |c| {
            owned_domain(c, &ws)?;
            c.define_domain_xml(&xml)?;
            Ok(())
        })
        .await
    }

    pub async fn status(&self, ws: &WorkspaceId) -> Result<DomainStatus> {
        let ws = ws.clone();
        self.call("virDomainIsActive", move |c| {
            Ok(match owned_domain(c, &ws)? {
                None => DomainStatus::Missing,
                Some(d) if d.is_active()? => DomainStatus::Active,
                Some(_) => DomainStatus::Off,
            })
        })
        .await
    }

    /// Boots the domain; a domain that is already running is left alone.
    pub async fn start(&self, ws: &WorkspaceId) -> Result<()> {
        let ws = ws.clone();
        self.call("virDomainCreate", move |c| {
            let dom = owned_domain(c, &ws)?.ok_or_else(|| {
                Error::libvirt(format!("domain {} is not defined", ws.domain_name()))
            })?;
            if !dom.is_active()? {
                dom.create()?;
            }
            Ok(())
        })
        .await
    }

    /// Runs `f` on the workspace's domain if it exists and is running; otherwise does nothing.
    async fn if_active(
        &self,
        what: &'static str,
        ws: &WorkspaceId,
        f: fn(&Domain) -> std::result::Result<(), virt::error::Error>,
    ) -> Result<()> {
        let ws = ws.clone();
        self.call(what, move |c| {
            if let Some(dom) = owned_domain(c, &ws)? {
                if dom.is_active()? {
                    f(&dom)?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Sends an ACPI shutdown request; returns at once.
    pub async fn shutdown(&self, ws: &WorkspaceId) -> Result<()> {
        self.if_active("virDomainShutdown", ws, Domain::shutdown)
            .await
    }

    /// Powers the domain off at once. A domain that is off or missing is fine.
    pub async fn destroy(&self, ws: &WorkspaceId) -> Result<()> {
        self.if_active("virDomainDestroy", ws, Domain::destroy)
            .await
    }

    /// Confines a running domain's emulator threads to `cpus`, and its vCPUs too when
    /// `vcpus_too` (a shared workspace; a performance one keeps its vCPU pins). Applies to the
    /// live domain only: its next start takes the pins from the XML. A domain that is off or
    /// missing is left alone.
    pub async fn pin_to(&self, ws: &WorkspaceId, cpus: &[u32], vcpus_too: bool) -> Result<()> {
        let ws = ws.clone();
        let map = cpumap(cpus);
        self.call("virDomainPinVcpuFlags", move |c| {
            let Some(dom) = owned_domain(c, &ws)? else {
                return Ok(());
            };
            if !dom.is_active()? {
                return Ok(());
            }
            if vcpus_too {
                for vcpu in 0..dom.info()?.nr_virt_cpu {
                    // Flags 0: the current (live) domain.
                    dom.pin_vcpu_flags(vcpu, &map, 0)?;
                }
            }
            dom.pin_emulator(&map, 0)?;
            Ok(())
        })
        .await
    }

    /// Every domain aether made (named `aether-<workspace>` and carrying aether's metadata
    /// for that workspace), with whether it is running.
    pub async fn owned_domains(&self) -> Result<Vec<(WorkspaceId, bool)>> {
        self.call("virConnectListAllDomains", |c| {
            let mut owned = Vec::new();
            for dom in c.list_all_domains(0)? {
                let Some(ws) = dom
                    .name()
                    .ok()
                    .and_then(|n| WorkspaceId::from_domain_name(&n))
                else {
                    continue;
                };
                // A domain of that name that is not aether's is left out, not an error.
                if made_for(&dom, &ws) {
                    owned.push((ws, dom.is_active()?));
                }
            }
            Ok(owned)
        })
        .await
    }

    /// Removes the domain definition. A missing domain is fine.
    pub async fn undefine(&self, ws: &WorkspaceId) -> Result<()> {
        let ws = ws.clone();
        self.call("virDomainUndefine", move |c| {
            if let Some(dom) = owned_domain(c, &ws)? {
                if dom.is_active()? {
                    dom.destroy()?;
                }
                // A UEFI domain has an NVRAM (variable store) file, which goes with it. (Asked
                // only then: libvirt's test driver refuses the flag.)
                let xml = dom.xml_desc(0)?;
                if xml.contains("<nvram") || xml.contains("firmware='efi'") {
                    dom.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_NVRAM)?;
                } else {
                    dom.undefine()?;
                }
            }
            Ok(())
        })
        .await
    }
}

/// libvirt's CPU bitmap: bit `c % 8` of byte `c / 8` set for each host CPU `c`.
fn cpumap(cpus: &[u32]) -> Vec<u8> {
    let len = cpus.iter().max().map_or(1, |m| *m as usize / 8 + 1);
    let mut map = vec![0u8; len];
    for &c in cpus {
        map[c as usize / 8] |= 1 << (c % 8);
    }
    map
}

/// Runs a blocking libvirt call on the blocking pool, giving up after `timeout`. A call that
/// times out keeps its thread until libvirt returns; the caller gets an error at once.
async fn run_blocking<T: Send + 'static>(
    what: &'static str,
    timeout: Duration,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(Error::Internal(format!("{what} panicked: {join}"))),
        Err(_) => Err(Error::Hypervisor(error::HypervisorError::Timeout {
            call: what,
            secs: timeout.as_secs(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::cpumap;

    #[test]
    fn cpumap_sets_one_bit_per_cpu() {
        assert_eq!(cpumap(&[0]), vec![0b1]);
        assert_eq!(cpumap(&[0, 2, 3]), vec![0b1101]);
        assert_eq!(cpumap(&[1, 9]), vec![0b10, 0b10]);
        assert_eq!(cpumap(&[8]), vec![0, 1]);
    }
}
