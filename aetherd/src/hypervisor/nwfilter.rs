//! Guest isolation: the libvirt network filter every workspace's NIC goes through.
//!
//! Together with `<port isolated='yes'/>` on each NIC (no frame goes from one workspace's
//! port to another's, whoever owns them; guests reach each other only through the host,
//! and the host does not route between them on the same bridge) the filter makes sure that
//! a guest, even as root:
//! - sends only with its own MAC, and IPv4 and ARP only from its reserved address (0.0.0.0
//!   for DHCP before it has one): no spoofing of another guest, whose address tunnels and
//!   tasks trust;
//! - reaches the host only for DHCP (udp 67) and DNS (53), plus the replies to the daemon's
//!   own connections into the guest (tcp to the host's ephemeral ports, from which the
//!   daemon connects); every other packet to an address of the host is dropped;
//! - sends nothing but IPv4 and ARP.
//!
//! The rules are ebtables rules made by libvirt's nwfilter driver (stateless, so the daemon's
//! ephemeral port range is the one hole towards the host). The filters are self-contained
//! (they do not need the distribution's `clean-traffic` set) and are (re)defined at every
//! daemon start. A guest's parameters: `IP` (its reservation), `HOST_IP` (every IPv4 address
//! of the host, a list), `EPHEMERAL_FIRST`/`EPHEMERAL_LAST` (the host's
//! `ip_local_port_range`). `MAC` is libvirt's own. libvirt walks the variables of one rule in
//! parallel unless told otherwise, and refuses lists of different lengths ("Cardinality of
//! list items must be the same"): a rule that names `HOST_IP` with another variable gives
//! it an iterator of its own (`$HOST_IP[@1]`), so every host address pairs with the range.

use std::net::Ipv4Addr;

/// The filter a workspace's `<filterref>` names.
pub const GUEST_FILTER: &str = "aether-guest";

/// The filters, in the order they must be defined (referenced ones first). Static text: no
/// value from a client is in it; per-guest values are `<parameter>`s of the domain XML.
pub const FILTERS: [&str; 4] = [
    r#"<filter name='aether-mac' chain='mac' priority='-800'>
  <rule action='return' direction='out' priority='500'><mac srcmacaddr='$MAC'/></rule>
  <rule action='drop' direction='out' priority='510'><mac/></rule>
</filter>"#,
    r#"<filter name='aether-ipv4' chain='ipv4-ip' priority='-710'>
  <rule action='return' direction='out' priority='100'><ip srcipaddr='0.0.0.0' protocol='udp' dstportstart='67' dstportend='67'/></rule>
  <rule action='drop' direction='out' priority='200'><ip match='no' srcipaddr='$IP'/></rule>
  <rule action='return' direction='out' priority='300'><ip dstipaddr='$HOST_IP' protocol='udp' dstportstart='67' dstportend='67'/></rule>
  <rule action='return' direction='out' priority='310'><ip dstipaddr='$HOST_IP' protocol='udp' dstportstart='53' dstportend='53'/></rule>
  <rule action='return' direction='out' priority='320'><ip dstipaddr='$HOST_IP' protocol='tcp' dstportstart='53' dstportend='53'/></rule>
  <rule action='return' direction='out' priority='330'><ip dstipaddr='$HOST_IP[@1]' protocol='tcp' dstportstart='$EPHEMERAL_FIRST' dstportend='$EPHEMERAL_LAST'/></rule>
  <rule action='drop' direction='out' priority='400'><ip dstipaddr='$HOST_IP'/></rule>
</filter>"#,
    r#"<filter name='aether-arp' chain='arp' priority='-510'>
  <rule action='drop' direction='out' priority='100'><arp match='no' arpsrcmacaddr='$MAC'/></rule>
  <rule action='return' direction='out' priority='200'><arp arpsrcipaddr='$IP'/></rule>
  <rule action='return' direction='out' priority='210'><arp arpsrcipaddr='0.0.0.0'/></rule>
  <rule action='drop' direction='out' priority='1000'/>
</filter>"#,
    r#"<filter name='aether-guest' chain='root'>
  <filterref filter='aether-mac'/>
  <filterref filter='aether-ipv4'/>
  <rule action='accept' direction='inout' priority='-650'><mac protocolid='ipv4'/></rule>
  <filterref filter='aether-arp'/>
  <rule action='accept' direction='inout' priority='-500'><mac protocolid='arp'/></rule>
  <rule action='drop' direction='inout' priority='1000'/>
</filter>"#,
];

/// The `name` of one of [`FILTERS`].
pub fn name_of(xml: &str) -> Option<&str> {
    let rest = xml.strip_prefix("<filter name='")?;
    rest.split('\'').next()
}

/// `xml` with `<uuid>` (from libvirt, for a redefinition) after its opening tag; unchanged
/// without one or when `uuid` is not a UUID.
pub fn with_uuid(xml: &str, uuid: Option<&str>) -> String {
    let valid = |u: &str| u.len() == 36 && u.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    match (uuid.filter(|u| valid(u)), xml.find('>')) {
        (Some(u), Some(end)) => format!("{}\n  <uuid>{u}</uuid>{}", &xml[..=end], &xml[end + 1..]),
        _ => xml.to_owned(),
    }
}

/// What one guest's filter is instantiated with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestFilter {
    pub ip: Ipv4Addr,
    pub host_ips: Vec<Ipv4Addr>,
    pub ephemeral: (u16, u16),
}

