//! Terminals: an interactive PTY in a running workspace (the `Terminal` RPC), over an SSH
//! connection of the daemon's own, in-process (russh): the daemon's key, the workspace's
//! login user, and only the workspace's pinned host key. Nothing of the host's ssh setup is
//! read, no agent and no forwarding is asked for.
//!
//! ```text
//!  client ──input/resize──► from_client ──data/window-change──► SSH channel (PTY)
//!  client ◄──output, exit── to_client   ◄──data, exit status─── SSH channel
//! ```
//!
//! Invariants: a terminal ends when the guest closes the channel (its last message then
//! carries the exit code), when the client's stream ends or fails (the channel is closed, the
//! guest's side gets SIGHUP), or when the client stops listening. The [`ConnectionGuard`] is
//! dropped before the client sees the end, as for tunnels.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Sig};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};

use crate::error::{Error, Result};
use crate::tasks::command::{remote_command, ExecSpec};
use crate::tunnel::ConnectionGuard;

/// How long the SSH handshake and login may take, after the TCP connection.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest keystroke message a client may send.
pub const MAX_INPUT: usize = 64 * 1024;
/// Largest window, either way.
pub const MAX_SIZE: u32 = 1000;
/// TERM when the client names none.
pub const DEFAULT_TERM: &str = "xterm-256color";

/// A window size, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub cols: u32,
    pub rows: u32,
}

impl Size {
    /// `None` (not given): 80x24; otherwise both in 1..=[`MAX_SIZE`].
    pub fn new(size: Option<(u32, u32)>) -> Result<Size> {
        let Some((cols, rows)) = size else {
            return Ok(Size { cols: 80, rows: 24 });
        };
        let ok = |n: u32| (1..=MAX_SIZE).contains(&n);
        if !ok(cols) || !ok(rows) {
            return Err(Error::invalid(format!(
                "invalid terminal size {cols}x{rows}: columns and rows are 1-{MAX_SIZE}"
            )));
        }
        Ok(Size { cols, rows })
    }
}

/// What a terminal runs, validated before anything is looked at.
#[derive(Clone, Debug)]
pub struct TermSpec {
    /// The remote command line, already quoted; `None`: the login shell.
    pub command: Option<String>,
    pub term: String,
    pub size: Size,
}

impl TermSpec {
    pub fn new(exec: &ExecSpec, term: &str, size: Option<(u32, u32)>) -> Result<TermSpec> {
        let term = if term.is_empty() {
            DEFAULT_TERM.to_owned()
        } else if term.len() <= 64
            && term
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-' | '_'))
        {
            term.to_owned()
        } else {
            return Err(Error::invalid(format!(
                "invalid TERM {term:?}: letters, digits and .+-_ only, at most 64"
            )));
        };
        let command = if exec.argv.is_empty() {
            if !exec.env.is_empty() || !exec.workdir.is_empty() {
                return Err(Error::invalid(
                    "environment variables and a working directory need a command \
                     (the login shell takes neither)",
                ));
            }
            None
        } else {
            Some(remote_command(exec)?)
        };
        Ok(TermSpec {
            command,
            term,
            size: Size::new(size)?,
        })
    }
}

/// What the client sends once the terminal is open.
#[derive(Debug)]
pub enum Input {
    Data(Vec<u8>),
    Resize(Size),
}

/// What the client gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    Data(Vec<u8>),
    /// The last message.
    Exit(i32),
}

/// Who to log in as, and the key the guest must show.
pub struct Login<'a> {
    pub key: &'a Path,
    pub user: &'a str,
    /// `ssh-ed25519 AAAA…` as the workspace row keeps it.
    pub host_key: &'a str,
    pub addr: SocketAddr,
}

/// Accepts only the pinned host key.
struct Pinned(PublicKey);

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> std::result::Result<bool, Self::Error> {
        Ok(match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.key_data() == self.0.key_data(),
            PublicKeyOrCertificate::Certificate(_) => false,
        })
    }
}

/// An open, logged-in SSH connection with a PTY channel running the command.
pub struct Terminal {
    handle: client::Handle<Pinned>,
    channel: russh::Channel<client::Msg>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("{what}: {e}"))
}

/// Connects, checks the host key, logs in and starts `spec` on a PTY.
pub async fn open(login: Login<'_>, spec: &TermSpec) -> Result<Terminal> {
    let pinned = PublicKey::from_openssh(login.host_key.trim())
        .map_err(|e| Error::Internal(format!("the pinned host key is unreadable: {e}")))?;
    let key: PrivateKey = russh::keys::load_secret_key(login.key, None)
        .map_err(|e| Error::Internal(format!("cannot read the daemon's key: {e}")))?;
    let tcp = crate::tunnel::connect(login.addr)
        .await
        .map_err(|e| unavailable(&format!("cannot connect to {}", login.addr), e))?;
    let _ = tcp.set_nodelay(true);
    let config = Arc::new(client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    });
    let login_and_start = async {
        let mut handle = client::connect_stream(config, tcp, Pinned(pinned))
            .await
            .map_err(|e| match e {
                russh::Error::UnknownKey => Error::Unavailable(
                    "the guest's host key is not the one pinned for this workspace".into(),
                ),
                e => unavailable("SSH handshake with the guest failed", e),
            })?;
        let auth = handle
            .authenticate_publickey(login.user, PrivateKeyWithHashAlg::new(Arc::new(key), None))
            .await
            .map_err(|e| unavailable("SSH login failed", e))?;
        if !auth.success() {
            return Err(Error::Unavailable(format!(
                "the guest refused the daemon's key for user {}",
                login.user
            )));
        }
        let channel = handle
            .channel_open_session()
            .await
            .map_err(|e| unavailable("cannot open an SSH session", e))?;
        channel
            .request_pty(true, &spec.term, spec.size.cols, spec.size.rows, 0, 0, &[])
            .await
            .map_err(|e| unavailable("cannot ask for a terminal", e))?;
        match &spec.command {
            Some(cmd) => channel.exec(true, cmd.as_bytes()).await,
            None => channel.request_shell(true).await,
        }
        .map_err(|e| unavailable("cannot start the command", e))?;
        Ok::<_, Error>(Terminal { handle, channel })
    };
    match tokio::time::timeout(LOGIN_TIMEOUT, login_and_start).await {
        Ok(r) => r,
        Err(_) => Err(Error::Unavailable(format!(
            "the guest did not complete the SSH login within {} s",
            LOGIN_TIMEOUT.as_secs()
        ))),
    }
}

