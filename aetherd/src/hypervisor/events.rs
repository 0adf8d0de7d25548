//! libvirt domain lifecycle events, delivered as [`DomainEvent`]s on a tokio channel.
//!
//! The `virt` crate has no safe wrapper for domain events, so this module uses the raw
//! bindings. Order matters: libvirt's default event loop must be registered before the first
//! connection is opened ([`start_event_loop`]), and it runs on its own thread for the life of
//! the process. The callback only copies the domain name and event codes and sends them; all
//! decisions happen on the async side.

use std::ffi::{c_int, c_void, CStr};
use std::sync::Once;

use tokio::sync::mpsc::UnboundedSender;
use virt::connect::Connect;
use virt::sys;

use crate::error::{Error, Result};

/// What happened to a domain, reduced to what the state machine needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainEvent {
    /// The guest shut down (by itself or after an ACPI request).
    ShutOff { domain: String },
    /// qemu crashed or failed.
    Crashed { domain: String },
    /// We (or an admin) destroyed the domain.
    Destroyed { domain: String },
}

impl DomainEvent {
    pub fn domain(&self) -> &str {
        match self {
            DomainEvent::ShutOff { domain }
            | DomainEvent::Crashed { domain }
            | DomainEvent::Destroyed { domain } => domain,
        }
    }
}

/// Maps libvirt's (event, detail) codes; `None` for events the daemon does not act on.
pub fn classify(domain: String, event: c_int, detail: c_int) -> Option<DomainEvent> {
    if event as u32 != sys::VIR_DOMAIN_EVENT_STOPPED {
        return None;
    }
    match detail as u32 {
        sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN => Some(DomainEvent::ShutOff { domain }),
        sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED => Some(DomainEvent::Destroyed { domain }),
        sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED | sys::VIR_DOMAIN_EVENT_STOPPED_FAILED => {
            Some(DomainEvent::Crashed { domain })
        }
        // Migrated, saved, from snapshot: not something aether does.
        _ => None,
    }
}

static EVENT_LOOP: Once = Once::new();

/// Registers libvirt's default event loop implementation and runs it on its own thread.
/// Must be called before the first `Connect::open`; later calls do nothing.
pub fn start_event_loop() {
    EVENT_LOOP.call_once(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::error!(error = %e, "cannot register libvirt's event loop; lifecycle events are off");
            return;
        }
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                if let Err(e) = virt::event::event_run_default_impl() {
                    tracing::error!(error = %e, "libvirt event loop iteration failed");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            })
            .expect("can spawn the libvirt event thread");
    });
}

/// Lifecycle callback: forwards (name, event, detail) to the channel in `opaque`.
///
/// # Safety
/// libvirt calls this with a valid domain pointer and the `opaque` pointer given at
/// registration, which points to a live `UnboundedSender<DomainEvent>`.
unsafe extern "C" fn lifecycle_callback(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: `opaque` is the Box<UnboundedSender> leaked in `subscribe`, freed only by
    // `free_sender` after libvirt stops calling this callback.
    let tx = unsafe { &*(opaque as *const UnboundedSender<DomainEvent>) };
    // SAFETY: `dom` is valid for the duration of the callback; the returned name is owned by
    // the domain object and copied before returning.
    let name_ptr = unsafe { sys::virDomainGetName(dom) };
    if name_ptr.is_null() {
        return 0;
    }
    // SAFETY: libvirt returns a NUL-terminated string that lives as long as `dom`.
    let name = unsafe { CStr::from_ptr(name_ptr) }
        .to_string_lossy()
        .into_owned();
    if let Some(ev) = classify(name, event, detail) {
        let _ = tx.send(ev);
    }
    0
}

/// Frees the sender when libvirt drops the registration.
///
/// # Safety
/// Called by libvirt exactly once with the pointer given at registration.
unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: `opaque` came from `Box::into_raw` in `subscribe` and is freed only here.
    drop(unsafe { Box::from_raw(opaque as *mut UnboundedSender<DomainEvent>) });
}

/// Subscribes to lifecycle events of every domain on `conn`.
pub fn subscribe(conn: &Connect, tx: UnboundedSender<DomainEvent>) -> Result<()> {
    let opaque = Box::into_raw(Box::new(tx)) as *mut c_void;
    // The generic callback type is how the C API takes every event kind; libvirt calls it
    // with the lifecycle signature for VIR_DOMAIN_EVENT_ID_LIFECYCLE.
    let cb: sys::virConnectDomainEventCallback = Some(lifecycle_callback);
    // SAFETY: both callback types are `Option<unsafe extern "C" fn>` of the same size; libvirt
    // documents that the callback for LIFECYCLE has the virConnectDomainEventCallback
    // signature and casts it back (VIR_DOMAIN_EVENT_CALLBACK).
    let generic = unsafe {
        std::mem::transmute::<
            sys::virConnectDomainEventCallback,
            sys::virConnectDomainEventGenericCallback,
        >(cb)
    };
    // SAFETY: `conn.as_ptr()` is a live connection (borrowed for the call); `opaque` stays
    // valid until libvirt calls `free_sender`.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            generic,
            opaque,
            Some(free_sender),
        )
    };
    if id < 0 {
        // SAFETY: registration failed, so libvirt did not take ownership of `opaque`.
        drop(unsafe { Box::from_raw(opaque as *mut UnboundedSender<DomainEvent>) });
        return Err(Error::libvirt(format!(
            "cannot subscribe to domain events: {}",
            virt::error::Error::last_error().message()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::ffi::c_int;

    use virt::sys;

    use super::{classify, DomainEvent};

    #[test]
    fn only_stops_are_classified() {
        let stopped = sys::VIR_DOMAIN_EVENT_STOPPED as c_int;
        let d = || "aether-ws-abc123".to_owned();
        assert_eq!(
            classify(
                d(),
                stopped,
                sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN as c_int
            ),
            Some(DomainEvent::ShutOff { domain: d() })
        );
        assert_eq!(
            classify(d(), stopped, sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED as c_int),
            Some(DomainEvent::Crashed { domain: d() })
        );
        assert_eq!(
            classify(d(), stopped, sys::VIR_DOMAIN_EVENT_STOPPED_FAILED as c_int),
            Some(DomainEvent::Crashed { domain: d() })
        );
        assert_eq!(
            classify(
                d(),
                stopped,
                sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED as c_int
            ),
            Some(DomainEvent::Destroyed { domain: d() })
        );
        assert_eq!(
            classify(d(), sys::VIR_DOMAIN_EVENT_STARTED as c_int, 0),
            None
        );
    }
}
