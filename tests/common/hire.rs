//! A hiring rig shared by `tests/hire.rs` and `benches/hire.rs`: a
//! coordinator in a hub and agents with fake GPUs and declared labels,
//! each on its own host of a test LAN.

use std::{path::Path, time::Duration};

use serde_json::Value;

use super::*;

/// Two fake GPUs with no process on them, their uuids unique to this LAN
/// and node: all the tests' agents share one Docker engine, and an agent
/// stops any container holding a GPU uuid it leased (as it must).
pub fn gpus(state: &Path, net: u8, node: usize) {
    let devices: Vec<Value> = (0..2)
        .map(|i| {
            let mut g = fake_gpu(i);
            g["uuid"] =
                format!("GPU-{net:02x}{node:02x}{i:04x}-0000-4000-8000-000000000000").into();
            g["processes"] = serde_json::json!([]);
            g
        })
        .collect();
    write_fake_state(state, &devices);
}

/// `warden cluster ARGS… --json`: Ok(parsed output) or Err(stderr).
pub fn cluster(coord: &Coordinator, args: &[&str]) -> Result<Value, String> {
    // Before any `--`, after which the words are the container's command.
    let mut all = args.to_vec();
    let at = all.iter().position(|a| *a == "--").unwrap_or(all.len());
    all.insert(at, "--json");
    let out = coord.cli("cluster", &all);
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A coordinator in a hub and one agent per `labels` entry on its own host,
/// each with two fake GPUs, all connected: the LAN, the coordinator, the
/// agents and their node ids.
pub struct Rig {
    pub tmp: tempfile::TempDir,
    pub lan: Lan,
    pub coord: Coordinator,
    pub agents: Vec<Agent>,
    pub names: Vec<String>,
    pub id: u32,
}

/// The agent of host `i` of `lan` (its state under `dir`, two fake GPUs
/// with uuids of `net`, a mesh interface named after `tag`), linked by
/// `link`, with `extra` TOML sections.
pub fn member(
    lan: &Lan,
    dir: &Path,
    tag: &str,
    net: u8,
    i: usize,
    link: &str,
    extra: &str,
) -> Agent {
    let id = std::process::id() % 100_000;
    let state = dir.join(format!("gpus{i}.json"));
    let dir = dir.join(format!("agent{i}"));
    gpus(&state, net, i);
    let config = format!(
        "state_dir = \"{}\"\n{}\n[gpu]\nnvml_library = \"{}\"\nsample_interval = \"200ms\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n[probe]\ninterval = \"0s\"\n\
         [mesh]\ninterface = \"{tag}{i}-{id}\"\nendpoints = [\"{}:51820\"]\nrtt_interval = \"1s\"\n\
         [timelock]\nepoch = \"1s\"\n{extra}",
        dir.display(),
        fast_agent_toml(link, "1s", 0),
        fake_nvml().display(),
        lan.host_ip(i),
    );
    lan.agent(i, &dir, &config, &[("FAKE_NVML_STATE", &state)])
}

/// `spare` more hosts on the LAN run no agent (a renter's machine).
pub fn rig(tag: &str, net: u8, labels: &[&str], spare: usize) -> Rig {
    let tmp = tempfile::tempdir().unwrap();
    let id = std::process::id() % 100_000;
    let lan = Lan::new(tag, labels.len() + spare, net);
    // Hires as short as a second: the test cannot wait the seed's hour; a
    // member away for two seconds is replaced.
    let (coord, link) = lan.coordinator(
        &tmp.path().join("coord"),
        free_port(),
        "[clusters]\nmin_duration = \"1s\"\nreplace_after = \"2s\"\n",
    );
    let agents: Vec<Agent> = labels
        .iter()
        .enumerate()
        .map(|(i, labels)| {
            member(
                &lan,
                tmp.path(),
                tag,
                net,
                i,
                &link,
                &format!("[node]\n{labels}\n"),
            )
        })
        .collect();
    let node_of = |a: &Agent| {
        wait_for("agent status", Duration::from_secs(30), || a.status())["node_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let names: Vec<String> = agents.iter().map(node_of).collect();
    wait_for(
        "every node connected with GPUs and a mesh key",
        Duration::from_secs(60),
        || (ready(&nodes_json(&coord))? == labels.len()).then_some(()),
    );
    Rig {
        tmp,
        lan,
        coord,
        agents,
        names,
        id,
    }
}

/// How many nodes of `warden nodes --json` could join a cluster: connected,
/// with a mesh key and the rig's two GPUs.
pub fn ready(nodes: &serde_json::Value) -> Option<usize> {
    Some(
        nodes
            .as_array()?
            .iter()
            .filter(|n| {
                n["connected"] == true
                    && n["mesh_public_key"] != ""
                    && n["inventory"]["gpus"].as_array().map_or(0, |g| g.len()) == 2
            })
            .count(),
    )
}
