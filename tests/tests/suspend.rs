//! Suspend and resume against libvirt's test driver, which saves and restores domains for
//! real (to a file of its own format): `stop --suspend` keeps a memory image in the state
//! dir, the next start resumes from it (phase `resuming`) and removes it, and whatever makes
//! the image stale (a plain stop, a hardware change, delete) removes it too. The idle
//! timeout suspends by default. A real guest's resume is in `e2e.rs`.

use std::time::Duration;

use aether_tests::TestEnv;

fn image(env: &TestEnv, ws: &str) -> std::path::PathBuf {
    env.state_dir.join("memory").join(format!("{ws}.save"))
}

fn suspended(env: &TestEnv, ws: &str) -> (bool, u64) {
    let w = env.json(&["workspace", "get", ws]);
    (
        w["suspended"].as_bool().unwrap(),
        w["memory_image_bytes"].as_u64().unwrap(),
    )
}

#[test]
fn a_suspended_workspace_resumes_from_its_memory_image_and_loses_it() {
    use std::os::unix::fs::PermissionsExt;
    let env = TestEnv::start();
    env.ok(&["project", "create", "p"]);
    let ws = env.create_small_workspace("p", &[]);
    env.ok(&["workspace", "start", &ws]);
    let r = env.run(&["workspace", "stop", &ws, "--suspend", "--force"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("cannot be used with"), "{r:?}");
    let out = env.ok(&["workspace", "stop", &ws, "--suspend"]);
    assert!(out.contains("stopped"), "{out}");
    let w = env.json(&["workspace", "get", &ws]);
    assert_eq!(w["state"], "stopped");
    assert_eq!(w["reason"], "suspended");
    let (yes, bytes) = suspended(&env, &ws);
    assert!(yes);
    let meta = std::fs::metadata(image(&env, &ws)).expect("the memory image exists");
    assert_eq!(bytes, meta.len());
    assert_eq!(
        meta.permissions().mode() & 0o077,
        0,
        "only root reads guest memory"
    );
    let listed = env.ok(&["workspace", "list"]);
    assert!(listed.contains("stopped (suspended)"), "{listed}");
    assert!(env.ok(&["workspace", "get", &ws]).contains("suspended:"));

    // The start resumes it: phase `resuming`, and the image is gone once it runs.
    let watch = env
        .cli()
        .args(["workspace", "watch", &ws])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    env.ok(&["workspace", "start", &ws]);
    std::thread::sleep(Duration::from_millis(300));
    let mut watch = watch;
    let _ = watch.kill();
    let seen = String::from_utf8(watch.wait_with_output().unwrap().stdout).unwrap();
    assert!(seen.contains("starting (resuming)"), "{seen}");
    assert!(
        !seen.contains("starting (booting)"),
        "a resume, not a boot: {seen}"
    );
    assert_eq!(env.state_of(&ws), "running");
    assert_eq!(suspended(&env, &ws), (false, 0));
    assert!(!image(&env, &ws).exists());

    // Suspending a stopped workspace changes nothing; a plain stop of a suspended one
    // discards its image, so the next start boots.
    env.ok(&["workspace", "stop", &ws, "--suspend"]);
    assert!(suspended(&env, &ws).0);
    env.ok(&["workspace", "stop", &ws, "--suspend"]);
    assert!(suspended(&env, &ws).0);
    env.ok(&["workspace", "stop", &ws]);
    assert_eq!(suspended(&env, &ws), (false, 0));
    assert!(!image(&env, &ws).exists());
}

#[test]
fn what_makes_a_memory_image_stale_removes_it() {
    let env = TestEnv::start();
    env.ok(&["project", "create", "p"]);
    let ws = env.create_small_workspace("p", &[]);
    env.ok(&["workspace", "start", &ws]);
    env.ok(&["workspace", "stop", &ws, "--suspend"]);
    // New hardware: the saved guest had the old, so it boots afresh.
    env.ok(&["workspace", "update", &ws, "--cpus", "1"]);
    assert_eq!(suspended(&env, &ws), (false, 0));

    // Hardware changed while it ran (pending): the start after the suspend boots afresh and
    // says why.
    env.ok(&["workspace", "start", &ws]);
    env.ok(&["workspace", "update", &ws, "--memory", "512"]);
    env.ok(&["workspace", "stop", &ws, "--suspend"]);
    assert!(suspended(&env, &ws).0);
    env.ok(&["workspace", "start", &ws]);
    let w = env.json(&["workspace", "get", &ws]);
    assert_eq!(w["state"], "running");
    assert_eq!(w["hardware"]["memory_mb"], 512);
    let reason = w["reason"].as_str().unwrap();
    assert!(
        reason.contains("memory image was discarded") && reason.contains("hardware changed"),
        "{reason}"
    );
    assert!(!image(&env, &ws).exists());

    // Delete removes it with the rest.
    env.ok(&["workspace", "stop", &ws, "--suspend"]);
    assert!(image(&env, &ws).exists());
    env.ok(&["workspace", "delete", &ws]);
    assert!(!image(&env, &ws).exists());
}

#[test]
fn the_idle_timeout_suspends_unless_configured_to_shut_down() {
    let env = TestEnv::start();
    env.ok(&["project", "create", "p"]);
    let ws = env.create_small_workspace("p", &["--idle-timeout", "1s"]);
    env.ok(&["workspace", "start", &ws]);
    env.wait_for_state(&ws, "stopped", Duration::from_secs(20));
    let w = env.json(&["workspace", "get", &ws]);
    assert_eq!(w["reason"], "idle timeout");
    assert_eq!(w["suspended"], true, "{w}");

    let env = TestEnv::start_on_host(aether_tests::TEST_HOST_XML, "idle_action = \"shutdown\"\n");
    env.ok(&["project", "create", "p"]);
    let ws = env.create_small_workspace("p", &["--idle-timeout", "1s"]);
    env.ok(&["workspace", "start", &ws]);
    env.wait_for_state(&ws, "stopped", Duration::from_secs(20));
    let w = env.json(&["workspace", "get", &ws]);
    assert_eq!(w["reason"], "idle timeout");
    assert_eq!(w["suspended"], false, "{w}");
}

#[test]
fn a_memory_image_no_workspace_owns_is_removed_at_start() {
    let mut env = TestEnv::start();
    env.ok(&["project", "create", "p"]);
    let ws = env.create_small_workspace("p", &[]);
    env.ok(&["workspace", "start", &ws]);
    env.ok(&["workspace", "stop", &ws, "--suspend"]);
    let orphan = env.state_dir.join("memory").join("ws-zzzzzz.save");
    std::fs::copy(image(&env, &ws), &orphan).unwrap();
    let unrelated = env.state_dir.join("memory").join("notes.txt");
    std::fs::write(&unrelated, "left alone").unwrap();
    env.restart_daemon();
    env.ok(&["workspace", "list"]);
    assert!(!orphan.exists(), "the orphan image was kept");
    assert!(
        unrelated.exists(),
        "a file that is no memory image was removed"
    );
    assert!(image(&env, &ws).exists(), "the owned image went");
    assert!(suspended(&env, &ws).0);
}
