//! Test harness: runs the real `aetherd` and `aether` binaries.
//!
//! Each [`TestEnv`] owns a temporary directory with its own socket, state dir, CLI config dir
//! and libvirt test-driver host file (`test:///<dir>/host.xml`), so tests never share state.
//! The binaries are taken from the same target directory as the test executable; build them
//! first (`cargo build --workspace`, which the README's test command does).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A host for libvirt's test driver: 8 CPUs, 32 GiB.
pub const TEST_HOST_XML: &str = r#"<node>
  <cpu>
    <mhz>2000</mhz>
    <model>x86_64</model>
    <active>8</active>
    <nodes>1</nodes>
    <sockets>1</sockets>
    <cores>8</cores>
    <threads>1</threads>
  </cpu>
  <memory>33554432</memory>
</node>
"#;

/// A test-driver host with `cpus` CPUs and `mib` MiB of memory.
pub fn host_xml(cpus: u32, mib: u64) -> String {
    TEST_HOST_XML
        .replace("<active>8</active>", &format!("<active>{cpus}</active>"))
        .replace("<cores>8</cores>", &format!("<cores>{cpus}</cores>"))
        .replace(
            "<memory>33554432</memory>",
            &format!("<memory>{}</memory>", mib * 1024),
        )
}

/// The options of a small workspace: 1 CPU, 256 MiB, a 2 GiB volume.
pub const SMALL_WORKSPACE: [&str; 6] = ["--cpus", "1", "--memory", "256", "--volume-size", "2"];

/// The median of some timings (benchmarks).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Directory holding the built `aetherd` and `aether` (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> (tests) or target/<profile>/<bin> (benchmarks)
    let mut dir = exe.parent().expect("executable has a directory").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    for bin in ["aetherd", "aether"] {
        assert!(
            dir.join(bin).exists(),
            "{} is missing: build the binaries first with `cargo build --workspace`",
            dir.join(bin).display()
        );
    }
    dir
}

/// Result of one CLI run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config: PathBuf,
    pub libvirt_uri: String,
    daemon: Option<Child>,
    /// Against a real libvirtd (end-to-end): libvirt objects are removed on drop.
    real: bool,
}

impl TestEnv {
    /// Starts aetherd against a private test-driver host with `config_toml` as its config.
    pub fn start_with_config(config_toml: &str) -> TestEnv {
        Self::start_with_host(config_toml, TEST_HOST_XML)
    }

    /// Like [`TestEnv::start_with_config`] with the test driver's host described by `host`.
    pub fn start_with_host(config_toml: &str, host_xml: &str) -> TestEnv {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = dir.path().join("host.xml");
        std::fs::write(&host, host_xml).unwrap();
        let config = dir.path().join("aetherd.toml");
        std::fs::write(&config, config_toml).unwrap();
        let mut env = TestEnv {
            socket: dir.path().join("aetherd.sock"),
            state_dir: dir.path().join("state"),
            config,
            libvirt_uri: format!("test://{}", host.display()),
            dir,
            daemon: None,
            real: false,
        };
        env.start_daemon();
        env
    }

