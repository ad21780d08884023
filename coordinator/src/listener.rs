//! The agents' TCP endpoint. The coordinator accepts connections itself,
//! rather than through tonic's listener, to bound what a stranger can hold:
//! a TLS handshake deadline, an idle deadline (no RPC open), a cap on
//! connections in all and per source address (a refusal closes the socket at
//! once and is logged), and an accept loop that backs off instead of spinning
//! when the process runs out of file descriptors.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::task::AtomicWaker;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::{Instant, Sleep},
};
use tokio_rustls::{
    rustls::{
        self,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    },
    server::TlsStream,
    TlsAcceptor,
};
use tokio_util::sync::CancellationToken;

use crate::{config::LimitsConfig, ratelimit::LogGate};

/// File descriptors kept free of connections: the database and its WAL,
/// the admin socket and its clients, the key files.
pub const RESERVED_FDS: u64 = 128;

/// Why the TLS material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("TLS certificate (tls.cert): no PEM certificate in it ({0})")]
    Cert(String),
    #[error("TLS key (tls.key): no PEM private key in it ({0})")]
    Key(String),
    #[error("TLS certificate and key do not go together: {0}")]
    Config(#[from] rustls::Error),
}

/// A rustls acceptor for the agents' endpoint (HTTP/2 only, as gRPC is).
pub fn acceptor(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsAcceptor, TlsSetupError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::Cert(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsSetupError::Cert("the file holds none".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsSetupError::Key(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Raises the soft limit on open files to the hard one and returns how many
/// connections fit under it, at most `wanted`: the connection cap, not
/// EMFILE, is then what a flood runs into.
pub fn fit_connections(wanted: usize) -> (usize, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return (wanted, 0);
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    let soft: u64 = lim.rlim_cur;
    let room = soft.saturating_sub(RESERVED_FDS) as usize;
    (wanted.min(room.max(1)), soft)
}

/// Who holds how many connections: a pure count, decided under one lock.
#[derive(Debug, Default)]
pub struct Admission {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Why a new connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `limits.max_connections` are open.
    Total { limit: usize },
    /// This source address holds `limits.max_connections_per_ip`.
    PerIp { ip: IpAddr, limit: usize },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Total { limit } => {
                write!(f, "{limit} connections open (limits.max_connections)")
            }
            Refused::PerIp { ip, limit } => write!(
                f,
                "{ip} holds {limit} connections (limits.max_connections_per_ip)"
            ),
        }
    }
}

impl Admission {
    /// Counts a new connection from `ip` if the limits allow it.
    pub fn admit(
        &mut self,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: usize,
    ) -> Result<(), Refused> {
        if self.total >= max_total {
            return Err(Refused::Total { limit: max_total });
        }
        let n = self.per_ip.entry(ip).or_default();
        if *n >= max_per_ip {
            return Err(Refused::PerIp {
                ip,
                limit: max_per_ip,
            });
        }
        *n += 1;
        self.total += 1;
        Ok(())
    }

    /// A connection from `ip` has closed.
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
            self.total -= 1;
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

/// Delay after a failed accept: doubling from 10 ms to 1 s, reset by a
/// success. EMFILE leaves the listener readable, so retrying at once would
/// spin a core and starve the tasks that could free descriptors.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    pub fn failed(&mut self) -> Duration {
        let d = Duration::from_millis(10) * 2u32.saturating_pow(self.failures.min(7));
        self.failures = self.failures.saturating_add(1);
        d.min(Duration::from_secs(1))
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
    }
}

/// Whether an accept error concerns only the connection being accepted
/// (it is gone: try the next at once) rather than the process.
fn only_that_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || matches!(e.raw_os_error(), Some(libc::EPROTO | libc::EPERM))
}

/// Counters the listener keeps, for its periodic summary and for tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub open: AtomicUsize,
    pub refused: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub idle_closed: AtomicU64,
    pub accept_errors: AtomicU64,
}

/// What a connection is doing, shared by its IO and the RPCs on it.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// When the last RPC ended (or the connection was made).
    idle_since: Mutex<Instant>,
    /// The connection's reader, woken when it goes idle so its deadline is armed.
    waker: AtomicWaker,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            waker: AtomicWaker::new(),
        }
    }

    /// An RPC started; it counts until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> RpcGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        RpcGuard(self.clone())
    }

    fn idle_since(&self) -> Instant {
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Holds an RPC open on its connection's count.
#[derive(Debug)]
pub struct RpcGuard(Arc<Activity>);

impl Drop for RpcGuard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
            self.0.waker.wake();
        }
    }
}

/// What the RPCs of a connection learn about it (a request extension).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub activity: Arc<Activity>,
}

