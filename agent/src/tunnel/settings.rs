//! HTTP/2 settings for HBONE. Large windows because one CONNECT stream is one
//! bulk TCP flow: with the 64 KiB default a stream stalls on every RTT.

/// Per-stream flow-control window.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Whole-connection flow-control window.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame either side will accept.
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Streams per pooled connection before the pool opens another.
pub const MAX_STREAMS_PER_CONN: u32 = 100;

pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_FRAME as usize)
        .enable_push(false);
    b
}

pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_FRAME as usize)
        .max_concurrent_streams(MAX_STREAMS_PER_CONN);
    b
}
