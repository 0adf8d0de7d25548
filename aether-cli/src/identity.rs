//! The user's SSH identity and login name, sent to the daemon when a workspace is created.
//!
//! Like Lima, the guest's login user is named after the invoking user (root becomes
//! `aether`, so the guest's root account is left alone). The key is the user's
//! `~/.ssh/id_ed25519` or `~/.ssh/id_rsa`; without either, an ed25519 key is created once in
//! aether's config dir (`ssh-keygen`, run with an argument list, no shell).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

pub struct Identity {
    /// Private key file, for `ssh -i`.
    pub private_key: PathBuf,
    /// OpenSSH public key line.
    pub public_key: String,
}

/// The login user for new workspaces.
pub fn login_user() -> String {
    let uid = nix::unistd::Uid::current();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_default();
    if name.is_empty() || name == "root" || !valid_login(&name) {
        "aether".to_owned()
    } else {
        name
    }
}

/// `^[a-z_][a-z0-9_-]{0,31}$`: a portable Linux user name.
pub fn valid_login(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

pub fn find_or_create(config_dir: &Path) -> anyhow::Result<Identity> {
    if let Some(home) = directories::BaseDirs::new().map(|d| d.home_dir().to_owned()) {
        for name in ["id_ed25519", "id_rsa"] {
            let private_key = home.join(".ssh").join(name);
            let public = private_key.with_extension("pub");
            if private_key.exists() && public.exists() {
                return read(private_key, &public);
            }
        }
    }
    let dir = config_dir.join("ssh");
    let private_key = dir.join("id_ed25519");
    let public = dir.join("id_ed25519.pub");
    // ssh-keygen writes the private key before the public one: only both mean it is done.
    if !(private_key.exists() && public.exists()) {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        // Several first runs at once (a script creating workspaces in parallel) must not
        // race ssh-keygen on one file: the first creates the key, the others wait and read it.
        let lock_path = dir.join(".keygen.lock");
        let lock = std::fs::File::create(&lock_path)
            .with_context(|| format!("cannot create {}", lock_path.display()))?;
        lock.lock()
            .with_context(|| format!("cannot lock {}", lock_path.display()))?;
        if private_key.exists() && public.exists() {
            return read(private_key, &public);
        }
        // A key without its public half was cut short (never used): make it again, or
        // ssh-keygen would ask whether to overwrite it.
        let _ = std::fs::remove_file(&private_key);
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "aether", "-f"])
            .arg(&private_key)
            .status()
            .context("cannot run ssh-keygen to create an SSH key (install openssh-client)")?;
        if !status.success() {
            bail!("ssh-keygen failed creating {}", private_key.display());
        }
    }
    read(private_key, &public)
}

fn read(private_key: PathBuf, public: &Path) -> anyhow::Result<Identity> {
    let public_key = std::fs::read_to_string(public)
        .with_context(|| format!("cannot read {}", public.display()))?
        .trim()
        .to_owned();
    Ok(Identity {
        private_key,
        public_key,
    })
}
