//! What a node controls in a work challenge: the solver's stdout (parsed by
//! the agent) and the WorkAnswer (decoded and checked by the coordinator
//! against a fixed small challenge).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use warden_proto::{pb, workproof};

fuzz_target!(|data: &[u8]| {
    let _ = workproof::contract::Output::parse(data);
    if let Ok(answer) = pb::WorkAnswer::decode(data) {
        let ch = pb::WorkChallenge {
            node_id: answer.node_id.clone(),
            challenge_id: answer.challenge_id.clone(),
            seed: vec![7; 32],
            gpu_uuid: answer
                .identity
                .as_ref()
                .map(|i| i.uuid.clone())
                .unwrap_or_default(),
            n: 64,
            rounds: 2,
            spot_tiles: 8,
            deadline_unix_ms: i64::MAX,
            ..Default::default()
        };
        let _ = workproof::check(&ch, &answer, 0);
    }
});
