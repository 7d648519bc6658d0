//! Wiring only: [`App::build`] makes every part from a validated [`Config`], [`App::run`] runs
//! them until shutdown ([`run`] does both). [`reload`] applies the configuration file again
//! while running.

pub mod reload;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::listing::{PolledUpstream, PolledUpstreams};
use crate::api::push::PushAuth;
use crate::api::server::{ServeOptions, Stall};
use crate::api::subscribe::Subscriptions;
use crate::api::{self, AppState, ClusterState};
use crate::cluster::lease::Holding;
use crate::cluster::node::Cluster;
use crate::cluster::quota::ClusterQuota;
use crate::cluster::replica::Replicas;
use crate::cluster::tokens::SharedTokens;
use crate::cluster::writer::Writer;
use crate::config::Config;
use crate::diff::DiffOptions;
use crate::hub::{Hub, Stream, StreamOptions};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::proxy::streams::{ClusterLink, DynamicStreams, Polling};
use crate::redact::Redacted;
use crate::sim;
use crate::sinks::broker::{Brokers, Turns};
use crate::sinks::webhook::config::WebhookStore;
use crate::sinks::webhook::outbox::Outbox;
use crate::sinks::webhook::outbox::postgres::PostgresOutbox;
use crate::sinks::webhook::outbox::sqlite::SqliteOutbox;
use crate::sinks::webhook::{Shared, Webhooks};
use crate::sinks::ws::WebSockets;
use crate::snapshot::{Snapshot, SnapshotStore};
use crate::upstream::fetch::Fetcher;
use crate::upstream::on_demand::{self, Idle, OnDemand};
use crate::upstream::poller::{Poller, Publish};
use crate::upstream::ratelimit::{RateLimits, SharedQuota};
use crate::views::config::ViewsSettings;
use crate::views::{Budget, StreamViews, Views};

/// The sockets the application serves on, bound before it starts (so tests can bind port 0
/// and read the address, and so a bad address fails before anything runs).
pub struct Listeners {
    /// Subscribers connect here.
    pub api: TcpListener,
    /// The simulated feeds, when the configuration enables the simulator.
    pub simulator: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses named in `config`.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let api = bind(config.server.listen, "server.listen").await?;
        let simulator = match &config.simulator {
            Some(sim) => Some(bind(sim.listen, "simulator.listen").await?),
            None => None,
        };
        Ok(Listeners { api, simulator })
    }
}

async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (`{key}`)"))
}

/// Builds the application from `config` and runs it until `shutdown` is cancelled. Returns
/// once the server has drained (or the grace period ran out) and every task has stopped.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    App::build(config, listeners, shutdown).await?.run().await
}

/// A task `run` starts.
type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Every part of the application, built from a validated configuration, not yet serving.
pub struct App {
    listener: TcpListener,
    router: Router,
    subscriptions: Arc<Subscriptions>,
    websockets: Arc<WebSockets<Subscriptions>>,
    stall: Stall,
    serve: ServeOptions,
    hub: Arc<Hub>,
    proxy: Option<Arc<Proxy>>,
    /// The simulator, the pollers and the keep-alive tickers, started by `run`.
    starting: Vec<Task>,
    /// Tasks already running (the webhook sink's, started as it was built); `run` adds its own
    /// and waits for all of them at shutdown.
    tasks: JoinSet<()>,
    /// Tasks started after building (the broker sinks' publishers, and the pollers,
    /// keep-alives and publishers a reload starts): `run` waits for them too at shutdown.
    tracker: TaskTracker,
    /// Where the server listens, for the log.
    listen: SocketAddr,
    streams: usize,
    shutdown: CancellationToken,
    reloader: Option<Arc<reload::Reloader>>,
}

impl App {
    /// What reloads the configuration file (`SIGHUP`), when the application was built from one.
    pub fn reloader(&self) -> Option<Arc<dyn crate::api::reload::Reload>> {
        self.reloader
            .clone()
            .map(|r| r as Arc<dyn crate::api::reload::Reload>)
    }

