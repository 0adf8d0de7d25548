//! The workspace lifecycle state machine.
//!
//! ```text
//!            Start                 Ready
//!  stopped ─────────► starting ─────────► running ◄──┐ SaveFailed
//!     ▲  ▲               │ BootFailed       │ Stop,  │
//!     │  │               ▼                  ▼ Suspend┘
//!     │  │  Start      error ◄─Crashed── stopping ──StopTimedOut──► stop_failed
//!     │  └────────────  │                   │                         │
//!     │                 │ (Start again)     │ PoweredOff              │ ForceStop
//!     └─────────────────┴───────────────────┴─────────────────────────┘
//! ```
//!
//! Invariants:
//! - [`step`] is the only place that decides whether a state change is legal and what it
//!   sets off; it is one exhaustive `match` with no catch-all arm, so a new state or event
//!   does not compile until every combination is decided. It does no I/O: the workspace's
//!   runner (`workspace::runner`) carries out the [`Effect`]s and writes the new state.
//! - A request that is already satisfied or under way (start while starting or running, stop
//!   while stopping or stopped) is a success that changes nothing, not an error.
//! - Every decided change is written in one store transaction gated on the workspace's
//!   `generation` (see `store`), with the host resources it takes or frees ([`Hold`]).
//! - A suspend is a stop that saves the guest's memory instead of shutting it down: the
//!   workspace is `stopping` while the memory image is written and `stopped` after, and the
//!   next start resumes from the image. A save that fails leaves the guest running.
//! - Events that report reality (`PoweredOff`, `Crashed`) are accepted in every state where the
//!   VM could be on; requests from users (`Start`, `Stop`, `ForceStop`) that cannot be met
//!   are refused ([`Refused`]) with a message that names the current state.

use std::fmt;

use crate::error::Result;

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
    /// The user (or the idle timer) asked to save the guest's memory and power the VM off.
    Suspend,
    /// Saving the guest's memory failed; the guest still runs.
    SaveFailed,
}

pub const ALL_STATES: [State; 6] = [
    State::Stopped,
    State::Starting,
    State::Running,
    State::Stopping,
    State::Error,
    State::StopFailed,
];

pub const ALL_EVENTS: [Event; 10] = [
    Event::Start,
    Event::Ready,
    Event::BootFailed,
    Event::Stop,
    Event::ForceStop,
    Event::PoweredOff,
    Event::StopTimedOut,
    Event::Crashed,
    Event::Suspend,
    Event::SaveFailed,
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

    /// Parses a state name with the rule the CLI shares (`aether_domain::STATE_NAMES`).
    pub fn parse(s: &str) -> Result<State> {
        let name = aether_domain::parse_state_name(s)?;
        Ok(ALL_STATES
            .into_iter()
            .find(|st| st.as_str() == name)
            .expect("ALL_STATES has every name of STATE_NAMES (model's tests hold them equal)"))
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

/// Something the runner does for a step, besides writing the new state. In the order the
/// runner carries them out: [`Effect::CancelJob`] and [`Effect::PowerOff`] before the write
/// (a forced stop whose power-off fails changes nothing), the rest after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Stop the boot or graceful stop in flight (it finishes its current libvirt call).
    CancelJob,
    /// Power the VM off at once (libvirt destroy).
    PowerOff,
    /// The tasks running in the guest end (`lost`).
    EndTasks,
    /// Boot the VM and wait until it is ready, in the background.
    Boot,
    /// Ask the guest to shut down (ACPI) and wait for it to power off, in the background.
    Shutdown,
    /// Save the guest's memory to its memory image, which powers the VM off, in the
    /// background.
    Save,
}

/// What a step does with the host resources a VM holds while it is on (dedicated CPUs, a
/// GPU), written in the same transaction as the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// As they are.
    Keep,
    /// Picked for the VM now (placement), with the pending hardware applied.
    Take,
    /// Given back: the VM is off.
    Free,
}

/// The outcome of an event in a state: the state after it and what it sets off. A `to` equal
/// to the current state with no effects changes nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub to: State,
    pub hold: Hold,
    pub effects: &'static [Effect],
}

impl Step {
    /// Whether the step changes nothing (the request is already satisfied).
    pub fn is_noop(&self, from: State) -> bool {
        self.to == from && self.effects.is_empty() && self.hold == Hold::Keep
    }
}

/// A request the current state cannot meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub state: State,
    pub event: Event,
    pub why: &'static str,
}

impl std::error::Error for Refused {}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "workspace is {}: {}", self.state, self.why)
    }
}

