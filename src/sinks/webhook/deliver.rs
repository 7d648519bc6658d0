//! One attempt at one delivery: the signed request (pure), sending it, and what the answer
//! means (pure). An attempt ends in an [`AttemptError`] typed by what the worker must do next
//! (retry, perhaps after `Retry-After`; disable the endpoint; give up at once); nothing here
//! calls the outbox, the registry or the schedule.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, StatusCode, header};

use bytes::Bytes;

use super::body;
use super::outbox::Delivery;
use super::registry::Endpoint;
use super::sign::signature_header;
use crate::ssrf::{self, GuardedResolver};
use crate::time::unix_ms;
use crate::upstream::backoff::parse_retry_after;

/// What a receiver's answer (or its absence) means for a delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    /// Try again on the schedule; `retry_after` is the receiver's `Retry-After`, if it sent one.
    #[error("{message}")]
    Retry {
        /// The HTTP status, if the receiver answered.
        status: Option<u16>,
        /// The receiver's `Retry-After`.
        retry_after: Option<Duration>,
        /// What happened, for the delivery's `last_error`.
        message: String,
    },
    /// The receiver answered 410 Gone: it wants no more deliveries; the endpoint is disabled.
    #[error("the receiver answered 410 Gone: the endpoint is disabled until re-enabled")]
    Gone,
    /// The target is refused by the SSRF guard (a forbidden address, not http/https): no
    /// retry can succeed until its URL or `webhooks.allow_private_targets` changes, so the
    /// delivery is dead at once and the endpoint is disabled.
    #[error("{0}")]
    Refused(crate::ssrf::TargetError),
}

impl AttemptError {
    /// Whether no later attempt can succeed (the delivery is dead at once).
    pub fn is_permanent(&self) -> bool {
        matches!(self, AttemptError::Refused(_))
    }

    /// The HTTP status the receiver answered, if any.
    pub fn status(&self) -> Option<u16> {
        match self {
            AttemptError::Retry { status, .. } => *status,
            AttemptError::Gone => Some(410),
            AttemptError::Refused(_) => None,
        }
    }
}

/// Classifies an HTTP answer: 2xx is success, 410 disables the endpoint, anything else is
/// retried (honouring `Retry-After`, which 429 and 503 answers usually carry).
pub fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<(), AttemptError> {
    if status.is_success() {
        return Ok(());
    }
    if status == StatusCode::GONE {
        return Err(AttemptError::Gone);
    }
    let retry_after = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| parse_retry_after(v, now));
    Err(AttemptError::Retry {
        status: Some(status.as_u16()),
        retry_after,
        message: format!("the receiver answered {status}"),
    })
}

/// The request of an attempt made at `now`: the body in the endpoint's format (the stored
/// JSON, or a CloudEvent of it: `body::render`), and the headers: the endpoint's own, the
/// content type (and the `ce-` attributes in binary mode), and the Standard Webhooks
/// `webhook-id`, `webhook-timestamp` and `webhook-signature` over the bytes sent (one
/// signature per secret in use at `now`, so a rotation overlaps).
pub fn request(
    endpoint: &Endpoint,
    delivery: &Delivery,
    now: SystemTime,
) -> Result<(HeaderMap, Bytes), AttemptError> {
    let rendered = body::render(endpoint.record.format, &delivery.body).map_err(|e| {
        retry(format!(
            "cannot write the delivery as {}: {e}",
            endpoint.record.format.as_str()
        ))
    })?;
    let timestamp = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let signature = signature_header(
        endpoint.signing_secrets(unix_ms(now)),
        &delivery.msg_id,
        timestamp,
        &rendered.body,
    );
    let mut headers = endpoint.headers.clone();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(rendered.content_type),
    );
    let attributes = rendered.headers.iter().map(|(n, v)| (*n, v.as_str()));
    for (name, value) in [
        ("webhook-id", delivery.msg_id.as_str()),
        ("webhook-timestamp", &timestamp.to_string()),
        ("webhook-signature", &signature),
    ]
    .into_iter()
    .chain(attributes)
    {
        let value = HeaderValue::from_str(value)
            .map_err(|_| retry(format!("cannot encode the {name} header")))?;
        headers.insert(name, value);
    }
    Ok((headers, rendered.body))
}

fn retry(message: String) -> AttemptError {
    AttemptError::Retry {
        status: None,
        retry_after: None,
        message,
    }
}

/// Makes attempts over one HTTP client that follows no redirect, uses no proxy, and resolves
/// names through the SSRF guard.
pub struct Sender {
    client: reqwest::Client,
    timeout: Duration,
    allow_private: bool,
}

