//! Benchmark: `aether workspace create` time against image size.
//!
//! A workspace's root volume is a qcow2 overlay on the image, so creating one must not copy
//! the image: the time should be the same for a small and a 32x larger image. This prints the
//! median create time for each and their ratio (about 1.0 when nothing is copied; a copy
//! would push it toward 32).
//!
//! Needs the end-to-end environment (root, a libvirtd in this network namespace); run by
//! `scripts/e2e.sh` after the tests. Images hold real (non-zero) data, so a copy would cost.

use std::io::Write;
use std::time::Instant;

use aether_tests::{median, TestEnv};

const RUNS: usize = 5;

fn filled_raw(env: &TestEnv, name: &str, mib: usize) -> std::path::PathBuf {
    let path = env.dir.path().join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    path
}

fn main() {
    let env = TestEnv::start_real("");
    env.ok(&["project", "create", "bench"]);
    let sizes = [(64usize, "small"), (2048, "large")];
    let mut medians = Vec::new();
    for (mib, name) in sizes {
        let raw = filled_raw(&env, &format!("{name}.img"), mib);
        env.ok(&["image", "import", name, raw.to_str().unwrap()]);
        std::fs::remove_file(&raw).unwrap();
        let mut times = Vec::new();
        for _ in 0..RUNS {
            let t = Instant::now();
            let id = env.ok(&[
                "workspace",
                "create",
                "--project",
                "bench",
                "--image",
                name,
                "--volume-size",
                "4",
            ]);
            times.push(t.elapsed());
            env.ok(&["workspace", "delete", id.trim()]);
        }
        let m = median(times.clone());
        println!(
            "workspace create, {mib:>5} MiB image: median {:>7.1} ms over {RUNS} runs (min {:.1}, max {:.1})",
            m.as_secs_f64() * 1e3,
            times.iter().min().unwrap().as_secs_f64() * 1e3,
            times.iter().max().unwrap().as_secs_f64() * 1e3,
        );
        medians.push(m);
    }
    println!(
        "ratio large/small: {:.2} (image size ratio {})",
        medians[1].as_secs_f64() / medians[0].as_secs_f64(),
        sizes[1].0 / sizes[0].0
    );
}
