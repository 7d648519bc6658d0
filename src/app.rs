//! Wiring only: builds every part from a validated [`Config`] and runs them until shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::push::PushAuth;
use crate::api::subscribe::Subscriptions;
use crate::api::{self, AppState, UpstreamStatus};
use crate::config::Config;
use crate::hub::{Hub, Stream, StreamOptions};
use crate::metrics::Metrics;
use crate::outbox::Outbox as _;
use crate::outbox::sqlite::SqliteOutbox;
use crate::proxy::Proxy;
use crate::proxy::streams::DynamicStreams;
use crate::redact::Redacted;
use crate::sim;
use crate::sinks::webhook::service::Webhooks;
use crate::snapshot::{Snapshot, SnapshotStore};
use crate::upstream::fetch::Fetcher;
use crate::upstream::on_demand::{self, Idle, OnDemand};
use crate::upstream::poller::{LastOutcome, PollStatus, Poller};
use crate::upstream::ratelimit::RateLimits;

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

/// A polled upstream as shown in `GET /streams`.
struct PolledUpstream {
    url: Redacted,
    interval: Duration,
    /// The linger period of an on-demand stream.
    on_demand: Option<Duration>,
    status: Arc<PollStatus>,
}

impl UpstreamStatus for PolledUpstream {
    fn describe(&self) -> Value {
        let report = self.status.read();
        let outcome = report.last_outcome.as_ref().map(|o| match o {
            LastOutcome::Changed => json!({"result": "changed"}),
            LastOutcome::Unchanged => json!({"result": "unchanged"}),
            LastOutcome::NotModified => json!({"result": "not-modified"}),
            LastOutcome::Failed { status, message } => {
                json!({"result": "error", "status": status, "message": &**message})
            }
        });
        let time = |t: Option<std::time::SystemTime>| t.map(httpdate::fmt_http_date);
        json!({
            "url": self.url.as_str(),
            "interval_ms": self.interval.as_millis() as u64,
            "on_demand": self.on_demand.map(|linger| json!({"linger_ms": linger.as_millis() as u64})),
            "last_poll_at": time(report.last_poll_started),
            "last_outcome": outcome,
            "consecutive_failures": report.consecutive_failures,
            "requests": report.upstream_requests,
            "next_poll_at": time(report.next_poll_due),
        })
    }
}

