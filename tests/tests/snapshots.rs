//! Snapshot requests against libvirt's test driver: bad input is refused before anything is
//! looked at, and the test driver (which keeps no volume files) says what snapshots need.
//! Taking and restoring them on real volumes is in `e2e.rs`.

use aether_tests::TestEnv;

#[test]
fn snapshot_requests_are_validated_and_need_a_real_libvirt() {
    let env = TestEnv::start();
    let ws = env.workspace_in_new_project("snap");
    for bad in ["", "Before", "a/b", "../x", ".hidden"] {
        let err = env.fail(&["workspace", "snapshot", "create", &ws, bad]);
        assert!(
            err.starts_with("aether: invalid snapshot name"),
            "{bad:?}: {err}"
        );
    }
    let err = env.fail(&["workspace", "snapshot", "list", "ws-zzzzzz"]);
    assert_eq!(err, "aether: workspace ws-zzzzzz not found");
    let err = env.fail(&["workspace", "snapshot", "list", &ws]);
    assert_eq!(
        err,
        "aether: libvirt's test driver keeps no volume files: snapshots need a real libvirt"
    );
    assert_eq!(env.state_of(&ws), "stopped");
}
