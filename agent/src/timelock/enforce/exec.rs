//! The executor: ends one foreign process with SIGTERM, a grace period,
//! then SIGKILL, and says what happened.
//!
//! The process is named by pid *and* start time (field 22 of
//! `/proc/PID/stat`), so a pid recycled since the scan is never signalled.
//! On Linux 5.3 and later the process is held by a pidfd: opened first,
//! then the start time is checked, and every signal and the wait for exit go
//! through that descriptor, so no pid reuse can slip in between. On older
//! kernels (`pidfd_open` gives `ENOSYS`) the start time is checked before
//! each `kill(2)`, and exit is polled every 10 ms from `/proc/PID/stat`; a
//! pid recycled in the microseconds between check and signal is the
//! remaining risk there.
//!
//! "Exited" means gone from procfs, recycled, or a zombie (state `Z`: dead,
//! not yet reaped by its parent; it holds no device any more).

use std::{io, os::fd::OwnedFd, path::Path, time::Duration};

use rustix::process::{Pid, PidfdFlags, Signal};
use tokio::io::{unix::AsyncFd, Interest};

use crate::{now_ms, timelock::procs};

/// How long `kill_process` waits for a process to go after SIGKILL. A
/// process stuck in the kernel (state `D`, common with a wedged GPU driver)
/// does not die until the call it is in returns.
pub const KILL_CONFIRM: Duration = Duration::from_secs(5);

/// How often exit is polled when there is no pidfd.
const POLL: Duration = Duration::from_millis(10);

/// What `kill_process` did, with wall-clock times in ms since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillOutcome {
    pub pid: u32,
    /// When SIGTERM was sent; `None` if it was not (the process was
    /// already gone, refused, or not ours to signal).
    pub sigterm_at_ms: Option<i64>,
    /// When SIGKILL was sent, if it was.
    pub sigkill_at_ms: Option<i64>,
    /// When the process was seen to have exited, if it was.
    pub exited_at_ms: Option<i64>,
    pub outcome: KillResult,
}

/// How a `kill_process` call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillResult {
    /// It exited within the grace period after SIGTERM.
    ExitedAfterSigterm,
    /// It outlived the grace period and exited after SIGKILL.
    Killed,
    /// It was gone (or a zombie) before anything was sent.
    AlreadyGone,
    /// The pid now names another process (another start time): nothing sent.
    PidReused,
    /// The kernel refused the signal (`EPERM`): the agent lacks the
    /// privilege (not root, or a process of another user namespace).
    PermissionDenied,
    /// pid 0, pid 1, the agent itself or a pid that does not fit a
    /// `pid_t`: never signalled.
    Refused,
    /// Still there `KILL_CONFIRM` after SIGKILL (stuck in the kernel).
    SurvivedSigkill,
    /// An unexpected error from the kernel.
    Error(String),
}

impl std::fmt::Display for KillResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ExitedAfterSigterm => f.write_str("exited after SIGTERM"),
            Self::Killed => f.write_str("killed"),
            Self::AlreadyGone => f.write_str("already gone"),
            Self::PidReused => f.write_str("pid reused"),
            Self::PermissionDenied => f.write_str("permission denied"),
            Self::Refused => f.write_str("refused"),
            Self::SurvivedSigkill => f.write_str("survived SIGKILL"),
            Self::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// Ends process `pid` started at `start_time` (field 22 of its
/// `/proc/PID/stat`): SIGTERM, up to `grace` for it to exit, then SIGKILL
/// and up to [`KILL_CONFIRM`] for it to go. `grace` zero sends SIGKILL
/// right after SIGTERM. Never signals pid 0, pid 1 or the calling process.
/// Returns when the process is gone or the waits are over: up to
/// `grace + KILL_CONFIRM`, so a caller handling several spawns one task each.
/// Runs on a tokio runtime with I/O enabled (the pidfd is registered with
/// its reactor).
pub async fn kill_process(pid: u32, start_time: u64, grace: Duration) -> KillOutcome {
    kill_with(pid, start_time, grace, true).await
}

