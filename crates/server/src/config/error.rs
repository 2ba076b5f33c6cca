//! Why a configuration could not be loaded, and where the value at fault came from.

use std::fmt;
use std::io;
use std::path::PathBuf;

use super::{section_keys, Origin, SECTIONS};

/// Why a configuration could not be loaded.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The configuration file is not valid TOML.
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line and column.
        message: String,
    },
    /// The configuration file has a section herald does not know.
    UnknownSection {
        /// The file.
        path: PathBuf,
        /// The section's name.
        section: String,
    },
    /// The configuration file has a key herald does not know in a known section.
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The section.
        section: String,
        /// The key.
        key: String,
    },
    /// A value is of the wrong type or out of range.
    Invalid {
        /// Where the value came from; `None` for a [`Config`](super::Config) built in code and checked with
        /// [`Config::validate`](super::Config::validate).
        origin: Option<Origin>,
        /// `section.key`.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

impl ConfigError {
    /// The setting the error is about, as `section.key` (or the section alone), if it is about one.
    pub fn key(&self) -> Option<String> {
        match self {
            ConfigError::Read { .. } | ConfigError::Syntax { .. } => None,
            ConfigError::UnknownSection { section, .. } => Some(section.clone()),
            ConfigError::UnknownKey { section, key, .. } => Some(format!("{section}.{key}")),
            ConfigError::Invalid { key, .. } => Some(key.clone()),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, error } => {
                write!(f, "cannot read config file {}: {error}", path.display())
            }
            ConfigError::Syntax { path, message } => {
                write!(f, "config file {} is not valid TOML: {message}", path.display())
            }
            ConfigError::UnknownSection { path, section } => {
                let known: Vec<&str> = SECTIONS.iter().map(|(name, _)| *name).collect();
                write!(
                    f,
                    "config file {}: unknown section [{section}] (known sections: {})",
                    path.display(),
                    known.join(", ")
                )
            }
            ConfigError::UnknownKey { path, section, key } => {
                let known = section_keys(section).unwrap_or(&[]);
                write!(
                    f,
                    "config file {}: unknown key {section}.{key} (known keys of [{section}]: {})",
                    path.display(),
                    known.join(", ")
                )
            }
            ConfigError::Invalid { origin: Some(Origin::File(path)), key, problem } => {
                write!(f, "config file {}: {key}: {problem}", path.display())
            }
            ConfigError::Invalid { origin: Some(origin), key, problem } => {
                write!(f, "{origin} ({key}): {problem}")
            }
            ConfigError::Invalid { origin: None, key, problem } => write!(f, "{key}: {problem}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { error, .. } => Some(error),
            _ => None,
        }
    }
}
