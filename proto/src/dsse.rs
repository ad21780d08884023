//! DSSE envelopes: signing with Ed25519 (ring), verification under the
//! ZIP 215 rules (ed25519-zebra), which also allow batches.
//!
//! The signature covers the pre-authentication encoding (PAE) of the
//! payload type and the exact payload bytes, never a re-encoding, so a
//! verifier in any language checks the bytes it received. Spec:
//! `docs/attestation.md`.

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ring::{
    digest,
    rand::SystemRandom,
    signature::{Ed25519KeyPair, KeyPair as _},
};

use crate::pb::{Envelope, Signature};

/// Largest payload accepted for verification.
pub const MAX_PAYLOAD: usize = 4 << 20;

/// A key that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// The private key bytes are not a PKCS#8 Ed25519 key; ring's reason.
    #[error("not an Ed25519 PKCS#8 key ({0})")]
    Pkcs8(String),
    /// A raw public key of the wrong length.
    #[error("an Ed25519 public key is 32 bytes, got {0}")]
    PublicKeyLength(usize),
    /// A configured public key that is neither encoding (first 80 characters kept).
    #[error("public key `{0}` is neither standard base64 nor 64 hex digits of a 32-byte key")]
    PublicKeyText(String),
    /// The system random source failed.
    #[error("no randomness for key generation")]
    Rng,
}

/// Why an envelope was not accepted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    /// The envelope carries another kind of message than the caller expects.
    #[error("payload type is {got}, expected {expected}")]
    WrongPayloadType { expected: String, got: String },
    /// The payload is over [`MAX_PAYLOAD`]; nothing else was checked.
    #[error("payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// The envelope has an empty signature list.
    #[error("envelope has no signature")]
    NoSignature,
    /// No signature names the expected key id; `keyid` is the first one present.
    #[error("no signature by key {expected}; signed by unknown key {keyid}")]
    UnknownKey { expected: String, keyid: String },
    /// The signature that names the key does not verify with it.
    #[error(
        "signature by key {keyid} does not verify over the payload (tampered, or the wrong key)"
    )]
    BadSignature { keyid: String },
    /// The signature verified but the payload is not the expected protobuf message.
    #[error("{payload_type} payload does not decode: {reason}")]
    Decode {
        payload_type: String,
        reason: String,
    },
    /// The JSON form is malformed; the message names the field.
    #[error("envelope JSON: {0}")]
    Json(String),
}

/// DSSE v1 pre-authentication encoding:
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, LEN in ASCII decimal.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload_type.len() + payload.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// Key id (and node id): lower-case hex of the first 16 bytes of
/// SHA-256 over the raw 32-byte public key.
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(&digest::digest(&digest::SHA256, public_key).as_ref()[..16])
}

/// SHA-256 of an envelope's payload bytes: what receipts acknowledge.
pub fn payload_sha256(env: &Envelope) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, &env.payload).as_ref());
    out
}

/// An Ed25519 private key that signs envelopes.
pub struct Signer {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish()
    }
}

impl Signer {
    /// A fresh key and its PKCS#8 (v2) encoding, to be stored.
    pub fn generate() -> Result<(Signer, Vec<u8>), KeyError> {
        let pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Rng)?;
        let der = pkcs8.as_ref().to_vec();
        Ok((Self::from_pkcs8(&der)?, der))
    }

    /// Loads a PKCS#8 (v1 or v2) Ed25519 key.
    pub fn from_pkcs8(der: &[u8]) -> Result<Signer, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| KeyError::Pkcs8(e.to_string()))?;
        Ok(Self::wrap(pair))
    }

    /// A deterministic key from a 32-byte seed: for tests and published
    /// vectors only; a real identity comes from [`Signer::generate`].
    pub fn from_seed(seed: &[u8; 32]) -> Signer {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32-byte seed is a key");
        Self::wrap(pair)
    }

    fn wrap(pair: Ed25519KeyPair) -> Signer {
        let key_id = key_id(pair.public_key().as_ref());
        Signer { pair, key_id }
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// This key's id, which is also the node id of an agent using it.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public half, to verify this signer's envelopes.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey {
            raw: self.public_key(),
            key_id: self.key_id.clone(),
        }
    }

    /// Signs `payload` as it is; the envelope carries one signature.
    pub fn sign(&self, payload_type: &str, payload: Vec<u8>) -> Envelope {
        let sig = self.pair.sign(&pae(payload_type, &payload));
        Envelope {
            payload_type: payload_type.to_owned(),
            payload,
            signatures: vec![Signature {
                keyid: self.key_id.clone(),
                sig: sig.as_ref().to_vec(),
            }],
        }
    }

    /// Encodes and signs a protobuf message.
    pub fn sign_message<M: prost::Message>(&self, payload_type: &str, msg: &M) -> Envelope {
        self.sign(payload_type, msg.encode_to_vec())
    }
}

