//! HBONE request validation, structure-aware: requests written as text
//! (`METHOD URI`, header lines, a blank line, the body; `%%` between
//! requests; see `sluice_fuzz::RequestSpec`) are sent by the h2 client to
//! the real `serve_connection`. Each answer must be the one the server's
//! rules give (400 for anything but CONNECT to this connection's own
//! address, then the handler's 200/401/503), and on 200 the body must come
//! back byte for byte through the tunnel. The first byte is flags (bit 0:
//! the connection arrived on IPv6, fd00::2, instead of 10.0.0.2), then an
//! optional newline: the seeds start with a line `0` or `1`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (flags, rest) = sluice_fuzz::flags_and_rest(data);
    let rest = rest.strip_prefix(b"\n").unwrap_or(rest);
    let specs = sluice_fuzz::parse_requests(rest);
    sluice_fuzz::run_requests(&specs, flags & 1 != 0);
});
