//! `warden verify`: a lease bundle checked offline against the keys the
//! verifier trusts.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct Args {
    bundle: PathBuf,
    #[command(flatten)]
    trust: TrustArgs,
    /// Least acceptable countersigned coverage.
    #[arg(long, default_value_t = 0.9)]
    min_coverage: f64,
    /// Clock difference tolerated between node, coordinator and this machine.
    #[arg(long, default_value_t = 5000)]
    max_skew_ms: i64,
    /// A window countersigned later than this after it ended counts as not covered.
    #[arg(long, default_value_t = warden_proto::chain::MAX_DELAY_MS)]
    max_delay_ms: i64,
    /// The verifier's clock, ms since the Unix epoch (default: now), for reproducible runs.
    #[arg(long)]
    now: Option<i64>,
    #[arg(long)]
    json: bool,
}

impl Args {
    pub fn run(self) -> Result<()> {
        verify(
            &self.bundle,
            &self.trust,
            &warden_proto::chain::Params {
                max_skew_ms: self.max_skew_ms,
                min_coverage: self.min_coverage,
                now_unix_ms: self.now.unwrap_or_else(warden_agent::now_ms),
                max_delay_ms: self.max_delay_ms,
            },
            self.json,
        )
    }
}

/// The keys `warden verify` trusts: never the bundle's own, unless asked.
#[derive(clap::Args)]
struct TrustArgs {
    /// The coordinator's public key (base64 or hex, or a file holding it),
    /// from its operator (`warden coordinator key`).
    #[arg(long, value_name = "KEY|FILE")]
    coordinator_key: Option<String>,
    /// The node's public key, to pin it too (otherwise the bundle's, bound
    /// to the lease by the coordinator's verdict and countersignatures).
    #[arg(long, value_name = "KEY|FILE")]
    node_key: Option<String>,
    /// A file of trusted keys: lines `coordinator KEY` and `node KEY` (# comments).
    #[arg(long, value_name = "FILE")]
    keys: Option<PathBuf>,
    /// With no key pinned, take the bundle's own keys and say so: a
    /// self-asserted check that proves nothing against the node's owner.
    #[arg(long)]
    self_asserted: bool,
}

/// A key given on the command line: the key itself, or a file holding it.
fn parse_key(text: &str, what: &str) -> Result<warden_proto::dsse::VerifyingKey> {
    use warden_proto::dsse::VerifyingKey;
    if let Ok(k) = VerifyingKey::parse(text.trim()) {
        return Ok(k);
    }
    let path = Path::new(text);
    let contents = std::fs::read_to_string(path).with_context(|| {
        format!("{what} `{text}` is neither a key (base64 or hex) nor a readable file")
    })?;
    // The first word of the first non-comment line (`warden coordinator key` prints it first).
    let key = contents
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or("");
    VerifyingKey::parse(key).with_context(|| format!("{what} in {}", path.display()))
}

/// The trust anchors from `--coordinator-key`, `--node-key` and `--keys`.
fn trust_from(args: &TrustArgs) -> Result<warden_proto::bundle::Trust> {
    let mut trust = warden_proto::bundle::Trust {
        self_asserted: args.self_asserted,
        ..Default::default()
    };
    if let Some(file) = &args.keys {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading keys file {}", file.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("{}:{}", file.display(), n + 1);
            match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["coordinator", key] => {
                    trust.coordinator_key = Some(parse_key(key, &at())?);
                }
                ["node", key] => trust.node_key = Some(parse_key(key, &at())?),
                _ => anyhow::bail!("{}: expected `coordinator KEY` or `node KEY`", at()),
            }
        }
    }
    if let Some(k) = &args.coordinator_key {
        trust.coordinator_key = Some(parse_key(k, "--coordinator-key")?);
    }
    if let Some(k) = &args.node_key {
        trust.node_key = Some(parse_key(k, "--node-key")?);
    }
    Ok(trust)
}

fn verify(
    path: &Path,
    trust: &TrustArgs,
    params: &warden_proto::chain::Params,
    json: bool,
) -> Result<()> {
    use warden_proto::bundle::Bundle;
    let trust = trust_from(trust)?;
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let bundle = Bundle::from_json(&value)?;
    let (report, keys) = bundle.verify(&trust, params);
    let s = &report.summary;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "holds": report.holds(),
                "keys": keys,
                "summary": s,
                "failures": report.failures,
            }))?
        );
    } else {
        println!(
            "trusted     coordinator key {} ({}); node key {} ({})",
            keys.coordinator_key_id.as_deref().unwrap_or("-"),
            keys.coordinator_key_source,
            keys.node_key_id,
            keys.node_key_source
        );
        println!("lease       {} on node {}", s.lease_id, s.node_id);
        println!(
            "chain       {} records, lease seq {}..{}, head {}",
            s.records,
            s.first_seq,
            s.last_seq,
            hex::encode(s.head_sha256)
        );
        println!(
            "coverage    {:.2} % countersigned in time ({:.2} % claimed; {} late, {} blind windows)",
            s.coverage * 100.0,
            s.claimed_coverage * 100.0,
            s.late,
            s.blind
        );
        println!("restarts    {} ({})", s.restarts, s.start_ids.join(", "));
        println!(
            "enforcement {} foreign holders, {} kills, {} containers stopped",
            s.foreign_events, s.kills, s.container_stops
        );
        println!(
            "challenges  {} issued, {} answered, {} issued while the agent was down",
            s.challenges, s.challenges_answered, s.challenges_in_gaps
        );
        println!(
            "verdict     {}",
            match s.verdict_holds {
                Some(true) => "the coordinator judged it holds",
                Some(false) => "the coordinator judged it does not hold",
                None => "none that verifies",
            }
        );
    }
    if report.holds() {
        if !json {
            if keys.coordinator_key_source == "pinned" {
                println!("HOLDS");
            } else {
                println!("HOLDS (SELF-ASSERTED: the keys came from the bundle; this proves nothing against the node's owner)");
            }
        }
        return Ok(());
    }
    for f in &report.failures {
        eprintln!("{f}");
    }
    eprintln!("does NOT hold: {} problem(s)", report.failures.len());
    std::process::exit(1);
}
