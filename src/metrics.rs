//! Prometheus metrics, owned by the application (no global registry, so tests can run many apps).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::wire::ChangeKind;

/// Labels for per-stream series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// The stream name.
    pub stream: String,
}

/// The outcome of one poll.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum PollOutcome {
    /// A body that changed the document.
    Changed,
    /// A body whose document equals the last one (or whose only changes are ignored).
    Unchanged,
    /// 304 Not Modified.
    NotModified,
    /// A failure of any kind.
    Error,
    /// Not this node's turn: another node of the cluster polls the stream (no request sent).
    NotOurTurn,
}

/// Labels for poll outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PollLabels {
    /// The stream name.
    pub stream: String,
    /// What the poll produced.
    pub outcome: PollOutcome,
}

/// The `kind` label of a published change: `Patch` or `Snapshot`.
impl EncodeLabelValue for ChangeKind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            ChangeKind::Patch => "Patch",
            ChangeKind::Snapshot => "Snapshot",
        })
    }
}

/// Labels for published bytes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    /// The stream name.
    pub stream: String,
    /// Patch or snapshot.
    pub kind: ChangeKind,
}

/// Why a dynamic stream was stopped and evicted.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum EvictionCause {
    /// Its last subscriber left longer than `proxy.linger` ago.
    Linger,
    /// Room was needed for a new stream (`proxy.max_streams` or `proxy.max_memory`), and this
    /// one had no subscribers.
    Idle,
    /// The dynamic streams' snapshots outgrew `proxy.max_memory`.
    Memory,
}

/// Labels for evictions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvictionLabels {
    /// Why.
    pub cause: EvictionCause,
}

/// Labels for refused dynamic-stream requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The `cause` sent to the client (`token-missing`, `host-not-allowed`, ...).
    pub cause: &'static str,
}

/// Labels for per-token series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// The token's configured name (never the token).
    pub token: String,
}

/// Labels for closed WebSocket connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// The close code (1006: closed without a close frame, e.g. a client that stopped reading).
    pub code: u16,
}

/// What one webhook attempt came to.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum AttemptResult {
    /// The receiver answered 2xx.
    Delivered,
    /// It failed and will be tried again.
    Retrying,
    /// It failed for the last time: the delivery is dead-lettered.
    Dead,
}

/// Labels for webhook attempts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// The endpoint's id.
    pub endpoint: String,
    /// What the attempt came to.
    pub result: AttemptResult,
}

/// Labels for a broker sink's series: the sink and the stream it publishes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    /// The sink's name.
    pub sink: String,
    /// The stream.
    pub stream: String,
}

/// What happened to a lease this node held or wanted.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum LeaseEvent {
    /// Taken: this node polls the stream now.
    Acquired,
    /// Found taken by another node at renewal, or not renewable in time (Redis unreachable).
    Lost,
    /// Given to a better-placed node that joined.
    HandedOver,
    /// Given up at shutdown.
    Released,
}

/// Labels for lease events.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    /// What happened.
    pub event: LeaseEvent,
}

