//! The `aether` NAT network: subnet choice, static DHCP reservations (MAC -> IP) and the XML
//! for both, written with the XML writer.
//!
//! Addresses: `.1` is the host's bridge, `.10`–`.250` static reservations, one per workspace,
//! made at create time so `get` shows the IP before the first boot.
//!
//! Why there is no dynamic range (learned on libvirt 9.0 + dnsmasq 2.89):
//! - libvirt writes `dhcp-lease-max=` as the size of the network's `<range>`s and counts no
//!   `<host>`; dnsmasq counts every lease against it. With a `.2`–`.9` range the ninth guest
//!   to boot within a lease time got no address at all. Without a range libvirt writes
//!   `dhcp-range=<net>,static` and no lease maximum (dnsmasq's default, 1000, is above the
//!   241 reservations), and a MAC without a reservation gets nothing.
//! - dnsmasq keeps a lease after its guest is gone and will not hand that address to another
//!   MAC. So a deleted workspace's lease is released ([`release_lease`]), reservations carry a
//!   short lease ([`LEASE_MINUTES`]), and [`choose_address`] picks the address released
//!   longest ago rather than the lowest one, so an address is not reused while its old lease
//!   may still live.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use quick_xml::Writer;

use crate::error::{Error, Result};

pub const NETWORK_NAME: &str = "aether";
pub const BRIDGE_NAME: &str = "aetherbr0";
const FIRST_HOST: u8 = 10;
const LAST_HOST: u8 = 250;
/// Lease time of a reservation: short, so a lease that was not released (a crash between a
/// delete and its release) is gone soon; guests renew at half of it.
pub const LEASE_MINUTES: u32 = 10;

/// Candidate subnets tried in order when the config names none.
const CANDIDATES: [[u8; 3]; 6] = [
    [192, 168, 150],
    [192, 168, 151],
    [192, 168, 233],
    [10, 150, 0],
    [10, 233, 0],
    [172, 30, 150],
];

/// A /24 IPv4 subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    prefix: [u8; 3],
}

impl Subnet {
    /// Parses `a.b.c.0/24`.
    pub fn parse(s: &str) -> Result<Subnet> {
        let bad = || {
            Error::invalid(format!(
                "invalid network_cidr {s:?}: expected a /24 such as 192.168.150.0/24"
            ))
        };
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        if len != "24" {
            return Err(bad());
        }
        let ip: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let o = ip.octets();
        if o[3] != 0 {
            return Err(bad());
        }
        Ok(Subnet {
            prefix: [o[0], o[1], o[2]],
        })
    }

    pub fn host(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], n)
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.host(1)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        ip.octets()[..3] == self.prefix
    }

    /// The first candidate that overlaps none of `routes` (destination, mask).
    pub fn choose(routes: &[(Ipv4Addr, Ipv4Addr)]) -> Result<Subnet> {
        CANDIDATES
            .iter()
            .map(|p| Subnet { prefix: *p })
            .find(|s| {
                let net = u32::from(s.host(0));
                routes.iter().all(|(dest, mask)| {
                    let (d, m) = (u32::from(*dest), u32::from(*mask));
                    // Overlap: one range contains the other's network address. The default
                    // route (mask 0) overlaps everything and is ignored.
                    m == 0 || (net & m != d & m && d & 0xffff_ff00 != net)
                })
            })
            .ok_or_else(|| {
                Error::Internal(
                    "every candidate subnet for the aether network collides with a route; set network_cidr"
                        .into(),
                )
            })
    }

    /// A free reservation address: the lowest one never released, else the one released
    /// longest ago (`released`: address -> unix time it was last given up).
    pub fn allocate(
        &self,
        used: &HashSet<Ipv4Addr>,
        released: &HashMap<Ipv4Addr, i64>,
    ) -> Result<Ipv4Addr> {
        (FIRST_HOST..=LAST_HOST)
            .map(|n| self.host(n))
            .filter(|ip| !used.contains(ip))
            // Never released sorts first (None < Some), then the oldest release, then the
            // lowest address.
            .min_by_key(|ip| (released.get(ip).copied(), u32::from(*ip)))
            .ok_or_else(|| {
                Error::ResourceExhausted(format!(
                    "the aether network has no free address left ({} workspaces)",
                    LAST_HOST - FIRST_HOST + 1
                ))
            })
    }
}

