//! Figures for the record path and the idle agent. Run with
//! `cargo bench --bench uplink`; prints numbers, asserts nothing.
//!
//! 1. Records per second through the whole path — sign → spool (fsync'd
//!    groups) → gRPC over TLS on loopback → verify → SQLite (FULL sync) →
//!    signed receipt → verify → spool ack — with an in-process coordinator.
//! 2. RSS and CPU of an idle agent process (default heartbeat and telemetry)
//!    connected to a coordinator process, over `WARDEN_BENCH_IDLE_SECS` (30).

use std::{
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use warden_agent::{
    config::{CoordinatorLink, UplinkConfig},
    outbox::{self, Stamp},
    spool::{Spool, SpoolConfig},
    uplink::{Uplink, UplinkStatus},
};
use warden_coordinator::CoordinatorConfig;
use warden_proto::{dsse::Signer, pb};

const WARDEN: &str = env!("CARGO_BIN_EXE_warden");

fn main() {
    let records: u64 = std::env::var("WARDEN_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let idle_secs: u64 = std::env::var("WARDEN_BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
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
            address: format!("https://localhost:{}", coord.addr.port()),
            public_key: coord.public_key.to_base64(),
            ca_cert: tls.ca_cert.clone(),
            server_name: None,
        },
        config: UplinkConfig {
            max_in_flight: window,
            ..Default::default()
        },
        signer,
        node_id,
        start_id: "bench".into(),
        inventory: watch::channel(pb::InventorySummary::default()).1,
        outbox: outbox.clone(),
        status: status_tx,
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

/// (utime + stime) in clock ticks, and VmRSS in KiB, of a process.
fn proc_figures(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (ticks, rss)
}

fn idle(secs: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cdir = tmp.path().join("coord");
    let mut coord = Command::new(WARDEN)
        .args([
            "coordinator",
            "--dev",
            "--state-dir",
            cdir.to_str().unwrap(),
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let link = cdir.join("agent-link.toml");
    let t0 = Instant::now();
    while !link.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "coordinator did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let adir = tmp.path().join("agent");
    let cfg = tmp.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\n{}",
            adir.display(),
            std::fs::read_to_string(&link).unwrap()
        ),
    )
    .unwrap();
    let mut agent = Command::new(WARDEN)
        .args(["agent", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Let start-up settle before measuring.
    std::thread::sleep(Duration::from_secs(3));
    let (t_start, _) = proc_figures(agent.id());
    let start = Instant::now();
    let mut max_rss = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        max_rss = max_rss.max(proc_figures(agent.id()).1);
    }
    let (t_end, rss) = proc_figures(agent.id());
    let elapsed = start.elapsed().as_secs_f64();
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let cpu = (t_end - t_start) as f64 / ticks_per_s / elapsed * 100.0;
    println!(
        "agent/idle over {elapsed:.0}s (heartbeat 5s, telemetry 10s): cpu {cpu:.3}% of one core, rss {:.1} MiB (max {:.1} MiB)",
        rss as f64 / 1024.0,
        max_rss as f64 / 1024.0
    );
    let _ = agent.kill();
    let _ = coord.kill();
    let _ = agent.wait();
    let _ = coord.wait();
}
