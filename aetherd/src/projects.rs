//! Projects: named groups of workspaces, each owned by the user who created it. A member
//! sees its own; an admin sees all.

use std::sync::Arc;

use crate::caller::Caller;
use crate::error::Result;
use crate::model::{ProjectName, ProjectRef};
use crate::store::{Project, Store};

pub struct Projects {
    store: Arc<Store>,
}

impl Projects {
    pub fn new(store: Arc<Store>) -> Self {
        Projects { store }
    }

    pub fn create(&self, caller: Caller, name: &str) -> Result<Project> {
        let name = ProjectName::parse(name)?;
        let p = self.store.insert_project(&name, caller.uid)?;
        tracing::info!(project = %p.id, name = %p.name, uid = caller.uid, "project created");
        Ok(p)
    }

    pub fn list(&self, caller: Caller) -> Result<Vec<Project>> {
        self.store.list_projects(caller.owner())
    }

    /// The project `project` (a name or an id) means to `caller`.
    pub fn get(&self, caller: Caller, project: &str) -> Result<Project> {
        self.store
            .find_project(&ProjectRef::parse(project)?, caller.owner(), caller.uid)
    }

    /// Deletes an empty project (the store refuses one that has workspaces).
    pub fn delete(&self, caller: Caller, project: &str) -> Result<()> {
        let p = self.get(caller, project)?;
        self.store.delete_project(&p)?;
        tracing::info!(project = %p.id, name = %p.name, "project deleted");
        Ok(())
    }
}