impl GuestFilter {
    /// `(name, value)` pairs for `<filterref>`'s `<parameter>`s.
    pub fn parameters(&self) -> Vec<(&'static str, String)> {
        let mut p = vec![("IP", self.ip.to_string())];
        p.extend(self.host_ips.iter().map(|h| ("HOST_IP", h.to_string())));
        p.push(("EPHEMERAL_FIRST", self.ephemeral.0.to_string()));
        p.push(("EPHEMERAL_LAST", self.ephemeral.1.to_string()));
        p
    }
}

/// The host's own IPv4 addresses but loopback (`/proc/net/fib_trie`'s `host LOCAL` entries),
/// with `gateway` (the bridge's) always among them, sorted.
pub fn host_addresses(gateway: Ipv4Addr) -> Vec<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let mut ips = local_addresses(&text);
    ips.push(gateway);
    ips.retain(|ip| !ip.is_loopback());
    ips.sort();
    ips.dedup();
    ips
}

/// The addresses a fib_trie dump marks `/32 host LOCAL`.
fn local_addresses(fib_trie: &str) -> Vec<Ipv4Addr> {
    let mut last: Option<Ipv4Addr> = None;
    let mut ips = Vec::new();
    for line in fib_trie.lines().map(str::trim) {
        if let Some(addr) = line.strip_prefix("|-- ") {
            last = addr.parse().ok();
        } else if line == "/32 host LOCAL" {
            ips.extend(last);
        }
    }
    ips
}

/// The host's ephemeral port range (`net.ipv4.ip_local_port_range`), Linux's default when it
/// cannot be read.
pub fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::{
        host_addresses, local_addresses, name_of, with_uuid, GuestFilter, FILTERS, GUEST_FILTER,
    };

    /// The variables a rule line names, as written (`$HOST_IP[@1]` is `HOST_IP[@1]`).
    fn variables(rule: &str) -> Vec<&str> {
        rule.split('$')
            .skip(1)
            .map(|v| v.split(['\'', ' ', '/']).next().unwrap_or(""))
            .collect()
    }

    /// A host with more than one address (any host outside the test's namespace) makes
    /// `HOST_IP` a list: a rule that walks it in parallel with a single value is refused when
    /// the VM starts.
    #[test]
    fn a_list_variable_never_walks_in_parallel_with_another() {
        for filter in FILTERS {
            for rule in filter.lines().filter(|l| l.contains("<rule")) {
                let vars = variables(rule);
                if vars.len() > 1 {
                    assert!(
                        !vars.contains(&"HOST_IP"),
                        "{rule}: HOST_IP needs its own iterator ($HOST_IP[@1]) here"
                    );
                }
            }
        }
        let guest = GuestFilter {
            ip: "192.168.150.5".parse().unwrap(),
            host_ips: vec![
                "10.0.0.1".parse().unwrap(),
                "192.168.150.1".parse().unwrap(),
            ],
            ephemeral: (32768, 60999),
        };
        let hosts = guest
            .parameters()
            .iter()
            .filter(|(n, _)| *n == "HOST_IP")
            .count();
        assert_eq!(hosts, 2);
    }

    #[test]
    fn redefinitions_carry_the_uuid() {
        assert_eq!(name_of(FILTERS[3]), Some(GUEST_FILTER));
        let u = "43349e1b-11d5-4e32-9591-f5ad76514f87";
        let x = with_uuid(FILTERS[0], Some(u));
        assert!(
            x.starts_with(&format!(
                "<filter name='aether-mac' chain='mac' priority='-800'>\n  <uuid>{u}</uuid>"
            )),
            "{x}"
        );
        assert_eq!(with_uuid(FILTERS[0], None), FILTERS[0]);
        assert_eq!(with_uuid(FILTERS[0], Some("x'/><rule")), FILTERS[0]);
    }

    #[test]
    fn local_addresses_from_fib_trie() {
        let dump = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n     |-- 192.0.2.0\n        /24 link UNICAST\n     |-- 192.0.2.2\n        /32 host LOCAL\n     |-- 192.0.2.255\n        /32 link BROADCAST\n";
        assert_eq!(
            local_addresses(dump),
            vec![Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(192, 0, 2, 2)]
        );
        let gw = Ipv4Addr::new(192, 168, 150, 1);
        let host = host_addresses(gw);
        assert!(host.contains(&gw) && host.iter().all(|ip| !ip.is_loopback()));
    }

    #[test]
    fn filters_are_well_formed_and_parameters_cover_their_variables() {
        for xml in FILTERS {
            let mut reader = quick_xml::Reader::from_str(xml);
            loop {
                match reader.read_event() {
                    Ok(quick_xml::events::Event::Eof) => break,
                    Ok(_) => {}
                    Err(e) => panic!("{e}: {xml}"),
                }
            }
        }
        let f = GuestFilter {
            ip: Ipv4Addr::new(192, 168, 150, 10),
            host_ips: vec![Ipv4Addr::new(192, 168, 150, 1), Ipv4Addr::new(192, 0, 2, 2)],
            ephemeral: (32768, 60999),
        };
        let names: Vec<&str> = f.parameters().iter().map(|(n, _)| *n).collect();
        for var in ["IP", "HOST_IP", "EPHEMERAL_FIRST", "EPHEMERAL_LAST"] {
            assert!(names.contains(&var), "{var}");
            assert!(
                FILTERS.iter().any(|x| x.contains(&format!("${var}"))),
                "{var} unused"
            );
        }
        assert_eq!(names.iter().filter(|n| **n == "HOST_IP").count(), 2);
    }
}
