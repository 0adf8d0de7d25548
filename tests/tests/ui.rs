//! The web UI in a real browser against the test driver: `aether ui` serving the built page,
//! Playwright driving Chromium through `ui/tests/run.mjs driver` (token exchange, refusals
//! without the cookie or from another Origin, create with a bad value and a good one, Start
//! Workspace with the live indicator, stop, delete, two tabs). What the page did is then
//! checked against the daemon through the CLI.

use aether_tests::ui::{browser_tests, run_scenario, shots_dir, UiServer};
use aether_tests::TestEnv;

#[test]
fn the_browser_creates_starts_stops_and_deletes_a_workspace() {
    if !browser_tests() {
        return;
    }
    let env = TestEnv::start();
    env.ok(&["project", "create", "web"]);
    let ui = UiServer::start(&env);
    run_scenario(&ui, "driver", &[("AETHER_UI_PROJECT", "web")]);
    // The page deleted what it created, the bad create made nothing, and the daemon agrees.
    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["-o", "json", "workspace", "list"])).unwrap();
    assert_eq!(
        list,
        serde_json::json!([]),
        "workspaces left after the scenario"
    );
    for shot in ["project.png", "booting.png"] {
        let p = shots_dir("driver").join(shot);
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 1000, "screenshot {} missing or empty", p.display());
    }
}
