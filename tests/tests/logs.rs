//! Log reads through the real binaries against the test driver: however large a log is on
//! disk, one read returns (and the daemon holds) at most 1 MiB of it.

use std::io::{Seek, SeekFrom, Write};

use aether_tests::TestEnv;

const MIB: u64 = 1 << 20;

/// A `kB` field (`VmRSS`, `VmHWM`) of /proc/PID/status, in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Numbered lines, `len` bytes from line `from`.
fn lines(from: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 32);
    let mut i = from;
    while v.len() < len {
        v.extend_from_slice(format!("console line {i:010}\n").as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

#[test]
fn console_log_reads_are_capped_and_read_only_the_tail() {
    let env = TestEnv::start();
    let ws = env.workspace_in_new_project("t");
    // 512 MiB: a sparse head (what a guest printing for weeks leaves) and 4 MiB of lines.
    let path = env.state_dir.join("console").join(format!("{ws}.log"));
    let tail = lines(0, (4 * MIB) as usize);
    let mut f = std::fs::File::create(&path).unwrap();
    let size = 512 * MIB;
    f.set_len(size - tail.len() as u64).unwrap();
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(&tail).unwrap();
    drop(f);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size);

    let pid = env.daemon_pid().unwrap();
    let before = status_bytes(pid, "VmRSS");

    // More than the cap is refused, naming it: the daemon reads nothing.
    for n in ["4294967295", "536870912", "1048577"] {
        let err = env.fail(&["workspace", "logs", &ws, "--console", "--bytes", n]);
        assert!(
            err.contains(&format!("max_bytes {n} is too large"))
                && err.contains("at most 1048576 bytes"),
            "{err}"
        );
    }

    // Up to the cap: exactly the tail.
    let out = env.ok(&["workspace", "logs", &ws, "--console", "--bytes", "100"]);
    assert_eq!(out.as_bytes(), &tail[tail.len() - 100..]);
    let out = env.ok(&["workspace", "logs", &ws, "--console", "--bytes", "1048576"]);
    assert_eq!(out.as_bytes(), &tail[tail.len() - MIB as usize..]);
    // The default is 64 KiB.
    let out = env.ok(&["workspace", "logs", &ws, "--console"]);
    assert_eq!(out.as_bytes(), &tail[tail.len() - 65536..]);

    // Serving all that never took the daemon near the file's size.
    let peak = status_bytes(pid, "VmHWM");
    let now = status_bytes(pid, "VmRSS");
    eprintln!(
        "aetherd resident: {} MiB before the reads, peak {} MiB, {} MiB after",
        before / MIB,
        peak / MIB,
        now / MIB
    );
    assert!(
        peak < 200 * MIB,
        "aetherd peaked at {} MiB resident (was {} MiB before the reads, {} MiB after)",
        peak / MIB,
        before / MIB,
        now / MIB
    );
}

#[test]
fn console_log_tail_continues_into_the_rotated_file() {
    let env = TestEnv::start();
    let ws = env.workspace_in_new_project("t");
    // As virtlogd leaves it just after a rotation: the recent past in `.0`, little in the
    // current file.
    let dir = env.state_dir.join("console");
    std::fs::write(dir.join(format!("{ws}.log.1")), "oldest\n").unwrap();
    std::fs::write(dir.join(format!("{ws}.log.0")), "booting\nready\n").unwrap();
    std::fs::write(dir.join(format!("{ws}.log")), "login: ").unwrap();
    assert_eq!(
        env.ok(&["workspace", "logs", &ws, "--console", "--bytes", "13"]),
        "ready\nlogin: "
    );
    assert_eq!(
        env.ok(&["workspace", "logs", &ws, "--console"]),
        "oldest\nbooting\nready\nlogin: "
    );
}
