//! The one mapping from the daemon's [`Error`] to a gRPC [`Status`]: the only place in the
//! API that picks a status code for a daemon error.

use tonic::Status;

use crate::error::Error;
use crate::store::StoreError;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        status(e)
    }
}

/// The single mapping from the daemon's errors to gRPC status codes.
pub fn status(e: Error) -> Status {
    if let Error::Hypervisor(h) = &e {
        tracing::debug!(error = %h, code = ?h.code(), "hypervisor error");
    }
    let msg = e.to_string();
    match e {
        Error::InvalidArgument(_) => Status::invalid_argument(msg),
        Error::NotFound { .. } => Status::not_found(msg),
        Error::AlreadyExists(_) => Status::already_exists(msg),
        Error::FailedPrecondition(_) => Status::failed_precondition(msg),
        Error::Refused(_) => Status::failed_precondition(msg),
        Error::Store(StoreError::Conflict { .. }) => Status::aborted(msg),
        Error::Store(StoreError::Busy(_)) => Status::unavailable(msg),
        Error::PermissionDenied(_) => Status::permission_denied(msg),
        Error::Unavailable(_) => Status::unavailable(msg),
        Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
        // libvirt refusing an operation for the domain's state is the caller's precondition;
        // anything else from libvirt is the hypervisor being unavailable.
        Error::Hypervisor(h) if h.is_wrong_state() => Status::failed_precondition(msg),
        Error::Hypervisor(_) => Status::unavailable(msg),
        Error::Store(StoreError::Sql(_)) | Error::Internal(_) => Status::internal(msg),
    }
}
