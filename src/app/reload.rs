//! Reloading the configuration while running (`SIGHUP`, `POST /admin/reload`): the file is
//! loaded again exactly as at start, validated, compared with the running configuration
//! ([`config::changes`]), and applied stream by stream, or refused changing nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{Retiring, keep_alive, poll_task};
use crate::api::listing::{PolledUpstream, PolledUpstreams};
use crate::api::push::PushAuth;
use crate::api::reload::{Reload, ReloadAnswer};
use crate::config::changes::{self, Changes, StreamChange};
use crate::config::{self, Config, PushStreamSettings};
use crate::diff::DiffOptions;
use crate::hub::{Hub, Stream, StreamOptions};
use crate::metrics::Metrics;
use crate::redact::Redacted;
use crate::sinks::webhook::Webhooks;
use crate::snapshot::SnapshotStore;
use crate::upstream::config::StreamSettings;
use crate::upstream::fetch::{FetchError, Fetcher};
use crate::upstream::poller::{Poller, Publish, PublishResult};
use crate::upstream::ratelimit::RateLimits;
use crate::views::config::ViewsSettings;
use crate::views::{Budget, StreamViews, Views};

/// The status and `cause` of the `error` event a removed stream's subscribers get.
const REMOVED_STATUS: u16 = 410;
const REMOVED_CAUSE: &str = "stream-removed";

/// What a reload needs of the running application.
pub struct Reloader {
    /// The file the configuration came from.
    pub(super) path: PathBuf,
    /// The running configuration; held for the whole of a reload, so reloads run one at a
    /// time (a second waits).
    pub(super) current: tokio::sync::Mutex<Config>,
    /// Each configured stream's token (its poller and keep-alive run under it).
    pub(super) running: Mutex<HashMap<String, CancellationToken>>,
    pub(super) hub: Arc<Hub>,
    pub(super) views: Arc<Views>,
    pub(super) budget: Arc<Budget>,
    pub(super) snapshots: SnapshotStore,
    pub(super) metrics: Arc<Metrics>,
    pub(super) fetcher: Arc<Fetcher>,
    pub(super) rate_limits: Arc<RateLimits>,
    pub(super) upstreams: Arc<PolledUpstreams>,
    pub(super) push: Arc<RwLock<Option<Arc<PushAuth>>>>,
    pub(super) webhooks: Option<Arc<Webhooks>>,
    /// What `/asyncapi.json` and `/openapi.json` describe: the applied file's.
    pub(super) contracts: Arc<crate::contracts::Current>,
    pub(super) shutdown: CancellationToken,
}

impl Reload for Reloader {
    fn reload(&self) -> BoxFuture<'_, ReloadAnswer> {
        Box::pin(self.run())
    }
}

/// One stream's line in the answer and the log.
fn stream_line(name: &str, change: &StreamChange) -> Value {
    let mut line = json!({"stream": name, "change": change.as_str()});
    if !change.fields().is_empty() {
        line["fields"] = json!(change.fields());
    }
    line
}

fn answer(status: StatusCode, body: Value) -> ReloadAnswer {
    ReloadAnswer { status, body }
}

