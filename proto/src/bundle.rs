//! The offline bundle: a lease's whole evidence in one JSON file, checked
//! by `warden verify` (or any verifier written from docs/attestation.md).
//!
//! ```json
//! {"format": "warden.lease-bundle.v1", "lease_id": "…",
//!  "node_public_key": "<base64>", "coordinator_public_key": "<base64>",
//!  "records": [<DSSE JSON envelope>…], "proof": <DSSE JSON envelope>,
//!  "challenges": [<DSSE JSON envelope>…], "verdict": <DSSE JSON envelope or null>}
//! ```

use serde_json::{json, Value};

use crate::{
    chain::{self, Chain, Params, Report},
    dsse::{self, VerifyingKey},
    pb::Envelope,
};

/// The `format` a bundle of this version carries.
pub const FORMAT: &str = "warden.lease-bundle.v1";

/// A lease's evidence.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub lease_id: String,
    pub node_key: VerifyingKey,
    pub coordinator_key: Option<VerifyingKey>,
    pub records: Vec<Envelope>,
    pub proof: Option<Envelope>,
    pub challenges: Vec<Envelope>,
    pub verdict: Option<Envelope>,
}

/// Why a file is not a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle: {0}")]
    Shape(String),
    #[error("bundle: {field}: {reason}")]
    Field { field: String, reason: String },
}

impl Bundle {
    pub fn to_json(&self) -> Value {
        json!({
            "format": FORMAT,
            "lease_id": self.lease_id,
            "node_public_key": self.node_key.to_base64(),
            "coordinator_public_key": self.coordinator_key.as_ref().map(|k| k.to_base64()),
            "records": self.records.iter().map(dsse::to_json).collect::<Vec<_>>(),
            "proof": self.proof.as_ref().map(dsse::to_json),
            "challenges": self.challenges.iter().map(dsse::to_json).collect::<Vec<_>>(),
            "verdict": self.verdict.as_ref().map(dsse::to_json),
        })
    }

    pub fn from_json(v: &Value) -> Result<Bundle, BundleError> {
        let field = |name: &str, reason: String| BundleError::Field {
            field: name.to_owned(),
            reason,
        };
        let str_field = |name: &str| -> Result<String, BundleError> {
            v.get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| field(name, "missing or not a string".into()))
        };
        let format = str_field("format")?;
        if format != FORMAT {
            return Err(field("format", format!("`{format}` is not {FORMAT}")));
        }
        let key = |name: &str, text: String| {
            VerifyingKey::parse(&text).map_err(|e| field(name, e.to_string()))
        };
        let envelopes = |name: &str| -> Result<Vec<Envelope>, BundleError> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) => items
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        dsse::from_json(e)
                            .map_err(|err| field(&format!("{name}[{i}]"), err.to_string()))
                    })
                    .collect(),
                Some(_) => Err(field(name, "not an array".into())),
            }
        };
        let one = |name: &str| -> Result<Option<Envelope>, BundleError> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(e) => dsse::from_json(e)
                    .map(Some)
                    .map_err(|err| field(name, err.to_string())),
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
            proof: one("proof")?,
            challenges: envelopes("challenges")?,
            verdict: one("verdict")?,
        })
    }

    /// Checks everything the bundle holds.
    pub fn verify(&self, params: &Params) -> Report {
        chain::verify(
            &Chain {
                lease_id: &self.lease_id,
                node_key: &self.node_key,
                records: &self.records,
                proof: self.proof.as_ref(),
                challenges: &self.challenges,
                coordinator_key: self.coordinator_key.as_ref(),
            },
            params,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dsse::Signer, pb, types};

    #[test]
    fn round_trips_and_names_bad_fields() {
        let node = Signer::from_seed(&[3; 32]);
        let b = Bundle {
            lease_id: "l-1".into(),
            node_key: node.verifying_key(),
            coordinator_key: None,
            records: vec![node.sign_message(types::RECORD, &pb::Record::default())],
            proof: None,
            challenges: vec![],
            verdict: None,
        };
        let v = b.to_json();
        let back = Bundle::from_json(&v).unwrap();
        assert_eq!(back.records, b.records);
        assert_eq!(back.node_key.key_id(), node.key_id());
        let mut bad = v.clone();
        bad["format"] = "x".into();
        assert!(Bundle::from_json(&bad)
            .unwrap_err()
            .to_string()
            .contains("format"));
        let mut bad = v.clone();
        bad["records"][0]["payload"] = "***".into();
        assert!(Bundle::from_json(&bad)
            .unwrap_err()
            .to_string()
            .contains("records[0]"));
        let mut bad = v;
        bad["node_public_key"] = "short".into();
        assert!(Bundle::from_json(&bad)
            .unwrap_err()
            .to_string()
            .contains("node_public_key"));
    }
}
