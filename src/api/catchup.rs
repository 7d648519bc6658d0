//! Catch-up over plain HTTP: `GET /streams/{name}/changes?after={event id}` answers the
//! changes after that id as one JSON page (`schemas::CHANGES`), read from the stream's
//! history, so that clients that cannot hold a connection (a phone, a batch job, a CDN in
//! front of many) follow a stream with ordinary, cacheable requests.
//!
//! It follows the read path of Electric's Durable Streams protocol where it fits: the next
//! position in `Stream-Next-Offset`, `Stream-Up-To-Date` once the page reaches the current
//! document, long-polls that answer `204` on timeout, and a `Stream-Cursor` that changes with
//! time so that a CDN cannot serve the same cached answer to a long-poll forever. Positions are
//! the SSE event ids (`Last-Event-ID` and `after` are interchangeable), not strings that sort.
//!
//! Who may read which stream is the SSE subscription's decision
//! ([`Subscriptions::open`](super::subscribe::Subscriptions::open)): the same streams, views,
//! tokens and refusals.
//!
//! The pure parts (parameters, the page's bytes, cache headers, the cursor) are plain
//! functions; the handler only reads history and waits.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::broadcast::error::RecvError;

use super::subscribe::{Open, retry_after};
use super::{AppState, error_body};
use crate::hub::{ChangeKind, EventId, Resume, Stream};
use crate::schemas;
use crate::time::rfc3339;

/// Most changes in one page (and the default of `limit`).
pub const MAX_PAGE_CHANGES: usize = 100;
/// Most payload bytes in one page; a single change larger than this is sent alone.
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;
/// The longest `wait` a long-poll may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// How long a shared cache may keep an answer that reaches the stream's top (it grows as the
/// stream changes).
pub const TAIL_MAX_AGE: Duration = Duration::from_secs(1);
/// How long a shared cache may keep a page over a completed range: it never changes.
pub const RANGE_MAX_AGE: Duration = Duration::from_secs(365 * 24 * 3600);

/// The next position (Durable Streams' header).
pub const NEXT_OFFSET: &str = "stream-next-offset";
/// Present (`true`) when the answer reaches the stream's current document.
pub const UP_TO_DATE: &str = "stream-up-to-date";
/// The long-poll cursor to echo as `cursor=` (against CDN cache loops).
pub const CURSOR: &str = "stream-cursor";

/// The length of one cursor interval, and when interval 0 began (Durable Streams' defaults:
/// 20 s from 2024-10-09T00:00:00Z).
const CURSOR_INTERVAL_SECS: u64 = 20;
const CURSOR_EPOCH_SECS: u64 = 1_728_432_000;

/// Where a read starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// No `after`: the current document first, then the changes after it.
    Start,
    /// `after=now`: nothing that exists now; the next change (with `wait`).
    Now,
    /// After this event.
    Id(EventId),
}

/// A catch-up request's own parameters; every other parameter (filters, `view`, the proxy
/// token) is the stream's and goes to the subscription decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// Where the read starts.
    pub after: After,
    /// How long to wait for a change when there is none after `after` (`wait`).
    pub wait: Option<Duration>,
    /// The client's echo of the last `Stream-Cursor`.
    pub cursor: Option<u64>,
    /// Most changes in the page (`limit`, 1 to [`MAX_PAGE_CHANGES`]).
    pub limit: usize,
    /// The query without the catch-up parameters: what names the stream or view.
    pub rest: Option<String>,
}

/// A parameter that is not what it must be: the message names it and says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParamError(pub String);

/// Reads the catch-up parameters of `query`.
pub fn parse_params(query: Option<&str>) -> Result<Params, ParamError> {
    let mut params = Params {
        after: After::Start,
        wait: None,
        cursor: None,
        limit: MAX_PAGE_CHANGES,
        rest: None,
    };
    let mut rest = Vec::new();
    let mut seen = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (raw_name, _) = pair.split_once('=').unwrap_or((pair, ""));
        let Some((name, value)) = url::form_urlencoded::parse(pair.as_bytes()).next() else {
            continue;
        };
        if !matches!(&*name, "after" | "wait" | "cursor" | "limit") {
            rest.push(pair);
            continue;
        }
        if seen.contains(&name) {
            return Err(ParamError(format!("`{raw_name}` is given more than once")));
        }
        match &*name {
            "after" => params.after = parse_after(&value)?,
            "wait" => params.wait = Some(parse_wait(&value)?),
            "cursor" => {
                params.cursor = Some(value.parse().map_err(|_| {
                    ParamError(format!(
                        "`cursor` must be the number a `Stream-Cursor` header gave, got {value:?}"
                    ))
                })?);
            }
            _ => {
                params.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE_CHANGES).contains(n))
                    .ok_or_else(|| {
                        ParamError(format!(
                            "`limit` must be a number of changes from 1 to {MAX_PAGE_CHANGES}, got {value:?}"
                        ))
                    })?;
            }
        }
        seen.push(name);
    }
    if !rest.is_empty() {
        params.rest = Some(rest.join("&"));
    }
    Ok(params)
}