/// Runs the application until `shutdown` is cancelled: the simulator (if configured), one
/// poller per stream, keep-alive tickers and the HTTP server. Returns once the server has
/// drained (or the grace period ran out) and every task has stopped.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let hub = Arc::new(Hub::new());
    let snapshots = SnapshotStore::new();
    let fetcher = Arc::new(
        Fetcher::new(&config.upstream.user_agent).context("cannot build the HTTP client")?,
    );
    let rate_limits = Arc::new(RateLimits::new(&config.upstream, &config.streams));
    let mut tasks = JoinSet::new();

    if let (Some(settings), Some(listener)) = (config.simulator.clone(), listeners.simulator) {
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(error) = sim::serve(listener, settings, shutdown).await {
                tracing::error!(%error, "the simulator stopped");
            }
        });
    }

    let mut upstreams: HashMap<String, Arc<dyn UpstreamStatus>> = HashMap::new();
    // Every stream, polled or pushed, is built the same way and kept alive the same way.
    let add_stream = |tasks: &mut JoinSet<()>,
                      name: &str,
                      (history, history_bytes): (usize, u64),
                      diff: &crate::diff::DiffOptions| {
        let stream = hub.insert(Arc::new(Stream::new(
            name,
            StreamOptions {
                history,
                history_bytes,
                buffer: config.server.subscriber_buffer,
                diff: diff.clone(),
            },
            snapshots.clone(),
            metrics.clone(),
        )));
        tasks.spawn(keep_alive(
            stream.clone(),
            config.server.keepalive,
            shutdown.clone(),
        ));
        stream
    };
    for settings in &config.streams {
        let stream = add_stream(
            &mut tasks,
            &settings.name,
            (settings.history, settings.history_bytes),
            &settings.diff,
        );
        let poller = Poller::new(
            Arc::new(settings.clone()),
            fetcher.clone(),
            rate_limits.limiter(&settings.rate_limit_group),
            metrics.clone(),
            stream.clone(),
            config.upstream.backoff,
        );
        upstreams.insert(
            settings.name.clone(),
            Arc::new(PolledUpstream {
                url: Redacted::new(&settings.url),
                interval: settings.interval,
                on_demand: settings.on_demand,
                status: poller.status(),
            }),
        );
        match settings.on_demand {
            None => {
                tasks.spawn(poller.run(shutdown.clone()));
            }
            Some(linger) => {
                let idle_stream = stream.clone();
                let options = OnDemand {
                    linger,
                    period: None,
                    keepalive: None,
                };
                // Idle: drop the document (it would go stale) and poll afresh on demand.
                let run = on_demand::run(poller, stream, options, shutdown.clone(), move |p| {
                    tracing::info!(stream = %idle_stream.name(), "no subscribers: polling paused");
                    idle_stream.forget();
                    p.reset();
                    Idle::Pause
                });
                tasks.spawn(async move {
                    run.await;
                });
            }
        }
    }
    // The outbox opens before the push streams exist: it holds their last documents.
    let outbox = match &config.webhooks {
        Some(settings) => Some(Arc::new(
            SqliteOutbox::open(&settings.database)
                .await
                .context("cannot start webhooks (`webhooks.database`)")?,
        )),
        None => None,
    };
    let mut stored = match &outbox {
        Some(outbox) => outbox
            .documents()
            .await
            .context("cannot read the stored push documents (`webhooks.database`)")?
            .into_iter()
            .map(|d| (d.stream.to_string(), d))
            .collect(),
        None => HashMap::new(),
    };
    for settings in &config.push_streams {
        let restored = stored.remove(&settings.name).and_then(|d| {
            match serde_json::from_slice::<Value>(&d.document) {
                Ok(document) => Some((d, document)),
                Err(error) => {
                    tracing::error!(stream = %settings.name, %error, "the stored push document is unreadable; the stream starts empty");
                    None
                }
            }
        });
        match restored {
            None => {
                add_stream(
                    &mut tasks,
                    &settings.name,
                    (settings.history, settings.history_bytes),
                    &settings.diff,
                );
            }
            Some((stored, document)) => {
                tracing::info!(stream = %settings.name, seq = stored.seq, "push stream restored from the webhook database");
                let stream = hub.insert(Arc::new(Stream::restored(
                    &settings.name,
                    StreamOptions {
                        history: settings.history,
                        history_bytes: settings.history_bytes,
                        buffer: config.server.subscriber_buffer,
                        diff: settings.diff.clone(),
                    },
                    snapshots.clone(),
                    metrics.clone(),
                    stored.epoch,
                    Snapshot::taken_at(stored.seq, document, stored.at),
                )));
                tasks.spawn(keep_alive(
                    stream,
                    config.server.keepalive,
                    shutdown.clone(),
                ));
            }
        }
    }
    if config.webhooks.is_none() && !config.push_streams.is_empty() {
        tracing::info!(
            "push streams keep their documents in memory only: configure [webhooks] (its database) to keep them across restarts"
        );
    }
    let push = config.push.as_ref().map(|push| PushAuth {
        token: push.token.clone(),
        streams: config.push_streams.iter().map(|s| s.name.clone()).collect(),
    });
    let push_max_body = config.push.as_ref().map_or(0, |p| {
        usize::try_from(p.max_body_bytes).unwrap_or(usize::MAX)
    });

    let webhooks = match (&config.webhooks, outbox) {
        (Some(settings), Some(outbox)) => Some(
            Webhooks::start(
                settings,
                outbox,
                hub.clone(),
                &config.push_streams.iter().map(|s| s.name.clone()).collect(),
                &config.upstream.user_agent,
                &mut tasks,
                shutdown.clone(),
                metrics.clone(),
            )
            .await
            .context("cannot start webhooks")?,
        ),
        _ => None,
    };

    let proxy = match &config.proxy {
        Some(settings) => {
            let settings = Arc::new(settings.clone());
            let streams = DynamicStreams::start(
                settings.clone(),
                &config.upstream.user_agent,
                rate_limits.clone(),
                metrics.clone(),
                config.server.subscriber_buffer,
                config.upstream.backoff,
                shutdown.clone(),
            )
            .context("cannot start the proxy mode's HTTP client")?;
            Some(Arc::new(Proxy::new(settings, streams, metrics.clone())))
        }
        None => None,
    };

    let state = Arc::new(AppState {
        hub: hub.clone(),
        metrics: metrics.clone(),
        snapshots: snapshots.clone(),
        upstreams,
        push,
        push_max_body,
        body_timeout: config.server.body_timeout,
        webhooks,
        admin_token: config.webhooks.as_ref().and_then(|w| w.admin_token.clone()),
        proxy: proxy.clone(),
    });
    // Shutdown closes every stream first, so SSE responses end and connections can drain
    // within the grace period.
    {
        let hub = hub.clone();
        let shutdown = shutdown.clone();
        let proxy = proxy.clone();
        tasks.spawn(async move {
            shutdown.cancelled().await;
            hub.close_all();
            if let Some(proxy) = proxy {
                proxy.streams().close_all();
            }
        });
    }
    let router = api::router(state, &config.server.cors);
    tracing::info!(
        listen = %listeners.api.local_addr().map_or_else(|_| config.server.listen.to_string(), |a| a.to_string()),
        streams = config.streams.len() + config.push_streams.len(),
        "patchwire is serving"
    );
    let subscriptions = Arc::new(Subscriptions::new(
        hub.clone(),
        proxy.clone(),
        config.server.retry_hint,
        config.server.cors.clone(),
    ));
    let stall = api::server::Stall {
        timeout: config.server.stall_timeout,
        stalled: metrics.stalled_connections.clone(),
    };
    api::server::serve(
        listeners.api,
        router,
        subscriptions,
        stall,
        api::server::ServeOptions {
            shutdown_grace: config.server.shutdown_grace,
            header_timeout: config.server.header_timeout,
            idle_timeout: config.server.idle_timeout,
            max_connections: config.server.max_connections,
        },
        shutdown.clone(),
    )
    .await;

    hub.close_all();
    let drained = tokio::time::timeout(config.server.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("some tasks did not stop within the grace period");
        tasks.abort_all();
    }
    tracing::info!("patchwire stopped");
    Ok(())
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
