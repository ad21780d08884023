//! Interop: `warden mesh up` in one network namespace and Debian's
//! wireguard-go in another, both configured with stock `wg`, complete a
//! handshake and carry TCP (iperf3) both ways; `mesh up` brings its link up
//! with wireguard-go's MTU and refuses a name whose socket is in use.

mod common;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use common::*;

fn wg_key(dir: &Path, name: &str) -> (String, String) {
    let (path, public) = wg_keypair(dir, name);
    (path.display().to_string(), public)
}

fn iperf(server_ns: &str, client_ns: &str, server_ip: &str, port: &str) -> String {
    let _server = InNs(
        Command::new("ip")
            .args(["netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The server needs a moment to listen.
    wait_for("iperf3 through the tunnel", Duration::from_secs(30), || {
        let out = Command::new("ip")
            .args([
                "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-p", port, "-t", "1", "-J",
            ])
            .output()
            .unwrap();
        // iperf3 3.12 with -J exits 0 even when it could not connect
        // (the server not listening yet): its JSON then holds "error".
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: serde_json::Value = serde_json::from_str(&json).ok()?;
        (out.status.success() && v.get("error").is_none()).then_some(json)
    })
}

#[test]
fn warden_mesh_and_wireguard_go_carry_tcp_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let id = std::process::id() % 100_000;
    let (na, nb) = (format!("wm-a-{id}"), format!("wm-b-{id}"));
    let (ifa, ifb) = (format!("wwa{id}"), format!("wgb{id}"));
    let _hosts = Hosts(vec![na.clone(), nb.clone()]);
    run(&["ip", "netns", "add", &na]);
    run(&["ip", "netns", "add", &nb]);
    run(&[
        "ip", "link", "add", "va", "netns", &na, "type", "veth", "peer", "name", "vb", "netns", &nb,
    ]);
    for (ns, dev, addr) in [
        (&na, "va", "192.168.88.1/24"),
        (&nb, "vb", "192.168.88.2/24"),
    ] {
        run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
        run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    let (key_a, pub_a) = wg_key(tmp.path(), "a.key");
    let (key_b, pub_b) = wg_key(tmp.path(), "b.key");

    // A: warden mesh. B: wireguard-go (foreground).
    let _a = spawn_in(
        &na,
        &[WARDEN, "mesh", "up", &ifa],
        &tmp.path().join("a.log"),
    );
    let _b = spawn_in(
        &nb,
        &["wireguard-go", "-f", &ifb],
        &tmp.path().join("b.log"),
    );
    for ifname in [&ifa, &ifb] {
        let sock = format!("/var/run/wireguard/{ifname}.sock");
        wait_for(&sock, Duration::from_secs(20), || {
            Path::new(&sock).exists().then_some(())
        });
    }
    for (ns, ifname, key, peer, endpoint, mine, theirs) in [
        (
            &na,
            &ifa,
            &key_a,
            &pub_b,
            "192.168.88.2:51820",
            "10.77.0.1/24",
            "10.77.0.2/32",
        ),
        (
            &nb,
            &ifb,
            &key_b,
            &pub_a,
            "192.168.88.1:51820",
            "10.77.0.2/24",
            "10.77.0.1/32",
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
            key,
            "listen-port",
            "51820",
            "peer",
            peer,
            "endpoint",
            endpoint,
            "allowed-ips",
            theirs,
        ]);
        run(&["ip", "-n", ns, "addr", "add", mine, "dev", ifname]);
        // wireguard-go leaves its link down; `warden mesh up` brought its own up.
        if ns == &nb {
            run(&["ip", "-n", ns, "link", "set", ifname, "up"]);
        }
    }

    // TCP from warden's side to wireguard-go's, then back.
    let there = iperf(&nb, &na, "10.77.0.2", "5201");
    let back = iperf(&na, &nb, "10.77.0.1", "5202");
    for (what, json) in [
        ("warden → wireguard-go", &there),
        ("wireguard-go → warden", &back),
    ] {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let bits = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0);
        assert!(bits > 1e6, "{what}: {bits} bit/s\n{json}");
    }

    // Stock `wg show` reads warden's interface through its UAPI socket.
    let show =
        String::from_utf8(run(&["ip", "netns", "exec", &na, "wg", "show", &ifa]).stdout).unwrap();
    assert!(show.contains(&format!("peer: {pub_b}")), "{show}");
    assert!(show.contains("latest handshake"), "{show}");
    assert!(show.contains("endpoint: 192.168.88.2:51820"), "{show}");
    assert!(show.contains("listening port: 51820"), "{show}");
}

#[test]
fn the_agent_announces_its_mesh_key_and_endpoints_at_register() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&tmp.path().join("coord"), free_port());
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &format!(
            "{}\n[mesh]\nendpoints = [\"203.0.113.7:51820\"]\n",
            fast_agent_toml(&coord.link_toml(), "1h", 0)
        ),
    );
    let key = tmp.path().join("agent/mesh.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let theirs = run(&["sh", "-c", &format!("wg pubkey < {}", key.display())]).stdout;
    let theirs = String::from_utf8(theirs).unwrap().trim().to_owned();
    let n = wait_for("the node registered", Duration::from_secs(30), || {
        nodes_json(&coord)
            .get(0)
            .cloned()
            .filter(|n| n["mesh_public_key"] != "")
    });
    assert_eq!(n["mesh_public_key"], theirs.as_str());
    assert_eq!(
        n["mesh_endpoints"],
        serde_json::json!(["203.0.113.7:51820"])
    );
    drop(agent);
}

