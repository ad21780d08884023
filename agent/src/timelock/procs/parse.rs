//! The pure half of `procs`: what a holder is, which device nodes are
//! watched, and the parsers of the procfs files the scan reads
//! (`/proc/PID/cgroup`, `stat`, `status`). No I/O; fuzzed by proptest.

/// The device patterns the agent watches unless configured otherwise.
pub const DEFAULT_DEVICE_PATTERNS: &[&str] = &["/dev/nvidia*"];

/// One process holding one GPU device node open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat` (clock ticks after boot): with `pid`, it
    /// names the process even after the pid is recycled.
    pub start_time: u64,
    /// The target of `/proc/PID/exe` as the kernel prints it (it may end in
    /// ` (deleted)` if the binary was replaced), or `[comm]` when unreadable
    /// (a kernel thread, or a process that exited mid-scan). For a process
    /// in a container the path is the one inside the container's filesystem.
    pub exe: String,
    /// The short command name (`comm`, at most 15 bytes).
    pub comm: String,
    /// The container id from `/proc/PID/cgroup` (see [`parse_cgroup`]);
    /// `None` for a host process.
    pub container: Option<String>,
    /// The device node path it holds, e.g. `/dev/nvidia0`.
    pub device: String,
    /// Real uid (first field of `Uid:` in `/proc/PID/status`); `u32::MAX`
    /// if unreadable.
    pub uid: u32,
}

/// The default pattern list, owned.
pub fn default_patterns() -> Vec<String> {
    DEFAULT_DEVICE_PATTERNS
        .iter()
        .map(|p| (*p).to_owned())
        .collect()
}

/// Whether `path` matches one of `patterns`. A pattern ending in `*`
/// matches every path starting with what precedes the `*`; any other
/// pattern (including one with a `*` elsewhere, taken literally) matches
/// only that exact path. Nothing else is excluded: with the default
/// `/dev/nvidia*`, `/dev/nvidiactl`, `/dev/nvidia-uvm`, `/dev/nvidia-modeset`
/// and `/dev/nvidia-caps/...` all match. An empty list matches nothing.
pub fn is_device_match(path: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => path == p,
    })
}

/// The GPU minor number of a per-GPU device node: the digits after the last
/// `nvidia` of the file name (`/dev/nvidia3` → 3). Control devices
/// (`nvidiactl`, `nvidia-uvm`, `nvidia-uvm-tools`, `nvidia-modeset`,
/// `nvidia-caps/nvidia-cap1`) and anything else → `None`.
///
/// This is the device's minor number, not NVML's index: map it to a uuid
/// with NVML's `nvmlDeviceGetMinorNumber`. The two usually agree but the
/// driver does not promise it.
pub fn gpu_index_of(device: &str) -> Option<u32> {
    let name = device.rsplit('/').next().unwrap_or(device);
    let digits = &name[name.rfind("nvidia")? + "nvidia".len()..];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The container id in the contents of `/proc/PID/cgroup`, or `None` for a
/// host process.
///
/// Each line is `hierarchy:controllers:path` (cgroup v1 has one line per
/// hierarchy, v2 a single `0::path`; hybrid hosts have both). The first line
/// whose path names a container wins (on a sane host every line names the
/// same one). In a path, the first (outermost) component that names a
/// container wins, so Docker-in-Docker (`/docker/<outer>/docker/<inner>`)
/// gives the outer container, the one the host's runtime can stop, and a
/// container's own sub-cgroups (`/docker/<id>/init.scope`) give `<id>`.
///
/// A component names a container when it is:
/// - exactly 64 lowercase hex digits: the cgroupfs driver of Docker
///   (`/docker/<id>`), Kubernetes (`/kubepods/burstable/pod<uid>/<id>`),
///   containerd without Kubernetes (`/<namespace>/<id>`, e.g. `/default/<id>`
///   — accepted only when the id is 64 hex, as nerdctl and Docker make
///   them; a name chosen by hand such as `ctr run img myjob` is not
///   recognisable as a container and gives `None`) or a custom
///   `--cgroup-parent`;
/// - `<runtime>-<64 hex>.scope` with runtime `docker`, `cri-containerd`,
///   `crio`, `libpod` (Podman) or `nerdctl`: the systemd driver, including
///   Kubernetes slices (`/kubepods.slice/.../cri-containerd-<id>.scope`).
///   `crio-conmon-<id>.scope` is CRI-O's monitor, a host process: `None`.
///
/// Host processes (`/`, `/init.scope`, `/user.slice/...`,
/// `/system.slice/ssh.service`) give `None`. So does `0::/`, which is what a
/// process in a container with a private cgroup namespace sees for itself:
/// the agent reads `/proc/PID/cgroup` from the host's procfs, from the host's
/// cgroup namespace, and there the same process shows its full path. (An
/// agent itself confined to a cgroup namespace sees paths relative to its
/// own root, such as `/../../system.slice/docker-<id>.scope`; the `..`
/// components are skipped like any other.) Uppercase hex is not accepted:
/// no runtime prints it.
pub fn parse_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_hierarchy, _controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        path.split('/').find_map(container_of_component)
    })
}

