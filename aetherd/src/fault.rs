//! Fault injection for crash tests, in debug builds only: with `AETHERD_FAULT=<point>` in its
//! environment the daemon kills itself (SIGKILL, like `kill -9`) when it reaches that point,
//! e.g. `create:seed` right after a new workspace's seed is written. Release builds ignore
//! the variable.

/// A point where a crash test may kill the daemon.
pub fn point(name: &str) {
    #[cfg(debug_assertions)]
    if std::env::var_os("AETHERD_FAULT").is_some_and(|v| v == name) {
        tracing::warn!(point = name, "fault injection: killing the daemon");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}
