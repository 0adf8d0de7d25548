//! The host side of a guest that is not libvirt's: where files live ([`layout`]), the
//! daemon's own SSH key and new domain UUIDs ([`keys`]), and its SSH sessions into guests
//! ([`guest_ssh`]).

pub mod guest_ssh;
pub mod keys;
pub mod layout;

pub use layout::Layout;
