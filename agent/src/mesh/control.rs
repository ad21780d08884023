//! The interface's UAPI socket (`/var/run/wireguard/IFNAME.sock`), so
//! stock `wg show` and `wg set` drive it exactly as they drive
//! wireguard-go. Requests are parsed by `uapi` and applied by the device.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;

use super::{device::Device, uapi};

/// Where `wg` looks for interface `name`.
pub fn socket_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// The directory `wg` searches.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// Largest request read (the parser refuses more anyway).
const MAX_REQUEST: usize = 1 << 20;

/// Binds the socket (mode 0600; the directory is made 0700 if it is new),
/// replacing only a stale socket: a live one (wireguard-go running the same
/// interface name) or anything that is not a socket is an error.
pub fn bind(
    path: &Path,
) -> Result<(UnixListener, warden_state::socket::SocketFile), warden_state::socket::SocketError> {
    warden_state::socket::bind(path)
}

/// Serves requests until `shutdown`, then removes the socket (if it is
/// still this one).
pub async fn serve(
    listener: UnixListener,
    file: warden_state::socket::SocketFile,
    dev: Arc<Device>,
    shutdown: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = shutdown.cancelled() => break,
        };
        if let Ok((stream, _)) = conn {
            let dev = dev.clone();
            tokio::spawn(async move {
                let _ = answer(stream, &dev).await;
            });
        }
    }
    drop(file);
}

/// Answers each request on one connection until the client closes it.
async fn answer(mut stream: UnixStream, dev: &Device) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // A request ends at its first empty line.
        let end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\n\n") {
                break i + 2;
            }
            if buf.len() > MAX_REQUEST {
                stream
                    .write_all(uapi::render_errno(uapi::ERRNO_INVALID).as_bytes())
                    .await?;
                return Ok(());
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let request: Vec<u8> = buf.drain(..end).collect();
        let text = String::from_utf8_lossy(&request);
        let reply = match uapi::parse_request(&text) {
            Ok(uapi::Request::Get) => uapi::render_get(&dev.view()),
            Ok(uapi::Request::Set(ops)) => uapi::render_errno(dev.apply(&ops).await),
            Err(e) => {
                tracing::warn!(error = %e, "refused a UAPI request");
                uapi::render_errno(e.errno())
            }
        };
        stream.write_all(reply.as_bytes()).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn roundtrip(path: &Path, req: &str) -> String {
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        while !out.ends_with(b"\n\n") {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn set_then_get_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path(), "wgtest");
        let dev = Arc::new(Device::new("127.0.0.1".parse().unwrap()));
        let stop = CancellationToken::new();
        let (listener, file) = bind(&path).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&path).unwrap().permissions()
            ) & 0o777,
            0o600
        );
        let task = tokio::spawn(serve(listener, file, dev, stop.clone()));
        let key = hex::encode([7u8; 32]);
        let peer = hex::encode(crate::mesh::device::public_of([8; 32]));
        let set = format!(
            "set=1\nprivate_key={key}\nlisten_port=0\npublic_key={peer}\nendpoint=127.0.0.1:51999\nallowed_ip=10.9.0.2/32\n\n"
        );
        assert_eq!(roundtrip(&path, &set).await, "errno=0\n\n");
        let got = roundtrip(&path, "get=1\n\n").await;
        assert!(got.contains(&format!("private_key={key}\n")), "{got}");
        assert!(got.contains(&format!("public_key={peer}\n")), "{got}");
        assert!(got.contains("allowed_ip=10.9.0.2/32\n"), "{got}");
        assert!(got.contains("endpoint=127.0.0.1:51999\n"), "{got}");
        assert!(got.ends_with("errno=0\n\n"), "{got}");
        // Malformed input: an errno, and the socket goes on serving.
        assert_eq!(
            roundtrip(&path, "set=1\nbogus=1\n\n").await,
            "errno=-22\n\n"
        );
        assert!(roundtrip(&path, "get=1\n\n").await.ends_with("errno=0\n\n"));
        stop.cancel();
        task.await.unwrap();
        assert!(!path.exists(), "the socket is removed at shutdown");
    }
}
