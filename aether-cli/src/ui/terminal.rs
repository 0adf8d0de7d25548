//! `/api/workspaces/{id}/terminal`: the page's terminal, a WebSocket bridged to the daemon's
//! `Terminal` RPC (a login shell on a PTY in the guest; see `ui/API.md`, "The terminal").
//!
//! ```text
//!  page ══ws══► attach() ──keystrokes, resize──► Session.input ──► aetherd Terminal RPC
//!  page ◄═ws══ attach() ◄──frames── Session.attached ◄── pump() ◄── aetherd
//!                                   Session.ring (newest 64 KiB, for a reconnect)
//! ```
//!
//! A session outlives its WebSocket by [`KEEP`]: a page that reconnects with `session=S`
//! gets the newest [`RING`] bytes again, then live output. At most one socket is attached
//! to a session; a new one takes it over. Everything is bounded: the sessions of one UI
//! server ([`MAX_SESSIONS`]), the replay ring, a WebSocket message ([`MAX_MESSAGE`]) and the
//! frames queued for a slow page ([`QUEUE`]: a page that falls that far behind is
//! disconnected and catches up from the ring when it reconnects).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aether_proto::v1 as pb;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use pb::terminal_request::Msg;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Shared;

/// How long a session waits for its page to come back.
pub const KEEP: Duration = Duration::from_secs(60);
/// Output kept for a reconnecting page.
pub const RING: usize = 64 * 1024;
/// Open sessions per UI server.
pub const MAX_SESSIONS: usize = 32;
/// Largest WebSocket message accepted from the page (the daemon's keystroke limit).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Frames queued for a page.
const QUEUE: usize = 256;

/// What a session sends its socket.
enum Frame {
    Output(Vec<u8>),
    Exit(i32),
    Error(String),
}

#[derive(Default)]
struct Inner {
    ring: VecDeque<u8>,
    /// The attached socket: its number and its queue.
    attached: Option<(u64, mpsc::Sender<Frame>)>,
    /// How the terminal ended, for a page that comes back after it did.
    ended: Option<(Option<i32>, String)>,
    /// Keystrokes and resizes for the daemon; dropped (hanging up) when the session ends.
    input: Option<mpsc::Sender<pb::TerminalRequest>>,
    /// The socket attached last: only its departure starts the countdown that ends the
    /// session.
    last: u64,
}

struct Session {
    workspace: String,
    inner: Mutex<Inner>,
}

/// The UI server's terminal sessions.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
    next_socket: std::sync::atomic::AtomicU64,
}

impl Sessions {
    fn get(&self, id: &str, workspace: &str) -> Option<Arc<Session>> {
        let map = self.map.lock().unwrap();
        map.get(id).filter(|s| s.workspace == workspace).cloned()
    }

