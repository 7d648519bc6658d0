//! NATS JetStream: each stream's messages on its subject, in a JetStream stream created (or
//! verified) at start; `Nats-Msg-Id` is the event id, so JetStream drops a message published
//! twice within its duplicate window; the last message of a subject is read back with a
//! direct get.
//!
//! **The fence.** Each publish says which message it follows on its subject
//! (`Nats-Expected-Last-Subject-Sequence`: the JetStream sequence of the subject's last
//! message, as read back or acknowledged), and JetStream refuses it if another publisher wrote
//! to the subject since: two nodes around a cluster handover can never interleave their lines.
//! A refused publish is [`BrokerError::Overtaken`]: the publisher reads the last message back
//! and resumes from it. In a cluster ([`Fence::Every`]) every message is fenced, so a batch is
//! sent one message at a time (the next one's fence is the previous one's acknowledgement);
//! on a single node ([`Fence::First`]) only the first message of each batch is, and the rest
//! are pipelined.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::stream::{
    Config as StreamConfig, DirectGetErrorKind, DiscardPolicy, LastRawMessageErrorKind,
    RetentionPolicy, StorageType,
};
use async_nats::jetstream::{self, Context};
use tokio::sync::OnceCell;

use super::config::{NatsSettings, Storage, shown_url};
use super::message::{Message, Position};
use super::{Acked, Broker, BrokerError, BrokerFuture};

/// The header JetStream removes duplicates by.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// The header that makes JetStream store a message only if the subject's last message has this
/// stream sequence (`0`: the subject holds none).
pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";

/// Which messages of a batch are fenced (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// The first of each batch; the rest are pipelined (one publisher per subject: a single
    /// node).
    First,
    /// Every message, one at a time (a cluster, where a handover may leave a second publisher
    /// with a batch in flight).
    Every,
}

/// A NATS JetStream broker.
pub struct Nats {
    settings: NatsSettings,
    /// The subjects the sink publishes to, which the JetStream stream must take.
    subjects: Vec<String>,
    timeout: Duration,
    context: OnceCell<Context>,
    /// Whether the stream answers direct gets (set when it was created or verified).
    direct: std::sync::atomic::AtomicBool,
    fence: Fence,
    /// Per subject, the JetStream sequence of its last message as last read back or
    /// acknowledged: the next publish's fence.
    last: std::sync::Mutex<HashMap<String, u64>>,
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("NATS: {what}: {error}"))
}

