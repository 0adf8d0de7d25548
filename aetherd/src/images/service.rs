//! [`Images`]: import, listing and deletion of images (the files live in the pool and boot
//! dirs; see the rest of `crate::images` for the checks).
//!
//! An import holds its image id (name and owner) from the header on (a reservation row, see
//! [`Store::reserve_image_import`]): a second import of it is refused at once, so no
//! two imports ever write or clean up the same pool file. Each upload is staged in its own
//! directory, and a failed import removes only what it made.

use std::sync::Arc;

use crate::caller::Caller;
use crate::error::{Error, Result};
use crate::host::Layout;
use crate::hypervisor::Hypervisor;
use crate::images::{self, BootMode, Image, ImageId, ImageName};
use crate::quota::{Claim, Quotas};
use crate::store::Store;

/// Images and their files; everything it needs is handed in.
pub struct Images {
    store: Arc<Store>,
    hv: Arc<Hypervisor>,
    layout: Layout,
    /// The group files qemu must read are given to (see `privacy`), if any.
    qemu_gid: Option<u32>,
    max_volume_size_gb: u32,
    quota: Quotas,
    catalog_dir: std::path::PathBuf,
}

impl Images {
    pub fn new(
        store: Arc<Store>,
        hv: Arc<Hypervisor>,
        layout: Layout,
        qemu_gid: Option<u32>,
        max_volume_size_gb: u32,
        quota: Quotas,
        catalog_dir: std::path::PathBuf,
    ) -> Self {
        Images {
            store,
            hv,
            layout,
            qemu_gid,
            max_volume_size_gb,
            quota,
            catalog_dir,
        }
    }

    /// The catalog of `aether image pull`, read anew each time (so an edited file applies
    /// at once).
    pub fn catalog(&self) -> Vec<images::catalog::Entry> {
        images::catalog::load(&self.catalog_dir)
    }

    /// Refuses an image upload that has grown to `total` bytes past what `caller` may send:
    /// a member's `quota.upload_gb`, and for anyone the largest volume plus 1 GiB (for a
    /// kernel and initrd): no image can be larger and still be used.
    pub fn check_upload(&self, caller: Caller, total: u64) -> Result<()> {
        let largest = (u64::from(self.max_volume_size_gb) + 1) << 30;
        if total > largest {
            return Err(Error::invalid(format!(
                "the upload is larger than the largest volume ({} GiB, max_volume_size_gb) can hold",
                self.max_volume_size_gb
            )));
        }
        self.quota
            .check_for(caller, 0, Claim::UploadGb(total.div_ceil(1 << 30)))
    }

    /// Starts an import after its header: validates the name and command line, reserves the
    /// name (refused at once while the image exists or another import or delete holds it) and
    /// creates the upload's own staging directory. Dropping the result releases both.
    pub fn begin_import(
        &self,
        caller: Caller,
        name: &str,
        boot_mode: Option<BootMode>,
        cmdline: String,
        source_name: String,
    ) -> Result<ImageUpload> {
        // An admin's images are shared with everyone; a member's are their own.
        let owner = if caller.admin { 0 } else { caller.uid };
        let name = ImageId::new(ImageName::parse(name)?, owner);
        images::validate_cmdline(&cmdline)?;
        let token = self.store.reserve_image_import(&name)?;
        let dir = self.layout.upload_dir(&token);
        if let Err(e) = std::fs::create_dir(&dir) {
            let _ = self.store.release_image(&name, &token);
            return Err(Error::Internal(format!(
                "cannot create {}: {e}",
                dir.display()
            )));
        }
        Ok(ImageUpload {
            dir,
            name,
            boot_mode,
            cmdline,
            source_name,
            token,
            store: Arc::clone(&self.store),
        })
    }

    /// Finishes an upload: `upload.dir` holds `disk` and, for direct kernel boot, `kernel`
    /// and `initrd`. Checks and installs them; the upload dir and the reservation go in
    /// every case (when `upload` is dropped).
    pub async fn import(&self, upload: ImageUpload) -> Result<Image> {
        self.install(&upload).await
    }

