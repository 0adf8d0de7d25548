//! Reaching workspaces: `workspace ssh` without an id (the current project's workspace),
//! starting a stopped workspace first, `ssh-config` and `workspace port-forward`, as far as
//! libvirt's test driver goes. Its domains run no guest and, in some sandboxes, any TCP
//! connection seems to succeed, so nothing here opens a tunnel: `ssh` is a stand-in that
//! records its arguments, ssh-config is checked with `ssh -G` (which only evaluates the
//! config), and the port forwarder is never connected to. Real guests are `e2e_access.rs`'s job.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aether_tests::{bin_dir, TestEnv};

/// Creates project `name` and makes it the current one.
fn current_project(env: &TestEnv, name: &str) {
    env.ok(&["project", "create", name]);
    env.ok(&["project", "use", name]);
}

fn create(env: &TestEnv, project: &str) -> String {
    env.ok(&["workspace", "create", "--project", project])
        .trim()
        .to_owned()
}

#[test]
fn ssh_without_an_id_needs_a_current_project() {
    let env = TestEnv::start();
    let err = env.fail(&["workspace", "ssh"]);
    assert_eq!(
        err,
        "aether: no workspace id given and no current project: name one (aether workspace ssh ID) or run `aether project use NAME`"
    );
    let err = env.fail(&["workspace", "ssh", "--", "uname", "-a"]);
    assert!(err.contains("no current project"), "{err}");

    // A current project that was deleted behind the CLI's back.
    current_project(&env, "gone");
    let config = env.dir.path().join("config/aether/current-project");
    std::fs::write(&config, "0badc0de\n").unwrap();
    let err = env.fail(&["workspace", "ssh"]);
    assert_eq!(
        err,
        "aether: the current project 0badc0de no longer exists; run `aether project use NAME`"
    );
}

#[test]
fn ssh_without_an_id_in_a_project_without_workspaces_says_how_to_create_one() {
    let env = TestEnv::start();
    current_project(&env, "my-app");
    // Another project's workspace does not count.
    env.ok(&["project", "create", "other"]);
    create(&env, "other");
    let err = env.fail(&["workspace", "ssh"]);
    assert_eq!(
        err,
        "aether: project my-app has no workspaces; create one with `aether workspace create --project my-app`"
    );
}

