//! The `aether` network's DHCP leases, as libvirt reports them (`virNetworkGetDHCPLeases`,
//! which the `virt` crate does not wrap, so this module uses the raw bindings).

use std::ffi::{c_char, CStr};
use std::net::Ipv4Addr;

use virt::network::Network;
use virt::sys;

use crate::error::{Error, Result};

/// One IPv4 lease held by a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Lowercase, as the daemon stores MACs.
    pub mac: String,
    pub ip: Ipv4Addr,
    /// Unix seconds.
    pub expiry: i64,
}

/// Copies a C string owned by libvirt; `None` for NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid during the call.
unsafe fn string(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated per this function's contract.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Every IPv4 lease on `net`.
pub fn of_network(net: &Network) -> Result<Vec<Lease>> {
    let mut array: *mut sys::virNetworkDHCPLeasePtr = std::ptr::null_mut();
    // SAFETY: `net` is a live network object borrowed for the call; a NULL mac asks for every
    // lease; on success libvirt stores in `array` a newly allocated array of `n` leases.
    let n = unsafe { sys::virNetworkGetDHCPLeases(net.as_ptr(), std::ptr::null(), &mut array, 0) };
    if n < 0 {
        return Err(Error::libvirt(format!(
            "cannot read the DHCP leases: {}",
            virt::error::Error::last_error().message()
        )));
    }
    let mut leases = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        // SAFETY: `array` holds `n` valid lease pointers (libvirt's contract for n >= 0).
        let lease = unsafe { *array.add(i) };
        // SAFETY: `lease` is valid until freed below; its strings are NULL or NUL-terminated.
        let (mac, ip, expiry, ipv4) = unsafe {
            (
                string((*lease).mac),
                string((*lease).ipaddr),
                (*lease).expirytime,
                (*lease).type_ == sys::VIR_IP_ADDR_TYPE_IPV4 as i32,
            )
        };
        // SAFETY: each lease is freed exactly once, after its fields were copied.
        unsafe { sys::virNetworkDHCPLeaseFree(lease) };
        if let (true, Some(mac), Some(Ok(ip))) = (ipv4, mac, ip.map(|s| s.parse::<Ipv4Addr>())) {
            leases.push(Lease {
                mac: mac.to_ascii_lowercase(),
                ip,
                expiry,
            });
        }
    }
    if !array.is_null() {
        // SAFETY: the array itself was allocated by libvirt with malloc and is freed once.
        unsafe { libc_free(array as *mut std::ffi::c_void) };
    }
    Ok(leases)
}

extern "C" {
    #[link_name = "free"]
    fn libc_free(p: *mut std::ffi::c_void);
}

/// What the leases say about a guest that should hold `ip` with `mac`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseCheck {
    /// The guest holds its reserved address.
    Reserved,
    /// No lease for the guest yet.
    Missing,
    /// The guest was given another address.
    Elsewhere(Ipv4Addr),
}

pub fn check(leases: &[Lease], mac: &str, ip: Ipv4Addr) -> LeaseCheck {
    let mine: Vec<&Lease> = leases.iter().filter(|l| l.mac == mac).collect();
    if mine.iter().any(|l| l.ip == ip) {
        LeaseCheck::Reserved
    } else if let Some(other) = mine.first() {
        LeaseCheck::Elsewhere(other.ip)
    } else {
        LeaseCheck::Missing
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::{check, Lease, LeaseCheck};

    #[test]
    fn check_tells_reserved_missing_and_elsewhere() {
        let ip = Ipv4Addr::new(192, 168, 150, 10);
        let lease = |mac: &str, last| Lease {
            mac: mac.into(),
            ip: Ipv4Addr::new(192, 168, 150, last),
            expiry: 0,
        };
        let me = "52:54:00:aa:00:01";
        assert_eq!(check(&[], me, ip), LeaseCheck::Missing);
        assert_eq!(
            check(&[lease("52:54:00:aa:00:02", 10)], me, ip),
            LeaseCheck::Missing
        );
        assert_eq!(check(&[lease(me, 10)], me, ip), LeaseCheck::Reserved);
        assert_eq!(
            check(&[lease(me, 3)], me, ip),
            LeaseCheck::Elsewhere(Ipv4Addr::new(192, 168, 150, 3))
        );
    }
}
