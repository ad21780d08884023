//! Checks of each envelope as it arrives: the stream's Register, then
//! every record and heartbeat against the node's key, the stream's node,
//! the payload caps (`warden_proto::limits`) and the signatures.
//! A record that passes leaves with its signed receipt.

use prost::Message;
use warden_proto::{
    dsse::{self, VerifyError, VerifyingKey},
    limits::{self, RecordKind},
    pb::{self, Envelope, RefusalKind},
    types,
};

use crate::{
    clock::now_ms,
    store::{ChainItem, GpuState, NewRecord, NodeState, Stamped},
};

/// Registrations whose clock is further than this from ours are refused,
/// so an old captured Register cannot be replayed.
const MAX_REGISTER_SKEW_MS: i64 = 5 * 60 * 1000;

/// Why a stream's first envelope is not a Register the coordinator takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("first message must be {register}, got {0}", register = types::REGISTER)]
    NotARegister(String),
    #[error("Register is {0} bytes; this coordinator accepts at most {max}", max = limits::REGISTER)]
    TooLarge(usize),
    #[error("Register does not decode: {0}")]
    Decode(String),
    #[error("Register carries no session nonce: the agent is older than this coordinator, which binds each Register to its stream; upgrade the agent")]
    NoNonce,
    #[error("Register is not for this stream: its session nonce is not the one this stream's Hello gave (a Register is valid only on the stream it answers)")]
    OtherStream,
    #[error("Register: {0}")]
    Key(String),
    #[error("Register names node {named} but its key derives node id {derived}")]
    WrongNode { named: String, derived: String },
    #[error("Register: {0}")]
    Signature(String),
    #[error("Register: the node's [node] labels: {0}")]
    Labels(warden_proto::labels::LabelError),
    #[error("Register is timestamped {0} ms from the coordinator's clock (allowed: {max}); check the node's clock", max = MAX_REGISTER_SKEW_MS)]
    Skew(i64),
}

/// Checks the first envelope of a stream: a Register for this stream (it
/// carries the nonce of the stream's Hello), signed by the key inside it,
/// for the node id that key derives.
pub fn check_register(
    env: &Envelope,
    now_ms: i64,
    nonce: &[u8; 32],
) -> Result<(pb::Register, VerifyingKey), RegisterError> {
    if env.payload_type != types::REGISTER {
        return Err(RegisterError::NotARegister(env.payload_type.clone()));
    }
    if env.payload.len() > limits::REGISTER {
        return Err(RegisterError::TooLarge(env.payload.len()));
    }
    let reg = pb::Register::decode(env.payload.as_slice())
        .map_err(|e| RegisterError::Decode(e.to_string()))?;
    if reg.session_nonce.is_empty() {
        return Err(RegisterError::NoNonce);
    }
    if reg.session_nonce.as_slice() != nonce.as_slice() {
        return Err(RegisterError::OtherStream);
    }
    let key =
        VerifyingKey::from_bytes(&reg.public_key).map_err(|e| RegisterError::Key(e.to_string()))?;
    if reg.node_id != key.key_id() {
        return Err(RegisterError::WrongNode {
            named: reg.node_id,
            derived: key.key_id().to_owned(),
        });
    }
    dsse::verify(env, types::REGISTER, &key)
        .map_err(|e| RegisterError::Signature(e.to_string()))?;
    if let Some(labels) = &reg.labels {
        warden_proto::labels::check(labels).map_err(RegisterError::Labels)?;
    }
    if (reg.time_unix_ms - now_ms).abs() > MAX_REGISTER_SKEW_MS {
        return Err(RegisterError::Skew(reg.time_unix_ms - now_ms));
    }
    Ok((reg, key))
}

/// Checks one node's envelopes after its Register: the node and its key.
pub struct NodeCheck<'a> {
    pub node_id: &'a str,
    pub key: &'a VerifyingKey,
}

/// What one inbound envelope asks of the session: store it (the store
/// signs its receipt), refuse it (and why), or note a heartbeat.
pub enum Inbound {
    Store(Box<NewRecord>),
    Refuse {
        seq: u64,
        digest: [u8; 32],
        kind: RefusalKind,
        reason: String,
    },
    Heartbeat(pb::Heartbeat),
    /// A container's output answering a ContainerLogs command: for whoever
    /// waits on it, never stored.
    Logs(pb::LogChunk),
    /// The answer to a work challenge, signed by the node: to the work gate.
    WorkAnswer(Box<pb::WorkAnswer>),
}

