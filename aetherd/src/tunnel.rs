//! Tunnels: byte pipes from a client (through the `Tunnel` RPC) to a TCP port of a running
//! workspace. Open tunnels are counted per workspace; the idle timer reads the count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::model::WorkspaceId;

/// Open connections per workspace. A [`ConnectionGuard`] counts one while it lives.
#[derive(Clone, Default)]
pub struct Connections {
    counts: Arc<Mutex<HashMap<WorkspaceId, usize>>>,
}

impl Connections {
    pub fn open(&self, id: &WorkspaceId) -> ConnectionGuard {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry(id.clone()).or_default() += 1;
        ConnectionGuard {
            connections: self.clone(),
            id: id.clone(),
        }
    }

    pub fn count(&self, id: &WorkspaceId) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(id).copied().unwrap_or(0)
    }
}

pub struct ConnectionGuard {
    connections: Connections,
    id: WorkspaceId,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut counts = self
            .connections
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_open_connections() {
        let c = Connections::default();
        let id = WorkspaceId::parse("ws-abc123").unwrap();
        let a = c.open(&id);
        let b = c.open(&id);
        assert_eq!(c.count(&id), 2);
        drop(a);
        assert_eq!(c.count(&id), 1);
        drop(b);
        assert_eq!(c.count(&id), 0);
    }
}
