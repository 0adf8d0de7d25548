//! The walking skeleton through the real binaries: `aether` → gRPC over a Unix socket →
//! `aetherd` → SQLite + libvirt's test driver.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use aether_tests::{field, TestEnv};

const WAIT: Duration = Duration::from_secs(20);

fn create_ws(env: &TestEnv, args: &[&str]) -> String {
    let mut all = vec!["workspace", "create"];
    all.extend_from_slice(args);
    let id = env.ok(&all).trim().to_owned();
    assert!(
        id.len() == 9
            && id.starts_with("ws-")
            && id[3..]
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "workspace id {id:?}"
    );
    id
}

#[test]
fn whole_lifecycle_through_the_cli() {
    let env = TestEnv::start();
    let pid = env.ok(&["project", "create", "my-app"]).trim().to_owned();
    assert!(
        pid.len() == 8 && pid.bytes().all(|b| b.is_ascii_hexdigit()),
        "{pid:?}"
    );
    env.ok(&["project", "use", "my-app"]);
    assert_eq!(env.ok(&["project", "current"]), "my-app\n");

    // --project defaults to the current project.
    let ws = create_ws(
        &env,
        &["--cpus", "2", "--memory", "4096", "--volume-size", "20"],
    );
    let list = env.ok(&["workspace", "list"]);
    let mut lines = list.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["ID", "PROJECT", "STATUS", "HARDWARE", "CREATED"]);
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row[..4], [ws.as_str(), "my-app", "stopped", "2cpu/4096mb"]);
    let date = row[4];
    assert!(
        date.len() == 10 && date.as_bytes()[4] == b'-' && date.as_bytes()[7] == b'-',
        "{date}"
    );
    assert_eq!(lines.next(), None);

    let out = env.ok(&["workspace", "start", &ws]);
    assert_eq!(out, format!("{ws} running\n"));
    assert_eq!(env.state_of(&ws), "running");

    let get = env.ok(&["workspace", "get", &ws]);
    assert_eq!(field(&get, "state").as_deref(), Some("running"), "{get}");
    assert!(
        field(&get, "project").unwrap().starts_with("my-app ("),
        "{get}"
    );
    assert!(
        field(&get, "hardware")
            .unwrap()
            .starts_with("2 cpu(s) (shared), 4096 MiB memory, 20 GiB volume"),
        "{get}"
    );
    assert_eq!(field(&get, "domain"), Some(format!("aether-{ws}")), "{get}");
    assert!(
        field(&get, "created").is_some() && field(&get, "ip addresses").is_some(),
        "{get}"
    );

    let out = env.ok(&["workspace", "stop", &ws]);
    assert_eq!(out, format!("{ws} stopped\n"));
    // Stopped again: start works a second time.
    env.ok(&["workspace", "start", &ws]);
    env.ok(&["workspace", "stop", &ws, "--force"]);
    assert_eq!(env.state_of(&ws), "stopped");

    env.ok(&["workspace", "delete", &ws]);
    assert_eq!(
        env.ok(&["workspace", "list"]).lines().count(),
        1,
        "only the header"
    );
    let err = env.fail(&["workspace", "get", &ws]);
    assert_eq!(err, format!("aether: workspace {ws} not found"));
    env.ok(&["project", "delete", "my-app"]);
    let err = env.fail(&["project", "current"]);
    assert!(err.contains("no current project"), "{err}");
}

#[test]
fn list_filters_by_status_and_project() {
    let env = TestEnv::start();
    env.ok(&["project", "create", "alpha"]);
    env.ok(&["project", "create", "beta"]);
    let a1 = create_ws(&env, &["--project", "alpha"]);
    let a2 = create_ws(&env, &["--project", "alpha"]);
    let b1 = create_ws(
        &env,
        &["--project", "beta", "--cpus", "1", "--memory", "512"],
    );
    env.ok(&["workspace", "start", &a2]);
    env.ok(&["workspace", "start", &b1]);

    let ids = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["workspace", "list"];
        all.extend_from_slice(args);
        let v = env.json(&all);
        let mut ids: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    let sorted = |mut v: Vec<&String>| {
        v.sort();
        v.into_iter().cloned().collect::<Vec<_>>()
    };
    assert_eq!(ids(&[]), sorted(vec![&a1, &a2, &b1]));
    assert_eq!(ids(&["--status", "running"]), sorted(vec![&a2, &b1]));
    assert_eq!(ids(&["--status", "stopped"]), vec![a1.clone()]);
    assert_eq!(ids(&["--project", "alpha"]), sorted(vec![&a1, &a2]));
    assert_eq!(
        ids(&["--project", "beta", "--status", "running"]),
        vec![b1.clone()]
    );
    assert!(ids(&["--project", "beta", "--status", "stopped"]).is_empty());

    // The table shows the project by name and the hardware short form.
    let table = env.ok(&[
        "workspace",
        "list",
        "--status",
        "running",
        "--project",
        "beta",
    ]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..4], [b1.as_str(), "beta", "running", "1cpu/512mb"]);

    let err = env.fail(&["workspace", "list", "--status", "paused"]);
    assert!(err.contains("invalid status \"paused\""), "{err}");
    let err = env.fail(&["workspace", "list", "--project", "nope"]);
    assert_eq!(err, "aether: project nope not found");
}

