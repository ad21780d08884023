//! The link probe client: download, upload and round-trip time against the
//! coordinator's `LinkProbe` service, at start and every `probe.interval`.
//!
//! `summarize` (the arithmetic) is pure; `measure` does the I/O.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use warden_proto::pb::{self, link_probe_client::LinkProbeClient};

use crate::{
    config::{CoordinatorLink, ProbeConfig},
    delivery::outbox::Outbox,
};

/// Bytes per probe chunk: large enough that framing costs nothing.
const CHUNK: usize = 256 << 10;
/// Asked of the coordinator per download; the probe stops on time first.
const DOWNLOAD_ASK: u64 = 1 << 30;

/// One round trip: when it was sent, when the answer came, and the
/// coordinator's clock in the answer (all ms, Unix).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ping {
    pub sent_ms: f64,
    pub received_ms: f64,
    pub server_ms: i64,
}

/// Median round trip, and the clock offset read at the fastest one
/// (where the server's stamp is least uncertain).
pub fn summarize_pings(pings: &[Ping]) -> Option<(f64, i64)> {
    if pings.is_empty() {
        return None;
    }
    let mut rtts: Vec<f64> = pings.iter().map(|p| p.received_ms - p.sent_ms).collect();
    rtts.sort_by(f64::total_cmp);
    let median = if rtts.len() % 2 == 1 {
        rtts[rtts.len() / 2]
    } else {
        (rtts[rtts.len() / 2 - 1] + rtts[rtts.len() / 2]) / 2.0
    };
    let best = pings
        .iter()
        .min_by(|a, b| (a.received_ms - a.sent_ms).total_cmp(&(b.received_ms - b.sent_ms)))?;
    let midpoint = (best.sent_ms + best.received_ms) / 2.0;
    Some((median, (best.server_ms as f64 - midpoint).round() as i64))
}

/// Megabits per second for `bytes` moved in `elapsed`.
pub fn mbps(bytes: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        return 0.0;
    }
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
}

fn wall_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connecting: {0}")]
    Connect(String),
    #[error("{what}: {status}")]
    Call {
        what: &'static str,
        status: tonic::Status,
    },
}

/// Runs one probe over `channel`.
pub async fn measure(channel: Channel, cfg: &ProbeConfig) -> Result<pb::LinkSample, ProbeError> {
    let mut client = LinkProbeClient::new(channel);
    let call = |what| move |status| ProbeError::Call { what, status };

    // Round trips first, on an idle link.
    let mut pings = Vec::with_capacity(cfg.pings as usize);
    for i in 0..cfg.pings {
        let sent_ms = wall_ms();
        let reply = client
            .ping(pb::PingRequest {
                payload: i.to_le_bytes().to_vec(),
            })
            .await
            .map_err(call("ping"))?
            .into_inner();
        pings.push(Ping {
            sent_ms,
            received_ms: wall_ms(),
            server_ms: reply.server_time_unix_ms,
        });
    }
    let (rtt_ms, clock_offset_ms) = summarize_pings(&pings).unwrap_or_default();

    // Download: count what arrives until the time is up, then hang up.
    let start = Instant::now();
    let mut stream = client
        .download(pb::DownloadRequest {
            bytes: DOWNLOAD_ASK,
            chunk_bytes: CHUNK as u32,
        })
        .await
        .map_err(call("download"))?
        .into_inner();
    let mut down = 0u64;
    while start.elapsed() < cfg.duration {
        match tokio::time::timeout(cfg.duration.saturating_sub(start.elapsed()), stream.next())
            .await
        {
            Ok(Some(Ok(c))) => down += c.data.len() as u64,
            Ok(Some(Err(status))) => {
                return Err(ProbeError::Call {
                    what: "download",
                    status,
                })
            }
            Ok(None) | Err(_) => break,
        }
    }
    let down_elapsed = start.elapsed();
    drop(stream);

    // Upload: send until the time is up; the coordinator says what arrived.
    let filler = bytes::Bytes::from(vec![0xa5u8; CHUNK]);
    let duration = cfg.duration;
    let start = Instant::now();
    let chunks = futures::stream::unfold((), move |()| {
        let filler = filler.clone();
        async move { (start.elapsed() < duration).then_some((pb::ProbeChunk { data: filler }, ())) }
    });
    let summary = client
        .upload(chunks)
        .await
        .map_err(call("upload"))?
        .into_inner();
    let up_elapsed = start.elapsed();

    Ok(pb::LinkSample {
        download_mbps: mbps(down, down_elapsed),
        upload_mbps: mbps(summary.bytes, up_elapsed),
        rtt_ms,
        clock_offset_ms,
        time_unix_ms: crate::now_ms(),
        error: String::new(),
    })
}

