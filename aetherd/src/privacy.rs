//! Who may read what the daemon keeps on disk.
//!
//! The daemon runs as root for many users; nothing under the state dir may be readable by
//! other local users (seeds hold each guest's private host key, the database every user's
//! workspaces, addresses and task argv). So:
//! - the process umask is 077: every file and directory the daemon or its children create
//!   is private unless a mode is set on purpose;
//! - directories qemu must traverse (the state dir, the pool, boot files, console logs) are
//!   `0750` with group [`Config::qemu_group`](crate::config::Config::qemu_group), the group
//!   libvirt runs qemu with; everything else is `0700`/`0600` root. Disks themselves reach
//!   qemu through libvirt's DAC relabelling (it chowns a VM's disks, kernel and initrd to the
//!   qemu user while the VM runs), base images through that group;
//! - no world bits anywhere.

use std::path::Path;

use crate::error::{Error, Result};
use crate::files::set_mode;

/// Sets the umask of the whole process (threads included) to 077.
pub fn private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// The group qemu runs as, if the daemon can give files to it: the group named `name`
/// exists and the daemon is root. `None` otherwise (then shared dirs are `0700`; a qemu
/// that runs as another user could not traverse them, which only the test driver, where
/// no qemu runs, or a qemu running as root gets away with).
pub fn qemu_gid(name: &str) -> Option<u32> {
    if !nix::unistd::Uid::effective().is_root() || name.is_empty() {
        return None;
    }
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// Makes `path` (a directory or file that exists) readable by root and, when `qemu` is
/// given, by that group: `dir_or_file_mode` with group bits kept only for a group.
pub fn share_with_qemu(path: &Path, qemu: Option<u32>, mode: u32) -> Result<()> {
    match qemu {
        Some(gid) => {
            nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(|e| {
                Error::Internal(format!(
                    "cannot give {} to group {gid}: {e}",
                    path.display()
                ))
            })?;
            set_mode(path, mode & 0o770)
        }
        None => set_mode(path, mode & 0o700),
    }
}

/// The database and its WAL and shared-memory files: `0600`. SQLite gives new -wal and -shm
/// files the database's mode, so this also covers those made later; files made by an older
/// daemon with `0644` are fixed here.
pub fn restrict_database(db: &Path) -> Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let path = std::path::PathBuf::from(name);
        if path.exists() {
            set_mode(&path, 0o600)?;
        }
    }
    Ok(())
}
