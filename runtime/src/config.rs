//! What both daemons' config files share: one error shape, and reading a TOML file whose
//! relative paths are then taken from the file's folder.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a secret file (an API token, a password) could not be used.
#[derive(Debug, Error)]
pub enum SecretError {
    #[error("cannot read {} ({key}): {source}", .path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} ({key}) is empty", .path.display())]
    Empty { key: &'static str, path: PathBuf },
}

/// Reads the secret in the file at `path`, named in errors by its config `key`: surrounding
/// whitespace (a trailing newline) is not part of it, and an empty one is an error.
pub fn read_secret(path: &Path, key: &'static str) -> Result<String, SecretError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
        key,
        path: path.to_owned(),
        source,
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(SecretError::Empty {
            key,
            path: path.to_owned(),
        });
    }
    Ok(secret.to_owned())
}

/// Why a config could not be used. The reason names the key at fault.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `path` is `None` for a config that came from no file (defaults, tests).
    #[error("config{}: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Invalid {
        path: Option<PathBuf>,
        reason: String,
    },
}

impl ConfigError {
    pub fn invalid(reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: None,
            reason: reason.into(),
        }
    }

    /// The same error, said of the file at `path`.
    pub fn in_file(self, file: &Path) -> Self {
        match self {
            ConfigError::Invalid { reason, .. } => ConfigError::Invalid {
                path: Some(file.to_owned()),
                reason,
            },
            read @ ConfigError::Read { .. } => read,
        }
    }
}

/// Reads `path` and parses it with `parse`; errors name the file. Returns the value and the
/// folder relative paths in it are taken from.
pub fn read<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, ConfigError>,
) -> Result<(T, PathBuf), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_owned(),
        source: e,
    })?;
    let value = parse(&text).map_err(|e| e.in_file(path))?;
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok((value, base))
}

/// Parses TOML text; a syntax or type error is an [`ConfigError::Invalid`] with toml's message.
pub fn from_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_when_there_is_one() {
        assert_eq!(
            ConfigError::invalid("x = 3 is bad").to_string(),
            "config: x = 3 is bad"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.toml");
        std::fs::write(&f, "x = ").unwrap();
        let e = read(&f, from_toml::<toml::Table>).unwrap_err().to_string();
        assert!(e.starts_with(&format!("config {}: ", f.display())), "{e}");
        let e = read(&dir.path().join("missing.toml"), from_toml::<toml::Table>)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot read config"), "{e}");
        std::fs::write(&f, "x = 1").unwrap();
        let (t, base) = read(&f, from_toml::<toml::Table>).unwrap();
        assert_eq!((t["x"].as_integer(), base.as_path()), (Some(1), dir.path()));
    }
}