fn parse_after(value: &str) -> Result<After, ParamError> {
    if value == "now" {
        return Ok(After::Now);
    }
    let id: EventId = value.parse().map_err(|()| {
        ParamError(format!(
            "`after` must be an event id `{{stream}}:{{epoch}}:{{seq}}` (as the `Stream-Next-Offset` header or an SSE event's `id:` gave it) or `now`, got {value:?}"
        ))
    })?;
    Ok(After::Id(id))
}

fn parse_wait(value: &str) -> Result<Duration, ParamError> {
    humantime::parse_duration(value)
        .ok()
        .filter(|wait| *wait <= MAX_WAIT)
        .ok_or_else(|| {
            ParamError(format!(
                "`wait` must be a duration with a unit such as 30s or 500ms, at most {}, got {value:?}",
                humantime::format_duration(MAX_WAIT)
            ))
        })
}

/// The cursor of a long-poll answer: the current 20-second interval, and always past the
/// client's own (by a random jump of `jitter_secs`, in intervals, at least one) so that a
/// cached answer carrying a cursor never sends the client back to the same URL.
pub fn next_cursor(now: SystemTime, client: Option<u64>, jitter_secs: u64) -> u64 {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let current = secs.saturating_sub(CURSOR_EPOCH_SECS) / CURSOR_INTERVAL_SECS;
    match client {
        Some(client) if client >= current => {
            client.saturating_add((jitter_secs / CURSOR_INTERVAL_SECS).max(1))
        }
        _ => current,
    }
}

/// One change of a page.
#[derive(Debug, Clone)]
pub struct Item {
    /// Patch or snapshot.
    pub kind: ChangeKind,
    /// Its event id.
    pub id: String,
    /// When it was published.
    pub at: SystemTime,
    /// The patch, or the whole document (JSON).
    pub payload: Bytes,
}

/// A page's body: `{"schema", "stream", "changes": [{"kind", "id", "time", "payload"}],
/// "next", "up_to_date"}`, payloads embedded as they are (already JSON, never re-parsed).
pub fn page_body(stream: &str, items: &[Item], next: &str, up_to_date: bool) -> Vec<u8> {
    let payloads: usize = items.iter().map(|i| i.payload.len() + 96).sum();
    let mut out = Vec::with_capacity(payloads + 128);
    out.extend_from_slice(b"{\"schema\":");
    push_json_string(&mut out, schemas::CHANGES);
    out.extend_from_slice(b",\"stream\":");
    push_json_string(&mut out, stream);
    out.extend_from_slice(b",\"changes\":[");
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"kind\":");
        push_json_string(&mut out, item.kind.as_str());
        out.extend_from_slice(b",\"id\":");
        push_json_string(&mut out, &item.id);
        out.extend_from_slice(b",\"time\":");
        push_json_string(&mut out, &rfc3339(item.at));
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(&item.payload);
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"next\":");
    push_json_string(&mut out, next);
    out.extend_from_slice(if up_to_date {
        b",\"up_to_date\":true}"
    } else {
        b",\"up_to_date\":false}"
    });
    out
}

fn push_json_string(out: &mut Vec<u8>, text: &str) {
    // Writing a string to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// What kind of answer a response is, for its cache headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// A page cut by its bounds, after an id: the same URL always answers the same changes.
    Range,
    /// A page that reaches the stream's top (or starts from the current document): it grows
    /// as the stream changes.
    Tail,
    /// Never stored: `after=now`, a long-poll's timeout, a refusal, a position gone.
    Uncached,
}

