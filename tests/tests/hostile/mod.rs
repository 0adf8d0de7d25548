//! A corpus of hostile disk images, made at test time with `qemu-img create` and byte edits
//! (no binaries in the repository). Each would make qemu open a host file, lies about its
//! format, or is broken; the daemon must refuse each with one line naming the reason.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One hostile image: the file, and how the refusal must read.
pub struct Hostile {
    /// What it is, for assertion messages.
    pub what: &'static str,
    pub file: PathBuf,
    /// The CLI's stderr line must start with this.
    pub refusal: String,
}

fn qemu_img_create(dir: &Path, name: &str, args: &[&str], size: &str) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("qemu-img")
        .current_dir(dir)
        .args(["create", "-q"])
        .args(args)
        .arg(&path)
        .arg(size)
        .output()
        .expect("run qemu-img (install qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img create {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// Replaces the one occurrence of `from` in `path` with `to` (same length).
fn edit(path: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(path).unwrap();
    let at: Vec<usize> = bytes
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| *w == from)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "{} holds {from:?} once", path.display());
    bytes[at[0]..at[0] + to.len()].copy_from_slice(to);
    std::fs::write(path, bytes).unwrap();
}

/// Makes the corpus in `dir`, for a daemon whose largest volume is `max_volume_gb` GiB.
pub fn corpus(dir: &Path, max_volume_gb: u64) -> Vec<Hostile> {
    let dir = &dir.join("hostile");
    std::fs::create_dir_all(dir).unwrap();
    let mut all = Vec::new();
    let mut add = |what, file, refusal: &str| {
        all.push(Hostile {
            what,
            file,
            refusal: format!("aether: image refused: {refusal}"),
        })
    };

    // An external data file, its name in the header then edited to /etc/shadow (a name of
    // the same length, so no offset moves).
    let f = qemu_img_create(
        dir,
        "datafile.qcow2",
        &["-f", "qcow2", "-o", "data_file=abcdefghijk"],
        "64M",
    );
    edit(&f, b"abcdefghijk", b"/etc/shadow");
    add(
        "data file /etc/shadow",
        f,
        "it names an external data file (/etc/shadow)",
    );

    let base = qemu_img_create(dir, "base.qcow2", &["-f", "qcow2"], "16M");
    let f = qemu_img_create(
        dir,
        "overlay.qcow2",
        &["-f", "qcow2", "-F", "qcow2", "-b", base.to_str().unwrap()],
        "16M",
    );
    add(
        "backing file",
        f,
        &format!(
            "it has a backing file ({}); import a standalone image (qemu-img convert -O qcow2 flattens it)",
            base.display()
        ),
    );

    let json = r#"json:{"driver":"raw","file":{"driver":"file","filename":"/etc/shadow"}}"#;
    let f = qemu_img_create(
        dir,
        "jsonbacking.qcow2",
        &["-f", "qcow2", "-u", "-F", "raw", "-b", json],
        "16M",
    );
    add(
        "json: backing file",
        f,
        &format!("it has a backing file given as a json: description ({json})"),
    );

    let f = qemu_img_create(
        dir,
        "nbdbacking.qcow2",
        &[
            "-f",
            "qcow2",
            "-u",
            "-F",
            "raw",
            "-b",
            "nbd://127.0.0.1:1/x",
        ],
        "16M",
    );
    add(
        "nbd: backing file",
        f,
        "it has a backing file at a protocol address (nbd://127.0.0.1:1/x)",
    );

    let f = qemu_img_create(
        dir,
        "luks.qcow2",
        &[
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=x",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        ],
        "16M",
    );
    add(
        "LUKS-encrypted qcow2",
        f,
        "it is encrypted (luks); import an unencrypted image",
    );

    // A raw file whose content is a qcow2 (with a backing file, so a later probe would
    // follow it), and a .qcow2 name on raw content.
    let f = qemu_img_create(
        dir,
        "sneaky.raw",
        &["-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/shadow"],
        "16M",
    );
    add(
        "raw that is qcow2",
        f,
        "sneaky.raw is qcow2, not raw as its name says",
    );
    let f = qemu_img_create(dir, "liar.qcow2", &["-f", "raw"], "16M");
    add(
        "qcow2 that is raw",
        f,
        "liar.qcow2 is raw, not qcow2 as its name says",
    );

    // A VMDK descriptor (text) naming /etc/shadow as its extent, as .raw and unnamed.
    let descriptor = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
                      createType=\"monolithicFlat\"\nRW 2048 FLAT \"/etc/shadow\" 0\n";
    let f = dir.join("extent.raw");
    std::fs::write(&f, descriptor).unwrap();
    add(
        "vmdk descriptor as raw",
        f,
        "extent.raw is vmdk, not raw as its name says",
    );
    let f = dir.join("extent.img");
    std::fs::write(&f, descriptor).unwrap();
    add(
        "vmdk descriptor",
        f,
        "unsupported image format vmdk: expected qcow2 or raw",
    );

    let huge = format!("{}G", max_volume_gb * 1600);
    let f = qemu_img_create(dir, "huge.qcow2", &["-f", "qcow2"], &huge);
    add(
        "huge virtual size",
        f,
        &format!(
            "its virtual size of {} GiB is larger than the largest volume ({max_volume_gb} GiB, max_volume_size_gb)",
            max_volume_gb * 1600
        ),
    );

    // The first 300 bytes of a 64 MiB qcow2: the header alone, claiming 64 MiB.
    let whole = qemu_img_create(dir, "whole.qcow2", &["-f", "qcow2"], "64M");
    let f = dir.join("truncated.qcow2");
    std::fs::write(&f, &std::fs::read(&whole).unwrap()[..300]).unwrap();
    add(
        "truncated header",
        f,
        "it is truncated: the file has 300 bytes",
    );

    // A whole-length qcow2 whose refcount block (cluster 2) is zeroed: the header is fine,
    // qemu-img check finds it corrupt.
    let f = qemu_img_create(dir, "zeroed.qcow2", &["-f", "qcow2"], "64M");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[0x20000..0x30000].fill(0);
    std::fs::write(&f, bytes).unwrap();
    add(
        "zeroed refcount block",
        f,
        "it is corrupt or truncated (qemu-img check: ",
    );
    all
}