    /// Builds every part from `config`: the streams and their pollers, the push streams (with
    /// their stored documents), the webhook sink, the proxy mode and the routes. Fails on what
    /// only building can find (the HTTP clients, the webhook database).
    pub async fn build(
        config: Config,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> anyhow::Result<App> {
        let metrics = Arc::new(Metrics::new());
        let cluster = match &config.cluster {
            Some(settings) => Some(Arc::new(
                Cluster::connect(settings, metrics.clone()).context(
                    "cannot prepare the connection to the cluster's Redis (`cluster.redis`)",
                )?,
            )),
            None => None,
        };
        let mut streams = Streams {
            config: &config,
            hub: Arc::new(Hub::new()),
            snapshots: SnapshotStore::new(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            starting: Vec::new(),
            cluster: cluster.clone(),
            writers: HashMap::new(),
            views: Views::new(),
            budget: Budget::new(config.max_views),
            leases: HashMap::new(),
            running: HashMap::new(),
            clustered: HashMap::new(),
        };
        if let (Some(settings), Some(listener)) = (config.simulator.clone(), listeners.simulator) {
            let shutdown = shutdown.clone();
            streams.starting.push(Box::pin(async move {
                if let Err(error) = sim::serve(listener, settings, shutdown).await {
                    tracing::error!(%error, "the simulator stopped");
                }
            }));
        }
        let fetcher = Arc::new(
            Fetcher::new(&config.upstream.user_agent).context("cannot build the HTTP client")?,
        );
        let rate_limits = Arc::new(RateLimits::new(&config.upstream, &config.streams));
        let upstreams = streams.polled(&fetcher, &rate_limits);
        // The outbox opens before the push streams exist: it holds their last documents.
        let outbox = match &config.webhooks {
            Some(settings) if runs_webhooks(&config) => Some(open_outbox(&settings.store).await?),
            _ => None,
        };
        streams.pushed(outbox.as_deref()).await?;
        let Streams {
            hub,
            snapshots,
            mut starting,
            writers,
            views,
            leases,
            running,
            budget,
            clustered,
            ..
        } = streams;
        let writers: Writers = Arc::new(std::sync::RwLock::new(writers));
        let views = Arc::new(views);
        let mut tasks = JoinSet::new();
        // Everything started after this point (the webhooks' fences, broker publishers, the
        // proxy's shared tokens, and whatever a reload starts) is tracked here; `run` waits
        // for it at shutdown.
        let tracker = TaskTracker::new();
        let webhooks = match (&config.webhooks, outbox) {
            (Some(settings), Some(outbox)) => {
                // In a cluster on a shared store, a stream's webhooks are dispatched by the node
                // holding its lease (on SQLite this node is the only one running them, and
                // dispatches every stream); push streams' documents live in Redis, not in the
                // outbox.
                let shared = cluster
                    .as_ref()
                    .filter(|_| settings.store.is_shared())
                    .map(|node| Shared {
                        node: node.node().to_owned(),
                        leases: leases
                            .iter()
                            .map(|(name, held)| {
                                (name.clone(), fences(held.clone(), &tracker, &shutdown))
                            })
                            .collect(),
                    });
                let push_streams = if cluster.is_some() {
                    Default::default()
                } else {
                    config.push_streams.iter().map(|s| s.name.clone()).collect()
                };
                Some(
                    Webhooks::start(
                        settings,
                        outbox,
                        hub.clone(),
                        views.clone(),
                        &push_streams,
                        &config.upstream.user_agent,
                        &mut tasks,
                        shutdown.clone(),
                        metrics.clone(),
                        shared,
                    )
                    .await
                    .context("cannot start webhooks")?,
                )
            }
            _ => None,
        };
        let brokers = {
            // In a cluster a stream is published by one node: its lease holder, or for a push
            // stream without one (one is taken only for webhooks) its rendezvous owner among
            // the live nodes.
            let mut turns = Turns::new();
            if let Some(cluster) = cluster.as_ref().filter(|_| !config.broker_sinks.is_empty()) {
                for stream in hub.all() {
                    let (turn, task) = match leases.get(stream.name()) {
                        Some(held) => cluster.lease_turn(held.clone(), &shutdown),
                        None => cluster.owner_turn(stream.name(), &shutdown),
                    };
                    turns.insert(stream.name().to_owned(), turn);
                    starting.push(task);
                }
            }
            Arc::new(
                Brokers::start(
                    &config.broker_sinks,
                    &hub,
                    &views,
                    cluster.is_some(),
                    &turns,
                    tracker.clone(),
                    shutdown.clone(),
                    metrics.clone(),
                )
                .await
                .context("cannot start the broker sinks (`sinks`)")?,
            )
        };
        let proxy = proxy(
            &config,
            &rate_limits,
            &metrics,
            cluster.as_ref(),
            &budget,
            &tracker,
            &shutdown,
        )?;
        if let Some(cluster) = &cluster {
            let history = config
                .streams
                .iter()
                .map(|s| s.history)
                .chain(config.push_streams.iter().map(|s| s.history))
                .chain(config.proxy.iter().map(|p| p.history))
                .max()
                .unwrap_or(0);
            let dynamic = proxy.as_ref().map(|p| p.streams().clone());
            let replicas: Arc<dyn Replicas> = Arc::new(NodeReplicas {
                hub: hub.clone(),
                dynamic: dynamic.clone(),
            });
            starting.extend(cluster.tasks(replicas, history, &shutdown));
            if let Some(dynamic) = dynamic {
                starting.push(Box::pin(identity_key(
                    cluster.clone(),
                    dynamic,
                    shutdown.clone(),
                )));
            }
        }

        let push = Arc::new(std::sync::RwLock::new(config.push.as_ref().map(|push| {
            Arc::new(PushAuth {
                token: push.token.clone(),
                streams: config.push_streams.iter().map(|s| s.name.clone()).collect(),
            })
        })));
        let contracts = Arc::new(crate::contracts::Current::of(&config));
        let reloader = config.source.clone().map(|path| {
            Arc::new(reload::Reloader {
                path,
                current: tokio::sync::Mutex::new(config.clone()),
                running: std::sync::Mutex::new(running),
                hub: hub.clone(),
                views: views.clone(),
                budget,
                snapshots: snapshots.clone(),
                metrics: metrics.clone(),
                fetcher: fetcher.clone(),
                rate_limits: rate_limits.clone(),
                upstreams: upstreams.clone(),
                push: push.clone(),
                webhooks: webhooks.clone(),
                contracts: contracts.clone(),
                cluster: cluster.as_ref().map(|node| reload::InCluster {
                    node: node.clone(),
                    writers: writers.clone(),
                    streams: std::sync::Mutex::new(clustered),
                }),
                brokers: brokers.clone(),
                tasks: tracker.clone(),
                shutdown: shutdown.clone(),
            })
        });
        let server = &config.server;
        let mut subscriptions = Subscriptions::new(
            hub.clone(),
            views.clone(),
            proxy.clone(),
            server.retry_hint,
            server.cors.clone(),
            config.websocket.enabled,
        )
        .with_gzip_level(server.gzip_level);
        if let Some(cluster) = &cluster {
            subscriptions =
                subscriptions.after_the_log(cluster.loaded(), cluster.settings().timeout);
        }
        let subscriptions = Arc::new(subscriptions);
        let state = Arc::new(AppState {
            hub: hub.clone(),
            views: views.clone(),
            metrics: metrics.clone(),
            snapshots,
            upstreams: upstreams.clone(),
            push,
            reload: reloader
                .clone()
                .map(|r| r as Arc<dyn crate::api::reload::Reload>),
            push_max_body: config.push.as_ref().map_or(0, |p| {
                usize::try_from(p.max_body_bytes).unwrap_or(usize::MAX)
            }),
            body_timeout: config.server.body_timeout,
            webhooks,
            brokers,
            admin_token: config.webhooks.as_ref().and_then(|w| w.admin_token.clone()),
            webhooks_node: match (&config.cluster, runs_webhooks(&config)) {
                (Some(cluster), false) if config.webhooks.is_some() => {
                    cluster.webhooks_node.as_ref().map(|n| n.0.clone())
                }
                _ => None,
            },
            proxy: proxy.clone(),
            subscriptions: subscriptions.clone(),
            cluster: cluster.as_ref().map(|node| ClusterState {
                node: node.clone(),
                writers: writers.clone(),
            }),
            contracts: contracts.clone(),
        });
        let websockets = Arc::new(WebSockets::new(
            config.websocket,
            subscriptions.clone(),
            metrics.clone(),
            server.stall_timeout,
        ));
        Ok(App {
            listen: listeners.api.local_addr().unwrap_or(server.listen),
            listener: listeners.api,
            router: api::router(state, &server.cors),
            subscriptions,
            websockets,
            stall: Stall {
                timeout: server.stall_timeout,
                stalled: metrics.stalled_connections.clone(),
            },
            serve: ServeOptions {
                shutdown_grace: server.shutdown_grace,
                header_timeout: server.header_timeout,
                idle_timeout: server.idle_timeout,
                max_connections: server.max_connections,
            },
            hub,
            proxy,
            starting,
            tasks,
            tracker,
            streams: config.streams.len() + config.push_streams.len(),
            shutdown,
            reloader,
        })
    }

    /// Starts the simulator, the pollers and the keep-alive tickers, then serves until the
    /// shutdown token fires; returns once the connections drained (or the grace period ran
    /// out) and every task stopped.
    pub async fn run(self) -> anyhow::Result<()> {
        let App {
            listener,
            router,
            subscriptions,
            websockets,
            stall,
            serve,
            hub,
            proxy,
            starting,
            mut tasks,
            tracker,
            listen,
            streams,
            shutdown,
            reloader: _,
        } = self;
        api::server::fit_open_files(serve.max_connections);
        for task in starting {
            tasks.spawn(task);
        }
        // Shutdown closes every stream first, so SSE responses end and connections can drain
        // within the grace period.
        {
            let hub = hub.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                shutdown.cancelled().await;
                hub.close_all();
                if let Some(proxy) = proxy {
                    proxy.streams().close_all();
                }
            });
        }
        tracing::info!(
            %listen,
            streams,
            "patchwire is serving"
        );
        api::server::serve(
            listener,
            router,
            subscriptions,
            websockets,
            stall,
            serve,
            shutdown,
        )
        .await;

        hub.close_all();
        let drained = tokio::time::timeout(serve.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
            // What a late reload starts runs under the cancelled shutdown token and ends at
            // once; closing lets `wait` resolve once nothing tracked runs.
            tracker.close();
            tracker.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("some tasks did not stop within the grace period");
            tasks.abort_all();
        }
        tracing::info!("patchwire stopped");
        Ok(())
    }
}

