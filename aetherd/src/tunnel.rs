//! Tunnels: byte pipes from a client (through the `Tunnel` RPC) to a TCP port of a running
//! workspace. Open tunnels are counted per workspace; the idle timer reads the count.
//!
//! ```text
//!  client ──data──► from_client ──write──► guest socket      end of from_client: shutdown(write)
//!  client ◄─chunks─ to_client   ◄──read─── guest socket      guest EOF: the tunnel ends
//! ```
//!
//! Invariants: a tunnel ends when the guest side ends (EOF or error), when the client's
//! stream fails, or when the client stops listening; the [`ConnectionGuard`] is dropped before
//! the client sees the end, so a closed tunnel never counts as a connection.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};

use crate::error::{Error, Result};
use crate::model::WorkspaceId;

/// Guest port when the client asks for port 0.
pub const DEFAULT_PORT: u16 = 22;
/// Largest chunk of guest bytes in one message to the client.
pub const CHUNK: usize = 64 * 1024;
/// How long connecting to the guest may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The guest port a client asked for: 0 means [`DEFAULT_PORT`], otherwise 1..=65535.
pub fn port(requested: u32) -> Result<u16> {
    match requested {
        0 => Ok(DEFAULT_PORT),
        p => u16::try_from(p)
            .map_err(|_| Error::invalid(format!("invalid port {p}: expected 1-65535 (0 for 22)"))),
    }
}

/// Connects to the guest, giving up after [`CONNECT_TIMEOUT`].
pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(stream) => stream,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("timed out after {} s", CONNECT_TIMEOUT.as_secs()),
        )),
    }
}

/// Runs a tunnel in its own task: bytes from `from_client` go to `guest`, the guest's bytes
/// come out of the returned receiver in chunks of at most [`CHUNK`] bytes. The receiver ends
/// after the guest's EOF; a failure is its last item. `guard` is held until the tunnel ends.
pub fn spawn<S, C>(
    guard: ConnectionGuard,
    guest: S,
    from_client: C,
) -> mpsc::Receiver<io::Result<Vec<u8>>>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    C: Stream<Item = io::Result<Vec<u8>>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let result = pipe(guest, from_client, &tx).await;
        let workspace = guard.id.clone();
        // Before the client can see the end: a closed tunnel must not count.
        drop(guard);
        match result {
            Ok(()) => tracing::info!(%workspace, "tunnel closed"),
            Err(e) => {
                tracing::info!(%workspace, error = %e, "tunnel failed");
                let _ = tx.send(Err(e)).await;
            }
        }
    });
    rx
}

