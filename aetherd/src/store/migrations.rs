//! The schema: versioned with `PRAGMA user_version`; [`MIGRATIONS`] are applied in order,
//! each in its own transaction with foreign keys off and checked before it commits, and are
//! never edited once released (add a new one instead).

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::error::{Error, Result};

/// Schema versions; index + 1 is the `user_version` after applying.
pub const MIGRATIONS: &[&str] = &[
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

/// Applies the migrations not applied yet, each in its own transaction. Foreign keys are off
/// while they run (a table rebuild must be able to drop and rename a referenced table, the
/// way SQLite's documentation does it) and checked before each commit.
pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
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
    use rusqlite::Connection;

    use super::MIGRATIONS;
    use crate::images::BootMode;
    use crate::model::{Hardware, ProjectRef, WorkspaceId};
    use crate::store::test_util::*;
    use crate::store::workspaces::hardware_json;
    use crate::store::Store;
    use crate::workspace::state::State;

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
}