#[test]
fn json_output_uses_the_proto_field_names() {
    let env = TestEnv::start();
    let p = env.json(&["project", "create", "json-app"]);
    assert_eq!(p["name"], "json-app");
    let pid = p["id"].as_str().unwrap().to_owned();
    assert_eq!(env.json(&["project", "get", &pid])["name"], "json-app");
    assert_eq!(
        env.json(&["project", "list"])[0]["id"].as_str(),
        Some(pid.as_str())
    );
    assert_eq!(
        env.json(&["project", "use", "json-app"])["id"].as_str(),
        Some(pid.as_str())
    );
    assert_eq!(env.json(&["project", "current"])["name"], "json-app");

    let w = env.json(&[
        "workspace",
        "create",
        "--memory",
        "1024",
        "--cpu-kind",
        "performance",
    ]);
    let id = w["id"].as_str().unwrap().to_owned();
    assert_eq!(w["state"], "stopped");
    assert_eq!(w["project_id"].as_str(), Some(pid.as_str()));
    assert_eq!(w["project_name"], "json-app");
    assert_eq!(w["hardware"]["cpus"], 2);
    assert_eq!(w["hardware"]["memory_mb"], 1024);
    assert_eq!(w["hardware"]["volume_size_gb"], 20);
    assert_eq!(w["hardware"]["cpu_kind"], "performance");
    assert_eq!(w["domain_name"], format!("aether-{id}"));
    assert!(w["created_at"].as_i64().unwrap() > 1_700_000_000);
    assert!(w["pending_hardware"].is_null());

    let started = env.json(&["workspace", "start", &id]);
    assert_eq!(started["state"], "running");
    assert_eq!(env.json(&["workspace", "list"])[0]["state"], "running");
    let stopped = env.json(&["workspace", "stop", &id]);
    assert_eq!(stopped["state"], "stopped");
    let updated = env.json(&["workspace", "update", &id, "--cpus", "3"]);
    assert_eq!(updated["hardware"]["cpus"], 3);

    let host = env.json(&["host", "info"]);
    assert_eq!(host["accelerator"], "test");
    assert_eq!(host["libvirt_uri"].as_str(), Some(env.libvirt_uri.as_str()));
    assert_eq!(host["max_volume_size_gb"], 64);
    assert!(!host["libvirt_version"].as_str().unwrap().is_empty());
    assert!(!host["version"].as_str().unwrap().is_empty());

    let deleted = env.json(&["workspace", "delete", &id]);
    assert_eq!(deleted["id"].as_str(), Some(id.as_str()));
    assert_eq!(
        env.json(&["project", "delete", "json-app"])["id"].as_str(),
        Some(pid.as_str())
    );
}

