//! GPUs from libvirt node devices: a test-driver host declaring fake PCI GPUs.

use aether_tests::{host_xml, TestEnv};

fn gpu(bus: u32, vendor: (&str, &str), product: (&str, &str), group: u32) -> String {
    format!(
        r#"  <device>
    <name>pci_0000_{bus:02x}_00_0</name>
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
        product.0, product.1, vendor.0, vendor.1
    )
}

fn gpu_host() -> String {
    let nvidia = ("0x10de", "NVIDIA Corporation");
    let t4 = ("0x1eb8", "TU104GL [Tesla T4]");
    let devices = [
        gpu(1, nvidia, t4, 11),
        gpu(2, nvidia, t4, 12),
        gpu(
            3,
            ("0x1002", "Advanced Micro Devices, Inc. [AMD/ATI]"),
            ("0x73bf", "Navi 21 [Radeon RX 6800]"),
            13,
        ),
    ]
    .concat();
    host_xml(8, 32768).replace("</node>", &format!("{devices}</node>"))
}

#[test]
fn gpus_are_discovered_named_and_held_exclusively() {
    let env = TestEnv::start_on_host(&gpu_host(), "");
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
