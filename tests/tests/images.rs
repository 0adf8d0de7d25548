//! Images and what workspaces get from them (volumes, seed, network reservation), through the
//! real binaries against libvirt's test driver.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use aether_tests::TestEnv;

mod hostile;

/// The names of the files in `dir`.
fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What an import may change: the image list and the pool, tmp and boot dirs.
fn footprint(env: &TestEnv) -> (Vec<String>, [BTreeSet<String>; 3]) {
    let names = env
        .json(&["image", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect();
    let dirs = ["pool", "tmp", "boot"].map(|d| entries(&env.state_dir.join(d)));
    (names, dirs)
}

#[test]
fn import_checks_format_backing_file_and_name() {
    let env = TestEnv::start();
    let raw = env.make_disk("plain.img", "raw", "64M");
    let img = env.json(&["image", "import", "from-raw", raw.to_str().unwrap()]);
    assert_eq!(img["format"], "qcow2", "raw is converted");
    assert_eq!(img["virtual_size_bytes"], 64 << 20);
    assert_eq!(img["boot_mode"], "bios");
    assert!(env.state_dir.join("pool/image-from-raw.qcow2").exists());

    let liar = env.make_disk("liar.qcow2", "raw", "16M");
    let err = env.fail(&["image", "import", "liar", liar.to_str().unwrap()]);
    assert_eq!(
        err,
        "aether: image refused: liar.qcow2 is raw, not qcow2 as its name says"
    );

    let base = env.make_disk("base.qcow2", "qcow2", "16M");
    let overlay = env.dir.path().join("overlay.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&overlay)
        .status()
        .unwrap();
    assert!(st.success());
    let err = env.fail(&["image", "import", "layered", overlay.to_str().unwrap()]);
    assert!(
        err.starts_with("aether: image refused: it has a backing file ("),
        "{err}"
    );

    let junk = env.dir.path().join("junk.vmdk");
    std::fs::write(&junk, b"not an image at all").unwrap();
    // qemu-img probes unknown bytes as raw; a .vmdk name claims nothing, so it is accepted as
    // raw only if it has a size; 19 bytes is a valid (tiny) raw disk. The name check and
    // format check are what protect here, so just make sure nothing half-imported remains.
    let _ = env.run(&["image", "import", "junk", junk.to_str().unwrap()]);

    let err = env.fail(&["image", "import", "Bad/Name", base.to_str().unwrap()]);
    assert!(err.contains("invalid image name"), "{err}");
    let err = env.fail(&["image", "import", "tiny", base.to_str().unwrap()]);
    assert_eq!(err, "aether: image tiny already exists");
    let err = env.fail(&["image", "import", "nofile", "/nonexistent/x.qcow2"]);
    assert!(err.contains("cannot open /nonexistent/x.qcow2"), "{err}");

    let names: Vec<String> = env
        .json(&["image", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        names.contains(&"tiny".to_owned()) && names.contains(&"from-raw".to_owned()),
        "{names:?}"
    );
    assert!(!names.contains(&"liar".to_owned()) && !names.contains(&"layered".to_owned()));
    // Failed imports leave no upload behind.
    let leftovers = std::fs::read_dir(env.state_dir.join("tmp"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0);

    let table = env.ok(&["image", "list"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "OWNER", "FORMAT", "SIZE", "BOOT", "IN-USE", "CREATED"]
    );
}

#[test]
fn hostile_images_are_refused_with_their_reason_and_leave_nothing_behind() {
    let env = TestEnv::start();
    let before = footprint(&env);
    for (i, h) in hostile::corpus(env.dir.path(), 64).iter().enumerate() {
        let name = format!("hostile-{i}");
        let r = env.run(&["image", "import", &name, h.file.to_str().unwrap()]);
        assert_eq!(r.code, 1, "{}: {r:?}", h.what);
        assert_eq!(r.stdout, "", "{}: {r:?}", h.what);
        assert_eq!(r.stderr.lines().count(), 1, "{}: one line: {r:?}", h.what);
        assert!(
            r.stderr.starts_with(&h.refusal),
            "{}: expected {:?}, got {:?}",
            h.what,
            h.refusal,
            r.stderr
        );
        assert_eq!(
            footprint(&env),
            before,
            "{}: something was left behind",
            h.what
        );
    }
    // Direct kernel boot changes nothing about it: the disk is still refused, the kernel
    // and initrd do not stay.
    let kernel = env.dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"kernel").unwrap();
    let data_file = &hostile::corpus(env.dir.path(), 64)[0];
    let err = env.fail(&[
        "image",
        "import",
        "hostile-kernel",
        data_file.file.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        kernel.to_str().unwrap(),
    ]);
    assert_eq!(err, data_file.refusal);
    assert_eq!(footprint(&env), before);
    // The daemon still takes a good image afterwards.
    let good = env.make_disk("good.qcow2", "qcow2", "64M");
    env.ok(&["image", "import", "good", good.to_str().unwrap()]);
}

#[test]
fn concurrent_imports_of_one_name_leave_exactly_one_complete_image() {
    let env = TestEnv::start();
    let disk = env.make_disk("race.qcow2", "qcow2", "256M");
    let len = std::fs::metadata(&disk).unwrap().len();
    for round in 0..4 {
        let name = format!("race-{round}");
        let children: Vec<_> = (0..6)
            .map(|_| {
                env.cli()
                    .args(["image", "import", &name, disk.to_str().unwrap()])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let runs: Vec<aether_tests::Run> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap().into())
            .collect();
        let won = runs.iter().filter(|r| r.code == 0).count();
        assert_eq!(won, 1, "round {round}: exactly one import wins: {runs:?}");
        for r in runs.iter().filter(|r| r.code != 0) {
            let line = r.stderr.trim_end();
            assert_eq!(r.code, 1, "{r:?}");
            assert!(
                line == format!("aether: image {name} is being imported")
                    || line == format!("aether: image {name} already exists"),
                "round {round}: {r:?}"
            );
        }
        let listed = env.json(&["image", "list"]);
        let image = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name.as_str())
            .unwrap_or_else(|| panic!("round {round}: {name} is not listed: {listed}"));
        assert_eq!(image["virtual_size_bytes"], 256 << 20);
        let pool_file = env.state_dir.join(format!("pool/image-{name}.qcow2"));
        let meta = std::fs::metadata(&pool_file)
            .unwrap_or_else(|e| panic!("round {round}: {}: {e}", pool_file.display()));
        assert_eq!(meta.len(), len, "round {round}: the pool file is the image");
        assert_eq!(entries(&env.state_dir.join("tmp")), BTreeSet::new());
    }
}

#[test]
fn a_restart_drops_an_interrupted_import_and_its_upload() {
    let mut env = TestEnv::start();
    // A server that sends the headers and 4 MiB of a 64 MiB body, then stalls until told.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut req = [0u8; 4096];
        let _ = conn.read(&mut req).unwrap();
        write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            64 << 20
        )
        .unwrap();
        // The write fails once the killed daemon's client gives up: that is expected.
        let _ = conn.write_all(&vec![0u8; 4 << 20]);
        let _ = released.recv_timeout(Duration::from_secs(60));
    });
    let url = format!("http://127.0.0.1:{port}/stalled.raw");
    let mut stalled = env
        .cli()
        .args(["image", "import", "stalled", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the daemon has staged part of the upload.
    let tmp = env.state_dir.join("tmp");
    let deadline = Instant::now() + Duration::from_secs(20);
    let staged = loop {
        let disk = entries(&tmp)
            .into_iter()
            .filter(|e| e.starts_with("upload-"))
            .map(|e| tmp.join(e).join("disk"))
            .find(|d| std::fs::metadata(d).is_ok_and(|m| m.len() > 0));
        if let Some(disk) = disk {
            break disk;
        }
        assert!(
            Instant::now() < deadline,
            "no upload staged: {:?}",
            entries(&tmp)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // The name is held while the upload runs.
    let disk = env.make_disk("stalled.qcow2", "qcow2", "16M");
    let err = env.fail(&["image", "import", "stalled", disk.to_str().unwrap()]);
    assert_eq!(err, "aether: image stalled is being imported");

    env.kill_daemon();
    // The client reads the stalled download until the server lets go.
    let _ = release.send(());
    server.join().unwrap();
    let _ = stalled.wait();
    assert!(staged.exists(), "the killed daemon left its upload");
    env.start_daemon();
    // The socket accepts before start-up is done; the first answer comes after it.
    env.ok(&["image", "list"]);
    assert_eq!(
        entries(&tmp),
        BTreeSet::new(),
        "the restart removed the upload"
    );
    let img = env.json(&["image", "import", "stalled", disk.to_str().unwrap()]);
    assert_eq!(img["virtual_size_bytes"], 16 << 20);
    assert!(env
        .daemon_log()
        .contains("dropped image imports and deletes interrupted by a restart"));
}

#[test]
fn import_from_a_loopback_http_url() {
    let env = TestEnv::start();
    let disk = env.make_disk("served.qcow2", "qcow2", "32M");
    let body = std::fs::read(&disk).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        // One request, then done: bounded by construction.
        let (mut conn, _) = listener.accept().unwrap();
        let mut req = [0u8; 4096];
        let n = conn.read(&mut req).unwrap();
        let head = String::from_utf8_lossy(&req[..n]).into_owned();
        write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        conn.write_all(&body).unwrap();
        head
    });
    let url = format!("http://127.0.0.1:{port}/images/served.qcow2");
    let img = env.json(&["image", "import", "served", &url]);
    assert_eq!(img["virtual_size_bytes"], 32 << 20);
    let head = server.join().unwrap();
    assert!(
        head.starts_with("GET /images/served.qcow2 HTTP/1.1"),
        "{head}"
    );
}

#[test]
fn kernel_boot_images_keep_kernel_initrd_and_cmdline() {
    let env = TestEnv::start();
    let disk = env.make_disk("k.qcow2", "qcow2", "64M");
    let kernel = env.dir.path().join("vmlinuz");
    let initrd = env.dir.path().join("initrd.img");
    std::fs::write(&kernel, b"kernel bytes").unwrap();
    std::fs::write(&initrd, b"initrd bytes").unwrap();
    let args = [
        "image",
        "import",
        "kboot",
        disk.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 quiet",
    ];
    let img = env.json(&args);
    assert_eq!(img["boot_mode"], "kernel");
    assert_eq!(img["cmdline"], "console=ttyS0 quiet");
    assert_eq!(
        std::fs::read(env.state_dir.join("boot/kboot/vmlinuz")).unwrap(),
        b"kernel bytes"
    );
    assert_eq!(
        std::fs::read(env.state_dir.join("boot/kboot/initrd.img")).unwrap(),
        b"initrd bytes"
    );

    let err = env.fail(&[
        "image",
        "import",
        "half",
        disk.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    assert!(err.contains("--kernel and --initrd go together"), "{err}");
    let err = env.fail(&[
        "image",
        "import",
        "x",
        disk.to_str().unwrap(),
        "--cmdline",
        "quiet",
    ]);
    assert!(err.contains("--cmdline needs --kernel"), "{err}");

    env.ok(&["project", "create", "k"]);
    let ws = env
        .ok(&["workspace", "create", "--project", "k", "--image", "kboot"])
        .trim()
        .to_owned();
    env.ok(&["workspace", "start", &ws]);
    env.ok(&["workspace", "delete", &ws, "--force"]);
    env.ok(&["image", "delete", "kboot"]);
    assert!(!env.state_dir.join("boot/kboot").exists());
}

#[test]
fn workspaces_get_volume_seed_and_address_and_give_them_back() {
    let env = TestEnv::start();
    env.ok(&["project", "create", "net"]);
    let a = env.json(&["workspace", "create", "--project", "net"]);
    let b = env.json(&["workspace", "create", "--project", "net"]);
    let (ida, idb) = (
        a["id"].as_str().unwrap().to_owned(),
        b["id"].as_str().unwrap().to_owned(),
    );
    let ip = |w: &serde_json::Value| w["ip_addresses"][0].as_str().unwrap().to_owned();
    assert_ne!(ip(&a), ip(&b), "each workspace gets its own reservation");
    let octets: Vec<u8> = ip(&a).split('.').map(|o| o.parse().unwrap()).collect();
    assert!(octets[3] >= 10 && octets[3] <= 250, "{octets:?}");
    assert_eq!(a["image"], "tiny");
    assert!(a["ssh_host_public_key"]
        .as_str()
        .unwrap()
        .starts_with("ssh-ed25519 "));
    assert!(!a["login_user"].as_str().unwrap().is_empty());
    let get = env.ok(&["workspace", "get", &ida]);
    assert_eq!(
        aether_tests::field(&get, "ip addresses"),
        Some(ip(&a)),
        "{get}"
    );

    // The seed disk is a real file in the pool; the daemon's key is authorized in it.
    let seed = env.state_dir.join(format!("pool/{ida}-seed.img"));
    assert!(seed.exists());
    assert!(env.state_dir.join("keys/id_ed25519.pub").exists());

    // The image is in use; it cannot be deleted while it is.
    let list = env.json(&["image", "list"]);
    assert_eq!(list[0]["in_use"], 2);
    let err = env.fail(&["image", "delete", "tiny"]);
    assert!(
        err.contains("image tiny is used by") && err.contains(&ida),
        "{err}"
    );

    // A volume smaller than the image is refused.
    let big = env.make_disk("big.qcow2", "qcow2", "30G");
    env.ok(&["image", "import", "big", big.to_str().unwrap()]);
    let err = env.fail(&[
        "workspace",
        "create",
        "--project",
        "net",
        "--image",
        "big",
        "--volume-size",
        "20",
    ]);
    assert!(
        err.contains("volume size 20 GiB is smaller than image big (30 GiB)"),
        "{err}"
    );
    let err = env.fail(&["workspace", "create", "--project", "net", "--image", "nope"]);
    assert_eq!(
        err,
        "aether: image nope not found: see aether image list, or import it with aether image import NAME FILE"
    );

    // Deleting gives the address back (to the end of the line: dnsmasq may still hold a
    // lease on it) and removes the seed.
    env.ok(&["workspace", "delete", &ida]);
    assert!(!seed.exists());
    let c = env.json(&["workspace", "create", "--project", "net"]);
    assert_ne!(ip(&c), ip(&a), "a fresh address comes before the freed one");
    env.ok(&["workspace", "delete", &idb]);
    env.ok(&["workspace", "delete", c["id"].as_str().unwrap()]);
    env.ok(&["image", "delete", "tiny"]);
    assert!(!env.state_dir.join("pool/image-tiny.qcow2").exists());
}

#[test]
fn console_log_of_a_workspace_without_boots_is_empty() {
    let env = TestEnv::start();
    env.ok(&["project", "create", "c"]);
    let ws = env
        .ok(&["workspace", "create", "--project", "c"])
        .trim()
        .to_owned();
    assert_eq!(env.ok(&["workspace", "logs", &ws, "--console"]), "");
    let err = env.fail(&["workspace", "logs", "ws-zzzzzz", "--console"]);
    assert_eq!(err, "aether: workspace ws-zzzzzz not found");
}
