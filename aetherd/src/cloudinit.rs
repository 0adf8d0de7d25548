//! cloud-init NoCloud seeds: `meta-data` and `user-data` on a small vfat disk labelled
//! `cidata`, written in-process with the `fatfs` crate (no mkfs, no mtools, no shell).
//!
//! The user-data is block-style YAML built line by line from validated values only: user
//! names match `^[a-z_][a-z0-9_-]{0,31}$`, public keys are parsed and re-assembled from their
//! parts, and the host key is one this daemon generated. That fixed layout is also what the
//! tiny test guest's parser accepts (see `images/testguest/README.md`).

use std::io::Write;
use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};
use crate::model::WorkspaceId;

/// Size of the seed disk: plenty for two small text files, and a valid FAT12 volume.
const SEED_BYTES: u64 = 1024 * 1024;

/// A portable Linux login name.
pub fn validate_login(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
        && name != "root";
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid login user {name:?}: use 1-32 lowercase letters, digits, '_' and '-', starting with a letter or '_' (not root)"
        )))
    }
}

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

pub fn meta_data(seed: &Seed<'_>) -> String {
    format!(
        "instance-id: {id}\nlocal-hostname: {id}\n",
        id = seed.workspace
    )
}

pub fn user_data(seed: &Seed<'_>) -> String {
    let mut y = String::from("#cloud-config\n");
    y.push_str(&format!("hostname: {}\n", seed.workspace));
    y.push_str("users:\n");
    y.push_str(&format!("  - name: {}\n", seed.login_user));
    y.push_str("    shell: /bin/bash\n");
    y.push_str("    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n");
    y.push_str("    lock_passwd: true\n");
    y.push_str("    ssh_authorized_keys:\n");
    for k in seed.authorized_keys {
        y.push_str(&format!("      - \"{k}\"\n"));
    }
    y.push_str("ssh_pwauth: false\n");
    y.push_str("ssh_deletekeys: true\n");
    y.push_str("ssh_keys:\n");
    y.push_str("  ed25519_private: |\n");
    for line in seed.host_key.private.lines() {
        y.push_str(&format!("    {line}\n"));
    }
    y.push_str(&format!("  ed25519_public: \"{}\"\n", seed.host_key.public));
    y.push_str("growpart:\n  mode: auto\n  devices: [\"/\"]\nresize_rootfs: true\n");
    y
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
            ("meta-data", meta_data(seed)),
            ("user-data", user_data(seed)),
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
    use super::*;
    use std::io::Read;

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
    fn login_names() {
        for good in ["alice", "_svc", "dev-1"] {
            assert!(validate_login(good).is_ok(), "{good}");
        }
        for bad in ["", "root", "Alice", "1abc", "a b", "a:b", &"a".repeat(33)] {
            assert!(validate_login(bad).is_err(), "{bad}");
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
        assert!(ud.contains(&format!("      - \"{KEY}\"\n")), "{ud}");
        assert!(
            ud.contains("  ed25519_private: |\n    -----BEGIN OPENSSH PRIVATE KEY-----\n"),
            "{ud}"
        );
        assert!(
            ud.contains(&format!("  ed25519_public: \"{}\"\n", host_key.public)),
            "{ud}"
        );
    }
}
