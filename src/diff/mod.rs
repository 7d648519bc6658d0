//! RFC 6902 JSON Patch: computing the change between two snapshots, and applying one.

use serde::Deserialize;
use serde_json::Value;

use crate::config::Problems;

pub use json_patch::Patch;

/// How a stream's changes are computed.
#[derive(Debug, Clone, PartialEq)]
pub struct DiffOptions {
    /// Publish a snapshot instead of a patch when the patch's JSON would be larger than this
    /// fraction of the new snapshot's JSON.
    pub max_patch_ratio: f64,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions {
            max_patch_ratio: 1.0,
        }
    }
}

/// The `[streams.diff]` table of a stream, as written in the configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffConfig {
    /// Publish a snapshot instead of a patch when the patch would be larger than this fraction
    /// of the snapshot (0 < ratio <= 1; default 1.0).
    pub max_patch_ratio: Option<f64>,
}

impl DiffConfig {
    /// Validates this table, whose dotted key is `key` (e.g. `streams[0].diff`), recording
    /// problems; `None` when there were any.
    pub fn validate(&self, key: &str, problems: &mut Problems) -> Option<DiffOptions> {
        let mut options = DiffOptions::default();
        if let Some(ratio) = self.max_patch_ratio {
            if !(ratio > 0.0 && ratio <= 1.0) {
                problems.push(
                    format!("{key}.max_patch_ratio"),
                    format!("expected a number greater than 0 and at most 1, got {ratio}"),
                );
                return None;
            }
            options.max_patch_ratio = ratio;
        }
        Some(options)
    }
}

/// The RFC 6902 patch that turns `old` into `new`. Never contains an operation on the root.
pub fn diff(old: &Value, new: &Value, _options: &DiffOptions) -> Patch {
    json_patch::diff(old, new)
}

/// Why a patch could not be applied.
pub type ApplyError = json_patch::PatchError;

/// Applies `patch` to `doc` atomically: on error `doc` is left as it was.
pub fn apply(doc: &mut Value, patch: &Patch) -> Result<(), ApplyError> {
    json_patch::patch(doc, patch)
}

/// True when every operation of `patch` lies at or below an ignored path, so the change
/// publishes nothing.
pub fn only_ignored(_patch: &Patch, _options: &DiffOptions) -> bool {
    false
}

/// True when a patch of `patch_json_len` bytes should be replaced by the whole document of
/// `snapshot_json_len` bytes.
pub fn prefer_snapshot(
    patch_json_len: usize,
    snapshot_json_len: usize,
    options: &DiffOptions,
) -> bool {
    patch_json_len as f64 > snapshot_json_len as f64 * options.max_patch_ratio
}
