//! Sluice node agent. See ARCHITECTURE.md for how one connection travels
//! through these modules.
pub mod bpf;
pub mod identity;
pub mod tls;
