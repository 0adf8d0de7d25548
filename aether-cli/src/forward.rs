//! `aether workspace port-forward`: local TCP ports on 127.0.0.1 forwarded to TCP ports of a
//! workspace, each accepted connection through a `Tunnel` RPC of its own.
//!
//! ```text
//!  client ──TCP── 127.0.0.1:LOCAL ── aether ──Tunnel RPC── aetherd ──TCP── guest:REMOTE
//! ```
//!
//! Listening only on loopback keeps the workspace's ports private to this machine's users. A
//! workspace that stopped meanwhile (idle auto-stop) is started again by the next connection.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use aether_proto::v1 as pb;
use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex};

use crate::client::Client;
use crate::ssh;

/// Largest chunk of local bytes in one tunnel message.
const CHUNK: usize = 32 * 1024;

/// One `LOCAL:REMOTE` pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    pub local: u16,
    pub remote: u16,
}

/// Parses `LOCAL:REMOTE`, both ports 1-65535 (clap's value parser).
pub fn parse_forward(s: &str) -> Result<Forward, String> {
    let Some((local, remote)) = s.split_once(':') else {
        return Err("expected LOCAL:REMOTE, two ports, e.g. 8080:80".to_owned());
    };
    let port = |what: &str, p: &str| {
        Some(p)
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("invalid {what} port {p:?}: expected 1-65535"))
    };
    Ok(Forward {
        local: port("local", local)?,
        remote: port("remote", remote)?,
    })
}

/// Forwards until SIGINT or SIGTERM. The listeners are bound before the workspace is started,
/// so a busy local port fails without side effects.
pub async fn port_forward(c: &mut Client, id: &str, forwards: &[Forward]) -> anyhow::Result<()> {
    for (i, f) in forwards.iter().enumerate() {
        if forwards[..i].iter().any(|g| g.local == f.local) {
            bail!("local port {} is given twice", f.local);
        }
    }
    let w = c
        .get_workspace(pb::GetWorkspaceRequest { id: id.to_owned() })
        .await?
        .into_inner();
    let mut listeners = Vec::new();
    for f in forwards {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, f.local))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{}", f.local))?;
        listeners.push((l, *f));
    }
    let w = crate::autostart::ensure_running(c, &w.id).await?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot handle SIGINT")?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    // Only one connection at a time starts a workspace that stopped meanwhile.
    let starting = Arc::new(Mutex::new(()));
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, f) in listeners {
        eprintln!("forwarding 127.0.0.1:{} -> {}:{}", f.local, w.id, f.remote);
        tasks.spawn(accept_loop(
            c.clone(),
            w.id.clone(),
            listener,
            f,
            starting.clone(),
        ));
    }
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
        _ = tasks.join_next() => bail!("a listener ended unexpectedly"),
    }
    Ok(())
}

async fn accept_loop(
    c: Client,
    id: String,
    listener: TcpListener,
    f: Forward,
    starting: Arc<Mutex<()>>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                eprintln!("aether: cannot accept on 127.0.0.1:{}: {e}", f.local);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (c, id, starting) = (c.clone(), id.clone(), starting.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(c, &id, f.remote, stream, &starting).await {
                eprintln!(
                    "aether: 127.0.0.1:{} -> {id}:{}: {}",
                    f.local,
                    f.remote,
                    crate::one_line(&e)
                );
            }
        });
    }
}

/// Pipes one local connection through a tunnel until the guest's side ends. A tunnel refused
/// because the workspace is not running (it was stopped meanwhile) starts it and tries again.
async fn connection(
    mut c: Client,
    id: &str,
    remote: u16,
    stream: TcpStream,
    starting: &Mutex<()>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(8);
    let (tx, mut from_guest) = match ssh::open_tunnel(&mut c, id, remote, rx).await {
        Ok(s) => (tx, s),
        Err(e) => {
            let w = c
                .get_workspace(pb::GetWorkspaceRequest { id: id.to_owned() })
                .await?
                .into_inner();
            if w.state == pb::WorkspaceState::Running as i32 {
                return Err(e);
            }
            {
                let _one = starting.lock().await;
                crate::autostart::ensure_running(&mut c, id).await?;
            }
            let (tx, rx) = mpsc::channel(8);
            (tx, ssh::open_tunnel(&mut c, id, remote, rx).await?)
        }
    };
    let (mut local_rd, mut local_wr) = stream.into_split();
    let upstream = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        // Ends at the local EOF (or error): dropping `tx` half-closes the guest connection.
        while let Ok(n @ 1..) = local_rd.read(&mut buf).await {
            if tx.send(buf[..n].to_vec()).await.is_err() {
                break;
            }
        }
    });
    let result = async {
        while let Some(msg) = from_guest.message().await? {
            if local_wr.write_all(&msg.data).await.is_err() {
                // The local client is gone: nothing left to do.
                return Ok(());
            }
        }
        let _ = local_wr.shutdown().await;
        Ok(())
    }
    .await;
    // The guest's side ended: the connection is over (as the daemon's tunnel is).
    upstream.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::{parse_forward, Forward};

    #[test]
    fn pairs_of_ports() {
        assert_eq!(
            parse_forward("8080:80"),
            Ok(Forward {
                local: 8080,
                remote: 80
            })
        );
        assert_eq!(
            parse_forward("65535:1"),
            Ok(Forward {
                local: 65535,
                remote: 1
            })
        );
        assert!(parse_forward("80").unwrap_err().contains("LOCAL:REMOTE"));
        assert_eq!(
            parse_forward("0:22").unwrap_err(),
            "invalid local port \"0\": expected 1-65535"
        );
        assert_eq!(
            parse_forward("22:65536").unwrap_err(),
            "invalid remote port \"65536\": expected 1-65535"
        );
        for bad in ["x:y", ":22", "22:", "1:2:3", " 1:2", "-1:2", "+1:2"] {
            assert!(parse_forward(bad).is_err(), "{bad:?}");
        }
    }
}