    /// End-to-end: aetherd against the real libvirtd (`qemu:///system`) that
    /// `scripts/e2e.sh` started in this network namespace, with TCG and the test subnet.
    /// `extra_config` is appended to the config file.
    pub fn start_real(extra_config: &str) -> TestEnv {
        // qemu runs as its own user and must reach the pool and console dirs.
        let dir = tempfile::Builder::new()
            .prefix("aether-e2e-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let config = dir.path().join("aetherd.toml");
        std::fs::write(
            &config,
            format!(
                "accel = \"tcg\"\nnetwork_cidr = \"192.168.150.0/24\"\nstop_timeout_secs = 60\n{extra_config}"
            ),
        )
        .unwrap();
        let mut env = TestEnv {
            socket: dir.path().join("aetherd.sock"),
            state_dir: dir.path().join("state"),
            config,
            libvirt_uri: "qemu:///system".to_owned(),
            dir,
            daemon: None,
            real: true,
        };
        env.start_daemon();
        env
    }

    /// `virsh -c <uri> ARGS`, returning stdout (asserting success).
    pub fn virsh(&self, args: &[&str]) -> String {
        let out = Command::new("virsh")
            .arg("-c")
            .arg(&self.libvirt_uri)
            .args(args)
            .output()
            .expect("run virsh");
        assert!(
            out.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Removes every libvirt object aether made (domains, pool, network), ignoring errors.
    fn clean_libvirt(&self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("virsh")
                .arg("-c")
                .arg(&self.libvirt_uri)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        let list = Command::new("virsh")
            .arg("-c")
            .arg(&self.libvirt_uri)
            .args(["list", "--all", "--name"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for name in list.lines().filter(|n| n.starts_with("aether-ws-")) {
            quiet(&["destroy", name]);
            quiet(&["undefine", name]);
        }
        quiet(&["pool-destroy", "aether"]);
        quiet(&["pool-undefine", "aether"]);
        quiet(&["net-destroy", "aether"]);
        quiet(&["net-undefine", "aether"]);
    }

    /// A daemon with a small test image `tiny` (1 GiB, qcow2) imported as the default image.
    pub fn start() -> TestEnv {
        Self::start_on_host(TEST_HOST_XML, "")
    }

    /// [`TestEnv::start`] on a test-driver host described by `host_xml`, with `extra_config`.
    pub fn start_on_host(host_xml: &str, extra_config: &str) -> TestEnv {
        let env = Self::start_with_host(
            &format!(
                "max_volume_size_gb = 64\nstop_timeout_secs = 5\ndefault_image = \"tiny\"\n{extra_config}"
            ),
            host_xml,
        );
        let disk = env.make_disk("tiny.qcow2", "qcow2", "1G");
        env.ok(&["image", "import", "tiny", disk.to_str().unwrap()]);
        env
    }

    /// Creates a disk image with `qemu-img create` in the test dir.
    pub fn make_disk(&self, name: &str, format: &str, size: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(&path)
            .arg(size)
            .status()
            .expect("run qemu-img (install qemu-utils)");
        assert!(st.success(), "qemu-img create failed");
        path
    }

    /// The `aetherd` command for this environment, not yet started.
    pub fn daemon_command(&self) -> Command {
        let mut cmd = Command::new(bin_dir().join("aetherd"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--libvirt-uri")
            .arg(&self.libvirt_uri)
            .env("AETHERD_LOG", "info");
        cmd
    }

    pub fn start_daemon(&mut self) {
        self.start_daemon_with(&[]);
    }

    /// Starts the daemon with a fault-injection point armed (`AETHERD_FAULT`, debug builds):
    /// it kills itself with SIGKILL when it gets there (see [`TestEnv::wait_killed`]).
    pub fn start_daemon_with_fault(&mut self, point: &str) {
        self.start_daemon_with(&[("AETHERD_FAULT", point)]);
    }

    /// Waits (at most 60 s) for a daemon started with a fault point to have killed itself.
    pub fn wait_killed(&mut self, point: &str) {
        use std::os::unix::process::ExitStatusExt;
        let mut child = self.daemon.take().expect("a daemon was started");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "aetherd did not reach fault point {point}:\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.signal(), Some(9), "at {point}: {status}");
    }

    /// Runs `args` on a daemon armed to die at `point`, which it must reach; then restarts it.
    pub fn crash_at(&mut self, point: &str, args: &[&str]) {
        self.stop_daemon();
        self.start_daemon_with_fault(point);
        let r = self.run(args);
        assert_ne!(
            r.code, 0,
            "{point}: {args:?} answered although the daemon died: {r:?}"
        );
        self.wait_killed(point);
        self.start_daemon();
    }

    fn start_daemon_with(&mut self, env: &[(&str, &str)]) {
        assert!(self.daemon.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("aetherd.log"))
            .unwrap();
        let mut child = self
            .daemon_command()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn aetherd");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "aetherd exited with {status} before serving:\n{}",
                    self.daemon_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "aetherd did not serve within 20 s:\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.daemon = Some(child);
    }

    /// The running daemon's process id.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// Stops the daemon with SIGTERM and waits for it to exit.
    pub fn stop_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            // SIGTERM through kill(1), given an argument list (no shell).
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
    }

    /// Kills the daemon with SIGKILL (no clean-up: the socket file stays behind).
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn restart_daemon(&mut self) {
        self.stop_daemon();
        self.start_daemon();
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("aetherd.log")).unwrap_or_default()
    }

    /// The `aether` command for this environment.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(bin_dir().join("aether"));
        cmd.env("AETHER_SOCKET", &self.socket)
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env("XDG_CACHE_HOME", self.dir.path().join(".cache"))
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.cli().args(args).output().expect("run aether").into()
    }

    /// Runs the CLI, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(
            r.code,
            0,
            "aether {args:?} failed: {r:?}\ndaemon log:\n{}",
            self.daemon_log()
        );
        r.stdout
    }

    /// Runs the CLI, asserts failure with exit code 1 and one line on stderr; returns it.
    pub fn fail(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, 1, "aether {args:?} should fail with 1: {r:?}");
        assert_eq!(r.stdout, "", "aether {args:?} printed on stdout: {r:?}");
        assert_eq!(
            r.stderr.lines().count(),
            1,
            "one error line expected: {r:?}"
        );
        r.stderr.trim_end().to_owned()
    }

    /// Creates project `project` and a workspace in it with the defaults; returns its id.
    pub fn workspace_in_new_project(&self, project: &str) -> String {
        self.ok(&["project", "create", project]);
        self.create_workspace(project, &[])
    }

    /// Creates a workspace in `project` with the options `args`, asserting success; returns
    /// its id.
    pub fn create_workspace(&self, project: &str, args: &[&str]) -> String {
        let mut all = vec!["workspace", "create", "--project", project];
        all.extend_from_slice(args);
        self.ok(&all).trim().to_owned()
    }

    /// Creates a small workspace ([`SMALL_WORKSPACE`]) in `project`, with the further options
    /// `extra`; returns its id.
    pub fn create_small_workspace(&self, project: &str, extra: &[&str]) -> String {
        self.create_workspace(project, &[&SMALL_WORKSPACE[..], extra].concat())
    }

    /// The ids of what `aether -o json KIND list` lists (KIND: `workspace`, `image`), in its
    /// order.
    pub fn listed_ids(&self, kind: &str) -> Vec<String> {
        self.json(&[kind, "list"])
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Runs the CLI with `-o json`, asserts success, parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("aether {args:?}: bad JSON {e}: {out}"))
    }