/// Routes of the host from `/proc/net/route` (destination, mask), little-endian hex.
pub fn host_routes() -> Vec<(Ipv4Addr, Ipv4Addr)> {
    let Ok(text) = std::fs::read_to_string("/proc/net/route") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let hex = |s: &str| {
                u32::from_str_radix(s, 16)
                    .ok()
                    .map(|v| Ipv4Addr::from(v.swap_bytes()))
            };
            Some((hex(f.get(1)?)?, hex(f.get(7)?)?))
        })
        .collect()
}

/// A random locally administered MAC in qemu's 52:54:00 range.
pub fn random_mac() -> String {
    let mut b = [0u8; 3];
    getrandom::fill(&mut b).expect("the kernel's random source is available");
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// Checks a MAC read back from the database: six lowercase hex pairs.
pub fn valid_mac(mac: &str) -> bool {
    mac.len() == 17
        && mac.split(':').count() == 6
        && mac.split(':').all(|p| {
            p.len() == 2
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// A DHCPRELEASE (RFC 2131) of `ip` by client `mac` to server `server`, with transaction id
/// `xid`. `mac` must pass [`valid_mac`].
pub fn release_packet(server: Ipv4Addr, ip: Ipv4Addr, mac: &str, xid: u32) -> Vec<u8> {
    let mut p = vec![0u8; 236];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6; // hardware address length
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[12..16].copy_from_slice(&ip.octets()); // ciaddr: the address given up
    for (i, byte) in mac.split(':').enumerate().take(6) {
        p[28 + i] = u8::from_str_radix(byte, 16).unwrap_or(0);
    }
    p.extend_from_slice(&[99, 130, 83, 99]); // magic cookie
    p.extend_from_slice(&[53, 1, 7]); // DHCP message type: DHCPRELEASE
    p.extend_from_slice(&[54, 4]); // server identifier
    p.extend_from_slice(&server.octets());
    p.push(255);
    // Padded to the 548 bytes a DHCP server must accept (RFC 2131's minimum message size
    // less the IP and UDP headers), as dnsmasq's dhcp_release sends it.
    p.resize(548, 0);
    p
}

/// Releases the lease of `ip` held by `mac` at the dnsmasq serving `bridge` (whose address is
/// `server`), as dnsmasq's own `dhcp_release` does: the DHCPRELEASE goes to `server`:67
/// through a socket bound to the bridge, so dnsmasq takes it as arriving on that interface.
/// The packet never leaves the host: `server` is the host's own address on the bridge.
/// dnsmasq answers nothing; a lease that does not exist is not an error. Needs root (or
/// CAP_NET_RAW) and the bridge in this network namespace.
pub fn release_lease(bridge: &str, server: Ipv4Addr, ip: Ipv4Addr, mac: &str) -> Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::BindToDevice};
    if !valid_mac(mac) {
        return Err(Error::Internal(format!("not a MAC address: {mac:?}")));
    }
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Error::Internal(format!(
            "cannot release the DHCP lease of {ip} on {bridge}: {what}: {e}"
        ))
    };
    let socket =
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| fail("socket", &e))?;
    setsockopt(&socket, BindToDevice, &std::ffi::OsString::from(bridge))
        .map_err(|e| fail("SO_BINDTODEVICE", &e))?;
    let mut xid = [0u8; 4];
    getrandom::fill(&mut xid).expect("the kernel's random source is available");
    let packet = release_packet(server, ip, mac, u32::from_ne_bytes(xid));
    socket
        .send_to(&packet, (server, 67))
        .map_err(|e| fail("send", &e))?;
    Ok(())
}