/// Every metric the application exports.
pub struct Metrics {
    /// Polls by stream and outcome.
    pub polls: Family<PollLabels, Counter>,
    /// Upstream request latency in seconds, by stream.
    pub upstream_latency: Family<StreamLabels, Histogram>,
    /// Changes published, by stream and kind.
    pub changes: Family<ChangeLabels, Counter>,
    /// JSON bytes of published changes, by stream and kind.
    pub change_bytes: Family<ChangeLabels, Counter>,
    /// JSON bytes of the snapshot at each published change, by stream: what a poller would have fetched.
    pub snapshot_bytes: Family<StreamLabels, Counter>,
    /// Connected SSE subscribers, by stream.
    pub subscribers: Family<StreamLabels, Gauge>,
    /// Changes held in a stream's history for resuming subscribers, by stream.
    pub history_changes: Family<StreamLabels, Gauge>,
    /// Bytes held by a stream's history (payloads and their encodings), by stream.
    pub history_bytes: Family<StreamLabels, Gauge>,
    /// SSE events written to subscribers (keep-alives excluded), by stream.
    pub events_sent: Family<StreamLabels, Counter>,
    /// Subscribers that fell behind and were resynced with a snapshot or disconnected, by stream.
    pub resyncs: Family<StreamLabels, Counter>,
    /// Connections closed because their socket refused writes past the stall timeout.
    pub stalled_connections: Counter,
    /// JSON bytes of every stream's current snapshot held in memory (set at each scrape).
    pub stored_snapshot_bytes: Gauge,
    /// Dynamic streams alive (polling or lingering).
    pub dynamic_streams: Gauge,
    /// `proxy.max_streams`.
    pub dynamic_streams_limit: Gauge,
    /// JSON bytes of the dynamic streams' snapshots (set at each scrape).
    pub dynamic_snapshot_bytes: Gauge,
    /// `proxy.max_memory`.
    pub dynamic_snapshot_bytes_limit: Gauge,
    /// Dynamic streams stopped and evicted, by cause.
    pub dynamic_evictions: Family<EvictionLabels, Counter>,
    /// Dynamic-stream requests refused, by cause.
    pub proxy_refusals: Family<RefusalLabels, Counter>,
    /// Open dynamic-stream connections, by token name.
    pub proxy_connections: Family<TokenLabels, Gauge>,
    /// Open WebSocket connections.
    pub websocket_connections: Gauge,
    /// Open subscriptions on WebSocket connections.
    pub websocket_subscriptions: Gauge,
    /// Distinct views of each stream computed now.
    pub views: Family<StreamLabels, Gauge>,
    /// Changes published to views of each stream (one per view that changed).
    pub view_changes: Family<StreamLabels, Counter>,
    /// What the views of each stream hold: their documents and histories, in JSON bytes.
    pub view_bytes: Family<StreamLabels, Gauge>,
    /// Views evicted after nobody watched them for their linger period.
    pub view_evictions: Family<StreamLabels, Counter>,
    /// Messages sent on WebSocket connections (events and answers; pings excluded).
    pub websocket_messages_sent: Counter,
    /// WebSocket subscriptions that fell behind and were resynced with a snapshot.
    pub websocket_resyncs: Counter,
    /// Refused WebSocket messages (subscribe, auth, malformed), by cause.
    pub websocket_refusals: Family<RefusalLabels, Counter>,
    /// Closed WebSocket connections, by close code.
    pub websocket_closes: Family<CloseLabels, Counter>,
    /// Webhook delivery attempts, by endpoint and result.
    pub webhook_attempts: Family<AttemptLabels, Counter>,
    /// Duration of webhook attempts (request sent to response read), in seconds.
    pub webhook_attempt_seconds: Histogram,
    /// Messages sent to a broker (a message sent again after a failure counts again), by
    /// sink and stream.
    pub broker_published: Family<SinkLabels, Counter>,
    /// Messages the broker acknowledged, by sink and stream.
    pub broker_acknowledged: Family<SinkLabels, Counter>,
    /// Sequence numbers between the stream's top and the broker's last acknowledged message.
    pub broker_lag: Family<SinkLabels, Gauge>,
    /// Snapshots a broker sink published to cover a gap (restart, outage, falling behind).
    pub broker_resyncs: Family<SinkLabels, Counter>,
    /// Broker calls that failed (unreachable, timed out, refused).
    pub broker_errors: Family<SinkLabels, Counter>,
    /// Publishes a broker refused because another publisher wrote to the destination first
    /// (JetStream's per-subject fence).
    pub broker_overtaken: Family<SinkLabels, Counter>,
    /// Publishes refused because a message is larger than the broker takes (NATS
    /// `max_payload`).
    pub broker_oversized: Family<SinkLabels, Counter>,
    /// Leases this node holds (streams it polls), in a cluster.
    pub cluster_leases_held: Gauge,
    /// Lease events of this node, by event.
    pub cluster_lease_changes: Family<LeaseLabels, Counter>,
    /// Live nodes in the cluster, as this node last saw them.
    pub cluster_nodes: Gauge,
    /// Changes fetched from the log to fill a gap pub/sub left, by stream.
    pub cluster_gaps_repaired: Family<StreamLabels, Counter>,
    /// Streams rebuilt whole from the log (another epoch, or a gap past its reach), by stream.
    pub cluster_reloads: Family<StreamLabels, Counter>,
    /// Appends refused because another writer moved the log first (then caught up and
    /// retried), by stream.
    pub cluster_conflicts: Family<StreamLabels, Counter>,
    /// Redis round-trip time of the heartbeat, in seconds.
    pub cluster_redis_seconds: Histogram,
    /// Redis commands that failed (unreachable, timed out, refused).
    pub cluster_redis_errors: Counter,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn new() -> Self {
        let polls = Family::<PollLabels, Counter>::default();
        let upstream_latency = Family::<StreamLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.005, 2.0, 14))) as fn() -> Histogram,
        );
        let changes = Family::<ChangeLabels, Counter>::default();
        let change_bytes = Family::<ChangeLabels, Counter>::default();
        let snapshot_bytes = Family::<StreamLabels, Counter>::default();
        let subscribers = Family::<StreamLabels, Gauge>::default();
        let history_changes = Family::<StreamLabels, Gauge>::default();
        let history_bytes = Family::<StreamLabels, Gauge>::default();
        let events_sent = Family::<StreamLabels, Counter>::default();
        let resyncs = Family::<StreamLabels, Counter>::default();
        let stalled_connections = Counter::default();
        let stored_snapshot_bytes = Gauge::default();
        let dynamic_streams = Gauge::default();
        let dynamic_streams_limit = Gauge::default();
        let dynamic_snapshot_bytes = Gauge::default();
        let dynamic_snapshot_bytes_limit = Gauge::default();
        let dynamic_evictions = Family::<EvictionLabels, Counter>::default();
        let proxy_refusals = Family::<RefusalLabels, Counter>::default();
        let proxy_connections = Family::<TokenLabels, Gauge>::default();
        let websocket_connections = Gauge::default();
        let websocket_subscriptions = Gauge::default();
        let views = Family::<StreamLabels, Gauge>::default();
        let view_changes = Family::<StreamLabels, Counter>::default();
        let view_bytes = Family::<StreamLabels, Gauge>::default();
        let view_evictions = Family::<StreamLabels, Counter>::default();
        let websocket_messages_sent = Counter::default();
        let websocket_resyncs = Counter::default();
        let websocket_refusals = Family::<RefusalLabels, Counter>::default();
        let websocket_closes = Family::<CloseLabels, Counter>::default();
        let webhook_attempts = Family::<AttemptLabels, Counter>::default();
        let webhook_attempt_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let broker_published = Family::<SinkLabels, Counter>::default();
        let broker_acknowledged = Family::<SinkLabels, Counter>::default();
        let broker_lag = Family::<SinkLabels, Gauge>::default();
        let broker_resyncs = Family::<SinkLabels, Counter>::default();
        let broker_errors = Family::<SinkLabels, Counter>::default();
        let broker_overtaken = Family::<SinkLabels, Counter>::default();
        let broker_oversized = Family::<SinkLabels, Counter>::default();
        let cluster_leases_held = Gauge::default();
        let cluster_lease_changes = Family::<LeaseLabels, Counter>::default();
        let cluster_nodes = Gauge::default();
        let cluster_gaps_repaired = Family::<StreamLabels, Counter>::default();
        let cluster_reloads = Family::<StreamLabels, Counter>::default();
        let cluster_conflicts = Family::<StreamLabels, Counter>::default();
        let cluster_redis_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        let cluster_redis_errors = Counter::default();

        let mut registry = Registry::with_prefix("patchwire");
        registry.register("polls", "Upstream polls by outcome", polls.clone());
        registry.register(
            "upstream_latency_seconds",
            "Upstream request latency",
            upstream_latency.clone(),
        );
        registry.register("changes", "Changes published", changes.clone());
        registry.register_with_unit(
            "change",
            "JSON bytes of published changes",
            prometheus_client::registry::Unit::Bytes,
            change_bytes.clone(),
        );
        registry.register_with_unit(
            "snapshot",
            "JSON bytes of the whole document at each published change",
            prometheus_client::registry::Unit::Bytes,
            snapshot_bytes.clone(),
        );
        registry.register(
            "subscribers",
            "Connected SSE subscribers",
            subscribers.clone(),
        );
        registry.register(
            "history_changes",
            "Changes held in history for resuming subscribers",
            history_changes.clone(),
        );
        registry.register_with_unit(
            "history",
            "Bytes held in history for resuming subscribers (payloads and their encodings)",
            prometheus_client::registry::Unit::Bytes,
            history_bytes.clone(),
        );
        registry.register(
            "events_sent",
            "SSE events sent to subscribers",
            events_sent.clone(),
        );
        registry.register(
            "subscriber_resyncs",
            "Subscribers that fell behind and were resynced or disconnected",
            resyncs.clone(),
        );
        registry.register(
            "stalled_connections",
            "Connections closed because the client stopped reading",
            stalled_connections.clone(),
        );
        registry.register_with_unit(
            "stored_snapshots",
            "JSON bytes of the current snapshots held in memory",
            prometheus_client::registry::Unit::Bytes,
            stored_snapshot_bytes.clone(),
        );
        registry.register(
            "dynamic_streams",
            "Dynamic (proxy mode) streams alive, polling or lingering",
            dynamic_streams.clone(),
        );
        registry.register(
            "dynamic_streams_limit",
            "Most dynamic streams alive at once (proxy.max_streams)",
            dynamic_streams_limit.clone(),
        );
        registry.register_with_unit(
            "dynamic_snapshots",
            "JSON bytes of the dynamic streams' snapshots",
            prometheus_client::registry::Unit::Bytes,
            dynamic_snapshot_bytes.clone(),
        );
        registry.register_with_unit(
            "dynamic_snapshots_limit",
            "Most JSON bytes the dynamic streams' snapshots may hold (proxy.max_memory)",
            prometheus_client::registry::Unit::Bytes,
            dynamic_snapshot_bytes_limit.clone(),
        );
        registry.register(
            "dynamic_evictions",
            "Dynamic streams stopped and evicted",
            dynamic_evictions.clone(),
        );
        registry.register(
            "proxy_refusals",
            "Dynamic-stream requests refused",
            proxy_refusals.clone(),
        );
        registry.register(
            "proxy_connections",
            "Open dynamic-stream connections by token",
            proxy_connections.clone(),
        );
        registry.register(
            "websocket_connections",
            "Open WebSocket connections",
            websocket_connections.clone(),
        );
        registry.register(
            "websocket_subscriptions",
            "Open subscriptions on WebSocket connections",
            websocket_subscriptions.clone(),
        );
        registry.register("views", "Distinct views of the stream", views.clone());
        registry.register(
            "view_changes",
            "Changes published to the stream's views",
            view_changes.clone(),
        );
        registry.register_with_unit(
            "view",
            "What the stream's views hold (documents and histories, JSON)",
            prometheus_client::registry::Unit::Bytes,
            view_bytes.clone(),
        );
        registry.register(
            "view_evictions",
            "Views evicted after their linger period unwatched",
            view_evictions.clone(),
        );
        registry.register(
            "websocket_messages_sent",
            "Messages sent on WebSocket connections (events and answers)",
            websocket_messages_sent.clone(),
        );
        registry.register(
            "websocket_resyncs",
            "WebSocket subscriptions that fell behind and were resynced with a snapshot",
            websocket_resyncs.clone(),
        );
        registry.register(
            "websocket_refusals",
            "Refused WebSocket messages by cause",
            websocket_refusals.clone(),
        );
        registry.register(
            "websocket_closes",
            "Closed WebSocket connections by close code",
            websocket_closes.clone(),
        );
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts by endpoint and result",
            webhook_attempts.clone(),
        );
        registry.register_with_unit(
            "webhook_attempt",
            "Duration of webhook delivery attempts",
            prometheus_client::registry::Unit::Seconds,
            webhook_attempt_seconds.clone(),
        );
        registry.register(
            "broker_published",
            "Messages sent to a broker, by sink and stream",
            broker_published.clone(),
        );
        registry.register(
            "broker_acknowledged",
            "Messages a broker acknowledged, by sink and stream",
            broker_acknowledged.clone(),
        );
        registry.register(
            "broker_lag",
            "Sequence numbers between a stream's top and its broker's last acknowledged message",
            broker_lag.clone(),
        );
        registry.register(
            "broker_resyncs",
            "Snapshots a broker sink published to cover a gap",
            broker_resyncs.clone(),
        );
        registry.register(
            "broker_errors",
            "Broker calls that failed, by sink and stream",
            broker_errors.clone(),
        );
        registry.register(
            "broker_overtaken",
            "Publishes refused because another publisher wrote to the subject first (JetStream fence)",
            broker_overtaken.clone(),
        );
        registry.register(
            "broker_oversized",
            "Publishes refused because a message is over the broker's max_payload",
            broker_oversized.clone(),
        );
        registry.register(
            "cluster_leases_held",
            "Streams this node polls (holds the lease of), in a cluster",
            cluster_leases_held.clone(),
        );
        registry.register(
            "cluster_lease_changes",
            "Leases this node took, lost, handed over or released",
            cluster_lease_changes.clone(),
        );
        registry.register(
            "cluster_nodes",
            "Live nodes in the cluster as this node sees them",
            cluster_nodes.clone(),
        );
        registry.register(
            "cluster_gaps_repaired",
            "Changes fetched from the log to fill gaps pub/sub left",
            cluster_gaps_repaired.clone(),
        );
        registry.register(
            "cluster_reloads",
            "Streams rebuilt whole from the log",
            cluster_reloads.clone(),
        );
        registry.register(
            "cluster_conflicts",
            "Appends that found the log moved by another writer (caught up and retried)",
            cluster_conflicts.clone(),
        );
        registry.register_with_unit(
            "cluster_redis",
            "Redis round-trip time (heartbeat)",
            prometheus_client::registry::Unit::Seconds,
            cluster_redis_seconds.clone(),
        );
        registry.register(
            "cluster_redis_errors",
            "Redis commands that failed",
            cluster_redis_errors.clone(),
        );
        Metrics {
            polls,
            upstream_latency,
            changes,
            change_bytes,
            snapshot_bytes,
            subscribers,
            history_changes,
            history_bytes,
            events_sent,
            resyncs,
            stalled_connections,
            stored_snapshot_bytes,
            dynamic_streams,
            dynamic_streams_limit,
            dynamic_snapshot_bytes,
            dynamic_snapshot_bytes_limit,
            dynamic_evictions,
            proxy_refusals,
            proxy_connections,
            websocket_connections,
            websocket_subscriptions,
            views,
            view_changes,
            view_bytes,
            view_evictions,
            websocket_messages_sent,
            websocket_resyncs,
            websocket_refusals,
            websocket_closes,
            webhook_attempts,
            webhook_attempt_seconds,
            broker_published,
            broker_acknowledged,
            broker_lag,
            broker_resyncs,
            broker_errors,
            broker_overtaken,
            broker_oversized,
            cluster_leases_held,
            cluster_lease_changes,
            cluster_nodes,
            cluster_gaps_repaired,
            cluster_reloads,
            cluster_conflicts,
            cluster_redis_seconds,
            cluster_redis_errors,
            registry,
        }
    }

    /// Removes every per-stream series of `stream` (a dynamic stream that was evicted), so
    /// short-lived streams do not accumulate series.
    pub fn forget_stream(&self, stream: &str) {
        let labels = StreamLabels {
            stream: stream.to_owned(),
        };
        self.upstream_latency.remove(&labels);
        self.snapshot_bytes.remove(&labels);
        self.subscribers.remove(&labels);
        self.history_changes.remove(&labels);
        self.history_bytes.remove(&labels);
        self.events_sent.remove(&labels);
        self.resyncs.remove(&labels);
        self.cluster_gaps_repaired.remove(&labels);
        self.cluster_reloads.remove(&labels);
        self.cluster_conflicts.remove(&labels);
        for outcome in [
            PollOutcome::Changed,
            PollOutcome::Unchanged,
            PollOutcome::NotModified,
            PollOutcome::Error,
        ] {
            self.polls.remove(&PollLabels {
                stream: stream.to_owned(),
                outcome,
            });
        }
        for kind in [ChangeKind::Patch, ChangeKind::Snapshot] {
            let labels = ChangeLabels {
                stream: stream.to_owned(),
                kind,
            };
            self.changes.remove(&labels);
            self.change_bytes.remove(&labels);
        }
    }

    /// The metrics in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
