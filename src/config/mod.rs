//! Configuration: the file's shape, loading (TOML/YAML + environment), and pure validation.
//!
//! Flow: `load` reads a file and environment overrides into `raw::RawConfig` (serde, unknown
//! keys rejected), then `validate` turns it into a [`Config`] or a [`ConfigError`] that lists
//! every problem with its file and key.

mod error;
mod model;

pub use error::{ConfigError, Problem, Problems};
pub use model::*;
