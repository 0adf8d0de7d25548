//! End-to-end crash safety: the daemon is killed (SIGKILL, through its fault-injection
//! hook in debug builds) after each provisioning step of create, delete, start and image
//! import in turn, and during 20 parallel creates; after a restart each case ends with
//! either nothing or a complete, startable workspace, and libvirt and the state dir hold
//! nothing that no row accounts for; what no row owns (a row lost after its resources were
//! made) is removed at the next start unless its VM runs. Run by `scripts/e2e.sh` (real
//! libvirtd, test guest).

use std::collections::BTreeSet;
use std::time::Duration;

use aether_tests::e2e::{image_dir, testguest_env};
use aether_tests::{TestEnv, SMALL_WORKSPACE};

fn images(env: &TestEnv) -> BTreeSet<String> {
    env.listed_ids("image").into_iter().collect()
}

/// Lines of `virsh ARGS` output, trimmed, without empty ones.
fn virsh_lines(env: &TestEnv, args: &[&str]) -> Vec<String> {
    env.virsh(args)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Asserts that libvirt and the state dir hold exactly what the rows account for: a domain,
/// a root volume, a seed and a DHCP reservation per workspace, a volume per image, and no
/// staging file. Returns the workspaces.
fn assert_consistent(env: &TestEnv, when: &str) -> BTreeSet<String> {
    let ws: BTreeSet<String> = env.listed_ids("workspace").into_iter().collect();
    let domains: BTreeSet<String> = virsh_lines(env, &["list", "--all", "--name"])
        .into_iter()
        .filter_map(|d| d.strip_prefix("aether-").map(str::to_owned))
        .collect();
    assert_eq!(domains, ws, "{when}: domains");
    let mut volumes: BTreeSet<String> = virsh_lines(env, &["vol-list", "aether"])
        .into_iter()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    let mut want: BTreeSet<String> = ws
        .iter()
        .flat_map(|w| [format!("{w}-root.qcow2"), format!("{w}-seed.img")])
        .collect();
    want.extend(images(env).iter().map(|i| format!("image-{i}.qcow2")));
    // Files the pool holds that libvirt did not list yet count too.
    for f in std::fs::read_dir(env.state_dir.join("pool")).unwrap() {
        volumes.insert(f.unwrap().file_name().to_string_lossy().into_owned());
    }
    assert_eq!(volumes, want, "{when}: volumes");
    let net = env.virsh(&["net-dumpxml", "aether"]);
    let hosts: BTreeSet<String> = net
        .lines()
        .filter(|l| l.contains("<host "))
        .filter_map(|l| {
            let at = l.find("name='")? + 6;
            Some(l[at..].split('\'').next()?.to_owned())
        })
        .collect();
    assert_eq!(hosts, ws, "{when}: DHCP reservations");
    let staging: Vec<_> = std::fs::read_dir(env.state_dir.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(staging.is_empty(), "{when}: staging files {staging:?}");
    ws
}

/// A workspace that survived a crash: complete, so it starts and reaches `running`.
fn assert_startable(env: &TestEnv, ws: &str, when: &str) {
    let r = env.run(&["workspace", "start", ws]);
    assert_eq!(r.code, 0, "{when}: {r:?}\n{}", env.daemon_log());
    assert_eq!(env.state_of(ws), "running", "{when}");
    env.ok(&["workspace", "stop", ws, "--force"]);
}

#[test]
#[ignore = "end-to-end: run by scripts/e2e.sh"]
fn a_kill_after_any_provisioning_step_leaves_nothing_or_a_startable_workspace() {
    let mut env = testguest_env("");
    assert_consistent(&env, "at the start");

    // Create: cut short, the workspace is undone; after its last step, it is complete.
    let create_args = [
        &["workspace", "create", "--project", "e2e"][..],
        &SMALL_WORKSPACE,
    ]
    .concat();
    for point in [
        "create:volume",
        "create:seed",
        "create:reservation",
        "create:domain",
    ] {
        env.crash_at(point, &create_args);
        let left = assert_consistent(&env, point);
        assert!(left.is_empty(), "{point}: {left:?}");
    }
    env.crash_at("create:done", &create_args);
    let left = assert_consistent(&env, "create:done");
    assert_eq!(left.len(), 1, "create:done: {left:?}");
    let done = left.into_iter().next().unwrap();

    // Start: whatever step the daemon died after, the workspace ends running or in error,
    // and starts.
    for point in ["start:transition", "start:defined", "start:started"] {
        env.crash_at(point, &["workspace", "start", &done]);
        assert_consistent(&env, point);
        env.wait_for_state_in(&done, &["running", "error"], Duration::from_secs(120));
        if env.state_of(&done) == "running" {
            env.ok(&["workspace", "stop", &done, "--force"]);
        }
        assert_startable(&env, &done, point);
    }

    // Delete: once it has begun, the delete is finished by the restart.
    for point in [
        "delete:marked",
        "delete:domain",
        "delete:reservation",
        "delete:volumes",
    ] {
        let ws = env.create_small_workspace("e2e", &[]);
        env.crash_at(point, &["workspace", "delete", &ws]);
        let left = assert_consistent(&env, point);
        assert!(!left.contains(&ws), "{point}: {ws} is still there");
    }
    env.ok(&["workspace", "delete", &done]);

    // Import: cut short, nothing of it stays; after its last step, it is there.
    let guest = image_dir("AETHER_E2E_TESTGUEST").unwrap();
    let disk = guest.join("disk.qcow2");
    let import = ["image", "import", "crashed", disk.to_str().unwrap()];
    for point in ["import:checked", "import:moved"] {
        env.crash_at(point, &import);
        assert_consistent(&env, point);
        assert!(!images(&env).contains("crashed"), "{point}");
    }
    env.crash_at("import:done", &import);
    assert_consistent(&env, "import:done");
    assert!(images(&env).contains("crashed"));
    env.ok(&["image", "delete", "crashed"]);
}

#[test]
#[ignore = "end-to-end: run by scripts/e2e.sh"]
fn a_kill_during_twenty_parallel_creates_leaves_only_complete_workspaces() {
    let mut env = testguest_env("");
    for round in 0..3u64 {
        let creates: Vec<_> = (0..20)
            .map(|_| {
                let cli = env.cli();
                std::thread::spawn(move || {
                    let mut cli = cli;
                    cli.args(["workspace", "create", "--project", "e2e"])
                        .args(SMALL_WORKSPACE)
                        .output()
                        .unwrap()
                })
            })
            .collect();
        // Somewhere in the middle of the creates, different in each round.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
        std::thread::sleep(Duration::from_millis(500 + (nanos + round * 977) % 2500));
        env.kill_daemon();
        for c in creates {
            c.join().unwrap();
        }
        env.start_daemon();
        let left = assert_consistent(&env, &format!("round {round}"));
        eprintln!("round {round}: {} of 20 creates left complete", left.len());
        // Every workspace that is left is complete: one of them boots.
        if let Some(ws) = left.iter().next() {
            assert_startable(&env, ws, &format!("round {round}"));
        }
        for ws in &left {
            env.ok(&["workspace", "delete", ws, "--force"]);
        }
        assert!(assert_consistent(&env, "after deleting").is_empty());
    }
}

/// Forgets workspace `ws` the way a lost answer does (a libvirt call that timed out and
/// went through later, a row removed by hand): its row goes, its domain, volumes and
/// reservation stay. The daemon must be stopped.
fn forget_row(env: &TestEnv, ws: &str) {
    let db = rusqlite::Connection::open(env.state_dir.join("aetherd.db")).unwrap();
    let n = db
        .execute("DELETE FROM workspaces WHERE id = ?1", [ws])
        .unwrap();
    assert_eq!(n, 1, "{ws} had a row");
}

#[test]
#[ignore = "end-to-end: run by scripts/e2e.sh"]
fn what_no_row_owns_is_removed_at_start_unless_its_vm_runs() {
    let mut env = testguest_env("");
    let stopped = env.create_small_workspace("e2e", &[]);
    let running = env.create_small_workspace("e2e", &[]);
    env.ok(&["workspace", "start", &running]);
    env.stop_daemon();
    forget_row(&env, &stopped);
    forget_row(&env, &running);
    env.start_daemon();
    // The socket accepts before reconcile ends; an answer comes after it.
    assert_eq!(env.listed_ids("workspace"), Vec::<String>::new());

    // The stopped one's domain, volume, seed and reservation are gone; the running VM is
    // left as it is, with its volumes.
    let domains = virsh_lines(&env, &["list", "--all", "--name"]);
    assert!(
        !domains.contains(&format!("aether-{stopped}")),
        "{domains:?}"
    );
    assert_eq!(
        env.virsh(&["domstate", &format!("aether-{running}")])
            .trim(),
        "running"
    );
    let pool = env.state_dir.join("pool");
    assert!(
        !pool.join(format!("{stopped}-root.qcow2")).exists(),
        "{}",
        env.daemon_log()
    );
    assert!(pool.join(format!("{running}-root.qcow2")).exists());
    assert!(
        env.daemon_log()
            .contains("an aether domain without a workspace is running"),
        "{}",
        env.daemon_log()
    );

    // Once it is off, the next start removes it too.
    env.virsh(&["destroy", &format!("aether-{running}")]);
    env.stop_daemon();
    env.start_daemon();
    assert!(assert_consistent(&env, "after the orphans went").is_empty());
    assert!(!virsh_lines(&env, &["list", "--all", "--name"]).contains(&format!("aether-{running}")));
}