fn finish(w: Writer<Vec<u8>>) -> String {
    String::from_utf8(w.into_inner()).expect("the XML writer emits UTF-8")
}

pub fn network_xml(subnet: &Subnet) -> String {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    let gw = subnet.gateway().to_string();
    let r: std::io::Result<()> = (|| {
        w.create_element("network").write_inner_content(|w| {
            w.create_element("name")
                .write_text_content(quick_xml::events::BytesText::new(NETWORK_NAME))?;
            w.create_element("forward")
                .with_attribute(("mode", "nat"))
                .write_empty()?;
            w.create_element("bridge")
                .with_attributes([("name", BRIDGE_NAME), ("stp", "on"), ("delay", "0")])
                .write_empty()?;
            w.create_element("ip")
                .with_attributes([("address", gw.as_str()), ("netmask", "255.255.255.0")])
                .write_inner_content(|w| {
                    // Reservations only (see the module doc): `<host>`s are added per workspace.
                    w.create_element("dhcp").write_empty()?;
                    Ok(())
                })?;
            Ok(())
        })?;
        Ok(())
    })();
    r.expect("writing XML to a Vec cannot fail");
    finish(w)
}

/// `<host mac=… ip=… name=…><lease expiry=…/></host>` for a DHCP reservation.
pub fn dhcp_host_xml(mac: &str, ip: Ipv4Addr, name: &str) -> String {
    let mut w = Writer::new(Vec::new());
    let ip = ip.to_string();
    let minutes = LEASE_MINUTES.to_string();
    w.create_element("host")
        .with_attributes([("mac", mac), ("ip", ip.as_str()), ("name", name)])
        .write_inner_content(|w| {
            w.create_element("lease")
                .with_attributes([("expiry", minutes.as_str()), ("unit", "minutes")])
                .write_empty()?;
            Ok::<(), std::io::Error>(())
        })
        .expect("writing XML to a Vec cannot fail");
    finish(w)
}

/// `<range start=… end=…/>` elements of a network's XML (an older aether network had one,
/// which must go: see the module doc).
pub fn dhcp_ranges_of_network_xml(xml: &str) -> Vec<String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut ranges = Vec::new();
    loop {
        match reader.read_event() {
            Ok(Event::Start(e) | Event::Empty(e)) if e.local_name().into_inner() == "range" => {
                let attr = |name: &str| -> Option<String> {
                    let v = e.try_get_attribute(name).ok().flatten()?;
                    let v = v
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .ok()?;
                    v.parse::<Ipv4Addr>().ok().map(|ip| ip.to_string())
                };
                if let (Some(start), Some(end)) = (attr("start"), attr("end")) {
                    let mut w = Writer::new(Vec::new());
                    w.create_element("range")
                        .with_attributes([("start", start.as_str()), ("end", end.as_str())])
                        .write_empty()
                        .expect("writing XML to a Vec cannot fail");
                    ranges.push(finish(w));
                }
            }
            Ok(Event::Eof) | Err(_) => return ranges,
            Ok(_) => {}
        }
    }
}

/// The DHCP reservations of a network's XML: (mac, ip, name) of each `<host>` that has all
/// three and a valid MAC and address.
pub fn dhcp_hosts_of_network_xml(xml: &str) -> Vec<(String, Ipv4Addr, String)> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut hosts = Vec::new();
    loop {
        match reader.read_event() {
            Ok(Event::Start(e) | Event::Empty(e)) if e.local_name().into_inner() == "host" => {
                let attr = |name: &str| -> Option<String> {
                    let v = e.try_get_attribute(name).ok().flatten()?;
                    let v = v
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .ok()?;
                    Some(v.into_owned())
                };
                if let (Some(mac), Some(ip), Some(name)) = (attr("mac"), attr("ip"), attr("name")) {
                    if let (true, Ok(ip)) = (valid_mac(&mac), ip.parse()) {
                        hosts.push((mac, ip, name));
                    }
                }
            }
            Ok(Event::Eof) | Err(_) => return hosts,
            Ok(_) => {}
        }
    }
}

