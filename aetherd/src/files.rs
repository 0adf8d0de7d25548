//! Small file helpers shared by the daemon's modules.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::Internal(format!("cannot chmod {}: {e}", path.display())))
}

/// Creates a new directory `<parent>/<prefix>-<16 random hex digits>`.
pub fn fresh_dir(parent: &Path, prefix: &str) -> Result<PathBuf> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the kernel's random source is available");
    let name: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let dir = parent.join(format!("{prefix}-{name}"));
    std::fs::create_dir(&dir)
        .map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

/// The last `max` bytes of a file; a missing file is empty.
pub fn tail(path: &Path, max: usize) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let io = |e: std::io::Error| Error::Internal(format!("cannot read {}: {e}", path.display()));
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let len = f.metadata().map_err(io)?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max as u64)))
        .map_err(io)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(io)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_and_fresh_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("log");
        assert!(tail(&f, 10).unwrap().is_empty());
        std::fs::write(&f, b"0123456789abcdef").unwrap();
        assert_eq!(tail(&f, 4).unwrap(), b"cdef");
        assert_eq!(tail(&f, 100).unwrap(), b"0123456789abcdef");
        let a = fresh_dir(dir.path(), "x").unwrap();
        let b = fresh_dir(dir.path(), "x").unwrap();
        assert_ne!(a, b);
        assert!(a.is_dir() && a.file_name().unwrap().to_str().unwrap().starts_with("x-"));
    }
}
