//! The offline bundle: a lease's whole evidence in one JSON file, checked
//! by `warden verify` (or any verifier written from docs/attestation.md).
//!
//! ```json
//! {"format": "warden.lease-bundle.v2", "lease_id": "…",
//!  "node_public_key": "<base64>", "coordinator_public_key": "<base64>",
//!  "records": [<DSSE JSON envelope>…], "receipts": [<DSSE JSON envelope>…],
//!  "proof": <envelope or null>, "challenges": [<envelope>…], "verdict": <envelope or null>}
//! ```
//!
//! The keys a bundle carries are hints, never trust: a verifier checks the
//! coordinator's signatures with a key it was given (`Trust`), and the
//! node's key is bound to the lease by what that coordinator signed.

use serde_json::{json, Value};

use crate::{
    chain::{self, rule, Chain, Item, Params, Report},
    dsse::{self, VerifyingKey},
};

/// The `format` a bundle of this version carries.
pub const FORMAT: &str = "warden.lease-bundle.v2";

/// A lease's evidence.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub lease_id: String,
    pub node_key: VerifyingKey,
    pub coordinator_key: Option<VerifyingKey>,
    pub records: Vec<Item>,
    pub receipts: Vec<Item>,
    pub proof: Option<Item>,
    pub challenges: Vec<Item>,
    pub verdict: Option<Item>,
}

/// The keys a verifier holds before it opens a bundle.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// The coordinator's key, pinned (from its operator, `warden
    /// coordinator key`): what makes the verdict, the countersignatures and
    /// the challenges evidence.
    pub coordinator_key: Option<VerifyingKey>,
    /// The node's key, if the verifier pins it too; otherwise the bundle's,
    /// bound to the lease by the coordinator's verdict and receipts.
    pub node_key: Option<VerifyingKey>,
    /// Take the bundle's own keys where none is pinned, and say so: a
    /// self-asserted check, which proves nothing against the node's owner.
    pub self_asserted: bool,
}

/// Where each key used came from, for the report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeysUsed {
    pub coordinator_key_id: Option<String>,
    /// `pinned`, `bundle (self-asserted)`, `bundle (untrusted)` or `none`.
    pub coordinator_key_source: &'static str,
    pub node_key_id: String,
    /// `pinned` or `bundle`.
    pub node_key_source: &'static str,
}

/// Why a file is not a bundle at all. (A malformed envelope inside one is
/// not this: it fails a rule.)
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle: {0}")]
    Shape(String),
    #[error("bundle: {field}: {reason}")]
    Field { field: String, reason: String },
}

fn item_json(item: &Item) -> Value {
    match item {
        Ok(env) => dsse::to_json(env),
        Err(_) => Value::Null,
    }
}

impl Bundle {
    pub fn to_json(&self) -> Value {
        json!({
            "format": FORMAT,
            "lease_id": self.lease_id,
            "node_public_key": self.node_key.to_base64(),
            "coordinator_public_key": self.coordinator_key.as_ref().map(|k| k.to_base64()),
            "records": self.records.iter().map(item_json).collect::<Vec<_>>(),
            "receipts": self.receipts.iter().map(item_json).collect::<Vec<_>>(),
            "proof": self.proof.as_ref().map(item_json),
            "challenges": self.challenges.iter().map(item_json).collect::<Vec<_>>(),
            "verdict": self.verdict.as_ref().map(item_json),
        })
    }

    pub fn from_json(v: &Value) -> Result<Bundle, BundleError> {
        let field = |name: &str, reason: String| BundleError::Field {
            field: name.to_owned(),
            reason,
        };
        if !v.is_object() {
            return Err(BundleError::Shape("not a JSON object".into()));
        }
        let str_field = |name: &str| -> Result<String, BundleError> {
            v.get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| field(name, "missing or not a string".into()))
        };
        let format = str_field("format")?;
        if format == "warden.lease-bundle.v1" {
            return Err(field(
                "format",
                format!("`{format}` predates countersignatures; export the lease again ({FORMAT})"),
            ));
        }
        if format != FORMAT {
            return Err(field("format", format!("`{format}` is not {FORMAT}")));
        }
        let key = |name: &str, text: String| {
            VerifyingKey::parse(&text).map_err(|e| field(name, e.to_string()))
        };
        // A malformed envelope keeps its place, to fail a rule there.
        let envelope = |e: &Value| dsse::from_json(e).map_err(|err| err.to_string());
        let envelopes = |name: &str| -> Result<Vec<Item>, BundleError> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) => Ok(items.iter().map(envelope).collect()),
                Some(_) => Err(field(name, "not an array".into())),
            }
        };
        let one = |name: &str| -> Option<Item> {
            match v.get(name) {
                None | Some(Value::Null) => None,
                Some(e) => Some(envelope(e)),
            }
        };
        Ok(Bundle {
            lease_id: str_field("lease_id")?,
            node_key: key("node_public_key", str_field("node_public_key")?)?,
            coordinator_key: match v.get("coordinator_public_key") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(key("coordinator_public_key", s.clone())?),
                Some(_) => return Err(field("coordinator_public_key", "not a string".into())),
            },
            records: envelopes("records")?,
            receipts: envelopes("receipts")?,
            proof: one("proof"),
            challenges: envelopes("challenges")?,
            verdict: one("verdict"),
        })
    }

    /// Checks everything the bundle holds with the keys of `trust`.
    pub fn verify(&self, trust: &Trust, params: &Params) -> (Report, KeysUsed) {
        let mut pre = Vec::new();
        let (coordinator_key, coordinator_key_source) = match (
            &trust.coordinator_key,
            &self.coordinator_key,
        ) {
            (Some(k), _) => (Some(k.clone()), "pinned"),
            (None, Some(k)) if trust.self_asserted => (Some(k.clone()), "bundle (self-asserted)"),
            (None, found) => {
                if !trust.self_asserted {
                    pre.push((
                            rule::UNTRUSTED,
                            "no coordinator key is pinned: the bundle's own keys prove nothing against the node's owner (pass the coordinator's key)".to_owned(),
                        ));
                }
                (
                    found.clone(),
                    if found.is_some() {
                        "bundle (untrusted)"
                    } else {
                        "none"
                    },
                )
            }
        };
        let (node_key, node_key_source) = match &trust.node_key {
            Some(k) => {
                if k.key_id() != self.node_key.key_id() {
                    pre.push((
                        rule::WRONG_KEY,
                        format!(
                            "the bundle's node key {} is not the pinned node key {}",
                            self.node_key.key_id(),
                            k.key_id()
                        ),
                    ));
                }
                (k.clone(), "pinned")
            }
            None => (self.node_key.clone(), "bundle"),
        };
        let mut report = chain::verify(
            &Chain {
                lease_id: &self.lease_id,
                node_key: &node_key,
                coordinator_key: coordinator_key.as_ref(),
                records: &self.records,
                receipts: &self.receipts,
                proof: self.proof.as_ref(),
                challenges: &self.challenges,
                verdict: self.verdict.as_ref(),
            },
            params,
        );
        let mut failures: Vec<_> = pre
            .into_iter()
            .map(|(rule, detail)| chain::Failure { rule, detail })
            .collect();
        failures.append(&mut report.failures);
        report.failures = failures;
        let keys = KeysUsed {
            coordinator_key_id: coordinator_key.map(|k| k.key_id().to_owned()),
            coordinator_key_source,
            node_key_id: node_key.key_id().to_owned(),
            node_key_source,
        };
        (report, keys)
    }
}
