//! The one error for a configuration file, the agent's and the
//! coordinator's alike, and the two steps they share: reading the file and
//! parsing its TOML. Each program checks its own keys' values and names the
//! key in [`ConfigError::Invalid`].

use std::path::{Path, PathBuf};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML is malformed, or a key is unknown or of the wrong type.
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    /// A key parsed but its value cannot be used.
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The file's text.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// TOML `text` as `T`; `origin` (the file, or what else the text came
/// from) names it in errors.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        origin: origin.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct T {
        #[allow(dead_code)]
        a: u32,
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let e = read(Path::new("/nonexistent/warden.toml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read config file /nonexistent/warden.toml: "),
            "{e}"
        );
        let e = parse_toml::<T>("b = 1", "x.toml").unwrap_err();
        assert!(e.to_string().starts_with("config x.toml: "), "{e}");
        assert!(e.to_string().contains("unknown field `b`"), "{e}");
        let e = ConfigError::Invalid {
            key: "a",
            reason: "must be longer than zero".into(),
        };
        assert_eq!(e.to_string(), "config key `a`: must be longer than zero");
    }
}
