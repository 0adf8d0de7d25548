//! The image upload protocol of `ImportImage`: a header first, then the parts kernel,
//! initrd and disk, in that order, written to the import's staging directory.

use aether_proto::v1 as pb;
use tonic::Status;

use crate::error::Error;
use crate::images::BootMode;

use super::status::status;

/// The header of an image upload, checked.
pub(super) struct ImageHeader {
    pub(super) name: String,
    pub(super) boot_mode: Option<BootMode>,
    pub(super) cmdline: String,
    pub(super) source_name: String,
}

/// Reads the first message of an image upload, which must be its header.
pub(super) async fn receive_image_header(
    stream: &mut tonic::Streaming<pb::ImportImageRequest>,
) -> Result<ImageHeader, Status> {
    use pb::import_image_request::Part;

    let header = match stream.message().await? {
        Some(pb::ImportImageRequest {
            part: Some(Part::Header(h)),
        }) => h,
        _ => {
            return Err(status(Error::invalid(
                "the first message must be the image header",
            )))
        }
    };
    let boot_mode = match pb::BootMode::try_from(header.boot_mode) {
        Ok(pb::BootMode::Unspecified) => None,
        Ok(pb::BootMode::Bios) => Some(BootMode::Bios),
        Ok(pb::BootMode::Uefi) => Some(BootMode::Uefi),
        Ok(pb::BootMode::Kernel) => Some(BootMode::Kernel),
        Err(_) => return Err(status(Error::invalid("invalid boot mode"))),
    };
    Ok(ImageHeader {
        name: header.name,
        boot_mode,
        cmdline: header.cmdline,
        source_name: header.source_name,
    })
}

/// Writes the parts after the header to `dir` (`kernel`, `initrd`, `disk`), enforcing the
/// order kernel, initrd, disk; `allowed(total bytes so far)` refuses an upload grown too big.
pub(super) async fn receive_image_parts(
    stream: &mut tonic::Streaming<pb::ImportImageRequest>,
    dir: &std::path::Path,
    allowed: impl Fn(u64) -> Result<(), Status>,
) -> Result<(), Status> {
    use pb::import_image_request::Part;
    use tokio::io::AsyncWriteExt;

    let mut stage = 0; // 1 kernel, 2 initrd, 3 disk
    let mut file: Option<tokio::fs::File> = None;
    let mut total: u64 = 0;
    while let Some(msg) = stream.message().await? {
        let (want, name, data) = match msg.part {
            Some(Part::Kernel(d)) => (1, "kernel", d),
            Some(Part::Initrd(d)) => (2, "initrd", d),
            Some(Part::Disk(d)) => (3, "disk", d),
            Some(Part::Header(_)) | None => {
                return Err(status(Error::invalid("only one header is allowed")))
            }
        };
        if want < stage {
            return Err(status(Error::invalid(
                "image parts must come in the order kernel, initrd, disk",
            )));
        }
        total = total.saturating_add(data.len() as u64);
        allowed(total)?;
        if want > stage {
            if let Some(mut f) = file.take() {
                f.flush()
                    .await
                    .map_err(|e| status(Error::Internal(e.to_string())))?;
            }
            stage = want;
            file = Some(
                tokio::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(dir.join(name))
                    .await
                    .map_err(|e| status(Error::Internal(format!("cannot store upload: {e}"))))?,
            );
        }
        if let Some(f) = file.as_mut() {
            f.write_all(&data)
                .await
                .map_err(|e| status(Error::Internal(format!("cannot store upload: {e}"))))?;
        }
    }
    if let Some(mut f) = file.take() {
        f.flush()
            .await
            .map_err(|e| status(Error::Internal(e.to_string())))?;
        f.sync_all()
            .await
            .map_err(|e| status(Error::Internal(e.to_string())))?;
    }
    Ok(())
}
