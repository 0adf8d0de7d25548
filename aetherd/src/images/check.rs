//! The checks an uploaded disk must pass before qemu or qemu-img may use it: the format
//! its signature shows (and its name claims), its virtual size, backing-file names, and
//! [`check_disk`], which runs them all (with [`check_qcow2_header`] and `qemu-img`) and
//! makes sure the file did not change meanwhile.

use std::ffi::OsStr;
use std::path::Path;

use crate::error::{Error, Result};

use super::qcow2::check_qcow2_header;
use super::qemu_img::{absolute, judge_check, judge_info, qemu_img, QemuImgInfo, INSPECT_LIMITS};
use super::{refused, shown, DiskFormat};

/// A size in GiB, for messages.
fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if bytes.is_multiple_of(1 << 30) {
        format!("{g:.0} GiB")
    } else {
        format!("{g:.1} GiB")
    }
}

/// The format a file name claims (`.qcow2`, `.raw`), if any.
pub fn claimed_format(source_name: &str) -> Option<DiskFormat> {
    match Path::new(source_name).extension().and_then(|e| e.to_str()) {
        Some("qcow2") => Some(DiskFormat::Qcow2),
        Some("raw") => Some(DiskFormat::Raw),
        _ => None,
    }
}

/// What the first bytes of a disk say it is: the signatures of the formats qemu would
/// recognise when probing. `None`: no signature, so raw.
pub fn sniff(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        return Some(if at(4, &[0, 0, 0, 1]) {
            "qcow"
        } else {
            "qcow2"
        });
    }
    const MAGICS: &[(usize, &[u8], &str)] = &[
        (0, b"QED\0", "qed"),
        (0, b"KDMV", "vmdk"),
        (0, b"COWD", "vmdk"),
        (0, b"# Disk DescriptorFile", "vmdk"),
        (0, b"# Disk Descriptor File", "vmdk"),
        (0, b"vhdxfile", "vhdx"),
        (0, b"conectix", "vpc"),
        (0, b"LUKS\xba\xbe", "luks"),
        (0, b"WithoutFreeSpace", "parallels"),
        (0, b"WithouFreSpacExt", "parallels"),
        (0, b"Bochs Virtual HD Image", "bochs"),
        (0, b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
        (0x40, &[0x7f, 0x10, 0xda, 0xbe], "vdi"),
    ];
    MAGICS
        .iter()
        .find(|(off, magic, _)| at(*off, magic))
        .map(|&(_, _, name)| name)
}

/// The format to import `head` (the disk's first bytes) as: the one its name claims, which
/// its content must then be, or else the one its content shows. `source_name` comes from
/// the client.
pub fn decide_format(head: &[u8], source_name: &str) -> Result<DiskFormat> {
    let found = sniff(head);
    let actual = found.unwrap_or("raw");
    match claimed_format(source_name) {
        Some(claimed) if claimed.as_str() != actual => Err(refused(format!(
            "{} is {actual}, not {} as its name says",
            shown(source_name),
            claimed.as_str()
        ))),
        Some(claimed) => Ok(claimed),
        None => match found {
            None => Ok(DiskFormat::Raw),
            Some("qcow2") => Ok(DiskFormat::Qcow2),
            Some(other) => Err(refused(format!(
                "unsupported image format {other}: expected qcow2 or raw"
            ))),
        },
    }
}

pub(super) fn check_virtual_size(size: u64, max_virtual: u64) -> Result<()> {
    if size == 0 {
        return Err(refused("it has a virtual size of 0 bytes"));
    }
    if size > max_virtual {
        return Err(refused(format!(
            "its virtual size of {} is larger than the largest volume ({}, max_volume_size_gb)",
            gib(size),
            gib(max_virtual)
        )));
    }
    Ok(())
}