/// Connects and probes; a failure becomes a sample with `error` set.
/// With several coordinator addresses, the first that connects is probed,
/// trying `first` (the one the uplink is on) before the others.
pub async fn probe(
    link: &CoordinatorLink,
    first: Option<&str>,
    cfg: &ProbeConfig,
    connect_timeout: Duration,
) -> pb::LinkSample {
    let mut failures = Vec::new();
    let mut channel = None;
    for address in link.addresses_from(first.unwrap_or_default()) {
        match crate::delivery::uplink::channel(
            link,
            address,
            connect_timeout,
            crate::config::UplinkConfig::default().keepalive,
        )
        .await
        {
            Ok(ch) => {
                channel = Some(ch);
                break;
            }
            Err(e) => failures.push((address, crate::error_chain(&e))),
        }
    }
    let result = match channel {
        Some(ch) => measure(ch, cfg).await,
        None => Err(ProbeError::Connect(match failures.as_slice() {
            [(_, one)] => one.clone(),
            many => many
                .iter()
                .map(|(a, e)| format!("{a}: {e}"))
                .collect::<Vec<_>>()
                .join("; "),
        })),
    };
    result.unwrap_or_else(|e| pb::LinkSample {
        error: e.to_string(),
        time_unix_ms: crate::now_ms(),
        ..Default::default()
    })
}

/// Probes at start and every `interval`, sending each result as telemetry
/// and publishing it for status and /metrics.
pub async fn run(
    link: CoordinatorLink,
    uplink: watch::Receiver<crate::delivery::uplink::UplinkStatus>,
    cfg: ProbeConfig,
    connect_timeout: Duration,
    outbox: Outbox,
    latest: watch::Sender<Option<pb::LinkSample>>,
    shutdown: CancellationToken,
) {
    loop {
        let sample = tokio::select! {
            s = async {
                let on = uplink.borrow().address.clone();
                probe(&link, Some(&on), &cfg, connect_timeout).await
            } => s,
            _ = shutdown.cancelled() => return,
        };
        if sample.error.is_empty() {
            tracing::info!(
                download_mbps = format!("{:.0}", sample.download_mbps),
                upload_mbps = format!("{:.0}", sample.upload_mbps),
                rtt_ms = format!("{:.2}", sample.rtt_ms),
                clock_offset_ms = sample.clock_offset_ms,
                "link probe"
            );
        } else {
            tracing::warn!(error = %sample.error, "link probe failed");
        }
        let body = pb::record::Body::Telemetry(pb::Telemetry {
            link: Some(sample.clone()),
            ..Default::default()
        });
        latest.send_replace(Some(sample));
        if !outbox.emit(body).await {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_offset_at_the_fastest_round_trip() {
        let p = |s: f64, r: f64, srv: i64| Ping {
            sent_ms: s,
            received_ms: r,
            server_ms: srv,
        };
        // RTTs 10, 2, 30: median 10; fastest is the second, midpoint 101.
        let pings = [p(0.0, 10.0, 5), p(100.0, 102.0, 601), p(200.0, 230.0, 0)];
        assert_eq!(summarize_pings(&pings), Some((10.0, 500)));
        // Even count: mean of the middle two.
        let pings = [p(0.0, 4.0, 2), p(0.0, 6.0, 3)];
        assert_eq!(summarize_pings(&pings), Some((5.0, 0)));
        assert_eq!(summarize_pings(&[]), None);
    }

    #[test]
    fn megabits_per_second() {
        assert_eq!(mbps(125_000_000, Duration::from_secs(1)), 1000.0);
        assert_eq!(mbps(1, Duration::ZERO), 0.0);
    }
}
