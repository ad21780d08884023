//! Where the commands find their configuration: an explicit file, the
//! default one when it exists, or the defaults; with the command line's
//! overrides applied the same way at start and at each reload.

use std::path::{Path, PathBuf};

use anyhow::Result;
use warden_agent::AgentConfig;
use warden_coordinator::CoordinatorConfig;

pub const AGENT_CONFIG: &str = "/etc/warden/agent.toml";

/// The agent's config file (or the defaults without one) with the command
/// line's overrides, validated: at start and at each reload.
pub fn agent_config(
    file: Option<&Path>,
    state_dir: Option<&Path>,
    nvml_lib: Option<&Path>,
) -> Result<AgentConfig, warden_agent::config::ConfigError> {
    let mut cfg = match file {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    };
    if let Some(d) = state_dir {
        cfg.state_dir = d.to_owned();
    }
    if let Some(l) = nvml_lib {
        cfg.gpu.nvml_library = Some(l.to_owned());
    }
    cfg.validate()?;
    Ok(cfg)
}

/// An explicit path must exist; the default path is used only if it does.
pub fn config_path(given: Option<PathBuf>, default: &str) -> Option<PathBuf> {
    given.or_else(|| Some(PathBuf::from(default)).filter(|p| p.exists()))
}

pub fn load_agent_config(path: Option<PathBuf>) -> Result<AgentConfig> {
    Ok(match config_path(path, AGENT_CONFIG) {
        Some(p) => AgentConfig::load(&p)?,
        None => AgentConfig::default(),
    })
}

pub fn load_coordinator_config(path: Option<PathBuf>) -> Result<CoordinatorConfig> {
    Ok(match config_path(path, COORDINATOR_CONFIG) {
        Some(p) => CoordinatorConfig::load(&p)?,
        None => CoordinatorConfig::default(),
    })
}

pub const COORDINATOR_CONFIG: &str = "/etc/warden/coordinator.toml";
