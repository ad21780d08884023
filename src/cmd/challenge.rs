//! `warden challenge solve`: the CPU reference solver of the work
//! challenge, behind the same container contract as a CUDA image's
//! (docs/attestation.md#work-challenge): the challenge from WARDEN_WORK_*
//! variables, the answer JSON on stdout.

use anyhow::Result;
use clap::Subcommand;
use warden_proto::workproof::{
    self,
    contract::{Input, Output},
};

#[derive(Subcommand)]
pub enum ChallengeCommand {
    /// Solve the work challenge named by the WARDEN_WORK_* environment on
    /// the CPU and print the answer JSON (O(n³): for tests and small n).
    Solve {
        /// Threads for the product (default: every CPU).
        #[arg(long)]
        threads: Option<usize>,
    },
}

impl ChallengeCommand {
    pub fn run(self) -> Result<()> {
        match self {
            ChallengeCommand::Solve { threads } => {
                let input = Input::from_env(|k| std::env::var(k).ok())?;
                let threads = threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
                let rounds = workproof::solve(&input.seed, &input.node_id, &input.params, threads)?;
                println!("{}", serde_json::to_string(&Output::of(&rounds))?);
                Ok(())
            }
        }
    }
}
