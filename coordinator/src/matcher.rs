//! The matcher: which nodes, and which of their GPUs, an order for a
//! cluster gets. Pure: it is handed what the coordinator knows of each node
//! (hardware, free GPUs, the measured link, the supplier's labels) and the
//! order, and answers with a plan or with why there is none — which filter
//! left how many nodes out. Nothing here reads a clock or a database.
//!
//! Choice, in order of weight: every member must pass every filter; then
//! the plan spanning the fewest regions, then the one whose slowest member
//! has the best connectivity tier, then the fewest nodes, then the members
//! closest to each other by their measured RTT to the coordinator (nodes
//! that see the coordinator at similar distances tend to sit near each
//! other), then the best links. Between nodes equal on all of that, the
//! order's seed decides, so that equal suppliers are chosen about equally
//! often rather than the same one every time.

use std::collections::{BTreeMap, BTreeSet};

use warden_proto::pb;

/// Connectivity tiers, from the measured link: the lesser of download and
/// upload, since a cluster's traffic between members goes both ways.
/// Thresholds: the seed's minimum is 250 Mbit/s, the supplier check asks
/// 500 down, and the seed encourages 1 Gbit/s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// No link probe has reported yet.
    Unmeasured,
    /// Under 250 Mbit/s one way or the other.
    Below,
    /// At least 250 Mbit/s both ways.
    Basic,
    /// At least 500 Mbit/s both ways.
    Standard,
    /// At least 1 Gbit/s both ways.
    Premium,
}

impl Tier {
    pub const BASIC_MBPS: f64 = 250.0;
    pub const STANDARD_MBPS: f64 = 500.0;
    pub const PREMIUM_MBPS: f64 = 1000.0;

    pub fn of(link: Option<&Link>) -> Tier {
        let Some(l) = link else {
            return Tier::Unmeasured;
        };
        let least = l.down_mbps.min(l.up_mbps);
        if least >= Self::PREMIUM_MBPS {
            Tier::Premium
        } else if least >= Self::STANDARD_MBPS {
            Tier::Standard
        } else if least >= Self::BASIC_MBPS {
            Tier::Basic
        } else {
            Tier::Below
        }
    }

    /// The tier of a node's last link probe, as stored (a failed probe
    /// measured nothing).
    pub fn of_sample(sample: Option<&pb::LinkSample>) -> Tier {
        Tier::of(sample.and_then(Link::from_sample).as_ref())
    }

    pub fn name(self) -> &'static str {
        match self {
            Tier::Unmeasured => "unmeasured",
            Tier::Below => "below",
            Tier::Basic => "basic",
            Tier::Standard => "standard",
            Tier::Premium => "premium",
        }
    }

    pub fn parse(s: &str) -> Option<Tier> {
        [
            Tier::Unmeasured,
            Tier::Below,
            Tier::Basic,
            Tier::Standard,
            Tier::Premium,
        ]
        .into_iter()
        .find(|t| t.name() == s)
    }
}

/// A node's last link probe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    pub down_mbps: f64,
    pub up_mbps: f64,
    /// Round trip to the coordinator.
    pub rtt_ms: f64,
}

impl Link {
    /// A probe's figures; None for a probe that failed.
    pub fn from_sample(s: &pb::LinkSample) -> Option<Link> {
        s.error.is_empty().then_some(Link {
            down_mbps: s.download_mbps,
            up_mbps: s.upload_mbps,
            rtt_ms: s.rtt_ms,
        })
    }
}

/// One GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    pub uuid: String,
    /// As NVML names it, e.g. "NVIDIA H100 80GB HBM3".
    pub model: String,
    pub memory_bytes: u64,
    /// Not in a lease.
    pub free: bool,
    /// Passed a work challenge and nothing contradicted it since (always,
    /// where the coordinator does not issue them): docs/attestation.md#work-challenge.
    pub verified: bool,
}