/// `kill_process`, with the pidfd path or (for tests) the polling one.
async fn kill_with(pid: u32, start_time: u64, grace: Duration, use_pidfd: bool) -> KillOutcome {
    let mut out = KillOutcome {
        pid,
        sigterm_at_ms: None,
        sigkill_at_ms: None,
        exited_at_ms: None,
        outcome: KillResult::AlreadyGone,
    };
    if pid <= 1 || pid > i32::MAX as u32 || pid == std::process::id() {
        out.outcome = KillResult::Refused;
        return out;
    }
    let target = match Target::open(pid, start_time, use_pidfd) {
        Ok(t) => t,
        Err(result) => {
            out.outcome = result;
            return out;
        }
    };

    if let Err(result) = target.signal(Signal::TERM) {
        out.outcome = result;
        return out;
    }
    out.sigterm_at_ms = Some(now_ms());
    if !grace.is_zero() && target.wait_exit(grace).await {
        out.exited_at_ms = Some(now_ms());
        out.outcome = KillResult::ExitedAfterSigterm;
        return out;
    }

    match target.signal(Signal::KILL) {
        Ok(()) => out.sigkill_at_ms = Some(now_ms()),
        // It went between the end of the wait and SIGKILL.
        Err(KillResult::AlreadyGone | KillResult::PidReused) => {
            out.exited_at_ms = Some(now_ms());
            out.outcome = KillResult::ExitedAfterSigterm;
            return out;
        }
        Err(result) => {
            out.outcome = result;
            return out;
        }
    }
    if target.wait_exit(KILL_CONFIRM).await {
        out.exited_at_ms = Some(now_ms());
        out.outcome = KillResult::Killed;
    } else {
        out.outcome = KillResult::SurvivedSigkill;
    }
    out
}

/// Whether the process we mean is still running.
#[derive(Debug, PartialEq)]
enum Liveness {
    Running,
    /// Gone, or a zombie.
    Exited,
    /// The pid is another process's.
    Reused,
}

fn liveness(pid: u32, start_time: u64) -> Liveness {
    match procs::read_stat(Path::new("/proc"), pid) {
        None => Liveness::Exited,
        Some(s) if s.start_time != start_time => Liveness::Reused,
        Some(s) if s.exited() => Liveness::Exited,
        Some(_) => Liveness::Running,
    }
}

/// The process to end: through a pidfd, or by pid with a start-time check.
enum Target {
    Pidfd(AsyncFd<OwnedFd>),
    Pid { pid: u32, start_time: u64 },
}

