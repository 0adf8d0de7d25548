//! Tasks: commands run in a workspace on a user's or agent's behalf. [`command`] builds
//! what runs (the remote command line, the daemon's `ssh` arguments, task ids); [`log`] keeps
//! a task's output (capped, rotated), [`reader`] reads it back in bounded chunks and follows it. Running them is
//! `workspace::ops::tasks`.

pub mod command;
pub mod log;
pub mod reader;