impl NodeCheck<'_> {
    /// `check` of each envelope of a chunk, in order, with the records'
    /// signatures verified as one batch (`dsse::verify_many`: a node
    /// catching up sends its spool in chunks, and a batch costs a fraction
    /// of checking each alone).
    pub fn check_all(&self, envs: &[Envelope]) -> Vec<Inbound> {
        let records: Vec<(&Envelope, &str, &VerifyingKey)> = envs
            .iter()
            .filter(|e| e.payload_type == types::RECORD)
            .map(|e| (e, types::RECORD, self.key))
            .collect();
        let mut verified = dsse::verify_many(&records).into_iter();
        envs.iter()
            .map(|env| {
                let pre = (env.payload_type == types::RECORD)
                    .then(|| verified.next().map(|r| r.map(|_| ())))
                    .flatten();
                self.check_with(env, pre)
            })
            .collect()
    }

    pub fn check(&self, env: &Envelope) -> Inbound {
        self.check_with(env, None)
    }

    /// `verified`: a record's signature check, when already done.
    fn check_with(&self, env: &Envelope, verified: Option<Result<(), VerifyError>>) -> Inbound {
        let digest = dsse::payload_sha256(env);
        if env.payload_type == types::HEARTBEAT && env.payload.len() > limits::HEARTBEAT {
            return Inbound::Refuse {
                seq: 0,
                digest,
                kind: RefusalKind::Malformed,
                reason: OverLimit::TooLarge {
                    what: "heartbeat",
                    size: env.payload.len(),
                    cap: limits::HEARTBEAT,
                }
                .to_string(),
            };
        }
        match env.payload_type.as_str() {
            types::LOGS if env.payload.len() > limits::LOGS => Inbound::Refuse {
                seq: 0,
                digest,
                kind: RefusalKind::Malformed,
                reason: OverLimit::TooLarge {
                    what: "logs",
                    size: env.payload.len(),
                    cap: limits::LOGS,
                }
                .to_string(),
            },
            types::WORK_ANSWER if env.payload.len() > limits::WORK_ANSWER => Inbound::Refuse {
                seq: 0,
                digest,
                kind: RefusalKind::Malformed,
                reason: OverLimit::TooLarge {
                    what: "work answer",
                    size: env.payload.len(),
                    cap: limits::WORK_ANSWER,
                }
                .to_string(),
            },
            types::WORK_ANSWER => {
                match dsse::open::<pb::WorkAnswer>(env, types::WORK_ANSWER, self.key) {
                    Ok(a) if a.node_id == self.node_id => Inbound::WorkAnswer(Box::new(a)),
                    Ok(a) => Inbound::Refuse {
                        seq: 0,
                        digest,
                        kind: RefusalKind::WrongNode,
                        reason: format!(
                            "work answer names node {} but this stream belongs to node {}",
                            a.node_id, self.node_id
                        ),
                    },
                    Err(e) => Inbound::Refuse {
                        seq: 0,
                        digest,
                        kind: RefusalKind::of_verify_error(&e),
                        reason: format!("work answer: {e}"),
                    },
                }
            }
            types::LOGS => match dsse::open::<pb::LogChunk>(env, types::LOGS, self.key) {
                Ok(chunk) => Inbound::Logs(chunk),
                Err(e) => Inbound::Refuse {
                    seq: 0,
                    digest,
                    kind: RefusalKind::of_verify_error(&e),
                    reason: format!("logs: {e}"),
                },
            },
            // Trusted as its stream is, its signature not checked: the
            // Register proved the node's key on this TLS stream (it signs
            // the stream's nonce), and a heartbeat is neither stored nor
            // evidence, only liveness and the spool's state. Heartbeats are
            // two thirds of what a coordinator of idle nodes receives.
            types::HEARTBEAT => match pb::Heartbeat::decode(env.payload.as_slice()) {
                Ok(hb) if hb.node_id.is_empty() || hb.node_id == self.node_id => {
                    Inbound::Heartbeat(hb)
                }
                Ok(hb) => Inbound::Refuse {
                    seq: 0,
                    digest,
                    kind: RefusalKind::WrongNode,
                    reason: format!(
                        "heartbeat names node {} but this stream belongs to node {}",
                        hb.node_id, self.node_id
                    ),
                },
                Err(e) => Inbound::Refuse {
                    seq: 0,
                    digest,
                    kind: RefusalKind::Malformed,
                    reason: format!("heartbeat does not decode: {e}"),
                },
            },
            types::RECORD => {
                // Decoded before verification to name the seq in a refusal
                // and to find the kind's size cap (checked before the signature).
                let claimed = pb::Record::decode(env.payload.as_slice()).ok();
                let claimed_seq = claimed.as_ref().map_or(0, |r| r.seq);
                let refuse = |kind: RefusalKind, reason: String| Inbound::Refuse {
                    seq: claimed_seq,
                    digest,
                    kind,
                    reason,
                };
                let (what, cap) = match &claimed {
                    Some(r) => {
                        let k = RecordKind::of(r);
                        (k.name(), k.max_payload())
                    }
                    None => ("record", limits::RECORD),
                };
                if env.payload.len() > cap {
                    // Final: those bytes will never fit under the cap.
                    return refuse(
                        RefusalKind::Malformed,
                        OverLimit::TooLarge {
                            what,
                            size: env.payload.len(),
                            cap,
                        }
                        .to_string(),
                    );
                }
                let opened = match verified {
                    Some(Ok(())) => pb::Record::decode(env.payload.as_slice()).map_err(|e| {
                        VerifyError::Decode {
                            payload_type: types::RECORD.to_owned(),
                            reason: e.to_string(),
                        }
                    }),
                    Some(Err(e)) => Err(e),
                    None => dsse::open::<pb::Record>(env, types::RECORD, self.key),
                };
                let rec = match opened {
                    Ok(r) => r,
                    Err(e) => return refuse(RefusalKind::of_verify_error(&e), e.to_string()),
                };
                if rec.node_id != self.node_id {
                    return refuse(
                        RefusalKind::WrongNode,
                        format!(
                            "record names node {} but this stream belongs to node {}",
                            rec.node_id, self.node_id
                        ),
                    );
                }
                if rec.seq == 0 {
                    return refuse(RefusalKind::Malformed, "record seq must start at 1".into());
                }
                let sig = env
                    .signatures
                    .iter()
                    .find(|s| s.keyid == self.key.key_id())
                    .map(|s| s.sig.clone())
                    .unwrap_or_default();
                let state = node_state(&rec);
                Inbound::Store(Box::new(NewRecord {
                    node_id: self.node_id.to_owned(),
                    seq: rec.seq,
                    payload_type: env.payload_type.clone(),
                    payload: env.payload.clone(),
                    keyid: self.key.key_id().to_owned(),
                    sig,
                    payload_sha256: digest,
                    received_ms: now_ms(),
                    state,
                }))
            }
            other => Inbound::Refuse {
                seq: 0,
                digest,
                kind: RefusalKind::Malformed,
                reason: format!("unexpected payload type {other}"),
            },
        }
    }
}

