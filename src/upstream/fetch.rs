//! One upstream request: a conditional GET with a timeout, a redirect limit and a body cap.
//!
//! Every stream shares one `reqwest::Client` (pooled connections, automatic decompression).
//! Errors are typed by what the poller does about them, and never contain header values,
//! which may hold credentials.

use std::error::Error as _;
use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::header::{ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, StatusCode};
use url::Url;

use super::backoff::parse_retry_after;
use super::decode::DecodeError;
pub use crate::redact::Redacted;

/// Redirects followed before a request fails.
pub const MAX_REDIRECTS: usize = 5;

/// What to fetch and within which limits.
#[derive(Clone, Copy)]
pub struct FetchRequest<'a> {
    /// The upstream URL.
    pub url: &'a Url,
    /// The URL as errors name it (see [`crate::redact`]).
    pub shown: &'a Redacted,
    /// Headers sent with the request (may hold credentials: never logged).
    pub headers: &'a HeaderMap,
    /// Timeout for the whole request: connecting, headers and body.
    pub timeout: Duration,
    /// Largest (decompressed) body accepted.
    pub max_body_bytes: u64,
}

impl fmt::Debug for FetchRequest<'_> {
    /// Header names only: their values may be credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchRequest")
            .field("url", self.shown)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

/// The cache validators of the last successful response, sent back as conditions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Validators {
    /// The `ETag`, sent back as `If-None-Match`.
    pub etag: Option<HeaderValue>,
    /// The `Last-Modified` date, sent back as `If-Modified-Since`.
    pub last_modified: Option<HeaderValue>,
}

impl Validators {
    fn from_headers(headers: &HeaderMap) -> Self {
        Validators {
            etag: headers.get(ETAG).cloned(),
            last_modified: headers.get(LAST_MODIFIED).cloned(),
        }
    }
}

/// A successful fetch.
#[derive(Debug, Clone)]
pub enum Fetched {
    /// 304 Not Modified: the last body is still current (no body was read).
    NotModified,
    /// A new body and the validators that came with it.
    Body {
        /// The (decompressed) body.
        body: Bytes,
        /// The response's `ETag` and `Last-Modified`.
        validators: Validators,
    },
}

/// Where a poller's requests go. [`Fetcher`] (HTTP) is the one implementation the proxy uses;
/// the trait is the seam that lets a test put a scripted upstream on tokio's paused clock
/// behind a real [`Poller`](super::Poller), so the schedule is checked without wall-clock waits.
pub trait Upstream: Send + Sync {
    /// Fetches `req.url`, sending `validators` as conditional-request headers.
    fn fetch<'a>(
        &'a self,
        req: &'a FetchRequest<'_>,
        validators: &'a Validators,
    ) -> BoxFuture<'a, Result<Fetched, FetchError>>;
}

impl Upstream for Fetcher {
    fn fetch<'a>(
        &'a self,
        req: &'a FetchRequest<'_>,
        validators: &'a Validators,
    ) -> BoxFuture<'a, Result<Fetched, FetchError>> {
        Box::pin(Fetcher::fetch(self, req, validators))
    }
}

/// Why a poll failed; every variant is retried later with backoff.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The request (including reading the body) took longer than the stream's timeout.
    #[error("GET {url}: no complete response within the timeout of {timeout:?}")]
    Timeout {
        /// The upstream URL (redacted).
        url: Redacted,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// No response: DNS, connection refused, TLS.
    #[error("GET {url}: no response: {reason}")]
    Connect {
        /// The upstream URL (redacted).
        url: Redacted,
        /// What went wrong, with its causes.
        reason: String,
    },
    /// A redirect was not followed: too many, or to a refused URL.
    #[error("GET {url}: {source}")]
    Redirect {
        /// The upstream URL (redacted).
        url: Redacted,
        /// Why the redirect was not followed.
        #[source]
        source: RedirectError,
    },
    /// The upstream answered with an error or otherwise unexpected status.
    #[error("GET {url}: upstream answered HTTP {status}{}", retry_after_note(*.retry_after))]
    Status {
        /// The upstream URL (redacted).
        url: Redacted,
        /// The HTTP status code.
        status: u16,
        /// The upstream's `Retry-After` (only read on 429 and 503).
        retry_after: Option<Duration>,
    },
    /// The body is larger than the stream's `max_body_bytes`.
    #[error("GET {url}: body larger than the limit of {limit} bytes (max_body_bytes)")]
    TooLarge {
        /// The upstream URL (redacted).
        url: Redacted,
        /// The limit that was exceeded.
        limit: u64,
    },
    /// The body could not be read: the connection broke mid-body, or the content encoding is
    /// invalid.
    #[error("GET {url}: reading the body failed: {reason}")]
    Body {
        /// The upstream URL (redacted).
        url: Redacted,
        /// What went wrong, with its causes.
        reason: String,
    },
    /// The body is not a valid document in the stream's format.
    #[error("GET {url}: the body is not a valid document: {source}")]
    Decode {
        /// The upstream URL (redacted).
        url: Redacted,
        /// The decoding error.
        #[source]
        source: DecodeError,
    },
    /// The HTTP client could not be built (fatal, at startup).
    #[error("could not build the HTTP client (check upstream.user_agent): {reason}")]
    Client {
        /// What went wrong, with its causes.
        reason: String,
    },
}

