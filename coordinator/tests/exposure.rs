//! A coordinator facing strangers: each test attacks a real coordinator
//! (in process, real TLS on loopback, real SQLite) through the gRPC API
//! an agent uses, playing the agent by hand so it can misbehave.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
    Code, Streaming,
};
use warden_coordinator::{
    config::{EnrollmentConfig, EnrollmentPolicy, LimitsConfig},
    enrollment, CoordinatorConfig, Running,
};
use warden_proto::{
    dsse::Signer,
    pb::{self, uplink_client::UplinkClient, Envelope},
    types,
};

const WAIT: Duration = Duration::from_secs(30);

struct Coord {
    running: Running,
    ca: Vec<u8>,
    shutdown: CancellationToken,
    _tmp: tempfile::TempDir,
}

impl Drop for Coord {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn coordinator(enrollment: EnrollmentConfig, limits: LimitsConfig) -> Coord {
    let tmp = tempfile::tempdir().unwrap();
    let tls = warden_coordinator::devtls::ensure(&tmp.path().join("tls")).unwrap();
    let shutdown = CancellationToken::new();
    let running = warden_coordinator::start(
        &CoordinatorConfig {
            state_dir: tmp.path().join("coordinator"),
            listen: ([127, 0, 0, 1], 0).into(),
            enrollment,
            limits,
            ..Default::default()
        },
        tls.server,
        shutdown.clone(),
    )
    .await
    .unwrap();
    Coord {
        ca: std::fs::read(&tls.ca_cert).unwrap(),
        running,
        shutdown,
        _tmp: tmp,
    }
}

fn open_policy() -> EnrollmentConfig {
    EnrollmentConfig {
        policy: Some(EnrollmentPolicy::Open),
        ..Default::default()
    }
}

impl Coord {
    /// A new TLS connection to the agents' endpoint.
    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("https://localhost:{}", self.running.addr.port()))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&self.ca))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn db(&self) -> PathBuf {
        PathBuf::from(&self.running.database)
    }
}

/// One Uplink stream, played by hand.
struct Stream {
    tx: mpsc::Sender<Envelope>,
    rx: Streaming<Envelope>,
    nonce: Vec<u8>,
}

