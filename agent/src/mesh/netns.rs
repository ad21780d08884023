//! Test support: hosts made of network namespaces joined by a veth pair,
//! and threads that run a runtime inside one of them. Needs root and
//! iproute2.

use std::os::fd::AsRawFd;

/// Runs `ip` with `args`; panics if it fails.
pub fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "ip {args:?}");
}

/// Deletes the namespaces when the test ends, pass or fail.
pub struct Hosts(pub Vec<String>);

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", n])
                .status();
        }
    }
}

/// Two namespaces named after `tag` and this process, joined by a veth
/// pair: `a.0` with address `a.1` (a prefix) in the first, `b` likewise
/// in the second, both up with their loopback.
pub fn two_hosts(tag: &str, a: (&str, &str), b: (&str, &str)) -> (Hosts, String, String) {
    let id = std::process::id();
    let (na, nb) = (format!("wt{tag}a-{id}"), format!("wt{tag}b-{id}"));
    let hosts = Hosts(vec![na.clone(), nb.clone()]);
    ip(&["netns", "add", &na]);
    ip(&["netns", "add", &nb]);
    ip(&[
        "link", "add", a.0, "netns", &na, "type", "veth", "peer", "name", b.0, "netns", &nb,
    ]);
    for (ns, (dev, addr)) in [(&na, a), (&nb, b)] {
        ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    (hosts, na, nb)
}

/// A future for [`in_ns`] to run.
pub type Job<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T>>>;

/// Runs `f` on a thread inside network namespace `ns`, with its own runtime.
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Job<T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: moves only this thread into the namespace.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns {path}"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f())
    })
}
