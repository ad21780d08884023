//! Starts the coordinator: the agents' TLS endpoint (Uplink, health,
//! reflection) and the admin unix socket (Admin, reflection).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_reflection::server::{v1, v1alpha};
use warden_proto::{
    dsse::{Signer, VerifyingKey},
    identity::{self, IdentityError},
    pb::{
        admin_server::AdminServer, link_probe_server::LinkProbeServer, uplink_server::UplinkServer,
    },
    FILE_DESCRIPTOR_SET, PUBLIC_FILE_DESCRIPTOR_SET,
};
use warden_state::{
    dir::{self, DirError},
    lock::{DirLock, LockError},
    socket::SocketError,
};

use crate::{
    admin::AdminService,
    config::{ConfigError, CoordinatorConfig},
    enrollment::{EnrollRate, Policy},
    listener::{self, Counters, TlsSetupError, TrackRpcsLayer},
    probe::ProbeService,
    ratelimit::NodeThrottle,
    registry::Registry,
    replicas::Replica,
    session::{Gate, UplinkService},
    store::{Store, StoreError},
};

/// Largest envelope accepted from an agent (a 4 MiB payload and its signature).
pub const MAX_MESSAGE_BYTES: usize = (4 << 20) + 4096;

/// HTTP/2 receive window of an agent's connection and stream: at most this
/// much sent and not yet read per connection, however many records its
/// agent has to send (a read chunk holds about as much again).
pub const RECEIVE_WINDOW_BYTES: u32 = 128 << 10;

