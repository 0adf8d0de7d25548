//! `aether doctor` against the real daemon (libvirt's test driver): every check has its
//! line, the exit code follows the worst of them, and each way of not reaching the daemon
//! (no socket, a dead one, no group, a group not active yet) names its own fix.

use std::process::{Command, Stdio};

use aether_tests::{bin_dir, test_users, TestEnv, ALICE, EVE};
use serde_json::Value;

/// The checks of `aether -o json doctor` by name, and the exit code.
fn checks(env: &TestEnv) -> (Vec<(String, String, String, String)>, i32) {
    let r = env.run(&["-o", "json", "doctor"]);
    let list: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    let field = |c: &Value, k: &str| c[k].as_str().unwrap().to_owned();
    let checks = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                field(c, "name"),
                field(c, "severity"),
                field(c, "detail"),
                field(c, "hint"),
            )
        })
        .collect();
    (checks, r.code)
}

#[test]
fn every_check_has_a_line_and_the_exit_code_follows_the_worst() {
    let env = TestEnv::start();
    // The test config's default_image is "tiny": gone, creates without --image fail.
    env.ok(&["image", "delete", "tiny"]);
    let (list, code) = checks(&env);
    let names: Vec<&str> = list.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "daemon",
            "libvirt",
            "accelerator",
            "pool",
            "network",
            "default-image",
            "ssh",
            "ssh-key"
        ],
        "{list:?}"
    );
    let get = |name: &str| list.iter().find(|c| c.0 == name).unwrap();
    assert_eq!(get("daemon").1, "ok", "{list:?}");
    assert!(get("daemon").2.starts_with("aetherd "), "{list:?}");
    assert_eq!(get("libvirt").1, "ok", "{list:?}");
    assert!(get("libvirt").2.contains("test:///"), "{list:?}");
    // The test driver runs no VM: worth a warning, not a failure.
    assert_eq!(get("accelerator").1, "warn", "{list:?}");
    assert!(get("accelerator").3.contains("qemu:///system"), "{list:?}");
    assert!(get("pool").2.contains(" GiB free in "), "{list:?}");
    assert_eq!(get("network").1, "ok", "{list:?}");
    assert_eq!(get("default-image").1, "fail", "{list:?}");
    assert!(
        get("default-image").3.contains("aether image import tiny"),
        "{list:?}"
    );
    assert_eq!(code, 1, "a failed check fails the command");
    for (_, severity, _, hint) in &list {
        assert_eq!(severity == "ok", hint.is_empty(), "{list:?}");
    }

    env.ok(&[
        "image",
        "import",
        "tiny",
        env.make_disk("tiny", "qcow2", "64M").to_str().unwrap(),
    ]);
    let (list, code) = checks(&env);
    let image = list.iter().find(|c| c.0 == "default-image").unwrap();
    assert_eq!(image.1, "ok", "{list:?}");
    let failed = list.iter().any(|c| c.1 == "fail");
    assert_eq!(code, i32::from(failed), "{list:?}");

    // The table: one line per check, a fix under each that is not ok.
    let text = env.run(&["doctor"]).stdout;
    assert!(
        text.lines().any(|l| l.starts_with("ok    daemon ")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("WARN  accelerator ")),
        "{text}"
    );
    assert!(
        text.contains("-> point libvirt_uri at qemu:///system"),
        "{text}"
    );
}

#[test]
fn no_daemon_says_how_to_start_one() {
    let env = TestEnv::start();
    let dir = tempfile::tempdir().unwrap();
    let doctor = |socket: &std::path::Path| {
        let out = Command::new(bin_dir().join("aether"))
            .args(["doctor"])
            .env("AETHER_SOCKET", socket)
            .env("HOME", env.dir.path())
            .env("XDG_CONFIG_HOME", env.dir.path().join("config"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8(out.stdout).unwrap())
    };
    let missing = dir.path().join("aetherd.sock");
    let (code, text) = doctor(&missing);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.starts_with(&format!(
            "FAIL  daemon         no aetherd socket at {}",
            missing.display()
        )),
        "{text}"
    );
    assert!(
        text.contains("-> start aetherd: sudo systemctl start aetherd"),
        "{text}"
    );
    // A socket file nobody listens on (a daemon that died).
    drop(std::os::unix::net::UnixListener::bind(&missing).unwrap());
    let (code, text) = doctor(&missing);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.starts_with(&format!(
            "FAIL  daemon         nothing answers on {}",
            missing.display()
        )),
        "{text}"
    );
    // The client's own checks still run.
    assert!(text.lines().any(|l| l.starts_with("ok    ssh ")), "{text}");
}

#[test]
fn a_user_outside_group_aether_is_told_to_join_it_or_to_log_in_again() {
    if !test_users() {
        return;
    }
    let env = TestEnv::start();
    let r = env.run_as(EVE, &["doctor"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout
            .starts_with("FAIL  daemon         permission denied on "),
        "{r:?}"
    );
    assert!(
        r.stderr
            .starts_with("aether: doctor: daemon: permission denied on "),
        "{r:?}"
    );
    assert!(
        r.stdout.contains(&format!(
            "-> join group aether: sudo usermod -aG aether {EVE}, then log in again"
        )),
        "{r:?}"
    );
    // A member whose session does not have the group yet (added after logging in).
    let out = Command::new("setpriv")
        .args(["--reuid", ALICE, "--regid", ALICE, "--clear-groups", "--"])
        .arg(bin_dir().join("aether"))
        .arg("doctor")
        .env("AETHER_SOCKET", &env.socket)
        .env("HOME", env.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("-> you are in group aether, but this login session is not yet: log in again (or run newgrp aether)"), "{text}");
    // With the group, the daemon answers.
    let r = env.run_as(ALICE, &["doctor"]);
    assert!(r.stdout.starts_with("ok    daemon "), "{r:?}");
}