/// `Cache-Control` for an answer of `freshness`; `shared`: whether a shared cache may keep it
/// (a stream anyone may read; a dynamic stream, read under a token, is `private`).
pub fn cache_control(freshness: Freshness, shared: bool) -> String {
    let scope = if shared { "public" } else { "private" };
    match freshness {
        Freshness::Range => format!("{scope}, max-age={}, immutable", RANGE_MAX_AGE.as_secs()),
        Freshness::Tail => format!("{scope}, max-age={}", TAIL_MAX_AGE.as_secs()),
        Freshness::Uncached => "no-store".to_owned(),
    }
}

/// The query without the catch-up parameters and the proxy token: the start of a read of the
/// same stream or view (what a `410` points to).
fn restart_link(name: &str, rest: Option<&str>) -> String {
    let kept: Vec<&str> = rest
        .unwrap_or("")
        .split('&')
        .filter(|p| {
            let key = p.split_once('=').map_or(*p, |(k, _)| k);
            !p.is_empty()
                && !key.eq_ignore_ascii_case(crate::proxy::target::TOKEN_PARAM)
                && !crate::views::spec::RESERVED.contains(&key)
        })
        .collect();
    let path = format!(
        "/streams/{}/changes",
        percent_encoding::utf8_percent_encode(name, SEGMENT)
    );
    if kept.is_empty() {
        path
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// What a path segment must escape.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// `GET /streams/{name}/changes`.
pub async fn changes(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    uri: http::Uri,
    headers: HeaderMap,
) -> Response {
    let params = match parse_params(uri.query()) {
        Ok(params) => params,
        Err(error) => return json_error(StatusCode::BAD_REQUEST, &error.0),
    };
    let opened = state
        .subscriptions
        .open(&name, params.rest.as_deref(), &headers, &Resume::Fresh)
        .await;
    let open = match opened {
        None => {
            return json_error(
                StatusCode::NOT_FOUND,
                &format!("no stream named {name:?}; GET /streams lists them"),
            );
        }
        Some(Err(refusal)) => {
            let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_REQUEST);
            let mut response = json_error(status, &refusal.message);
            if let Some(retry) = retry_after(status) {
                response.headers_mut().insert(header::RETRY_AFTER, retry);
            }
            return response;
        }
        Some(Ok(open)) => open,
    };
    read(
        open,
        &name,
        &params,
        &headers,
        state.subscriptions.gzip_level(),
    )
    .await
}

/// Answers a read of `open`'s stream: a page from history, or (with `wait`) the first change
/// after the position once it comes, else `204` when the wait is over.
async fn read(
    mut open: Open,
    name: &str,
    params: &Params,
    headers: &HeaderMap,
    level: crate::wire::gzip::Level,
) -> Response {
    let shared = open.dynamic.is_none();
    let named: Option<Arc<str>> = open.dynamic.as_ref().map(|(name, _)| name.clone());
    let stream = open.subscription.stream().clone();
    if let After::Id(id) = &params.after
        && id.stream != stream.name()
    {
        // A view's ids name the view (`fleet@~…`), whatever query asked for it.
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "`after` is an event id of {:?}, not of {:?}",
                id.stream,
                stream.name()
            ),
        );
    }
    let deadline = tokio::time::Instant::now() + params.wait.unwrap_or(Duration::ZERO);
    let cursor = params.wait.map(|_| {
        let jitter = rand::random::<u64>() % 3600 + 1;
        next_cursor(SystemTime::now(), params.cursor, jitter)
    });
    // `after=now` is the top at the time of the request; the live receiver was taken before,
    // so no change after it is missed.
    let after = match &params.after {
        After::Now => {
            let (epoch, seq) = stream.position();
            After::Id(stream.event_id_in(epoch, seq))
        }
        other => other.clone(),
    };
    loop {
        let answer = match &after {
            After::Id(id) => after_id(&stream, id, params.limit),
            _ => from_start(&stream, params.limit),
        };
        let gone = |message: String| {
            let link = restart_link(name, params.rest.as_deref());
            let body = serde_json::json!({
                "schema": schemas::CHANGES_GONE,
                "status": 410,
                "message": message,
                "stream": stream.name(),
                "snapshot": link,
            });
            let mut response = json_response(StatusCode::GONE, body.to_string().into());
            set(&mut response, header::CACHE_CONTROL, "no-store");
            finish(&mut response, cursor, named.as_deref());
            response
        };
        // `ahead`: the position is past this node's top (a cluster node a change behind the
        // one the client read from); a long-poll waits for the node to get there.
        let (waiting, ahead) = match answer {
            Read::Page(page) => {
                let mut response = page.respond(stream.name(), shared, headers, level);
                finish(&mut response, cursor, named.as_deref());
                return response;
            }
            Read::Gone { message, ahead } => {
                if !(ahead && params.wait.is_some() && tokio::time::Instant::now() < deadline) {
                    return gone(message);
                }
                (None, Some(message))
            }
            Read::Nothing(next) => (next, None),
        };
        if params.wait.is_none() {
            if matches!(params.after, After::Now) {
                let page = Page::empty(waiting);
                let mut response = page.respond(stream.name(), shared, headers, level);
                set(&mut response, header::CACHE_CONTROL, "no-store");
                response.headers_mut().remove(header::ETAG);
                finish(&mut response, cursor, named.as_deref());
                return response;
            }
            if matches!(after, After::Start) {
                return no_document_yet(&stream);
            }
            let mut response = Page::empty(waiting).respond(stream.name(), shared, headers, level);
            finish(&mut response, cursor, named.as_deref());
            return response;
        }
        match tokio::time::timeout_at(deadline, open.subscription.live.recv()).await {
            Err(_) => {
                if let Some(message) = ahead {
                    return gone(message);
                }
                let mut response = Response::new(Body::empty());
                *response.status_mut() = StatusCode::NO_CONTENT;
                set(&mut response, header::CACHE_CONTROL, "no-store");
                if let Some(next) = waiting {
                    set(&mut response, NEXT_OFFSET, &next);
                    set(&mut response, UP_TO_DATE, "true");
                }
                finish(&mut response, cursor, named.as_deref());
                return response;
            }
            Ok(Err(RecvError::Closed)) => {
                let mut response = json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("stream {:?} ended; ask again", stream.name()),
                );
                set(&mut response, header::RETRY_AFTER, "1");
                return response;
            }
            // A change, a reset, a lag (or a failure, a keep-alive, which change nothing a
            // page holds): read history again, which is cheap.
            Ok(_) => {}
        }
    }
}

