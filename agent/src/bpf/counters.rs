//! Reads the per-CPU counters from the pinned map, so any process (the agent,
//! `sluice inspect`, a test) sees the same numbers without the agent's help.

use std::{collections::BTreeMap, fmt};

use agent_common::{counter, COUNTER_NAMES};
use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray};

use super::PinRoot;

/// Counter name to its sum over all CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters(pub BTreeMap<&'static str, u64>);

impl Counters {
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, value) in &self.0 {
            writeln!(f, "{name:<24} {value:>14}")?;
        }
        Ok(())
    }
}

pub fn read_counters(pins: &PinRoot) -> Result<Counters> {
    let path = pins.path().join("counters");
    let data = MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
    let array: PerCpuArray<MapData, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
        .with_context(|| format!("{} is not Sluice's counter array", path.display()))?;
    let mut out = BTreeMap::new();
    for idx in 0..counter::COUNT {
        let per_cpu = array.get(&idx, 0).with_context(|| format!("reading counter {idx} from {}", path.display()))?;
        out.insert(COUNTER_NAMES[idx as usize], per_cpu.iter().sum());
    }
    Ok(Counters(out))
}
