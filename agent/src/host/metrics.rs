//! `/metrics`: Prometheus text exposition of the GPUs and the agent.
//!
//! GPU gauges carry the names and labels of NVIDIA's DCGM exporter
//! (`DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-…"}` and so on), so existing
//! dashboards work unchanged; agent health is `warden_*`. `render` is a pure
//! function of a snapshot; `serve` answers GET through hyper's HTTP/1.1
//! server (already linked for gRPC), one response per connection.

use std::{convert::Infallible, fmt::Write as _, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use warden_proto::pb;

use crate::delivery::{spool::SpoolStats, uplink::UplinkStatus};

/// Everything one scrape shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub hostname: String,
    pub inventory: pb::InventorySummary,
    pub gpus: Vec<pb::GpuSample>,
    pub spool: SpoolStats,
    pub uplink: UplinkStatus,
    pub coordinator_configured: bool,
    pub link: Option<pb::LinkSample>,
    pub mesh: Option<crate::mesh::node::MeshStatus>,
    /// When it was taken (ms), for how long delivery has stalled.
    pub now_ms: i64,
}

/// Where a scrape reads the agent's live state.
#[derive(Clone)]
pub struct Sources {
    pub configured: bool,
    pub inventory: watch::Receiver<pb::InventorySummary>,
    pub gpus: watch::Receiver<Vec<pb::GpuSample>>,
    pub spool: watch::Receiver<SpoolStats>,
    pub uplink: watch::Receiver<UplinkStatus>,
    pub link: watch::Receiver<Option<pb::LinkSample>>,
    pub mesh: watch::Receiver<Option<crate::mesh::node::MeshStatus>>,
}

impl Sources {
    pub fn snapshot(&self) -> Snapshot {
        let inventory = self.inventory.borrow().clone();
        Snapshot {
            hostname: inventory.hostname.clone(),
            inventory,
            gpus: self.gpus.borrow().clone(),
            spool: *self.spool.borrow(),
            uplink: self.uplink.borrow().clone(),
            coordinator_configured: self.configured,
            link: self.link.borrow().clone(),
            mesh: self.mesh.borrow().clone(),
            now_ms: crate::now_ms(),
        }
    }
}

