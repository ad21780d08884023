//! A hostile or broken sender: envelopes altered after signing, or signed
//! by a key the stream did not register, reach a real coordinator over
//! TLS. They must be refused with a reason, and nothing stored for them.

mod common;

use std::time::Duration;

use common::*;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use warden_proto::{
    dsse::{self, Signer, VerifyingKey},
    pb::{self, uplink_client::UplinkClient, Envelope},
    types,
};

fn record(signer: &Signer, seq: u64, load: f64) -> Envelope {
    signer.sign_message(
        types::RECORD,
        &pb::Record {
            node_id: signer.key_id().to_owned(),
            seq,
            time_unix_ms: warden_agent::now_ms(),
            start_id: "test".into(),
            body: Some(pb::record::Body::Telemetry(pb::Telemetry {
                host: Some(pb::HostSample {
                    load1: load,
                    ..Default::default()
                }),
                ..Default::default()
            })),
        },
    )
}

/// Opens a stream and registers `node` on it: the coordinator's Hello, a
/// Register carrying its nonce, Registered.
async fn registered(
    channel: tonic::transport::Channel,
    node: &Signer,
    max_encoding: usize,
) -> (
    tokio::sync::mpsc::Sender<Envelope>,
    tonic::Streaming<Envelope>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut inbound = UplinkClient::new(channel)
        .max_encoding_message_size(max_encoding)
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let nonce = hello(&mut inbound).await;
    tx.send(node.sign_message(
        types::REGISTER,
        &pb::Register {
            node_id: node.key_id().to_owned(),
            public_key: node.public_key().to_vec(),
            agent_version: "test".into(),
            inventory: None,
            time_unix_ms: warden_agent::now_ms(),
            start_id: "test".into(),
            session_nonce: nonce,
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    let answer = inbound.message().await.unwrap().unwrap();
    assert_eq!(answer.payload_type, types::REGISTERED);
    (tx, inbound)
}

/// The nonce of a new stream's Hello.
async fn hello(inbound: &mut tonic::Streaming<Envelope>) -> Vec<u8> {
    let env = inbound.message().await.unwrap().unwrap();
    assert_eq!(env.payload_type, types::HELLO);
    pb::Hello::decode(env.payload.as_slice()).unwrap().nonce
}

enum Reply {
    Receipt(pb::Receipt),
    Refusal(pb::Refusal),
}

async fn next(inbound: &mut tonic::Streaming<Envelope>, coordinator: &VerifyingKey) -> Reply {
    let env = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("a reply within 10 s")
        .unwrap()
        .unwrap();
    match env.payload_type.as_str() {
        types::RECEIPT => Reply::Receipt(dsse::open(&env, types::RECEIPT, coordinator).unwrap()),
        types::REFUSAL => Reply::Refusal(dsse::open(&env, types::REFUSAL, coordinator).unwrap()),
        other => panic!("unexpected {other}"),
    }
}

/// The coordinator's first message on an accepted stream: its Welcome.
async fn welcome(
    inbound: &mut tonic::Streaming<Envelope>,
    coordinator: &VerifyingKey,
) -> pb::Welcome {
    let env = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("a welcome within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(env.payload_type, types::WELCOME);
    dsse::open(&env, types::WELCOME, coordinator).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_foreign_records_are_refused_and_not_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let coordinator_key = VerifyingKey::parse(&coord.public_key()).unwrap();
    let ca = std::fs::read(coord.dir.join("tls/ca.pem")).unwrap();
    let channel = Endpoint::from_shared(format!("https://localhost:{}", coord.port))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (node, _) = Signer::generate().unwrap();
    let (stranger, _) = Signer::generate().unwrap();
    let (tx, mut inbound) = registered(channel, &node, 4 << 20).await;
    let w = welcome(&mut inbound, &coordinator_key).await;
    assert_eq!((w.node_id.as_str(), w.last_seq), (node.key_id(), 0));

    // 1: a good record is stored and receipted with its digest.
    let good1 = record(&node, 1, 1.0);
    tx.send(good1.clone()).await.unwrap();
    match next(&mut inbound, &coordinator_key).await {
        Reply::Receipt(r) => {
            assert_eq!(r.seq, 1);
            assert_eq!(r.node_id, node.key_id());
            assert_eq!(r.payload_sha256, dsse::payload_sha256(&good1).to_vec());
        }
        Reply::Refusal(r) => panic!("refused: {}", r.reason),
    }

    // 2: one payload bit flipped after signing, as a tampering proxy would.
    let good2 = record(&node, 2, 2.0);
    let mut bad2 = good2.clone();
    let last = bad2.payload.len() - 1;
    bad2.payload[last] ^= 0x01;
    tx.send(bad2).await.unwrap();
    match next(&mut inbound, &coordinator_key).await {
        Reply::Refusal(r) => {
            assert_eq!(r.seq, 2);
            assert!(r.reason.contains("does not verify"), "{}", r.reason);
            assert_eq!(r.kind(), pb::RefusalKind::BadSignature);
        }
        Reply::Receipt(_) => panic!("a tampered record was receipted"),
    }
    assert_eq!(
        record_stats(&coord.db()).0,
        1,
        "the tampered record was stored"
    );

    // 3: a record signed by a key this stream did not register.
    let mut foreign = record(&stranger, 3, 3.0);
    foreign.payload = {
        let mut r = pb::Record::decode(foreign.payload.as_slice()).unwrap();
        r.node_id = node.key_id().to_owned();
        r.encode_to_vec()
    };
    let foreign = stranger.sign(types::RECORD, foreign.payload);
    tx.send(foreign).await.unwrap();
    match next(&mut inbound, &coordinator_key).await {
        Reply::Refusal(r) => {
            assert_eq!(r.seq, 3);
            assert!(r.reason.contains(stranger.key_id()), "{}", r.reason);
            assert_eq!(r.kind(), pb::RefusalKind::WrongKey);
        }
        Reply::Receipt(_) => panic!("a record signed by an unknown key was receipted"),
    }

    // The sender keeps the record and sends it again intact: now it is stored.
    tx.send(good2.clone()).await.unwrap();
    assert!(matches!(next(&mut inbound, &coordinator_key).await, Reply::Receipt(r) if r.seq == 2));
    // A replay is receipted again but stored once.
    tx.send(good1.clone()).await.unwrap();
    assert!(matches!(next(&mut inbound, &coordinator_key).await, Reply::Receipt(r) if r.seq == 1));
    // The same seq with other content is a conflict.
    tx.send(record(&node, 1, 9.0)).await.unwrap();
    match next(&mut inbound, &coordinator_key).await {
        Reply::Refusal(r) => {
            assert!(r.reason.contains("different content"), "{}", r.reason);
            assert_eq!(r.kind(), pb::RefusalKind::Conflict);
        }
        Reply::Receipt(_) => panic!("a conflicting record was receipted"),
    }

    let (n, _, min, max) = record_stats(&coord.db());
    assert_eq!((n, min, max), (2, 1, 2));
    // A new stream of the same node is told where its stored records end.
    let (_tx2, mut again) = registered(tls_channel(&coord).await, &node, 4 << 20).await;
    assert_eq!(welcome(&mut again, &coordinator_key).await.last_seq, 2);
    let conn = rusqlite::Connection::open(coord.db()).unwrap();
    let stored: Vec<u8> = conn
        .query_row(
            "SELECT payload FROM records WHERE node_id = ?1 AND seq = 2",
            [node.key_id()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        stored, good2.payload,
        "the stored bytes are the signed bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_not_signed_by_its_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let ca = std::fs::read(coord.dir.join("tls/ca.pem")).unwrap();
    let channel = Endpoint::from_shared(format!("https://localhost:{}", coord.port))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (node, _) = Signer::generate().unwrap();
    let (other, _) = Signer::generate().unwrap();
    // Claims node's key and id but is signed by another key.
    let payload = pb::Register {
        node_id: node.key_id().to_owned(),
        public_key: node.public_key().to_vec(),
        agent_version: "test".into(),
        inventory: None,
        time_unix_ms: warden_agent::now_ms(),
        start_id: "x".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut inbound = UplinkClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut register = pb::Register::decode(payload.as_slice()).unwrap();
    register.session_nonce = hello(&mut inbound).await;
    let mut env = other.sign(types::REGISTER, register.encode_to_vec());
    env.signatures[0].keyid = node.key_id().to_owned();
    tx.send(env).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("Register"), "{}", err.message());
    assert_eq!(count(&coord.db(), "SELECT count(*) FROM nodes"), 0);
}

async fn tls_channel(coord: &Coordinator) -> tonic::transport::Channel {
    let ca = std::fs::read(coord.dir.join("tls/ca.pem")).unwrap();
    Endpoint::from_shared(format!("https://localhost:{}", coord.port))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Asks reflection version `$v` (`v1` or `v1alpha`) over `$channel` for
/// its service list and for the file defining warden.v1.Admin: the names,
/// and whether Admin was found.
macro_rules! reflect {
    ($v:ident, $channel:expr) => {{
        use tonic_reflection::pb::$v::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let ask = |m| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        };
        let mut replies = ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::iter(vec![
                ask(MessageRequest::ListServices(String::new())),
                ask(MessageRequest::FileContainingSymbol(
                    "warden.v1.Admin".into(),
                )),
            ]))
            .await
            .unwrap()
            .into_inner();
        let reply = replies.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("unexpected reflection reply {reply:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        // tonic-reflection ends the stream with NOT_FOUND for an unknown
        // symbol; other servers answer with an ErrorResponse.
        let admin_found = match replies.message().await {
            Err(s) if s.code() == tonic::Code::NotFound => false,
            Ok(Some(r)) => !matches!(r.message_response, Some(MessageResponse::ErrorResponse(_))),
            other => panic!("unexpected reflection reply {other:?}"),
        };
        (names, admin_found)
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served_over_tls() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let channel = tls_channel(&coord).await;

    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "warden.v1.Uplink".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    // Both versions (grpcurl, grpcui, Postman and Python still ask
    // v1alpha) list what is callable here, and neither lists nor describes
    // Admin, which only the unix socket serves.
    let mut expected = vec![
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "warden.v1.LinkProbe",
        "warden.v1.Uplink",
    ];
    expected.sort();
    for (version, (mut names, admin_found)) in [
        ("v1", reflect!(v1, channel.clone())),
        ("v1alpha", reflect!(v1alpha, channel.clone())),
    ] {
        names.sort();
        assert_eq!(names, expected, "reflection {version}");
        assert!(
            !admin_found,
            "reflection {version} describes warden.v1.Admin"
        );
    }

    // The admin socket's lists and describes Admin, in both versions.
    let admin = warden_coordinator::admin::channel(&coord.admin_socket())
        .await
        .unwrap();
    for (version, (names, admin_found)) in [
        ("v1", reflect!(v1, admin.clone())),
        ("v1alpha", reflect!(v1alpha, admin.clone())),
    ] {
        assert!(
            names.iter().any(|n| n == "warden.v1.Admin"),
            "admin socket reflection {version}: {names:?}"
        );
        assert!(admin_found, "admin socket reflection {version}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_envelope_is_rejected_and_nothing_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let channel = tls_channel(&coord).await;
    let (node, _) = Signer::generate().unwrap();
    let (tx, mut inbound) = registered(channel, &node, 64 << 20).await;
    let coordinator_key = VerifyingKey::parse(&coord.public_key()).unwrap();
    welcome(&mut inbound, &coordinator_key).await;
    tx.send(node.sign(types::RECORD, vec![0x42; 6 << 20]))
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    assert_eq!(record_stats(&coord.db()).0, 0);
}
