//! The SSH path through the daemon (`aether workspace ssh` → ssh → `aether workspace proxy` →
//! Tunnel RPC → guest), as far as libvirt's test driver goes. Its domains run no guest, and
//! whether a workspace's address answers depends on the machine, so these tests never open a
//! real tunnel: they pin the refusals, and run `workspace ssh` against a stand-in `ssh` that
//! records its arguments. (`workspace ssh` and `workspace proxy` start a stopped workspace and
//! then connect, so a stopped workspace is never given to the real `ssh` or the proxy here.) A real guest answering SSH is the end-to-end suite's job.

use std::path::Path;

use aether_tests::{bin_dir, TestEnv};

/// A project and a (stopped) workspace in it; returns the workspace id.
fn workspace(env: &TestEnv) -> String {
    env.ok(&["project", "create", "ssh-app"]);
    env.ok(&["workspace", "create", "--project", "ssh-app"])
        .trim()
        .to_owned()
}

#[test]
fn proxy_to_an_unknown_workspace_fails() {
    let env = TestEnv::start();
    let err = env.fail(&["workspace", "proxy", "ws-zzzzzz"]);
    assert_eq!(err, "aether: workspace ws-zzzzzz not found");
    let err = env.fail(&["workspace", "proxy", "not-an-id"]);
    assert!(err.contains("invalid workspace id"), "{err}");
    let err = env.fail(&["workspace", "ssh", "ws-zzzzzz"]);
    assert_eq!(err, "aether: workspace ws-zzzzzz not found");
    // Port 0 is the API's "default"; on the command line it is a mistake.
    let r = env.run(&["workspace", "proxy", "ws-zzzzzz", "--port", "0"]);
    assert_eq!(r.code, 2, "{r:?}");
}

/// Runs `aether workspace ssh` with a stand-in `ssh` first on PATH that writes its arguments,
/// one a line, to a file; returns them.
fn ssh_args(env: &TestEnv, args: &[&str]) -> Vec<String> {
    let (path, out) = env.fake_ssh();
    let mut all = vec!["workspace", "ssh"];
    all.extend_from_slice(args);
    let r = env.cli().env("PATH", path).args(&all).output().unwrap();
    assert!(r.status.success(), "aether {all:?}: {r:?}");
    std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn ssh_runs_the_system_ssh_through_the_proxy_with_the_host_key_pinned() {
    let env = TestEnv::start();
    let ws = workspace(&env);
    env.ok(&["workspace", "start", &ws]);
    let w = env.json(&["workspace", "get", &ws]);
    let host_key = w["ssh_host_public_key"].as_str().unwrap();
    assert!(host_key.starts_with("ssh-ed25519 "), "{w}");
    let login = w["login_user"].as_str().unwrap();
    if w["ip_addresses"].as_array().unwrap().is_empty() {
        let err = env.fail(&["workspace", "ssh", &ws]);
        assert!(err.contains("has no IP address"), "{err}");
        return;
    }

    let args = ssh_args(&env, &[&ws, "--", "uname", "-a"]);
    let config = env.dir.path().join("config/aether");
    let known_hosts = config.join("known_hosts").join(&ws);
    let exe = std::fs::canonicalize(bin_dir().join("aether")).unwrap();
    let key = config.join("ssh/id_ed25519");
    let show = |p: &Path| p.to_str().unwrap().to_owned();
    assert_eq!(
        args,
        [
            "-o".to_owned(),
            format!(
                "ProxyCommand='{}' --socket '{}' workspace proxy {ws}",
                show(&exe),
                show(&env.socket)
            ),
            "-o".to_owned(),
            format!("HostKeyAlias={ws}"),
            "-o".to_owned(),
            format!("UserKnownHostsFile=\"{}\"", show(&known_hosts)),
            "-o".to_owned(),
            "StrictHostKeyChecking=yes".to_owned(),
            "-o".to_owned(),
            "IdentitiesOnly=yes".to_owned(),
            "-i".to_owned(),
            show(&key),
            "-l".to_owned(),
            login.to_owned(),
            "-o".to_owned(),
            "LogLevel=ERROR".to_owned(),
            ws.clone(),
            "--".to_owned(),
            "uname".to_owned(),
            "-a".to_owned(),
        ]
    );
    assert_eq!(
        std::fs::read_to_string(&known_hosts).unwrap(),
        format!("{ws} {host_key}\n")
    );
    assert!(key.exists(), "the identity ssh is given exists");
    // Without a command: a login shell, nothing after the host.
    let args = ssh_args(&env, &[&ws]);
    assert_eq!(args.last().unwrap(), &ws);

    // A stopped workspace is started first (tests/tests/access.rs covers that further).
    env.ok(&["workspace", "stop", &ws, "--force"]);
    let args = ssh_args(&env, &[&ws]);
    assert_eq!(args.last().unwrap(), &ws);
    assert_eq!(env.state_of(&ws), "running");
}
