//! End-to-end: reaching real guests with `aether ssh-config` and plain `ssh`, `aether
//! workspace ssh` without an id, and `aether workspace port-forward`; each starts a stopped
//! workspace first.
//!
//! Like `e2e.rs`, these need root, a libvirtd in the current network namespace and the built
//! test guest, so they are `#[ignore]`d in a plain `cargo test`; `scripts/e2e.sh` sets that up
//! and runs them with `--ignored`. Traffic goes only to loopback and to the guests inside the
//! run's network namespace.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aether_tests::e2e::testguest_env;
use aether_tests::TestEnv;

/// How long a TCG boot of the test guest may take, with margin (the daemon's boot timeout
/// under TCG is 300 s).
const BOOT: Duration = Duration::from_secs(360);

/// A small workspace of project e2e (stopped), with 512 MiB.
fn create(env: &TestEnv) -> String {
    env.create_workspace(
        "e2e",
        &["--cpus", "1", "--memory", "512", "--volume-size", "2"],
    )
}

fn ssh(env: &TestEnv, ws: &str, cmd: &str) -> String {
    env.ok(&["workspace", "ssh", ws, "--", cmd])
}

/// Plain `ssh -F config HOST CMD`, as a user of `aether ssh-config` runs it.
fn plain_ssh(env: &TestEnv, config: &std::path::Path, host: &str, cmd: &str) -> String {
    let out = Command::new("ssh")
        .arg("-F")
        .arg(config)
        .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", host, cmd])
        .env("HOME", env.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh -F {} {host} {cmd}: {}\n{}",
        config.display(),
        String::from_utf8_lossy(&out.stderr),
        env.daemon_log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "end-to-end: run by scripts/e2e.sh"]
fn ssh_config_makes_plain_ssh_work_and_its_proxy_starts_the_workspace() {
    let env = testguest_env("");
    let ws = create(&env);
    let config = env.dir.path().join("ssh_config");
    std::fs::write(&config, env.ok(&["ssh-config"])).unwrap();
    // Still stopped: the ProxyCommand starts it.
    assert_eq!(env.state_of(&ws), "stopped");
    assert_eq!(
        plain_ssh(&env, &config, &ws, "cat /etc/hostname").trim(),
        ws
    );
    assert_eq!(env.state_of(&ws), "running");
    // The project alias (the only workspace of e2e) reaches the same guest.
    assert_eq!(
        plain_ssh(&env, &config, "e2e.aether", "hostname").trim(),
        ws
    );
    env.ok(&["workspace", "delete", &ws, "--force"]);
}

#[test]
#[ignore = "end-to-end: run by scripts/e2e.sh"]
fn ssh_without_an_id_starts_the_current_projects_workspace() {
    let env = testguest_env("");
    env.ok(&["project", "use", "e2e"]);
    let ws = create(&env);
    assert_eq!(env.state_of(&ws), "stopped");
    let r = env.run(&["workspace", "ssh", "--", "cat /etc/hostname"]);
    assert_eq!(r.code, 0, "{r:?}\n{}", env.daemon_log());
    assert_eq!(r.stdout.trim(), ws);
    assert!(
        r.stderr.contains(&format!("{ws} is stopped: starting it")),
        "{r:?}"
    );
    assert_eq!(env.state_of(&ws), "running");
    env.ok(&["workspace", "delete", &ws, "--force"]);
}

/// A free TCP port on 127.0.0.1 (free when asked).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Connects to 127.0.0.1:`port`, sends `request`, reads until the other side closes.
fn exchange(port: u16, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(request).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    answer
}

/// Kills the forwarder with SIGTERM if a test fails half-way.
struct Forwarder(Child);

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "end-to-end: run by scripts/e2e.sh"]
fn port_forward_starts_the_workspace_and_carries_connections() {
    let env = testguest_env("");
    let ws = create(&env);
    let (ssh_port, http_port, closed_port) = (free_port(), free_port(), free_port());
    let mut fwd = Forwarder(
        env.cli()
            .args([
                "workspace",
                "port-forward",
                &ws,
                &format!("{ssh_port}:22"),
                &format!("{http_port}:8080"),
                &format!("{closed_port}:9"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let stderr = fwd.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines: Vec<String> = Vec::new();
    let mut wait_for = |what: &str, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        while !lines.iter().any(|l| l.contains(what)) {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => lines.push(l),
                Err(_) => panic!("no {what:?} from port-forward: {lines:?}"),
            }
        }
        lines.clone()
    };
    // The stopped workspace is started, then the forwards are announced.
    let seen = wait_for(
        &format!("forwarding 127.0.0.1:{closed_port} -> {ws}:9"),
        BOOT,
    );
    assert!(
        seen.contains(&format!("{ws} is stopped: starting it")),
        "{seen:?}"
    );
    for want in [
        format!("forwarding 127.0.0.1:{ssh_port} -> {ws}:22"),
        format!("forwarding 127.0.0.1:{http_port} -> {ws}:8080"),
    ] {
        assert!(seen.contains(&want), "{want:?} not in {seen:?}");
    }
    assert_eq!(env.state_of(&ws), "running");

    // The guest's SSH server greets through the forward.
    let mut s = TcpStream::connect(("127.0.0.1", ssh_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut banner = String::new();
    BufReader::new(&mut s).read_line(&mut banner).unwrap();
    assert!(banner.starts_with("SSH-2.0-"), "{banner:?}");
    drop(s);

    // A web server in the guest (busybox httpd daemonizes), reached twice.
    ssh(
        &env,
        &ws,
        "mkdir -p /tmp/www && echo hello-from-guest > /tmp/www/index.html && busybox httpd -p 8080 -h /tmp/www",
    );
    for _ in 0..2 {
        let answer = exchange(http_port, b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
            "{answer}"
        );
        assert!(answer.contains("hello-from-guest"), "{answer}");
    }

    // Nothing listens on port 9 of the guest: that connection is closed, the error is said,
    // and the forwarder goes on.
    assert_eq!(exchange(closed_port, b""), b"");
    wait_for(
        &format!("127.0.0.1:{closed_port} -> {ws}:9: "),
        Duration::from_secs(30),
    );
    let answer = exchange(http_port, b"GET /index.html HTTP/1.0\r\n\r\n");
    assert!(String::from_utf8_lossy(&answer).contains("hello-from-guest"));

    let st = Command::new("kill")
        .args(["-TERM", &fwd.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = fwd.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "port-forward ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(
        TcpStream::connect(("127.0.0.1", http_port)).is_err(),
        "still listening after SIGTERM"
    );
    env.ok(&["workspace", "delete", &ws, "--force"]);
}
