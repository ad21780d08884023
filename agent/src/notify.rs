//! systemd's notification protocol (`Type=notify`): READY once the agent
//! is up, STATUS lines, and WATCHDOG pings at half the `WatchdogSec`
//! period. Without `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::{os::unix::net::UnixDatagram, time::Duration};

/// Where systemd listens, if it does: a path, or `@name` for the abstract namespace.
#[derive(Debug, Clone)]
pub struct Notifier {
    socket: Option<String>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`,
    /// `WATCHDOG_PID`); the watchdog applies only if it names this process.
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty());
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// Sends one notification (`READY=1`, `STATUS=…`, `WATCHDOG=1`, `STOPPING=1`).
    pub fn send(&self, state: &str) {
        let Some(path) = &self.socket else { return };
        let Ok(sock) = UnixDatagram::unbound() else {
            return;
        };
        let sent = if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
        } else {
            sock.send_to(state.as_bytes(), path)
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, socket = %path, "systemd notification not sent");
        }
    }

    /// How often to ping the watchdog: half its period, if there is one.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }
}

/// `RELOADING=1` with the monotonic time systemd 253 and later ask for
/// beside it (older versions ignore the field).
pub fn reloading() -> String {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000;
    format!("RELOADING=1\nMONOTONIC_USEC={usec}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let n = Notifier {
            socket: Some(path.display().to_string()),
            watchdog: Some(Duration::from_secs(30)),
        };
        n.send("READY=1");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
        // Not under systemd: nothing happens, nothing fails.
        Notifier {
            socket: None,
            watchdog: None,
        }
        .send("READY=1");
    }
}
