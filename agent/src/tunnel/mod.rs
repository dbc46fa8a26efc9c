//! HBONE: TCP connections carried as HTTP/2 CONNECT streams over mutual TLS
//! on port 15008. The wire details follow ztunnel so the two can interoperate.
//!
//! - `settings`: HTTP/2 windows and limits shared by both ends.
//! - `copy`: moves bytes between a TCP socket and one CONNECT stream.
//! - `client`: opens CONNECT streams on one HTTP/2 connection.
//! - `pool`: shares connections per (source id, destination id, address).
//! - `server`: the 15008 side: validates CONNECT, authorizes, dials the app.

pub mod client;
pub mod copy;
pub mod pool;
pub mod server;
pub mod settings;

pub use copy::{copy_bidirectional, CopyResult};

#[cfg(test)]
mod tests;

pub use crate::redirect::HBONE_PORT;
