//! `aether workspace exec --tty`: a command on a PTY in the guest, through the daemon's
//! `Terminal` RPC. Our terminal is put in raw mode (every keystroke, ^C included, goes to the
//! guest) and restored on every way out; window-size changes (SIGWINCH) are passed on; we
//! exit with the command's exit code.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::ExitCode;

use aether_proto::v1 as pb;
use anyhow::Context;
use pb::terminal_request::Msg;
use rustix::termios::{self, OptionalActions, Termios};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::Client;

/// Whether `exec` should ask for a PTY: `--tty`/`--no-tty` decide; otherwise only when both
/// stdin and stdout are terminals (a pipe on either side wants the task's separate stdout and
/// stderr, not a terminal's merged stream with `\r\n` line ends).
pub fn wanted(tty: bool, no_tty: bool) -> bool {
    if tty {
        return true;
    }
    !no_tty && termios::isatty(std::io::stdin()) && termios::isatty(std::io::stdout())
}

/// Our terminal's size, if stdout (else stdin) is one.
fn window_size() -> Option<pb::TerminalSize> {
    let ws = termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| termios::tcgetwinsize(std::io::stdin()))
        .ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then(|| pb::TerminalSize {
        cols: u32::from(ws.ws_col),
        rows: u32::from(ws.ws_row),
    })
}

/// Raw mode on stdin while alive; the saved settings come back on drop.
struct RawMode(Termios);

impl RawMode {
    /// `None` when stdin is not a terminal (nothing to change).
    fn enter() -> anyhow::Result<Option<RawMode>> {
        let stdin = std::io::stdin();
        if !termios::isatty(stdin.as_fd()) {
            return Ok(None);
        }
        let saved = termios::tcgetattr(stdin.as_fd()).context("cannot read the terminal's mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(stdin.as_fd(), OptionalActions::Flush, &raw)
            .context("cannot put the terminal in raw mode")?;
        Ok(Some(RawMode(saved)))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &self.0);
    }
}

pub struct TtyArgs {
    pub id: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
}

/// Opens the terminal; the sender carries keystrokes and resizes from then on.
async fn open(
    c: &mut Client,
    open: &pb::TerminalOpen,
) -> Result<
    (
        mpsc::Sender<pb::TerminalRequest>,
        tonic::Streaming<pb::TerminalResponse>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(64);
    // The daemon reads `open` before it answers, so it must be queued first.
    tx.send(pb::TerminalRequest {
        msg: Some(Msg::Open(open.clone())),
    })
    .await
    .map_err(|_| tonic::Status::internal("terminal request queue closed"))?;
    let stream = c.terminal(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, stream))
}

pub async fn exec(c: &mut Client, a: TtyArgs) -> anyhow::Result<ExitCode> {
    let req = pb::TerminalOpen {
        workspace_id: a.id.clone(),
        argv: a.argv,
        size: window_size(),
        term: std::env::var("TERM")
            .ok()
            .filter(|t| !t.is_empty() && t != "dumb")
            .unwrap_or_default(),
        env: a.env.into_iter().collect(),
        workdir: a.workdir.unwrap_or_default(),
    };
    // As for tasks: bad input is refused before the state is looked at, so only a workspace
    // that is merely not running gets started.
    let (tx, mut from_daemon) = match open(c, &req).await {
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            crate::autostart::ensure_running(c, &a.id).await?;
            open(c, &req).await?
        }
        r => r?,
    };

    let raw = RawMode::enter()?;
    // Keystrokes: a thread of its own, since a read of stdin cannot be cancelled and must not
    // hold up the runtime's exit. It ends with us or at end of input; the terminal stays open
    // then (ending the request stream would hang up the command).
    let keys = tx.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let msg = pb::TerminalRequest {
                        msg: Some(Msg::Input(buf[..n].to_vec())),
                    };
                    if keys.blocking_send(msg).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .context("cannot watch for window-size changes")?;

    let result: anyhow::Result<Option<i32>> = async {
        loop {
            tokio::select! {
                m = from_daemon.message() => {
                    let Some(m) = m? else { return Ok(None) };
                    if !m.output.is_empty() {
                        let mut out = std::io::stdout().lock();
                        match out.write_all(&m.output).and_then(|_| out.flush()) {
                            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                            other => other.context("cannot write to stdout")?,
                        }
                    }
                    if let Some(code) = m.exit_code {
                        return Ok(Some(code));
                    }
                }
                Some(()) = winch.recv() => {
                    if let Some(size) = window_size() {
                        let _ = tx.send(pb::TerminalRequest { msg: Some(Msg::Resize(size)) }).await;
                    }
                }
            }
        }
    }
    .await;
    drop(raw);
    match result? {
        Some(code) if (0..=255).contains(&code) => Ok(ExitCode::from(code as u8)),
        Some(_) => Ok(ExitCode::FAILURE),
        None => {
            eprintln!(
                "aether: the terminal of {} ended without an exit code",
                a.id
            );
            Ok(ExitCode::FAILURE)
        }
    }
}
