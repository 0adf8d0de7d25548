//! cloud-init NoCloud seeds: `meta-data` and `user-data` on a small vfat disk labelled
//! `cidata`, written in-process with the `fatfs` crate (no mkfs, no mtools, no shell).
//!
//! Both files are emitted by a YAML serializer (`serde-saphyr`) from typed structs, so every
//! value is quoted or escaped as YAML needs whatever it holds; the values are validated as
//! well (user names match `^[a-z_][a-z0-9_-]{0,31}$`, public keys are parsed and re-assembled
//! from their parts, the host key is one this daemon generated), but the YAML does not rely
//! on it. The layout is block style with list items indented under their key, one key per
//! line and the private host key as a literal block (`|`): what cloud-init reads and also
//! what the tiny test guest's line-based parser accepts (see `images/testguest/README.md`).

use std::io::Write;
use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};
use crate::model::WorkspaceId;

/// Size of the seed disk: plenty for two small text files, and a valid FAT12 volume.
const SEED_BYTES: u64 = 1024 * 1024;

/// The login-user rule, shared with the CLI: `^[a-z_][a-z0-9_-]{0,31}$` and not `root`.
pub use aether_domain::validate_login;

const KEY_TYPES: [&str; 6] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
];

/// Parses an OpenSSH public key line and returns it normalised (`type base64 [comment]`);
/// a comment with unusual characters is dropped rather than passed on.
pub fn normalize_public_key(line: &str) -> Result<String> {
    let mut parts = line.split_whitespace();
    let bad = || {
        Error::invalid(format!(
            "invalid SSH public key {:?}: expected an OpenSSH public key line such as \"ssh-ed25519 AAAA... user@host\"",
            line.chars().take(40).collect::<String>()
        ))
    };
    let kind = parts.next().ok_or_else(bad)?;
    let body = parts.next().ok_or_else(bad)?;
    if !KEY_TYPES.contains(&kind)
        || body.len() < 16
        || body.len() > 8192
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
    {
        return Err(bad());
    }
    let comment: Vec<&str> = parts.collect();
    let comment = comment.join(" ");
    let safe = !comment.is_empty()
        && comment.len() <= 100
        && comment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@._+-".contains(&b));
    Ok(if safe {
        format!("{kind} {body} {comment}")
    } else {
        format!("{kind} {body}")
    })
}

/// An ed25519 key pair in OpenSSH format.
#[derive(Clone, Debug)]
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

/// Generates an ed25519 key pair with `ssh-keygen` (argument list, no shell) in `scratch`.
pub fn generate_ed25519(scratch: &Path, comment: &str) -> Result<KeyPair> {
    let dir = crate::files::fresh_dir(scratch, ".keygen")?;
    let key = dir.join("key");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(&key)
        .output()
        .map_err(|e| {
            Error::Internal(format!(
                "cannot run ssh-keygen (install openssh-client): {e}"
            ))
        })?;
    let result = if out.status.success() {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| Error::Internal(format!("cannot read {}: {e}", p.display())))
        };
        Ok(KeyPair {
            private: read(&key)?,
            public: read(&key.with_extension("pub"))?.trim().to_owned(),
        })
    } else {
        Err(Error::Internal(format!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// What goes into a workspace's seed; every field already validated.
pub struct Seed<'a> {
    pub workspace: &'a WorkspaceId,
    pub login_user: &'a str,
    /// Normalised public keys (the user's and the daemon's).
    pub authorized_keys: &'a [String],
    pub host_key: &'a KeyPair,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "kebab-case")]
struct MetaData<'a> {
    instance_id: &'a str,
    local_hostname: &'a str,
}

/// The cloud-config of a workspace, field by field as cloud-init names them.
#[derive(serde::Serialize)]
struct CloudConfig<'a> {
    hostname: &'a str,
    users: [User<'a>; 1],
    ssh_pwauth: bool,
    ssh_deletekeys: bool,
    ssh_keys: SshKeys<'a>,
    growpart: Growpart,
    resize_rootfs: bool,
}

#[derive(serde::Serialize)]
struct User<'a> {
    name: &'a str,
    shell: &'static str,
    sudo: &'static str,
    lock_passwd: bool,
    ssh_authorized_keys: &'a [String],
}

#[derive(serde::Serialize)]
struct SshKeys<'a> {
    /// A literal block (`|`), which both cloud-init and the test guest read.
    ed25519_private: serde_saphyr::LitStr<'a>,
    ed25519_public: &'a str,
}

