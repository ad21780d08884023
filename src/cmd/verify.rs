//! `warden verify`: a lease bundle, or a cluster's exported set (a
//! directory from `warden cluster export`), checked offline against the
//! keys the verifier trusts.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct Args {
    /// A lease bundle (`warden lease export`), or a directory from `warden
    /// cluster export` (its record and every lease's bundle).
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
        let params = warden_proto::chain::Params {
            max_skew_ms: self.max_skew_ms,
            min_coverage: self.min_coverage,
            now_unix_ms: self.now.unwrap_or_else(warden_agent::now_ms),
            max_delay_ms: self.max_delay_ms,
        };
        if self.bundle.is_dir() {
            verify_set(&self.bundle, &self.trust, &params, self.json)
        } else {
            verify(&self.bundle, &self.trust, &params, self.json)
        }
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
            "prevention  {} opens denied at the open; {} of {} windows guarded at the open",
            s.prevented, s.guarded_windows, s.records
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

/// A cluster's set: the record (`cluster.json`) and every `lease-*.json`.
fn verify_set(
    dir: &Path,
    trust_args: &TrustArgs,
    params: &warden_proto::chain::Params,
    json: bool,
) -> Result<()> {
    use warden_proto::{
        bundle::Bundle,
        cluster_record::{self, SetFile},
        dsse,
    };
    let trust = trust_from(trust_args)?;
    if trust.node_key.is_some() {
        anyhow::bail!(
            "a node key (--node-key, or `node` in --keys) pins one node; a cluster's leases are on several, and its record binds each lease's node key"
        );
    }
    let record_path = dir.join(cluster_record::RECORD_FILE);
    let text = std::fs::read(&record_path).with_context(|| {
        format!(
            "reading {} (a directory is checked as a `warden cluster export`)",
            record_path.display()
        )
    })?;
    let record = serde_json::from_slice::<serde_json::Value>(&text)
        .map_err(|e| format!("not JSON: {e}"))
        .and_then(|v| dsse::from_json(&v).map_err(|e| e.to_string()));
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    names.sort();
    let mut files = Vec::new();
    for name in names {
        if name == cluster_record::RECORD_FILE {
            continue;
        }
        if !cluster_record::is_lease_file(&name) {
            eprintln!("ignored     {name} (not lease-*.json)");
            continue;
        }
        let path = dir.join(&name);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let bundle = serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| format!("not JSON: {e}"))
            .and_then(|v| Bundle::from_json(&v).map_err(|e| e.to_string()));
        files.push(SetFile {
            source: name,
            bundle,
        });
    }
    let report = cluster_record::verify_set(&record, &files, &trust, params);
    let holds = report.holds();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "holds": holds,
                "coordinator_key_id": report.coordinator_key_id,
                "coordinator_key_source": report.coordinator_key_source,
                "record": report.record,
                "failures": report.failures,
                "leases": report.leases,
            }))?
        );
    } else {
        println!(
            "trusted     coordinator key {} ({})",
            report.coordinator_key_id.as_deref().unwrap_or("-"),
            report.coordinator_key_source
        );
        if let Some(r) = &report.record {
            println!(
                "cluster     {}: {}, {} lease(s), {} event(s){}",
                r.cluster_id,
                r.phase,
                r.leases.len(),
                r.events.len(),
                if report.failures.is_empty() {
                    ""
                } else {
                    " (as the record claims; it does not verify)"
                }
            );
        }
        for l in &report.leases {
            let state = match (&l.report, l.listed) {
                _ if l.holds() => format!(
                    "holds, {:.2} % countersigned coverage",
                    l.report.as_ref().map_or(0.0, |r| r.summary.coverage) * 100.0
                ),
                (None, true) => "MISSING".to_owned(),
                (None, false) => "EXTRA".to_owned(),
                (Some(r), _) => format!(
                    "does NOT hold ({} problem(s))",
                    r.failures.len() + l.failures.len()
                ),
            };
            println!(
                "lease       {} on node {} ({}): {state}",
                if l.lease_id.is_empty() {
                    "?"
                } else {
                    &l.lease_id
                },
                if l.node_id.is_empty() {
                    "?"
                } else {
                    &l.node_id
                },
                l.source.as_deref().unwrap_or("no file"),
            );
        }
    }
    if holds {
        if !json {
            if report.coordinator_key_source == "pinned" {
                println!("HOLDS");
            } else {
                println!("HOLDS (SELF-ASSERTED: the key came from the record; this proves nothing against the coordinator's or the nodes' owners)");
            }
        }
        return Ok(());
    }
    let mut problems = 0;
    for f in &report.failures {
        eprintln!("record: {f}");
        problems += 1;
    }
    for l in &report.leases {
        let who = if l.lease_id.is_empty() {
            l.source.clone().unwrap_or_default()
        } else {
            format!("lease {}", l.lease_id)
        };
        let chain = l.report.iter().flat_map(|r| &r.failures);
        for f in l.failures.iter().chain(chain) {
            eprintln!("{who}: {f}");
            problems += 1;
        }
    }
    eprintln!("does NOT hold: {problems} problem(s)");
    std::process::exit(1);
}
