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

/// The rules that let a meshed container take new connections only on the
/// mesh and on loopback: what it opened itself (egress through its bridge)
/// still gets its answers, but nothing reaches its services through the
/// bridge — not the host, not another container. For IPv4 and IPv6.
fn inbound_rules(mesh: &str) -> Vec<Vec<String>> {
    let rule = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        rule(&["-i", "lo", "-j", "ACCEPT"]),
        rule(&["-i", mesh, "-j", "ACCEPT"]),
        rule(&[
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ]),
        rule(&["-j", "DROP"]),
    ]
}

/// Installs [`inbound_rules`] in the namespace's INPUT chain (each once,
/// in order), with the host's `iptables`/`ip6tables` run from inside it.
pub fn mesh_only_inbound(ns: &Netns, mesh: &str) -> Result<(), String> {
    let rules = inbound_rules(mesh);
    ns.run(|| {
        for tool in ["iptables", "ip6tables"] {
            for r in &rules {
                let run = |op: &str| {
                    std::process::Command::new(tool)
                        .args(["-w", op, "INPUT"])
                        .args(r)
                        .output()
                };
                // -C: already there (the mesh came back to this container).
                if run("-C").is_ok_and(|o| o.status.success()) {
                    continue;
                }
                match run("-A") {
                    Ok(o) if o.status.success() => {}
                    Ok(o) => {
                        return Err(format!(
                            "{tool} {}: {}",
                            r.join(" "),
                            String::from_utf8_lossy(&o.stderr).trim()
                        ))
                    }
                    Err(e) => {
                        return Err(format!(
                            "{tool} (needed to keep a lease's services off its bridge network): {e}"
                        ))
                    }
                }
            }
        }
        Ok(())
    })
    .map_err(|e| format!("entering {}: {e}", ns.label))?
    .map_err(|e| format!("{}: {e}", ns.label))
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

    /// In a namespace with a second interface, only the mesh's and
    /// loopback's traffic is taken; installing twice adds nothing.
    #[test]
    fn a_meshed_namespace_takes_new_connections_only_on_the_mesh() {
        let id = std::process::id();
        let (host, box_) = (format!("wtfwh-{id}"), format!("wtfwc-{id}"));
        let _hosts = Hosts(vec![host.clone(), box_.clone()]);
        for n in [&host, &box_] {
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        ip(&[
            "link", "add", "vfw0", "netns", &host, "type", "veth", "peer", "name", "vfw1", "netns",
            &box_,
        ]);
        ip(&["-n", &host, "addr", "add", "192.168.80.1/24", "dev", "vfw0"]);
        ip(&["-n", &host, "link", "set", "vfw0", "up"]);
        ip(&["-n", &box_, "addr", "add", "192.168.80.2/24", "dev", "vfw1"]);
        ip(&["-n", &box_, "link", "set", "vfw1", "up"]);
        let open =
            |n: &str| Netns::open(Path::new(&format!("/var/run/netns/{n}")), n.into()).unwrap();
        let (h, b) = (open(&host), open(&box_));
        let listener = b
            .run(|| std::net::TcpListener::bind("0.0.0.0:7010"))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let connects = || {
            h.run(|| {
                std::net::TcpStream::connect_timeout(
                    &"192.168.80.2:7010".parse().unwrap(),
                    std::time::Duration::from_millis(500),
                )
                .is_ok()
            })
            .unwrap()
        };
        assert!(connects(), "open before the rules");
        mesh_only_inbound(&b, "wmesh0").unwrap();
        mesh_only_inbound(&b, "wmesh0").unwrap();
        assert!(!connects(), "the bridge side is closed");
        // Loopback still works, and what the box opens gets its answers.
        let lo = b
            .run(|| {
                std::net::TcpStream::connect_timeout(
                    &"127.0.0.1:7010".parse().unwrap(),
                    std::time::Duration::from_millis(500),
                )
                .is_ok()
            })
            .unwrap();
        assert!(lo);
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &box_, "iptables", "-S", "INPUT"])
            .output()
            .unwrap();
        let rules = String::from_utf8_lossy(&out.stdout);
        assert_eq!(rules.matches("-j DROP").count(), 1, "{rules}");
        let egress = h
            .run(|| std::net::TcpListener::bind("192.168.80.1:7011"))
            .unwrap()
            .unwrap();
        let reached = b
            .run(|| {
                std::net::TcpStream::connect_timeout(
                    &"192.168.80.1:7011".parse().unwrap(),
                    std::time::Duration::from_millis(500),
                )
                .is_ok()
            })
            .unwrap();
        assert!(reached, "the box's own connections get their answers");
        drop(egress);
    }

    #[test]
    fn a_namespace_that_is_not_one_is_an_error() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let ns = Netns::open(f.path(), "a file".into()).unwrap();
        assert!(ns.run(|| ()).is_err());
    }
}