    fn remove(&self, id: &str) {
        let session = self.map.lock().unwrap().remove(id);
        if let Some(s) = session {
            s.inner.lock().unwrap().input = None;
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalQuery {
    cols: Option<u32>,
    rows: Option<u32>,
    session: Option<String>,
}

pub async fn terminal(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<TerminalQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    ws.max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| serve(s, id, q, socket))
}

/// Sends a JSON text frame.
async fn send_json(socket: &mut WebSocket, v: serde_json::Value) -> bool {
    socket
        .send(Message::Text(v.to_string().into()))
        .await
        .is_ok()
}

async fn refuse(mut socket: WebSocket, message: &str) {
    let _ = send_json(&mut socket, json!({ "type": "error", "message": message })).await;
    let _ = socket.send(Message::Close(None)).await;
}

async fn serve(s: Shared, workspace: String, q: TerminalQuery, socket: WebSocket) {
    // A session this page no longer has (expired, or of another workspace) starts afresh;
    // the page sees the new id in the first frame.
    let known = q.session.as_deref().and_then(|sid| {
        s.terminals
            .get(sid, &workspace)
            .map(|x| (sid.to_owned(), x))
    });
    let (sid, session) = match known {
        Some(found) => found,
        None => match open(&s, &workspace, &q).await {
            Ok(found) => found,
            Err(message) => return refuse(socket, &message).await,
        },
    };
    attach(&s, sid, session, socket).await;
}

/// Opens a new terminal in the daemon and registers its session.
async fn open(
    s: &Shared,
    workspace: &str,
    q: &TerminalQuery,
) -> Result<(String, Arc<Session>), String> {
    if s.terminals.map.lock().unwrap().len() >= MAX_SESSIONS {
        return Err(format!(
            "this aether ui has {MAX_SESSIONS} terminals open already; close one first"
        ));
    }
    let size = match (q.cols, q.rows) {
        (Some(cols), Some(rows)) => Some(pb::TerminalSize { cols, rows }),
        (None, None) => None,
        _ => return Err("cols and rows go together".into()),
    };
    let (tx, rx) = mpsc::channel(64);
    let first = pb::TerminalRequest {
        msg: Some(Msg::Open(pb::TerminalOpen {
            workspace_id: workspace.to_owned(),
            size,
            ..Default::default()
        })),
    };
    tx.send(first).await.map_err(|_| "internal: queue closed")?;
    let from_daemon = s
        .client
        .clone()
        .terminal(ReceiverStream::new(rx))
        .await
        .map_err(|e| e.message().to_owned())?
        .into_inner();
    let sid = super::guard::secret().map_err(|e| e.to_string())?;
    let session = Arc::new(Session {
        workspace: workspace.to_owned(),
        inner: Mutex::new(Inner {
            input: Some(tx),
            ..Default::default()
        }),
    });
    s.terminals
        .map
        .lock()
        .unwrap()
        .insert(sid.clone(), session.clone());
    tokio::spawn(pump(s.clone(), sid.clone(), session.clone(), from_daemon));
    Ok((sid, session))
}

/// The daemon's output into the ring and to the attached socket, until the terminal ends.
async fn pump(
    s: Shared,
    sid: String,
    session: Arc<Session>,
    mut from_daemon: tonic::Streaming<pb::TerminalResponse>,
) {
    let end = loop {
        match from_daemon.message().await {
            Ok(Some(m)) => {
                if !m.output.is_empty() {
                    let mut inner = session.inner.lock().unwrap();
                    inner.ring.extend(&m.output);
                    let over = inner.ring.len().saturating_sub(RING);
                    inner.ring.drain(..over);
                    if let Some((_, tx)) = &inner.attached {
                        // A page this far behind is dropped; it replays the ring on return.
                        if tx.try_send(Frame::Output(m.output)).is_err() {
                            inner.attached = None;
                        }
                    }
                }
                if let Some(code) = m.exit_code {
                    break (Some(code), String::new());
                }
            }
            Ok(None) => break (None, "the terminal ended".to_owned()),
            Err(e) => break (None, e.message().to_owned()),
        }
    };
    let attached = {
        let mut inner = session.inner.lock().unwrap();
        inner.ended = Some(end.clone());
        inner.input = None;
        inner.attached.take()
    };
    match attached {
        Some((_, tx)) => {
            let _ = tx.send(end_frame(end)).await;
            s.terminals.remove(&sid);
        }
        // Kept for a page that comes back within KEEP to learn how it ended.
        None => {
            tokio::time::sleep(KEEP).await;
            s.terminals.remove(&sid);
        }
    }
}

fn end_frame((code, message): (Option<i32>, String)) -> Frame {
    match code {
        Some(code) => Frame::Exit(code),
        None => Frame::Error(message),
    }
}

/// One socket on a session, until either goes away.
async fn attach(s: &Shared, sid: String, session: Arc<Session>, mut socket: WebSocket) {
    let me = s
        .terminals
        .next_socket
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, mut frames) = mpsc::channel(QUEUE);
    let (replay, input, ended) = {
        let mut inner = session.inner.lock().unwrap();
        let replay: Vec<u8> = inner.ring.iter().copied().collect();
        // Another socket on this session is taken over: its queue closes.
        if inner.ended.is_none() {
            inner.attached = Some((me, tx));
            inner.last = me;
        }
        (replay, inner.input.clone(), inner.ended.clone())
    };
    if !send_json(&mut socket, json!({ "type": "session", "id": sid })).await {
        return detach(s, &sid, &session, me);
    }
    if !replay.is_empty() && socket.send(Message::Binary(replay.into())).await.is_err() {
        return detach(s, &sid, &session, me);
    }
    if let Some(end) = ended {
        s.terminals.remove(&sid);
        return finish(socket, end_frame(end)).await;
    }
    let Some(input) = input else {
        return refuse(socket, "the terminal ended").await;
    };
    loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(Frame::Output(data)) => {
                    if socket.send(Message::Binary(data.into())).await.is_err() {
                        break;
                    }
                }
                Some(end) => return finish(socket, end).await,
                // Taken over by another socket, or too far behind.
                None => {
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
            },
            msg = socket.recv() => {
                let request = match msg {
                    Some(Ok(Message::Binary(data))) => Msg::Input(data.to_vec()),
                    Some(Ok(Message::Text(text))) => match resize(&text) {
                        Ok(size) => Msg::Resize(size),
                        Err(message) => {
                            refuse(socket, &message).await;
                            break;
                        }
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                if input.send(pb::TerminalRequest { msg: Some(request) }).await.is_err() {
                    break;
                }
            }
        }
    }
    detach(s, &sid, &session, me);
}

/// `{"type": "resize", "cols", "rows"}`; the daemon checks the numbers.
fn resize(text: &str) -> Result<pb::TerminalSize, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Resize {
        r#type: String,
        cols: u32,
        rows: u32,
    }
    match serde_json::from_str::<Resize>(text) {
        Ok(r) if r.r#type == "resize" => Ok(pb::TerminalSize {
            cols: r.cols,
            rows: r.rows,
        }),
        Ok(r) => Err(format!("unknown terminal message type {:?}", r.r#type)),
        Err(e) => Err(format!(
            "invalid terminal message (expected {{\"type\": \"resize\", \"cols\", \"rows\"}}): {e}"
        )),
    }
}