impl Sender {
    /// A sender whose attempts time out after `timeout` (connecting included), keeping up to
    /// `idle_per_host` idle connections per receiver.
    pub fn new(
        timeout: Duration,
        allow_private: bool,
        idle_per_host: usize,
        user_agent: &str,
    ) -> Result<Sender, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(std::sync::Arc::new(GuardedResolver { allow_private }))
            .connect_timeout(timeout)
            .pool_max_idle_per_host(idle_per_host)
            .tcp_nodelay(true)
            .user_agent(user_agent)
            .build()?;
        Ok(Sender {
            client,
            timeout,
            allow_private,
        })
    }

    /// Makes one attempt: the target checked, the request signed now and sent, the answer
    /// classified and the start of its body kept. The answer's `result` carries the
    /// receiver's 2xx status.
    pub async fn deliver(&self, endpoint: &Endpoint, delivery: &Delivery) -> Answer {
        let failed = |error: AttemptError| Answer {
            result: Err(error),
            excerpt: String::new(),
        };
        if let Err(refused) = ssrf::check_url(&endpoint.url, self.allow_private) {
            return failed(AttemptError::Refused(refused));
        }
        let (headers, body) = match request(endpoint, delivery, SystemTime::now()) {
            Ok(request) => request,
            Err(error) => return failed(error),
        };
        let sent = self
            .client
            .post(endpoint.url.clone())
            .headers(headers)
            .body(body)
            .timeout(self.timeout)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                return failed(match refusal(&e) {
                    Some(refused) => AttemptError::Refused(refused),
                    None => retry(describe(&e, self.timeout)),
                });
            }
        };
        let status = response.status();
        let verdict = classify(status, response.headers(), SystemTime::now());
        let excerpt = excerpt_and_drain(response).await;
        Answer {
            result: verdict.map(|()| status.as_u16()),
            excerpt,
        }
    }
}

/// What a receiver answered one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The receiver's 2xx status, or why the attempt failed.
    pub result: Result<u16, AttemptError>,
    /// The start of the receiver's answer body (at most [`EXCERPT`] bytes, as UTF-8 with
    /// invalid bytes replaced; empty without an answer).
    pub excerpt: String,
}

impl Answer {
    /// The receiver's status, if it answered.
    pub fn status(&self) -> Option<u16> {
        match &self.result {
            Ok(status) => Some(*status),
            Err(error) => error.status(),
        }
    }
}

/// What a test delivery came to (not recorded anywhere: the admin API shows it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The receiver's status, if it answered.
    pub status: Option<u16>,
    /// Why it did not succeed, if it did not.
    pub error: Option<AttemptError>,
    /// The start of the receiver's answer body (see [`Answer::excerpt`]).
    pub excerpt: String,
    /// From sending to the answer's body read.
    pub duration: Duration,
}

/// The most of a receiver's answer body an attempt keeps (the attempt history, a test
/// delivery's result).
pub const EXCERPT: usize = 1024;

impl Sender {
    /// Makes one attempt as [`Sender::deliver`] does, and times it.
    pub async fn probe(&self, endpoint: &Endpoint, delivery: &Delivery) -> Probe {
        let started = std::time::Instant::now();
        let answer = self.deliver(endpoint, delivery).await;
        Probe {
            status: answer.status(),
            error: answer.result.err(),
            excerpt: answer.excerpt,
            duration: started.elapsed(),
        }
    }
}

/// The first [`EXCERPT`] bytes of `body` as text: invalid UTF-8 (a character cut at the
/// bound included) replaced.
pub fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(EXCERPT)]).into_owned()
}

/// The SSRF guard's refusal behind a failed request, if that is why it failed: the guarded
/// resolver's error travels inside the client's connect error. A name that did not resolve
/// is not a refusal (DNS failures are often temporary).
fn refusal(error: &reqwest::Error) -> Option<ssrf::TargetError> {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(target) = cause.downcast_ref::<ssrf::TargetError>() {
            return match target {
                ssrf::TargetError::Unresolvable { .. } => None,
                refused => Some(refused.clone()),
            };
        }
        source = cause.source();
    }
    None
}

/// A failed request in words, with its cause chain (the resolver's SSRF refusal included).
fn describe(error: &reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        return format!(
            "no answer within {} (webhooks.attempt_timeout)",
            humantime::format_duration(timeout)
        );
    }
    let mut text = if error.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Keeps the start of the answer's body ([`excerpt`]) and reads (and discards) the rest, up
