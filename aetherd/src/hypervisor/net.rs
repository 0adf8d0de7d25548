//! The `aether` network on the libvirt side: the network itself, its DHCP reservations and
//! leases, a lease's release, and the guests' isolation filters.

use std::net::Ipv4Addr;

use virt::error::ErrorNumber;
use virt::network::Network;
use virt::sys;

use super::{leases, nwfilter, DomainType, Hypervisor};
use crate::error::{Error, Result};
use crate::network::{self, Subnet};

impl Hypervisor {
    /// Makes sure the NAT network `aether` exists, is active and autostarts; returns its
    /// subnet. An existing network keeps its subnet; a new one gets `preferred` or the
    /// first candidate that collides with no host route.
    pub async fn ensure_network(&self, preferred: Option<Subnet>) -> Result<Subnet> {
        self.call("virNetworkCreate", move |c| {
            let net = match c.lookup_network_by_name(network::NETWORK_NAME) {
                Ok(n) => n,
                Err(e) if e.code().is(ErrorNumber::NoNetwork) => {
                    let subnet = match preferred {
                        Some(s) => s,
                        None => Subnet::choose(&network::host_routes())?,
                    };
                    tracing::info!(network = network::NETWORK_NAME, gateway = %subnet.gateway(), "defining network");
                    c.define_network_xml(&network::network_xml(&subnet))?
                }
                Err(e) => return Err(e.into()),
            };
            // A network made by an older aetherd has a dynamic range, which caps the leases
            // dnsmasq hands out (see `network`'s module doc). Removing it live restarts
            // dnsmasq, which keeps the leases of running guests.
            for range in network::dhcp_ranges_of_network_xml(&net.xml_desc(0)?) {
                tracing::info!(network = network::NETWORK_NAME, %range, "removing the dynamic DHCP range: guests get their reservations only");
                net.update(
                    sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
                    sys::VIR_NETWORK_SECTION_IP_DHCP_RANGE,
                    -1,
                    &range,
                    update_flags(&net)?,
                )?;
            }
            if !net.is_active()? {
                net.create()?;
            }
            if !net.autostart()? {
                net.set_autostart(true)?;
            }
            let xml = net.xml_desc(0)?;
            network::subnet_of_network_xml(&xml).ok_or_else(|| {
                Error::libvirt(format!(
                    "network {} has no IPv4 address; delete it or give it one",
                    network::NETWORK_NAME
                ))
            })
        })
        .await
    }

    /// Whether the network exists and is active, with its bridge's name.
    pub async fn network_state(&self) -> Result<Option<(bool, String)>> {
        self.call("virNetworkIsActive", |c| {
            match c.lookup_network_by_name(network::NETWORK_NAME) {
                Ok(net) => Ok(Some((
                    net.is_active()?,
                    net.bridge_name().unwrap_or_default(),
                ))),
                Err(e) if e.code().is(ErrorNumber::NoNetwork) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// The network's DHCP reservations: (mac, ip, name); none without the network.
    pub async fn dhcp_hosts(&self) -> Result<Vec<(String, Ipv4Addr, String)>> {
        self.call("virNetworkGetXMLDesc", |c| {
            match c.lookup_network_by_name(network::NETWORK_NAME) {
                Ok(net) => Ok(network::dhcp_hosts_of_network_xml(&net.xml_desc(0)?)),
                Err(e) if e.code().is(ErrorNumber::NoNetwork) => Ok(Vec::new()),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Adds the static DHCP reservation `mac` -> `ip` (idempotent).
    pub async fn add_dhcp_host(&self, mac: &str, ip: Ipv4Addr, name: &str) -> Result<()> {
        self.update_dhcp_host(true, mac, ip, name).await
    }

    /// Removes the reservation of `mac`; a missing one (or a missing network) is fine.
    pub async fn remove_dhcp_host(&self, mac: &str, ip: Ipv4Addr, name: &str) -> Result<()> {
        self.update_dhcp_host(false, mac, ip, name).await
    }

    async fn update_dhcp_host(&self, add: bool, mac: &str, ip: Ipv4Addr, name: &str) -> Result<()> {
        let xml = network::dhcp_host_xml(mac, ip, name);
        let mac = mac.to_owned();
        self.call("virNetworkUpdate", move |c| {
            let net = match c.lookup_network_by_name(network::NETWORK_NAME) {
                Ok(n) => n,
                Err(e) if !add && e.code().is(ErrorNumber::NoNetwork) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let present = net.xml_desc(0)?.contains(&format!("mac='{mac}'"));
            if present == add {
                return Ok(());
            }
            let command = if add {
                sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST
            } else {
                sys::VIR_NETWORK_UPDATE_COMMAND_DELETE
            };
            net.update(
                command,
                sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
                -1,
                &xml,
                update_flags(&net)?,
            )?;
            Ok(())
        })
        .await
    }

    /// (Re)defines the isolation filters every workspace NIC uses (see [`nwfilter`]). The
    /// test driver has no nwfilter driver: nothing there.
    pub async fn ensure_filters(&self) -> Result<()> {
        if self.domain_type == DomainType::Test {
            return Ok(());
        }
        self.call("virNWFilterDefineXML", |c| {
            for xml in nwfilter::FILTERS {
                // Redefining an existing filter needs its UUID, or libvirt refuses.
                let uuid = nwfilter::name_of(xml)
                    .and_then(|name| c.lookup_nwfilter_by_name(name).ok())
                    .and_then(|f| f.uuid_string().ok());
                let xml = nwfilter::with_uuid(xml, uuid.as_deref());
                c.define_nwfilter_xml(&xml).map_err(|e| {
                    Error::libvirt(format!(
                        "cannot define the guest isolation filters (libvirt's nwfilter driver and ebtables are needed): {}",
                        e.message()
                    ))
                })?;
            }
            Ok(())
        })
        .await
    }

    /// The `aether` network's IPv4 leases. libvirt's test driver keeps none (and has no
    /// dnsmasq): there, none.
    pub async fn dhcp_leases(&self) -> Result<Vec<leases::Lease>> {
        if self.domain_type == DomainType::Test {
            return Ok(Vec::new());
        }
        self.call("virNetworkGetDHCPLeases", |c| {
            leases::of_network(&c.lookup_network_by_name(network::NETWORK_NAME)?)
        })
        .await
    }

    /// Tells the `aether` network's dnsmasq that `mac` gives up its lease of `ip` (see
    /// [`network::release_lease`]); nothing with the test driver. The bridge must be in this
    /// network namespace, as it is wherever aetherd can reach its guests.
    pub async fn release_lease(&self, server: Ipv4Addr, ip: Ipv4Addr, mac: &str) -> Result<()> {
        if self.domain_type == DomainType::Test {
            return Ok(());
        }
        let mac = mac.to_owned();
        self.call("virNetworkGetBridgeName", move |c| {
            let bridge = c
                .lookup_network_by_name(network::NETWORK_NAME)?
                .bridge_name()?;
            network::release_lease(&bridge, server, ip, &mac)
        })
        .await
    }
}

fn update_flags(net: &Network) -> Result<sys::virNetworkUpdateFlags> {
    Ok(if net.is_active()? {
        sys::VIR_NETWORK_UPDATE_AFFECT_LIVE | sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG
    } else {
        sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG
    })
}
