//! The link probe service: a speed test agents run against us.
//!
//! Unauthenticated beyond TLS (it reveals nothing), so every call is
//! bounded: bytes and time per call, and a few probes at once, so it
//! cannot be turned into a way to saturate the coordinator's link.

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};
use warden_proto::pb;

/// Most bytes one Download sends or one Upload reads.
pub const MAX_PROBE_BYTES: u64 = 1 << 30;
/// Longest one Download or Upload runs.
pub const MAX_PROBE_TIME: Duration = Duration::from_secs(15);
/// Probes served at once; more wait their turn.
pub const CONCURRENT_PROBES: usize = 4;
/// Longest a ping payload may be.
const MAX_PING_BYTES: usize = 1024;

pub struct ProbeService {
    slots: Arc<Semaphore>,
    /// Shared filler for download chunks (cheap clones of one buffer).
    filler: bytes::Bytes,
}

impl Default for ProbeService {
    fn default() -> Self {
        // Incompressible filler, so nothing on the path can make it look faster.
        let mut buf = vec![0u8; 1 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        Self {
            slots: Arc::new(Semaphore::new(CONCURRENT_PROBES)),
            filler: buf.into(),
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ProbeChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::link_probe_server::LinkProbe for ProbeService {
    async fn ping(&self, req: Request<pb::PingRequest>) -> Result<Response<pb::PingReply>, Status> {
        let payload = req.into_inner().payload;
        if payload.len() > MAX_PING_BYTES {
            return Err(Status::invalid_argument(format!(
                "ping payload is {} bytes; at most {MAX_PING_BYTES}",
                payload.len()
            )));
        }
        Ok(Response::new(pb::PingReply {
            payload,
            server_time_unix_ms: crate::clock::now_ms(),
        }))
    }

    type DownloadStream = ChunkStream;

    async fn download(
        &self,
        req: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let req = req.into_inner();
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        let total = req.bytes.min(MAX_PROBE_BYTES);
        let chunk = (req.chunk_bytes as usize).clamp(1024, self.filler.len());
        let filler = self.filler.slice(..chunk);
        let deadline = Instant::now() + MAX_PROBE_TIME;
        let stream = futures::stream::unfold(0u64, move |sent| {
            let filler = filler.clone();
            async move {
                if sent >= total || Instant::now() >= deadline {
                    return None;
                }
                let n = (total - sent).min(filler.len() as u64) as usize;
                Some((
                    Ok(pb::ProbeChunk {
                        data: filler.slice(..n),
                    }),
                    sent + n as u64,
                ))
            }
        })
        // The permit is released when the stream is dropped (done or cancelled).
        .map(move |c| {
            let _hold = &permit;
            c
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn upload(
        &self,
        req: Request<Streaming<pb::ProbeChunk>>,
    ) -> Result<Response<pb::UploadSummary>, Status> {
        let _permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        let mut inbound = req.into_inner();
        let start = Instant::now();
        let mut bytes = 0u64;
        loop {
            let left = MAX_PROBE_TIME.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, inbound.message()).await {
                Ok(Ok(Some(c))) => {
                    bytes += c.data.len() as u64;
                    if bytes >= MAX_PROBE_BYTES {
                        break;
                    }
                }
                Ok(Ok(None)) | Err(_) => break,
                Ok(Err(status)) => return Err(status),
            }
        }
        Ok(Response::new(pb::UploadSummary {
            bytes,
            elapsed_us: start.elapsed().as_micros() as u64,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::link_probe_server::LinkProbe;

    #[tokio::test]
    async fn download_sends_what_was_asked_up_to_the_cap() {
        let svc = ProbeService::default();
        let stream = svc
            .download(Request::new(pb::DownloadRequest {
                bytes: 3 * 65536 + 100,
                chunk_bytes: 65536,
            }))
            .await
            .unwrap()
            .into_inner();
        let chunks: Vec<_> = stream.map(|c| c.unwrap().data.len()).collect().await;
        assert_eq!(chunks, [65536, 65536, 65536, 100]);
        // Tiny chunk sizes are raised, huge ones lowered.
        let first = svc
            .download(Request::new(pb::DownloadRequest {
                bytes: 10 << 20,
                chunk_bytes: 1,
            }))
            .await
            .unwrap()
            .into_inner()
            .next()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.data.len(), 1024);
        // The filler is not trivially compressible.
        let distinct: std::collections::HashSet<u8> = svc.filler[..4096].iter().copied().collect();
        assert!(distinct.len() > 200);
    }

    #[tokio::test]
    async fn a_cancelled_download_frees_its_slot() {
        let svc = ProbeService::default();
        for _ in 0..CONCURRENT_PROBES * 3 {
            let s = svc
                .download(Request::new(pb::DownloadRequest {
                    bytes: MAX_PROBE_BYTES,
                    chunk_bytes: 1 << 20,
                }))
                .await
                .unwrap();
            drop(s); // the agent hung up
        }
        assert_eq!(svc.slots.available_permits(), CONCURRENT_PROBES);
    }

    #[tokio::test]
    async fn ping_echoes_with_the_server_clock_and_refuses_big_payloads() {
        let svc = ProbeService::default();
        let r = svc
            .ping(Request::new(pb::PingRequest {
                payload: vec![7; 8],
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.payload, vec![7; 8]);
        assert!((r.server_time_unix_ms - crate::clock::now_ms()).abs() < 5000);
        let err = svc
            .ping(Request::new(pb::PingRequest {
                payload: vec![0; MAX_PING_BYTES + 1],
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("at most 1024"));
    }
}
