//! The open guard's edge: a fanotify group (`FAN_CLASS_CONTENT`) with
//! `FAN_OPEN_PERM` marks on the guarded device nodes' inodes, and a thread
//! of its own that answers every open: the kernel holds the opener inside
//! `open(2)` until the answer, so the answer must never wait on anything
//! else in the agent (the agent's own NVML opens the same nodes, and is
//! answered by pid before anything is read).
//!
//! If the agent dies, the kernel drops the group with its marks and lets
//! waiting opens through: the guard fails open, like the scan it replaces
//! (a dead agent kills nothing either), and the chain shows the gap.
//!
//! A mark is not proof that opens are judged: some kernels deliver no
//! permission events for character devices (Linux 6.18, where these tests
//! run, delivers them for regular files only), and a GPU node is one. So
//! each node, once marked, is opened by the agent itself: the guard thread
//! counts every event it answers, the agent's own included, and a node
//! whose open raised none is unmarked and reported unguarded, with why.
//! Its lease is scanned every cycle, as without a guard.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use warden_proto::pb;

use super::{GuardReport, PreventedLog, Target};
use crate::timelock::{
    enforce::{self, Admit, LeaseView, Policy, Seen},
    procs::{self, parse::Holder},
};

/// Why the guard cannot run.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("fanotify permission events are unavailable: {0} (they need a kernel built with CONFIG_FANOTIFY_ACCESS_PERMISSIONS and an agent with CAP_SYS_ADMIN)")]
    Init(io::Error),
    #[error("fanotify cannot mark {path}: {error}")]
    Mark { path: String, error: io::Error },
    #[error("the guard's thread could not start: {0}")]
    Thread(io::Error),
}

/// What an open is judged by; replaced whole at each cycle.
#[derive(Debug, Default)]
struct View {
    leases: Vec<LeaseView>,
    all_gpus_leased: bool,
    policy: Option<Policy>,
    /// Guarded inodes (device, inode) → (path, GPU).
    nodes: HashMap<(u64, u64), (String, Option<String>)>,
}

#[derive(Debug, Default)]
struct Shared {
    view: Arc<View>,
    log: PreventedLog,
    /// Permission events answered, by inode: how the guard learns that
    /// the kernel delivers them for a node.
    events: HashMap<(u64, u64), u64>,
}

/// A marked node: the inode the mark is on.
#[derive(Debug, Clone, PartialEq)]
struct Marked {
    inode: (u64, u64),
    gpu: Option<String>,
}

/// A running guard. Dropping it stops its thread and closes the group,
/// which removes every mark.
pub struct Guard {
    fan: Arc<OwnedFd>,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    marked: BTreeMap<String, Marked>,
    /// Nodes whose marks raised no event when opened: (inode, why), so that
    /// each is tried once, not every cycle.
    silent: BTreeMap<String, ((u64, u64), String)>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("marked", &self.marked)
            .finish()
    }
}

