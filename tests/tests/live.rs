//! Idle auto-stop and live status through the real binaries (libvirt test driver: no guest,
//! so no connections; end-to-end tests cover connections to real guests).

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use aether_tests::{field, TestEnv};

fn setup() -> (TestEnv, String) {
    let env = TestEnv::start();
    env.ok(&["project", "create", "live"]);
    let ws = env
        .ok(&["workspace", "create", "--project", "live"])
        .trim()
        .to_owned();
    (env, ws)
}

#[test]
fn an_idle_workspace_is_stopped_after_its_timeout_with_the_reason() {
    let (env, ws) = setup();
    env.ok(&["workspace", "update", &ws, "--idle-timeout", "2s"]);
    let before = env.json(&["workspace", "get", &ws]);
    assert_eq!(before["idle_timeout_secs"], 2);
    assert_eq!(before["idle_since"], 0, "not running: no idle clock");
    env.ok(&["workspace", "start", &ws]);
    let w = env.json(&["workspace", "get", &ws]);
    let since = w["idle_since"].as_i64().unwrap();
    assert!(since > 0, "{w}");
    assert_eq!(w["stops_at"].as_i64().unwrap(), since + 2);
    assert_eq!(w["active_connections"], 0);
    assert_eq!(w["running_tasks"], 0);
    let get = env.ok(&["workspace", "get", &ws]);
    assert!(
        field(&get, "idle since").is_some() && field(&get, "stops at").is_some(),
        "{get}"
    );
    assert_eq!(field(&get, "idle timeout").as_deref(), Some("2s"), "{get}");
    assert_eq!(field(&get, "connections").as_deref(), Some("0"), "{get}");

    env.wait_for_state(&ws, "stopped", Duration::from_secs(20));
    let w = env.json(&["workspace", "get", &ws]);
    assert_eq!(w["reason"], "idle timeout", "{w}\n{}", env.daemon_log());
    assert_eq!(w["idle_since"], 0, "the clock is cleared once stopped");
}

#[test]
fn zero_means_never_and_bad_durations_are_refused() {
    let (env, ws) = setup();
    let err = env.fail(&["workspace", "update", &ws, "--idle-timeout", "10d"]);
    assert!(err.contains("invalid duration \"10d\""), "{err}");
    let err = env.fail(&[
        "workspace",
        "create",
        "--project",
        "live",
        "--image",
        "no-such-image",
        "--idle-timeout",
        "x",
    ]);
    // Bad input is named before anything is looked up.
    assert!(err.contains("invalid duration \"x\""), "{err}");
    assert_eq!(
        env.json(&["workspace", "list"]).as_array().unwrap().len(),
        1
    );

    let never = env
        .ok(&[
            "workspace",
            "create",
            "--project",
            "live",
            "--idle-timeout",
            "0",
        ])
        .trim()
        .to_owned();
    env.ok(&["workspace", "start", &never]);
    let w = env.json(&["workspace", "get", &never]);
    assert_eq!(w["idle_timeout_secs"], 0);
    assert!(
        w["idle_since"].as_i64().unwrap() > 0,
        "idle, but never stopped for it"
    );
    assert_eq!(w["stops_at"], 0);
    let get = env.ok(&["workspace", "get", &never]);
    assert_eq!(
        field(&get, "idle timeout").as_deref(),
        Some("never"),
        "{get}"
    );
}

#[test]
fn watch_streams_a_snapshot_then_every_transition_in_order() {
    let (env, ws) = setup();
    let mut child = env
        .cli()
        .args(["-o", "json", "workspace", "watch", &ws])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["kind"], "snapshot");
    assert_eq!(first["workspace"]["state"], "stopped");

    env.ok(&["workspace", "start", &ws]);
    env.ok(&["workspace", "stop", &ws]);
    let mut seqs = vec![first["seq"].as_u64().unwrap()];
    let mut states = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !states.ends_with(&["stopped".to_owned()]) || states.len() < 2 {
        assert!(Instant::now() < deadline, "states so far: {states:?}");
        let line = lines.next().unwrap().unwrap();
        let e: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(e["kind"], "changed", "{line}");
        seqs.push(e["seq"].as_u64().unwrap());
        let state = e["workspace"]["state"].as_str().unwrap().to_owned();
        if states.last() != Some(&state) {
            states.push(state);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequence numbers increase: {seqs:?}"
    );
    assert_eq!(states, ["starting", "running", "stopping", "stopped"]);
}

#[test]
fn watch_of_a_project_shows_creation_and_deletion() {
    let (env, ws) = setup();
    let mut child = env
        .cli()
        .args(["workspace", "watch", "--project", "live"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let snap = lines.next().unwrap().unwrap();
    assert!(
        snap.contains("snapshot") && snap.contains(&ws) && snap.contains("stopped"),
        "{snap}"
    );
    let other = env
        .ok(&["workspace", "create", "--project", "live"])
        .trim()
        .to_owned();
    env.ok(&["workspace", "delete", &other]);
    let created = lines.next().unwrap().unwrap();
    assert!(
        created.contains("changed") && created.contains(&other),
        "{created}"
    );
    let deleted = lines.next().unwrap().unwrap();
    assert!(
        deleted.contains("deleted") && deleted.contains(&other),
        "{deleted}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