#[test]
fn bad_input_gets_a_specific_error_and_changes_nothing() {
    let env = TestEnv::start();
    env.ok(&["project", "create", "app"]);
    let ws = create_ws(&env, &["--project", "app"]);
    let before = env.ok(&["workspace", "list"]);

    let cases: &[(&[&str], &str)] = &[
        (
            &["workspace", "create", "--project", "app", "--cpus", "0"],
            "cpus must be between 1 and 8 (got 0)",
        ),
        (
            &["workspace", "create", "--project", "app", "--cpus", "9"],
            "cpus must be between 1 and 8 (got 9)",
        ),
        (
            &["workspace", "create", "--project", "app", "--memory", "255"],
            "memory must be between 256 and 16384 MiB (got 255)",
        ),
        (
            &[
                "workspace",
                "create",
                "--project",
                "app",
                "--memory",
                "16385",
            ],
            "memory must be between 256 and 16384 MiB (got 16385)",
        ),
        (
            &[
                "workspace",
                "create",
                "--project",
                "app",
                "--volume-size",
                "0",
            ],
            "volume size must be between 1 and 64 GiB (got 0)",
        ),
        (
            &[
                "workspace",
                "create",
                "--project",
                "app",
                "--volume-size",
                "65",
            ],
            "volume size must be between 1 and 64 GiB (got 65)",
        ),
        (
            &[
                "workspace",
                "create",
                "--project",
                "app",
                "--cpu-kind",
                "turbo",
            ],
            "invalid cpu kind \"turbo\": expected shared or performance",
        ),
        (
            &[
                "workspace",
                "create",
                "--project",
                "app",
                "--gpu-kind",
                "h100",
            ],
            "unknown gpu kind \"h100\": this host has no GPUs",
        ),
        (
            &["workspace", "create", "--project", "nope"],
            "project nope not found",
        ),
        (
            &["workspace", "create", "--project", "Bad_Name"],
            "invalid project \"Bad_Name\": not a project id or name",
        ),
        (
            &["workspace", "create"],
            "no --project given and no current project",
        ),
        (
            &["workspace", "get", "ws-zzzzzz"],
            "workspace ws-zzzzzz not found",
        ),
        (
            &["workspace", "get", "../etc"],
            "invalid workspace id \"../etc\"",
        ),
        (
            &["workspace", "start", "ws-zzzzzz"],
            "workspace ws-zzzzzz not found",
        ),
        (
            &["workspace", "update", &ws, "--volume-size", "10"],
            "volume size can only grow: it is 20 GiB, requested 10 GiB",
        ),
        (
            &["workspace", "update", &ws, "--memory", "100"],
            "memory must be between 256 and 16384 MiB (got 100)",
        ),
        (
            &["project", "create", "a_b"],
            "invalid project name \"a_b\"",
        ),
        (
            &["project", "create", "UPPER"],
            "invalid project name \"UPPER\"",
        ),
        (&["project", "create", "app"], "project app already exists"),
        (
            &["project", "delete", "app"],
            "project app still has 1 workspace(s); delete them first",
        ),
        (
            &["project", "get", "deadbeef"],
            "project deadbeef not found",
        ),
        (&["project", "use", "nope"], "project nope not found"),
    ];
    for (args, want) in cases {
        let err = env.fail(args);
        assert!(
            err.starts_with("aether: ") && err.contains(want),
            "aether {args:?}: got {err:?}, want {want:?}"
        );
        assert_eq!(
            env.ok(&["workspace", "list"]),
            before,
            "aether {args:?} changed state"
        );
    }
    assert_eq!(env.json(&["project", "list"]).as_array().unwrap().len(), 1);

    // A request that is already satisfied succeeds and changes nothing (not even the
    // generation).
    let satisfied = |args: &[&str]| {
        let before = env.json(&["workspace", "get", &ws]);
        env.ok(args);
        let after = env.json(&["workspace", "get", &ws]);
        assert_eq!(
            (&after["state"], &after["generation"]),
            (&before["state"], &before["generation"]),
            "{args:?}"
        );
    };
    satisfied(&["workspace", "stop", &ws]);
    satisfied(&["workspace", "stop", &ws, "--force"]);

    // Wrong-state requests name the current state.
    env.ok(&["workspace", "start", &ws]);
    let running = env.ok(&["workspace", "list"]);
    satisfied(&["workspace", "start", &ws]);
    let err = env.fail(&["workspace", "delete", &ws]);
    assert!(
        err.contains("workspace is running: stop it first, or delete with --force"),
        "{err}"
    );
    assert_eq!(env.ok(&["workspace", "list"]), running);

    // A usage error is exit code 2, from clap.
    let r = env.run(&["workspace", "create", "--cpus", "many"]);
    assert_eq!(r.code, 2, "{r:?}");
}