/// Escapes a label value as the exposition format requires.
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A metric family: HELP and TYPE once, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        Family { out }
    }
    fn sample(&mut self, name: &str, labels: &str, value: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// The exposition text for one snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::with_capacity(4096);
    let gpu_labels = |g: &pb::GpuSample| {
        let info = s.inventory.gpus.iter().find(|i| i.uuid == g.uuid);
        format!(
            "gpu=\"{}\",UUID=\"{}\",device=\"nvidia{}\",modelName=\"{}\",pci_bus_id=\"{}\",Hostname=\"{}\"",
            g.index,
            label(&g.uuid),
            g.index,
            label(info.map_or("", |i| i.name.as_str())),
            label(info.map_or("", |i| i.pci_bus_id.as_str())),
            label(&s.hostname),
        )
    };
    // Readings exist only for GPUs that answered this cycle.
    let live: Vec<&pb::GpuSample> = s.gpus.iter().filter(|g| g.error.is_empty()).collect();
    type Reading = fn(&pb::GpuSample) -> f64;
    let dcgm: [(&str, &str, Reading); 7] = [
        ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", |g| {
            g.utilization_gpu as f64
        }),
        (
            "DCGM_FI_DEV_MEM_COPY_UTIL",
            "Memory utilization (in %).",
            |g| g.utilization_memory as f64,
        ),
        (
            "DCGM_FI_DEV_FB_USED",
            "Framebuffer memory used (in MiB).",
            |g| (g.memory_used_bytes as f64 / MIB).round(),
        ),
        (
            "DCGM_FI_DEV_FB_FREE",
            "Framebuffer memory free (in MiB).",
            |g| (g.memory_total_bytes.saturating_sub(g.memory_used_bytes) as f64 / MIB).round(),
        ),
        ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", |g| {
            g.power_mw as f64 / 1000.0
        }),
        ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", |g| {
            g.temperature_c as f64
        }),
        (
            "DCGM_FI_DEV_SM_CLOCK",
            "SM clock frequency (in MHz).",
            |g| g.sm_clock_mhz as f64,
        ),
    ];
    for (name, help, read) in dcgm {
        let mut f = Family::head(&mut out, name, "gauge", help);
        for g in &live {
            f.sample(name, &gpu_labels(g), read(g));
        }
    }
    let mut f = Family::head(
        &mut out,
        "warden_gpu_processes",
        "gauge",
        "Processes running on the GPU, by kind.",
    );
    for g in &live {
        let graphics = g.processes.iter().filter(|p| p.graphics).count();
        let base = gpu_labels(g);
        f.sample(
            "warden_gpu_processes",
            &format!("{base},kind=\"compute\""),
            (g.processes.len() - graphics) as f64,
        );
        f.sample(
            "warden_gpu_processes",
            &format!("{base},kind=\"graphics\""),
            graphics as f64,
        );
    }
    let mut f = Family::head(
        &mut out,
        "warden_gpu_lost",
        "gauge",
        "1 when NVML reports the GPU lost (fallen off the bus).",
    );
    for g in &s.gpus {
        f.sample("warden_gpu_lost", &gpu_labels(g), g.lost as u8 as f64);
    }
    let mut f = Family::head(
        &mut out,
        "warden_gpu_error",
        "gauge",
        "1 when NVML failed to read the GPU this cycle.",
    );
    for g in &s.gpus {
        f.sample(
            "warden_gpu_error",
            &gpu_labels(g),
            !g.error.is_empty() as u8 as f64,
        );
    }
    let nvml_ok = s.inventory.nvml_status == "ok";
    let scalars: [(&str, &str, &str, f64); 18] = [
        (
            "warden_nvml_loaded",
            "gauge",
            "1 when NVML is loaded; 0 on a CPU-only node.",
            nvml_ok as u8 as f64,
        ),
        (
            "warden_gpus",
            "gauge",
            "GPUs in the inventory.",
            s.inventory.gpus.len() as f64,
        ),
        (
            "warden_spool_pending_records",
            "gauge",
            "Records spooled and not yet acknowledged.",
            s.spool.pending as f64,
        ),
        (
            "warden_spool_bytes",
            "gauge",
            "Bytes the spool holds on disk.",
            s.spool.bytes as f64,
        ),
        (
            "warden_spool_max_bytes",
            "gauge",
            "The spool's size cap.",
            s.spool.max_bytes as f64,
        ),
        (
            "warden_spool_full",
            "gauge",
            "1 while the spool refuses evidence for lack of room (no telemetry left to shed).",
            s.spool.full as u8 as f64,
        ),
        (
            "warden_spool_refused_total",
            "counter",
            "Evidence records refused because the spool was full of evidence.",
            s.spool.refused as f64,
        ),
        (
            "warden_spool_shedding",
            "gauge",
            "1 while new telemetry samples are shed for lack of room.",
            s.spool.shedding as u8 as f64,
        ),
        (
            "warden_spool_shed_total",
            "counter",
            "Telemetry samples not kept for lack of room (not spooled, or evicted for evidence).",
            s.spool.shed as f64,
        ),
        (
            "warden_spool_set_aside_records",
            "gauge",
            "Records in the spool's set-aside log: refused for good, or signed by a replaced node key.",
            s.spool.set_aside as f64,
        ),
        (
            "warden_spool_corrupt_total",
            "counter",
            "Damaged spool frames skipped since start (their seqs are never reused).",
            s.spool.corrupt as f64,
        ),
        (
            "warden_coordinator_connected",
            "gauge",
            "1 while the stream to the coordinator is up.",
            s.uplink.connected as u8 as f64,
        ),
        (
            "warden_records_sent_total",
            "counter",
            "Records sent to the coordinator (replays included).",
            s.uplink.records_sent as f64,
        ),
        (
            "warden_receipts_total",
            "counter",
            "Signed receipts received from the coordinator.",
            s.uplink.receipts as f64,
        ),
        (
            "warden_refusals_total",
            "counter",
            "Records the coordinator refused.",
            s.uplink.refusals as f64,
        ),
        (
            "warden_refusals_final_total",
            "counter",
            "Records the coordinator refused for good (then set aside).",
            s.uplink.refusals_final as f64,
        ),
        (
            "warden_records_retrying",
            "gauge",
            "Records refused for now, waiting to be sent again.",
            s.uplink.retrying as f64,
        ),
        (
            "warden_last_receipt_seq",
            "gauge",
            "Highest record seq the coordinator acknowledged.",
            s.uplink.last_receipt_seq as f64,
        ),
    ];
    for (name, kind, help, v) in scalars {
        Family::head(&mut out, name, kind, help).sample(name, "", v);
    }
    // One series while records are not being receipted; its cause and fix
    // are in `warden status`.
    let problem =
        crate::delivery::problem::problem(s.coordinator_configured, &s.uplink, &s.spool, s.now_ms);
    let name = "warden_delivery_problem";
    let mut head = Family::head(
        &mut out,
        name,
        "gauge",
        "1 while records are not being receipted, by kind (not_configured, spool_full, disconnected, stalled); `warden status` says the cause and the fix.",
    );
    match problem {
        Some(p) => head.sample(name, &format!("kind=\"{}\"", label(&p.kind)), 1.0),
        None => head.sample(name, "", 0.0),
    }
    if let Some(l) = s.link.as_ref().filter(|l| l.error.is_empty()) {
        for (name, help, v) in [
            (
                "warden_link_download_mbps",
                "Download from the coordinator at the last link probe (Mbit/s).",
                l.download_mbps,
            ),
            (
                "warden_link_upload_mbps",
                "Upload to the coordinator at the last link probe (Mbit/s).",
                l.upload_mbps,
            ),
            (
                "warden_link_rtt_ms",
                "Median round trip to the coordinator at the last link probe (ms).",
                l.rtt_ms,
            ),
            (
                "warden_link_clock_offset_ms",
                "Coordinator clock minus ours at the last link probe (ms).",
                l.clock_offset_ms as f64,
            ),
        ] {
            Family::head(&mut out, name, "gauge", help).sample(name, "", v);
        }
    }
    if let Some(m) = &s.mesh {
        let peer_labels = |p: &crate::mesh::node::PeerStatus| {
            format!(
                "cluster=\"{}\",peer=\"{}\",public_key=\"{}\"",
                label(&m.cluster_id),
                label(&p.node_id),
                label(&p.public_key)
            )
        };
        type PeerReading = fn(&crate::mesh::node::PeerStatus) -> Option<f64>;
        let families: [(&str, &str, &str, PeerReading); 4] = [
            (
                "warden_mesh_peer_rx_bytes_total",
                "counter",
                "Bytes received from the mesh peer.",
                |p| Some(p.rx_bytes as f64),
            ),
            (
                "warden_mesh_peer_tx_bytes_total",
                "counter",
                "Bytes sent to the mesh peer.",
                |p| Some(p.tx_bytes as f64),
            ),
            (
                "warden_mesh_peer_last_handshake_seconds",
                "gauge",
                "Time of the last handshake with the peer (Unix seconds; 0: none).",
                |p| Some(p.last_handshake_unix_ms as f64 / 1000.0),
            ),
            (
                "warden_mesh_peer_rtt_ms",
                "gauge",
                "Round trip of the last ping over the mesh (absent when unanswered).",
                |p| p.rtt_ms,
            ),
        ];
        for (name, kind, help, v) in families {
            let mut f = Family::head(&mut out, name, kind, help);
            for p in &m.peers {
                if let Some(v) = v(p) {
                    f.sample(name, &peer_labels(p), v);
                }
            }
        }
        Family::head(
            &mut out,
            "warden_mesh_dropped_datagrams_total",
            "counter",
            "Datagrams at the mesh port that were not WireGuard, for no peer, or failed.",
        )
        .sample(
            "warden_mesh_dropped_datagrams_total",
            "",
            m.dropped_datagrams as f64,
        );
    }
    let version = format!("version=\"{}\"", label(env!("CARGO_PKG_VERSION")));
    Family::head(
        &mut out,
        "warden_build_info",
        "gauge",
        "The agent's version.",
    )
    .sample("warden_build_info", &version, 1.0);
    out
}

