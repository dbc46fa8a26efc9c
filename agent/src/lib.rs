//! Sluice node agent. See ARCHITECTURE.md for how one connection travels
//! through these modules.
pub mod admin;
pub mod bpf;
pub mod cni;
pub mod identity;
pub mod inpod;
pub mod keeper;
pub mod kubernetes;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod run;
pub mod state;
pub mod tls;
pub mod tunnel;
