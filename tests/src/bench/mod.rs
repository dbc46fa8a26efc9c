//! `cargo xtask bench`: the pieces of the `sluice-bench` binary, and the
//! benchmark clients of `sluice-peer` ([`clients`]).

pub mod clients;
pub mod common;
pub mod discovery;
pub mod measure;
pub mod procstat;
pub mod redirect;
pub mod report;
pub mod tunnel;
