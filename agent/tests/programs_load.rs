//! Every program in the eBPF object passes this kernel's verifier, and the
//! maps are pinned while loaded and gone after shutdown.

use sluice::bpf::{Datapath, PinRoot, PINNED_MAPS, PROGRAMS};
use sluice_tests::{evidence, require_root, PinDir};

#[tokio::test]
async fn every_program_loads_and_pins_are_removed() -> anyhow::Result<()> {
    require_root!(Ok(()));
    let dir = PinDir::new(&format!("sl-load-{}", std::process::id()));
    let datapath = Datapath::load(PinRoot::new(&dir.0))?;
    let loaded = datapath.loaded_programs();
    evidence(&format!("programs accepted by the verifier: {loaded:?}"));
    let mut names: Vec<&str> = loaded.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    let mut expected = PROGRAMS.to_vec();
    expected.sort();
    assert_eq!(names, expected, "the object's programs and the agent's list differ");
    for (_, file) in PINNED_MAPS {
        assert!(dir.0.join(file).exists(), "map {file} is not pinned");
    }
    datapath.shutdown(true)?;
    assert!(!dir.0.exists(), "pins left behind in {}", dir.0.display());
    Ok(())
}

#[tokio::test]
async fn restart_adopts_pinned_maps() -> anyhow::Result<()> {
    require_root!(Ok(()));
    let dir = PinDir::new(&format!("sl-adopt-{}", std::process::id()));
    let first = Datapath::load(PinRoot::new(&dir.0))?;
    let id_before = map_id(&dir.0.join("counters"))?;
    first.shutdown(false)?;
    let second = Datapath::load(PinRoot::new(&dir.0))?;
    assert_eq!(map_id(&dir.0.join("counters"))?, id_before, "a restarted agent must reuse the pinned map");
    second.shutdown(true)?;
    Ok(())
}

fn map_id(path: &std::path::Path) -> anyhow::Result<u32> {
    Ok(aya::maps::MapData::from_pin(path)?.info()?.id())
}
