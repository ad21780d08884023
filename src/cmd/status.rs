//! `warden status`: a running agent's status, from its local socket.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use warden_agent::status::StatusReport;

use crate::settings::load_agent_config;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    json: bool,
    /// The agent's status socket [default: the agent config's, else
    /// /var/lib/warden/agent.sock].
    #[arg(long, env = "WARDEN_SOCKET")]
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
        .with_context(|| {
            format!(
                "cannot read the agent's status socket {}: is the agent running? (`systemctl status warden-agent`; for `warden agent --dev`, the `export` line it printed)",
                socket.display()
            )
        })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let r: StatusReport = serde_json::from_value(v).context(
        "the agent's status report is not what this warden reads (a different version?)",
    )?;
    print(&r);
    Ok(())
}

fn print(r: &StatusReport) {
    let (c, s) = (&r.coordinator, &r.spool);
    println!("node        {}", r.node_id);
    println!("version     {}  (start {})", r.version, r.start_id);
    if let Some(p) = &r.problem {
        println!("PROBLEM     records are not being receipted: {}", p.text);
    }
    if c.configured {
        let state = if c.uplink.connected {
            "connected"
        } else {
            "disconnected"
        };
        let of = c.uplink.addresses.len();
        let place = match c
            .uplink
            .addresses
            .iter()
            .position(|a| a.address == c.uplink.address)
        {
            Some(i) if of > 1 => format!(" (address {} of {of})", i + 1),
            _ => String::new(),
        };
        println!("coordinator {} {state}{place}", c.uplink.address);
        if let Some(e) = &c.uplink.last_error {
            println!("            last error: {e}");
        }
        if of > 1 {
            for a in &c.uplink.addresses {
                if let (Some(e), false) = (&a.last_error, a.address == c.uplink.address) {
                    println!("            {}: {e}", a.address);
                }
            }
        }
    } else {
        println!("coordinator none configured");
    }
    println!(
        "spool       {} pending, {} of {} bytes{}{}",
        s.pending,
        s.bytes,
        s.max_bytes,
        if s.full {
            format!(", FULL of evidence ({} refused)", s.refused)
        } else {
            String::new()
        },
        if s.shedding {
            ", shedding telemetry"
        } else {
            ""
        }
    );
    if s.shed > 0 {
        println!(
            "            {} telemetry samples shed for lack of room since start",
            s.shed
        );
    }
    if s.set_aside > 0 {
        println!(
            "            {} records set aside (refused for good; spool/refused.log, refused.txt)",
            s.set_aside
        );
    }
    if s.corrupt > 0 {
        println!(
            "            {} damaged frames skipped since start (see the log for their seqs)",
            s.corrupt
        );
    }
    if !s.anchored {
        println!("            waiting for the coordinator's last seq before sending (the spool was started empty)");
    }
    println!("receipts    last seq {}", r.last_receipt_seq);
    match r.guard.as_str() {
        "on" => println!("guard       on: foreign opens of leased GPUs are denied at the open"),
        "" => {}
        off => {
            println!("guard       {off} (foreign holders are found by scanning /proc and ended)")
        }
    }
    let cfg = &r.config;
    if let Some(file) = &cfg.file {
        println!(
            "config      {file}, reloaded {} time(s){}",
            cfg.reloads,
            if cfg.needs_restart.is_empty() {
                String::new()
            } else {
                format!("; needs a restart for: {}", cfg.needs_restart.join(", "))
            }
        );
        if let Some(e) = &cfg.last_error {
            println!("            last reload refused: {e}");
        }
    }
    if r.nvml == "ok" {
        println!("gpus        {}", r.gpus.len());
    } else {
        println!("gpus        none: CPU-only node ({})", r.nvml);
    }
    for g in &r.gpus {
        if g.lost || !g.error.is_empty() {
            println!("  {:<3} {}  {}", g.index, g.uuid, g.error);
        } else {
            println!(
                "  {:<3} {}  {:>3}% util  {:>6} MiB used  {:>4} W  {:>3} C  {} processes",
                g.index,
                g.uuid,
                g.utilization_gpu,
                g.memory_used_bytes >> 20,
                g.power_mw / 1000,
                g.temperature_c,
                g.processes.len(),
            );
        }
    }
    if let Some(l) = &r.link {
        if !l.error.is_empty() {
            println!("link        probe failed: {}", l.error);
        } else {
            println!(
                "link        down {:.0} Mbit/s, up {:.0} Mbit/s, rtt {:.2} ms",
                l.download_mbps, l.upload_mbps, l.rtt_ms
            );
        }
    }
    if let Some(m) = &r.metrics_address {
        println!("metrics     http://{m}/metrics");
    }
    for l in &r.leases {
        let containers: Vec<String> = l
            .containers
            .iter()
            .map(|c| format!("{} {}", c.name, c.state))
            .collect();
        println!(
            "lease       {}  {} GPU(s)  {}",
            l.id,
            l.gpus.len(),
            if containers.is_empty() {
                "no containers".to_owned()
            } else {
                containers.join(", ")
            }
        );
    }
    if let Some(m) = &r.mesh {
        println!(
            "mesh        {} {} in cluster {} (generation {}), port {}",
            m.interface, m.address, m.cluster_id, m.generation, m.listen_port,
        );
        let now = warden_agent::now_ms();
        for p in &m.peers {
            let hs = p.last_handshake_unix_ms;
            println!(
                "  peer {}  {}  endpoint {}  handshake {}  rx {} B  tx {} B  rtt {}",
                p.node_id,
                p.allowed_ips.join(","),
                p.endpoint.as_deref().unwrap_or("unknown"),
                if hs == 0 {
                    "never".to_owned()
                } else {
                    format!("{} s ago", (now - hs).max(0) / 1000)
                },
                p.rx_bytes,
                p.tx_bytes,
                p.rtt_ms
                    .map_or("no answer".to_owned(), |r| format!("{r:.2} ms")),
            );
        }
        for e in &m.errors {
            println!("  problem: {e}");
        }
    }
}
