//! Benchmark: what many workspaces cost the daemon.
//!
//! Against libvirt's test driver (no root, no guests), this creates and starts workspaces in
//! two steps (10, then 80 in all: the test driver's storage pool holds 100 GiB) and prints, at each step:
//! - the median time of `aether workspace create` and of `aether workspace list -o json` (a
//!   full CLI round trip), and the list time's growth between the steps;
//! - the daemon's resident memory (VmRSS), and what each workspace adds to it;
//! - the daemon's CPU use while all of them are running and idle: idle timers are timers, not
//!   polling loops, so this should be about zero.
//!
//! Run by `scripts/test.sh` after the tests; `cargo run -p aether-tests --bin bench-scale`
//! (after `cargo build --workspace`) runs it alone.

use std::time::{Duration, Instant};

use aether_tests::{host_xml, median, TestEnv};

const STEPS: [usize; 2] = [10, 80];
const LIST_RUNS: usize = 15;
const IDLE_WINDOW: Duration = Duration::from_secs(10);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A `/proc/PID/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// User + system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_sec() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn main() {
    // Room for every workspace running with 1 CPU and 256 MiB.
    let env = TestEnv::start_on_host(&host_xml(8, 1 << 20), "");
    let pid = env.daemon_pid().expect("daemon running");
    env.ok(&["project", "create", "bench"]);
    let base_rss = status_kib(pid, "VmRSS:");
    println!("daemon at start: {base_rss} KiB resident");

    let mut created = 0;
    let mut create_times = Vec::new();
    let mut list_medians = Vec::new();
    for target in STEPS {
        while created < target {
            let t = Instant::now();
            let id = env.ok(&[
                "workspace",
                "create",
                "--project",
                "bench",
                "--cpus",
                "1",
                "--memory",
                "256",
                "--volume-size",
                "1",
            ]);
            create_times.push(t.elapsed());
            // Waits until it runs, so every list below sees all of them running.
            env.ok(&["workspace", "start", id.trim()]);
            created += 1;
        }
        let mut list_times = Vec::new();
        for _ in 0..LIST_RUNS {
            let t = Instant::now();
            let list = env.json(&["workspace", "list", "--status", "running"]);
            list_times.push(t.elapsed());
            assert_eq!(list.as_array().unwrap().len(), target, "all running");
        }
        let list = median(list_times);
        list_medians.push(list);
        let rss = status_kib(pid, "VmRSS:");
        println!(
            "{target:>4} workspaces: create median {:.1} ms, list median {:.1} ms, daemon {rss} KiB resident ({:.1} KiB per workspace)",
            ms(median(create_times.clone())),
            ms(list),
            rss.saturating_sub(base_rss) as f64 / target as f64,
        );
    }
    println!(
        "list time ratio {}/{}: {:.2} (workspace ratio {})",
        STEPS[1],
        STEPS[0],
        list_medians[1].as_secs_f64() / list_medians[0].as_secs_f64(),
        STEPS[1] / STEPS[0]
    );

    // Idle: every workspace has an armed idle timer; nothing should run until one fires.
    let hz = clock_ticks_per_sec();
    let before = cpu_ticks(pid);
    std::thread::sleep(IDLE_WINDOW);
    let used = cpu_ticks(pid) - before;
    println!(
        "idle daemon with {} running workspaces: {} ms CPU in {} s ({:.3}% of one CPU)",
        STEPS[1],
        used * 1000 / hz,
        IDLE_WINDOW.as_secs(),
        used as f64 / hz as f64 / IDLE_WINDOW.as_secs_f64() * 100.0
    );
}
