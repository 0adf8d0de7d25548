//! Crash safety against libvirt's test driver (fast; the end-to-end version with real
//! libvirt is `e2e_crash.rs`): the daemon killed after each step of a create or delete leaves,
//! once restarted, nothing or a complete workspace, and no file of the state dir that no row
//! accounts for.

use std::collections::BTreeSet;

use aether_tests::TestEnv;

fn files(env: &TestEnv, dir: &str) -> BTreeSet<String> {
    std::fs::read_dir(env.state_dir.join(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The lines of a seed image that carry SSH keys (public, and the private host key's).
fn keys_in(seed: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(seed)
        .lines()
        .filter(|l| l.contains("ssh-ed25519") || l.contains("PRIVATE KEY") || l.len() == 70)
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_create_or_delete_cut_short_is_undone_or_finished_by_the_restart() {
    let mut env = TestEnv::start();
    env.ok(&["project", "create", "p"]);
    let pool_before = files(&env, "pool");
    let create = ["workspace", "create", "--project", "p"];
    for point in [
        "create:volume",
        "create:seed",
        "create:reservation",
        "create:domain",
    ] {
        env.crash_at(point, &create);
        assert_eq!(env.listed_ids("workspace"), Vec::<String>::new(), "{point}");
        assert_eq!(files(&env, "pool"), pool_before, "{point}: pool files");
        assert!(files(&env, "tmp").is_empty(), "{point}: staging files");
        assert!(
            env.daemon_log()
                .contains("removed a workspace whose create was cut short"),
            "{point}"
        );
    }
    env.crash_at("create:done", &create);
    let ws = env.listed_ids("workspace");
    assert_eq!(ws.len(), 1, "create:done");
    let ws = ws[0].clone();
    assert!(files(&env, "pool").contains(&format!("{ws}-seed.img")));
    env.ok(&["workspace", "start", &ws]);
    env.ok(&["workspace", "stop", &ws, "--force"]);

    env.crash_at("delete:marked", &["workspace", "delete", &ws]);
    assert_eq!(
        env.listed_ids("workspace"),
        Vec::<String>::new(),
        "delete:marked"
    );
    assert_eq!(
        files(&env, "pool"),
        pool_before,
        "delete:marked: pool files"
    );
    assert!(env
        .daemon_log()
        .contains("finished a delete that was cut short"));
}

#[test]
fn a_missing_seed_is_written_again_and_orphan_files_are_removed_at_start() {
    let mut env = TestEnv::start();
    let ws = env.workspace_in_new_project("p");
    let seed = env.state_dir.join(format!("pool/{ws}-seed.img"));
    let before = std::fs::read(&seed).unwrap();
    env.stop_daemon();
    std::fs::remove_file(&seed).unwrap();
    // Files no row accounts for, as a crash between a file and its row would leave them.
    for orphan in [
        "pool/ws-zzz999-root.qcow2",
        "pool/ws-zzz999-seed.img",
        "pool/image-gone.qcow2",
        "tmp/.keygen-0123456789abcdef",
        "tmp/upload-feedface",
    ] {
        std::fs::write(env.state_dir.join(orphan), b"x").unwrap();
    }
    std::fs::create_dir_all(env.state_dir.join("boot/gone")).unwrap();
    env.start_daemon();
    // The socket accepts connections before reconcile ends; the first answer comes after.
    env.ok(&["workspace", "list"]);
    let again = std::fs::read(&seed).unwrap_or_else(|e| panic!("{e}: {}", env.daemon_log()));
    // A FAT image carries its own serial number and times: the same keys and user data is
    // what matters.
    assert!(!keys_in(&before).is_empty());
    assert_eq!(
        keys_in(&again),
        keys_in(&before),
        "the seed was written with other keys"
    );
    let mut want: BTreeSet<String> = ["image-tiny.qcow2".to_owned()].into();
    want.insert(format!("{ws}-root.qcow2"));
    want.insert(format!("{ws}-seed.img"));
    let pool = files(&env, "pool");
    assert!(
        pool.iter()
            .all(|f| want.contains(f) || f.ends_with("-root.qcow2")),
        "{pool:?}"
    );
    for orphan in [
        "ws-zzz999-root.qcow2",
        "ws-zzz999-seed.img",
        "image-gone.qcow2",
    ] {
        assert!(!pool.contains(orphan), "{orphan} was kept");
    }
    assert!(files(&env, "tmp").is_empty());
    assert!(!env.state_dir.join("boot/gone").exists());
}