/// The subnet of an existing network's XML (its first `<ip address=…>`).
pub fn subnet_of_network_xml(xml: &str) -> Option<Subnet> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    loop {
        match reader.read_event() {
            Ok(Event::Start(e) | Event::Empty(e)) if e.local_name().into_inner() == "ip" => {
                let addr = e
                    .try_get_attribute("address")
                    .ok()
                    .flatten()?
                    .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                    .ok()?
                    .parse::<Ipv4Addr>()
                    .ok()?;
                let o = addr.octets();
                return Some(Subnet {
                    prefix: [o[0], o[1], o[2]],
                });
            }
            Ok(Event::Eof) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::net::Ipv4Addr;

    use super::{
        dhcp_host_xml, dhcp_hosts_of_network_xml, dhcp_ranges_of_network_xml, network_xml,
        random_mac, release_packet, subnet_of_network_xml, valid_mac, Subnet,
    };
    use crate::error::Error;

    #[test]
    fn subnet_parse_and_allocate() {
        let s = Subnet::parse("192.168.150.0/24").unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(192, 168, 150, 1));
        for bad in [
            "192.168.150.0/16",
            "192.168.150.1/24",
            "x/24",
            "192.168.150.0",
        ] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
        let mut used = HashSet::new();
        let none = HashMap::new();
        let a = s.allocate(&used, &none).unwrap();
        assert_eq!(a, Ipv4Addr::new(192, 168, 150, 10));
        used.insert(a);
        assert_eq!(
            s.allocate(&used, &none).unwrap(),
            Ipv4Addr::new(192, 168, 150, 11)
        );
        let all: HashSet<_> = (10..=250).map(|n| s.host(n)).collect();
        assert!(matches!(
            s.allocate(&all, &none),
            Err(Error::ResourceExhausted(_))
        ));
    }

    #[test]
    fn a_released_address_is_reused_last() {
        let s = Subnet::parse("192.168.150.0/24").unwrap();
        // .10 was just given up by a deleted workspace: every never-used address goes first.
        let used: HashSet<_> = [s.host(11)].into();
        let released: HashMap<_, _> = [(s.host(10), 1_000)].into();
        assert_eq!(s.allocate(&used, &released).unwrap(), s.host(12));
        // Once every address has been used, the one released longest ago is taken.
        let used: HashSet<_> = (10..=250)
            .map(|n| s.host(n))
            .filter(|ip| *ip != s.host(10) && *ip != s.host(40))
            .collect();
        let released: HashMap<_, _> = [(s.host(10), 2_000), (s.host(40), 1_000)].into();
        assert_eq!(s.allocate(&used, &released).unwrap(), s.host(40));
    }

    #[test]
    fn release_packet_is_a_dhcprelease_for_the_client() {
        let p = release_packet(
            Ipv4Addr::new(192, 168, 150, 1),
            Ipv4Addr::new(192, 168, 150, 10),
            "52:54:00:aa:0b:ff",
            0x0102_0304,
        );
        assert_eq!(&p[..4], &[1, 1, 6, 0]);
        assert_eq!(&p[4..8], &[1, 2, 3, 4]);
        assert_eq!(&p[12..16], &[192, 168, 150, 10]);
        assert_eq!(&p[16..28], &[0; 12], "yiaddr, siaddr, giaddr are zero");
        assert_eq!(&p[28..34], &[0x52, 0x54, 0, 0xaa, 0x0b, 0xff]);
        assert_eq!(&p[236..240], &[99, 130, 83, 99]);
        assert_eq!(&p[240..250], &[53, 1, 7, 54, 4, 192, 168, 150, 1, 255]);
        assert_eq!(p.len(), 548);
        assert!(p[250..].iter().all(|b| *b == 0));
    }

    #[test]
    fn choose_skips_colliding_routes() {
        let none = Subnet::choose(&[]).unwrap();
        assert_eq!(none, Subnet::parse("192.168.150.0/24").unwrap());
        let default_route = (Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED);
        assert_eq!(Subnet::choose(&[default_route]).unwrap(), none);
        // A /16 covering 192.168.0.0 rules out all the 192.168 candidates.
        let routes = [(Ipv4Addr::new(192, 168, 0, 0), Ipv4Addr::new(255, 255, 0, 0))];
        assert_eq!(
            Subnet::choose(&routes).unwrap(),
            Subnet::parse("10.150.0.0/24").unwrap()
        );
        let exact = [(
            Ipv4Addr::new(192, 168, 150, 0),
            Ipv4Addr::new(255, 255, 255, 0),
        )];
        assert_eq!(
            Subnet::choose(&exact).unwrap(),
            Subnet::parse("192.168.151.0/24").unwrap()
        );
    }

    #[test]
    fn macs() {
        for _ in 0..50 {
            assert!(valid_mac(&random_mac()));
        }
        assert!(!valid_mac("52:54:00:AA:00:01"));
        assert!(!valid_mac("52:54:00:aa:00"));
    }

    #[test]
    fn xml_round_trips_the_subnet() {
        let s = Subnet::parse("10.150.0.0/24").unwrap();
        let xml = network_xml(&s);
        assert!(
            xml.contains(r#"<ip address="10.150.0.1" netmask="255.255.255.0">"#),
            "{xml}"
        );
        assert_eq!(subnet_of_network_xml(&xml), Some(s));
        assert!(!xml.contains("<range"), "no dynamic range: {xml}");
        assert_eq!(
            dhcp_host_xml("52:54:00:aa:00:01", s.host(10), "ws-abc123"),
            r#"<host mac="52:54:00:aa:00:01" ip="10.150.0.10" name="ws-abc123"><lease expiry="10" unit="minutes"/></host>"#
        );
    }

    /// The reservations as libvirt lists them (single quotes, hosts among other elements);
    /// a host without a name or with a malformed MAC or address is left out.
    #[test]
    fn reservations_are_read_back_from_the_network() {
        let s = Subnet::parse("10.150.0.0/24").unwrap();
        let xml = format!(
            "<network><name>aether</name><ip address='10.150.0.1' netmask='255.255.255.0'><dhcp>\
             {}<host mac='52:54:00:aa:00:02' ip='10.150.0.11' name='ws-def456'/>\
             <host mac='52:54:00:aa:00:03' ip='10.150.0.12'/>\
             <host mac='nonsense' ip='10.150.0.13' name='ws-ghi789'/>\
             <host mac='52:54:00:aa:00:04' ip='10.150.0.300' name='ws-jkl012'/>\
             </dhcp></ip></network>",
            dhcp_host_xml("52:54:00:aa:00:01", s.host(10), "ws-abc123")
        );
        assert_eq!(
            dhcp_hosts_of_network_xml(&xml),
            [
                (
                    "52:54:00:aa:00:01".to_owned(),
                    s.host(10),
                    "ws-abc123".to_owned()
                ),
                (
                    "52:54:00:aa:00:02".to_owned(),
                    s.host(11),
                    "ws-def456".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn old_dynamic_ranges_are_found() {
        let old =
            "<network><name>aether</name><ip address='192.168.150.1' netmask='255.255.255.0'>\
            <dhcp><range start='192.168.150.2' end='192.168.150.9'/>\
            <host mac='52:54:00:aa:00:01' name='ws-a' ip='192.168.150.10'/></dhcp></ip></network>";
        assert_eq!(
            dhcp_ranges_of_network_xml(old),
            vec![r#"<range start="192.168.150.2" end="192.168.150.9"/>"#.to_owned()]
        );
        let new = network_xml(&Subnet::parse("192.168.150.0/24").unwrap());
        assert!(dhcp_ranges_of_network_xml(&new).is_empty());
    }
}
