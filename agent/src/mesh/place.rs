//! Where the mesh interface lives. For a hired cluster whose leases run
//! containers it lives in the network namespace of the lease's first
//! container: only the renter's containers are on the mesh, and nothing on
//! the host or of another lease has a route to it. The UDP socket stays
//! the agent's, on the host; only the TUN device and the ping socket are
//! made inside the container's namespace, by a short-lived thread that
//! enters it (the agent itself never leaves the host's namespace). A TUN
//! device keeps its namespace alive while the agent holds it open.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

/// An open handle on a network namespace (`/proc/PID/ns/net`).
#[derive(Debug)]
pub struct Netns {
    file: File,
    /// What it is, for messages ("lease l-… (pid 123)").
    pub label: String,
}

impl Netns {
    /// The network namespace of process `pid` (a container's init).
    pub fn of_pid(pid: u32, label: String) -> io::Result<Netns> {
        Netns::open(Path::new(&format!("/proc/{pid}/ns/net")), label)
    }

    /// The namespace a path names (`/proc/PID/ns/net`, `/var/run/netns/X`).
    pub fn open(path: &Path, label: String) -> io::Result<Netns> {
        Ok(Netns {
            file: File::open(path)?,
            label,
        })
    }

    /// Runs `f` on a thread that has entered this namespace, and returns
    /// what it returned. Sockets and TUN devices `f` makes belong to this
    /// namespace; `f` must not need a runtime.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let fd = self.file.as_fd();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns moves only this thread, which ends right after `f`.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("the namespace thread panicked"))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::netns::{ip, Hosts};

    /// A TUN device opened by a thread inside a namespace is there and not
    /// on the host; its address is set there too.
    #[test]
    fn a_tun_made_inside_a_namespace_lives_there() {
        let name = format!("wtpl-{}", std::process::id());
        let _hosts = Hosts(vec![name.clone()]);
        ip(&["netns", "add", &name]);
        let ns = Netns::open(Path::new(&format!("/var/run/netns/{name}")), name.clone()).unwrap();
        let (opened, configured) = ns
            .run(|| {
                let t = crate::mesh::tun::open_best("wplace0").unwrap();
                let c =
                    crate::mesh::ifaddr::configure(&t.name, "10.77.0.1".parse().unwrap(), 24, 1420);
                (t, c)
            })
            .unwrap();
        configured.unwrap();
        let inside = std::process::Command::new("ip")
            .args(["-n", &name, "addr", "show", "wplace0"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&inside.stdout);
        assert!(text.contains("10.77.0.1/24"), "{text}");
        let here = std::process::Command::new("ip")
            .args(["link", "show", "wplace0"])
            .output()
            .unwrap();
        assert!(!here.status.success(), "not on the host");
        drop(opened);
        // Closed: the interface is gone with it.
        let gone = std::process::Command::new("ip")
            .args(["-n", &name, "link", "show", "wplace0"])
            .output()
            .unwrap();
        assert!(!gone.status.success());
    }

    #[test]
    fn a_namespace_that_is_not_one_is_an_error() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let ns = Netns::open(f.path(), "a file".into()).unwrap();
        assert!(ns.run(|| ()).is_err());
    }
}