impl Target {
    /// Takes hold of the process, checking it is the one meant and running.
    fn open(pid: u32, start_time: u64, use_pidfd: bool) -> Result<Target, KillResult> {
        let fd = if use_pidfd {
            rustix::process::pidfd_open(as_pid(pid)?, PidfdFlags::empty()).map_err(io::Error::from)
        } else {
            Err(io::Error::from_raw_os_error(libc::ENOSYS))
        };
        let fd = match fd {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Err(KillResult::AlreadyGone),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => None,
            Err(e) => return Err(KillResult::Error(format!("pidfd_open({pid}): {e}"))),
        };
        // Checked after the pidfd is open: if the process meant is running
        // now, it was running when the pidfd was opened, so the pidfd is its.
        match liveness(pid, start_time) {
            Liveness::Running => {}
            Liveness::Exited => return Err(KillResult::AlreadyGone),
            Liveness::Reused => return Err(KillResult::PidReused),
        }
        // SAFETY: the `OwnedFd` is a valid open descriptor, owned by the
        // `AsyncFd` for its whole life and never replaced.
        match fd.map(|fd| unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }) {
            Some(Ok(afd)) => Ok(Target::Pidfd(afd)),
            // epoll refused it: fall back to polling.
            _ => Ok(Target::Pid { pid, start_time }),
        }
    }

    fn signal(&self, sig: Signal) -> Result<(), KillResult> {
        let sent = match self {
            Target::Pidfd(afd) => rustix::process::pidfd_send_signal(afd.get_ref(), sig),
            Target::Pid { pid, start_time } => match liveness(*pid, *start_time) {
                Liveness::Running => rustix::process::kill_process(as_pid(*pid)?, sig),
                Liveness::Exited => return Err(KillResult::AlreadyGone),
                Liveness::Reused => return Err(KillResult::PidReused),
            },
        };
        let Err(e) = sent else {
            return Ok(());
        };
        let e = io::Error::from(e);
        Err(match e.raw_os_error() {
            Some(libc::ESRCH) => KillResult::AlreadyGone,
            Some(libc::EPERM) => KillResult::PermissionDenied,
            _ => KillResult::Error(format!("signal {}: {e}", sig.as_raw())),
        })
    }

    /// Waits up to `limit` for the process to exit; true if it did.
    async fn wait_exit(&self, limit: Duration) -> bool {
        match self {
            // A pidfd turns readable when its process exits (zombie or reaped).
            Target::Pidfd(afd) => {
                matches!(tokio::time::timeout(limit, afd.readable()).await, Ok(Ok(_)))
            }
            Target::Pid { pid, start_time } => {
                let deadline = tokio::time::Instant::now() + limit;
                loop {
                    if liveness(*pid, *start_time) != Liveness::Running {
                        return true;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return false;
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }
}

/// `pid` as the kernel's type; `kill_with` refused pids outside
/// 2..=i32::MAX before any call gets here.
fn as_pid(pid: u32) -> Result<Pid, KillResult> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(KillResult::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{BufRead, BufReader},
        process::{Child, Command, Stdio},
    };

    /// A child killed and reaped on drop.
    struct Reaped(Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn start_time(pid: u32) -> u64 {
        procs::read_stat(Path::new("/proc"), pid)
            .unwrap()
            .start_time
    }

    /// A shell that ignores SIGTERM, once it has said so.
    fn stubborn() -> Reaped {
        let mut child = Reaped(
            Command::new("sh")
                .args([
                    "-c",
                    "trap '' TERM; echo ready; while :; do sleep 0.05; done",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ready\n");
        child
    }

    async fn exits_after_sigterm(use_pidfd: bool) {
        let mut child = Reaped(Command::new("sleep").arg("30").spawn().unwrap());
        let pid = child.0.id();
        let out = kill_with(pid, start_time(pid), Duration::from_secs(10), use_pidfd).await;
        assert_eq!(out.outcome, KillResult::ExitedAfterSigterm, "{out:?}");
        assert_eq!(out.pid, pid);
        assert_eq!(out.sigkill_at_ms, None);
        assert!(out.sigterm_at_ms.unwrap() <= out.exited_at_ms.unwrap());
        let status = child.0.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    async fn killed_after_grace(use_pidfd: bool) {
        let mut child = stubborn();
        let pid = child.0.id();
        let out = kill_with(pid, start_time(pid), Duration::from_millis(300), use_pidfd).await;
        assert_eq!(out.outcome, KillResult::Killed, "{out:?}");
        let (term, kill) = (out.sigterm_at_ms.unwrap(), out.sigkill_at_ms.unwrap());
        assert!(kill - term >= 300, "{out:?}");
        assert!(out.exited_at_ms.unwrap() >= kill);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.0.wait().unwrap().signal(), Some(libc::SIGKILL));
    }

    async fn grace_zero(use_pidfd: bool) {
        let mut child = stubborn();
        let pid = child.0.id();
        let out = kill_with(pid, start_time(pid), Duration::ZERO, use_pidfd).await;
        assert_eq!(out.outcome, KillResult::Killed, "{out:?}");
        assert!(out.sigkill_at_ms.unwrap() >= out.sigterm_at_ms.unwrap());
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.0.wait().unwrap().signal(), Some(libc::SIGKILL));
    }

    async fn already_gone(use_pidfd: bool) {
        // Reaped: no /proc/PID at all (unless the pid was recycled).
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let st = start_time(pid);
        child.kill().unwrap();
        child.wait().unwrap();
        let out = kill_with(pid, st, Duration::from_secs(1), use_pidfd).await;
        assert!(
            matches!(out.outcome, KillResult::AlreadyGone | KillResult::PidReused),
            "{out:?}"
        );
        assert_eq!(out.sigterm_at_ms, None);

        // A zombie: /proc/PID is there, state Z.
        let mut child = Reaped(Command::new("sleep").arg("30").spawn().unwrap());
        let pid = child.0.id();
        let st = start_time(pid);
        child.0.kill().unwrap();
        while !procs::read_stat(Path::new("/proc"), pid).unwrap().exited() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let out = kill_with(pid, st, Duration::from_secs(1), use_pidfd).await;
        assert_eq!(out.outcome, KillResult::AlreadyGone, "{out:?}");
        assert_eq!(out.sigterm_at_ms, None);
        child.0.wait().unwrap();
    }

    async fn pid_reuse_guard(use_pidfd: bool) {
        let mut child = Reaped(Command::new("sleep").arg("30").spawn().unwrap());
        let pid = child.0.id();
        let out = kill_with(pid, start_time(pid) + 1, Duration::ZERO, use_pidfd).await;
        assert_eq!(out.outcome, KillResult::PidReused, "{out:?}");
        assert_eq!((out.sigterm_at_ms, out.sigkill_at_ms), (None, None));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the child was signalled"
        );
    }

    async fn refused(use_pidfd: bool) {
        let own = std::process::id();
        for pid in [0, 1, own, u32::MAX, i32::MAX as u32 + 1] {
            let out = kill_with(pid, start_time(own), Duration::ZERO, use_pidfd).await;
            assert_eq!(out.outcome, KillResult::Refused, "{pid}");
            assert_eq!(out.sigterm_at_ms, None);
        }
    }

    /// Each behaviour through the pidfd and through the polling fallback.
    macro_rules! both {
        ($($name:ident),*) => {
            mod pidfd { $( #[tokio::test] async fn $name() { super::$name(true).await } )* }
            mod polling { $( #[tokio::test] async fn $name() { super::$name(false).await } )* }
        };
    }
    both!(
        exits_after_sigterm,
        killed_after_grace,
        grace_zero,
        already_gone,
        pid_reuse_guard,
        refused
    );

    #[test]
    fn outcome_words() {
        assert_eq!(
            KillResult::ExitedAfterSigterm.to_string(),
            "exited after SIGTERM"
        );
        assert_eq!(KillResult::Killed.to_string(), "killed");
        assert_eq!(KillResult::AlreadyGone.to_string(), "already gone");
        assert_eq!(
            KillResult::PermissionDenied.to_string(),
            "permission denied"
        );
    }
}
