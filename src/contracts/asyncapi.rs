//! The AsyncAPI 3.0 document of a [`Surface`]: what patchwire sends and receives, per stream.
//!
//! AsyncAPI has no Server-Sent Events binding: SSE channels use the `http` binding (the
//! `GET` that opens the stream, its query) and say the rest in `x-sse` extensions (the
//! transport, each message's `event:` name, the dialect). Operations are patchwire's own:
//! `send` for what it sends (events, webhook deliveries, broker messages), `receive` for what
//! it accepts (WebSocket client messages, pushes).

use serde_json::{Map, Value, json};

use super::schemas::{self, reference};
use super::{DocumentSchemas, Source, Surface};
use crate::sinks::webhook::body::Mode;

/// The `http` binding's version used throughout.
const HTTP_BINDING: &str = "0.3.0";

/// The AsyncAPI 3.0 document of `surface` with its streams' `documents`.
pub fn document(surface: &Surface, documents: &DocumentSchemas) -> Value {
    let mut doc = Document::default();
    doc.servers(surface);
    for stream in &surface.streams {
        let patch = schemas::patch_name(stream.allow_move);
        doc.sse_channel(surface, &stream.name, None, stream, patch);
        for view in stream.views.keys() {
            doc.sse_channel(surface, &stream.name, Some(view), stream, patch);
        }
        if stream.source == Source::Push {
            doc.push_channel(&stream.name);
        }
        if surface.webhooks.is_some() {
            doc.webhook_channel(&stream.name, patch);
        }
        doc.catchup_channel(stream, None, patch);
        for view in stream.views.keys() {
            doc.catchup_channel(stream, Some(view), patch);
        }
    }
    if surface.webhooks.as_ref().is_some_and(|w| w.operator) {
        doc.operator_channel();
    }
    if surface.proxy {
        doc.streamdata_channel();
        doc.dynamic_native_channel();
    }
    if surface.websocket {
        doc.websocket_channel(surface);
    }
    for sink in &surface.brokers {
        doc.broker_channels(surface, sink);
    }
    let mut components = Map::new();
    let mut all_schemas = schemas::shared();
    all_schemas.extend(documents.components(surface));
    components.insert("schemas".into(), Value::Object(all_schemas));
    components.insert("messages".into(), Value::Object(shared_messages()));
    components.insert("securitySchemes".into(), security_schemes(surface));
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "patchwire",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The streams of this patchwire deployment, generated from its configuration. Each stream sends a snapshot (the whole document), then RFC 6902 patches of it. Server-Sent Events have no AsyncAPI binding: their channels use the http binding (the GET that opens the stream) and x-sse extensions (transport, event names, dialect).",
        },
        "defaultContentType": "application/json",
        "servers": doc.servers,
        "channels": doc.channels,
        "operations": doc.operations,
        "components": components,
    })
}

#[derive(Default)]
struct Document {
    servers: Map<String, Value>,
    channels: Map<String, Value>,
    operations: Map<String, Value>,
}

/// The `$ref` of channel `channel`'s message `message`.
fn channel_message(channel: &str, message: &str) -> Value {
    json!({"$ref": format!("#/channels/{}/messages/{message}", escape(channel))})
}

/// A JSON Pointer token.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn server_ref(name: &str) -> Value {
    json!({"$ref": format!("#/servers/{}", escape(name))})
}

impl Document {
    fn servers(&mut self, surface: &Surface) {
        let host = surface.listen.to_string();
        self.servers.insert(
            "http".into(),
            json!({
                "host": host,
                "protocol": "http",
                "description": "server.listen: SSE streams, pushes, the JSON views. An unspecified address (0.0.0.0, [::]) is reached by this host's name.",
            }),
        );
        if surface.websocket {
            self.servers.insert(
                "ws".into(),
                json!({"host": host, "protocol": "ws", "pathname": "/ws", "description": "WebSocket subscriptions (GET /ws), on server.listen."}),
            );
        }
        for sink in &surface.brokers {
            self.servers.insert(
                format!("sink-{}", sink.name),
                json!({"host": sink.host, "protocol": sink.kind, "description": format!("The broker of sink {:?}.", sink.name)}),
            );
        }
    }

