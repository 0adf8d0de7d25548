//! Reading a task's log: a snapshot (the output so far) or a follower (then the output as it
//! comes, across rotations, until the task ends), in bounded chunks on the blocking pool.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

use super::log::{take_frames, Frame, SharedLog, LOG_CHUNK};
use crate::error::{Error, Result};

/// One file of a log, opened before it could be renamed away, read from `pos` to `until`
/// (or its end).
struct Part {
    file: std::fs::File,
    pos: u64,
    until: Option<u64>,
}

impl Part {
    fn new(file: std::fs::File, until: Option<u64>) -> Part {
        Part {
            file,
            pos: 0,
            until,
        }
    }
}

/// Opens `path`; `None` if it does not exist.
fn open_if_there(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What one blocking step of a reader produced.
enum Step {
    Frames(Vec<Frame>),
    /// Caught up with a running task: wait for its writer.
    Wait,
    /// Nothing more; how the task ended when a follower saw it end.
    End(Option<(&'static str, Option<i32>)>),
}

/// Which log a reader reads, and how.
pub(crate) enum Source {
    /// A finished task: `.1`, then the current file, each to its end.
    Finished(PathBuf),
    /// A running task, up to where its log was when the reader opened it.
    Snapshot(Arc<SharedLog>),
    /// A running task, then what it writes next until it ends.
    Follow(Arc<SharedLog>),
}

/// The blocking half of a [`TaskLogReader`]: runs on the blocking pool, one step at a time.
struct ReaderState {
    source: Source,
    opened: bool,
    /// Files still to read, oldest first. Following, the last one is the writer's current
    /// file of generation `generation`, read as far as the writer has written.
    parts: VecDeque<Part>,
    generation: u64,
    /// Bytes read but not yet returned: the start of a frame.
    buf: Vec<u8>,
}

impl ReaderState {
    fn new(source: Source) -> ReaderState {
        ReaderState {
            source,
            opened: false,
            parts: VecDeque::new(),
            generation: 0,
            buf: Vec::new(),
        }
    }

    /// Opens the files to read: `.1` (when there is one) and the current file.
    fn open(&mut self) -> std::io::Result<()> {
        match &self.source {
            Source::Finished(path) => {
                for p in [crate::files::rotated(path, 1), path.clone()] {
                    if let Some(f) = open_if_there(&p)? {
                        self.parts.push_back(Part::new(f, None));
                    }
                }
            }
            Source::Snapshot(shared) | Source::Follow(shared) => {
                let follow = matches!(self.source, Source::Follow(_));
                // Under the lock, so no rotation falls between the two opens.
                let log = shared.lock();
                if log.rotations > 0 {
                    if let Some(f) = open_if_there(&crate::files::rotated(&log.path, 1))? {
                        self.parts.push_back(Part::new(f, None));
                    }
                }
                let current = std::fs::File::open(&log.path)?;
                let until = (!follow).then_some(log.len);
                self.parts.push_back(Part::new(current, until));
                self.generation = log.rotations;
            }
        }
        Ok(())
    }

    /// Reads on until it has frames to return (from one read of at most [`LOG_CHUNK`]
    /// bytes, plus the start of a frame left from the read before), has to wait for the
    /// writer, or is at the end.
    fn step(&mut self) -> std::io::Result<Step> {
        use std::os::unix::fs::FileExt;
        if !self.opened {
            self.open()?;
            self.opened = true;
        }
        let mut chunk = vec![0u8; LOG_CHUNK];
        loop {
            let live = match &self.source {
                Source::Follow(shared) if self.parts.len() == 1 => Some(Arc::clone(shared)),
                _ => None,
            };
            let Some(part) = self.parts.front_mut() else {
                return Ok(Step::End(None));
            };
            // How far this part may be read.
            let until = match &live {
                Some(shared) => {
                    let log = shared.lock();
                    if log.rotations == self.generation {
                        if part.pos >= log.len {
                            return Ok(match log.end {
                                Some(end) => Step::End(Some(end)),
                                None => Step::Wait,
                            });
                        }
                        Some(log.len)
                    } else {
                        // Rotated away: complete, read it to its end.
                        None
                    }
                }
                None => part.until,
            };
            let want = match until {
                Some(u) => (u.saturating_sub(part.pos) as usize).min(LOG_CHUNK),
                None => LOG_CHUNK,
            };
            let n = if want == 0 {
                0
            } else {
                part.file.read_at(&mut chunk[..want], part.pos)?
            };
            if n == 0 && live.is_some() && until.is_some() {
                // Shorter than its writer says (a failed write being cut off): not done.
                return Ok(Step::Wait);
            }
            let mut done = n == 0;
            if n > 0 {
                part.pos += n as u64;
                self.buf.extend_from_slice(&chunk[..n]);
                let (frames, damaged) = take_frames(&mut self.buf);
                if damaged {
                    self.buf.clear();
                    match (&live, until) {
                        // The writer's length is a frame boundary: carry on from there.
                        (Some(_), Some(u)) => part.pos = u,
                        _ => done = true,
                    }
                }
                if done {
                    self.next_part(live.as_deref())?;
                }
                if !frames.is_empty() {
                    return Ok(Step::Frames(frames));
                }
                continue;
            }
            self.next_part(live.as_deref())?;
        }
    }

    /// Done with the first part: a torn frame at its end is dropped (frames never span
    /// files). Following, when it was the writer's old file, opens what the writer wrote
    /// since, under its lock so it cannot rotate in between; after more than one rotation
    /// the files between are gone and `.1` is the oldest output left.
    fn next_part(&mut self, live: Option<&SharedLog>) -> std::io::Result<()> {
        self.buf.clear();
        self.parts.pop_front();
        if let Some(shared) = live {
            let log = shared.lock();
            if log.rotations > self.generation + 1 {
                if let Some(f) = open_if_there(&crate::files::rotated(&log.path, 1))? {
                    self.parts.push_back(Part::new(f, None));
                }
            }
            self.parts
                .push_back(Part::new(std::fs::File::open(&log.path)?, None));
            self.generation = log.rotations;
        }
        Ok(())
    }
}

/// Reads a task's log in bounded chunks, oldest output first (`.1`, then the current file);
/// following a running task, then what it writes next, until it ends. File I/O runs on the
/// blocking pool; waiting for output is a plain await.
pub struct TaskLogReader {
    /// Taken while a step runs.
    state: Option<ReaderState>,
    wake: Option<watch::Receiver<u64>>,
    end: Option<(&'static str, Option<i32>)>,
    done: bool,
}

impl TaskLogReader {
    pub(crate) fn new(source: Source) -> TaskLogReader {
        let wake = match &source {
            Source::Follow(shared) => Some(shared.wake.subscribe()),
            _ => None,
        };
        TaskLogReader {
            state: Some(ReaderState::new(source)),
            wake,
            end: None,
            done: false,
        }
    }

    /// The log of a task that has ended, read to its end.
    pub fn finished(path: &Path) -> TaskLogReader {
        Self::new(Source::Finished(path.to_owned()))
    }

    /// The next frames (about [`LOG_CHUNK`] bytes of output at most), or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Vec<Frame>>> {
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some(w) = &mut self.wake {
                // Seen before the step looks, so a write after its look wakes the wait below.
                w.borrow_and_update();
            }
            let Some(mut state) = self.state.take() else {
                self.done = true;
                return Err(Error::Internal("the task log reader failed".into()));
            };
            let (state, step) = tokio::task::spawn_blocking(move || {
                let step = state.step();
                (state, step)
            })
            .await
            .map_err(|e| Error::Internal(format!("the task log reader failed: {e}")))?;
            self.state = Some(state);
            match step {
                Err(e) => {
                    self.done = true;
                    return Err(Error::Internal(format!("cannot read the task log: {e}")));
                }
                Ok(Step::Frames(frames)) => return Ok(Some(frames)),
                Ok(Step::Wait) => {
                    if let Some(w) = &mut self.wake {
                        // The sender lives in the log this reader holds: this cannot fail.
                        let _ = w.changed().await;
                    }
                }
                Ok(Step::End(end)) => {
                    self.end = end;
                    self.done = true;
                    return Ok(None);
                }
            }
        }
    }

    /// How the task ended, when this reader followed it to its end.
    pub fn end(&self) -> Option<(&'static str, Option<i32>)> {
        self.end
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::log::{Frame, SharedLog, TaskLog, LOG_CHUNK, MAX_FRAME, TASK_LOG_MAX};
    use super::{ReaderState, Source, Step, TaskLogReader};

    /// The output in `frames`, `O:`/`E:` prefixed, and whether an end was seen.
    fn text(frames: &[Frame]) -> String {
        frames
            .iter()
            .map(|f| match f {
                Frame::Stdout(d) => format!("O:{}", String::from_utf8_lossy(d)),
                Frame::Stderr(d) => format!("E:{}", String::from_utf8_lossy(d)),
                Frame::End { state, .. } => format!("END:{state}"),
            })
            .collect()
    }

    /// Output bytes carried by `frames`.
    fn payload(frames: &[Frame]) -> usize {
        frames
            .iter()
            .map(|f| match f {
                Frame::Stdout(d) | Frame::Stderr(d) => d.len(),
                Frame::End { .. } => 0,
            })
            .sum()
    }

    /// Steps `r` until it waits or ends; returns the frames and the last step's kind.
    fn drain(r: &mut ReaderState) -> (Vec<Frame>, &'static str) {
        let mut all = Vec::new();
        loop {
            match r.step().unwrap() {
                Step::Frames(f) => {
                    let bytes = payload(&f);
                    assert!(
                        bytes <= LOG_CHUNK + MAX_FRAME,
                        "one step returned {bytes} bytes"
                    );
                    all.extend(f);
                }
                Step::Wait => return (all, "wait"),
                Step::End(_) => return (all, "end"),
            }
        }
    }

    fn frame(i: usize) -> String {
        format!("{i:04}.")
    }

    #[test]
    fn a_task_log_rotates_at_its_cap_keeping_the_newest_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-abc12345.log");
        // Frames of 5 + 5 bytes; 100 bytes hold 10 of them.
        let mut log = TaskLog::create(&path, 100).unwrap();
        assert!(TaskLog::create(&path, 100).is_err(), "never reuses a log");
        for i in 0..35 {
            log.append(b'O', frame(i).as_bytes()).unwrap();
            let cur = std::fs::metadata(&path).unwrap().len();
            assert!(cur <= 100, "{cur}");
            assert_eq!(cur, log.len);
        }
        assert_eq!(log.rotations, 3);
        let rotated = crate::files::rotated(&path, 1);
        assert_eq!(std::fs::metadata(&rotated).unwrap().len(), 100);
        assert!(
            !crate::files::rotated(&path, 2).exists(),
            "one rotated file, replaced each time"
        );
        let mut r = ReaderState::new(Source::Finished(path.clone()));
        let (frames, how) = drain(&mut r);
        assert_eq!(how, "end");
        let want: String = (20..35).map(|i| format!("O:{}", frame(i))).collect();
        assert_eq!(
            text(&frames),
            want,
            ".1 then the current file: the last 15 frames"
        );

        // Deleting the task's logs takes the rotated one too.
        crate::files::remove_log(&path).unwrap();
        assert!(!path.exists() && !rotated.exists());
    }

    #[test]
    fn a_big_log_is_read_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-abc12345.log");
        let mut log = TaskLog::create(&path, TASK_LOG_MAX).unwrap();
        // 40 MiB of full-size frames: rotated twice, 32 MiB kept at most.
        let data = vec![b'x'; MAX_FRAME];
        let n = (40 << 20) / MAX_FRAME;
        for i in 0..n {
            let mut d = data.clone();
            d[..8].copy_from_slice(format!("{i:08}").as_bytes());
            log.append(if i % 2 == 0 { b'O' } else { b'E' }, &d)
                .unwrap();
        }
        assert_eq!(log.rotations, 2);
        let mut r = ReaderState::new(Source::Finished(path.clone()));
        let mut first = None;
        let mut last = None;
        let mut count = 0;
        let mut total = 0;
        loop {
            match r.step().unwrap() {
                Step::Frames(f) => {
                    let bytes = payload(&f);
                    assert!(bytes <= LOG_CHUNK + MAX_FRAME, "{bytes}");
                    assert!(r.buf.len() < MAX_FRAME + 5, "buffered {}", r.buf.len());
                    total += bytes;
                    for f in f {
                        let (Frame::Stdout(d) | Frame::Stderr(d)) = f else {
                            panic!("no end frame in a log")
                        };
                        let i: usize = std::str::from_utf8(&d[..8]).unwrap().parse().unwrap();
                        if let Some(prev) = last {
                            assert_eq!(i, prev + 1, "in order, none missing or repeated");
                        }
                        first.get_or_insert(i);
                        last = Some(i);
                        count += 1;
                    }
                }
                Step::Wait => panic!("a finished log never waits"),
                Step::End(end) => {
                    assert!(end.is_none());
                    break;
                }
            }
        }
        assert_eq!(last, Some(n - 1), "ends with the newest output");
        assert!(total as u64 <= 2 * TASK_LOG_MAX && total as u64 > TASK_LOG_MAX);
        assert_eq!(count, n - first.unwrap());
    }

    #[test]
    fn a_follower_sees_every_frame_once_across_rotations_then_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-abc12345.log");
        let shared = SharedLog::new(TaskLog::create(&path, 100).unwrap());
        for i in 0..5 {
            shared.lock().append(b'O', frame(i).as_bytes()).unwrap();
        }
        let mut r = ReaderState::new(Source::Follow(Arc::clone(&shared)));
        let mut seen = Vec::new();
        let mut next = 5;
        // The writer runs ahead by up to one rotation (13 frames) between reads.
        for burst in [0, 1, 7, 13, 3, 13, 0, 9] {
            for _ in 0..burst {
                shared.lock().append(b'E', frame(next).as_bytes()).unwrap();
                next += 1;
            }
            let (frames, how) = drain(&mut r);
            assert_eq!(how, "wait");
            seen.extend(frames);
        }
        assert!(shared.lock().rotations >= 4);
        let want: String = (0..next)
            .map(|i| format!("{}:{}", if i < 5 { "O" } else { "E" }, frame(i)))
            .collect();
        assert_eq!(text(&seen), want);

        // The end, after the last output.
        shared.lock().append(b'O', b"bye").unwrap();
        shared.lock().end = Some(("succeeded", Some(0)));
        match r.step().unwrap() {
            Step::Frames(f) => assert_eq!(text(&f), "O:bye"),
            _ => panic!("the last output comes before the end"),
        }
        assert!(matches!(
            r.step().unwrap(),
            Step::End(Some(("succeeded", Some(0))))
        ));
    }

    #[test]
    fn a_follower_far_behind_finishes_its_file_then_gets_the_newest_output_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-abc12345.log");
        let shared = SharedLog::new(TaskLog::create(&path, 100).unwrap());
        for i in 0..5 {
            shared.lock().append(b'O', frame(i).as_bytes()).unwrap();
        }
        let mut slow = ReaderState::new(Source::Follow(Arc::clone(&shared)));
        let (frames, _) = drain(&mut slow);
        assert_eq!(frames.len(), 5);
        // Three rotations: files of frames 0..9, 10..19, 20..29, and 30..39 (current).
        for i in 5..40 {
            shared.lock().append(b'O', frame(i).as_bytes()).unwrap();
        }
        assert_eq!(shared.lock().rotations, 3);
        let (frames, how) = drain(&mut slow);
        assert_eq!(how, "wait");
        // Its open file is read to its end though renamed and replaced; 10..19 were rotated
        // out; then `.1` and the current file.
        let want: String = (5..10)
            .chain(20..40)
            .map(|i| format!("O:{}", frame(i)))
            .collect();
        assert_eq!(text(&frames), want);
    }

    #[test]
    fn a_snapshot_stops_where_the_log_was_even_as_it_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-abc12345.log");
        let shared = SharedLog::new(TaskLog::create(&path, 100).unwrap());
        for i in 0..14 {
            shared.lock().append(b'O', frame(i).as_bytes()).unwrap();
        }
        let mut r = ReaderState::new(Source::Snapshot(Arc::clone(&shared)));
        r.open().unwrap();
        r.opened = true;
        // Two more rotations after the reader opened its files.
        for i in 14..40 {
            shared.lock().append(b'O', frame(i).as_bytes()).unwrap();
        }
        let (frames, how) = drain(&mut r);
        assert_eq!(how, "end");
        let want: String = (0..14).map(|i| format!("O:{}", frame(i))).collect();
        assert_eq!(text(&frames), want);
    }

    #[tokio::test]
    async fn a_follower_waits_for_output_without_holding_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-abc12345.log");
        let shared = SharedLog::new(TaskLog::create(&path, 1 << 20).unwrap());
        let mut reader = TaskLogReader::new(Source::Follow(Arc::clone(&shared)));
        let writer = {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                for i in 0..50 {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    // The log's lock is free: the follower waits on the watch, not on it.
                    shared.lock().append(b'O', frame(i).as_bytes()).unwrap();
                    shared.woken();
                }
                shared.lock().end = Some(("failed", Some(3)));
                shared.woken();
            })
        };
        let mut got = Vec::new();
        while let Some(frames) =
            tokio::time::timeout(std::time::Duration::from_secs(10), reader.next())
                .await
                .expect("the follower is woken")
                .unwrap()
        {
            got.extend(frames);
        }
        writer.await.unwrap();
        let want: String = (0..50).map(|i| format!("O:{}", frame(i))).collect();
        assert_eq!(text(&got), want);
        assert_eq!(reader.end(), Some(("failed", Some(3))));
        assert!(reader.next().await.unwrap().is_none());
    }
}
