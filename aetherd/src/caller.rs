//! Who is asking: the socket peer's uid, and whether it may see and operate everything.
//! Made once per request by `api::auth`; every visibility rule below takes it.

use crate::store::Owner;

/// Who is asking, from the socket peer's credentials.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    /// Root (or the daemon's own user): sees and operates everything.
    pub admin: bool,
}

impl Caller {
    /// Whether the caller may see what `owner_uid` owns (the rule [`Caller::owner`] gives
    /// the store, for a row already read).
    pub fn sees(&self, owner_uid: u32) -> bool {
        self.admin || owner_uid == self.uid
    }

    /// The rows the caller may see: all of them (`None`) for an admin, else its own.
    pub(crate) fn owner(&self) -> Owner {
        if self.admin {
            None
        } else {
            Some(self.uid)
        }
    }
}