/// Opens the webhook outbox `store` names.
/// Whether this node runs the configured webhooks: every node does, but in a cluster on an
/// SQLite store (each node's own file) only the one `cluster.webhooks_node` names.
fn runs_webhooks(config: &Config) -> bool {
    match (&config.webhooks, &config.cluster) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(webhooks), Some(cluster)) => {
            webhooks.store.is_shared() || cluster.delivers_webhooks()
        }
    }
}

async fn open_outbox(store: &WebhookStore) -> anyhow::Result<Arc<dyn Outbox>> {
    Ok(match store {
        WebhookStore::Sqlite(path) => Arc::new(
            SqliteOutbox::open(path)
                .await
                .context("cannot start webhooks (`webhooks.database`)")?,
        ),
        WebhookStore::Postgres(pg) => Arc::new(
            PostgresOutbox::open(pg.url.as_str(), pg.connections, &pg.shown().to_string())
                .await
                .context("cannot start webhooks (`webhooks.store`)")?,
        ),
    })
}

/// The fence of a lease while this node holds it, for a webhook dispatcher (which knows
/// nothing of the cluster's poll turns).
fn fences(
    mut held: watch::Receiver<Option<Holding>>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> watch::Receiver<Option<u64>> {
    let (sender, fences) = watch::channel(held.borrow_and_update().as_ref().map(|h| h.id));
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = held.changed() => if changed.is_err() { return },
            }
            let fence = held.borrow_and_update().as_ref().map(|h| h.id);
            sender.send_if_modified(|current| {
                let changed = *current != fence;
                *current = fence;
                changed
            });
        }
    });
    fences
}

