//! Task commands through the real binaries against the test driver. (The test driver has no
//! guest to run anything in: running tasks are covered by the end-to-end tests.)

use aether_tests::TestEnv;

#[test]
fn exec_is_refused_unless_running_and_validated_first() {
    let env = TestEnv::start();
    let ws = env.workspace_in_new_project("t");
    // Bad input is refused before anything happens: the stopped workspace is not started.
    let err = env.fail(&["workspace", "exec", &ws, "--env", "1BAD=x", "--", "true"]);
    assert!(
        err.contains("invalid environment variable \"1BAD\""),
        "{err}"
    );
    let r = env.run(&["workspace", "exec", &ws, "--env", "NOEQUALS", "--", "true"]);
    assert_eq!(r.code, 2, "{r:?}");
    let r = env.run(&["workspace", "exec", &ws]);
    assert_eq!(r.code, 2, "a command is required: {r:?}");
    let err = env.fail(&["workspace", "exec", "ws-zzzzzz", "--", "true"]);
    assert_eq!(err, "aether: workspace ws-zzzzzz not found");
    assert_eq!(env.state_of(&ws), "stopped");

    // A good request starts the stopped workspace first. The test driver has no guest, so
    // the daemon then refuses to connect anywhere (the real run is in tests/e2e.rs).
    let r = env.run(&["workspace", "exec", &ws, "--", "true"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains(&format!("{ws} is stopped: starting it")),
        "{r:?}"
    );
    assert!(
        r.stderr.ends_with(
            "aether: libvirt's test driver runs no guest: there is nothing to connect to\n"
        ),
        "{r:?}"
    );
    assert_eq!(env.state_of(&ws), "running");
    assert_eq!(env.json(&["task", "list"]), serde_json::json!([]));
    assert_eq!(
        env.ok(&["task", "list"]).trim(),
        "ID  WORKSPACE  STATE  EXIT  STARTED  COMMAND"
    );
}

#[test]
fn task_ids_are_validated_and_unknown_ones_not_found() {
    let env = TestEnv::start();
    let err = env.fail(&["task", "logs", "../etc/passwd"]);
    assert!(err.contains("invalid task id"), "{err}");
    let err = env.fail(&["task", "cancel", "task-zzzzzzzz"]);
    assert_eq!(err, "aether: task task-zzzzzzzz not found");
    let err = env.fail(&["task", "list", "--workspace", "ws-zzzzzz"]);
    assert_eq!(err, "aether: workspace ws-zzzzzz not found");
}

#[test]
fn exec_tty_is_validated_first_and_then_starts_the_workspace() {
    let env = TestEnv::start();
    let ws = env.workspace_in_new_project("t");
    let run_with_term = |term: &str, args: &[&str]| -> aether_tests::Run {
        env.cli()
            .env("TERM", term)
            .args(args)
            .output()
            .unwrap()
            .into()
    };
    // A TERM the guest could misread is refused, and nothing starts.
    let r = run_with_term(
        "xterm;reboot",
        &["workspace", "exec", "-t", &ws, "--", "true"],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("invalid TERM \"xterm;reboot\""), "{r:?}");
    let r = env.run(&[
        "workspace",
        "exec",
        "--tty",
        &ws,
        "--env",
        "1BAD=x",
        "--",
        "true",
    ]);
    assert!(
        r.stderr.contains("invalid environment variable \"1BAD\""),
        "{r:?}"
    );
    let r = env.run(&["workspace", "exec", "--tty", "--detach", &ws, "--", "true"]);
    assert_eq!(r.code, 2, "a terminal cannot be detached: {r:?}");
    let r = env.run(&["workspace", "exec", "-t", "-T", &ws, "--", "true"]);
    assert_eq!(r.code, 2, "--tty and --no-tty conflict: {r:?}");
    assert_eq!(env.state_of(&ws), "stopped");
    let err = env.fail(&["workspace", "exec", "-t", "ws-zzzzzz", "--", "true"]);
    assert_eq!(err, "aether: workspace ws-zzzzzz not found");

    // A good one starts it, then finds no guest to log in to; no task is made for it.
    let r = run_with_term(
        "xterm-256color",
        &["workspace", "exec", "-t", &ws, "--", "true"],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains(&format!("{ws} is stopped: starting it")),
        "{r:?}"
    );
    assert!(
        r.stderr.ends_with(
            "\naether: libvirt's test driver runs no guest: there is nothing to connect to\n"
        ),
        "{r:?}"
    );
    assert_eq!(env.state_of(&ws), "running");
    assert_eq!(env.json(&["task", "list"]), serde_json::json!([]));
    // The failed attempt left no connection counted.
    assert_eq!(
        env.json(&["workspace", "get", &ws])["active_connections"],
        0
    );
}