/// The link as `ip -j link show` sees it inside `ns`.
fn link(ns: &str, ifname: &str) -> serde_json::Value {
    let out = run(&["ip", "-n", ns, "-j", "link", "show", ifname]).stdout;
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v[0].clone()
}

fn wait_for_log(log: &Path, text: &str) -> String {
    wait_for(text, Duration::from_secs(20), || {
        let s = std::fs::read_to_string(log).ok()?;
        s.contains(text).then_some(s)
    })
}

/// `warden mesh up` for a name whose socket is served, run to its end.
fn second_mesh_up(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("timeout")
        .args(["20", "ip", "netns", "exec", ns, WARDEN, "mesh", "up"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn mesh_up_brings_the_link_up_at_1420_and_refuses_a_second_for_the_name() {
    let tmp = tempfile::tempdir().unwrap();
    let id = std::process::id() % 100_000;
    let (na, nb) = (format!("wu-a-{id}"), format!("wu-b-{id}"));
    let ifname = format!("wwu{id}");
    let _hosts = Hosts(vec![na.clone(), nb.clone()]);
    run(&["ip", "netns", "add", &na]);
    run(&["ip", "netns", "add", &nb]);
    let sock = format!("/var/run/wireguard/{ifname}.sock");

    let first_log = tmp.path().join("first.log");
    let mut first = spawn_in(&na, &[WARDEN, "mesh", "up", &ifname], &first_log);
    let said = wait_for_log(&first_log, "is up");
    assert!(
        said.contains(&format!("interface {ifname} is up, MTU 1420"))
            && said.contains(&format!("UAPI socket {sock}"))
            && said.contains(&format!("ip addr add ADDRESS/PREFIX dev {ifname}"))
            && said.contains(&format!("wg setconf {ifname}")),
        "{said}"
    );
    let l = link(&na, &ifname);
    assert_eq!(l["mtu"], 1420, "{l}");
    assert!(l["flags"].as_array().unwrap().contains(&"UP".into()), "{l}");

    // A second one for the name, in the same namespace (where the TUN name
    // is taken too) or in another (where only the socket is shared), is
    // refused and leaves the first one's socket alone.
    for ns in [&na, &nb] {
        let out = second_mesh_up(ns, &[&ifname]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{ns}: {err}");
        assert!(
            err.contains(&format!(
                "socket {sock} in use by a running warden mesh up / wireguard-go"
            )),
            "{ns}: {err}"
        );
    }
    let show = String::from_utf8(run(&["ip", "netns", "exec", &na, "wg", "show", &ifname]).stdout)
        .unwrap();
    assert!(show.contains(&format!("interface: {ifname}")), "{show}");

    // --mtu sets another (its own socket directory: the name is in use).
    let other_log = tmp.path().join("other.log");
    let socks = tmp.path().join("sockets");
    let _other = spawn_in(
        &nb,
        &[
            WARDEN,
            "mesh",
            "up",
            &ifname,
            "--mtu",
            "1380",
            "--socket-dir",
            socks.to_str().unwrap(),
        ],
        &other_log,
    );
    wait_for_log(&other_log, &format!("interface {ifname} is up, MTU 1380"));
    assert_eq!(link(&nb, &ifname)["mtu"], 1380);

    // A socket left by a process that died is replaced.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    assert!(
        Path::new(&sock).exists(),
        "a killed process leaves its socket"
    );
    let again_log = tmp.path().join("again.log");
    let _again = spawn_in(&na, &[WARDEN, "mesh", "up", &ifname], &again_log);
    wait_for_log(&again_log, &format!("interface {ifname} is up, MTU 1420"));
    run(&["ip", "netns", "exec", &na, "wg", "show", &ifname]);
}