fn retry_after_note(retry_after: Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!(" (Retry-After: {}s)", d.as_secs()),
        None => String::new(),
    }
}

impl FetchError {
    /// A decoding failure of the body fetched from `url`.
    pub fn decode(url: &Redacted, source: DecodeError) -> Self {
        FetchError::Decode {
            url: url.clone(),
            source,
        }
    }

    /// The machine-readable `cause` told to subscribers: `upstream-timeout`,
    /// `upstream-status` (an error status), `upstream-invalid` (a 2xx body that does not
    /// decode), `redirect-refused`, or `upstream-unavailable` (no usable response).
    pub fn cause(&self) -> &'static str {
        match self {
            FetchError::Timeout { .. } => "upstream-timeout",
            FetchError::Status { .. } => "upstream-status",
            FetchError::Decode { .. } => "upstream-invalid",
            FetchError::Redirect {
                source: RedirectError::Refused { .. },
                ..
            } => "redirect-refused",
            FetchError::Connect { .. }
            | FetchError::Redirect { .. }
            | FetchError::TooLarge { .. }
            | FetchError::Body { .. }
            | FetchError::Client { .. } => "upstream-unavailable",
        }
    }

    /// The HTTP status to report to subscribers: the upstream's own status, 504 for a
    /// timeout, 502 for anything else that went wrong talking to the upstream.
    pub fn status(&self) -> u16 {
        match self {
            FetchError::Timeout { .. } => 504,
            FetchError::Status { status, .. } => *status,
            FetchError::Connect { .. }
            | FetchError::Redirect { .. }
            | FetchError::TooLarge { .. }
            | FetchError::Body { .. }
            | FetchError::Decode { .. } => 502,
            FetchError::Client { .. } => 500,
        }
    }

    /// The upstream's `Retry-After` on a 429 or 503; `None` otherwise.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Status {
                status: 429 | 503,
                retry_after,
                ..
            } => *retry_after,
            _ => None,
        }
    }
}

/// Why a redirect was not followed; a redirect policy returns it from
/// `reqwest::redirect::Attempt::error`, and the fetch finds it again in the error's causes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedirectError {
    /// The chain of redirects is longer than [`MAX_REDIRECTS`].
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooMany,
    /// The redirect goes somewhere the policy refuses (an address or host not allowed).
    #[error("redirect to {url} refused: {reason}")]
    Refused {
        /// Where the redirect pointed (redacted).
        url: Redacted,
        /// Why it is refused.
        reason: String,
    },
}

/// A redirect policy following at most [`MAX_REDIRECTS`] redirects, each to a URL `refuse`
/// finds no reason to refuse; its refusals are [`RedirectError`]s.
pub fn redirect_policy(
    refuse: impl Fn(&Url) -> Option<String> + Send + Sync + 'static,
) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        // `previous` holds every URL requested so far, the first one included.
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(RedirectError::TooMany);
        }
        match refuse(attempt.url()) {
            Some(reason) => {
                let url = Redacted::new(attempt.url());
                attempt.error(RedirectError::Refused { url, reason })
            }
            None => attempt.follow(),
        }
    })
}

/// The HTTP client shared by every poller.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
}

