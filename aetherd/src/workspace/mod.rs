//! Workspaces: the lifecycle state machine and the operations built on it.

pub mod ops;
pub mod state;
