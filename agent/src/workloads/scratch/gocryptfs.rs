//! The edge that makes and destroys a lease's volume with gocryptfs
//! (Debian's `gocryptfs`, over FUSE), blocking: callers run it on tokio's
//! blocking pool.
//!
//! The key: 32 bytes from the system's random source, as hex, is the
//! volume's password. It goes to gocryptfs on a pipe (`-passfile
//! /dev/stdin`), twice: `-init` makes a fresh master key and stores it in
//! the cipher directory's `gocryptfs.conf` wrapped under the password, and
//! the mount unwraps it. The agent's copy is zeroized as soon as the mount
//! is up; from then on the master key lives only in the gocryptfs
//! process's memory. Destroying the volume unmounts it (the process exits,
//! taking the master key with it) and removes the cipher directory with
//! its `gocryptfs.conf`: the password that could unwrap it was never
//! written anywhere and no longer exists.
//!
//! Where: in Docker's mount namespace ([`Place`]), which is not the agent's
//! under the shipped systemd unit (its `ProtectSystem=` and the rest give it
//! one of its own, whose mounts never reach Docker's). Each step then runs
//! on a thread of its own that has entered Docker's namespace; the
//! gocryptfs it starts mounts there, and the agent's own namespace, a slave
//! of the host's, sees the mount come in by propagation.

