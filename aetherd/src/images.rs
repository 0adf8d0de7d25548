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

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use nix::sys::resource::{setrlimit, Resource};
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

const QCOW2_INCOMPAT_DIRTY: u64 = 1 << 0;
const QCOW2_INCOMPAT_CORRUPT: u64 = 1 << 1;
const QCOW2_INCOMPAT_DATA_FILE: u64 = 1 << 2;
const QCOW2_INCOMPAT_COMPRESSION: u64 = 1 << 3;
const QCOW2_INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const QCOW2_EXT_DATA_FILE: u32 = 0x4441_5441;

/// Reads the qcow2 header of a disk ourselves, before any qemu-img opens it (qemu-img
/// would open an external data file named in it): refuses a backing file, an external data
/// file, encryption, features this check does not know, a corrupt flag, a virtual size of 0
/// or above `max_virtual`, and a file too short for the tables its header describes (a
/// truncated image). `head` is the file's first bytes (up to 2 MiB), `file_len` its size.
/// Returns the virtual size.
pub fn check_qcow2_header(head: &[u8], file_len: u64, max_virtual: u64) -> Result<u64> {
    let truncated = |needed: u64| {
        refused(format!(
            "it is truncated: the file has {file_len} bytes, its qcow2 header describes at least {needed}"
        ))
    };
    let corrupt = |what: &str| refused(format!("its qcow2 header is corrupt ({what})"));
    let u32_at = |off: usize| {
        head.get(off..off + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |off: usize| {
        head.get(off..off + 8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
    };
    if head.len() < 72 {
        return Err(truncated(72));
    }
    let field32 = |off| u32_at(off).expect("within the 72 bytes checked");
    let field64 = |off| u64_at(off).expect("within the 72 bytes checked");
    let version = field32(4);
    if version != 2 && version != 3 {
        return Err(refused(format!(
            "unsupported qcow2 version {version}: expected 2 or 3"
        )));
    }
    let backing_offset = field64(8);
    let backing_len = field32(16) as usize;
    let cluster_bits = field32(20);
    let size = field64(24);
    let crypt_method = field32(32);
    let l1_size = u64::from(field32(36));
    let l1_offset = field64(40);
    let refcount_offset = field64(48);
    let refcount_clusters = u64::from(field32(56));
    let (incompatible, header_len) = if version == 3 {
        match (u64_at(72), u32_at(100)) {
            (Some(incompat), Some(len)) => (incompat, len as usize),
            _ => return Err(truncated(104)),
        }
    } else {
        (0, 72)
    };
    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt(&format!("cluster bits {cluster_bits}")));
    }
    let cluster = 1u64 << cluster_bits;
    // The file must hold the header cluster, the L1 table and the refcount table.
    let needed = [
        Some(cluster),
        l1_size
            .checked_mul(8)
            .and_then(|n| n.checked_add(l1_offset)),
        refcount_clusters
            .checked_mul(cluster)
            .and_then(|n| n.checked_add(refcount_offset)),
    ]
    .into_iter()
    .try_fold(0u64, |acc, n| n.map(|n| acc.max(n)))
    .ok_or_else(|| corrupt("table offsets overflow"))?;
    if file_len < needed {
        return Err(truncated(needed));
    }
    if !l1_offset.is_multiple_of(cluster)
        || !refcount_offset.is_multiple_of(cluster)
        || refcount_offset == 0
    {
        return Err(corrupt("misaligned tables"));
    }
    let known = QCOW2_INCOMPAT_DIRTY
        | QCOW2_INCOMPAT_CORRUPT
        | QCOW2_INCOMPAT_DATA_FILE
        | QCOW2_INCOMPAT_COMPRESSION
        | QCOW2_INCOMPAT_EXTENDED_L2;
    if incompatible & !known != 0 {
        return Err(refused(format!(
            "its qcow2 header uses unknown incompatible features ({:#x})",
            incompatible & !known
        )));
    }
    if incompatible & QCOW2_INCOMPAT_CORRUPT != 0 {
        return Err(refused("qemu marked it corrupt"));
    }
    // Header extensions, up to the end marker, all within the first cluster.
    let limit = head.len().min(cluster as usize);
    let mut data_file: Option<String> = None;
    let mut off = header_len;
    if off < 72 || off > limit {
        return Err(corrupt(&format!("header length {header_len}")));
    }
    loop {
        let (Some(kind), Some(len)) = (u32_at(off), u32_at(off + 4)) else {
            return Err(corrupt("unterminated header extensions"));
        };
        if off + 8 > limit {
            return Err(corrupt("unterminated header extensions"));
        }
        if kind == 0 {
            break;
        }
        let start = off + 8;
        let end = start
            .checked_add(len as usize)
            .filter(|&e| e <= limit)
            .ok_or_else(|| corrupt("header extension beyond the first cluster"))?;
        if kind == QCOW2_EXT_DATA_FILE {
            data_file = Some(shown_bytes(&head[start..end]));
        }
        off = start + (len as usize).div_ceil(8) * 8;
    }
    if data_file.is_some() || incompatible & QCOW2_INCOMPAT_DATA_FILE != 0 {
        return Err(refused(format!(
            "it names an external data file ({})",
            data_file.as_deref().unwrap_or("unnamed")
        )));
    }
    if backing_offset != 0 {
        let name = usize::try_from(backing_offset)
            .ok()
            .and_then(|o| head.get(o..o.checked_add(backing_len)?))
            .map(shown_bytes)
            .unwrap_or_else(|| "its name lies outside the header".to_owned());
        return Err(backing_refusal(&name));
    }
    if crypt_method != 0 {
        let how = match crypt_method {
            1 => "aes",
            2 => "luks",
            _ => "unknown method",
        };
        return Err(refused(format!(
            "it is encrypted ({how}); import an unencrypted image"
        )));
    }
    check_virtual_size(size, max_virtual)?;
    Ok(size)
}

fn check_virtual_size(size: u64, max_virtual: u64) -> Result<()> {
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

fn backing_refusal(name: &str) -> Error {
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

/// The parts of `qemu-img info --output=json` that matter here.
#[derive(Debug, Deserialize)]
pub struct QemuImgInfo {
    pub format: String,
    #[serde(default)]
    pub filename: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    pub actual_size: u64,
    #[serde(rename = "backing-filename")]
    pub backing_filename: Option<String>,
    #[serde(rename = "full-backing-filename")]
    pub full_backing_filename: Option<String>,
    #[serde(default)]
    pub encrypted: bool,
    #[serde(rename = "format-specific")]
    pub format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Deserialize)]
pub struct FormatSpecific {
    #[serde(default)]
    pub data: serde_json::Value,
}

impl QemuImgInfo {
    pub fn parse(json: &[u8]) -> Result<Self> {
        serde_json::from_slice(json)
            .map_err(|e| refused(format!("qemu-img describes it unexpectedly ({e})")))
    }

    fn data_file(&self) -> Option<String> {
        let data = &self.format_specific.as_ref()?.data;
        data.get("data-file").map(|v| match v.as_str() {
            Some(s) => s.to_owned(),
            None => v.to_string(),
        })
    }
}

/// Judges what `qemu-img info --output=json -f FORMAT PATH` said about an uploaded disk:
/// it must be `format`, opened as `path` itself (not a `json:` or protocol name), with no
/// external data file, no backing file, no encryption, and a virtual size in 1 byte ..=
/// `max_virtual`.
pub fn judge_info(
    info: &QemuImgInfo,
    format: DiskFormat,
    path: &str,
    max_virtual: u64,
) -> Result<()> {
    if info.format != format.as_str() {
        return Err(refused(format!(
            "qemu-img reads it as {}, not {}",
            shown(&info.format),
            format.as_str()
        )));
    }
    if info.filename != path {
        return Err(refused(format!(
            "qemu-img opened it as {}, not as the uploaded file",
            shown(&info.filename)
        )));
    }
    if let Some(data_file) = info.data_file() {
        return Err(refused(format!(
            "it names an external data file ({})",
            shown(&data_file)
        )));
    }
    if let Some(backing) = info
        .backing_filename
        .as_ref()
        .or(info.full_backing_filename.as_ref())
    {
        return Err(backing_refusal(&shown(backing)));
    }
    let encrypt = info
        .format_specific
        .as_ref()
        .and_then(|f| f.data.get("encrypt"));
    if info.encrypted || encrypt.is_some() {
        return Err(refused("it is encrypted; import an unencrypted image"));
    }
    check_virtual_size(info.virtual_size, max_virtual)
}

/// Judges `qemu-img check -f qcow2`: exit 0 (clean) or 3 (leaked clusters only, harmless)
/// pass; corruption (2) or a check that could not complete (1, or anything else) refuse.
pub fn judge_check(code: Option<i32>, stdout: &[u8], stderr: &[u8]) -> Result<()> {
    let first_line = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(shown)
            .unwrap_or_default()
    };
    match code {
        Some(0) | Some(3) => Ok(()),
        Some(2) => {
            let summary = String::from_utf8_lossy(stdout)
                .lines()
                .map(str::trim)
                .find(|l| l.contains("errors were found") || l.contains("error was found"))
                .map(shown)
                .unwrap_or_else(|| first_line(stderr));
            Err(refused(format!(
                "it is corrupt or truncated (qemu-img check: {summary})"
            )))
        }
        _ => Err(refused(format!(
            "qemu-img check cannot check it ({})",
            first_line(stderr)
        ))),
    }
}

/// Resource limits for one `qemu-img` run on an untrusted file (as OpenStack does since
/// CVE-2024-4467): address space and CPU time (setrlimit in the child), and wall-clock time.
#[derive(Clone, Copy, Debug)]
struct Limits {
    address_space: u64,
    cpu_secs: u64,
    wall: Duration,
}

/// For `qemu-img info` and `qemu-img check`.
const INSPECT_LIMITS: Limits = Limits {
    address_space: 1 << 30,
    cpu_secs: 30,
    wall: Duration::from_secs(60),
};

/// For converting a raw disk of `len` bytes: the same memory, time growing with the size.
fn convert_limits(len: u64) -> Limits {
    Limits {
        address_space: 1 << 30,
        cpu_secs: 30 + len / (64 << 20),
        wall: Duration::from_secs(60 + len / (16 << 20)),
    }
}

/// Runs `qemu-img ARGS` under `limits`; `doing` names the work for messages ("inspecting").
async fn qemu_img(args: &[&OsStr], limits: Limits, doing: &str) -> Result<Output> {
    run_limited("qemu-img", args, limits, doing).await
}

/// Runs `program ARGS` under `limits`, killing it when the wall-clock limit passes.
async fn run_limited(
    program: &str,
    args: &[&OsStr],
    limits: Limits,
    doing: &str,
) -> Result<Output> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C")
        .kill_on_drop(true);
    let Limits {
        address_space,
        cpu_secs,
        ..
    } = limits;
    // SAFETY: the hook runs in the child between fork and exec, where only
    // async-signal-safe work is allowed. It makes three setrlimit(2) system calls through
    // nix's thin wrapper (no allocation, no locks; an error becomes an io::Error from the
    // raw errno, which does not allocate either) and reads only the two integers it owns.
    unsafe {
        cmd.pre_exec(move || {
            setrlimit(Resource::RLIMIT_AS, address_space, address_space)?;
            setrlimit(Resource::RLIMIT_CPU, cpu_secs, cpu_secs)?;
            setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
            Ok(())
        });
    }
    let out = match tokio::time::timeout(limits.wall, cmd.output()).await {
        Err(_) => {
            // Dropping the output future killed the child (kill_on_drop).
            return Err(refused(format!(
                "{program} did not finish {doing} it within {:?}",
                limits.wall
            )));
        }
        Ok(Err(e)) => {
            return Err(Error::Internal(format!(
                "cannot run {program} (install qemu-utils): {e}"
            )))
        }
        Ok(Ok(out)) => out,
    };
    if let Some(sig) = out.status.signal() {
        return Err(refused(format!(
            "{program} was killed by signal {sig} while {doing} it (its memory or CPU-time limit)"
        )));
    }
    Ok(out)
}

