//! The OpenAPI 3.1 document of a [`Surface`]: every HTTP endpoint the configuration serves.
//!
//! A stream is one path per configured stream and named view (`/streams/fleet`,
//! `/streams/fleet@r1`), so that each answers with its own document schema. Its
//! `text/event-stream` answer is described as far as OpenAPI 3.1 can (a string; the events are
//! in the AsyncAPI document, `/asyncapi.json`, linked by `x-asyncapi-channel`).

use serde_json::{Map, Value, json};

use super::schemas::{self, reference};
use super::{DocumentSchemas, Source, Surface};

/// The OpenAPI 3.1 document of `surface` with its streams' `documents`.
pub fn document(surface: &Surface, documents: &DocumentSchemas) -> Value {
    let mut paths = Map::new();
    paths.insert("/streams".into(), listing());
    for stream in &surface.streams {
        paths.insert(
            format!("/streams/{}", stream.name),
            stream_path(stream, None, surface.push),
        );
        for view in stream.views.keys() {
            paths.insert(
                format!("/streams/{}@{view}", stream.name),
                stream_path(stream, Some(view), surface.push),
            );
        }
    }
    // Catch-up over plain HTTP, one path per stream and named view as above.
    for stream in &surface.streams {
        paths.insert(
            format!("/streams/{}/changes", stream.name),
            catchup_path(stream, None),
        );
        for view in stream.views.keys() {
            paths.insert(
                format!("/streams/{}@{view}/changes", stream.name),
                catchup_path(stream, Some(view)),
            );
        }
    }
    // `POST /streams/{name}/poll`, routed for every name.
    paths.insert("/streams/{name}/poll".into(), poll_now(surface));
    paths.insert("/admin/reload".into(), reload(surface));
    paths.insert("/schemas/{file}".into(), served_schemas());
    paths.insert(
        "/healthz".into(),
        plain_get("healthz", "Liveness: `ok`.", &[]),
    );
    paths.insert("/readyz".into(), readyz());
    console(&mut paths);
    paths.insert("/metrics".into(), metrics());
    paths.insert("/asyncapi.json".into(), contract("asyncapi", "The AsyncAPI 3.0 document of this deployment's streams (document schemas inferred from the current documents)."));
    paths.insert(
        "/openapi.json".into(),
        contract("openapi", "This document."),
    );
    if surface.websocket {
        paths.insert("/ws".into(), websocket());
    }
    if let Some(webhooks) = &surface.webhooks {
        admin(&mut paths, webhooks.admin, &webhooks.endpoints, surface);
    }
    if surface.proxy {
        paths.insert("/{target}".into(), proxy());
        paths.insert("/streams/~{id}".into(), dynamic_native(surface.push));
        paths.insert("/streams/~{id}/changes".into(), dynamic_catchup());
    }
    let mut components = Map::new();
    let mut all_schemas = schemas::shared();
    all_schemas.extend(documents.components(surface));
    components.insert("schemas".into(), Value::Object(all_schemas));
    components.insert("responses".into(), shared_responses());
    components.insert("securitySchemes".into(), security_schemes(surface));
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "patchwire",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The HTTP endpoints of this patchwire deployment, generated from its configuration. Streams answer text/event-stream (described in /asyncapi.json) or, with Accept: application/json, their current document.",
        },
        "servers": [{"url": format!("http://{}", surface.listen)}],
        "paths": paths,
        "components": components,
    })
}

fn problem(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": reference("Problem")}}})
}

fn shared_responses() -> Value {
    json!({
        "BadRequest": problem("The request is malformed; the message says what was expected."),
        "Unauthorized": problem("A missing or wrong bearer token."),
        "NotFound": problem("No such resource."),
        "Timeout": problem("The body did not arrive within server.body_timeout."),
        "TooLarge": problem("The body is larger than allowed."),
        "Unavailable": problem("Not available now; retry."),
    })
}

fn response_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/responses/{name}")})
}

fn listing() -> Value {
    json!({"get": {
        "operationId": "listStreams",
        "summary": "Every stream: sequence, subscribers, upstream state, views, sinks; the proxy mode's dynamic streams counted; the cluster's nodes.",
        "responses": {"200": {"description": "The listing.", "content": {"application/json": {"schema": {
            "type": "object",
            "properties": {
                "streams": {"type": "array", "items": {"type": "object", "properties": {
                    "name": {"type": "string"},
                    "path": {"type": "string"},
                    "epoch": {"type": "integer", "minimum": 0},
                    "seq": {"type": "integer", "minimum": 0},
                    "subscribers": {"type": "integer", "minimum": 0},
                    "changes_published": {"type": "integer", "minimum": 0},
                    "sent": {"type": "object", "properties": {"events": {"type": "integer", "minimum": 0}, "bytes": {"type": "integer", "minimum": 0}}, "required": ["events", "bytes"], "description": "Written to its subscribers and its views', over SSE and WebSocket, after gzip; keep-alives excluded."},
                    "failing": {"type": ["object", "null"]},
                    "upstream": {"type": ["object", "null"], "properties": {
                        "url": {"type": "string"},
                        "interval_ms": {"type": "integer", "minimum": 0},
                        "requests": {"type": "integer", "minimum": 0},
                        "body_bytes": {"type": "integer", "minimum": 0, "description": "The bodies its requests received, decompressed."},
                        "subscriber_requests": {"type": "integer", "minimum": 0, "description": "The requests its subscribers would have sent polling the upstream themselves."},
                        "subscriber_bytes": {"type": "integer", "minimum": 0, "description": "What those requests would have downloaded."},
                        "consecutive_failures": {"type": "integer", "minimum": 0},
                    }},
                }, "required": ["name", "seq", "subscribers", "sent"]}},
                "dynamic": {"type": ["object", "null"]},
                "cluster": {"type": "object"},
            },
            "required": ["streams", "dynamic"],
        }}}}},
    }})
}

