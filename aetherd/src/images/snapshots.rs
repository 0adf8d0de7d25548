//! Internal qcow2 snapshots of a workspace's root volume (`qemu-img snapshot`): named points
//! of its disk, kept inside the volume file, so taking one copies nothing (clusters are
//! shared until either side writes) and deleting the workspace deletes them. Every
//! `qemu-img` runs under the same limits as the image checks, with an argument list and an
//! absolute path. qemu holds a write lock on the volume while the VM runs, so these can only
//! change a stopped workspace's disk; listing reads with `-U` (shared).

use std::ffi::OsStr;
use std::path::Path;

use serde::Deserialize;

use super::qemu_img::{absolute, qemu_img, INSPECT_LIMITS};
use crate::error::{Error, Result};

/// Most snapshots a workspace keeps.
pub const MAX_SNAPSHOTS: usize = 64;

/// A snapshot name: the image-name rule (1-63 lowercase letters, digits, '.', '_' and '-',
/// starting with a letter or digit: what a qemu-img argument and a table cell can carry as
/// it is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotName(String);

impl SnapshotName {
    pub fn parse(s: &str) -> Result<Self> {
        super::parse_name(s, "snapshot name").map(SnapshotName)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One snapshot as `qemu-img info` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub name: String,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// Bytes of guest memory saved with it (0: disk only).
    pub vm_state_size: u64,
}

#[derive(Deserialize)]
struct Info {
    #[serde(default)]
    snapshots: Vec<RawSnapshot>,
}

#[derive(Deserialize)]
struct RawSnapshot {
    name: String,
    #[serde(rename = "date-sec")]
    date_sec: i64,
    #[serde(rename = "vm-state-size", default)]
    vm_state_size: u64,
}

/// The snapshots of the qcow2 at `volume`, oldest first.
pub async fn list(volume: &Path) -> Result<Vec<Snapshot>> {
    let path = absolute(volume)?;
    let out = qemu_img(
        &[
            OsStr::new("info"),
            OsStr::new("-U"),
            OsStr::new("--output=json"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            OsStr::new("--"),
            path.as_os_str(),
        ],
        INSPECT_LIMITS,
        "listing the snapshots of",
    )
    .await?;
    if !out.status.success() {
        return Err(failed("list the snapshots of", &out.stderr));
    }
    let info: Info = serde_json::from_slice(&out.stdout).map_err(|e| {
        Error::Internal(format!(
            "qemu-img info printed what aether cannot read: {e}"
        ))
    })?;
    Ok(info
        .snapshots
        .into_iter()
        .map(|s| Snapshot {
            name: s.name,
            created_at: s.date_sec,
            vm_state_size: s.vm_state_size,
        })
        .collect())
}

/// The volume as `--image-opts` names it: qcow2 by declaration, never probed (`qemu-img
/// snapshot` has no `-f`). A comma in the path is doubled, as the option syntax wants.
fn image_opts(path: &Path) -> Result<std::ffi::OsString> {
    let path = path
        .to_str()
        .ok_or_else(|| Error::Internal(format!("{} is not UTF-8", path.display())))?;
    Ok(format!(
        "driver=qcow2,file.driver=file,file.filename={}",
        path.replace(',', ",,")
    )
    .into())
}

/// What `qemu-img snapshot` does: `-c` (create), `-a` (apply), `-d` (delete).
pub async fn change(volume: &Path, flag: &str, name: &SnapshotName) -> Result<()> {
    let opts = image_opts(&absolute(volume)?)?;
    let out = qemu_img(
        &[
            OsStr::new("snapshot"),
            OsStr::new("--image-opts"),
            OsStr::new(flag),
            OsStr::new(name.as_str()),
            opts.as_os_str(),
        ],
        INSPECT_LIMITS,
        "changing the snapshots of",
    )
    .await?;
    if !out.status.success() {
        return Err(failed("change the snapshots of", &out.stderr));
    }
    Ok(())
}

fn failed(doing: &str, stderr: &[u8]) -> Error {
    let text = String::from_utf8_lossy(stderr);
    let first: String = text
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect();
    Error::Internal(format!("qemu-img could not {doing} the volume: {first}"))
}

#[cfg(test)]
mod tests {
    use super::{change, list, SnapshotName};

    #[test]
    fn names_are_checked() {
        for good in ["before-upgrade", "s1", "v1.2_rc"] {
            assert_eq!(SnapshotName::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", "-x", "A", "a b", "a/b", "../x", &"a".repeat(64), "a;b"] {
            assert!(SnapshotName::parse(bad).is_err(), "{bad}");
        }
    }

    /// With real qemu-img: a snapshot keeps the disk's content, apply brings it back,
    /// delete removes it.
    #[tokio::test]
    async fn create_list_apply_delete_with_real_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("ws-abc123-root.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg("16M")
            .status()
            .unwrap();
        assert!(st.success());
        let io = |cmd: &str| {
            let st = std::process::Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", cmd])
                .arg(&disk)
                .output()
                .unwrap();
            assert!(st.status.success(), "{st:?}");
            String::from_utf8_lossy(&st.stdout).into_owned()
        };
        io("write -P 0x41 0 4k");
        let s1 = SnapshotName::parse("s1").unwrap();
        change(&disk, "-c", &s1).await.unwrap();
        io("write -P 0x42 0 4k");
        let snaps = list(&disk).await.unwrap();
        assert_eq!(snaps.len(), 1);
        assert_eq!(snaps[0].name, "s1");
        assert!(snaps[0].created_at > 0);
        change(&disk, "-a", &s1).await.unwrap();
        assert!(
            io("read -P 0x41 0 4k").contains("read 4096/4096"),
            "the disk came back"
        );
        change(&disk, "-d", &s1).await.unwrap();
        assert!(list(&disk).await.unwrap().is_empty());
        let err = change(&disk, "-a", &s1).await.unwrap_err().to_string();
        assert!(
            err.starts_with("qemu-img could not change the snapshots of the volume: "),
            "{err}"
        );
    }
}
