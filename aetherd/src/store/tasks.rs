//! Tasks: commands run in workspaces (their output lives in `<state>/tasks/<id>.log`).

use rusqlite::{params, OptionalExtension, Row};

use super::{corrupt, now, Owner, Store};
use crate::error::{Error, Result};
use crate::model::WorkspaceId;

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
