//! Guest images: imported files that become base volumes of the `aether` storage pool.
//!
//! Import receives the bytes (the CLI reads the file or URL with the user's own rights and
//! streams it), inspects the disk with `qemu-img info --output=json`, refuses images with a
//! backing file or whose format contradicts their file name, converts raw to qcow2, and moves
//! the result into the pool as `image-<name>.qcow2`. Kernel and initrd of a direct-kernel-boot
//! image live in `<state>/boot/<name>/`. Every `qemu-img` call is an argument list; every
//! path is built from a validated image name.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::files::set_mode;

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

impl ImageName {
    pub fn parse(s: &str) -> Result<Self> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(Error::invalid(format!(
                "invalid image name {s:?}: use 1-63 lowercase letters, digits, '.', '_' and '-', starting with a letter or digit"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// File name of the base volume in the pool.
    pub fn volume_name(&self) -> String {
        format!("image-{}.qcow2", self.0)
    }
}

impl std::fmt::Display for ImageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An image as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub name: ImageName,
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

/// The parts of `qemu-img info --output=json` that matter here.
#[derive(Debug, Deserialize)]
pub struct QemuImgInfo {
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    pub actual_size: u64,
    #[serde(rename = "backing-filename")]
    pub backing_filename: Option<String>,
}

pub fn qemu_img_info(path: &Path) -> Result<QemuImgInfo> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "--"])
        .arg(path)
        .output()
        .map_err(|e| Error::Internal(format!("cannot run qemu-img (install qemu-utils): {e}")))?;
    if !out.status.success() {
        return Err(Error::invalid(format!(
            "not a disk image qemu-img can read: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::Internal(format!("unexpected qemu-img output: {e}")))
}

/// Checks an uploaded disk: qcow2 or raw, no backing file, format consistent with the name.
pub fn check_disk(info: &QemuImgInfo, source_name: &str) -> Result<()> {
    if let Some(backing) = &info.backing_filename {
        return Err(Error::invalid(format!(
            "image has a backing file ({backing}); import a standalone image (qemu-img convert -O qcow2 flattens it)"
        )));
    }
    if info.format != "qcow2" && info.format != "raw" {
        return Err(Error::invalid(format!(
            "unsupported image format {}: expected qcow2 or raw",
            info.format
        )));
    }
    let ext = Path::new(source_name)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("");
    let claims = match ext {
        "qcow2" => Some("qcow2"),
        "raw" => Some("raw"),
        _ => None,
    };
    if let Some(claimed) = claims {
        if claimed != info.format {
            return Err(Error::invalid(format!(
                "{source_name} is {}, not {claimed} as its name says",
                info.format
            )));
        }
    }
    if info.virtual_size == 0 {
        return Err(Error::invalid("image has a virtual size of 0 bytes"));
    }
    Ok(())
}

/// Converts (raw) or moves (qcow2) the checked disk at `src` to `dest` as qcow2.
pub fn install_disk(info: &QemuImgInfo, src: &Path, dest: &Path) -> Result<()> {
    if info.format == "qcow2" {
        std::fs::rename(src, dest).map_err(|e| {
            Error::Internal(format!("cannot move image to {}: {e}", dest.display()))
        })?;
    } else {
        let out = Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2", "--"])
            .arg(src)
            .arg(dest)
            .output()
            .map_err(|e| Error::Internal(format!("cannot run qemu-img: {e}")))?;
        if !out.status.success() {
            return Err(Error::Internal(format!(
                "qemu-img convert failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    set_mode(dest, 0o640)
}

/// Where the daemon keeps files, all under the state dir.
#[derive(Clone, Debug)]
pub struct Layout {
    pub state_dir: PathBuf,
}

impl Layout {
    /// The `aether` dir pool: base images, root volumes, seeds.
    pub fn pool(&self) -> PathBuf {
        self.state_dir.join("pool")
    }

    pub fn boot_dir(&self, image: &ImageName) -> PathBuf {
        self.state_dir.join("boot").join(image.as_str())
    }

    pub fn kernel(&self, image: &ImageName) -> PathBuf {
        self.boot_dir(image).join("vmlinuz")
    }

    pub fn initrd(&self, image: &ImageName) -> PathBuf {
        self.boot_dir(image).join("initrd.img")
    }

    pub fn console_dir(&self) -> PathBuf {
        self.state_dir.join("console")
    }

    pub fn console_log(&self, ws: &crate::model::WorkspaceId) -> PathBuf {
        self.console_dir().join(format!("{ws}.log"))
    }

    pub fn tmp(&self) -> PathBuf {
        self.state_dir.join("tmp")
    }

    pub fn keys(&self) -> PathBuf {
        self.state_dir.join("keys")
    }

    /// Creates the directories (again: modes are set each time, fixing older ones). qemu,
    /// running as its own user, must traverse the state, pool, boot and console dirs: they
    /// are `0750` with group `qemu` (see [`crate::privacy`]); the rest is root's alone.
    pub fn create(&self, qemu: Option<u32>) -> Result<()> {
        for (dir, for_qemu) in [
            (self.state_dir.clone(), true),
            (self.pool(), true),
            (self.state_dir.join("boot"), true),
            (self.console_dir(), true),
            (self.tmp(), false),
            (self.keys(), false),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
            if for_qemu {
                crate::privacy::share_with_qemu(&dir, qemu, 0o750)?;
            } else {
                set_mode(&dir, 0o700)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(format: &str, backing: Option<&str>) -> QemuImgInfo {
        QemuImgInfo {
            format: format.into(),
            virtual_size: 1 << 30,
            actual_size: 0,
            backing_filename: backing.map(Into::into),
        }
    }

    #[test]
    fn names() {
        for good in ["debian-12", "ubuntu-24.04", "a", "x_y"] {
            assert!(ImageName::parse(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "../x", "a/b", "A", &"a".repeat(64)] {
            assert!(ImageName::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            ImageName::parse("d").unwrap().volume_name(),
            "image-d.qcow2"
        );
    }

    #[test]
    fn disk_checks() {
        assert!(check_disk(&info("qcow2", None), "x.qcow2").is_ok());
        assert!(check_disk(&info("raw", None), "x.img").is_ok());
        assert!(check_disk(&info("raw", None), "x").is_ok());
        let e = check_disk(&info("qcow2", Some("/etc/shadow")), "x.qcow2").unwrap_err();
        assert!(e.to_string().contains("backing file"), "{e}");
        let e = check_disk(&info("raw", None), "x.qcow2").unwrap_err();
        assert_eq!(e.to_string(), "x.qcow2 is raw, not qcow2 as its name says");
        let e = check_disk(&info("vmdk", None), "x.vmdk").unwrap_err();
        assert!(
            e.to_string().contains("unsupported image format vmdk"),
            "{e}"
        );
    }

    #[test]
    fn real_qemu_img_inspection_and_conversion() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let i = qemu_img_info(&raw).unwrap();
        assert_eq!(i.format, "raw");
        assert_eq!(i.virtual_size, 1 << 20);
        let out = dir.path().join("out.qcow2");
        install_disk(&i, &raw, &out).unwrap();
        let o = qemu_img_info(&out).unwrap();
        assert_eq!(o.format, "qcow2");
        assert_eq!(o.virtual_size, 1 << 20);
        // An overlay has a backing file and is refused.
        let overlay = dir.path().join("overlay.qcow2");
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&out)
            .arg(&overlay)
            .status()
            .unwrap();
        assert!(st.success());
        let e = check_disk(&qemu_img_info(&overlay).unwrap(), "overlay.qcow2").unwrap_err();
        assert!(e.to_string().contains("backing file"), "{e}");
    }
}
