//! Choosing the accelerator: KVM only if a guest can really run on it.
//!
//! A `/dev/kvm` that accepts `KVM_CREATE_VM` can still hang a guest (nested virtualization
//! that does not work). `accel = auto` therefore uses KVM only when both hold:
//! - this host is not itself a virtual machine (no `hypervisor` flag in `/proc/cpuinfo`):
//!   on the machines this was built on, nested KVM passes simple probes and then hangs a
//!   Linux kernel before its first console line, so a probe alone cannot be trusted there;
//! - a bounded probe boots: `qemu-system-x86_64 -accel kvm` runs its firmware (SeaBIOS) and
//!   a 512-byte boot sector that writes 0x31 to the `isa-debug-exit` port, which makes qemu
//!   exit with status (0x31 << 1) | 1 = 99. Anything else within the time limit (no
//!   /dev/kvm, an error, a hang that is killed) means TCG.
//!
//! `accel = kvm` skips all of this for hosts where the operator knows better.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Exit status qemu reports for the probe's write of 0x31 to isa-debug-exit.
const PROBE_EXIT: i32 = 99;

/// The probe boot sector: `mov al,0x31; out 0xf4,al; hlt; jmp $-1`, then the boot signature.
pub fn probe_boot_sector() -> Vec<u8> {
    let mut mbr = vec![0u8; 512];
    let code = [0xb0, 0x31, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd];
    mbr[..code.len()].copy_from_slice(&code);
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    mbr
}

/// Whether `/proc/cpuinfo` says this host runs under a hypervisor.
pub fn running_nested() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "hypervisor"))
        })
        .unwrap_or(false)
}

/// Boots the probe with `accel` ("kvm" or "tcg"); true if it exited with the probe status
/// within `limit`.
///
/// The boot sector goes into a new private directory under `scratch` (mode 0700, a fresh
/// random name made with `mkdir`, which never follows an existing path), created as a new
/// file there: `scratch` may be a shared directory such as /tmp, where a fixed name could be
/// a symlink another user planted to make root overwrite a file. The directory and the file
/// are removed afterwards.
pub fn probe(qemu: &Path, accel: &str, scratch: &Path, limit: Duration) -> Result<bool, String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = tempfile::Builder::new()
        .prefix("aetherd-accel-probe-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(scratch)
        .map_err(|e| {
            format!(
                "cannot create a probe directory in {}: {e}",
                scratch.display()
            )
        })?;
    let disk = dir.path().join("probe.img");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&disk)
        .and_then(|mut f| f.write_all(&probe_boot_sector()))
        .map_err(|e| format!("cannot write {}: {e}", disk.display()))?;
    let mut drive = std::ffi::OsString::from("format=raw,if=ide,file=");
    drive.push(&disk);
    let mut child = Command::new(qemu)
        .args([
            "-accel", accel, "-machine", "pc", "-m", "16", "-display", "none",
        ])
        .args([
            "-nodefaults",
            "-no-reboot",
            "-serial",
            "none",
            "-monitor",
            "none",
        ])
        .args([
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive",
        ])
        .arg(&drive)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let started = Instant::now();
    let result = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status.code() == Some(PROBE_EXIT)),
            Ok(None) if started.elapsed() >= limit => {
                let _ = child.kill();
                let _ = child.wait();
                break Ok(false);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(format!("waiting for the accelerator probe failed: {e}")),
        }
    };
    drop(dir);
    result
}

/// The decision for `accel = auto`, with the reason for the log.
pub fn auto_choose(qemu: &Path, scratch: &Path) -> (bool, String) {
    if !Path::new("/dev/kvm").exists() {
        return (false, "no /dev/kvm".into());
    }
    if running_nested() {
        return (
            false,
            "this host is a virtual machine and nested KVM is unreliable; set accel = \"kvm\" to use it anyway".into(),
        );
    }
    match probe(qemu, "kvm", scratch, Duration::from_secs(10)) {
        Ok(true) => (true, "the KVM probe guest ran".into()),
        Ok(false) => (false, "the KVM probe guest did not run within 10 s".into()),
        Err(e) => (false, e),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::{probe, probe_boot_sector, PROBE_EXIT};

    #[test]
    fn boot_sector_layout() {
        let mbr = probe_boot_sector();
        assert_eq!(mbr.len(), 512);
        assert_eq!(&mbr[..4], &[0xb0, 0x31, 0xe6, 0xf4]);
        assert_eq!(&mbr[510..], &[0x55, 0xaa]);
    }

    /// A symlink planted at the name the probe once used (`accel-probe-ACCEL.img` in the
    /// scratch dir, /tmp for the daemon) must not make the probe write through it.
    #[test]
    fn probe_never_writes_through_a_planted_symlink() {
        let scratch = tempfile::tempdir().unwrap();
        let victim = scratch.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        for accel in ["kvm", "tcg"] {
            let planted = scratch.path().join(format!("accel-probe-{accel}.img"));
            std::os::unix::fs::symlink(&victim, &planted).unwrap();
            // No qemu there: the probe fails after preparing its disk.
            let r = probe(
                Path::new("/nonexistent/qemu-system-x86_64"),
                accel,
                scratch.path(),
                Duration::from_secs(1),
            );
            assert!(r.is_err(), "{r:?}");
            assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
            assert!(std::fs::symlink_metadata(&planted).unwrap().is_symlink());
        }
        // Nothing of the probe's is left behind.
        let mut names: Vec<String> = std::fs::read_dir(scratch.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["accel-probe-kvm.img", "accel-probe-tcg.img", "victim"]
        );
    }

    /// The disk qemu gets is the boot sector, alone in a directory only root can enter.
    #[test]
    fn probe_disk_is_in_a_private_directory() {
        use std::os::unix::fs::PermissionsExt;
        let scratch = tempfile::tempdir().unwrap();
        let seen = scratch.path().join("seen");
        // A stand-in for qemu: records what it was given and exits with the probe status.
        let fake = scratch.path().join("fake-qemu");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\nfor a; do case $a in *file=*) f=${{a#*file=}};; esac; done\n\
                 d=$(dirname \"$f\")\n\
                 {{ stat -c %a \"$d\"; ls -A \"$d\"; cmp -s \"$f\" \"$0.mbr\" && echo same; }} >{}\n\
                 exit {PROBE_EXIT}\n",
                seen.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(scratch.path().join("fake-qemu.mbr"), probe_boot_sector()).unwrap();
        assert_eq!(
            probe(&fake, "kvm", scratch.path(), Duration::from_secs(10)),
            Ok(true)
        );
        assert_eq!(
            std::fs::read_to_string(&seen).unwrap(),
            "700\nprobe.img\nsame\n"
        );
        let left = std::fs::read_dir(scratch.path()).unwrap().count();
        assert_eq!(left, 3, "the probe directory is removed");
    }

    /// The probe under TCG must report success: this proves the probe itself works (what
    /// KVM does here is the question it answers). Skipped without qemu-system-x86_64.
    #[test]
    fn probe_succeeds_under_tcg() {
        let qemu = Path::new("/usr/bin/qemu-system-x86_64");
        if !qemu.exists() {
            eprintln!("skipped: no {}", qemu.display());
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            probe(qemu, "tcg", dir.path(), Duration::from_secs(30)),
            Ok(true)
        );
    }
}
