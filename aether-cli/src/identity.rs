//! The user's SSH identity and login name, sent to the daemon when a workspace is created.
//!
//! Like Lima, the guest's login user is named after the invoking user; a name the daemon
//! would refuse ([`aether_domain::validate_login`]: root, so the guest's root account is left
//! alone, or not a portable login name) becomes `aether`. The key is the user's
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

/// The login user when the invoking user's name is not one the daemon accepts.
const FALLBACK_LOGIN: &str = "aether";

/// The login user for new workspaces.
pub fn login_user() -> String {
    let uid = nix::unistd::Uid::current();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_default();
    login_for(name)
}

/// `name` if the daemon accepts it as a login user, else [`FALLBACK_LOGIN`].
fn login_for(name: String) -> String {
    if aether_domain::validate_login(&name).is_ok() {
        name
    } else {
        FALLBACK_LOGIN.to_owned()
    }
}

/// The private key `find_or_create` would use, if there is one already.
pub fn existing(config_dir: &Path) -> Option<PathBuf> {
    let home = directories::BaseDirs::new().map(|d| d.home_dir().join(".ssh"));
    home.into_iter()
        .flat_map(|ssh| [ssh.join("id_ed25519"), ssh.join("id_rsa")])
        .chain([config_dir.join("ssh").join("id_ed25519")])
        .find(|k| k.exists() && k.with_extension("pub").exists())
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

#[cfg(test)]
mod tests {
    use aether_domain::validate_login;

    use super::{login_for, login_user, FALLBACK_LOGIN};

    /// The CLI's own copy of the rule accepted `root`, which the daemon refuses: the login it
    /// sends is now always one the shared rule accepts.
    #[test]
    fn the_login_sent_is_one_the_daemon_accepts() {
        assert!(validate_login("root").is_err());
        assert_eq!(login_for("root".into()), FALLBACK_LOGIN);
        for name in [
            "",
            "Alice",
            "1abc",
            "a b",
            "-oProxyCommand=x",
            &"a".repeat(33),
        ] {
            assert_eq!(login_for(name.into()), FALLBACK_LOGIN, "{name:?}");
        }
        for name in ["alice", "_svc", "dev-1"] {
            assert_eq!(login_for(name.into()), name);
        }
        assert!(validate_login(FALLBACK_LOGIN).is_ok());
        assert!(validate_login(&login_user()).is_ok());
    }
}
