//! Development mode: how an agent is pointed at a dev coordinator.

use std::path::Path;

use warden_agent::config::CoordinatorLink;

/// The `[coordinator]` section an agent needs to reach a dev coordinator.
pub fn link(port: u16, public_key: &str, ca_cert: &Path) -> CoordinatorLink {
    CoordinatorLink {
        address: format!("https://localhost:{port}").into(),
        public_key: public_key.to_owned(),
        ca_cert: ca_cert.to_owned(),
        server_name: None,
        join_token: None,
    }
}

/// The same section as TOML text, for other agents to paste or include.
pub fn link_toml(link: &CoordinatorLink) -> String {
    let mut text = format!(
        "[coordinator]\naddress = {}\npublic_key = \"{}\"\nca_cert = \"{}\"\n",
        link.address.to_toml(),
        link.public_key,
        link.ca_cert.display()
    );
    if let Some(token) = &link.join_token {
        text.push_str(&format!("join_token = \"{token}\"\n"));
    }
    text
}
