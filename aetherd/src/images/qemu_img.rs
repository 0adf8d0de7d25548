//! Running `qemu-img` on untrusted files: every call under address-space, CPU-time and
//! wall-clock limits, with an argument list and absolute paths; parsing and judging what
//! `qemu-img info` and `qemu-img check` say; converting raw to qcow2 ([`convert_raw`]).

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use nix::sys::resource::{setrlimit, Resource};
use serde::Deserialize;

use crate::error::{Error, Result};

use super::check::{backing_refusal, check_virtual_size};
use super::{refused, shown, DiskFormat};

/// The parts of `qemu-img info --output=json` that matter here.
#[derive(Debug, Deserialize)]
pub struct QemuImgInfo {
    pub format: String,
    #[serde(default)]
    pub filename: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    pub actual_size: u64,
    #[serde(rename = "backing-filename")]
    pub backing_filename: Option<String>,
    #[serde(rename = "full-backing-filename")]
    pub full_backing_filename: Option<String>,
    #[serde(default)]
    pub encrypted: bool,
    #[serde(rename = "format-specific")]
    pub format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Deserialize)]
pub struct FormatSpecific {
    #[serde(default)]
    pub data: serde_json::Value,
}

impl QemuImgInfo {
    pub fn parse(json: &[u8]) -> Result<Self> {
        serde_json::from_slice(json)
            .map_err(|e| refused(format!("qemu-img describes it unexpectedly ({e})")))
    }

    fn data_file(&self) -> Option<String> {
        let data = &self.format_specific.as_ref()?.data;
        data.get("data-file").map(|v| match v.as_str() {
            Some(s) => s.to_owned(),
            None => v.to_string(),
        })
    }
}

/// Judges what `qemu-img info --output=json -f FORMAT PATH` said about an uploaded disk:
/// it must be `format`, opened as `path` itself (not a `json:` or protocol name), with no
/// external data file, no backing file, no encryption, and a virtual size in 1 byte ..=
/// `max_virtual`.
pub fn judge_info(
    info: &QemuImgInfo,
    format: DiskFormat,
    path: &str,
    max_virtual: u64,
) -> Result<()> {
    if info.format != format.as_str() {
        return Err(refused(format!(
            "qemu-img reads it as {}, not {}",
            shown(&info.format),
            format.as_str()
        )));
    }
    if info.filename != path {
        return Err(refused(format!(
            "qemu-img opened it as {}, not as the uploaded file",
            shown(&info.filename)
        )));
    }
    if let Some(data_file) = info.data_file() {
        return Err(refused(format!(
            "it names an external data file ({})",
            shown(&data_file)
        )));
    }
    if let Some(backing) = info
        .backing_filename
        .as_ref()
        .or(info.full_backing_filename.as_ref())
    {
        return Err(backing_refusal(&shown(backing)));
    }
    let encrypt = info
        .format_specific
        .as_ref()
        .and_then(|f| f.data.get("encrypt"));
    if info.encrypted || encrypt.is_some() {
        return Err(refused("it is encrypted; import an unencrypted image"));
    }
    check_virtual_size(info.virtual_size, max_virtual)
}

/// Judges `qemu-img check -f qcow2`: exit 0 (clean) or 3 (leaked clusters only, harmless)
/// pass; corruption (2) or a check that could not complete (1, or anything else) refuse.
pub fn judge_check(code: Option<i32>, stdout: &[u8], stderr: &[u8]) -> Result<()> {
    let first_line = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(shown)
            .unwrap_or_default()
    };
    match code {
        Some(0) | Some(3) => Ok(()),
        Some(2) => {
            let summary = String::from_utf8_lossy(stdout)
                .lines()
                .map(str::trim)
                .find(|l| l.contains("errors were found") || l.contains("error was found"))
                .map(shown)
                .unwrap_or_else(|| first_line(stderr));
            Err(refused(format!(
                "it is corrupt or truncated (qemu-img check: {summary})"
            )))
        }
        _ => Err(refused(format!(
            "qemu-img check cannot check it ({})",
            first_line(stderr)
        ))),
    }
}

/// Resource limits for one `qemu-img` run on an untrusted file (as OpenStack does since
/// CVE-2024-4467): address space and CPU time (setrlimit in the child), and wall-clock time.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    address_space: u64,
    cpu_secs: u64,
    wall: Duration,
}

/// For `qemu-img info` and `qemu-img check`.
pub(super) const INSPECT_LIMITS: Limits = Limits {
    address_space: 1 << 30,
    cpu_secs: 30,
    wall: Duration::from_secs(60),
};

/// For converting a raw disk of `len` bytes: more address space (its I/O worker threads each
/// reserve a stack, and a slow disk makes it start more of them), time growing with the size.
fn convert_limits(len: u64) -> Limits {
    Limits {
        address_space: 2 << 30,
        cpu_secs: 30 + len / (64 << 20),
        wall: Duration::from_secs(60 + len / (16 << 20)),
    }
}

