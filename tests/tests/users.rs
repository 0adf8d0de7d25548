//! Several local users on one daemon: what a member may see and do to another member's
//! objects (nothing: they do not exist for it), what an outsider may do (nothing at all), and
//! the per-user quotas. Acts as the users `scripts/lib.sh` creates (`ensure_test_users`).

use aether_tests::{test_users, TestEnv, ALICE, BOB, EVE};

/// Alice's project and workspace (created as alice), and a stopped one to delete.
fn alices_things(env: &TestEnv) -> (String, String) {
    env.ok_as(ALICE, &["project", "create", "alice-app"]);
    let project = env.json(&["project", "get", "alice-app"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ws = env
        .ok_as(ALICE, &["workspace", "create", "--project", "alice-app"])
        .trim()
        .to_owned();
    (project, ws)
}

/// Every RPC of the service, from the proto file (the source of truth).
fn rpcs() -> Vec<String> {
    let proto = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../proto/aether/v1/aether.proto"
    ))
    .unwrap();
    proto
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| l.split('(').next().unwrap().trim().to_owned())
        .collect()
}

/// Each RPC with a command that calls it on alice's objects. For another member the object
/// does not exist; an outsider is refused before anything is looked at.
fn commands(project: &str, ws: &str) -> Vec<(&'static str, Vec<String>)> {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        ("GetProject", v(&["project", "get", project])),
        ("DeleteProject", v(&["project", "delete", project])),
        (
            "CreateWorkspace",
            v(&["workspace", "create", "--project", project]),
        ),
        ("GetWorkspace", v(&["workspace", "get", ws])),
        (
            "StartWorkspace",
            v(&["workspace", "start", ws, "--no-wait"]),
        ),
        ("StopWorkspace", v(&["workspace", "stop", ws, "--force"])),
        (
            "DeleteWorkspace",
            v(&["workspace", "delete", ws, "--force"]),
        ),
        (
            "UpdateWorkspace",
            v(&["workspace", "update", ws, "--cpus", "1"]),
        ),
        ("GetConsoleLog", v(&["workspace", "logs", ws, "--console"])),
        (
            "SnapshotWorkspace",
            v(&["workspace", "snapshot", "list", ws]),
        ),
        ("WatchWorkspaces", v(&["workspace", "watch", ws])),
        ("Tunnel", v(&["workspace", "proxy", ws])),
        ("Exec", v(&["workspace", "exec", ws, "--", "true"])),
        (
            "Terminal",
            v(&["workspace", "exec", "--tty", ws, "--", "true"]),
        ),
        ("ListTasks", v(&["task", "list", "--workspace", ws])),
        ("TaskLogs", v(&["task", "logs", "task-01234567"])),
        ("CancelTask", v(&["task", "cancel", "task-01234567"])),
    ]
}