    async fn install(&self, up: &ImageUpload) -> Result<Image> {
        let name = &up.name;
        let kernel = up.dir.join("kernel");
        let initrd = up.dir.join("initrd");
        let boot_mode = match (up.boot_mode, kernel.exists()) {
            (Some(BootMode::Kernel) | None, true) => BootMode::Kernel,
            (Some(BootMode::Kernel), false) => {
                return Err(Error::invalid(
                    "direct kernel boot needs a kernel (--kernel)",
                ))
            }
            (Some(mode), true) => {
                return Err(Error::invalid(format!(
                    "a kernel was sent but the boot mode is {}",
                    mode.as_str()
                )))
            }
            (Some(mode), false) => mode,
            (None, false) => BootMode::Bios,
        };
        if boot_mode != BootMode::Kernel && !up.cmdline.is_empty() {
            return Err(Error::invalid(
                "a kernel command line needs direct kernel boot (--kernel)",
            ));
        }
        if boot_mode == BootMode::Kernel && !initrd.exists() {
            return Err(Error::invalid(
                "direct kernel boot needs an initrd (--initrd)",
            ));
        }
        let disk = up.dir.join("disk");
        if !disk.exists() {
            return Err(Error::invalid("no disk data was sent"));
        }
        let max_virtual = images::max_virtual_size(self.max_volume_size_gb);

        // What was sent, checked as the format it claims (and shows).
        let format = images::identify(&disk, &up.source_name)?;
        let sent = images::check_disk(&disk, format, max_virtual).await?;
        let staged = match sent.format {
            images::DiskFormat::Qcow2 => disk,
            images::DiskFormat::Raw => {
                let converted = up.dir.join("disk.qcow2");
                images::convert_raw(&disk, &converted).await?;
                converted
            }
        };
        crate::privacy::share_with_qemu(&staged, self.qemu_gid, 0o640)?;

        // From here on this import makes files outside its staging dir; the reservation
        // means nothing else owns them, so a failure removes them.
        let dest = self.layout.pool().join(name.volume_name());
        let cleanup = |e: Error| {
            let _ = std::fs::remove_file(&dest);
            let _ = std::fs::remove_dir_all(self.layout.boot_dir(name));
            e
        };
        if boot_mode == BootMode::Kernel {
            let dir = self.layout.boot_dir(name);
            std::fs::create_dir_all(&dir).map_err(|e| {
                cleanup(Error::Internal(format!(
                    "cannot create {}: {e}",
                    dir.display()
                )))
            })?;
            crate::privacy::share_with_qemu(&dir, self.qemu_gid, 0o750).map_err(cleanup)?;
            for (from, to) in [
                (&kernel, self.layout.kernel(name)),
                (&initrd, self.layout.initrd(name)),
            ] {
                std::fs::rename(from, &to).map_err(|e| {
                    cleanup(Error::Internal(format!(
                        "cannot move {}: {e}",
                        to.display()
                    )))
                })?;
                crate::privacy::share_with_qemu(&to, self.qemu_gid, 0o640).map_err(cleanup)?;
            }
        }
        // The file that becomes the pool volume, checked again right before it moves (after
        // the conversion), and moved only if it is still the file checked.
        let checked = images::check_disk(&staged, images::DiskFormat::Qcow2, max_virtual)
            .await
            .map_err(cleanup)?;
        crate::fault::point("import:checked");
        images::move_into_pool(&checked, &staged, &dest).map_err(cleanup)?;
        crate::fault::point("import:moved");
        let image = Image {
            id: name.clone(),
            boot_mode,
            cmdline: up.cmdline.clone(),
            virtual_size: checked.virtual_size,
            disk_size: checked.actual_size,
            created_at: crate::store::now(),
            in_use: 0,
        };
        self.store
            .finish_image_import(&image, &up.token)
            .map_err(cleanup)?;
        crate::fault::point("import:done");
        self.hv.refresh_pool().await?;
        tracing::info!(image = %name, boot = boot_mode.as_str(), virtual_size = image.virtual_size, "image imported");
        Ok(image)
    }

    pub fn list(&self, caller: Caller) -> Result<Vec<Image>> {
        self.store.list_images(caller.owner())
    }

    /// Deletes the image `reference` means to the caller (see [`Store::resolve_image`]):
    /// their own, or for an admin any; a member may not delete a shared image.
    pub async fn delete(&self, caller: Caller, reference: &str) -> Result<()> {
        let image = self.store.resolve_image(reference, caller.owner())?;
        let name = image.id;
        if !caller.admin && name.owner_uid() != caller.uid {
            return Err(Error::PermissionDenied(format!(
                "image {} is shared by root; only root may delete it",
                name.name()
            )));
        }
        // The name stays reserved until the files are gone, so an import of it cannot
        // write them meanwhile.
        let token = self.store.delete_image(&name)?;
        let result = self.hv.delete_volume(&name.volume_name()).await;
        let _ = std::fs::remove_file(self.layout.pool().join(name.volume_name()));
        let _ = std::fs::remove_dir_all(self.layout.boot_dir(&name));
        self.store.release_image(&name, &token)?;
        result?;
        tracing::info!(image = %name, "image deleted");
        Ok(())
    }
}

/// An import in progress: its reserved name and its staging directory (`disk`, and
/// `kernel` + `initrd` for direct kernel boot). Dropping it removes the directory and
/// releases the reservation (a finished import's reservation is already the image row),
/// also when the request is cancelled midway.
pub struct ImageUpload {
    pub dir: std::path::PathBuf,
    name: ImageId,
    boot_mode: Option<BootMode>,
    cmdline: String,
    source_name: String,
    token: String,
    store: Arc<Store>,
}

impl std::fmt::Debug for ImageUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageUpload")
            .field("dir", &self.dir)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for ImageUpload {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Err(e) = self.store.release_image(&self.name, &self.token) {
            tracing::warn!(image = %self.name, error = %e, "cannot release the image reservation");
        }
    }
}