/// An Ed25519 public key that verifies envelopes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyingKey {
    raw: [u8; 32],
    key_id: String,
}

impl VerifyingKey {
    /// From the raw 32-byte key.
    pub fn from_bytes(raw: &[u8]) -> Result<VerifyingKey, KeyError> {
        let raw: [u8; 32] = raw
            .try_into()
            .map_err(|_| KeyError::PublicKeyLength(raw.len()))?;
        Ok(VerifyingKey {
            key_id: key_id(&raw),
            raw,
        })
    }

    /// From text as written in config: standard base64 or 64 hex digits.
    pub fn parse(text: &str) -> Result<VerifyingKey, KeyError> {
        let t = text.trim();
        let raw = if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(t).ok()
        } else {
            B64.decode(t).ok()
        };
        match raw {
            Some(r) if r.len() == 32 => Self::from_bytes(&r),
            _ => Err(KeyError::PublicKeyText(t.chars().take(80).collect())),
        }
    }

    /// The key id signatures by this key carry.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.raw
    }

    /// Standard padded base64 of the raw key, as written in config.
    pub fn to_base64(&self) -> String {
        B64.encode(self.raw)
    }
}

/// Checks an envelope and returns its payload. In order: payload type,
/// size, a signature by `key`'s key id (the first one naming it is the one
/// checked), then the Ed25519 signature over PAE of the bytes received.
pub fn verify<'a>(
    env: &'a Envelope,
    expected_type: &str,
    key: &VerifyingKey,
) -> Result<&'a [u8], VerifyError> {
    let sig = precheck(env, expected_type, key)?;
    if !signature_holds(key, &pae(&env.payload_type, &env.payload), &sig.sig) {
        return Err(VerifyError::BadSignature {
            keyid: sig.keyid.clone(),
        });
    }
    Ok(&env.payload)
}

/// Fewest signatures checked as a batch.
const MIN_BATCH: usize = 8;

/// `verify` of many envelopes at once, with the same results, in the same
/// order. The signatures are checked as one batch (Ed25519 batch
/// verification shares the work: several times faster for a lease's
/// hundreds of records and receipts); only if the batch fails is each one
/// checked alone, to say which. Batch and single checks agree exactly
/// under the ZIP 215 rules both use.
pub fn verify_many<'a>(
    checks: &[(&'a Envelope, &str, &VerifyingKey)],
) -> Vec<Result<&'a [u8], VerifyError>> {
    let prechecked: Vec<_> = checks
        .iter()
        .map(|(env, ty, key)| precheck(env, ty, key))
        .collect();
    let messages: Vec<Option<Vec<u8>>> = checks
        .iter()
        .zip(&prechecked)
        .map(|((env, _, _), pre)| pre.is_ok().then(|| pae(&env.payload_type, &env.payload)))
        .collect();
    let mut batch = ed25519_zebra::batch::Verifier::new();
    // A batch pays for random weights and a multiscalar product: below a
    // few signatures it costs more than checking each alone.
    let mut batchable = messages.iter().flatten().count() >= MIN_BATCH;
    for (((_, _, key), pre), msg) in checks.iter().zip(&prechecked).zip(&messages) {
        let (Ok(sig), Some(msg)) = (pre, msg) else {
            continue;
        };
        match <[u8; 64]>::try_from(sig.sig.as_slice()) {
            Ok(bytes) => batch.queue((
                ed25519_zebra::VerificationKeyBytes::from(key.raw),
                ed25519_zebra::Signature::from_bytes(&bytes),
                msg,
            )),
            Err(_) => batchable = false,
        }
    }
    let all_hold = batchable && batch.verify(rand_core::OsRng).is_ok();
    checks
        .iter()
        .zip(prechecked)
        .zip(&messages)
        .map(|(((env, _, key), pre), msg)| {
            let sig = pre?;
            let msg = msg.as_deref().unwrap_or_default();
            if all_hold || signature_holds(key, msg, &sig.sig) {
                Ok(env.payload.as_slice())
            } else {
                Err(VerifyError::BadSignature {
                    keyid: sig.keyid.clone(),
                })
            }
        })
        .collect()
}

