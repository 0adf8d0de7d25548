//! Suspend and resume: a running domain's memory and device state saved to a file, and the
//! domain started again from it (libvirt's `virDomainSaveFlags` and `virDomainRestoreFlags`,
//! which the `virt` crate does not wrap). The file is the daemon's own (see
//! `Layout::memory_image`), so the daemon knows its size and removes it with the workspace.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use virt::sys;

use super::{owned_domain, run_blocking, Hypervisor};
use crate::error::{Error, Result};
use crate::model::WorkspaceId;

/// How long a save or a restore may take: it copies the guest's memory, so it is allowed
/// much longer than other libvirt calls, but not forever.
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);

fn c_path(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Internal(format!("{} contains a NUL byte", p.display())))
}

impl Hypervisor {
    /// Saves the running domain of `ws` to `to` and powers it off; the domain stays defined.
    /// Fails, with the guest still running, if libvirt or qemu cannot save it (a GPU, for
    /// one, cannot be saved). A failed save leaves no file behind.
    pub async fn save(&self, ws: &WorkspaceId, to: &Path) -> Result<()> {
        let ws = ws.clone();
        let path = to.to_owned();
        let conn = self.conn.clone();
        let result = run_blocking("virDomainSaveFlags", SAVE_TIMEOUT, move || {
            let dom = owned_domain(&conn, &ws)?.ok_or_else(|| {
                Error::libvirt(format!("domain {} is not defined", ws.domain_name()))
            })?;
            if !dom.is_active()? {
                return Err(Error::precondition(format!(
                    "the VM of {ws} is not running"
                )));
            }
            let to = c_path(&path)?;
            // SAFETY: `dom` owns a live virDomainPtr for the whole call; `to` is a
            // NUL-terminated string that outlives it; a null `dxml` means the domain's own
            // XML; no flags: a restore leaves it as it was saved, running.
            let rc =
                unsafe { sys::virDomainSaveFlags(dom.as_ptr(), to.as_ptr(), std::ptr::null(), 0) };
            if rc < 0 {
                return Err(virt::error::Error::last_error().into());
            }
            Ok(())
        })
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(to);
        }
        result
    }

    /// Starts the defined, inactive domain of `ws` from the memory image `from`, running.
    pub async fn restore(&self, ws: &WorkspaceId, from: &Path) -> Result<()> {
        let ws = ws.clone();
        let path = from.to_owned();
        let conn = self.conn.clone();
        run_blocking("virDomainRestoreFlags", SAVE_TIMEOUT, move || {
            let dom = owned_domain(&conn, &ws)?.ok_or_else(|| {
                Error::libvirt(format!("domain {} is not defined", ws.domain_name()))
            })?;
            if dom.is_active()? {
                return Err(Error::precondition(format!(
                    "the VM of {ws} is already running"
                )));
            }
            let from = c_path(&path)?;
            // SAFETY: `conn` owns a live virConnectPtr for the whole call; `from` is a
            // NUL-terminated string that outlives it; a null `dxml` keeps the XML saved in
            // the image; no flags: it runs as it was saved.
            let rc = unsafe {
                sys::virDomainRestoreFlags(conn.as_ptr(), from.as_ptr(), std::ptr::null(), 0)
            };
            if rc < 0 {
                return Err(virt::error::Error::last_error().into());
            }
            Ok(())
        })
        .await
    }
}
