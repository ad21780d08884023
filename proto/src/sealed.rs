//! A secret sealed to one X25519 public key: how a node hands a renter
//! its scratch volume's password through records that the node's spool
//! and the coordinator keep on disk, readable by the renter alone.
//!
//! The construction (docs/workloads.md#the-renters-copy-of-the-key), so
//! that a renter can open it in any language:
//!
//! ```text
//! sealed = E || C
//! E      = the sender's fresh X25519 public key (32 bytes)
//! s      = X25519(e, R)              R: the recipient's public key; all-zero refused
//! k      = HKDF-SHA256(salt = E || R, ikm = s, info = "warden/v1 sealed scratch key"), 32 bytes
//! C      = ChaCha20-Poly1305(k, nonce = 12 zero bytes, aad = context, plaintext)
//! ```
//!
//! The nonce is fixed because `k` is used once: `e` is fresh per seal.
//! `context` binds the secret to what it is for (the lease's id), so a
//! sealed key cannot be passed off as another lease's.

use ring::{aead, hkdf};
use x25519_dalek::{EphemeralSecret, PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// The HKDF info string: names the protocol and its version.
pub const INFO: &[u8] = b"warden/v1 sealed scratch key";

/// What a sealed secret adds to the plaintext: `E` and the tag.
pub const OVERHEAD: usize = 32 + 16;

/// Why a key or a sealed secret is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("an X25519 key is 32 bytes, not {0}")]
    KeyLength(usize),
    #[error("the key agreement gave zero (a low-order public key)")]
    LowOrder,
    #[error("a sealed secret is at least {OVERHEAD} bytes, not {0}")]
    TooShort(usize),
    #[error(
        "the sealed secret does not open with this key (wrong key, another lease's, or altered)"
    )]
    DoesNotOpen,
}

/// A 32-byte X25519 key from its bytes.
pub fn key32(bytes: &[u8]) -> Result<[u8; 32], SealError> {
    bytes
        .try_into()
        .map_err(|_| SealError::KeyLength(bytes.len()))
}

fn aead_key(
    shared: &[u8; 32],
    ephemeral: &[u8; 32],
    recipient: &[u8; 32],
) -> Result<aead::LessSafeKey, SealError> {
    if shared.iter().all(|b| *b == 0) {
        return Err(SealError::LowOrder);
    }
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral);
    salt[32..].copy_from_slice(recipient);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(shared);
    let okm = prk
        .expand(&[INFO], &aead::CHACHA20_POLY1305)
        .map_err(|_| SealError::DoesNotOpen)?;
    Ok(aead::LessSafeKey::new(aead::UnboundKey::from(okm)))
}

/// Seals `plaintext` to `recipient` (an X25519 public key) for `context`.
pub fn seal(recipient: &[u8; 32], context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    let e = EphemeralSecret::random_from_rng(rand_core::OsRng);
    let ephemeral = PublicKey::from(&e).to_bytes();
    let shared = Zeroizing::new(e.diffie_hellman(&PublicKey::from(*recipient)).to_bytes());
    let key = aead_key(&shared, &ephemeral, recipient)?;
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.extend_from_slice(&ephemeral);
    out.extend_from_slice(plaintext);
    let tag = key
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key([0; 12]),
            aead::Aad::from(context),
            &mut out[32..],
        )
        .map_err(|_| SealError::DoesNotOpen)?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens what [`seal`] made for the public key of `private`, and `context`.
pub fn open(
    private: &[u8; 32],
    context: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    if sealed.len() < OVERHEAD {
        return Err(SealError::TooShort(sealed.len()));
    }
    let secret = StaticSecret::from(*private);
    let recipient = PublicKey::from(&secret).to_bytes();
    let ephemeral: [u8; 32] = sealed[..32].try_into().expect("checked length");
    let shared = Zeroizing::new(
        secret
            .diffie_hellman(&PublicKey::from(ephemeral))
            .to_bytes(),
    );
    let key = aead_key(&shared, &ephemeral, &recipient)?;
    let mut buf = Zeroizing::new(sealed[32..].to_vec());
    let len = key
        .open_in_place(
            aead::Nonce::assume_unique_for_key([0; 12]),
            aead::Aad::from(context),
            &mut buf,
        )
        .map_err(|_| SealError::DoesNotOpen)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair(seed: u8) -> ([u8; 32], [u8; 32]) {
        let private = [seed; 32];
        (
            private,
            PublicKey::from(&StaticSecret::from(private)).to_bytes(),
        )
    }

    #[test]
    fn what_is_sealed_opens_with_the_recipients_key_only() {
        let (private, public) = keypair(7);
        let sealed = seal(&public, b"l-1", b"the password").unwrap();
        assert_eq!(sealed.len(), OVERHEAD + 12);
        assert_eq!(&*open(&private, b"l-1", &sealed).unwrap(), b"the password");
        // Fresh each time: the same secret never seals the same way twice.
        assert_ne!(seal(&public, b"l-1", b"the password").unwrap(), sealed);
        let (other, _) = keypair(8);
        assert_eq!(open(&other, b"l-1", &sealed), Err(SealError::DoesNotOpen));
        // Another lease's context, or any byte changed: refused.
        assert_eq!(open(&private, b"l-2", &sealed), Err(SealError::DoesNotOpen));
        for i in [0, 31, 32, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(
                open(&private, b"l-1", &bad),
                Err(SealError::DoesNotOpen),
                "byte {i}"
            );
        }
        assert_eq!(
            open(&private, b"l-1", &sealed[..OVERHEAD - 1]),
            Err(SealError::TooShort(OVERHEAD - 1))
        );
    }

    #[test]
    fn a_low_order_recipient_is_refused() {
        // The all-zero point gives an all-zero shared secret.
        assert_eq!(seal(&[0; 32], b"l", b"x"), Err(SealError::LowOrder));
        assert_eq!(key32(&[1; 31]), Err(SealError::KeyLength(31)));
    }
}
