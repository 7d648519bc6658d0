//! Contracts machines can read: the AsyncAPI 3.0 document of every stream's events
//! (`GET /asyncapi.json`, `patchwire asyncapi`) and the OpenAPI 3.1 document of the HTTP
//! endpoints (`GET /openapi.json`), both generated from the configuration.
//!
//! - [`Surface`]: what the configuration exposes (streams and their views, push, webhooks,
//!   the proxy mode, WebSocket, broker sinks, the listen address), taken once from a
//!   validated [`Config`]; the generators read only it, so the same configuration always gives
//!   the same documents.
//! - [`schemas`]: the JSON Schemas of patches, events, webhook bodies and answers, shared by
//!   both documents; [`infer`]: a document schema inferred from documents (the `schema` file
//!   a stream may name is read by `validation::schema_file`).
//! - [`asyncapi`], [`openapi`]: the two generators, pure functions of a [`Surface`] and the
//!   streams' [`DocumentSchemas`].
//!
//! A stream's document schema is, in order: the file its `schema` key names; for
//! `format = "gtfs-rt"`, the JSON projection's schema; else one inferred from its current
//! document (at request time on a running server; `{}` from the command line, which has no
//! document).

pub mod asyncapi;
pub mod infer;
pub mod openapi;
pub mod schemas;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::{Value, json};

use crate::config::Config;
use crate::hub::Hub;
use crate::sinks::webhook::body::Mode;
use crate::upstream::decode::Format;
use crate::views::config::ViewsSettings;

/// The [`Surface`] a running server describes now: taken at start, replaced by each successful
/// configuration reload (`SIGHUP`, `POST /admin/reload`), so the served documents follow the
/// file.
#[derive(Debug)]
pub struct Current(std::sync::RwLock<std::sync::Arc<Surface>>);

impl Current {
    /// The surface of `config`.
    pub fn of(config: &Config) -> Current {
        Current(std::sync::RwLock::new(std::sync::Arc::new(Surface::of(
            config,
        ))))
    }

    /// The surface now.
    pub fn get(&self) -> std::sync::Arc<Surface> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Describes `config` from now on (after it was applied). Whether `GET /ws` upgrades is
    /// decided when the server starts, so it is kept.
    pub fn replace(&self, config: &Config) {
        let mut surface = Surface::of(config);
        let mut current = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        surface.websocket = current.websocket;
        *current = std::sync::Arc::new(surface);
    }
}

/// What a configuration exposes, as the contracts describe it.
#[derive(Debug, Clone)]
pub struct Surface {
    /// `server.listen`.
    pub listen: SocketAddr,
    /// The configured streams, in file order (polled, then pushed).
    pub streams: Vec<StreamSurface>,
    /// Whether `[push]` is configured (push streams exist).
    pub push: bool,
    /// `[webhooks]`, when configured.
    pub webhooks: Option<WebhooksSurface>,
    /// Whether the proxy mode is enabled.
    pub proxy: bool,
    /// Whether `GET /ws` upgrades.
    pub websocket: bool,
    /// The broker sinks, in file order.
    pub brokers: Vec<BrokerSurface>,
}

/// One configured stream.
#[derive(Debug, Clone)]
pub struct StreamSurface {
    /// Its name (`/streams/{name}`).
    pub name: String,
    /// Polled (with its format) or pushed.
    pub source: Source,
    /// Whether its patches may hold `move` operations.
    pub allow_move: bool,
    /// Its named views, by name, with whether each projects fields.
    pub views: BTreeMap<String, bool>,
    /// Its filter aliases, when it has views.
    pub aliases: Vec<String>,
    /// Whether ad hoc views are allowed.
    pub ad_hoc_views: bool,
    /// The schema its `schema` key names.
    pub schema: Option<crate::validation::schema_file::DocumentSchema>,
}

/// Where a stream's documents come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Polled, decoded from this format.
    Polled(Format),
    /// Pushed by `POST`/`PATCH /streams/{name}`.
    Push,
}

/// `[webhooks]`.
#[derive(Debug, Clone)]
pub struct WebhooksSurface {
    /// Whether the admin API is enabled (`admin_token`).
    pub admin: bool,
    /// The configured endpoints' ids (examples of the admin API's `{id}`).
    pub endpoints: Vec<String>,
    /// Whether operational events go to `operator_url`.
    pub operator: bool,
}

/// One broker sink.
#[derive(Debug, Clone)]
pub struct BrokerSurface {
    /// The sink's name.
    pub name: String,
    /// `"nats"` or `"redis"`.
    pub kind: &'static str,
    /// The broker's address (`host:port`, without credentials).
    pub host: String,
    /// Patches after a snapshot, or snapshots only.
    pub mode: Mode,
    /// Each stream it publishes and its subject (NATS) or key (Redis).
    pub streams: Vec<(String, String)>,
}