/// Pumps bytes both ways until the guest side ends, the client's stream fails or the client
/// stops listening. The end of `from_client` half-closes the guest connection and the tunnel
/// goes on, so the guest can still answer.
pub async fn pipe<S, C>(
    guest: S,
    from_client: C,
    to_client: &mpsc::Sender<io::Result<Vec<u8>>>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite,
    C: Stream<Item = io::Result<Vec<u8>>>,
{
    let (mut reader, mut writer) = tokio::io::split(guest);
    let mut from_client = std::pin::pin!(from_client);
    let upstream = async {
        while let Some(data) = from_client.next().await {
            writer.write_all(&data?).await?;
        }
        writer.shutdown().await?;
        // Half-closed: the tunnel lives on until the guest is done.
        std::future::pending::<io::Result<()>>().await
    };
    let downstream = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = tokio::select! {
                n = reader.read(&mut buf) => n?,
                () = to_client.closed() => return Ok(()),
            };
            if n == 0 || to_client.send(Ok(buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    tokio::select! {
        r = upstream => r,
        r = downstream => r,
    }
}

/// Open connections per workspace. A [`ConnectionGuard`] counts one while it lives.
#[derive(Clone, Default)]
pub struct Connections {
    counts: Arc<Mutex<HashMap<WorkspaceId, usize>>>,
    /// Told the workspace id whenever its count changes (the idle timer listens).
    notify: Option<tokio::sync::mpsc::UnboundedSender<WorkspaceId>>,
}

impl Connections {
    /// Counts that report every change of a workspace's count to `notify`.
    pub fn with_notify(notify: tokio::sync::mpsc::UnboundedSender<WorkspaceId>) -> Self {
        Connections {
            counts: Arc::default(),
            notify: Some(notify),
        }
    }

    fn changed(&self, id: &WorkspaceId) {
        if let Some(tx) = &self.notify {
            let _ = tx.send(id.clone());
        }
    }

    pub fn open(&self, id: &WorkspaceId) -> ConnectionGuard {
        {
            let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            *counts.entry(id.clone()).or_default() += 1;
        }
        self.changed(id);
        ConnectionGuard {
            connections: self.clone(),
            id: id.clone(),
        }
    }

    pub fn count(&self, id: &WorkspaceId) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(id).copied().unwrap_or(0)
    }
}

/// One open connection to a workspace, counted in [`Connections`] until dropped.
pub struct ConnectionGuard {
    connections: Connections,
    id: WorkspaceId,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        {
            let mut counts = self
                .connections
                .counts
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(n) = counts.get_mut(&self.id) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&self.id);
                }
            }
        }
        self.connections.changed(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    use super::{connect, port, spawn, Connections, CHUNK};
    use crate::error::Error;
    use crate::model::WorkspaceId;

    fn ws() -> WorkspaceId {
        WorkspaceId::parse("ws-abc123").unwrap()
    }

    /// A loopback "guest": the listener's accepted side is handed to `guest`.
    async fn loopback<F, Fut>(guest: F) -> (TcpStream, tokio::task::JoinHandle<()>)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            guest(s).await;
        });
        (connect(addr).await.unwrap(), server)
    }

    /// A guest that reads until the tunnel closes the connection.
    async fn drain(mut s: TcpStream) {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    }

    /// Everything the receiver yields until it ends; panics on an error item.
    async fn collect(rx: &mut mpsc::Receiver<io::Result<Vec<u8>>>) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.unwrap();
            assert!(!chunk.is_empty() && chunk.len() <= CHUNK, "{}", chunk.len());
            all.extend_from_slice(&chunk);
        }
        all
    }

    #[test]
    fn port_zero_means_ssh_and_range_is_checked() {
        assert_eq!(port(0).unwrap(), 22);
        assert_eq!(port(1).unwrap(), 1);
        assert_eq!(port(8080).unwrap(), 8080);
        assert_eq!(port(65535).unwrap(), 65535);
        let e = port(65536).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(e.to_string().contains("1-65535"), "{e}");
    }

    #[tokio::test]
    async fn client_half_close_reaches_the_guest_and_its_answer_comes_back() {
        let (socket, guest) = loopback(|mut s| async move {
            // Reads until the client's half-close, then answers and closes.
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(b"got:").await.unwrap();
            s.write_all(&got).await.unwrap();
            s.shutdown().await.unwrap();
        })
        .await;
        let connections = Connections::default();
        let (client_tx, client_rx) = mpsc::channel(4);
        let mut rx = spawn(
            connections.open(&ws()),
            socket,
            ReceiverStream::new(client_rx),
        );
        assert_eq!(connections.count(&ws()), 1);
        // More than one chunk's worth, so the guest's answer is split into chunks.
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        client_tx.send(Ok(b"hello ".to_vec())).await.unwrap();
        client_tx.send(Ok(big.clone())).await.unwrap();
        drop(client_tx);
        let answer = collect(&mut rx).await;
        let mut want = b"got:hello ".to_vec();
        want.extend_from_slice(&big);
        assert_eq!(answer.len(), want.len());
        assert!(answer == want, "the guest's answer differs");
        guest.await.unwrap();
        assert_eq!(connections.count(&ws()), 0);
    }

    #[tokio::test]
    async fn bytes_echo_both_ways_and_guest_eof_ends_the_tunnel() {
        let (socket, guest) = loopback(|mut s| async move {
            // Echoes two messages, then closes its side while the client's stays open.
            let mut buf = [0u8; 4];
            for _ in 0..2 {
                s.read_exact(&mut buf).await.unwrap();
                s.write_all(&buf).await.unwrap();
            }
            s.write_all(b"bye").await.unwrap();
            s.shutdown().await.unwrap();
            // Keep the read side open until the tunnel drops the connection.
            drain(s).await;
        })
        .await;
        let connections = Connections::default();
        let (client_tx, client_rx) = mpsc::channel(4);
        let mut rx = spawn(
            connections.open(&ws()),
            socket,
            ReceiverStream::new(client_rx),
        );
        // Open until the guest has echoed twice.
        assert_eq!(connections.count(&ws()), 1);
        // The guest's bytes may arrive in any chunking: "pong" and "bye" can share one.
        let mut received = Vec::new();
        for word in [b"ping", b"pong"] {
            client_tx.send(Ok(word.to_vec())).await.unwrap();
            let end = received.len() + word.len();
            while received.len() < end {
                received.extend(rx.recv().await.unwrap().unwrap());
            }
            assert_eq!(&received[end - word.len()..end], word);
        }
        // The client has not closed its side, yet the guest's EOF ends the tunnel.
        received.extend(collect(&mut rx).await);
        assert_eq!(received, b"pingpongbye");
        assert_eq!(connections.count(&ws()), 0);
        drop(client_tx);
        guest.await.unwrap();
    }

    #[tokio::test]
    async fn a_failing_client_stream_ends_the_tunnel_with_its_error() {
        let (socket, guest) = loopback(drain).await;
        let connections = Connections::default();
        let from_client =
            tokio_stream::iter([Ok(b"x".to_vec()), Err(io::Error::other("client went away"))]);
        let mut rx = spawn(connections.open(&ws()), socket, from_client);
        let e = rx.recv().await.unwrap().unwrap_err();
        assert_eq!(e.to_string(), "client went away");
        assert!(rx.recv().await.is_none());
        assert_eq!(connections.count(&ws()), 0);
        guest.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_that_stops_listening_closes_the_tunnel() {
        // The tunnel closes the connection once nobody listens.
        let (socket, guest) = loopback(drain).await;
        let connections = Connections::default();
        let (_client_tx, client_rx) = mpsc::channel(4);
        let rx = spawn(
            connections.open(&ws()),
            socket,
            ReceiverStream::new(client_rx),
        );
        drop(rx);
        tokio::time::timeout(Duration::from_secs(10), guest)
            .await
            .expect("the guest connection is closed")
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while connections.count(&ws()) != 0 {
            assert!(tokio::time::Instant::now() < deadline, "guard still held");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn guards_count_open_connections() {
        let c = Connections::default();
        let id = WorkspaceId::parse("ws-abc123").unwrap();
        let a = c.open(&id);
        let b = c.open(&id);
        assert_eq!(c.count(&id), 2);
        drop(a);
        assert_eq!(c.count(&id), 1);
        drop(b);
        assert_eq!(c.count(&id), 0);
    }
}