/// Refusals for going past a limit, kept apart from the verification
/// refusals: each reason starts with a fixed word ("too large:", "quota:")
/// that says which limit, so a typed refusal kind can be given to them here.
#[derive(Debug, thiserror::Error)]
pub enum OverLimit {
    /// Over the cap for its type (`warden_proto::limits`): never accepted.
    #[error("too large: a {what} payload of {size} bytes is over this coordinator's cap of {cap} bytes for {what}")]
    TooLarge {
        what: &'static str,
        size: usize,
        cap: usize,
    },
    /// The node's storage quota is used up: accepted once it is raised.
    #[error("quota: node {node} has {stored} bytes of records stored, and this record's {size} would pass its quota of {quota} (limits.node_storage_bytes); it stays in the agent's spool")]
    Quota {
        node: String,
        stored: u64,
        size: usize,
        quota: u64,
    },
}

/// What a record says about the node's present state.
pub fn node_state(rec: &pb::Record) -> NodeState {
    match &rec.body {
        Some(pb::record::Body::Telemetry(t)) => NodeState {
            gpus: t
                .gpus
                .iter()
                .map(|g| GpuState {
                    uuid: g.uuid.clone(),
                    index: g.index,
                    sample: g.encode_to_vec(),
                    time_ms: g.time_unix_ms,
                })
                .collect(),
            inventory: None,
            link: t.link.as_ref().map(|l| Stamped {
                bytes: l.encode_to_vec(),
                time_ms: l.time_unix_ms,
            }),
            workload_events: t.workload_events.clone(),
            ..Default::default()
        },
        Some(pb::record::Body::Inventory(i)) => NodeState {
            gpus: Vec::new(),
            inventory: Some(Stamped {
                bytes: i.encode_to_vec(),
                time_ms: rec.time_unix_ms,
            }),
            ..Default::default()
        },
        Some(pb::record::Body::CommandResult(r)) => NodeState {
            results: vec![r.clone()],
            ..Default::default()
        },
        Some(pb::record::Body::Attestation(a)) => NodeState {
            chain: Some(ChainItem::Attestation {
                lease_id: a.lease_id.clone(),
                lease_seq: a.lease_seq,
                prev_sha256: a.prev_sha256.clone(),
            }),
            ..Default::default()
        },
        Some(pb::record::Body::LeaseProof(p)) => NodeState {
            chain: Some(ChainItem::Proof {
                lease_id: p.lease_id.clone(),
            }),
            ..Default::default()
        },
        None => NodeState::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_proto::dsse::Signer;

    const NONCE: [u8; 32] = [7; 32];

    fn register_with(signer: &Signer, node_id: &str, time: i64, nonce: &[u8]) -> Envelope {
        signer.sign_message(
            types::REGISTER,
            &pb::Register {
                node_id: node_id.into(),
                public_key: signer.public_key().to_vec(),
                agent_version: "t".into(),
                inventory: None,
                time_unix_ms: time,
                start_id: "s".into(),
                session_nonce: nonce.to_vec(),
                ..Default::default()
            },
        )
    }

    fn register(signer: &Signer, node_id: &str, time: i64) -> Envelope {
        register_with(signer, node_id, time, &NONCE)
    }

    #[test]
    fn register_must_be_self_signed_for_its_own_node_id() {
        let (a, _) = Signer::generate().unwrap();
        let (b, _) = Signer::generate().unwrap();
        let now = 1_000_000_000;
        assert!(check_register(&register(&a, a.key_id(), now), now, &NONCE).is_ok());
        let err = check_register(&register(&a, b.key_id(), now), now, &NONCE)
            .unwrap_err()
            .to_string();
        assert!(err.contains("derives node id"), "{err}");
        let mut env = register(&a, a.key_id(), now);
        env.payload.push(0);
        assert!(check_register(&env, now, &NONCE).is_err());
        let err = check_register(&register(&a, a.key_id(), now - 3_600_000), now, &NONCE)
            .unwrap_err()
            .to_string();
        assert!(err.contains("clock"), "{err}");
        let hb = a.sign_message(types::HEARTBEAT, &pb::Heartbeat::default());
        assert!(check_register(&hb, now, &NONCE)
            .unwrap_err()
            .to_string()
            .contains("first message"));
    }

    #[test]
    fn register_must_carry_this_streams_nonce() {
        let (a, _) = Signer::generate().unwrap();
        let now = 1_000_000_000;
        // Captured from another stream: signed and fresh, but another nonce.
        let other = register_with(&a, a.key_id(), now, &[8; 32]);
        let err = check_register(&other, now, &NONCE).unwrap_err().to_string();
        assert!(err.contains("not for this stream"), "{err}");
        // From an agent that knows no Hello.
        let old = register_with(&a, a.key_id(), now, &[]);
        let err = check_register(&old, now, &NONCE).unwrap_err().to_string();
        assert!(err.contains("upgrade the agent"), "{err}");
    }

    #[test]
    fn a_refused_register_reads_as_it_did_when_the_reasons_were_strings() {
        assert_eq!(
            RegisterError::NotARegister("x".into()).to_string(),
            format!("first message must be {}, got x", types::REGISTER)
        );
        assert_eq!(
            RegisterError::TooLarge(9).to_string(),
            format!(
                "Register is 9 bytes; this coordinator accepts at most {}",
                limits::REGISTER
            )
        );
        assert_eq!(
            RegisterError::Skew(-7).to_string(),
            format!("Register is timestamped -7 ms from the coordinator's clock (allowed: {MAX_REGISTER_SKEW_MS}); check the node's clock")
        );
    }

    #[test]
    fn an_oversized_register_is_refused_before_anything_else() {
        let (a, _) = Signer::generate().unwrap();
        let mut env = register(&a, a.key_id(), 1);
        env.payload = vec![0; limits::REGISTER + 1];
        let err = check_register(&env, 1, &NONCE).unwrap_err().to_string();
        assert!(err.contains("at most"), "{err}");
    }

    /// What a chunk's checks came to, in a word each.
    fn outcome(i: &Inbound) -> String {
        match i {
            Inbound::Store(r) => format!("store {}", r.seq),
            Inbound::Refuse { seq, kind, .. } => format!("refuse {seq} {}", kind.as_str_name()),
            Inbound::Heartbeat(_) => "heartbeat".into(),
            Inbound::Logs(_) => "logs".into(),
            Inbound::WorkAnswer(a) => format!("work answer {}", a.challenge_id),
        }
    }

    #[test]
    fn a_work_answer_is_taken_only_signed_by_the_node_for_itself_and_under_its_cap() {
        let (node, _) = Signer::generate().unwrap();
        let (other, _) = Signer::generate().unwrap();
        let key = node.verifying_key();
        let check = NodeCheck {
            node_id: node.key_id(),
            key: &key,
        };
        let answer = |n: &str| pb::WorkAnswer {
            node_id: n.into(),
            challenge_id: "wc-1".into(),
            ..Default::default()
        };
        let ours = node.sign_message(types::WORK_ANSWER, &answer(node.key_id()));
        assert_eq!(outcome(&check.check(&ours)), "work answer wc-1");
        let forged = other.sign_message(types::WORK_ANSWER, &answer(node.key_id()));
        assert!(outcome(&check.check(&forged)).starts_with("refuse 0"));
        let theirs = node.sign_message(types::WORK_ANSWER, &answer("someone-else"));
        assert_eq!(
            outcome(&check.check(&theirs)),
            "refuse 0 REFUSAL_KIND_WRONG_NODE"
        );
        let mut big = ours.clone();
        big.payload = vec![0; limits::WORK_ANSWER + 1];
        assert_eq!(
            outcome(&check.check(&big)),
            "refuse 0 REFUSAL_KIND_MALFORMED"
        );
    }

    #[test]
    fn a_chunk_checked_as_one_batch_comes_out_as_each_checked_alone() {
        let (node, _) = Signer::generate().unwrap();
        let (other, _) = Signer::generate().unwrap();
        let key = node.verifying_key();
        let check = NodeCheck {
            node_id: node.key_id(),
            key: &key,
        };
        let record = |by: &Signer, seq| {
            by.sign_message(
                types::RECORD,
                &pb::Record {
                    node_id: node.key_id().into(),
                    seq,
                    ..Default::default()
                },
            )
        };
        let mut tampered = record(&node, 3);
        tampered.payload.push(0);
        let mut forged = record(&other, 4);
        forged.signatures[0].keyid = node.key_id().into();
        let envs = vec![
            record(&node, 1),
            node.sign_message(types::HEARTBEAT, &pb::Heartbeat::default()),
            record(&node, 2),
            tampered,
            forged,
            record(&other, 5),
            record(&node, 6),
        ];
        let batch: Vec<String> = check.check_all(&envs).iter().map(outcome).collect();
        let alone: Vec<String> = envs.iter().map(|e| outcome(&check.check(e))).collect();
        assert_eq!(batch, alone);
        assert_eq!(
            batch,
            [
                "store 1",
                "heartbeat",
                "store 2",
                // Its bytes changed: the seq it claims no longer decodes.
                "refuse 0 REFUSAL_KIND_BAD_SIGNATURE",
                "refuse 4 REFUSAL_KIND_BAD_SIGNATURE",
                "refuse 5 REFUSAL_KIND_WRONG_KEY",
                "store 6"
            ]
        );
    }

    #[test]
    fn a_heartbeat_is_taken_as_its_stream_is_but_never_for_another_node() {
        let (node, _) = Signer::generate().unwrap();
        let key = node.verifying_key();
        let check = NodeCheck {
            node_id: node.key_id(),
            key: &key,
        };
        let hb = |node_id: &str| pb::Heartbeat {
            node_id: node_id.into(),
            ..Default::default()
        };
        // Unsigned: the Register proved the key on this stream.
        let unsigned = Envelope {
            payload_type: types::HEARTBEAT.into(),
            payload: hb(node.key_id()).encode_to_vec(),
            signatures: vec![],
        };
        assert_eq!(outcome(&check.check(&unsigned)), "heartbeat");
        let theirs = node.sign_message(types::HEARTBEAT, &hb("someone-else"));
        assert_eq!(
            outcome(&check.check(&theirs)),
            "refuse 0 REFUSAL_KIND_WRONG_NODE"
        );
        let garbage = Envelope {
            payload_type: types::HEARTBEAT.into(),
            payload: vec![0xff; 8],
            signatures: vec![],
        };
        assert_eq!(
            outcome(&check.check(&garbage)),
            "refuse 0 REFUSAL_KIND_MALFORMED"
        );
    }
}