#[derive(serde::Serialize)]
struct Growpart {
    mode: &'static str,
    devices: [&'static str; 1],
}

/// Block-style YAML with list items indented under their key (`key:` then `  - item`) and
/// no folding of long lines: the test guest's parser reads top-level keys from column 0 and
/// takes neither flow collections nor folded scalars. Strings that a YAML 1.1 reader
/// (PyYAML, cloud-init's) would take for another type (`yes`, `null`, `0x1f`) are quoted.
fn to_yaml(value: &impl serde::Serialize) -> Result<String> {
    let options = serde_saphyr::ser_options! {
        compact_list_indent: false,
        prefer_block_scalars: false,
    };
    serde_saphyr::to_string_with_options(value, options)
        .map_err(|e| Error::Internal(format!("cannot write the cloud-init seed: {e}")))
}

pub fn meta_data(seed: &Seed<'_>) -> Result<String> {
    to_yaml(&MetaData {
        instance_id: seed.workspace.as_str(),
        local_hostname: seed.workspace.as_str(),
    })
}

pub fn user_data(seed: &Seed<'_>) -> Result<String> {
    let config = CloudConfig {
        hostname: seed.workspace.as_str(),
        users: [User {
            name: seed.login_user,
            shell: "/bin/bash",
            sudo: "ALL=(ALL) NOPASSWD:ALL",
            lock_passwd: true,
            ssh_authorized_keys: seed.authorized_keys,
        }],
        ssh_pwauth: false,
        ssh_deletekeys: true,
        ssh_keys: SshKeys {
            ed25519_private: serde_saphyr::LitStr(&seed.host_key.private),
            ed25519_public: &seed.host_key.public,
        },
        growpart: Growpart {
            mode: "auto",
            devices: ["/"],
        },
        resize_rootfs: true,
    };
    Ok(format!("#cloud-config\n{}", to_yaml(&config)?))
}

/// Writes the seed disk image (vfat, label `cidata`) to `path`, replacing it atomically.
pub fn write_seed(path: &Path, seed: &Seed<'_>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let io =
        |e: std::io::Error| Error::Internal(format!("cannot write seed {}: {e}", tmp.display()));
    {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io)?;
        file.set_len(SEED_BYTES).map_err(io)?;
        fatfs::format_volume(
            &mut file,
            fatfs::FormatVolumeOptions::new().volume_label(*b"cidata     "),
        )
        .map_err(io)?;
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).map_err(io)?;
        let root = fs.root_dir();
        for (name, content) in [
            ("meta-data", meta_data(seed)?),
            ("user-data", user_data(seed)?),
        ] {
            let mut f = root.create_file(name).map_err(io)?;
            f.truncate().map_err(io)?;
            f.write_all(content.as_bytes()).map_err(io)?;
            f.flush().map_err(io)?;
        }
        drop(root);
        fs.unmount().map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::path::Path;
    use std::process::Command;

    use super::{
        generate_ed25519, meta_data, normalize_public_key, user_data, write_seed, KeyPair, Seed,
        SEED_BYTES,
    };
    use crate::model::WorkspaceId;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ7kq2l6Lr6l0m8QkzRkq2m4o0rJmS9b2y3vYw1u4x5z alice@laptop";