impl Fetcher {
    /// A client sending `user_agent`, following at most [`MAX_REDIRECTS`] redirects and
    /// decompressing gzip, brotli and deflate bodies.
    pub fn new(user_agent: &str) -> Result<Fetcher, FetchError> {
        let builder = Self::client_builder(user_agent)?.redirect(redirect_policy(|_| None));
        Self::build(builder)
    }

    /// The client settings every fetcher shares (user agent, decompression, keep-alive), for
    /// callers that add their own resolver or redirect policy and then [`Fetcher::build`].
    pub fn client_builder(user_agent: &str) -> Result<reqwest::ClientBuilder, FetchError> {
        let user_agent = HeaderValue::from_str(user_agent).map_err(|_| FetchError::Client {
            reason: "the user agent must be visible ASCII".to_owned(),
        })?;
        Ok(reqwest::Client::builder()
            .user_agent(user_agent)
            .gzip(true)
            .brotli(true)
            .deflate(true)
            .tcp_keepalive(Duration::from_secs(60)))
    }

    /// A fetcher using the client `builder` builds.
    pub fn build(builder: reqwest::ClientBuilder) -> Result<Fetcher, FetchError> {
        let client = builder
            .build()
            .map_err(|e| FetchError::Client { reason: causes(e) })?;
        Ok(Fetcher { client })
    }

    /// Fetches `req.url`, sending `validators` as `If-None-Match` / `If-Modified-Since`.
    ///
    /// The body is read chunk by chunk and abandoned as soon as it exceeds the cap.
    pub async fn fetch(
        &self,
        req: &FetchRequest<'_>,
        validators: &Validators,
    ) -> Result<Fetched, FetchError> {
        // The timeout covers the body too: a slow-dripping upstream cannot hold a poll open.
        match tokio::time::timeout(req.timeout, self.fetch_unbounded(req, validators)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(FetchError::Timeout {
                url: req.shown.clone(),
                timeout: req.timeout,
            }),
        }
    }

    async fn fetch_unbounded(
        &self,
        req: &FetchRequest<'_>,
        validators: &Validators,
    ) -> Result<Fetched, FetchError> {
        let mut request = self
            .client
            .get(req.url.clone())
            .headers(req.headers.clone())
            .timeout(req.timeout);
        if let Some(etag) = &validators.etag {
            request = request.header(IF_NONE_MATCH, etag.clone());
        }
        if let Some(last_modified) = &validators.last_modified {
            request = request.header(IF_MODIFIED_SINCE, last_modified.clone());
        }
        let mut response = request.send().await.map_err(|e| request_error(req, e))?;

        let status = response.status();
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Fetched::NotModified);
        }
        if status != StatusCode::OK && status != StatusCode::NON_AUTHORITATIVE_INFORMATION {
            let retry_after = match status {
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| parse_retry_after(v, SystemTime::now())),
                _ => None,
            };
            return Err(FetchError::Status {
                url: req.shown.clone(),
                status: status.as_u16(),
                retry_after,
            });
        }

        let too_large = || FetchError::TooLarge {
            url: req.shown.clone(),
            limit: req.max_body_bytes,
        };
        // reqwest hides Content-Length when it decompresses, so this only rejects plain
        // bodies early; the streaming cap below covers decompressed ones.
        if response
            .content_length()
            .is_some_and(|len| len > req.max_body_bytes)
        {
            return Err(too_large());
        }
        let validators = Validators::from_headers(response.headers());
        let capacity = response
            .content_length()
            .unwrap_or(0)
            .min(req.max_body_bytes);
        let mut body = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
        while let Some(chunk) = response.chunk().await.map_err(|e| body_error(req, e))? {
            let len = u64::try_from(body.len().saturating_add(chunk.len())).unwrap_or(u64::MAX);
            if len > req.max_body_bytes {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Fetched::Body {
            body: body.freeze(),
            validators,
        })
    }
}