impl Surface {
    /// What `config` exposes.
    pub fn of(config: &Config) -> Surface {
        let views = |views: &Option<ViewsSettings>| {
            views.as_ref().map_or_else(Default::default, |v| {
                (
                    v.named
                        .iter()
                        .map(|(name, spec)| (name.clone(), spec.fields.is_some()))
                        .collect(),
                    v.selector.aliases.keys().cloned().collect(),
                    v.ad_hoc,
                )
            })
        };
        let mut streams = Vec::new();
        for s in &config.streams {
            let (views, aliases, ad_hoc_views) = views(&s.views);
            streams.push(StreamSurface {
                name: s.name.clone(),
                source: Source::Polled(s.format),
                allow_move: s.diff.allow_move,
                views,
                aliases,
                ad_hoc_views,
                schema: config.document_schemas.get(&s.name).cloned(),
            });
        }
        for s in &config.push_streams {
            let (views, aliases, ad_hoc_views) = views(&s.views);
            streams.push(StreamSurface {
                name: s.name.clone(),
                source: Source::Push,
                allow_move: s.diff.allow_move,
                views,
                aliases,
                ad_hoc_views,
                schema: config.document_schemas.get(&s.name).cloned(),
            });
        }
        let brokers = config
            .broker_sinks
            .iter()
            .map(|sink| {
                use crate::sinks::broker::config::BrokerKind;
                let url = match &sink.kind {
                    BrokerKind::Nats(n) => n.url.as_str(),
                    BrokerKind::Redis(r) => r.url.as_str(),
                };
                BrokerSurface {
                    name: sink.name.clone(),
                    kind: sink.kind.as_str(),
                    host: host_of(url),
                    mode: sink.mode,
                    streams: sink
                        .streams
                        .iter()
                        .map(|s| (s.stream.clone(), s.destination.clone()))
                        .collect(),
                }
            })
            .collect();
        Surface {
            listen: config.server.listen,
            streams,
            push: config.push.is_some(),
            webhooks: config.webhooks.as_ref().map(|w| WebhooksSurface {
                admin: w.admin_token.is_some(),
                endpoints: w.endpoints.iter().map(|e| e.id.clone()).collect(),
                operator: w.operator.is_some(),
            }),
            proxy: config.proxy.is_some(),
            websocket: config.websocket.enabled,
            brokers,
        }
    }

    /// The document schemas known without a running server: the files streams name and the
    /// GTFS-realtime projection's; every other stream's is `{}` (any JSON value).
    pub fn static_schemas(&self) -> DocumentSchemas {
        self.schemas_with(|_| None)
    }

    /// The document schemas of a running server: as [`Surface::static_schemas`], with the
    /// others inferred from each stream's current document.
    pub fn current_schemas(&self, hub: &Hub) -> DocumentSchemas {
        self.schemas_with(|name| {
            let snapshot = hub.get(name)?.snapshot()?;
            let mut schema = infer::infer([&snapshot.document]);
            if let Some(object) = schema.as_object_mut() {
                object.insert(
                    "description".into(),
                    json!(format!(
                        "Inferred from the stream's document at sequence {} (types, keys every \
                         item has, arrays' items); name a schema file with the stream's `schema` \
                         key for a stricter one.",
                        snapshot.seq
                    )),
                );
            }
            Some(schema)
        })
    }

    fn schemas_with(&self, current: impl Fn(&str) -> Option<Value>) -> DocumentSchemas {
        let mut by_stream = BTreeMap::new();
        for stream in &self.streams {
            let schema = if let Some(file) = &stream.schema {
                (*file.schema).clone()
            } else if stream.source == Source::Polled(Format::GtfsRt) {
                crate::upstream::decode::gtfs_rt::projection_schema()
            } else {
                current(&stream.name).unwrap_or_else(|| {
                    json!({"description": "Any JSON document: none was available to infer a schema from (the command line has none; a running server infers one from the current document)."})
                })
            };
            by_stream.insert(stream.name.clone(), schema);
        }
        DocumentSchemas { by_stream }
    }
}

impl Surface {
    /// The AsyncAPI document of a running server (document schemas from `hub`).
    pub fn asyncapi(&self, hub: &Hub) -> Value {
        asyncapi::document(self, &self.current_schemas(hub))
    }

    /// The OpenAPI document of a running server (document schemas from `hub`).
    pub fn openapi(&self, hub: &Hub) -> Value {
        openapi::document(self, &self.current_schemas(hub))
    }
}

/// Each stream's document schema, by stream name.
#[derive(Debug, Clone, Default)]
pub struct DocumentSchemas {
    /// Stream name → its documents' JSON Schema.
    pub by_stream: BTreeMap<String, Value>,
}

impl DocumentSchemas {
    /// The component schema name of stream `stream`'s documents, or of its view `view`.
    pub fn name(stream: &str, view: Option<&str>) -> String {
        match view {
            None => format!("{stream}.document"),
            Some(view) => format!("{stream}.views.{view}.document"),
        }
    }

    /// The component schema name of any view of `stream` (ad hoc ones included): the stream's
    /// shape, requiring nothing, since `fields` may drop any field of an entity.
    pub fn any_view(stream: &str) -> String {
        format!("{stream}.views.document")
    }

    /// The component schemas of every stream's and named view's documents. A view's documents
    /// have its stream's shape, but a view that projects `fields` keeps only some of each
    /// entity's: its schema requires nothing.
    pub fn components(&self, surface: &Surface) -> serde_json::Map<String, Value> {
        let mut out = serde_json::Map::new();
        for stream in &surface.streams {
            let Some(schema) = self.by_stream.get(&stream.name) else {
                continue;
            };
            out.insert(Self::name(&stream.name, None), schema.clone());
            if !stream.views.is_empty() || !stream.aliases.is_empty() {
                out.insert(
                    Self::any_view(&stream.name),
                    infer::without_required(schema),
                );
            }
            for (view, projects) in &stream.views {
                let schema = if *projects {
                    infer::without_required(schema)
                } else {
                    schema.clone()
                };
                out.insert(Self::name(&stream.name, Some(view)), schema);
            }
        }
        out
    }
}

/// `host:port` of a broker URL, without userinfo (credentials are never shown).
fn host_of(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => {
            let host = parsed.host_str().unwrap_or("localhost");
            match parsed.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            }
        }
        Err(_) => "localhost".to_owned(),
    }
}
