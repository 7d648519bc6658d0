//! Configuration: the file's shape, loading (TOML/YAML + environment), and the orchestration of
//! pure validation.
//!
//! Flow: `load` reads a file and `PATCHWIRE__*` environment overrides into `raw::RawConfig`
//! (serde, unknown keys rejected, key paths kept for messages), then `validate` turns it into a
//! [`Config`] or a [`ConfigError`] that lists every problem with its file and key. `describe`
//! summarizes a valid [`Config`] for `patchwire check`.
//!
//! Each component owns its section: its raw shape, defaults and bounds, validation and settings
//! (`upstream::config`, `proxy::config`, `sinks::webhook::config`, `diff::DiffConfig`,
//! `sim::SimulatorConfig`), written with the checks of `crate::validation`. This module
//! assembles them, owns the sections of the application itself (`[server]`, `[log]`,
//! `[push]`) and what spans sections (stream names, push streams, listeners that overlap).
//! `config/default.toml` documents every key with its default; a test holds it to the code.

pub mod changes;
mod de;
mod describe;
mod load;
mod model;
pub mod raw;
mod validate;

#[cfg(test)]
mod tests;

// What loading returns: a configuration's problems, with its file.
pub use crate::validation::{ConfigError, Problem};
pub use describe::describe;
pub use load::{
    ENV_PREFIX, ENV_SEPARATOR, FileKind, MAX_OVERRIDE_INDEX, load, load_raw, load_with, parse_raw,
};
pub use model::*;
pub use raw::RawConfig;
pub use validate::{defaults, limits, validate};
