//! A lease bundle, parsed and verified as `warden verify` does (pinned,
//! self-asserted and untrusted).
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_proto::{
    bundle::{Bundle, Trust},
    chain::Params,
    dsse::Signer,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(b) = Bundle::from_json(&v) {
            let pinned = Trust {
                coordinator_key: Some(Signer::from_seed(&[42; 32]).verifying_key()),
                ..Default::default()
            };
            let _ = b.verify(&pinned, &Params::default());
            let _ = b.verify(
                &Trust {
                    self_asserted: true,
                    ..Default::default()
                },
                &Params::default(),
            );
            let _ = b.to_json();
        }
    }
});