fn request_error(req: &FetchRequest<'_>, error: reqwest::Error) -> FetchError {
    if error.is_timeout() {
        FetchError::Timeout {
            url: req.shown.clone(),
            timeout: req.timeout,
        }
    } else if error.is_redirect() {
        // The policy's own error is among the causes; reqwest's own refusals (a redirect to
        // a URL it cannot follow) are not, and are named by their text.
        let mut cause = error.source();
        while let Some(c) = cause {
            if let Some(redirect) = c.downcast_ref::<RedirectError>() {
                return FetchError::Redirect {
                    url: req.shown.clone(),
                    source: redirect.clone(),
                };
            }
            cause = c.source();
        }
        FetchError::Connect {
            url: req.shown.clone(),
            reason: causes(error),
        }
    } else {
        FetchError::Connect {
            url: req.shown.clone(),
            reason: causes(error),
        }
    }
}

fn body_error(req: &FetchRequest<'_>, error: reqwest::Error) -> FetchError {
    if error.is_timeout() {
        FetchError::Timeout {
            url: req.shown.clone(),
            timeout: req.timeout,
        }
    } else {
        FetchError::Body {
            url: req.shown.clone(),
            reason: causes(error),
        }
    }
}

/// The error and its causes, `: `-separated, without the URL (reqwest's own Display would add
/// it unredacted; the variants name it themselves).
fn causes(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Wrapping errors often repeat their cause's text.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_reported_to_subscribers() {
        let url = Redacted::new(&Url::parse("http://x.example/feed").expect("valid URL"));
        let status = |status, retry_after| FetchError::Status {
            url: url.clone(),
            status,
            retry_after,
        };
        assert_eq!(status(404, None).status(), 404);
        assert_eq!(status(500, None).status(), 500);
        let timeout = FetchError::Timeout {
            url: url.clone(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(timeout.status(), 504);
        let too_large = FetchError::TooLarge {
            url: url.clone(),
            limit: 10,
        };
        assert_eq!(too_large.status(), 502);
        assert_eq!(too_large.retry_after(), None);
    }

    #[test]
    fn retry_after_only_on_429_and_503() {
        let url = Redacted::new(&Url::parse("http://x.example/feed").expect("valid URL"));
        let ra = Some(Duration::from_secs(7));
        for (status, expected) in [(429, ra), (503, ra), (500, None), (502, None), (404, None)] {
            let error = FetchError::Status {
                url: url.clone(),
                status,
                retry_after: ra,
            };
            assert_eq!(error.retry_after(), expected, "status {status}");
        }
    }

    #[test]
    fn urls_in_errors_hide_passwords() {
        let url = Url::parse("https://user:hunter2@x.example/feed?x=1").expect("valid URL");
        let error = FetchError::TooLarge {
            url: Redacted::new(&url),
            limit: 1,
        };
        let text = error.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("https://x.example/feed?x=REDACTED"), "{text}");
    }

    #[test]
    fn messages_name_the_url_and_the_problem() {
        let url = Url::parse("http://x.example/feed").expect("valid URL");
        let error = FetchError::Status {
            url: Redacted::new(&url),
            status: 429,
            retry_after: Some(Duration::from_secs(30)),
        };
        assert_eq!(
            error.to_string(),
            "GET http://x.example/feed: upstream answered HTTP 429 (Retry-After: 30s)"
        );
        let decode = crate::upstream::decode::decode(crate::upstream::decode::Format::Json, b"{")
            .expect_err("truncated JSON is invalid");
        let error = FetchError::decode(&Redacted::new(&url), decode);
        let text = error.to_string();
        assert!(text.starts_with("GET http://x.example/feed: the body is not a valid document: invalid JSON at line 1"), "{text}");
        assert_eq!(error.status(), 502);
        assert_eq!(error.cause(), "upstream-invalid");
    }

    #[test]
    fn request_debug_shows_header_names_but_not_values() {
        let url = Url::parse("https://u:pw@x.example/feed").expect("valid URL");
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        let shown = Redacted::new(&url);
        let request = FetchRequest {
            url: &url,
            shown: &shown,
            headers: &headers,
            timeout: Duration::from_secs(1),
            max_body_bytes: 10,
        };
        let text = format!("{request:?}");
        assert!(text.contains("authorization"), "{text}");
        assert!(!text.contains("s3cret") && !text.contains("pw@"), "{text}");
    }

    #[test]
    fn a_user_agent_with_control_characters_is_rejected() {
        let error = Fetcher::new("bad\nagent").expect_err("newline is not allowed");
        assert!(error.to_string().contains("upstream.user_agent"));
    }
}
