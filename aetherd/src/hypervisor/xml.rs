//! libvirt XML produced with an XML writer, never by string formatting, so no value can
//! change the document's structure. Golden files in `golden/` pin the output.

use std::path::{Path, PathBuf};

use quick_xml::events::BytesText;
use quick_xml::Writer;

use crate::model::{ProjectId, WorkspaceId};

/// XML namespace of the `<metadata>` element that marks a domain as aether's.
pub const METADATA_NS: &str = "urn:aether:workspace:1";
/// Namespace prefix used for that element.
pub const METADATA_PREFIX: &str = "aether";

/// The libvirt domain type (`<domain type=…>`): the accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainType {
    Kvm,
    /// qemu with TCG (software emulation).
    Qemu,
    /// libvirt's in-process test driver.
    Test,
}

impl DomainType {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
            DomainType::Test => "test",
        }
    }

    /// The name users see for the accelerator.
    pub fn accelerator(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "tcg",
            DomainType::Test => "test",
        }
    }
}

/// How the domain boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// SeaBIOS boots the root disk.
    Bios,
    /// OVMF boots the root disk (`<os firmware='efi'>`).
    Uefi,
    /// Direct kernel boot.
    Kernel {
        kernel: PathBuf,
        initrd: PathBuf,
        cmdline: String,
    },
}

/// Everything the domain XML is made from; all fields are validated types, numbers, or
/// paths the daemon built from validated names.
#[derive(Clone, Debug)]
pub struct DomainSpec {
    pub workspace: WorkspaceId,
    pub project: ProjectId,
    pub uuid: String,
    pub domain_type: DomainType,
    pub cpus: u32,
    pub memory_mb: u32,
    pub boot: Boot,
    /// qcow2 root volume (vda); `None` for workspaces without an image.
    pub root_disk: Option<PathBuf>,
    /// cloud-init seed (vdb, read-only raw vfat).
    pub seed_disk: Option<PathBuf>,
    /// NIC on the `aether` network.
    pub mac: Option<String>,
    pub network: String,
    /// The NIC's isolation filter (see `nwfilter`); `None`: no filter (the test driver).
    pub filter: Option<super::nwfilter::GuestFilter>,
    /// File that receives the serial console.
    pub console_log: Option<PathBuf>,
    /// Performance workspaces: the host CPU of each vCPU (vCPU i on `dedicated_cpus[i]`).
    /// Empty: a shared workspace, whose vCPUs float over `shared_cpus`.
    pub dedicated_cpus: Vec<u32>,
    /// Host CPUs dedicated to no workspace: where a shared workspace's vCPUs and every
    /// workspace's emulator threads run. Empty: all of them (nothing is dedicated).
    pub shared_cpus: Vec<u32>,
    /// PCI address (domain, bus, slot, function) of a GPU passed through (managed hostdev).
    pub gpu: Option<(u32, u32, u32, u32)>,
}