    fn add_operation(&mut self, name: String, operation: Value) {
        self.operations.insert(name, operation);
    }

    /// `GET /streams/{name}` (or a named view's `/streams/{name}@{view}`) in patchwire's SSE
    /// dialect.
    fn sse_channel(
        &mut self,
        surface: &Surface,
        stream: &str,
        view: Option<&str>,
        settings: &super::StreamSurface,
        patch: &str,
    ) {
        // Channel ids are [A-Za-z0-9._-]: a view's is `{stream}.views.{view}`.
        let (channel, address, description) = match view {
            None => (
                stream.to_owned(),
                format!("/streams/{stream}"),
                format!("Stream {stream:?}: its document, then patches of it."),
            ),
            Some(view) => (
                format!("{stream}.views.{view}"),
                format!("/streams/{stream}@{view}"),
                format!(
                    "The named view {view:?} of stream {stream:?} ([[streams.views]]): the stream's document filtered (and projected), then patches of it; also GET /streams/{stream}?view={view}."
                ),
            ),
        };
        let document = reference(&DocumentSchemas::name(stream, view));
        let mut messages = Map::new();
        messages.insert(
            "snapshot".into(),
            sse_message("snapshot", "The whole document: first on a fresh connection, after a resync, or when a patch would be larger.", document),
        );
        messages.insert(
            "patch".into(),
            sse_message(
                "patch",
                "An RFC 6902 patch of the document the subscriber holds.",
                reference(patch),
            ),
        );
        shared_sse_messages(&mut messages);
        let mut query = Map::new();
        query.insert("lastEventId".into(), json!({"type": "string", "description": "Resume after this event id, for clients that cannot set Last-Event-ID."}));
        if view.is_none() && settings.ad_hoc_views {
            for alias in &settings.aliases {
                query.insert(alias.clone(), json!({"type": "string", "description": "An ad hoc view: entities whose alias has one of these comma-separated values."}));
            }
            query.insert("where".into(), json!({"type": "string", "description": "An ad hoc view: an RFC 9535 filter expression over each entity (@)."}));
            query.insert("fields".into(), json!({"type": "string", "description": "An ad hoc view: the JSON Pointers kept of each entity, comma-separated."}));
        }
        if view.is_none() && !settings.views.is_empty() {
            query.insert(
                "view".into(),
                json!({"enum": settings.views.keys().collect::<Vec<_>>()}),
            );
        }
        let message_names: Vec<String> = messages.keys().cloned().collect();
        self.channels.insert(
            channel.clone(),
            json!({
                "address": address,
                "description": description,
                "servers": [server_ref("http")],
                "messages": messages,
                "x-sse": {"dialect": "patchwire", "contentType": "text/event-stream", "resume": "Last-Event-ID header or ?lastEventId=", "gzip": "Accept-Encoding: gzip"},
            }),
        );
        self.add_operation(
            format!("{channel}.sse"),
            json!({
                "action": "send",
                "channel": {"$ref": format!("#/channels/{}", escape(&channel))},
                "title": format!("{address} over SSE"),
                "summary": "patchwire sends the stream's events to each subscriber of GET on the channel's address.",
                "bindings": {"http": {"method": "GET", "query": {"type": "object", "properties": query}, "bindingVersion": HTTP_BINDING}},
                "messages": message_names.iter().map(|m| channel_message(&channel, m)).collect::<Vec<_>>(),
                "x-sse": {"transport": "text/event-stream"},
            }),
        );
        let _ = surface;
    }

