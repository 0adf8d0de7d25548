//! The daemon's SSH key (authorized in every guest, for tasks and readiness) and random
//! domain UUIDs.

use crate::cloudinit::{self, KeyPair};
use crate::error::{Error, Result};
use crate::files;
use crate::host::Layout;

/// Loads the daemon's SSH key from the state dir, generating it on first start. Both
/// files are 0600 (root's).
pub fn daemon_key(layout: &Layout) -> Result<KeyPair> {
    let private = layout.keys().join("id_ed25519");
    let public = layout.keys().join("id_ed25519.pub");
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map_err(|e| Error::Internal(format!("cannot read {}: {e}", p.display())))
    };
    if private.exists() && public.exists() {
        return Ok(KeyPair {
            private: read(&private)?,
            public: read(&public)?.trim().to_owned(),
        });
    }
    let pair = cloudinit::generate_ed25519(&layout.tmp(), "aetherd")?;
    let write = |p: &std::path::Path, s: &str, mode: u32| -> Result<()> {
        std::fs::write(p, s)
            .map_err(|e| Error::Internal(format!("cannot write {}: {e}", p.display())))?;
        files::set_mode(p, mode)
    };
    write(&private, &pair.private, 0o600)?;
    write(&public, &format!("{}\n", pair.public), 0o600)?;
    tracing::info!(key = %public.display(), "generated the daemon's SSH key");
    Ok(pair)
}

/// A random (version 4) UUID for a new domain.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the kernel's random source is available");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