/// What `event` does to a workspace in state `from`, or why it is refused.
pub fn step(from: State, event: Event) -> std::result::Result<Step, Refused> {
    use Effect as F;
    use Event as E;
    use State as S;
    let refuse = |why: &'static str| {
        Err(Refused {
            state: from,
            event,
            why,
        })
    };
    let go = |to: State, hold: Hold, effects: &'static [Effect]| Ok(Step { to, hold, effects });
    let stay = || go(from, Hold::Keep, &[]);
    match (from, event) {
        (S::Stopped | S::Error, E::Start) => go(S::Starting, Hold::Take, &[F::Boot]),
        // Already under way, or done.
        (S::Starting | S::Running, E::Start) => stay(),
        (S::Stopping, E::Start) => refuse("wait until it has stopped, then start it"),
        (S::StopFailed, E::Start) => refuse("stop it with --force first"),

        (S::Starting, E::Ready) => go(S::Running, Hold::Keep, &[]),
        (S::Starting, E::BootFailed) => go(S::Error, Hold::Free, &[F::PowerOff]),
        (
            S::Stopped | S::Running | S::Stopping | S::Error | S::StopFailed,
            E::Ready | E::BootFailed,
        ) => refuse("it is not starting"),

        (S::Starting, E::Stop) => go(S::Stopping, Hold::Keep, &[F::CancelJob, F::Shutdown]),
        (S::Running, E::Stop) => go(S::Stopping, Hold::Keep, &[F::EndTasks, F::Shutdown]),
        (S::Stopping | S::Stopped, E::Stop) => stay(),
        (S::Error, E::Stop) => refuse("its VM is not running; start or delete it"),
        (S::StopFailed, E::Stop) => refuse("a graceful stop already failed; use --force"),

        (S::Starting | S::Stopping, E::ForceStop) => {
            go(S::Stopped, Hold::Free, &[F::CancelJob, F::PowerOff])
        }
        (S::Running, E::ForceStop) => go(S::Stopped, Hold::Free, &[F::PowerOff, F::EndTasks]),
        (S::StopFailed, E::ForceStop) => go(S::Stopped, Hold::Free, &[F::PowerOff]),
        // Its VM is off already and holds nothing; powering off again makes sure.
        (S::Error, E::ForceStop) => go(S::Stopped, Hold::Keep, &[F::PowerOff]),
        (S::Stopped, E::ForceStop) => stay(),

        (S::Starting | S::Stopping, E::PoweredOff) => go(S::Stopped, Hold::Free, &[F::CancelJob]),
        (S::Running, E::PoweredOff) => go(S::Stopped, Hold::Free, &[F::EndTasks]),
        (S::StopFailed, E::PoweredOff) => go(S::Stopped, Hold::Free, &[]),
        // Nothing to do: the VM was already known to be off.
        (S::Stopped | S::Error, E::PoweredOff) => stay(),

        (S::Stopping, E::StopTimedOut) => go(S::StopFailed, Hold::Keep, &[]),
        (S::Stopped | S::Starting | S::Running | S::Error | S::StopFailed, E::StopTimedOut) => {
            refuse("it is not stopping")
        }

        (S::Starting | S::Stopping, E::Crashed) => {
            go(S::Error, Hold::Free, &[F::CancelJob, F::PowerOff])
        }
        (S::Running, E::Crashed) => go(S::Error, Hold::Free, &[F::PowerOff, F::EndTasks]),
        (S::StopFailed, E::Crashed) => go(S::Error, Hold::Free, &[F::PowerOff]),
        (S::Stopped | S::Error, E::Crashed) => stay(),

        (S::Running, E::Suspend) => go(S::Stopping, Hold::Keep, &[F::EndTasks, F::Save]),
        (S::Stopping | S::Stopped, E::Suspend) => stay(),
        (S::Starting, E::Suspend) => refuse("it is still booting; wait until it runs, or stop it"),
        (S::Error, E::Suspend) => refuse("its VM is not running; start or delete it"),
        (S::StopFailed, E::Suspend) => refuse("a graceful stop already failed; use --force"),

        (S::Stopping, E::SaveFailed) => go(S::Running, Hold::Keep, &[]),
        (S::Stopped | S::Starting | S::Running | S::Error | S::StopFailed, E::SaveFailed) => {
            refuse("it is not suspending")
        }
    }
}

/// The state after `event` happens in state `from`, or why it is refused (see [`step`]).
pub fn transition(from: State, event: Event) -> Result<State> {
    Ok(step(from, event)?.to)
}

#[cfg(test)]
mod tests {
    use super::{step, transition, Effect, Event, Hold, State, ALL_EVENTS, ALL_STATES};
    use Event as E;
    use State as S;