    /// `POST`/`PATCH /streams/{name}` of a push stream.
    fn push_channel(&mut self, stream: &str) {
        let channel = format!("{stream}.push");
        self.channels.insert(
            channel.clone(),
            json!({
                "address": format!("/streams/{stream}"),
                "description": format!("Publishers feed push stream {stream:?}: POST a whole document or PATCH the current one."),
                "servers": [server_ref("http")],
                "messages": {
                    "document": {"name": "document", "title": "A whole new document", "contentType": "application/json", "payload": reference(&DocumentSchemas::name(stream, None))},
                    "patch": {"name": "patchRequest", "title": "An RFC 6902 patch of the current document", "contentType": "application/json-patch+json", "payload": reference("PatchRequest")},
                },
            }),
        );
        for (method, message) in [("POST", "document"), ("PATCH", "patch")] {
            self.add_operation(
                format!("{stream}.push.{}", method.to_ascii_lowercase()),
                json!({
                    "action": "receive",
                    "channel": {"$ref": format!("#/channels/{}", escape(&channel))},
                    "security": [{"$ref": "#/components/securitySchemes/pushToken"}],
                    "bindings": {"http": {"method": method, "bindingVersion": HTTP_BINDING}},
                    "messages": [channel_message(&channel, message)],
                }),
            );
        }
    }

    /// Webhook deliveries of a stream: a signed POST to each endpoint's URL.
    fn webhook_channel(&mut self, stream: &str, patch: &str) {
        let channel = format!("{stream}.webhook");
        let document = reference(&DocumentSchemas::name(stream, None));
        let body = schemas::webhook_body(document.clone(), reference(patch));
        let signed = standard_webhooks_headers(&[]);
        let mut structured = broker_message(
            "stream.snapshot",
            "application/cloudevents+json",
            Value::Null,
        );
        structured["name"] = json!("webhookCloudEvent");
        structured["summary"] = json!(
            "format = \"cloudevents\": a CloudEvent 1.0 in structured mode, the attributes of the binary mode's ce- headers (without the prefix) beside data."
        );
        structured["headers"] = signed.clone();
        structured["payload"] = schemas::cloudevent_structured(document.clone(), reference(patch));
        let ce = broker_message("stream.snapshot", "application/json", Value::Null);
        let mut binary_headers = standard_webhooks_headers(&[
            "ce-id",
            "ce-type",
            "ce-source",
            "ce-time",
            "ce-specversion",
        ]);
        if let (Some(all), Some(ce)) = (
            binary_headers["properties"].as_object_mut(),
            ce["headers"]["properties"].as_object(),
        ) {
            for (name, schema) in ce {
                all.insert(name.clone(), schema.clone());
            }
            all.insert(
                "ce-type".into(),
                json!({"enum": ["stream.snapshot", "stream.patch", "stream.error", "stream.recovered"]}),
            );
        }
        self.channels.insert(
            channel.clone(),
            json!({
                "address": null,
                "description": format!("Webhook deliveries of stream {stream:?}: a POST to each endpoint's own URL, signed with Standard Webhooks (webhook-signature: v1,<HMAC-SHA256> with a symmetric secret, v1a,<Ed25519> with an Ed25519 key: the endpoint's signing, its public_key in the admin API). The endpoint's format decides the body: json (patchwire.webhook.v1), cloudevents (structured) or cloudevents-binary; its events (snapshots, patches, errors, recoveries) and mode which changes it receives, and whether it hears of the upstream failing (stream.error, once per run of failures) and answering again (stream.recovered), in order with the changes."),
                "messages": {
                    "delivery": {
                        "name": "webhookDelivery",
                        "summary": "format = \"json\" (the default): the patchwire.webhook.v1 envelope.",
                        "contentType": "application/json",
                        "headers": signed,
                        "payload": body,
                        "bindings": {"http": {"headers": {"type": "object"}, "bindingVersion": HTTP_BINDING}},
                    },
                    "cloudevent": structured,
                    "cloudeventBinary": {
                        "name": "webhookCloudEventBinary",
                        "summary": "format = \"cloudevents-binary\": a CloudEvent 1.0 in binary mode, the attributes as ce- headers, the body the delivery's data alone: the document (application/json), the patch (application/json-patch+json), or a notice's data (application/json).",
                        "contentType": "application/json",
                        "headers": binary_headers,
                        "payload": {"oneOf": [
                            document,
                            reference(patch),
                            reference(&format!("{}.error", crate::schemas::WEBHOOK)),
                            reference(&format!("{}.recovery", crate::schemas::WEBHOOK)),
                        ]},
                    },
                },
            }),
        );
        self.add_operation(
            format!("{stream}.webhook"),
            json!({
                "action": "send",
                "channel": {"$ref": format!("#/channels/{}", escape(&channel))},
                "bindings": {"http": {"method": "POST", "bindingVersion": HTTP_BINDING}},
                "messages": [
                    channel_message(&channel, "delivery"),
                    channel_message(&channel, "cloudevent"),
                    channel_message(&channel, "cloudeventBinary"),
                ],
            }),
        );
    }

