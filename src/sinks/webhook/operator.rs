//! Operational events for the people running patchwire: an endpoint disabled, a delivery
//! dead, an endpoint recovered, POSTed to `webhooks.operator_url`, signed the Standard
//! Webhooks way with `webhooks.operator_secret`.
//!
//! The events are kept in memory, not in the outbox: each is sent in order, retried on the
//! webhooks' schedule (`Retry-After` honoured) until delivered or the schedule is exhausted
//! (then logged). A restart loses the events not yet delivered; what they report stays in
//! the outbox (the endpoint's status, its dead letters, the attempt history).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::body::Mode;
use super::deliver::{AttemptError, Sender};
use super::outbox::{Delivery, DeliveryState, EndpointRecord, EndpointStatus, Source};
use super::registry::Endpoint;
use super::schedule::RetrySchedule;
use super::sign::{Secret, message_id};
use crate::time::{rfc3339, unix_ms};

/// How many events wait at most; beyond, new ones are logged and dropped (a receiver down for
/// long while thousands of deliveries die).
pub const QUEUE: usize = 10_000;

/// One operational event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorEvent {
    /// `endpoint.disabled`: the endpoint receives nothing until re-enabled.
    EndpointDisabled {
        /// The endpoint.
        endpoint: String,
        /// The stream and `webhook-id` of the delivery whose attempt disabled it, if one did.
        delivery: Option<(String, String)>,
        /// Why.
        reason: String,
    },
    /// `delivery.dead`: a delivery's schedule is exhausted (or its target refused); a snapshot
    /// follows it.
    DeliveryDead {
        /// The endpoint.
        endpoint: String,
        /// The stream.
        stream: String,
        /// The delivery's `webhook-id`.
        webhook_id: String,
        /// The last attempt's error.
        reason: String,
    },
    /// `endpoint.recovered`: re-enabled, or its first delivery after failures succeeded.
    EndpointRecovered {
        /// The endpoint.
        endpoint: String,
        /// The stream and `webhook-id` of the delivery that succeeded, if one did.
        delivery: Option<(String, String)>,
        /// How.
        reason: String,
    },
}

#[derive(Serialize)]
struct Data<'a> {
    endpoint: &'a str,
    stream: Option<&'a str>,
    webhook_id: Option<&'a str>,
    reason: &'a str,
}

#[derive(Serialize)]
struct EventJson<'a> {
    schema: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    timestamp: String,
    data: Data<'a>,
}

impl OperatorEvent {
    /// Its `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            OperatorEvent::EndpointDisabled { .. } => "endpoint.disabled",
            OperatorEvent::DeliveryDead { .. } => "delivery.dead",
            OperatorEvent::EndpointRecovered { .. } => "endpoint.recovered",
        }
    }

    /// The body (`patchwire.operator.v1`): `{"schema", "type", "timestamp", "data":
    /// {"endpoint", "stream", "webhook_id", "reason"}}` (`stream` and `webhook_id` `null` when
    /// no delivery is involved).
    pub fn body(&self, at: SystemTime) -> Vec<u8> {
        let data = match self {
            OperatorEvent::EndpointDisabled {
                endpoint,
                delivery,
                reason,
            }
            | OperatorEvent::EndpointRecovered {
                endpoint,
                delivery,
                reason,
            } => Data {
                endpoint,
                stream: delivery.as_ref().map(|(s, _)| s.as_str()),
                webhook_id: delivery.as_ref().map(|(_, id)| id.as_str()),
                reason,
            },
            OperatorEvent::DeliveryDead {
                endpoint,
                stream,
                webhook_id,
                reason,
            } => Data {
                endpoint,
                stream: Some(stream),
                webhook_id: Some(webhook_id),
                reason,
            },
        };
        let json = EventJson {
            schema: crate::schemas::OPERATOR,
            kind: self.kind(),
            timestamp: rfc3339(at),
            data,
        };
        // Plain strings and numbers: serializing cannot fail.
        serde_json::to_vec(&json).unwrap_or_default()
    }
}

/// Where operational events go: a handle that queues them for the sending task.
#[derive(Debug, Clone)]
pub struct Operator {
    queue: mpsc::Sender<OperatorEvent>,
}