    /// The whole table, written out independently of `transition`: (from, event, Some(to)) for
    /// legal transitions, None for refusals.
    const TABLE: &[(State, Event, Option<State>)] = &[
        (S::Stopped, E::Start, Some(S::Starting)),
        (S::Stopped, E::Ready, None),
        (S::Stopped, E::BootFailed, None),
        (S::Stopped, E::Stop, Some(S::Stopped)),
        (S::Stopped, E::ForceStop, Some(S::Stopped)),
        (S::Stopped, E::PoweredOff, Some(S::Stopped)),
        (S::Stopped, E::StopTimedOut, None),
        (S::Stopped, E::Crashed, Some(S::Stopped)),
        (S::Starting, E::Start, Some(S::Starting)),
        (S::Starting, E::Ready, Some(S::Running)),
        (S::Starting, E::BootFailed, Some(S::Error)),
        (S::Starting, E::Stop, Some(S::Stopping)),
        (S::Starting, E::ForceStop, Some(S::Stopped)),
        (S::Starting, E::PoweredOff, Some(S::Stopped)),
        (S::Starting, E::StopTimedOut, None),
        (S::Starting, E::Crashed, Some(S::Error)),
        (S::Running, E::Start, Some(S::Running)),
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
        (S::Stopping, E::Stop, Some(S::Stopping)),
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
        (S::Stopped, E::Suspend, Some(S::Stopped)),
        (S::Starting, E::Suspend, None),
        (S::Running, E::Suspend, Some(S::Stopping)),
        (S::Stopping, E::Suspend, Some(S::Stopping)),
        (S::Error, E::Suspend, None),
        (S::StopFailed, E::Suspend, None),
        (S::Stopped, E::SaveFailed, None),
        (S::Starting, E::SaveFailed, None),
        (S::Running, E::SaveFailed, None),
        (S::Stopping, E::SaveFailed, Some(S::Running)),
        (S::Error, E::SaveFailed, None),
        (S::StopFailed, E::SaveFailed, None),
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
                        matches!(e, crate::error::Error::Refused(_)),
                        "{from:?} x {event:?}: {e:?}"
                    );
                    // A refusal names the current state, and the API answers it with
                    // FAILED_PRECONDITION.
                    assert!(
                        e.to_string().starts_with(&format!("workspace is {from}:")),
                        "{e}"
                    );
                    assert_eq!(
                        crate::api::status(e).code(),
                        tonic::Code::FailedPrecondition
                    );
                }
                (got, want) => panic!("{from:?} x {event:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// Effects and holdings, written out independently of `step` for the steps that change
    /// something; every other legal step must be a no-op.
    #[test]
    fn every_step_sets_off_what_it_must() {
        use Effect as F;
        let changes: &[(State, Event, Hold, &[Effect])] = &[
            (S::Stopped, E::Start, Hold::Take, &[F::Boot]),
            (S::Error, E::Start, Hold::Take, &[F::Boot]),
            (S::Starting, E::Ready, Hold::Keep, &[]),
            (S::Starting, E::BootFailed, Hold::Free, &[F::PowerOff]),
            (
                S::Starting,
                E::Stop,
                Hold::Keep,
                &[F::CancelJob, F::Shutdown],
            ),
            (S::Running, E::Stop, Hold::Keep, &[F::EndTasks, F::Shutdown]),
            (
                S::Starting,
                E::ForceStop,
                Hold::Free,
                &[F::CancelJob, F::PowerOff],
            ),
            (
                S::Stopping,
                E::ForceStop,
                Hold::Free,
                &[F::CancelJob, F::PowerOff],
            ),
            (
                S::Running,
                E::ForceStop,
                Hold::Free,
                &[F::PowerOff, F::EndTasks],
            ),
            (S::Error, E::ForceStop, Hold::Keep, &[F::PowerOff]),
            (S::StopFailed, E::ForceStop, Hold::Free, &[F::PowerOff]),
            (S::Starting, E::PoweredOff, Hold::Free, &[F::CancelJob]),
            (S::Stopping, E::PoweredOff, Hold::Free, &[F::CancelJob]),
            (S::Running, E::PoweredOff, Hold::Free, &[F::EndTasks]),
            (S::StopFailed, E::PoweredOff, Hold::Free, &[]),
            (S::Stopping, E::StopTimedOut, Hold::Keep, &[]),
            (
                S::Starting,
                E::Crashed,
                Hold::Free,
                &[F::CancelJob, F::PowerOff],
            ),
            (
                S::Stopping,
                E::Crashed,
                Hold::Free,
                &[F::CancelJob, F::PowerOff],
            ),
            (
                S::Running,
                E::Crashed,
                Hold::Free,
                &[F::PowerOff, F::EndTasks],
            ),
            (S::StopFailed, E::Crashed, Hold::Free, &[F::PowerOff]),
            (S::Running, E::Suspend, Hold::Keep, &[F::EndTasks, F::Save]),
            (S::Stopping, E::SaveFailed, Hold::Keep, &[]),
        ];
        for s in ALL_STATES {
            for e in ALL_EVENTS {
                let Ok(got) = step(s, e) else { continue };
                match changes.iter().find(|(f, ev, _, _)| *f == s && *ev == e) {
                    Some((_, _, hold, effects)) => {
                        assert_eq!((got.hold, got.effects), (*hold, *effects), "{s:?} x {e:?}");
                        assert!(!got.is_noop(s), "{s:?} x {e:?}");
                    }
                    None => assert!(got.is_noop(s), "{s:?} x {e:?} must change nothing: {got:?}"),
                }
            }
        }
        // Releasing is exactly the steps into a state whose VM is off from one where it was on.
        for s in ALL_STATES {
            for e in ALL_EVENTS {
                if let Ok(got) = step(s, e) {
                    let frees = got.to.vm_is_off() && !s.vm_is_off();
                    assert_eq!(got.hold == Hold::Free, frees, "{s:?} x {e:?}");
                }
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
