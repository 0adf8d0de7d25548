//! Guest images: imported files that become base volumes of the `aether` storage pool.
//!
//! Import receives the bytes (the CLI reads the file or URL with the user's own rights and
//! streams it) into a staging directory of its own under `<state>/tmp`. Image files come
//! from any member of group `aether` and the daemon is root, so a disk is untrusted until
//! checked, and nothing in it may make qemu or qemu-img open another file: the format is
//! decided from the file's own signature (and must be the one its name claims), a qcow2
//! header is read here first (no backing file, no external data file, no encryption, not
//! truncated, virtual size at most the largest volume), then `qemu-img info` and, for
//! qcow2, `qemu-img check` must agree. Every `qemu-img` call names the format (`-f`), runs
//! under address-space, CPU-time and wall-clock limits, and gets an argument list. Raw is
//! converted to qcow2, and the file that goes into the pool (`image-<id>.qcow2`, see [`ImageId`]) is checked
//! again right before it moves there. Kernel and initrd of a direct-kernel-boot image live in
//! `<state>/boot/<id>/`. Every path is built from a validated image id.
//!
//! The parts: `check` (the hostile-image checks: signatures, the format decision,
//! [`check_disk`], [`identify`]), `qcow2` (our own read of a qcow2 header), `qemu_img`
//! (running `qemu-img` under limits, judging what it says, [`convert_raw`]), `pool`
//! ([`move_into_pool`]) and `service` ([`Images`]: import, list, delete).

pub mod catalog;
mod check;
mod pool;
mod qcow2;
mod qemu_img;
mod service;
pub mod snapshots;

pub use check::{check_disk, claimed_format, decide_format, identify, sniff, CheckedDisk};
pub use pool::move_into_pool;
pub use qcow2::check_qcow2_header;
pub use qemu_img::{convert_raw, judge_check, judge_info, FormatSpecific, QemuImgInfo};
pub use service::{ImageUpload, Images};

use crate::error::{Error, Result};

/// How an image boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootMode {
    Bios,
    Uefi,
    Kernel,
}

impl BootMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BootMode::Bios => "bios",
            BootMode::Uefi => "uefi",
            BootMode::Kernel => "kernel",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "bios" => Ok(BootMode::Bios),
            "uefi" => Ok(BootMode::Uefi),
            "kernel" => Ok(BootMode::Kernel),
            _ => Err(Error::Internal(format!(
                "unknown boot mode {s:?} in the database"
            ))),
        }
    }
}

/// An image name: `^[a-z0-9][a-z0-9._-]{0,62}$`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageName(String);

/// `s` if it matches `^[a-z0-9][a-z0-9._-]{0,62}$` (what image and snapshot names are),
/// else the refusal naming `what` ("image name").
pub(crate) fn parse_name(s: &str, what: &str) -> Result<String> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(Error::invalid(format!(
            "invalid {what} {s:?}: use 1-63 lowercase letters, digits, '.', '_' and '-', starting with a letter or digit"
        )))
    }
}

impl ImageName {
    pub fn parse(s: &str) -> Result<Self> {
        parse_name(s, "image name").map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ImageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which image a name means: images belong to their importer, and names are unique per
/// owner. Root's images are shared with everyone and keep their plain name as id; a member's
/// image is `NAME@UID` (`@` is not allowed in a name, so no id of one owner can be another's).
/// The id names the image's files and is what a workspace records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageId {
    name: ImageName,
    owner_uid: u32,
}

impl ImageId {
    pub fn new(name: ImageName, owner_uid: u32) -> Self {
        Self { name, owner_uid }
    }

    /// Parses `NAME` (root's) or `NAME@UID`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.split_once('@') {
            None => Ok(Self::new(ImageName::parse(s)?, 0)),
            Some((name, uid)) => {
                let owner_uid = uid
                    .parse::<u32>()
                    .ok()
                    .filter(|u| *u != 0 && !uid.starts_with('0') && !uid.starts_with('+'))
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "invalid image id {s:?}: use NAME, or NAME@UID for a user's own image"
                        ))
                    })?;
                Ok(Self::new(ImageName::parse(name)?, owner_uid))
            }
        }
    }

    pub fn name(&self) -> &ImageName {
        &self.name
    }

    pub fn owner_uid(&self) -> u32 {
        self.owner_uid
    }

    /// File name of the base volume in the pool.
    pub fn volume_name(&self) -> String {
        format!("image-{self}.qcow2")
    }
}

impl std::fmt::Display for ImageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.owner_uid {
            0 => write!(f, "{}", self.name),
            uid => write!(f, "{}@{uid}", self.name),
        }
    }
}

/// An image as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub id: ImageId,
    pub boot_mode: BootMode,
    pub cmdline: String,
    pub virtual_size: u64,
    pub disk_size: u64,
    pub created_at: i64,
    pub in_use: u32,
}

/// Validates a kernel command line: printable ASCII, bounded.
pub fn validate_cmdline(s: &str) -> Result<()> {
    if s.len() > 1024 || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(Error::invalid(
            "invalid kernel command line: use at most 1024 printable ASCII characters",
        ));
    }
    Ok(())
}

/// The largest disk (virtual size) an image may have when the daemon's largest volume is
/// `max_volume_size_gb` GiB: a workspace's volume may not be smaller than its image.
pub fn max_virtual_size(max_volume_size_gb: u32) -> u64 {
    u64::from(max_volume_size_gb) << 30
}

/// The formats an image may be imported in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// A refusal of an uploaded image: one line, the reason first.
fn refused(reason: impl std::fmt::Display) -> Error {
    Error::invalid(format!("image refused: {reason}"))
}

/// Text from an untrusted image (a file name in its header, qemu-img's message about it)
/// made fit for a one-line message: anything but printable ASCII is escaped, and it is cut
/// to 120 characters.
fn shown(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.chars().count() >= 120 {
            out.push_str("...");
            break;
        }
        if c == ' ' || c.is_ascii_graphic() {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

fn shown_bytes(b: &[u8]) -> String {
    shown(&String::from_utf8_lossy(b))
}

#[cfg(test)]
mod tests {
    use super::{ImageId, ImageName};

    #[test]
    fn names() {
        for good in ["debian-12", "ubuntu-24.04", "a", "x_y"] {
            assert!(ImageName::parse(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "../x", "a/b", "A", &"a".repeat(64)] {
            assert!(ImageName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_name_the_owner_except_for_root() {
        let id = |name: &str, uid| ImageId::new(ImageName::parse(name).unwrap(), uid);
        assert_eq!(id("d", 0).volume_name(), "image-d.qcow2");
        assert_eq!(id("d", 1000).volume_name(), "image-d@1000.qcow2");
        for (s, want) in [("d", id("d", 0)), ("d@1000", id("d", 1000))] {
            assert_eq!(ImageId::parse(s).unwrap(), want, "{s}");
            assert_eq!(want.to_string(), s);
        }
        for bad in [
            "d@",
            "d@0",
            "d@01",
            "d@+5",
            "d@x",
            "@5",
            "d@5@6",
            "d@99999999999",
            "../d@5",
        ] {
            assert!(ImageId::parse(bad).is_err(), "{bad}");
        }
    }
}