async fn finish(mut socket: WebSocket, end: Frame) {
    let v = match end {
        Frame::Exit(code) => json!({ "type": "exit", "code": code }),
        Frame::Error(message) => json!({ "type": "error", "message": message }),
        Frame::Output(_) => return,
    };
    let _ = send_json(&mut socket, v).await;
    let _ = socket.send(Message::Close(None)).await;
}

/// The socket went away: the session waits [`KEEP`] for another, then hangs up.
fn detach(s: &Shared, sid: &str, session: &Arc<Session>, me: u64) {
    {
        let mut inner = session.inner.lock().unwrap();
        match &inner.attached {
            Some((n, _)) if *n == me => inner.attached = None,
            // Taken over: the new socket owns it now.
            _ => return,
        }
    }
    let (s, sid, session) = (s.clone(), sid.to_owned(), session.clone());
    tokio::spawn(async move {
        tokio::time::sleep(KEEP).await;
        let idle = {
            let inner = session.inner.lock().unwrap();
            inner.attached.is_none() && inner.last == me
        };
        if idle {
            s.terminals.remove(&sid);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::resize;

    #[test]
    fn resize_messages_are_parsed_strictly() {
        let s = resize(r#"{"type":"resize","cols":120,"rows":40}"#).unwrap();
        assert_eq!((s.cols, s.rows), (120, 40));
        assert!(resize(r#"{"type":"paste","cols":1,"rows":1}"#)
            .unwrap_err()
            .contains("unknown terminal message type"));
        for bad in ["", "{}", r#"{"type":"resize","cols":-1,"rows":2}"#, "[1,2]"] {
            assert!(resize(bad).is_err(), "{bad:?}");
        }
    }
}