impl Reloader {
    async fn run(&self) -> ReloadAnswer {
        let mut current = self.current.lock().await;
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || config::load(&path)).await;
        let new = match loaded {
            Ok(Ok(new)) => new,
            Ok(Err(error)) => {
                let problems: Vec<Value> = error
                    .problems
                    .iter()
                    .map(|p| json!({"key": p.key, "message": p.message}))
                    .collect();
                tracing::error!(file = %self.path.display(), "configuration reload refused, nothing changed:\n{error}");
                return answer(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({
                        "reloaded": false,
                        "file": self.path.display().to_string(),
                        "message": format!("invalid configuration, nothing changed: {} problem(s)", problems.len()),
                        "problems": problems,
                    }),
                );
            }
            Err(error) => {
                return answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"reloaded": false, "message": format!("reading the configuration failed: {error}")}),
                );
            }
        };
        let changes = changes::changes(&current, &new);
        let streams: Vec<Value> = changes
            .streams
            .iter()
            .map(|(name, change)| stream_line(name, change))
            .collect();
        if !changes.needs_restart.is_empty() {
            let needs: Vec<Value> = changes
                .needs_restart
                .iter()
                .map(|n| json!({"section": n.section, "why": n.why}))
                .collect();
            let sections: Vec<&str> = changes
                .needs_restart
                .iter()
                .map(|n| n.section.as_str())
                .collect();
            tracing::warn!(
                file = %self.path.display(),
                needs_restart = %sections.join(", "),
                "configuration reload refused, nothing changed: these sections cannot change while running; restart the process to apply them"
            );
            return answer(
                StatusCode::CONFLICT,
                json!({
                    "reloaded": false,
                    "message": format!("nothing changed: {} cannot change while running; restart the process to apply the file", sections.join(", ")),
                    "needs_restart": needs,
                    "streams": streams,
                }),
            );
        }
        let endpoints = self.apply(&current, &new, &changes).await;
        for (name, change) in &changes.streams {
            if *change != StreamChange::Unchanged {
                tracing::info!(stream = %name, change = change.as_str(), fields = ?change.fields(), "configuration reload");
            }
        }
        tracing::info!(
            file = %self.path.display(),
            changed = changes.any(),
            "configuration reloaded"
        );
        self.contracts.replace(&new);
        *current = new;
        let mut body = json!({
            "reloaded": true,
            "changed": changes.any(),
            "streams": streams,
            "push_token": if changes.push_token { "updated" } else { "unchanged" },
            "needs_restart": [],
        });
        match endpoints {
            Some(Ok(ids)) => body["webhook_endpoints"] = json!({"updated": ids}),
            Some(Err(error)) => {
                body["webhook_endpoints"] = json!({"error": error});
            }
            None => {}
        }
        answer(StatusCode::OK, body)
    }

    /// Applies `changes` (from `old` to `new`); returns what reconciling the webhook endpoints
    /// did, if they changed.
    async fn apply(
        &self,
        old: &Config,
        new: &Config,
        changes: &Changes,
    ) -> Option<Result<Vec<String>, String>> {
        // Streams whose views or source changed: the views of them endpoints receive are
        // followed anew.
        let mut views_restarted = Vec::new();
        for (name, change) in &changes.streams {
            match change {
                StreamChange::Unchanged => {}
                StreamChange::Updated(_) => {
                    if let Some(settings) = new.streams.iter().find(|s| &s.name == name) {
                        self.update_polled(settings);
                    }
                }
                StreamChange::Restarted(fields) => {
                    self.restart(name, new, fields);
                    if fields.contains(&"source") {
                        // A push stream's dispatcher stores its documents, a polled one's
                        // does not: the dispatcher is replaced. (Other restarts keep it: the
                        // stream starting over sends every endpoint its new document.)
                        self.dispatch(name, new).await;
                    }
                    if fields.contains(&"views") || fields.contains(&"source") {
                        views_restarted.push(name.as_str());
                    }
                }
                StreamChange::Removed => {
                    self.remove(name);
                    if let Some(webhooks) = &self.webhooks {
                        webhooks.stop_dispatcher(name).await;
                    }
                }
                StreamChange::Added => {
                    self.add(name, new);
                    self.dispatch(name, new).await;
                }
            }
        }
        let push = new.push.as_ref().map(|push| {
            Arc::new(PushAuth {
                token: push.token.clone(),
                streams: new.push_streams.iter().map(|s| s.name.clone()).collect(),
            })
        });
        *self.push.write().unwrap_or_else(PoisonError::into_inner) = push;
        let (Some(webhooks), Some(settings)) = (&self.webhooks, &new.webhooks) else {
            return None;
        };
        let _ = old;
        let reconciled = if changes.webhook_endpoints {
            Some(
                webhooks
                    .endpoints()
                    .reload_configured(settings)
                    .await
                    .map_err(|e| {
                        tracing::error!(%e, "reconciling the webhook endpoints failed");
                        format!("reconciling the webhook endpoints failed: {e}")
                    }),
            )
        } else {
            None
        };
        // Views endpoints start or stop receiving, and those of restarted streams.
        webhooks.follow_views(&views_restarted).await;
        reconciled
    }

    /// Starts the webhook dispatcher of stream `name` (added, or its source changed),
    /// replacing the one it had; a push stream's stores its documents.
    async fn dispatch(&self, name: &str, new: &Config) {
        let (Some(webhooks), Some(stream)) = (&self.webhooks, self.hub.get(name)) else {
            return;
        };
        // Reloads that add streams or change their source are refused in a cluster, where
        // a stream's documents live in Redis and its dispatcher runs under its lease.
        let keep_document =
            new.cluster.is_none() && new.push_streams.iter().any(|s| s.name == name);
        if let Err(error) = webhooks.start_dispatcher(stream, keep_document, None).await {
            tracing::error!(stream = %name, %error, "cannot dispatch the stream's webhooks");
        }
    }

    fn options(
        &self,
        history: usize,
        history_bytes: u64,
        diff: &DiffOptions,
        buffer: usize,
    ) -> StreamOptions {
        StreamOptions {
            history,
            history_bytes,
            buffer,
            diff: diff.clone(),
        }
    }

    fn buffer(&self, stream: &Stream) -> usize {
        stream.options().buffer
    }

    /// New settings for a running poller (interval, headers, timeout, body limit, group).
    fn update_polled(&self, settings: &StreamSettings) {
        let Some(upstream) = self.upstreams.get(&settings.name) else {
            return;
        };
        upstream.control.reconfigure(
            Arc::new(settings.clone()),
            self.rate_limits.limiter(&settings.rate_limit_group),
        );
        self.upstreams.insert(
            settings.name.clone(),
            PolledUpstream {
                url: Redacted::new(&settings.url),
                interval: settings.interval,
                on_demand: settings.on_demand,
                status: upstream.status.clone(),
                control: upstream.control.clone(),
            },
        );
    }

    /// Stops stream `name`'s poller and keep-alive; returns a fresh token for new ones.
    fn stop_tasks(&self, name: &str) -> CancellationToken {
        let token = self.shutdown.child_token();
        let old = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), token.clone());
        if let Some(old) = old {
            old.cancel();
        }
        token
    }

    fn keep_alive(&self, stream: &Arc<Stream>, keepalive: Duration, token: &CancellationToken) {
        tokio::spawn(keep_alive(stream.clone(), keepalive, token.clone()));
    }

    /// The views of `stream` as `settings` configure them (none without settings).
    fn views_of(
        &self,
        stream: &Stream,
        settings: Option<&ViewsSettings>,
        options: &StreamOptions,
    ) -> Option<StreamViews> {
        settings.map(|settings| {
            StreamViews::new(
                stream,
                settings.clone(),
                options.clone(),
                self.snapshots.clone(),
                self.budget.clone(),
            )
        })
    }

    /// Starts stream `name` over with its new settings, keeping its subscribers: a polled
    /// stream gets a new poller whose first document is sent to every subscriber as a
    /// snapshot in a new epoch; a push stream starts over at once from its current document.
    fn restart(&self, name: &str, new: &Config, fields: &[&'static str]) {
        let Some(stream) = self.hub.get(name) else {
            return;
        };
        let buffer = self.buffer(&stream);
        let token = self.stop_tasks(name);
        self.keep_alive(&stream, new.server.keepalive, &token);
        if let Some(settings) = new.streams.iter().find(|s| s.name == name) {
            let options = self.options(
                settings.history,
                settings.history_bytes,
                &settings.diff,
                buffer,
            );
            if fields.contains(&"views") || fields.contains(&"source") {
                self.views.replace(
                    &stream,
                    self.views_of(&stream, settings.views.as_ref(), &options),
                );
            }
            let publish = Arc::new(Restarting {
                stream: stream.clone(),
                options: Mutex::new(Some(options)),
            });
            self.start_poller(settings, stream, publish, token, new);
        } else if let Some(settings) = new.push_streams.iter().find(|s| s.name == name) {
            self.upstreams.remove(name);
            let options = self.push_options(settings, buffer);
            if fields.contains(&"views") || fields.contains(&"source") {
                self.views.replace(
                    &stream,
                    self.views_of(&stream, settings.views.as_ref(), &options),
                );
            }
            match stream.snapshot() {
                Some(current) => stream.restart(options, current.document.clone()),
                None => stream.set_options(options),
            }
        }
    }

    fn push_options(&self, settings: &PushStreamSettings, buffer: usize) -> StreamOptions {
        self.options(
            settings.history,
            settings.history_bytes,
            &settings.diff,
            buffer,
        )
    }

    /// Builds and starts the poller of `stream` under `token`, publishing through `publish`.
    fn start_poller(
        &self,
        settings: &StreamSettings,
        stream: Arc<Stream>,
        publish: Arc<dyn Publish>,
        token: CancellationToken,
        config: &Config,
    ) {
        let publish = Arc::new(Retiring {
            inner: publish,
            token: token.clone(),
        });
        let poller = Poller::new(
            Arc::new(settings.clone()),
            self.fetcher.clone(),
            self.rate_limits.limiter(&settings.rate_limit_group),
            self.metrics.clone(),
            publish,
            config.upstream.backoff,
        );
        self.upstreams.insert(
            settings.name.clone(),
            PolledUpstream {
                url: Redacted::new(&settings.url),
                interval: settings.interval,
                on_demand: settings.on_demand,
                status: poller.status(),
                control: poller.control(),
            },
        );
        tokio::spawn(poll_task(settings, poller, stream, token));
    }

    /// Ends stream `name`: its subscribers get an `error` event saying it was removed, then
    /// its subscriptions end.
    fn remove(&self, name: &str) {
        if let Some(token) = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
        {
            token.cancel();
        }
        self.upstreams.remove(name);
        self.views.forget(name);
        if let Some(stream) = self.hub.remove(name) {
            stream.end(
                REMOVED_STATUS,
                REMOVED_CAUSE,
                format!(
                    "stream {name:?} was removed from the configuration (reloaded); it ends here"
                ),
            );
        }
    }

    /// Starts stream `name`, new in `new`, as at start.
    fn add(&self, name: &str, new: &Config) {
        let buffer = new.server.subscriber_buffer;
        let token = self.shutdown.child_token();
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), token.clone());
        if let Some(settings) = new.streams.iter().find(|s| s.name == name) {
            let options = self.options(
                settings.history,
                settings.history_bytes,
                &settings.diff,
                buffer,
            );
            let stream = self.insert(name, options.clone());
            self.keep_alive(&stream, new.server.keepalive, &token);
            if let Some(views) = self.views_of(&stream, settings.views.as_ref(), &options) {
                self.views.attach(&stream, views);
            }
            self.start_poller(settings, stream.clone(), stream, token, new);
        } else if let Some(settings) = new.push_streams.iter().find(|s| s.name == name) {
            let options = self.push_options(settings, buffer);
            let stream = self.insert(name, options.clone());
            self.keep_alive(&stream, new.server.keepalive, &token);
            if let Some(views) = self.views_of(&stream, settings.views.as_ref(), &options) {
                self.views.attach(&stream, views);
            }
        }
    }

    fn insert(&self, name: &str, options: StreamOptions) -> Arc<Stream> {
        self.hub.insert(Arc::new(Stream::new(
            name,
            options,
            self.snapshots.clone(),
            self.metrics.clone(),
        )))
    }
}