/// An operation id made of `prefix` and a stream's (or view's) name.
fn operation_id(prefix: &str, stream: &str, view: Option<&str>) -> String {
    let name = match view {
        None => stream.to_owned(),
        Some(view) => format!("{stream}@{view}"),
    };
    format!("{prefix}:{name}")
}

/// Whether a stream has views (named, or ad hoc over its aliases).
fn has_views(stream: &super::StreamSurface) -> bool {
    !stream.views.is_empty() || !stream.aliases.is_empty()
}

/// The schema of what a stream's (or a named view's) path answers as its document: a stream
/// with views may answer a view's (`?view=`, `?fields=`...), whose entities may lack fields
/// the stream's have.
fn document_schema(stream: &super::StreamSurface, view: Option<&str>) -> Value {
    match view {
        None if has_views(stream) => json!({"anyOf": [
            reference(&DocumentSchemas::name(&stream.name, None)),
            reference(&DocumentSchemas::any_view(&stream.name)),
        ]}),
        _ => reference(&DocumentSchemas::name(&stream.name, view)),
    }
}

/// The query parameters that ask a stream's path for a view: `view=` and, where ad hoc views
/// are allowed, its aliases, `where` and `fields` (none on a named view's own path).
fn view_parameters(stream: &super::StreamSurface, view: Option<&str>) -> Vec<Value> {
    let mut parameters = Vec::new();
    if view.is_some() || !has_views(stream) {
        return parameters;
    }
    if !stream.views.is_empty() {
        parameters.push(json!({"name": "view", "in": "query", "required": false, "schema": {"type": "string", "examples": stream.views.keys().collect::<Vec<_>>()}, "description": "A named view of the stream."}));
    }
    if stream.ad_hoc_views {
        for alias in &stream.aliases {
            parameters.push(json!({"name": alias, "in": "query", "required": false, "schema": {"type": "string", "minLength": 1}, "description": "An ad hoc view: entities whose alias has one of these comma-separated values."}));
        }
        parameters.push(json!({"name": "where", "in": "query", "required": false, "schema": {"type": "string", "minLength": 1}, "description": "An ad hoc view: an RFC 9535 filter expression evaluated on each entity (@)."}));
        parameters.push(json!({"name": "fields", "in": "query", "required": false, "schema": {"type": "string", "minLength": 1}, "description": "An ad hoc view: the JSON Pointers kept of each entity, comma-separated."}));
    }
    parameters
}

fn stream_path(stream: &super::StreamSurface, view: Option<&str>, surface_push: bool) -> Value {
    let has_views = has_views(stream);
    let document = document_schema(stream, view);
    let mut parameters = vec![
        json!({"name": "lastEventId", "in": "query", "required": false, "schema": {"type": "string"}, "description": "Resume after this event id (SSE), for clients that cannot set Last-Event-ID."}),
        json!({"name": "Last-Event-ID", "in": "header", "required": false, "schema": {"type": "string"}, "description": "Resume after this event id (SSE)."}),
        json!({"name": "If-None-Match", "in": "header", "required": false, "schema": {"type": "string"}, "description": "The JSON view's ETag: 304 while the document is that version."}),
    ];
    parameters.extend(view_parameters(stream, view));
    let channel = match view {
        None => stream.name.clone(),
        Some(view) => format!("{}.views.{view}", stream.name),
    };
    let mut responses = Map::new();
    responses.insert(
        "200".into(),
        json!({
            "description": "With Accept: application/json, the current document (ETag \"{epoch}-{seq}\"); otherwise the Server-Sent Events stream: a snapshot, then patches (see /asyncapi.json).",
            "headers": {"ETag": {"schema": {"type": "string"}, "description": "JSON view only."}},
            "content": {
                "application/json": {"schema": document},
                "text/event-stream": {"schema": {"type": "string"}, "x-asyncapi-channel": channel},
            },
        }),
    );
    responses.insert(
        "304".into(),
        json!({"description": "If-None-Match names the current version."}),
    );
    if has_views {
        responses.insert(
            "400".into(),
            problem(
                "A bad filter, named view or event id parameter: the message says which and why.",
            ),
        );
        responses.insert(
            "404".into(),
            problem("No such named view; the message lists them."),
        );
        responses.insert("429".into(), problem("The stream (max_views) or the server (views.max_total) has as many views as allowed."));
    }
    responses.insert(
        "503".into(),
        problem("The stream has no document yet (Retry-After: 1)."),
    );
    let mut path = Map::new();
    path.insert(
        "get".into(),
        json!({
            "operationId": operation_id("getStream", &stream.name, view),
            "summary": match view {
                None => format!("Stream {:?}: Server-Sent Events, or the current document as JSON.", stream.name),
                Some(view) => format!("The named view {view:?} of stream {:?}.", stream.name),
            },
            "parameters": parameters,
            "responses": responses,
        }),
    );
    // `POST`/`PATCH /streams/{name}` are routed for every name: a push stream takes the
    // document, any other path refuses it (from the request head, before any body is read).
    let pushable = view.is_none() && stream.source == Source::Push;
    let push_responses = |extra: &[(&str, &str)]| {
        let mut responses = Map::new();
        if pushable {
            responses.insert("200".into(), json!({"description": "Published (or nothing changed), and durable where webhooks are configured.", "content": {"application/json": {"schema": reference("PushResult")}}}));
            responses.insert("400".into(), response_ref("BadRequest"));
        }
        if surface_push {
            responses.insert("401".into(), response_ref("Unauthorized"));
        } else {
            responses.insert(
                "403".into(),
                problem("The push source is disabled (no [push] table)."),
            );
        }
        if pushable {
            responses.insert("408".into(), response_ref("Timeout"));
            responses.insert("413".into(), response_ref("TooLarge"));
            for (status, description) in extra {
                responses.insert((*status).into(), problem(description));
            }
            responses.insert("503".into(), response_ref("Unavailable"));
        } else if view.is_some() {
            responses.insert(
                "404".into(),
                problem("A view is not a stream: only push streams accept documents."),
            );
        } else {
            responses.insert("409".into(), problem("This stream is polled from its upstream: only streams with source = \"push\" accept documents."));
        }
        Value::Object(responses)
    };
    let security = if surface_push {
        json!([{"pushToken": []}])
    } else {
        json!([])
    };
    let refused = if pushable {
        ""
    } else {
        " Refused here: only push streams accept documents."
    };
    path.insert(
        "post".into(),
        json!({
            "operationId": operation_id("pushDocument", &stream.name, view),
            "summary": format!("Publish a whole new document.{refused}"),
            "security": security,
            "requestBody": {"required": true, "content": {"application/json": {"schema": {}}}},
            "responses": push_responses(&[("409", "Other publishers kept winning (a cluster).")]),
        }),
    );
    path.insert(
        "patch".into(),
        json!({
            "operationId": operation_id("patchDocument", &stream.name, view),
            "summary": format!("Apply an RFC 6902 patch to the current document, atomically.{refused}"),
            "security": security,
            "requestBody": {"required": true, "content": {"application/json-patch+json": {"schema": reference("PatchRequest")}, "application/json": {"schema": reference("PatchRequest")}}},
            "responses": push_responses(&[("409", "No document yet, or other publishers kept winning (a cluster)."), ("422", "An operation failed; nothing was published.")]),
        }),
    );
    Value::Object(path)
}

