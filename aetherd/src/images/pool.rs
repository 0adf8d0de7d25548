//! The move of a checked disk into the pool ([`move_into_pool`]): the file that arrives is
//! the file that was checked, or the import is refused.

use std::path::Path;

use crate::error::{Error, Result};

use super::check::{CheckedDisk, FileId};
use super::{refused, DiskFormat};

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
