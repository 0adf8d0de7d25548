//! Host capacity at start: vCPUs and memory (test driver host with 2 CPUs and 4 GiB).

use aether_tests::{host_xml, TestEnv};

fn env(extra: &str) -> TestEnv {
    let env = TestEnv::start_on_host(&host_xml(2, 4096), extra);
    env.ok(&["project", "create", "cap"]);
    env
}

fn create(env: &TestEnv, args: &[&str]) -> String {
    let mut all = vec!["workspace", "create", "--project", "cap"];
    all.extend_from_slice(args);
    env.ok(&all).trim().to_owned()
}

#[test]
fn more_vcpus_than_the_host_has_is_refused_at_start() {
    let env = env("");
    let ws = create(&env, &["--cpus", "4"]);
    let err = env.fail(&["workspace", "start", &ws]);
    assert_eq!(
        err,
        format!("aether: workspace {ws} needs 4 vCPUs but this host has 2 CPUs")
    );
    assert_eq!(env.state_of(&ws), "stopped", "nothing changed");
    // A pending change counts: it is what the next start would use.
    let ok = create(&env, &["--cpus", "2", "--memory", "512"]);
    env.ok(&["workspace", "start", &ok]);
    env.ok(&["workspace", "update", &ok, "--cpus", "3"]);
    env.ok(&["workspace", "stop", &ok]);
    let err = env.fail(&["workspace", "start", &ok]);
    assert!(
        err.contains("needs 3 vCPUs but this host has 2 CPUs"),
        "{err}"
    );
}

#[test]
fn memory_of_running_workspaces_is_capped_by_the_overcommit_limit() {
    let env = env("");
    let a = create(&env, &["--memory", "3072"]);
    let b = create(&env, &["--memory", "1024"]);
    let c = create(&env, &["--memory", "256"]);
    env.ok(&["workspace", "start", &a]);
    env.ok(&["workspace", "start", &b]);
    let err = env.fail(&["workspace", "start", &c]);
    assert_eq!(
        err,
        format!("aether: workspace {c} needs 256 MiB of memory; running workspaces use 4096 of the 4096 MiB allowed (memory_overcommit 1 x 4096 MiB of host memory)")
    );
    assert_eq!(env.state_of(&c), "stopped");
    // Stopping one frees its memory.
    env.ok(&["workspace", "stop", &b]);
    env.ok(&["workspace", "start", &c]);
}

#[test]
fn overcommit_is_configurable() {
    let env = env("memory_overcommit = 1.5\n");
    let a = create(&env, &["--memory", "4096"]);
    let b = create(&env, &["--memory", "2048"]);
    env.ok(&["workspace", "start", &a]);
    env.ok(&["workspace", "start", &b]);
    let c = create(&env, &["--memory", "256"]);
    let err = env.fail(&["workspace", "start", &c]);
    assert!(
        err.contains("use 6144 of the 6144 MiB allowed (memory_overcommit 1.5 x 4096"),
        "{err}"
    );
}

#[test]
fn performance_workspaces_get_dedicated_cpus_until_none_are_free() {
    // 4 CPUs, CPU 0 reserved for the host (the default): 3 can be dedicated.
    let env = TestEnv::start_on_host(&host_xml(4, 8192), "");
    env.ok(&["project", "create", "cap"]);
    let create = |args: &[&str]| {
        let mut all = vec!["workspace", "create", "--project", "cap", "--memory", "512"];
        all.extend_from_slice(args);
        env.ok(&all).trim().to_owned()
    };
    let a = create(&["--cpu-kind", "performance", "--cpus", "2"]);
    let b = create(&["--cpu-kind", "performance", "--cpus", "2"]);
    let shared = create(&["--cpus", "4"]);
    let shared_cpus = || env.json(&["host", "info"])["shared_cpus"].clone();
    assert_eq!(
        shared_cpus(),
        serde_json::json!([]),
        "nothing dedicated yet"
    );
    env.ok(&["workspace", "start", &a]);
    assert_eq!(
        env.json(&["workspace", "get", &a])["dedicated_cpus"],
        serde_json::json!([1, 2])
    );
    assert_eq!(shared_cpus(), serde_json::json!([0, 3]));
    assert_eq!(
        aether_tests::field(&env.ok(&["host", "info"]), "shared cpus").as_deref(),
        Some("0,3")
    );
    let err = env.fail(&["workspace", "start", &b]);
    assert_eq!(
        err,
        format!("aether: workspace {b} needs 2 dedicated CPUs (cpu kind performance); 1 of this host's 3 dedicatable CPUs are free (reserved_host_cpus [0])")
    );
    assert_eq!(env.state_of(&b), "stopped", "nothing changed");
    // Shared workspaces are not limited by dedication.
    env.ok(&["workspace", "start", &shared]);
    assert_eq!(
        env.json(&["workspace", "get", &shared])["dedicated_cpus"],
        serde_json::json!([])
    );
    // Stopping frees the CPUs.
    env.ok(&["workspace", "stop", &a]);
    assert_eq!(
        env.json(&["workspace", "get", &a])["dedicated_cpus"],
        serde_json::json!([])
    );
    assert_eq!(shared_cpus(), serde_json::json!([]));
    env.ok(&["workspace", "start", &b]);
    assert_eq!(
        env.json(&["workspace", "get", &b])["dedicated_cpus"],
        serde_json::json!([1, 2])
    );
    let get = env.ok(&["workspace", "get", &b]);
    assert_eq!(
        aether_tests::field(&get, "dedicated cpus").as_deref(),
        Some("1,2"),
        "{get}"
    );
}