impl Nats {
    /// A broker on `settings`' server for `subjects`, fencing publishes as `fence` says; the
    /// connection is made on first use.
    pub fn connect(
        settings: NatsSettings,
        subjects: Vec<String>,
        timeout: Duration,
        fence: Fence,
    ) -> Nats {
        Nats {
            settings,
            subjects,
            timeout,
            context: OnceCell::new(),
            direct: std::sync::atomic::AtomicBool::new(false),
            fence,
            last: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn fence_of(&self, subject: &str) -> Option<u64> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(subject)
            .copied()
    }

    fn set_fence(&self, subject: &str, sequence: Option<u64>) {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match sequence {
            Some(sequence) => last.insert(subject.to_owned(), sequence),
            None => last.remove(subject),
        };
    }

    async fn context(&self) -> Result<&Context, BrokerError> {
        self.context
            .get_or_try_init(|| async {
                // Once connected, the client reconnects by itself for as long as it lives.
                let client = async_nats::ConnectOptions::new()
                    .name("patchwire")
                    .connection_timeout(self.timeout)
                    .request_timeout(Some(self.timeout))
                    .connect(self.settings.url.as_str())
                    .await
                    .map_err(|e| {
                        unavailable(
                            &format!("cannot connect to {}", shown_url(&self.settings.url)),
                            e,
                        )
                    })?;
                Ok(jetstream::new(client))
            })
            .await
    }

    /// The JetStream stream the sink creates when it is missing.
    fn stream_config(&self) -> StreamConfig {
        StreamConfig {
            name: self.settings.jetstream.clone(),
            subjects: self.subjects.clone(),
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            storage: match self.settings.storage {
                Storage::File => StorageType::File,
                Storage::Memory => StorageType::Memory,
            },
            num_replicas: self.settings.replicas,
            max_age: self.settings.max_age,
            max_bytes: i64::try_from(self.settings.max_bytes).unwrap_or(i64::MAX),
            max_messages_per_subject: i64::try_from(self.settings.max_messages_per_subject)
                .unwrap_or(i64::MAX),
            duplicate_window: self.settings.duplicate_window,
            allow_direct: true,
            ..StreamConfig::default()
        }
    }

    async fn prepare_stream(&self) -> Result<(), BrokerError> {
        let context = self.context().await?;
        let name = &self.settings.jetstream;
        let wanted = self.stream_config();
        match context.get_stream(name).await {
            Ok(stream) => {
                let existing = stream.cached_info().config.clone();
                let conflicts = conflicts(&existing, &wanted);
                if !conflicts.is_empty() {
                    return Err(BrokerError::Conflict(format!(
                        "the JetStream stream {name:?} exists with settings that conflict with \
                         the sink's: {}. Change the stream (`nats stream edit {name}`) or set \
                         these keys of the sink to the stream's values",
                        conflicts.join("; ")
                    )));
                }
                let missing: Vec<String> = wanted
                    .subjects
                    .iter()
                    .filter(|s| !existing.subjects.iter().any(|p| subject_matches(p, s)))
                    .cloned()
                    .collect();
                if !missing.is_empty() {
                    let mut updated = existing.clone();
                    updated.subjects.extend(missing.iter().cloned());
                    context.update_stream(updated).await.map_err(|e| {
                        BrokerError::Conflict(format!(
                            "the JetStream stream {name:?} does not take the subjects {} and \
                             adding them failed: {e}",
                            missing.join(", ")
                        ))
                    })?;
                    tracing::info!(jetstream = %name, subjects = ?missing, "subjects added to the JetStream stream");
                }
                self.direct
                    .store(existing.allow_direct, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                let not_found = matches!(
                    error.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                );
                if !not_found {
                    return Err(unavailable(&format!("stream info of {name:?}"), error));
                }
                context.create_stream(wanted).await.map_err(|e| {
                    // The server refusing a valid configuration (subjects taken by another
                    // stream, replicas beyond the cluster) will refuse it again.
                    match e.kind() {
                        jetstream::context::CreateStreamErrorKind::JetStream(_) => {
                            BrokerError::Conflict(format!(
                                "cannot create the JetStream stream {name:?}: {e}"
                            ))
                        }
                        _ => unavailable(&format!("cannot create the stream {name:?}"), e),
                    }
                })?;
                tracing::info!(jetstream = %name, "JetStream stream created");
                self.direct
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
        }
    }

    async fn last_of(&self, subject: &str, stream: &str) -> Result<Option<Position>, BrokerError> {
        let context = self.context().await?;
        let handle = context
            .get_stream_no_info(&self.settings.jetstream)
            .await
            .map_err(|e| unavailable("stream", e))?;
        let message = if self.direct.load(std::sync::atomic::Ordering::Relaxed) {
            match handle.direct_get_last_for_subject(subject).await {
                Ok(message) => message,
                Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => {
                    self.set_fence(subject, Some(0));
                    return Ok(None);
                }
                Err(e) => return Err(self.gone(subject, e).await),
            }
        } else {
            match handle.get_last_raw_message_by_subject(subject).await {
                Ok(message) => message,
                Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {
                    self.set_fence(subject, Some(0));
                    return Ok(None);
                }
                Err(e) => return Err(self.gone(subject, e).await),
            }
        };
        self.set_fence(subject, Some(message.sequence));
        let id = message
            .headers
            .get("ce-id")
            .or_else(|| message.headers.get(MSG_ID))
            .map(|v| v.as_str().to_owned());
        let position = id.as_deref().and_then(|id| Position::of_id(stream, id));
        if position.is_none() {
            tracing::warn!(
                subject,
                "the last message on the subject is not one of the stream's; starting the stream over with a snapshot"
            );
        }
        Ok(position)
    }

    /// The error of a failed read-back; first the JetStream stream is created or verified
    /// again, in case it was deleted (the next read-back then finds it empty, and the
    /// publisher resyncs with a document).
    async fn gone(&self, subject: &str, error: impl std::fmt::Display) -> BrokerError {
        if let Err(BrokerError::Conflict(conflict)) = self.prepare_stream().await {
            return BrokerError::Conflict(conflict);
        }
        unavailable(&format!("last message on {subject}"), error)
    }

    async fn publish_all(&self, subject: &str, messages: &[Message]) -> Result<Acked, BrokerError> {
        let context = self.context().await?;
        let mut acked = Acked::default();
        let mut pending = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert(MSG_ID, message.id.as_str());
            for (name, value) in message.attributes() {
                headers.insert(name, value.as_str());
            }
            let fenced = i == 0 || self.fence == Fence::Every;
            if fenced && let Some(expected) = self.fence_of(subject) {
                headers.insert(
                    EXPECTED_LAST_SUBJECT_SEQUENCE,
                    expected.to_string().as_str(),
                );
            }
            let size = message.payload.len();
            let ack = context
                .publish_with_headers(subject.to_owned(), headers, message.payload.clone())
                .await
                .map_err(|e| self.refused(subject, message, size, &e))?;
            if self.fence == Fence::Every {
                self.settle(subject, message, ack.await, &mut acked)?;
            } else {
                pending.push((message, ack));
            }
        }
        for (message, ack) in pending {
            self.settle(subject, message, ack.await, &mut acked)?;
        }
        Ok(acked)
    }

    /// Records what JetStream answered for `message`: its sequence is the next fence.
    fn settle(
        &self,
        subject: &str,
        message: &Message,
        answer: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
        acked: &mut Acked,
    ) -> Result<(), BrokerError> {
        match answer {
            Ok(ack) => {
                if ack.duplicate {
                    acked.duplicates += 1;
                }
                // A duplicate's sequence is the stored original's: the next message follows
                // it, and if anyone wrote after it the fence refuses the next one, as it should.
                self.set_fence(subject, Some(ack.sequence));
                Ok(())
            }
            Err(e) => Err(self.refused(subject, message, message.payload.len(), &e)),
        }
    }

    /// The error of a publish JetStream or the client refused.
    fn refused(
        &self,
        subject: &str,
        message: &Message,
        size: usize,
        error: &jetstream::context::PublishError,
    ) -> BrokerError {
        use jetstream::context::PublishErrorKind;
        match error.kind() {
            PublishErrorKind::WrongLastSequence => {
                self.set_fence(subject, None);
                BrokerError::Overtaken(format!(
                    "NATS: another publisher wrote to {subject} before {}: resuming from the \
                     subject's last message",
                    message.id
                ))
            }
            PublishErrorKind::MaxPayloadExceeded => BrokerError::TooLarge(format!(
                "NATS: {} ({size} bytes of payload, with its headers) is over the server's \
                 max_payload ({}); it is retried until the server's max_payload is raised or \
                 the document shrinks",
                message.id,
                context_max_payload(self.context.get())
            )),
            _ => unavailable(&format!("publish {}", message.id), error),
        }
    }
}

/// The server's `max_payload` as the client knows it, for messages.
fn context_max_payload(context: Option<&Context>) -> String {
    context.map_or_else(
        || "unknown".to_owned(),
        |c| format!("{} bytes", c.client().server_info().max_payload),
    )
}

impl Broker for Nats {
    fn prepare(&self) -> BrokerFuture<'_, ()> {
        Box::pin(self.prepare_stream())
    }

    fn last<'a>(
        &'a self,
        destination: &'a str,
        stream: &'a str,
    ) -> BrokerFuture<'a, Option<Position>> {
        Box::pin(self.last_of(destination, stream))
    }

    fn publish<'a>(
        &'a self,
        destination: &'a str,
        messages: &'a [Message],
    ) -> BrokerFuture<'a, Acked> {
        Box::pin(self.publish_all(destination, messages))
    }
}