/// `0,2,5` for libvirt's cpuset attributes.
fn cpuset(cpus: &[u32]) -> String {
    cpus.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn path_str(p: &Path) -> &str {
    // Paths are built by the daemon from UTF-8 config values and validated names.
    p.to_str().expect("daemon-built paths are UTF-8")
}

type W = Writer<Vec<u8>>;
type R = std::io::Result<()>;

fn text_element(w: &mut W, name: &str, attrs: &[(&str, &str)], text: &str) -> R {
    w.create_element(name)
        .with_attributes(attrs.iter().copied())
        .write_text_content(BytesText::new(text))?;
    Ok(())
}

fn empty_element(w: &mut W, name: &str, attrs: &[(&str, &str)]) -> R {
    w.create_element(name)
        .with_attributes(attrs.iter().copied())
        .write_empty()?;
    Ok(())
}

/// The `<aether:workspace>` metadata element, also used on its own to check ownership.
fn write_metadata(w: &mut W, spec: &DomainSpec) -> R {
    let ns_attr = format!("xmlns:{METADATA_PREFIX}");
    w.create_element(format!("{METADATA_PREFIX}:workspace"))
        .with_attribute((ns_attr.as_str(), METADATA_NS))
        .write_inner_content(|w| {
            text_element(
                w,
                &format!("{METADATA_PREFIX}:id"),
                &[],
                spec.workspace.as_str(),
            )?;
            text_element(
                w,
                &format!("{METADATA_PREFIX}:project"),
                &[],
                spec.project.as_str(),
            )
        })?;
    Ok(())
}

fn write_disk(w: &mut W, path: &Path, format: &str, dev: &str, readonly: bool) -> R {
    w.create_element("disk")
        .with_attributes([("type", "file"), ("device", "disk")])
        .write_inner_content(|w| {
            empty_element(w, "driver", &[("name", "qemu"), ("type", format)])?;
            empty_element(w, "source", &[("file", path_str(path))])?;
            empty_element(w, "target", &[("dev", dev), ("bus", "virtio")])?;
            if readonly {
                empty_element(w, "readonly", &[])?;
            }
            Ok(())
        })?;
    Ok(())
}

fn write_devices(w: &mut W, spec: &DomainSpec) -> R {
    if let Some(root) = &spec.root_disk {
        write_disk(w, root, "qcow2", "vda", false)?;
    }
    if let Some(seed) = &spec.seed_disk {
        write_disk(w, seed, "raw", "vdb", true)?;
    }
    if let Some(mac) = &spec.mac {
        w.create_element("interface")
            .with_attribute(("type", "network"))
            .write_inner_content(|w| {
                empty_element(w, "mac", &[("address", mac)])?;
                empty_element(w, "source", &[("network", &spec.network)])?;
                empty_element(w, "model", &[("type", "virtio")])?;
                if let Some(filter) = &spec.filter {
                    w.create_element("filterref")
                        .with_attribute(("filter", super::nwfilter::GUEST_FILTER))
                        .write_inner_content(|w| {
                            for (name, value) in filter.parameters() {
                                empty_element(
                                    w,
                                    "parameter",
                                    &[("name", name), ("value", value.as_str())],
                                )?;
                            }
                            Ok(())
                        })?;
                }
                // No frame from this port reaches another workspace's port.
                empty_element(w, "port", &[("isolated", "yes")])
            })?;
    }
    if let Some(log) = &spec.console_log {
        w.create_element("serial")
            .with_attribute(("type", "file"))
            .write_inner_content(|w| {
                empty_element(w, "source", &[("path", path_str(log)), ("append", "on")])?;
                empty_element(w, "target", &[("port", "0")])
            })?;
    }
    if let Some((domain, bus, slot, function)) = spec.gpu {
        let (domain, bus, slot, function) = (
            format!("0x{domain:04x}"),
            format!("0x{bus:02x}"),
            format!("0x{slot:02x}"),
            format!("0x{function:x}"),
        );
        w.create_element("hostdev")
            .with_attributes([("mode", "subsystem"), ("type", "pci"), ("managed", "yes")])
            .write_inner_content(|w| {
                w.create_element("source").write_inner_content(|w| {
                    empty_element(
                        w,
                        "address",
                        &[
                            ("domain", &domain),
                            ("bus", &bus),
                            ("slot", &slot),
                            ("function", &function),
                        ],
                    )
                })?;
                Ok(())
            })?;
    }
    // Guests otherwise wait for entropy before sshd starts.
    w.create_element("rng")
        .with_attribute(("model", "virtio"))
        .write_inner_content(|w| {
            text_element(w, "backend", &[("model", "random")], "/dev/urandom")
        })?;
    Ok(())
}

/// The `aether` dir storage pool.
pub fn pool_xml(name: &str, path: &Path) -> String {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    let r: R = (|| {
        w.create_element("pool")
            .with_attribute(("type", "dir"))
            .write_inner_content(|w| {
                text_element(w, "name", &[], name)?;
                w.create_element("target")
                    .write_inner_content(|w| text_element(w, "path", &[], path_str(path)))?;
                Ok(())
            })?;
        Ok(())
    })();
    r.expect("writing XML to a Vec cannot fail");
    String::from_utf8(w.into_inner()).expect("the XML writer emits UTF-8")
}

/// A qcow2 overlay volume of `capacity_gib` on the qcow2 `backing` file.
pub fn overlay_volume_xml(name: &str, capacity_gib: u32, backing: &Path) -> String {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    let capacity = capacity_gib.to_string();
    let r: R = (|| {
        w.create_element("volume").write_inner_content(|w| {
            text_element(w, "name", &[], name)?;
            text_element(w, "capacity", &[("unit", "GiB")], &capacity)?;
            w.create_element("target")
                .write_inner_content(|w| empty_element(w, "format", &[("type", "qcow2")]))?;
            w.create_element("backingStore").write_inner_content(|w| {
                text_element(w, "path", &[], path_str(backing))?;
                empty_element(w, "format", &[("type", "qcow2")])
            })?;
            Ok(())
        })?;
        Ok(())
    })();
    r.expect("writing XML to a Vec cannot fail");
    String::from_utf8(w.into_inner()).expect("the XML writer emits UTF-8")
}

pub fn domain_xml(spec: &DomainSpec) -> String {
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    let cpus = spec.cpus.to_string();
    let memory = spec.memory_mb.to_string();
    let name = spec.workspace.domain_name();
    let result: R = (|| {
        w.create_element("domain")
            .with_attribute(("type", spec.domain_type.as_str()))
            .write_inner_content(|w| {
                text_element(w, "name", &[], &name)?;
                text_element(w, "uuid", &[], &spec.uuid)?;
                w.create_element("metadata")
                    .write_inner_content(|w| write_metadata(w, spec))?;
                text_element(w, "memory", &[("unit", "MiB")], &memory)?;
                if spec.dedicated_cpus.is_empty() && !spec.shared_cpus.is_empty() {
                    let set = cpuset(&spec.shared_cpus);
                    text_element(w, "vcpu", &[("cpuset", &set)], &cpus)?;
                } else {
                    text_element(w, "vcpu", &[], &cpus)?;
                }
                if !spec.dedicated_cpus.is_empty() {
                    w.create_element("cputune").write_inner_content(|w| {
                        for (vcpu, host) in spec.dedicated_cpus.iter().enumerate() {
                            let (vcpu, host) = (vcpu.to_string(), host.to_string());
                            empty_element(w, "vcpupin", &[("vcpu", &vcpu), ("cpuset", &host)])?;
                        }
                        if !spec.shared_cpus.is_empty() {
                            empty_element(
                                w,
                                "emulatorpin",
                                &[("cpuset", &cpuset(&spec.shared_cpus))],
                            )?;
                        }
                        Ok(())
                    })?;
                    if spec.domain_type == DomainType::Kvm {
                        empty_element(w, "cpu", &[("mode", "host-passthrough")])?;
                    }
                }
                let os = w.create_element("os");
                let os = match spec.boot {
                    Boot::Uefi => os.with_attribute(("firmware", "efi")),
                    Boot::Bios | Boot::Kernel { .. } => os,
                };
                os.write_inner_content(|w| {
                    text_element(w, "type", &[("arch", "x86_64")], "hvm")?;
                    match &spec.boot {
                        Boot::Kernel {
                            kernel,
                            initrd,
                            cmdline,
                        } => {
                            text_element(w, "kernel", &[], path_str(kernel))?;
                            text_element(w, "initrd", &[], path_str(initrd))?;
                            text_element(w, "cmdline", &[], cmdline)
                        }
                        Boot::Bios | Boot::Uefi => empty_element(w, "boot", &[("dev", "hd")]),
                    }
                })?;
                w.create_element("features").write_inner_content(|w| {
                    empty_element(w, "acpi", &[])?;
                    empty_element(w, "apic", &[])
                })?;
                empty_element(w, "clock", &[("offset", "utc")])?;
                text_element(w, "on_poweroff", &[], "destroy")?;
                text_element(w, "on_reboot", &[], "restart")?;
                text_element(w, "on_crash", &[], "destroy")?;
                w.create_element("devices")
                    .write_inner_content(|w| write_devices(w, spec))?;
                Ok(())
            })?;
        Ok(())
    })();
    result.expect("writing XML to a Vec cannot fail");
    String::from_utf8(w.into_inner()).expect("the XML writer emits UTF-8")
}

/// Returns the workspace id recorded in a domain's aether metadata element (as returned by
/// `virDomainGetMetadata`), if it has one.
pub fn metadata_workspace_id(metadata: &str) -> Option<String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(metadata);
    let mut in_id = false;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => in_id = e.local_name().into_inner() == "id",
            Ok(Event::Text(t)) if in_id => {
                return Some(t.xml10_content().trim().to_owned());
            }
            Ok(Event::End(_)) => in_id = false,
            Ok(Event::Eof) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{
        domain_xml, metadata_workspace_id, overlay_volume_xml, pool_xml, Boot, DomainSpec,
        DomainType,
    };
    use crate::model::{ProjectId, WorkspaceId};

    fn spec() -> DomainSpec {
        DomainSpec {
            workspace: WorkspaceId::parse("ws-abc123").unwrap(),
            project: ProjectId::parse("a1b2c3d4").unwrap(),
            uuid: "0b5c2e0e-2f1a-4d3b-9c6d-7e8f90a1b2c3".into(),
            domain_type: DomainType::Qemu,
            cpus: 2,
            memory_mb: 2048,
            boot: Boot::Bios,
            root_disk: None,
            seed_disk: None,
            mac: None,
            filter: None,
            network: "aether".into(),
            console_log: None,
            dedicated_cpus: Vec::new(),
            shared_cpus: Vec::new(),
            gpu: None,
        }
    }

    fn full_spec() -> DomainSpec {
        DomainSpec {
            boot: Boot::Kernel {
                kernel: "/var/lib/aether/boot/testguest/vmlinuz".into(),
                initrd: "/var/lib/aether/boot/testguest/initrd.img".into(),
                cmdline: "console=ttyS0 quiet".into(),
            },
            root_disk: Some("/var/lib/aether/pool/ws-abc123-root.qcow2".into()),
            seed_disk: Some("/var/lib/aether/pool/ws-abc123-seed.img".into()),
            mac: Some("52:54:00:aa:00:01".into()),
            filter: Some(super::super::nwfilter::GuestFilter {
                ip: "192.168.150.10".parse().unwrap(),
                host_ips: vec![
                    "192.0.2.2".parse().unwrap(),
                    "192.168.150.1".parse().unwrap(),
                ],
                ephemeral: (32768, 60999),
            }),
            console_log: Some("/var/lib/aether/console/ws-abc123.log".into()),
            ..spec()
        }
    }

    /// Compares with a golden file; `AETHER_UPDATE_GOLDEN=1` rewrites it.
    fn golden(name: &str, actual: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/hypervisor/golden")
            .join(name);
        if std::env::var_os("AETHER_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, actual).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (AETHER_UPDATE_GOLDEN=1 creates it)",
                path.display()
            )
        });
        assert_eq!(actual, expected, "{} differs", path.display());
    }

    #[test]
    fn domain_xml_matches_golden() {
        golden("domain-qemu.xml", &domain_xml(&spec()));
        golden("domain-kernel-boot.xml", &domain_xml(&full_spec()));
        let uefi = DomainSpec {
            boot: Boot::Uefi,
            domain_type: DomainType::Kvm,
            ..full_spec()
        };
        golden("domain-uefi-kvm.xml", &domain_xml(&uefi));
        let performance = DomainSpec {
            domain_type: DomainType::Kvm,
            dedicated_cpus: vec![2, 3],
            shared_cpus: vec![0, 1],
            ..spec()
        };
        golden("domain-performance-kvm.xml", &domain_xml(&performance));
        let shared_beside_performance = DomainSpec {
            shared_cpus: vec![0, 1],
            ..spec()
        };
        golden(
            "domain-shared-confined.xml",
            &domain_xml(&shared_beside_performance),
        );
        let with_gpu = DomainSpec {
            gpu: Some((0, 1, 0, 0)),
            ..full_spec()
        };
        golden("domain-gpu.xml", &domain_xml(&with_gpu));
    }

    #[test]
    fn pool_and_volume_xml_match_golden() {
        golden(
            "pool.xml",
            &pool_xml("aether", Path::new("/var/lib/aether/pool")),
        );
        golden(
            "volume-overlay.xml",
            &overlay_volume_xml(
                "ws-abc123-root.qcow2",
                20,
                Path::new("/var/lib/aether/pool/image-debian-12.qcow2"),
            ),
        );
    }

    #[test]
    fn text_is_escaped_not_interpreted() {
        let evil = DomainSpec {
            boot: Boot::Kernel {
                kernel: "/k".into(),
                initrd: "/i".into(),
                cmdline: "a</cmdline><devices>".into(),
            },
            ..spec()
        };
        let xml = domain_xml(&evil);
        assert!(
            xml.contains("<cmdline>a&lt;/cmdline&gt;&lt;devices&gt;</cmdline>"),
            "{xml}"
        );
    }

    #[test]
    fn metadata_round_trips() {
        let xml = domain_xml(&spec());
        let start = xml.find("<aether:workspace").unwrap();
        let end = xml.find("</aether:workspace>").unwrap() + "</aether:workspace>".len();
        assert_eq!(
            metadata_workspace_id(&xml[start..end]).as_deref(),
            Some("ws-abc123")
        );
        assert_eq!(metadata_workspace_id("<other><x>1</x></other>"), None);
    }
}
