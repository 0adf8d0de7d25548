//! The state database: one SQLite file in the state directory.
//!
//! Invariants:
//! - WAL journal, `synchronous=FULL` (a committed transition survives power loss), foreign keys on.
//! - The schema is versioned with `PRAGMA user_version`; [`migrations::MIGRATIONS`] are applied in order,
//!   each in its own transaction, and are never edited once released (add a new one instead).
//! - A workspace's state only changes through [`Store::write_transition`], one transaction
//!   gated on its `generation` (the caller names the generation it decided on, and loses if
//!   anything else changed the row in between) that also writes the host resources the VM
//!   holds; the workspace's runner is its only caller.
//!
//! Split by table: [`migrations`] (the schema), `projects`, `workspaces` (rows and
//! bookkeeping), `transitions` (the writes gated on a workspace's generation: its state and
//! hardware), `images` (and their reservations), `tasks`.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

use crate::error::Result;

mod error;
mod images;
pub mod migrations;
mod projects;
mod tasks;
mod transitions;
mod workspaces;

pub use error::StoreError;
pub use projects::Project;
pub use tasks::TaskRow;
pub use transitions::{Holdings, Place};
pub use workspaces::{NewWorkspace, Provisioning, SeedMaterial, Workspace, WorkspaceFilter};

/// Which rows a caller may see: `None` for root/admins, `Some(uid)` for a plain user.
pub type Owner = Option<u32>;

pub struct Store {
    conn: Mutex<Connection>,
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A stored value that should have been valid when it was written.
pub(super) fn corrupt(what: &str, e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(0, format!("{what}: {e}"), rusqlite::types::Type::Text)
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Store> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        migrations::migrate(&mut conn)?;
        images::drop_stale_image_reservations(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    pub(super) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-written row: every write is one
        // SQLite transaction. So a poisoned lock is safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn schema_version(&self) -> Result<u32> {
        Ok(self
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }
}

#[cfg(test)]
pub(super) mod test_util {
    use super::{Holdings, NewWorkspace, Project, SeedMaterial, Store, Workspace};
    use crate::error::Result;
    use crate::model::{Hardware, ProjectName, WorkspaceId};

    pub fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("state.db")).unwrap();
        (dir, s)
    }

    pub fn project(s: &Store, name: &str) -> Project {
        s.insert_project(&ProjectName::parse(name).unwrap(), 1000)
            .unwrap()
    }

    pub fn new_ws(s: &Store, p: &Project, owner: u32, uuid: &str) -> Workspace {
        s.insert_workspace(&NewWorkspace {
            id: WorkspaceId::generate(),
            project: p,
            owner_uid: owner,
            uuid,
            hardware: &Hardware::DEFAULT,
            image: None,
            login_user: "dev",
            ssh_host_public_key: "",
            seed: &SeedMaterial {
                host_private_key: String::new(),
                authorized_keys: Vec::new(),
            },
            mac: None,
            subnet: None,
            idle_timeout_secs: None,
        })
        .unwrap()
    }

    /// [`Holdings::Take`] with a placement that takes no dedicated CPUs and no GPU.
    pub fn take_nothing() -> Holdings<'static> {
        fn nothing(_: &Workspace, _: &[Workspace]) -> Result<(Vec<u32>, Option<String>)> {
            Ok((Vec::new(), None))
        }
        Holdings::Take(&nothing)
    }
}