/// What history says about a read.
enum Read {
    /// A page to send.
    Page(Page),
    /// Nothing after the position yet (its id, to name as the next position; `None` when the
    /// stream has no document yet).
    Nothing(Option<String>),
    /// History cannot answer exactly; why, and whether because the position is past the top.
    Gone {
        /// Why, for the client.
        message: String,
        /// The position is past the stream's top (same epoch).
        ahead: bool,
    },
}

/// A page of changes, and what it is.
struct Page {
    items: Vec<Item>,
    next: String,
    up_to_date: bool,
    freshness: Freshness,
    etag: String,
}

impl Page {
    /// Nothing after `next` (the top): an empty page, up to date.
    fn empty(next: Option<String>) -> Page {
        let next = next.unwrap_or_default();
        Page {
            etag: format!("\"{next}~\""),
            items: Vec::new(),
            next,
            up_to_date: true,
            freshness: Freshness::Tail,
        }
    }

    /// The page as a response: gzip-compressed when the client accepts it, with a tag of its
    /// own (a strong tag names one byte sequence; either tag revalidates, since both name the
    /// same page) and `Vary: Accept-Encoding`, so a shared cache keeps the two apart.
    fn respond(
        self,
        stream: &str,
        shared: bool,
        headers: &HeaderMap,
        level: crate::wire::gzip::Level,
    ) -> Response {
        let gzip = super::subscribe::accepts_gzip(headers);
        let gzip_etag = gzip_tag(&self.etag);
        let etag = if gzip { &gzip_etag } else { &self.etag };
        let mut response =
            if if_none_match(headers, &self.etag) || if_none_match(headers, &gzip_etag) {
                let mut response = Response::new(Body::empty());
                *response.status_mut() = StatusCode::NOT_MODIFIED;
                response
            } else {
                let body = page_body(stream, &self.items, &self.next, self.up_to_date);
                if gzip {
                    let mut response =
                        json_response(StatusCode::OK, crate::wire::gzip::member(&body, level));
                    set(&mut response, header::CONTENT_ENCODING, "gzip");
                    response
                } else {
                    json_response(StatusCode::OK, body.into())
                }
            };
        response
            .headers_mut()
            .append(header::VARY, HeaderValue::from_static("accept-encoding"));
        set(
            &mut response,
            header::CACHE_CONTROL,
            &cache_control(self.freshness, shared),
        );
        set(&mut response, header::ETAG, etag);
        set(&mut response, NEXT_OFFSET, &self.next);
        if self.up_to_date {
            set(&mut response, UP_TO_DATE, "true");
        }
        response
    }
}