/// What the coordinator knows of a node, as the matcher needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub node_id: String,
    pub connected: bool,
    /// No lost GPU, spool not full of evidence, nothing the operator flagged.
    pub healthy: bool,
    pub gpus: Vec<Gpu>,
    pub link: Option<Link>,
    /// Declared by the supplier (agent.toml), shown as declared.
    pub region: String,
    pub tags: BTreeSet<String>,
}

/// How much the order wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// This many GPUs, on as few nodes as the rest allows.
    Gpus(u32),
    /// This many nodes, each with every free GPU that passes the filters.
    Nodes(u32),
}

/// An order's filters and size.
#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    pub want: Want,
    /// A GPU's model must contain this (case does not matter).
    pub gpu_model: Option<String>,
    pub min_gpu_memory_bytes: u64,
    pub min_tier: Tier,
    /// Every member in this region.
    pub region: Option<String>,
    /// Every member declares all of these.
    pub tags: BTreeSet<String>,
    /// Nodes that must not be chosen (members already, or replaced ones).
    pub exclude: BTreeSet<String>,
    /// Spreads choices between equal nodes (the cluster's name will do).
    pub seed: String,
}

/// A filter, named as the renter's flags name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Filter {
    Excluded,
    Offline,
    Unhealthy,
    NoFreeGpu,
    Unverified,
    GpuModel,
    GpuMemory,
    Tier,
    Region,
    Tags,
}

impl Filter {
    pub fn describe(self) -> &'static str {
        match self {
            Filter::Excluded => "in a cluster already, or replaced",
            Filter::Offline => "not connected",
            Filter::Unhealthy => "not healthy",
            Filter::NoFreeGpu => "no free GPU",
            Filter::Unverified => {
                "no free GPU that passed its work challenge (or its NVML identity changed since)"
            }
            Filter::GpuModel => "no free GPU of that model (--gpu-model)",
            Filter::GpuMemory => "no free GPU with that much memory (--min-gpu-memory)",
            Filter::Tier => "link below the tier (--tier)",
            Filter::Region => "another region (--region)",
            Filter::Tags => "missing a tag (--tag)",
        }
    }
}

/// One chosen node and the GPUs it gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node_id: String,
    pub gpus: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub members: Vec<Member>,
    pub regions: Vec<String>,
    /// The slowest member's tier.
    pub tier: Tier,
}

/// Why no plan: how many nodes each filter left out (each node counted
/// once, at the first filter it fails), and how short what is left falls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoPlan {
    pub nodes: usize,
    pub left_out: Vec<(Filter, usize)>,
    /// Nodes that pass every filter, and their eligible GPUs.
    pub eligible_nodes: usize,
    pub eligible_gpus: usize,
    pub want: Want,
}

impl std::fmt::Display for NoPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let want = match self.want {
            Want::Gpus(n) => format!("{n} GPU(s)"),
            Want::Nodes(n) => format!("{n} node(s)"),
        };
        write!(
            f,
            "cannot fill {want}: of {} node(s), {} pass every filter with {} GPU(s) between them",
            self.nodes, self.eligible_nodes, self.eligible_gpus
        )?;
        for (filter, n) in &self.left_out {
            write!(f, "; {n} left out: {}", filter.describe())?;
        }
        Ok(())
    }
}

/// A node that passed: its eligible GPUs.
struct Eligible<'a> {
    node: &'a Candidate,
    gpus: Vec<&'a Gpu>,
    tier: Tier,
    rank: [u8; 8],
}