impl Stream {
    /// Opens a stream and reads the coordinator's Hello.
    async fn open(ch: &Channel) -> Stream {
        let (tx, out) = mpsc::channel(4096);
        let mut rx = UplinkClient::new(ch.clone())
            .max_encoding_message_size(16 << 20)
            .session(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
        let hello = next(&mut rx).await.expect("a Hello");
        assert_eq!(hello.payload_type, types::HELLO);
        let nonce = pb::Hello::decode(hello.payload.as_slice()).unwrap().nonce;
        assert_eq!(nonce.len(), 32);
        Stream { tx, rx, nonce }
    }

    async fn send(&self, env: Envelope) {
        self.tx.send(env).await.unwrap();
    }

    /// Sends `reg` and returns the answer: Registered (and the Welcome
    /// that follows it), or the status the stream ended with.
    async fn register(&mut self, reg: Envelope) -> Result<(), tonic::Status> {
        self.send(reg).await;
        let env = next(&mut self.rx).await?;
        assert_eq!(env.payload_type, types::REGISTERED);
        let env = next(&mut self.rx).await?;
        assert_eq!(env.payload_type, types::WELCOME);
        Ok(())
    }

    async fn next(&mut self) -> Result<Envelope, tonic::Status> {
        next(&mut self.rx).await
    }
}

async fn next(rx: &mut Streaming<Envelope>) -> Result<Envelope, tonic::Status> {
    match tokio::time::timeout(WAIT, rx.message()).await {
        Ok(Ok(Some(env))) => Ok(env),
        Ok(Ok(None)) => Err(tonic::Status::cancelled("stream ended")),
        Ok(Err(s)) => Err(s),
        Err(_) => panic!("nothing from the coordinator in {WAIT:?}"),
    }
}

fn register(node: &Signer, nonce: &[u8], token: &str) -> Envelope {
    node.sign_message(
        types::REGISTER,
        &pb::Register {
            node_id: node.key_id().to_owned(),
            public_key: node.public_key().to_vec(),
            agent_version: "test".into(),
            time_unix_ms: warden_coordinator::clock::now_ms(),
            start_id: "s".into(),
            session_nonce: nonce.to_vec(),
            join_token: token.into(),
            ..Default::default()
        },
    )
}

fn record(node: &Signer, seq: u64, body: pb::record::Body) -> Envelope {
    node.sign_message(
        types::RECORD,
        &pb::Record {
            node_id: node.key_id().to_owned(),
            seq,
            time_unix_ms: warden_coordinator::clock::now_ms(),
            start_id: "s".into(),
            body: Some(body),
        },
    )
}

fn telemetry(pad: usize) -> pb::record::Body {
    pb::record::Body::Telemetry(pb::Telemetry {
        gpu_events: vec![pb::GpuEvent {
            detail: "x".repeat(pad),
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn signer() -> Signer {
    Signer::generate().unwrap().0
}

/// The seqs a Receipt, Receipts or Refusal is about, each with the
/// refusal's reason.
fn answers(env: &Envelope) -> Vec<(u64, Option<String>)> {
    if env.payload_type == types::RECEIPTS {
        let set = pb::Receipts::decode(env.payload.as_slice()).unwrap();
        return set.receipts.iter().map(|r| (r.seq, None)).collect();
    }
    vec![answer(env)]
}

/// The seq a Receipt or Refusal is about, and the refusal's reason.
fn answer(env: &Envelope) -> (u64, Option<String>) {
    match env.payload_type.as_str() {
        types::RECEIPT => (
            pb::Receipt::decode(env.payload.as_slice()).unwrap().seq,
            None,
        ),
        types::REFUSAL => {
            let r = pb::Refusal::decode(env.payload.as_slice()).unwrap();
            (r.seq, Some(r.reason))
        }
        other => panic!("expected a receipt or refusal, got {other}"),
    }
}

/// A node registered on a fresh connection.
async fn registered(c: &Coord, node: &Signer) -> Stream {
    let mut s = Stream::open(&c.channel().await).await;
    let reg = register(node, &s.nonce, "");
    s.register(reg).await.unwrap();
    s
}

#[tokio::test]
async fn a_register_replayed_on_another_stream_is_refused_and_the_node_keeps_its_commands() {
    let c = coordinator(open_policy(), LimitsConfig::default()).await;
    let node = signer();
    let mut first = Stream::open(&c.channel().await).await;
    let captured = register(&node, &first.nonce, "");
    first.register(captured.clone()).await.unwrap();

    // Someone who captured that (signed, fresh) Register replays it on a
    // stream of their own.
    let mut other = Stream::open(&c.channel().await).await;
    assert_ne!(other.nonce, first.nonce, "each stream gets its own nonce");
    let refused = other.register(captured).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("not for this stream"),
        "{refused:?}"
    );

    // Commands still go to the first stream, which answers them.
    let mut admin = warden_coordinator::admin::connect(&c.running.admin_socket)
        .await
        .unwrap();
    let node_id = node.key_id().to_owned();
    let lease = tokio::spawn(async move {
        admin
            .start_lease(pb::StartLeaseRequest {
                node_id,
                all_gpus: true,
                timeout_seconds: 30,
                ..Default::default()
            })
            .await
    });
    let cmd = first.next().await.unwrap();
    assert_eq!(cmd.payload_type, types::COMMAND);
    let cmd = pb::Command::decode(cmd.payload.as_slice()).unwrap();
    first
        .send(record(
            &node,
            1,
            pb::record::Body::CommandResult(pb::CommandResult {
                command_id: cmd.command_id,
                lease_id: String::new(),
                ok: true,
                ..Default::default()
            }),
        ))
        .await;
    let info = lease
        .await
        .unwrap()
        .expect("the lease started")
        .into_inner();
    assert_eq!(info.node_id, node.key_id());
}

#[tokio::test]
async fn the_token_policy_lets_in_only_nodes_with_a_listed_token_or_on_the_allowlist() {
    let (token, sha) = enrollment::new_token();
    let listed = signer();
    let c = coordinator(
        EnrollmentConfig {
            policy: Some(EnrollmentPolicy::Token),
            join_token_sha256: vec![sha],
            allow: vec![listed.key_id().to_owned()],
            ..Default::default()
        },
        LimitsConfig::default(),
    )
    .await;
    let ch = c.channel().await;
    let node = signer();
    let attempt = |token: &'static str| {
        let (ch, node) = (ch.clone(), &node);
        async move {
            let mut s = Stream::open(&ch).await;
            let reg = register(node, &s.nonce, token);
            s.register(reg).await
        }
    };
    let e = attempt("").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("coordinator.join_token"), "{e:?}");
    let e = attempt("not-the-token").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("not one this coordinator accepts"),
        "{e:?}"
    );
    // With the token it enrolls; afterwards it needs the token no more.
    let token: &'static str = Box::leak(token.into_boxed_str());
    attempt(token).await.unwrap();
    attempt("").await.unwrap();
    // Listed nodes need none.
    let mut s = Stream::open(&ch).await;
    let reg = register(&listed, &s.nonce, "");
    s.register(reg).await.unwrap();
}

#[tokio::test]
async fn the_allowlist_policy_refuses_unlisted_nodes_naming_the_key() {
    let listed = signer();
    let c = coordinator(
        EnrollmentConfig {
            policy: Some(EnrollmentPolicy::Allowlist),
            allow: vec![listed.key_id().to_owned()],
            ..Default::default()
        },
        LimitsConfig::default(),
    )
    .await;
    let stranger = signer();
    let mut s = Stream::open(&c.channel().await).await;
    let reg = register(&stranger, &s.nonce, "any");
    let e = s.register(reg).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("enrollment.allow") && e.message().contains(stranger.key_id()),
        "{e:?}"
    );
    registered(&c, &listed).await;
    // Nothing of the stranger was stored.
    let conn = rusqlite_count(&c.db(), stranger.key_id());
    assert_eq!(conn, 0);
}

fn rusqlite_count(db: &std::path::Path, node: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT count(*) FROM nodes WHERE node_id = ?1",
        [node],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test]
async fn new_nodes_from_one_address_are_rate_limited_and_known_ones_are_not() {
    let c = coordinator(
        EnrollmentConfig {
            new_nodes_per_minute_per_ip: 3,
            ..open_policy()
        },
        LimitsConfig::default(),
    )
    .await;
    let nodes: Vec<Signer> = (0..4).map(|_| signer()).collect();
    for n in &nodes[..3] {
        registered(&c, n).await;
    }
    let mut s = Stream::open(&c.channel().await).await;
    let reg = register(&nodes[3], &s.nonce, "");
    let e = s.register(reg).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("127.0.0.1") && e.message().contains("retry in"),
        "{e:?}"
    );
    // A node already enrolled comes back whatever the rate.
    registered(&c, &nodes[0]).await;
}

