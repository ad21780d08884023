//! The labels a supplier declares for its node (`agent.toml [node]`): a
//! region, a country and free-form tags. The matcher filters on them as
//! declared; nothing verifies them. Both sides check the same bounds: the
//! agent refuses a config that breaks them, the coordinator a Register.

use crate::pb::NodeLabels;

/// The longest region name or tag.
pub const MAX_LABEL_LEN: usize = 32;
/// The most tags a node may declare.
pub const MAX_TAGS: usize = 16;

/// Why labels were refused; the message names the label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("region {0:?} must be 1 to 32 of [a-z0-9-] (such as \"eu-west\")")]
    Region(String),
    #[error("country {0:?} must be an ISO 3166-1 alpha-2 code in upper case (such as \"DE\")")]
    Country(String),
    #[error("tag {0:?} must be 1 to 32 of [a-z0-9-] (such as \"green-energy\")")]
    Tag(String),
    #[error("{0} tags: at most 16")]
    TooManyTags(usize),
    #[error("tag {0:?} is listed twice")]
    DuplicateTag(String),
}

/// A region name or tag: 1 to 32 of `[a-z0-9-]`.
pub fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Checks every label; an empty region or country means not declared.
pub fn check(labels: &NodeLabels) -> Result<(), LabelError> {
    if !labels.region.is_empty() && !is_label(&labels.region) {
        return Err(LabelError::Region(labels.region.clone()));
    }
    let c = &labels.country;
    let alpha2 = c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase());
    if !c.is_empty() && !alpha2 {
        return Err(LabelError::Country(c.clone()));
    }
    if labels.tags.len() > MAX_TAGS {
        return Err(LabelError::TooManyTags(labels.tags.len()));
    }
    for (i, t) in labels.tags.iter().enumerate() {
        if !is_label(t) {
            return Err(LabelError::Tag(t.clone()));
        }
        if labels.tags[..i].contains(t) {
            return Err(LabelError::DuplicateTag(t.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(region: &str, country: &str, tags: &[&str]) -> NodeLabels {
        NodeLabels {
            region: region.into(),
            country: country.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn well_formed_labels_and_none_pass() {
        assert_eq!(check(&NodeLabels::default()), Ok(()));
        assert_eq!(
            check(&labels("eu-west", "DE", &["green-energy", "soc2"])),
            Ok(())
        );
        assert_eq!(check(&labels(&"a".repeat(32), "", &[])), Ok(()));
    }

    #[test]
    fn each_bad_label_is_named() {
        assert_eq!(
            check(&labels("EU West", "", &[])),
            Err(LabelError::Region("EU West".into()))
        );
        assert_eq!(
            check(&labels(&"a".repeat(33), "", &[])),
            Err(LabelError::Region("a".repeat(33)))
        );
        assert_eq!(
            check(&labels("", "de", &[])),
            Err(LabelError::Country("de".into()))
        );
        assert_eq!(
            check(&labels("", "DEU", &[])),
            Err(LabelError::Country("DEU".into()))
        );
        assert_eq!(
            check(&labels("", "", &["ok", ""])),
            Err(LabelError::Tag("".into()))
        );
        assert_eq!(
            check(&labels("", "", &["a", "a"])),
            Err(LabelError::DuplicateTag("a".into()))
        );
        let many: Vec<String> = (0..17).map(|i| format!("t{i}")).collect();
        let many: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            check(&labels("", "", &many)),
            Err(LabelError::TooManyTags(17))
        );
    }
}
