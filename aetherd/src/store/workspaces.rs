//! Workspace rows: insert (with the address chosen in the same transaction), reads,
//! bookkeeping that is not a state (idle clock and timeout, seed secrets), delete.

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use super::projects::Project;
use super::{corrupt, now, Owner, Store};
use crate::error::{Error, Result};
use crate::model::{Hardware, ProjectId, ProjectName, WorkspaceId};
use crate::store::StoreError;
use crate::workspace::state::State;

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
    pub(super) fn as_str(self) -> &'static str {
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

#[derive(Clone, Debug, Default)]
pub struct WorkspaceFilter {
    pub state: Option<State>,
    pub project: Option<ProjectId>,
}

pub(super) const WORKSPACE_COLUMNS: &str = "w.id, w.project_id, p.name, w.owner_uid, w.uuid, w.state, \
     w.generation, w.reason, w.hardware, w.pending_hardware, w.created_at, w.image, w.login_user, \
     w.ssh_host_public_key, w.mac, w.ip, w.idle_timeout_secs, w.idle_since, w.dedicated_cpus, w.gpu_device, \
     w.provisioning";

pub(super) fn workspace_from_row(r: &Row<'_>) -> rusqlite::Result<Workspace> {
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

pub(super) fn hardware_json(hw: &Hardware) -> String {
    serde_json::to_string(hw).expect("hardware serializes")
}

impl Store {
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

    pub fn list_workspaces(
        &self,
        filter: &WorkspaceFilter,
        owner: Owner,
    ) -> Result<Vec<Workspace>> {
        list_workspaces_in(&self.conn(), filter, owner)
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
            return Err(StoreError::Conflict {
                id: ws.id.to_string(),
                now: now.state,
            }
            .into());
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

pub(super) fn all_workspaces(conn: &Connection) -> Result<Vec<Workspace>> {
    list_workspaces_in(conn, &WorkspaceFilter::default(), None)
}

pub(super) fn read_workspace(
    conn: &Connection,
    id: &WorkspaceId,
    owner: Owner,
) -> Result<Workspace> {
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

#[cfg(test)]
mod tests {
    use crate::model::ProjectRef;
    use crate::store::test_util::*;
    use crate::store::{Project, WorkspaceFilter};
    use crate::workspace::state::State;

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
    fn list_filters_by_state_and_project() {
        let (_d, s) = store();
        let a = project(&s, "a");
        let b = project(&s, "b");
        let w1 = new_ws(&s, &a, 1, "u1");
        new_ws(&s, &b, 1, "u2");
        s.write_transition(&w1, State::Starting, "", take_nothing())
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
}
