//! Figures for the record path and the idle agent. Run with
//! `cargo bench --bench uplink`; prints numbers, asserts nothing.
//!
//! 1. Records per second through the whole path — sign → spool (fsync'd
//!    groups) → gRPC over TLS on loopback → verify → SQLite (FULL sync) →
//!    signed receipt → verify → spool ack — with an in-process coordinator.
//! 2. RSS and CPU of an idle agent process (default heartbeat and telemetry)
//!    connected to a coordinator process, over `WARDEN_BENCH_IDLE_SECS` (30).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use warden_agent::{
    config::{CoordinatorLink, UplinkConfig},
    delivery::{
        outbox::{self, Stamp},
        spool::{Spool, SpoolConfig},
        uplink::{Uplink, UplinkStatus},
    },
};
use warden_coordinator::{
    config::{EnrollmentConfig, EnrollmentPolicy, LimitsConfig},
    CoordinatorConfig,
};
use warden_proto::{dsse::Signer, pb};

mod common;

fn main() {
    let records: u64 = std::env::var("WARDEN_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let idle_secs = common::steady_secs();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for window in [64usize, 512] {
        let rate = rt.block_on(throughput(records, window));
        println!("uplink/throughput records={records} max_in_flight={window}: {rate:.0} records/s");
    }
    idle(idle_secs);
}

async fn throughput(n: u64, window: usize) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let tls = warden_coordinator::devtls::ensure(&tmp.path().join("tls")).unwrap();
    let coord = warden_coordinator::start(
        &CoordinatorConfig {
            state_dir: tmp.path().join("coordinator"),
            listen: ([127, 0, 0, 1], 0).into(),
            // The bench measures the record path, not the per-node rate limit.
            enrollment: EnrollmentConfig {
                policy: Some(EnrollmentPolicy::Open),
                ..Default::default()
            },
            limits: LimitsConfig {
                node_envelopes_per_second: u32::MAX as u64,
                node_bytes_per_second: u64::MAX >> 8,
                ..Default::default()
            },
            ..Default::default()
        },
        tls.server,
        shutdown.clone(),
    )
    .await
    .unwrap();

    let (signer, _) = Signer::generate().unwrap();
    let signer = Arc::new(signer);
    let node_id = signer.key_id().to_owned();
    let (spool, _) = Spool::open(SpoolConfig {
        dir: tmp.path().join("spool"),
        max_bytes: 1 << 30,
        segment_bytes: 8 << 20,
    })
    .unwrap();
    let stop_outbox = CancellationToken::new();
    let (outbox, outbox_task) = outbox::spawn(
        spool,
        Stamp {
            signer: signer.clone(),
            node_id: node_id.clone(),
            start_id: "bench".into(),
        },
        stop_outbox.clone(),
    );
    let (status_tx, _status_rx) = watch::channel(UplinkStatus::default());
    let uplink = Uplink {
        link: CoordinatorLink {
            address: format!("https://localhost:{}", coord.addr.port()).into(),
            public_key: coord.public_key.to_base64(),
            ca_cert: tls.ca_cert.clone(),
            server_name: None,
            join_token: None,
        },
        config: UplinkConfig {
            max_in_flight: window,
            ..Default::default()
        },
        signer,
        labels: Default::default(),
        node_id,
        start_id: "bench".into(),
        inventory: watch::channel(pb::InventorySummary::default()).1,
        outbox: outbox.clone(),
        status: status_tx,
        commands: None,
        challenges: None,
        work: None,
        work_answers: tokio::sync::Mutex::new(tokio::sync::mpsc::channel(1).1),
        mesh: Default::default(),
        mesh_status: watch::channel(None).1,
        direct: tokio::sync::Mutex::new(tokio::sync::mpsc::channel(1).1),
    };
    let uplink_task = tokio::spawn(uplink.run(shutdown.clone()));

    let mut stats = outbox.stats();
    let start = Instant::now();
    for i in 0..n {
        let body = pb::record::Body::Telemetry(pb::Telemetry {
            host: Some(pb::HostSample {
                load1: i as f64,
                mem_total_bytes: 24 << 30,
                mem_available_bytes: 20 << 30,
                uptime_s: i,
            }),
            ..Default::default()
        });
        assert!(outbox.emit(body).await);
    }
    loop {
        {
            let s = stats.borrow_and_update();
            if s.next_seq == n + 1 && s.pending == 0 {
                break;
            }
        }
        tokio::time::timeout(Duration::from_secs(60), stats.changed())
            .await
            .expect("records drained within 60 s")
            .unwrap();
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    shutdown.cancel();
    stop_outbox.cancel();
    let _ = uplink_task.await;
    let _ = outbox_task.await;
    coord.wait().await.unwrap();
    rate
}

fn idle(secs: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let (_coord, link) = common::coordinator(&tmp.path().join("coord"));
    // Default heartbeat and telemetry; the start-up link probe settles first.
    let s = common::measure_agent(
        tmp.path(),
        &format!("{link}\n[metrics]\nlisten = \"127.0.0.1:0\"\n"),
        &[],
        Duration::from_secs(8),
        secs,
    );
    println!(
        "agent/idle over {:.0}s (heartbeat 5s, telemetry 10s): cpu {:.3}% of one core, rss {:.1} MiB (max {:.1} MiB)",
        s.secs, s.cpu, s.rss_mib, s.max_rss_mib
    );
}
