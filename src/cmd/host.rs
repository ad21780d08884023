//! `warden inventory` and `warden doctor`: what this machine offers, and
//! whether it meets the supplier minimums.

use std::path::PathBuf;

use anyhow::Result;
use warden_agent::AgentConfig;

use crate::settings::{agent_config, config_path, AGENT_CONFIG};

#[derive(clap::Args)]
pub struct InventoryArgs {
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    local: Local,
}

impl InventoryArgs {
    pub async fn run(self) -> Result<()> {
        inventory(self.json, self.local.load()?).await
    }
}

#[derive(clap::Args)]
pub struct DoctorArgs {
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    local: Local,
}

impl DoctorArgs {
    pub async fn run(self) -> Result<()> {
        doctor(self.json, self.local.load()?).await
    }
}

/// How the local tools find the agent's settings.
#[derive(clap::Args)]
struct Local {
    /// Agent config file [default: /etc/warden/agent.toml when it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// State directory (overrides the config's state_dir).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The NVML library (overrides gpu.nvml_library).
    #[arg(long)]
    nvml_lib: Option<PathBuf>,
}

impl Local {
    fn load(self) -> Result<AgentConfig> {
        let file = config_path(self.config, AGENT_CONFIG);
        Ok(agent_config(
            file.as_deref(),
            self.state_dir.as_deref(),
            self.nvml_lib.as_deref(),
        )?)
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

async fn inventory(json: bool, cfg: AgentConfig) -> Result<()> {
    let inv = tokio::task::spawn_blocking(move || {
        let gpus = warden_agent::host::gpu::nvml::NvmlSource::load(cfg.gpu.nvml_library.as_deref());
        let src = gpus
            .as_ref()
            .map(|g| g as &dyn warden_agent::host::gpu::GpuSource)
            .map_err(|e| e.to_string());
        warden_agent::host::inventory::collect(&cfg.state_dir, src)
    })
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&inv)?);
        return Ok(());
    }
    println!(
        "host       {} ({}), kernel {}",
        inv.hostname, inv.os, inv.kernel
    );
    println!("cpu        {}, {} cores", inv.cpu_model, inv.cpu_cores);
    println!("memory     {}", gib(inv.memory_bytes));
    println!(
        "disk free  {} (state dir filesystem)",
        gib(inv.disk_free_bytes)
    );
    println!("docker     {}", inv.docker);
    println!(
        "tun        {}",
        if inv.tun_available {
            "available"
        } else {
            "unavailable"
        }
    );
    if inv.nvml_status == "ok" {
        println!(
            "nvml       driver {}, CUDA {}.{}",
            inv.driver_version,
            inv.cuda_version / 1000,
            inv.cuda_version % 1000 / 10
        );
    } else {
        println!("nvml       not loaded: {} (CPU-only node)", inv.nvml_status);
    }
    if !inv.gpus.is_empty() {
        println!(
            "\n{:<4} {:<42} {:<28} {:>10}  PCI",
            "GPU", "UUID", "NAME", "MEMORY"
        );
        for g in &inv.gpus {
            println!(
                "{:<4} {:<42} {:<28} {:>10}  {}",
                g.index,
                g.uuid,
                g.name,
                gib(g.memory_total_bytes),
                g.pci_bus_id
            );
        }
    }
    Ok(())
}

async fn doctor(json: bool, cfg: AgentConfig) -> Result<()> {
    use warden_agent::host::doctor;
    let facts = doctor::gather(&cfg).await;
    let checks = doctor::evaluate(&facts, &cfg.doctor);
    let failed = doctor::failed(&checks);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": failed.is_empty(),
                "failed": failed,
                "checks": checks,
            }))?
        );
    } else {
        for c in &checks {
            let verdict = match c.verdict {
                doctor::Verdict::Pass => "pass",
                doctor::Verdict::Warn => "warn",
                doctor::Verdict::Fail => "FAIL",
                doctor::Verdict::Skip => "skip",
            };
            println!(
                "{:<9} {:<5} {}  (want {})",
                c.name, verdict, c.value, c.threshold
            );
            if !c.fix.is_empty() && c.verdict != doctor::Verdict::Pass {
                println!("{:<15} fix: {}", "", c.fix);
            }
        }
    }
    if failed.is_empty() {
        return Ok(());
    }
    // A verdict, not an error: the names and exit status 1, no backtrace.
    eprintln!("{} check(s) failed: {}", failed.len(), failed.join(", "));
    std::process::exit(1);
}
