//! Who holds a GPU: a procfs scan for processes with an open file
//! descriptor on a GPU device node, each mapped to its container.
//!
//! The parsers and the `Holder` type are pure and live in [`parse`]; this
//! module is the edge that reads procfs. It needs root (or
//! `CAP_SYS_PTRACE`): without it, `/proc/PID/fd` of other users' processes
//! is unreadable and those processes are silently absent from the result.
//!
//! What the scan sees is the path each descriptor was opened by, as the
//! kernel prints it for the reader (the agent, in the host's mount
//! namespace). A process inside a container holding its own `/dev/nvidia3`
//! node shows `/dev/nvidia3` here too: the container runtime creates the node
//! with the same name and minor number. A holder that opened a node under
//! another name (a copy made with `mknod /tmp/x c 195 0`) does not match the
//! patterns; NVML's process list is the complementary view.

use std::{collections::BTreeSet, path::Path};

pub mod parse;

use parse::{is_device_match, parse_cgroup, parse_stat, parse_status_uid, Holder, ProcStat};

/// Largest procfs file `scan` reads (`cgroup`, `stat`, `status`); anything
/// longer is cut, so a strange file cannot grow memory.
const MAX_PROC_FILE: u64 = 64 << 10;

/// Reads `/proc/PID/stat` under `proc_root`; `None` if the process is gone
/// or the file is odd.
pub fn read_stat(proc_root: &Path, pid: u32) -> Option<ProcStat> {
    parse_stat(&read_capped(&proc_root.join(pid.to_string()).join("stat"))?)
}

fn read_capped(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_PROC_FILE)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// A holder record for process `pid` holding `device` (for a holder found
/// another way, e.g. in NVML's process lists); None if it is gone.
pub fn describe(proc_root: &Path, pid: u32, device: String) -> Option<Holder> {
    let dir = proc_root.join(pid.to_string());
    let stat = read_capped(&dir.join("stat")).and_then(|t| parse_stat(&t))?;
    let container = read_capped(&dir.join("cgroup")).and_then(|t| parse_cgroup(&t));
    let uid = read_capped(&dir.join("status"))
        .and_then(|t| parse_status_uid(&t))
        .unwrap_or(u32::MAX);
    let exe = std::fs::read_link(dir.join("exe"))
        .ok()
        .and_then(|p| p.to_str().map(str::to_owned))
        .unwrap_or_else(|| format!("[{}]", stat.comm));
    Some(Holder {
        pid,
        start_time: stat.start_time,
        exe,
        comm: stat.comm,
        container,
        device,
        uid,
    })
}

/// Every (process, device) pair under `proc_root` (normally `/proc`) where
/// the process has a descriptor open on a path matching `patterns`, sorted
/// by pid then device. A process holding a device through several
/// descriptors appears once for it. Processes that vanish mid-scan are
/// skipped; what could not be read for another reason (the listing of
/// `proc_root`, a process's `fd/` denied) is named in `Scan::blind`, since
/// a holder there would be missed: the caller must not take the scan for
/// a clean one. This never panics.
/// A trailing ` (deleted)` on a descriptor's target (the node was removed
/// after it was opened) is dropped. Threads share their process's
/// descriptor table and are covered by it; a task cloned without
/// `CLONE_FILES` has a table of its own under `/proc/PID/task/TID/fd`,
/// which is not read.
///
/// Cost: one `getdents` over `proc_root`, then for every process one
/// directory listing of `fd/` plus one `readlink` per descriptor; only
/// processes holding a match cost more (`stat`, `status`, `cgroup`, `exe`:
/// four small reads). So it is linear in the total number of descriptors
/// on the host: about 15 ms (p50, release build, 2-core VM) for ~1,100
/// processes with a few descriptors each (see `benches/enforce.rs`).
pub fn scan(proc_root: &Path, patterns: &[String]) -> Scan {
    let entries = match std::fs::read_dir(proc_root) {
        Ok(e) => e,
        Err(e) => {
            return Scan {
                holders: Vec::new(),
                blind: vec![format!("{} could not be listed: {e}", proc_root.display())],
            }
        }
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let mut holders = Vec::new();
    let mut denied: Vec<(u32, std::io::Error)> = Vec::new();
    for pid in pids {
        let dir = proc_root.join(pid.to_string());
        let devices = match held_devices(&dir, patterns) {
            Ok(d) => d,
            Err(e) if vanished(&e) => continue,
            Err(e) => {
                denied.push((pid, e));
                continue;
            }
        };
        if devices.is_empty() {
            continue;
        }
        // The process may have exited since its descriptors were read.
        holders.extend(
            devices
                .into_iter()
                .filter_map(|d| describe(proc_root, pid, d)),
        );
    }
    let blind = match denied.first() {
        None => Vec::new(),
        Some((pid, e)) => vec![format!(
            "the descriptors of {} process(es) could not be read (pid {pid}: {e})",
            denied.len()
        )],
    };
    Scan { holders, blind }
}

/// What a scan found, and what it could not see.
#[derive(Debug, Default)]
pub struct Scan {
    pub holders: Vec<Holder>,
    /// Why part of the host went unseen (empty: nothing did).
    pub blind: Vec<String>,
}

/// The process is gone (it exited during the scan), or the entry is no
/// process directory.
fn vanished(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ESRCH | libc::ENOTDIR)
    )
}

