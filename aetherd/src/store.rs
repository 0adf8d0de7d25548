//! The state database: one SQLite file in the state directory.
//!
//! Invariants:
//! - WAL journal, `synchronous=FULL` (a committed transition survives power loss), foreign keys on.
//! - The schema is versioned with `PRAGMA user_version`; [`MIGRATIONS`] are applied in order,
//!   each in its own transaction, and are never edited once released (add a new one instead).
//! - A workspace's state only changes through [`Store::write_transition`], one transaction
//!   gated on its `generation` (the caller names the generation it decided on, and loses if
//!   anything else changed the row in between) that also writes the host resources the VM
//!   holds; the workspace's runner is its only caller.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{named_params, params, Connection, OptionalExtension, Row, TransactionBehavior};

use crate::error::{Error, Result};
use crate::images::{BootMode, Image, ImageId, ImageName};
use crate::model::{Hardware, ProjectId, ProjectName, ProjectRef, WorkspaceId};
use crate::workspace::state::State;

/// Schema versions; index + 1 is the `user_version` after applying.
const MIGRATIONS: &[&str] = &[
    // 1: projects and workspaces.
    "CREATE TABLE projects (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL UNIQUE,
        owner_uid  INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE workspaces (
        id               TEXT PRIMARY KEY,
        project_id       TEXT NOT NULL REFERENCES projects(id),
        owner_uid        INTEGER NOT NULL,
        uuid             TEXT NOT NULL UNIQUE,
        state            TEXT NOT NULL CHECK (state IN
                           ('stopped','starting','running','stopping','error','stop_failed')),
        generation       INTEGER NOT NULL DEFAULT 0,
        reason           TEXT NOT NULL DEFAULT '',
        hardware         TEXT NOT NULL,
        pending_hardware TEXT,
        created_at       INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL
    );
    CREATE INDEX workspaces_project ON workspaces(project_id);",
    // 2: images, and what a real guest needs: image, login user, host key, MAC and IP.
    "CREATE TABLE images (
        name         TEXT PRIMARY KEY,
        boot_mode    TEXT NOT NULL CHECK (boot_mode IN ('bios','uefi','kernel')),
        cmdline      TEXT NOT NULL DEFAULT '',
        virtual_size INTEGER NOT NULL,
        disk_size    INTEGER NOT NULL,
        created_at   INTEGER NOT NULL
    );
    ALTER TABLE workspaces ADD COLUMN image TEXT REFERENCES images(name);
    ALTER TABLE workspaces ADD COLUMN login_user TEXT NOT NULL DEFAULT '';
    ALTER TABLE workspaces ADD COLUMN ssh_host_public_key TEXT NOT NULL DEFAULT '';
    ALTER TABLE workspaces ADD COLUMN mac TEXT;
    ALTER TABLE workspaces ADD COLUMN ip TEXT;
    CREATE UNIQUE INDEX workspaces_mac ON workspaces(mac);
    CREATE UNIQUE INDEX workspaces_ip ON workspaces(ip);",
    // 3: idle auto-stop: per-workspace timeout (NULL: the daemon's) and the idle clock.
    "ALTER TABLE workspaces ADD COLUMN idle_timeout_secs INTEGER;
    ALTER TABLE workspaces ADD COLUMN idle_since INTEGER;",
    // 4: tasks (commands run in workspaces); output lives in <state>/tasks/<id>.log.
    "CREATE TABLE tasks (
        id           TEXT PRIMARY KEY,
        workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
        argv         TEXT NOT NULL,
        state        TEXT NOT NULL CHECK (state IN
                       ('running','succeeded','failed','cancelled','lost')),
        exit_code    INTEGER,
        started_at   INTEGER NOT NULL,
        ended_at     INTEGER
    );
    CREATE INDEX tasks_workspace ON tasks(workspace_id);",
    // 5: host CPUs dedicated to a running performance workspace (JSON array; NULL: none).
    "ALTER TABLE workspaces ADD COLUMN dedicated_cpus TEXT;",
    // 6: the GPU (libvirt node device name) held by a workspace while its VM is on.
    "ALTER TABLE workspaces ADD COLUMN gpu_device TEXT;",
    // 7: when each address was last given up by a deleted workspace, so the allocator takes
    // the one released longest ago (dnsmasq may still hold a lease on a fresh one).
    "CREATE TABLE released_addresses (
        ip          TEXT PRIMARY KEY,
        released_at INTEGER NOT NULL
    );",
    // 8: image names held by an import (or a delete) while it runs, so two cannot work on
    // one name's files at once; `token` is the holder's. Rows are dropped at open (a daemon
    // that died left them).
    "CREATE TABLE image_reservations (
        name       TEXT PRIMARY KEY,
        state      TEXT NOT NULL CHECK (state IN ('importing','deleting')),
        token      TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );",
    // 9: project names are unique per owner, not host-wide, so one user can neither take a
    // name from another nor learn that it exists. (SQLite cannot drop a column's UNIQUE: the
    // table is rebuilt; `migrate` runs this with foreign keys off and checks them after.)
    "CREATE TABLE projects_new (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        owner_uid  INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (owner_uid, name)
    );
    INSERT INTO projects_new (id, name, owner_uid, created_at)
        SELECT id, name, owner_uid, created_at FROM projects;
    DROP TABLE projects;
    ALTER TABLE projects_new RENAME TO projects;",
    // 10: images belong to their importer, names unique per owner (root's are shared). An
    // image's id names its files and is what a workspace refers to: the plain name for
    // root's (every image so far was host-wide, so they become root's, files unchanged),
    // NAME@UID for a member's. Workspaces are rebuilt for their foreign key to the id.
    "CREATE TABLE images_new (
        id           TEXT PRIMARY KEY,
        owner_uid    INTEGER NOT NULL,
        name         TEXT NOT NULL,
        boot_mode    TEXT NOT NULL CHECK (boot_mode IN ('bios','uefi','kernel')),
        cmdline      TEXT NOT NULL DEFAULT '',
        virtual_size INTEGER NOT NULL,
        disk_size    INTEGER NOT NULL,
        created_at   INTEGER NOT NULL,
        UNIQUE (owner_uid, name)
    );
    INSERT INTO images_new (id, owner_uid, name, boot_mode, cmdline, virtual_size, disk_size,
                            created_at)
        SELECT name, 0, name, boot_mode, cmdline, virtual_size, disk_size, created_at FROM images;
    DROP TABLE images;
    ALTER TABLE images_new RENAME TO images;
    DROP TABLE image_reservations;
    CREATE TABLE image_reservations (
        id         TEXT PRIMARY KEY,
        state      TEXT NOT NULL CHECK (state IN ('importing','deleting')),
        token      TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE workspaces_new (
        id                  TEXT PRIMARY KEY,
        project_id          TEXT NOT NULL REFERENCES projects(id),
        owner_uid           INTEGER NOT NULL,
        uuid                TEXT NOT NULL UNIQUE,
        state               TEXT NOT NULL CHECK (state IN
                              ('stopped','starting','running','stopping','error','stop_failed')),
        generation          INTEGER NOT NULL DEFAULT 0,
        reason              TEXT NOT NULL DEFAULT '',
        hardware            TEXT NOT NULL,
        pending_hardware    TEXT,
        created_at          INTEGER NOT NULL,
        updated_at          INTEGER NOT NULL,
        image               TEXT REFERENCES images(id),
        login_user          TEXT NOT NULL DEFAULT '',
        ssh_host_public_key TEXT NOT NULL DEFAULT '',
        mac                 TEXT,
        ip                  TEXT,
        idle_timeout_secs   INTEGER,
        idle_since          INTEGER,
        dedicated_cpus      TEXT,
        gpu_device          TEXT
    );
    INSERT INTO workspaces_new (id, project_id, owner_uid, uuid, state, generation, reason,
            hardware, pending_hardware, created_at, updated_at, image, login_user,
            ssh_host_public_key, mac, ip, idle_timeout_secs, idle_since, dedicated_cpus,
            gpu_device)
        SELECT id, project_id, owner_uid, uuid, state, generation, reason, hardware,
            pending_hardware, created_at, updated_at, image, login_user, ssh_host_public_key,
            mac, ip, idle_timeout_secs, idle_since, dedicated_cpus, gpu_device FROM workspaces;
    DROP TABLE workspaces;
    ALTER TABLE workspaces_new RENAME TO workspaces;
    CREATE INDEX workspaces_project ON workspaces(project_id);
    CREATE UNIQUE INDEX workspaces_mac ON workspaces(mac);
    CREATE UNIQUE INDEX workspaces_ip ON workspaces(ip);",
    // 11: provisioning as recorded steps. A row is written `creating` before any of its
    // host resources is made and loses the mark once all are; a delete marks it `deleting`
    // before the first is removed. Reconcile at start-up undoes a `creating` row and finishes
    // a `deleting` one. The guest's host private key and the authorized keys are kept so a
    // seed can be written again.
    "ALTER TABLE workspaces ADD COLUMN provisioning TEXT
         CHECK (provisioning IN ('creating','deleting'));
    ALTER TABLE workspaces ADD COLUMN ssh_host_private_key TEXT NOT NULL DEFAULT '';
    ALTER TABLE workspaces ADD COLUMN authorized_keys TEXT NOT NULL DEFAULT '[]';",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Project {
    pub id: ProjectId,
    pub name: ProjectName,
    pub owner_uid: u32,
    pub created_at: i64,
    pub workspace_count: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workspace {
    pub id: WorkspaceId,
    pub project_id: ProjectId,
    pub project_name: ProjectName,
    pub owner_uid: u32,
    pub uuid: String,
    pub state: State,
    pub generation: u64,
    pub reason: String,
    pub hardware: Hardware,
    pub pending_hardware: Option<Hardware>,
    pub created_at: i64,
    /// Image the root volume is backed by; `None` for workspaces made before images existed.
    pub image: Option<String>,
    pub login_user: String,
    pub ssh_host_public_key: String,
    pub mac: Option<String>,
    pub ip: Option<std::net::Ipv4Addr>,
    /// Own idle timeout in seconds (0: never); `None`: the daemon's.
    pub idle_timeout_secs: Option<u64>,
    /// Since when the running workspace has been idle (unix seconds).
    pub idle_since: Option<i64>,
    /// Host CPUs dedicated to it while its VM runs (performance workspaces).
    pub dedicated_cpus: Vec<u32>,
    /// The GPU (node device name) it holds while its VM runs.
    pub gpu_device: Option<String>,
    /// Set while its host resources are being made or removed (see migration 11).
    pub provisioning: Option<Provisioning>,
}

/// A workspace whose host resources are not all there: being made, or being removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provisioning {
    Creating,
    Deleting,
}

