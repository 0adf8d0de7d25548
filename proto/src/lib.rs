//! The `aether.v1` API shared by `aetherd` and the `aether` CLI.
//!
//! The source of truth is `aether/v1/aether.proto`; this crate only includes the code that
//! `build.rs` generates from it, so the generated code can never be stale.

/// Package `aether.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("aether.v1");
}
