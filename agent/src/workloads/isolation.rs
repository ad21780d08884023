//! Lease networks kept apart by Warden's own packet filter rules, not only
//! Docker's.
//!
//! Docker keeps bridge networks apart with jumps from the filter table's
//! FORWARD chain (to DOCKER-USER and DOCKER-ISOLATION-STAGE-1), and each
//! time it creates a network it deletes those jumps and inserts them again.
//! Meanwhile FORWARD accepts whatever leaves a bridge, so a container of
//! one lease can open a connection to another lease's service, and
//! conntrack keeps it open afterwards: 2 in 30 network creations here.
//! Warden's rules live in the mangle table's FORWARD chain, which Docker
//! never touches and the kernel walks before filter's: traffic routed
//! between a lease's bridge and any other Docker bridge is dropped there.
//! They go in before the lease's first container starts and stay while
//! its network does; `plan` (pure) says which lines are missing from what
//! `iptables -t mangle -S` shows, `iptables-restore --noflush` applies them
//! in one transaction. IPv4 only: lease networks have no IPv6.

use std::{io::Write, process::Command};

/// The chain the mangle table's FORWARD jumps to first.
pub const CHAIN: &str = "WARDEN-LEASES";
/// Drops what a lease's bridge routes to another Docker bridge.
const TO_BRIDGES: &str = "WARDEN-TO-BRIDGES";
/// Drops what another Docker bridge routes into a lease's bridge.
const FROM_BRIDGES: &str = "WARDEN-FROM-BRIDGES";
/// The interfaces Docker names its bridges with: the default network's,
/// and every other network's (`br-` and its id).
const BRIDGES: [&str; 2] = ["docker0", "br-+"];

#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("{tool} (needed to keep lease networks apart): {source}")]
    Run {
        tool: &'static str,
        source: std::io::Error,
    },
    #[error("{tool} failed (keeping lease networks apart): {stderr}")]
    Failed { tool: &'static str, stderr: String },
}

/// Every rule that keeps `bridge` apart, as `iptables -S` prints them (the
/// order counts within a chain: a bridge's own traffic returns first).
fn rules(bridge: &str) -> Vec<String> {
    let mut out = vec![format!("-A FORWARD -j {CHAIN}")];
    for b in BRIDGES {
        out.push(format!("-A {TO_BRIDGES} -o {b} -j DROP"));
    }
    for b in BRIDGES {
        out.push(format!("-A {FROM_BRIDGES} -i {b} -j DROP"));
    }
    out.extend(bridge_rules(bridge));
    out
}

/// The rules of one lease's bridge in [`CHAIN`]: its containers' traffic
/// among themselves (bridged, when the kernel filters bridged frames)
/// passes; what it routes to or from another bridge goes to the drops.
fn bridge_rules(bridge: &str) -> [String; 3] {
    [
        format!("-A {CHAIN} -i {bridge} -o {bridge} -j RETURN"),
        format!("-A {CHAIN} -i {bridge} -j {TO_BRIDGES}"),
        format!("-A {CHAIN} -o {bridge} -j {FROM_BRIDGES}"),
    ]
}