/// Runs `qemu-img ARGS` under `limits`; `doing` names the work for messages ("inspecting").
pub(super) async fn qemu_img(args: &[&OsStr], limits: Limits, doing: &str) -> Result<Output> {
    run_limited("qemu-img", args, limits, doing).await
}

/// Runs `program ARGS` under `limits`, killing it when the wall-clock limit passes.
async fn run_limited(
    program: &str,
    args: &[&OsStr],
    limits: Limits,
    doing: &str,
) -> Result<Output> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C")
        // glibc reserves 64 MiB of address space per malloc arena, and makes up to eight per
        // CPU as threads contend: with the address-space limit that can make an allocation
        // fail (and qemu-img abort) under load. Two arenas are plenty for qemu-img.
        .env("MALLOC_ARENA_MAX", "2")
        .kill_on_drop(true);
    let Limits {
        address_space,
        cpu_secs,
        ..
    } = limits;
    // SAFETY: the hook runs in the child between fork and exec, where only
    // async-signal-safe work is allowed. It makes three setrlimit(2) system calls through
    // nix's thin wrapper (no allocation, no locks; an error becomes an io::Error from the
    // raw errno, which does not allocate either) and reads only the two integers it owns.
    unsafe {
        cmd.pre_exec(move || {
            setrlimit(Resource::RLIMIT_AS, address_space, address_space)?;
            setrlimit(Resource::RLIMIT_CPU, cpu_secs, cpu_secs)?;
            setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
            Ok(())
        });
    }
    let out = match tokio::time::timeout(limits.wall, cmd.output()).await {
        Err(_) => {
            // Dropping the output future killed the child (kill_on_drop).
            return Err(refused(format!(
                "{program} did not finish {doing} it within {:?}",
                limits.wall
            )));
        }
        Ok(Err(e)) => {
            return Err(Error::Internal(format!(
                "cannot run {program} (install qemu-utils): {e}"
            )))
        }
        Ok(Ok(out)) => out,
    };
    if let Some(sig) = out.status.signal() {
        return Err(refused(format!(
            "{program} was killed by signal {sig} while {doing} it (its memory or CPU-time limit)"
        )));
    }
    Ok(out)
}

/// A path as qemu-img gets it: absolute, so it can never be read as a protocol name.
pub(crate) fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path)
        .map_err(|e| Error::Internal(format!("cannot resolve {}: {e}", path.display())))
}

