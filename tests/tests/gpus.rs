//! GPUs from libvirt node devices: a test-driver host declaring fake PCI GPUs, each with its
//! sysfs directory (libvirt's `<path>`) in a fake sysfs tree of the test's.

use std::path::{Path, PathBuf};

use aether_tests::{host_xml, TestEnv};

/// The sysfs directory of the fake GPU on `bus` in the fake tree at `sysfs` (made here).
fn sysfs_dir(sysfs: &Path, bus: u32) -> PathBuf {
    let dir = sysfs.join(format!("devices/pci0000:00/0000:{bus:02x}:00.0"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn gpu(sysfs: &Path, bus: u32, vendor: (&str, &str), product: (&str, &str), group: u32) -> String {
    format!(
        r#"  <device>
    <name>pci_0000_{bus:02x}_00_0</name>
    <path>{}</path>
    <parent>computer</parent>
    <capability type='pci'>
      <class>0x030000</class>
      <domain>0</domain><bus>{bus}</bus><slot>0</slot><function>0</function>
      <product id='{}'>{}</product>
      <vendor id='{}'>{}</vendor>
      <iommuGroup number='{group}'><address domain='0x0000' bus='0x{bus:02x}' slot='0x00' function='0x0'/></iommuGroup>
    </capability>
  </device>
"#,
        sysfs_dir(sysfs, bus).display(),
        product.0,
        product.1,
        vendor.0,
        vendor.1
    )
}

const NVIDIA: (&str, &str) = ("0x10de", "NVIDIA Corporation");
const T4: (&str, &str) = ("0x1eb8", "TU104GL [Tesla T4]");
const AMD: (&str, &str) = ("0x1002", "Advanced Micro Devices, Inc. [AMD/ATI]");
const RX6800: (&str, &str) = ("0x73bf", "Navi 21 [Radeon RX 6800]");

fn gpu_host(sysfs: &Path) -> String {
    let devices = [
        gpu(sysfs, 1, NVIDIA, T4, 11),
        gpu(sysfs, 2, NVIDIA, T4, 12),
        gpu(sysfs, 3, AMD, RX6800, 13),
    ]
    .concat();
    host_xml(8, 32768).replace("</node>", &format!("{devices}</node>"))
}

fn offered(env: &TestEnv) -> Vec<(String, String, String)> {
    env.json(&["host", "info"])["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let field = |k: &str| g[k].as_str().unwrap().to_owned();
            (field("address"), field("kind"), field("driver"))
        })
        .collect()
}

/// The host's boot VGA device and a GPU a host driver is bound to are not offered, unless
/// `gpu_allow` names them (by address or kind).
#[test]
fn gpus_the_host_uses_are_offered_only_when_allowed() {
    let sysfs = tempfile::tempdir().unwrap();
    let host = gpu_host(sysfs.path());
    std::fs::write(sysfs_dir(sysfs.path(), 1).join("boot_vga"), "1\n").unwrap();
    std::fs::write(sysfs_dir(sysfs.path(), 2).join("boot_vga"), "0\n").unwrap();
    std::os::unix::fs::symlink(
        "../../../bus/pci/drivers/amdgpu",
        sysfs_dir(sysfs.path(), 3).join("driver"),
    )
    .unwrap();
    let t4 = |bus: u32| {
        (
            format!("0000:{bus:02x}:00.0"),
            "nvidia-tesla-t4".to_owned(),
            String::new(),
        )
    };
    let rx6800 = (
        "0000:03:00.0".to_owned(),
        "amd-radeon-rx-6800".to_owned(),
        "amdgpu".to_owned(),
    );

    let env = TestEnv::start_on_host(&host, "");
    assert_eq!(offered(&env), [t4(2)]);
    let log = env.daemon_log();
    assert!(log.contains("boot VGA") && log.contains("amdgpu"), "{log}");
    env.ok(&["project", "create", "g"]);
    let err = env.fail(&[
        "workspace",
        "create",
        "--project",
        "g",
        "--gpu-kind",
        "amd-radeon-rx-6800",
    ]);
    assert!(err.contains("unknown gpu kind"), "{err}");
    drop(env);

    let env = TestEnv::start_on_host(
        &host,
        "gpu_allow = [\"0000:01:00.0\", \"amd-radeon-rx-6800\"]\n",
    );
    assert_eq!(offered(&env), [t4(1), t4(2), rx6800]);
}

#[test]
fn gpus_are_discovered_named_and_held_exclusively() {
    let sysfs = tempfile::tempdir().unwrap();
    let env = TestEnv::start_on_host(&gpu_host(sysfs.path()), "");
    let host = env.json(&["host", "info"]);
    let kinds: Vec<&str> = host["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["nvidia-tesla-t4", "nvidia-tesla-t4", "amd-radeon-rx-6800"]
    );
    assert_eq!(host["gpus"][0]["address"], "0000:01:00.0");
    assert_eq!(host["gpus"][0]["iommu_group"], 11);
    assert_eq!(host["gpus"][0]["held_by"], "");
    assert_eq!(host["cpus"], 8);
    assert_eq!(host["memory_mib"], 32768);

    env.ok(&["project", "create", "g"]);
    let err = env.fail(&[
        "workspace",
        "create",
        "--project",
        "g",
        "--gpu-kind",
        "h100",
    ]);
    assert_eq!(
        err,
        "aether: unknown gpu kind \"h100\": this host has amd-radeon-rx-6800, nvidia-tesla-t4"
    );
    let create = || {
        env.ok(&[
            "workspace",
            "create",
            "--project",
            "g",
            "--memory",
            "512",
            "--gpu-kind",
            "nvidia-tesla-t4",
        ])
        .trim()
        .to_owned()
    };
    let (a, b, c) = (create(), create(), create());
    let row = env.ok(&["workspace", "list"]);
    assert!(row.contains("2cpu/512mb/gpu:nvidia-tesla-t4"), "{row}");
    env.ok(&["workspace", "start", &a]);
    env.ok(&["workspace", "start", &b]);
    let err = env.fail(&["workspace", "start", &c]);
    assert_eq!(
        err,
        format!("aether: all 2 GPU(s) of kind nvidia-tesla-t4 are in use (by {a}, {b}); stop one of those workspaces first")
    );
    assert_eq!(env.state_of(&c), "stopped");
    let held: Vec<String> = env.json(&["host", "info"])["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["held_by"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(held, [a.clone(), b.clone(), String::new()]);
    let table = env.ok(&["host", "info"]);
    assert!(
        table.contains("KIND") && table.contains("HELD BY") && table.contains(&a),
        "{table}"
    );

    // Stopping frees the GPU for the next start.
    env.ok(&["workspace", "stop", &a]);
    env.ok(&["workspace", "start", &c]);
    assert_eq!(
        env.json(&["host", "info"])["gpus"][0]["held_by"],
        c.as_str()
    );

    // Removing the GPU from a stopped workspace, or adding one, is a hardware update.
    env.ok(&["workspace", "update", &a, "--gpu-kind", ""]);
    assert!(env.json(&["workspace", "get", &a])["hardware"]["gpu_kind"] == "");
    env.ok(&[
        "workspace",
        "update",
        &a,
        "--gpu-kind",
        "amd-radeon-rx-6800",
    ]);
    env.ok(&["workspace", "start", &a]);
    assert_eq!(
        env.json(&["host", "info"])["gpus"][2]["held_by"],
        a.as_str()
    );
}
