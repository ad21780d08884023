//! Figures for a coordinator facing strangers, with its default limits.
//! Run with `cargo bench --bench coordnet`; prints numbers, asserts nothing.
//!
//! 1. Connections: idle TLS connections opened from 64 loopback addresses
//!    until the coordinator refuses one; how many it held, its descriptors,
//!    memory and CPU while holding them, how fast a refused one is closed.
//! 2. Enrollment: fresh identities registered as fast as possible for 20 s,
//!    from one address and from 32.
//! 3. The per-type payload caps.
//! 4. Bytes: one node sending records at its kind's cap for 20 s.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use prost::Message;
use tokio::{io::AsyncReadExt, net::TcpSocket, sync::mpsc};
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, ServerName},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use warden_proto::{
    dsse::Signer,
    limits::{self, RecordKind},
    pb::{self, uplink_client::UplinkClient, Envelope},
    types,
};

mod common;

fn main() {
    common::raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(connections());
    rt.block_on(enrollment());
    caps();
    rt.block_on(bytes());
}

fn tls(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

async fn connections() {
    let tmp = tempfile::tempdir().unwrap();
    // Default limits, but no idle deadline while the bench fills the table.
    let (coord, port, ca) =
        common::dev_coordinator(tmp.path(), "[limits]\nidle_timeout = \"1h\"\n");
    let pid = coord.0.id();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let connector = tokio_rustls::TlsConnector::from(tls(&ca));
    let held = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let refused = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..64u8 {
        let (connector, held, refused) = (connector.clone(), held.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            while !refused.load(Ordering::Relaxed) {
                let s = TcpSocket::new_v4().unwrap();
                s.bind(SocketAddr::from(([127, 0, 3, 1 + t], 0))).unwrap();
                let Ok(tcp) = s.connect(addr).await else {
                    refused.store(true, Ordering::Relaxed);
                    return;
                };
                match connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await
                {
                    Ok(c) => held.lock().await.push(c),
                    Err(_) => refused.store(true, Ordering::Relaxed),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = held.lock().await.len();
    let fill = started.elapsed();
    let (ticks0, rss) = common::proc_figures(pid);
    // Refused ones: how fast they are closed, and what refusing costs.
    let mut closes = Vec::new();
    for i in 0..1000u32 {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from(([127, 0, 4, 1 + (i % 200) as u8], 0)))
            .unwrap();
        let t = Instant::now();
        if let Ok(mut tcp) = s.connect(addr).await {
            let mut b = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut b)).await;
            closes.push(t.elapsed());
        }
    }
    closes.sort();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (ticks1, _) = common::proc_figures(pid);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    println!(
        "coordnet/connections: held {n} idle TLS connections (filled in {:.1}s), then refused; coordinator fds {}, rss {:.0} MiB ({:.1} KiB per connection); \
         a refused connection closed in {:?} (median of {}), CPU while refusing 1000 and holding {n}: {:.2}s over {:.1}s",
        fill.as_secs_f64(),
        fds(pid),
        rss as f64 / 1024.0,
        rss as f64 / n.max(1) as f64,
        closes.get(closes.len() / 2).copied().unwrap_or_default(),
        closes.len(),
        (ticks1 - ticks0) as f64 / hz,
        5.0 + closes.iter().map(|d| d.as_secs_f64()).sum::<f64>(),
    );
    drop(coord);
}

async fn channel(port: u16, ca: &Path) -> Channel {
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Opens a stream, registers `node` on it; the open stream's sender and
/// inbound half, or the status it was refused with.
async fn register(
    ch: &Channel,
    node: &Signer,
) -> Result<(mpsc::Sender<Envelope>, tonic::Streaming<Envelope>), tonic::Status> {
    let (tx, rx) = mpsc::channel(1024);
    let mut inbound = UplinkClient::new(ch.clone())
        .max_encoding_message_size(8 << 20)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let hello = inbound.message().await?.unwrap();
    let nonce = pb::Hello::decode(hello.payload.as_slice()).unwrap().nonce;
    let reg = node.sign_message(
        types::REGISTER,
        &pb::Register {
            node_id: node.key_id().to_owned(),
            public_key: node.public_key().to_vec(),
            agent_version: "bench".into(),
            time_unix_ms: common::now_ms(),
            session_nonce: nonce,
            ..Default::default()
        },
    );
    tx.send(reg).await.unwrap();
    match inbound.message().await? {
        Some(e) if e.payload_type == types::REGISTERED => Ok((tx, inbound)),
        _ => Err(tonic::Status::unknown("no Registered")),
    }
}

async fn enrollment() {
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, port, ca) = common::dev_coordinator(tmp.path(), "");
    // One address: 20 s of fresh identities, as fast as the answers come.
    let ch = channel(port, &ca).await;
    let (mut ok, mut no) = (0, 0);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        match register(&ch, &Signer::generate().unwrap().0).await {
            Ok(_) => ok += 1,
            Err(_) => no += 1,
        }
    }
    println!("coordnet/enrollment one address, 20s: {ok} new nodes accepted, {no} refused (RESOURCE_EXHAUSTED)");
    // 32 addresses (the coordinator sees 127.0.5.x): the global rate.
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, port, ca) = common::dev_coordinator(tmp.path(), "");
    let (ok, no) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for a in 0..32u8 {
        let (ok, no, ca) = (ok.clone(), no.clone(), ca.clone());
        tasks.push(tokio::spawn(async move {
            let ch = Endpoint::from_shared(format!("https://localhost:{port}"))
                .unwrap()
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(std::fs::read(&ca).unwrap()))
                        .domain_name("localhost"),
                )
                .unwrap()
                .local_address(Some([127, 0, 5, 1 + a].into()))
                .connect()
                .await
                .unwrap();
            while t.elapsed() < Duration::from_secs(20) {
                match register(&ch, &Signer::generate().unwrap().0).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => no.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "coordnet/enrollment 32 addresses, 20s: {} new nodes accepted, {} refused",
        ok.load(Ordering::Relaxed),
        no.load(Ordering::Relaxed)
    );
}

fn caps() {
    let kinds: Vec<String> = RecordKind::ALL
        .iter()
        .map(|k| format!("{} {} KiB", k.name(), k.max_payload() >> 10))
        .collect();
    println!(
        "coordnet/caps: register {} KiB, heartbeat {} KiB, records: {}",
        limits::REGISTER >> 10,
        limits::HEARTBEAT >> 10,
        kinds.join(", ")
    );
}

async fn bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, port, ca) = common::dev_coordinator(tmp.path(), "");
    let ch = channel(port, &ca).await;
    let node = Signer::generate().unwrap().0;
    let (tx, mut inbound) = register(&ch, &node).await.unwrap();
    let pad = RecordKind::Telemetry.max_payload() - 1024;
    let receipts = Arc::new(AtomicU64::new(0));
    let r = receipts.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(e)) = inbound.message().await {
            if e.payload_type == types::RECEIPT {
                r.fetch_add(1, Ordering::Relaxed);
            } else if e.payload_type == types::RECEIPTS {
                let n = pb::Receipts::decode(e.payload.as_slice()).map_or(0, |s| s.receipts.len());
                r.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    });
    let t = Instant::now();
    let mut seq = 0;
    while t.elapsed() < Duration::from_secs(20) {
        seq += 1;
        let rec = node.sign_message(
            types::RECORD,
            &pb::Record {
                node_id: node.key_id().to_owned(),
                seq,
                time_unix_ms: common::now_ms(),
                body: Some(pb::record::Body::Telemetry(pb::Telemetry {
                    gpu_events: vec![pb::GpuEvent {
                        detail: "x".repeat(pad),
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
                ..Default::default()
            },
        );
        if tokio::time::timeout(Duration::from_secs(1), tx.send(rec))
            .await
            .is_err()
        {
            seq -= 1;
        }
    }
    let n = receipts.load(Ordering::Relaxed);
    println!(
        "coordnet/bytes one node, records of {} KiB for 20s: {n} stored ({:.0} MiB)",
        pad >> 10,
        (n as f64 * pad as f64) / (1 << 20) as f64
    );
    drop(tx);
    reader.abort();
}
