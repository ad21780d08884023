//! Hosts for tests: network namespaces joined by a bridge in a hub
//! namespace, deleted when the test ends (pass or fail).

use std::{
    path::Path,
    process::{Command, Output, Stdio},
};

use super::{Agent, Coordinator};

/// Runs a command that must succeed; its output.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd` with `input` on its standard input; its output (stdout and
/// stderr as the command was set up: piped unless said otherwise).
pub fn fed(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    // One that exits without reading says why in its status.
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

/// A WireGuard (X25519) key pair made by `wg genkey` and `wg pubkey`: the
/// private key written to `dir/name`, and the public key in base64.
pub fn wg_keypair(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let private = run(&["wg", "genkey"]).stdout;
    let path = dir.join(name);
    std::fs::write(&path, &private).unwrap();
    let public = fed(
        Command::new("wg").arg("pubkey").stdout(Stdio::piped()),
        &private,
    );
    assert!(public.status.success(), "wg pubkey");
    (
        path,
        String::from_utf8(public.stdout).unwrap().trim().to_owned(),
    )
}

/// Namespaces deleted when the test ends (their processes are gone by then).
pub struct Hosts(pub Vec<String>);

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// A hub namespace with bridge `br0` at `10.N.0.1/24` and hosts
/// `10.N.0.11`, `.12`, … each on a veth whose hub end is `p1`, `p2`, …
pub struct Lan {
    pub hub: String,
    pub hosts: Vec<String>,
    net: u8,
    _hosts: Hosts,
}

impl Lan {
    /// `tag` keeps names apart between tests (with this process's id);
    /// `net` is the second octet of the LAN's addresses.
    pub fn new(tag: &str, hosts: usize, net: u8) -> Lan {
        let id = std::process::id() % 100_000;
        let hub = format!("{tag}-h-{id}");
        let names: Vec<String> = (1..=hosts).map(|i| format!("{tag}-{i}-{id}")).collect();
        let mut all = vec![hub.clone()];
        all.extend(names.iter().cloned());
        let guard = Hosts(all.clone());
        for n in &all {
            run(&["ip", "netns", "add", n]);
            run(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        let hub_addr = format!("10.{net}.0.1/24");
        run(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", &hub, "addr", "add", &hub_addr, "dev", "br0"]);
        run(&["ip", "-n", &hub, "link", "set", "br0", "up"]);
        for (i, n) in names.iter().enumerate() {
            let port = format!("p{}", i + 1);
            run(&[
                "ip", "link", "add", "eth0", "netns", n, "type", "veth", "peer", "name", &port,
                "netns", &hub,
            ]);
            run(&["ip", "-n", &hub, "link", "set", &port, "master", "br0"]);
            run(&["ip", "-n", &hub, "link", "set", &port, "up"]);
            let addr = format!("10.{net}.0.{}/24", 11 + i);
            run(&["ip", "-n", n, "addr", "add", &addr, "dev", "eth0"]);
            run(&["ip", "-n", n, "link", "set", "eth0", "up"]);
        }
        Lan {
            hub,
            hosts: names,
            net,
            _hosts: guard,
        }
    }

    /// The hub's address.
    pub fn hub_ip(&self) -> String {
        format!("10.{}.0.1", self.net)
    }

    /// Host `i`'s address (from 0).
    pub fn host_ip(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.net, 11 + i)
    }

    /// A coordinator in the hub listening on `port`, and the agents'
    /// `[coordinator]` section that dials it (the dev certificate names
    /// localhost, so the agents name it too).
    pub fn coordinator(
        &self,
        dir: &std::path::Path,
        port: u16,
        extra: &str,
    ) -> (Coordinator, String) {
        let coord = Coordinator::start_in(
            Some(&self.hub),
            dir,
            &format!("{}:{port}", self.hub_ip()),
            extra,
        );
        let link = coord
            .link_toml()
            .replace("https://localhost:", &format!("https://{}:", self.hub_ip()))
            .replace(
                "[coordinator]",
                "[coordinator]\nserver_name = \"localhost\"",
            );
        (coord, link)
    }

    /// An agent on host `i` with `config` (a full agent.toml).
    pub fn agent(
        &self,
        i: usize,
        dir: &std::path::Path,
        config: &str,
        env: &[(&str, &std::path::Path)],
    ) -> Agent {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.with_extension("toml");
        std::fs::write(&path, config).unwrap();
        Agent::start_in(Some(&self.hosts[i]), dir, &path, env)
    }
}

/// A process inside a namespace, killed on drop.
pub struct InNs(pub std::process::Child);

impl Drop for InNs {
    fn drop(&mut self) {
        // SIGTERM first: warden and wireguard-go then remove their UAPI
        // sockets from /var/run/wireguard instead of leaving them behind.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn_in(ns: &str, args: &[&str], log: &Path) -> InNs {
    let err = std::fs::File::create(log).unwrap();
    InNs(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap(),
    )
}
