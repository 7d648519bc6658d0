//! Configuration: the file's shape, loading (TOML/YAML + environment), and pure validation.
//!
//! Flow: `load` reads a file and `PATCHWIRE__*` environment overrides into `raw::RawConfig`
//! (serde, unknown keys rejected, key paths kept for messages), then `validate` turns it into a
//! [`Config`] or a [`ConfigError`] that lists every problem with its file and key. `describe`
//! summarizes a valid [`Config`] for `patchwire check`; `webhooks` and `proxy` validate their
//! own sections. `config/default.toml` documents every
//! key with its default.

mod de;
mod describe;
mod load;
mod model;
pub mod raw;
mod validate;

#[cfg(test)]
mod tests;

pub use crate::validation::interpolate;
pub use crate::validation::{ConfigError, Problem};
pub use describe::describe;
pub use load::{
    ENV_PREFIX, ENV_SEPARATOR, FileKind, MAX_OVERRIDE_INDEX, load, load_raw, load_with, parse_raw,
};
pub use model::*;
pub use raw::RawConfig;
pub use validate::{defaults, limits, validate};