/// 128 + the signal's number, as a shell reports it.
fn signal_code(sig: &Sig) -> i32 {
    128 + match sig {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::USR1 => 10,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        Sig::Custom(_) => 127,
    }
}

/// Runs an open terminal in its own task. The receiver ends after [`Output::Exit`], or with
/// an error item if the connection failed; it also ends when the client's stream ends.
pub fn spawn<C>(
    guard: ConnectionGuard,
    terminal: Terminal,
    from_client: C,
) -> mpsc::Receiver<std::io::Result<Output>>
where
    C: Stream<Item = std::io::Result<Input>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let Terminal {
            handle,
            mut channel,
        } = terminal;
        let result = pump(&mut channel, from_client, &tx).await;
        let _ = channel.close().await;
        let _ = handle
            .disconnect(russh::Disconnect::ByApplication, "", "")
            .await;
        drop(guard);
        match result {
            Ok(Some(code)) => {
                let _ = tx.send(Ok(Output::Exit(code))).await;
            }
            Ok(None) => {}
            Err(e) => {
                let _ = tx.send(Err(e)).await;
            }
        }
    });
    rx
}

/// Until the channel closes (`Some(exit code)`), the client goes away (`None`) or something
/// fails.
async fn pump<C>(
    channel: &mut russh::Channel<client::Msg>,
    from_client: C,
    to_client: &mpsc::Sender<std::io::Result<Output>>,
) -> std::io::Result<Option<i32>>
where
    C: Stream<Item = std::io::Result<Input>>,
{
    let mut from_client = std::pin::pin!(from_client);
    let mut code: Option<i32> = None;
    let ssh = |e: russh::Error| std::io::Error::other(e.to_string());
    loop {
        tokio::select! {
            msg = channel.wait() => match msg {
                Some(ChannelMsg::Data { data }) | Some(ChannelMsg::ExtendedData { data, .. }) => {
                    if to_client.send(Ok(Output::Data(data.to_vec()))).await.is_err() {
                        return Ok(None);
                    }
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    code = Some(i32::try_from(exit_status).unwrap_or(255));
                }
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    code = Some(signal_code(&signal_name));
                }
                Some(ChannelMsg::Failure) => {
                    return Err(std::io::Error::other(
                        "the guest refused the terminal or the command",
                    ));
                }
                Some(ChannelMsg::Close) | None => return Ok(Some(code.unwrap_or(-1))),
                Some(_) => {}
            },
            input = from_client.next() => match input {
                Some(Ok(Input::Data(data))) => channel.data_bytes(data).await.map_err(ssh)?,
                Some(Ok(Input::Resize(size))) => {
                    channel.window_change(size.cols, size.rows, 0, 0).await.map_err(ssh)?
                }
                Some(Err(e)) => return Err(e),
                // The client hung up.
                None => return Ok(None),
            },
            () = to_client.closed() => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{signal_code, Size, TermSpec, DEFAULT_TERM};
    use crate::error::Error;
    use crate::tasks::command::ExecSpec;

    fn exec(argv: &[&str]) -> ExecSpec {
        ExecSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn sizes_are_bounded_and_default_to_80x24() {
        assert_eq!(Size::new(None).unwrap(), Size { cols: 80, rows: 24 });
        assert_eq!(Size::new(Some((1000, 1))).unwrap().cols, 1000);
        for bad in [(0, 24), (80, 0), (1001, 24), (80, u32::MAX)] {
            let e = Size::new(Some(bad)).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn term_names_are_checked() {
        let shell = exec(&[]);
        assert_eq!(TermSpec::new(&shell, "", None).unwrap().term, DEFAULT_TERM);
        assert_eq!(
            TermSpec::new(&shell, "screen.xterm-256color", None)
                .unwrap()
                .term,
            "screen.xterm-256color"
        );
        for bad in ["xterm\n", "a b", "x;rm", &"x".repeat(65)] {
            assert!(TermSpec::new(&shell, bad, None).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_shell_takes_no_env_or_workdir_and_a_command_is_quoted() {
        let mut shell = exec(&[]);
        assert!(TermSpec::new(&shell, "", None).unwrap().command.is_none());
        shell.workdir = "/tmp".into();
        assert!(TermSpec::new(&shell, "", None).is_err());
        let cmd = TermSpec::new(&exec(&["stty", "size"]), "", None).unwrap();
        assert_eq!(cmd.command.as_deref(), Some("'stty' 'size'"));
        assert!(TermSpec::new(&exec(&["a\0b"]), "", None).is_err());
    }

    #[test]
    fn signals_map_like_a_shell() {
        assert_eq!(signal_code(&russh::Sig::HUP), 129);
        assert_eq!(signal_code(&russh::Sig::KILL), 137);
        assert_eq!(signal_code(&russh::Sig::TERM), 143);
    }
}
