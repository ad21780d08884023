//! `warden status`: a running agent's status, from its local socket.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::settings::load_agent_config;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    json: bool,
    /// The agent's status socket [default: /var/lib/warden/agent.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl Args {
    pub async fn run(self) -> Result<()> {
        status(self.json, self.socket).await
    }
}

async fn status(json: bool, socket: Option<PathBuf>) -> Result<()> {
    let socket = socket.unwrap_or_else(|| {
        load_agent_config(None)
            .map(|c| c.status_socket())
            .unwrap_or_else(|_| {
                Path::new(warden_agent::config::DEFAULT_STATE_DIR).join("agent.sock")
            })
    });
    let v = warden_agent::status::query(&socket)
        .await
        .with_context(|| "is the agent running? (warden agent, or systemctl status warden)")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let c = &v["coordinator"];
    let s = &v["spool"];
    println!("node        {}", v["node_id"].as_str().unwrap_or("?"));
    println!(
        "version     {}  (start {})",
        v["version"].as_str().unwrap_or("?"),
        v["start_id"].as_str().unwrap_or("?")
    );
    if c["configured"].as_bool() == Some(true) {
        let state = if c["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "disconnected"
        };
        println!(
            "coordinator {} {}",
            c["address"].as_str().unwrap_or("?"),
            state
        );
        if let Some(e) = c["last_error"].as_str() {
            println!("            last error: {e}");
        }
    } else {
        println!("coordinator none configured");
    }
    println!(
        "spool       {} pending, {} of {} bytes{}{}",
        s["pending"],
        s["bytes"],
        s["max_bytes"],
        if s["full"].as_bool() == Some(true) {
            format!(", FULL of evidence ({} refused)", s["refused"])
        } else {
            String::new()
        },
        if s["shedding"].as_bool() == Some(true) {
            ", shedding telemetry"
        } else {
            ""
        }
    );
    let nonzero = |k: &str| s[k].as_u64().filter(|n| *n > 0);
    if let Some(n) = nonzero("shed") {
        println!("            {n} telemetry samples shed for lack of room since start");
    }
    if let Some(n) = nonzero("set_aside") {
        println!(
            "            {n} records set aside (refused for good; spool/refused.log, refused.txt)"
        );
    }
    if let Some(n) = nonzero("corrupt") {
        println!("            {n} damaged frames skipped since start (see the log for their seqs)");
    }
    if s["anchored"].as_bool() == Some(false) {
        println!("            waiting for the coordinator's last seq before sending (the spool was started empty)");
    }
    println!("receipts    last seq {}", v["last_receipt_seq"]);
    let cfg = &v["config"];
    if let Some(file) = cfg["file"].as_str() {
        let restart: Vec<&str> = cfg["needs_restart"]
            .as_array()
            .map(|a| a.iter().filter_map(|k| k.as_str()).collect())
            .unwrap_or_default();
        println!(
            "config      {file}, reloaded {} time(s){}",
            cfg["reloads"],
            if restart.is_empty() {
                String::new()
            } else {
                format!("; needs a restart for: {}", restart.join(", "))
            }
        );
        if let Some(e) = cfg["last_error"].as_str() {
            println!("            last reload refused: {e}");
        }
    }
    let gpus = v["gpus"].as_array().cloned().unwrap_or_default();
    match v["nvml"].as_str() {
        Some("ok") => println!("gpus        {}", gpus.len()),
        Some(why) => println!("gpus        none: CPU-only node ({why})"),
        None => {}
    }
    for g in &gpus {
        if g["lost"] == true || g["error"].as_str().is_some_and(|e| !e.is_empty()) {
            println!(
                "  {:<3} {}  {}",
                g["index"],
                g["uuid"].as_str().unwrap_or("?"),
                g["error"].as_str().unwrap_or("")
            );
        } else {
            println!(
                "  {:<3} {}  {:>3}% util  {:>6} MiB used  {:>4} W  {:>3} C  {} processes",
                g["index"],
                g["uuid"].as_str().unwrap_or("?"),
                g["utilization_gpu"],
                g["memory_used_bytes"].as_u64().unwrap_or(0) >> 20,
                g["power_mw"].as_u64().unwrap_or(0) / 1000,
                g["temperature_c"],
                g["processes"].as_array().map_or(0, |p| p.len()),
            );
        }
    }
    let l = &v["link"];
    if !l.is_null() {
        if l["error"].as_str().is_some_and(|e| !e.is_empty()) {
            println!(
                "link        probe failed: {}",
                l["error"].as_str().unwrap_or("")
            );
        } else {
            println!(
                "link        down {:.0} Mbit/s, up {:.0} Mbit/s, rtt {:.2} ms",
                l["download_mbps"].as_f64().unwrap_or(0.0),
                l["upload_mbps"].as_f64().unwrap_or(0.0),
                l["rtt_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    if let Some(m) = v["metrics_address"].as_str() {
        println!("metrics     http://{m}/metrics");
    }
    for l in v["leases"].as_array().cloned().unwrap_or_default() {
        let containers: Vec<String> = l["containers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|c| {
                format!(
                    "{} {}",
                    c["name"].as_str().unwrap_or("?"),
                    c["state"].as_str().unwrap_or("?")
                )
            })
            .collect();
        println!(
            "lease       {}  {} GPU(s)  {}",
            l["id"].as_str().unwrap_or("?"),
            l["gpus"].as_array().map_or(0, |g| g.len()),
            if containers.is_empty() {
                "no containers".to_owned()
            } else {
                containers.join(", ")
            }
        );
    }
    let m = &v["mesh"];
    if !m.is_null() {
        println!(
            "mesh        {} {} in cluster {} (generation {}), port {}",
            m["interface"].as_str().unwrap_or("?"),
            m["address"].as_str().unwrap_or("?"),
            m["cluster_id"].as_str().unwrap_or("?"),
            m["generation"],
            m["listen_port"],
        );
        let now = warden_agent::now_ms();
        for p in m["peers"].as_array().cloned().unwrap_or_default() {
            let hs = p["last_handshake_unix_ms"].as_i64().unwrap_or(0);
            println!(
                "  peer {}  {}  endpoint {}  handshake {}  rx {} B  tx {} B  rtt {}",
                p["node_id"].as_str().unwrap_or("?"),
                p["allowed_ips"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(","))
                    .unwrap_or_default(),
                p["endpoint"].as_str().unwrap_or("unknown"),
                if hs == 0 {
                    "never".to_owned()
                } else {
                    format!("{} s ago", (now - hs).max(0) / 1000)
                },
                p["rx_bytes"],
                p["tx_bytes"],
                p["rtt_ms"]
                    .as_f64()
                    .map_or("no answer".to_owned(), |r| format!("{r:.2} ms")),
            );
        }
        for e in m["errors"].as_array().cloned().unwrap_or_default() {
            println!("  problem: {}", e.as_str().unwrap_or(""));
        }
    }
    Ok(())
}
