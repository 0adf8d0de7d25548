//! Definitions that aetherd and the `aether` CLI share, so both accept and refuse the same
//! input with the same words: ids and names ([`WorkspaceId`], [`ProjectId`], [`TaskId`],
//! [`ProjectName`], [`ProjectRef`]), the login-user rule ([`validate_login`]) and the workspace state names
//! ([`STATE_NAMES`]).
//!
//! Nothing here does I/O. The one exception is opt-in: the `generate` feature (the daemon's)
//! adds `ProjectId::generate`, `WorkspaceId::generate` and `TaskId::generate`, which read the kernel's random
//! source.

mod ids;
mod login;
mod state;

pub use ids::{ProjectId, ProjectName, ProjectRef, TaskId, WorkspaceId};
pub use login::validate_login;
pub use state::{parse_state_name, STATE_NAMES};

/// A value from the user is malformed; the message says what was expected. aetherd turns it
/// into its `InvalidArgument` error with the message unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(String);

impl InvalidInput {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }

    pub fn message(&self) -> &str {
        &self.0
    }

    pub fn into_message(self) -> String {
        self.0
    }
}

pub type Result<T, E = InvalidInput> = std::result::Result<T, E>;
