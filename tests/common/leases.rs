//! A coordinator and an agent connected to it, driven through the
//! operator's `warden lease` commands: what the lease tests share.

use std::{
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use serde_json::Value;

use super::{fast_agent_toml, free_port, wait_for, Agent, Coordinator, WARDEN};

/// A coordinator and an agent connected to it, with the agent's node id.
pub struct Node {
    pub coord: Coordinator,
    pub agent: Agent,
    pub node_id: String,
}

/// A node whose agent has `workload` in its `[workload]` section, and
/// `extra` after it.
pub fn node(tmp: &Path, workload: &str, extra: &str) -> Node {
    node_under(tmp, &[], workload, extra)
}

/// As [`node`], the agent started through `wrapper` (`unshare …`, `setpriv …`).
pub fn node_under(tmp: &Path, wrapper: &[&str], workload: &str, extra: &str) -> Node {
    let coord = Coordinator::start(&tmp.join("coord"), free_port());
    let dir = tmp.join("agent");
    let config = Agent::write_config(
        &dir,
        &format!(
            "{}\n[workload]\n{workload}\n{extra}",
            fast_agent_toml(&coord.link_toml(), "1h", 0)
        ),
    );
    let agent = Agent::start_under(wrapper, &dir, &config, &[]);
    let s = wait_for("agent connected", Duration::from_secs(30), || {
        agent
            .status()
            .filter(|s| s["coordinator"]["connected"] == true)
    });
    let node_id = s["node_id"].as_str().unwrap().to_owned();
    Node {
        coord,
        agent,
        node_id,
    }
}

impl Node {
    /// `warden COMMAND --socket ADMIN ARGS…` (before any `--` that ends the options).
    pub fn warden(&self, args: &[&str]) -> Output {
        Command::new(WARDEN)
            .arg(args[0])
            .args(["--socket", self.coord.admin_socket().to_str().unwrap()])
            .args(&args[1..])
            .output()
            .unwrap()
    }

    /// `warden lease start NODE ARGS…`: Ok(lease id) or Err(stderr).
    pub fn start(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["lease", "start", &self.node_id];
        all.extend_from_slice(args);
        let out = self.warden(&all);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A lease of `image` running `sh -c SCRIPT`.
    pub fn start_sh(&self, image: &str, script: &str) -> Result<String, String> {
        self.start(&["--image", image, "--", "sh", "-c", script])
    }

    /// A lease of `image` with the bind mount `mount` (`SRC:DST[:ro]`),
    /// running `true`.
    pub fn start_mounting(&self, image: &str, mount: &str) -> Result<String, String> {
        self.start(&["--image", image, "--mount", mount, "--", "true"])
    }

    /// `warden lease end ID`, which must succeed; its output.
    pub fn end(&self, id: &str) -> Output {
        let out = self.warden(&["lease", "end", id]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

/// `docker inspect NAME`'s object, None if there is none.
pub fn inspect(name: &str) -> Option<Value> {
    let out = Command::new("docker")
        .args(["inspect", name])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()?
        .get(0)
        .cloned()
}
