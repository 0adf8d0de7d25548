//! `aether image pull NAME`: a stock image from the daemon's catalog, downloaded with the
//! user's own rights and network, checked against the checksum file its publisher puts
//! beside it, then imported like `image import` (the daemon checks the disk itself too).
//!
//! - The checksum is mandatory: no checksum file, no line for the file, or a mismatch, and
//!   the pull is refused and nothing is kept.
//! - Downloads go to `<cache>/aether/pull/` (0700) as `<hash prefix>-<file>.part` and resume
//!   with a Range request: after an interrupted pull, or within one pull when the connection
//!   drops or stalls (no byte for `--stall-timeout`), up to [`ATTEMPTS`] times.
//! - Redirects are followed only within the URL's own scheme, host and port.
//! - Progress (bytes, rate, ETA) is drawn on a terminal by indicatif; nothing otherwise.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aether_proto::v1 as pb;
use anyhow::{bail, Context};
use sha2::Digest;

/// Tries of one download (the first and its resumptions) before the pull gives up.
pub const ATTEMPTS: u32 = 5;
/// Most redirects followed.
const REDIRECTS: u32 = 5;
/// Largest checksum file read.
const MAX_SUMS: u64 = 1 << 20;

/// `scheme://host[:port]` of an http(s) URL.
fn origin(url: &str) -> Option<&str> {
    let after = url.find("://")? + 3;
    let end = url[after..].find('/').map_or(url.len(), |i| after + i);
    Some(&url[..end])
}

/// The last path segment of a URL (what checksum files name).
fn file_name(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path)
}

/// The expected hex digest of `file` in a checksum file (`HASH  FILE` or `HASH *FILE`).
fn expected_digest(sums: &str, file: &str, hex_len: usize) -> Option<String> {
    sums.lines().find_map(|line| {
        let (hash, name) = line.trim().split_once(char::is_whitespace)?;
        let name = name
            .trim_start()
            .trim_start_matches('*')
            .trim_start_matches("./");
        (name == file && hash.len() == hex_len && hash.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| hash.to_ascii_lowercase())
    })
}

fn agent(stall: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(stall))
        .max_redirects(0)
        .max_redirects_will_error(false)
        .http_status_as_error(false)
        .build()
        .into()
}

/// GET `url` (with `range_from`, a Range request), following redirects only within its
/// origin; the response, whatever its status.
fn get(
    agent: &ureq::Agent,
    url: &str,
    range_from: u64,
) -> Result<ureq::http::Response<ureq::Body>, Try> {
    let refuse = |msg: String| Try::Refused(anyhow::anyhow!(msg));
    let home = origin(url).ok_or_else(|| refuse(format!("{url} is not an http(s) URL")))?;
    let mut at = url.to_owned();
    for _ in 0..=REDIRECTS {
        let mut req = agent.get(&at);
        if range_from > 0 {
            req = req.header("Range", format!("bytes={range_from}-"));
        }
        let resp = req
            .call()
            .with_context(|| format!("cannot download {at}"))?;
        if !resp.status().is_redirection() {
            return Ok(resp);
        }
        let to = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| refuse(format!("{at} redirects without a Location")))?;
        let to = if to.starts_with('/') {
            format!("{home}{to}")
        } else {
            to.to_owned()
        };
        if origin(&to) != Some(home) {
            return Err(refuse(format!(
                "{at} redirects to another host ({to}); aether follows redirects only within {home}"
            )));
        }
        at = to;
    }
    Err(refuse(format!(
        "{url} redirects more than {REDIRECTS} times"
    )))
}

/// The checksum file's text, bounded.
fn fetch_sums(agent: &ureq::Agent, url: &str) -> anyhow::Result<String> {
    let resp = get(agent, url, 0).map_err(|e| {
        anyhow::anyhow!(
            "{:#} (is the publisher reachable from here? a local mirror can be added to the daemon's image_catalog_dir)",
            e.into_error()
        )
    })?;
    if !resp.status().is_success() {
        bail!(
            "cannot download the checksum file {url}: HTTP {}",
            resp.status()
        );
    }
    let mut text = String::new();
    resp.into_body()
        .into_reader()
        .take(MAX_SUMS)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read the checksum file {url}"))?;
    Ok(text)
}

/// Where pulls keep their downloads: `<cache>/aether/pull`, 0700.
fn cache_dir() -> anyhow::Result<PathBuf> {
    let dirs = directories::ProjectDirs::from("", "", "aether")
        .context("cannot find your home directory for aether's download cache")?;
    let dir = dirs.cache_dir().join("pull");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(dir)
}

/// A downloaded file whose digest matched.
pub struct Verified {
    pub path: PathBuf,
}

