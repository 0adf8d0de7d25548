//! `aether image import`: reads the image (a file, or an http(s) URL) with the user's own
//! rights and streams it to the daemon, showing progress on a terminal.

use std::io::Read;
use std::path::{Path, PathBuf};

use aether_proto::v1 as pb;
use anyhow::{bail, Context};
use pb::import_image_request::Part;
use tokio::sync::mpsc;

use crate::client::Client;

const CHUNK: usize = 1 << 20;

pub struct ImportArgs {
    pub name: String,
    pub source: String,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub boot_mode: pb::BootMode,
}

/// Progress on stderr (indicatif): drawn on a terminal, nothing otherwise.
struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(what: String, total: Option<u64>) -> Self {
        let (bar, template) = match total {
            Some(t) => (
                indicatif::ProgressBar::new(t),
                "{msg}: {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            ),
            None => (
                indicatif::ProgressBar::no_length(),
                "{msg}: {bytes} {binary_bytes_per_sec}",
            ),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(template).expect("the template is valid"),
        );
        bar.set_message(what);
        Progress { bar }
    }

    fn add(&mut self, n: usize) {
        self.bar.inc(n as u64);
    }

    fn finish(&self) {
        self.bar.finish();
    }
}

type Tx = mpsc::Sender<pb::ImportImageRequest>;

/// The daemon stopped reading the upload: its reply says why (it may refuse an import right
/// after the header, say because another import of the name runs).
#[derive(Debug)]
struct UploadClosed;

impl std::fmt::Display for UploadClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the daemon closed the upload")
    }
}

impl std::error::Error for UploadClosed {}

fn send(tx: &Tx, part: Part) -> anyhow::Result<()> {
    tx.blocking_send(pb::ImportImageRequest { part: Some(part) })
        .map_err(|_| UploadClosed.into())
}

/// Streams `reader` as `make(chunk)` messages.
fn pump(
    tx: &Tx,
    mut reader: impl Read,
    progress: &mut Progress,
    make: fn(Vec<u8>) -> Part,
) -> anyhow::Result<()> {
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = reader.read(&mut buf).context("read failed")?;
        if n == 0 {
            progress.finish();
            return Ok(());
        }
        buf.truncate(n);
        progress.add(n);
        send(tx, make(buf))?;
    }
}

fn open_file(path: &Path) -> anyhow::Result<(std::fs::File, u64)> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata()?.len();
    Ok((f, len))
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// The file name a source claims (for the daemon's format check).
fn source_name(source: &str) -> String {
    let path = source.split(['?', '#']).next().unwrap_or(source);
    path.rsplit('/').next().unwrap_or(path).to_owned()
}

/// Reads everything on a blocking thread and feeds the channel.
fn produce(args: &ImportArgs, tx: Tx) -> anyhow::Result<()> {
    if let Some(kernel) = &args.kernel {
        let (f, len) = open_file(kernel)?;
        pump(
            &tx,
            f,
            &mut Progress::new("kernel".into(), Some(len)),
            Part::Kernel,
        )?;
    }
    if let Some(initrd) = &args.initrd {
        let (f, len) = open_file(initrd)?;
        pump(
            &tx,
            f,
            &mut Progress::new("initrd".into(), Some(len)),
            Part::Initrd,
        )?;
    }
    if is_url(&args.source) {
        let resp = ureq::get(&args.source)
            .call()
            .with_context(|| format!("cannot download {}", args.source))?;
        let total = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let reader = resp.into_body().into_reader();
        let mut progress =
            Progress::new(format!("downloading {}", source_name(&args.source)), total);
        pump(&tx, reader, &mut progress, Part::Disk)
    } else {
        let (f, len) = open_file(Path::new(&args.source))?;
        pump(
            &tx,
            f,
            &mut Progress::new("disk".into(), Some(len)),
            Part::Disk,
        )
    }
}

pub async fn import(client: &mut Client, args: ImportArgs) -> anyhow::Result<pb::Image> {
    if args.kernel.is_some() != args.initrd.is_some() {
        bail!("--kernel and --initrd go together");
    }
    if args.cmdline.is_some() && args.kernel.is_none() {
        bail!("--cmdline needs --kernel and --initrd");
    }
    let (tx, rx) = mpsc::channel(4);
    let header = pb::ImportImageRequest {
        part: Some(Part::Header(pb::ImageHeader {
            name: args.name.clone(),
            boot_mode: args.boot_mode as i32,
            cmdline: args.cmdline.clone().unwrap_or_default(),
            source_name: source_name(&args.source),
        })),
    };
    tx.send(header).await.expect("receiver is alive");
    let producer = tokio::task::spawn_blocking(move || produce(&args, tx));
    let call = client.import_image(tokio_stream::wrappers::ReceiverStream::new(rx));
    let (reply, produced) = tokio::join!(call, producer);
    match (reply, produced.context("upload thread failed")?) {
        // The daemon refused before it had everything: its reason, not the closed stream.
        (Err(status), Err(e)) if e.is::<UploadClosed>() => Err(status.into()),
        // A read error is the real cause when both fail (the daemon then saw a short upload).
        (_, Err(e)) => Err(e),
        (reply, Ok(())) => Ok(reply?.into_inner()),
    }
}

#[cfg(test)]
mod tests {
    use super::source_name;

    #[test]
    fn source_names() {
        assert_eq!(source_name("/tmp/x/debian.qcow2"), "debian.qcow2");
        assert_eq!(source_name("https://h/p/img.raw?sig=1"), "img.raw");
        assert_eq!(source_name("disk.img"), "disk.img");
    }
}