    /// Operational events POSTed to `webhooks.operator_url`.
    fn operator_channel(&mut self) {
        let channel = "webhooks.operator";
        self.channels.insert(
            channel.into(),
            json!({
                "address": null,
                "description": "Operational events for the people running patchwire (endpoint.disabled, delivery.dead, endpoint.recovered): a POST to webhooks.operator_url, signed with Standard Webhooks by webhooks.operator_secret; stored in the webhook outbox when they happen (once, however many nodes see them), sent in order, retried on the webhooks' schedule, surviving restarts (same webhook-id).",
                "messages": {
                    "event": {
                        "name": "operatorEvent",
                        "contentType": "application/json",
                        "headers": standard_webhooks_headers(&[]),
                        "payload": reference(crate::schemas::OPERATOR),
                    },
                },
            }),
        );
        self.add_operation(
            "webhooks.operator".into(),
            json!({
                "action": "send",
                "channel": {"$ref": format!("#/channels/{}", escape(channel))},
                "bindings": {"http": {"method": "POST", "bindingVersion": HTTP_BINDING}},
                "messages": [channel_message(channel, "event")],
            }),
        );
    }

    /// `GET /streams/{name}/changes` (or a named view's): catch-up over plain HTTP, a page of
    /// changes (`patchwire.changes.v1`) per request, or a `410` (`patchwire.changes-gone.v1`).
    fn catchup_channel(&mut self, stream: &super::StreamSurface, view: Option<&str>, patch: &str) {
        let (channel, address, document) = match view {
            None => (
                format!("{}.changes", stream.name),
                format!("/streams/{}/changes", stream.name),
                if stream.views.is_empty() && stream.aliases.is_empty() {
                    reference(&DocumentSchemas::name(&stream.name, None))
                } else {
                    json!({"anyOf": [
                        reference(&DocumentSchemas::name(&stream.name, None)),
                        reference(&DocumentSchemas::any_view(&stream.name)),
                    ]})
                },
            ),
            Some(view) => (
                format!("{}.views.{view}.changes", stream.name),
                format!("/streams/{}@{view}/changes", stream.name),
                reference(&DocumentSchemas::name(&stream.name, Some(view))),
            ),
        };
        let headers = json!({"type": "object", "properties": {
            "Stream-Next-Offset": {"type": "string", "description": "The event id to pass as after next."},
            "Stream-Up-To-Date": {"const": "true"},
            "Stream-Cursor": {"type": "string", "description": "Long-polls: echo it as cursor."},
            "ETag": {"type": "string"},
            "Cache-Control": {"type": "string"},
        }});
        let query = json!({"type": "object", "properties": {
            "after": {"type": "string", "description": "An event id of this stream or view, or now."},
            "wait": {"type": "string", "description": "Long-poll up to this long (at most 60s); 204 when nothing came."},
            "limit": {"type": "integer", "minimum": 1, "maximum": 100},
            "cursor": {"type": "integer", "minimum": 0},
        }});
        self.channels.insert(
            channel.clone(),
            json!({
                "address": address,
                "description": "Catch-up over plain HTTP: each GET answers the changes after `after` as one JSON page (a snapshot first without `after`), for clients that cannot hold a connection; cacheable, long-polls with `wait`. The same operation is in /openapi.json.",
                "servers": [server_ref("http")],
                "messages": {
                    "page": {
                        "name": "changes",
                        "summary": "200: a page (patchwire.changes.v1, served at /schemas/patchwire.changes.v1.json), each patch as this stream sends them.",
                        "contentType": "application/json",
                        "headers": headers,
                        "payload": schemas::catchup_page(patch, document),
                        "bindings": {"http": {"statusCode": 200, "bindingVersion": HTTP_BINDING}},
                    },
                    "gone": {
                        "name": "changesGone",
                        "summary": "410: history cannot answer this position exactly; start again from snapshot.",
                        "contentType": "application/json",
                        "payload": reference(crate::schemas::CHANGES_GONE),
                        "bindings": {"http": {"statusCode": 410, "bindingVersion": HTTP_BINDING}},
                    },
                },
                "bindings": {"http": {"query": query, "bindingVersion": HTTP_BINDING}},
            }),
        );
        self.add_operation(
            channel.clone(),
            json!({
                "action": "send",
                "channel": {"$ref": format!("#/channels/{}", escape(&channel))},
                "bindings": {"http": {"method": "GET", "bindingVersion": HTTP_BINDING}},
                "messages": [channel_message(&channel, "page"), channel_message(&channel, "gone")],
            }),
        );
    }

