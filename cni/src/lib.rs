//! Sluice's chained CNI plugin, and what it shares with the agent.
//!
//! - `protocol`: the messages between the plugin and the agent's socket.
//! - `client`: the plugin's bounded exchange with the agent.
//! - `spec`: what the CNI specification fixes (versions, codes, results).
//! - `plugin`: the plugin's decision for each command.
//! - `log`: the plugin's decision log.
//! - `install`: putting the plugin into the node's CNI chain.

pub mod client;
pub mod install;
pub mod log;
pub mod plugin;
pub mod protocol;
pub mod spec;