/// The matching device paths among the descriptors in `dir/fd`, in order;
/// an error if `fd/` itself cannot be listed.
fn held_devices(dir: &Path, patterns: &[String]) -> std::io::Result<BTreeSet<String>> {
    let mut devices = BTreeSet::new();
    let fds = std::fs::read_dir(dir.join("fd"))?;
    for fd in fds.flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let Some(target) = target.to_str() else {
            continue;
        };
        let target = target.strip_suffix(" (deleted)").unwrap_or(target);
        if is_device_match(target, patterns) {
            devices.insert(target.to_owned());
        }
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::{parse::default_patterns, *};

    const ID: &str = "3f4e6a2b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
    use std::{
        os::unix::fs::symlink,
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    #[test]
    fn own_stat_is_readable() {
        let s = read_stat(Path::new("/proc"), std::process::id()).unwrap();
        assert!(!s.exited(), "{s:?}");
        assert!(s.start_time > 0);
    }

    /// Builds one fake `/proc/PID` with the given descriptor targets.
    fn fake_pid(root: &Path, pid: u32, fds: &[&str], cgroup: Option<&str>, exe: Option<&str>) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(dir.join("fd")).unwrap();
        for (i, target) in fds.iter().enumerate() {
            symlink(target, dir.join("fd").join(i.to_string())).unwrap();
        }
        std::fs::write(
            dir.join("stat"),
            format!(
                "{pid} (w {pid}) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {} 0 0\n",
                pid * 10
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("status"),
            format!("Name:\tw\nUid:\t{pid}\t0\t0\t0\n"),
        )
        .unwrap();
        if let Some(c) = cgroup {
            std::fs::write(dir.join("cgroup"), c).unwrap();
        }
        if let Some(e) = exe {
            symlink(e, dir.join("exe")).unwrap();
        }
    }

    #[test]
    fn scan_of_a_fake_procfs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let docker = format!("0::/system.slice/docker-{ID}.scope\n");
        fake_pid(
            root,
            300,
            &[
                "/dev/null",
                "/dev/nvidia1",
                "/dev/nvidiactl",
                "/dev/nvidia1",
                "socket:[1234]",
            ],
            Some(&docker),
            Some("/usr/bin/python3.11"),
        );
        fake_pid(
            root,
            20,
            &["/dev/nvidia0 (deleted)"],
            Some("0::/user.slice/user-0.slice/session-1.scope\n"),
            None,
        );
        fake_pid(
            root,
            21,
            &["/dev/pts/0", "/dev/dri/card0"],
            Some("0::/\n"),
            Some("/usr/bin/bash"),
        );
        // Holds a device but its stat is gone (exited mid-scan): skipped.
        fake_pid(root, 22, &["/dev/nvidia0"], None, None);
        std::fs::remove_file(root.join("22/stat")).unwrap();
        // No fd directory readable, not a pid, a file named like a pid.
        std::fs::create_dir_all(root.join("23")).unwrap();
        std::fs::create_dir_all(root.join("self/fd")).unwrap();
        std::fs::write(root.join("24"), "").unwrap();
        std::fs::create_dir_all(root.join("sys")).unwrap();

        let scanned = scan(root, &default_patterns());
        assert!(scanned.blind.is_empty(), "{:?}", scanned.blind);
        let got = scanned.holders;
        let brief: Vec<_> = got
            .iter()
            .map(|h| {
                (
                    h.pid,
                    h.device.as_str(),
                    h.container.as_deref(),
                    h.exe.as_str(),
                    h.uid,
                    h.start_time,
                )
            })
            .collect();
        assert_eq!(
            brief,
            vec![
                (20, "/dev/nvidia0", None, "[w 20]", 20, 200),
                (
                    300,
                    "/dev/nvidia1",
                    Some(ID),
                    "/usr/bin/python3.11",
                    300,
                    3000
                ),
                (
                    300,
                    "/dev/nvidiactl",
                    Some(ID),
                    "/usr/bin/python3.11",
                    300,
                    3000
                ),
            ]
        );
        assert_eq!(got[1].comm, "w 300");
        assert!(scan(root, &[]).holders.is_empty());
        // What could not be read is not a clean scan: it is named.
        let missing = scan(&root.join("missing"), &default_patterns());
        assert!(missing.holders.is_empty());
        assert!(
            missing.blind[0].contains("could not be listed"),
            "{:?}",
            missing.blind
        );
        // An fd/ that cannot be listed (here a link loop: ELOOP; on a host,
        // EACCES without the capabilities) hides whatever that process holds.
        std::fs::create_dir_all(root.join("25")).unwrap();
        symlink("fd", root.join("25/fd")).unwrap();
        let denied = scan(root, &default_patterns());
        assert_eq!(denied.holders.len(), 3);
        assert!(
            denied.blind[0].contains("1 process(es) could not be read (pid 25"),
            "{:?}",
            denied.blind
        );
    }

    /// A child killed and reaped on drop.
    struct Reaped(Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn scan_finds_a_real_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let dev = tmp.path().join("nvidia0");
        std::fs::write(&dev, "").unwrap();
        let child = Reaped(
            Command::new("sh")
                .args(["-c", &format!("exec 3<'{}'; exec sleep 30", dev.display())])
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let pid = child.0.id();
        let patterns = vec![format!("{}/nvidia*", tmp.path().display())];
        let t0 = Instant::now();
        let found = loop {
            let got = scan(Path::new("/proc"), &patterns).holders;
            if let Some(h) = got.iter().find(|h| h.pid == pid && h.comm == "sleep") {
                assert_eq!(got.len(), 1, "{got:?}");
                break h.clone();
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "not found: {got:?}");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(found.device, dev.to_str().unwrap());
        assert_eq!(found.container, None);
        assert!(found.exe.ends_with("/sleep"), "{}", found.exe);
        assert_eq!(found.uid, unsafe { libc::getuid() });
        assert_eq!(
            Some(found.start_time),
            read_stat(Path::new("/proc"), pid).map(|s| s.start_time)
        );
        drop(child);
        assert!(scan(Path::new("/proc"), &patterns).holders.is_empty());
    }
}