/// Converts the checked raw disk at `src` to qcow2 at `dest` (which must then be checked
/// again before it is used).
pub async fn convert_raw(src: &Path, dest: &Path) -> Result<()> {
    let len = std::fs::metadata(src)
        .map_err(|e| Error::Internal(format!("cannot read {}: {e}", src.display())))?
        .len();
    let (src, dest) = (absolute(src)?, absolute(dest)?);
    let out = qemu_img(
        &[
            OsStr::new("convert"),
            OsStr::new("-q"),
            OsStr::new("-f"),
            OsStr::new("raw"),
            OsStr::new("-O"),
            OsStr::new("qcow2"),
            OsStr::new("--"),
            src.as_os_str(),
            dest.as_os_str(),
        ],
        convert_limits(len),
        "converting",
    )
    .await?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "qemu-img convert failed: {}",
            shown(String::from_utf8_lossy(&out.stderr).trim())
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::time::Duration;

    use super::{judge_check, judge_info, run_limited, Limits, QemuImgInfo};
    use crate::error::Error;
    use crate::images::DiskFormat;

    const MAX: u64 = 64 << 30;

    /// `qemu-img info --output=json` of a clean qcow2 at /s/disk, with `extra` fields and
    /// `data` inside `format-specific.data`.
    fn info_json(format: &str, extra: &str, data: &str) -> QemuImgInfo {
        let json = format!(
            r#"{{ "virtual-size": 67108864, "filename": "/s/disk", "cluster-size": 65536,
                 "format": "{format}", "actual-size": 200704, {extra}
                 "format-specific": {{ "type": "{format}", "data": {{ "compat": "1.1",
                     "refcount-bits": 16, {data} "corrupt": false, "extended-l2": false }} }},
                 "dirty-flag": false }}"#
        );
        QemuImgInfo::parse(json.as_bytes()).unwrap()
    }

    fn judged(info: &QemuImgInfo) -> String {
        match judge_info(info, DiskFormat::Qcow2, "/s/disk", MAX) {
            Ok(()) => "ok".to_owned(),
            Err(e) => {
                assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
                e.to_string()
            }
        }
    }

    #[test]
    fn qemu_img_info_judgement() {
        assert_eq!(judged(&info_json("qcow2", "", "")), "ok");
        // What qemu-img 7.2 prints for an external data file, edited to name /etc/shadow.
        assert_eq!(
            judged(&info_json(
                "qcow2",
                "",
                r#""data-file": "/etc/shadow", "data-file-raw": false,"#
            )),
            "image refused: it names an external data file (/etc/shadow)"
        );
        assert_eq!(
            judged(&info_json(
                "qcow2",
                r#""backing-filename-format": "raw", "full-backing-filename": "/etc/passwd",
                   "backing-filename": "/etc/passwd","#,
                ""
            )),
            "image refused: it has a backing file (/etc/passwd); import a standalone image (qemu-img convert -O qcow2 flattens it)"
        );
        // Only the full name, as some versions print for relative names.
        let e = judged(&info_json(
            "qcow2",
            r#""full-backing-filename": "/x/base.qcow2","#,
            "",
        ));
        assert!(e.contains("it has a backing file (/x/base.qcow2)"), "{e}");
        assert_eq!(
            judged(&info_json(
                "qcow2",
                r#""backing-filename": "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"/etc/passwd\"}}","#,
                ""
            )),
            r#"image refused: it has a backing file given as a json: description (json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}})"#
        );
        assert_eq!(
            judged(&info_json(
                "qcow2",
                r#""backing-filename": "nbd://127.0.0.1:1/x","#,
                ""
            )),
            "image refused: it has a backing file at a protocol address (nbd://127.0.0.1:1/x)"
        );
        // A LUKS-encrypted qcow2: `encrypted` and the `encrypt` block.
        assert_eq!(
            judged(&info_json(
                "qcow2",
                r#""encrypted": true,"#,
                r#""encrypt": { "format": "luks", "cipher-alg": "aes-256" },"#
            )),
            "image refused: it is encrypted; import an unencrypted image"
        );
        assert_eq!(
            judged(&info_json(
                "qcow2",
                "",
                r#""encrypt": { "format": "aes" },"#
            )),
            "image refused: it is encrypted; import an unencrypted image"
        );
        assert_eq!(
            judged(&info_json("raw", "", "")),
            "image refused: qemu-img reads it as raw, not qcow2"
        );
        let mut moved = info_json("qcow2", "", "");
        moved.filename = "json:{\"file.filename\":\"/etc/shadow\"}".into();
        assert_eq!(
            judged(&moved),
            r#"image refused: qemu-img opened it as json:{"file.filename":"/etc/shadow"}, not as the uploaded file"#
        );
        let mut huge = info_json("qcow2", "", "");
        huge.virtual_size = 100 << 40;
        assert_eq!(
            judged(&huge),
            "image refused: its virtual size of 102400 GiB is larger than the largest volume (64 GiB, max_volume_size_gb)"
        );
        huge.virtual_size = 0;
        assert_eq!(
            judged(&huge),
            "image refused: it has a virtual size of 0 bytes"
        );
        // Names from the image never break the one-line message.
        let e = judged(&info_json(
            "qcow2",
            r#""backing-filename": "a\nb\u202ec","#,
            "",
        ));
        assert!(e.contains(r"(a\nb\u{202e}c)") && !e.contains('\n'), "{e}");
        assert!(QemuImgInfo::parse(b"not json").is_err());
    }

    #[test]
    fn qemu_img_check_judgement() {
        assert!(judge_check(Some(0), b"No errors were found on the image.\n", b"").is_ok());
        assert!(judge_check(
            Some(3),
            b"1 leaked clusters were found on the image.\n",
            b""
        )
        .is_ok());
        let e = judge_check(
            Some(2),
            b"\n3 errors were found on the image.\nData may be corrupted\n",
            b"ERROR cluster 0 refcount=0 reference=1\n",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "image refused: it is corrupt or truncated (qemu-img check: 3 errors were found on the image.)"
        );
        let e = judge_check(Some(1), b"", b"qemu-img: Could not open 'x'\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "image refused: qemu-img check cannot check it (qemu-img: Could not open 'x')"
        );
        assert!(judge_check(None, b"", b"").is_err());
    }

    #[tokio::test]
    async fn limits_apply_to_the_child_and_the_clock_kills_it() {
        let sh = |script: &str| {
            let script = script.to_owned();
            async move {
                run_limited(
                    "sh",
                    &[OsStr::new("-c"), OsStr::new(&script)],
                    Limits {
                        address_space: 1 << 30,
                        cpu_secs: 30,
                        wall: Duration::from_millis(300),
                    },
                    "testing",
                )
                .await
            }
        };
        let out = sh("ulimit -v; ulimit -t; ulimit -c").await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "1048576\n30\n0\n");
        let started = std::time::Instant::now();
        let e = sh("sleep 5").await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "image refused: sh did not finish testing it within 300ms"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        let e = sh("kill -9 $$").await.unwrap_err();
        assert!(e.to_string().contains("killed by signal 9"), "{e}");
    }
}
