//! iperf3 TCP throughput over one veth pair between two network
//! namespaces, on the same cores: the plain veth (the ceiling), Debian's
//! wireguard-go, boringtun-cli (if installed: `cargo install boringtun-cli`)
//! and `warden mesh`, each configured with stock `wg`; then `warden mesh`
//! again on a plain TUN (`--no-offload`: batched UDP I/O only, the fallback
//! where the kernel refuses TUN offloads). Prints each and the ratios. Run
//! as root with `cargo bench --bench mesh`; needs iproute2, iperf3,
//! wireguard-go and wireguard-tools. Asserts nothing.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const SECS: &str = "5";

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Files removed on drop.
struct Removed(Vec<String>);

impl Drop for Removed {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

struct Hosts(Vec<String>);

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Killed {
    Killed(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Gbit/s of a TCP stream from `client_ns` to `server_ip` in `server_ns`.
fn iperf(server_ns: &str, client_ns: &str, server_ip: &str) -> f64 {
    let _server = in_ns(server_ns, &["iperf3", "-s", "-1"]);
    let t = Instant::now();
    loop {
        let out = Command::new("ip")
            .args([
                "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-t", SECS, "-J",
            ])
            .args(["--connect-timeout", "1000"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let bps = v["end"]["sum_received"]["bits_per_second"].as_f64();
        if let Some(bps) = bps.filter(|_| out.status.success()) {
            return bps / 1e9;
        }
        if t.elapsed() > Duration::from_secs(20) {
            eprintln!("iperf3 to {server_ip} kept failing: {}", v["error"]);
            return 0.0;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn key(dir: &Path, name: &str) -> (PathBuf, String) {
    let private = run(&["wg", "genkey"]).trim().to_owned();
    let path = dir.join(name);
    std::fs::write(&path, format!("{private}\n")).unwrap();
    let public = run(&["sh", "-c", &format!("wg pubkey < {}", path.display())])
        .trim()
        .to_owned();
    (path, public)
}

/// Throughput through a tunnel made by `daemon` (the command that brings
/// up an interface in the foreground) on both sides.
fn tunnel(daemon: &[&str], tag: &str, a: &str, b: &str, dir: &Path) -> f64 {
    // Names of our own: the UAPI sockets are global, and a daemon killed by
    // an earlier run leaves its socket behind.
    let id = std::process::id() % 100_000;
    let (ifa, ifb) = (format!("b{tag}{id}a"), format!("b{tag}{id}b"));
    let socks = [&ifa, &ifb].map(|i| format!("/var/run/wireguard/{i}.sock"));
    for s in &socks {
        let _ = std::fs::remove_file(s);
    }
    // Declared before the daemons, so dropped after them: their sockets go too.
    let _gone = Removed(socks.to_vec());
    let with = |ifname: &str| -> Vec<String> {
        daemon
            .iter()
            .map(|s| s.to_string())
            .chain(std::iter::once(ifname.to_owned()))
            .collect()
    };
    let da = with(&ifa);
    let db = with(&ifb);
    let _pa = in_ns(a, &da.iter().map(String::as_str).collect::<Vec<_>>());
    let _pb = in_ns(b, &db.iter().map(String::as_str).collect::<Vec<_>>());
    for i in [&ifa, &ifb] {
        let sock = format!("/var/run/wireguard/{i}.sock");
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if t.elapsed() > Duration::from_secs(20) {
                eprintln!("{daemon:?}: no {sock}");
                return 0.0;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let (ka, pa) = key(dir, &format!("{tag}a.key"));
    let (kb, pb) = key(dir, &format!("{tag}b.key"));
    for (ns, ifname, k, peer, ep, mine, theirs) in [
        (
            a,
            &ifa,
            &ka,
            &pb,
            "192.168.99.2:51820",
            "10.98.0.1/24",
            "10.98.0.2/32",
        ),
        (
            b,
            &ifb,
            &kb,
            &pa,
            "192.168.99.1:51820",
            "10.98.0.2/24",
            "10.98.0.1/32",
        ),
    ] {
        run(&[
            "ip",
            "netns",
            "exec",
            ns,
            "wg",
            "set",
            ifname,
            "private-key",
            k.to_str().unwrap(),
            "listen-port",
            "51820",
            "peer",
            peer,
            "endpoint",
            ep,
            "allowed-ips",
            theirs,
        ]);
        run(&["ip", "-n", ns, "addr", "add", mine, "dev", ifname]);
        run(&["ip", "-n", ns, "link", "set", ifname, "mtu", "1420", "up"]);
    }
    iperf(b, a, "10.98.0.2")
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let id = std::process::id() % 100_000;
    let (a, b) = (format!("bm-a-{id}"), format!("bm-b-{id}"));
    let _hosts = Hosts(vec![a.clone(), b.clone()]);
    run(&["ip", "netns", "add", &a]);
    run(&["ip", "netns", "add", &b]);
    run(&[
        "ip", "link", "add", "va", "netns", &a, "type", "veth", "peer", "name", "vb", "netns", &b,
    ]);
    for (ns, dev, addr) in [(&a, "va", "192.168.99.1/24"), (&b, "vb", "192.168.99.2/24")] {
        run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
        run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    let veth = iperf(&b, &a, "192.168.99.2");
    println!("mesh/veth (ceiling): {veth:.2} Gbit/s");
    let wggo = tunnel(&["wireguard-go", "-f"], "g", &a, &b, dir.path());
    println!(
        "mesh/wireguard-go: {wggo:.2} Gbit/s ({:.1} % of veth)",
        100.0 * wggo / veth
    );
    let boringtun = which("boringtun-cli");
    match &boringtun {
        Some(bin) => {
            let bt = tunnel(
                &[bin.as_str(), "--foreground", "--disable-drop-privileges"],
                "b",
                &a,
                &b,
                dir.path(),
            );
            println!(
                "mesh/boringtun-cli: {bt:.2} Gbit/s ({:.2}x wireguard-go)",
                bt / wggo
            );
        }
        None => println!("mesh/boringtun-cli: not installed (cargo install boringtun-cli)"),
    }
    let warden = tunnel(&[common::WARDEN, "mesh", "up"], "w", &a, &b, dir.path());
    println!(
        "mesh/warden: {warden:.2} Gbit/s ({:.1} % of veth, {:.2}x wireguard-go)",
        100.0 * warden / veth,
        warden / wggo
    );
    let plain = tunnel(
        &[common::WARDEN, "mesh", "up", "--no-offload"],
        "p",
        &a,
        &b,
        dir.path(),
    );
    println!(
        "mesh/warden --no-offload: {plain:.2} Gbit/s ({:.2}x wireguard-go)",
        plain / wggo
    );
}

fn which(bin: &str) -> Option<String> {
    let home = std::env::var("HOME").unwrap_or_default();
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(PathBuf::from)
        .chain(std::iter::once(PathBuf::from(format!("{home}/.cargo/bin"))))
        .map(|d| d.join(bin))
        .find(|p| p.exists())
        .map(|p| p.display().to_string())
}