use std::{
    fmt::Write as _,
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ring::rand::SecureRandom;
use zeroize::Zeroizing;

use super::{mounted_at, parse_mountinfo, Layout, MountEntry, ScratchError};

/// The program, found on PATH.
pub const PROGRAM: &str = "gocryptfs";

/// How long one gocryptfs run (an init, a mount) may take.
const RUN_LIMIT: Duration = Duration::from_secs(30);
/// How long a busy mount is retried before it is detached instead.
const BUSY_LIMIT: Duration = Duration::from_secs(2);
/// How long the gocryptfs process gets to exit after its unmount before it
/// is killed (the master key is in its memory).
const EXIT_LIMIT: Duration = Duration::from_secs(5);

/// A fresh password: 32 random bytes in hex, with the newline `-passfile`
/// reads up to. Written into a buffer of its final size, so no copy of it
/// is left behind by a reallocation; zeroized when dropped.
fn password() -> Result<Zeroizing<String>, ScratchError> {
    let mut raw = Zeroizing::new([0u8; 32]);
    ring::rand::SystemRandom::new()
        .fill(&mut raw[..])
        .map_err(|_| ScratchError::Random("the system's random source failed".into()))?;
    let mut hex = Zeroizing::new(String::with_capacity(2 * raw.len() + 1));
    for b in raw.iter() {
        let _ = write!(hex, "{b:02x}");
    }
    hex.push('\n');
    Ok(hex)
}

/// Runs gocryptfs with `password` on its standard input. Its errors are
/// collected in an anonymous memory file rather than a pipe, because a
/// mount's background process keeps the parent's stderr open for as long
/// as it runs (a pipe would never reach its end).
fn run(step: &'static str, args: &[&str], password: &str) -> Result<(), ScratchError> {
    let out = rustix::fs::memfd_create("gocryptfs-output", rustix::fs::MemfdFlags::CLOEXEC)
        .map(File::from)
        .map_err(|e| io(step, Path::new("memfd"), e.into()))?;
    let dup = || out.try_clone().map_err(|e| io(step, Path::new("memfd"), e));
    let mut child = Command::new(PROGRAM)
        .args(args)
        .stdin(Stdio::piped())
        // Never kept: `-init` without `-q` prints the master key there.
        .stdout(Stdio::null())
        .stderr(dup()?)
        .spawn()
        .map_err(ScratchError::Missing)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A gocryptfs that exits at once (bad arguments) closes the pipe:
        // its status says why, not this write.
        let _ = stdin.write_all(password.as_bytes());
    }
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("no answer within {}s", RUN_LIMIT.as_secs()));
            }
            Err(e) => break Err(e.to_string()),
        }
    };
    let mut text = String::new();
    let mut out = out;
    let _ = out.seek(SeekFrom::Start(0));
    let _ = out.take(16 << 10).read_to_string(&mut text);
    // One line: it ends up in a table row, a log line, a renter's note.
    let mut stderr = text
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    // Debian's gocryptfs does not depend on the package holding it.
    if stderr.contains("fusermount") && stderr.contains("no such file") {
        stderr.push_str(" (install fuse3: gocryptfs mounts through its fusermount)");
    }
    let failed = |status: String| ScratchError::Tool {
        step,
        status,
        stderr,
    };
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(failed(s.to_string())),
        Err(e) => Err(failed(e)),
    }
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> ScratchError {
    ScratchError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The mount table as the calling thread sees it (a thread running in a
/// [`Place`] sees that namespace's; `/proc/self` would be the main thread's).
pub fn own_mounts() -> Result<Vec<MountEntry>, ScratchError> {
    let path = Path::new("/proc/thread-self/mountinfo");
    std::fs::read_to_string(path)
        .map(|t| parse_mountinfo(&t))
        .map_err(|e| io("reading", path, e))
}

/// The mount namespace the volumes are made in: the one Docker makes its
/// containers' bind mounts in.
#[derive(Debug)]
pub struct Place {
    /// That namespace, where it is not the calling process's own.
    enter: Option<OwnedFd>,
    /// Whose namespace it is, for messages: `dockerd (pid 812)`.
    pub whose: String,
}

impl Place {
    /// This process's own namespace.
    pub fn here() -> Place {
        Place {
            enter: None,
            whose: "this process".into(),
        }
    }

    /// Docker's: that of the process serving `socket` (its peer
    /// credentials), else of a process named dockerd, else of PID 1 (for an
    /// agent in a PID namespace of its own, as in a container, that sees no
    /// dockerd: its volumes reach Docker there only by propagation, and
    /// where they do not, Docker refuses the container, its bind source
    /// being a directory inside the volume; see [`super::Layout::source`]).
    pub fn docker(socket: &Path) -> Result<Place, ScratchError> {
        // /proc is walked for a dockerd only when the socket's peer is not
        // visible.
        let (pid, who) = match peer_pid(socket) {
            Some(pid) => (pid, "the process serving the Docker socket"),
            None => match dockerd_pids().first() {
                Some(&pid) => (pid, "dockerd"),
                None => (1, "PID 1 (no dockerd is visible from the agent)"),
            },
        };
        let whose = format!("{who} (pid {pid})");
        let path = PathBuf::from(format!("/proc/{pid}/ns/mnt"));
        let theirs = File::open(&path).map_err(|e| ScratchError::Namespace {
            whose: whose.clone(),
            detail: format!("opening {}: {e}", path.display()),
        })?;
        let ours = Path::new("/proc/thread-self/ns/mnt");
        let same = match (theirs.metadata(), std::fs::metadata(ours)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            (Err(e), _) | (_, Err(e)) => {
                return Err(ScratchError::Namespace {
                    whose,
                    detail: format!("comparing it with {}: {e}", ours.display()),
                })
            }
        };
        Ok(Place {
            enter: (!same).then(|| theirs.into()),
            whose,
        })
    }

    /// Whether the volumes' namespace is another than the process's own.
    pub fn is_elsewhere(&self) -> bool {
        self.enter.is_some()
    }

    /// Runs `f` in the namespace: here, or on a thread of its own that
    /// first leaves the process's shared filesystem context (`setns` into
    /// a mount namespace refuses a thread that shares it) and enters it.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R, ScratchError> {
        let Some(ns) = &self.enter else {
            return Ok(f());
        };
        let failed = |step: &str, e: rustix::io::Errno| ScratchError::Namespace {
            whose: self.whose.clone(),
            detail: format!("{step}: {}", std::io::Error::from(e)),
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: FS unshares only this thread's root, working
                // directory and umask; no file descriptor is affected.
                unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }
                    .map_err(|e| failed("unshare(CLONE_FS)", e))?;
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(ns),
                    Some(rustix::thread::LinkNameSpaceType::Mount),
                )
                .map_err(|e| failed("setns(CLONE_NEWNS)", e))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

/// The PID of the process at the other end of a Unix socket, where it is
/// visible from here (the kernel says 0 for one in a PID namespace we
/// cannot see into).
fn peer_pid(socket: &Path) -> Option<u32> {
    let s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the size given.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

/// Whether `plain` is a live volume: mounted where Docker sees it, and its
/// gocryptfs answers (a mount whose process died fails with "transport
/// endpoint is not connected").
pub fn live(place: &Place, plain: &Path) -> Result<(), String> {
    place.run(|| live_here(plain)).map_err(|e| e.to_string())?
}

fn live_here(plain: &Path) -> Result<(), String> {
    let mounts = own_mounts().map_err(|e| e.to_string())?;
    if !mounted_at(&mounts, plain) {
        return Err(format!("{} is not mounted", plain.display()));
    }
    // statfs and opendir always reach the daemon; a stat of the mount's
    // root may be answered from the kernel's cache for a while after it died.
    rustix::fs::statvfs(plain)
        .map_err(std::io::Error::from)
        .and_then(|_| std::fs::read_dir(plain).map(drop))
        .map_err(|e| format!("{} does not answer: {e}", plain.display()))
}

/// Makes, mounts and opens to the containers' users the volume of
/// `lease_id`, in `place`. With `renter`, an X25519 public key, its
/// password sealed to that key for `lease_id` (`warden_proto::sealed`) is
/// returned: the renter's copy. On failure nothing of it is left.
pub fn create(
    place: &Place,
    layout: &Layout,
    lease_id: &str,
    renter: Option<&[u8; 32]>,
) -> Result<Option<Vec<u8>>, ScratchError> {
    place.run(|| create_here(layout, lease_id, renter))?
}

fn create_here(
    layout: &Layout,
    lease_id: &str,
    renter: Option<&[u8; 32]>,
) -> Result<Option<Vec<u8>>, ScratchError> {
    let mut dirs = std::fs::DirBuilder::new();
    dirs.mode(0o700).recursive(true);
    dirs.create(&layout.root)
        .map_err(|e| io("making", &layout.root, e))?;
    let dir = layout.dir(lease_id);
    // Not recursive: a directory already there is a leftover to destroy first.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| io("making", &dir, e))?;
    let made = (|| {
        let (cipher, plain) = (layout.cipher(lease_id), layout.plain(lease_id));
        for d in [&cipher, &plain] {
            dirs.create(d).map_err(|e| io("making", d, e))?;
        }
        let (c, p) = (cipher.to_string_lossy(), plain.to_string_lossy());
        let password = password()?;
        let sealed = renter
            .map(|r| {
                warden_proto::sealed::seal(r, lease_id.as_bytes(), password.trim_end().as_bytes())
            })
            .transpose()
            .map_err(ScratchError::Seal)?;
        // scrypt's cost guards a password a person chose; this one is 256
        // random bits, so the cheapest setting loses nothing.
        run(
            "init",
            &[
                "-init",
                "-q",
                "-scryptn",
                "10",
                "-passfile",
                "/dev/stdin",
                "--",
                &c,
            ],
            &password,
        )?;
        // allow_other: the containers' users are not root; nosuid, nodev:
        // nothing on it may raise privileges on the host; -nosyslog: the
        // background process's messages go nowhere rather than to a logger
        // process of its own.
        run(
            "mount",
            &[
                "-q",
                "-nosyslog",
                "-passfile",
                "/dev/stdin",
                "-allow_other",
                "-nosuid",
                "-nodev",
                "--",
                &c,
                &p,
            ],
            &password,
        )?;
        drop(password);
        if !mounted_at(&own_mounts()?, &plain) {
            return Err(ScratchError::Tool {
                step: "mount",
                status: "exit status: 0".into(),
                stderr: format!("the mount table has no {} at {}", super::FSTYPE, p),
            });
        }
        docker_sees(&plain)?;
        // Made through the mount, so it exists only where the volume is
        // mounted: Docker refuses a container whose bind source it cannot
        // find, rather than handing it the bare directory below.
        let source = layout.source(lease_id);
        std::fs::create_dir(&source).map_err(|e| io("making", &source, e))?;
        // Like /tmp: any user of any container of the lease may write.
        std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o1777))
            .map_err(|e| io("opening", &source, e))?;
        Ok(sealed)
    })();
    if made.is_err() {
        if let Err(again) = destroy_here(layout, lease_id) {
            tracing::error!(lease = %lease_id, error = %again, "a volume that failed to start could not be removed");
        }
    }
    made
}

/// Docker makes the containers' bind mounts in its own mount namespace: a
/// volume mounted anywhere else would leave the bare mount point under it,
/// and the renter would write plaintext to the disk. Refused unless a
/// visible dockerd sees the mount. Where none is visible (the agent in a PID namespace of its own), the bind
/// source inside the volume is the guard: Docker refuses the container.
pub fn docker_sees(plain: &Path) -> Result<(), ScratchError> {
    let pids = dockerd_pids();
    if pids.is_empty() {
        return Ok(());
    }
    for pid in &pids {
        let path = PathBuf::from(format!("/proc/{pid}/mountinfo"));
        if let Ok(t) = std::fs::read_to_string(&path) {
            if mounted_at(&parse_mountinfo(&t), plain) {
                return Ok(());
            }
        }
    }
    Err(ScratchError::NotShared(format!(
        "dockerd (pid {}) has no volume at {}",
        pids.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        plain.display()
    )))
}

fn dockerd_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == "dockerd").then_some(pid)
        })
        .collect()
}

