//! The writes gated on a workspace's `generation`: its state transitions (with the host
//! resources the VM holds, in one transaction), its hardware, its provisioning marks. The
//! workspace's runner is the only caller of [`Store::write_transition`].

use rusqlite::{params, TransactionBehavior};

use super::workspaces::{all_workspaces, hardware_json, read_workspace, Provisioning, Workspace};
use super::{now, Store};
use crate::error::Result;
use crate::model::{Hardware, WorkspaceId};
use crate::store::StoreError;
use crate::workspace::state::State;

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

impl Store {
    /// Runs a generation-gated UPDATE of `ws` and returns the row as it is afterwards, both
    /// under one lock; if the generation moved on, nothing changed and the result is
    /// [`StoreError::Conflict`].
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
            return Err(StoreError::Conflict {
                id: ws.id.to_string(),
                now: now.state,
            }
            .into());
        }
        Ok(now)
    }

    /// Writes a state transition of `ws` in one transaction, if its generation is still
    /// `ws.generation`: state, reason, the next generation and the host resources the VM
    /// holds ([`Holdings`]; taking them also makes the pending hardware, if any, the
    /// hardware). For [`Holdings::Take`], `place` is given the workspace and every other one
    /// as this transaction reads them, and picks the resources or refuses (then nothing is
    /// written), so two starts cannot both take the last free ones. Returns the workspace as
    /// written, or [`StoreError::Conflict`] if another change won. The workspace's runner is the
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
            return Err(StoreError::Conflict {
                id: ws.id.to_string(),
                now: current.state,
            }
            .into());
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
}

#[cfg(test)]
mod tests {
    use crate::error::{Error, Result};
    use crate::model::Hardware;
    use crate::store::test_util::*;
    use crate::store::StoreError;
    use crate::store::{Holdings, Workspace};
    use crate::workspace::state::State;

    #[test]
    fn cas_loses_against_a_concurrent_change() {
        let (_d, s) = store();
        let p = project(&s, "app");
        let ws = new_ws(&s, &p, 1000, "u1");
        let a = s
            .write_transition(&ws, State::Starting, "", take_nothing())
            .unwrap();
        assert_eq!(a.generation, 1);
        // `ws` is stale now: a second decision based on it must lose.
        let err = s
            .write_transition(&ws, State::Starting, "", take_nothing())
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Store(StoreError::Conflict {
                    now: State::Starting,
                    ..
                })
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
            .write_transition(&ws, State::Starting, "", take_nothing())
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
}