/// Why the coordinator could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("coordinator key file {} is not an Ed25519 PKCS#8 key ({reason}); restore it from backup. Moving it aside makes the coordinator create a new key at the next start: every agent pins the old public key (coordinator.public_key) and ignores this coordinator's receipts and commands until its config names the new one, and the receipts and verdicts signed so far verify only with the old key", path.display())]
    CoordinatorKey { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("admin_socket: {0}")]
    AdminSocket(SocketError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// TLS material for the agents' endpoint, PEM.
pub struct TlsPem {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl TlsPem {
    /// Reads the certificate and key files named in the config.
    pub fn from_config(cfg: &CoordinatorConfig) -> Result<Self, ServeError> {
        let (cert, key) = cfg.tls_paths()?;
        let read = |what, path: PathBuf| {
            std::fs::read(&path).map_err(|source| ServeError::Io { what, path, source })
        };
        Ok(Self {
            cert: read("TLS certificate (tls.cert)", cert)?,
            key: read("TLS key (tls.key)", key)?,
        })
    }
}

/// A running coordinator.
pub struct Running {
    /// The address agents connect to (the real port when 0 was asked for).
    pub addr: SocketAddr,
    pub admin_socket: PathBuf,
    pub public_key: VerifyingKey,
    /// Where it stores: the SQLite file, or the PostgreSQL database
    /// (without its password).
    pub database: String,
    /// What the connection limits did so far.
    pub connections: Arc<Counters>,
    /// The connection cap in force (`limits.max_connections`, fitted under
    /// the file descriptor limit).
    pub max_connections: usize,
    tasks: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    /// The state directory's and (SQLite's) the database's, held until
    /// the servers stop.
    _locks: Vec<DirLock>,
}

impl Running {
    /// Waits for both servers to stop (after the shutdown token fires).
    pub async fn wait(self) -> Result<(), ServeError> {
        for t in self.tasks {
            match t.await {
                Ok(r) => r?,
                Err(e) => tracing::error!(error = %e, "server task panicked"),
            }
        }
        Ok(())
    }
}

/// Binds both endpoints and serves until `shutdown` is cancelled.
pub async fn start(
    cfg: &CoordinatorConfig,
    tls: TlsPem,
    shutdown: CancellationToken,
) -> Result<Running, ServeError> {
    // Checked first: a coordinator that would be open by accident does not start.
    let policy = cfg.enrollment_policy()?;
    let acceptor = listener::acceptor(&tls.cert, &tls.key)?;
    cfg.check_paths()?;
    // One coordinator per state directory and per SQLite file: a second
    // would answer the same nodes from the same rows. The file may live
    // elsewhere, so it has its own lock beside it. Replicas share a
    // PostgreSQL database by design, each with its own state directory.
    dir::ensure_private(&cfg.state_dir)?;
    let postgres = cfg.postgres_target()?;
    let database = cfg.database_path();
    let mut locks = vec![DirLock::acquire(
        &cfg.lock_path(),
        format!(
            "the coordinator state directory {}",
            cfg.state_dir.display()
        ),
    )?];
    if postgres.is_none() {
        locks.push(DirLock::acquire(
            &cfg.database_lock_path(),
            format!("the coordinator database {}", database.display()),
        )?);
    }
    let (signer, created) = load_signing_key(&cfg.key_path())?;
    if created {
        tracing::info!(key = %cfg.key_path().display(), "created coordinator signing key");
    }
    let public_key = signer.verifying_key();
    // Beside the key, the half verifiers pin (`warden coordinator key`
    // prints the same; the log says it at every start).
    let pub_path = cfg.state_dir.join("coordinator.pub");
    let text = format!("{}\n", public_key.to_base64());
    if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(text.as_str()) {
        if let Err(e) = warden_state::file::write_private(&pub_path, text.as_bytes()) {
            tracing::warn!(path = %pub_path.display(), error = %e, "cannot write the coordinator's public key");
        }
    }
    tracing::info!(key = %public_key.to_base64(), key_id = %public_key.key_id(), "coordinator signing key (verifiers pin it: `warden coordinator key`)");
    // Bound before the database is opened: a path that is not ours to take
    // stops the start with nothing touched.
    let admin_socket = cfg.admin_socket_path();
    let (admin_listener, admin_file) =
        warden_state::socket::bind(&admin_socket).map_err(ServeError::AdminSocket)?;
    let (store, database) = match postgres.clone() {
        Some(target) => {
            let shown = target.to_string();
            let connections = cfg.postgres.as_ref().map_or(1, |p| p.connections);
            let store = Store::open_postgres(target, cfg.limits.node_storage_bytes, connections)?;
            (store, shown)
        }
        None => {
            let store = Store::open_with_quota(&database, cfg.limits.node_storage_bytes)?;
            (store, database.display().to_string())
        }
    };
    tracing::info!(database = %database, "store opened");
    let (max_connections, nofile) = listener::fit_connections(cfg.limits.max_connections);
    if max_connections < cfg.limits.max_connections {
        tracing::warn!(
            wanted = cfg.limits.max_connections,
            nofile,
            "limits.max_connections lowered to {max_connections} to stay under the open-file limit; raise LimitNOFILE (systemd) or ulimit -n"
        );
    }
    let gate = Gate::new(
        Policy::new(policy, &cfg.enrollment),
        EnrollRate::new(
            cfg.enrollment.new_nodes_per_minute,
            cfg.enrollment.new_nodes_per_minute_per_ip,
            std::time::Instant::now(),
        ),
        NodeThrottle::new(
            cfg.limits.node_envelopes_per_second,
            cfg.limits.node_bytes_per_second,
        ),
    );
    if policy == crate::config::EnrollmentPolicy::Open {
        tracing::warn!("enrollment.policy is open: any TLS client may register a node");
    }

    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: cfg.listen,
        source,
    })?;

    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<UplinkServer<UplinkService>>().await;
    health.set_serving::<LinkProbeServer<ProbeService>>().await;
    let (reflection, reflection_v1alpha) = reflection_services(PUBLIC_FILE_DESCRIPTOR_SET)?;
    let signer = Arc::new(signer);
    // Replicas share one PostgreSQL; a coordinator on SQLite is alone.
    let (replica, registry) = match postgres {
        Some(target) => {
            let replica = Replica::fresh();
            let registry =
                Registry::new(signer.clone()).with_relay(store.clone(), replica.id.clone());
            replica.start(target, registry.clone(), shutdown.clone());
            (replica, registry)
        }
        None => (Replica::alone(), Registry::new(signer.clone())),
    };
    let (challenge_store, challenge_registry, challenge_signer) =
        (store.clone(), registry.clone(), signer.clone());
    let work = crate::workissuer::Work::new(
        cfg.work_challenge
            .enabled
            .then(|| cfg.work_challenge.settings()),
    );
    let work_issuer = tokio::spawn(crate::workissuer::run(
        work.clone(),
        store.clone(),
        registry.clone(),
        signer.clone(),
        shutdown.clone(),
    ));
    let uplink = UplinkServer::new(
        UplinkService::new(
            signer.clone(),
            store.clone(),
            registry.clone(),
            shutdown.clone(),
            cfg.leases.min_coverage,
            gate,
        )
        .with_work(work.clone()),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES);

    // Connections come from our own accept loop (limits, deadlines), TLS done.
    let counters = Arc::new(Counters::default());
    let (conns, incoming) = tokio::sync::mpsc::channel(64);
    let accept = tokio::spawn(listener::run(
        listener,
        acceptor,
        listener::Limits::from_config(&cfg.limits, max_connections),
        counters.clone(),
        conns,
        shutdown.clone(),
    ));
    let report = tokio::spawn(listener::report(
        counters.clone(),
        Duration::from_secs(60),
        shutdown.clone(),
    ));
    let grpc = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // An agent needs one stream (the probe opens its own connection).
        .max_concurrent_streams(Some(32))
        // What a connection may have sent and not yet been read: an agent
        // emptying its spool fills it, and every connection may at once
        // (hyper's default is 1 MiB each, 8 GiB for 8,192 connections).
        .initial_stream_window_size(Some(RECEIVE_WINDOW_BYTES))
        .initial_connection_window_size(Some(RECEIVE_WINDOW_BYTES))
        .layer(TrackRpcsLayer)
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(uplink)
        .add_service(LinkProbeServer::new(ProbeService::default()))
        .serve_with_incoming_shutdown(
            ReceiverStream::new(incoming),
            shutdown.clone().cancelled_owned(),
        );

    let hiring = crate::hiring::Hiring::new(
        crate::control::LeaseControl {
            store: store.clone(),
            registry: registry.clone(),
        },
        cfg.clusters.min_duration,
        cfg.clusters.replace_after,
    )
    .with_work(work.clone());
    let expiry = tokio::spawn(hiring.clone().run_upkeep(
        Duration::from_secs(1),
        replica.clone(),
        shutdown.clone(),
    ));
    // The admin socket's reflection describes Admin too (`grpcurl -unix`).
    let (admin_reflection, admin_reflection_v1alpha) = reflection_services(FILE_DESCRIPTOR_SET)?;
    let admin = Server::builder()
        .add_service(admin_reflection)
        .add_service(admin_reflection_v1alpha)
        .add_service(AdminServer::new(AdminService::new(
            store, registry, signer, hiring,
        )))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(admin_listener),
            shutdown.clone().cancelled_owned(),
        );
    // The socket file goes when its server stops (if it is still ours).
    let admin = async move {
        let served = admin.await;
        drop(admin_file);
        served
    };

    let challenges = tokio::spawn(crate::challenge::run(
        challenge_store,
        challenge_registry,
        challenge_signer,
        cfg.leases.clone(),
        shutdown.clone(),
    ));
    tracing::info!(%addr, admin = %admin_socket.display(), key = %public_key.to_base64(), enrollment = ?policy, max_connections, replica = %replica.id, "coordinator listening");
    Ok(Running {
        addr,
        admin_socket,
        public_key,
        database,
        connections: counters,
        max_connections,
        tasks: vec![
            tokio::spawn(grpc),
            tokio::spawn(admin),
            tokio::spawn(async move {
                let _ = tokio::join!(challenges, accept, report, expiry, work_issuer);
                Ok(())
            }),
        ],
        _locks: locks,
    })
}