/// A path as qemu-img gets it: absolute, so it can never be read as a protocol name.
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path)
        .map_err(|e| Error::Internal(format!("cannot resolve {}: {e}", path.display())))
}

/// Which file was checked: the same inode, size and modification time must be what is
/// moved into the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
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
    id: FileId,
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

/// Converts the checked raw disk at `src` to qcow2 at `dest` (which must then be checked
/// again before it is used).
pub async fn convert_raw(src: &Path, dest: &Path) -> Result<()> {
    let len = std::fs::metadata(src)
        .map_err(|e| Error::Internal(format!("cannot read {}: {e}", src.display())))?
        .len();
    let (src, dest) = (absolute(src)?, absolute(dest)?);
    let out = qemu_img(
        &[
            OsStr::new("convert"),
            OsStr::new("-q"),
            OsStr::new("-f"),
            OsStr::new("raw"),
            OsStr::new("-O"),
            OsStr::new("qcow2"),
            OsStr::new("--"),
            src.as_os_str(),
            dest.as_os_str(),
        ],
        convert_limits(len),
        "converting",
    )
    .await?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "qemu-img convert failed: {}",
            shown(String::from_utf8_lossy(&out.stderr).trim())
        )));
    }
    Ok(())
}

/// Moves the disk checked as `checked` from `src` (in the state dir's tmp) to `dest` in the
/// pool, and makes sure what arrived is the file that was checked. On an error `dest` may
/// exist; the caller removes it.
pub fn move_into_pool(checked: &CheckedDisk, src: &Path, dest: &Path) -> Result<()> {
    if checked.format != DiskFormat::Qcow2 {
        return Err(Error::Internal(
            "only a checked qcow2 goes into the pool".into(),
        ));
    }
    std::fs::rename(src, dest)
        .map_err(|e| Error::Internal(format!("cannot move image to {}: {e}", dest.display())))?;
    let meta = std::fs::symlink_metadata(dest)
        .map_err(|e| Error::Internal(format!("cannot read {}: {e}", dest.display())))?;
    if !meta.is_file() || FileId::of(&meta) != checked.id {
        return Err(refused("the file changed after it was checked"));
    }
    Ok(())
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

    pub fn boot_dir(&self, image: &ImageId) -> PathBuf {
        self.state_dir.join("boot").join(image.to_string())
    }

    pub fn kernel(&self, image: &ImageId) -> PathBuf {
        self.boot_dir(image).join("vmlinuz")
    }

    pub fn initrd(&self, image: &ImageId) -> PathBuf {
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
        self.remove_stale_uploads()
    }

    /// Where an import stages its upload: `<tmp>/upload-<token>`, one per import.
    pub fn upload_dir(&self, token: &str) -> PathBuf {
        self.tmp().join(format!("upload-{token}"))
    }

    /// Removes every staging directory of an import (`<tmp>/upload-*`). At start no import
    /// runs, so these are left by a daemon that died during one (their reservations are
    /// dropped when the store opens).
    fn remove_stale_uploads(&self) -> Result<()> {
        let tmp = self.tmp();
        let entries = std::fs::read_dir(&tmp)
            .map_err(|e| Error::Internal(format!("cannot read {}: {e}", tmp.display())))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("upload-") {
                let path = entry.path();
                tracing::info!(path = %path.display(), "removing an upload left by an interrupted import");
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 64 << 30;

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

    /// `qemu-img info --output=json` of a clean qcow2 at /s/disk, with `extra` fields and
    /// `data` inside `format-specific.data`.
    fn info_json(format: &str, extra: &str, data: &str) -> QemuImgInfo {
        let json = format!(
            r#"{{ "virtual-size": 67108864, "filename": "/s/disk", "cluster-size": 65536,
                 "format": "{format}", "actual-size": 200704, {extra}
                 "format-specific": {{ "type": "{format}", "data": {{ "compat": "1.1",
                     "refcount-bits": 16, {data} "corrupt": false, "extended-l2": false }} }},
                 "dirty-flag": false }}"#
        );
        QemuImgInfo::parse(json.as_bytes()).unwrap()
    }

    fn judged(info: &QemuImgInfo) -> String {
        match judge_info(info, DiskFormat::Qcow2, "/s/disk", MAX) {
            Ok(()) => "ok".to_owned(),
            Err(e) => {
                assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
                e.to_string()
            }
        }
    }

    #[test]
    fn qemu_img_info_judgement() {
        assert_eq!(judged(&info_json("qcow2", "", "")), "ok");
        // What qemu-img 7.2 prints for an external data file, edited to name /etc/shadow.
        assert_eq!(
            judged(&info_json(
                "qcow2",
                "",
                r#""data-file": "/etc/shadow", "data-file-raw": false,"#
            )),
            "image refused: it names an external data file (/etc/shadow)"
        );
        assert_eq!(
            judged(&info_json(
                "qcow2",
                r#""backing-filename-format": "raw", "full-backing-filename": "/etc/passwd",
                   "backing-filename": "/etc/passwd","#,
                ""
            )),
            "image refused: it has a backing file (/etc/passwd); import a standalone image (qemu-img convert -O qcow2 flattens it)"
        );
        // Only the full name, as some versions print for relative names.
        let e = judged(&info_json(
            "qcow2",
            r#""full-backing-filename": "/x/base.qcow2","#,
            "",
        ));
        assert!(e.contains("it has a backing file (/x/base.qcow2)"), "{e}");
        assert_eq!(
            judged(&info_json(
                "qcow2",
                r#""backing-filename": "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"/etc/passwd\"}}","#,
                ""
            )),
            r#"image refused: it has a backing file given as a json: description (json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}})"#
        );
        assert_eq!(
            judged(&info_json(
                "qcow2",
                r#""backing-filename": "nbd://127.0.0.1:1/x","#,
                ""
            )),
            "image refused: it has a backing file at a protocol address (nbd://127.0.0.1:1/x)"
        );
        // A LUKS-encrypted qcow2: `encrypted` and the `encrypt` block.
        assert_eq!(
            judged(&info_json(
                "qcow2",
                r#""encrypted": true,"#,
                r#""encrypt": { "format": "luks", "cipher-alg": "aes-256" },"#
            )),
            "image refused: it is encrypted; import an unencrypted image"
        );
        assert_eq!(
            judged(&info_json(
                "qcow2",
                "",
                r#""encrypt": { "format": "aes" },"#
            )),
            "image refused: it is encrypted; import an unencrypted image"
        );
        assert_eq!(
            judged(&info_json("raw", "", "")),
            "image refused: qemu-img reads it as raw, not qcow2"
        );
        let mut moved = info_json("qcow2", "", "");
        moved.filename = "json:{\"file.filename\":\"/etc/shadow\"}".into();
        assert_eq!(
            judged(&moved),
            r#"image refused: qemu-img opened it as json:{"file.filename":"/etc/shadow"}, not as the uploaded file"#
        );
        let mut huge = info_json("qcow2", "", "");
        huge.virtual_size = 100 << 40;
        assert_eq!(
            judged(&huge),
            "image refused: its virtual size of 102400 GiB is larger than the largest volume (64 GiB, max_volume_size_gb)"
        );
        huge.virtual_size = 0;
        assert_eq!(
            judged(&huge),
            "image refused: it has a virtual size of 0 bytes"
        );
        // Names from the image never break the one-line message.
        let e = judged(&info_json(
            "qcow2",
            r#""backing-filename": "a\nb\u202ec","#,
            "",
        ));
        assert!(e.contains(r"(a\nb\u{202e}c)") && !e.contains('\n'), "{e}");
        assert!(QemuImgInfo::parse(b"not json").is_err());
    }

    #[test]
    fn qemu_img_check_judgement() {
        assert!(judge_check(Some(0), b"No errors were found on the image.\n", b"").is_ok());
        assert!(judge_check(
            Some(3),
            b"1 leaked clusters were found on the image.\n",
            b""
        )
        .is_ok());
        let e = judge_check(
            Some(2),
            b"\n3 errors were found on the image.\nData may be corrupted\n",
            b"ERROR cluster 0 refcount=0 reference=1\n",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "image refused: it is corrupt or truncated (qemu-img check: 3 errors were found on the image.)"
        );
        let e = judge_check(Some(1), b"", b"qemu-img: Could not open 'x'\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "image refused: qemu-img check cannot check it (qemu-img: Could not open 'x')"
        );
        assert!(judge_check(None, b"", b"").is_err());
    }

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

    /// A qcow2 v3 header cluster (64 KiB clusters, refcount table in cluster 1, L1 table in
    /// cluster 3) and the length of the file it describes.
    struct Header {
        backing: Option<&'static [u8]>,
        crypt: u32,
        incompatible: u64,
        size: u64,
        data_file: Option<&'static [u8]>,
    }

    const CLEAN: Header = Header {
        backing: None,
        crypt: 0,
        incompatible: 0,
        size: 64 << 20,
        data_file: None,
    };

    impl Header {
        fn bytes(&self) -> Vec<u8> {
            let mut h = vec![0u8; 65536];
            let mut put = |off: usize, b: &[u8]| h[off..off + b.len()].copy_from_slice(b);
            put(0, b"QFI\xfb");
            put(4, &3u32.to_be_bytes());
            if let Some(name) = self.backing {
                put(8, &0x200u64.to_be_bytes());
                put(16, &(name.len() as u32).to_be_bytes());
                put(0x200, name);
            }
            put(20, &16u32.to_be_bytes());
            put(24, &self.size.to_be_bytes());
            put(32, &self.crypt.to_be_bytes());
            put(36, &1u32.to_be_bytes());
            put(40, &0x30000u64.to_be_bytes());
            put(48, &0x10000u64.to_be_bytes());
            put(56, &1u32.to_be_bytes());
            put(72, &self.incompatible.to_be_bytes());
            put(96, &4u32.to_be_bytes());
            put(100, &104u32.to_be_bytes());
            let mut off = 104;
            if let Some(name) = self.data_file {
                put(off, &QCOW2_EXT_DATA_FILE.to_be_bytes());
                put(off + 4, &(name.len() as u32).to_be_bytes());
                put(off + 8, name);
                off += 8 + name.len().div_ceil(8) * 8;
            }
            put(off, &[0u8; 8]);
            h
        }

        fn check(&self) -> String {
            match check_qcow2_header(&self.bytes(), 0x30008, MAX) {
                Ok(size) => format!("ok {size}"),
                Err(e) => e.to_string(),
            }
        }
    }

    #[test]
    fn qcow2_headers_are_read_before_qemu_img_opens_anything() {
        assert_eq!(CLEAN.check(), format!("ok {}", 64 << 20));
        assert_eq!(
            Header {
                data_file: Some(b"/etc/shadow"),
                incompatible: QCOW2_INCOMPAT_DATA_FILE,
                ..CLEAN
            }
            .check(),
            "image refused: it names an external data file (/etc/shadow)"
        );
        assert_eq!(
            Header {
                incompatible: QCOW2_INCOMPAT_DATA_FILE,
                ..CLEAN
            }
            .check(),
            "image refused: it names an external data file (unnamed)"
        );
        assert_eq!(
            Header {
                data_file: Some(b"/etc/shadow"),
                ..CLEAN
            }
            .check(),
            "image refused: it names an external data file (/etc/shadow)"
        );
        assert_eq!(
            Header {
                backing: Some(b"json:{\"file.filename\":\"/etc/shadow\"}"),
                ..CLEAN
            }
            .check(),
            r#"image refused: it has a backing file given as a json: description (json:{"file.filename":"/etc/shadow"})"#
        );
        let e = Header {
            backing: Some(b"/etc/passwd"),
            ..CLEAN
        }
        .check();
        assert!(
            e.starts_with("image refused: it has a backing file (/etc/passwd)"),
            "{e}"
        );
        assert_eq!(
            Header { crypt: 2, ..CLEAN }.check(),
            "image refused: it is encrypted (luks); import an unencrypted image"
        );
        assert_eq!(
            Header { crypt: 1, ..CLEAN }.check(),
            "image refused: it is encrypted (aes); import an unencrypted image"
        );
        assert_eq!(
            Header {
                incompatible: 1 << 9,
                ..CLEAN
            }
            .check(),
            "image refused: its qcow2 header uses unknown incompatible features (0x200)"
        );
        assert_eq!(
            Header {
                incompatible: QCOW2_INCOMPAT_CORRUPT,
                ..CLEAN
            }
            .check(),
            "image refused: qemu marked it corrupt"
        );
        assert_eq!(
            Header {
                size: 1 << 60,
                ..CLEAN
            }
            .check(),
            "image refused: its virtual size of 1073741824 GiB is larger than the largest volume (64 GiB, max_volume_size_gb)"
        );
        assert_eq!(
            Header { size: 0, ..CLEAN }.check(),
            "image refused: it has a virtual size of 0 bytes"
        );
        // Cut to its first 300 bytes, or anything shorter than its tables.
        let whole = CLEAN.bytes();
        assert_eq!(
            check_qcow2_header(&whole[..300], 300, MAX)
                .unwrap_err()
                .to_string(),
            "image refused: it is truncated: the file has 300 bytes, its qcow2 header describes at least 196616"
        );
        assert!(check_qcow2_header(&whole, 0x30000, MAX)
            .unwrap_err()
            .to_string()
            .contains("it is truncated"));
        assert!(check_qcow2_header(&whole[..40], 40, MAX)
            .unwrap_err()
            .to_string()
            .contains("it is truncated"));
        // An extension running past the first cluster.
        let mut runaway = whole.clone();
        runaway[104..108].copy_from_slice(&QCOW2_EXT_DATA_FILE.to_be_bytes());
        runaway[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(check_qcow2_header(&runaway, 0x30008, MAX)
            .unwrap_err()
            .to_string()
            .contains("header is corrupt"));
        let mut v1 = whole;
        v1[4..8].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(
            check_qcow2_header(&v1, 0x30008, MAX)
                .unwrap_err()
                .to_string(),
            "image refused: unsupported qcow2 version 1: expected 2 or 3"
        );
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

    #[tokio::test]
    async fn limits_apply_to_the_child_and_the_clock_kills_it() {
        let sh = |script: &str| {
            let script = script.to_owned();
            async move {
                run_limited(
                    "sh",
                    &[OsStr::new("-c"), OsStr::new(&script)],
                    Limits {
                        address_space: 1 << 30,
                        cpu_secs: 30,
                        wall: Duration::from_millis(300),
                    },
                    "testing",
                )
                .await
            }
        };
        let out = sh("ulimit -v; ulimit -t; ulimit -c").await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "1048576\n30\n0\n");
        let started = std::time::Instant::now();
        let e = sh("sleep 5").await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "image refused: sh did not finish testing it within 300ms"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        let e = sh("kill -9 $$").await.unwrap_err();
        assert!(e.to_string().contains("killed by signal 9"), "{e}");
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
