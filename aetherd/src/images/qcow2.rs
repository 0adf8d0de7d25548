//! Our own read of a qcow2 header, done before any `qemu-img` opens the file (qemu-img
//! would open an external data file named in it).

use crate::error::Result;

use super::check::{backing_refusal, check_virtual_size};
use super::{refused, shown_bytes};

const QCOW2_INCOMPAT_DIRTY: u64 = 1 << 0;
const QCOW2_INCOMPAT_CORRUPT: u64 = 1 << 1;
const QCOW2_INCOMPAT_DATA_FILE: u64 = 1 << 2;
const QCOW2_INCOMPAT_COMPRESSION: u64 = 1 << 3;
const QCOW2_INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const QCOW2_EXT_DATA_FILE: u32 = 0x4441_5441;

/// Reads the qcow2 header of a disk ourselves, before any qemu-img opens it (qemu-img
/// would open an external data file named in it): refuses a backing file, an external data
/// file, encryption, features this check does not know, a corrupt flag, a virtual size of 0
/// or above `max_virtual`, and a file too short for the tables its header describes (a
/// truncated image). `head` is the file's first bytes (up to 2 MiB), `file_len` its size.
/// Returns the virtual size.
pub fn check_qcow2_header(head: &[u8], file_len: u64, max_virtual: u64) -> Result<u64> {
    let truncated = |needed: u64| {
        refused(format!(
            "it is truncated: the file has {file_len} bytes, its qcow2 header describes at least {needed}"
        ))
    };
    let corrupt = |what: &str| refused(format!("its qcow2 header is corrupt ({what})"));
    let u32_at = |off: usize| {
        head.get(off..off + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |off: usize| {
        head.get(off..off + 8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
    };
    if head.len() < 72 {
        return Err(truncated(72));
    }
    let field32 = |off| u32_at(off).expect("within the 72 bytes checked");
    let field64 = |off| u64_at(off).expect("within the 72 bytes checked");
    let version = field32(4);
    if version != 2 && version != 3 {
        return Err(refused(format!(
            "unsupported qcow2 version {version}: expected 2 or 3"
        )));
    }
    let backing_offset = field64(8);
    let backing_len = field32(16) as usize;
    let cluster_bits = field32(20);
    let size = field64(24);
    let crypt_method = field32(32);
    let l1_size = u64::from(field32(36));
    let l1_offset = field64(40);
    let refcount_offset = field64(48);
    let refcount_clusters = u64::from(field32(56));
    let (incompatible, header_len) = if version == 3 {
        match (u64_at(72), u32_at(100)) {
            (Some(incompat), Some(len)) => (incompat, len as usize),
            _ => return Err(truncated(104)),
        }
    } else {
        (0, 72)
    };
    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt(&format!("cluster bits {cluster_bits}")));
    }
    let cluster = 1u64 << cluster_bits;
    // The file must hold the header cluster, the L1 table and the refcount table.
    let needed = [
        Some(cluster),
        l1_size
            .checked_mul(8)
            .and_then(|n| n.checked_add(l1_offset)),
        refcount_clusters
            .checked_mul(cluster)
            .and_then(|n| n.checked_add(refcount_offset)),
    ]
    .into_iter()
    .try_fold(0u64, |acc, n| n.map(|n| acc.max(n)))
    .ok_or_else(|| corrupt("table offsets overflow"))?;
    if file_len < needed {
        return Err(truncated(needed));
    }
    if !l1_offset.is_multiple_of(cluster)
        || !refcount_offset.is_multiple_of(cluster)
        || refcount_offset == 0
    {
        return Err(corrupt("misaligned tables"));
    }
    let known = QCOW2_INCOMPAT_DIRTY
        | QCOW2_INCOMPAT_CORRUPT
        | QCOW2_INCOMPAT_DATA_FILE
        | QCOW2_INCOMPAT_COMPRESSION
        | QCOW2_INCOMPAT_EXTENDED_L2;
    if incompatible & !known != 0 {
        return Err(refused(format!(
            "its qcow2 header uses unknown incompatible features ({:#x})",
            incompatible & !known
        )));
    }
    if incompatible & QCOW2_INCOMPAT_CORRUPT != 0 {
        return Err(refused("qemu marked it corrupt"));
    }
    // Header extensions, up to the end marker, all within the first cluster.
    let limit = head.len().min(cluster as usize);
    let mut data_file: Option<String> = None;
    let mut off = header_len;
    if off < 72 || off > limit {
        return Err(corrupt(&format!("header length {header_len}")));
    }
    loop {
        let (Some(kind), Some(len)) = (u32_at(off), u32_at(off + 4)) else {
            return Err(corrupt("unterminated header extensions"));
        };
        if off + 8 > limit {
            return Err(corrupt("unterminated header extensions"));
        }
        if kind == 0 {
            break;
        }
        let start = off + 8;
        let end = start
            .checked_add(len as usize)
            .filter(|&e| e <= limit)
            .ok_or_else(|| corrupt("header extension beyond the first cluster"))?;
        if kind == QCOW2_EXT_DATA_FILE {
            data_file = Some(shown_bytes(&head[start..end]));
        }
        off = start + (len as usize).div_ceil(8) * 8;
    }
    if data_file.is_some() || incompatible & QCOW2_INCOMPAT_DATA_FILE != 0 {
        return Err(refused(format!(
            "it names an external data file ({})",
            data_file.as_deref().unwrap_or("unnamed")
        )));
    }
    if backing_offset != 0 {
        let name = usize::try_from(backing_offset)
            .ok()
            .and_then(|o| head.get(o..o.checked_add(backing_len)?))
            .map(shown_bytes)
            .unwrap_or_else(|| "its name lies outside the header".to_owned());
        return Err(backing_refusal(&name));
    }
    if crypt_method != 0 {
        let how = match crypt_method {
            1 => "aes",
            2 => "luks",
            _ => "unknown method",
        };
        return Err(refused(format!(
            "it is encrypted ({how}); import an unencrypted image"
        )));
    }
    check_virtual_size(size, max_virtual)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::{
        check_qcow2_header, QCOW2_EXT_DATA_FILE, QCOW2_INCOMPAT_CORRUPT, QCOW2_INCOMPAT_DATA_FILE,
    };

    const MAX: u64 = 64 << 30;

    /// A qcow2 v3 header cluster (64 KiB clusters, refcount table in cluster 1, L1 table in
    /// cluster 3) and the length of the file it describes.
    struct Header {
        backing: Option<&'static [u8]>,
        crypt: u32,
        incompatible: u64,
        size: u64,
        data_file: Option<&'static [u8]>,
    }

    const CLEAN: Header = Header {
        backing: None,
        crypt: 0,
        incompatible: 0,
        size: 64 << 20,
        data_file: None,
    };

    impl Header {
        fn bytes(&self) -> Vec<u8> {
            let mut h = vec![0u8; 65536];
            let mut put = |off: usize, b: &[u8]| h[off..off + b.len()].copy_from_slice(b);
            put(0, b"QFI\xfb");
            put(4, &3u32.to_be_bytes());
            if let Some(name) = self.backing {
                put(8, &0x200u64.to_be_bytes());
                put(16, &(name.len() as u32).to_be_bytes());
                put(0x200, name);
            }
            put(20, &16u32.to_be_bytes());
            put(24, &self.size.to_be_bytes());
            put(32, &self.crypt.to_be_bytes());
            put(36, &1u32.to_be_bytes());
            put(40, &0x30000u64.to_be_bytes());
            put(48, &0x10000u64.to_be_bytes());
            put(56, &1u32.to_be_bytes());
            put(72, &self.incompatible.to_be_bytes());
            put(96, &4u32.to_be_bytes());
            put(100, &104u32.to_be_bytes());
            let mut off = 104;
            if let Some(name) = self.data_file {
                put(off, &QCOW2_EXT_DATA_FILE.to_be_bytes());
                put(off + 4, &(name.len() as u32).to_be_bytes());
                put(off + 8, name);
                off += 8 + name.len().div_ceil(8) * 8;
            }
            put(off, &[0u8; 8]);
            h
        }

        fn check(&self) -> String {
            match check_qcow2_header(&self.bytes(), 0x30008, MAX) {
                Ok(size) => format!("ok {size}"),
                Err(e) => e.to_string(),
            }
        }
    }

    #[test]
    fn qcow2_headers_are_read_before_qemu_img_opens_anything() {
        assert_eq!(CLEAN.check(), format!("ok {}", 64 << 20));
        assert_eq!(
            Header {
                data_file: Some(b"/etc/shadow"),
                incompatible: QCOW2_INCOMPAT_DATA_FILE,
                ..CLEAN
            }
            .check(),
            "image refused: it names an external data file (/etc/shadow)"
        );
        assert_eq!(
            Header {
                incompatible: QCOW2_INCOMPAT_DATA_FILE,
                ..CLEAN
            }
            .check(),
            "image refused: it names an external data file (unnamed)"
        );
        assert_eq!(
            Header {
                data_file: Some(b"/etc/shadow"),
                ..CLEAN
            }
            .check(),
            "image refused: it names an external data file (/etc/shadow)"
        );
        assert_eq!(
            Header {
                backing: Some(b"json:{\"file.filename\":\"/etc/shadow\"}"),
                ..CLEAN
            }
            .check(),
            r#"image refused: it has a backing file given as a json: description (json:{"file.filename":"/etc/shadow"})"#
        );
        let e = Header {
            backing: Some(b"/etc/passwd"),
            ..CLEAN
        }
        .check();
        assert!(
            e.starts_with("image refused: it has a backing file (/etc/passwd)"),
            "{e}"
        );
        assert_eq!(
            Header { crypt: 2, ..CLEAN }.check(),
            "image refused: it is encrypted (luks); import an unencrypted image"
        );
        assert_eq!(
            Header { crypt: 1, ..CLEAN }.check(),
            "image refused: it is encrypted (aes); import an unencrypted image"
        );
        assert_eq!(
            Header {
                incompatible: 1 << 9,
                ..CLEAN
            }
            .check(),
            "image refused: its qcow2 header uses unknown incompatible features (0x200)"
        );
        assert_eq!(
            Header {
                incompatible: QCOW2_INCOMPAT_CORRUPT,
                ..CLEAN
            }
            .check(),
            "image refused: qemu marked it corrupt"
        );
        assert_eq!(
            Header {
                size: 1 << 60,
                ..CLEAN
            }
            .check(),
            "image refused: its virtual size of 1073741824 GiB is larger than the largest volume (64 GiB, max_volume_size_gb)"
        );
        assert_eq!(
            Header { size: 0, ..CLEAN }.check(),
            "image refused: it has a virtual size of 0 bytes"
        );
        // Cut to its first 300 bytes, or anything shorter than its tables.
        let whole = CLEAN.bytes();
        assert_eq!(
            check_qcow2_header(&whole[..300], 300, MAX)
                .unwrap_err()
                .to_string(),
            "image refused: it is truncated: the file has 300 bytes, its qcow2 header describes at least 196616"
        );
        assert!(check_qcow2_header(&whole, 0x30000, MAX)
            .unwrap_err()
            .to_string()
            .contains("it is truncated"));
        assert!(check_qcow2_header(&whole[..40], 40, MAX)
            .unwrap_err()
            .to_string()
            .contains("it is truncated"));
        // An extension running past the first cluster.
        let mut runaway = whole.clone();
        runaway[104..108].copy_from_slice(&QCOW2_EXT_DATA_FILE.to_be_bytes());
        runaway[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(check_qcow2_header(&runaway, 0x30008, MAX)
            .unwrap_err()
            .to_string()
            .contains("header is corrupt"));
        let mut v1 = whole;
        v1[4..8].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(
            check_qcow2_header(&v1, 0x30008, MAX)
                .unwrap_err()
                .to_string(),
            "image refused: unsupported qcow2 version 1: expected 2 or 3"
        );
    }
}
