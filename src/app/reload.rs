//! Reloading the configuration while running (`SIGHUP`, `POST /admin/reload`): the file is
//! loaded again exactly as at start, validated, compared with the running configuration
//! ([`config::changes`]), and applied stream by stream, or refused changing nothing.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    Clustered, Retiring, Writers, cluster_quota, fingerprint, keep_alive, poll_task, polled_lease,
};
use crate::api::listing::{PolledUpstream, PolledUpstreams};
use crate::api::push::PushAuth;
use crate::api::reload::{Reload, ReloadAnswer};
use crate::cluster::lease::Holding;
use crate::cluster::node::{Cluster, Task};
use crate::config::changes::{self, Changes, StreamChange};
use crate::config::{self, Config, PushStreamSettings};
use crate::diff::DiffOptions;
use crate::hub::{Hub, Stream, StreamOptions};
use crate::metrics::Metrics;
use crate::redact::Redacted;
use crate::sinks::broker::{Brokers, Turns};
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
    /// This node's part of a cluster, when `[cluster]` is configured.
    pub(super) cluster: Option<InCluster>,
    /// The broker sinks, reconciled with the file's `[[sinks.*]]` and streams.
    pub(super) brokers: Arc<Brokers>,
    /// Where every task a reload starts runs (the application's: shutdown waits for them).
    pub(super) tasks: TaskTracker,
    pub(super) shutdown: CancellationToken,
}

/// What a reload changes of this node's part in a cluster.
pub(crate) struct InCluster {
    pub(crate) node: Arc<Cluster>,
    /// The push streams' writers, which the push routes read.
    pub(crate) writers: Writers,
    /// Each configured stream's part in the cluster.
    pub(crate) streams: Mutex<HashMap<String, Clustered>>,
}

impl Reloader {
    /// In a cluster, the lease of configured stream `name` (a polled stream's; a push
    /// stream's with webhooks on a shared outbox) as this node keeps it now, including a
    /// stream a reload added: what a webhook dispatcher follows (`fences`).
    pub fn lease(&self, name: &str) -> Option<watch::Receiver<Option<Holding>>> {
        let cluster = self.cluster.as_ref()?;
        let streams = cluster
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        streams.get(name)?.held.clone()
    }

    /// In a cluster, whether this node publishes configured stream `name` to brokers: its
    /// lease holder's turn, or for a push stream without a lease its rendezvous owner's, as
    /// at start (a watch and the task that keeps it, to run until `shutdown`).
    pub fn broker_turn(
        &self,
        name: &str,
        shutdown: &CancellationToken,
    ) -> Option<(watch::Receiver<bool>, Task)> {
        let cluster = self.cluster.as_ref()?;
        self.hub.get(name)?;
        Some(match self.lease(name) {
            Some(held) => cluster.node.lease_turn(held, shutdown),
            None => cluster.node.owner_turn(name, shutdown),
        })
    }
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
        let sinks = self.reload_sinks(&current, &new, &changes).await;
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
        if let Some(sinks) = sinks {
            body["sinks"] = sinks;
        }
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
                    if fields.contains(&"source") || self.retakes_lease(fields) {
                        // A push stream's dispatcher stores its documents, a polled one's
                        // does not, and in a cluster a lease taken anew is a new fence: the
                        // dispatcher is replaced. (Other restarts keep it: the stream
                        // starting over sends every endpoint its new document.)
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
        // In a cluster a stream's documents live in Redis and, on a shared store, its
        // dispatcher runs under its lease's fence (every stream has one then, a push stream's
        // taken for its webhooks alone), so the node holding the lease dispatches. On SQLite
        // only `cluster.webhooks_node` runs webhooks, every stream's, unfenced.
        let keep_document =
            new.cluster.is_none() && new.push_streams.iter().any(|s| s.name == name);
        let shared = new.webhooks.as_ref().is_some_and(|w| w.store.is_shared());
        let fence = self
            .lease(name)
            .filter(|_| shared)
            .map(|held| super::fences(held, &self.tasks, &self.shutdown));
        if let Err(error) = webhooks
            .start_dispatcher(stream, keep_document, fence)
            .await
        {
            tracing::error!(stream = %name, %error, "cannot dispatch the stream's webhooks");
        }
    }

