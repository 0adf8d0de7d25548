//! Nothing the daemon keeps is readable by other local users (the daemon runs as root for
//! many users: seeds hold guests' private host keys, the database everyone's workspaces).

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use aether_tests::TestEnv;

/// Regression test: seeds were 0644 in a 0755 state dir, the database and its -wal/-shm
/// 0644, and the state dir was forced back to 0755 where systemd had made it 0750.
#[test]
fn nothing_under_the_state_dir_is_readable_by_other_users() {
    let mut env = TestEnv::start();
    env.ok(&["project", "create", "p"]);
    let ws = env
        .ok(&["workspace", "create", "--project", "p"])
        .trim()
        .to_owned();
    env.ok(&["workspace", "start", &ws]);
    // A direct-kernel-boot image: its kernel and initrd live under the state dir too.
    let disk = env.make_disk("kb.qcow2", "qcow2", "64M");
    let (kernel, initrd) = (
        env.dir.path().join("vmlinuz"),
        env.dir.path().join("initrd"),
    );
    std::fs::write(&kernel, b"kernel").unwrap();
    std::fs::write(&initrd, b"initrd").unwrap();
    env.ok(&[
        "image",
        "import",
        "kb",
        disk.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
    ]);
    assert!(env.state_dir.join("boot/kb/vmlinuz").exists());
    // An older daemon's (or an admin's) loose modes are tightened at the next start.
    std::fs::set_permissions(&env.state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = env.state_dir.join("aetherd.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.restart_daemon();
    env.ok(&["workspace", "list"]);

    let seed = env.state_dir.join(format!("pool/{ws}-seed.img"));
    assert!(seed.exists(), "no seed at {}", seed.display());
    let loose = aether_tests::open_to_others(&env.state_dir);
    assert!(loose.is_empty(), "open to others: {loose:?}");
    for private in [db.clone(), seed, env.state_dir.join("keys/id_ed25519")] {
        let mode = std::fs::metadata(&private).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}: {mode:o}", private.display());
    }
    for suffix in ["-wal", "-shm"] {
        let p = env.state_dir.join(format!("aetherd.db{suffix}"));
        if p.exists() {
            let mode = std::fs::metadata(&p).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}: {mode:o}", p.display());
        }
    }
}
