//! Who may use the API: the socket peer's credentials (SO_PEERCRED).
//!
//! Root and the daemon's own user are admins (see everything). Members of group `aether`
//! (primary or supplementary) may connect and see only the projects they own. Anyone else is
//! refused, even if the socket's mode let them connect.

use nix::unistd::{Gid, Group, Uid, User};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use crate::caller::Caller;

pub const GROUP: &str = "aether";

pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    let cred = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .ok_or_else(|| {
            Status::permission_denied("cannot identify the caller (no peer credentials)")
        })?;
    let uid = cred.uid();
    if uid == 0 || uid == Uid::effective().as_raw() {
        return Ok(Caller { uid, admin: true });
    }
    if in_group(uid, cred.gid()) {
        return Ok(Caller { uid, admin: false });
    }
    Err(Status::permission_denied(format!(
        "uid {uid} is not root and not a member of group {GROUP}"
    )))
}

fn in_group(uid: u32, primary_gid: u32) -> bool {
    let Ok(Some(group)) = Group::from_name(GROUP) else {
        return false;
    };
    if group.gid == Gid::from_raw(primary_gid) {
        return true;
    }
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(user)) => group.mem.contains(&user.name),
        _ => false,
    }
}