    /// The proxy mode: `GET /{upstream URL}` in Streamdata.io's dialect.
    fn streamdata_channel(&mut self) {
        let channel = "proxy";
        self.channels.insert(
            channel.into(),
            json!({
                "address": "/{target}",
                "description": "The proxy mode: the stream of any allowed upstream URL, in Streamdata.io's dialect (data, patch, error). Refusals are error events on a 200.",
                "parameters": {"target": {"description": "The upstream URL, written after the proxy's address (http:// or https://, or percent-encoded as one segment)."}},
                "servers": [server_ref("http")],
                "messages": {
                    "data": sse_message("data", "The whole document: first on every connection.", json!({})),
                    "patch": sse_message("patch", "An RFC 6902 patch (add, remove, replace).", reference("Patch")),
                    "error": sse_message("error", "A refusal (the stream then ends) or a failed poll.", reference("StreamdataError")),
                    "keepAlive": {"$ref": "#/components/messages/keepAlive"},
                },
                "x-sse": {"dialect": "streamdata.io", "contentType": "text/event-stream", "ascii": "non-ASCII characters are \\u escapes unless proxy.ascii_only = false"},
            }),
        );
        let messages: Vec<Value> = ["data", "patch", "error", "keepAlive"]
            .iter()
            .map(|m| channel_message(channel, m))
            .collect();
        self.add_operation(
            "proxy.sse".into(),
            json!({
                "action": "send",
                "channel": {"$ref": "#/channels/proxy"},
                "security": [
                    {"$ref": "#/components/securitySchemes/proxyTokenQuery"},
                    {"$ref": "#/components/securitySchemes/proxyTokenHeader"},
                ],
                "bindings": {"http": {"method": "GET", "bindingVersion": HTTP_BINDING}},
                "messages": messages,
                "x-sse": {"transport": "text/event-stream"},
            }),
        );
    }

    /// `GET /streams/~{id}`: a dynamic stream in patchwire's own dialect.
    fn dynamic_native_channel(&mut self) {
        let channel = "proxy.native";
        let mut messages = Map::new();
        messages.insert(
            "snapshot".into(),
            sse_message("snapshot", "The whole document.", json!({})),
        );
        messages.insert(
            "patch".into(),
            sse_message(
                "patch",
                "An RFC 6902 patch (add, remove, replace).",
                reference("Patch"),
            ),
        );
        shared_sse_messages(&mut messages);
        let names: Vec<Value> = messages
            .keys()
            .map(|m| channel_message(channel, m))
            .collect();
        self.channels.insert(
            channel.into(),
            json!({
                "address": "/streams/~{id}",
                "description": "A dynamic stream of the proxy mode (named by the X-Patchwire-Stream header of its URL's answer) in patchwire's own dialect.",
                "parameters": {"id": {"description": "The dynamic stream's name without its leading ~."}},
                "servers": [server_ref("http")],
                "messages": messages,
                "x-sse": {"dialect": "patchwire", "contentType": "text/event-stream"},
            }),
        );
        self.add_operation(
            "proxy.native.sse".into(),
            json!({
                "action": "send",
                "channel": {"$ref": "#/channels/proxy.native"},
                "security": [
                    {"$ref": "#/components/securitySchemes/proxyTokenQuery"},
                    {"$ref": "#/components/securitySchemes/proxyTokenHeader"},
                ],
                "bindings": {"http": {"method": "GET", "bindingVersion": HTTP_BINDING}},
                "messages": names,
                "x-sse": {"transport": "text/event-stream"},
            }),
        );
    }

