//! The image catalog: stock cloud images by name, for `aether image pull`. The entries
//! shipped with the daemon (`catalog.toml`) come first; every `*.toml` file in the
//! configured directory (`image_catalog_dir`, default `/etc/aether/images.d`) adds entries
//! or replaces shipped ones by name, for a local mirror or a private image.
//!
//! Every field is validated when the catalog is read, so nothing malformed reaches a client:
//! names are image names, URLs are http(s) without credentials, the checksum algorithm is
//! sha256 or sha512. A file that does not parse is skipped with a warning naming it; the
//! rest of the catalog stays usable.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::images::{BootMode, ImageName};

const SHIPPED: &str = include_str!("catalog.toml");
/// Largest catalog file read (a catalog is a few entries).
const MAX_FILE: u64 = 1 << 20;
/// Most entries a catalog holds, together.
const MAX_ENTRIES: usize = 1000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: ImageName,
    pub description: String,
    pub url: String,
    pub checksum_url: String,
    /// "sha256" or "sha512".
    pub checksum: &'static str,
    pub boot: BootMode,
    /// The image's own default user (informational: workspaces log in as their creator).
    pub login_user: String,
    /// The smallest volume the image is meant for, in GiB.
    pub min_disk_gb: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    image: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: String,
    #[serde(default)]
    description: String,
    url: String,
    checksum_url: String,
    checksum: String,
    #[serde(default = "bios")]
    boot: String,
    #[serde(default)]
    login_user: String,
    #[serde(default)]
    min_disk_gb: u32,
}

fn bios() -> String {
    "bios".to_owned()
}

/// An http(s) URL without credentials, whitespace or control characters.
fn valid_url(what: &str, url: &str) -> Result<String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| Error::invalid(format!("{what} {url:?} is not an http(s) URL")))?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty()
        || authority.contains('@')
        || url.len() > 2048
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(Error::invalid(format!(
            "{what} {url:?} is not a plain http(s) URL (a host, no credentials, no spaces)"
        )));
    }
    Ok(url.to_owned())
}

impl RawEntry {
    fn validate(self) -> Result<Entry> {
        let name = ImageName::parse(&self.name)?;
        let checksum = match self.checksum.as_str() {
            "sha256" => "sha256",
            "sha512" => "sha512",
            other => {
                return Err(Error::invalid(format!(
                    "{name}: checksum {other:?} is not sha256 or sha512"
                )))
            }
        };
        let boot = match self.boot.as_str() {
            "bios" => BootMode::Bios,
            "uefi" => BootMode::Uefi,
            other => {
                return Err(Error::invalid(format!(
                    "{name}: boot {other:?} is not bios or uefi"
                )))
            }
        };
        let text = |what: &str, s: String| -> Result<String> {
            if s.len() > 200 || s.chars().any(char::is_control) {
                return Err(Error::invalid(format!(
                    "{name}: {what} is too long or has control characters"
                )));
            }
            Ok(s)
        };
        Ok(Entry {
            url: valid_url("url", &self.url)?,
            checksum_url: valid_url("checksum_url", &self.checksum_url)?,
            description: text("description", self.description)?,
            login_user: text("login_user", self.login_user)?,
            name,
            checksum,
            boot,
            min_disk_gb: self.min_disk_gb,
        })
    }
}

/// The entries of one catalog file's text.
fn parse(text: &str) -> Result<Vec<Entry>> {
    let file: File =
        toml::from_str(text).map_err(|e| Error::invalid(format!("not a catalog: {e}")))?;
    file.image.into_iter().map(RawEntry::validate).collect()
}

/// The shipped entries, then those of `dir`'s `*.toml` files in name order, each replacing
/// an earlier entry of its name.
pub fn load(dir: &Path) -> Vec<Entry> {
    let mut entries = parse(SHIPPED).expect("the shipped catalog is valid");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    for path in files {
        let read = std::fs::metadata(&path)
            .map_err(|e| Error::Internal(e.to_string()))
            .and_then(|m| {
                if m.len() > MAX_FILE {
                    Err(Error::invalid("larger than 1 MiB"))
                } else {
                    std::fs::read_to_string(&path).map_err(|e| Error::Internal(e.to_string()))
                }
            })
            .and_then(|text| parse(&text));
        match read {
            Ok(more) => {
                for e in more {
                    entries.retain(|old| old.name != e.name);
                    if entries.len() < MAX_ENTRIES {
                        entries.push(e);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "skipping an image catalog file")
            }
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::{load, parse, SHIPPED};
    use crate::images::BootMode;

    #[test]
    fn the_shipped_catalog_has_the_stock_images() {
        let names: Vec<String> = parse(SHIPPED)
            .unwrap()
            .iter()
            .map(|e| e.name.to_string())
            .collect();
        assert_eq!(
            names,
            ["ubuntu-22.04", "ubuntu-24.04", "debian-12", "debian-13"]
        );
    }

    #[test]
    fn local_files_add_and_replace_entries_and_bad_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |name: &str, url: &str| {
            format!(
                "[[image]]\nname = \"{name}\"\nurl = \"{url}\"\nchecksum_url = \"http://mirror.test/SUMS\"\nchecksum = \"sha256\"\nboot = \"uefi\"\n"
            )
        };
        std::fs::write(
            dir.path().join("10-mirror.toml"),
            entry("ubuntu-22.04", "http://mirror.test/jammy.img"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("20-own.toml"),
            entry("dev-box", "https://files.test/dev.qcow2"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("30-bad.toml"),
            entry("evil", "file:///etc/shadow"),
        )
        .unwrap();
        std::fs::write(dir.path().join("40-junk.toml"), "not = [toml").unwrap();
        std::fs::write(
            dir.path().join("50-ignored.txt"),
            entry("txt", "http://x.test/a"),
        )
        .unwrap();
        let all = load(dir.path());
        let names: Vec<String> = all.iter().map(|e| e.name.to_string()).collect();
        assert_eq!(
            names,
            [
                "ubuntu-24.04",
                "debian-12",
                "debian-13",
                "ubuntu-22.04",
                "dev-box"
            ]
        );
        let jammy = all
            .iter()
            .find(|e| e.name.as_str() == "ubuntu-22.04")
            .unwrap();
        assert_eq!(jammy.url, "http://mirror.test/jammy.img");
        assert_eq!(jammy.boot, BootMode::Uefi);
    }

    #[test]
    fn entries_are_validated() {
        let with = |field: &str| {
            let base = [
                ("name", "\"ok\""),
                ("url", "\"https://h.test/a.qcow2\""),
                ("checksum_url", "\"https://h.test/SUMS\""),
                ("checksum", "\"sha256\""),
            ];
            let mut text = String::from("[[image]]\n");
            for (k, v) in base {
                if !field.starts_with(&format!("{k} =")) {
                    text.push_str(&format!("{k} = {v}\n"));
                }
            }
            text.push_str(field);
            text.push('\n');
            parse(&text).map(|_| ()).map_err(|e| e.to_string())
        };
        assert_eq!(with("boot = \"bios\""), Ok(()));
        for (bad, says) in [
            ("name = \"../x\"", "invalid image name"),
            ("url = \"ftp://h.test/a\"", "is not an http(s) URL"),
            ("url = \"https://user:pw@h.test/a\"", "no credentials"),
            ("url = \"https:///a\"", "a host"),
            ("checksum = \"md5\"", "is not sha256 or sha512"),
            ("boot = \"kernel\"", "is not bios or uefi"),
            ("shell = \"rm -rf /\"", "unknown field"),
        ] {
            let e = with(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
