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
            writeln!(f, "{name:<26} {value:>14}")?;
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
    // Pins outlive agents: an array pinned by an older build has fewer
    // counters, and the ones it lacks are simply not reported.
    for idx in 0..counter::COUNT.min(array.len()) {
        let per_cpu = array.get(&idx, 0).with_context(|| format!("reading counter {idx} from {}", path.display()))?;
        out.insert(COUNTER_NAMES[idx as usize], per_cpu.iter().sum());
    }
    Ok(Counters(out))
}

/// Exports the kernel programs' per-CPU counters on every scrape, summed
/// over CPUs, as `sluice_datapath_events_total{event="..."}`: bytes the
/// kernel moved without the agent (same-node splice, socket bypass) are
/// counted here, beside the agent's own Istio metrics.
#[derive(Debug)]
pub struct DatapathCollector(pub PinRoot);

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

impl prometheus_client::collector::Collector for DatapathCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> fmt::Result {
        use prometheus_client::{
            encoding::EncodeMetric,
            metrics::{counter::ConstCounter, MetricType},
        };
        // A scrape while the pins are being replaced shows nothing rather
        // than failing the whole page.
        let Ok(counters) = read_counters(&self.0) else { return Ok(()) };
        let mut family = encoder.encode_descriptor(
            "sluice_datapath_events",
            "Events and bytes counted by Sluice's kernel programs (per-CPU counters, summed)",
            None,
            MetricType::Counter,
        )?;
        for (event, value) in counters.0 {
            let labels = EventLabel { event };
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