/// Frees the connection's place in the counts when it closes.
struct Slot {
    admission: Arc<Mutex<Admission>>,
    counters: Arc<Counters>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(self.ip);
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An accepted TLS connection that closes itself once no RPC has been
/// open on it for the idle timeout (gRPC's "max connection idle").
pub struct Conn {
    io: TlsStream<TcpStream>,
    info: ConnInfo,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    counters: Arc<Counters>,
    _slot: Slot,
}

impl Conn {
    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let activity = &self.info.activity;
        activity.waker.register(cx.waker());
        if activity.in_flight.load(Ordering::SeqCst) > 0 {
            return Poll::Pending;
        }
        let deadline = activity.idle_since() + self.idle_timeout;
        if self.idle.deadline() != deadline {
            self.idle.as_mut().reset(deadline);
        }
        if self.idle.as_mut().poll(cx).is_ready() && activity.in_flight.load(Ordering::SeqCst) == 0
        {
            self.counters.idle_closed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %self.info.remote, "closing an idle connection (limits.idle_timeout)");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no RPC for limits.idle_timeout",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending => this.check_idle(cx),
            ready => ready,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// The limits the accept loop applies (from `[limits]`, the connection
/// count already fitted to the file descriptor limit).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Limits {
    pub fn from_config(c: &LimitsConfig, max_connections: usize) -> Self {
        Self {
            max_connections,
            max_connections_per_ip: c.max_connections_per_ip,
            handshake_timeout: c.handshake_timeout,
            idle_timeout: c.idle_timeout,
        }
    }
}

/// Accepts until `shutdown`, handing each connection that finished its TLS
/// handshake in time to `out` (the gRPC server's incoming stream).
pub async fn run(
    listener: TcpListener,
    tls: TlsAcceptor,
    limits: Limits,
    counters: Arc<Counters>,
    out: mpsc::Sender<Result<Conn, io::Error>>,
    shutdown: CancellationToken,
) {
    let admission = Arc::new(Mutex::new(Admission::default()));
    let mut refused_log = LogGate::new(Duration::from_secs(10));
    let mut error_log = LogGate::new(Duration::from_secs(10));
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                backoff.succeeded();
                a
            }
            Err(e) if only_that_connection(&e) => continue,
            Err(e) => {
                counters.accept_errors.fetch_add(1, Ordering::Relaxed);
                let wait = backoff.failed();
                if let Some(n) = error_log.hit(std::time::Instant::now()) {
                    tracing::warn!(error = %e, failures = n, retry_in = ?wait, open = counters.open.load(Ordering::Relaxed),
                        "cannot accept connections (out of file descriptors? see limits.max_connections and LimitNOFILE); backing off");
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        let ip = peer.ip().to_canonical();
        let admitted = admission.lock().unwrap_or_else(|e| e.into_inner()).admit(
            ip,
            limits.max_connections,
            limits.max_connections_per_ip,
        );
        if let Err(why) = admitted {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            drop(tcp);
            if let Some(n) = refused_log.hit(std::time::Instant::now()) {
                tracing::warn!(%peer, refused = n, "connection limit reached: {why}; new connections are closed at once");
            }
            continue;
        }
        counters.open.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            admission: admission.clone(),
            counters: counters.clone(),
            ip,
        };
        let _ = tcp.set_nodelay(true);
        let (tls, out, counters, limits) =
            (tls.clone(), out.clone(), counters.clone(), limits.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(limits.handshake_timeout, tls.accept(tcp)).await {
                Ok(Ok(io)) => {
                    let conn = Conn {
                        io,
                        info: ConnInfo {
                            remote: peer,
                            activity: Arc::new(Activity::new()),
                        },
                        idle_timeout: limits.idle_timeout,
                        idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                        counters,
                        _slot: slot,
                    };
                    let _ = out.send(Ok(conn)).await;
                }
                Ok(Err(e)) => {
                    counters.handshake_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    counters.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "TLS handshake not done within limits.handshake_timeout; closed");
                }
            }
        });
    }
}

/// Logs, every `every`, what the limits did since the last line (nothing
/// when nothing happened).
pub async fn report(counters: Arc<Counters>, every: Duration, shutdown: CancellationToken) {
    let mut last = (0, 0, 0);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = (
            counters.idle_closed.load(Ordering::Relaxed),
            counters.handshake_timeouts.load(Ordering::Relaxed),
            counters.refused.load(Ordering::Relaxed),
        );
        if now != last {
            tracing::info!(
                open = counters.open.load(Ordering::Relaxed),
                idle_closed = now.0 - last.0,
                handshake_timeouts = now.1 - last.1,
                refused = now.2 - last.2,
                "connections closed by the limits in the last {}",
                humantime::format_duration(every)
            );
            last = now;
        }
    }
}

/// A tower layer that counts every RPC as open on its connection until its
/// response body is done, so the connection's idle deadline only runs while
/// none is open.
#[derive(Debug, Clone, Default)]
pub struct TrackRpcsLayer;

impl<S> tower::Layer<S> for TrackRpcsLayer {
    type Service = TrackRpcs<S>;

    fn layer(&self, inner: S) -> TrackRpcs<S> {
        TrackRpcs { inner }
    }
}

#[derive(Debug, Clone)]
pub struct TrackRpcs<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody> tower::Service<http::Request<ReqBody>> for TrackRpcs<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.activity.start());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            Ok(match guard {
                Some(guard) => res.map(|body| {
                    tonic::body::Body::new(Guarded {
                        inner: body,
                        _guard: guard,
                    })
                }),
                None => res,
            })
        })
    }
}

