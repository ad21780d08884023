//! A hired cluster's proof: the coordinator's signed [`pb::ClusterRecord`]
//! and one lease bundle per lease it lists, checked as a set (`warden
//! verify DIR`). Spec: docs/attestation.md, "Verifying a cluster".
//!
//! The record binds each lease to its node key and GPUs under the
//! coordinator's signature, so the set fails when a bundle is missing,
//! added, swapped for another lease's, or re-keyed for another node.

use std::collections::BTreeMap;

use prost::Message as _;

use crate::{
    bundle::{Bundle, KeysUsed, Trust},
    chain::{Failure, Params, Report},
    dsse::{self, VerifyingKey},
    pb, types,
};

/// The record's file in an exported set; each bundle is
/// [`lease_file_name`] of its lease.
pub const RECORD_FILE: &str = "cluster.json";

/// `lease-ID.json`, for an id that is safe as a file name (ASCII letters,
/// digits, `-`, `_`, `.`, not starting with `.`).
pub fn lease_file_name(lease_id: &str) -> Option<String> {
    let safe = !lease_id.is_empty()
        && !lease_id.starts_with('.')
        && lease_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    safe.then(|| format!("lease-{lease_id}.json"))
}

/// Whether a file of a set's directory is a lease bundle by its name.
pub fn is_lease_file(name: &str) -> bool {
    name.starts_with("lease-") && name.ends_with(".json")
}

/// Rule names of the set check; each bundle's own rules are those of
/// [`crate::chain::rule`].
pub mod rule {
    /// No coordinator key pinned, and the check is not self-asserted.
    pub const UNTRUSTED: &str = "untrusted";
    /// The record is malformed, does not verify with the coordinator key,
    /// or does not decode.
    pub const BAD_RECORD: &str = "bad-record";
    /// The record lists a lease with no bundle in the set.
    pub const MISSING_LEASE: &str = "missing-lease";
    /// A bundle in the set is of a lease the record does not list (or a
    /// second bundle of one it does), or is not a bundle at all.
    pub const EXTRA_LEASE: &str = "extra-lease";
    /// A bundle's node key or GPUs differ from the record's entry.
    pub const LEASE_MISMATCH: &str = "lease-mismatch";
}

/// One file of the set, as read: a bundle, or why it is none.
#[derive(Debug, Clone)]
pub struct SetFile {
    /// Where it came from (a file name), for the report.
    pub source: String,
    pub bundle: Result<Bundle, String>,
}

/// The outcome for one lease the record lists (or one extra bundle).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LeaseOutcome {
    pub lease_id: String,
    pub node_id: String,
    /// The file its bundle came from; None when missing.
    pub source: Option<String>,
    /// Whether the record lists it.
    pub listed: bool,
    /// The set's failures about this lease (missing, extra, mismatch).
    pub failures: Vec<Failure>,
    /// The bundle's own check, when there is a bundle.
    pub report: Option<Report>,
    pub keys: Option<KeysUsed>,
}

impl LeaseOutcome {
    pub fn holds(&self) -> bool {
        self.failures.is_empty() && self.report.as_ref().is_some_and(Report::holds)
    }
}

/// The outcome of a set: it holds when the record and every lease hold.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SetReport {
    /// The record as decoded (even when its signature failed, to show it).
    pub record: Option<pb::ClusterRecord>,
    pub coordinator_key_id: Option<String>,
    /// `pinned`, `record (self-asserted)`, `record (untrusted)` or `none`.
    pub coordinator_key_source: &'static str,
    /// Failures of the record itself.
    pub failures: Vec<Failure>,
    /// The record's leases in its order, then extra bundles in set order.
    pub leases: Vec<LeaseOutcome>,
}

impl SetReport {
    pub fn holds(&self) -> bool {
        self.failures.is_empty() && self.leases.iter().all(LeaseOutcome::holds)
    }

