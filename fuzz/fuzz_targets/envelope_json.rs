//! DSSE's JSON form, as bundles and `warden verify` read it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_proto::{dsse, types};

fuzz_target!(|data: &[u8]| {
    let key = dsse::Signer::from_seed(&[7; 32]).verifying_key();
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(env) = dsse::from_json(&v) {
            let _ = dsse::verify(&env, types::RECORD, &key);
            let _ = dsse::to_json(&env);
        }
    }
});
