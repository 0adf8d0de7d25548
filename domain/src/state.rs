//! The names of the workspace states, as the daemon stores them and users type them
//! (`aether workspace list --status`).

use crate::{InvalidInput, Result};

/// Every state name, in the order of the lifecycle (the daemon's `ALL_STATES`).
pub const STATE_NAMES: [&str; 6] = [
    "stopped",
    "starting",
    "running",
    "stopping",
    "error",
    "stop_failed",
];

/// `s` as one of [`STATE_NAMES`].
pub fn parse_state_name(s: &str) -> Result<&'static str> {
    STATE_NAMES
        .into_iter()
        .find(|name| *name == s)
        .ok_or_else(|| {
            InvalidInput::new(format!(
                "invalid status {s:?}: expected one of {}",
                STATE_NAMES.join(", ")
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::{parse_state_name, STATE_NAMES};

    #[test]
    fn state_names() {
        for name in STATE_NAMES {
            assert_eq!(parse_state_name(name).unwrap(), name);
        }
        for bad in ["", "paused", "Running", "stop-failed", " running"] {
            assert!(parse_state_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_state_name("paused").unwrap_err().message(),
            "invalid status \"paused\": expected one of stopped, starting, running, stopping, error, stop_failed"
        );
    }
}