#[test]
fn another_member_finds_none_of_alices_objects_and_an_outsider_is_refused_everything() {
    if !test_users() {
        return;
    }
    let env = TestEnv::start();
    let (project, ws) = alices_things(&env);
    let before = env.json(&["workspace", "get", &ws]);

    let targeted = commands(&project, &ws);
    // Calls without a target: listing and creating are allowed, and show only bob's own.
    let untargeted: Vec<(&str, Vec<&str>)> = vec![
        ("GetHostInfo", vec!["host", "info"]),
        ("CheckHost", vec!["doctor"]),
        ("ListCatalog", vec!["image", "catalog"]),
        // Names are per owner: bob may have an "alice-app" too, which tells him nothing.
        ("CreateProject", vec!["project", "create", "alice-app"]),
        ("ListProjects", vec!["-o", "json", "project", "list"]),
        ("ListWorkspaces", vec!["-o", "json", "workspace", "list"]),
        ("ListImages", vec!["image", "list"]),
    ];
    let admin_only: Vec<(&str, Vec<&str>)> = vec![("DeleteImage", vec!["image", "delete", "tiny"])];
    let import = env.make_disk("bob.qcow2", "qcow2", "64M");
    std::fs::set_permissions(&import, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let import = import.to_str().unwrap().to_owned();
    let import_cmd = vec!["image", "import", "bob-image", import.as_str()];

    // Every RPC of the service is walked.
    let mut covered: Vec<&str> = targeted.iter().map(|(r, _)| *r).collect();
    covered.extend(untargeted.iter().map(|(r, _)| *r));
    covered.extend(admin_only.iter().map(|(r, _)| *r));
    covered.push("ImportImage");
    for rpc in rpcs() {
        assert!(
            covered.contains(&rpc.as_str()),
            "RPC {rpc} is not walked by this test"
        );
    }

    for (rpc, args) in &targeted {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = env.run_as(BOB, &args);
        assert_eq!(r.code, 1, "{rpc} as another member: {r:?}");
        assert!(
            r.stderr.contains("not found"),
            "{rpc} as another member must say not found (not reveal it exists): {r:?}"
        );
    }
    for (rpc, args) in &untargeted {
        let r = env.run_as(BOB, args);
        assert_eq!(r.code, 0, "{rpc} as a member: {r:?}");
        assert!(
            !r.stdout.contains(&ws) && !r.stdout.contains(&project),
            "{rpc} shows alice's objects to bob: {}",
            r.stdout
        );
    }
    for (rpc, args) in &admin_only {
        let r = env.run_as(BOB, args);
        assert_eq!(r.code, 1, "{rpc} as a member: {r:?}");
        assert!(r.stderr.contains("ermission denied"), "{rpc}: {r:?}");
    }
    assert_eq!(
        env.run_as(BOB, &import_cmd).code,
        0,
        "a member may import an image"
    );

    // An outsider: refused everything, targeted or not.
    let all = targeted
        .iter()
        .map(|(r, a)| (*r, a.iter().map(String::as_str).collect::<Vec<_>>()))
        .chain(untargeted.iter().cloned())
        .chain(admin_only.iter().cloned())
        .chain([("ImportImage", import_cmd.clone())]);
    for (rpc, args) in all {
        let r = env.run_as(EVE, &args);
        assert_eq!(r.code, 1, "{rpc} as an outsider: {r:?}");
        assert!(
            r.stderr.to_lowercase().contains("permission denied"),
            "{rpc} as an outsider: {r:?}"
        );
    }

    // None of it changed alice's workspace.
    let after = env.json(&["workspace", "get", &ws]);
    assert_eq!(after["state"], before["state"]);
    assert_eq!(after["generation"], before["generation"]);
    assert_eq!(after["hardware"], before["hardware"]);
}

#[test]
fn quotas_cap_a_members_workspaces_volumes_and_running_vcpus_but_not_roots() {
    if !test_users() {
        return;
    }
    let env = TestEnv::start_on_host(
        aether_tests::TEST_HOST_XML,
        "[quota]\nworkspaces = 2\nvolume_gb = 30\nrunning_vcpus = 3\nupload_gb = 0\n",
    );
    env.ok_as(ALICE, &["project", "create", "a"]);
    let create = |extra: &[&str]| {
        let mut args = vec!["workspace", "create", "--project", "a"];
        args.extend_from_slice(extra);
        env.run_as(ALICE, &args)
    };
    let one = create(&["--cpus", "2", "--volume-size", "10"]);
    assert_eq!(one.code, 0, "{one:?}");
    let one = one.stdout.trim().to_owned();
    // 10 + 25 GiB is past volume_gb = 30.
    let big = create(&["--volume-size", "25"]);
    assert_eq!(big.code, 1);
    assert_eq!(
        big.stderr.trim(),
        format!(
            "aether: quota exceeded: uid {} would have 35 GiB of volumes (has 10, asks for 25); the cap is 30 (quota.volume_gb in the daemon's config)",
            uid(ALICE)
        )
    );
    let two = create(&["--cpus", "2", "--volume-size", "10"]);
    assert_eq!(two.code, 0, "{two:?}");
    let two = two.stdout.trim().to_owned();
    let third = create(&["--volume-size", "1"]);
    assert_eq!(third.code, 1);
    assert!(third.stderr.contains("quota.workspaces"), "{third:?}");
    // Growing a volume counts too.
    let grow = env.run_as(ALICE, &["workspace", "update", &one, "--volume-size", "21"]);
    assert!(
        grow.code == 1 && grow.stderr.contains("quota.volume_gb"),
        "{grow:?}"
    );

    env.ok_as(ALICE, &["workspace", "start", &one]);
    let start = env.run_as(ALICE, &["workspace", "start", &two]);
    assert!(
        start.code == 1 && start.stderr.contains("quota.running_vcpus"),
        "{start:?}"
    );
    assert_eq!(
        env.state_of(&two),
        "stopped",
        "a refused start changes nothing"
    );
    let listed = env.json(&["workspace", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(2));

    // upload_gb = 0: no member upload at all (one byte is past it), and nothing is kept.
    let disk = env.make_disk("alice.qcow2", "qcow2", "64M");
    std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let up = env.run_as(
        ALICE,
        &["image", "import", "alice-image", disk.to_str().unwrap()],
    );
    assert!(
        up.code == 1 && up.stderr.contains("quota.upload_gb"),
        "{up:?}"
    );
    assert!(!env.ok(&["image", "list"]).contains("alice-image"));

    // Root is not capped.
    env.ok(&["image", "import", "root-image", disk.to_str().unwrap()]);
    env.ok(&["project", "create", "r"]);
    for _ in 0..3 {
        env.ok(&[
            "workspace",
            "create",
            "--project",
            "r",
            "--volume-size",
            "20",
        ]);
    }
}

#[test]
fn images_belong_to_their_importer_and_roots_are_shared() {
    if !test_users() {
        return;
    }
    let env = TestEnv::start();
    let disk = env.make_disk("dev.qcow2", "qcow2", "64M");
    std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let disk = disk.to_str().unwrap();
    let (alice, bob) = (uid(ALICE), uid(BOB));
    let alices = format!("dev@{alice}");
    let bobs = format!("dev@{bob}");
    let ids = |user: Option<&str>| -> Vec<String> {
        let args = ["-o", "json", "image", "list"];
        let out = match user {
            Some(u) => env.ok_as(u, &args),
            None => env.ok(&args),
        };
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut ids: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    let create = |user: &str, project: &str, image: &str| {
        env.run_as(
            user,
            &[
                "workspace",
                "create",
                "--project",
                project,
                "--image",
                image,
            ],
        )
    };

    // Alice's import is hers: bob neither sees nor uses nor deletes it, by name or by id.
    let img = env.ok_as(ALICE, &["-o", "json", "image", "import", "dev", disk]);
    let img: serde_json::Value = serde_json::from_str(&img).unwrap();
    assert_eq!(
        (img["id"].as_str(), img["owner_uid"].as_u64()),
        (Some(alices.as_str()), Some(alice.into()))
    );
    assert!(env
        .state_dir
        .join(format!("pool/image-{alices}.qcow2"))
        .exists());
    assert_eq!(ids(Some(ALICE)), [alices.as_str(), "tiny"]);
    assert_eq!(ids(Some(BOB)), ["tiny"]);
    let table = env.ok_as(ALICE, &["image", "list"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..2], [alices.as_str(), ALICE], "{table}");
    env.ok_as(ALICE, &["project", "create", "a"]);
    env.ok_as(BOB, &["project", "create", "b"]);
    for image in ["dev", alices.as_str()] {
        let r = create(BOB, "b", image);
        assert_eq!(r.code, 1, "{r:?}");
        assert!(r.stderr.contains("not found"), "{image}: {r:?}");
        let r = env.run_as(BOB, &["image", "delete", image]);
        assert!(
            r.code == 1 && r.stderr.contains("not found"),
            "{image}: {r:?}"
        );
    }

    // Names are unique per owner: bob has a "dev" of his own, and root a shared one.
    env.ok_as(BOB, &["image", "import", "dev", disk]);
    env.ok(&["image", "import", "dev", disk]);
    let again = env.run_as(BOB, &["image", "import", "dev", disk]);
    assert_eq!(again.stderr.trim(), "aether: image dev already exists");
    let mut all = vec!["dev", alices.as_str(), bobs.as_str(), "tiny"];
    all.sort();
    assert_eq!(ids(None), all);
    assert_eq!(ids(Some(BOB)), ["dev", bobs.as_str(), "tiny"]);
    // A plain name is one's own image first, then the shared one.
    let image_of = |user: &str, project: &str, image: &str| {
        let r = create(user, project, image);
        assert_eq!(r.code, 0, "{r:?}");
        env.json(&["workspace", "get", r.stdout.trim()])["image"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(image_of(ALICE, "a", "dev"), alices);
    assert_eq!(image_of(BOB, "b", "dev"), bobs);
    assert_eq!(image_of(BOB, "b", "tiny"), "tiny");
    let used = env.run_as(ALICE, &["image", "delete", "dev"]);
    assert!(
        used.code == 1 && used.stderr.contains("is used by"),
        "{used:?}"
    );

    // A member deletes its own image; the shared one is root's to delete.
    let listed = env.json(&["workspace", "list"]);
    for ws in listed.as_array().unwrap() {
        if ws["image"] == alices.as_str() {
            env.ok(&["workspace", "delete", ws["id"].as_str().unwrap(), "--force"]);
        }
    }
    env.ok_as(ALICE, &["image", "delete", "dev"]);
    assert!(!env
        .state_dir
        .join(format!("pool/image-{alices}.qcow2"))
        .exists());
    assert_eq!(image_of(ALICE, "a", "dev"), "dev", "then the shared one");
    let shared = env.run_as(ALICE, &["image", "delete", "dev"]);
    assert_eq!(
        shared.stderr.trim(),
        "aether: permission denied: image dev is shared by root; only root may delete it"
    );
    assert_eq!(ids(None), ["dev", bobs.as_str(), "tiny"]);
}

fn uid(user: &str) -> u32 {
    let out = std::process::Command::new("id")
        .args(["-u", user])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}