/// Steps 1-3 of verification: the type, the size, a signature naming the key.
fn precheck<'a>(
    env: &'a Envelope,
    expected_type: &str,
    key: &VerifyingKey,
) -> Result<&'a Signature, VerifyError> {
    if env.payload_type != expected_type {
        return Err(VerifyError::WrongPayloadType {
            expected: expected_type.to_owned(),
            got: env.payload_type.clone(),
        });
    }
    if env.payload.len() > MAX_PAYLOAD {
        return Err(VerifyError::TooLarge {
            len: env.payload.len(),
            max: MAX_PAYLOAD,
        });
    }
    env.signatures
        .iter()
        .find(|s| s.keyid == key.key_id)
        .ok_or_else(|| match env.signatures.first() {
            None => VerifyError::NoSignature,
            Some(s) => VerifyError::UnknownKey {
                expected: key.key_id.clone(),
                keyid: s.keyid.clone(),
            },
        })
}

/// Step 4: an Ed25519 signature under the ZIP 215 rules (the cofactored
/// equation of RFC 8032 5.1.7, S below the group order, any encoding of
/// the points that decodes). Every signature an RFC 8032 signer makes
/// holds; so does every one a stricter (cofactorless) check accepts.
fn signature_holds(key: &VerifyingKey, msg: &[u8], sig: &[u8]) -> bool {
    let Ok(sig) = <[u8; 64]>::try_from(sig) else {
        return false;
    };
    let Ok(vk) = ed25519_zebra::VerificationKey::try_from(key.raw) else {
        return false;
    };
    vk.verify(&ed25519_zebra::Signature::from_bytes(&sig), msg)
        .is_ok()
}

/// Verifies, then decodes the payload as `M`.
pub fn open<M: prost::Message + Default>(
    env: &Envelope,
    expected_type: &str,
    key: &VerifyingKey,
) -> Result<M, VerifyError> {
    let payload = verify(env, expected_type, key)?;
    M::decode(payload).map_err(|e| VerifyError::Decode {
        payload_type: expected_type.to_owned(),
        reason: e.to_string(),
    })
}

/// DSSE's JSON form: `{"payloadType", "payload" (base64), "signatures": [{"keyid", "sig" (base64)}]}`.
pub fn to_json(env: &Envelope) -> serde_json::Value {
    serde_json::json!({
        "payloadType": env.payload_type,
        "payload": B64.encode(&env.payload),
        "signatures": env.signatures.iter().map(|s| serde_json::json!({
            "keyid": s.keyid,
            "sig": B64.encode(&s.sig),
        })).collect::<Vec<_>>(),
    })
}

/// Base64 as the spec reads it: the standard alphabet with its padding;
/// unused low bits of the last character are ignored (as most decoders do),
/// so a verifier in any language reads the same bytes. The bytes, not the
/// text, are what is signed and hashed.
const B64_READ: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