    /// Every failure's rule name, the record's then each lease's set
    /// failures and bundle failures (with repeats).
    pub fn rules(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = self.failures.iter().map(|f| f.rule).collect();
        for l in &self.leases {
            out.extend(l.failures.iter().map(|f| f.rule));
            if let Some(r) = &l.report {
                out.extend(r.rules());
            }
        }
        out
    }
}

fn fail(rule: &'static str, detail: String) -> Failure {
    Failure { rule, detail }
}

/// The record's payload decoded, whatever its signature says: to show
/// what a failing record claims, never to trust it.
fn decode_unchecked(env: &pb::Envelope) -> Option<pb::ClusterRecord> {
    if env.payload_type != types::CLUSTER_RECORD || env.payload.len() > dsse::MAX_PAYLOAD {
        return None;
    }
    pb::ClusterRecord::decode(env.payload.as_slice()).ok()
}

/// Checks a cluster's record and bundles with the keys of `trust`
/// (`trust.node_key` is not used: each lease's node key is the one the
/// verified record binds it to).
pub fn verify_set(
    record: &Result<pb::Envelope, String>,
    files: &[SetFile],
    trust: &Trust,
    params: &Params,
) -> SetReport {
    let mut failures = Vec::new();
    let claimed = record.as_ref().ok().and_then(decode_unchecked);
    let record_key = claimed
        .as_ref()
        .and_then(|r| VerifyingKey::from_bytes(&r.coordinator_public_key).ok());
    // As for a bundle: a pinned key always wins; the record's own only when
    // self-asserted (or, reported as untrusted, to show what else fails).
    let (key, source) = match (&trust.coordinator_key, record_key) {
        (Some(k), _) => (Some(k.clone()), "pinned"),
        (None, Some(k)) if trust.self_asserted => (Some(k), "record (self-asserted)"),
        (None, found) => {
            if !trust.self_asserted {
                failures.push(fail(
                    rule::UNTRUSTED,
                    "no coordinator key is pinned: the record's own key proves nothing (pass the coordinator's key)".into(),
                ));
            }
            let source = if found.is_some() {
                "record (untrusted)"
            } else {
                "none"
            };
            (found, source)
        }
    };
    let verified: Option<pb::ClusterRecord> = match (record, &key) {
        (Err(e), _) => {
            failures.push(fail(rule::BAD_RECORD, format!("cluster record: {e}")));
            None
        }
        (Ok(_), None) => {
            failures.push(fail(
                rule::BAD_RECORD,
                "no coordinator key to check the cluster record with".into(),
            ));
            None
        }
        (Ok(env), Some(k)) => match dsse::verify(env, types::CLUSTER_RECORD, k) {
            Err(e) => {
                failures.push(fail(rule::BAD_RECORD, format!("cluster record: {e}")));
                None
            }
            Ok(payload) => match pb::ClusterRecord::decode(payload) {
                Err(e) => {
                    failures.push(fail(
                        rule::BAD_RECORD,
                        format!(
                            "cluster record: {} payload does not decode: {e}",
                            types::CLUSTER_RECORD
                        ),
                    ));
                    None
                }
                Ok(r) => Some(r),
            },
        },
    };
    if let Some(r) = &verified {
        if let Some(k) = &key {
            if r.coordinator_key_id != k.key_id() {
                failures.push(fail(
                    rule::BAD_RECORD,
                    format!(
                        "the record names coordinator key {}, but was signed by {}",
                        r.coordinator_key_id,
                        k.key_id()
                    ),
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for l in &r.leases {
            if !seen.insert(l.lease_id.as_str()) {
                failures.push(fail(
                    rule::BAD_RECORD,
                    format!("the record lists lease {} twice", l.lease_id),
                ));
            }
        }
    }

    // Bundles by lease id, first file wins; the rest are extra.
    let mut by_lease: BTreeMap<&str, (&SetFile, &Bundle)> = BTreeMap::new();
    let mut extra: Vec<LeaseOutcome> = Vec::new();
    for f in files {
        match &f.bundle {
            Err(e) => extra.push(LeaseOutcome {
                lease_id: String::new(),
                node_id: String::new(),
                source: Some(f.source.clone()),
                listed: false,
                failures: vec![fail(
                    rule::EXTRA_LEASE,
                    format!("{}: not a lease bundle: {e}", f.source),
                )],
                report: None,
                keys: None,
            }),
            Ok(b) => {
                if let Some((first, _)) = by_lease.get(b.lease_id.as_str()) {
                    extra.push(LeaseOutcome {
                        lease_id: b.lease_id.clone(),
                        node_id: b.node_key.key_id().to_owned(),
                        source: Some(f.source.clone()),
                        listed: false,
                        failures: vec![fail(
                            rule::EXTRA_LEASE,
                            format!(
                                "{}: a second bundle of lease {} (the first is {})",
                                f.source, b.lease_id, first.source
                            ),
                        )],
                        report: None,
                        keys: None,
                    });
                } else {
                    by_lease.insert(&b.lease_id, (f, b));
                }
            }
        }
    }

    let bundle_trust = Trust {
        coordinator_key: if trust.coordinator_key.is_some() || trust.self_asserted {
            key.clone()
        } else {
            None
        },
        node_key: None,
        self_asserted: trust.self_asserted,
    };
    let mut leases = Vec::new();
    let listed = verified
        .as_ref()
        .map(|r| r.leases.as_slice())
        .unwrap_or(&[]);
    for entry in listed {
        let Some((file, bundle)) = by_lease.remove(entry.lease_id.as_str()) else {
            if leases
                .iter()
                .any(|l: &LeaseOutcome| l.lease_id == entry.lease_id)
            {
                continue; // listed twice: already a bad-record
            }
            leases.push(LeaseOutcome {
                lease_id: entry.lease_id.clone(),
                node_id: entry.node_id.clone(),
                source: None,
                listed: true,
                failures: vec![fail(
                    rule::MISSING_LEASE,
                    format!(
                        "lease {} on node {}: the record lists it, the set has no bundle of it",
                        entry.lease_id, entry.node_id
                    ),
                )],
                report: None,
                keys: None,
            });
            continue;
        };
        // The record binds the node key: pin it for the bundle's own check.
        let entry_key = VerifyingKey::from_bytes(&entry.node_public_key).ok();
        let t = Trust {
            node_key: entry_key.clone(),
            ..bundle_trust.clone()
        };
        let (report, keys) = bundle.verify(&t, params);
        let mut lf = Vec::new();
        let bundle_node = bundle.node_key.key_id();
        if bundle_node != entry.node_id {
            lf.push(fail(
                rule::LEASE_MISMATCH,
                format!(
                    "lease {}: the bundle's node is {bundle_node}, the record's {}",
                    entry.lease_id, entry.node_id
                ),
            ));
        } else if entry_key.is_none() {
            lf.push(fail(
                rule::LEASE_MISMATCH,
                format!(
                    "lease {}: the record holds no node key for it",
                    entry.lease_id
                ),
            ));
        }
        // The GPUs the coordinator's verdict names, when it verified.
        if report.summary.verdict_holds.is_some() {
            let mut want = entry.gpu_uuids.clone();
            want.sort();
            let mut got = report.summary.gpus.clone();
            got.sort();
            if want != got {
                lf.push(fail(
                    rule::LEASE_MISMATCH,
                    format!(
                        "lease {}: the bundle's verdict names GPUs [{}], the record [{}]",
                        entry.lease_id,
                        got.join(", "),
                        want.join(", ")
                    ),
                ));
            }
        }
        leases.push(LeaseOutcome {
            lease_id: entry.lease_id.clone(),
            node_id: entry.node_id.clone(),
            source: Some(file.source.clone()),
            listed: true,
            failures: lf,
            report: Some(report),
            keys: Some(keys),
        });
    }
    // What is left was not listed (or nothing was: the record failed).
    let mut rest: Vec<_> = by_lease.into_values().collect();
    rest.sort_by_key(|(f, _)| files.iter().position(|g| std::ptr::eq(g, *f)));
    for (file, bundle) in rest {
        let detail = if verified.is_some() {
            format!(
                "{}: lease {} is not in the cluster record",
                file.source, bundle.lease_id
            )
        } else {
            format!(
                "{}: lease {} cannot be matched to a verified cluster record",
                file.source, bundle.lease_id
            )
        };
        leases.push(LeaseOutcome {
            lease_id: bundle.lease_id.clone(),
            node_id: bundle.node_key.key_id().to_owned(),
            source: Some(file.source.clone()),
            listed: false,
            failures: vec![fail(rule::EXTRA_LEASE, detail)],
            report: None,
            keys: None,
        });
    }
    leases.extend(extra);
    SetReport {
        record: verified.or(claimed),
        coordinator_key_id: key.map(|k| k.key_id().to_owned()),
        coordinator_key_source: source,
        failures,
        leases,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dsse::Signer, vectors};

    use vectors::{cluster_entry as entry, cluster_lease as lease, cluster_record as record};

    fn file(ev: &vectors::Evidence) -> SetFile {
        SetFile {
            source: format!("lease-{}.json", ev.lease.lease_id),
            bundle: Ok(ev.bundle()),
        }
    }

    struct Set {
        coord: Signer,
        leases: Vec<vectors::Evidence>,
        record: pb::Envelope,
        files: Vec<SetFile>,
    }

    fn honest() -> Set {
        let leases = vec![lease(1, 1), lease(2, 2), lease(3, 3)];
        let coord = leases[0].lease.coordinator();
        let record = record(&coord, leases.iter().map(entry).collect());
        let files = leases.iter().map(file).collect();
        Set {
            coord,
            leases,
            record,
            files,
        }
    }

    fn pinned(coord: &Signer) -> Trust {
        Trust {
            coordinator_key: Some(coord.verifying_key()),
            ..Default::default()
        }
    }

    fn check(s: &Set, trust: &Trust) -> SetReport {
        verify_set(&Ok(s.record.clone()), &s.files, trust, &vectors::params())
    }

    #[test]
    fn an_honest_set_holds() {
        let s = honest();
        let r = check(&s, &pinned(&s.coord));
        assert!(r.holds(), "{:?}", r.rules());
        assert_eq!(r.leases.len(), 3);
        assert_eq!(r.coordinator_key_source, "pinned");
        assert_eq!(r.record.unwrap().cluster_id, "c1");
    }

    #[test]
    fn without_a_pinned_key_it_is_untrusted_unless_self_asserted() {
        let s = honest();
        let r = check(&s, &Trust::default());
        assert!(!r.holds());
        assert!(r.rules().contains(&rule::UNTRUSTED));
        assert_eq!(r.coordinator_key_source, "record (untrusted)");
        let r = check(
            &s,
            &Trust {
                self_asserted: true,
                ..Default::default()
            },
        );
        assert!(r.holds(), "{:?}", r.rules());
        assert_eq!(r.coordinator_key_source, "record (self-asserted)");
    }

    #[test]
    fn another_coordinator_key_fails_the_record_and_every_bundle() {
        let s = honest();
        let other = Signer::from_seed(&[99; 32]);
        let r = check(&s, &pinned(&other));
        assert!(!r.holds());
        assert_eq!(r.failures.len(), 1);
        assert_eq!(r.failures[0].rule, rule::BAD_RECORD);
        // Nothing is listed without a verified record: every bundle is extra.
        assert_eq!(
            r.leases
                .iter()
                .filter(|l| l.failures[0].rule == rule::EXTRA_LEASE)
                .count(),
            3
        );
    }

    #[test]
    fn a_record_re_signed_by_another_key_fails_against_the_pinned_one() {
        let mut s = honest();
        let forger = Signer::from_seed(&[98; 32]);
        s.record = record(&forger, s.leases.iter().map(entry).collect());
        let r = check(&s, &pinned(&s.coord));
        assert_eq!(r.failures[0].rule, rule::BAD_RECORD);
        assert!(!r.holds());
    }

    #[test]
    fn a_tampered_record_byte_fails() {
        let mut s = honest();
        let at = s.record.payload.len() / 2;
        s.record.payload[at] ^= 1;
        let r = check(&s, &pinned(&s.coord));
        assert!(!r.holds());
        assert_eq!(r.failures[0].rule, rule::BAD_RECORD, "{:?}", r.failures);
    }

    #[test]
    fn a_removed_lease_file_is_missing_by_name() {
        let mut s = honest();
        let gone = s.files.remove(1);
        let r = check(&s, &pinned(&s.coord));
        assert_eq!(r.rules(), [rule::MISSING_LEASE]);
        let l = r.leases.iter().find(|l| !l.holds()).unwrap();
        assert!(gone.source.contains(&l.lease_id));
        assert!(l.failures[0].detail.contains(&l.lease_id));
    }

    #[test]
    fn a_foreign_bundle_added_is_extra() {
        let mut s = honest();
        // Signed by the same coordinator, for a lease of another cluster.
        s.files.push(file(&lease(9, 9)));
        let r = check(&s, &pinned(&s.coord));
        assert_eq!(r.rules(), [rule::EXTRA_LEASE]);
        assert!(r.leases[3].failures[0]
            .detail
            .contains(&format!("{:016x}", 9)));
    }

    #[test]
    fn a_second_bundle_of_a_listed_lease_is_extra() {
        let mut s = honest();
        s.files.push(file(&s.leases[0]));
        let r = check(&s, &pinned(&s.coord));
        assert_eq!(r.rules(), [rule::EXTRA_LEASE]);
    }

    #[test]
    fn an_unreadable_file_is_extra() {
        let mut s = honest();
        s.files.push(SetFile {
            source: "lease-x.json".into(),
            bundle: Err("bundle: not a JSON object".into()),
        });
        let r = check(&s, &pinned(&s.coord));
        assert_eq!(r.rules(), [rule::EXTRA_LEASE]);
    }

    #[test]
    fn a_bundle_from_another_node_substituted_fails() {
        let mut s = honest();
        // The same lease id, run (and honestly signed) on another node:
        // the coordinator's verdict names that node, the record another.
        let mut l = s.leases[1].lease.clone();
        l.node_seed = [77; 32];
        s.files[1] = file(&l.sign());
        let r = check(&s, &pinned(&s.coord));
        assert!(!r.holds());
        let rules = r.rules();
        assert!(rules.contains(&rule::LEASE_MISMATCH), "{rules:?}");
        assert!(rules.contains(&crate::chain::rule::WRONG_KEY), "{rules:?}");
    }

    #[test]
    fn a_bundle_swapped_for_another_lease_fails_both_ways() {
        let mut s = honest();
        s.files[2] = file(&lease(9, 3));
        let r = check(&s, &pinned(&s.coord));
        let mut rules = r.rules();
        rules.sort();
        assert_eq!(rules, [rule::EXTRA_LEASE, rule::MISSING_LEASE]);
    }

    #[test]
    fn other_gpus_than_the_record_names_fail() {
        let mut s = honest();
        let mut entries: Vec<_> = s.leases.iter().map(entry).collect();
        entries[0].gpu_uuids = vec!["GPU-other".into()];
        s.record = record(&s.coord, entries);
        let r = check(&s, &pinned(&s.coord));
        assert_eq!(r.rules(), [rule::LEASE_MISMATCH]);
    }

    #[test]
    fn a_malformed_record_fails_and_lists_nothing() {
        let s = honest();
        let r = verify_set(
            &Err("envelope JSON: missing array field `signatures`".into()),
            &s.files,
            &pinned(&s.coord),
            &vectors::params(),
        );
        assert_eq!(r.failures[0].rule, rule::BAD_RECORD);
        assert!(!r.holds());
    }
}
