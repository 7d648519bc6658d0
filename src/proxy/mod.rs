//! The Streamdata.io-compatible proxy mode: `GET /{upstream URL}` streams any allowed API.
//!
//! A request names its upstream in the path ([`target`]), presents an application token
//! ([`tokens`]: connection limits, rate of new connections, allowed hosts, poll period), and
//! is subscribed to the dynamic stream of that URL and those forwarded headers ([`streams`]):
//! created on the first subscriber, polled while anyone listens and for `proxy.linger` after,
//! then stopped and evicted. Clients asking for the same URL with the same headers share one
//! stream and one poller; different headers (credentials) never share anything.
//!
//! Its `[proxy]` section ([`config`]) is validated and turned into [`config::ProxySettings`] here.
//!
//! Safety: only `proxy.allowed_hosts` (and the token's own list) may be streamed, over http or
//! https; private, loopback, link-local and metadata addresses are refused after DNS
//! resolution unless `proxy.allow_private` is set ([`crate::ssrf`]), at connection time too,
//! and every redirect target is checked again.

pub mod config;
pub mod signature;
pub mod streams;
pub mod target;
pub mod tokens;

use std::sync::Arc;

use http::HeaderMap;

use self::config::ProxySettings;
use crate::cluster::tokens::SharedTokens;
use crate::hub::{Resume, Subscription};
use crate::metrics::{Metrics, RefusalLabels};
use crate::ssrf;
use crate::views::select::{Selector, tokens};
use crate::views::spec::{ViewSpec, parse_expression, parse_fields};
use signature::{SignatureError, Signed};
use streams::{Claim, DynamicStreams, ViewRequest};
use target::{
    ENTITIES_PARAM, FIELDS_PARAM, KEY_PARAM, TOKEN_PARAM, TargetError, ViewParams, WHERE_PARAM,
};
use tokens::{Admission, Token, Tokens};

