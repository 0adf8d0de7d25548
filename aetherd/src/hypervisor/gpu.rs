//! GPUs of the host, from libvirt's PCI node devices: display (class 0x03xx) controllers.
//!
//! A GPU's *kind* is a stable name from its vendor and product: `nvidia-tesla-t4` from
//! "NVIDIA Corporation" / "TU104GL [Tesla T4]" (the bracketed marketing name when there is
//! one), with friendly names for well-known vendors and the PCI ids otherwise
//! (`1234-5678`). Kinds contain only `[a-z0-9-]`, so they are safe anywhere.

use quick_xml::events::Event;

/// One GPU as the host has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    /// libvirt node device name, e.g. `pci_0000_01_00_0`.
    pub device: String,
    pub kind: String,
    /// Vendor and product as the PCI database names them.
    pub name: String,
    pub domain: u32,
    pub bus: u32,
    pub slot: u32,
    pub function: u32,
    pub iommu_group: Option<u32>,
    pub driver: String,
}

impl Gpu {
    /// `0000:01:00.0`.
    pub fn address(&self) -> String {
        format!(
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }
}

fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').chars().take(48).collect()
}

/// The kind of a GPU from its PCI vendor/product ids and names.
pub fn kind(vendor_id: u32, vendor: &str, product_id: u32, product: &str) -> String {
    let vendor_name = match vendor_id {
        0x10de => "nvidia".to_owned(),
        0x1002 => "amd".to_owned(),
        0x8086 => "intel".to_owned(),
        0x1af4 => "virtio".to_owned(),
        0x1234 => "qemu".to_owned(),
        _ => {
            let s = slug(vendor);
            if s.is_empty() {
                format!("{vendor_id:04x}")
            } else {
                s
            }
        }
    };
    // "TU104GL [Tesla T4]" -> "Tesla T4".
    let marketing = product
        .split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(m, _)| m)
        .unwrap_or(product);
    let product_name = slug(marketing);
    let product_name = if product_name.is_empty() {
        format!("{product_id:04x}")
    } else {
        product_name
    };
    format!("{vendor_name}-{product_name}")
}

fn parse_num(s: &str) -> Option<u32> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses a node device's XML; `None` unless it is a PCI display controller.
pub fn parse(device: &str, xml: &str) -> Option<Gpu> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    let (mut class, mut domain, mut bus, mut slot, mut function) = (None, 0, 0, 0, 0);
    let (mut vendor_id, mut product_id, mut vendor, mut product) =
        (0, 0, String::new(), String::new());
    let (mut iommu_group, mut driver) = (None, String::new());
    loop {
        let ev = reader.read_event().ok()?;
        let is_start = matches!(ev, Event::Start(_));
        match ev {
            Event::Start(e) | Event::Empty(e) => {
                let name = e.local_name().into_inner().to_owned();
                let attr = |key: &str| {
                    e.try_get_attribute(key).ok().flatten().and_then(|a| {
                        a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                            .ok()
                            .map(|v| v.into_owned())
                    })
                };
                match name.as_str() {
                    "vendor" => vendor_id = attr("id").and_then(|v| parse_num(&v)).unwrap_or(0),
                    "product" => product_id = attr("id").and_then(|v| parse_num(&v)).unwrap_or(0),
                    "iommuGroup" => iommu_group = attr("number").and_then(|v| parse_num(&v)),
                    _ => {}
                }
                if is_start {
                    path.push(name);
                }
            }
            Event::Text(t) => {
                let text = t.xml10_content().trim().to_owned();
                match path.last().map(String::as_str) {
                    Some("class") => class = parse_num(&text),
                    Some("domain") => domain = parse_num(&text).unwrap_or(0),
                    Some("bus") => bus = parse_num(&text).unwrap_or(0),
                    Some("slot") => slot = parse_num(&text).unwrap_or(0),
                    Some("function") => function = parse_num(&text).unwrap_or(0),
                    Some("vendor") => vendor = text,
                    Some("product") => product = text,
                    Some("name") if path.iter().any(|p| p == "driver") => driver = text,
                    _ => {}
                }
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    // PCI class 0x03xxxx: display controllers (VGA, XGA, 3D, other).
    if class? >> 16 != 0x03 {
        return None;
    }
    Some(Gpu {
        device: device.to_owned(),
        kind: kind(vendor_id, &vendor, product_id, &product),
        name: format!("{vendor} {product}").trim().to_owned(),
        domain,
        bus,
        slot,
        function,
        iommu_group,
        driver,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const T4: &str = r#"<device>
  <name>pci_0000_01_00_0</name>
  <driver><name>vfio-pci</name></driver>
  <capability type='pci'>
    <class>0x030200</class>
    <domain>0</domain><bus>1</bus><slot>0</slot><function>0</function>
    <product id='0x1eb8'>TU104GL [Tesla T4]</product>
    <vendor id='0x10de'>NVIDIA Corporation</vendor>
    <iommuGroup number='12'><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></iommuGroup>
  </capability>
</device>"#;

    #[test]
    fn parses_a_gpu_and_names_its_kind() {
        let g = parse("pci_0000_01_00_0", T4).unwrap();
        assert_eq!(g.kind, "nvidia-tesla-t4");
        assert_eq!(g.address(), "0000:01:00.0");
        assert_eq!(g.iommu_group, Some(12));
        assert_eq!(g.driver, "vfio-pci");
        assert_eq!(g.name, "NVIDIA Corporation TU104GL [Tesla T4]");
    }

    #[test]
    fn other_pci_classes_are_not_gpus() {
        let nic = T4.replace("0x030200", "0x020000");
        assert_eq!(parse("pci_0000_01_00_0", &nic), None);
    }

    #[test]
    fn kinds() {
        assert_eq!(
            kind(
                0x1002,
                "AMD",
                0x73bf,
                "Navi 21 [Radeon RX 6800/6800 XT / 6900 XT]"
            ),
            "amd-radeon-rx-6800-6800-xt-6900-xt"
        );
        assert_eq!(kind(0x1234, "", 0x1111, ""), "qemu-1111");
        assert_eq!(
            kind(0xabcd, "Acme Graphics, Inc.", 0x0001, "Blitter 3000"),
            "acme-graphics-inc-blitter-3000"
        );
        assert_eq!(kind(0xabcd, "", 0x0001, ""), "abcd-0001");
    }
}
