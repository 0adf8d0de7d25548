//! Workspaces: the lifecycle state machine, the runner that owns each workspace's
//! transitions, and the operations built on them.

pub mod ops;
pub mod placement;
pub mod runner;
pub mod state;
