//! Where the daemon keeps its files, all under the state dir: the pool (base images, root
//! volumes, seeds), boot files, console logs, task logs, staging and keys; and their modes.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::files::set_mode;
use crate::images::ImageId;
use crate::model::WorkspaceId;

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

    pub fn console_log(&self, ws: &WorkspaceId) -> PathBuf {
        self.console_dir().join(format!("{ws}.log"))
    }

    /// Task logs and the pinned host keys of the daemon's SSH sessions (0700).
    pub fn tasks_dir(&self) -> PathBuf {
        self.state_dir.join("tasks")
    }

    /// A workspace's root volume: a qcow2 overlay on its image, in the pool.
    pub fn root_volume_name(ws: &WorkspaceId) -> String {
        format!("{ws}-root.qcow2")
    }

    /// A workspace's cloud-init NoCloud seed, in the pool.
    pub fn seed_file_name(ws: &WorkspaceId) -> String {
        format!("{ws}-seed.img")
    }

    /// Memory images of suspended workspaces (0700: they hold the guests' memory).
    pub fn memory_dir(&self) -> PathBuf {
        self.state_dir.join("memory")
    }

    /// The memory image a suspend writes (libvirt's save format) and the next start
    /// resumes from; it exists only while the workspace is suspended.
    pub fn memory_image(&self, ws: &WorkspaceId) -> PathBuf {
        self.memory_dir().join(format!("{ws}.save"))
    }

    /// The size of the workspace's memory image, if it is suspended.
    pub fn memory_image_bytes(&self, ws: &WorkspaceId) -> Option<u64> {
        std::fs::metadata(self.memory_image(ws))
            .ok()
            .map(|m| m.len())
    }

    /// Removes the workspace's memory image; a missing one is fine.
    pub fn remove_memory_image(&self, ws: &WorkspaceId) -> Result<()> {
        let path = self.memory_image(ws);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Internal(format!(
                "cannot remove {}: {e}",
                path.display()
            ))),
        }
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
            (self.memory_dir(), false),
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

    /// Removes every staging directory of an import (`<tmp>/upload-*`) and of a key
    /// generation (`<tmp>/.keygen-*`). At start nothing runs, so these are left by a daemon
    /// that died during one (an import's reservation is dropped when the store opens).
    fn remove_stale_uploads(&self) -> Result<()> {
        let tmp = self.tmp();
        let entries = std::fs::read_dir(&tmp)
            .map_err(|e| Error::Internal(format!("cannot read {}: {e}", tmp.display())))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("upload-") || name.starts_with(".keygen-") {
                let path = entry.path();
                tracing::info!(path = %path.display(), "removing staging files left by an interrupted import or create");
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
        }
        Ok(())
    }
}