/// Why a dynamic stream request is refused. Streamdata.io clients get it as an SSE `error`
/// event on a 200 response (their SDKs drop other statuses without telling why).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// Proxy mode is not enabled.
    #[error("dynamic streams are disabled on this server ([proxy] enabled = false)")]
    Disabled,
    /// The path is not an upstream URL the proxy can open.
    #[error("{0}")]
    Target(#[from] TargetError),
    /// No token.
    #[error(
        "a token is required: add X-Sd-Token=<token> to the query string or send an X-Sd-Token header"
    )]
    TokenMissing,
    /// A token that is not configured.
    #[error("unknown token")]
    TokenUnknown,
    /// The token is at its connection limit.
    #[error("token {token:?} already has its maximum of {max} open connections")]
    TooManyConnections {
        /// The token's name.
        token: String,
        /// Its limit.
        max: usize,
    },
    /// The token opened connections faster than allowed.
    #[error("token {token:?} may open at most {per_second} new connections per second")]
    RateLimited {
        /// The token's name.
        token: String,
        /// Its rate.
        per_second: u32,
    },
    /// The host is not allowed (for this token).
    #[error("upstream host {host:?} is not allowed for this token")]
    HostNotAllowed {
        /// The host asked for.
        host: String,
    },
    /// The upstream resolves to a refused address.
    #[error("{0}")]
    Forbidden(ssrf::TargetError),
    /// The cluster this node belongs to cannot be reached (Redis is down), so a dynamic
    /// stream can be neither named the cluster's way nor shared.
    #[error("the cluster is not reachable; dynamic streams are unavailable for now, retry")]
    ClusterUnavailable,
    /// No room for another dynamic stream.
    #[error(
        "the server is at its limit of {max} dynamic streams (proxy.max_streams); try again later"
    )]
    TooManyStreams {
        /// The limit.
        max: usize,
    },
    /// No memory for another dynamic stream.
    #[error(
        "the dynamic streams' snapshots fill their memory limit of {max} bytes (proxy.max_memory); try again later"
    )]
    OutOfMemory {
        /// The limit.
        max: u64,
    },
    /// The token requires signed requests and this one is not signed.
    #[error(
        "token {token:?} requires signed requests: X-Auth-Sd-Ts and X-Auth-Sd-S are missing \
         (sign the URL with streamdataio-js-sdk-auth's signature strategy; the native view \
         /streams/~… cannot be signed, so it is closed to such tokens)"
    )]
    SignatureMissing {
        /// The token's name.
        token: String,
    },
    /// The request's signature is refused.
    #[error("token {token:?}: {error}")]
    Signature {
        /// The token's name.
        token: String,
        /// Why.
        error: SignatureError,
    },
    /// A view parameter that cannot be used.
    #[error("{param}: {message}")]
    ViewParam {
        /// The parameter (query parameter or header).
        param: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A view that cannot be had (its expression, its fields, or the views' bounds).
    #[error("{0}")]
    View(crate::views::ViewError),
    /// A native view of a dynamic stream that does not exist (any more).
    #[error("no dynamic stream named {0:?} (it may have been evicted)")]
    NoSuchStream(String),
}

impl Refusal {
    /// The HTTP status that describes the refusal.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Disabled | Refusal::NoSuchStream(_) => 404,
            Refusal::Target(_) | Refusal::ViewParam { .. } => 400,
            Refusal::View(error) => error.status(),
            Refusal::TokenMissing
            | Refusal::TokenUnknown
            | Refusal::SignatureMissing { .. }
            | Refusal::Signature { .. } => 401,
            Refusal::HostNotAllowed { .. } | Refusal::Forbidden(_) => 403,
            Refusal::TooManyConnections { .. } | Refusal::RateLimited { .. } => 429,
            Refusal::TooManyStreams { .. }
            | Refusal::OutOfMemory { .. }
            | Refusal::ClusterUnavailable => 503,
        }
    }

    /// What the client is told: status, cause and message.
    pub fn to_wire(&self) -> crate::wire::Refusal {
        crate::wire::Refusal {
            status: self.status(),
            cause: self.cause(),
            message: self.to_string(),
        }
    }

    /// The machine-readable `cause` sent with the error.
    pub fn cause(&self) -> &'static str {
        match self {
            Refusal::Disabled => "proxy-disabled",
            Refusal::NoSuchStream(_) => "no-such-stream",
            Refusal::Target(_) => "invalid-target",
            Refusal::ViewParam { .. } => "bad-view",
            Refusal::View(error) => error.cause(),
            Refusal::TokenMissing => "token-missing",
            Refusal::TokenUnknown => "token-unknown",
            Refusal::SignatureMissing { .. } => "signature-missing",
            Refusal::Signature {
                error: SignatureError::Stale { .. },
                ..
            } => "signature-expired",
            Refusal::Signature { .. } => "signature-invalid",
            Refusal::HostNotAllowed { .. } => "host-not-allowed",
            Refusal::Forbidden(ssrf::TargetError::Unresolvable { .. }) => "host-unresolvable",
            Refusal::Forbidden(_) => "address-forbidden",
            Refusal::TooManyConnections { .. } => "too-many-connections",
            Refusal::RateLimited { .. } => "rate-limited",
            Refusal::TooManyStreams { .. } => "too-many-streams",
            Refusal::OutOfMemory { .. } => "out-of-memory",
            Refusal::ClusterUnavailable => "cluster-unavailable",
        }
    }
}

/// A subscription to a dynamic stream, with what it holds for as long as it lives.
pub struct Opened {
    /// The subscription (its initial events and live receiver).
    pub subscription: Subscription,
    /// The stream's name (`~` and a keyed hash: unguessable, and naming nothing about the URL).
    pub stream: Arc<str>,
    /// The token's connection slot and the stream's poll-period claim; dropped with the
    /// connection.
    pub hold: Hold,
}

impl Opened {
    fn new(
        subscription: Subscription,
        stream: Arc<str>,
        admission: Admission,
        claim: Claim,
    ) -> Self {
        Opened {
            subscription,
            stream,
            hold: Hold {
                _admission: admission,
                _claim: claim,
            },
        }
    }
}

