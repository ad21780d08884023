//! SIGHUP: which settings of a re-read configuration the running agent
//! takes at once, and which wait for a restart.
//!
//! Pure: the running and the new configuration in, the plan out. A key is
//! live only if it is listed in [`LIVE`] and copied by [`merge_live`]; every
//! other key, including any added later, needs a restart, which is the safe
//! default.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::config::{AgentConfig, WorkloadConfig};

/// Keys (or `section.` prefixes) applied without a restart, and why that is safe:
/// - `timelock.allow_exe`, `kill_grace`, `device_patterns`, `prevent`,
///   `safety_scan`: the enforcer reads them afresh each cycle (the open guard
///   is started or dropped at once); the chain records what it decided
///   either way, and each window says how it was guarded.
/// - `workload.*` but the Docker socket: checked when a container is created or
///   stopped; running containers keep the confinement they were made with.
/// - `doctor.*`: not used by the agent; `warden doctor` reads the file itself.
pub const LIVE: &[&str] = &[
    "timelock.allow_exe",
    "timelock.kill_grace",
    "timelock.device_patterns",
    "timelock.prevent",
    "timelock.safety_scan",
    "workload.allowed_host_paths",
    "workload.allowed_capabilities",
    "workload.default_memory_bytes",
    "workload.pids_limit",
    "workload.stop_grace",
    "workload.gpu_driver",
    "workload.publish_address",
    "workload.min_host_port",
    "workload.clock_skew",
    "workload.scratch",
    "doctor.",
];

/// What a reload does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Changed keys now in effect.
    pub applied: Vec<String>,
    /// Changed keys that keep their running value until a restart.
    pub restart: Vec<String>,
    /// The configuration to run with from now on: the running one with
    /// the live keys taken from the new one.
    pub config: AgentConfig,
}

/// Compares the running configuration with a re-read one.
pub fn plan(running: &AgentConfig, new: &AgentConfig) -> Plan {
    let (applied, restart) = changed_keys(running, new)
        .into_iter()
        .partition(|k| is_live(k));
    Plan {
        applied,
        restart,
        config: merge_live(running, new),
    }
}

/// Whether a key is applied without a restart.
pub fn is_live(key: &str) -> bool {
    LIVE.iter().any(|l| match l.strip_suffix('.') {
        Some(section) => key
            .strip_prefix(section)
            .is_some_and(|r| r.starts_with('.')),
        None => key == *l,
    })
}

/// `running` with every live key's value taken from `new`.
fn merge_live(running: &AgentConfig, new: &AgentConfig) -> AgentConfig {
    let mut m = running.clone();
    m.timelock.allow_exe = new.timelock.allow_exe.clone();
    m.timelock.kill_grace = new.timelock.kill_grace;
    m.timelock.device_patterns = new.timelock.device_patterns.clone();
    m.timelock.prevent = new.timelock.prevent;
    m.timelock.safety_scan = new.timelock.safety_scan;
    m.workload = WorkloadConfig {
        docker_socket: running.workload.docker_socket.clone(),
        ..new.workload.clone()
    };
    m.doctor = new.doctor.clone();
    m
}

/// Dotted names of the leaf keys whose values differ, sorted. An absent
/// optional section (`coordinator`) counts as every key of it unset, so a
/// section that appears is reported by its keys, not by its name.
pub fn changed_keys(a: &AgentConfig, b: &AgentConfig) -> Vec<String> {
    let (a, b) = (leaves(a), leaves(b));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k).unwrap_or(&Value::Null) != b.get(*k).unwrap_or(&Value::Null))
        .cloned()
        .collect()
}

