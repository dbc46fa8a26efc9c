//! Sluice's chained CNI plugin, and what it shares with the agent.
//!
//! - `protocol`: the messages between the plugin and the agent's socket.

pub mod protocol;