/// Parses DSSE's JSON form; errors name the missing or bad field.
pub fn from_json(v: &serde_json::Value) -> Result<Envelope, VerifyError> {
    let field = |obj: &serde_json::Value, name: &str| -> Result<String, VerifyError> {
        obj.get(name)
            .and_then(|x| x.as_str())
            .map(str::to_owned)
            .ok_or_else(|| VerifyError::Json(format!("missing or non-string field `{name}`")))
    };
    let b64 = |text: String, name: &str| {
        B64_READ
            .decode(text)
            .map_err(|e| VerifyError::Json(format!("field `{name}` is not base64: {e}")))
    };
    let sigs = v
        .get("signatures")
        .and_then(|s| s.as_array())
        .ok_or_else(|| VerifyError::Json("missing array field `signatures`".into()))?;
    Ok(Envelope {
        payload_type: field(v, "payloadType")?,
        payload: b64(field(v, "payload")?, "payload")?,
        signatures: sigs
            .iter()
            .map(|s| {
                Ok(Signature {
                    keyid: field(s, "keyid")?,
                    sig: b64(field(s, "sig")?, "sig")?,
                })
            })
            .collect::<Result<_, VerifyError>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: &str = "application/vnd.warden.record.v1+protobuf";

    #[test]
    fn pae_matches_the_dsse_spec_vector() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
    }

    #[test]
    fn fixed_key_gives_fixed_ids_and_signature() {
        // RFC 8032 section 7.1, TEST 1: the seed, public key and signature of the empty message.
        let seed: [u8; 32] =
            hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
                .unwrap()
                .try_into()
                .unwrap();
        let s = Signer::from_seed(&seed);
        assert_eq!(
            hex::encode(s.public_key()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        let raw = s.pair.sign(b"");
        assert_eq!(
            hex::encode(raw.as_ref()),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
        // Key id: first 16 bytes of SHA-256(public key), computed independently with sha256sum.
        assert_eq!(s.key_id(), "21fe31dfa154a261626bf854046fd227");
        // The envelope signature is Ed25519 over PAE, nothing else.
        let env = s.sign("t", b"x".to_vec());
        assert_eq!(
            env.signatures[0].sig,
            s.pair.sign(b"DSSEv1 1 t 1 x").as_ref().to_vec()
        );
    }

    /// The worked example in docs/attestation.md, computed once with Python's
    /// `cryptography` package (an independent Ed25519 and SHA-256).
    #[test]
    fn heartbeat_envelope_matches_the_documented_example() {
        let seed: [u8; 32] =
            hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
                .unwrap()
                .try_into()
                .unwrap();
        let s = Signer::from_seed(&seed);
        let msg = crate::pb::Heartbeat {
            node_id: s.key_id().to_owned(),
            time_unix_ms: 1_700_000_000_000,
            ..Default::default()
        };
        let env = s.sign_message(crate::types::HEARTBEAT, &msg);
        assert_eq!(
            hex::encode(&env.payload),
            "0a2032316665333164666131353461323631363236626638353430343666643232371080d095ffbc31"
        );
        assert_eq!(
            pae(&env.payload_type, &env.payload),
            [
                &b"DSSEv1 44 application/vnd.warden.heartbeat.v1+protobuf 41 "[..],
                &env.payload
            ]
            .concat()
        );
        assert_eq!(
            hex::encode(&env.signatures[0].sig),
            "347cd6c6cc4646eff7abca1821fe2e9bd174791afe16f313734151f560ab7dc6\
             b780b239195f852bd6bde40572ba2c7e85374d89959804d9a1a68b2ff7306906"
        );
        assert_eq!(
            hex::encode(payload_sha256(&env)),
            "3f38aa575b52dd5a224f4f77663c5016ad2338c7d59f8cbdfb68222629a4a48c"
        );
        let json = serde_json::json!({
            "payloadType": "application/vnd.warden.heartbeat.v1+protobuf",
            "payload": "CiAyMWZlMzFkZmExNTRhMjYxNjI2YmY4NTQwNDZmZDIyNxCA0JX/vDE=",
            "signatures": [{
                "keyid": "21fe31dfa154a261626bf854046fd227",
                "sig": "NHzWxsxGRu/3q8oYIf4um9F0eRr+FvMTc0FR9WCrfca3gLI5GV+FK9a95AVyuix+hTdNiZWYBNmhposv9zBpBg==",
            }],
        });
        assert_eq!(to_json(&env), json);
        let key = VerifyingKey::parse("11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=").unwrap();
        let got: crate::pb::Heartbeat =
            open(&from_json(&json).unwrap(), crate::types::HEARTBEAT, &key).unwrap();
        assert_eq!(got, msg);
    }

    #[test]
    fn rejects_flips_wrong_keys_and_types() {
        let (s, _) = Signer::generate().unwrap();
        let k = s.verifying_key();
        let env = s.sign(T, b"payload bytes".to_vec());
        assert_eq!(verify(&env, T, &k).unwrap(), b"payload bytes");

        let mut e = env.clone();
        e.payload[0] ^= 1;
        assert!(matches!(
            verify(&e, T, &k),
            Err(VerifyError::BadSignature { .. })
        ));

        let mut e = env.clone();
        e.signatures[0].sig[10] ^= 0x80;
        assert!(matches!(
            verify(&e, T, &k),
            Err(VerifyError::BadSignature { .. })
        ));

        let (other, _) = Signer::generate().unwrap();
        let err = verify(&env, T, &other.verifying_key()).unwrap_err();
        assert!(matches!(err, VerifyError::UnknownKey { .. }), "{err}");
        assert!(err.to_string().contains(s.key_id()));

        // Same key id claimed, other key's bytes: the signature check catches it.
        let mut e = other.sign(T, b"payload bytes".to_vec());
        e.signatures[0].keyid = s.key_id().to_owned();
        assert!(matches!(
            verify(&e, T, &k),
            Err(VerifyError::BadSignature { .. })
        ));

        let err = verify(&env, "application/other", &k).unwrap_err();
        assert!(matches!(err, VerifyError::WrongPayloadType { .. }));
        // The type is signed too: relabelling an envelope breaks it.
        let mut e = env.clone();
        e.payload_type = "application/other".into();
        assert!(matches!(
            verify(&e, "application/other", &k),
            Err(VerifyError::BadSignature { .. })
        ));

        let mut e = env.clone();
        e.signatures.clear();
        assert_eq!(verify(&e, T, &k), Err(VerifyError::NoSignature));

        let big = s.sign(T, vec![0; MAX_PAYLOAD + 1]);
        assert!(matches!(
            verify(&big, T, &k),
            Err(VerifyError::TooLarge { .. })
        ));
    }

    #[test]
    fn open_decodes_the_verified_message() {
        let (s, _) = Signer::generate().unwrap();
        let msg = crate::pb::Receipt {
            node_id: "n".into(),
            seq: 7,
            payload_sha256: vec![1; 32],
            time_unix_ms: 5,
            ..Default::default()
        };
        let env = s.sign_message(T, &msg);
        let got: crate::pb::Receipt = open(&env, T, &s.verifying_key()).unwrap();
        assert_eq!(got, msg);
        let junk = s.sign(T, vec![0xff, 0xff, 0xff]);
        assert!(matches!(
            open::<crate::pb::Receipt>(&junk, T, &s.verifying_key()),
            Err(VerifyError::Decode { .. })
        ));
    }

    #[test]
    fn public_keys_parse_from_base64_and_hex() {
        let (s, _) = Signer::generate().unwrap();
        let k = s.verifying_key();
        assert_eq!(VerifyingKey::parse(&k.to_base64()).unwrap(), k);
        assert_eq!(VerifyingKey::parse(&hex::encode(k.as_bytes())).unwrap(), k);
        assert!(VerifyingKey::parse("nope").is_err());
        assert!(VerifyingKey::parse(&B64.encode([1u8; 31])).is_err());
        assert_eq!(
            VerifyingKey::from_bytes(&[0; 5]),
            Err(KeyError::PublicKeyLength(5))
        );
    }

    #[test]
    fn pkcs8_round_trip_and_garbage() {
        let (s, der) = Signer::generate().unwrap();
        assert_eq!(Signer::from_pkcs8(&der).unwrap().key_id(), s.key_id());
        assert!(Signer::from_pkcs8(&der[..der.len() - 3]).is_err());
        assert!(Signer::from_pkcs8(b"not a key").is_err());
    }

    #[test]
    fn json_round_trip_and_errors() {
        let (s, _) = Signer::generate().unwrap();
        let env = s.sign(T, b"\x00\x01binary".to_vec());
        let v = to_json(&env);
        assert_eq!(v["payloadType"], T);
        assert_eq!(from_json(&v).unwrap(), env);
        let mut bad = v.clone();
        bad["payload"] = "!!!".into();
        assert!(from_json(&bad).unwrap_err().to_string().contains("payload"));
        let mut bad = v;
        bad.as_object_mut().unwrap().remove("signatures");
        assert!(from_json(&bad)
            .unwrap_err()
            .to_string()
            .contains("signatures"));
    }

    #[test]
    fn a_batch_gives_each_envelope_what_verify_gives_it() {
        let a = Signer::from_seed(&[1; 32]);
        let b = Signer::from_seed(&[2; 32]);
        let (ka, kb) = (a.verifying_key(), b.verifying_key());
        let mut envs: Vec<Envelope> = (0..40u8)
            .map(|i| {
                if i % 3 == 0 {
                    b.sign(T, vec![i; 100])
                } else {
                    a.sign(T, vec![i; 100])
                }
            })
            .collect();
        let keys = |envs: &[Envelope]| -> Vec<VerifyingKey> {
            (0..envs.len())
                .map(|i| if i % 3 == 0 { kb.clone() } else { ka.clone() })
                .collect()
        };
        // All good: one batch.
        let ks = keys(&envs);
        let checks: Vec<_> = envs.iter().zip(&ks).map(|(e, k)| (e, T, k)).collect();
        assert!(verify_many(&checks).iter().all(Result::is_ok));
        // A flipped bit, a foreign key, a wrong type, a short signature: the
        // batch fails and each gets its own answer.
        envs[5].payload[0] ^= 1;
        envs[7].signatures[0].keyid = "someone".into();
        envs[9].payload_type = "x".into();
        envs[11].signatures[0].sig.truncate(10);
        let ks = keys(&envs);
        let checks: Vec<_> = envs.iter().zip(&ks).map(|(e, k)| (e, T, k)).collect();
        let many = verify_many(&checks);
        for (i, ((env, ty, key), got)) in checks.iter().zip(&many).enumerate() {
            assert_eq!(got, &verify(env, ty, key), "envelope {i}");
            assert_eq!(got.is_ok(), ![5, 7, 9, 11].contains(&i), "envelope {i}");
        }
        // Fewer than a batch's worth: each checked alone, the same answers.
        let few = &checks[4..7];
        let got = verify_many(few);
        assert!(few.len() < MIN_BATCH);
        assert_eq!(
            got.iter().map(Result::is_ok).collect::<Vec<_>>(),
            [true, false, true]
        );
    }

    proptest! {
        #[test]
        fn any_payload_signs_and_any_bit_flip_fails(
            payload in proptest::collection::vec(any::<u8>(), 1..512),
            ty in "[a-z/.+]{0,40}",
            bit in any::<usize>(),
        ) {
            let s = Signer::from_seed(&[7; 32]);
            let k = s.verifying_key();
            let env = s.sign(&ty, payload.clone());
            prop_assert_eq!(verify(&env, &ty, &k).unwrap(), payload.as_slice());
            let mut e = env.clone();
            let i = bit % (payload.len() * 8);
            e.payload[i / 8] ^= 1 << (i % 8);
            prop_assert!(verify(&e, &ty, &k).is_err());
        }
    }
}