/// The proxy mode, when `[proxy]` enables it: tokens and the registry of dynamic streams.
fn proxy(
    config: &Config,
    rate_limits: &Arc<RateLimits>,
    metrics: &Arc<Metrics>,
    cluster: Option<&Arc<Cluster>>,
    budget: &Arc<Budget>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Arc<Proxy>>> {
    let Some(settings) = &config.proxy else {
        return Ok(None);
    };
    let settings = Arc::new(settings.clone());
    let streams = DynamicStreams::start(
        settings.clone(),
        Polling {
            user_agent: &config.upstream.user_agent,
            buffer: config.server.subscriber_buffer,
            backoff: config.upstream.backoff,
        },
        rate_limits.clone(),
        metrics.clone(),
        cluster.map(|node| ClusterLink {
            node: node.clone(),
            quota: Arc::new(ClusterQuota::new(
                node.store().clone(),
                rate_limits.clone(),
                metrics.clone(),
            )),
        }),
        budget.clone(),
        shutdown.clone(),
    )
    .context("cannot start the proxy mode's HTTP client")?;
    let shared = cluster.map(|node| {
        let tokens = SharedTokens::new(
            node.store().clone(),
            Arc::from(node.node()),
            node.settings().lease_ttl * 3,
            metrics.clone(),
        );
        tasks.spawn(tokens.clone().refresh(shutdown.clone()));
        tokens
    });
    Ok(Some(Arc::new(Proxy::new(
        settings,
        streams,
        shared,
        metrics.clone(),
    ))))
}

/// What building the streams shares, and the tasks `run` will start for them.
struct Streams<'a> {
    config: &'a Config,
    hub: Arc<Hub>,
    snapshots: SnapshotStore,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    starting: Vec<Task>,
    /// This node's part of a cluster: streams are then written through the cluster's log.
    cluster: Option<Arc<Cluster>>,
    /// The cluster's writers of the push streams.
    writers: HashMap<String, Arc<Writer>>,
    /// The views of the streams that have them.
    views: Views,
    /// Views at once over every stream.
    budget: Arc<Budget>,
    /// In a cluster, the lease of each polled stream (whose holder publishes it to brokers
    /// and dispatches its webhooks) and, with webhooks, of each push stream (taken for that).
    leases: HashMap<String, watch::Receiver<Option<Holding>>>,
    /// Each configured stream's own token, under which its poller and keep-alive run (a
    /// reload cancels it to stop them).
    running: HashMap<String, CancellationToken>,
    /// In a cluster, each configured stream's part in it, which a reload changes.
    clustered: HashMap<String, Clustered>,
}