/// The settings of an existing stream that conflict with those the sink would create it with,
/// each saying both values. Only what the sink relies on or sets is compared: retention
/// (limits, or acknowledged messages could vanish and the last one could not be read back),
/// discard (old, or a full stream refuses every publish), storage, replicas, the limits and
/// the duplicate window.
pub fn conflicts(existing: &StreamConfig, wanted: &StreamConfig) -> Vec<String> {
    let mut found = Vec::new();
    if existing.retention != RetentionPolicy::Limits {
        found.push(format!(
            "retention is {:?}, the sink needs Limits (with another policy the broker deletes \
             messages once consumed and the sink cannot read its position back)",
            existing.retention
        ));
    }
    if existing.discard != DiscardPolicy::Old {
        found.push(format!(
            "discard is {:?}, the sink needs Old (a full stream would refuse every message)",
            existing.discard
        ));
    }
    if existing.storage != wanted.storage {
        found.push(format!(
            "storage is {:?}, `storage` says {:?}",
            existing.storage, wanted.storage
        ));
    }
    if existing.num_replicas.max(1) != wanted.num_replicas {
        found.push(format!(
            "replicas is {}, `replicas` says {}",
            existing.num_replicas, wanted.num_replicas
        ));
    }
    if existing.max_age != wanted.max_age {
        found.push(format!(
            "max_age is {}, `max_age` says {}",
            humantime::format_duration(existing.max_age),
            humantime::format_duration(wanted.max_age)
        ));
    }
    if existing.max_bytes != wanted.max_bytes {
        found.push(format!(
            "max_bytes is {}, `max_bytes` says {}",
            existing.max_bytes, wanted.max_bytes
        ));
    }
    if existing.max_messages_per_subject != wanted.max_messages_per_subject {
        found.push(format!(
            "max_messages_per_subject is {}, `max_messages_per_subject` says {}",
            existing.max_messages_per_subject, wanted.max_messages_per_subject
        ));
    }
    if existing.duplicate_window != wanted.duplicate_window {
        found.push(format!(
            "duplicate_window is {}, `duplicate_window` says {}",
            humantime::format_duration(existing.duplicate_window),
            humantime::format_duration(wanted.duplicate_window)
        ));
    }
    found
}