/// A restarted stream's publisher: its first document starts the stream over (new options,
/// a new epoch, the document sent whole to every subscriber); the rest publish as usual.
struct Restarting {
    stream: Arc<Stream>,
    /// Taken by the first document.
    options: Mutex<Option<StreamOptions>>,
}

impl Publish for Restarting {
    fn document(self: Arc<Self>, doc: Value) -> BoxFuture<'static, PublishResult> {
        let options = self
            .options
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let stream = self.stream.clone();
        match options {
            None => stream.document(doc),
            Some(options) => Box::pin(async move {
                let name = stream.name().to_owned();
                match tokio::task::spawn_blocking(move || stream.restart(options, doc)).await {
                    Ok(()) => {
                        tracing::info!(stream = %name, "stream started over after a configuration reload (new epoch)");
                        PublishResult::Changed
                    }
                    Err(error) => {
                        tracing::error!(stream = %name, %error, "starting the stream over panicked");
                        PublishResult::Failed
                    }
                }
            }),
        }
    }

    fn failure<'a>(&'a self, error: &'a FetchError, retry_in: Duration) -> BoxFuture<'a, ()> {
        Publish::failure(&*self.stream, error, retry_in)
    }

    fn recovered(&self) -> BoxFuture<'_, ()> {
        Publish::recovered(&*self.stream)
    }

    fn audience(&self) -> usize {
        self.stream.audience()
    }
}
