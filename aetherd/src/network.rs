//! The `aether` NAT network: subnet choice, static DHCP reservations (MAC -> IP) and the XML
//! for both, written with the XML writer.
//!
//! Addresses: `.1` is the host's bridge, `.2`–`.9` the dynamic DHCP range (unused by
//! workspaces, there for debugging), `.10`–`.250` static reservations, one per workspace,
//! made at create time so `get` shows the IP before the first boot.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use quick_xml::Writer;

use crate::error::{Error, Result};

pub const NETWORK_NAME: &str = "aether";
pub const BRIDGE_NAME: &str = "aetherbr0";
const FIRST_HOST: u8 = 10;
const LAST_HOST: u8 = 250;

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

    /// The lowest free reservation address.
    pub fn allocate(&self, used: &HashSet<Ipv4Addr>) -> Result<Ipv4Addr> {
        (FIRST_HOST..=LAST_HOST)
            .map(|n| self.host(n))
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| {
                Error::precondition(format!(
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

fn finish(w: Writer<Vec<u8>>) -> String {
    String::from_utf8(w.into_inner()).expect("the XML writer emits UTF-8")
}

pub fn network_xml(subnet: &Subnet) -> String {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    let gw = subnet.gateway().to_string();
    let (start, end) = (subnet.host(2).to_string(), subnet.host(9).to_string());
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
                    w.create_element("dhcp").write_inner_content(|w| {
                        w.create_element("range")
                            .with_attributes([("start", start.as_str()), ("end", end.as_str())])
                            .write_empty()?;
                        Ok(())
                    })?;
                    Ok(())
                })?;
            Ok(())
        })?;
        Ok(())
    })();
    r.expect("writing XML to a Vec cannot fail");
    finish(w)
}

/// `<host mac=… ip=… name=…/>` for a DHCP reservation.
pub fn dhcp_host_xml(mac: &str, ip: Ipv4Addr, name: &str) -> String {
    let mut w = Writer::new(Vec::new());
    let ip = ip.to_string();
    w.create_element("host")
        .with_attributes([("mac", mac), ("ip", ip.as_str()), ("name", name)])
        .write_empty()
        .expect("writing XML to a Vec cannot fail");
    finish(w)
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
    use super::*;

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
        let a = s.allocate(&used).unwrap();
        assert_eq!(a, Ipv4Addr::new(192, 168, 150, 10));
        used.insert(a);
        assert_eq!(s.allocate(&used).unwrap(), Ipv4Addr::new(192, 168, 150, 11));
        let all: HashSet<_> = (10..=250).map(|n| s.host(n)).collect();
        assert!(s.allocate(&all).is_err());
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
        assert_eq!(
            dhcp_host_xml("52:54:00:aa:00:01", s.host(10), "ws-abc123"),
            r#"<host mac="52:54:00:aa:00:01" ip="10.150.0.10" name="ws-abc123"/>"#
        );
    }
}