/// The changes after `id`, from history.
fn after_id(stream: &Stream, id: &EventId, limit: usize) -> Read {
    let Some(read) = stream.changes_after(id.epoch, id.seq, limit, MAX_PAGE_BYTES) else {
        let (epoch, top) = stream.position();
        let ahead = id.epoch == epoch && id.seq > top;
        let why = if id.epoch != epoch {
            format!(
                "{id} is of epoch {}, the stream is in epoch {epoch} (it started over)",
                id.epoch
            )
        } else if id.seq > top {
            format!("{id} is ahead of this node's position {top}")
        } else {
            format!("{id} is older than the stream's history")
        };
        return Read::Gone {
            message: format!("{why}; start again from the snapshot"),
            ahead,
        };
    };
    let Some(last) = read.changes.last() else {
        return Read::Nothing(Some(id.to_string()));
    };
    let next = last.id().to_string();
    let etag = format!("\"{id}~{}\"", last.seq);
    Read::Page(Page {
        items: read
            .changes
            .iter()
            .map(|c| Item {
                kind: c.kind,
                id: c.id().to_string(),
                at: c.at,
                payload: c.payload.clone(),
            })
            .collect(),
        next,
        up_to_date: read.complete,
        freshness: if read.complete {
            Freshness::Tail
        } else {
            Freshness::Range
        },
        etag,
    })
}

/// The current document, then the changes after it.
fn from_start(stream: &Stream, limit: usize) -> Read {
    let Some(snapshot) = stream.snapshot() else {
        return Read::Nothing(None);
    };
    let first = stream.event_id_in(snapshot.epoch, snapshot.seq);
    let budget = MAX_PAGE_BYTES.saturating_sub(snapshot.json.len());
    let mut items = vec![Item {
        kind: ChangeKind::Snapshot,
        id: first.to_string(),
        at: snapshot.at,
        payload: snapshot.json.clone(),
    }];
    let rest = (limit > 1 && budget > 0)
        .then(|| stream.changes_after(snapshot.epoch, snapshot.seq, limit - 1, budget))
        .flatten();
    let (up_to_date, last) = match &rest {
        Some(rest) => (
            rest.complete,
            rest.changes.last().map_or(snapshot.seq, |c| c.seq),
        ),
        None => (stream.seq() == snapshot.seq, snapshot.seq),
    };
    if let Some(rest) = rest {
        items.extend(rest.changes.iter().map(|c| Item {
            kind: c.kind,
            id: c.id().to_string(),
            at: c.at,
            payload: c.payload.clone(),
        }));
    }
    let next = stream.event_id_in(snapshot.epoch, last).to_string();
    Read::Page(Page {
        etag: format!("\"{first}~{last}+s\""),
        items,
        next,
        up_to_date,
        // The document it starts from changes with the stream: never immutable.
        freshness: Freshness::Tail,
    })
}

/// A read from the start of a stream that has no document yet (and no wait): `503`, retry.
fn no_document_yet(stream: &Stream) -> Response {
    let mut response = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("stream {:?} has no document yet", stream.name()),
    );
    set(&mut response, header::RETRY_AFTER, "1");
    response
}

/// The headers every answer of a read carries: the cursor of a long-poll, the dynamic
/// stream's name.
fn finish(response: &mut Response, cursor: Option<u64>, dynamic: Option<&str>) {
    if let Some(cursor) = cursor {
        set(response, CURSOR, &cursor.to_string());
    }
    if let Some(name) = dynamic {
        set(response, super::proxy::STREAM_HEADER, name);
    }
}

/// The tag of a page's gzip representation: its plain tag's value with `+gzip`.
fn gzip_tag(etag: &str) -> String {
    match etag.strip_suffix('"') {
        Some(open) => format!("{open}+gzip\""),
        None => format!("{etag}+gzip"),
    }
}

/// Whether `If-None-Match` names `etag` (or `*`).
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

fn set(response: &mut Response, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    set(&mut response, header::CONTENT_TYPE, "application/json");
    response
}