/// A response body that keeps its RPC counted until it is dropped.
struct Guarded {
    inner: tonic::body::Body,
    _guard: RpcGuard,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_caps_all_and_each_address_and_frees_on_release() {
        let a: IpAddr = [192, 0, 2, 1].into();
        let b: IpAddr = [192, 0, 2, 2].into();
        let mut adm = Admission::default();
        for _ in 0..2 {
            adm.admit(a, 3, 2).unwrap();
        }
        assert_eq!(adm.admit(a, 3, 2), Err(Refused::PerIp { ip: a, limit: 2 }));
        adm.admit(b, 3, 2).unwrap();
        assert_eq!(adm.admit(b, 3, 2), Err(Refused::Total { limit: 3 }));
        adm.release(a);
        adm.admit(b, 3, 2).unwrap();
        assert_eq!(adm.total(), 3);
        for ip in [a, b, b] {
            adm.release(ip);
        }
        assert_eq!(adm.total(), 0);
        assert!(adm.per_ip.is_empty(), "no entry left for a gone address");
        // A release of an address holding nothing changes nothing.
        adm.release(a);
        assert_eq!(adm.total(), 0);
    }

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut b = AcceptBackoff::default();
        let waits: Vec<_> = (0..10).map(|_| b.failed().as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(10));
    }

    #[test]
    fn fitted_connections_stay_under_the_descriptor_limit() {
        let (n, soft) = fit_connections(usize::MAX);
        assert!(soft > RESERVED_FDS, "{soft}");
        assert_eq!(n as u64, soft - RESERVED_FDS);
        assert_eq!(fit_connections(10).0, 10);
    }

    /// EMFILE for real: a listener whose accept fails because this task's
    /// process has no descriptor left is retried with backoff, not in a
    /// loop. Run in a child process so the lowered limit touches no other test.
    #[test]
    fn out_of_descriptors_backs_off_instead_of_spinning() {
        if std::env::var_os("WARDEN_EMFILE_CHILD").is_none() {
            let exe = std::env::current_exe().unwrap();
            let out = std::process::Command::new(exe)
                .args([
                    "--exact",
                    "listener::tests::out_of_descriptors_backs_off_instead_of_spinning",
                    "--nocapture",
                ])
                .env("WARDEN_EMFILE_CHILD", "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{text}");
            assert!(text.contains("accept_errors="), "{text}");
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (cert, key) = test_cert();
            let tls = acceptor(&cert, &key).unwrap();
            let counters = Arc::new(Counters::default());
            let (tx, _rx) = mpsc::channel(8);
            let shutdown = CancellationToken::new();
            // Every descriptor but a few is taken; the client sockets below take the rest.
            let mut hold = Vec::new();
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            // SAFETY: sets this child process's own limit.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
            while let Ok(f) = std::fs::File::open("/dev/null") {
                hold.push(f);
            }
            // Three free: two clients (their sockets) and one the accept would need.
            for _ in 0..3 {
                hold.pop();
            }
            let c1 = std::net::TcpStream::connect(addr).unwrap();
            let c2 = std::net::TcpStream::connect(addr).unwrap();
            hold.push(std::fs::File::open("/dev/null").unwrap());
            let task = tokio::spawn(run(
                listener,
                tls,
                Limits {
                    max_connections: 1000,
                    max_connections_per_ip: 1000,
                    handshake_timeout: Duration::from_secs(30),
                    idle_timeout: Duration::from_secs(30),
                },
                counters.clone(),
                tx,
                shutdown.clone(),
            ));
            let cpu = || {
                let mut u = unsafe { std::mem::zeroed::<libc::rusage>() };
                // SAFETY: fills the struct passed.
                unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
                Duration::from_micros(
                    (u.ru_utime.tv_sec * 1_000_000 + u.ru_utime.tv_usec) as u64
                        + (u.ru_stime.tv_sec * 1_000_000 + u.ru_stime.tv_usec) as u64,
                )
            };
            let cpu0 = cpu();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let spent = cpu() - cpu0;
            let errors = counters.accept_errors.load(Ordering::Relaxed);
            println!("accept_errors={errors} cpu={spent:?}");
            // Backoff: 10+20+...+1000 ms covers 2 s in about 10 tries; a spin makes millions.
            assert!((1..=40).contains(&errors), "{errors} accept errors in 2 s");
            assert!(
                spent < Duration::from_millis(500),
                "{spent:?} of CPU in 2 s"
            );
            // Descriptors come back: the waiting connections are accepted.
            hold.clear();
            let deadline = Instant::now() + Duration::from_secs(20);
            while counters.open.load(Ordering::Relaxed) < 2 {
                assert!(
                    Instant::now() < deadline,
                    "not accepted once descriptors were free"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            shutdown.cancel();
            let _ = task.await;
            drop((c1, c2));
        });
    }

    fn test_cert() -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }
}
