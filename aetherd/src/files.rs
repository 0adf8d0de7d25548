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

/// Most bytes one read of a log returns (`GetConsoleLog`'s `max_bytes`): a reply is built in
/// memory whole, so a request for more is refused.
pub const MAX_LOG_READ: usize = 1 << 20;

/// Size at which [`cap_log`] cuts the serial console log to its newest half. libvirt's
/// virtlogd, which writes the console when qemu.conf's `stdio_handler` is `logd` (the
/// default), rotates it sooner by itself (`max_size`, 2 MiB, into `<log>.0` … `<log>.2`,
/// `max_backups` 3); with `stdio_handler = "file"` qemu appends to it unbounded, and this cap
/// is what bounds it.
pub const CONSOLE_LOG_MAX: u64 = 4 << 20;

/// Rotated predecessors a log may have: virtlogd keeps at most 32 backups, `<log>.0` (newest)
/// to `<log>.31`; a task log has one, `<log>.1`.
const MAX_BACKUPS: usize = 32;

/// `<path>.<n>`.
pub fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The last `max` bytes of one file, read with a seek (never more than `max` bytes, even
/// while the file grows); a missing file is empty.
fn tail_of_file(path: &Path, max: usize) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let io = |e: std::io::Error| Error::Internal(format!("cannot read {}: {e}", path.display()));
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let len = f.metadata().map_err(io)?.len();
    let want = len.min(max as u64);
    f.seek(SeekFrom::Start(len - want)).map_err(io)?;
    let mut buf = Vec::with_capacity(want as usize);
    f.take(want).read_to_end(&mut buf).map_err(io)?;
    Ok(buf)
}

/// The last `max` bytes of a log; a missing log is empty. When the file itself is shorter,
/// the rest comes from the end of its rotated predecessors `<path>.0`, `<path>.1`, …
/// (virtlogd's names, newest first), so a log that was just rotated still shows its recent
/// past. Only the bytes returned are read.
pub fn tail(path: &Path, max: usize) -> Result<Vec<u8>> {
    let mut parts = vec![tail_of_file(path, max)?];
    let mut got = parts[0].len();
    for n in 0..MAX_BACKUPS {
        if got >= max {
            break;
        }
        let older = rotated(path, n);
        if !older.exists() {
            break;
        }
        let part = tail_of_file(&older, max - got)?;
        got += part.len();
        parts.push(part);
    }
    parts.reverse();
    Ok(parts.concat())
}

/// Cuts a log longer than `cap` bytes down to about its newest `cap / 2`, in place: whoever
/// appends to it (qemu or virtlogd, which open it `O_APPEND`) carries on at the new end, so
/// this works while the VM runs, where a rename would leave the writer on the old file.
/// Where the filesystem can (ext4, XFS) the head is dropped with `FALLOC_FL_COLLAPSE_RANGE`,
/// atomically for the writer, and what is kept starts at a block boundary; elsewhere the
/// tail is copied to the front and the file truncated, and output appended during that copy
/// is lost. Returns whether it cut; a missing file is fine.
pub fn cap_log(path: &Path, cap: u64) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let io = |e: std::io::Error| Error::Internal(format!("cannot cap {}: {e}", path.display()));
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(e)),
    };
    let meta = f.metadata().map_err(io)?;
    let len = meta.len();
    if len <= cap {
        return Ok(false);
    }
    let keep = (cap / 2).max(1);
    let block = meta.blksize().max(1);
    let collapse = (len - keep) / block * block;
    if collapse > 0
        && nix::fcntl::fallocate(
            &f,
            nix::fcntl::FallocateFlags::FALLOC_FL_COLLAPSE_RANGE,
            0,
            collapse as i64,
        )
        .is_ok()
    {
        return Ok(true);
    }
    copy_tail_to_front(&f, len, keep).map_err(io)?;
    Ok(true)
}

/// Moves the last `keep` of `len` bytes of `f` to its start and truncates it there, in
/// bounded chunks.
fn copy_tail_to_front(f: &std::fs::File, len: u64, keep: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let from = len - keep;
    // Source and destination never overlap within a chunk (the source starts `from` later).
    let mut buf = vec![0u8; (64 << 10).min(from) as usize];
    let mut done = 0;
    while done < keep {
        let n = buf.len().min((keep - done) as usize);
        f.read_exact_at(&mut buf[..n], from + done)?;
        f.write_all_at(&buf[..n], done)?;
        done += n as u64;
    }
    f.set_len(keep)
}

/// [`cap_log`] for every `*.log` file directly in `dir` (the console dir); returns how many
/// it cut. A missing dir has none.
pub fn cap_logs_in(dir: &Path, cap: u64) -> Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(Error::Internal(format!(
                "cannot list {}: {e}",
                dir.display()
            )))
        }
    };
    let mut cut = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "log") && cap_log(&path, cap)? {
            cut += 1;
        }
    }
    Ok(cut)
}

