//! Three agents in three network namespaces, a coordinator in a fourth
//! (the hub, a bridge joining them): `warden cluster set` makes them a
//! WireGuard mesh; every agent pings every peer over it; a member removed
//! and re-added; a node's link cut and restored, after which its sessions
//! recover. Needs root, iproute2 and wireguard-tools (`wg show`).

mod common;

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Namespaces deleted when the test ends (their processes are gone by then).
struct Hosts(Vec<String>);

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn cluster_cli(coord: &Coordinator, args: &[&str]) -> Output {
    Command::new(WARDEN)
        .arg("cluster")
        .args(args)
        .args(["--socket", coord.admin_socket().to_str().unwrap()])
        .output()
        .unwrap()
}

fn set(coord: &Coordinator, nodes: &[&str]) -> Value {
    let mut args = vec!["set", "c1"];
    args.extend_from_slice(nodes);
    args.push("--json");
    let out = cluster_cli(coord, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn address(info: &Value, node: &str) -> String {
    info["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["node_id"] == node)
        .unwrap()["address"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn mesh_of(a: &Agent) -> Value {
    a.status().map(|s| s["mesh"].clone()).unwrap_or(Value::Null)
}

/// The peer `node` in an agent's mesh status.
fn peer(mesh: &Value, node: &str) -> Option<Value> {
    mesh["peers"]
        .as_array()?
        .iter()
        .find(|p| p["node_id"] == node)
        .cloned()
}

/// Waits until every agent in `who` has an answered ping to every node
/// in `to` (except itself).
fn wait_pings(agents: &[(&Agent, &str)], to: &[&str], what: &str) {
    wait_for(what, Duration::from_secs(60), || {
        agents
            .iter()
            .all(|(a, me)| {
                let m = mesh_of(a);
                to.iter()
                    .filter(|n| *n != me)
                    .all(|n| peer(&m, n).is_some_and(|p| p["rtt_ms"].is_f64()))
            })
            .then_some(())
    });
}

#[test]
fn three_agents_form_a_mesh_that_survives_removal_and_a_cut_link() {
    let tmp = tempfile::tempdir().unwrap();
    let id = std::process::id() % 100_000;
    let hub = format!("wc-h-{id}");
    let ns: Vec<String> = (1..=3).map(|i| format!("wc-{i}-{id}")).collect();
    let mut all = vec![hub.clone()];
    all.extend(ns.iter().cloned());
    let _hosts = Hosts(all.clone());
    for n in &all {
        run(&["ip", "netns", "add", n]);
        run(&["ip", "-n", n, "link", "set", "lo", "up"]);
    }
    run(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"]);
    run(&[
        "ip",
        "-n",
        &hub,
        "addr",
        "add",
        "10.201.0.1/24",
        "dev",
        "br0",
    ]);
    run(&["ip", "-n", &hub, "link", "set", "br0", "up"]);
    for (i, n) in ns.iter().enumerate() {
        let port = format!("p{}", i + 1);
        run(&[
            "ip", "link", "add", "eth0", "netns", n, "type", "veth", "peer", "name", &port,
            "netns", &hub,
        ]);
        run(&["ip", "-n", &hub, "link", "set", &port, "master", "br0"]);
        run(&["ip", "-n", &hub, "link", "set", &port, "up"]);
        let addr = format!("10.201.0.{}/24", 11 + i);
        run(&["ip", "-n", n, "addr", "add", &addr, "dev", "eth0"]);
        run(&["ip", "-n", n, "link", "set", "eth0", "up"]);
    }

    let coord = Coordinator::start_in(
        Some(&hub),
        &tmp.path().join("coord"),
        &format!("10.201.0.1:{}", free_port()),
        "",
    );
    // The dev certificate names localhost; the agents dial the hub's address.
    let link = coord
        .link_toml()
        .replace("https://localhost:", "https://10.201.0.1:")
        .replace(
            "[coordinator]",
            "[coordinator]\nserver_name = \"localhost\"",
        );
    let ifnames: Vec<String> = (1..=3).map(|i| format!("wc{i}-{id}")).collect();
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let dir = tmp.path().join(format!("agent{}", i + 1));
            std::fs::create_dir_all(&dir).unwrap();
            let config = dir.with_extension("toml");
            std::fs::write(
                &config,
                format!(
                    "state_dir = \"{}\"\n{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n[probe]\ninterval = \"0s\"\n\
                     [mesh]\ninterface = \"{}\"\nendpoints = [\"10.201.0.{}:51820\"]\nrtt_interval = \"1s\"\n",
                    dir.display(),
                    // A dead stream (C's address moves) is noticed in ~2 s.
                    fast_agent_toml(&link, "1s", 0)
                        .replace("[uplink]\n", "[uplink]\nkeepalive = \"1s\"\n"),
                    ifnames[i],
                    11 + i
                ),
            )
            .unwrap();
            Agent::start_in(Some(&ns[i]), &dir, &config, &[])
        })
        .collect();
    let ids: Vec<String> = wait_for("three nodes registered", Duration::from_secs(60), || {
        let n = nodes_json(&coord);
        let v: Vec<String> = n
            .as_array()?
            .iter()
            .filter(|n| n["connected"] == true && n["mesh_public_key"] != "")
            .map(|n| n["node_id"].as_str().unwrap().to_owned())
            .collect();
        (v.len() == 3).then_some(v)
    });
    // Agent i's node id.
    let node_of = |a: &Agent| a.status().unwrap()["node_id"].as_str().unwrap().to_owned();
    let names: Vec<String> = agents.iter().map(node_of).collect();
    for n in &names {
        assert!(ids.contains(n));
    }
    let (a, b, c) = (names[0].as_str(), names[1].as_str(), names[2].as_str());

    // Bad requests name what is wrong and change nothing.
    let out = cluster_cli(&coord, &["set", "c1", a, "no-such-node"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no node no-such-node has registered"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The cluster: every member applies its config within the call.
    let started = Instant::now();
    let info = set(&coord, &[a, b, c]);
    let took = started.elapsed();
    let states: Vec<&str> = info["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["applied"; 3], "{info:#}");
    eprintln!("cluster of 3 applied in {took:?}");
    assert_eq!(address(&info, a), "10.90.0.1/24");
    assert_eq!(address(&info, c), "10.90.0.3/24");
    let pairs: Vec<(&Agent, &str)> = agents.iter().zip([a, b, c]).collect();
    wait_pings(
        &pairs,
        &[a, b, c],
        "every agent pings every peer over the mesh",
    );
    // Stock `wg` reads the agent's interface.
    let show =
        String::from_utf8(run(&["ip", "netns", "exec", &ns[0], "wg", "show", &ifnames[0]]).stdout)
            .unwrap();
    assert!(show.contains("latest handshake"), "{show}");
    assert!(show.contains("allowed ips: 10.90.0.2/32"), "{show}");

    // C leaves: its interface goes; A and B keep their session.
    let before = peer(&mesh_of(&agents[0]), b).unwrap();
    let info = set(&coord, &[a, b]);
    assert_eq!(info["members"].as_array().unwrap().len(), 2);
    wait_for("C's mesh is gone", Duration::from_secs(30), || {
        mesh_of(&agents[2]).is_null().then_some(())
    });
    let gone = Command::new("ip")
        .args(["-n", &ns[2], "link", "show", &ifnames[2]])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "C's interface was removed");
    let m = mesh_of(&agents[0]);
    assert!(peer(&m, c).is_none(), "A no longer has C: {m:#}");
    let after = peer(&m, b).unwrap();
    assert_eq!(
        after["last_handshake_unix_ms"], before["last_handshake_unix_ms"],
        "A-B was not re-keyed by the change"
    );
    assert!(after["tx_bytes"].as_u64() >= before["tx_bytes"].as_u64());

    // C back: same address, pings again.
    let info = set(&coord, &[a, b, c]);
    assert_eq!(address(&info, c), "10.90.0.3/24");
    assert!(info["members"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["state"] == "applied"));
    wait_pings(&pairs, &[a, b, c], "C pings and is pinged again");

    // Cut C's link at the hub: pings to C go unanswered; restore: recovered.
    run(&["ip", "-n", &hub, "link", "set", "p3", "down"]);
    wait_for("A sees C unreachable", Duration::from_secs(30), || {
        peer(&mesh_of(&agents[0]), c)
            .is_some_and(|p| p["rtt_ms"].is_null())
            .then_some(())
    });
    run(&["ip", "-n", &hub, "link", "set", "p3", "up"]);
    wait_pings(&pairs, &[a, b, c], "the mesh recovers after the cut");

    // C moves to another address (as behind a NAT that rebinds): A and B
    // learn its new endpoint from its authenticated packets (roaming), and a
    // config re-sent with the old announced endpoint does not undo that.
    run(&[
        "ip",
        "-n",
        &ns[2],
        "addr",
        "del",
        "10.201.0.13/24",
        "dev",
        "eth0",
    ]);
    run(&[
        "ip",
        "-n",
        &ns[2],
        "addr",
        "add",
        "10.201.0.23/24",
        "dev",
        "eth0",
    ]);
    wait_for(
        "A and B follow C to its new address",
        Duration::from_secs(30),
        || {
            agents[..2]
                .iter()
                .all(|ag| {
                    peer(&mesh_of(ag), c).is_some_and(|p| {
                        p["endpoint"] == "10.201.0.23:51820" && p["rtt_ms"].is_f64()
                    })
                })
                .then_some(())
        },
    );
    // C's stream from its old address is dead: it reconnects, re-registers,
    // and the coordinator sends the cluster its config again.
    wait_for("C reconnected", Duration::from_secs(30), || {
        nodes_json(&coord)
            .as_array()?
            .iter()
            .find(|n| n["node_id"] == c)?["peer_address"]
            .as_str()?
            .starts_with("10.201.0.23:")
            .then_some(())
    });
    set(&coord, &[a, b, c]);
    let p = peer(&mesh_of(&agents[0]), c).unwrap();
    assert_eq!(p["endpoint"], "10.201.0.23:51820", "{p:#}");

    // Telemetry carried the peers, with round trips, to the coordinator.
    let seen = wait_for("mesh telemetry stored", Duration::from_secs(30), || {
        stored_records(&coord.db())
            .into_iter()
            .find_map(|r| match r.body {
                Some(warden_proto::pb::record::Body::Telemetry(t))
                    if t.mesh_peers.iter().any(|p| p.rtt_ms > 0.0) =>
                {
                    Some(t.mesh_peers)
                }
                _ => None,
            })
    });
    assert!(seen.iter().all(|p| p.cluster_id == "c1"));

    // C is taken out while its link is cut, so the leave never reaches it;
    // when it is back, its Register names the cluster it still runs, and
    // the coordinator tells it to leave.
    run(&["ip", "-n", &hub, "link", "set", "p3", "down"]);
    let out = cluster_cli(&coord, &["set", "c1", a, b, "--timeout", "2", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!mesh_of(&agents[2]).is_null(), "C did not hear of it");
    run(&["ip", "-n", &hub, "link", "set", "p3", "up"]);
    wait_for("C leaves once it is back", Duration::from_secs(30), || {
        mesh_of(&agents[2]).is_null().then_some(())
    });
    assert!(
        coord.proc.log_text().contains("told to leave"),
        "{}",
        coord.proc.log_text()
    );

    // Deleting the cluster takes every interface down.
    let out = cluster_cli(&coord, &["delete", "c1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for ag in &agents[..2] {
        wait_for("mesh gone after delete", Duration::from_secs(30), || {
            mesh_of(ag).is_null().then_some(())
        });
    }
}
