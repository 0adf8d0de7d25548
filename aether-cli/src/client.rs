//! Connecting to aetherd over its Unix socket.

use std::path::{Path, PathBuf};

use aether_proto::v1::aether_client::AetherClient;
use anyhow::Context;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub type Client = AetherClient<Channel>;

pub async fn connect(socket: &Path) -> anyhow::Result<Client> {
    // Fail early with a clear message, saying what to run next; the connector below would
    // report it less plainly.
    if let Err(e) = UnixStream::connect(socket).await {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            anyhow::bail!(
                "cannot connect to aetherd at {}: permission denied; join group aether (sudo usermod -aG aether $USER, then log in again), or run aether doctor",
                socket.display()
            );
        }
        return Err(e).with_context(|| {
            format!(
                "cannot connect to aetherd at {} (is aetherd running? start it with sudo systemctl start aetherd, or set --socket or AETHER_SOCKET; aether doctor checks the rest)",
                socket.display()
            )
        });
    }
    let path: PathBuf = socket.to_owned();
    // The URI is required by the API but unused: every connection goes to the socket.
    let channel = Endpoint::try_from("http://aetherd.invalid")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| format!("cannot connect to aetherd at {}", socket.display()))?;
    Ok(AetherClient::new(channel))
}