    /// Reconciles the broker sinks with `new` (after its streams were applied): returns what
    /// each sink did, when any sink is or was configured. A broker that cannot be reached does
    /// not hold the reload up past the sink's timeout; the reload applies and the sink's
    /// publishers retry, as at start, showing the error in `/streams` and `/readyz`.
    async fn reload_sinks(&self, old: &Config, new: &Config, changes: &Changes) -> Option<Value> {
        if old.broker_sinks.is_empty() && new.broker_sinks.is_empty() {
            return None;
        }
        // A stream whose views were replaced: its views' publishers follow the new ones.
        let replaced: HashSet<String> = changes
            .streams
            .iter()
            .filter(|(_, c)| c.fields().iter().any(|f| *f == "views" || *f == "source"))
            .map(|(name, _)| name.clone())
            .collect();
        // A single node publishes every stream. In a cluster a publisher starts only with its
        // stream's turn, as at start: every published stream's turn is taken; those no
        // publisher starts with end when dropped here. A stream whose lease was taken anew
        // has a new turn: its publishers start again with it.
        let mut turns = Turns::new();
        let mut retaken = HashSet::new();
        if self.cluster.is_some() {
            for target in new.broker_sinks.iter().flat_map(|s| &s.streams) {
                if turns.contains_key(&target.stream) {
                    continue;
                }
                if let Some((turn, task)) = self.broker_turn(&target.stream, &self.shutdown) {
                    self.tasks.spawn(task);
                    turns.insert(target.stream.clone(), turn);
                }
            }
            retaken = changes
                .streams
                .iter()
                .filter(|(_, c)| self.retakes_lease(c.fields()))
                .map(|(name, _)| name.clone())
                .collect();
        }
        let sinks = self
            .brokers
            .reload(
                &new.broker_sinks,
                &self.hub,
                &self.views,
                &turns,
                &replaced,
                &retaken,
            )
            .await;
        drop(turns);
        Some(Value::Array(sinks.iter().map(|s| s.describe()).collect()))
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

    /// Whether a restart changing `fields` takes the stream's lease anew (in a cluster: a
    /// change of source or of `on_demand`), so what follows the lease (its webhook
    /// dispatcher's fence, its broker publishers' turn) starts again with the new one.
    fn retakes_lease(&self, fields: &[&'static str]) -> bool {
        self.cluster.is_some() && (fields.contains(&"source") || fields.contains(&"on_demand"))
    }

    /// In a cluster with webhooks on a shared store, the lease push stream `name` takes for
    /// its webhooks alone (any node writes it; the holder dispatches), as at start: the watch
    /// of it, its keeper spawned until `lease` is cancelled.
    fn push_lease(
        &self,
        node: &Cluster,
        name: &str,
        retention: crate::cluster::store::Retention,
        config: watch::Receiver<Option<Arc<str>>>,
        lease: &CancellationToken,
        new: &Config,
    ) -> Option<watch::Receiver<Option<Holding>>> {
        if !new.webhooks.as_ref().is_some_and(|w| w.store.is_shared()) {
            return None;
        }
        let (held, keeper) = node.keep_lease(name, retention, config, lease);
        self.tasks.spawn(keeper);
        Some(held)
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
        self.tasks
            .spawn(keep_alive(stream.clone(), keepalive, token.clone()));
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
    /// In a cluster see [`Self::restart_in_cluster`].
    fn restart(&self, name: &str, new: &Config, fields: &[&'static str]) {
        let Some(stream) = self.hub.get(name) else {
            return;
        };
        if let Some(cluster) = &self.cluster {
            return self.restart_in_cluster(cluster, &stream, new, fields);
        }
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
            self.start_poller(settings, stream, publish, None, token, new);
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

    /// Starts stream `name` over in a cluster, keeping its subscribers. Its log is shared, so
    /// this node does not start it over by itself: its new settings apply to its copy (history
    /// bounds, diff options, views), its poller and writer are built again with them, and its
    /// claim of the log for its configuration (the fingerprint of the stream's content
    /// settings) goes to Redis. When the content settings changed, that claim ends the log
    /// written from the previous ones: the lease holder running the new configuration writes
    /// the first document of the new source as a snapshot in a new epoch, once, which every
    /// node's follower loads (its subscribers get it whole), and nodes still running the
    /// previous configuration stand by (neither take the lease nor write) until reloaded.
    /// Otherwise the epoch goes on. The lease keeper is kept (webhooks and brokers follow its
    /// watch), told the new fingerprint; a change of `on_demand` or of source takes the lease
    /// anew.
    fn restart_in_cluster(
        &self,
        cluster: &InCluster,
        stream: &Arc<Stream>,
        new: &Config,
        fields: &[&'static str],
    ) {
        let name = stream.name().to_owned();
        let buffer = self.buffer(stream);
        let token = self.stop_tasks(&name);
        self.keep_alive(stream, new.server.keepalive, &token);
        let fingerprint = fingerprint(new, &name);
        let node = &cluster.node;
        let mut clustered = cluster
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let retake = fields.contains(&"on_demand") || fields.contains(&"source");
        if retake && let Some(old) = clustered.remove(&name) {
            old.lease.cancel();
        }
        if let Some(kept) = clustered.get(&name) {
            kept.config.send_replace(Some(fingerprint.clone()));
        }
        if let Some(settings) = new.streams.iter().find(|s| s.name == name) {
            cluster
                .writers
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&name);
            let options = self.options(
                settings.history,
                settings.history_bytes,
                &settings.diff,
                buffer,
            );
            stream.set_options(options.clone());
            if fields.contains(&"views") || fields.contains(&"source") {
                self.views.replace(
                    stream,
                    self.views_of(stream, settings.views.as_ref(), &options),
                );
            }
            let retention = node.retention(settings.history, settings.history_bytes);
            self.tasks
                .spawn(node.claim(&name, fingerprint.clone(), retention, &token));
            let held = match clustered.get(&name).and_then(|c| c.held.clone()) {
                Some(held) => held,
                None => {
                    let (config, watched) = watch::channel(Some(fingerprint.clone()));
                    let lease = self.shutdown.child_token();
                    let (held, tasks) =
                        polled_lease(node, settings, stream, retention, watched, &lease);
                    for task in tasks {
                        self.tasks.spawn(task);
                    }
                    clustered.insert(
                        name.clone(),
                        Clustered {
                            config,
                            held: Some(held.clone()),
                            lease,
                        },
                    );
                    held
                }
            };
            drop(clustered);
            let writer = node.writer(
                stream.clone(),
                retention,
                Some(held.clone()),
                Some(fingerprint),
            );
            self.start_poller(settings, stream.clone(), writer, Some(held), token, new);
        } else if let Some(settings) = new.push_streams.iter().find(|s| s.name == name) {
            self.upstreams.remove(&name);
            let options = self.push_options(settings, buffer);
            stream.set_options(options.clone());
            if fields.contains(&"views") || fields.contains(&"source") {
                self.views.replace(
                    stream,
                    self.views_of(stream, settings.views.as_ref(), &options),
                );
            }
            let retention = node.retention(settings.history, settings.history_bytes);
            self.tasks
                .spawn(node.claim(&name, fingerprint.clone(), retention, &token));
            if !clustered.contains_key(&name) {
                // A stream polled until now: a push stream takes a lease only for webhooks.
                let (config, watched) = watch::channel(Some(fingerprint.clone()));
                let lease = self.shutdown.child_token();
                let held = self.push_lease(node, &name, retention, watched, &lease, new);
                clustered.insert(
                    name.clone(),
                    Clustered {
                        config,
                        held,
                        lease,
                    },
                );
            }
            drop(clustered);
            cluster
                .writers
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(
                    name,
                    node.writer(stream.clone(), retention, None, Some(fingerprint)),
                );
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

    /// Builds and starts the poller of `stream` under `token`, publishing through `publish`;
    /// in a cluster it polls in the turns `held` gives (while this node holds the lease),
    /// within the cluster's rate limits.
    fn start_poller(
        &self,
        settings: &StreamSettings,
        stream: Arc<Stream>,
        publish: Arc<dyn Publish>,
        held: Option<watch::Receiver<Option<Holding>>>,
        token: CancellationToken,
        config: &Config,
    ) {
        let publish = Arc::new(Retiring {
            inner: publish,
            token: token.clone(),
        });
        let mut poller = Poller::new(
            Arc::new(settings.clone()),
            self.fetcher.clone(),
            self.rate_limits.limiter(&settings.rate_limit_group),
            self.metrics.clone(),
            publish,
            config.upstream.backoff,
        );
        if let (Some(held), Some(cluster)) = (held, &self.cluster) {
            poller = poller.taking_turns(held).sharing_quota(cluster_quota(
                &cluster.node,
                &self.rate_limits,
                &self.metrics,
            ));
        }
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
        self.tasks.spawn(poll_task(settings, poller, stream, token));
    }

    /// Ends stream `name`: its subscribers get an `error` event saying it was removed, then
    /// its subscriptions end. In a cluster this node stops following and writing it and gives
    /// its lease up (a node not reloaded yet may take it and go on polling it); its keys stay
    /// in Redis for the nodes that still run it and expire `cluster.key_ttl` after the last
    /// write or poll.
    fn remove(&self, name: &str) {
        if let Some(cluster) = &self.cluster {
            if let Some(clustered) = cluster
                .streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(name)
            {
                clustered.lease.cancel();
            }
            cluster
                .writers
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(name);
            cluster.node.forget(name);
        }
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

    /// Starts stream `name`, new in `new`, as at start. In a cluster this node loads it from
    /// the log (another node may run it already), claims the log for its configuration,
    /// competes for its lease (a polled stream) and writes it through the log.
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
            match &self.cluster {
                None => self.start_poller(settings, stream.clone(), stream, None, token, new),
                Some(cluster) => {
                    let node = &cluster.node;
                    let retention = node.retention(settings.history, settings.history_bytes);
                    let fingerprint = fingerprint(new, name);
                    self.load_from_log(node, &stream, settings.history);
                    self.tasks
                        .spawn(node.claim(name, fingerprint.clone(), retention, &token));
                    let (config, watched) = watch::channel(Some(fingerprint.clone()));
                    let lease = self.shutdown.child_token();
                    let (held, tasks) =
                        polled_lease(node, settings, &stream, retention, watched, &lease);
                    for task in tasks {
                        self.tasks.spawn(task);
                    }
                    cluster
                        .streams
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(
                            name.to_owned(),
                            Clustered {
                                config,
                                held: Some(held.clone()),
                                lease,
                            },
                        );
                    let writer = node.writer(
                        stream.clone(),
                        retention,
                        Some(held.clone()),
                        Some(fingerprint),
                    );
                    self.start_poller(settings, stream, writer, Some(held), token, new);
                }
            }
        } else if let Some(settings) = new.push_streams.iter().find(|s| s.name == name) {
            let options = self.push_options(settings, buffer);
            let stream = self.insert(name, options.clone());
            self.keep_alive(&stream, new.server.keepalive, &token);
            if let Some(views) = self.views_of(&stream, settings.views.as_ref(), &options) {
                self.views.attach(&stream, views);
            }
            if let Some(cluster) = &self.cluster {
                // Any node writes a push stream; with webhooks on a shared store it takes a
                // lease for them, whose holder dispatches them.
                let node = &cluster.node;
                let retention = node.retention(settings.history, settings.history_bytes);
                let fingerprint = fingerprint(new, name);
                self.load_from_log(node, &stream, settings.history);
                self.tasks
                    .spawn(node.claim(name, fingerprint.clone(), retention, &token));
                let (config, watched) = watch::channel(Some(fingerprint.clone()));
                let lease = self.shutdown.child_token();
                let held = self.push_lease(node, name, retention, watched, &lease, new);
                cluster
                    .streams
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(
                        name.to_owned(),
                        Clustered {
                            config,
                            held,
                            lease,
                        },
                    );
                cluster
                    .writers
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(
                        name.to_owned(),
                        node.writer(stream, retention, None, Some(fingerprint)),
                    );
            }
        }
    }

    /// Loads a stream new on this node from the cluster's log, where other nodes may have
    /// written it already (the follower keeps it up to date from then on).
    fn load_from_log(&self, node: &Cluster, stream: &Arc<Stream>, history: usize) {
        let catchup = node.catchup(history);
        let stream = stream.clone();
        self.tasks.spawn(async move {
            if let Err(error) = catchup.reload(&stream).await {
                tracing::debug!(stream = stream.name(), %error, "cannot load the stream from the log yet; the follower will");
            }
        });
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
