//! End to end: two coordinator replicas on one PostgreSQL (the test
//! script's, a schema of this test's own). Both show the same network; a
//! lease started through either reaches its node wherever its stream is;
//! one replica SIGKILLed under load, its agents move to the other, nothing
//! they sent is lost or stored twice, and the survivor leads.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// The test PostgreSQL's URL and CA, or None (then the test says so and
/// passes: scripts/test.sh always starts one).
fn test_postgres() -> Option<(String, String)> {
    Some((
        std::env::var("WARDEN_TEST_POSTGRES").ok()?,
        std::env::var("WARDEN_TEST_POSTGRES_CA").ok()?,
    ))
}

/// `psql` on the test database, in `schema`: its unaligned output.
fn psql(url: &str, ca: &str, schema: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .arg(format!("{url}?sslmode=verify-full&sslrootcert={ca}"))
        .env("PGOPTIONS", format!("-c search_path={schema}"))
        .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `warden lease ARGS…` through `c`'s admin socket: stdout, or stderr.
fn lease(c: &Coordinator, args: &[&str]) -> Result<String, String> {
    let out = c.cli("lease", args);
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

fn lease_state(c: &Coordinator, id: &str) -> Option<String> {
    let list: Value = serde_json::from_str(&lease(c, &["list", "--json"]).ok()?).ok()?;
    list.as_array()?
        .iter()
        .find(|l| l["lease_id"] == id)
        .and_then(|l| l["state"].as_str().map(str::to_owned))
}

/// A lease started through `via` for `node` runs there and ends.
fn lease_reaches(via: &Coordinator, node: &str, image: &str) {
    let id = lease(
        via,
        &["start", node, "--image", image, "--", "sleep", "300"],
    )
    .unwrap_or_else(|e| panic!("lease through {}: {e}", via.port));
    wait_for("the lease running", Duration::from_secs(60), || {
        (lease_state(via, &id)? == "running").then_some(())
    });
    lease(via, &["end", &id]).unwrap();
    wait_for("the lease ended", Duration::from_secs(60), || {
        (lease_state(via, &id)? == "ended").then_some(())
    });
}

#[test]
fn replicas_share_the_network_relay_commands_and_survive_one_killed() {
    let Some((url, ca)) = test_postgres() else {
        eprintln!("no test PostgreSQL (WARDEN_TEST_POSTGRES): run scripts/test.sh");
        return;
    };
    let schema = format!("replicas{}", std::process::id());
    psql(&url, &ca, "public", &format!("CREATE SCHEMA {schema}"));
    let (host_port, db) = url
        .trim_start_matches("postgres://warden@")
        .split_once('/')
        .unwrap();
    let (host, port) = host_port.split_once(':').unwrap();
    let pg = format!(
        "[postgres]\nurl = \"host={host} port={port} user=warden dbname={db} options='-c search_path={schema}'\"\nca_cert = \"{ca}\"\n"
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Coordinator::start_with(&tmp.path().join("a"), free_port(), &pg);
    let b = a.start_beside_with(&tmp.path().join("b"), free_port(), true, &pg);
    let image = image::busybox_image();

    const N: u64 = 600;
    let agents: Vec<Agent> = (0..2)
        .map(|i| {
            Agent::start(
                &tmp.path().join(format!("agent{i}")),
                &format!(
                    "{}\n[workload]\nstop_grace = \"2s\"\n",
                    fast_agent_toml(&a.link_toml_to(&[a.port, b.port]), "20ms", N)
                ),
            )
        })
        .collect();
    let nodes: Vec<String> = agents
        .iter()
        .map(|ag| {
            let s = wait_for("agent on replica a", Duration::from_secs(30), || {
                connected_at(ag, &a.address())
            });
            s["node_id"].as_str().unwrap().to_owned()
        })
        .collect();
    let _clean: Vec<ContainersOf> = nodes.iter().cloned().map(ContainersOf).collect();

    // Either replica lists the same nodes, connected (b through a's streams).
    for c in [&a, &b] {
        wait_for(
            "both nodes connected, seen from each replica",
            Duration::from_secs(20),
            || {
                let list = nodes_json(c);
                let connected = list
                    .as_array()?
                    .iter()
                    .filter(|n| {
                        n["connected"] == true
                            && n["node_id"]
                                .as_str()
                                .is_some_and(|id| nodes.iter().any(|x| x == id))
                    })
                    .count();
                (connected == 2).then_some(())
            },
        );
    }
    // A lease through b reaches a node whose stream is on a.
    lease_reaches(&b, &nodes[0], &image);

    // Kill a while records flow; its agents are on b within 15 s.
    wait_for("records flowing", Duration::from_secs(60), || {
        let s = agents[1].status()?;
        (s["last_receipt_seq"].as_u64()? >= 50).then_some(())
    });
    a.proc.kill9();
    let killed = Instant::now();
    for ag in &agents {
        wait_for("agent on replica b", Duration::from_secs(15), || {
            connected_at(ag, &b.address())
        });
    }
    eprintln!(
        "both agents on the surviving replica {:?} after the kill",
        killed.elapsed()
    );
    // A lease through the survivor reaches a node that was on the killed one.
    lease_reaches(&b, &nodes[1], &image);
    wait_for("the survivor leads", Duration::from_secs(30), || {
        b.proc
            .log_text()
            .contains("this replica leads")
            .then_some(())
    });

    // Nothing lost, nothing twice: each node's seqs 1..=last, once each.
    for (ag, node) in agents.iter().zip(&nodes) {
        let s = wait_for("spool drained", Duration::from_secs(180), || {
            let s = ag.status()?;
            (s["spool"]["pending"] == 0 && s["spool"]["next_seq"].as_u64()? > N).then_some(s)
        });
        let last = s["spool"]["next_seq"].as_u64().unwrap() - 1;
        let got = psql(
            &url,
            &ca,
            &schema,
            &format!(
                "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM records WHERE node_id = '{node}'"
            ),
        );
        // Records made since (a lease's events) may follow `last`.
        let n: Vec<u64> = got.split('|').map(|f| f.parse().unwrap()).collect();
        assert!(
            n[0] == n[1] && n[1] == n[3] && n[2] == 1 && n[3] >= last,
            "node {node}: count, distinct, min, max = {got}; the agent's last seq {last}"
        );
    }
}

#[test]
fn a_cluster_hired_through_one_replica_runs_on_nodes_of_the_other_and_outlives_it() {
    let Some((_, ca)) = test_postgres() else {
        eprintln!("no test PostgreSQL (WARDEN_TEST_POSTGRES): run scripts/test.sh");
        return;
    };
    let (url, _) = test_postgres().unwrap();
    let schema = format!("hire{}", std::process::id());
    psql(&url, &ca, "public", &format!("CREATE SCHEMA {schema}"));
    // The coordinators live in the LAN's hub namespace: they reach the
    // test PostgreSQL by its Unix socket (a file, beside its CA).
    let socket_dir = std::path::Path::new(&ca)
        .parent()
        .unwrap()
        .display()
        .to_string();
    let port = url
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let extra = format!(
        "[postgres]\nurl = \"host={socket_dir} port={port} user=warden dbname=warden options='-c search_path={schema}'\"\n\
         [clusters]\nmin_duration = \"1s\"\nreplace_after = \"5s\"\n"
    );
    let tmp = tempfile::tempdir().unwrap();
    let net = 209;
    let lan = Lan::new("wp", 2, net);
    let (mut a, link) = lan.coordinator(&tmp.path().join("a"), free_port(), &extra);
    let b_port = free_port();
    let b = a.start_beside_in(
        Some(&lan.hub),
        &tmp.path().join("b"),
        &format!("{}:{b_port}", lan.hub_ip()),
        true,
        &extra,
    );
    // Each agent lists both replicas, a's first.
    let (at_a, at_b) = (
        format!("https://{}:{}", lan.hub_ip(), a.port),
        format!("https://{}:{b_port}", lan.hub_ip()),
    );
    let both = format!("address = [\"{at_a}\", \"{at_b}\"]");
    let link: String = link
        .lines()
        .map(|l| match l.starts_with("address") {
            true => both.clone(),
            false => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let agents: Vec<Agent> = (0..2)
        .map(|i| {
            let extra = "[workload]\nstop_grace = \"2s\"\n";
            common::hire::member(&lan, tmp.path(), "wp", net, i, &link, extra)
        })
        .collect();
    let names: Vec<String> = agents
        .iter()
        .map(|ag| {
            let s = wait_for("agent on replica a", Duration::from_secs(30), || {
                connected_at(ag, &at_a)
            });
            s["node_id"].as_str().unwrap().to_owned()
        })
        .collect();
    let _clean: Vec<ContainersOf> = names.iter().cloned().map(ContainersOf).collect();
    wait_for(
        "b sees both nodes connected with GPUs",
        Duration::from_secs(60),
        || (common::hire::ready(&nodes_json(&b))? == 2).then_some(()),
    );

    // Hired through b: leases and MeshConfigs relayed to a's streams.
    let hired =
        common::hire::cluster(&b, &["hire", "k1", "--nodes", "2", "--duration", "10m"]).unwrap();
    assert_eq!(hired["cluster"]["phase"], "ready", "{hired:#}");
    let pairs: Vec<(&Agent, &str)> = agents.iter().zip([&*names[0], &*names[1]]).collect();
    wait_pings(
        &pairs,
        &[&names[0], &names[1]],
        "the members reach each other",
    );

    // a dies: its agents move to b, the cluster stays as it is.
    a.proc.kill9();
    for ag in &agents {
        wait_for("agent on replica b", Duration::from_secs(15), || {
            connected_at(ag, &at_b)
        });
    }
    wait_for("b leads", Duration::from_secs(30), || {
        b.proc
            .log_text()
            .contains("this replica leads")
            .then_some(())
    });
    // Past replace_after: nobody was replaced, the mesh still carries.
    std::thread::sleep(Duration::from_secs(6));
    let status = common::hire::cluster(&b, &["status", "k1"]).unwrap();
    assert_eq!(status["phase"], "ready", "{status:#}");
    let now: Vec<&str> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node_id"].as_str().unwrap())
        .collect();
    assert!(
        now.contains(&names[0].as_str()) && now.contains(&names[1].as_str()),
        "{status:#}"
    );
    wait_pings(
        &pairs,
        &[&names[0], &names[1]],
        "the members still reach each other",
    );

    let ended = common::hire::cluster(&b, &["end", "k1"]).unwrap();
    assert_eq!(ended["phase"], "ended", "{ended:#}");
    for ag in &agents {
        wait_for("the members left the mesh", Duration::from_secs(30), || {
            mesh_status(ag).is_null().then_some(())
        });
    }
}
