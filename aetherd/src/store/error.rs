//! The store's errors: SQLite busy past the busy timeout (another writer holds the
//! database: worth retrying), any other SQLite failure, and a generation-gated write that
//! lost to another change.

use crate::workspace::state::State;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another connection held the database past the busy timeout.
    #[error("the state database is busy: {0}")]
    Busy(rusqlite::Error),
    #[error("state database: {0}")]
    Sql(rusqlite::Error),
    /// The workspace changed since it was read (its generation moved on); nothing was written.
    #[error("workspace {id} changed state concurrently (now {now}); try again")]
    Conflict { id: String, now: State },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked};
        match e.sqlite_error_code() {
            Some(DatabaseBusy | DatabaseLocked) => StoreError::Busy(e),
            _ => StoreError::Sql(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StoreError;
    use crate::api::status;
    use crate::error::Error;
    use crate::workspace::state::State;
    use tonic::Code;

    fn sqlite(code: std::os::raw::c_int) -> Error {
        Error::from(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ))
    }

    /// A busy database is worth retrying (UNAVAILABLE), a lost gated write is ABORTED, any
    /// other SQLite failure is the daemon's (INTERNAL).
    #[test]
    fn store_errors_keep_what_kind_they_are_up_to_the_status() {
        let busy = sqlite(rusqlite::ffi::SQLITE_BUSY);
        assert!(
            matches!(busy, Error::Store(StoreError::Busy(_))),
            "{busy:?}"
        );
        assert!(busy.to_string().starts_with("the state database is busy: "));
        assert_eq!(status(busy).code(), Code::Unavailable);
        let full = sqlite(rusqlite::ffi::SQLITE_FULL);
        assert!(full.to_string().starts_with("state database: "), "{full}");
        assert_eq!(status(full).code(), Code::Internal);
        let lost = Error::from(StoreError::Conflict {
            id: "ws-abc123".into(),
            now: State::Starting,
        });
        assert_eq!(
            lost.to_string(),
            "workspace ws-abc123 changed state concurrently (now starting); try again"
        );
        assert_eq!(status(lost).code(), Code::Aborted);
    }
}
