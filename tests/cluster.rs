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

fn cluster_cli(coord: &Coordinator, args: &[&str]) -> Output {
    coord.cli("cluster", args)
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

#[test]
fn three_agents_form_a_mesh_that_survives_removal_and_a_cut_link() {
    let tmp = tempfile::tempdir().unwrap();
    let id = std::process::id() % 100_000;
    let lan = Lan::new("wc", 3, 201);
    let (hub, ns) = (lan.hub.clone(), lan.hosts.clone());
    let (coord, link) = lan.coordinator(&tmp.path().join("coord"), free_port(), "");
    let ifnames: Vec<String> = (1..=3).map(|i| format!("wc{i}-{id}")).collect();
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let dir = tmp.path().join(format!("agent{}", i + 1));
            let config = format!(
                "state_dir = \"{}\"\n{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n[probe]\ninterval = \"0s\"\n\
                 [mesh]\ninterface = \"{}\"\nendpoints = [\"{}:51820\"]\nrtt_interval = \"1s\"\n",
                dir.display(),
                // A dead stream (C's address moves) is noticed in ~2 s.
                fast_agent_toml(&link, "1s", 0)
                    .replace("[uplink]\n", "[uplink]\nkeepalive = \"1s\"\n"),
                ifnames[i],
                lan.host_ip(i)
            );
            lan.agent(i, &dir, &config, &[])
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
    let before = mesh_peer(&mesh_status(&agents[0]), b).unwrap();
    let info = set(&coord, &[a, b]);
    assert_eq!(info["members"].as_array().unwrap().len(), 2);
    wait_for("C's mesh is gone", Duration::from_secs(30), || {
        mesh_status(&agents[2]).is_null().then_some(())
    });
    let gone = Command::new("ip")
        .args(["-n", &ns[2], "link", "show", &ifnames[2]])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "C's interface was removed");
    let m = mesh_status(&agents[0]);
    assert!(mesh_peer(&m, c).is_none(), "A no longer has C: {m:#}");
    let after = mesh_peer(&m, b).unwrap();
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
        mesh_peer(&mesh_status(&agents[0]), c)
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
                    mesh_peer(&mesh_status(ag), c).is_some_and(|p| {
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
    let p = mesh_peer(&mesh_status(&agents[0]), c).unwrap();
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
    assert!(!mesh_status(&agents[2]).is_null(), "C did not hear of it");
    run(&["ip", "-n", &hub, "link", "set", "p3", "up"]);
    wait_for("C leaves once it is back", Duration::from_secs(30), || {
        mesh_status(&agents[2]).is_null().then_some(())
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
            mesh_status(ag).is_null().then_some(())
        });
    }
}