    pub fn state_of(&self, id: &str) -> String {
        self.json(&["workspace", "get", id])["state"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Waits (bounded) until the workspace is in `state`; fails at once if it ends in `error`
    /// instead.
    /// Waits until `id` is in one of `states` (error included, if listed).
    pub fn wait_for_state_in(&self, id: &str, states: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.state_of(id);
            if states.contains(&now.as_str()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id} is {now}, not one of {states:?}, after {timeout:?}\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_for_state(&self, id: &str, state: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.state_of(id);
            if now == state {
                return;
            }
            assert!(
                now != "error",
                "{id} ended in error while waiting for {state}: {}\n{}",
                self.json(&["workspace", "get", id])["reason"],
                self.daemon_log()
            );
            assert!(
                Instant::now() < deadline,
                "{id} is {now}, not {state}, after {timeout:?}\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.real {
            self.clean_libvirt();
        }
    }
}

/// The value of `key:` in a key/value block such as `aether workspace get` prints
/// (alignment-independent).
pub fn field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    })
}

/// Helpers for tests that must not reach a guest (see `tests/tests/access.rs`).
impl TestEnv {
    /// Installs a stand-in `ssh` that writes its arguments, one a line, to a file and exits 0
    /// without connecting anywhere. Returns the `PATH` that puts it first, and that file.
    pub fn fake_ssh(&self) -> (String, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let bin = self.dir.path().join("fake-bin");
        std::fs::create_dir_all(&bin).unwrap();
        let out = self.dir.path().join("ssh-args");
        let script = bin.join("ssh");
        std::fs::write(
            &script,
            format!("#!/bin/sh\nprintf '%s\\n' \"$@\" > '{}'\n", out.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        (path, out)
    }

    /// Runs the CLI with `PATH` set to `path`.
    pub fn run_with_path(&self, path: &str, args: &[&str]) -> Run {
        self.cli()
            .env("PATH", path)
            .args(args)
            .output()
            .expect("run aether")
            .into()
    }
}

/// The local users the multi-user tests act as (made by `scripts/lib.sh`'s
/// `ensure_test_users`): two members of group `aether` and one outsider.
pub const ALICE: &str = "aether-t-alice";
pub const BOB: &str = "aether-t-bob";
pub const EVE: &str = "aether-t-eve";

/// Whether the test users exist. Without them (a plain `cargo test` as a normal user) the
/// multi-user tests skip, saying so; under `scripts/test.sh` (`AETHER_TEST_USERS=1`) their
/// absence is a failure.
pub fn test_users() -> bool {
    let exists = |u: &str| {
        Command::new("id")
            .arg(u)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let all = [ALICE, BOB, EVE].iter().all(|u| exists(u));
    if !all {
        assert!(
            std::env::var_os("AETHER_TEST_USERS").is_none(),
            "AETHER_TEST_USERS is set but the test users are missing (scripts/lib.sh ensure_test_users)"
        );
        eprintln!("skipped: the test users do not exist (run scripts/test.sh as root)");
    }
    all
}

impl TestEnv {
    /// The `aether` CLI run as local user `user` (through `setpriv`, with that user's
    /// groups), with a home of its own in the test dir. Makes the test dir traversable so
    /// the user reaches the socket (which the daemon makes `0660 root:aether`).
    pub fn run_as(&self, user: &str, args: &[&str]) -> Run {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, user]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let home = self.dir.path().join(format!("home-{user}"));
        if !home.exists() {
            std::fs::create_dir(&home).unwrap();
            std::os::unix::fs::chown(&home, Some(id("-u")), Some(id("-g"))).unwrap();
        }
        Command::new("setpriv")
            .args(["--reuid", user, "--regid", user, "--init-groups", "--"])
            .arg(bin_dir().join("aether"))
            .args(args)
            .env("AETHER_SOCKET", &self.socket)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .stdin(Stdio::null())
            .output()
            .expect("run setpriv (util-linux)")
            .into()
    }

    /// [`TestEnv::run_as`], asserting success; returns stdout.
    pub fn ok_as(&self, user: &str, args: &[&str]) -> String {
        let r = self.run_as(user, args);
        assert_eq!(
            r.code,
            0,
            "{user}: aether {args:?} failed: {r:?}\n{}",
            self.daemon_log()
        );
        r.stdout
    }
}

/// Every path under `dir` (itself included) whose mode lets other users read, write or
/// traverse it, with that mode.
pub fn open_to_others(dir: &std::path::Path) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut loose = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(path) = todo.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue; // removed meanwhile
        };
        if meta.mode() & 0o007 != 0 {
            loose.push((path.clone(), meta.mode() & 0o7777));
        }
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                todo.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
            }
        }
    }
    loose
}