fn leaves(c: &AgentConfig) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, v: Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            leaf => {
                out.insert(prefix.to_owned(), leaf);
            }
        }
    }
    let mut out = BTreeMap::new();
    // Every field is a plain value, path, string or duration: serializing cannot fail.
    walk("", serde_json::to_value(c).unwrap_or(Value::Null), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> AgentConfig {
        AgentConfig::parse(text, "test").unwrap()
    }

    const LINK: &str = "[coordinator]\naddress = \"https://c.example:7443\"\npublic_key = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\nca_cert = \"/etc/warden/ca.pem\"\n";

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let c = parse(LINK);
        let p = plan(&c, &c.clone());
        assert!(p.applied.is_empty() && p.restart.is_empty(), "{p:?}");
    }

    #[test]
    fn the_allowlist_is_live_and_the_address_waits_for_a_restart() {
        let running = parse(LINK);
        let new = parse(&format!(
            "{}\n[timelock]\nallow_exe = [\"nvidia-persistenced\", \"/usr/bin/dcgm\"]\n",
            LINK.replace("c.example", "d.example")
        ));
        let p = plan(&running, &new);
        assert_eq!(p.applied, ["timelock.allow_exe"]);
        assert_eq!(p.restart, ["coordinator.address"]);
        assert_eq!(
            p.config.timelock.allow_exe,
            ["nvidia-persistenced", "/usr/bin/dcgm"]
        );
        assert_eq!(
            p.config.coordinator.unwrap().address.list(),
            ["https://c.example:7443"],
            "the running address stays until a restart"
        );
        // A list in place of the string is the same one key.
        let listed = parse(&LINK.replace(
            "\"https://c.example:7443\"",
            "[\"https://c.example:7443\", \"https://d.example:7443\"]",
        ));
        assert_eq!(changed_keys(&running, &listed), ["coordinator.address"]);
        assert!(changed_keys(&listed, &listed.clone()).is_empty());
    }

    #[test]
    fn a_new_coordinator_section_is_named_by_its_keys() {
        let p = plan(&parse(""), &parse(LINK));
        assert_eq!(
            p.restart,
            [
                "coordinator.address",
                "coordinator.ca_cert",
                "coordinator.public_key"
            ]
        );
        assert!(p.config.coordinator.is_none());
    }

    #[test]
    fn the_docker_socket_needs_a_restart_while_the_rest_of_workload_is_live() {
        let p = plan(
            &parse(""),
            &parse("[workload]\ndocker_socket = \"/run/d.sock\"\npids_limit = 100\n"),
        );
        assert_eq!(p.applied, ["workload.pids_limit"]);
        assert_eq!(p.restart, ["workload.docker_socket"]);
        assert_eq!(p.config.workload.pids_limit, 100);
        assert_eq!(
            p.config.workload.docker_socket,
            std::path::PathBuf::from("/var/run/docker.sock")
        );
    }

    #[test]
    fn a_prefix_matches_whole_sections_only() {
        assert!(is_live("doctor.min_memory_gb"));
        assert!(!is_live("doctorx.min_memory_gb"));
        assert!(!is_live("doctor"));
        assert!(!is_live("timelock.epoch"));
    }

    /// Every key changed at once: the merge and the LIVE table must agree,
    /// i.e. what the plan calls applied is exactly what changed in the
    /// config it returns, and what it calls restart is exactly what is left.
    #[test]
    fn the_merge_takes_exactly_the_live_keys() {
        let running = parse(LINK);
        let new = parse(
            r#"
state_dir = "/srv/w"
[coordinator]
address = "https://d.example:1"
public_key = "5866666666666666666666666666666666666666666666666666666666666666"
ca_cert = "/other.pem"
server_name = "x"
join_token = "t"
[uplink]
heartbeat_interval = "6s"
backoff_initial = "1s"
backoff_max = "31s"
connect_timeout = "11s"
keepalive = "3s"
max_in_flight = 5
[spool]
dir = "/srv/s"
max_bytes = 2000000
segment_bytes = 70000
[telemetry]
interval = "11s"
max_records = 3
[status]
socket = "/srv/a.sock"
[gpu]
nvml_library = "/x.so"
sample_interval = "2s"
inventory_interval = "61s"
[metrics]
listen = ""
[probe]
interval = "1h"
duration = "3s"
pings = 3
[doctor]
min_memory_gb = 1
min_disk_free_gb = 1
min_download_mbps = 1
min_upload_mbps = 1
max_rtt_ms = 1
max_clock_offset_ms = 1
[workload]
docker_socket = "/d.sock"
allowed_host_paths = ["/data"]
allowed_capabilities = ["SYS_NICE"]
default_memory_bytes = 7000000
pids_limit = 17
stop_grace = "3s"
gpu_driver = "cdi"
publish_address = "0.0.0.0"
min_host_port = 80
clock_skew = "1s"
scratch = "off"
[timelock]
epoch = "20s"
device_patterns = ["/dev/x*"]
allow_exe = ["y"]
kill_grace = "1s"
prevent = false
safety_scan = "5s"
[mesh]
listen_port = 1
endpoints = ["a:1"]
interface = "wm9"
mtu = 1280
rtt_interval = "2s"
socket_dir = "/run/x"
[node]
region = "eu"
country = "DE"
tags = ["a"]
[work_challenge]
image = "solver:1"
"#,
        );
        let p = plan(&running, &new);
        assert_eq!(changed_keys(&running, &p.config), p.applied);
        assert_eq!(changed_keys(&p.config, &new), p.restart);
        // The file above sets every key: a key missing from it (added to the
        // config later) would show up as unchanged and escape this test.
        let all = leaves(&new).len();
        assert_eq!(p.applied.len() + p.restart.len(), all, "{p:?}");
        assert!(p.applied.len() >= 10 && p.restart.len() >= 20, "{p:?}");
    }
}
