//! What arrives on the uplink stream: a protobuf Envelope, its Register,
//! a node-signed Record (decoded whatever its signature says, since a key
//! holder can sign anything) and a coordinator Command.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use warden_proto::{dsse::Signer, pb, types};

fuzz_target!(|data: &[u8]| {
    let key = Signer::from_seed(&[7; 32]).verifying_key();
    if let Ok(env) = pb::Envelope::decode(data) {
        let _ = warden_coordinator::verifier::check_register(&env, 1_700_000_000_000, &[7; 32]);
        let _ = warden_proto::dsse::open::<pb::Record>(&env, types::RECORD, &key);
        let _ = warden_proto::dsse::open::<pb::Command>(&env, types::COMMAND, &key);
        let _ = warden_proto::dsse::payload_sha256(&env);
    }
    if let Ok(rec) = pb::Record::decode(data) {
        let _ = warden_coordinator::verifier::node_state(&rec);
    }
    let _ = pb::Attestation::decode(data);
    let _ = pb::LeaseProof::decode(data);
});
