//! A task's output log: appended to `<state>/tasks/<id>.log` as frames (`O`|`E`, u32
//! big-endian length, bytes). A log is capped: before a frame would take it past
//! [`TASK_LOG_MAX`] it is renamed to `<id>.log.1` (replacing the previous one) and a new file
//! begun, so a task keeps its most recent output, at most twice the cap. A reader reads `.1`
//! then the current file in chunks of [`LOG_CHUNK`] on the blocking pool, and a follower then
//! tails the file as it grows (woken by the writer), so a slow reader never holds a lock,
//! misses a frame or makes the daemon buffer more than a chunk.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

/// Largest a task's log file grows before it is rotated to `<id>.log.1`.
pub const TASK_LOG_MAX: u64 = 16 << 20;

/// `TaskLogs` reads a log in chunks of at most this many bytes.
pub const LOG_CHUNK: usize = 64 << 10;

/// Largest frame the writer makes (one read of the child's output) and a reader accepts.
pub(crate) const MAX_FRAME: usize = 32 << 10;

/// A piece of a task's life, as followers see it.
#[derive(Clone, Debug)]
pub enum Frame {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    End {
        state: &'static str,
        exit_code: Option<i32>,
    },
}

/// A running task's log, shared by its writer and its followers.
pub struct SharedLog {
    /// Held only for a write, a rotation, or a follower's look at where the log is (plus
    /// opening the file it moves on to); never across an await.
    log: std::sync::Mutex<TaskLog>,
    /// Bumped after every write and at the end: followers wait for it.
    pub(crate) wake: watch::Sender<u64>,
}

impl SharedLog {
    pub(crate) fn new(log: TaskLog) -> Arc<Self> {
        Arc::new(SharedLog {
            log: std::sync::Mutex::new(log),
            wake: watch::Sender::new(0),
        })
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, TaskLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn woken(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The writer's side of a task log: the current file, capped by rotation.
pub struct TaskLog {
    pub(crate) path: PathBuf,
    file: std::fs::File,
    /// Bytes in the current file; always at a frame boundary.
    pub(crate) len: u64,
    /// Rotations so far: the current file is generation `rotations`, `.1` the one before.
    pub(crate) rotations: u64,
    cap: u64,
    /// How the task ended, once it has.
    pub(crate) end: Option<(&'static str, Option<i32>)>,
    /// A write failed already (warned about once).
    pub(crate) failed: bool,
}

impl TaskLog {
    /// Creates the log file (which must not exist yet).
    pub fn create(path: &Path, cap: u64) -> std::io::Result<TaskLog> {
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(path)?;
        Ok(TaskLog {
            path: path.to_owned(),
            file,
            len: 0,
            rotations: 0,
            cap,
            end: None,
            failed: false,
        })
    }

    /// Appends one frame, first rotating the file if the frame would take it past the cap.
    /// A failed write is cut off again, so readers never see a torn frame.
    pub fn append(&mut self, kind: u8, data: &[u8]) -> std::io::Result<()> {
        let size = 5 + data.len() as u64;
        if self.len > 0 && self.len + size > self.cap {
            std::fs::rename(&self.path, crate::files::rotated(&self.path, 1))?;
            self.file = std::fs::OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&self.path)?;
            self.len = 0;
            self.rotations += 1;
        }
        if let Err(e) = write_frame(&mut self.file, kind, data) {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += size;
        Ok(())
    }
}

fn write_frame(file: &mut std::fs::File, kind: u8, data: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(5 + data.len());
    frame.push(kind);
    frame.extend_from_slice(&(data.len() as u32).to_be_bytes());
    frame.extend_from_slice(data);
    file.write_all(&frame)
}

/// Takes the whole frames off the front of `buf`, leaving an incomplete last one there.
/// `true` with them when a frame claims more than the writer ever makes: the rest of that
/// file is damaged.
pub(crate) fn take_frames(buf: &mut Vec<u8>) -> (Vec<Frame>, bool) {
    let mut frames = Vec::new();
    let mut i = 0;
    let mut damaged = false;
    while buf.len() - i >= 5 {
        let len = u32::from_be_bytes([buf[i + 1], buf[i + 2], buf[i + 3], buf[i + 4]]) as usize;
        if len > MAX_FRAME {
            damaged = true;
            break;
        }
        let Some(data) = buf.get(i + 5..i + 5 + len) else {
            break;
        };
        frames.push(match buf[i] {
            b'E' => Frame::Stderr(data.to_vec()),
            _ => Frame::Stdout(data.to_vec()),
        });
        i += 5 + len;
    }
    buf.drain(..i);
    (frames, damaged)
}

#[cfg(test)]
mod tests {
    use super::{take_frames, write_frame, Frame};

    #[test]
    fn frames_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let mut f = std::fs::File::create(&p).unwrap();
        write_frame(&mut f, b'O', b"out").unwrap();
        write_frame(&mut f, b'E', b"err").unwrap();
        drop(f);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.extend_from_slice(&[b'O', 0, 0, 0, 9, b'x']); // torn last frame
        let (frames, damaged) = take_frames(&mut bytes);
        assert!(!damaged);
        assert_eq!(frames.len(), 2);
        assert!(matches!(&frames[0], Frame::Stdout(d) if d == b"out"));
        assert!(matches!(&frames[1], Frame::Stderr(d) if d == b"err"));
        assert_eq!(
            bytes,
            [b'O', 0, 0, 0, 9, b'x'],
            "the torn frame is kept for later"
        );
        // A length no writer makes: damaged, and nothing is buffered for it.
        let mut bad = vec![b'O', 0x7f, 0xff, 0xff, 0xff, b'x'];
        let (frames, damaged) = take_frames(&mut bad);
        assert!(frames.is_empty() && damaged);
    }
}