/// The `iptables-restore --noflush` input that adds what `shown` (the
/// mangle table as `iptables -t mangle -S` prints it) lacks to keep
/// `bridge` apart; None when nothing is missing. A chain is declared only
/// when missing (declaring one that exists would flush it); the FORWARD
/// jump goes first in FORWARD; a bridge's rules go in together, in order.
pub fn plan(shown: &str, bridge: &str) -> Option<String> {
    let have: Vec<&str> = shown.lines().map(str::trim).collect();
    let mut lines = Vec::new();
    for chain in [CHAIN, TO_BRIDGES, FROM_BRIDGES] {
        if !have.contains(&format!("-N {chain}").as_str()) {
            lines.push(format!(":{chain} - [0:0]"));
        }
    }
    let own = bridge_rules(bridge);
    let partial = own.iter().any(|r| have.contains(&r.as_str()))
        && !own.iter().all(|r| have.contains(&r.as_str()));
    for r in rules(bridge) {
        let there = have.contains(&r.as_str());
        if own.contains(&r) && partial {
            // Out of order or incomplete: the bridge's rules again, whole.
            if there {
                lines.push(r.replacen("-A ", "-D ", 1));
            }
            lines.push(r);
        } else if !there {
            lines.push(match r.strip_prefix("-A FORWARD ") {
                Some(jump) => format!("-I FORWARD 1 {jump}"),
                None => r,
            });
        }
    }
    if lines.is_empty() {
        return None;
    }
    Some(format!("*mangle\n{}\nCOMMIT\n", lines.join("\n")))
}

/// The `iptables-restore --noflush` input that removes `bridge`'s own
/// rules among those `shown`; None when there are none. The chains and
/// the drops stay (other leases use them).
pub fn plan_release(shown: &str, bridge: &str) -> Option<String> {
    let have: Vec<&str> = shown.lines().map(str::trim).collect();
    let lines: Vec<String> = bridge_rules(bridge)
        .into_iter()
        .filter(|r| have.contains(&r.as_str()))
        .map(|r| r.replacen("-A ", "-D ", 1))
        .collect();
    (!lines.is_empty()).then(|| format!("*mangle\n{}\nCOMMIT\n", lines.join("\n")))
}

/// Keeps `bridge` apart from every other Docker bridge (see the module).
pub fn isolate(bridge: &str) -> Result<(), IsolationError> {
    if let Some(input) = plan(&shown()?, bridge) {
        restore(&input)?;
    }
    Ok(())
}

/// Removes `bridge`'s rules, once its network is gone.
pub fn release(bridge: &str) -> Result<(), IsolationError> {
    if let Some(input) = plan_release(&shown()?, bridge) {
        restore(&input)?;
    }
    Ok(())
}