    /// `GET /ws`: many subscriptions on one connection.
    fn websocket_channel(&mut self, surface: &Surface) {
        let channel = "websocket";
        let mut messages = Map::new();
        messages.insert("client".into(), json!({"name": "clientMessage", "contentType": "application/json", "payload": reference("WebSocketClientMessage")}));
        messages.insert("control".into(), json!({"name": "controlMessage", "contentType": "application/json", "payload": reference("WebSocketControlMessage")}));
        // Stream events name their stream; their `data` is one of the streams' documents or
        // patches (a union of every stream's).
        let mut documents: Vec<Value> = Vec::new();
        let mut with_move = false;
        for stream in &surface.streams {
            documents.push(reference(&DocumentSchemas::name(&stream.name, None)));
            with_move |= stream.allow_move;
        }
        let document = match documents.len() {
            0 => json!({}),
            1 => documents.remove(0),
            _ => json!({"anyOf": documents}),
        };
        let events = [
            ("snapshot", document),
            ("patch", reference(schemas::patch_name(with_move))),
            ("error", reference("ErrorEvent")),
            ("recovered", reference("RecoveredEvent")),
        ];
        for (kind, data) in events {
            messages.insert(
                kind.into(),
                json!({"name": format!("ws.{kind}"), "contentType": "application/json", "payload": schemas::ws_event(kind, data)}),
            );
        }
        let names: Vec<String> = messages.keys().cloned().collect();
        self.channels.insert(
            channel.into(),
            json!({
                "address": "/ws",
                "description": "WebSocket: subscribe to several streams on one connection; every message is a JSON text frame.",
                "servers": [server_ref("ws")],
                "messages": messages,
                "bindings": {"ws": {"method": "GET", "bindingVersion": "0.1.0"}},
            }),
        );
        self.add_operation(
            "websocket.receive".into(),
            json!({"action": "receive", "channel": {"$ref": "#/channels/websocket"}, "messages": [channel_message(channel, "client")]}),
        );
        self.add_operation(
            "websocket.send".into(),
            json!({
                "action": "send",
                "channel": {"$ref": "#/channels/websocket"},
                "messages": names.iter().filter(|m| *m != "client").map(|m| channel_message(channel, m)).collect::<Vec<_>>(),
            }),
        );
    }

    /// A broker sink's subjects (NATS) or keys (Redis), one channel per stream.
    fn broker_channels(&mut self, surface: &Surface, sink: &super::BrokerSurface) {
        let server = format!("sink-{}", sink.name);
        for (stream, destination) in &sink.streams {
            let allow_move = surface
                .streams
                .iter()
                .find(|s| &s.name == stream)
                .is_some_and(|s| s.allow_move);
            let channel = format!("{server}.{stream}");
            let mut messages = Map::new();
            messages.insert(
                "snapshot".into(),
                broker_message(
                    "stream.snapshot",
                    "application/json",
                    reference(&DocumentSchemas::name(stream, None)),
                ),
            );
            if sink.mode == Mode::Patch {
                messages.insert(
                    "patch".into(),
                    broker_message(
                        "stream.patch",
                        "application/json-patch+json",
                        reference(schemas::patch_name(allow_move)),
                    ),
                );
            }
            let names: Vec<String> = messages.keys().cloned().collect();
            self.channels.insert(
                channel.clone(),
                json!({
                    "address": destination,
                    "description": format!("Stream {stream:?} published to {} sink {:?} (CloudEvents 1.0, binary mode).", sink.kind, sink.name),
                    "servers": [server_ref(&server)],
                    "messages": messages,
                }),
            );
            self.add_operation(
                format!("{channel}.publish"),
                json!({
                    "action": "send",
                    "channel": {"$ref": format!("#/channels/{}", escape(&channel))},
                    "messages": names.iter().map(|m| channel_message(&channel, m)).collect::<Vec<_>>(),
                }),
            );
        }
    }
}