#[tokio::test]
async fn oversized_payloads_are_refused_per_type_with_the_cap() {
    let c = coordinator(open_policy(), LimitsConfig::default()).await;
    let node = signer();
    let mut s = registered(&c, &node).await;
    // 600 KiB of telemetry: over its 512 KiB cap, far under the transport's 4 MiB.
    s.send(record(&node, 1, telemetry(600 << 10))).await;
    let (seq, why) = answer(&s.next().await.unwrap());
    let why = why.expect("refused");
    assert_eq!(seq, 1);
    assert!(
        why.starts_with("too large:") && why.contains("telemetry") && why.contains("524288"),
        "{why}"
    );
    // An inventory's cap is lower still.
    let inv = pb::record::Body::Inventory(pb::InventorySummary {
        cpu_model: "x".repeat(200 << 10),
        ..Default::default()
    });
    s.send(record(&node, 1, inv)).await;
    let (_, why) = answer(&s.next().await.unwrap());
    assert!(
        why.as_deref().unwrap_or("").contains("inventory"),
        "{why:?}"
    );
    // A heartbeat stuffed to 8 KiB.
    s.send(node.sign_message(
        types::HEARTBEAT,
        &pb::Heartbeat {
            node_id: "y".repeat(8 << 10),
            ..Default::default()
        },
    ))
    .await;
    let (_, why) = answer(&s.next().await.unwrap());
    assert!(
        why.as_deref().unwrap_or("").contains("heartbeat"),
        "{why:?}"
    );
    // A telemetry record of a normal size goes in, and nothing refused was stored.
    s.send(record(&node, 1, telemetry(2000))).await;
    assert_eq!(answer(&s.next().await.unwrap()), (1, None));
    let conn = rusqlite::Connection::open(c.db()).unwrap();
    let bytes: i64 = conn
        .query_row("SELECT sum(length(payload)) FROM records", [], |r| r.get(0))
        .unwrap();
    assert!(bytes < 4000, "{bytes}");
}

