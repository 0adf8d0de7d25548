//! End-to-end: the `aether` network's addresses, with real guests on a real libvirtd and
//! dnsmasq (run by `scripts/e2e.sh`, like `e2e.rs`).

use std::time::Duration;

use aether_tests::e2e::testguest_env;
use aether_tests::TestEnv;

/// A 1 CPU / 256 MiB / 2 GiB workspace of project e2e.
fn create_small(env: &TestEnv) -> String {
    env.ok(&[
        "workspace",
        "create",
        "--project",
        "e2e",
        "--cpus",
        "1",
        "--memory",
        "256",
        "--volume-size",
        "2",
    ])
    .trim()
    .to_owned()
}

fn reserved_ip(env: &TestEnv, ws: &str) -> String {
    env.json(&["workspace", "get", ws])["ip_addresses"][0]
        .as_str()
        .unwrap_or_else(|| panic!("{ws} has no address"))
        .to_owned()
}

fn mac_of(env: &TestEnv, ws: &str) -> String {
    // `virsh domiflist`: Interface Type Source Model MAC
    let list = env.virsh(&["domiflist", &format!("aether-{ws}")]);
    list.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .find(|m| m.matches(':').count() == 5)
        .unwrap_or_else(|| panic!("no MAC in {list}"))
        .to_owned()
}

/// The IPv4 addresses dnsmasq has leased to `mac` (from `virsh net-dhcp-leases`).
fn leases_of(env: &TestEnv, mac: &str) -> Vec<String> {
    env.virsh(&["net-dhcp-leases", "aether", "--mac", mac])
        .lines()
        .filter(|l| l.contains(mac))
        .filter_map(|l| l.split_whitespace().find(|f| f.contains('/')))
        .map(|cidr| cidr.split('/').next().unwrap().to_owned())
        .collect()
}

/// Regression test for two address bugs seen on the quick-start host:
/// - libvirt's `dhcp-lease-max` was the size of the dynamic range (8), so the ninth guest to
///   boot within a lease time got no address and its start timed out;
/// - a deleted workspace's lease stayed with dnsmasq, so the next workspace given the same
///   address got none and its start timed out.
///
/// 20 workspaces are created, started and (force-)deleted in turn, then 12 run at once; each
/// must reach `running` at its reserved address, and a deleted workspace's lease must be gone.
#[test]
#[ignore = "end-to-end: run by scripts/e2e.sh"]
fn twenty_workspaces_in_turn_then_twelve_at_once_each_get_their_reserved_address() {
    // Long enough for 12 test guests booting at once under TCG on 2 CPUs; a guest without
    // an address would still hit it, but a wrong address is reported at once.
    let env = testguest_env("boot_timeout_secs = 240\nidle_timeout = \"0\"\n");
    let began = std::time::Instant::now();
    for round in 0..20 {
        eprintln!("round {round} at {:?}", began.elapsed());
        let ws = create_small(&env);
        let ip = reserved_ip(&env, &ws);
        let start = env.run(&["workspace", "start", &ws]);
        assert_eq!(
            start.code,
            0,
            "round {round}: {ws} at {ip} did not start: {start:?}\n{}",
            env.daemon_log()
        );
        let mac = mac_of(&env, &ws);
        assert_eq!(leases_of(&env, &mac), vec![ip.clone()], "round {round}");
        // A forced delete powers the guest off: the graceful stop is tested elsewhere and
        // would only add seconds per round.
        env.ok(&["workspace", "delete", &ws, "--force"]);
        assert_eq!(
            leases_of(&env, &mac),
            Vec::<String>::new(),
            "round {round}: the lease of deleted {ws} ({ip}) is still held"
        );
    }

    eprintln!("12 at once from {:?}", began.elapsed());
    let all: Vec<String> = (0..12).map(|_| create_small(&env)).collect();
    for ws in &all {
        env.ok(&["workspace", "start", ws, "--no-wait"]);
    }
    for ws in &all {
        env.wait_for_state(ws, "running", Duration::from_secs(300));
    }
    for ws in &all {
        let ip = reserved_ip(&env, ws);
        assert_eq!(leases_of(&env, &mac_of(&env, ws)), vec![ip], "{ws}");
    }
    for ws in &all {
        env.ok(&["workspace", "delete", ws, "--force"]);
    }
}
