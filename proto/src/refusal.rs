//! What a coordinator's refusal means for the record it names: whether
//! sending the same bytes again can ever succeed.

use crate::{dsse::VerifyError, pb::RefusalKind};

impl RefusalKind {
    /// Final: the same bytes will never be accepted, so the agent sets the
    /// record aside instead of retrying. Unspecified (an older coordinator)
    /// and retry-later are not final.
    pub fn is_final(self) -> bool {
        match self {
            RefusalKind::Unspecified | RefusalKind::RetryLater => false,
            RefusalKind::WrongKey
            | RefusalKind::BadSignature
            | RefusalKind::WrongNode
            | RefusalKind::Malformed
            | RefusalKind::Conflict => true,
        }
    }

    /// The kind of refusal an envelope that failed verification earns.
    pub fn of_verify_error(e: &VerifyError) -> RefusalKind {
        match e {
            VerifyError::NoSignature | VerifyError::UnknownKey { .. } => RefusalKind::WrongKey,
            VerifyError::BadSignature { .. } => RefusalKind::BadSignature,
            VerifyError::WrongPayloadType { .. }
            | VerifyError::TooLarge { .. }
            | VerifyError::Decode { .. }
            | VerifyError::Json(_) => RefusalKind::Malformed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dsse::Signer, pb, types};

    #[test]
    fn only_unspecified_and_retry_later_are_retried() {
        let retried: Vec<_> = [
            RefusalKind::Unspecified,
            RefusalKind::RetryLater,
            RefusalKind::WrongKey,
            RefusalKind::BadSignature,
            RefusalKind::WrongNode,
            RefusalKind::Malformed,
            RefusalKind::Conflict,
        ]
        .into_iter()
        .filter(|k| !k.is_final())
        .collect();
        assert_eq!(
            retried,
            vec![RefusalKind::Unspecified, RefusalKind::RetryLater]
        );
        // A value from a newer coordinator that this build does not know decodes as unspecified.
        let r = pb::Refusal {
            kind: 99,
            ..Default::default()
        };
        assert_eq!(r.kind(), RefusalKind::Unspecified);
    }

    #[test]
    fn verification_failures_map_to_their_kind() {
        let node = Signer::from_seed(&[1; 32]);
        let other = Signer::from_seed(&[2; 32]);
        let env = other.sign(types::RECORD, b"x".to_vec());
        let err = crate::dsse::verify(&env, types::RECORD, &node.verifying_key()).unwrap_err();
        assert_eq!(RefusalKind::of_verify_error(&err), RefusalKind::WrongKey);
        let mut env = node.sign(types::RECORD, b"x".to_vec());
        env.payload[0] ^= 1;
        let err = crate::dsse::verify(&env, types::RECORD, &node.verifying_key()).unwrap_err();
        assert_eq!(
            RefusalKind::of_verify_error(&err),
            RefusalKind::BadSignature
        );
        let env = node.sign(types::HEARTBEAT, b"x".to_vec());
        let err = crate::dsse::verify(&env, types::RECORD, &node.verifying_key()).unwrap_err();
        assert_eq!(RefusalKind::of_verify_error(&err), RefusalKind::Malformed);
    }
}
