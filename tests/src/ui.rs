//! The web UI under test: `aether ui` as a child process, and the browser scenarios of
//! `ui/tests/run.mjs` (Playwright driving Debian's Chromium) run against it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::TestEnv;

/// A running `aether ui --no-browser --port 0`; killed on drop.
pub struct UiServer {
    child: Child,
    /// The URL it printed, with its one-time token.
    pub url: String,
    /// `http://127.0.0.1:PORT`.
    pub origin: String,
}

impl UiServer {
    pub fn start(env: &TestEnv) -> UiServer {
        let mut child = env
            .cli()
            .args(["ui", "--no-browser", "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn aether ui");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("read the URL aether ui prints");
        let url = line.trim().to_owned();
        assert!(
            url.starts_with("http://127.0.0.1:") && url.contains("/?token="),
            "aether ui printed {url:?} instead of its URL"
        );
        let origin = url.split("/?").next().expect("split").to_owned();
        UiServer { child, url, origin }
    }
}

impl Drop for UiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The repository's `ui/` directory.
pub fn ui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ui")
}

fn chromium() -> PathBuf {
    std::env::var_os("AETHER_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Whether the browser tests can run: Chromium, node and the UI's npm packages. Without them
/// (a plain `cargo test`) they skip, saying so; under `scripts/test.sh`
/// (`AETHER_TEST_BROWSER=1`) their absence is a failure.
pub fn browser_tests() -> bool {
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let have =
        node && chromium().exists() && ui_dir().join("node_modules/playwright-core").exists();
    if !have {
        assert!(
            std::env::var_os("AETHER_TEST_BROWSER").is_none(),
            "AETHER_TEST_BROWSER is set but node, {} or ui/node_modules (npm ci in ui/) is missing",
            chromium().display()
        );
        eprintln!("skipped: no browser test setup (node, chromium, ui/node_modules); scripts/test.sh makes one");
    }
    have
}

/// Where a scenario's screenshots go: `<target>/ui-shots/<scenario>`.
pub fn shots_dir(scenario: &str) -> PathBuf {
    let dir = crate::bin_dir()
        .parent()
        .expect("target/<profile> has a parent")
        .join("ui-shots")
        .join(scenario);
    std::fs::create_dir_all(&dir).expect("create the screenshot dir");
    dir
}

/// Runs `node ui/tests/run.mjs SCENARIO` against `ui` and asserts it passed; `env` adds
/// the scenario's inputs (`AETHER_UI_PROJECT`, `AETHER_UI_WORKSPACE`).
pub fn run_scenario(ui: &UiServer, scenario: &str, env: &[(&str, &str)]) {
    let out = shots_dir(scenario);
    let status = Command::new("node")
        .arg(ui_dir().join("tests/run.mjs"))
        .arg(scenario)
        .env("AETHER_UI_URL", &ui.url)
        .env("AETHER_UI_OUT", &out)
        .env("AETHER_CHROMIUM", chromium())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .status()
        .expect("run node");
    assert!(
        status.success(),
        "browser scenario {scenario} failed ({status}); screenshots in {}",
        out.display()
    );
}
