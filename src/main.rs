//! `warden`: the agent, the reference coordinator and the tools that talk
//! to them, in one binary.
//!
//! This file parses the command line, sets up logging and the runtime and
//! hands over to one file per command in `cmd/`. The commands are shells:
//! what they do lives in the crates (`warden-agent`, `warden-coordinator`,
//! `warden-proto`); here is only how it is asked for and printed.

mod cmd;
mod dev;
mod settings;
mod signals;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "warden",
    version,
    about = "Warden: a verifiable GPU worker node and its coordinator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the node agent (as a systemd service, or with --dev to try it out).
    Agent(cmd::agent::Args),
    /// Show what this machine offers: host, Docker, TUN and every GPU.
    Inventory(cmd::host::InventoryArgs),
    /// Check this machine against the supplier minimums; exits non-zero
    /// naming each check that fails.
    Doctor(cmd::host::DoctorArgs),
    /// Start, list and end leases (talks to a coordinator's admin socket).
    Lease(cmd::lease::Args),
    /// Group nodes into a cluster joined by a WireGuard mesh (talks to a
    /// coordinator's admin socket).
    Cluster(cmd::cluster::Args),
    /// Check a lease bundle offline against the coordinator key you trust:
    /// signatures, chain, countersignatures, challenges, coverage, proof and
    /// verdict. Exit 0 when it holds; 1 with each broken rule when not.
    Verify(cmd::verify::Args),
    /// Userspace WireGuard interfaces.
    Mesh {
        #[command(subcommand)]
        command: cmd::mesh::MeshCommand,
    },
    /// Docker images on this node.
    Image {
        #[command(subcommand)]
        command: cmd::image::ImageCommand,
    },
    /// Run the reference coordinator.
    Coordinator(cmd::coordinator::Args),
    /// Show a running agent's status.
    Status(cmd::status::Args),
    /// List the nodes a running coordinator knows.
    Nodes(cmd::nodes::Args),
    /// The work challenge's CPU reference solver (the container contract of
    /// docs/attestation.md#work-challenge).
    Challenge {
        #[command(subcommand)]
        command: cmd::challenge::ChallengeCommand,
    },
    /// Make a join token for a coordinator whose enrollment policy is
    /// "token": the token for agents, its SHA-256 for the coordinator.
    JoinToken,
}

fn main() {
    // Errors are for people: the cause chain, never a backtrace (RUST_BACKTRACE
    // is often set on servers), and exit status 1.
    if let Err(e) = run() {
        // Each cause once: many messages already quote their source.
        eprintln!("error: {}", warden_agent::error_chain(e.as_ref()));
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr is a file on a full disk)
        // is lost, not reported with eprintln!, which panics the task that
        // logged — a coordinator's stream task, silently, mid-stream.
        .log_internal_errors(false)
        // No colour codes in the journal or in files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.command {
            Command::Agent(args) => args.run().await,
            Command::Inventory(args) => args.run().await,
            Command::Doctor(args) => args.run().await,
            Command::Lease(args) => args.run().await,
            Command::Cluster(args) => args.run().await,
            Command::Verify(args) => args.run(),
            Command::Mesh { command } => command.run().await,
            Command::Image { command } => command.run().await,
            Command::Coordinator(args) => args.run().await,
            Command::Status(args) => args.run().await,
            Command::Nodes(args) => args.run().await,
            Command::Challenge { command } => command.run(),
            Command::JoinToken => {
                cmd::coordinator::join_token();
                Ok(())
            }
        }
    })
}