/// The scope-unit prefixes of container runtimes using the systemd driver.
const SCOPE_RUNTIMES: &[&str] = &["docker", "cri-containerd", "crio", "libpod", "nerdctl"];

fn container_of_component(component: &str) -> Option<String> {
    if is_container_id(component) {
        return Some(component.to_owned());
    }
    let unit = component.strip_suffix(".scope")?;
    let (runtime, id) = unit.rsplit_once('-')?;
    (SCOPE_RUNTIMES.contains(&runtime) && is_container_id(id)).then(|| id.to_owned())
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The fields of `/proc/PID/stat` the agent needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 2, without its parentheses.
    pub comm: String,
    /// Field 3: `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    /// Field 22: start time in clock ticks after boot.
    pub start_time: u64,
}

impl ProcStat {
    /// Whether the process has exited (a zombie not yet reaped, or dead):
    /// its `/proc/PID` still exists but it runs no more and holds no files.
    pub fn exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses `/proc/PID/stat`. The command name may hold spaces and
/// parentheses, so it runs from the first `(` to the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    // `rest` now starts at field 4; field 22 is 18 further on.
    let start_time = rest.nth(18)?.parse().ok()?;
    Some(ProcStat {
        comm,
        state,
        start_time,
    })
}

/// The real uid from `/proc/PID/status`.
pub fn parse_status_uid(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: &str = "3f4e6a2b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
    const ID2: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn v1(path: &str) -> String {
        // A cgroup v1 host: one line per hierarchy, the same path in each
        // (plus the unified line of a hybrid host).
        [
            "12:hugetlb:",
            "11:memory:",
            "10:pids:",
            "9:cpuset:",
            "8:devices:",
            "7:net_cls,net_prio:",
            "6:freezer:",
            "5:perf_event:",
            "4:blkio:",
            "3:cpu,cpuacct:",
            "2:rdma:",
            "1:name=systemd:",
            "0::",
        ]
        .iter()
        .map(|l| format!("{l}{path}\n"))
        .collect()
    }

    #[test]
    fn cgroup_container_forms() {
        let cases: Vec<(String, Option<&str>)> = vec![
            // cgroupfs driver.
            (format!("0::/docker/{ID}\n"), Some(ID)),
            (v1(&format!("/docker/{ID}")), Some(ID)),
            (format!("0::/docker/{ID}/init.scope\n"), Some(ID)),
            (format!("0::/docker/{ID}/system.slice/cron.service\n"), Some(ID)),
            // Docker in Docker: the outer container, which the host can stop.
            (format!("0::/docker/{ID}/docker/{ID2}\n"), Some(ID)),
            (format!("0::/kubepods/burstable/pod0b6d2f4e-6e5a-4d0a-9c1b-2a3b4c5d6e7f/{ID}\n"), Some(ID)),
            (v1(&format!("/kubepods/besteffort/pod0b6d2f4e-6e5a-4d0a-9c1b-2a3b4c5d6e7f/{ID}")), Some(ID)),
            (format!("0::/kubepods/pod0b6d2f4e-6e5a-4d0a-9c1b-2a3b4c5d6e7f/{ID}\n"), Some(ID)),
            (format!("0::/my-parent/{ID}\n"), Some(ID)),
            // containerd without Kubernetes: a 64-hex id in a namespace.
            (format!("0::/default/{ID}\n"), Some(ID)),
            (format!("0::/buildkit/{ID}\n"), Some(ID)),
            // systemd driver.
            (format!("0::/system.slice/docker-{ID}.scope\n"), Some(ID)),
            (v1(&format!("/system.slice/docker-{ID}.scope")), Some(ID)),
            (format!("0::/system.slice/docker-{ID}.scope/init.scope\n"), Some(ID)),
            (format!("0::/system.slice/cri-containerd-{ID}.scope\n"), Some(ID)),
            (format!("0::/system.slice/crio-{ID}.scope\n"), Some(ID)),
            (format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b6d2f4e_6e5a_4d0a_9c1b_2a3b4c5d6e7f.slice/cri-containerd-{ID}.scope\n"), Some(ID)),
            (format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b6d2f4e_6e5a_4d0a_9c1b_2a3b4c5d6e7f.slice/crio-{ID}.scope\n"), Some(ID)),
            (format!("0::/kubepods.slice/kubepods-pod0b6d2f4e_6e5a_4d0a_9c1b_2a3b4c5d6e7f.slice/docker-{ID}.scope\n"), Some(ID)),
            (v1(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b6d2f4e_6e5a_4d0a_9c1b_2a3b4c5d6e7f.slice/cri-containerd-{ID}.scope")), Some(ID)),
            (format!("0::/machine.slice/libpod-{ID}.scope\n"), Some(ID)),
            (format!("0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container\n"), Some(ID)),
            (format!("0::/system.slice/nerdctl-{ID}.scope\n"), Some(ID)),
            // Read from inside another cgroup namespace.
            (format!("0::/../../system.slice/docker-{ID}.scope\n"), Some(ID)),
            // Hybrid: v1 lines name the container, the v2 line does not.
            (format!("1:name=systemd:/docker/{ID}\n0::/\n"), Some(ID)),
            (format!("0::/\n1:name=systemd:/docker/{ID}\n"), Some(ID)),
            // Host processes.
            ("0::/\n".to_owned(), None),
            (v1("/"), None),
            ("0::/init.scope\n".to_owned(), None),
            (v1("/init.scope"), None),
            ("0::/system.slice/ssh.service\n".to_owned(), None),
            ("0::/system.slice/docker.service\n".to_owned(), None),
            ("0::/system.slice/containerd.service\n".to_owned(), None),
            ("0::/system.slice/nvidia-persistenced.service\n".to_owned(), None),
            ("0::/user.slice/user-1000.slice/session-3.scope\n".to_owned(), None),
            ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/dbus.socket\n".to_owned(), None),
            ("0::/system.slice/run-r3b1c1a3d0f3c4f2d8a9e0b5c6d7e8f90.scope\n".to_owned(), None),
            (v1("/user.slice/user-0.slice/session-1.scope"), None),
            // A process in a container with a private cgroup namespace,
            // reading its own file: `/`. The agent never sees this form
            // for a container, as it reads from the host.
            ("0::/\n".to_owned(), None),
            // This machine's own shape: a 32-hex id is not a container id.
            ("4:memory:/process_api/483a59d5af834988f3d792906092b0b9\n0::/\n".to_owned(), None),
            // CRI-O's monitor runs on the host.
            (format!("0::/system.slice/crio-conmon-{ID}.scope\n"), None),
            // Not a runtime we know, or not a 64-hex id.
            (format!("0::/system.slice/foo-{ID}.scope\n"), None),
            (format!("0::/system.slice/docker-{}.scope\n", &ID[..63]), None),
            (format!("0::/docker/{}\n", ID.to_uppercase()), None),
            (format!("0::/docker/{ID}0\n"), None),
            ("0::/default/myjob\n".to_owned(), None),
            ("0::/docker/abc123\n".to_owned(), None),
            (String::new(), None),
            ("garbage\n".to_owned(), None),
            (format!("{ID}\n"), None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_cgroup(&text).as_deref(), want, "{text:?}");
        }
    }

    #[test]
    fn device_patterns() {
        let default = default_patterns();
        for p in [
            "/dev/nvidia0",
            "/dev/nvidia7",
            "/dev/nvidiactl",
            "/dev/nvidia-uvm",
            "/dev/nvidia-uvm-tools",
            "/dev/nvidia-modeset",
            "/dev/nvidia-caps/nvidia-cap1",
        ] {
            assert!(is_device_match(p, &default), "{p}");
        }
        for p in [
            "/dev/dri/card0",
            "/dev/null",
            "/tmp/nvidia0",
            "/dev/nvidi",
            "dev/nvidia0",
            "",
        ] {
            assert!(!is_device_match(p, &default), "{p}");
        }
        let own = vec![
            "/tmp/xyz/nvidia*".to_owned(),
            "/dev/dri/renderD128".to_owned(),
        ];
        assert!(is_device_match("/tmp/xyz/nvidia0", &own));
        assert!(is_device_match("/tmp/xyz/nvidiactl", &own));
        assert!(is_device_match("/dev/dri/renderD128", &own));
        assert!(!is_device_match("/dev/dri/renderD1289", &own));
        assert!(!is_device_match("/dev/nvidia0", &own));
        // A `*` elsewhere is literal.
        let odd = vec!["/dev/*idia0".to_owned()];
        assert!(!is_device_match("/dev/nvidia0", &odd));
        assert!(is_device_match("/dev/*idia0", &odd));
        // `*` alone matches everything; no pattern matches nothing.
        assert!(is_device_match("/anything", &["*".to_owned()]));
        assert!(!is_device_match("/dev/nvidia0", &[]));
    }

    #[test]
    fn gpu_indices() {
        let cases = [
            ("/dev/nvidia0", Some(0)),
            ("/dev/nvidia3", Some(3)),
            ("/dev/nvidia15", Some(15)),
            ("/tmp/xyz/nvidia1", Some(1)),
            ("/tmp/nvidia9/nvidia2", Some(2)),
            ("nvidia4", Some(4)),
            ("/dev/nvidiactl", None),
            ("/dev/nvidia-uvm", None),
            ("/dev/nvidia-uvm-tools", None),
            ("/dev/nvidia-modeset", None),
            ("/dev/nvidia-caps/nvidia-cap1", None),
            ("/dev/nvidia", None),
            ("/dev/nvidia1a", None),
            ("/dev/nvidia+1", None),
            ("/dev/nvidia99999999999", None),
            ("/dev/nvidia9/", None),
            ("/dev/dri/card0", None),
            ("", None),
        ];
        for (dev, want) in cases {
            assert_eq!(gpu_index_of(dev), want, "{dev}");
        }
    }

    #[test]
    fn stat_and_status() {
        let text = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 1 0 0 0 3 4 0 0 20 0 1 0 987654 2000000 100 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        let s = parse_stat(text).unwrap();
        assert_eq!(s.comm, "my (odd) cmd");
        assert_eq!(s.state, 'S');
        assert_eq!(s.start_time, 987654);
        assert!(!s.exited());
        let z = parse_stat("7 (sleep) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0").unwrap();
        assert!(z.exited());
        assert_eq!(z.start_time, 55);
        assert_eq!(parse_stat("7 (sleep) S 1 2 3"), None);
        assert_eq!(parse_stat("7 sleep S"), None);
        assert_eq!(parse_stat(")("), None);
        assert_eq!(parse_stat(""), None);
        let status = "Name:\tsleep\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1000\t1000\t1000\t1000\nGid:\t0\t0\t0\t0\n";
        assert_eq!(parse_status_uid(status), Some(1000));
        assert_eq!(parse_status_uid("Name:\tx\n"), None);
        assert_eq!(parse_status_uid("Uid:\tx\n"), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn parsers_never_panic(text in "\\PC{0,300}") {
            let _ = parse_cgroup(&text);
            let _ = parse_stat(&text);
            let _ = parse_status_uid(&text);
            let _ = gpu_index_of(&text);
        }

        #[test]
        fn an_id_anywhere_in_a_host_path_is_found(
            before in proptest::collection::vec("[a-z][a-z.@_-]{0,12}", 0..4),
            after in proptest::collection::vec("[a-z][a-z.@_-]{0,12}", 0..3),
            id in "[0-9a-f]{64}",
            scoped in any::<bool>(),
        ) {
            let component = if scoped { format!("cri-containerd-{id}.scope") } else { id.clone() };
            let mut parts = before.clone();
            parts.push(component);
            parts.extend(after.iter().cloned());
            let text = format!("0::/{}\n", parts.join("/"));
            prop_assert_eq!(parse_cgroup(&text), Some(id));
            // Without the id, the same path is a host path.
            let mut host = before;
            host.extend(after);
            prop_assert_eq!(parse_cgroup(&format!("0::/{}\n", host.join("/"))), None);
        }
    }
}
