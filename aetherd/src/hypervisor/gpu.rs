//! GPUs of the host, from libvirt's PCI node devices: display (class 0x03xx) controllers.
//!
//! A GPU's *kind* is a stable name from its vendor and product: `nvidia-tesla-t4` from
//! "NVIDIA Corporation" / "TU104GL [Tesla T4]" (the bracketed marketing name when there is
//! one), with friendly names for well-known vendors and the PCI ids otherwise
//! (`1234-5678`). Kinds contain only `[a-z0-9-]`, so they are safe anywhere.
//!
//! Only GPUs the host does not use itself are offered to workspaces: not the boot VGA
//! device (sysfs `boot_vga` = 1, the firmware's console), and none that a host driver other
//! than `vfio-pci` / `pci-stub` is bound to (any driver of a display controller, i915,
//! amdgpu, nouveau, nvidia, virtio-pci…, may be driving a display). The config's
//! `gpu_allow` (PCI addresses or kinds) offers such a GPU anyway. Each GPU's sysfs directory
//! is the one libvirt names for the node device (`<path>`), else
//! `<sysfs>/bus/pci/devices/<address>`.

use std::path::{Path, PathBuf};

use quick_xml::events::Event;

/// Where sysfs is mounted.
pub const SYSFS: &str = "/sys";

/// Drivers that only hold a device for passthrough.
const PASSTHROUGH_DRIVERS: [&str; 2] = ["vfio-pci", "pci-stub"];

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
    /// The device's sysfs directory as libvirt names it (`<path>`), if it does.
    pub sysfs_path: Option<PathBuf>,
}

impl Gpu {
    /// `0000:01:00.0`.
    pub fn address(&self) -> String {
        format!(
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }

    /// The device's sysfs directory: libvirt's `<path>`, else the one under `sysfs`.
    pub fn sysfs_dir(&self, sysfs: &Path) -> PathBuf {
        match &self.sysfs_path {
            Some(p) => p.clone(),
            None => sysfs.join("bus/pci/devices").join(self.address()),
        }
    }
}

/// The driver bound to the device now: the `driver` link in its sysfs directory when that
/// directory exists (no link: none), else what libvirt said.
pub fn bound_driver(gpu: &Gpu, sysfs: &Path) -> String {
    let dir = gpu.sysfs_dir(sysfs);
    match std::fs::read_link(dir.join("driver")) {
        Ok(target) => target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        Err(_) if dir.is_dir() => String::new(),
        Err(_) => gpu.driver.clone(),
    }
}

/// Why the host uses this GPU itself, if it does: it is the boot VGA device, or a host
/// driver other than a passthrough stub is bound to it.
pub fn host_use(gpu: &Gpu, sysfs: &Path) -> Option<String> {
    let boot_vga = std::fs::read_to_string(gpu.sysfs_dir(sysfs).join("boot_vga"))
        .map(|v| v.trim() == "1")
        .unwrap_or(false);
    if boot_vga {
        return Some("it is the host's boot VGA device (its console)".into());
    }
    let driver = bound_driver(gpu, sysfs);
    if !driver.is_empty() && !PASSTHROUGH_DRIVERS.contains(&driver.as_str()) {
        return Some(format!("the host driver {driver} is bound to it"));
    }
    None
}

/// Whether an entry of `gpu_allow` (a PCI address such as `0000:01:00.0`, or a kind) names
/// this GPU.
pub fn allowed(gpu: &Gpu, allow: &[String]) -> bool {
    let address = gpu.address();
    allow
        .iter()
        .any(|a| a.eq_ignore_ascii_case(&address) || *a == gpu.kind)
}

/// Whether a `gpu_allow` entry is well formed: a PCI address `DDDD:BB:SS.F` (hex) or a kind.
pub fn valid_allow_entry(entry: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let address = entry.split_once(':').is_some_and(|(domain, rest)| {
        rest.split_once(':').is_some_and(|(bus, rest)| {
            rest.split_once('.').is_some_and(|(slot, function)| {
                hex(domain, 4)
                    && hex(bus, 2)
                    && hex(slot, 2)
                    && matches!(function.as_bytes(), [b'0'..=b'7'])
            })
        })
    });
    let kind = !entry.is_empty()
        && entry
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    address || kind
}

/// Whether `gpu` is offered to workspaces (see the module docs); the reason it is not.
pub fn offer(gpu: &Gpu, sysfs: &Path, allow: &[String]) -> Result<(), String> {
    match host_use(gpu, sysfs) {
        None => Ok(()),
        Some(why) if allowed(gpu, allow) => {
            tracing::warn!(address = %gpu.address(), kind = %gpu.kind, reason = %why, "GPU offered although the host uses it: gpu_allow names it");
            Ok(())
        }
        Some(why) => Err(why),
    }
}

/// Discovery of one node device: the GPU [`parse_device`] finds in its XML if it is offered
/// (the host does not use it, or `allow`, the config's `gpu_allow`, names it), with the
/// driver sysfs shows bound.
pub fn parse(device: &str, xml: &str, allow: &[String]) -> Option<Gpu> {
    let mut gpu = parse_device(device, xml)?;
    let sysfs = Path::new(SYSFS);
    if let Err(why) = offer(&gpu, sysfs, allow) {
        tracing::info!(address = %gpu.address(), kind = %gpu.kind, reason = %why, "GPU not offered to workspaces: the host uses it (list it in gpu_allow to offer it anyway)");
        return None;
    }
    gpu.driver = bound_driver(&gpu, sysfs);
    Some(gpu)
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
pub fn parse_device(device: &str, xml: &str) -> Option<Gpu> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    let (mut class, mut domain, mut bus, mut slot, mut function) = (None, 0, 0, 0, 0);
    let (mut vendor_id, mut product_id, mut vendor, mut product) =
        (0, 0, String::new(), String::new());
    let (mut iommu_group, mut driver, mut sysfs_path) = (None, String::new(), None);
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
                    Some("path") if path.len() == 2 && !text.is_empty() => {
                        sysfs_path = Some(PathBuf::from(text))
                    }
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
        sysfs_path,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{bound_driver, host_use, kind, offer, parse_device, valid_allow_entry};

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
        let g = parse_device("pci_0000_01_00_0", T4).unwrap();
        assert_eq!(g.kind, "nvidia-tesla-t4");
        assert_eq!(g.address(), "0000:01:00.0");
        assert_eq!(g.iommu_group, Some(12));
        assert_eq!(g.driver, "vfio-pci");
        assert_eq!(g.name, "NVIDIA Corporation TU104GL [Tesla T4]");
        assert_eq!(g.sysfs_path, None);
        assert_eq!(
            g.sysfs_dir(Path::new("/sys")),
            Path::new("/sys/bus/pci/devices/0000:01:00.0")
        );
        let with_path = T4.replace(
            "<driver>",
            "<path>/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0</path>\n  <driver>",
        );
        let g = parse_device("pci_0000_01_00_0", &with_path).unwrap();
        assert_eq!(
            g.sysfs_dir(Path::new("/elsewhere")),
            Path::new("/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0")
        );
    }

