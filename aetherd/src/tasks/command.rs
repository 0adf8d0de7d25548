//! What a task runs: the remote command line (each word shell-quoted, validated), the
//! daemon's `ssh` arguments (no ssh config, agent or forwarding; the workspace's pinned host
//! key).

use std::ffi::OsString;
use std::path::Path;

use crate::error::{Error, Result};

/// What `exec` is asked to run.
#[derive(Clone, Debug, Default)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: String,
}

/// POSIX shell single-quoting: the guest's login shell gets each word back unchanged.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The remote command line for `spec` (validated: no NUL anywhere, sane env names).
pub fn remote_command(spec: &ExecSpec) -> Result<String> {
    if spec.argv.is_empty() {
        return Err(Error::invalid(
            "no command given: aether workspace exec ID -- CMD...",
        ));
    }
    let nul = |s: &str| s.contains('\0');
    if spec.argv.iter().any(|a| nul(a)) || nul(&spec.workdir) {
        return Err(Error::invalid(
            "commands and paths cannot contain NUL bytes",
        ));
    }
    let mut cmd = String::new();
    if !spec.workdir.is_empty() {
        cmd.push_str(&format!("cd {} && ", sh_quote(&spec.workdir)));
    }
    if !spec.env.is_empty() {
        cmd.push_str("env ");
        for (k, v) in &spec.env {
            let ok = k
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok || nul(v) {
                return Err(Error::invalid(format!(
                    "invalid environment variable {k:?}: names match ^[A-Za-z_][A-Za-z0-9_]*$"
                )));
            }
            cmd.push_str(&sh_quote(&format!("{k}={v}")));
            cmd.push(' ');
        }
    }
    let words: Vec<String> = spec.argv.iter().map(|a| sh_quote(a)).collect();
    cmd.push_str(&words.join(" "));
    Ok(cmd)
}

/// The arguments of the daemon's `ssh` to a workspace. Nothing of the host's or root's ssh
/// setup applies: no config file (`-F /dev/null`, neither `/etc/ssh/ssh_config` nor
/// `~/.ssh/config`), no agent (`IdentityAgent=none`), only the daemon's key
/// (`IdentitiesOnly`), no agent or X11 forwarding (`-a`, `-x`) or any other forwarding, no
/// tty, never a prompt (`BatchMode`), and only the workspace's pinned host key
/// (`known_hosts`, under `alias`; the system's known hosts are not read).
pub fn ssh_args(
    key: &Path,
    known_hosts: &Path,
    alias: &str,
    user: &str,
    ip: std::net::Ipv4Addr,
    remote: &str,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["-F", "/dev/null", "-a", "-x", "-T", "-i"]
        .iter()
        .map(OsString::from)
        .collect();
    args.push(key.as_os_str().to_owned());
    let mut known = OsString::from("UserKnownHostsFile=");
    known.push(known_hosts.as_os_str());
    for opt in [
        OsString::from("IdentitiesOnly=yes"),
        "IdentityAgent=none".into(),
        "BatchMode=yes".into(),
        "ForwardAgent=no".into(),
        "ForwardX11=no".into(),
        "ClearAllForwardings=yes".into(),
        "PermitLocalCommand=no".into(),
        "StrictHostKeyChecking=yes".into(),
        known,
        "GlobalKnownHostsFile=/dev/null".into(),
        format!("HostKeyAlias={alias}").into(),
        "UpdateHostKeys=no".into(),
        "ConnectTimeout=10".into(),
        "LogLevel=ERROR".into(),
    ] {
        args.push("-o".into());
        args.push(opt);
    }
    for a in ["-l", user, "-p", "22", &ip.to_string(), "--", remote] {
        args.push(a.into());
    }
    args
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{remote_command, sh_quote, ssh_args, ExecSpec};

    #[test]
    fn quoting_keeps_every_word() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        let spec = ExecSpec {
            argv: vec!["echo".into(), "$(rm -rf /)".into(), "a'b".into()],
            env: vec![("GREETING".into(), "hi there".into())],
            workdir: "/tmp/x y".into(),
        };
        assert_eq!(
            remote_command(&spec).unwrap(),
            r"cd '/tmp/x y' && env 'GREETING=hi there' 'echo' '$(rm -rf /)' 'a'\''b'"
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        let spec = |argv: Vec<&str>, env: Vec<(&str, &str)>| ExecSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            env: env.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
            workdir: String::new(),
        };
        assert!(remote_command(&spec(vec![], vec![])).is_err());
        assert!(remote_command(&spec(vec!["a\0b"], vec![])).is_err());
        for bad in ["1X", "A-B", "", "A B", "A=B"] {
            assert!(
                remote_command(&spec(vec!["true"], vec![(bad, "v")])).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_daemons_ssh_reads_no_config_and_forwards_nothing() {
        let args = ssh_args(
            Path::new("/var/lib/aether/keys/id_ed25519"),
            Path::new("/var/lib/aether/tasks/known_hosts-ws-abc123"),
            "ws-abc123",
            "alice",
            std::net::Ipv4Addr::new(192, 168, 150, 7),
            "'echo' 'hi'",
        );
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        let opts: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-o")
            .map(|w| w[1])
            .collect();
        assert_eq!(
            &args[..2],
            ["-F", "/dev/null"],
            "no system or user ssh config"
        );
        for flag in ["-a", "-x", "-T"] {
            assert!(args.contains(&flag), "{flag}: {args:?}");
        }
        for opt in [
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
            "BatchMode=yes",
            "ForwardAgent=no",
            "ForwardX11=no",
            "ClearAllForwardings=yes",
            "StrictHostKeyChecking=yes",
            "UserKnownHostsFile=/var/lib/aether/tasks/known_hosts-ws-abc123",
            "GlobalKnownHostsFile=/dev/null",
            "HostKeyAlias=ws-abc123",
        ] {
            assert!(opts.contains(&opt), "{opt}: {args:?}");
        }
        let keys: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-i")
            .map(|w| w[1])
            .collect();
        assert_eq!(
            keys,
            ["/var/lib/aether/keys/id_ed25519"],
            "only the daemon's key"
        );
        assert!(
            !args
                .iter()
                .any(|a| a.starts_with("-A") || a.starts_with("-X") || a.starts_with("-Y")),
            "{args:?}"
        );
        // The remote command is one word after `--`, as quoted for the guest's shell.
        let n = args.len();
        assert_eq!(
            &args[n - 7..],
            [
                "-l",
                "alice",
                "-p",
                "22",
                "192.168.150.7",
                "--",
                "'echo' 'hi'"
            ]
        );
    }
}