/// `GET /streams/{name}/changes` (or a named view's `/streams/{name}@{view}/changes`): a page
/// of changes (`patchwire.changes.v1`) with this stream's patch and document schemas.
fn catchup_path(stream: &super::StreamSurface, view: Option<&str>) -> Value {
    let page = schemas::catchup_page(
        schemas::patch_name(stream.allow_move),
        document_schema(stream, view),
    );
    let mut parameters = catchup_parameters(
        "an event id `{stream}:{epoch}:{seq}` of this stream or view (Stream-Next-Offset, an SSE event's id)",
    );
    parameters.extend(view_parameters(stream, view));
    let mut responses = catchup_responses(page);
    responses.insert("400".into(), problem("A malformed `after`, `wait`, `limit` or `cursor` (or one given twice), an event id of another stream, or a bad filter: the message says which."));
    if has_views(stream) {
        responses.insert(
            "404".into(),
            problem("No such named view; the message lists them."),
        );
        responses.insert("429".into(), problem("The stream (max_views) or the server (views.max_total) has as many views as allowed."));
    }
    responses.insert(
        "503".into(),
        problem("The stream has no document yet, or ended (Retry-After: 1)."),
    );
    json!({"get": {
        "operationId": operation_id("catchUp", &stream.name, view),
        "summary": match view {
            None => format!("Catch-up for stream {:?}: the changes after a position, as one JSON page (long-poll with wait).", stream.name),
            Some(view) => format!("Catch-up for the named view {view:?} of stream {:?}.", stream.name),
        },
        "parameters": parameters,
        "responses": responses,
    }})
}