/// `json:{...}` or `nbd://...`: a name qemu would not read as a plain file path.
fn is_protocol(name: &str) -> bool {
    match name.split_once(':') {
        Some((prefix, _)) => {
            !prefix.is_empty()
                && !prefix.contains('/')
                && prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+.-_".contains(&b))
        }
        None => false,
    }
}

pub(super) fn backing_refusal(name: &str) -> Error {
    if name.starts_with("json:") {
        refused(format!(
            "it has a backing file given as a json: description ({name})"
        ))
    } else if is_protocol(name) {
        refused(format!(
            "it has a backing file at a protocol address ({name})"
        ))
    } else {
        refused(format!(
            "it has a backing file ({name}); import a standalone image (qemu-img convert -O qcow2 flattens it)"
        ))
    }
}

/// Which file was checked: the same inode, size and modification time must be what is
/// moved into the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl FileId {
    pub(super) fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

/// A disk that passed [`check_disk`].
#[derive(Debug)]
pub struct CheckedDisk {
    pub format: DiskFormat,
    pub virtual_size: u64,
    pub actual_size: u64,
    pub(super) id: FileId,
}

fn read_head(path: &Path) -> Result<(Vec<u8>, FileId)> {
    use std::io::Read;
    let io = |e: std::io::Error| Error::Internal(format!("cannot read {}: {e}", path.display()));
    let f = std::fs::File::open(path).map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(refused("it is not a regular file"));
    }
    let mut head = Vec::new();
    f.take(2 << 20).read_to_end(&mut head).map_err(io)?;
    Ok((head, FileId::of(&meta)))
}

/// The format to import the uploaded disk at `path` as (see [`decide_format`]).
pub fn identify(path: &Path, source_name: &str) -> Result<DiskFormat> {
    let (head, _) = read_head(path)?;
    decide_format(&head, source_name)
}