/// The mangle table as `iptables -S` prints it.
fn shown() -> Result<String, IsolationError> {
    let tool = "iptables";
    let out = Command::new(tool)
        .args(["-w", "-t", "mangle", "-S"])
        .output()
        .map_err(|source| IsolationError::Run { tool, source })?;
    if !out.status.success() {
        return Err(IsolationError::Failed {
            tool,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies `input` in one transaction, leaving every other rule.
fn restore(input: &str) -> Result<(), IsolationError> {
    let tool = "iptables-restore";
    let mut child = Command::new(tool)
        .args(["-w", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| IsolationError::Run { tool, source })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|source| IsolationError::Run { tool, source })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| IsolationError::Run { tool, source })?;
    if !out.status.success() {
        return Err(IsolationError::Failed {
            tool,
            stderr: format!(
                "{} (input: {})",
                String::from_utf8_lossy(&out.stderr).trim(),
                input.replace('\n', "; ")
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "-P PREROUTING ACCEPT\n-P INPUT ACCEPT\n-P FORWARD ACCEPT\n\
                         -P OUTPUT ACCEPT\n-P POSTROUTING ACCEPT\n";

    /// What the table shows once `input` was applied to `shown` (as
    /// iptables would: chains declared, -I first, -A last, -D removed).
    fn applied(shown: &str, input: &str) -> String {
        let mut lines: Vec<String> = shown.lines().map(str::to_owned).collect();
        for l in input.lines() {
            if let Some(chain) = l.strip_prefix(':') {
                lines.push(format!("-N {}", chain.split(' ').next().unwrap()));
            } else if let Some(rest) = l.strip_prefix("-I FORWARD 1 ") {
                let at = lines
                    .iter()
                    .position(|l| l.starts_with("-A "))
                    .unwrap_or(lines.len());
                lines.insert(at, format!("-A FORWARD {rest}"));
            } else if let Some(rest) = l.strip_prefix("-D ") {
                let rule = format!("-A {rest}");
                let at = lines
                    .iter()
                    .position(|l| *l == rule)
                    .expect("deleting what is there");
                lines.remove(at);
            } else if l.starts_with("-A ") {
                lines.push(l.to_owned());
            }
        }
        lines.join("\n")
    }

    #[test]
    fn a_first_bridge_gets_the_chains_the_jump_and_its_rules_and_a_second_only_its_own() {
        let input = plan(EMPTY, "br-aaa").unwrap();
        assert!(
            input.starts_with("*mangle\n:WARDEN-LEASES - [0:0]\n"),
            "{input}"
        );
        assert!(input.contains("-I FORWARD 1 -j WARDEN-LEASES\n"), "{input}");
        assert!(input.ends_with("COMMIT\n"));
        let one = applied(EMPTY, &input);
        assert_eq!(plan(&one, "br-aaa"), None, "applied twice");
        let input = plan(&one, "br-bbb").unwrap();
        assert_eq!(
            input,
            "*mangle\n-A WARDEN-LEASES -i br-bbb -o br-bbb -j RETURN\n\
             -A WARDEN-LEASES -i br-bbb -j WARDEN-TO-BRIDGES\n\
             -A WARDEN-LEASES -o br-bbb -j WARDEN-FROM-BRIDGES\nCOMMIT\n"
        );
        let two = applied(&one, &input);
        // Released, only its own go; the other bridge keeps its rules.
        let release = plan_release(&two, "br-aaa").unwrap();
        let after = applied(&two, &release);
        assert!(!after.contains("br-aaa"), "{after}");
        assert_eq!(plan(&after, "br-bbb"), None);
        assert_eq!(plan_release(&after, "br-aaa"), None);
    }

    #[test]
    fn a_bridge_whose_rules_are_incomplete_gets_them_again_in_order() {
        let full = applied(EMPTY, &plan(EMPTY, "br-aaa").unwrap());
        // Its RETURN lost (deleted by hand): the drops alone would cut
        // the lease's own traffic, so all three go in again, RETURN first.
        let broken: String = full
            .lines()
            .filter(|l| !l.ends_with("-j RETURN"))
            .collect::<Vec<_>>()
            .join("\n");
        let input = plan(&broken, "br-aaa").unwrap();
        let mended = applied(&broken, &input);
        let own: Vec<&str> = mended.lines().filter(|l| l.contains("br-aaa")).collect();
        assert_eq!(
            own,
            bridge_rules("br-aaa")
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        );
    }

    /// Against the kernel's own table (in a namespace of the test's): the
    /// lines `plan` writes are the ones `iptables -S` shows, so a second
    /// call adds nothing and a release removes exactly the bridge's own.
    #[test]
    fn the_rules_go_into_a_real_table_once_and_a_release_leaves_the_others() {
        use crate::mesh::netns::{in_ns, ip, Hosts};
        let ns = format!("wtiso-{}", std::process::id());
        let _hosts = Hosts(vec![ns.clone()]);
        ip(&["netns", "add", &ns]);
        let (two, after) = in_ns(&ns, || {
            Box::pin(async {
                isolate("br-aaa").unwrap();
                isolate("br-aaa").unwrap();
                isolate("br-bbb").unwrap();
                let two = shown().unwrap();
                release("br-aaa").unwrap();
                release("br-aaa").unwrap();
                (two, shown().unwrap())
            })
        })
        .join()
        .unwrap();
        for r in rules("br-aaa").iter().chain(&rules("br-bbb")) {
            assert_eq!(two.lines().filter(|l| l == r).count(), 1, "{r} in\n{two}");
        }
        assert_eq!(plan(&two, "br-aaa"), None, "{two}");
        assert!(!after.contains("br-aaa"), "{after}");
        assert_eq!(plan(&after, "br-bbb"), None, "{after}");
    }
}
