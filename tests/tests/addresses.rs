//! Address reservations against libvirt's test driver: allocation under concurrency and the
//! reuse policy. (What dnsmasq does with them is in `e2e_network.rs`.)

use std::collections::HashSet;
use std::process::Stdio;

use aether_tests::TestEnv;

fn ip_of(env: &TestEnv, ws: &str) -> String {
    env.json(&["workspace", "get", ws])["ip_addresses"][0]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Regression test: 1 of 40 parallel creates failed with "changed state concurrently",
/// because the address was chosen and inserted in separate steps.
#[test]
fn forty_parallel_creates_all_succeed_with_distinct_addresses() {
    let env = TestEnv::start();
    env.ok(&["project", "create", "p"]);
    let children: Vec<_> = (0..40)
        .map(|_| {
            env.cli()
                .args([
                    "workspace",
                    "create",
                    "--project",
                    "p",
                    "--volume-size",
                    "1",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn aether")
        })
        .collect();
    let mut ids = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "create failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            env.daemon_log()
        );
        ids.push(String::from_utf8(out.stdout).unwrap().trim().to_owned());
    }
    let ips: HashSet<String> = ids.iter().map(|id| ip_of(&env, id)).collect();
    assert_eq!(ips.len(), 40, "addresses are not distinct: {ips:?}");
}

/// A deleted workspace's address is the last one handed out again: dnsmasq may still hold
/// its lease (regression: the next workspace got it and never got an address).
#[test]
fn a_deleted_workspaces_address_is_not_reused_while_others_are_free() {
    let env = TestEnv::start();
    env.ok(&["project", "create", "p"]);
    let create = || {
        env.ok(&["workspace", "create", "--project", "p"])
            .trim()
            .to_owned()
    };
    let first = create();
    let first_ip = ip_of(&env, &first);
    env.ok(&["workspace", "delete", &first]);
    let mut seen = Vec::new();
    for _ in 0..5 {
        let ws = create();
        seen.push(ip_of(&env, &ws));
    }
    assert!(!seen.contains(&first_ip), "{first_ip} was reused: {seen:?}");
    // The policy survives a restart (it is in the database).
    let mut env = env;
    env.restart_daemon();
    let ws = env
        .ok(&["workspace", "create", "--project", "p"])
        .trim()
        .to_owned();
    assert_ne!(ip_of(&env, &ws), first_ip);
}
