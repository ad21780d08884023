//! Who may register a node: the operator's policy applied to each Register,
//! and how fast new nodes may arrive. Plain data and functions: the session
//! asks with what it knows (the node, how it was enrolled before, the token
//! it presents, the time) and gets a decision.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use rand::Rng;

use crate::{
    config::{EnrollmentConfig, EnrollmentPolicy},
    ratelimit::Bucket,
};

/// How a node got in, kept with it: under the token policy a node that came
/// in with a token (or the allowlist) needs none again, one that came in
/// while the coordinator was open does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrolledBy {
    Open,
    Token,
    Allowlist,
}

impl EnrolledBy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Token => "token",
            Self::Allowlist => "allowlist",
        }
    }

    /// The stored text; anything unknown counts as the weakest, open.
    pub fn parse(s: &str) -> Self {
        match s {
            "token" => Self::Token,
            "allowlist" => Self::Allowlist,
            _ => Self::Open,
        }
    }
}

/// What to do with a Register the policy lets in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A node already enrolled: nothing changes.
    Known,
    /// Enroll it (again, if it was in before under a weaker policy), noting how.
    Enroll { by: EnrolledBy, new: bool },
}

impl Admit {
    /// Whether it counts against the new-node rate: a new identity that
    /// the operator did not name (a leaked token must not mint thousands).
    pub fn rate_limited(self) -> bool {
        matches!(self, Admit::Enroll { by, new: true } if by != EnrolledBy::Allowlist)
    }
}

/// Why a Register was refused; the message goes to the agent, so it says
/// what to configure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("node {node} is new to this coordinator, which enrolls new nodes with a join token: set coordinator.join_token in the agent's config to a token from the coordinator's operator")]
    TokenRequired { node: String },
    #[error("the join token in coordinator.join_token is not one this coordinator accepts (node {node}); ask the coordinator's operator for a current one")]
    BadToken { node: String },
    #[error("node {node} is not in this coordinator's allowlist (enrollment.allow); give the coordinator's operator this node id to add")]
    NotAllowed { node: String },
    #[error("too many new nodes {scope} (limit: enrollment.{key}); retry in {} s", retry_after.as_secs().max(1))]
    TooFast {
        scope: String,
        key: &'static str,
        retry_after: Duration,
    },
}

impl Denied {
    /// The gRPC code the stream ends with.
    pub fn code(&self) -> tonic::Code {
        match self {
            Denied::TooFast { .. } => tonic::Code::ResourceExhausted,
            _ => tonic::Code::PermissionDenied,
        }
    }
}

/// The policy with its lists, ready to decide.
#[derive(Debug, Clone)]
pub struct Policy {
    kind: EnrollmentPolicy,
    /// SHA-256 of each accepted token.
    tokens: HashSet<[u8; 32]>,
    allow: HashSet<String>,
}

impl Policy {
    /// From a validated `[enrollment]` and the policy resolved from it.
    pub fn new(kind: EnrollmentPolicy, cfg: &EnrollmentConfig) -> Self {
        Self {
            kind,
            tokens: cfg
                .join_token_sha256
                .iter()
                .filter_map(|h| hex::decode(h).ok()?.try_into().ok())
                .collect(),
            allow: cfg.allow.iter().cloned().collect(),
        }
    }

    pub fn kind(&self) -> EnrollmentPolicy {
        self.kind
    }

    /// Decides on a Register of `node`, enrolled before as `stored` (None:
    /// never seen), presenting `token` ("" for none).
    pub fn decide(
        &self,
        node: &str,
        stored: Option<EnrolledBy>,
        token: &str,
    ) -> Result<Admit, Denied> {
        let node_owned = || node.to_owned();
        let enroll = |by| Admit::Enroll {
            by,
            new: stored.is_none(),
        };
        match self.kind {
            EnrollmentPolicy::Open => Ok(match stored {
                Some(_) => Admit::Known,
                None => enroll(EnrolledBy::Open),
            }),
            _ if self.allow.contains(node) => Ok(match stored {
                Some(EnrolledBy::Allowlist) => Admit::Known,
                _ => enroll(EnrolledBy::Allowlist),
            }),
            EnrollmentPolicy::Allowlist => Err(Denied::NotAllowed { node: node_owned() }),
            EnrollmentPolicy::Token => match stored {
                Some(EnrolledBy::Token | EnrolledBy::Allowlist) => Ok(Admit::Known),
                _ if token.is_empty() => Err(Denied::TokenRequired { node: node_owned() }),
                _ if self.tokens.contains(&token_sha256(token)) => Ok(enroll(EnrolledBy::Token)),
                _ => Err(Denied::BadToken { node: node_owned() }),
            },
        }
    }
}

/// SHA-256 of a join token as the coordinator's config lists it.
pub fn token_sha256(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().unwrap_or([0; 32])
}

/// A new join token (32 random bytes, hex) and its SHA-256 (hex).
pub fn new_token() -> (String, String) {
    let token = hex::encode(rand::rng().random::<[u8; 32]>());
    let sha = hex::encode(token_sha256(&token));
    (token, sha)
}

/// How fast new nodes may arrive, in all and per source address.
#[derive(Debug)]
pub struct EnrollRate {
    per_minute: u32,
    per_minute_per_ip: u32,
    global: Bucket,
    per_ip: HashMap<IpAddr, Bucket>,
}

/// Addresses remembered before the full (idle) ones are forgotten.
const MAX_REMEMBERED_IPS: usize = 4096;

impl EnrollRate {
    pub fn new(per_minute: u32, per_minute_per_ip: u32, now: Instant) -> Self {
        Self {
            per_minute,
            per_minute_per_ip,
            global: Bucket::new(per_minute as f64 / 60.0, per_minute as f64, now),
            per_ip: HashMap::new(),
        }
    }