/// Whether NATS subject `pattern` (with `*` for one token, `>` for one or more at the end)
/// matches `subject`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for part in pattern.split('.') {
        match (part, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (part, Some(token)) if part == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_as_nats_matches_them() {
        assert!(subject_matches("patchwire.fleet", "patchwire.fleet"));
        assert!(subject_matches("patchwire.*", "patchwire.fleet"));
        assert!(subject_matches("patchwire.>", "patchwire.a.b"));
        assert!(subject_matches(">", "a"));
        assert!(!subject_matches("patchwire.*", "patchwire.a.b"));
        assert!(!subject_matches("patchwire.>", "patchwire"));
        assert!(!subject_matches("patchwire.fleet", "patchwire.fleet.x"));
        assert!(!subject_matches("patchwire.fleet.x", "patchwire.fleet"));
    }

    #[test]
    fn conflicts_name_both_values() {
        let nats = Nats::connect(
            NatsSettings {
                url: "nats://127.0.0.1:4222".into(),
                jetstream: "PATCHWIRE".into(),
                storage: Storage::File,
                replicas: 1,
                max_age: Duration::from_secs(3600),
                max_bytes: 1 << 20,
                max_messages_per_subject: 10,
                duplicate_window: Duration::from_secs(60),
            },
            vec!["patchwire.fleet".into()],
            Duration::from_secs(1),
            Fence::First,
        );
        let wanted = nats.stream_config();
        assert!(conflicts(&wanted, &wanted).is_empty());
        let mut existing = wanted.clone();
        existing.max_age = Duration::from_secs(60);
        existing.retention = RetentionPolicy::WorkQueue;
        existing.storage = StorageType::Memory;
        let found = conflicts(&existing, &wanted).join("\n");
        assert!(
            found.contains("max_age is 1m, `max_age` says 1h"),
            "{found}"
        );
        assert!(found.contains("retention is WorkQueue"), "{found}");
        assert!(
            found.contains("storage is Memory, `storage` says File"),
            "{found}"
        );
    }
}