impl Provisioning {
    fn as_str(self) -> &'static str {
        match self {
            Provisioning::Creating => "creating",
            Provisioning::Deleting => "deleting",
        }
    }

    fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "creating" => Ok(Provisioning::Creating),
            "deleting" => Ok(Provisioning::Deleting),
            other => Err(format!("unknown provisioning mark {other:?}")),
        }
    }
}

/// What a workspace's seed is written from, besides the row: secrets, so never part of
/// [`Workspace`] (which is logged and sent around).
pub struct SeedMaterial {
    pub host_private_key: String,
    pub authorized_keys: Vec<String>,
}

/// What a new workspace row is made of.
pub struct NewWorkspace<'a> {
    pub id: WorkspaceId,
    pub project: &'a Project,
    pub owner_uid: u32,
    pub uuid: &'a str,
    pub hardware: &'a Hardware,
    pub image: Option<&'a str>,
    pub login_user: &'a str,
    pub ssh_host_public_key: &'a str,
    pub seed: &'a SeedMaterial,
    pub mac: Option<&'a str>,
    /// The network to reserve an address in, chosen in the insert's own transaction (so two
    /// creates cannot pick the same one); `None`: no address.
    pub subnet: Option<crate::network::Subnet>,
    pub idle_timeout_secs: Option<u64>,
}

/// Picks the host resources for a VM about to start: its dedicated CPUs and GPU, given the
/// workspace and every workspace; refuses when the host or the owner's quota cannot run it.
pub type Place<'a> = &'a dyn Fn(&Workspace, &[Workspace]) -> Result<(Vec<u32>, Option<String>)>;

/// What a transition writes for the host resources a VM holds while it is on.
pub enum Holdings<'a> {
    /// As they are.
    Keep,
    /// Picked now, in the transition's transaction.
    Take(Place<'a>),
    /// None: the VM is off.
    Free,
}

/// Which rows a caller may see: `None` for root/admins, `Some(uid)` for a plain user.
pub type Owner = Option<u32>;

#[derive(Clone, Debug, Default)]
pub struct WorkspaceFilter {
    pub state: Option<State>,
    pub project: Option<ProjectId>,
}

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
fn corrupt(what: &str, e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(0, format!("{what}: {e}"), rusqlite::types::Type::Text)
}

const WORKSPACE_COLUMNS: &str = "w.id, w.project_id, p.name, w.owner_uid, w.uuid, w.state, \
     w.generation, w.reason, w.hardware, w.pending_hardware, w.created_at, w.image, w.login_user, \
     w.ssh_host_public_key, w.mac, w.ip, w.idle_timeout_secs, w.idle_since, w.dedicated_cpus, w.gpu_device, \
     w.provisioning";

fn workspace_from_row(r: &Row<'_>) -> rusqlite::Result<Workspace> {
    let hw = |s: String| serde_json::from_str::<Hardware>(&s).map_err(|e| corrupt("hardware", e));
    Ok(Workspace {
        id: WorkspaceId::parse(&r.get::<_, String>(0)?).map_err(|e| corrupt("workspace id", e))?,
        project_id: ProjectId::parse(&r.get::<_, String>(1)?)
            .map_err(|e| corrupt("project id", e))?,
        project_name: ProjectName::parse(&r.get::<_, String>(2)?)
            .map_err(|e| corrupt("project name", e))?,
        owner_uid: r.get(3)?,
        uuid: r.get(4)?,
        state: State::parse(&r.get::<_, String>(5)?).map_err(|e| corrupt("state", e))?,
        generation: r.get::<_, i64>(6)? as u64,
        reason: r.get(7)?,
        hardware: hw(r.get(8)?)?,
        pending_hardware: r.get::<_, Option<String>>(9)?.map(hw).transpose()?,
        created_at: r.get(10)?,
        image: r.get(11)?,
        login_user: r.get(12)?,
        ssh_host_public_key: r.get(13)?,
        mac: r.get(14)?,
        ip: r
            .get::<_, Option<String>>(15)?
            .map(|s| s.parse().map_err(|e| corrupt("ip", e)))
            .transpose()?,
        idle_timeout_secs: r.get::<_, Option<i64>>(16)?.map(|v| v as u64),
        idle_since: r.get(17)?,
        dedicated_cpus: r
            .get::<_, Option<String>>(18)?
            .map(|s| serde_json::from_str(&s).map_err(|e| corrupt("dedicated cpus", e)))
            .transpose()?
            .unwrap_or_default(),
        gpu_device: r.get(19)?,
        provisioning: r
            .get::<_, Option<String>>(20)?
            .map(|s| Provisioning::parse(&s).map_err(|e| corrupt("provisioning", e)))
            .transpose()?,
    })
}