/// What an open dynamic-stream connection keeps: released when dropped.
pub struct Hold {
    _admission: Admission,
    _claim: Claim,
}

/// The proxy mode: tokens and dynamic streams.
pub struct Proxy {
    settings: Arc<ProxySettings>,
    tokens: Tokens,
    /// In a cluster, the tokens' cluster-wide counts.
    shared: Option<Arc<SharedTokens>>,
    streams: Arc<DynamicStreams>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    /// The proxy over `streams`.
    pub fn new(
        settings: Arc<ProxySettings>,
        streams: Arc<DynamicStreams>,
        shared: Option<Arc<SharedTokens>>,
        metrics: Arc<Metrics>,
    ) -> Proxy {
        Proxy {
            tokens: Tokens::new(&settings, &metrics),
            shared,
            settings,
            streams,
            metrics,
        }
    }

    /// The proxy's settings.
    pub fn settings(&self) -> &ProxySettings {
        &self.settings
    }

    /// The dynamic streams.
    pub fn streams(&self) -> &Arc<DynamicStreams> {
        &self.streams
    }

    /// Opens the dynamic stream a request names: `path` and `query` as received, `headers`
    /// for the token header, from `resume` (an exact resume needs the same stream still
    /// alive: its name is in the id). Every refusal is counted by cause.
    pub async fn open(
        &self,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        resume: &Resume,
    ) -> Result<Opened, Refusal> {
        let result = self.try_open(path, query, headers, resume).await;
        if let Err(refusal) = &result {
            self.count(refusal);
        }
        result
    }

    async fn try_open(
        &self,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        resume: &Resume,
    ) -> Result<Opened, Refusal> {
        let mut target = target::parse(path, query)?;
        target.view.or_headers(headers);
        let view = view_request(&target.view)?;
        let presented = target.token.as_deref().or_else(|| header_token(headers));
        // Before admission: a refused signature takes no connection slot nor rate.
        self.check_signature(self.tokens.find(presented)?, target.signed.as_ref())?;
        let admission = self.admit_token(presented).await?;
        let host = target.url.host_str().unwrap_or_default();
        let period = admission.token().period_for(&self.settings, host)?;
        ssrf::check_url(&target.url, self.settings.allow_private).map_err(Refusal::Forbidden)?;
        let (subscription, stream, claim) =
            self.streams.open(&target, view, period, resume).await?;
        Ok(Opened::new(subscription, stream, admission, claim))
    }

    /// Admits a connection presenting `token`: this node's limits, then the cluster's.
    async fn admit_token(&self, token: Option<&str>) -> Result<Admission, Refusal> {
        let admission = self.tokens.admit(token)?;
        match &self.shared {
            Some(shared) => admission.share(shared).await,
            None => Ok(admission),
        }
    }

