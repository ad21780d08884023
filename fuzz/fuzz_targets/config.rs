//! The agent's and the coordinator's TOML configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = warden_agent::AgentConfig::parse(text, "fuzz");
        let _ = warden_coordinator::config::CoordinatorConfig::parse(text, "fuzz");
    }
});