    #[test]
    fn public_keys_are_validated_and_normalised() {
        assert_eq!(normalize_public_key(KEY).unwrap(), KEY);
        let weird = KEY.replace("alice@laptop", "a\"b: c");
        assert_eq!(
            normalize_public_key(&weird).unwrap(),
            KEY.strip_suffix(" alice@laptop").unwrap()
        );
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
            "ssh-ed25519 AAAA\"; rm -rf /",
        ] {
            assert!(normalize_public_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn seed_is_a_vfat_volume_labelled_cidata_with_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let host_key = generate_ed25519(dir.path(), "ws-abc123").unwrap();
        assert!(host_key.public.starts_with("ssh-ed25519 "));
        assert!(host_key.private.contains("BEGIN OPENSSH PRIVATE KEY"));
        let ws = WorkspaceId::parse("ws-abc123").unwrap();
        let keys = vec![KEY.to_owned()];
        let seed = Seed {
            workspace: &ws,
            login_user: "alice",
            authorized_keys: &keys,
            host_key: &host_key,
        };
        let path = dir.path().join("seed.img");
        write_seed(&path, &seed).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SEED_BYTES);

        let file = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim(), "cidata");
        let read = |name: &str| {
            let mut s = String::new();
            fs.root_dir()
                .open_file(name)
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            s
        };
        assert_eq!(
            read("meta-data"),
            "instance-id: ws-abc123\nlocal-hostname: ws-abc123\n"
        );
        let ud = read("user-data");
        assert!(ud.starts_with("#cloud-config\n"), "{ud}");
        assert!(ud.contains("  - name: alice\n"), "{ud}");
        assert!(ud.contains(&format!("      - {KEY}\n")), "{ud}");
        assert!(
            ud.contains("  ed25519_private: |\n    -----BEGIN OPENSSH PRIVATE KEY-----\n"),
            "{ud}"
        );
        assert!(
            ud.contains(&format!("  ed25519_public: {}\n", host_key.public)),
            "{ud}"
        );
    }

    /// Reads YAML documents with PyYAML's `safe_load`, the parser cloud-init uses, and
    /// returns them as JSON; `None` (skip) when python3 or PyYAML is not installed.
    fn pyyaml(texts: &[String]) -> Option<Vec<serde_json::Value>> {
        use std::process::Stdio;
        let script = "import json, sys, yaml\n\
                      print(json.dumps([yaml.safe_load(t) for t in json.load(sys.stdin)]))";
        let mut child = Command::new("python3")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        let input = serde_json::to_vec(texts).unwrap();
        child.stdin.take().unwrap().write_all(&input).unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No module named 'yaml'") {
            return None;
        }
        assert!(out.status.success(), "PyYAML cannot read them: {err}");
        Some(serde_json::from_slice(&out.stdout).unwrap())
    }

    fn test_seed_parts() -> (tempfile::TempDir, KeyPair, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let host_key = generate_ed25519(dir.path(), "ws-abc123").unwrap();
        let other = KEY.replace("alice@laptop", "aetherd");
        (dir, host_key, vec![KEY.to_owned(), other])
    }

    /// Login users with YAML's special characters (the daemon refuses all of them).
    const NAMES: [&str; 20] = [
        "alice",
        "a: b",
        "a #b",
        "#a",
        "a\nb",
        "a\n  - name: root",
        "- a",
        "'a\"",
        "yes",
        "null",
        "0x1f",
        " a ",
        "a\\b",
        "[a]",
        "{a: b}",
        "*a",
        "&a",
        "!a",
        "|",
        "é",
    ];

    /// The login user is validated before a seed is written, but the seed must not depend on
    /// that: any name comes back from cloud-init's parser as exactly that name, and so do the
    /// keys and the host key.
    #[test]
    fn user_data_round_trips_through_pyyaml_whatever_the_login_user() {
        let (_dir, host_key, keys) = test_seed_parts();
        let ws = WorkspaceId::parse("ws-abc123").unwrap();
        let mut texts = Vec::new();
        for name in NAMES {
            let seed = Seed {
                workspace: &ws,
                login_user: name,
                authorized_keys: &keys,
                host_key: &host_key,
            };
            let ud = user_data(&seed).unwrap();
            assert!(ud.starts_with("#cloud-config\n"), "{ud}");
            texts.push(ud);
        }
        texts.push(
            meta_data(&Seed {
                workspace: &ws,
                login_user: "alice",
                authorized_keys: &keys,
                host_key: &host_key,
            })
            .unwrap(),
        );
        let Some(mut docs) = pyyaml(&texts) else {
            eprintln!("skipped: python3 has no PyYAML (the yaml module)");
            return;
        };
        assert_eq!(
            docs.pop().unwrap(),
            serde_json::json!({"instance-id": "ws-abc123", "local-hostname": "ws-abc123"})
        );
        assert_eq!(docs.len(), NAMES.len());
        for ((name, ud), doc) in NAMES.iter().zip(&texts).zip(&docs) {
            let users = doc["users"].as_array().unwrap();
            assert_eq!(users.len(), 1, "{ud}");
            assert_eq!(users[0]["name"], *name, "{ud}");
            assert_eq!(
                users[0]["ssh_authorized_keys"],
                serde_json::json!(keys),
                "{ud}"
            );
            assert_eq!(users[0]["shell"], "/bin/bash");
            assert_eq!(users[0]["sudo"], "ALL=(ALL) NOPASSWD:ALL");
            assert_eq!(users[0]["lock_passwd"], true);
            assert_eq!(doc["hostname"], "ws-abc123");
            assert_eq!(
                doc["ssh_keys"]["ed25519_private"],
                host_key.private.as_str()
            );
            assert_eq!(doc["ssh_keys"]["ed25519_public"], host_key.public.as_str());
            assert_eq!(doc["ssh_pwauth"], false);
            assert_eq!(doc["ssh_deletekeys"], true);
            assert_eq!(
                doc["growpart"],
                serde_json::json!({"mode": "auto", "devices": ["/"]})
            );
            assert_eq!(doc["resize_rootfs"], true);
        }
    }

    /// The tiny test guest reads user-data with its own awk script (in
    /// images/testguest/build.sh), not a YAML parser: what we write must be what it accepts.
    #[test]
    fn user_data_is_what_the_test_guest_parser_reads() {
        let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/testguest/build.sh");
        let Ok(build) = std::fs::read_to_string(&build) else {
            eprintln!("skipped: no {}", build.display());
            return;
        };
        let start = "cat >\"$R/etc/aether/userdata.awk\" <<'EOF'\n";
        let script = &build[build.find(start).expect("the awk script in build.sh") + start.len()..];
        let script = &script[..script.find("\nEOF\n").unwrap() + 1];
        let (dir, host_key, keys) = test_seed_parts();
        let ws = WorkspaceId::parse("ws-abc123").unwrap();
        let seed = Seed {
            workspace: &ws,
            login_user: "dev_1",
            authorized_keys: &keys,
            host_key: &host_key,
        };
        let awk = dir.path().join("userdata.awk");
        std::fs::write(&awk, script).unwrap();
        let ud = dir.path().join("user-data");
        std::fs::write(&ud, user_data(&seed).unwrap()).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        // The guest runs busybox awk; any POSIX awk reads the script the same way.
        let busybox = Path::new("/usr/bin/busybox").exists() || Path::new("/bin/busybox").exists();
        let mut cmd = if busybox {
            let mut c = Command::new("busybox");
            c.arg("awk");
            c
        } else {
            Command::new("awk")
        };
        let st = cmd
            .arg("-v")
            .arg(format!("out={}", out.display()))
            .arg("-f")
            .arg(&awk)
            .arg(&ud)
            .status()
            .unwrap();
        assert!(st.success());
        let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_default();
        assert_eq!(read("hostname"), "ws-abc123\n");
        assert_eq!(read("user"), "dev_1\n");
        assert_eq!(read("keys"), format!("{}\n{}\n", keys[0], keys[1]));
        assert_eq!(read("ed25519_private"), host_key.private);
    }
}