/// The first filter `node` fails, or its eligible GPUs.
fn admit<'a>(node: &'a Candidate, order: &Order) -> Result<Vec<&'a Gpu>, Filter> {
    if order.exclude.contains(&node.node_id) {
        return Err(Filter::Excluded);
    }
    if !node.connected {
        return Err(Filter::Offline);
    }
    if !node.healthy {
        return Err(Filter::Unhealthy);
    }
    let free: Vec<&Gpu> = node.gpus.iter().filter(|g| g.free).collect();
    if free.is_empty() {
        return Err(Filter::NoFreeGpu);
    }
    let verified: Vec<&Gpu> = free.into_iter().filter(|g| g.verified).collect();
    if verified.is_empty() {
        return Err(Filter::Unverified);
    }
    let model = order.gpu_model.as_deref().map(str::to_lowercase);
    let of_model: Vec<&Gpu> = verified
        .into_iter()
        .filter(|g| {
            model
                .as_deref()
                .is_none_or(|m| g.model.to_lowercase().contains(m))
        })
        .collect();
    if of_model.is_empty() {
        return Err(Filter::GpuModel);
    }
    let big: Vec<&Gpu> = of_model
        .into_iter()
        .filter(|g| g.memory_bytes >= order.min_gpu_memory_bytes)
        .collect();
    if big.is_empty() {
        return Err(Filter::GpuMemory);
    }
    if Tier::of(node.link.as_ref()) < order.min_tier {
        return Err(Filter::Tier);
    }
    if order.region.as_ref().is_some_and(|r| *r != node.region) {
        return Err(Filter::Region);
    }
    if !order.tags.is_subset(&node.tags) {
        return Err(Filter::Tags);
    }
    Ok(big)
}

