//! The hypervisor layer's errors: what libvirt said (with its error code, so the API can
//! tell a request that is wrong for the domain's state from an outage), a call that did not
//! return in time, and the layer's own refusals about libvirt objects.

use virt::error::{ErrorNumber, ErrorNumberEnum};

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// libvirt refused or failed a call.
    #[error("{}", .0.message())]
    Libvirt(virt::error::Error),
    /// A libvirt call did not return within the daemon's libvirt timeout.
    #[error("libvirt call {call} did not return within {secs} s")]
    Timeout { call: &'static str, secs: u64 },
    /// A libvirt object is not as aether made it (missing, or not aether's).
    #[error("{0}")]
    Unexpected(String),
}

impl HypervisorError {
    /// libvirt's error code, when libvirt reported the error.
    pub fn code(&self) -> Option<ErrorNumberEnum> {
        match self {
            HypervisorError::Libvirt(e) => Some(e.code()),
            HypervisorError::Timeout { .. } | HypervisorError::Unexpected(_) => None,
        }
    }

    /// Whether libvirt refused the call because of the object's state (e.g. a domain that is
    /// not running), rather than failing.
    pub fn is_wrong_state(&self) -> bool {
        self.code()
            .is_some_and(|c| c.is(ErrorNumber::OperationInvalid))
    }

    /// Whether the message is libvirt's or this layer's (and so reads "libvirt: …").
    pub fn from_libvirt(&self) -> bool {
        !matches!(self, HypervisorError::Timeout { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::HypervisorError;
    use crate::error::Error;

    #[test]
    fn messages_read_as_before_the_layer_had_its_own_type() {
        let timeout = Error::from(HypervisorError::Timeout {
            call: "virDomainCreate",
            secs: 30,
        });
        assert_eq!(
            timeout.to_string(),
            "libvirt call virDomainCreate did not return within 30 s"
        );
        let odd = Error::libvirt("domain aether-ws-abc123 is not defined");
        assert_eq!(
            odd.to_string(),
            "libvirt: domain aether-ws-abc123 is not defined"
        );
        for e in [timeout, odd] {
            let Error::Hypervisor(h) = e else {
                panic!("not a hypervisor error")
            };
            assert_eq!(h.code(), None);
            assert!(!h.is_wrong_state());
        }
    }
}
