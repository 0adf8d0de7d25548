//! `aether image pull` against a loopback HTTP server that serves a real qcow2 and its
//! checksum file, and misbehaves on purpose: every way a download can go wrong is refused
//! with one line, or resumed, and a refused pull keeps nothing.

use std::process::Command;
use std::time::Duration;

use aether_tests::http::{HttpServer, Mode};
use aether_tests::{TestEnv, TEST_HOST_XML};

struct Pull {
    env: TestEnv,
    server: HttpServer,
    disk: Vec<u8>,
    catalog: tempfile::TempDir,
}

fn sha256(data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("data");
    std::fs::write(&f, data).unwrap();
    let out = Command::new("sha256sum").arg(&f).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

impl Pull {
    fn start() -> Pull {
        let catalog = tempfile::tempdir().unwrap();
        let env = TestEnv::start_on_host(
            TEST_HOST_XML,
            &format!("image_catalog_dir = \"{}\"\n", catalog.path().display()),
        );
        let disk = std::fs::read(env.make_disk("stock.qcow2", "qcow2", "64M")).unwrap();
        let server = HttpServer::start();
        let pull = Pull {
            env,
            server,
            disk,
            catalog,
        };
        pull.serve(Mode::Whole);
        pull.sums(&format!("{}  stock-amd64.qcow2\n", sha256(&pull.disk)));
        pull.entry("stock", "/images/stock-amd64.qcow2", "uefi");
        pull
    }

    fn serve(&self, mode: Mode) {
        self.server
            .set("/images/stock-amd64.qcow2", self.disk.clone(), mode);
    }

    fn sums(&self, text: &str) {
        self.server
            .set("/images/SHA256SUMS", text.as_bytes().to_vec(), Mode::Whole);
    }

    /// A catalog file with one entry `name` for the server's `path`.
    fn entry(&self, name: &str, path: &str, boot: &str) {
        std::fs::write(
            self.catalog.path().join(format!("{name}.toml")),
            format!(
                "[[image]]\nname = \"{name}\"\ndescription = \"a test image\"\nurl = \"{}\"\nchecksum_url = \"{}\"\nchecksum = \"sha256\"\nboot = \"{boot}\"\nmin_disk_gb = 1\n",
                self.server.url(path),
                self.server.url("/images/SHA256SUMS")
            ),
        )
        .unwrap();
    }

    fn images(&self) -> Vec<String> {
        self.env.listed_ids("image")
    }

    /// The files the CLI's download cache holds.
    fn cached(&self) -> Vec<String> {
        std::fs::read_dir(self.env.dir.path().join(".cache/aether/pull"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A pull that must be refused: its one-line reason (after the notes of resumed tries,
    /// if any), with nothing imported.
    fn refused(&self, args: &[&str]) -> String {
        let r = self.env.run(args);
        assert_eq!(r.code, 1, "{r:?}");
        let lines: Vec<&str> = r.stderr.lines().collect();
        let (reason, notes) = lines.split_last().expect("a reason");
        for note in notes {
            assert!(note.starts_with("aether: download interrupted ("), "{r:?}");
        }
        assert!(reason.starts_with("aether: "), "{r:?}");
        assert!(!self.images().contains(&"stock".to_owned()), "{r:?}");
        (*reason).to_owned()
    }
}

#[test]
fn the_catalog_lists_shipped_and_local_entries() {
    let p = Pull::start();
    let table = p.env.ok(&["image", "catalog"]);
    let first = table.lines().next().unwrap();
    assert!(
        first.starts_with("NAME") && first.contains("DESCRIPTION"),
        "{table}"
    );
    for name in [
        "ubuntu-22.04",
        "ubuntu-24.04",
        "debian-12",
        "debian-13",
        "stock",
    ] {
        assert!(
            table.lines().any(|l| l.starts_with(name)),
            "{name}: {table}"
        );
    }
    let list = p.env.json(&["image", "catalog"]);
    let stock = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "stock")
        .unwrap();
    assert_eq!(stock["boot_mode"], "uefi");
    assert_eq!(stock["checksum_algorithm"], "sha256");
    assert_eq!(stock["url"], p.server.url("/images/stock-amd64.qcow2"));
    let err = p.env.fail(&["image", "pull", "nope"]);
    assert_eq!(
        err,
        "aether: nope is not in the image catalog; see aether image catalog"
    );
}

#[test]
fn a_pull_verifies_imports_with_the_boot_mode_and_keeps_no_download() {
    let p = Pull::start();
    // Through a redirect within the same server, as mirrors do; the checksum file names
    // the file the catalog's URL ends in.
    p.entry("stock", "/latest/stock.qcow2", "uefi");
    p.sums(&format!("{} *stock.qcow2\n", sha256(&p.disk)));
    p.server.set(
        "/latest/stock.qcow2",
        Vec::new(),
        Mode::Redirect("/images/stock.qcow2".into()),
    );
    p.server
        .set("/images/stock.qcow2", p.disk.clone(), Mode::Whole);
    p.env.ok(&["image", "pull", "stock"]);
    let list = p.env.json(&["image", "list"]);
    let img = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "stock")
        .unwrap();
    assert_eq!(img["boot_mode"], "uefi", "{list}");
    assert!(p.cached().is_empty(), "{:?}", p.cached());
    // Under another name too.
    p.env.ok(&["image", "pull", "stock", "--as", "stock-copy"]);
    assert!(p.images().contains(&"stock-copy".to_owned()));
}

#[test]
fn a_wrong_byte_a_wrong_checksum_or_none_is_refused_and_nothing_kept() {
    let p = Pull::start();
    let mut corrupt = p.disk.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x01;
    p.server
        .set("/images/stock-amd64.qcow2", corrupt, Mode::Whole);
    let err = p.refused(&["image", "pull", "stock"]);
    assert!(
        err.starts_with("aether: checksum mismatch: stock-amd64.qcow2 has sha256 "),
        "{err}"
    );
    assert!(err.ends_with("; nothing was kept"), "{err}");
    assert!(p.cached().is_empty(), "{:?}", p.cached());

    p.serve(Mode::Whole);
    p.sums(&format!("{}  stock-amd64.qcow2\n", "0".repeat(64)));
    let err = p.refused(&["image", "pull", "stock"]);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(p.cached().is_empty(), "{:?}", p.cached());

    p.sums(&format!("{}  another-file.qcow2\n", sha256(&p.disk)));
    let err = p.refused(&["image", "pull", "stock"]);
    assert!(
        err.contains("has no sha256 line for stock-amd64.qcow2; refusing an unverified image"),
        "{err}"
    );
    p.server.set(
        "/images/SHA256SUMS",
        Vec::new(),
        Mode::Redirect("/gone".into()),
    );
    let err = p.refused(&["image", "pull", "stock"]);
    assert!(
        err.contains("cannot download the checksum file") && err.contains("HTTP 404"),
        "{err}"
    );
    assert!(p.cached().is_empty(), "{:?}", p.cached());
}

#[test]
fn a_redirect_to_another_host_is_refused() {
    let p = Pull::start();
    // Another loopback address: never connected to, the redirect is refused first.
    let elsewhere = format!(
        "http://127.0.0.2:{}/images/stock-amd64.qcow2",
        p.server.addr.port()
    );
    p.server.set(
        "/images/stock-amd64.qcow2",
        Vec::new(),
        Mode::Redirect(elsewhere.clone()),
    );
    let r = p.env.run(&["image", "pull", "stock"]);
    assert_eq!(r.code, 1, "{r:?}");
    // Refused at once, in one line: the server's answer is not worth another try.
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("redirects to another host ({elsewhere})")),
        "{r:?}"
    );
    let asked = p
        .server
        .requests()
        .iter()
        .filter(|(path, _)| path == "/images/stock-amd64.qcow2")
        .count();
    assert_eq!(asked, 1);
    assert!(!p.images().contains(&"stock".to_owned()));
}

#[test]
fn a_cut_or_stalled_download_resumes_where_it_stopped() {
    let p = Pull::start();
    let eighth = p.disk.len() / 8;
    // Cut once: resumed within the same pull, from where it stopped.
    p.serve(Mode::CutAfter {
        bytes: eighth,
        times: 1,
    });
    let r = p.env.run(&["image", "pull", "stock"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("resuming (1/5)"), "{r:?}");
    let ranges: Vec<Option<u64>> = p
        .server
        .requests()
        .into_iter()
        .filter(|(path, _)| path == "/images/stock-amd64.qcow2")
        .map(|(_, range)| range)
        .collect();
    assert_eq!(ranges, [None, Some(eighth as u64)]);
    p.env.ok(&["image", "delete", "stock"]);

    // Stalled: after --stall-timeout without a byte, a new connection picks it up.
    p.serve(Mode::StallAfter {
        bytes: eighth,
        pause: Duration::from_secs(20),
        times: 1,
    });
    let began = std::time::Instant::now();
    let r = p
        .env
        .run(&["image", "pull", "stock", "--stall-timeout", "1"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("resuming (1/5)"), "{r:?}");
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "it waited for the stalled server"
    );
    p.env.ok(&["image", "delete", "stock"]);

    // Cut every time: the pull gives up, keeps what arrived (5 eighths), and the next pull
    // resumes it.
    p.serve(Mode::CutAfter {
        bytes: eighth,
        times: 5,
    });
    let err = p.refused(&["image", "pull", "stock"]);
    assert!(
        err.contains("after 5 tries") && err.contains("the next pull resumes it"),
        "{err}"
    );
    assert_eq!(p.cached().len(), 1, "{:?}", p.cached());
    p.serve(Mode::Whole);
    let before = p.server.requests().len();
    p.env.ok(&["image", "pull", "stock"]);
    let resumed = &p.server.requests()[before..];
    assert!(
        resumed
            .iter()
            .any(|(path, range)| path == "/images/stock-amd64.qcow2"
                && *range == Some(5 * eighth as u64)),
        "{resumed:?}"
    );
    assert!(p.cached().is_empty(), "{:?}", p.cached());
}
