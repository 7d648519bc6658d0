//! A node's local copy of a stream follows the log: changes appended in order, a reload when
//! the log cannot be followed, failures as the holder reported them. The hub's `Stream` is the
//! copy; these functions translate the log's terms into its.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::Value;

use super::message::LoggedChange;
use super::store::Loaded;
use crate::diff;
use crate::hub::{Diverged, Stream};
use crate::wire::ChangeKind;

/// The epoch and top of the local copy, `None` while it has no document (a node that has not
/// loaded the stream yet: any log is ahead of it).
pub fn position(stream: &Stream) -> Option<(u64, u64)> {
    let (epoch, seq) = stream.position();
    (seq > 0 && stream.snapshot().is_some()).then_some((epoch, seq))
}

/// Appends the logged change after the local top (one already here is ignored).
pub fn apply(stream: &Stream, change: &LoggedChange) -> Result<(), Diverged> {
    stream
        .apply_logged(
            change.epoch,
            change.seq,
            change.kind,
            change.payload.clone(),
            time_of(change.at_ms),
        )
        .map(|_| ())
}

/// Replaces the local copy with the log's state: the stored document with the changes after
/// it applied, and the changes history keeps for resuming subscribers.
pub fn reset(stream: &Stream, loaded: &Loaded) -> Result<(), Diverged> {
    // The local copy may have reached this point meanwhile (this node's writer started the
    // epoch while the follower was loading it): subscribers have it, and starting over would
    // send them the same snapshot twice, or take them back.
    if position(stream).is_some_and(|(epoch, seq)| epoch == loaded.epoch && seq >= loaded.seq) {
        health(stream, loaded.failure.as_ref());
        return Ok(());
    }
    let stored = loaded
        .document
        .as_ref()
        .ok_or_else(|| Diverged::Invalid("the log's document is missing".into()))?;
    let mut document: Value = serde_json::from_slice(stored)
        .map_err(|e| Diverged::Invalid(format!("the log's document: {e}")))?;
    let mut at = SystemTime::UNIX_EPOCH;
    let mut seq = loaded.snap_seq;
    for change in loaded.changes.iter().filter(|c| c.seq > loaded.snap_seq) {
        if change.seq != seq + 1 {
            return Err(Diverged::Invalid(format!(
                "the log skips from {seq} to {}",
                change.seq
            )));
        }
        match change.kind {
            ChangeKind::Snapshot => {
                document = serde_json::from_slice(&change.payload)
                    .map_err(|e| Diverged::Invalid(format!("snapshot {}: {e}", change.seq)))?;
            }
            ChangeKind::Patch => {
                let patch: json_patch::Patch = serde_json::from_slice(&change.payload)
                    .map_err(|e| Diverged::Invalid(format!("patch {}: {e}", change.seq)))?;
                diff::apply(&mut document, &patch)
                    .map_err(|e| Diverged::Invalid(format!("patch {}: {e}", change.seq)))?;
            }
        }
        seq = change.seq;
        at = time_of(change.at_ms);
    }
    if seq != loaded.seq {
        return Err(Diverged::Invalid(format!(
            "the log ends at {seq}, its top is {}",
            loaded.seq
        )));
    }
    if at == SystemTime::UNIX_EPOCH {
        at = loaded
            .changes
            .last()
            .map_or_else(SystemTime::now, |c| time_of(c.at_ms));
    }
    let history: Vec<_> = loaded
        .changes
        .iter()
        .map(|c| stream.logged_change(c.epoch, c.seq, c.kind, c.payload.clone(), time_of(c.at_ms)))
        .collect();
    stream.reset(loaded.epoch, loaded.seq, document, at, history);
    health(stream, loaded.failure.as_ref());
    Ok(())
}

/// The upstream's state as the holder reported it: a failure (its JSON), or `None` when it
/// answers.
pub fn health(stream: &Stream, failure: Option<&Bytes>) {
    let Some(json) = failure else {
        stream.recover();
        return;
    };
    let failure: Value = serde_json::from_slice(json).unwrap_or(Value::Null);
    let status = failure
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .unwrap_or(502);
    let cause = known_cause(failure.get("cause").and_then(Value::as_str).unwrap_or(""));
    let message = failure
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("the upstream failed")
        .to_owned();
    let retry_in = Duration::from_millis(
        failure
            .get("retry_in_ms")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    );
    stream.fail(status, cause, message, retry_in);
}

/// The JSON a holder stores for a failure, which [`health`] reads on every node.
pub fn failure_json(status: u16, cause: &str, message: &str, retry_in: Duration) -> Vec<u8> {
    serde_json::json!({
        "status": status,
        "cause": cause,
        "message": message,
        "retry_in_ms": u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
    })
    .to_string()
    .into_bytes()
}

/// The causes subscribers may be told (`FetchError::cause` and the proxy's), as the static
/// strings events carry; anything else (a newer node's cause) is told as unavailable.
fn known_cause(cause: &str) -> &'static str {
    const KNOWN: [&str; 6] = [
        "upstream-timeout",
        "upstream-status",
        "upstream-invalid",
        "upstream-unavailable",
        "redirect-refused",
        "evicted",
    ];
    KNOWN
        .iter()
        .find(|k| **k == cause)
        .copied()
        .unwrap_or("upstream-unavailable")
}

/// A time in ms since the Unix epoch.
pub fn time_of(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Finds the local copy of a stream by name: configured streams in the hub, dynamic ones in
/// the proxy's registry.
pub trait Replicas: Send + Sync {
    /// The stream named `name`, if this node serves it now.
    fn get(&self, name: &str) -> Option<Arc<Stream>>;
    /// Every stream this node serves now.
    fn all(&self) -> Vec<Arc<Stream>>;
}
