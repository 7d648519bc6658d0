//! Problems found in a configuration: every one names the file, the key and what was expected.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem found in a configuration: where it is and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `streams[2].interval` or `server.listen`; empty for problems with
    /// the file as a whole (not found, syntax).
    pub key: String,
    /// What is wrong and what was expected, e.g. `expected a duration between 100ms and 24h, got "0s"`.
    pub message: String,
}

impl fmt::Display for Problem {
    /// `` `key`: message ``, or just the message for problems with the whole file (empty key).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "`{}`: {}", self.key, self.message)
        }
    }
}

/// Every problem found in one configuration, reported together so a user fixes them in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the configuration came from (`None` for configurations built in code).
    pub file: Option<PathBuf>,
    /// At least one problem.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.as_deref().map_or_else(
            || "<built-in configuration>".to_owned(),
            |p| p.display().to_string(),
        );
        match self.problems.as_slice() {
            [one] => write!(f, "{file}: {one}"),
            many => {
                write!(f, "{file}: {} problems:", many.len())?;
                for p in many {
                    write!(f, "\n  - {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Collects problems during validation; validation never stops at the first one.
#[derive(Debug, Default)]
pub struct Problems {
    problems: Vec<Problem>,
}

impl Problems {
    /// Records a problem at `key`.
    pub fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// How many problems were recorded so far.
    pub fn len(&self) -> usize {
        self.problems.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// `Ok(value)` when nothing was recorded, otherwise the collected error for `file`.
    pub fn finish<T>(self, file: Option<&Path>, value: T) -> Result<T, ConfigError> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError {
                file: file.map(Path::to_path_buf),
                problems: self.problems,
            })
        }
    }
}
