//! Operational events for the people running patchwire: an endpoint disabled, a delivery
//! dead, an endpoint recovered, POSTed to `webhooks.operator_url`, signed the Standard
//! Webhooks way with `webhooks.operator_secret`.
//!
//! The events are durable: each is stored in the outbox when it happens, in the transaction
//! that makes it happen (the attempt's record that kills a delivery or ends an endpoint's
//! failures, the status change that disables or re-enables it), once per key, so a node that
//! repeats the change (another node of a cluster, a retry after a crash) stores nothing more.
//! One sending task per node claims the oldest undelivered event ([`Outbox::operator_head`]),
//! sends it, and records the answer; retried on the webhooks' schedule (`Retry-After`
//! honoured) until delivered or the schedule is exhausted (then it is dead, and logged). A
//! restart, or a SIGKILL, resends what was not recorded as delivered, with the same
//! `webhook-id`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::SeedableRng as _;
use rand::rngs::StdRng;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::body::{DeliveryKind, Mode};
use super::deliver::{AttemptError, Sender};
use super::outbox::{
    AttemptOutcome, Delivery, DeliveryState, EndpointRecord, EndpointStatus, OperatorHead,
    OperatorNote, Outbox, Source,
};
use super::registry::Endpoint;
use super::schedule::RetrySchedule;
use super::sign::{Secret, message_id};
use crate::time::{rfc3339, unix_ms};

/// How long a node's claim on the head event holds against other nodes (a node killed
/// mid-attempt leaves it; another sends it again after this).
const HOLD: Duration = Duration::from_secs(30);

/// How often the sender looks for events when nothing woke it (stored by another node, or a
/// claim that expired).
const POLL: Duration = Duration::from_secs(1);

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

/// Where operational events go: makes the notes the outbox stores (with the changes that
/// cause them), and wakes the sending task once they are stored.
#[derive(Debug, Clone)]
pub struct Operator {
    wake: Arc<Notify>,
    rng: Arc<Mutex<StdRng>>,
}

impl Operator {
    /// `event`, happening now, as a note stored once per `key` (what makes it unique: the
    /// dead delivery and its attempt; the endpoint and the run of failures it ends).
    pub fn note(&self, event: &OperatorEvent, key: String) -> OperatorNote {
        let now = SystemTime::now();
        let at_ms = unix_ms(now);
        let msg_id = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            message_id(at_ms, &mut *rng)
        };
        OperatorNote {
            key: format!("{}:{key}", event.kind()),
            msg_id,
            body: event.body(now).into(),
            at_ms,
        }
    }

    /// Tells the sending task an event was stored.
    pub fn stored(&self) {
        self.wake.notify_one();
    }

    /// An operator receiving at `url`, signed with `secret`, and the task that sends the
    /// events `outbox` holds to it; `owner` names this node's claims.
    pub fn start(
        url: Url,
        secret: Secret,
        schedule: RetrySchedule,
        sender: Sender,
        outbox: Arc<dyn Outbox>,
        owner: Arc<str>,
        shutdown: CancellationToken,
    ) -> (Operator, impl std::future::Future<Output = ()> + Send) {
        let operator = Operator {
            wake: Arc::new(Notify::new()),
            rng: Arc::new(Mutex::new(StdRng::from_os_rng())),
        };
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
        let wake = operator.wake.clone();
        let task = async move {
            match target {
                Ok(target) => {
                    let sending = Sending {
                        outbox,
                        target,
                        schedule,
                        sender,
                        owner,
                        wake,
                    };
                    sending.run(shutdown).await;
                }
                Err(error) => tracing::error!(%error, "cannot send operator events"),
            }
        };
        (operator, task)
    }
}

/// The sending task's parts.
struct Sending {
    outbox: Arc<dyn Outbox>,
    target: Arc<Endpoint>,
    schedule: RetrySchedule,
    sender: Sender,
    owner: Arc<str>,
    wake: Arc<Notify>,
}

impl Sending {
    /// Sends the stored events in order until shutdown: one attempt of the head at a time.
    async fn run(&self, shutdown: CancellationToken) {
        let mut rng = StdRng::from_os_rng();
        loop {
            let now_ms = unix_ms(SystemTime::now());
            let wait = match self
                .outbox
                .operator_head(now_ms, self.owner.clone(), HOLD)
                .await
            {
                Ok(OperatorHead::Due(head)) => {
                    self.attempt(head, &mut rng).await;
                    continue;
                }
                Ok(OperatorHead::Later(at_ms)) => {
                    Duration::from_millis(at_ms.saturating_sub(now_ms))
                        .clamp(Duration::from_millis(10), POLL)
                }
                Ok(OperatorHead::Empty) => POLL,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the stored operator events; retrying");
                    POLL
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One attempt of `head`, recorded (delivered, retried on the schedule, or dead).
    async fn attempt(&self, head: super::outbox::OperatorDelivery, rng: &mut StdRng) {
        let delivery = Delivery {
            id: head.id,
            endpoint: self.target.record.id.clone(),
            stream: String::new(),
            msg_id: head.msg_id,
            kind: DeliveryKind::SNAPSHOT,
            epoch: 0,
            seq: 0,
            base_seq: None,
            body: head.body,
            state: DeliveryState::Pending,
            attempts: head.attempts,
            next_attempt_ms: head.next_attempt_ms,
            last_error: None,
            last_status: None,
            created_ms: head.created_ms,
            finished_ms: None,
        };
        let answer = self.sender.deliver(&self.target, &delivery).await;
        let at_ms = unix_ms(SystemTime::now());
        let outcome = match answer.result {
            Ok(status) => AttemptOutcome::Delivered { status },
            Err(AttemptError::Retry {
                retry_after,
                status,
                message,
            }) => {
                let attempts = head.attempts.saturating_add(1);
                let retry_at_ms = self
                    .schedule
                    .next_delay(attempts, retry_after, rng)
                    .map(|delay| at_ms + u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
                if retry_at_ms.is_none() {
                    tracing::error!(msg_id = %delivery.msg_id, attempts, "operator event not delivered; its retries are exhausted");
                }
                AttemptOutcome::Failed {
                    status,
                    error: message,
                    retry_at_ms,
                }
            }
            Err(error) => {
                tracing::error!(msg_id = %delivery.msg_id, %error, "operator event not delivered");
                AttemptOutcome::Failed {
                    status: None,
                    error: error.to_string(),
                    retry_at_ms: None,
                }
            }
        };
        while let Err(error) = self
            .outbox
            .operator_record(head.id, outcome.clone(), at_ms)
            .await
        {
            if matches!(error, super::outbox::OutboxError::Closed) {
                return;
            }
            // Not recorded: retried, or sent again after a restart (same webhook-id).
            tracing::error!(%error, "cannot record an operator event's attempt; retrying");
            tokio::time::sleep(POLL).await;
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
