//! The workspace lifecycle state machine.
//!
//! ```text
//!            Start                 Ready
//!  stopped ─────────► starting ─────────► running
//!     ▲  ▲               │ BootFailed       │ Stop
//!     │  │               ▼                  ▼
//!     │  │  Start      error ◄─Crashed── stopping ──StopTimedOut──► stop_failed
//!     │  └────────────  │                   │                         │
//!     │                 │ (Start again)     │ PoweredOff              │ ForceStop
//!     └─────────────────┴───────────────────┴─────────────────────────┘
//! ```
//!
//! Invariants:
//! - [`transition`] is the only place that decides whether a state change is legal; it is one
//!   exhaustive `match` with no catch-all arm, so a new state or event does not compile until
//!   every combination is decided.
//! - Every decided change is written as a compare-and-swap on the workspace's `generation`
//!   (see `store`), so two racing requests cannot both win.
//! - Events that report reality (`PoweredOff`, `Crashed`) are accepted in every state where the
//!   VM could be on; requests from users (`Start`, `Stop`, `ForceStop`) are refused with a
//!   message that names the current state.

use std::fmt;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Stopped,
    Starting,
    Running,
    Stopping,
    Error,
    StopFailed,
}

/// Something that happened to a workspace: a user's request or an observation of the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The user asked to start it.
    Start,
    /// The VM came up and is ready.
    Ready,
    /// Starting failed (libvirt refused, or readiness timed out).
    BootFailed,
    /// The user asked for a graceful stop.
    Stop,
    /// The user asked to power the VM off at once (destroy).
    ForceStop,
    /// The VM is off: it shut down after a stop request or by itself.
    PoweredOff,
    /// A graceful stop did not finish in time, or libvirt refused it.
    StopTimedOut,
    /// The VM died without being asked to (qemu crashed or was killed).
    Crashed,
}

pub const ALL_STATES: [State; 6] = [
    State::Stopped,
    State::Starting,
    State::Running,
    State::Stopping,
    State::Error,
    State::StopFailed,
];