/// The cluster's writers of the push streams, by name (a reload adds and removes them).
pub(crate) type Writers = Arc<std::sync::RwLock<HashMap<String, Arc<Writer>>>>;

/// A configured stream's part in a cluster, on this node.
pub(crate) struct Clustered {
    /// The fingerprint of this node's configuration of the stream
    /// ([`crate::config::changes::fingerprint`]): its lease keeper takes the lease only while
    /// the stream's log belongs to it. A reload sends the new one.
    pub(crate) config: watch::Sender<Option<Arc<str>>>,
    /// The stream's lease, if it has one (a polled stream; a push stream with webhooks on a
    /// shared outbox).
    pub(crate) held: Option<watch::Receiver<Option<Holding>>>,
    /// The lease keeper's token: cancelled when the stream is removed (or its lease taken
    /// anew), so the keeper gives the lease up.
    pub(crate) lease: CancellationToken,
}

/// The fingerprint of stream `name`'s content settings in `config`.
pub(crate) fn fingerprint(config: &Config, name: &str) -> Arc<str> {
    Arc::from(crate::config::changes::fingerprint(config, name).unwrap_or_default())
}

/// The lease of a polled stream in a cluster, taken while this node runs `config` (the
/// fingerprint of its configuration of the stream) until `lease` is cancelled: the watch
/// and the tasks that keep it.
pub(crate) fn polled_lease(
    cluster: &Cluster,
    settings: &crate::upstream::config::StreamSettings,
    stream: &Arc<Stream>,
    retention: crate::cluster::store::Retention,
    config: watch::Receiver<Option<Arc<str>>>,
    lease: &CancellationToken,
) -> (watch::Receiver<Option<Holding>>, Vec<Task>) {
    match settings.on_demand {
        None => {
            let (held, keeper) = cluster.keep_lease(&settings.name, retention, config, lease);
            (held, vec![keeper])
        }
        Some(_) => {
            let (_, period) = watch::channel(settings.interval);
            // `lease` stands for the node's shutdown too: a configured stream retired here
            // never deletes its log (other nodes may still run it; its keys expire).
            let held = cluster.on_demand(
                stream,
                retention,
                stream.demand(),
                period,
                config,
                lease,
                lease,
            );
            (held.held, held.tasks)
        }
    }
}