/// Checks an uploaded disk that is to be used as `format`: its signature, for qcow2 its
/// header (read here before qemu-img opens the file), what `qemu-img info -f FORMAT` says
/// of it, for qcow2 `qemu-img check -f qcow2`, and that the file did not change meanwhile.
/// Every refusal is an `InvalidArgument` starting `image refused:`.
pub async fn check_disk(path: &Path, format: DiskFormat, max_virtual: u64) -> Result<CheckedDisk> {
    let path = absolute(path)?;
    let path_str = path
        .to_str()
        .ok_or_else(|| Error::Internal(format!("{} is not UTF-8", path.display())))?
        .to_owned();
    let (head, before) = read_head(&path)?;
    let found = sniff(&head).unwrap_or("raw");
    if found != format.as_str() {
        return Err(refused(format!("it is {found}, not {}", format.as_str())));
    }
    match format {
        DiskFormat::Qcow2 => {
            check_qcow2_header(&head, before.len, max_virtual)?;
        }
        DiskFormat::Raw => check_virtual_size(before.len, max_virtual)?,
    }
    let fmt = OsStr::new(format.as_str());
    let out = qemu_img(
        &[
            OsStr::new("info"),
            OsStr::new("--output=json"),
            OsStr::new("-f"),
            fmt,
            OsStr::new("--"),
            path.as_os_str(),
        ],
        INSPECT_LIMITS,
        "inspecting",
    )
    .await?;
    if !out.status.success() {
        return Err(refused(format!(
            "qemu-img cannot read it as {}: {}",
            format.as_str(),
            shown(String::from_utf8_lossy(&out.stderr).trim())
        )));
    }
    let info = QemuImgInfo::parse(&out.stdout)?;
    judge_info(&info, format, &path_str, max_virtual)?;
    if format == DiskFormat::Qcow2 {
        let out = qemu_img(
            &[
                OsStr::new("check"),
                OsStr::new("-f"),
                fmt,
                OsStr::new("--"),
                path.as_os_str(),
            ],
            INSPECT_LIMITS,
            "checking",
        )
        .await?;
        judge_check(out.status.code(), &out.stdout, &out.stderr)?;
    }
    let (_, after) = read_head(&path)?;
    if after != before {
        return Err(refused("the file changed while it was being checked"));
    }
    Ok(CheckedDisk {
        format,
        virtual_size: info.virtual_size,
        actual_size: info.actual_size,
        id: before,
    })
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::{check_disk, decide_format, identify, is_protocol, sniff};
    use crate::files::set_mode;
    use crate::images::{convert_raw, move_into_pool, DiskFormat};

    const MAX: u64 = 64 << 30;

    #[test]
    fn formats_come_from_signatures_and_must_match_the_name() {
        let qcow2 = b"QFI\xfb\0\0\0\x03rest";
        let raw = [0u8; 512];
        assert_eq!(decide_format(qcow2, "x.qcow2").unwrap(), DiskFormat::Qcow2);
        assert_eq!(decide_format(qcow2, "x.img").unwrap(), DiskFormat::Qcow2);
        assert_eq!(decide_format(&raw, "x.raw").unwrap(), DiskFormat::Raw);
        assert_eq!(decide_format(&raw, "x").unwrap(), DiskFormat::Raw);
        assert_eq!(
            decide_format(&raw, "liar.qcow2").unwrap_err().to_string(),
            "image refused: liar.qcow2 is raw, not qcow2 as its name says"
        );
        assert_eq!(
            decide_format(qcow2, "liar.raw").unwrap_err().to_string(),
            "image refused: liar.raw is qcow2, not raw as its name says"
        );
        assert_eq!(
            decide_format(b"KDMV\x01\0\0\0", "x.vmdk")
                .unwrap_err()
                .to_string(),
            "image refused: unsupported image format vmdk: expected qcow2 or raw"
        );
        assert_eq!(
            decide_format(b"LUKS\xba\xbe\0\x01", "x.raw")
                .unwrap_err()
                .to_string(),
            "image refused: x.raw is luks, not raw as its name says"
        );
        assert_eq!(sniff(b"QFI\xfb\0\0\0\x01"), Some("qcow"));
        let mut vdi = vec![0u8; 0x48];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(sniff(&vdi), Some("vdi"));
        assert_eq!(
            sniff(b"# Disk DescriptorFile\nRW 1 FLAT \"/etc/shadow\" 0"),
            Some("vmdk")
        );
        assert_eq!(sniff(b"QFI"), None);
    }

    #[test]
    fn protocol_names() {
        for p in [
            "json:{}",
            "nbd://h/x",
            "http://h/x",
            "file:/etc/shadow",
            "gluster+tcp://h/v",
        ] {
            assert!(is_protocol(p), "{p}");
        }
        for f in ["/etc/passwd", "base.qcow2", "./a:b", "/x/a:b", ":x"] {
            assert!(!is_protocol(f), "{f}");
        }
    }

    fn qemu_img_create(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
        let path = dir.join(name);
        let st = std::process::Command::new("qemu-img")
            .current_dir(dir)
            .args(["create", "-q"])
            .args(args)
            .arg(&path)
            .arg("64M")
            .status()
            .expect("qemu-img (install qemu-utils)");
        assert!(st.success(), "qemu-img create {args:?}");
        path
    }

    async fn refusal(path: &Path, source_name: &str) -> String {
        let format = match identify(path, source_name) {
            Ok(f) => f,
            Err(e) => return e.to_string(),
        };
        match check_disk(path, format, MAX).await {
            Ok(d) => format!("accepted as {}", d.format.as_str()),
            Err(e) => e.to_string(),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn real_qemu_img_inspection_and_conversion() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        assert_eq!(identify(&raw, "disk.raw").unwrap(), DiskFormat::Raw);
        let checked = check_disk(&raw, DiskFormat::Raw, MAX).await.unwrap();
        assert_eq!(checked.virtual_size, 1 << 20);
        let out = dir.path().join("out.qcow2");
        convert_raw(&raw, &out).await.unwrap();
        set_mode(&out, 0o640).unwrap();
        let checked = check_disk(&out, DiskFormat::Qcow2, MAX).await.unwrap();
        assert_eq!(checked.virtual_size, 1 << 20);
        let pool = dir.path().join("pool.qcow2");
        move_into_pool(&checked, &out, &pool).unwrap();
        // A raw disk is never moved into the pool as it is.
        let raw_checked = check_disk(&raw, DiskFormat::Raw, MAX).await.unwrap();
        assert!(move_into_pool(&raw_checked, &raw, &dir.path().join("r")).is_err());
        // A file that changes after its check is not taken.
        let late = dir.path().join("late.qcow2");
        std::fs::copy(&pool, &late).unwrap();
        let checked = check_disk(&late, DiskFormat::Qcow2, MAX).await.unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&late)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let e = move_into_pool(&checked, &late, &dir.path().join("late-pool.qcow2")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "image refused: the file changed after it was checked"
        );

        let d = dir.path();
        let plain = qemu_img_create(d, "plain.qcow2", &["-f", "qcow2"]);
        assert_eq!(refusal(&plain, "plain.qcow2").await, "accepted as qcow2");
        let overlay = qemu_img_create(
            d,
            "overlay.qcow2",
            &["-f", "qcow2", "-F", "qcow2", "-b", plain.to_str().unwrap()],
        );
        let e = refusal(&overlay, "overlay.qcow2").await;
        assert!(
            e.starts_with(&format!(
                "image refused: it has a backing file ({})",
                plain.display()
            )),
            "{e}"
        );
        // An external data file, its name then edited to /etc/shadow (same length).
        let df = qemu_img_create(
            d,
            "df.qcow2",
            &["-f", "qcow2", "-o", "data_file=abcdefghijk"],
        );
        let bytes = std::fs::read(&df).unwrap();
        let at = bytes.windows(11).position(|w| w == b"abcdefghijk").unwrap();
        let mut edited = bytes.clone();
        edited[at..at + 11].copy_from_slice(b"/etc/shadow");
        std::fs::write(&df, edited).unwrap();
        assert_eq!(
            refusal(&df, "df.qcow2").await,
            "image refused: it names an external data file (/etc/shadow)"
        );
        let luks = qemu_img_create(
            d,
            "luks.qcow2",
            &[
                "-f",
                "qcow2",
                "--object",
                "secret,id=s0,data=x",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            ],
        );
        assert_eq!(
            refusal(&luks, "luks.qcow2").await,
            "image refused: it is encrypted (luks); import an unencrypted image"
        );
        let cut = d.join("cut.qcow2");
        std::fs::write(&cut, &std::fs::read(&plain).unwrap()[..300]).unwrap();
        assert!(refusal(&cut, "cut.qcow2")
            .await
            .starts_with("image refused: it is truncated"));
        assert_eq!(
            refusal(&plain, "plain.raw").await,
            "image refused: plain.raw is qcow2, not raw as its name says"
        );
        // A qcow2 whose refcount block is cut off: the header's tables are there, qemu-img
        // check finds the rest missing.
        let data = qemu_img_create(d, "data.qcow2", &["-f", "qcow2"]);
        let len = std::fs::metadata(&data).unwrap().len();
        let damaged = d.join("damaged.qcow2");
        let mut b = std::fs::read(&data).unwrap();
        // Zero the refcount block (cluster 2): every used cluster now has refcount 0.
        b[0x20000..0x30000].fill(0);
        std::fs::write(&damaged, &b).unwrap();
        assert_eq!(std::fs::metadata(&damaged).unwrap().len(), len);
        let e = refusal(&damaged, "damaged.qcow2").await;
        assert!(
            e.starts_with("image refused: it is corrupt or truncated (qemu-img check: "),
            "{e}"
        );
    }
}
