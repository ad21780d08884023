//! A lease bundle, parsed and verified as `warden verify` does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_proto::{bundle::Bundle, chain::Params};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(b) = Bundle::from_json(&v) {
            let _ = b.verify(&Params::default());
        }
    }
});