/// Why /metrics could not be served.
#[derive(Debug, thiserror::Error)]
#[error("metrics.listen {addr}: {source}")]
pub struct MetricsError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError { addr, source })
}

/// Serves scrapes until `shutdown`.
pub async fn serve(listener: TcpListener, sources: Sources, shutdown: CancellationToken) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = shutdown.cancelled() => return,
        };
        match conn {
            Ok((stream, _)) => {
                let sources = sources.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let reply = answer(&req, &sources);
                        async move { Ok::<_, Infallible>(reply) }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .max_buf_size(MAX_REQUEST)
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(stream), service);
                    // A client that never finishes its request is dropped.
                    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Largest request head read (hyper answers 431 past it); scrapers send a
/// few hundred bytes.
const MAX_REQUEST: usize = 16 << 10;

/// The response to one request: GET /metrics, GET / or an error.
fn answer<B>(req: &Request<B>, sources: &Sources) -> Response<Full<Bytes>> {
    let (status, kind, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(render(&sources.snapshot())),
        ),
        (&Method::GET, "/") => (
            StatusCode::OK,
            "text/plain",
            Bytes::from_static(b"warden agent: see /metrics\n"),
        ),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found; try /metrics\n"),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"only GET\n"),
        ),
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One request over a real socket, read until the server closes it.
    async fn ask(addr: SocketAddr, request: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("the server closes the connection after one response")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn the_server_answers_get_only_once_per_connection_and_refuses_huge_heads() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_inv, inventory) = watch::channel(pb::InventorySummary {
            hostname: "box".into(),
            ..Default::default()
        });
        let (_g, gpus) = watch::channel(Vec::new());
        let (_s, spool) = watch::channel(SpoolStats::default());
        let (_u, uplink) = watch::channel(UplinkStatus::default());
        let (_l, link) = watch::channel(None);
        let (_m, mesh) = watch::channel(None);
        let sources = Sources {
            configured: true,
            inventory,
            gpus,
            spool,
            uplink,
            link,
            mesh,
        };
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, sources, stop.clone()));

        let r = ask(addr, b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{r}"
        );
        assert!(r.contains("warden_"), "{r}");
        let r = ask(addr, b"GET /nothing HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = ask(
            addr,
            b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nHost: a\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(64 << 10)
        );
        // Refused with 431, or reset outright when the server closes with
        // the rest of the head unread: never served, never left hanging.
        {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(huge.as_bytes()).await;
            let mut out = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
                .await
                .expect("closed, not left hanging");
            let r = String::from_utf8_lossy(&out);
            match read {
                Ok(_) => assert!(r.starts_with("HTTP/1.1 431"), "{r}"),
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            }
        }
        stop.cancel();
        server.await.unwrap();
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            hostname: "box".into(),
            inventory: pb::InventorySummary {
                nvml_status: "ok".into(),
                gpus: vec![pb::GpuInfo {
                    index: 0,
                    uuid: "GPU-a".into(),
                    name: "NVIDIA \"H100\"".into(),
                    memory_total_bytes: 80 << 30,
                    pci_bus_id: "00000000:01:00.0".into(),
                    minor_number: 0,
                    ..Default::default()
                }],
                ..Default::default()
            },
            gpus: vec![
                pb::GpuSample {
                    index: 0,
                    uuid: "GPU-a".into(),
                    utilization_gpu: 87,
                    memory_used_bytes: 1 << 30,
                    memory_total_bytes: 80 << 30,
                    power_mw: 312_500,
                    processes: vec![pb::GpuProcess {
                        pid: 1,
                        used_memory_bytes: 1,
                        graphics: false,
                    }],
                    ..Default::default()
                },
                pb::GpuSample {
                    index: 1,
                    uuid: "GPU-b".into(),
                    lost: true,
                    error: "GPU is lost".into(),
                    ..Default::default()
                },
            ],
            spool: SpoolStats {
                pending: 3,
                shed: 5,
                set_aside: 2,
                ..Default::default()
            },
            uplink: UplinkStatus {
                connected: true,
                records_sent: 9,
                ..Default::default()
            },
            coordinator_configured: true,
            link: None,
            mesh: None,
            now_ms: 0,
        }
    }

    #[test]
    fn mesh_peers_have_counters_and_a_round_trip_only_when_answered() {
        use crate::mesh::node::{MeshStatus, PeerStatus};
        let mut s = snapshot();
        assert!(!render(&s).contains("warden_mesh_"), "no mesh, no families");
        s.mesh = Some(MeshStatus {
            cluster_id: "c1".into(),
            dropped_datagrams: 4,
            peers: vec![
                PeerStatus {
                    node_id: "b".into(),
                    public_key: "KEY".into(),
                    rx_bytes: 10,
                    tx_bytes: 20,
                    last_handshake_unix_ms: 1_500,
                    rtt_ms: Some(0.25),
                    ..Default::default()
                },
                PeerStatus {
                    node_id: "c".into(),
                    public_key: "KEY2".into(),
                    rtt_ms: None,
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        let text = render(&s);
        let b = "cluster=\"c1\",peer=\"b\",public_key=\"KEY\"";
        assert!(
            text.contains(&format!("warden_mesh_peer_rx_bytes_total{{{b}}} 10\n")),
            "{text}"
        );
        assert!(text.contains(&format!("warden_mesh_peer_tx_bytes_total{{{b}}} 20\n")));
        assert!(text.contains(&format!(
            "warden_mesh_peer_last_handshake_seconds{{{b}}} 1.5\n"
        )));
        assert!(text.contains(&format!("warden_mesh_peer_rtt_ms{{{b}}} 0.25\n")));
        assert!(!text.contains("warden_mesh_peer_rtt_ms{cluster=\"c1\",peer=\"c\""));
        assert!(text.contains("warden_mesh_peer_rx_bytes_total{cluster=\"c1\",peer=\"c\""));
        assert!(text.contains("warden_mesh_dropped_datagrams_total 4\n"));
    }

    #[test]
    fn renders_dcgm_names_and_labels() {
        let text = render(&snapshot());
        let l = "gpu=\"0\",UUID=\"GPU-a\",device=\"nvidia0\",modelName=\"NVIDIA \\\"H100\\\"\",pci_bus_id=\"00000000:01:00.0\",Hostname=\"box\"";
        assert!(
            text.contains(&format!("DCGM_FI_DEV_GPU_UTIL{{{l}}} 87\n")),
            "{text}"
        );
        assert!(text.contains(&format!("DCGM_FI_DEV_FB_USED{{{l}}} 1024\n")));
        assert!(text.contains(&format!("DCGM_FI_DEV_FB_FREE{{{l}}} 80896\n")));
        assert!(text.contains(&format!("DCGM_FI_DEV_POWER_USAGE{{{l}}} 312.5\n")));
        assert!(text.contains(&format!("warden_gpu_processes{{{l},kind=\"compute\"}} 1\n")));
        // The lost GPU has no readings, only its state.
        assert!(!text.contains("DCGM_FI_DEV_GPU_UTIL{gpu=\"1\""));
        assert!(text.contains("warden_gpu_lost{gpu=\"1\",UUID=\"GPU-b\""));
        assert!(text.contains("warden_spool_pending_records 3\n"));
        assert!(text.contains("warden_spool_shed_total 5\n"));
        assert!(text.contains("warden_spool_set_aside_records 2\n"));
        assert!(text.contains("warden_coordinator_connected 1\n"));
        assert!(text.contains("warden_delivery_problem 0\n"), "{text}");
        let mut down = snapshot();
        down.uplink.connected = false;
        let text = render(&down);
        assert!(
            text.contains("warden_delivery_problem{kind=\"disconnected\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("warden_records_sent_total 9\n"));
        assert!(
            !text.contains("warden_link_"),
            "no probe yet, no link gauges"
        );
    }

    #[test]
    fn every_sample_line_belongs_to_a_declared_family() {
        let mut s = snapshot();
        s.link = Some(pb::LinkSample {
            download_mbps: 900.0,
            ..Default::default()
        });
        let text = render(&s);
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(declared.insert(name.to_owned()), "{name} declared twice");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{name} has no TYPE line");
                let value = line.rsplit(' ').next().unwrap();
                value
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("bad value in {line}"));
            }
        }
        assert!(text.contains("warden_link_download_mbps 900\n"));
    }
}
