//! HTTP/2 settings for HBONE. Large windows because one CONNECT stream is one
//! bulk TCP flow: with the 64 KiB default a stream stalls on every RTT.
//!
//! The server's limits and deadlines are what keeps one hostile peer on
//! 15008 from holding the agent's memory, descriptors or tasks for ever
//! (`tests/tests/hostile_hbone.rs` tries each); the values follow ztunnel's.

use std::time::Duration;

/// Per-stream flow-control window.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Whole-connection flow-control window.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame either side will accept.
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Streams per pooled connection before the pool opens another, and the
/// most a peer may have open at once on one connection to 15008: h2 refuses
/// the next with RST_STREAM(REFUSED_STREAM). ztunnel's server allows 200
/// (hyper's default) and its pool opens 100; nothing legitimate sends more
/// than a pool does, so the server holds to the pool's figure.
pub const MAX_STREAMS_PER_CONN: u32 = 100;
/// Largest decoded request header list the server takes, as ztunnel: a
/// CONNECT carries a handful of short headers, and h2's default (16 MiB)
/// let one stream make the agent buffer and decode megabytes. Over it, h2
/// answers 431 and the request never reaches the handler.
pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Largest response header list the client takes (ztunnel: 16 KiB); a 200
/// or an error status is all a peer has to say.
pub const CLIENT_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// How long the server waits for the HTTP/2 preface once TLS is done. The
/// TLS accept has its own deadline; without this one a client that finished
/// TLS and then said nothing held its socket and task for ever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The server PINGs each connection this often (the first after one
/// interval) and closes it when a PING goes unanswered for
/// [`PING_TIMEOUT`]: ztunnel's 10 s and 20 s. That bounds dead peers and
/// slowloris ones alike: a peer stuck half-way through a header block
/// cannot answer (any frame but CONTINUATION is then a protocol error), nor
/// can one that sends nothing at all. A peer that answers keeps an idle
/// connection, as a pool does between streams.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may go unanswered; see [`PING_INTERVAL`].
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);

pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_FRAME as usize)
        .max_header_list_size(CLIENT_MAX_HEADER_LIST_SIZE)
        .enable_push(false);
    b
}

pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_FRAME as usize)
        .max_concurrent_streams(MAX_STREAMS_PER_CONN)
        .max_header_list_size(MAX_HEADER_LIST_SIZE);
    b
}