/// Downloads `entry` into the cache, resuming what an earlier pull left, and verifies it.
/// Blocking (run it off the async runtime).
pub fn download(entry: &pb::CatalogEntry, stall: Duration) -> anyhow::Result<Verified> {
    let agent = agent(stall);
    let file = file_name(&entry.url);
    let hex_len = match entry.checksum_algorithm.as_str() {
        "sha256" => 64,
        "sha512" => 128,
        other => bail!("the catalog names checksum {other:?}, which aether does not know"),
    };
    let sums = fetch_sums(&agent, &entry.checksum_url)?;
    let expected = expected_digest(&sums, file, hex_len).with_context(|| {
        format!(
            "the checksum file {} has no {} line for {file}; refusing an unverified image",
            entry.checksum_url, entry.checksum_algorithm
        )
    })?;
    let part = cache_dir()?.join(format!("{}-{file}.part", &expected[..16]));
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("the template is valid"),
    );
    bar.set_message(format!("pulling {}", entry.name));
    let mut last_error = None;
    for attempt in 1..=ATTEMPTS {
        match fetch_into(&agent, &entry.url, &part, &bar) {
            Ok(()) => {
                last_error = None;
                break;
            }
            Err(Try::Refused(e)) => {
                bar.finish_and_clear();
                return Err(e);
            }
            Err(Try::Interrupted(e)) => {
                bar.suspend(|| {
                    eprintln!(
                        "aether: download interrupted ({e:#}); resuming ({attempt}/{ATTEMPTS})"
                    )
                });
                last_error = Some(e);
            }
        }
    }
    bar.finish_and_clear();
    if let Some(e) = last_error {
        return Err(e.context(format!(
            "cannot download {} after {ATTEMPTS} tries (what arrived is kept in {} and the next pull resumes it)",
            entry.url,
            part.display()
        )));
    }
    let actual = digest(&part, &entry.checksum_algorithm)?;
    if actual != expected {
        let _ = std::fs::remove_file(&part);
        bail!(
            "checksum mismatch: {file} has {} {actual}, but {} says {expected}; nothing was kept",
            entry.checksum_algorithm,
            entry.checksum_url
        );
    }
    // Named after the published file, so the daemon judges its format as for an import.
    let done = part.with_file_name(format!("{}-{file}", &expected[..16]));
    std::fs::rename(&part, &done)?;
    Ok(Verified { path: done })
}

/// How a try failed: the connection dropped or stalled (try again from where it stopped), or
/// the server's answer refuses the download (no point trying again).
enum Try {
    Interrupted(anyhow::Error),
    Refused(anyhow::Error),
}

impl Try {
    fn into_error(self) -> anyhow::Error {
        match self {
            Try::Interrupted(e) | Try::Refused(e) => e,
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Try {
    fn from(e: E) -> Self {
        Try::Interrupted(e.into())
    }
}

/// One try: appends to `part` from where it ends (a Range request), or starts it over when
/// the server ignores the range.
fn fetch_into(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<(), Try> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let resp = get(agent, url, have)?;
    let status = resp.status().as_u16();
    let length = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (mut out, from) = match status {
        // The range starts at the end: the file is complete.
        416 if have > 0 => return Ok(()),
        206 => (std::fs::OpenOptions::new().append(true).open(part)?, have),
        200 => (std::fs::File::create(part)?, 0),
        _ => {
            return Err(Try::Refused(anyhow::anyhow!(
                "cannot download {url}: HTTP {status}"
            )))
        }
    };
    let total = length.map(|l| from + l);
    bar.set_length(total.unwrap_or(0));
    bar.set_position(from);
    let mut body = resp.into_body().into_reader();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = body
            .read(&mut buf)
            .context("the connection failed or stalled")?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        got += n as u64;
        bar.inc(n as u64);
    }
    out.sync_all()?;
    match length {
        Some(l) if got < l => Err(Try::Interrupted(anyhow::anyhow!(
            "the server sent {got} of {l} bytes"
        ))),
        _ => Ok(()),
    }
}

/// The hex digest of `path` with `algorithm` (sha256 or sha512).
fn digest(path: &Path, algorithm: &str) -> anyhow::Result<String> {
    fn hash<D: Digest>(mut f: std::fs::File) -> anyhow::Result<String> {
        let mut d = D::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            d.update(&buf[..n]);
        }
        Ok(d.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    match algorithm {
        "sha256" => hash::<sha2::Sha256>(f),
        _ => hash::<sha2::Sha512>(f),
    }
}

#[cfg(test)]
mod tests {
    use super::{expected_digest, file_name, origin};

    #[test]
    fn checksum_files_are_read_as_publishers_write_them() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        let sums = format!(
            "{a} *ubuntu-22.04-server-cloudimg-amd64.img\n{b}  ./other.qcow2\nnonsense line\n{}  short.img\n",
            "c".repeat(10)
        );
        assert_eq!(
            expected_digest(&sums, "ubuntu-22.04-server-cloudimg-amd64.img", 64),
            Some(a)
        );
        assert_eq!(
            expected_digest(&sums, "other.qcow2", 64),
            Some("b".repeat(64))
        );
        assert_eq!(expected_digest(&sums, "short.img", 64), None);
        assert_eq!(expected_digest(&sums, "missing.img", 64), None);
        assert_eq!(expected_digest(&sums, "other.qcow2", 128), None);
    }

    #[test]
    fn origins_and_file_names() {
        assert_eq!(
            origin("https://h.test:8443/a/b.img"),
            Some("https://h.test:8443")
        );
        assert_eq!(origin("http://h.test"), Some("http://h.test"));
        assert_eq!(origin("h.test/a"), None);
        assert_eq!(file_name("https://h.test/a/b.qcow2?x=1"), "b.qcow2");
    }
}
