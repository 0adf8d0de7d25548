//! The daemon's error type. The API layer maps it to a gRPC status in exactly one place
//! (`api::status`); everything below speaks this enum.

use crate::hypervisor::error::HypervisorError;
use crate::store::StoreError;
use crate::workspace::state::Refused;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value from the caller is malformed or out of range; the message names the allowed range.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such object, or not visible to the caller; `hint` (if any) says what to run next.
    #[error("{kind} {id} not found{}", if .hint.is_empty() { String::new() } else { format!(": {}", .hint) })]
    NotFound {
        kind: &'static str,
        id: String,
        hint: &'static str,
    },
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is not allowed in the object's current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The host lacks the CPUs, memory or devices the request needs.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The hypervisor layer failed; its message reads "libvirt: …", or names the call
    /// that timed out.
    #[error("{}{}", if .0.from_libvirt() { "libvirt: " } else { "" }, .0)]
    Hypervisor(#[from] HypervisorError),
    /// The store layer failed, or a gated write lost to another change.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The workspace's state does not allow the request (see `workspace::state::step`).
    #[error("{0}")]
    Refused(#[from] Refused),
    /// The guest cannot be reached or refused the daemon (SSH).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    pub fn precondition(msg: impl Into<String>) -> Self {
        Self::FailedPrecondition(msg.into())
    }

    /// A libvirt object is not as aether made it.
    pub fn libvirt(msg: impl Into<String>) -> Self {
        Self::Hypervisor(HypervisorError::Unexpected(msg.into()))
    }

    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        Self::not_found_hint(kind, id, "")
    }

    /// [`Error::not_found`], saying what to run next.
    pub fn not_found_hint(kind: &'static str, id: impl Into<String>, hint: &'static str) -> Self {
        Self::NotFound {
            kind,
            id: id.into(),
            hint,
        }
    }
}

/// A malformed id, name or login user (see `aether-domain`), with its message unchanged.
impl From<aether_domain::InvalidInput> for Error {
    fn from(e: aether_domain::InvalidInput) -> Self {
        Self::InvalidArgument(e.into_message())
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Self::Store(StoreError::from(e))
    }
}

impl From<virt::error::Error> for Error {
    fn from(e: virt::error::Error) -> Self {
        Self::Hypervisor(HypervisorError::Libvirt(e))
    }
}