/// Reflection over `descriptors` (and health's) in both versions: v1, and
/// v1alpha for the tools that still ask only that (grpcurl, grpcui, Postman,
/// Python's grpc_reflection). Each lists both reflection services.
fn reflection_services(
    descriptors: &'static [u8],
) -> Result<
    (
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    ),
    ServeError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// Loads or creates the coordinator's signing key. A damaged key file gets a
/// message saying what replacing it does to agents (the shared loader's
/// speaks of a node's key).
pub fn load_signing_key(path: &std::path::Path) -> Result<(Signer, bool), ServeError> {
    identity::load_or_create(path).map_err(|e| match e {
        IdentityError::NotAKey { path, reason } => ServeError::CoordinatorKey { path, reason },
        other => ServeError::Identity(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_damaged_coordinator_key_says_what_a_new_key_means_for_agents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.key");
        std::fs::write(&path, [0x30, 0x53, 0x02]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let msg = load_signing_key(&path).err().unwrap().to_string();
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        assert!(!msg.contains("node id"), "{msg}");
        assert!(msg.contains("coordinator.public_key"), "{msg}");
        // A good key loads.
        std::fs::remove_file(&path).unwrap();
        assert!(load_signing_key(&path).unwrap().1);
        assert!(!load_signing_key(&path).unwrap().1);
    }
}