/// The parameters of every catch-up path: `after` (`position` says what it is there),
/// `wait`, `limit`, `cursor` and `If-None-Match`.
fn catchup_parameters(position: &str) -> Vec<Value> {
    vec![
        json!({"name": "after", "in": "query", "required": false, "schema": {"type": "string", "minLength": 1}, "description": format!("The position to read after: {position}, or `now` (only what comes next). Without it, the current document first.")}),
        json!({"name": "wait", "in": "query", "required": false, "schema": {"type": "string", "pattern": "^[0-9]+(ms|s)$"}, "description": "Long-poll: wait up to this long (at most 60s; 30s, 500ms) for a change when there is none after the position; 204 when none came."}),
        json!({"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 100}, "description": "Most changes in the page (default 100; a page also stops at 1 MiB)."}),
        json!({"name": "cursor", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0}, "description": "The last Stream-Cursor header, echoed back on long-polls (against CDN cache loops)."}),
        json!({"name": "If-None-Match", "in": "header", "required": false, "schema": {"type": "string"}, "description": "A page's ETag: 304 while the page is the same."}),
    ]
}

/// The answers every catch-up path gives: a `page`, a long-poll's timeout, 304 and 410, with
/// the position headers.
fn catchup_responses(page: Value) -> Map<String, Value> {
    let string = json!({"type": "string"});
    let position_headers = json!({
        "Stream-Next-Offset": {"schema": string, "description": "The event id to pass as `after` next."},
        "Stream-Up-To-Date": {"schema": {"const": "true"}, "description": "Present when the answer reaches the current document."},
        "Stream-Cursor": {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "description": "Long-polls only: echo it as `cursor`."},
        "Cache-Control": {"schema": string, "description": "A completed range: public (private for a dynamic stream), max-age=31536000, immutable; a page reaching the top: max-age=1; never stored: no-store (after=now, a timeout)."},
    });
    let mut page_headers = position_headers.clone();
    if let Some(headers) = page_headers.as_object_mut() {
        headers.insert(
            "ETag".into(),
            json!({"schema": string, "description": "Names the page."}),
        );
    }
    let mut responses = Map::new();
    responses.insert("200".into(), json!({"description": "A page of changes, oldest first: a snapshot (the whole document) or patches, each with its event id.", "headers": page_headers, "content": {"application/json": {"schema": page}}}));
    responses.insert("204".into(), json!({"description": "A long-poll's wait ended without a change.", "headers": position_headers}));
    responses.insert(
        "304".into(),
        json!({"description": "If-None-Match names this page."}),
    );
    responses.insert("410".into(), json!({"description": "History cannot answer this position exactly (older than the stream's history, another epoch, ahead of this node): start again from `snapshot`.", "content": {"application/json": {"schema": reference(crate::schemas::CHANGES_GONE)}}}));
    responses
}

/// A bearer-token refusal: `403` when no token is configured, else `401`.
fn refusals(responses: &mut Map<String, Value>, configured: bool, disabled: &str) {
    if configured {
        responses.insert("401".into(), response_ref("Unauthorized"));
    } else {
        responses.insert("403".into(), problem(disabled));
    }
}

fn poll_now(surface: &Surface) -> Value {
    let admin = surface.webhooks.as_ref().is_some_and(|w| w.admin);
    let mut security = Vec::new();
    if surface.push {
        security.push(json!({"pushToken": []}));
    }
    if admin {
        security.push(json!({"adminToken": []}));
    }
    let mut responses = Map::new();
    responses.insert("202".into(), json!({"description": "A poll is scheduled now.", "content": {"application/json": {"schema": {"type": "object", "properties": {"stream": {"type": "string"}, "poll": {"const": "scheduled"}}, "required": ["stream", "poll"]}}}}));
    refusals(
        &mut responses,
        surface.push || admin,
        "Polling on request is disabled: it needs the [push] token or webhooks.admin_token.",
    );
    responses.insert("404".into(), response_ref("NotFound"));
    responses.insert(
        "409".into(),
        problem("The stream is pushed (nothing to poll), or polled on demand without subscribers."),
    );
    responses.insert("429".into(), json!({"description": "The upstream's rate limit allows no request now.", "headers": {"Retry-After": {"schema": {"type": "string"}, "description": "Whole seconds."}}, "content": {"application/json": {"schema": reference("Problem")}}}));
    let names: Vec<&str> = surface.streams.iter().map(|s| s.name.as_str()).collect();
    json!({"post": {
        "operationId": "pollNow",
        "summary": "Poll a polled stream's upstream now instead of at its next tick, within its rate limit.",
        "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string", "examples": names}}],
        "security": Value::Array(security),
        "responses": responses,
    }})
}

fn reload(surface: &Surface) -> Value {
    let admin = surface.webhooks.as_ref().is_some_and(|w| w.admin);
    let mut responses = Map::new();
    let answer = json!({"type": "object", "properties": {"reloaded": {"type": "boolean"}}, "required": ["reloaded"]});
    responses.insert("200".into(), json!({"description": "Applied: what changed per stream, the push token, the webhook endpoints, the broker sinks (sinks: per sink its change, the streams and views started and stopped, errors).", "content": {"application/json": {"schema": answer}}}));
    responses.insert(
        "400".into(),
        problem("The server was not started from a configuration file."),
    );
    refusals(
        &mut responses,
        admin,
        "Reloading over HTTP is disabled (webhooks.admin_token is not set; SIGHUP reloads).",
    );
    responses.insert("409".into(), json!({"description": "Nothing changed: a section that cannot change while running differs (needs_restart).", "content": {"application/json": {"schema": answer}}}));
    responses.insert("422".into(), json!({"description": "Nothing changed: the file is invalid (problems).", "content": {"application/json": {"schema": answer}}}));
    let security = if admin {
        json!([{"adminToken": []}])
    } else {
        json!([])
    };
    json!({"post": {
        "operationId": "reloadConfiguration",
        "summary": "Load the configuration file again and apply it, or refuse it changing nothing (as SIGHUP does).",
        "security": security,
        "responses": responses,
    }})
}

fn served_schemas() -> Value {
    let files: Vec<String> = crate::schemas::ALL
        .iter()
        .map(|(name, _)| format!("{name}.json"))
        .collect();
    json!({"get": {
        "operationId": "getSchema",
        "summary": "The JSON Schema (2020-12) of a versioned envelope, named by its `schema` member; the same schemas are components of this document.",
        "parameters": [{"name": "file", "in": "path", "required": true, "schema": {"type": "string", "examples": files}}],
        "responses": {
            "200": {"description": "The schema.", "headers": {"Cache-Control": {"schema": {"type": "string"}}}, "content": {"application/schema+json": {"schema": {"type": "object"}}}},
            "404": problem("No such schema; the message lists them."),
        },
    }})
}

fn readyz() -> Value {
    let body = json!({
        "type": "object",
        "properties": {
            "ready": {"type": "boolean"},
            "checks": {"type": "object", "description": "Per backing service (redis, webhook_outbox): {ok, error}; brokers: each publisher's state (never makes the node unready)."},
            "failed": {"type": "array", "items": {"type": "string"}},
            "message": {"type": "string"},
        },
        "required": ["ready", "checks"],
    });
    json!({"get": {
        "operationId": "readyz",
        "summary": "Readiness: every backing service the node is configured with answers (each checked within 1 s).",
        "responses": {
            "200": {"description": "Ready.", "content": {"application/json": {"schema": body}}},
            "503": {"description": "Not ready: `failed` names what did not answer.", "content": {"application/json": {"schema": body}}},
        },
    }})
}

