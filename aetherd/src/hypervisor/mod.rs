//! A thin layer over the `virt` crate: one libvirt connection for the daemon's lifetime, every
//! call run off the async runtime (`spawn_blocking`) with a timeout.
//!
//! Invariant: the daemon only touches domains named `aether-<workspace id>` whose `<metadata>`
//! carries the aether element with that same id. A domain with the right name but without the
//! element belongs to someone else and is never redefined, stopped or undefined.

pub mod xml;

use std::time::Duration;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;

use crate::config::Accel;
use crate::error::{Error, Result};
use crate::model::WorkspaceId;
pub use xml::{DomainSpec, DomainType};

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
    uri: String,
    timeout: Duration,
    domain_type: DomainType,
}

fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    e.code().is(ErrorNumber::NoDomain)
}

/// Looks up the domain of `ws`, checking that it carries aether's metadata for `ws`.
fn owned_domain(conn: &Connect, ws: &WorkspaceId) -> Result<Option<Domain>> {
    let name = ws.domain_name();
    let dom = match conn.lookup_domain_by_name(&name) {
        Ok(d) => d,
        Err(e) if is_no_domain(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let owner = dom
        .metadata(METADATA_ELEMENT, Some(xml::METADATA_NS), 0)
        .ok()
        .and_then(|m: String| xml::metadata_workspace_id(&m));
    if owner.as_deref() != Some(ws.as_str()) {
        return Err(Error::FailedPrecondition(format!(
            "libvirt domain {name} exists but is not managed by aether for {ws}; refusing to touch it"
        )));
    }
    Ok(Some(dom))
}

impl Hypervisor {
    /// Opens the connection. The test driver (`test://…`) always uses domain type `test`.
    pub async fn connect(uri: &str, timeout: Duration, accel: Accel) -> Result<Self> {
        // libvirt's default handler prints every error (including the expected "domain not
        // found" of a lookup) to stderr; errors reach us as return values instead.
        virt::error::clear_error_callback();
        let owned_uri = uri.to_owned();
        let conn = run_blocking("virConnectOpen", timeout, move || {
            Connect::open(Some(&owned_uri)).map_err(Error::from)
        })
        .await?;
        let domain_type = if uri.starts_with("test:") {
            DomainType::Test
        } else {
            match accel {
                Accel::Kvm => DomainType::Kvm,
                Accel::Tcg => DomainType::Qemu,
                Accel::Auto => {
                    tracing::warn!(
                        "accel = auto: KVM is not probed yet, using TCG (set accel = \"kvm\" to force KVM)"
                    );
                    DomainType::Qemu
                }
            }
        };
        Ok(Self {
            conn,
            uri: uri.to_owned(),
            timeout,
            domain_type,
        })
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
                Error::Libvirt(format!("domain {} is not defined", ws.domain_name()))
            })?;
            if !dom.is_active()? {
                dom.create()?;
            }
            Ok(())
        })
        .await
    }

    /// Sends an ACPI shutdown request; returns at once.
    pub async fn shutdown(&self, ws: &WorkspaceId) -> Result<()> {
        let ws = ws.clone();
        self.call("virDomainShutdown", move |c| {
            if let Some(dom) = owned_domain(c, &ws)? {
                if dom.is_active()? {
                    dom.shutdown()?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Powers the domain off at once. A domain that is off or missing is fine.
    pub async fn destroy(&self, ws: &WorkspaceId) -> Result<()> {
        let ws = ws.clone();
        self.call("virDomainDestroy", move |c| {
            if let Some(dom) = owned_domain(c, &ws)? {
                if dom.is_active()? {
                    dom.destroy()?;
                }
            }
            Ok(())
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
                dom.undefine()?;
            }
            Ok(())
        })
        .await
    }
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
        Err(_) => Err(Error::LibvirtTimeout(what, timeout.as_secs())),
    }
}