/// to 64 KiB in all, so the connection can be reused.
async fn excerpt_and_drain(mut response: reqwest::Response) -> String {
    let mut start = Vec::new();
    let mut read = 0usize;
    while let Ok(Some(chunk)) = response.chunk().await {
        if start.len() < EXCERPT {
            let room = EXCERPT - start.len();
            start.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        read += chunk.len();
        if read > 64 * 1024 {
            break;
        }
    }
    excerpt(&start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::webhook::body::{Format, Mode};
    use crate::sinks::webhook::outbox::{DeliveryState, EndpointRecord, EndpointStatus, Source};
    use crate::wire::ChangeKind;
    use std::collections::BTreeMap;

    #[test]
    fn answers_are_classified_by_what_the_worker_must_do() {
        let now = SystemTime::UNIX_EPOCH;
        let empty = HeaderMap::new();
        assert_eq!(classify(StatusCode::OK, &empty, now), Ok(()));
        assert_eq!(classify(StatusCode::NO_CONTENT, &empty, now), Ok(()));
        assert_eq!(
            classify(StatusCode::GONE, &empty, now),
            Err(AttemptError::Gone)
        );
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        match classify(StatusCode::TOO_MANY_REQUESTS, &h, now) {
            Err(AttemptError::Retry {
                status,
                retry_after,
                ..
            }) => {
                assert_eq!(status, Some(429));
                assert_eq!(retry_after, Some(Duration::from_secs(7)));
            }
            other => panic!("expected a retry, got {other:?}"),
        }
        for status in [400, 404, 500, 503, 302] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(matches!(
                classify(status, &empty, now),
                Err(AttemptError::Retry {
                    retry_after: None,
                    ..
                })
            ));
        }
    }

    const OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const NEW: &str = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn endpoint(previous_until_ms: u64) -> Endpoint {
        let record = EndpointRecord {
            id: "e".into(),
            url: "https://hooks.example.com/x".into(),
            streams: vec!["s".into()],
            mode: Mode::Patch,
            format: Format::Json,
            headers: BTreeMap::from([("X-Tenant".to_owned(), "t1".to_owned())]),
            secret: NEW.into(),
            previous_secret: Some(OLD.into()),
            previous_expires_ms: Some(previous_until_ms),
            source: Source::Api,
            created_ms: 0,
            description: None,
            metadata: Default::default(),
            rate_limit: None,
            events: Default::default(),
            request_hash: None,
            view_filters: Default::default(),
        };
        Endpoint::new(record, EndpointStatus::default()).unwrap()
    }

    fn delivery() -> Delivery {
        Delivery {
            id: 1,
            endpoint: "e".into(),
            stream: "s".into(),
            msg_id: "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W".into(),
            kind: ChangeKind::Snapshot.into(),
            epoch: 1,
            seq: 1,
            base_seq: None,
            body: Bytes::from_static(br#"{"type":"stream.snapshot","data":{}}"#),
            state: DeliveryState::Pending,
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
            last_status: None,
            created_ms: 0,
            finished_ms: None,
        }
    }

    /// The request verifies with the reference library under either secret while the rotation
    /// overlaps, and only under the new one after; the endpoint's own headers go along.
    #[test]
    fn requests_are_signed_with_every_secret_in_use() {
        let now = SystemTime::now();
        let delivery = delivery();
        let verifies = |headers: &HeaderMap, secret: &str| {
            standardwebhooks::Webhook::new(secret)
                .unwrap()
                .verify(&delivery.body, headers)
                .is_ok()
        };
        let (overlapping, body) = request(&endpoint(u64::MAX), &delivery, now).unwrap();
        assert_eq!(body, delivery.body, "the JSON format sends the stored body");
        assert!(verifies(&overlapping, NEW) && verifies(&overlapping, OLD));
        assert_eq!(overlapping["webhook-id"], delivery.msg_id.as_str());
        assert_eq!(overlapping[header::CONTENT_TYPE], "application/json");
        assert_eq!(overlapping["x-tenant"], "t1");
        let (rotated, _) = request(&endpoint(0), &delivery, now).unwrap();
        assert!(verifies(&rotated, NEW) && !verifies(&rotated, OLD));
    }

    proptest::proptest! {
        /// An excerpt is the body's start, never longer than the bound and valid text; a
        /// character cut at the bound is replaced, never split.
        #[test]
        fn excerpts_are_bounded_text(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000)) {
            let text = excerpt(&body);
            let kept = &body[..body.len().min(EXCERPT)];
            // Every kept byte is at most one character (itself, or part of one, or U+FFFD).
            proptest::prop_assert!(text.chars().count() <= EXCERPT);
            if let Ok(valid) = std::str::from_utf8(kept) {
                proptest::prop_assert_eq!(text.as_str(), valid);
            }
        }
    }

    #[test]
    fn an_excerpt_of_text_is_its_first_kilobyte() {
        let body = "é".repeat(EXCERPT);
        let text = excerpt(body.as_bytes());
        assert_eq!(text, "é".repeat(EXCERPT / 2));
        assert_eq!(excerpt(b"not found"), "not found");
        // A character cut by the bound is replaced.
        let cut = format!("a{}", "é".repeat(EXCERPT));
        assert!(excerpt(cut.as_bytes()).ends_with('\u{FFFD}'));
    }
}