/// The gocryptfs processes serving `cipher` (by their arguments; an exited
/// one awaiting its reaper has none and is not counted).
pub fn holders(cipher: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let want = cipher.as_os_str().as_encoded_bytes();
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let mut args = cmdline.split(|b| *b == 0);
            let prog = args.next()?;
            let is_gocryptfs = prog.rsplit(|b| *b == b'/').next() == Some(PROGRAM.as_bytes());
            (is_gocryptfs && args.any(|a| a == want)).then_some(pid)
        })
        .collect()
}

/// Destroys the volume of `lease_id`: unmounts it (detached if it stays
/// busy), waits for its gocryptfs process to exit (killed if it does not),
/// then removes its directory with the ciphertext and the wrapped key.
/// Nothing there is fine. The directory is removed only once nothing is
/// mounted on it, so the removal never reaches through a live mount.
pub fn destroy(place: &Place, layout: &Layout, lease_id: &str) -> Result<(), ScratchError> {
    place.run(|| destroy_here(layout, lease_id))?
}

fn destroy_here(layout: &Layout, lease_id: &str) -> Result<(), ScratchError> {
    let (dir, cipher, plain) = (
        layout.dir(lease_id),
        layout.cipher(lease_id),
        layout.plain(lease_id),
    );
    if mounted_at(&own_mounts()?, &plain) {
        unmount(&plain)?;
    }
    let deadline = Instant::now() + EXIT_LIMIT;
    loop {
        let left = holders(&cipher);
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            for pid in left {
                tracing::warn!(pid, cipher = %cipher.display(), "gocryptfs did not exit after its unmount; killing it");
                if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing", &dir, e)),
    }
}

/// Unmounts `plain`; a mount kept busy past [`BUSY_LIMIT`] is detached
/// (gone from the tree at once, its process exiting once the last user lets
/// go). Checked against the mount table afterwards.
fn unmount(plain: &Path) -> Result<(), ScratchError> {
    use rustix::{io::Errno, mount::UnmountFlags};
    let deadline = Instant::now() + BUSY_LIMIT;
    loop {
        match rustix::mount::unmount(plain, UnmountFlags::empty()) {
            Ok(()) | Err(Errno::INVAL) | Err(Errno::NOENT) => break,
            Err(Errno::BUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(Errno::BUSY) => {
                tracing::warn!(path = %plain.display(), "volume still busy; detaching it");
                rustix::mount::unmount(plain, UnmountFlags::DETACH).map_err(|e| {
                    ScratchError::StillMounted {
                        path: plain.to_owned(),
                        detail: e.to_string(),
                    }
                })?;
                break;
            }
            Err(e) => {
                return Err(ScratchError::StillMounted {
                    path: plain.to_owned(),
                    detail: e.to_string(),
                })
            }
        }
    }
    if mounted_at(&own_mounts()?, plain) {
        return Err(ScratchError::StillMounted {
            path: plain.to_owned(),
            detail: "the mount table still lists it".into(),
        });
    }
    Ok(())
}

/// The version gocryptfs reports (`gocryptfs 2.3`).
pub fn version() -> Result<String, ScratchError> {
    let out = Command::new(PROGRAM)
        .arg("-version")
        .stdin(Stdio::null())
        .output()
        .map_err(ScratchError::Missing)?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split(';').next().unwrap_or_default().trim().to_owned())
}

/// `warden doctor`'s check: a real volume made in a fresh directory under
/// `base`, in `place`, written and read back through the mount, its
/// ciphertext searched for what was written, then destroyed. What it did,
/// or why it failed.
pub fn probe(place: &Place, base: &Path) -> Result<String, String> {
    let elsewhere = place.is_elsewhere().then(|| place.whose.clone());
    let done = place
        .run(|| probe_here(base))
        .map_err(|e| e.to_string())??;
    Ok(match elsewhere {
        Some(whose) => format!("{done} (in the mount namespace of {whose})"),
        None => done,
    })
}

fn probe_here(base: &Path) -> Result<String, String> {
    let version = version().map_err(|e| e.to_string())?;
    let layout = Layout {
        root: base.join(format!(
            "warden-scratch-probe-{}-{}",
            std::process::id(),
            crate::now_ms()
        )),
    };
    let lease = "probe";
    let marker = format!("warden-scratch-probe-{}", crate::random_id());
    let checked = (|| {
        create_here(&layout, lease, None).map_err(|e| e.to_string())?;
        let file = layout.source(lease).join("probe");
        std::fs::write(&file, &marker).map_err(|e| format!("writing {}: {e}", file.display()))?;
        let back = std::fs::read_to_string(&file)
            .map_err(|e| format!("reading {}: {e}", file.display()))?;
        if back != marker {
            return Err("what was read back is not what was written".to_owned());
        }
        if let Some(p) = find_bytes(&layout.cipher(lease), marker.as_bytes()) {
            return Err(format!("the plaintext is on disk in {}", p.display()));
        }
        Ok(())
    })();
    let destroyed = destroy_here(&layout, lease).map_err(|e| e.to_string());
    let _ = std::fs::remove_dir(&layout.root);
    checked?;
    destroyed?;
    Ok(format!(
        "{version}: a volume was mounted (allow_other, nosuid, nodev), seen by Docker, written, read back, found encrypted on disk and destroyed"
    ))
}

/// The first file below `dir` whose bytes hold `needle`.
pub fn find_bytes(dir: &Path, needle: &[u8]) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    for e in entries.flatten() {
        let path = e.path();
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() {
            if let Some(p) = find_bytes(&path, needle) {
                return Some(p);
            }
        } else if kind.is_file() {
            if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    return Some(path);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_fresh_256_bit_hex_lines() {
        let a = password().unwrap();
        let b = password().unwrap();
        assert_ne!(*a, *b);
        assert_eq!(a.len(), 65);
        assert!(a.ends_with('\n'));
        assert!(a.trim_end().chars().all(|c| c.is_ascii_hexdigit()));
    }
}
