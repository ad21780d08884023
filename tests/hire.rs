//! Hiring clusters end to end: three agents with fake GPUs and declared
//! labels, each in its own network namespace, a coordinator in the hub.
//! `warden cluster hire` matches an order (a dry run first, then orders no
//! node can fill, named by the filter that left nodes out), starts the
//! leases on the chosen nodes at once and meshes them; the members reach
//! each other over the mesh; a second hire cannot take their GPUs; a
//! cluster is ended by hand, another when its time is up, and a hire whose
//! containers cannot start is undone. Needs root, iproute2 and Docker.

mod common;

use std::{path::Path, time::Duration};

use common::{hire::*, image::Remove, *};
use serde_json::Value;

fn leases(coord: &Coordinator) -> Vec<Value> {
    let out = coord.cli("lease", &["list", "--json"]);
    assert!(out.status.success());
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn lease_state(coord: &Coordinator, id: &str) -> String {
    leases(coord)
        .into_iter()
        .find(|l| l["lease_id"] == id)
        .unwrap_or_else(|| panic!("no lease {id}"))["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn members(c: &Value) -> Vec<Value> {
    c["members"].as_array().unwrap().clone()
}

/// The running container of a lease.
fn container_of(lease: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["ps", "-q", "--filter"])
        .arg(format!("label=warden.lease={lease}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Whether this machine opens a TCP connection to `port` on the
/// container's bridge (Docker network) address.
fn bridge_connects(container: &str, port: u16) -> bool {
    let out = std::process::Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            container,
        ])
        .output()
        .unwrap();
    let ip = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("the container has a bridge address")
        .to_owned();
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

#[test]
fn a_cluster_is_matched_started_meshed_ended_and_undone() {
    let r = rig(
        "wh",
        202,
        &[
            "region = \"eu-west\"\ncountry = \"DE\"\ntags = [\"soc2\", \"green-energy\"]",
            "region = \"eu-west\"\ncountry = \"FR\"\ntags = [\"soc2\"]",
            "region = \"us-east\"\ntags = [\"soc2\"]",
        ],
        1,
    );
    let (lan, coord, agents, names, id) = (&r.lan, &r.coord, &r.agents, &r.names, r.id);
    // The declared labels and the derived tier show as the nodes' own.
    let nodes = nodes_json(coord);
    let node = |id: &str| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node_id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(node(&names[0])["labels"]["country"], "DE");
    assert_eq!(node(&names[2])["labels"]["region"], "us-east");
    assert_eq!(node(&names[1])["tier"], "unmeasured", "no probe has run");
    let table = String::from_utf8(coord.cli("nodes", &[]).stdout).unwrap();
    assert!(table.contains("eu-west/DE"), "{table}");
    assert!(table.contains("tags: soc2,green-energy"), "{table}");

    // A dry run: the plan, in one region, and nothing started.
    let plan = cluster(
        coord,
        &["hire", "c1", "--gpus", "4", "--tag", "soc2", "--dry-run"],
    )
    .unwrap();
    let planned: Vec<&str> = plan["plan"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(planned.len(), 2, "{plan:#}");
    assert!(planned.contains(&names[0].as_str()) && planned.contains(&names[1].as_str()));
    assert_eq!(plan["plan"]["regions"], serde_json::json!(["eu-west"]));
    assert!(plan["cluster"].is_null());
    assert!(leases(coord).is_empty());

    // Orders no node can fill say which filter left how many out.
    let err = cluster(coord, &["hire", "c1", "--gpus", "5", "--region", "eu-west"]).unwrap_err();
    assert!(err.contains("region"), "{err}");
    let err = cluster(
        coord,
        &["hire", "c1", "--nodes", "2", "--tag", "green-energy"],
    )
    .unwrap_err();
    assert!(err.contains("tag"), "{err}");
    let err = cluster(coord, &["hire", "c1", "--gpus", "1", "--gpu-model", "A100"]).unwrap_err();
    assert!(err.contains("model"), "{err}");
    let err = cluster(coord, &["hire", "c1", "--gpus", "1", "--tier", "premium"]).unwrap_err();
    assert!(err.contains("tier"), "{err}");
    let out = coord.cli("cluster", &["hire", "c1", "--gpus", "1", "--hours", "0"]);
    assert!(!out.status.success(), "an hour is the least");
    assert!(leases(coord).is_empty(), "nothing started");

    // The hire: leases on both eu-west nodes at once, then the mesh; the
    // renter asks for a copy of each member's scratch key.
    let (renter_key, renter_public) = wg_keypair(r.tmp.path(), "renter.key");
    let hired = cluster(
        coord,
        &[
            "hire",
            "c1",
            "--gpus",
            "4",
            "--region",
            "eu-west",
            "--duration",
            "10m",
            "--scratch-key-to",
            &renter_public,
        ],
    )
    .unwrap();
    let c1 = &hired["cluster"];
    assert_eq!(c1["phase"], "ready", "{hired:#}");
    let t = &c1["timings"];
    eprintln!("hire of 2 nodes: {t}");
    assert!(t["total_ms"].as_u64().unwrap() > 0);
    assert!(t["total_ms"].as_u64() >= t["leases_ms"].as_u64());
    let m1 = members(c1);
    assert_eq!(m1.len(), 2);
    for m in &m1 {
        assert_eq!(m["state"], "applied", "{m:#}");
        assert_eq!(m["gpu_uuids"].as_array().unwrap().len(), 2);
        assert_eq!(
            lease_state(coord, m["lease_id"].as_str().unwrap()),
            "running"
        );
    }
    let eu: Vec<(&Agent, &str)> = agents[..2].iter().zip([&*names[0], &*names[1]]).collect();
    wait_pings(
        &eu,
        &[&names[0], &names[1]],
        "the members reach each other over the mesh",
    );
    // Each member's key opens with the renter's private key (the same as
    // `lease scratch-key` opens), one key per lease; another key opens none.
    let scratch_keys = |key: &Path| {
        coord.cli(
            "cluster",
            &["scratch-keys", "c1", "--private-key", key.to_str().unwrap()],
        )
    };
    let out = scratch_keys(&renter_key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Vec<String>> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split(' ').map(str::to_owned).collect())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for m in &m1 {
        let line = lines
            .iter()
            .find(|l| l[0] == m["lease_id"].as_str().unwrap())
            .unwrap_or_else(|| panic!("{m:#} in {lines:?}"));
        assert_eq!(line[1], m["node_id"].as_str().unwrap());
        assert_eq!(line[2].len(), 64, "{line:?}");
        let one = coord.cli(
            "lease",
            &[
                "scratch-key",
                &line[0],
                "--private-key",
                renter_key.to_str().unwrap(),
            ],
        );
        assert_eq!(String::from_utf8_lossy(&one.stdout).trim(), line[2]);
    }
    assert_ne!(lines[0][2], lines[1][2], "a key per lease");
    let (other_key, _) = wg_keypair(r.tmp.path(), "other.key");
    let out = scratch_keys(&other_key);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not open with this key"), "{err}");
    assert!(out.stdout.is_empty());

    let status = cluster(coord, &["status", "c1"]).unwrap();
    assert_eq!(status["phase"], "ready");
    let text = String::from_utf8(coord.cli("cluster", &["status", "c1"]).stdout).unwrap();
    assert!(
        text.contains("phase ready") && text.contains("ready after"),
        "{text}"
    );

    // Their GPUs are taken: eu-west has none left, and the name is taken.
    let err = cluster(coord, &["hire", "c2", "--gpus", "1", "--region", "eu-west"]).unwrap_err();
    assert!(err.contains("in a cluster already"), "{err}");
    let err = cluster(coord, &["hire", "c1", "--gpus", "1"]).unwrap_err();
    assert!(err.contains("exists"), "{err}");
    // A hired cluster's members are not changed by hand.
    let err = coord.cli("cluster", &["set", "c1", &names[2]]);
    assert!(String::from_utf8_lossy(&err.stderr).contains("hired"));

    // A renter's key that is not one is refused before anything starts.
    let err = cluster(
        coord,
        &["hire", "c2", "--nodes", "1", "--scratch-key-to", "c2hvcnQ="],
    )
    .unwrap_err();
    assert!(err.contains("32 bytes, not 5"), "{err}");

    // The us-east node, for a few seconds: ended when its time is up; it
    // was not asked for a copy of its key.
    let c2 = cluster(coord, &["hire", "c2", "--nodes", "1", "--duration", "3s"]).unwrap();
    assert_eq!(c2["cluster"]["phase"], "ready", "{c2:#}");
    assert_eq!(members(&c2["cluster"])[0]["node_id"], names[2].as_str());
    let lease2 = members(&c2["cluster"])[0]["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = coord.cli(
        "cluster",
        &[
            "scratch-keys",
            "c2",
            "--private-key",
            renter_key.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not ask for one"), "{err}");
    // Two seconds more; its end moves, and it still ends on its own.
    let ends = c2["cluster"]["ends_unix_ms"].as_i64().unwrap();
    let longer = cluster(coord, &["extend", "c2", "--duration", "2s"]).unwrap();
    assert_eq!(longer["ends_unix_ms"].as_i64().unwrap(), ends + 2000);
    assert_eq!(longer["order"]["duration_seconds"], 5);
    wait_for(
        "c2 ended when its time was up",
        Duration::from_secs(60),
        || (cluster(coord, &["status", "c2"]).ok()?["phase"] == "ended").then_some(()),
    );
    assert_eq!(lease_state(coord, &lease2), "ended");
    let err = cluster(coord, &["extend", "c2", "--hours", "1"]).unwrap_err();
    assert!(err.contains("only a running cluster"), "{err}");
    wait_for(
        "the us-east node left the mesh",
        Duration::from_secs(30),
        || mesh_status(&agents[2]).is_null().then_some(()),
    );

    // c1 ended by hand: its leases end, its members leave the mesh.
    let ended = cluster(coord, &["end", "c1"]).unwrap();
    assert_eq!(ended["phase"], "ended", "{ended:#}");
    for m in &m1 {
        assert_eq!(lease_state(coord, m["lease_id"].as_str().unwrap()), "ended");
    }
    for a in &agents[..2] {
        wait_for(
            "the eu-west nodes left the mesh",
            Duration::from_secs(30),
            || mesh_status(a).is_null().then_some(()),
        );
    }

    // Its proof: the record and both leases' bundles, checked as a set.
    for m in &m1 {
        let id = m["lease_id"].as_str().unwrap();
        wait_for("the verdict", Duration::from_secs(60), || {
            leases(coord)
                .into_iter()
                .find(|l| l["lease_id"] == id && l["verdict"] != "")
        });
    }
    let proof = r.tmp.path().join("c1-proof");
    let out = coord.cli("cluster", &["export", "c1", "-o", proof.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verify = |extra: &[&str]| {
        let out = std::process::Command::new(WARDEN)
            .arg("verify")
            .arg(&proof)
            .arg("--coordinator-key")
            .arg(coord.dir.join("coordinator.pub"))
            // Coverage depends on how promptly this loaded machine sampled.
            .args(["--min-coverage", "0"])
            .args(extra)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = verify(&[]);
    assert!(ok, "{text}");
    assert!(text.trim_end().ends_with("HOLDS"), "{text}");
    for m in &m1 {
        assert!(text.contains(m["lease_id"].as_str().unwrap()), "{text}");
    }
    let again = coord.cli("cluster", &["export", "c1", "-o", proof.to_str().unwrap()]);
    assert!(
        !again.status.success(),
        "a non-empty directory needs --force"
    );
    // With --force an earlier export's stale bundle goes; other files stay.
    std::fs::write(proof.join("lease-stale.json"), "{}").unwrap();
    std::fs::write(proof.join("notes.txt"), "mine").unwrap();
    let forced = coord.cli(
        "cluster",
        &["export", "c1", "-o", proof.to_str().unwrap(), "--force"],
    );
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert!(!proof.join("lease-stale.json").exists());
    assert!(proof.join("notes.txt").exists());
    let (ok, text) = verify(&[]);
    assert!(ok, "{text}");
    let unknown = coord.cli("cluster", &["export", "nope", "-o", "/nonexistent/x"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no cluster nope"));
    // One byte of the signed record changed: the set no longer holds.
    let record = proof.join("cluster.json");
    let mut env: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    let payload = env["payload"].as_str().unwrap();
    let flipped = if payload.starts_with('C') { "D" } else { "C" };
    env["payload"] = format!("{flipped}{}", &payload[1..]).into();
    std::fs::write(&record, env.to_string()).unwrap();
    let (ok, text) = verify(&[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("bad-record") && text.contains("does NOT hold"),
        "{text}"
    );

    // With an image, the mesh lives in the containers: each lease's first
    // container gets the mesh interface, the containers reach each other at
    // their mesh addresses, and neither this host nor another container
    // (another renter's) can reach them there.
    let image = image::busybox_image();
    let _clean: Vec<ContainersOf> = names.iter().map(|n| ContainersOf(n.clone())).collect();
    let c5 = cluster(
        coord,
        &[
            "hire",
            "c5",
            "--nodes",
            "2",
            "--region",
            "eu-west",
            "--duration",
            "10m",
            "--image",
            &image,
            "--",
            "sleep",
            "600",
        ],
    )
    .unwrap();
    assert_eq!(c5["cluster"]["phase"], "ready", "{c5:#}");
    let m5 = members(&c5["cluster"]);
    let (ca, cb) = (
        container_of(m5[0]["lease_id"].as_str().unwrap()),
        container_of(m5[1]["lease_id"].as_str().unwrap()),
    );
    let b_addr = m5[1]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let docker = |args: &[&str]| {
        std::process::Command::new("docker")
            .args(args)
            .output()
            .unwrap()
    };
    // B listens on its mesh address; A sends over the mesh.
    let listening = docker(&["exec", "-d", &cb, "sh", "-c", "nc -l -p 7000 > /tmp/got"]);
    assert!(
        listening.status.success(),
        "{}; container {cb} of {m5:#?}; all: {}",
        String::from_utf8_lossy(&listening.stderr),
        String::from_utf8_lossy(&docker(&["ps", "-a"]).stdout)
    );
    wait_for("A reaches B over the mesh", Duration::from_secs(30), || {
        let _ = docker(&[
            "exec",
            &ca,
            "sh",
            "-c",
            &format!("echo over-the-mesh | nc -w 2 {b_addr} 7000"),
        ]);
        let got = docker(&["exec", &cb, "cat", "/tmp/got"]);
        String::from_utf8_lossy(&got.stdout)
            .contains("over-the-mesh")
            .then_some(())
    });
    let links = docker(&["exec", &ca, "ip", "addr"]);
    let links = String::from_utf8_lossy(&links.stdout);
    let a_addr = m5[0]["address"].as_str().unwrap();
    assert!(
        links.contains(a_addr),
        "A's container holds its mesh address: {links}"
    );
    // Nothing off the mesh reaches B there: not this machine (whose default
    // route leads elsewhere), not the agent's host namespace, not a
    // container outside the cluster. B listens again; each of them tries;
    // then A sends, and only A's words arrive.
    assert!(
        docker(&["exec", "-d", &cb, "sh", "-c", "nc -l -p 7001 > /tmp/got2"])
            .status
            .success()
    );
    std::thread::sleep(Duration::from_millis(300));
    let to_b: std::net::SocketAddr = format!("{b_addr}:7001").parse().unwrap();
    if let Ok(mut s) = std::net::TcpStream::connect_timeout(&to_b, Duration::from_secs(1)) {
        use std::io::Write;
        let _ = s.write_all(b"from-host\n");
    }
    let host_ns = warden_agent::mesh::place::Netns::open(
        Path::new(&format!("/var/run/netns/{}", lan.hosts[0])),
        "host 0".into(),
    )
    .unwrap();
    let from_agent_host = host_ns
        .run(|| std::net::TcpStream::connect_timeout(&to_b, Duration::from_secs(1)).is_ok())
        .unwrap();
    assert!(!from_agent_host, "the agent's host reaches the mesh");
    let stranger = format!("wh-stranger-{id}");
    let _stranger = Remove::containers(&[&stranger]);
    assert!(
        docker(&["run", "-d", "--name", &stranger, &image, "sleep", "60"])
            .status
            .success()
    );
    let _ = docker(&[
        "exec",
        &stranger,
        "sh",
        "-c",
        &format!("echo from-stranger | nc -w 2 {b_addr} 7001"),
    ]);
    let got = wait_for(
        "A's words on B's second listener",
        Duration::from_secs(30),
        || {
            let _ = docker(&[
                "exec",
                &ca,
                "sh",
                "-c",
                &format!("echo from-a | nc -w 2 {b_addr} 7001"),
            ]);
            let got = docker(&["exec", &cb, "cat", "/tmp/got2"]);
            let got = String::from_utf8_lossy(&got.stdout).into_owned();
            (!got.is_empty()).then_some(got)
        },
    );
    assert_eq!(got.trim(), "from-a", "only the member reached B");
    // B's bridge address (its egress network) takes no new connection
    // either, though this machine routes to it.
    assert!(docker(&["exec", "-d", &cb, "sh", "-c", "nc -l -p 7002"])
        .status
        .success());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !bridge_connects(&cb, 7002),
        "B's service is reachable on its bridge address"
    );
    // The renter's own machine (the LAN's fourth host, stock wireguard-go
    // and wg) joins the mesh with the file `cluster connect` writes, and
    // reaches B's container there.
    let conf = r.tmp.path().join("renter.conf");
    let out = coord.cli(
        "cluster",
        &[
            "connect",
            "c5",
            "--name",
            "laptop",
            "-o",
            conf.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&conf).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let address = text
        .lines()
        .find_map(|l| l.strip_prefix("Address = "))
        .unwrap()
        .to_owned();
    assert_eq!(address, "10.90.0.254/24", "{text}");
    assert_eq!(text.matches("[Peer]").count(), 2, "{text}");
    // Again with the same file: the same key, the same address.
    let again = coord.cli(
        "cluster",
        &[
            "connect",
            "c5",
            "--name",
            "laptop",
            "-o",
            conf.to_str().unwrap(),
        ],
    );
    assert!(again.status.success());
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), text);
    let stripped = run(&["wg-quick", "strip", conf.to_str().unwrap()]);
    let plain = r.tmp.path().join("renter.wg");
    std::fs::write(&plain, &stripped.stdout).unwrap();
    let renter = lan.hosts[3].clone();
    let ifname = format!("wgr-{id}");
    let _wg = spawn_in(
        &renter,
        &["wireguard-go", "-f", &ifname],
        &r.tmp.path().join("wireguard-go.log"),
    );
    let sock = format!("/var/run/wireguard/{ifname}.sock");
    wait_for(&sock, Duration::from_secs(20), || {
        Path::new(&sock).exists().then_some(())
    });
    run(&[
        "ip",
        "netns",
        "exec",
        &renter,
        "wg",
        "setconf",
        &ifname,
        plain.to_str().unwrap(),
    ]);
    run(&["ip", "-n", &renter, "addr", "add", &address, "dev", &ifname]);
    run(&["ip", "-n", &renter, "link", "set", &ifname, "up"]);
    assert!(
        docker(&["exec", "-d", &cb, "sh", "-c", "nc -l -p 7003 > /tmp/got3"])
            .status
            .success()
    );
    let renter_ns = warden_agent::mesh::place::Netns::open(
        Path::new(&format!("/var/run/netns/{renter}")),
        "renter".into(),
    )
    .unwrap();
    let to_b3: std::net::SocketAddr = format!("{b_addr}:7003").parse().unwrap();
    wait_for(
        "the renter reaches B over the mesh",
        Duration::from_secs(30),
        || {
            let _ = renter_ns.run(|| {
                use std::io::Write;
                std::net::TcpStream::connect_timeout(&to_b3, Duration::from_secs(1))
                    .and_then(|mut s| s.write_all(b"from-renter\n"))
            });
            let got = docker(&["exec", &cb, "cat", "/tmp/got3"]);
            String::from_utf8_lossy(&got.stdout)
                .contains("from-renter")
                .then_some(())
        },
    );
    let status = cluster(coord, &["status", "c5"]).unwrap();
    assert_eq!(status["renter_peers"][0]["name"], "laptop", "{status:#}");

    let ended = cluster(coord, &["end", "c5"]).unwrap();
    assert_eq!(ended["phase"], "ended");

    // A hire whose container cannot start (Docker refuses a 1 KiB memory
    // limit) is undone: its lease ended, the cluster failed with Docker's
    // reason, and the GPUs free for the next order.
    let err = cluster(
        coord,
        &[
            "hire", "c3", "--gpus", "1", "--image", &image, "--memory", "1k", "--", "sleep", "300",
        ],
    )
    .unwrap_err();
    assert!(err.contains("failed") && err.contains("emory"), "{err}");
    let c3 = cluster(coord, &["status", "c3"]).unwrap();
    assert_eq!(c3["phase"], "failed");
    assert!(c3["error"].as_str().unwrap().contains("emory"), "{c3:#}");
    for l in leases(coord) {
        assert_ne!(l["state"], "running", "{l:#}");
        assert_ne!(l["state"], "starting", "{l:#}");
    }
    let again = cluster(coord, &["hire", "c4", "--gpus", "6", "--dry-run"]).unwrap();
    assert_eq!(
        again["plan"]["members"].as_array().unwrap().len(),
        3,
        "every GPU free again"
    );
    // An ended or failed cluster's record can be deleted.
    assert!(coord.cli("cluster", &["delete", "c3"]).status.success());
}

/// `--purpose ray`: the head in the first member's container on its mesh
/// address, the others joining it, token authentication on; the hire is
/// ready when Ray says every member is alive, and the renter's connection
/// details work only with the token. Then the cluster is scaled up by one
/// and down by one, and a member whose agent dies is replaced by the node
/// left free.
#[test]
fn a_ray_cluster_is_ready_when_every_member_is_alive() {
    let mut r = rig(
        "wr",
        203,
        &[
            "region = \"eu\"",
            "region = \"eu\"",
            "region = \"eu\"",
            "region = \"eu\"",
        ],
        0,
    );
    let image = common::ray::ray_image();
    let _clean: Vec<ContainersOf> = r.names.iter().map(|n| ContainersOf(n.clone())).collect();
    // A Ray cluster runs Ray: a command of the renter's is refused.
    let err = cluster(
        &r.coord,
        &[
            "hire",
            "bad",
            "--nodes",
            "2",
            "--purpose",
            "ray",
            "--image",
            &image,
            "--",
            "python3",
        ],
    )
    .unwrap_err();
    assert!(err.contains("no command"), "{err}");
    let hired = cluster(
        &r.coord,
        &[
            "hire",
            "r1",
            "--nodes",
            "3",
            "--purpose",
            "ray",
            "--image",
            &image,
            "--cpus",
            "1",
            "--memory",
            "2g",
            "--duration",
            "10m",
            "--timeout",
            "300",
        ],
    )
    .unwrap();
    let c = &hired["cluster"];
    assert_eq!(c["phase"], "ready", "{hired:#}");
    eprintln!("ray hire of 3 nodes: {}", c["timings"]);
    assert!(c["timings"]["ray_ms"].as_u64().unwrap() > 0);
    let head = members(c)[0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(c["ray_address"], format!("{head}:6379"));
    assert_eq!(c["ray_client"], format!("ray://{head}:10001"));
    let token = c["ray_token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 64);
    let text = String::from_utf8(r.coord.cli("cluster", &["status", "r1"]).stdout).unwrap();
    assert!(text.contains(&format!("RAY_AUTH_TOKEN={token}")), "{text}");

    // Each member's interface is WireGuard with the others as peers (`wg
    // show` through its UAPI socket, which stays on the host).
    let first = r
        .names
        .iter()
        .position(|n| *n == members(c)[0]["node_id"])
        .unwrap();
    let ifname = format!("wr{first}-{}", r.id);
    let show = run(&["wg", "show", &ifname]);
    let show = String::from_utf8_lossy(&show.stdout);
    assert_eq!(show.matches("peer: ").count(), 2, "{show}");
    assert!(show.contains("latest handshake"), "{show}");

    // From the second member's container, a driver with the token sees every
    // node, and a task placed on each returns that node's mesh address (so
    // the work crossed the mesh); with a wrong token it is refused.
    let second = container_of(members(c)[1]["lease_id"].as_str().unwrap());
    let driver = |token: &str| {
        std::process::Command::new("docker")
            .args(["exec", "-e", &format!("RAY_AUTH_TOKEN={token}"), &second])
            .args(["timeout", "-k", "5", "120", "python3", "-c"])
            .arg(format!(
                "import ray; ray.init(address='{head}:6379', logging_level='ERROR'); \
                 print('alive', sum(1 for n in ray.nodes() if n['Alive']))"
            ))
            .output()
            .unwrap()
    };
    let ok = driver(&token);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        out.contains("alive 3"),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let placed = std::process::Command::new("docker")
        .args(["exec", "-e", &format!("RAY_AUTH_TOKEN={token}"), &second])
        .args(["timeout", "-k", "5", "180", "python3", "-c"])
        .arg(format!(
            "import ray\n\
             from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On\n\
             ray.init(address='{head}:6379', logging_level='ERROR')\n\
             @ray.remote(num_cpus=0)\n\
             def where():\n    return ray.util.get_node_ip_address()\n\
             ids = [n['NodeID'] for n in ray.nodes() if n['Alive']]\n\
             got = ray.get([where.options(scheduling_strategy=On(i, soft=False)).remote() for i in ids])\n\
             print('ran on', ' '.join(sorted(got)))\n"
        ))
        .output()
        .unwrap();
    let host = |m: &Value| {
        m["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_owned()
    };
    let mut mesh: Vec<String> = members(c).iter().map(host).collect();
    mesh.sort();
    let ran = String::from_utf8_lossy(&placed.stdout);
    assert!(
        ran.contains(&format!("ran on {}", mesh.join(" "))),
        "{ran}{}",
        String::from_utf8_lossy(&placed.stderr)
    );
    // No Ray port is reachable off the mesh: not the head's GCS or client
    // server through its bridge address.
    let head_container = container_of(members(c)[0]["lease_id"].as_str().unwrap());
    for port in [6379, 10001] {
        assert!(
            !bridge_connects(&head_container, port),
            "Ray port {port} off the mesh"
        );
    }
    let bad = driver(&"0".repeat(64));
    assert!(
        !String::from_utf8_lossy(&bad.stdout).contains("alive"),
        "a wrong token is refused"
    );

    // Up by one: the free node starts, meshes and joins Ray live (the
    // coordinator answers once Ray counts four alive).
    let ray_alive_at = |container: &str| -> String {
        let out = std::process::Command::new("docker")
            .args(["exec", "-e", &format!("RAY_AUTH_TOKEN={token}"), container])
            .args(["timeout", "-k", "5", "120", "python3", "-c"])
            .arg(format!(
                "import ray; ray.init(address='{head}:6379', logging_level='ERROR'); \
                 print('alive', ' '.join(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))"
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let up = cluster(
        &r.coord,
        &["scale", "r1", "--nodes", "4", "--timeout", "300"],
    )
    .unwrap();
    assert_eq!(up["phase"], "ready", "{up:#}");
    let m4 = members(&up);
    assert_eq!(m4.len(), 4, "{up:#}");
    assert_eq!(m4[0]["node_id"], members(c)[0]["node_id"], "the head stays");
    let fourth = m4[3].clone();
    assert_eq!(up["events"][0]["kind"], "scaled-up", "{up:#}");
    assert_eq!(up["events"][0]["node_id"], fourth["node_id"]);
    assert_eq!(up["order"]["nodes"], 4);
    let alive = ray_alive_at(&head_container);
    assert!(alive.contains(&host(&fourth)), "{alive}");
    // Down by one: the newest member leaves and its lease ends.
    let down = cluster(&r.coord, &["scale", "r1", "--nodes", "3"]).unwrap();
    assert_eq!(down["phase"], "ready", "{down:#}");
    let m3 = members(&down);
    assert_eq!(m3.len(), 3);
    assert!(m3.iter().all(|m| m["node_id"] != fourth["node_id"]));
    assert_eq!(down["events"][1]["kind"], "scaled-down", "{down:#}");
    assert_eq!(
        lease_state(&r.coord, fourth["lease_id"].as_str().unwrap()),
        "ended"
    );
    // A size the members cannot make is refused, naming what it can be.
    let err = cluster(&r.coord, &["scale", "r1", "--gpus", "3"]).unwrap_err();
    assert!(err.contains("--nodes"), "{err}");

    // The second member's agent dies: two seconds later the member is
    // lost, and the node left free takes its place, in the mesh and in Ray.
    let lost = m3[1].clone();
    let at = r.names.iter().position(|n| *n == lost["node_id"]).unwrap();
    r.agents[at].proc.kill9();
    let healed = wait_for("the lost member replaced", Duration::from_secs(240), || {
        let s = cluster(&r.coord, &["status", "r1"]).ok()?;
        (s["phase"] == "ready"
            && s["events"]
                .as_array()?
                .iter()
                .any(|e| e["kind"] == "replaced" || e["kind"] == "not-replaced"))
        .then_some(s)
    });
    let events = healed["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["scaled-up", "scaled-down", "lost", "replaced"],
        "{healed:#}"
    );
    assert_eq!(events[2]["node_id"], lost["node_id"]);
    assert!(
        events[2]["detail"]
            .as_str()
            .unwrap()
            .contains("not been connected"),
        "{healed:#}"
    );
    assert_eq!(events[3]["replacement_node_id"], fourth["node_id"]);
    let now = members(&healed);
    assert_eq!(now.len(), 3);
    assert!(now.iter().all(|m| m["node_id"] != lost["node_id"]));
    let newcomer = now
        .iter()
        .find(|m| m["node_id"] == fourth["node_id"])
        .unwrap();
    assert_eq!(newcomer["lease_id"], events[3]["replacement_lease_id"]);
    assert_eq!(
        lease_state(&r.coord, newcomer["lease_id"].as_str().unwrap()),
        "running"
    );
    let alive = ray_alive_at(&head_container);
    assert!(alive.contains(&host(newcomer)), "{alive}");
    let text = String::from_utf8(r.coord.cli("cluster", &["status", "r1"]).stdout).unwrap();
    assert!(text.contains("replaced") && text.contains("lost"), "{text}");

    let ended = cluster(&r.coord, &["end", "r1"]).unwrap();
    assert_eq!(ended["phase"], "ended");

    // Its proof lists every lease it ever had: the three members, the one
    // scaled away and the lost one. Each holds but the lost member's, whose
    // node died before it could prove anything; nothing is missing or extra.
    let every: Vec<String> = now
        .iter()
        .map(|m| m["lease_id"].as_str().unwrap().to_owned())
        .chain([fourth["lease_id"].as_str().unwrap().to_owned()])
        .collect();
    for id in &every {
        wait_for("the verdict", Duration::from_secs(60), || {
            leases(&r.coord)
                .into_iter()
                .find(|l| l["lease_id"] == id.as_str() && l["verdict"] != "")
        });
    }
    let proof = r.tmp.path().join("r1-proof");
    let out = r
        .coord
        .cli("cluster", &["export", "r1", "-o", proof.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(WARDEN)
        .arg("verify")
        .arg(&proof)
        .arg("--coordinator-key")
        .arg(r.coord.dir.join("coordinator.pub"))
        .args(["--min-coverage", "0", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["failures"], serde_json::json!([]), "{report:#}");
    let record = &report["record"];
    assert_eq!(record["events"].as_array().unwrap().len(), 4, "{report:#}");
    let outcomes = report["leases"].as_array().unwrap();
    assert_eq!(outcomes.len(), 5, "{report:#}");
    let lost_lease = lost["lease_id"].as_str().unwrap();
    for l in outcomes {
        assert_eq!(l["listed"], true, "{l:#}");
        assert_eq!(l["failures"], serde_json::json!([]), "{l:#}");
        let bundle_failures = l["report"]["failures"].as_array().unwrap();
        assert_eq!(
            bundle_failures.is_empty(),
            l["lease_id"] != lost_lease,
            "{l:#}"
        );
    }
    let entry = |id: &str| {
        record["leases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["lease_id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(entry(lost_lease)["left_reason"], "lost");
    assert_eq!(
        entry(fourth["lease_id"].as_str().unwrap())["left_reason"],
        "scaled-down"
    );
    assert_eq!(entry(&every[0])["left_reason"], "cluster-ended");
}
