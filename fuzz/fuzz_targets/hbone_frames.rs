//! HBONE on 15008, raw: after the TLS handshake the server reads HTTP/2
//! from a pod it does not trust. The input's first byte is flags (see
//! `sluice_fuzz::run_frames`), the rest is sent as-is after the client
//! preface to the real `serve_connection`. It must never panic, never stop
//! reading, and end within seconds of the client closing.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (flags, frames) = sluice_fuzz::flags_and_rest(data);
    sluice_fuzz::run_frames(flags, frames);
});