#[test]
fn ssh_without_an_id_in_a_project_with_several_workspaces_lists_them() {
    let env = TestEnv::start();
    current_project(&env, "my-app");
    let a = create(&env, "my-app");
    let b = create(&env, "my-app");
    env.ok(&["workspace", "start", &a]);
    let err = env.fail(&["workspace", "ssh", "--", "true"]);
    // In the daemon's order (creation time; the same second here, so by id).
    let listed: Vec<String> = env
        .json(&["workspace", "list", "--project", "my-app"])
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            format!(
                "{} ({})",
                w["id"].as_str().unwrap(),
                w["state"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(
        listed.contains(&format!("{a} (running)")) && listed.contains(&format!("{b} (stopped)"))
    );
    assert_eq!(
        err,
        format!(
            "aether: project my-app has 2 workspaces: {}; name one: aether workspace ssh ID",
            listed.join(", ")
        )
    );
    // Nothing was started or pinned.
    assert_eq!(env.state_of(&b), "stopped");
    assert!(!env.dir.path().join("config/aether/known_hosts").exists());
}

#[test]
fn ssh_starts_a_stopped_workspace_first() {
    let env = TestEnv::start();
    current_project(&env, "my-app");
    let ws = create(&env, "my-app");
    let (path, args_file) = env.fake_ssh();

    // Without an id: the project's only workspace, started, then ssh runs.
    let r = env.run_with_path(&path, &["workspace", "ssh", "--", "uname", "-a"]);
    assert_eq!(env.state_of(&ws), "running", "{r:?}");
    if env.json(&["workspace", "get", &ws])["ip_addresses"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        // This test driver assigns no address: ssh is refused after the start.
        assert_eq!(r.code, 1, "{r:?}");
        assert!(r.stderr.contains("has no IP address"), "{r:?}");
        return;
    }
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains(&format!("{ws} is stopped: starting it")),
        "{r:?}"
    );
    assert!(r.stderr.contains(&format!("{ws} running")), "{r:?}");
    assert_eq!(r.stdout, "", "progress goes to stderr only");
    let args = std::fs::read_to_string(&args_file).unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(args[args.len() - 4..], [ws.as_str(), "--", "uname", "-a"]);
    assert!(env
        .dir
        .path()
        .join("config/aether/known_hosts")
        .join(&ws)
        .exists());

    // With an id, stopped again: started again.
    env.ok(&["workspace", "stop", &ws, "--force"]);
    std::fs::remove_file(&args_file).unwrap();
    let r = env.run_with_path(&path, &["workspace", "ssh", &ws]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("starting it"), "{r:?}");
    assert_eq!(env.state_of(&ws), "running");
    let args = std::fs::read_to_string(&args_file).unwrap();
    assert_eq!(args.lines().last().unwrap(), ws);

    // Already running: nothing is said.
    let r = env.run_with_path(&path, &["workspace", "ssh", &ws]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{r:?}");
}

/// `ssh -G`: the options ssh would use for `host` with config file `config`, without
/// connecting anywhere.
fn ssh_g(env: &TestEnv, config: &Path, host: &str) -> Vec<(String, String)> {
    let out = Command::new("ssh")
        .arg("-G")
        .arg("-F")
        .arg(config)
        .arg(host)
        .env("HOME", env.dir.path())
        .output()
        .expect("run ssh (install openssh-client)");
    assert!(
        out.status.success(),
        "ssh -G: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn option<'a>(options: &'a [(String, String)], key: &str) -> &'a str {
    options
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {options:?}"))
}

#[test]
fn ssh_config_prints_host_entries_and_pins_host_keys() {
    let env = TestEnv::start();
    env.ok(&["project", "create", "solo"]);
    env.ok(&["project", "create", "duo"]);
    let solo = create(&env, "solo");
    let duo1 = create(&env, "duo");
    let duo2 = create(&env, "duo");
    let login = env.json(&["workspace", "get", &solo])["login_user"]
        .as_str()
        .unwrap()
        .to_owned();
    // A socket path that needs quoting: spaces, a `%` (ssh's token character), shell syntax.
    let odd = env.dir.path().join("my dir 100%;$(x)");
    std::fs::create_dir(&odd).unwrap();
    let socket = odd.join("aetherd.sock");
    std::os::unix::fs::symlink(&env.socket, &socket).unwrap();
    let sock = socket.to_str().unwrap();

    let out = env.ok(&["--socket", sock, "ssh-config"]);
    let config = env.dir.path().join("config/aether");
    let key = config.join("ssh/id_ed25519");
    let exe = std::fs::canonicalize(bin_dir().join("aether")).unwrap();
    let blocks: Vec<&str> = out.split("\n\n").collect();
    assert_eq!(blocks.len(), 3, "{out}");
    let want = |ws: &str, hosts: &str, project: &str| {
        format!(
            "# aether workspace {ws} (project {project})\n\
             Host {hosts}\n    \
             User {login}\n    \
             IdentityFile \"{key}\"\n    \
             IdentitiesOnly yes\n    \
             UserKnownHostsFile \"{kh}\"\n    \
             StrictHostKeyChecking yes\n    \
             HostKeyAlias {ws}\n    \
             ProxyCommand '{exe}' --socket '{sock}' workspace proxy {ws}\n",
            key = key.display(),
            kh = config.join("known_hosts").join(ws).display(),
            exe = exe.display(),
            sock = sock.replace('%', "%%"),
        )
    };
    assert!(out.ends_with("\n") && !out.ends_with("\n\n"), "{out:?}");
    let block = |ws: &str| {
        let b = blocks
            .iter()
            .find(|b| b.starts_with(&format!("# aether workspace {ws} ")))
            .unwrap_or_else(|| panic!("no block for {ws} in {out}"));
        b.trim_end().to_owned() + "\n"
    };
    // The project alias only for the only workspace of its project.
    assert_eq!(
        block(&solo),
        want(&solo, &format!("{solo} solo.aether"), "solo")
    );
    assert_eq!(block(&duo1), want(&duo1, &duo1, "duo"));
    assert_eq!(block(&duo2), want(&duo2, &duo2, "duo"));
    for ws in [&solo, &duo1, &duo2] {
        let host_key = env.json(&["workspace", "get", ws])["ssh_host_public_key"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(host_key.starts_with("ssh-ed25519 "), "{host_key}");
        assert_eq!(
            std::fs::read_to_string(config.join("known_hosts").join(ws)).unwrap(),
            format!("{ws} {host_key}\n")
        );
    }
    assert!(key.exists(), "the identity named in the config exists");

    // OpenSSH reads it as meant (the ProxyCommand's `%%` is ssh's, the shell gets the rest).
    let file = env.dir.path().join("ssh_config");
    std::fs::write(&file, &out).unwrap();
    for host in [solo.as_str(), "solo.aether"] {
        let o = ssh_g(&env, &file, host);
        assert_eq!(option(&o, "user"), login);
        assert_eq!(option(&o, "hostkeyalias"), solo);
        assert_eq!(option(&o, "identityfile"), key.to_str().unwrap());
        assert_eq!(option(&o, "identitiesonly"), "yes");
        assert_eq!(option(&o, "stricthostkeychecking"), "true");
        assert_eq!(
            option(&o, "userknownhostsfile"),
            config.join("known_hosts").join(&solo).to_str().unwrap()
        );
        assert!(
            option(&o, "proxycommand").ends_with(&format!("workspace proxy {solo}")),
            "{o:?}"
        );
    }
    assert_eq!(option(&ssh_g(&env, &file, &duo2), "hostkeyalias"), duo2);

    // Named workspaces only (a repeated id once); the alias still counts the whole project.
    let out = env.ok(&["ssh-config", &duo2, &solo, &duo2]);
    let hosts: Vec<&str> = out.lines().filter(|l| l.starts_with("Host ")).collect();
    assert_eq!(
        hosts,
        [format!("Host {duo2}"), format!("Host {solo} solo.aether")]
    );

    // JSON: the same data.
    let j = env.json(&["ssh-config", &solo]);
    let e = &j.as_array().unwrap()[0];
    assert_eq!(e["workspace_id"], solo.as_str());
    assert_eq!(e["hosts"], serde_json::json!([solo.clone(), "solo.aether"]));
    assert_eq!(e["user"], login.as_str());
    assert_eq!(e["identity_file"], key.to_str().unwrap());
    assert_eq!(
        e["user_known_hosts_file"],
        config.join("known_hosts").join(&solo).to_str().unwrap()
    );
    assert_eq!(e["host_key_alias"], solo.as_str());
    assert_eq!(
        e["proxy_command"],
        format!(
            "'{}' --socket '{}' workspace proxy {solo}",
            exe.display(),
            env.socket.display()
        )
    );

    let err = env.fail(&["ssh-config", "ws-zzzzzz"]);
    assert_eq!(err, "aether: workspace ws-zzzzzz not found");
    let err = env.fail(&["ssh-config", "ws-a;b"]);
    assert!(err.contains("invalid workspace id"), "{err}");
    // A socket path that cannot be put in a ProxyCommand is refused, not mangled.
    let quote = env.dir.path().join("it's");
    std::fs::create_dir(&quote).unwrap();
    std::os::unix::fs::symlink(&env.socket, quote.join("s.sock")).unwrap();
    let err = env.fail(&[
        "--socket",
        quote.join("s.sock").to_str().unwrap(),
        "ssh-config",
    ]);
    assert!(err.contains("single quote"), "{err}");
}

#[test]
fn ssh_config_without_workspaces_prints_nothing() {
    let env = TestEnv::start();
    assert_eq!(env.ok(&["ssh-config"]), "");
    assert_eq!(env.json(&["ssh-config"]), serde_json::json!([]));
}

#[test]
fn port_forward_checks_its_arguments() {
    let env = TestEnv::start();
    env.ok(&["project", "create", "fwd"]);
    let ws = create(&env, "fwd");
    for (pair, why) in [
        ("80", "expected LOCAL:REMOTE"),
        ("0:22", "invalid local port \"0\": expected 1-65535"),
        ("22:0", "invalid remote port \"0\": expected 1-65535"),
        ("x:y", "invalid local port \"x\""),
        ("8080:65536", "invalid remote port \"65536\""),
    ] {
        let r = env.run(&["workspace", "port-forward", &ws, "18080:22", pair]);
        assert_eq!(r.code, 2, "{pair}: {r:?}");
        assert!(r.stderr.contains(why), "{pair}: {r:?}");
    }
    let r = env.run(&["workspace", "port-forward", &ws]);
    assert_eq!(r.code, 2, "no pair: {r:?}");

    let err = env.fail(&["workspace", "port-forward", "ws-zzzzzz", "18080:22"]);
    assert_eq!(err, "aether: workspace ws-zzzzzz not found");
    let err = env.fail(&["workspace", "port-forward", &ws, "18080:22", "18080:80"]);
    assert_eq!(err, "aether: local port 18080 is given twice");
    // A busy local port fails before the workspace is started.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let err = env.fail(&["workspace", "port-forward", &ws, &format!("{port}:22")]);
    assert!(
        err.starts_with(&format!("aether: cannot listen on 127.0.0.1:{port}: ")),
        "{err}"
    );
    assert_eq!(env.state_of(&ws), "stopped");
}

/// The forwarder starts the stopped workspace, says what it forwards, and ends cleanly on
/// SIGTERM. Nothing connects to it: that would open a tunnel to the (absent) guest.
#[test]
fn port_forward_starts_the_workspace_and_stops_on_sigterm() {
    let env = TestEnv::start();
    env.ok(&["project", "create", "fwd"]);
    let ws = create(&env, "fwd");
    let free = |_| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (p1, p2) = (free(()), free(()));
    let mut child = env
        .cli()
        .args([
            "workspace",
            "port-forward",
            &ws,
            &format!("{p1}:8080"),
            &format!("{p2}:22"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lines
        .iter()
        .filter(|l: &&String| l.starts_with("forwarding"))
        .count()
        < 2
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("no forwarding lines: {lines:?}\n{}", env.daemon_log()),
        }
    }
    assert!(
        lines.contains(&format!("{ws} is stopped: starting it")),
        "{lines:?}"
    );
    assert!(lines.contains(&format!("forwarding 127.0.0.1:{p1} -> {ws}:8080")));
    assert!(lines.contains(&format!("forwarding 127.0.0.1:{p2} -> {ws}:22")));
    assert_eq!(env.state_of(&ws), "running");
    // Listening on loopback only (not connected to).
    let listening = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let hex = format!("0100007F:{p1:04X} 00000000:0000 0A");
    assert!(listening.contains(&hex), "127.0.0.1:{p1} not listening");

    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "port-forward ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}
