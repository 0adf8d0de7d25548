//! `aetherd`: development workspaces as libvirt/qemu virtual machines.
//!
//! Layers, top to bottom: [`api`] (gRPC, the only place that sees protobuf types) →
//! [`daemon`] (the parts, made once and handed to each other): [`workspace`] (a runner per
//! workspace, one state machine in [`workspace::state`]), [`projects`], [`images`],
//! [`tasks`], [`idle`], [`feed`] → [`store`] (SQLite), [`hypervisor`] (libvirt through
//! the `virt` crate) and [`host`] (files, keys, SSH into guests).

pub mod api;
pub mod caller;
pub mod cloudinit;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod error;
pub mod fault;
pub mod feed;
pub mod files;
pub mod host;
pub mod hypervisor;
pub mod idle;
pub mod images;
pub mod model;
pub mod network;
pub mod notify;
pub mod privacy;
pub mod projects;
pub mod quota;
pub mod server;
pub mod store;
pub mod tasks;
pub mod terminal;
pub mod tunnel;
pub mod workspace;