    /// The boot VGA device and GPUs bound to a host driver are the host's; vfio-pci,
    /// pci-stub or no driver at all is not.
    #[test]
    fn what_the_host_uses() {
        let sysfs = tempfile::tempdir().unwrap();
        let root = sysfs.path();
        let g = parse_device("pci_0000_01_00_0", T4).unwrap();
        // No sysfs directory: libvirt's word on the driver (vfio-pci).
        assert_eq!(host_use(&g, root), None);
        let mut i915 = g.clone();
        i915.driver = "i915".into();
        assert!(host_use(&i915, root).unwrap().contains("i915"));

        let dir = root.join("bus/pci/devices/0000:01:00.0");
        std::fs::create_dir_all(&dir).unwrap();
        // The directory, no driver link: unbound, whatever libvirt said.
        assert_eq!(bound_driver(&i915, root), "");
        assert_eq!(host_use(&i915, root), None);
        std::fs::write(dir.join("boot_vga"), "0\n").unwrap();
        assert_eq!(host_use(&g, root), None);
        std::fs::write(dir.join("boot_vga"), "1\n").unwrap();
        assert!(host_use(&g, root).unwrap().contains("boot VGA"));
        std::fs::write(dir.join("boot_vga"), "0\n").unwrap();
        for (driver, hosts) in [
            ("nvidia", true),
            ("amdgpu", true),
            ("vfio-pci", false),
            ("pci-stub", false),
        ] {
            let _ = std::fs::remove_file(dir.join("driver"));
            std::os::unix::fs::symlink(
                format!("../../../bus/pci/drivers/{driver}"),
                dir.join("driver"),
            )
            .unwrap();
            assert_eq!(bound_driver(&g, root), driver);
            assert_eq!(host_use(&g, root).is_some(), hosts, "{driver}");
        }
    }

    #[test]
    fn gpu_allow_offers_what_the_host_uses() {
        let sysfs = tempfile::tempdir().unwrap();
        let dir = sysfs.path().join("bus/pci/devices/0000:01:00.0");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("boot_vga"), "1\n").unwrap();
        let g = parse_device("pci_0000_01_00_0", T4).unwrap();
        let allow = |list: &[&str]| {
            let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
            offer(&g, sysfs.path(), &list)
        };
        assert!(allow(&[]).is_err());
        assert!(allow(&["0000:02:00.0", "amd-radeon-rx-6800"]).is_err());
        assert!(allow(&["0000:01:00.0"]).is_ok());
        assert!(allow(&["0000:01:00.0".to_uppercase().as_str()]).is_ok());
        assert!(allow(&["nvidia-tesla-t4"]).is_ok());
        // A GPU the host does not use needs no entry.
        std::fs::write(dir.join("boot_vga"), "0\n").unwrap();
        assert!(allow(&[]).is_ok());
    }

    #[test]
    fn gpu_allow_entries() {
        for good in [
            "0000:01:00.0",
            "0000:AF:1f.7",
            "nvidia-tesla-t4",
            "qemu-1111",
        ] {
            assert!(valid_allow_entry(good), "{good}");
        }
        for bad in [
            "",
            "01:00.0",
            "0000:01:00.8",
            "0000:01:00",
            "0000:1:00.0",
            "NVIDIA",
            "nvidia tesla",
            "../x",
        ] {
            assert!(!valid_allow_entry(bad), "{bad}");
        }
    }

    #[test]
    fn other_pci_classes_are_not_gpus() {
        let nic = T4.replace("0x030200", "0x020000");
        assert_eq!(parse_device("pci_0000_01_00_0", &nic), None);
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