fn init() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the descriptor returned is ours.
    let fd = unsafe {
        libc::fanotify_init(
            libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK,
            (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned open by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mark(fan: RawFd, flags: libc::c_uint, path: &str) -> io::Result<()> {
    let c = CString::new(path).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid C string for the call's duration.
    let r =
        unsafe { libc::fanotify_mark(fan, flags, libc::FAN_OPEN_PERM, libc::AT_FDCWD, c.as_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn inode_of(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Whether this kernel and these privileges allow the guard: a group is
/// made and a temp file marked, then both dropped; then a guard runs on a
/// character device of its own (`/dev/null`'s numbers, in a private temp
/// directory), as a GPU node is one, and must see its open. For `doctor`.
pub fn probe() -> Result<(), String> {
    probe_file()?;
    let dir = std::env::temp_dir().join(format!(
        "warden-guard-probe-dev-{}-{}",
        std::process::id(),
        crate::now_ms()
    ));
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let node = dir.join("nvidia-probe");
    let checked = (|| {
        // Without CAP_MKNOD there is no node to try: the file check stands.
        if null_device_at(&node, 0o600).is_err() {
            return Ok(());
        }
        let mut guard = Guard::start(PathBuf::from("/proc")).map_err(|e| e.to_string())?;
        let target = Target {
            path: node.to_string_lossy().into_owned(),
            gpu: Some("probe".into()),
        };
        let r = guard.apply(&[target], vec![], false, Policy::new(std::process::id()));
        match r.unguarded.into_iter().next() {
            Some((_, why)) => Err(why),
            None => Ok(()),
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    checked
}

/// A character device with `/dev/null`'s numbers at `path`, as a GPU node
/// is a character device (needs CAP_MKNOD).
fn null_device_at(path: &Path, mode: u32) -> rustix::io::Result<()> {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(mode),
        rustix::fs::makedev(1, 3),
    )
}

/// The group and a mark on a regular file.
fn probe_file() -> Result<(), String> {
    let fan = init().map_err(|e| GuardError::Init(e).to_string())?;
    // A file of our own, which nobody else opens while it is marked.
    let file = std::env::temp_dir().join(format!(
        "warden-guard-probe-{}-{}",
        std::process::id(),
        crate::now_ms()
    ));
    std::fs::write(&file, b"").map_err(|e| format!("{}: {e}", file.display()))?;
    let path = file.to_string_lossy().into_owned();
    let marked = mark(fan.as_raw_fd(), libc::FAN_MARK_ADD, &path)
        .map_err(|error| GuardError::Mark { path, error }.to_string());
    drop(fan);
    let _ = std::fs::remove_file(&file);
    marked
}

impl Guard {
    /// A guard with no mark yet, its thread judging opens with
    /// `proc_root` (normally `/proc`) for the openers' descriptions.
    pub fn start(proc_root: PathBuf) -> Result<Guard, GuardError> {
        let fan = Arc::new(init().map_err(GuardError::Init)?);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (fan, shared, stop) = (fan.clone(), shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("warden-guard".into())
                .spawn(move || answer_opens(&fan, &shared, &stop, &proc_root))
                .map_err(GuardError::Thread)?
        };
        Ok(Guard {
            fan,
            shared,
            stop,
            thread: Some(thread),
            marked: BTreeMap::new(),
            silent: BTreeMap::new(),
        })
    }

    fn events_on(&self, inode: (u64, u64)) -> u64 {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.events.get(&inode).copied().unwrap_or(0)
    }

    /// Whether an open of the freshly marked `path` reaches the guard
    /// thread: the agent opens it itself (allowed at once, by pid) and
    /// looks for the event. The open holds until the answer, so the count
    /// is final when it returns. Why not, if not.
    fn delivers(&self, path: &str, inode: (u64, u64)) -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt;
        let before = self.events_on(inode);
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path);
        if self.events_on(inode) > before {
            return Ok(());
        }
        let kind = match std::fs::metadata(path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()) => {
                "a character device"
            }
            _ => "this node",
        };
        let release = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        Err(format!(
            "fanotify delivers no permission event for {path} ({kind}) on this kernel (Linux {release}){}: its opens cannot be denied, the scan stands in",
            match opened {
                Ok(_) => String::new(),
                Err(e) => format!("; the agent's own open failed: {e}"),
            }
        ))
    }

    /// Makes the marks those of `targets`, judges opens from now on by
    /// `leases`, `all_gpus_leased` and `policy`, and reports what is
    /// guarded and what was denied since the last call. A node whose inode
    /// changed (the driver made it again) is marked anew.
    pub fn apply(
        &mut self,
        targets: &[Target],
        leases: Vec<LeaseView>,
        all_gpus_leased: bool,
        policy: Policy,
    ) -> GuardReport {
        let fan = self.fan.as_raw_fd();
        let mut report = GuardReport::default();
        // Marks no longer wanted. A node removed meanwhile cannot be named;
        // its mark goes with its inode.
        let wanted: HashSet<&str> = targets.iter().map(|t| t.path.as_str()).collect();
        let gone: Vec<String> = self
            .marked
            .keys()
            .filter(|p| !wanted.contains(p.as_str()))
            .cloned()
            .collect();
        for path in gone {
            let _ = mark(fan, libc::FAN_MARK_REMOVE, &path);
            self.marked.remove(&path);
        }
        let mut failed: HashSet<String> = HashSet::new();
        for t in targets {
            let inode = match inode_of(Path::new(&t.path)) {
                Ok(i) => i,
                // A control node that does not exist cannot be opened
                // (nvidia-uvm appears on first CUDA use: marked then).
                Err(e) if t.gpu.is_none() && e.kind() == io::ErrorKind::NotFound => {
                    self.marked.remove(&t.path);
                    continue;
                }
                Err(e) => {
                    self.marked.remove(&t.path);
                    fail(&mut report, &mut failed, t, format!("{}: {e}", t.path));
                    continue;
                }
            };
            if self.marked.get(&t.path).is_some_and(|m| m.inode == inode) {
                continue;
            }
            if let Some((_, why)) = self.silent.get(&t.path).filter(|(i, _)| *i == inode) {
                fail(&mut report, &mut failed, t, why.clone());
                continue;
            }
            match mark(fan, libc::FAN_MARK_ADD, &t.path) {
                Ok(()) => {
                    if let Err(why) = self.delivers(&t.path, inode) {
                        let _ = mark(fan, libc::FAN_MARK_REMOVE, &t.path);
                        tracing::warn!(path = %t.path, reason = %why, "open guard: no permission events for this node");
                        self.silent.insert(t.path.clone(), (inode, why.clone()));
                        fail(&mut report, &mut failed, t, why);
                        continue;
                    }
                    self.silent.remove(&t.path);
                    self.marked.insert(
                        t.path.clone(),
                        Marked {
                            inode,
                            gpu: t.gpu.clone(),
                        },
                    );
                }
                Err(error) => {
                    self.marked.remove(&t.path);
                    let why = GuardError::Mark {
                        path: t.path.clone(),
                        error,
                    };
                    fail(&mut report, &mut failed, t, why.to_string());
                }
            }
        }
        report.guarded = targets
            .iter()
            .filter_map(|t| t.gpu.clone())
            .filter(|g| !failed.contains(g))
            .collect();
        let view = View {
            leases,
            all_gpus_leased,
            policy: Some(policy),
            nodes: self
                .marked
                .iter()
                .map(|(p, m)| (m.inode, (p.clone(), m.gpu.clone())))
                .collect(),
        };
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.view = Arc::new(view);
        report.prevented = std::mem::take(&mut shared.log);
        report
    }
}

fn fail(report: &mut GuardReport, failed: &mut HashSet<String>, t: &Target, why: String) {
    if let Some(g) = &t.gpu {
        failed.insert(g.clone());
    }
    report.unguarded.push((t.gpu.clone(), why));
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const META_LEN: usize = std::mem::size_of::<libc::fanotify_event_metadata>();

/// The guard's thread: reads permission events and answers each.
fn answer_opens(fan: &OwnedFd, shared: &Mutex<Shared>, stop: &AtomicBool, proc_root: &Path) {
    let agent_pid = std::process::id();
    let mut buf = vec![0u8; 256 * META_LEN];
    let mut logged: HashSet<(u32, String)> = HashSet::new();
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: fan.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd. The timeout bounds how late a stop is seen.
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            continue;
        }
        // SAFETY: reads into our buffer, at most its length.
        let n = unsafe { libc::read(fan.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        let n = n as usize;
        let mut off = 0;
        while off + META_LEN <= n {
            // SAFETY: META_LEN bytes at `off` are within what was read; the
            // kernel writes whole metadata records.
            let m: libc::fanotify_event_metadata =
                unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
            let len = m.event_len as usize;
            if len < META_LEN || off + len > n {
                break;
            }
            off += len;
            if m.fd < 0 {
                continue; // a queue overflow notice: no open is waiting on it
            }
            // SAFETY: the kernel opened this descriptor for us with the event.
            let file = unsafe { OwnedFd::from_raw_fd(m.fd) };
            // The kernel's own descriptor, unreadable: nothing to judge by.
            let inode = fd_inode(&file).ok();
            // Counted for every event, the agent's own included; the view
            // taken under the same lock.
            let view = {
                let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(i) = inode {
                    *s.events.entry(i).or_default() += 1;
                }
                s.view.clone()
            };
            let allow = m.vers != libc::FANOTIFY_METADATA_VERSION
                || m.mask & libc::FAN_OPEN_PERM == 0
                || judge(
                    inode,
                    &view,
                    m.pid as u32,
                    agent_pid,
                    shared,
                    proc_root,
                    &mut logged,
                );
            let response = libc::fanotify_response {
                fd: m.fd,
                response: if allow {
                    libc::FAN_ALLOW
                } else {
                    libc::FAN_DENY
                },
            };
            // SAFETY: writes one response struct from the stack.
            unsafe {
                libc::write(
                    fan.as_raw_fd(),
                    (&response as *const libc::fanotify_response).cast(),
                    std::mem::size_of::<libc::fanotify_response>(),
                );
            }
            drop(file);
        }
    }
}

/// Whether `pid`'s open of the node `inode` may go on, judged by `view`; a
/// denial is logged for the attestations.
fn judge(
    inode: Option<(u64, u64)>,
    view: &View,
    pid: u32,
    agent_pid: u32,
    shared: &Mutex<Shared>,
    proc_root: &Path,
    logged: &mut HashSet<(u32, String)>,
) -> bool {
    if pid == agent_pid {
        return true;
    }
    let Some(inode) = inode else {
        return true;
    };
    let Some((device, gpu)) = view.nodes.get(&inode).cloned() else {
        return true; // a node no longer guarded
    };
    let Some(policy) = &view.policy else {
        return true;
    };
    // The opener waits in open(2): it cannot exit, so it can be read. One
    // that cannot (a pid namespace the agent does not see) is a stranger.
    let holder = procs::describe(proc_root, pid, device.clone()).unwrap_or_else(|| Holder {
        pid,
        start_time: 0,
        exe: "[unreadable]".into(),
        comm: String::new(),
        container: None,
        device: device.clone(),
        uid: u32::MAX,
    });
    let seen = Seen {
        holder,
        gpu: gpu.clone(),
    };
    if let Admit::Allow(_) = enforce::admit(&seen, &view.leases, view.all_gpus_leased, policy) {
        return true;
    }
    let now = crate::now_ms();
    if logged.len() > 1024 {
        logged.clear();
    }
    if logged.insert((pid, device.clone())) {
        tracing::warn!(pid, exe = %seen.holder.exe, container = seen.holder.container.as_deref().unwrap_or(""), device = %device, "open of a leased GPU denied");
    }
    let entry = pb::PreventedOpen {
        pid,
        exe: seen.holder.exe,
        container: seen.holder.container.unwrap_or_default(),
        gpu: gpu.unwrap_or_default(),
        device,
        attempts: 1,
        first_unix_ms: now,
        last_unix_ms: now,
    };
    shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .log
        .add(entry);
    false
}

fn fd_inode(file: &OwnedFd) -> io::Result<(u64, u64)> {
    // SAFETY: fstat into a zeroed stat on a descriptor we hold.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
}

#[cfg(test)]
mod tests {
    //! The real kernel: a guard on stand-in device nodes (temp files), and
    //! child processes opening them.

    use super::*;
    use std::process::Command;

    const GPU: &str = "GPU-guard-test";

    fn lease() -> LeaseView {
        LeaseView {
            lease_id: "l1".into(),
            gpus: vec![GPU.into()],
            containers: vec![],
        }
    }

    /// `sh -c 'exec 3<PATH'` from a child: whether the open succeeded.
    fn child_opens(path: &Path) -> bool {
        Command::new("sh")
            .args(["-c", &format!("exec 3<'{}'", path.display())])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// A GPU node is a character device: guarded only where the kernel
    /// delivers its permission events, and never said to be guarded where
    /// it does not (Linux 6.18, this test machine, does not).
    #[test]
    fn a_character_device_is_guarded_only_where_the_kernel_delivers_its_events() {
        probe_file().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("nvidia0");
        null_device_at(&node, 0o666).expect("mknod (root)");
        let mut guard = Guard::start(PathBuf::from("/proc")).unwrap();
        let targets = super::super::targets(
            &[format!("{}/nvidia*", dir.path().display())],
            &[(GPU.to_owned(), 0)],
            false,
        );
        let policy = Policy::new(std::process::id());
        let r = guard.apply(&targets, vec![lease()], false, policy.clone());
        if r.guarded.contains(GPU) {
            eprintln!("this kernel delivers permission events for character devices");
            assert!(
                !child_opens(&node),
                "said guarded, yet a foreign open went through"
            );
            assert_eq!(probe(), Ok(()));
            return;
        }
        let why = &r.unguarded[0].1;
        assert!(
            why.contains("delivers no permission event") && why.contains("a character device"),
            "{why}"
        );
        assert!(child_opens(&node), "said unguarded, yet opens are denied");
        // Said again each cycle, without marking it anew.
        let again = guard.apply(&targets, vec![lease()], false, policy);
        assert_eq!(again.unguarded, r.unguarded);
        assert!(guard.marked.is_empty());
        // And the doctor says so.
        let doctor = probe().unwrap_err();
        assert!(doctor.contains("a character device"), "{doctor}");
    }

    #[test]
    fn a_foreign_open_is_denied_the_agents_and_allowlisted_go_through_and_drop_frees_the_node() {
        // Required of the test machine (root, a kernel with permission events).
        probe_file().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("nvidia0");
        std::fs::write(&node, b"").unwrap();
        let ctl = dir.path().join("nvidiactl");
        std::fs::write(&ctl, b"").unwrap();
        let mut guard = Guard::start(PathBuf::from("/proc")).unwrap();
        let targets = super::super::targets(
            &[format!("{}/nvidia*", dir.path().display())],
            &[(GPU.to_owned(), 0)],
            true,
        );
        let policy = Policy::new(std::process::id());
        let r = guard.apply(&targets, vec![lease()], true, policy.clone());
        assert_eq!(r.guarded, [GPU.to_owned()].into());
        assert!(r.unguarded.is_empty(), "{:?}", r.unguarded);

        assert!(!child_opens(&node), "a foreign open went through");
        assert!(!child_opens(&node));
        assert!(
            !child_opens(&ctl),
            "every GPU is leased: the control node too"
        );
        // The agent itself (this process) opens freely; a stranger reopening
        // the agent's descriptor through /proc opens the same inode, and is
        // judged as itself.
        let held = std::fs::File::open(&node).unwrap();
        let via_proc = PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            held.as_raw_fd()
        ));
        assert!(!child_opens(&via_proc), "reopened through /proc");
        drop(held);

        let r = guard.apply(&targets, vec![lease()], true, policy.clone());
        let sh: Vec<_> = r
            .prevented
            .entries
            .iter()
            .filter(|e| e.device == node.to_str().unwrap())
            .collect();
        assert_eq!(sh.iter().map(|e| e.attempts).sum::<u64>(), 3, "{r:?}");
        assert!(sh.iter().all(|e| e.gpu == GPU && e.container.is_empty()));
        assert!(sh.iter().all(|e| e.exe.starts_with('/')), "{sh:?}");
        assert_eq!(r.prevented.attempts(), 4);

        // The shell allowlisted (by its real path): it opens.
        let sh_path = std::fs::canonicalize("/bin/sh").unwrap();
        let mut allowing = policy.clone();
        allowing
            .allow_exe
            .push(sh_path.to_string_lossy().into_owned());
        guard.apply(&targets, vec![lease()], true, allowing);
        assert!(child_opens(&node), "an allowlisted executable was denied");

        // No lease any more: no mark, the node opens.
        let r = guard.apply(&[], vec![], false, policy.clone());
        assert!(r.guarded.is_empty());
        assert!(child_opens(&node));
        guard.apply(&targets, vec![lease()], true, policy);
        assert!(!child_opens(&node));
        drop(guard);
        assert!(child_opens(&node), "a dropped guard still denies");
    }

    #[test]
    fn a_missing_gpu_node_is_reported_unguarded_and_a_missing_control_node_is_not() {
        // Required of the test machine (root, a kernel with permission events).
        probe_file().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut guard = Guard::start(PathBuf::from("/proc")).unwrap();
        let targets = super::super::targets(
            &[format!("{}/nvidia*", dir.path().display())],
            &[(GPU.to_owned(), 0)],
            true,
        );
        let r = guard.apply(&targets, vec![lease()], true, Policy::new(1));
        assert!(r.guarded.is_empty());
        assert_eq!(r.unguarded.len(), 1, "{:?}", r.unguarded);
        assert_eq!(r.unguarded[0].0.as_deref(), Some(GPU));
        assert!(r.unguarded[0].1.contains("nvidia0"), "{:?}", r.unguarded);
        // It appears (the driver made it): guarded from the next cycle.
        std::fs::write(dir.path().join("nvidia0"), b"").unwrap();
        let r = guard.apply(&targets, vec![lease()], true, Policy::new(1));
        assert_eq!(r.guarded, [GPU.to_owned()].into());
        assert!(!child_opens(&dir.path().join("nvidia0")));
    }
}
