//! End-to-end suspend and resume of a real guest (the test guest under TCG): what lives only
//! in the guest's memory (its root is an initramfs, so a file in /tmp is RAM) and a process
//! it runs are still there after `stop --suspend` and `start`, and the clock since boot went
//! on instead of starting again. Prints how long the suspend, the resume and a cold start of
//! the same workspace took (figures, not assertions). Run by `scripts/e2e.sh`.

use std::time::{Duration, Instant};

use aether_tests::e2e::testguest_env;

#[test]
#[ignore = "end-to-end: run by scripts/e2e.sh"]
fn a_resumed_guest_keeps_its_memory_and_processes() {
    let env = testguest_env("");
    let ws = env.create_workspace(
        "e2e",
        &["--cpus", "1", "--memory", "512", "--volume-size", "2"],
    );
    let t = Instant::now();
    env.ok(&["workspace", "start", &ws]);
    let cold = t.elapsed();
    let sh = |cmd: &str| env.ok(&["workspace", "ssh", &ws, "--", cmd]);
    sh("echo only-in-memory > /tmp/marker");
    // Its own session, so the end of this SSH session does not take it along.
    let pid = sh("setsid sleep 3600 </dev/null >/dev/null 2>&1 & echo $!")
        .trim()
        .to_owned();
    assert!(pid.parse::<u32>().is_ok(), "{pid:?}");
    assert_eq!(sh(&format!("kill -0 {pid} && echo alive")).trim(), "alive");
    let boot_id = sh("cat /proc/sys/kernel/random/boot_id");

    let t = Instant::now();
    env.ok(&["workspace", "stop", &ws, "--suspend"]);
    let suspend = t.elapsed();
    let w = env.json(&["workspace", "get", &ws]);
    assert_eq!(w["state"], "stopped");
    assert_eq!(w["suspended"], true, "{w}");
    let bytes = w["memory_image_bytes"].as_u64().unwrap();
    assert!(bytes > 1 << 20, "a memory image of {bytes} bytes");
    assert_eq!(
        env.virsh(&["domstate", &format!("aether-{ws}")]).trim(),
        "shut off"
    );

    let t = Instant::now();
    env.ok(&["workspace", "start", &ws]);
    let resume = t.elapsed();
    assert_eq!(sh("cat /tmp/marker").trim(), "only-in-memory");
    assert_eq!(sh(&format!("kill -0 {pid} && echo alive")).trim(), "alive");
    assert_eq!(
        sh("cat /proc/sys/kernel/random/boot_id"),
        boot_id,
        "it booted again"
    );
    let w = env.json(&["workspace", "get", &ws]);
    assert_eq!(w["suspended"], false);
    assert_eq!(w["reason"], "");
    assert!(!env.state_dir.join(format!("memory/{ws}.save")).exists());

    // A plain stop is a shutdown: the next start boots, and the RAM file is gone.
    env.ok(&["workspace", "stop", &ws]);
    assert_eq!(env.json(&["workspace", "get", &ws])["suspended"], false);
    env.ok(&["workspace", "start", &ws]);
    assert_ne!(sh("cat /proc/sys/kernel/random/boot_id"), boot_id);
    assert_eq!(
        sh("cat /tmp/marker 2>/dev/null || echo gone").trim(),
        "gone"
    );
    env.ok(&["workspace", "delete", &ws, "--force"]);

    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "figures (512 MiB test guest, TCG): cold start {:.2} s, suspend {:.2} s ({} MiB image), resume {:.2} s = {:.2}x the cold start",
        secs(cold),
        secs(suspend),
        bytes >> 20,
        secs(resume),
        secs(resume) / secs(cold)
    );
}