/// Removes a log and every rotated predecessor (`<path>.0` … `<path>.31`); missing ones are
/// fine.
pub fn remove_log(path: &Path) -> Result<()> {
    let paths = std::iter::once(path.to_owned()).chain((0..MAX_BACKUPS).map(|n| rotated(path, n)));
    for p in paths {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Internal(format!(
                    "cannot remove {}: {e}",
                    p.display()
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        cap_log, cap_logs_in, copy_tail_to_front, fresh_dir, remove_log, rotated, tail,
        MAX_LOG_READ,
    };

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

    #[test]
    fn tail_continues_into_rotated_files_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ws.log");
        std::fs::write(rotated(&f, 1), b"xy").unwrap();
        std::fs::write(rotated(&f, 0), b"0123").unwrap();
        std::fs::write(&f, b"4567").unwrap();
        assert_eq!(tail(&f, 3).unwrap(), b"567");
        assert_eq!(tail(&f, 6).unwrap(), b"234567");
        assert_eq!(tail(&f, 100).unwrap(), b"xy01234567");
        // Just rotated: the current file is empty, the recent past is in `.0`.
        std::fs::write(&f, b"").unwrap();
        assert_eq!(tail(&f, 2).unwrap(), b"23");
        // A gap ends the chain (`.2` without `.1` is not read).
        std::fs::remove_file(rotated(&f, 1)).unwrap();
        std::fs::write(rotated(&f, 2), b"old").unwrap();
        assert_eq!(tail(&f, 100).unwrap(), b"0123");
    }

    #[test]
    fn tail_of_a_huge_sparse_file_reads_only_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("big.log");
        let file = std::fs::File::create(&f).unwrap();
        file.set_len(8 << 30).unwrap(); // 8 GiB of holes: reading them whole would not fit
        use std::os::unix::fs::FileExt;
        file.write_all_at(b"the end\n", (8 << 30) - 8).unwrap();
        let t = tail(&f, MAX_LOG_READ).unwrap();
        assert_eq!(t.len(), MAX_LOG_READ);
        assert!(t.ends_with(b"the end\n"));
        assert!(t[..MAX_LOG_READ - 8].iter().all(|b| *b == 0));
    }

    /// `len` bytes of numbered lines, so any cut is recognisable.
    fn lines(len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 16);
        let mut i = 0u64;
        while v.len() < len {
            v.extend_from_slice(format!("line {i:08}\n").as_bytes());
            i += 1;
        }
        v.truncate(len);
        v
    }

    #[test]
    fn cap_log_keeps_the_newest_half_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ws.log");
        assert!(!cap_log(&f, 100).unwrap(), "a missing log is fine");
        std::fs::write(&f, b"short").unwrap();
        assert!(!cap_log(&f, 100).unwrap());
        assert_eq!(std::fs::read(&f).unwrap(), b"short");

        // Small: below one block, so the tail is copied to the front.
        let data = lines(1000);
        std::fs::write(&f, &data).unwrap();
        assert!(cap_log(&f, 400).unwrap());
        assert_eq!(std::fs::read(&f).unwrap(), &data[800..]);

        // Large: whole blocks of the head are collapsed where the filesystem can; either way
        // what is left is the newest part, at least half the cap and less than a block more.
        let data = lines(3 << 20);
        std::fs::write(&f, &data).unwrap();
        let cap = 1 << 20;
        assert!(cap_log(&f, cap).unwrap());
        let kept = std::fs::read(&f).unwrap();
        assert!(kept.len() as u64 >= cap / 2, "{}", kept.len());
        assert!((kept.len() as u64) < cap / 2 + 64 * 1024, "{}", kept.len());
        assert!(data.ends_with(&kept));
    }

    #[test]
    fn an_appending_writer_carries_on_after_a_cap() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ws.log");
        let data = lines(2 << 20);
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&f)
            .unwrap();
        writer.write_all(&data).unwrap();
        assert!(cap_log(&f, 1 << 20).unwrap());
        writer.write_all(b"after the cap\n").unwrap();
        let now = std::fs::read(&f).unwrap();
        assert!(now.len() < (1 << 20), "{}", now.len());
        assert!(now.ends_with(b"after the cap\n"));
        assert!(
            !now.contains(&0),
            "no hole where the writer's old offset was"
        );
        let before = &now[..now.len() - 14];
        assert!(data.ends_with(before));
    }

    #[test]
    fn copying_the_tail_moves_it_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ws.log");
        let data = lines(1 << 20);
        std::fs::write(&f, &data).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f)
            .unwrap();
        copy_tail_to_front(&file, data.len() as u64, 300_000).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), &data[data.len() - 300_000..]);
    }

    #[test]
    fn cap_logs_in_a_dir_and_remove_a_log_with_its_rotations() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(cap_logs_in(&dir.path().join("missing"), 10).unwrap(), 0);
        let a = dir.path().join("ws-aaaaaa.log");
        let b = dir.path().join("ws-bbbbbb.log");
        let other = dir.path().join("notes.txt");
        std::fs::write(&a, lines(100)).unwrap();
        std::fs::write(&b, b"ok").unwrap();
        std::fs::write(&other, lines(100)).unwrap();
        assert_eq!(cap_logs_in(dir.path(), 40).unwrap(), 1);
        assert_eq!(std::fs::metadata(&a).unwrap().len(), 20);
        assert_eq!(std::fs::metadata(&other).unwrap().len(), 100);

        for n in [0, 1, 2, 31] {
            std::fs::write(rotated(&a, n), b"x").unwrap();
        }
        remove_log(&a).unwrap();
        remove_log(&a).unwrap(); // already gone: fine
        assert!(!a.exists());
        for n in [0, 1, 2, 31] {
            assert!(!rotated(&a, n).exists(), "{n}");
        }
        assert!(b.exists() && other.exists());
    }
}