/// The cluster's quota of a polled stream's rate limits.
pub(crate) fn cluster_quota(
    cluster: &Cluster,
    rate_limits: &Arc<RateLimits>,
    metrics: &Arc<Metrics>,
) -> Arc<dyn SharedQuota> {
    Arc::new(ClusterQuota::new(
        cluster.store().clone(),
        rate_limits.clone(),
        metrics.clone(),
    ))
}

/// The streams a cluster node follows: those of its hub, and the dynamic streams it serves.
struct NodeReplicas {
    hub: Arc<Hub>,
    dynamic: Option<Arc<DynamicStreams>>,
}

impl Replicas for NodeReplicas {
    fn get(&self, name: &str) -> Option<Arc<Stream>> {
        self.hub
            .get(name)
            .or_else(|| self.dynamic.as_ref()?.get(name))
    }

    fn all(&self) -> Vec<Arc<Stream>> {
        let mut all = self.hub.all();
        if let Some(dynamic) = &self.dynamic {
            all.extend(dynamic.all());
        }
        all
    }
}

/// Reads the cluster's key naming dynamic streams (creating it if this node is the first),
/// retrying while Redis is unreachable: until then dynamic streams are refused.
async fn identity_key(
    cluster: Arc<Cluster>,
    dynamic: Arc<DynamicStreams>,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        match cluster.store().identity_key().await {
            Ok(key) => {
                dynamic.set_key(key);
                return;
            }
            Err(error) => {
                tracing::debug!(%error, retry_in = ?delay, "cannot read the cluster's key for dynamic streams");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

impl Streams<'_> {
    fn options(&self, history: usize, history_bytes: u64, diff: &DiffOptions) -> StreamOptions {
        StreamOptions {
            history,
            history_bytes,
            buffer: self.config.server.subscriber_buffer,
            diff: diff.clone(),
        }
    }

    /// Computes the views of `stream` (with `settings`) from its changes; their streams take
    /// the source's `options`.
    fn derive_views(
        &mut self,
        stream: &Arc<Stream>,
        settings: Option<&ViewsSettings>,
        options: StreamOptions,
    ) {
        if let Some(settings) = settings {
            let views = StreamViews::new(
                stream,
                settings.clone(),
                options,
                self.snapshots.clone(),
                self.budget.clone(),
            );
            self.views.attach(stream, views);
        }
    }

    /// Adds `stream` to the hub, kept alive like every other, under its own token.
    fn add(&mut self, stream: Stream) -> Arc<Stream> {
        let stream = self.hub.insert(Arc::new(stream));
        let token = self.shutdown.child_token();
        let keepalive = self.config.server.keepalive;
        let ticking = keep_alive(stream.clone(), keepalive, token.clone());
        self.starting.push(Box::pin(ticking));
        self.running.insert(stream.name().to_owned(), token);
        stream
    }

    /// Every polled stream, with its poller (on demand or always); their upstreams as the
    /// listing shows them.
    fn polled(
        &mut self,
        fetcher: &Arc<Fetcher>,
        rate_limits: &Arc<RateLimits>,
    ) -> Arc<PolledUpstreams> {
        let upstreams = Arc::new(PolledUpstreams::default());
        for settings in &self.config.streams {
            let options = self.options(settings.history, settings.history_bytes, &settings.diff);
            let stream = Stream::new(
                &settings.name,
                options.clone(),
                self.snapshots.clone(),
                self.metrics.clone(),
            );
            let stream = self.add(stream);
            self.derive_views(&stream, settings.views.as_ref(), options);
            // In a cluster the node holding the stream's lease polls it, through the cluster's
            // log (for an on-demand stream, only nodes with subscribers take the lease).
            // A reload that stops this poller also stops what it was about to publish.
            let token = self
                .running
                .get(&settings.name)
                .cloned()
                .unwrap_or_else(|| self.shutdown.child_token());
            let mut publish: Arc<dyn Publish> = Arc::new(Retiring {
                inner: stream.clone(),
                token: token.clone(),
            });
            let mut turns = None;
            let mut quota: Option<Arc<dyn SharedQuota>> = None;
            if let Some(cluster) = self.cluster.clone() {
                let retention = cluster.retention(settings.history, settings.history_bytes);
                let fingerprint = fingerprint(self.config, &settings.name);
                let (config, watched) = watch::channel(Some(fingerprint.clone()));
                let lease = self.shutdown.child_token();
                self.starting.push(cluster.claim(
                    &settings.name,
                    fingerprint.clone(),
                    retention,
                    &token,
                ));
                let (held, tasks) =
                    polled_lease(&cluster, settings, &stream, retention, watched, &lease);
                self.starting.extend(tasks);
                self.leases.insert(settings.name.clone(), held.clone());
                publish = cluster.writer(
                    stream.clone(),
                    retention,
                    Some(held.clone()),
                    Some(fingerprint),
                );
                self.clustered.insert(
                    settings.name.clone(),
                    Clustered {
                        config,
                        held: Some(held.clone()),
                        lease,
                    },
                );
                turns = Some(held);
                quota = Some(cluster_quota(&cluster, rate_limits, &self.metrics));
            }
            let mut poller = Poller::new(
                Arc::new(settings.clone()),
                fetcher.clone(),
                rate_limits.limiter(&settings.rate_limit_group),
                self.metrics.clone(),
                publish,
                self.config.upstream.backoff,
            );
            if let Some(turns) = turns {
                poller = poller.taking_turns(turns);
            }
            if let Some(quota) = quota {
                poller = poller.sharing_quota(quota);
            }
            upstreams.insert(
                settings.name.clone(),
                PolledUpstream {
                    url: Redacted::new(&settings.url),
                    interval: settings.interval,
                    on_demand: settings.on_demand,
                    status: poller.status(),
                    control: poller.control(),
                },
            );
            self.starting
                .push(poll_task(settings, poller, stream, token));
        }
        upstreams
    }

    /// Every push stream, continuing from its document stored in `outbox`, if any (in a
    /// cluster, from the cluster's log: the follower loads it).
    async fn pushed(&mut self, outbox: Option<&dyn Outbox>) -> anyhow::Result<()> {
        let mut stored = match outbox.filter(|_| self.cluster.is_none()) {
            Some(outbox) => outbox
                .documents()
                .await
                .context("cannot read the stored push documents (the webhook outbox)")?
                .into_iter()
                .map(|d| (d.stream.to_string(), d))
                .collect(),
            None => HashMap::new(),
        };
        for settings in &self.config.push_streams {
            let options = self.options(settings.history, settings.history_bytes, &settings.diff);
            let restored = stored.remove(&settings.name).and_then(|d| {
                match serde_json::from_slice::<Value>(&d.document) {
                    Ok(document) => Some((d, document)),
                    Err(error) => {
                        tracing::error!(stream = %settings.name, %error, "the stored push document is unreadable; the stream starts empty");
                        None
                    }
                }
            });
            let stream = match restored {
                None => Stream::new(
                    &settings.name,
                    options.clone(),
                    self.snapshots.clone(),
                    self.metrics.clone(),
                ),
                Some((stored, document)) => {
                    tracing::info!(stream = %settings.name, seq = stored.seq, "push stream restored from the webhook database");
                    Stream::restored(
                        &settings.name,
                        options.clone(),
                        self.snapshots.clone(),
                        self.metrics.clone(),
                        Snapshot::taken_at(stored.epoch, stored.seq, document, stored.at),
                    )
                }
            };
            let stream = self.add(stream);
            self.derive_views(&stream, settings.views.as_ref(), options);
            if let Some(cluster) = self.cluster.clone() {
                let retention = cluster.retention(settings.history, settings.history_bytes);
                let fingerprint = fingerprint(self.config, &settings.name);
                let (config, watched) = watch::channel(Some(fingerprint.clone()));
                let lease = self.shutdown.child_token();
                if let Some(token) = self.running.get(&settings.name) {
                    self.starting.push(cluster.claim(
                        &settings.name,
                        fingerprint.clone(),
                        retention,
                        token,
                    ));
                }
                let mut held = None;
                if self
                    .config
                    .webhooks
                    .as_ref()
                    .is_some_and(|w| w.store.is_shared())
                {
                    // Any node writes a push stream, but one dispatches its webhooks: the
                    // holder of a lease taken for that alone.
                    let (watch, keeper) =
                        cluster.keep_lease(&settings.name, retention, watched, &lease);
                    self.starting.push(keeper);
                    self.leases.insert(settings.name.clone(), watch.clone());
                    held = Some(watch);
                }
                self.writers.insert(
                    settings.name.clone(),
                    cluster.writer(stream, retention, None, Some(fingerprint)),
                );
                self.clustered.insert(
                    settings.name.clone(),
                    Clustered {
                        config,
                        held,
                        lease,
                    },
                );
            }
        }
        if self.cluster.is_some() {
            tracing::info!("push streams are kept in the cluster's log (Redis)");
        } else if self.config.webhooks.is_none() && !self.config.push_streams.is_empty() {
            tracing::info!(
                "push streams keep their documents in memory only: configure [webhooks] (its database) to keep them across restarts"
            );
        }
        Ok(())
    }
}

/// Sends a keep-alive comment to the stream's subscribers at every `interval`.
async fn keep_alive(stream: Arc<Stream>, interval: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => stream.keep_alive(),
        }
    }
}