    /// Opens the native view (`/streams/~…`) of an existing dynamic stream, under the same
    /// token rules as the stream's own URL. In a cluster, only a node serving the stream has
    /// it: `GET /{upstream URL}` opens it on any node.
    pub async fn view(
        &self,
        name: &str,
        resume: &Resume,
        query_token: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Opened, Refusal> {
        let result = async {
            let presented = query_token.or_else(|| header_token(headers));
            self.check_signature(self.tokens.find(presented)?, None)?;
            let admission = self.admit_token(presented).await?;
            let (subscription, stream, claim) = self.streams.view(name, resume, |host| {
                admission.token().period_for(&self.settings, host)
            })?;
            Ok(Opened::new(subscription, stream, admission, claim))
        }
        .await;
        if let Err(refusal) = &result {
            self.count(refusal);
        }
        result
    }

    /// Admits a connection presenting `token` without naming a stream (a WebSocket
    /// connection, which holds a slot of its token's limits as long as it is open), under
    /// the rules of the native view: it cannot be signed, so tokens that require signatures
    /// are refused. Refusals are counted by cause.
    pub async fn admit(&self, token: Option<&str>) -> Result<Admission, Refusal> {
        let checked = self
            .tokens
            .find(token)
            .and_then(|found| self.check_signature(found, None));
        let result = match checked {
            Ok(()) => self.admit_token(token).await,
            Err(refusal) => Err(refusal),
        };
        if let Err(refusal) = &result {
            self.count(refusal);
        }
        result
    }

    /// Verifies a request's signature against its token's signing secret: a token with one
    /// refuses bad or stale signatures (and missing ones, when it requires them); a token
    /// without one ignores the parameters (they are stripped all the same).
    fn check_signature(&self, token: &Token, signed: Option<&Signed>) -> Result<(), Refusal> {
        let settings = &token.settings;
        match (signed, &settings.signing_key) {
            (None, _) if settings.require_signature => Err(Refusal::SignatureMissing {
                token: settings.name.clone(),
            }),
            (Some(signed), Some(key)) => {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                signature::verify(key, signed, now_ms, self.settings.signature_max_skew).map_err(
                    |error| Refusal::Signature {
                        token: settings.name.clone(),
                        error,
                    },
                )
            }
            _ => Ok(()),
        }
    }

    fn count(&self, refusal: &Refusal) {
        // The cause only: the message may quote the client's URL or a header it forwards, which
        // only that client may see (it gets the message in its `error` event).
        tracing::debug!(cause = refusal.cause(), "dynamic stream refused");
        self.metrics
            .proxy_refusals
            .get_or_create(&RefusalLabels {
                cause: refusal.cause(),
            })
            .inc();
    }
}

/// The view `params` ask for, if any: `X-Sd-Where` (an RFC 9535 filter expression over each
/// entity) and `X-Sd-Fields` (the fields kept of each), of the entities in the array at
/// `X-Sd-Entities` (a JSON Pointer, the document itself by default) identified by `X-Sd-Key`
/// (a JSON Pointer inside an entity, `/id` by default).
fn view_request(params: &ViewParams) -> Result<Option<ViewRequest>, Refusal> {
    if params.is_empty() {
        return Ok(None);
    }
    let refused = |param: &'static str, message: String| Refusal::ViewParam { param, message };
    let with_param = |param: &'static str| {
        move |error: crate::views::ViewError| refused(param, error.to_string())
    };
    let expression = match params.get(WHERE_PARAM) {
        Some(expression) => Some(parse_expression(expression).map_err(with_param(WHERE_PARAM))?),
        None => None,
    };
    let fields = match params.get(FIELDS_PARAM) {
        Some(fields) => Some(parse_fields(fields).map_err(with_param(FIELDS_PARAM))?),
        None => None,
    };
    if expression.is_none() && fields.is_none() {
        return Err(refused(
            WHERE_PARAM,
            "X-Sd-Entities and X-Sd-Key say where a view's entities are; the view itself is \
             X-Sd-Where (a filter expression) and/or X-Sd-Fields (fields to keep)"
                .to_owned(),
        ));
    }
    let pointer = |param: &'static str, default: &str| {
        let value = params.get(param).unwrap_or(default);
        if value.is_empty() || value.starts_with('/') {
            Ok(tokens(value))
        } else {
            Err(refused(
                param,
                format!("expected a JSON Pointer (e.g. /items), got {value:?}"),
            ))
        }
    };
    let entities = pointer(ENTITIES_PARAM, "")?;
    let key = pointer(KEY_PARAM, "/id")?;
    if key.is_empty() {
        return Err(refused(
            KEY_PARAM,
            "expected the JSON Pointer of a field inside each entity (e.g. /id), got the entity itself".to_owned(),
        ));
    }
    Ok(Some(ViewRequest {
        selector: Selector {
            entities,
            key,
            aliases: Default::default(),
        },
        spec: ViewSpec {
            equals: Default::default(),
            expression,
            fields,
        },
    }))
}

/// The `X-Sd-Token` request header.
fn header_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(TOKEN_PARAM)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}