/// The console: `GET /` and its files.
fn console(paths: &mut Map<String, Value>) {
    for (path, id, content_type, summary) in [
        (
            "/",
            "console",
            "text/html; charset=utf-8",
            "The console: a page showing the streams, their savings and webhooks (reads /streams).",
        ),
        (
            "/console/console.js",
            "consoleScript",
            "text/javascript; charset=utf-8",
            "The console's script.",
        ),
        (
            "/console/console.css",
            "consoleStyle",
            "text/css; charset=utf-8",
            "The console's style sheet.",
        ),
        (
            "/console/icon.svg",
            "consoleIcon",
            "image/svg+xml",
            "The console's icon.",
        ),
    ] {
        paths.insert(path.into(), json!({"get": {
            "operationId": id,
            "summary": summary,
            "parameters": [{"name": "If-None-Match", "in": "header", "required": false, "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "The file (ETag names its bytes).", "headers": {"ETag": {"schema": {"type": "string"}}}, "content": {content_type: {"schema": {"type": "string"}}}},
                "304": {"description": "If-None-Match names this file."},
            },
        }}));
    }
}

fn plain_get(id: &str, summary: &str, extra: &[&str]) -> Value {
    let mut responses = Map::new();
    responses.insert("200".into(), json!({"description": "OK", "content": {"text/plain; charset=utf-8": {"schema": {"type": "string"}}}}));
    for status in extra {
        responses.insert((*status).into(), response_ref("Unavailable"));
    }
    json!({"get": {"operationId": id, "summary": summary, "responses": responses}})
}

fn metrics() -> Value {
    json!({"get": {
        "operationId": "metrics",
        "summary": "Prometheus / OpenMetrics text.",
        "responses": {"200": {"description": "The metrics.", "content": {"application/openmetrics-text; version=1.0.0; charset=utf-8": {"schema": {"type": "string"}}}}},
    }})
}

fn contract(id: &str, summary: &str) -> Value {
    json!({"get": {
        "operationId": id,
        "summary": summary,
        "responses": {"200": {"description": "The document.", "content": {"application/json": {"schema": {"type": "object"}}}}},
    }})
}

fn websocket() -> Value {
    json!({"get": {
        "operationId": "websocket",
        "summary": "Upgrade to a WebSocket carrying many subscriptions (see /asyncapi.json, channel websocket).",
        "parameters": [
            {"name": "X-Sd-Token", "in": "query", "required": false, "schema": {"type": "string"}, "description": "A proxy-mode application token, for dynamic streams."},
        ],
        "responses": {
            "101": {"description": "Switching to the WebSocket protocol."},
            "400": problem("A malformed WebSocket handshake."),
            "403": problem("This Origin may not open a WebSocket here (server.cors.allow_origins)."),
            "426": problem("Not a WebSocket upgrade request (Upgrade: websocket, Sec-WebSocket-Version: 13)."),
        },
    }})
}

/// The proxy mode's refusals and upstream failures, as its JSON answers give them.
fn proxy_errors(responses: &mut Map<String, Value>) {
    for (status, description) in [
        (
            "400",
            "invalid-target: not an http(s) URL, or a malformed X-Sd-Header; bad-view: a malformed X-Sd-Where, X-Sd-Fields, X-Sd-Entities or X-Sd-Key (named in the message).",
        ),
        (
            "401",
            "token-missing, token-unknown, or a signature missing, invalid or expired.",
        ),
        (
            "403",
            "host-not-allowed, address-forbidden, host-unresolvable.",
        ),
        (
            "404",
            "Not a proxy path, no such dynamic stream, or the proxy mode is disabled.",
        ),
        (
            "429",
            "too-many-connections, rate-limited (the token's limits).",
        ),
        (
            "502",
            "The upstream failed (upstream-status, upstream-unavailable, upstream-invalid, redirect-refused).",
        ),
        (
            "503",
            "too-many-streams, out-of-memory, evicted, or no document yet.",
        ),
        ("504", "upstream-timeout, or no first document in time."),
    ] {
        responses.insert(status.into(), problem(description));
    }
}

fn proxy() -> Value {
    let mut responses = Map::new();
    responses.insert("200".into(), json!({"description": "The event stream, or with Accept: application/json the current document.", "content": {"text/event-stream": {"schema": {"type": "string"}, "x-asyncapi-channel": "proxy"}, "application/json": {"schema": {}}}}));
    proxy_errors(&mut responses);
    json!({"get": {
        "operationId": "proxyStream",
        "summary": "The proxy mode: the stream of an allowed upstream URL in Streamdata.io's dialect; over SSE, refusals are error events on a 200 (see /asyncapi.json, channel proxy).",
        "parameters": [
            {"name": "target", "in": "path", "required": true, "schema": {"type": "string"}, "description": "The upstream URL (percent-encoded as one segment)."},
            {"name": "X-Sd-Token", "in": "query", "required": false, "schema": {"type": "string"}},
            {"name": "X-Sd-Where", "in": "query", "required": false, "schema": {"type": "string", "minLength": 1}, "description": "A view: an RFC 9535 filter expression evaluated on each entity (@); never sent upstream. Also a header."},
            {"name": "X-Sd-Fields", "in": "query", "required": false, "schema": {"type": "string", "minLength": 1}, "description": "A view: the JSON Pointers kept of each entity, comma-separated. Also a header."},
            {"name": "X-Sd-Entities", "in": "query", "required": false, "schema": {"type": "string"}, "description": "A view: the JSON Pointer of the entity array (default: the document is the array). Also a header."},
            {"name": "X-Sd-Key", "in": "query", "required": false, "schema": {"type": "string"}, "description": "A view: the JSON Pointer of each entity's identity (default /id). Also a header."},
        ],
        "security": [{"proxyTokenQuery": []}, {"proxyTokenHeader": []}],
        "responses": responses,
    }})
}

/// `GET /streams/~{id}/changes`: catch-up of a dynamic stream, read with the tokens of its SSE
/// subscription; its documents are whatever its upstream answers, so their schema is open.
fn dynamic_catchup() -> Value {
    let mut responses =
        catchup_responses(schemas::catchup_page(schemas::patch_name(true), json!({})));
    proxy_errors(&mut responses);
    responses.insert("400".into(), problem("A malformed `after`, `wait`, `limit` or `cursor` (or one given twice), or an event id of another stream: the message says which."));
    let mut parameters = vec![
        json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string"}, "description": "The stream's name without its leading ~."}),
        json!({"name": "X-Sd-Token", "in": "query", "required": false, "schema": {"type": "string"}}),
    ];
    parameters.extend(catchup_parameters("an event id of this stream"));
    json!({"get": {
        "operationId": "catchUp:~dynamic",
        "summary": "Catch-up for a dynamic stream (the proxy mode): the changes after a position, as one JSON page (long-poll with wait).",
        "parameters": parameters,
        "security": [{"proxyTokenQuery": []}, {"proxyTokenHeader": []}],
        "responses": responses,
    }})
}

/// `GET /streams/~{id}`: a dynamic stream in patchwire's own dialect.
fn dynamic_native(push: bool) -> Value {
    let mut responses = Map::new();
    responses.insert("200".into(), json!({"description": "The event stream in patchwire's dialect, or with Accept: application/json the current document.", "content": {"text/event-stream": {"schema": {"type": "string"}, "x-asyncapi-channel": "proxy.native"}, "application/json": {"schema": {}}}}));
    responses.insert(
        "304".into(),
        json!({"description": "If-None-Match names the current version."}),
    );
    proxy_errors(&mut responses);
    // `POST`/`PATCH /streams/{name}` are routed here too, and refused: a dynamic stream is
    // not a push stream.
    let refused = |id: &str| {
        let mut responses = Map::new();
        if push {
            responses.insert("401".into(), response_ref("Unauthorized"));
        } else {
            responses.insert(
                "403".into(),
                problem("The push source is disabled (no [push] table)."),
            );
        }
        responses.insert("404".into(), problem("Only push streams accept documents."));
        let security = if push {
            json!([{"pushToken": []}])
        } else {
            json!([])
        };
        json!({"operationId": id, "summary": "Refused: only push streams accept documents.", "security": security, "responses": responses})
    };
    json!({
        "parameters": [
            {"name": "id", "in": "path", "required": true, "schema": {"type": "string"}, "description": "The stream's name without its leading ~."},
        ],
        "post": refused("pushDocument:dynamic"),
        "patch": refused("patchDocument:dynamic"),
        "get": {
        "operationId": "dynamicStream",
        "summary": "A dynamic stream (named by the X-Patchwire-Stream header of its URL's answer) in patchwire's own dialect.",
        "parameters": [
            {"name": "X-Sd-Token", "in": "query", "required": false, "schema": {"type": "string"}},
        ],
        "security": [{"proxyTokenQuery": []}, {"proxyTokenHeader": []}],
        "responses": responses,
    }})
}

/// The admin API (`/admin/webhooks`): with a token, every route; without, each answers 403.
fn admin(paths: &mut Map<String, Value>, enabled: bool, ids: &[String], surface: &Surface) {
    if !enabled {
        paths.insert(
            "/admin/webhooks".into(),
            json!({"get": {"operationId": "listWebhooks", "summary": "The admin API is disabled (webhooks.admin_token is not set).", "responses": {"403": problem("The admin API is disabled.")}}}),
        );
        return;
    }
    // What an endpoint may receive: a stream, or one of its named views (`stream@view`). An
    // ad hoc view written as its filter (`stream?route=R1`) is taken too, but no schema can
    // tell a valid filter, so the enum lists the names only (the description says so).
    let stream_names: Vec<String> = surface
        .streams
        .iter()
        .flat_map(|s| {
            std::iter::once(s.name.clone())
                .chain(s.views.keys().map(move |view| format!("{}@{view}", s.name)))
        })
        .collect();
    let streams_description = "Streams and views it receives: a configured stream's name, \
        `stream@view` (a named view), or `stream?filter` (an ad hoc view, as a subscription's \
        query string, where the stream allows them); a view is validated as in the \
        configuration file, an invalid one is a 422 naming the entry.";
    let endpoint = json!({
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "url": {"type": "string"},
            "streams": {"type": "array", "items": {"type": "string"}},
            "mode": {"enum": ["patch", "snapshot"]},
            "format": {"enum": ["json", "cloudevents", "cloudevents-binary"]},
            "headers": {"type": "array", "items": {"type": "string"}},
            "source": {"type": "string"},
            "signing": {"enum": ["v1", "v1a"]},
            "public_key": {"type": ["string", "null"], "description": "v1a: the Ed25519 public key receivers verify with (whpk_...)."},
            "description": {"type": ["string", "null"]},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "rate_limit": {"type": ["integer", "null"], "minimum": 1},
            "events": {"type": "array", "items": {"enum": ["snapshots", "patches", "errors", "recoveries"]}, "minItems": 1, "uniqueItems": true, "description": "What the endpoint receives: snapshots and patches (the default, [\"snapshots\", \"patches\"]), snapshots alone (every change whole), and errors and recoveries (stream.error when the upstream starts failing, stream.recovered when it answers again); patches only with snapshots; without snapshots, no changes at all."},
            "created_at": {"type": "string"},
            "disabled": {"type": ["object", "null"]},
            "failing_since": {"type": ["string", "null"]},
            "previous_secret_until": {"type": ["string", "null"]},
            "secret": {"type": "string"},
        },
        "required": ["id", "url", "streams", "mode", "format", "signing"],
    });
    let delivery_list = json!({
        "type": "object",
        "properties": {"deliveries": {"type": "array", "items": {"type": "object"}}, "next_before": {"type": ["integer", "null"]}},
        "required": ["deliveries", "next_before"],
    });
    let replayed = json!({"type": "object", "properties": {"replayed": {"type": "integer"}}, "required": ["replayed"]});
    let id_param = json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string", "examples": ids}});
    let json_body = |schema: Value, required: bool| json!({"required": required, "content": {"application/json": {"schema": schema}}});
    let ok = |status: &str, description: &str, schema: Value| {
        let mut responses = Map::new();
        if schema.is_null() {
            responses.insert(status.into(), json!({"description": description}));
        } else {
            responses.insert(status.into(), json!({"description": description, "content": {"application/json": {"schema": schema}}}));
        }
        responses
    };
    let common = |mut responses: Map<String, Value>, errors: &[&str]| {
        responses.insert("401".into(), response_ref("Unauthorized"));
        for status in errors {
            let name = match *status {
                "400" => "BadRequest",
                "404" => "NotFound",
                "408" => "Timeout",
                "413" => "TooLarge",
                "409" | "422" => {
                    responses.insert((*status).into(), problem("The request conflicts with the endpoint's state, or a value is invalid; the message says which."));
                    continue;
                }
                _ => "Unavailable",
            };
            responses.insert((*status).into(), response_ref(name));
        }
        Value::Object(responses)
    };
    let security = json!([{"adminToken": []}]);
    let new_endpoint = json!({
        "type": "object",
        "properties": {
            "url": {"type": "string"},
            "streams": {"type": "array", "items": {"enum": stream_names}, "description": streams_description},
            "mode": {"enum": ["patch", "snapshot"]},
            "format": {"enum": ["json", "cloudevents", "cloudevents-binary"]},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "secret": {"type": "string"},
            "signing": {"enum": ["v1", "v1a"]},
            "description": {"type": "string"},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "rate_limit": {"type": "integer", "minimum": 1, "description": "Most deliveries per second."},
            "events": {"type": "array", "items": {"enum": ["snapshots", "patches", "errors", "recoveries"]}, "minItems": 1, "uniqueItems": true, "description": "What the endpoint receives: snapshots and patches (the default, [\"snapshots\", \"patches\"]), snapshots alone (every change whole), and errors and recoveries (stream.error when the upstream starts failing, stream.recovered when it answers again); patches only with snapshots; without snapshots, no changes at all."},
        },
        "required": ["url", "streams"],
        "additionalProperties": false,
    });
    let changes = json!({
        "type": "object",
        "properties": {
            "url": {"type": "string"},
            "streams": {"type": "array", "items": {"enum": stream_names}, "description": streams_description},
            "mode": {"enum": ["patch", "snapshot"]},
            "format": {"enum": ["json", "cloudevents", "cloudevents-binary"]},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "disabled": {"type": "boolean"},
            "description": {"type": ["string", "null"]},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "rate_limit": {"type": ["integer", "null"], "minimum": 1},
            "events": {"type": "array", "items": {"enum": ["snapshots", "patches", "errors", "recoveries"]}, "minItems": 1, "uniqueItems": true, "description": "What the endpoint receives: snapshots and patches (the default, [\"snapshots\", \"patches\"]), snapshots alone (every change whole), and errors and recoveries (stream.error when the upstream starts failing, stream.recovered when it answers again); patches only with snapshots; without snapshots, no changes at all."},
        },
        "additionalProperties": false,
    });
    let list_query = vec![
        json!({"name": "state", "in": "query", "required": false, "schema": {"enum": ["pending", "delivered", "dead", "superseded"]}}),
        json!({"name": "before", "in": "query", "required": false, "schema": {"type": "integer", "format": "int64"}, "description": "Only deliveries with a smaller id (next_before of the previous page)."}),
        json!({"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0, "maximum": usize::MAX}, "description": "At most this many (clamped to 1..=1000; default 100)."}),
    ];
    let write_errors = ["400", "404", "408", "409", "413", "422", "503"];
    paths.insert("/admin/webhooks".into(), json!({
        "get": {"operationId": "listWebhooks", "security": security, "responses": common(ok("200", "Every endpoint (never a secret).", json!({"type": "object", "properties": {"endpoints": {"type": "array", "items": endpoint}}, "required": ["endpoints"]})), &[])},
        "post": {"operationId": "createWebhook", "security": security,
                 "parameters": [{"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "minLength": 1, "maxLength": 255}, "description": "A retry with the same key and body answers the endpoint first created (Idempotent-Replayed: true)."}],
                 "requestBody": json_body(new_endpoint, true), "responses": common(ok("201", "Created; the answer shows the secret, this once.", endpoint.clone()), &["400", "408", "409", "413", "422", "503"])},
    }));
    paths.insert("/admin/webhooks/{id}".into(), json!({
        "parameters": [id_param],
        "get": {"operationId": "showWebhook", "security": security, "responses": common(ok("200", "The endpoint.", endpoint.clone()), &["404"])},
        "patch": {"operationId": "updateWebhook", "security": security, "requestBody": json_body(changes, true), "responses": common(ok("200", "The endpoint as changed.", endpoint.clone()), &write_errors)},
        "delete": {"operationId": "deleteWebhook", "security": security, "responses": common(ok("204", "Deleted.", Value::Null), &["404", "409", "503"])},
    }));
    paths.insert("/admin/webhooks/{id}/rotate-secret".into(), json!({
        "parameters": [id_param],
        "post": {"operationId": "rotateWebhookSecret", "security": security,
                 "requestBody": json_body(json!({"type": "object", "properties": {"secret": {"type": "string"}}, "additionalProperties": false}), false),
                 "responses": common(ok("200", "The new secret (v1a: its public key); the previous one keeps signing for rotation_overlap.", json!({"type": "object", "properties": {"secret": {"type": "string"}, "public_key": {"type": "string"}}, "minProperties": 1})), &write_errors)},
    }));
    for (suffix, id, summary) in [
        (
            "deliveries",
            "listWebhookDeliveries",
            "Deliveries, newest first, with attempts and last error.",
        ),
        (
            "dead-letters",
            "listWebhookDeadLetters",
            "Dead deliveries, newest first.",
        ),
    ] {
        let mut parameters = list_query.clone();
        if suffix == "dead-letters" {
            parameters.remove(0);
        }
        paths.insert(format!("/admin/webhooks/{{id}}/{suffix}"), json!({
            "parameters": [id_param],
            "get": {"operationId": id, "summary": summary, "security": security, "parameters": parameters,
                    "responses": common(ok("200", "A page.", delivery_list.clone()), &["400", "404", "503"])},
        }));
    }
    paths.insert("/admin/webhooks/{id}/deliveries/{delivery}/replay".into(), json!({
        "parameters": [id_param, {"name": "delivery", "in": "path", "required": true, "schema": {"type": "integer", "format": "int64"}}],
        "post": {"operationId": "replayWebhookDelivery", "security": security,
                 "responses": common(ok("202", "Queued again (same webhook-id).", replayed.clone()), &["400", "404", "409", "503"])},
    }));
    paths.insert("/admin/webhooks/{id}/replay".into(), json!({
        "parameters": [id_param],
        "post": {"operationId": "replayWebhookDeadLetters", "security": security,
                 "requestBody": json_body(json!({"type": "object", "properties": {"since": {"type": "string", "format": "date-time"}}, "required": ["since"], "additionalProperties": false}), true),
                 "responses": common(ok("202", "Every dead letter since then, queued again.", replayed), &write_errors)},
    }));
    paths.insert("/admin/webhooks/{id}/recover".into(), json!({
        "parameters": [id_param],
        "post": {"operationId": "recoverWebhook", "security": security,
                 "summary": "Queue again every delivery since a time, delivered or not (after the receiver lost data).",
                 "requestBody": json_body(json!({"type": "object", "properties": {"since": {"type": "string", "format": "date-time"}}, "required": ["since"], "additionalProperties": false}), true),
                 "responses": common(ok("202", "Queued again.", json!({"type": "object", "properties": {"recovered": {"type": "integer"}}, "required": ["recovered"]})), &write_errors)},
    }));
    paths.insert("/admin/webhooks/{id}/test".into(), json!({
        "parameters": [id_param],
        "post": {"operationId": "testWebhook", "security": security,
                 "summary": "Send a signed test delivery (type webhook.test) now and say how the receiver answered; nothing is queued.",
                 "requestBody": json_body(json!({"type": "object", "additionalProperties": false}), false),
                 "responses": common(ok("200", "What the receiver answered.", json!({"type": "object", "properties": {
                     "webhook_id": {"type": "string"}, "delivered": {"type": "boolean"},
                     "status": {"type": ["integer", "null"]}, "duration_ms": {"type": "integer", "minimum": 0},
                     "response": {"type": ["string", "null"]}, "error": {"type": ["string", "null"]},
                 }, "required": ["webhook_id", "delivered"]})), &["400", "404", "409", "503"])},
    }));
    let attempt = json!({"type": "object", "properties": {
        "id": {"type": "integer"}, "delivery": {"type": "integer"}, "webhook_id": {"type": "string"},
        "stream": {"type": "string"}, "at": {"type": "string"}, "duration_ms": {"type": "integer"},
        "result": {"enum": ["delivered", "retrying", "dead"]}, "status": {"type": ["integer", "null"]},
        "response": {"type": ["string", "null"]}, "error": {"type": ["string", "null"]},
    }, "required": ["id", "delivery", "stream", "at", "result"]});
    paths.insert("/admin/webhooks/{id}/attempts".into(), json!({
        "parameters": [id_param],
        "get": {"operationId": "listWebhookAttempts", "security": security,
                "summary": "Every delivery attempt, newest first: when, how long, the receiver's status and answer.",
                "parameters": [
                    {"name": "stream", "in": "query", "required": false, "schema": {"type": "string"}},
                    {"name": "result", "in": "query", "required": false, "schema": {"enum": ["delivered", "retrying", "dead"]}},
                    {"name": "status", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 100, "maximum": 599}},
                    {"name": "since", "in": "query", "required": false, "schema": {"type": "string", "format": "date-time"}},
                    {"name": "until", "in": "query", "required": false, "schema": {"type": "string", "format": "date-time"}, "description": "After since."},
                    {"name": "before", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1}, "description": "Only attempts with a smaller id (next_before of the previous page)."},
                    {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 1000}, "description": "Default 100."},
                ],
                "responses": common(ok("200", "A page.", json!({"type": "object", "properties": {"attempts": {"type": "array", "items": attempt}, "next_before": {"type": ["integer", "null"]}}, "required": ["attempts", "next_before"]})), &["400", "404", "503"])},
    }));
}

fn security_schemes(surface: &Surface) -> Value {
    let mut schemes = Map::new();
    if surface.push {
        schemes.insert(
            "pushToken".into(),
            json!({"type": "http", "scheme": "bearer", "description": "push.token"}),
        );
    }
    if surface.webhooks.as_ref().is_some_and(|w| w.admin) {
        schemes.insert(
            "adminToken".into(),
            json!({"type": "http", "scheme": "bearer", "description": "webhooks.admin_token"}),
        );
    }
    if surface.proxy {
        schemes.insert(
            "proxyTokenQuery".into(),
            json!({"type": "apiKey", "name": "X-Sd-Token", "in": "query"}),
        );
        schemes.insert(
            "proxyTokenHeader".into(),
            json!({"type": "apiKey", "name": "X-Sd-Token", "in": "header"}),
        );
    }
    Value::Object(schemes)
}