/// Helpers shared by the end-to-end test files.
pub mod http;
pub mod ui;

pub mod e2e {
    use std::path::{Path, PathBuf};

    use super::TestEnv;

    /// A built image directory named by an environment variable that `scripts/e2e.sh` sets.
    pub fn image_dir(var: &str) -> Option<PathBuf> {
        std::env::var_os(var).map(PathBuf::from)
    }

    /// Imports a built image directory (`disk.qcow2`, `vmlinuz`, `initrd.img`, `cmdline`).
    pub fn import(env: &TestEnv, name: &str, dir: &Path) {
        let cmdline = std::fs::read_to_string(dir.join("cmdline")).expect("image dir has cmdline");
        let p = |f: &str| dir.join(f).to_str().unwrap().to_owned();
        env.ok(&[
            "image",
            "import",
            name,
            &p("disk.qcow2"),
            "--kernel",
            &p("vmlinuz"),
            "--initrd",
            &p("initrd.img"),
            "--cmdline",
            cmdline.trim(),
        ]);
    }

    /// A daemon on the real libvirtd with the test guest imported as the default image and
    /// a project `e2e`.
    pub fn testguest_env(extra: &str) -> TestEnv {
        let dir = image_dir("AETHER_E2E_TESTGUEST").expect(
            "AETHER_E2E_TESTGUEST is not set: run the end-to-end tests with scripts/e2e.sh",
        );
        let env = TestEnv::start_real(&format!("default_image = \"testguest\"\n{extra}"));
        import(&env, "testguest", &dir);
        env.ok(&["project", "create", "e2e"]);
        env
    }
}