/// The task that polls `stream` with `poller` until `token` is cancelled: always, or, for an
/// on-demand stream, while it has subscribers (plus its linger).
fn poll_task(
    settings: &crate::upstream::config::StreamSettings,
    poller: Poller,
    stream: Arc<Stream>,
    token: CancellationToken,
) -> Task {
    match settings.on_demand {
        None => Box::pin(poller.run(token)),
        Some(linger) => {
            let idle_stream = stream.clone();
            let options = OnDemand {
                linger,
                period: None,
                keepalive: None,
            };
            // Idle: drop the document (it would go stale) and poll afresh on demand.
            let run = on_demand::run(poller, stream, options, token, move |p| {
                tracing::info!(stream = %idle_stream.name(), "no subscribers: polling paused");
                idle_stream.forget();
                p.reset();
                Idle::Pause
            });
            Box::pin(async move {
                run.await;
            })
        }
    }
}

/// A poller's publisher that publishes nothing once `token` is cancelled: a reload that
/// stopped the poller (to start the stream over) must not see a document the old poller
/// fetched land after the new one's.
pub(crate) struct Retiring {
    pub(crate) inner: Arc<dyn Publish>,
    pub(crate) token: CancellationToken,
}

impl Publish for Retiring {
    fn document(
        self: Arc<Self>,
        doc: Value,
    ) -> futures_util::future::BoxFuture<'static, crate::upstream::poller::PublishResult> {
        if self.token.is_cancelled() {
            return Box::pin(std::future::ready(
                crate::upstream::poller::PublishResult::Unchanged,
            ));
        }
        Arc::clone(&self.inner).document(doc)
    }

    fn failure<'a>(
        &'a self,
        error: &'a crate::upstream::fetch::FetchError,
        retry_in: Duration,
    ) -> futures_util::future::BoxFuture<'a, ()> {
        if self.token.is_cancelled() {
            return Box::pin(std::future::ready(()));
        }
        self.inner.failure(error, retry_in)
    }

    fn recovered(&self) -> futures_util::future::BoxFuture<'_, ()> {
        if self.token.is_cancelled() {
            return Box::pin(std::future::ready(()));
        }
        self.inner.recovered()
    }

    fn audience(&self) -> usize {
        self.inner.audience()
    }

    fn polled<'a>(
        &'a self,
        validators: &'a crate::upstream::fetch::Validators,
    ) -> futures_util::future::BoxFuture<'a, ()> {
        self.inner.polled(validators)
    }
}
