//! The vocabulary every configuration section is validated in: problems recorded at their key
//! path, the checks the sections share (durations, sizes, counts and fractions within bounds,
//! names, header names, socket addresses), `${VAR}` interpolation, and the JSON Schema files
//! a stream's `schema` key names (`schema_file`: read and checked where they are named).
//!
//! This is the bottom layer of configuration: it imports nothing from the crate, so that each
//! component validates its own section beside its code (`diff`, `sim`, `upstream`, `proxy`,
//! `sinks::webhook`) without importing `config`, which assembles the sections into the
//! file's shape, loads it and calls each section's validation.

mod checks;
pub mod interpolate;
mod problems;
pub mod schema_file;

pub use checks::{
    BYTES_EXPECTED, DURATION_EXPECTED, HEADER_VALUE_EXPECTED, MANAGED_HEADERS, NAME_EXPECTED,
    bytes_in, duration_in, fmt_bytes, fmt_duration, fraction, header_key, header_name, integer_in,
    is_valid_name, nonzero_u32, socket_address, usize_of,
};
pub use interpolate::{InterpolateError, interpolate, references};
pub use problems::{ConfigError, Problem, Problems};
