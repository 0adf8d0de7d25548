//! libvirt XML produced with an XML writer, never by string formatting, so no value can
//! change the document's structure. Golden files in `golden/` pin the output.

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

/// Everything the domain XML is made from; all fields are validated types or numbers.
#[derive(Clone, Debug)]
pub struct DomainSpec {
    pub workspace: WorkspaceId,
    pub project: ProjectId,
    pub uuid: String,
    pub domain_type: DomainType,
    pub cpus: u32,
    pub memory_mb: u32,
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
                text_element(w, "vcpu", &[], &cpus)?;
                w.create_element("os").write_inner_content(|w| {
                    text_element(w, "type", &[("arch", "x86_64")], "hvm")?;
                    empty_element(w, "boot", &[("dev", "hd")])
                })?;
                w.create_element("features").write_inner_content(|w| {
                    empty_element(w, "acpi", &[])?;
                    empty_element(w, "apic", &[])
                })?;
                text_element(w, "on_poweroff", &[], "destroy")?;
                text_element(w, "on_reboot", &[], "restart")?;
                text_element(w, "on_crash", &[], "destroy")?;
                w.create_element("devices")
                    .write_inner_content(|_| Ok(()))?;
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
    use super::*;

    fn spec() -> DomainSpec {
        DomainSpec {
            workspace: WorkspaceId::parse("ws-abc123").unwrap(),
            project: ProjectId::parse("a1b2c3d4").unwrap(),
            uuid: "0b5c2e0e-2f1a-4d3b-9c6d-7e8f90a1b2c3".into(),
            domain_type: DomainType::Qemu,
            cpus: 2,
            memory_mb: 2048,
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