/// A message sent as the SSE event `event`.
fn sse_message(event: &str, summary: &str, payload: Value) -> Value {
    json!({
        "name": event,
        "title": format!("event: {event}"),
        "summary": summary,
        "contentType": "application/json",
        "payload": payload,
        "headers": {"type": "object", "properties": {"id": reference("EventId")}, "description": "The SSE fields besides data: id (the event id)."},
        "x-sse": {"event": event},
    })
}

/// The Standard Webhooks headers of a signed POST, and `required` besides them.
fn standard_webhooks_headers(required: &[&str]) -> Value {
    let mut all = vec!["webhook-id", "webhook-timestamp", "webhook-signature"];
    all.extend_from_slice(required);
    json!({
        "type": "object",
        "properties": {
            "webhook-id": {"type": "string", "description": "The delivery's id, the same on every retry."},
            "webhook-timestamp": {"type": "string", "pattern": "^[0-9]+$", "description": "Unix seconds when this attempt was signed."},
            "webhook-signature": {"type": "string", "pattern": "^(v1,|v1a,)", "description": "Space-separated signatures of `{webhook-id}.{webhook-timestamp}.{body}`: v1,<base64 HMAC-SHA256> with a symmetric secret, v1a,<base64 Ed25519> with an Ed25519 key (verify with the endpoint's public_key); during a rotation, one per secret."},
        },
        "required": all,
    })
}

/// A CloudEvents binary-mode message of type `kind`.
fn broker_message(kind: &str, content_type: &str, payload: Value) -> Value {
    json!({
        "name": kind,
        "contentType": content_type,
        "headers": {
            "type": "object",
            "properties": {
                "ce-id": reference("EventId"),
                "ce-type": {"const": kind},
                "ce-source": {"type": "string"},
                "ce-time": {"type": "string", "format": "date-time"},
                "ce-specversion": {"const": "1.0"},
                "ce-stream": {"type": "string"},
                "ce-epoch": {"type": "string"},
                "ce-seq": {"type": "string"},
                "ce-baseseq": {"type": "string"},
            },
            "required": ["ce-id", "ce-type", "ce-source", "ce-time", "ce-specversion"],
        },
        "payload": payload,
    })
}

fn shared_messages() -> Map<String, Value> {
    let mut messages = Map::new();
    messages.insert(
        "error".into(),
        sse_message(
            "error",
            "A failed poll; the last good document stays current.",
            reference("ErrorEvent"),
        ),
    );
    messages.insert(
        "recovered".into(),
        sse_message(
            "recovered",
            "The upstream answers again (to subscribers sent an error).",
            reference("RecoveredEvent"),
        ),
    );
    messages.insert(
        "keepAlive".into(),
        json!({
            "name": "keepAlive",
            "title": ": keep-alive",
            "summary": "An SSE comment every server.keepalive, with no data.",
            "contentType": "text/event-stream",
            "payload": {"type": "null"},
            "x-sse": {"comment": "keep-alive"},
        }),
    );
    messages
}

fn security_schemes(surface: &Surface) -> Value {
    let mut schemes = Map::new();
    if surface.push {
        schemes.insert("pushToken".into(), json!({"type": "http", "scheme": "bearer", "description": "push.token, for POST/PATCH of push streams."}));
    }
    if surface.webhooks.as_ref().is_some_and(|w| w.admin) {
        schemes.insert("adminToken".into(), json!({"type": "http", "scheme": "bearer", "description": "webhooks.admin_token, for the admin API."}));
    }
    if surface.proxy {
        schemes.insert("proxyTokenQuery".into(), json!({"type": "httpApiKey", "name": "X-Sd-Token", "in": "query", "description": "A [[proxy.tokens]] application token."}));
        schemes.insert("proxyTokenHeader".into(), json!({"type": "httpApiKey", "name": "X-Sd-Token", "in": "header", "description": "A [[proxy.tokens]] application token."}));
    }
    Value::Object(schemes)
}

/// The SSE messages every subscription channel shares (`error`, `recovered`, keep-alives), as
/// references to their one definition in the components.
fn shared_sse_messages(messages: &mut Map<String, Value>) {
    for name in ["error", "recovered", "keepAlive"] {
        messages.insert(
            name.into(),
            json!({"$ref": format!("#/components/messages/{name}")}),
        );
    }
}
