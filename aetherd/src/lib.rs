//! `aetherd`: development workspaces as libvirt/qemu virtual machines.
//!
//! Layers, top to bottom: [`api`] (gRPC, the only place that sees protobuf types) →
//! [`workspace::ops`] (operations, one state machine in [`workspace::state`]) →
//! [`store`] (SQLite) and [`hypervisor`] (libvirt through the `virt` crate).

pub mod api;
pub mod cloudinit;
pub mod config;
pub mod error;
pub mod fault;
pub mod files;
pub mod hypervisor;
pub mod images;
pub mod model;
pub mod network;
pub mod notify;
pub mod privacy;
pub mod quota;
pub mod server;
pub mod store;
pub mod tasks;
pub mod tunnel;
pub mod workspace;