/// The order's plan from `nodes`, or why there is none.
pub fn plan(nodes: &[Candidate], order: &Order) -> Result<Plan, NoPlan> {
    let mut left_out: BTreeMap<Filter, usize> = BTreeMap::new();
    let mut eligible = Vec::new();
    for node in nodes {
        match admit(node, order) {
            Ok(gpus) => eligible.push(Eligible {
                node,
                gpus,
                tier: Tier::of(node.link.as_ref()),
                rank: rank(&order.seed, &node.node_id),
            }),
            Err(f) => *left_out.entry(f).or_default() += 1,
        }
    }
    let no_plan = |eligible: &[Eligible]| NoPlan {
        nodes: nodes.len(),
        left_out: left_out.iter().map(|(f, n)| (*f, *n)).collect(),
        eligible_nodes: eligible.len(),
        eligible_gpus: eligible.iter().map(|e| e.gpus.len()).sum(),
        want: order.want,
    };
    let wanted = match order.want {
        Want::Gpus(0) | Want::Nodes(0) => return Err(no_plan(&eligible)),
        Want::Gpus(n) | Want::Nodes(n) => n as usize,
    };

    // One candidate plan per region (the nodes there), and one over all
    // regions; the best of those that fill the order wins.
    let mut groups: BTreeMap<&str, Vec<&Eligible>> = BTreeMap::new();
    for e in &eligible {
        groups.entry(e.node.region.as_str()).or_default().push(e);
    }
    let everyone: Vec<&Eligible> = eligible.iter().collect();
    let best = groups
        .values()
        .chain(std::iter::once(&everyone))
        .filter_map(|group| fill(group, order.want, wanted))
        .min_by(|a, b| {
            score(a)
                .partial_cmp(&score(b))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    let Some(chosen) = best else {
        return Err(no_plan(&eligible));
    };
    let regions: BTreeSet<String> = chosen.iter().map(|(e, _)| e.node.region.clone()).collect();
    Ok(Plan {
        tier: chosen
            .iter()
            .map(|(e, _)| e.tier)
            .min()
            .unwrap_or(Tier::Unmeasured),
        regions: regions.into_iter().collect(),
        members: chosen
            .into_iter()
            .map(|(e, n)| Member {
                node_id: e.node.node_id.clone(),
                gpus: e.gpus[..n].iter().map(|g| g.uuid.clone()).collect(),
            })
            .collect(),
    })
}

/// How many anchors a group tries: each anchor's fill prefers the nodes
/// nearest to it; trying the best few keeps a large pool cheap.
const ANCHORS: usize = 32;

/// The best fill of the order from `group`: each chosen node with how many
/// of its eligible GPUs it gives. Each of the best few nodes anchors one
/// attempt that adds the others of its region first, then better tiers,
/// then those nearest to it in RTT, then more GPUs; the attempts are
/// scored like whole plans.
fn fill<'a>(
    group: &[&'a Eligible<'a>],
    want: Want,
    wanted: usize,
) -> Option<Vec<(&'a Eligible<'a>, usize)>> {
    let mut by_merit: Vec<&Eligible> = group.to_vec();
    by_merit.sort_by(|a, b| {
        b.tier
            .cmp(&a.tier)
            .then(b.gpus.len().cmp(&a.gpus.len()))
            .then(a.rank.cmp(&b.rank))
    });
    by_merit
        .iter()
        .take(ANCHORS)
        .filter_map(|anchor| {
            let at = rtt(anchor);
            let mut rest: Vec<&Eligible> = by_merit
                .iter()
                .copied()
                .filter(|e| !std::ptr::eq(*e, *anchor))
                .collect();
            let home = |e: &Eligible| e.node.region != anchor.node.region;
            rest.sort_by(|a, b| {
                home(a)
                    .cmp(&home(b))
                    .then(b.tier.cmp(&a.tier))
                    .then((rtt(a) - at).abs().total_cmp(&(rtt(b) - at).abs()))
                    .then(b.gpus.len().cmp(&a.gpus.len()))
                    .then(a.rank.cmp(&b.rank))
            });
            take(std::iter::once(*anchor).chain(rest), want, wanted)
        })
        .min_by(|a, b| {
            score(a)
                .partial_cmp(&score(b))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
}

/// Nodes in the given order until the order is filled.
fn take<'a>(
    nodes: impl Iterator<Item = &'a Eligible<'a>>,
    want: Want,
    wanted: usize,
) -> Option<Vec<(&'a Eligible<'a>, usize)>> {
    let mut chosen = Vec::new();
    let mut have = 0usize;
    for e in nodes {
        if have >= wanted {
            break;
        }
        let give = match want {
            Want::Gpus(_) => e.gpus.len().min(wanted - have),
            Want::Nodes(_) => e.gpus.len(),
        };
        have += match want {
            Want::Gpus(_) => give,
            Want::Nodes(_) => 1,
        };
        chosen.push((e, give));
    }
    (have >= wanted).then_some(chosen)
}

/// A node's RTT to the coordinator; unmeasured counts as far.
fn rtt(e: &Eligible) -> f64 {
    e.node.link.map_or(1e9, |l| l.rtt_ms)
}

/// Lower is better: regions, then the slowest tier (inverted), then nodes,
/// then the RTT spread, then the mean RTT.
fn score(members: &[(&Eligible, usize)]) -> (usize, std::cmp::Reverse<Tier>, usize, f64, f64) {
    let regions: BTreeSet<&str> = members
        .iter()
        .map(|(e, _)| e.node.region.as_str())
        .collect();
    let tier = members
        .iter()
        .map(|(e, _)| e.tier)
        .min()
        .unwrap_or(Tier::Unmeasured);
    let rtts: Vec<f64> = members.iter().map(|(e, _)| rtt(e)).collect();
    let max = rtts.iter().cloned().fold(f64::MIN, f64::max);
    let min = rtts.iter().cloned().fold(f64::MAX, f64::min);
    let mean = rtts.iter().sum::<f64>() / rtts.len().max(1) as f64;
    (
        regions.len(),
        std::cmp::Reverse(tier),
        members.len(),
        max - min,
        mean,
    )
}

/// The seed's order between otherwise equal nodes.
fn rank(seed: &str, node_id: &str) -> [u8; 8] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(seed.as_bytes());
    ctx.update(&[0]);
    ctx.update(node_id.as_bytes());
    ctx.finish().as_ref()[..8]
        .try_into()
        .expect("8 of 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(
        id: &str,
        region: &str,
        gpus: &[(&str, u64, bool)],
        link: Option<(f64, f64, f64)>,
    ) -> Candidate {
        Candidate {
            node_id: id.into(),
            connected: true,
            healthy: true,
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(i, (model, mem, free))| Gpu {
                    uuid: format!("{id}-gpu{i}"),
                    model: (*model).into(),
                    memory_bytes: mem * GIB,
                    free: *free,
                    verified: true,
                })
                .collect(),
            link: link.map(|(down_mbps, up_mbps, rtt_ms)| Link {
                down_mbps,
                up_mbps,
                rtt_ms,
            }),
            region: region.into(),
            tags: BTreeSet::new(),
        }
    }

    fn order(want: Want) -> Order {
        Order {
            want,
            gpu_model: None,
            min_gpu_memory_bytes: 0,
            min_tier: Tier::Unmeasured,
            region: None,
            tags: BTreeSet::new(),
            exclude: BTreeSet::new(),
            seed: "c1".into(),
        }
    }

    const FAST: Option<(f64, f64, f64)> = Some((2000.0, 1200.0, 10.0));
    const H100: (&str, u64, bool) = ("NVIDIA H100 80GB HBM3", 80, true);

    fn ids(p: &Plan) -> Vec<&str> {
        p.members.iter().map(|m| m.node_id.as_str()).collect()
    }

    #[test]
    fn gpus_without_a_passed_work_challenge_are_not_offered_and_the_reason_is_named() {
        let mut unproved = node("u", "eu", &[H100, H100], FAST);
        for g in &mut unproved.gpus {
            g.verified = false;
        }
        let mut half = node("h", "eu", &[H100, H100], FAST);
        half.gpus[0].verified = false;
        let nodes = [unproved, half];
        let p = plan(&nodes, &order(Want::Gpus(1))).unwrap();
        assert_eq!(p.members[0].gpus, vec!["h-gpu1".to_owned()]);
        let why = plan(&nodes, &order(Want::Gpus(2))).unwrap_err();
        assert_eq!(why.left_out, vec![(Filter::Unverified, 1)]);
        assert!(
            why.to_string().contains("passed its work challenge"),
            "{why}"
        );
    }

    #[test]
    fn tiers_follow_the_slower_direction_and_the_written_thresholds() {
        let t = |d, u| {
            Tier::of(Some(&Link {
                down_mbps: d,
                up_mbps: u,
                rtt_ms: 1.0,
            }))
        };
        assert_eq!(Tier::of(None), Tier::Unmeasured);
        assert_eq!(t(5000.0, 249.9), Tier::Below);
        assert_eq!(t(250.0, 250.0), Tier::Basic);
        assert_eq!(t(900.0, 500.0), Tier::Standard);
        assert_eq!(t(1000.0, 1000.0), Tier::Premium);
        assert_eq!(Tier::parse("standard"), Some(Tier::Standard));
        assert_eq!(Tier::parse("gold"), None);
        let failed = pb::LinkSample {
            download_mbps: 2000.0,
            upload_mbps: 2000.0,
            error: "probe timed out".into(),
            ..Default::default()
        };
        assert_eq!(Tier::of_sample(Some(&failed)), Tier::Unmeasured);
        let ok = pb::LinkSample {
            error: String::new(),
            ..failed
        };
        assert_eq!(Tier::of_sample(Some(&ok)), Tier::Premium);
    }

    #[test]
    fn gpus_come_from_as_few_nodes_as_possible_and_the_last_gives_only_what_is_needed() {
        let nodes = [
            node("a", "eu", &[H100; 2], FAST),
            node("b", "eu", &[H100; 4], FAST),
            node("c", "eu", &[H100; 1], FAST),
        ];
        let p = plan(&nodes, &order(Want::Gpus(5))).unwrap();
        assert_eq!(ids(&p), ["b", "a"]);
        assert_eq!(p.members[0].gpus.len(), 4);
        assert_eq!(p.members[1].gpus, ["a-gpu0"]);
    }

    #[test]
    fn busy_gpus_are_never_offered_and_nodes_orders_take_every_free_one() {
        let nodes = [
            node(
                "a",
                "eu",
                &[H100, ("NVIDIA H100 80GB HBM3", 80, false), H100],
                FAST,
            ),
            node("b", "eu", &[H100], FAST),
        ];
        let p = plan(&nodes, &order(Want::Nodes(2))).unwrap();
        let a = p.members.iter().find(|m| m.node_id == "a").unwrap();
        assert_eq!(a.gpus, ["a-gpu0", "a-gpu2"]);
        assert!(
            plan(&nodes, &order(Want::Gpus(4))).is_err(),
            "only 3 are free"
        );
    }

    #[test]
    fn each_filter_leaves_out_the_nodes_that_fail_it_and_says_how_many() {
        let mut nodes = vec![
            node("ok", "eu", &[H100], FAST),
            node("a100", "eu", &[("NVIDIA A100-SXM4-40GB", 40, true)], FAST),
            node("small", "eu", &[("NVIDIA H100 PCIe", 24, true)], FAST),
            node("slow", "eu", &[H100], Some((300.0, 100.0, 5.0))),
            node("us", "us", &[H100], FAST),
            node("busy", "eu", &[("NVIDIA H100 80GB HBM3", 80, false)], FAST),
        ];
        let mut off = node("off", "eu", &[H100], FAST);
        off.connected = false;
        nodes.push(off);
        let mut sick = node("sick", "eu", &[H100], FAST);
        sick.healthy = false;
        nodes.push(sick);
        let mut untagged = node("untagged", "eu", &[H100], FAST);
        untagged.tags.clear();
        nodes.push(untagged);
        for n in &mut nodes {
            if n.node_id != "untagged" {
                n.tags.insert("soc2".into());
            }
        }
        let o = Order {
            gpu_model: Some("h100".into()),
            min_gpu_memory_bytes: 40 * GIB,
            min_tier: Tier::Standard,
            region: Some("eu".into()),
            tags: ["soc2".to_string()].into(),
            ..order(Want::Gpus(2))
        };
        let why = plan(&nodes, &o).unwrap_err();
        assert_eq!(
            why.left_out,
            [
                (Filter::Offline, 1),
                (Filter::Unhealthy, 1),
                (Filter::NoFreeGpu, 1),
                (Filter::GpuModel, 1),
                (Filter::GpuMemory, 1),
                (Filter::Tier, 1),
                (Filter::Region, 1),
                (Filter::Tags, 1),
            ]
        );
        assert_eq!((why.eligible_nodes, why.eligible_gpus), (1, 1));
        let text = why.to_string();
        assert!(
            text.starts_with("cannot fill 2 GPU(s): of 9 node(s), 1 pass"),
            "{text}"
        );
        assert!(
            text.contains("1 left out: link below the tier (--tier)"),
            "{text}"
        );
        // One GPU is what there is.
        assert_eq!(
            ids(&plan(
                &nodes,
                &Order {
                    want: Want::Gpus(1),
                    ..o
                }
            )
            .unwrap()),
            ["ok"]
        );
    }

    #[test]
    fn one_region_is_preferred_to_a_spread_even_over_better_links() {
        let nodes = [
            node("eu1", "eu", &[H100], Some((600.0, 600.0, 20.0))),
            node("eu2", "eu", &[H100], Some((600.0, 600.0, 21.0))),
            node("us1", "us", &[H100], FAST),
            node("ap1", "ap", &[H100], FAST),
        ];
        let p = plan(&nodes, &order(Want::Nodes(2))).unwrap();
        let mut got = ids(&p);
        got.sort();
        assert_eq!(got, ["eu1", "eu2"]);
        assert_eq!(
            (p.regions.clone(), p.tier),
            (vec!["eu".to_string()], Tier::Standard)
        );
        // Three nodes exist in no one region: the plan spans regions, the best links first.
        let p = plan(&nodes, &order(Want::Nodes(3))).unwrap();
        assert_eq!(p.regions.len(), 2, "{p:?}");
    }

    #[test]
    fn within_a_region_the_better_tier_then_the_closer_rtt_wins() {
        let nodes = [
            node("basic", "eu", &[H100], Some((300.0, 300.0, 10.0))),
            node("near", "eu", &[H100], Some((1500.0, 1500.0, 11.0))),
            node("far", "eu", &[H100], Some((1500.0, 1500.0, 80.0))),
        ];
        let p = plan(&nodes, &order(Want::Nodes(2))).unwrap();
        assert_eq!(p.tier, Tier::Premium, "{p:?}");
        let mut got = ids(&p);
        got.sort();
        assert_eq!(got, ["far", "near"]);
        let o = Order {
            min_tier: Tier::Basic,
            ..order(Want::Nodes(1))
        };
        assert_eq!(p.members.len(), 2);
        assert_eq!(plan(&nodes, &o).unwrap().tier, Tier::Premium);
    }

    #[test]
    fn members_are_the_nodes_nearest_each_other_by_rtt() {
        let nodes = [
            node("a", "eu", &[H100], Some((1500.0, 1500.0, 10.0))),
            node("c", "eu", &[H100], Some((1500.0, 1500.0, 80.0))),
            node("b", "eu", &[H100], Some((1500.0, 1500.0, 12.0))),
            node("d", "eu", &[H100], Some((1500.0, 1500.0, 83.0))),
        ];
        for seed in ["x", "y", "z", "w"] {
            let o = Order {
                seed: seed.into(),
                ..order(Want::Nodes(2))
            };
            let p = plan(&nodes, &o).unwrap();
            let mut got = ids(&p);
            got.sort();
            assert_eq!(got, ["a", "b"], "seed {seed}");
        }
    }

    #[test]
    fn equal_nodes_are_chosen_about_equally_often_across_orders() {
        let nodes: Vec<Candidate> = (0..4)
            .map(|i| node(&format!("n{i}"), "eu", &[H100], FAST))
            .collect();
        let mut count = BTreeMap::new();
        for k in 0..400 {
            let o = Order {
                seed: format!("cluster-{k}"),
                ..order(Want::Nodes(1))
            };
            let p = plan(&nodes, &o).unwrap();
            *count.entry(p.members[0].node_id.clone()).or_insert(0) += 1;
        }
        assert_eq!(count.len(), 4, "{count:?}");
        assert!(
            count.values().all(|&n| (60..=140).contains(&n)),
            "{count:?}"
        );
        // The same order gets the same plan.
        let o = order(Want::Nodes(2));
        assert_eq!(plan(&nodes, &o), plan(&nodes, &o));
    }

    #[test]
    fn excluded_nodes_are_left_for_a_replacement() {
        let nodes = [
            node("a", "eu", &[H100], FAST),
            node("b", "eu", &[H100], FAST),
        ];
        let o = Order {
            exclude: ["a".to_string()].into(),
            ..order(Want::Nodes(1))
        };
        assert_eq!(ids(&plan(&nodes, &o).unwrap()), ["b"]);
        let o = Order {
            exclude: ["a".to_string(), "b".to_string()].into(),
            ..o
        };
        assert_eq!(
            plan(&nodes, &o).unwrap_err().left_out,
            [(Filter::Excluded, 2)]
        );
    }

    #[test]
    fn an_empty_order_or_no_nodes_is_no_plan() {
        assert!(plan(&[], &order(Want::Gpus(1))).is_err());
        let nodes = [node("a", "eu", &[H100], FAST)];
        assert!(plan(&nodes, &order(Want::Gpus(0))).is_err());
    }
}