    /// Takes one new node from `ip`, or says who is over and for how long.
    pub fn take(&mut self, ip: IpAddr, now: Instant) -> Result<(), Denied> {
        if self.per_ip.len() >= MAX_REMEMBERED_IPS {
            self.per_ip.retain(|_, b| !b.is_full(now));
        }
        let n = self.per_minute_per_ip as f64;
        let mine = self
            .per_ip
            .entry(ip)
            .or_insert_with(|| Bucket::new(n / 60.0, n, now));
        let wait = mine.wait_for(now, 1.0);
        if !wait.is_zero() {
            return Err(Denied::TooFast {
                scope: format!("from {ip}"),
                key: "new_nodes_per_minute_per_ip",
                retry_after: wait,
            });
        }
        self.global
            .try_take(now, 1.0)
            .map_err(|wait| Denied::TooFast {
                scope: "in all".into(),
                key: "new_nodes_per_minute",
                retry_after: wait,
            })?;
        let _ = mine.try_take(now, 1.0);
        Ok(())
    }

    pub fn per_minute(&self) -> (u32, u32) {
        (self.per_minute, self.per_minute_per_ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    fn policy(kind: EnrollmentPolicy, tokens: &[&str], allow: &[&str]) -> Policy {
        Policy::new(
            kind,
            &EnrollmentConfig {
                policy: Some(kind),
                join_token_sha256: tokens
                    .iter()
                    .map(|t| hex::encode(token_sha256(t)))
                    .collect(),
                allow: allow.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn open_lets_anyone_in_and_counts_only_new_ones() {
        let p = policy(EnrollmentPolicy::Open, &[], &[]);
        let a = p.decide(A, None, "").unwrap();
        assert_eq!(
            a,
            Admit::Enroll {
                by: EnrolledBy::Open,
                new: true
            }
        );
        assert!(a.rate_limited());
        assert_eq!(
            p.decide(A, Some(EnrolledBy::Open), "").unwrap(),
            Admit::Known
        );
    }

    #[test]
    fn token_policy_wants_a_listed_token_from_new_and_formerly_open_nodes() {
        let p = policy(EnrollmentPolicy::Token, &["s3cret"], &[B]);
        let e = p.decide(A, None, "").unwrap_err();
        assert!(matches!(e, Denied::TokenRequired { .. }));
        assert!(e.to_string().contains("coordinator.join_token"), "{e}");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let e = p.decide(A, None, "guess").unwrap_err();
        assert!(matches!(e, Denied::BadToken { .. }), "{e}");
        let ok = p.decide(A, None, "s3cret").unwrap();
        assert_eq!(
            ok,
            Admit::Enroll {
                by: EnrolledBy::Token,
                new: true
            }
        );
        assert!(
            ok.rate_limited(),
            "a leaked token must not mint identities freely"
        );
        // Enrolled with a token: none needed again (the token can be rotated).
        assert_eq!(
            p.decide(A, Some(EnrolledBy::Token), "").unwrap(),
            Admit::Known
        );
        // In while the coordinator was open: must present one once.
        assert!(p.decide(A, Some(EnrolledBy::Open), "").is_err());
        assert_eq!(
            p.decide(A, Some(EnrolledBy::Open), "s3cret").unwrap(),
            Admit::Enroll {
                by: EnrolledBy::Token,
                new: false
            }
        );
        // The allowlist needs no token and no rate.
        let b = p.decide(B, None, "").unwrap();
        assert_eq!(
            b,
            Admit::Enroll {
                by: EnrolledBy::Allowlist,
                new: true
            }
        );
        assert!(!b.rate_limited());
    }

    #[test]
    fn allowlist_policy_lets_only_listed_nodes_in_even_known_ones() {
        let p = policy(EnrollmentPolicy::Allowlist, &[], &[B]);
        let e = p.decide(A, None, "anything").unwrap_err();
        assert!(matches!(e, Denied::NotAllowed { .. }));
        assert!(
            e.to_string().contains("enrollment.allow") && e.to_string().contains(A),
            "{e}"
        );
        // Struck off the list: refused even though it was enrolled before.
        assert!(p.decide(A, Some(EnrolledBy::Allowlist), "").is_err());
        assert_eq!(
            p.decide(B, Some(EnrolledBy::Allowlist), "").unwrap(),
            Admit::Known
        );
    }

    #[test]
    fn new_nodes_are_rate_limited_per_address_and_in_all() {
        let t0 = Instant::now();
        let ip = |n: u8| IpAddr::from([192, 0, 2, n]);
        let mut r = EnrollRate::new(20, 5, t0);
        for _ in 0..5 {
            r.take(ip(1), t0).unwrap();
        }
        let e = r.take(ip(1), t0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.to_string().contains("192.0.2.1") && e.to_string().contains("retry in 12 s"),
            "{e}"
        );
        // Others are not held up by one address, until the total runs out.
        for n in 2..5 {
            for _ in 0..5 {
                r.take(ip(n), t0).unwrap();
            }
        }
        let e = r.take(ip(9), t0).unwrap_err();
        assert!(e.to_string().contains("in all"), "{e}");
        // A minute later each address has its 5 again, the total its 20.
        let t1 = t0 + Duration::from_secs(60);
        for n in 1..5 {
            for _ in 0..5 {
                r.take(ip(n), t1).unwrap();
            }
        }
        // Simulated flood from one address for an hour: 5 + 5 per minute.
        let mut r = EnrollRate::new(60, 5, t0);
        let mut ok = 0;
        for ms in (0..3_600_000u64).step_by(50) {
            ok += r.take(ip(7), t0 + Duration::from_millis(ms)).is_ok() as u32;
        }
        assert!((300..=306).contains(&ok), "{ok}");
    }
}
