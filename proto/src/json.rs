//! How the generated messages print as JSON (`warden … --json`) where
//! serde's default would not do: keys as text, seq ranges as pairs.
//! Named in `build.rs` by `serialize_with` on the fields.

use base64::Engine;
use serde::{ser::SerializeSeq, Serializer};

use crate::pb;

/// Bytes as lowercase hex (public keys, as node ids are derived from them).
pub fn hex<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

/// Bytes as standard base64, as `wg` writes WireGuard keys.
pub fn base64_std<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Ranges as `[first, last]` pairs.
pub fn seq_ranges<S: Serializer>(ranges: &[pb::SeqRange], s: S) -> Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(Some(ranges.len()))?;
    for r in ranges {
        seq.serialize_element(&[r.first, r.last])?;
    }
    seq.end()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_prints_its_keys_as_text_and_its_gaps_as_pairs() {
        let n = pb::NodeInfo {
            node_id: "n".into(),
            public_key: vec![0xab, 0x01],
            mesh_public_key: vec![0xff; 3],
            missing: vec![pb::SeqRange { first: 4, last: 9 }],
            ..Default::default()
        };
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(v["public_key"], "ab01");
        assert_eq!(v["mesh_public_key"], "////");
        assert_eq!(v["missing"], serde_json::json!([[4, 9]]));
        assert_eq!(v["spool"], serde_json::Value::Null);
    }
}