/// A JSON error (`{"status", "message"}`) that no cache keeps.
fn json_error(status: StatusCode, message: &str) -> Response {
    let mut response = json_response(status, error_body(status, message).to_string().into());
    set(&mut response, header::CACHE_CONTROL, "no-store");
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parameters_are_read_and_the_rest_names_the_stream() {
        let p = parse_params(Some(
            "route=R1&after=fleet%401:5:7&wait=30s&cursor=12&limit=3&fields=a",
        ))
        .expect("valid");
        assert_eq!(
            p.after,
            After::Id(EventId {
                stream: "fleet@1".into(),
                epoch: 5,
                seq: 7
            })
        );
        assert_eq!(p.wait, Some(Duration::from_secs(30)));
        assert_eq!((p.cursor, p.limit), (Some(12), 3));
        assert_eq!(p.rest.as_deref(), Some("route=R1&fields=a"));
        let start = parse_params(None).expect("valid");
        assert_eq!(
            (start.after, start.limit, start.rest),
            (After::Start, 100, None)
        );
        assert_eq!(
            parse_params(Some("after=now")).expect("now").after,
            After::Now
        );
    }

    #[test]
    fn bad_parameters_name_themselves() {
        let error = |q: &str| parse_params(Some(q)).unwrap_err().0;
        assert!(error("after=garbage").starts_with("`after` must be an event id"));
        assert!(error("after=fleet:1:2&wait=30").starts_with("`wait` must be a duration"));
        assert!(error("wait=61s").contains("at most 1m"));
        assert!(error("wait=-1s").starts_with("`wait`"));
        assert!(error("cursor=x").starts_with("`cursor`"));
        assert!(error("limit=0").starts_with("`limit`"));
        assert!(error("limit=101").starts_with("`limit`"));
        assert!(error("after=fleet:1:2&after=fleet:1:3").contains("more than once"));
    }

    #[test]
    fn pages_are_json_of_the_documented_shape() {
        let items = [
            Item {
                kind: ChangeKind::Snapshot,
                id: "s:1:1".into(),
                at: UNIX_EPOCH,
                payload: Bytes::from_static(br#"{"a":"\u00e9"}"#),
            },
            Item {
                kind: ChangeKind::Patch,
                id: "s:1:2".into(),
                at: UNIX_EPOCH,
                payload: Bytes::from_static(br#"[{"op":"replace","path":"/a","value":1}]"#),
            },
        ];
        let body: serde_json::Value =
            serde_json::from_slice(&page_body("s\"q", &items, "s:1:2", true)).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!({
                "schema": "patchwire.changes.v1",
                "stream": "s\"q",
                "changes": [
                    {"kind": "snapshot", "id": "s:1:1", "time": "1970-01-01T00:00:00.000Z", "payload": {"a": "é"}},
                    {"kind": "patch", "id": "s:1:2", "time": "1970-01-01T00:00:00.000Z",
                     "payload": [{"op": "replace", "path": "/a", "value": 1}]},
                ],
                "next": "s:1:2",
                "up_to_date": true,
            })
        );
    }

    #[test]
    fn cache_headers_by_kind_of_answer() {
        assert_eq!(
            cache_control(Freshness::Range, true),
            "public, max-age=31536000, immutable"
        );
        assert_eq!(cache_control(Freshness::Tail, true), "public, max-age=1");
        assert_eq!(cache_control(Freshness::Tail, false), "private, max-age=1");
        assert_eq!(cache_control(Freshness::Uncached, true), "no-store");
    }

    #[test]
    fn the_restart_link_keeps_the_view_and_drops_tokens() {
        assert_eq!(restart_link("fleet", None), "/streams/fleet/changes");
        assert_eq!(
            restart_link("fleet", Some("route=R1&X-Sd-Token=secret&lastEventId=x")),
            "/streams/fleet/changes?route=R1"
        );
        assert_eq!(restart_link("a b", None), "/streams/a%20b/changes");
    }

    proptest! {
        #[test]
        fn cursors_never_send_a_client_back(
            secs in 1_728_432_000u64..4_000_000_000,
            client in proptest::option::of(0u64..200_000_000),
            jitter in 1u64..=3600,
        ) {
            let now = UNIX_EPOCH + Duration::from_secs(secs);
            let cursor = next_cursor(now, client, jitter);
            let current = (secs - CURSOR_EPOCH_SECS) / CURSOR_INTERVAL_SECS;
            prop_assert!(cursor >= current);
            if let Some(client) = client {
                prop_assert!(cursor > client || client < current);
                prop_assert_ne!(cursor, client);
            }
        }
    }
}