fn project_from_row(r: &Row<'_>) -> rusqlite::Result<Project> {
    Ok(Project {
        id: ProjectId::parse(&r.get::<_, String>(0)?).map_err(|e| corrupt("project id", e))?,
        name: ProjectName::parse(&r.get::<_, String>(1)?)
            .map_err(|e| corrupt("project name", e))?,
        owner_uid: r.get(2)?,
        created_at: r.get(3)?,
        workspace_count: r.get(4)?,
    })
}

const PROJECT_QUERY: &str = "SELECT p.id, p.name, p.owner_uid, p.created_at, \
     (SELECT COUNT(*) FROM workspaces w WHERE w.project_id = p.id) FROM projects p";

fn hardware_json(hw: &Hardware) -> String {
    serde_json::to_string(hw).expect("hardware serializes")
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Store> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        migrate(&mut conn)?;
        drop_stale_image_reservations(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-written row: every write is one
        // SQLite transaction. So a poisoned lock is safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn schema_version(&self) -> Result<u32> {
        Ok(self
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    pub fn insert_project(&self, name: &ProjectName, owner_uid: u32) -> Result<Project> {
        let conn = self.conn();
        let id = ProjectId::generate();
        let created_at = now();
        let res = conn.execute(
            "INSERT INTO projects (id, name, owner_uid, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![id.as_str(), name.as_str(), owner_uid, created_at],
        );
        match res {
            Ok(_) => Ok(Project {
                id,
                name: name.clone(),
                owner_uid,
                created_at,
                workspace_count: 0,
            }),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(Error::AlreadyExists(format!(
                    "project {name} already exists"
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn list_projects(&self, owner: Owner) -> Result<Vec<Project>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{PROJECT_QUERY} WHERE (?1 IS NULL OR p.owner_uid = ?1) ORDER BY p.name"
        ))?;
        let rows = stmt.query_map(params![owner], project_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Finds a project by id, or by name (an 8-hex-digit name is looked up both ways). Names
    /// are unique per owner: for an admin (`owner` None) a name names its own project
    /// (`caller_uid`'s) first, else the oldest of that name (ids are unambiguous).
    pub fn find_project(&self, r: &ProjectRef, owner: Owner, caller_uid: u32) -> Result<Project> {
        let conn = self.conn();
        let (by_id, by_name, shown) = match r {
            ProjectRef::Id(id) => (Some(id.as_str()), id.as_str(), id.as_str()),
            ProjectRef::Name(n) => (None, n.as_str(), n.as_str()),
        };
        conn.query_row(
            &format!(
                "{PROJECT_QUERY} WHERE (p.id = ?1 OR p.name = ?2) AND (?3 IS NULL OR p.owner_uid = ?3) \
                 ORDER BY p.id = ?1 DESC, p.owner_uid = ?4 DESC, p.created_at LIMIT 1"
            ),
            params![by_id, by_name, owner, caller_uid],
            project_from_row,
        )
        .optional()?
        .ok_or_else(|| Error::not_found("project", shown))
    }

    /// Deletes a project that has no workspaces.
    pub fn delete_project(&self, project: &Project) -> Result<()> {
        let id = &project.id;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let count: u32 = tx.query_row(
            "SELECT COUNT(*) FROM workspaces WHERE project_id = ?1",
            [id.as_str()],
            |r| r.get(0),
        )?;
        if count > 0 {
            return Err(Error::precondition(format!(
                "project {} still has {count} workspace(s); delete them first",
                project.name
            )));
        }
        if tx.execute("DELETE FROM projects WHERE id = ?1", [id.as_str()])? == 0 {
            return Err(Error::not_found("project", id.as_str()));
        }
        tx.commit()?;
        Ok(())
    }

    /// Inserts a new workspace in state `stopped`, reserving it an address in `new.subnet`
    /// in the same transaction. `id` is the id to use; on a collision a fresh one is
    /// generated (the id is random, a collision is rare but possible).
    pub fn insert_workspace(&self, new: &NewWorkspace<'_>) -> Result<Workspace> {
        let mut conn = self.conn();
        let NewWorkspace {
            project,
            owner_uid,
            uuid,
            hardware,
            ..
        } = *new;
        let mut id = new.id.clone();
        for _ in 0..5 {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let ip = match new.subnet {
                Some(subnet) => Some(subnet.allocate(&used_ips(&tx)?, &released_ips(&tx)?)?),
                None => None,
            };
            let created_at = now();
            let res = tx.execute(
                "INSERT INTO workspaces (id, project_id, owner_uid, uuid, state, hardware, created_at,
                     updated_at, image, login_user, ssh_host_public_key, mac, ip, idle_timeout_secs,
                     provisioning, ssh_host_private_key, authorized_keys)
                 VALUES (?1, ?2, ?3, ?4, 'stopped', ?5, ?6, ?6, ?7, ?8, ?9, ?10, ?11, ?12,
                     'creating', ?13, ?14)",
                params![
                    id.as_str(),
                    project.id.as_str(),
                    owner_uid,
                    uuid,
                    hardware_json(hardware),
                    created_at,
                    new.image,
                    new.login_user,
                    new.ssh_host_public_key,
                    new.mac,
                    ip.map(|ip| ip.to_string()),
                    new.idle_timeout_secs.map(|v| v as i64),
                    new.seed.host_private_key,
                    serde_json::to_string(&new.seed.authorized_keys).expect("serializes")
                ],
            );
            match res {
                Ok(_) => {
                    tx.commit()?;
                    return Ok(Workspace {
                        id,
                        project_id: project.id.clone(),
                        project_name: project.name.clone(),
                        owner_uid,
                        uuid: uuid.to_owned(),
                        state: State::Stopped,
                        generation: 0,
                        reason: String::new(),
                        hardware: hardware.clone(),
                        pending_hardware: None,
                        created_at,
                        image: new.image.map(str::to_owned),
                        login_user: new.login_user.to_owned(),
                        ssh_host_public_key: new.ssh_host_public_key.to_owned(),
                        mac: new.mac.map(str::to_owned),
                        ip,
                        idle_timeout_secs: new.idle_timeout_secs,
                        idle_since: None,
                        dedicated_cpus: Vec::new(),
                        gpu_device: None,
                        provisioning: Some(Provisioning::Creating),
                    });
                }
                Err(rusqlite::Error::SqliteFailure(e, msg))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    drop(tx);
                    let msg = msg.unwrap_or_default();
                    // A random id or MAC collided: retry with a fresh id. (The address was
                    // chosen in this transaction, so it cannot collide; the MAC is random and
                    // the caller's, so it is a refusal the caller can retry.)
                    if msg.contains("workspaces.id") {
                        id = WorkspaceId::generate();
                        continue;
                    }
                    return Err(Error::Internal(format!(
                        "cannot insert workspace {id}: {msg}"
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Internal(
            "could not allocate a unique workspace id".into(),
        ))
    }

    pub fn get_workspace(&self, id: &WorkspaceId, owner: Owner) -> Result<Workspace> {
        read_workspace(&self.conn(), id, owner)
    }

    /// Runs a generation-gated UPDATE of `ws` and returns the row as it is afterwards, both
    /// under one lock; if the generation moved on, nothing changed and the result is
    /// [`Error::Conflict`].
    fn gated_update(
        &self,
        ws: &Workspace,
        sql: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> Result<Workspace> {
        let conn = self.conn();
        let changed = conn.execute(sql, params)?;
        let now = read_workspace(&conn, &ws.id, None)?;
        if changed == 0 {
            return Err(Error::Conflict {
                id: ws.id.to_string(),
                now: now.state,
            });
        }
        Ok(now)
    }

    pub fn list_workspaces(
        &self,
        filter: &WorkspaceFilter,
        owner: Owner,
    ) -> Result<Vec<Workspace>> {
        list_workspaces_in(&self.conn(), filter, owner)
    }

    /// Writes a state transition of `ws` in one transaction, if its generation is still
    /// `ws.generation`: state, reason, the next generation and the host resources the VM
    /// holds ([`Holdings`]; taking them also makes the pending hardware, if any, the
    /// hardware). For [`Holdings::Take`], `place` is given the workspace and every other one
    /// as this transaction reads them, and picks the resources or refuses (then nothing is
    /// written), so two starts cannot both take the last free ones. Returns the workspace as
    /// written, or [`Error::Conflict`] if another change won. The workspace's runner is the
    /// only caller: no other code writes a state.
    pub fn write_transition(
        &self,
        ws: &Workspace,
        to: State,
        reason: &str,
        holdings: Holdings<'_>,
    ) -> Result<Workspace> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = read_workspace(&tx, &ws.id, None)?;
        if current.generation != ws.generation {
            return Err(Error::Conflict {
                id: ws.id.to_string(),
                now: current.state,
            });
        }
        let (take, cpus, gpu) = match holdings {
            Holdings::Keep => (
                false,
                current.dedicated_cpus.clone(),
                current.gpu_device.clone(),
            ),
            Holdings::Free => (false, Vec::new(), None),
            Holdings::Take(place) => {
                let all = all_workspaces(&tx)?;
                let (cpus, gpu) = place(&current, &all)?;
                (true, cpus, gpu)
            }
        };
        let cpus_json =
            (!cpus.is_empty()).then(|| serde_json::to_string(&cpus).expect("serializes"));
        tx.execute(
            "UPDATE workspaces SET state = ?1, reason = ?2, generation = generation + 1, updated_at = ?3,
                 hardware = CASE WHEN ?4 AND pending_hardware IS NOT NULL THEN pending_hardware ELSE hardware END,
                 pending_hardware = CASE WHEN ?4 THEN NULL ELSE pending_hardware END,
                 dedicated_cpus = ?5, gpu_device = ?6
             WHERE id = ?7",
            params![to.as_str(), reason, now(), take, cpus_json, gpu, ws.id.as_str()],
        )?;
        let updated = read_workspace(&tx, &ws.id, None)?;
        tx.commit()?;
        tracing::info!(
            workspace = %ws.id,
            generation = updated.generation,
            from = %ws.state,
            to = %to,
            reason,
            "state transition"
        );
        Ok(updated)
    }

    /// Sets hardware and pending hardware, gated on the generation like a transition.
    pub fn set_hardware(
        &self,
        ws: &Workspace,
        hardware: &Hardware,
        pending: Option<&Hardware>,
    ) -> Result<Workspace> {
        self.gated_update(
            ws,
            "UPDATE workspaces SET hardware = ?1, pending_hardware = ?2, generation = generation + 1,
                 updated_at = ?3
             WHERE id = ?4 AND generation = ?5",
            params![
                hardware_json(hardware),
                pending.map(hardware_json),
                now(),
                ws.id.as_str(),
                ws.generation as i64
            ],
        )
    }

    /// Clears the provisioning mark of a workspace whose host resources are all made.
    pub fn finish_provisioning(&self, id: &WorkspaceId) -> Result<()> {
        self.conn().execute(
            "UPDATE workspaces SET provisioning = NULL WHERE id = ?1 AND provisioning = 'creating'",
            [id.as_str()],
        )?;
        Ok(())
    }

    /// Marks `ws` as being deleted, gated on its generation (which it moves on, so nothing
    /// decided on the row before can still win); returns the row as written.
    pub fn mark_deleting(&self, ws: &Workspace) -> Result<Workspace> {
        self.gated_update(
            ws,
            "UPDATE workspaces SET provisioning = ?1, generation = generation + 1, updated_at = ?2
             WHERE id = ?3 AND generation = ?4",
            params![
                Provisioning::Deleting.as_str(),
                now(),
                ws.id.as_str(),
                ws.generation as i64
            ],
        )
    }

    /// The secrets a seed of `id` is written from.
    pub fn seed_material(&self, id: &WorkspaceId) -> Result<SeedMaterial> {
        let (key, keys): (String, String) = self
            .conn()
            .query_row(
                "SELECT ssh_host_private_key, authorized_keys FROM workspaces WHERE id = ?1",
                [id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .ok_or_else(|| Error::not_found("workspace", id.as_str()))?;
        Ok(SeedMaterial {
            host_private_key: key,
            authorized_keys: serde_json::from_str(&keys)
                .map_err(|e| Error::Internal(format!("authorized keys of {id}: {e}")))?,
        })
    }

    /// Records (or clears) the idle clock. Bookkeeping, not a state change: not gated.
    pub fn set_idle_since(&self, id: &WorkspaceId, since: Option<i64>) -> Result<()> {
        self.conn().execute(
            "UPDATE workspaces SET idle_since = ?1 WHERE id = ?2",
            params![since, id.as_str()],
        )?;
        Ok(())
    }

    /// Sets the workspace's own idle timeout (`None`: the daemon's).
    pub fn set_idle_timeout(&self, id: &WorkspaceId, secs: Option<u64>) -> Result<()> {
        self.conn().execute(
            "UPDATE workspaces SET idle_timeout_secs = ?1 WHERE id = ?2",
            params![secs.map(|v| v as i64), id.as_str()],
        )?;
        Ok(())
    }

    /// Deletes the row of a workspace whose generation is still `ws.generation`, and records
    /// that its address was given up now.
    pub fn delete_workspace(&self, ws: &Workspace) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let deleted: Option<Option<String>> = tx
            .query_row(
                "DELETE FROM workspaces WHERE id = ?1 AND generation = ?2 RETURNING ip",
                params![ws.id.as_str(), ws.generation as i64],
                |r| r.get(0),
            )
            .optional()?;
        let Some(ip) = deleted else {
            let now = read_workspace(&tx, &ws.id, None)?;
            return Err(Error::Conflict {
                id: ws.id.to_string(),
                now: now.state,
            });
        };
        if let Some(ip) = ip {
            tx.execute(
                "INSERT OR REPLACE INTO released_addresses (ip, released_at) VALUES (?1, ?2)",
                params![ip, now()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

fn list_workspaces_in(
    conn: &Connection,
    filter: &WorkspaceFilter,
    owner: Owner,
) -> Result<Vec<Workspace>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {WORKSPACE_COLUMNS} FROM workspaces w JOIN projects p ON p.id = w.project_id \
         WHERE (?1 IS NULL OR w.state = ?1) AND (?2 IS NULL OR w.project_id = ?2) \
           AND (?3 IS NULL OR w.owner_uid = ?3) \
         ORDER BY w.created_at, w.id"
    ))?;
    let rows = stmt.query_map(
        params![
            filter.state.map(State::as_str),
            filter.project.as_ref().map(ProjectId::as_str),
            owner
        ],
        workspace_from_row,
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn all_workspaces(conn: &Connection) -> Result<Vec<Workspace>> {
    list_workspaces_in(conn, &WorkspaceFilter::default(), None)
}

fn read_workspace(conn: &Connection, id: &WorkspaceId, owner: Owner) -> Result<Workspace> {
    conn.query_row(
        &format!(
            "SELECT {WORKSPACE_COLUMNS} FROM workspaces w JOIN projects p ON p.id = w.project_id \
             WHERE w.id = ?1 AND (?2 IS NULL OR w.owner_uid = ?2)"
        ),
        params![id.as_str(), owner],
        workspace_from_row,
    )
    .optional()?
    .ok_or_else(|| Error::not_found("workspace", id.as_str()))
}

/// Images with the number of workspaces using each; `:viewer` is the caller's uid (only
/// their workspaces are counted) or NULL for an admin (all are).
const IMAGE_QUERY: &str = "SELECT i.name, i.owner_uid, i.boot_mode, i.cmdline, i.virtual_size, \
     i.disk_size, i.created_at, (SELECT COUNT(*) FROM workspaces w WHERE w.image = i.id \
     AND (:viewer IS NULL OR w.owner_uid = :viewer)) FROM images i";

fn image_from_row(r: &Row<'_>) -> rusqlite::Result<Image> {
    let name = ImageName::parse(&r.get::<_, String>(0)?).map_err(|e| corrupt("image name", e))?;
    Ok(Image {
        id: ImageId::new(name, r.get(1)?),
        boot_mode: BootMode::parse(&r.get::<_, String>(2)?).map_err(|e| corrupt("boot mode", e))?,
        cmdline: r.get(3)?,
        virtual_size: r.get::<_, i64>(4)? as u64,
        disk_size: r.get::<_, i64>(5)? as u64,
        created_at: r.get(6)?,
        in_use: r.get(7)?,
    })
}

/// Only one daemon uses a state database, and it opens the store before serving: every
/// image reservation found then was left by a daemon that died during an import or delete.
/// (Their staging files go with them, see `Layout::create`.)
fn drop_stale_image_reservations(conn: &Connection) -> Result<()> {
    let n = conn.execute("DELETE FROM image_reservations", [])?;
    if n > 0 {
        tracing::info!(
            reservations = n,
            "dropped image imports and deletes interrupted by a restart"
        );
    }
    Ok(())
}

/// What an image reservation is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ImageReservation {
    Importing,
    Deleting,
}

impl ImageReservation {
    fn as_str(self) -> &'static str {
        match self {
            ImageReservation::Importing => "importing",
            ImageReservation::Deleting => "deleting",
        }
    }
}

fn random_token() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the kernel's random source is available");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Refuses `name` if an import or delete holds it; `Ok` when it is free.
fn check_unreserved(tx: &Connection, name: &ImageId) -> Result<()> {
    let held: Option<String> = tx
        .query_row(
            "SELECT state FROM image_reservations WHERE id = ?1",
            [name.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    match held.as_deref() {
        None => Ok(()),
        Some("deleting") => Err(Error::AlreadyExists(format!(
            "image {} is being deleted",
            name.name()
        ))),
        Some(_) => Err(Error::AlreadyExists(format!(
            "image {} is being imported",
            name.name()
        ))),
    }
}

impl Store {
    /// Reserves image `id` for an import before any of its files is written: refused at once
    /// (`AlreadyExists`) while the image exists or another import or delete holds it.
    /// Returns the reservation's token, which [`Store::finish_image_import`] and
    /// [`Store::release_image`] need.
    pub fn reserve_image_import(&self, id: &ImageId) -> Result<String> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM images WHERE id = ?1)",
            [id.to_string()],
            |r| r.get(0),
        )?;
        if exists {
            return Err(Error::AlreadyExists(format!(
                "image {} already exists",
                id.name()
            )));
        }
        check_unreserved(&tx, id)?;
        let token = random_token();
        tx.execute(
            "INSERT INTO image_reservations (id, state, token, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![
                id.to_string(),
                ImageReservation::Importing.as_str(),
                token,
                now()
            ],
        )?;
        tx.commit()?;
        Ok(token)
    }

    /// Ends the import holding `token`: its reservation becomes the image row, in one
    /// transaction.
    pub fn finish_image_import(&self, image: &Image, token: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = image.id.to_string();
        let held = tx.execute(
            "DELETE FROM image_reservations WHERE id = ?1 AND token = ?2 AND state = 'importing'",
            params![id, token],
        )?;
        if held != 1 {
            return Err(Error::Internal(format!(
                "the import of image {id} lost its reservation"
            )));
        }
        let res = tx.execute(
            "INSERT INTO images (id, owner_uid, name, boot_mode, cmdline, virtual_size, disk_size,
                                 created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                id,
                image.id.owner_uid(),
                image.id.name().as_str(),
                image.boot_mode.as_str(),
                image.cmdline,
                image.virtual_size as i64,
                image.disk_size as i64,
                image.created_at
            ],
        );
        match res {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(Error::AlreadyExists(format!(
                    "image {} already exists",
                    image.id.name()
                )))
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit()?;
        Ok(())
    }

    /// Gives up the reservation of `id` held by `token` (nothing if it is not held by it).
    pub fn release_image(&self, id: &ImageId, token: &str) -> Result<()> {
        self.conn().execute(
            "DELETE FROM image_reservations WHERE id = ?1 AND token = ?2",
            params![id.to_string(), token],
        )?;
        Ok(())
    }

    /// The image with id `id`, whoever owns it (for the daemon's own use, e.g. a workspace's
    /// recorded image); its `in_use` counts every workspace.
    pub fn get_image(&self, id: &ImageId) -> Result<Image> {
        self.conn()
            .query_row(
                &format!("{IMAGE_QUERY} WHERE i.id = :id"),
                named_params! { ":viewer": None::<u32>, ":id": id.to_string() },
                image_from_row,
            )
            .optional()?
            .ok_or_else(|| Error::not_found("image", id.to_string()))
    }

    /// The image `reference` means to a caller (`viewer`: `None` for an admin): `NAME@UID`
    /// is that image, found only by its owner or an admin; a plain name is the caller's own
    /// image of that name, else the shared one (root's). Anything else is not found, so no
    /// one learns another user's image names.
    pub fn resolve_image(&self, reference: &str, viewer: Owner) -> Result<Image> {
        let id = ImageId::parse(reference)?;
        let not_found = || Error::not_found("image", reference);
        let conn = self.conn();
        let found = if reference.contains('@') {
            if viewer.is_some_and(|uid| uid != id.owner_uid()) {
                return Err(not_found());
            }
            conn.query_row(
                &format!("{IMAGE_QUERY} WHERE i.id = :id"),
                named_params! { ":viewer": viewer, ":id": id.to_string() },
                image_from_row,
            )
        } else {
            conn.query_row(
                &format!(
                    "{IMAGE_QUERY} WHERE i.name = :name AND i.owner_uid IN (0, :viewer) \
                     ORDER BY i.owner_uid = 0 LIMIT 1"
                ),
                named_params! { ":viewer": viewer, ":name": reference },
                image_from_row,
            )
        };
        found.optional()?.ok_or_else(not_found)
    }

    /// The images a caller sees (`viewer`: `None` for an admin, who sees all): their own
    /// and the shared ones.
    pub fn list_images(&self, viewer: Owner) -> Result<Vec<Image>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{IMAGE_QUERY} WHERE :viewer IS NULL OR i.owner_uid IN (0, :viewer) \
             ORDER BY i.name, i.owner_uid"
        ))?;
        let rows = stmt.query_map(named_params! { ":viewer": viewer }, image_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes an image row, refused while a workspace uses it, and reserves the id until
    /// the caller has removed the files and calls [`Store::release_image`] with the token
    /// returned (so an import of the same image cannot write them meanwhile).
    pub fn delete_image(&self, id: &ImageId) -> Result<String> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        check_unreserved(&tx, id)?;
        let key = id.to_string();
        let users: Vec<String> = {
            let mut stmt = tx.prepare("SELECT id FROM workspaces WHERE image = ?1 ORDER BY id")?;
            let rows = stmt.query_map([&key], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        if !users.is_empty() {
            return Err(Error::precondition(format!(
                "image {} is used by {}; delete those workspaces first",
                id.name(),
                users.join(", ")
            )));
        }
        if tx.execute("DELETE FROM images WHERE id = ?1", [&key])? == 0 {
            return Err(Error::not_found("image", &key));
        }
        let token = random_token();
        tx.execute(
            "INSERT INTO image_reservations (id, state, token, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![key, ImageReservation::Deleting.as_str(), token, now()],
        )?;
        tx.commit()?;
        Ok(token)
    }
}

/// Every reserved IP address.
fn used_ips(conn: &Connection) -> Result<std::collections::HashSet<std::net::Ipv4Addr>> {
    let mut stmt = conn.prepare("SELECT ip FROM workspaces WHERE ip IS NOT NULL")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut set = std::collections::HashSet::new();
    for ip in rows {
        set.insert(ip?.parse().map_err(|e| corrupt("ip", e))?);
    }
    Ok(set)
}

/// When each address was last given up.
fn released_ips(conn: &Connection) -> Result<std::collections::HashMap<std::net::Ipv4Addr, i64>> {
    let mut stmt = conn.prepare("SELECT ip, released_at FROM released_addresses")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut map = std::collections::HashMap::new();
    for row in rows {
        let (ip, at) = row?;
        map.insert(ip.parse().map_err(|e| corrupt("ip", e))?, at);
    }
    Ok(map)
}

/// A task as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskRow {
    pub id: String,
    pub workspace_id: WorkspaceId,
    pub argv: Vec<String>,
    pub state: String,
    pub exit_code: Option<i32>,
    pub started_at: i64,
    pub ended_at: Option<i64>,
}

fn task_from_row(r: &Row<'_>) -> rusqlite::Result<TaskRow> {
    Ok(TaskRow {
        id: r.get(0)?,
        workspace_id: WorkspaceId::parse(&r.get::<_, String>(1)?)
            .map_err(|e| corrupt("workspace id", e))?,
        argv: serde_json::from_str(&r.get::<_, String>(2)?).map_err(|e| corrupt("argv", e))?,
        state: r.get(3)?,
        exit_code: r.get(4)?,
        started_at: r.get(5)?,
        ended_at: r.get(6)?,
    })
}

const TASK_QUERY: &str =
    "SELECT t.id, t.workspace_id, t.argv, t.state, t.exit_code, t.started_at, \
     t.ended_at FROM tasks t JOIN workspaces w ON w.id = t.workspace_id";

impl Store {
    pub fn insert_task(&self, id: &str, ws: &WorkspaceId, argv: &[String]) -> Result<TaskRow> {
        let started_at = now();
        let argv_json = serde_json::to_string(argv).expect("argv serializes");
        self.conn().execute(
            "INSERT INTO tasks (id, workspace_id, argv, state, started_at) VALUES (?1, ?2, ?3, 'running', ?4)",
            params![id, ws.as_str(), argv_json, started_at],
        )?;
        Ok(TaskRow {
            id: id.to_owned(),
            workspace_id: ws.clone(),
            argv: argv.to_vec(),
            state: "running".into(),
            exit_code: None,
            started_at,
            ended_at: None,
        })
    }

    /// Ends a running task; a task that already ended is left as it is.
    pub fn finish_task(&self, id: &str, state: &str, exit_code: Option<i32>) -> Result<()> {
        self.conn().execute(
            "UPDATE tasks SET state = ?1, exit_code = ?2, ended_at = ?3 WHERE id = ?4 AND state = 'running'",
            params![state, exit_code, now(), id],
        )?;
        Ok(())
    }

    /// Marks every task still `running` as `lost` (at daemon start); returns how many.
    pub fn lose_running_tasks(&self) -> Result<usize> {
        Ok(self.conn().execute(
            "UPDATE tasks SET state = 'lost', ended_at = ?1 WHERE state = 'running'",
            params![now()],
        )?)
    }

    pub fn get_task(&self, id: &str, owner: Owner) -> Result<TaskRow> {
        self.conn()
            .query_row(
                &format!("{TASK_QUERY} WHERE t.id = ?1 AND (?2 IS NULL OR w.owner_uid = ?2)"),
                params![id, owner],
                task_from_row,
            )
            .optional()?
            .ok_or_else(|| Error::not_found("task", id))
    }

    pub fn list_tasks(&self, ws: Option<&WorkspaceId>, owner: Owner) -> Result<Vec<TaskRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{TASK_QUERY} WHERE (?1 IS NULL OR t.workspace_id = ?1) AND (?2 IS NULL OR w.owner_uid = ?2) \
             ORDER BY t.started_at DESC, t.rowid DESC"
        ))?;
        let rows = stmt.query_map(params![ws.map(WorkspaceId::as_str), owner], task_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// Applies the migrations not applied yet, each in its own transaction. Foreign keys are off
/// while they run (a table rebuild must be able to drop and rename a referenced table, the
/// way SQLite's documentation does it) and checked before each commit.
fn migrate(conn: &mut Connection) -> Result<()> {
    conn.pragma_update(None, "foreign_keys", false)?;
    let result = apply_migrations(conn);
    conn.pragma_update(None, "foreign_keys", true)?;
    result
}

fn apply_migrations(conn: &mut Connection) -> Result<()> {
    let current: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current as usize > MIGRATIONS.len() {
        return Err(Error::Internal(format!(
            "state database has schema version {current}, newer than this aetherd ({}); refusing to run",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        let broken: Option<String> = tx
            .query_row("PRAGMA foreign_key_check", [], |r| r.get(0))
            .optional()?;
        if let Some(table) = broken {
            return Err(Error::Internal(format!(
                "migration {} would break a foreign key of table {table}; not applied",
                i + 1
            )));
        }
        tx.pragma_update(None, "user_version", (i + 1) as u32)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "migrated state database");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("state.db")).unwrap();
        (dir, s)
    }

    fn project(s: &Store, name: &str) -> Project {
        s.insert_project(&ProjectName::parse(name).unwrap(), 1000)
            .unwrap()
    }

    fn new_ws(s: &Store, p: &Project, owner: u32, uuid: &str) -> Workspace {
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

    #[test]
    fn migrations_are_applied_once_and_reopen_keeps_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let s = Store::open(&path).unwrap();
            assert_eq!(s.schema_version().unwrap() as usize, MIGRATIONS.len());
            project(&s, "keep");
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.list_projects(None).unwrap().len(), 1);
        let mode: String = s
            .conn()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        assert!(Store::open(&path).is_err());
    }

    #[test]
    fn project_names_are_unique_and_delete_needs_no_workspaces() {
        let (_d, s) = store();
        let p = project(&s, "app");
        let err = s
            .insert_project(&ProjectName::parse("app").unwrap(), 1000)
            .unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err:?}");
        // Another owner's "app" is another project: names are unique per owner.
        let theirs = s
            .insert_project(&ProjectName::parse("app").unwrap(), 1)
            .unwrap();
        assert_ne!(theirs.id, p.id);
        let found = |uid: u32, owner: Owner| {
            s.find_project(&ProjectRef::parse("app").unwrap(), owner, uid)
                .unwrap()
                .id
        };
        assert_eq!(found(1, Some(1)), theirs.id);
        assert_eq!(found(1000, Some(1000)), p.id);
        // An admin's name lookup: its own first, else the oldest.
        assert_eq!(found(1, None), theirs.id);
        assert_eq!(found(0, None), p.id);
        new_ws(&s, &p, 1000, "u1");
        let err = s.delete_project(&p).unwrap_err();
        assert!(err.to_string().contains("still has 1 workspace"), "{err}");
        let by_name = s
            .find_project(&ProjectRef::parse("app").unwrap(), None, 0)
            .unwrap();
        assert_eq!(by_name.id, p.id);
        assert_eq!(by_name.workspace_count, 1);
    }

    #[test]
    fn the_project_rebuild_keeps_projects_and_their_workspaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            // A database as the daemon left it at schema 8.
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &MIGRATIONS[..8] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 8).unwrap();
            tx.execute(
                "INSERT INTO projects (id, name, owner_uid, created_at) VALUES ('0badc0de', 'app', 1000, 1)",
                [],
            )
            .unwrap();
            tx.execute(
                "INSERT INTO workspaces (id, project_id, owner_uid, uuid, state, hardware, created_at, updated_at) \
                 VALUES ('ws-abc123', '0badc0de', 1000, 'u', 'stopped', '{}', 1, 1)",
                [],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap() as usize, MIGRATIONS.len());
        let p = s
            .find_project(&ProjectRef::parse("app").unwrap(), Some(1000), 1000)
            .unwrap();
        assert_eq!((p.id.as_str(), p.workspace_count), ("0badc0de", 1));
        // The workspaces' foreign key still points at projects, and is enforced.
        assert!(s.delete_project(&p).is_err());
        let conn = s.conn();
        let orphan = conn.execute(
            "INSERT INTO workspaces (id, project_id, owner_uid, uuid, state, hardware, created_at, updated_at) \
             VALUES ('ws-zzz999', 'ffffffff', 1, 'v', 'stopped', '{}', 1, 1)",
            [],
        );
        assert!(orphan.is_err(), "foreign keys are off after migrating");
    }

    #[test]
    fn the_image_rebuild_makes_old_images_shared_and_keeps_their_workspaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            // A database as the daemon left it at schema 9: one image, used by a workspace
            // that has a task.
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &MIGRATIONS[..9] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 9).unwrap();
            tx.execute_batch(&format!(
                "INSERT INTO images (name, boot_mode, virtual_size, disk_size, created_at)
                     VALUES ('deb', 'kernel', 1, 1, 1);
                 INSERT INTO projects (id, name, owner_uid, created_at)
                     VALUES ('0badc0de', 'app', 1000, 1);
                 INSERT INTO workspaces (id, project_id, owner_uid, uuid, state, hardware,
                     created_at, updated_at, image, mac, ip, gpu_device)
                     VALUES ('ws-abc123', '0badc0de', 1000, 'u', 'running', '{0}', 1, 1, 'deb',
                             '52:54:00:00:00:01', '10.0.0.2', 'pci_0000_01_00_0');
                 INSERT INTO tasks (id, workspace_id, argv, state, started_at)
                     VALUES ('t1', 'ws-abc123', '[]', 'running', 1);",
                hardware_json(&Hardware::DEFAULT)
            ))
            .unwrap();
            tx.commit().unwrap();
        }
        let s = Store::open(&path).unwrap();
        let image = s.resolve_image("deb", Some(1000)).unwrap();
        assert_eq!((image.id.to_string(), image.in_use), ("deb".to_owned(), 1));
        assert_eq!(image.boot_mode, BootMode::Kernel);
        let ws = s
            .get_workspace(&WorkspaceId::parse("ws-abc123").unwrap(), None)
            .unwrap();
        assert_eq!(ws.image.as_deref(), Some("deb"));
        assert_eq!(ws.state, State::Running);
        assert_eq!(ws.gpu_device.as_deref(), Some("pci_0000_01_00_0"));
        assert_eq!(ws.ip, Some("10.0.0.2".parse().unwrap()));
        let conn = s.conn();
        let tasks: i64 = conn
            .query_row("SELECT COUNT(*) FROM tasks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            tasks, 1,
            "dropping the old workspaces table cascaded to its tasks"
        );
        // The workspace's image is a foreign key to the image's id, enforced.
        let dangling = conn.execute("UPDATE workspaces SET image = 'nope'", []);
        assert!(dangling.is_err(), "the image foreign key is not enforced");
        let unique_ip = conn.execute(
            "INSERT INTO workspaces (id, project_id, owner_uid, uuid, state, hardware, created_at, updated_at, ip) \
             VALUES ('ws-zzz999', '0badc0de', 1, 'v', 'stopped', '{}', 1, 1, '10.0.0.2')",
            [],
        );
        assert!(
            unique_ip.is_err(),
            "the rebuild lost the unique address index"
        );
    }

    #[test]
    fn owner_filter_hides_other_users_rows() {
        let (_d, s) = store();
        let p = project(&s, "mine");
        let ws = new_ws(&s, &p, 1000, "u1");
        assert_eq!(s.list_projects(Some(1000)).unwrap().len(), 1);
        assert_eq!(s.list_projects(Some(1001)).unwrap().len(), 0);
        assert!(s.get_workspace(&ws.id, Some(1001)).is_err());
        assert!(s.get_workspace(&ws.id, Some(1000)).is_ok());
        assert!(s
            .find_project(&ProjectRef::parse("mine").unwrap(), Some(1001), 1001)
            .is_err());
    }

    #[test]
    fn cas_loses_against_a_concurrent_change() {
        let (_d, s) = store();
        let p = project(&s, "app");
        let ws = new_ws(&s, &p, 1000, "u1");
        let a = s
            .write_transition(
                &ws,
                State::Starting,
                "",
                Holdings::Take(&|_, _| Ok((Vec::new(), None))),
            )
            .unwrap();
        assert_eq!(a.generation, 1);
        // `ws` is stale now: a second decision based on it must lose.
        let err = s
            .write_transition(
                &ws,
                State::Starting,
                "",
                Holdings::Take(&|_, _| Ok((Vec::new(), None))),
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Conflict {
                    now: State::Starting,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(s.delete_workspace(&ws).is_err());
        s.delete_workspace(&a).unwrap();
    }

    #[test]
    fn pending_hardware_is_applied_by_a_transition_that_asks_for_it() {
        let (_d, s) = store();
        let p = project(&s, "app");
        let ws = new_ws(&s, &p, 1000, "u1");
        let bigger = Hardware {
            cpus: 4,
            ..Hardware::DEFAULT
        };
        let ws = s
            .set_hardware(&ws, &Hardware::DEFAULT, Some(&bigger))
            .unwrap();
        let ws = s
            .write_transition(&ws, State::Error, "x", Holdings::Free)
            .unwrap();
        assert_eq!(ws.pending_hardware.as_ref(), Some(&bigger));
        let ws = s
            .write_transition(
                &ws,
                State::Starting,
                "",
                Holdings::Take(&|_, _| Ok((Vec::new(), None))),
            )
            .unwrap();
        assert_eq!(ws.hardware, bigger);
        assert_eq!(ws.pending_hardware, None);
    }

    #[test]
    fn a_start_places_in_its_own_transaction_and_a_refusal_writes_nothing() {
        let (_d, s) = store();
        let p = project(&s, "app");
        let ws = new_ws(&s, &p, 1000, "u1");
        let other = new_ws(&s, &p, 1000, "u2");
        let seen = std::cell::Cell::new(0);
        let place = |me: &Workspace, all: &[Workspace]| {
            seen.set(all.len());
            assert_eq!(me.id, ws.id);
            Ok((vec![2, 3], Some("pci_0000_01_00_0".to_owned())))
        };
        let started = s
            .write_transition(&ws, State::Starting, "", Holdings::Take(&place))
            .unwrap();
        assert_eq!(seen.get(), 2, "placement sees every workspace");
        assert_eq!(started.dedicated_cpus, [2, 3]);
        assert_eq!(started.gpu_device.as_deref(), Some("pci_0000_01_00_0"));
        let kept = s
            .write_transition(&started, State::Running, "", Holdings::Keep)
            .unwrap();
        assert_eq!(kept.dedicated_cpus, [2, 3]);
        let off = s
            .write_transition(&kept, State::Stopped, "", Holdings::Free)
            .unwrap();
        assert!(off.dedicated_cpus.is_empty() && off.gpu_device.is_none());
        // A refused placement writes nothing at all.
        let refuse = |_: &Workspace, _: &[Workspace]| -> Result<(Vec<u32>, Option<String>)> {
            Err(Error::ResourceExhausted("full".into()))
        };
        let err = s
            .write_transition(&other, State::Starting, "", Holdings::Take(&refuse))
            .unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err:?}");
        assert_eq!(s.get_workspace(&other.id, None).unwrap(), other);
    }

    #[test]
    fn list_filters_by_state_and_project() {
        let (_d, s) = store();
        let a = project(&s, "a");
        let b = project(&s, "b");
        let w1 = new_ws(&s, &a, 1, "u1");
        new_ws(&s, &b, 1, "u2");
        s.write_transition(
            &w1,
            State::Starting,
            "",
            Holdings::Take(&|_, _| Ok((Vec::new(), None))),
        )
        .unwrap();
        let f = |state, project: Option<&Project>| WorkspaceFilter {
            state,
            project: project.map(|p| p.id.clone()),
        };
        assert_eq!(s.list_workspaces(&f(None, None), None).unwrap().len(), 2);
        assert_eq!(
            s.list_workspaces(&f(Some(State::Starting), None), None)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            s.list_workspaces(&f(None, Some(&b)), None).unwrap().len(),
            1
        );
        assert_eq!(
            s.list_workspaces(&f(Some(State::Starting), Some(&b)), None)
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn image_names_are_reserved_while_imported_or_deleted_and_freed_by_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let s = Store::open(&path).unwrap();
        let name = ImageId::parse("img").unwrap();
        let image = Image {
            id: name.clone(),
            boot_mode: BootMode::Bios,
            cmdline: String::new(),
            virtual_size: 1 << 30,
            disk_size: 1 << 20,
            created_at: 1,
            in_use: 0,
        };
        let token = s.reserve_image_import(&name).unwrap();
        let e = s.reserve_image_import(&name).unwrap_err();
        assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}");
        assert_eq!(e.to_string(), "image img is being imported");
        // A reservation is not an image.
        assert!(s.list_images(None).unwrap().is_empty());
        assert!(s.get_image(&name).is_err());
        // Only its holder finishes or releases it.
        assert!(s.finish_image_import(&image, "not-the-token").is_err());
        s.release_image(&name, "not-the-token").unwrap();
        assert!(s.reserve_image_import(&name).is_err());
        s.finish_image_import(&image, &token).unwrap();
        assert_eq!(s.list_images(None).unwrap(), vec![image.clone()]);
        assert_eq!(
            s.reserve_image_import(&name).unwrap_err().to_string(),
            "image img already exists"
        );
        s.release_image(&name, &token).unwrap();
        assert_eq!(
            s.list_images(None).unwrap().len(),
            1,
            "a finished import stays"
        );

        // A delete holds the name until its files are gone.
        let deleting = s.delete_image(&name).unwrap();
        assert!(s.list_images(None).unwrap().is_empty());
        assert_eq!(
            s.reserve_image_import(&name).unwrap_err().to_string(),
            "image img is being deleted"
        );
        s.release_image(&name, &deleting).unwrap();
        let token = s.reserve_image_import(&name).unwrap();
        s.release_image(&name, &token).unwrap();

        // A daemon that dies during an import leaves its reservation; the next open drops it.
        s.reserve_image_import(&name).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        s.reserve_image_import(&name).unwrap();
    }

    #[test]
    fn images_belong_to_their_owner_and_roots_are_shared() {
        let (_dir, s) = store();
        let add = |reference: &str| {
            let id = ImageId::parse(reference).unwrap();
            let token = s.reserve_image_import(&id).unwrap();
            let image = Image {
                id,
                boot_mode: BootMode::Bios,
                cmdline: String::new(),
                virtual_size: 1 << 30,
                disk_size: 1 << 20,
                created_at: 1,
                in_use: 0,
            };
            s.finish_image_import(&image, &token).unwrap();
        };
        add("shared");
        add("dev");
        add("dev@1000");
        add("mine@1000");
        add("mine@1001");
        let ids = |viewer| -> Vec<String> {
            let list = s.list_images(viewer).unwrap();
            list.iter().map(|i| i.id.to_string()).collect()
        };
        assert_eq!(
            ids(None),
            ["dev", "dev@1000", "mine@1000", "mine@1001", "shared"]
        );
        assert_eq!(ids(Some(1000)), ["dev", "dev@1000", "mine@1000", "shared"]);
        assert_eq!(ids(Some(1001)), ["dev", "mine@1001", "shared"]);
        let resolve = |r: &str, viewer| s.resolve_image(r, viewer).map(|i| i.id.to_string());
        // A plain name: one's own first, then root's.
        assert_eq!(resolve("dev", Some(1000)).unwrap(), "dev@1000");
        assert_eq!(resolve("dev", Some(1001)).unwrap(), "dev");
        assert_eq!(resolve("dev", None).unwrap(), "dev");
        assert_eq!(resolve("mine", Some(1001)).unwrap(), "mine@1001");
        assert_eq!(resolve("shared", Some(1001)).unwrap(), "shared");
        // Another user's image is not found, by name or by id.
        for (r, viewer) in [
            ("mine@1000", Some(1001)),
            ("dev@1000", Some(1001)),
            ("x", Some(1000)),
        ] {
            let e = resolve(r, viewer).unwrap_err();
            assert!(matches!(e, Error::NotFound { .. }), "{r}: {e:?}");
        }
        assert_eq!(resolve("mine@1000", Some(1000)).unwrap(), "mine@1000");
        assert_eq!(resolve("mine@1000", None).unwrap(), "mine@1000");
        assert!(matches!(
            resolve("a@b", Some(1000)),
            Err(Error::InvalidArgument(_))
        ));
    }
}