impl Operator {
    /// Queues `event`, never waiting; a full queue (or a stopped sender) drops it, with a log
    /// line.
    pub fn notify(&self, event: OperatorEvent) {
        match self.queue.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                tracing::warn!(?event, "operator event queue full; event dropped");
            }
            Err(mpsc::error::TrySendError::Closed(event)) => {
                tracing::debug!(?event, "operator events stopped (shutdown); event dropped");
            }
        }
    }

    /// An operator receiving at `url`, signed with `secret`, and the task that sends to it.
    pub fn start(
        url: Url,
        secret: Secret,
        schedule: RetrySchedule,
        sender: Sender,
        shutdown: CancellationToken,
    ) -> (Operator, impl std::future::Future<Output = ()> + Send) {
        let (queue, events) = mpsc::channel(QUEUE);
        let record = EndpointRecord {
            id: "operator".into(),
            url: url.to_string(),
            streams: Vec::new(),
            mode: Mode::Snapshot,
            headers: BTreeMap::new(),
            secret: secret.expose().to_owned(),
            previous_secret: None,
            previous_expires_ms: None,
            source: Source::Config,
            created_ms: 0,
            description: None,
            metadata: BTreeMap::new(),
            rate_limit: None,
            events: Default::default(),
            format: Default::default(),
            request_hash: None,
            view_filters: Default::default(),
        };
        let target = Endpoint::new(record, EndpointStatus::default()).map(Arc::new);
        let task = async move {
            match target {
                Ok(target) => send_all(events, &target, &schedule, &sender, shutdown).await,
                Err(error) => tracing::error!(%error, "cannot send operator events"),
            }
        };
        (Operator { queue }, task)
    }
}

/// Sends each event in turn, retrying on `schedule`, until shutdown.
async fn send_all(
    mut events: mpsc::Receiver<OperatorEvent>,
    target: &Endpoint,
    schedule: &RetrySchedule,
    sender: &Sender,
    shutdown: CancellationToken,
) {
    let mut rng = StdRng::from_os_rng();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        let now = SystemTime::now();
        let delivery = Delivery {
            id: 0,
            endpoint: target.record.id.clone(),
            stream: String::new(),
            msg_id: message_id(unix_ms(now), &mut rng),
            kind: crate::wire::ChangeKind::Snapshot,
            epoch: 0,
            seq: 0,
            base_seq: None,
            body: Bytes::from(event.body(now)),
            state: DeliveryState::Pending,
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
            last_status: None,
            created_ms: unix_ms(now),
            finished_ms: None,
        };
        let mut attempts = 0;
        loop {
            let answer = sender.deliver(target, &delivery).await;
            let retry_after = match answer.result {
                Ok(_) => break,
                Err(AttemptError::Retry { retry_after, .. }) => retry_after,
                Err(error) => {
                    tracing::error!(kind = event.kind(), %error, "operator event not delivered");
                    break;
                }
            };
            attempts += 1;
            let Some(delay) = schedule.next_delay(attempts, retry_after, &mut rng) else {
                tracing::error!(
                    kind = event.kind(),
                    attempts,
                    "operator event not delivered; its retries are exhausted"
                );
                break;
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay.max(Duration::from_millis(10))) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use std::time::UNIX_EPOCH;

    #[test]
    fn bodies_name_the_event_endpoint_stream_message_and_reason() {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let dead = OperatorEvent::DeliveryDead {
            endpoint: "e".into(),
            stream: "fleet".into(),
            webhook_id: "msg_1".into(),
            reason: "the receiver answered 500".into(),
        };
        let body: Value = serde_json::from_slice(&dead.body(at)).unwrap();
        assert_eq!(
            body,
            json!({"schema": "patchwire.operator.v1", "type": "delivery.dead", "timestamp": "2023-11-14T22:13:20.000Z",
                   "data": {"endpoint": "e", "stream": "fleet", "webhook_id": "msg_1",
                            "reason": "the receiver answered 500"}})
        );
        let recovered = OperatorEvent::EndpointRecovered {
            endpoint: "e".into(),
            delivery: None,
            reason: "re-enabled".into(),
        };
        let body: Value = serde_json::from_slice(&recovered.body(at)).unwrap();
        assert_eq!(body["type"], "endpoint.recovered");
        assert_eq!(body["data"]["stream"], Value::Null);
        let disabled = OperatorEvent::EndpointDisabled {
            endpoint: "e".into(),
            delivery: Some(("fleet".into(), "msg_2".into())),
            reason: "410".into(),
        };
        let body: Value = serde_json::from_slice(&disabled.body(at)).unwrap();
        assert_eq!(body["type"], "endpoint.disabled");
        assert_eq!(body["data"]["webhook_id"], "msg_2");
    }
}