pub const ALL_EVENTS: [Event; 8] = [
    Event::Start,
    Event::Ready,
    Event::BootFailed,
    Event::Stop,
    Event::ForceStop,
    Event::PoweredOff,
    Event::StopTimedOut,
    Event::Crashed,
];

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Error => "error",
            State::StopFailed => "stop_failed",
        }
    }

    pub fn parse(s: &str) -> Result<State> {
        ALL_STATES
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "invalid status {s:?}: expected one of stopped, starting, running, stopping, error, stop_failed"
                ))
            })
    }

    /// Whether the workspace may be deleted without `force`: its VM is not running.
    pub fn deletable(self) -> bool {
        match self {
            State::Stopped | State::Error | State::StopFailed => true,
            State::Starting | State::Running | State::Stopping => false,
        }
    }

    /// Whether hardware changes apply at once (the VM is off) or wait for the next start.
    pub fn vm_is_off(self) -> bool {
        match self {
            State::Stopped | State::Error => true,
            State::Starting | State::Running | State::Stopping | State::StopFailed => false,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state after `event` happens in state `from`, or why it is refused.
pub fn transition(from: State, event: Event) -> Result<State> {
    use Event as E;
    use State as S;
    let refuse = |why: &str| Err(Error::precondition(format!("workspace is {from}: {why}")));
    match (from, event) {
        (S::Stopped | S::Error, E::Start) => Ok(S::Starting),
        (S::Starting, E::Start) => refuse("it is already starting"),
        (S::Running, E::Start) => refuse("it is already running"),
        (S::Stopping, E::Start) => refuse("wait until it has stopped, then start it"),
        (S::StopFailed, E::Start) => refuse("stop it with --force first"),

        (S::Starting, E::Ready) => Ok(S::Running),
        (S::Starting, E::BootFailed) => Ok(S::Error),
        (
            S::Stopped | S::Running | S::Stopping | S::Error | S::StopFailed,
            E::Ready | E::BootFailed,
        ) => refuse("it is not starting"),

        (S::Starting | S::Running, E::Stop) => Ok(S::Stopping),
        (S::Stopped, E::Stop) => refuse("it is already stopped"),
        (S::Stopping, E::Stop) => refuse("it is already stopping"),
        (S::Error, E::Stop) => refuse("its VM is not running; start or delete it"),
        (S::StopFailed, E::Stop) => refuse("a graceful stop already failed; use --force"),

        (S::Starting | S::Running | S::Stopping | S::Error | S::StopFailed, E::ForceStop) => {
            Ok(S::Stopped)
        }
        (S::Stopped, E::ForceStop) => refuse("it is already stopped"),

        (S::Starting | S::Running | S::Stopping | S::StopFailed, E::PoweredOff) => Ok(S::Stopped),
        // Nothing to do: the VM was already known to be off.
        (S::Stopped | S::Error, E::PoweredOff) => Ok(from),

        (S::Stopping, E::StopTimedOut) => Ok(S::StopFailed),
        (S::Stopped | S::Starting | S::Running | S::Error | S::StopFailed, E::StopTimedOut) => {
            refuse("it is not stopping")
        }

        (S::Starting | S::Running | S::Stopping | S::StopFailed, E::Crashed) => Ok(S::Error),
        (S::Stopped | S::Error, E::Crashed) => Ok(from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event as E;
    use State as S;

    /// The whole table, written out independently of `transition`: (from, event, Some(to)) for
    /// legal transitions, None for refusals.
    const TABLE: &[(State, Event, Option<State>)] = &[
        (S::Stopped, E::Start, Some(S::Starting)),
        (S::Stopped, E::Ready, None),
        (S::Stopped, E::BootFailed, None),
        (S::Stopped, E::Stop, None),
        (S::Stopped, E::ForceStop, None),
        (S::Stopped, E::PoweredOff, Some(S::Stopped)),
        (S::Stopped, E::StopTimedOut, None),
        (S::Stopped, E::Crashed, Some(S::Stopped)),
        (S::Starting, E::Start, None),
        (S::Starting, E::Ready, Some(S::Running)),
        (S::Starting, E::BootFailed, Some(S::Error)),
        (S::Starting, E::Stop, Some(S::Stopping)),
        (S::Starting, E::ForceStop, Some(S::Stopped)),
        (S::Starting, E::PoweredOff, Some(S::Stopped)),
        (S::Starting, E::StopTimedOut, None),
        (S::Starting, E::Crashed, Some(S::Error)),
        (S::Running, E::Start, None),
        (S::Running, E::Ready, None),
        (S::Running, E::BootFailed, None),
        (S::Running, E::Stop, Some(S::Stopping)),
        (S::Running, E::ForceStop, Some(S::Stopped)),
        (S::Running, E::PoweredOff, Some(S::Stopped)),
        (S::Running, E::StopTimedOut, None),
        (S::Running, E::Crashed, Some(S::Error)),
        (S::Stopping, E::Start, None),
        (S::Stopping, E::Ready, None),
        (S::Stopping, E::BootFailed, None),
        (S::Stopping, E::Stop, None),
        (S::Stopping, E::ForceStop, Some(S::Stopped)),
        (S::Stopping, E::PoweredOff, Some(S::Stopped)),
        (S::Stopping, E::StopTimedOut, Some(S::StopFailed)),
        (S::Stopping, E::Crashed, Some(S::Error)),
        (S::Error, E::Start, Some(S::Starting)),
        (S::Error, E::Ready, None),
        (S::Error, E::BootFailed, None),
        (S::Error, E::Stop, None),
        (S::Error, E::ForceStop, Some(S::Stopped)),
        (S::Error, E::PoweredOff, Some(S::Error)),
        (S::Error, E::StopTimedOut, None),
        (S::Error, E::Crashed, Some(S::Error)),
        (S::StopFailed, E::Start, None),
        (S::StopFailed, E::Ready, None),
        (S::StopFailed, E::BootFailed, None),
        (S::StopFailed, E::Stop, None),
        (S::StopFailed, E::ForceStop, Some(S::Stopped)),
        (S::StopFailed, E::PoweredOff, Some(S::Stopped)),
        (S::StopFailed, E::StopTimedOut, None),
        (S::StopFailed, E::Crashed, Some(S::Error)),
    ];

    #[test]
    fn table_covers_every_state_and_event() {
        for s in ALL_STATES {
            for e in ALL_EVENTS {
                let n = TABLE
                    .iter()
                    .filter(|(f, ev, _)| *f == s && *ev == e)
                    .count();
                assert_eq!(n, 1, "{s:?} x {e:?} appears {n} times in TABLE");
            }
        }
    }

    #[test]
    fn every_legal_and_illegal_transition() {
        for &(from, event, expected) in TABLE {
            match (transition(from, event), expected) {
                (Ok(to), Some(want)) => assert_eq!(to, want, "{from:?} x {event:?}"),
                (Err(e), None) => {
                    assert!(
                        matches!(e, Error::FailedPrecondition(_)),
                        "{from:?} x {event:?}: {e:?}"
                    );
                    // A refusal names the current state.
                    assert!(
                        e.to_string().starts_with(&format!("workspace is {from}:")),
                        "{e}"
                    );
                }
                (got, want) => panic!("{from:?} x {event:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn state_names_round_trip() {
        for s in ALL_STATES {
            assert_eq!(State::parse(s.as_str()).unwrap(), s);
        }
        assert!(State::parse("paused").is_err());
    }

    #[test]
    fn delete_and_update_rules() {
        let deletable: Vec<_> = ALL_STATES.into_iter().filter(|s| s.deletable()).collect();
        assert_eq!(deletable, [S::Stopped, S::Error, S::StopFailed]);
        let off: Vec<_> = ALL_STATES.into_iter().filter(|s| s.vm_is_off()).collect();
        assert_eq!(off, [S::Stopped, S::Error]);
    }
}
