//! What the agent must do to its own pods after a reload: enroll the added,
//! unenroll the removed, and re-program the changed.

use std::sync::Arc;

use super::snapshot::State;
use super::workload::Workload;

/// Local workloads that differ between two states, each list ordered by uid.
/// A workload that moves onto the node counts as added, one that moves off it
/// as removed. `changed` holds the new version; the old one is still in the
/// old state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateDiff {
    pub added: Vec<Arc<Workload>>,
    pub removed: Vec<Arc<Workload>>,
    pub changed: Vec<Arc<Workload>>,
}

impl StateDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    pub(crate) fn between(old: &State, new: &State, node: &str) -> StateDiff {
        let mut diff = StateDiff::default();
        for now in new.local_workloads(node) {
            match old.workload_by_uid(&now.uid).filter(|w| w.is_on_node(node)) {
                None => diff.added.push(now),
                Some(before) if *before != *now => diff.changed.push(now),
                Some(_) => {}
            }
        }
        for before in old.local_workloads(node) {
            let still_here = new.workload_by_uid(&before.uid).is_some_and(|w| w.is_on_node(node));
            if !still_here {
                diff.removed.push(before);
            }
        }
        diff
    }
}
