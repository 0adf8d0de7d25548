//! Projects: named per owner.

use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};

use super::{corrupt, now, Owner, Store};
use crate::error::{Error, Result};
use crate::model::{ProjectId, ProjectName, ProjectRef};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Project {
    pub id: ProjectId,
    pub name: ProjectName,
    pub owner_uid: u32,
    pub created_at: i64,
    pub workspace_count: u32,
}

pub(super) fn project_from_row(r: &Row<'_>) -> rusqlite::Result<Project> {
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

impl Store {
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
}

#[cfg(test)]
mod tests {
    use crate::error::Error;
    use crate::model::{ProjectName, ProjectRef};
    use crate::store::test_util::*;
    use crate::store::Owner;

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
}
