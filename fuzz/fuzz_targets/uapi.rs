//! WireGuard's cross-platform UAPI text, as `wg set` writes it to the mesh socket.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = warden_agent::mesh::uapi::parse_request(text);
    }
});