#[test]
fn hardware_updates_apply_now_when_stopped_and_at_next_start_when_running() {
    let env = TestEnv::start();
    env.ok(&["project", "create", "hw"]);
    let ws = create_ws(&env, &["--project", "hw"]);

    let w = env.json(&[
        "workspace",
        "update",
        &ws,
        "--cpus",
        "4",
        "--volume-size",
        "30",
    ]);
    assert_eq!(w["hardware"]["cpus"], 4);
    assert_eq!(w["hardware"]["volume_size_gb"], 30);
    assert!(w["pending_hardware"].is_null());

    env.ok(&["workspace", "start", &ws]);
    let w = env.json(&["workspace", "update", &ws, "--memory", "8192"]);
    assert_eq!(
        w["hardware"]["memory_mb"], 2048,
        "running: unchanged for now"
    );
    assert_eq!(w["pending_hardware"]["memory_mb"], 8192);
    assert_eq!(w["pending_hardware"]["cpus"], 4);
    let get = env.ok(&["workspace", "get", &ws]);
    assert!(
        get.contains("pending:")
            && get.contains("8192 MiB")
            && get.contains("applied at next start"),
        "{get}"
    );
    assert_eq!(
        env.ok(&["workspace", "list"])
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .nth(3),
        Some("4cpu/2048mb")
    );

    env.ok(&["workspace", "stop", &ws]);
    env.ok(&["workspace", "start", &ws]);
    let w = env.json(&["workspace", "get", &ws]);
    assert_eq!(w["hardware"]["memory_mb"], 8192);
    assert!(w["pending_hardware"].is_null());
}

#[test]
fn delete_force_destroys_a_running_workspace() {
    let env = TestEnv::start();
    env.ok(&["project", "create", "f"]);
    let ws = create_ws(&env, &["--project", "f"]);
    env.ok(&["workspace", "start", &ws]);
    env.ok(&["workspace", "delete", &ws, "--force"]);
    assert!(env
        .json(&["workspace", "list"])
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn daemon_restart_keeps_all_state() {
    let mut env = TestEnv::start();
    env.ok(&["project", "create", "keep"]);
    env.ok(&["project", "create", "other"]);
    let stopped = create_ws(
        &env,
        &["--project", "keep", "--cpus", "3", "--memory", "3072"],
    );
    let running = create_ws(&env, &["--project", "other"]);
    env.ok(&["workspace", "start", &running]);
    env.ok(&["workspace", "update", &running, "--cpus", "6"]);
    let projects_before = env.json(&["project", "list"]);
    let stopped_before = env.json(&["workspace", "get", &stopped]);

    env.restart_daemon();

    assert_eq!(env.json(&["project", "list"]), projects_before);
    assert_eq!(env.json(&["workspace", "get", &stopped]), stopped_before);
    // The test driver forgets its domains when the daemon process exits, so the running
    // workspace is found powered off: reconcile records that, keeping pending changes.
    let w = env.json(&["workspace", "get", &running]);
    assert_eq!(w["state"], "stopped");
    assert_eq!(w["reason"], "found powered off when aetherd started");
    assert_eq!(w["pending_hardware"]["cpus"], 6);
    // Domains were defined again, so both start.
    env.ok(&["workspace", "start", &running]);
    env.ok(&["workspace", "start", &stopped]);
    assert_eq!(
        env.json(&["workspace", "get", &running])["hardware"]["cpus"],
        6
    );
    assert_eq!(env.json(&["workspace", "get", &running])["reason"], "");
    env.wait_for_state(&stopped, "running", WAIT);
}

#[test]
fn socket_is_0660_refuses_a_second_daemon_and_replaces_a_stale_one() {
    let mut env = TestEnv::start();
    let mode = std::fs::metadata(&env.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");

    let second = env.daemon_command().output().unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another aetherd is already serving"), "{err}");
    env.ok(&["project", "list"]);

    env.ok(&["project", "create", "survivor"]);
    env.kill_daemon();
    assert!(env.socket.exists(), "SIGKILL leaves the socket file behind");
    env.start_daemon();
    assert_eq!(
        env.json(&["project", "get", "survivor"])["name"],
        "survivor"
    );
}

#[test]
fn bad_config_is_refused_at_start() {
    let env = TestEnv::start();
    std::fs::write(&env.config, "max_volume_size_gb = \"lots\"\n").unwrap();
    let out = env.daemon_command().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid config file"), "{err}");
}

#[test]
fn cli_without_daemon_says_so() {
    let env = TestEnv::start();
    let r = env
        .cli()
        .env("AETHER_SOCKET", env.dir.path().join("nothing.sock"))
        .args(["workspace", "list"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("cannot connect to aetherd") && err.contains("is aetherd running?"),
        "{err}"
    );
}
