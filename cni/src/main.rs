//! `sluice-cni`: placeholder until the plugin lands.
fn main() {
    eprintln!("sluice-cni: not built yet");
    std::process::exit(1);
}