#[tokio::test]
async fn a_node_over_its_storage_quota_is_refused_and_others_are_not() {
    let c = coordinator(
        open_policy(),
        LimitsConfig {
            node_storage_bytes: 20_000,
            ..Default::default()
        },
    )
    .await;
    let hog = signer();
    let mut s = registered(&c, &hog).await;
    let mut first_refused = None;
    for seq in 1..=30 {
        s.send(record(&hog, seq, telemetry(1000))).await;
        if let (n, Some(why)) = answer(&s.next().await.unwrap()) {
            assert!(why.starts_with("quota:"), "{why}");
            assert!(why.contains("limits.node_storage_bytes"), "{why}");
            first_refused.get_or_insert(n);
        }
    }
    let first = first_refused.expect("the quota never bit");
    assert!((15..=20).contains(&first), "refused from seq {first}");
    // Another node stores as before.
    let other = signer();
    let mut o = registered(&c, &other).await;
    o.send(record(&other, 1, telemetry(1000))).await;
    assert_eq!(answer(&o.next().await.unwrap()), (1, None));
}

#[tokio::test]
async fn a_node_over_its_rate_is_slowed_and_another_is_not() {
    // 20 envelopes/s, so a burst of 100; 300 records need 10 s at least.
    let c = coordinator(
        open_policy(),
        LimitsConfig {
            node_envelopes_per_second: 20,
            ..Default::default()
        },
    )
    .await;
    let fast = signer();
    let mut s = registered(&c, &fast).await;
    let started = Instant::now();
    for seq in 1..=300 {
        s.send(record(&fast, seq, telemetry(10))).await;
    }
    let fast_done = Arc::new(std::sync::Mutex::new(None));
    let done = fast_done.clone();
    let flood = tokio::spawn(async move {
        // Records read together are receipted together (a Receipts).
        let mut got = 0;
        while got < 300 {
            for (_, why) in answers(&s.next().await.unwrap()) {
                assert_eq!(why, None, "refused");
                got += 1;
            }
        }
        *done.lock().unwrap() = Some(Instant::now());
    });
    // Meanwhile another node's records are receipted at once.
    let calm = signer();
    let mut o = registered(&c, &calm).await;
    for seq in 1..=10 {
        o.send(record(&calm, seq, telemetry(10))).await;
    }
    let mut got = 0;
    while got < 10 {
        for (_, why) in answers(&o.next().await.unwrap()) {
            assert_eq!(why, None);
            got += 1;
        }
    }
    assert!(
        fast_done.lock().unwrap().is_none(),
        "the throttled node finished before the other's 10 records"
    );
    flood.await.unwrap();
    let took = fast_done.lock().unwrap().unwrap() - started;
    assert!(
        took >= Duration::from_millis(9_900),
        "300 records at 20/s after a burst of 100 took only {took:?}"
    );
}
