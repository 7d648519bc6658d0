//! The dynamic streams: one per (upstream URL, forwarded headers), created on the first
//! subscriber, polled on demand, evicted after their linger period, and bounded in number
//! (`proxy.max_streams`) and in snapshot memory (`proxy.max_memory`, a byte-weighted moka
//! store).
//!
//! Invariants:
//! - `entries` is the only way to reach a dynamic stream. Subscribing happens under its lock,
//!   and so does deciding that a stream is idle: a stream is never retired between a client
//!   finding it and subscribing to it.
//! - Room for a new stream is made by evicting streams without subscribers (the longest idle
//!   first); when none is idle the new stream is refused, never an active one evicted. Only
//!   the memory bound, when streams already admitted outgrow it, ends active streams, and their
//!   subscribers are told why.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use http::HeaderMap;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;

use super::Refusal;
use super::config::{HostPattern, ProxySettings};
use super::target::Target;
use crate::cluster::node::Cluster;
use crate::cluster::store::Retention;
use crate::hub::{Demand, Resume, Stream, StreamOptions, Subscription};
use crate::metrics::{EvictionCause, EvictionLabels, Metrics};
use crate::snapshot::SnapshotStore;
use crate::ssrf::{self, GuardedResolver};
use crate::upstream::config::{BackoffSettings, StreamSettings, host_group};
use crate::upstream::decode::Format;
use crate::upstream::fetch::{FetchError, Fetcher, redirect_policy};
use crate::upstream::on_demand::{self, Idle, OnDemand};
use crate::upstream::poller::Poller;
use crate::upstream::ratelimit::{RateLimits, SharedQuota};
use crate::views::config::ViewsSettings;
use crate::views::select::Selector;
use crate::views::spec::ViewSpec;
use crate::views::{Asked, Budget, StreamViews};

/// A view of a dynamic stream, as a request asks for it: where the entities are, and the view.
pub struct ViewRequest {
    /// The entity array and key (`X-Sd-Entities`, `X-Sd-Key`).
    pub selector: Selector,
    /// What the view keeps (`X-Sd-Where`, `X-Sd-Fields`).
    pub spec: ViewSpec,
}

/// One dynamic stream.
struct Entry {
    stream: Arc<Stream>,
    host: String,
    /// Poll periods asked for by the current subscriptions (period → count).
    periods: Mutex<BTreeMap<Duration, usize>>,
    /// The shortest of them: what the poller follows.
    period: watch::Sender<Duration>,
    /// When the last subscription ended (`None` while subscribed).
    idle_since: Mutex<Option<Instant>>,
    /// Stops the poller when the stream is evicted by something other than its own linger.
    stop: CancellationToken,
    /// The stream's views, made when the first is asked for; their entity selector is the one
    /// that request gave (one derivation per stream).
    views: OnceLock<Arc<StreamViews>>,
}

impl Entry {
    fn lock_periods(&self) -> MutexGuard<'_, BTreeMap<Duration, usize>> {
        self.periods.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn idle_since(&self) -> Option<Instant> {
        *self
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn claim(self: &Arc<Self>, period: Duration) -> Claim {
        let mut periods = self.lock_periods();
        *periods.entry(period).or_default() += 1;
        self.publish_period(&periods);
        *self
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        Claim {
            entry: self.clone(),
            period,
            _demand: None,
        }
    }

    fn release(&self, period: Duration) {
        let mut periods = self.lock_periods();
        if let Some(count) = periods.get_mut(&period) {
            *count -= 1;
            if *count == 0 {
                periods.remove(&period);
            }
        }
        if periods.is_empty() {
            *self
                .idle_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        } else {
            self.publish_period(&periods);
        }
    }

    fn publish_period(&self, periods: &BTreeMap<Duration, usize>) {
        if let Some((&shortest, _)) = periods.first_key_value() {
            self.period.send_if_modified(|current| {
                let changed = *current != shortest;
                *current = shortest;
                changed
            });
        }
    }
}

/// A subscription's say in its stream's poll period; withdrawn when dropped.
pub struct Claim {
    entry: Arc<Entry>,
    period: Duration,
    /// A view's subscriber's demand for the source stream (its poller watches only that).
    _demand: Option<Demand>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.entry.release(self.period);
    }
}

/// How dynamic streams poll and fan out, as configured for every stream.
#[derive(Debug, Clone, Copy)]
pub struct Polling<'a> {
    /// The User-Agent of upstream requests (`upstream.user_agent`).
    pub user_agent: &'a str,
    /// Events a subscriber may fall behind (`server.subscriber_buffer`).
    pub buffer: usize,
    /// The retry schedule after failed polls (`upstream.backoff`).
    pub backoff: BackoffSettings,
}

/// What dynamic streams use of the cluster.
pub struct ClusterLink {
    /// This node's part of it.
    pub node: Arc<Cluster>,
    /// The cluster's rate limits, asked by the pollers.
    pub quota: Arc<dyn SharedQuota>,
}

/// Every dynamic stream, and what it takes to create more.
pub struct DynamicStreams {
    settings: Arc<ProxySettings>,
    snapshots: SnapshotStore,
    fetcher: Arc<Fetcher>,
    rate_limits: Arc<RateLimits>,
    metrics: Arc<Metrics>,
    buffer: usize,
    backoff: BackoffSettings,
    /// Keys the stream names: a client cannot derive another's stream name from its URL. In a
    /// cluster it is the cluster's (so every node names a stream alike), `None` until Redis
    /// gave it.
    key: RwLock<Option<[u8; 32]>>,
    /// This node's part of a cluster: dynamic streams are then shared by the nodes, polled
    /// by one of those whose subscribers want them.
    cluster: Option<ClusterLink>,
    entries: Mutex<HashMap<Arc<str>, Arc<Entry>>>,
    /// Every view's share of `views.max_total`, with the configured streams'.
    budget: Arc<Budget>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    me: Weak<DynamicStreams>,
}

impl DynamicStreams {
    /// Starts the registry: its HTTP client (guarded resolver, checked redirects) and the task
    /// that ends streams evicted for memory. Pollers start with their streams.
    pub fn start(
        settings: Arc<ProxySettings>,
        polling: Polling<'_>,
        rate_limits: Arc<RateLimits>,
        metrics: Arc<Metrics>,
        cluster: Option<ClusterLink>,
        budget: Arc<Budget>,
        shutdown: CancellationToken,
    ) -> Result<Arc<DynamicStreams>, FetchError> {
        let Polling {
            user_agent,
            buffer,
            backoff,
        } = polling;
        let fetcher = Arc::new(client(&settings, user_agent)?);
        let (evicted_tx, evicted_rx) = mpsc::unbounded_channel();
        let snapshots = SnapshotStore::bounded(settings.max_memory, move |name| {
            // Called under the publishing stream's lock: hand the name on, nothing more.
            let _ = evicted_tx.send(name);
        });
        metrics
            .dynamic_streams_limit
            .set(i64::try_from(settings.max_streams).unwrap_or(i64::MAX));
        metrics
            .dynamic_snapshot_bytes_limit
            .set(i64::try_from(settings.max_memory).unwrap_or(i64::MAX));
        let streams = Arc::new_cyclic(|me| DynamicStreams {
            settings,
            snapshots,
            fetcher,
            rate_limits,
            metrics,
            buffer,
            backoff,
            key: RwLock::new(cluster.is_none().then(rand::random)),
            cluster,
            entries: Mutex::new(HashMap::new()),
            budget,
            shutdown,
            tasks: TaskTracker::new(),
            me: me.clone(),
        });
        tokio::spawn(end_evicted(Arc::downgrade(&streams), evicted_rx));
        Ok(streams)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Dynamic streams alive.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// JSON bytes of their snapshots (also set as a gauge).
    pub fn snapshot_bytes(&self) -> u64 {
        let bytes = self.snapshots.weighted_bytes();
        self.metrics
            .dynamic_snapshot_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        bytes
    }

    /// Sets the key that names streams (the cluster's, read from Redis).
    pub fn set_key(&self, key: [u8; 32]) {
        *self.key.write().unwrap_or_else(PoisonError::into_inner) = Some(key);
    }

    /// Whether streams can be named yet (a cluster node gets its key from Redis).
    pub fn has_key(&self) -> bool {
        self.key
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// This node's part of a cluster, if any.
    pub fn cluster(&self) -> Option<&ClusterLink> {
        self.cluster.as_ref()
    }

    /// The dynamic stream `name`, if this node serves it.
    pub fn get(&self, name: &str) -> Option<Arc<Stream>> {
        self.lock().get(name).map(|e| e.stream.clone())
    }

    /// Every dynamic stream this node serves.
    pub fn all(&self) -> Vec<Arc<Stream>> {
        self.lock().values().map(|e| e.stream.clone()).collect()
    }

    /// The name of the stream of `target`: `~` and 24 hex digits of a keyed hash of the URL
    /// and the forwarded headers (sorted, so their order does not matter); refused while a
    /// cluster node has no key yet.
    pub fn name_of(&self, target: &Target) -> Result<Arc<str>, Refusal> {
        let key = self
            .key
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .ok_or(Refusal::ClusterUnavailable)?;
        let mut headers: Vec<(&str, &[u8])> = target
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        headers.sort_unstable();
        let mut hash = Sha256::new();
        hash.update(key);
        hash.update(target.url.as_str().as_bytes());
        for (name, value) in headers {
            hash.update(b"\n");
            hash.update(name.as_bytes());
            hash.update(b":");
            hash.update(value);
        }
        let digest = hash.finalize();
        let mut name = String::with_capacity(25);
        name.push('~');
        for byte in &digest[..12] {
            name.push_str(&format!("{byte:02x}"));
        }
        Ok(Arc::from(name))
    }

    /// Subscribes to the stream of `target` (creating it if needed), or to `view` of it,
    /// from `resume`, asking for polls every `period`. A new stream's host is resolved and
    /// checked first. A view shares its source's poller: it is derived from its changes.
    pub async fn open(
        &self,
        target: &Target,
        view: Option<ViewRequest>,
        period: Duration,
        resume: &Resume,
    ) -> Result<(Subscription, Arc<str>, Claim), Refusal> {
        let name = self.name_of(target)?;
        let exists = self.lock().contains_key(&name);
        if !exists
            && !self.settings.allow_private
            && let Some(url::Host::Domain(host)) = target.url.host()
        {
            let port = target.url.port_or_known_default().unwrap_or(443);
            ssrf::resolve_checked(host, port, false)
                .await
                .map_err(Refusal::Forbidden)?;
        }
        let mut entries = self.lock();
        let entry = match entries.get(&name) {
            Some(entry) => entry.clone(),
            None => {
                self.make_room(&mut entries)?;
                let entry = self.create(&name, target, period);
                entries.insert(name.clone(), entry.clone());
                self.metrics
                    .dynamic_streams
                    .set(i64::try_from(entries.len()).unwrap_or(i64::MAX));
                entry
            }
        };
        let mut claim = entry.claim(period);
        let (subscription, name) = match view {
            None => (entry.stream.subscribe(resume), name),
            Some(view) => {
                let subscription = self.subscribe_view(&entry, view, resume)?;
                claim._demand = Some(entry.stream.hold_demand());
                let name = Arc::from(subscription.stream().name());
                (subscription, name)
            }
        };
        Ok((subscription, name, claim))
    }

    /// Subscribes to `view` of `entry`'s stream (its views made on the first view asked).
    fn subscribe_view(
        &self,
        entry: &Entry,
        view: ViewRequest,
        resume: &Resume,
    ) -> Result<Subscription, Refusal> {
        let stream = &entry.stream;
        let views = entry.views.get_or_init(|| {
            let settings = &self.settings;
            let views = Arc::new(StreamViews::new(
                stream,
                ViewsSettings {
                    selector: view.selector.clone(),
                    ad_hoc: true,
                    max_views: settings.max_views_per_stream,
                    max_views_key: "this stream (proxy.max_views_per_stream)",
                    linger: settings.view_linger,
                    named: BTreeMap::new(),
                },
                StreamOptions {
                    history: settings.history,
                    history_bytes: settings.history_bytes,
                    buffer: self.buffer,
                    diff: settings.diff.clone(),
                },
                self.snapshots.clone(),
                self.budget.clone(),
            ));
            stream.derive(views.clone());
            views
        });
        let selector = &views.settings().selector;
        if selector.entities != view.selector.entities || selector.key != view.selector.key {
            return Err(Refusal::ViewParam {
                param: "X-Sd-Entities",
                message: format!(
                    "this stream's views already select entities at {:?} keyed by {:?} \
                     (X-Sd-Entities, X-Sd-Key): ask with the same, or leave both out",
                    pointer(&selector.entities),
                    pointer(&selector.key),
                ),
            });
        }
        let view_error = |error: crate::views::ViewError| Refusal::View(error);
        let (id, spec) = views
            .resolve(Asked::AdHoc(view.spec))
            .map_err(view_error)?
            .ok_or_else(|| Refusal::ViewParam {
                param: "X-Sd-Where",
                message: "no view asked".to_owned(),
            })?;
        views
            .subscribe(stream, id, spec, resume)
            .map_err(view_error)
    }

    /// Subscribes to the existing stream `name` (the native view), or to its view
    /// `name@~{view}` while that view exists, from `resume`; `period` gives the subscriber's
    /// poll period for the stream's host, or refuses it.
    pub fn view(
        &self,
        name: &str,
        resume: &Resume,
        period: impl FnOnce(&str) -> Result<Duration, Refusal>,
    ) -> Result<(Subscription, Arc<str>, Claim), Refusal> {
        let entries = self.lock();
        let missing = || Refusal::NoSuchStream(name.to_owned());
        let Some((source, view)) = name.split_once('@') else {
            let (name, entry) = entries.get_key_value(name).ok_or_else(missing)?;
            let claim = entry.claim(period(&entry.host)?);
            let subscription = entry.stream.subscribe(resume);
            return Ok((subscription, name.clone(), claim));
        };
        // A view of the stream (`~{id}@~{view}`), as long as the view exists.
        let entry = entries.get(source).ok_or_else(missing)?;
        let views = entry.views.get().ok_or_else(missing)?;
        let (id, spec) = views.by_id(view).map_err(|_| missing())?;
        let mut claim = entry.claim(period(&entry.host)?);
        let subscription = views
            .subscribe(&entry.stream, id, spec, resume)
            .map_err(Refusal::View)?;
        claim._demand = Some(entry.stream.hold_demand());
        Ok((subscription, Arc::from(name), claim))
    }

    /// Makes room for one more stream by evicting idle ones, or refuses.
    fn make_room(&self, entries: &mut HashMap<Arc<str>, Arc<Entry>>) -> Result<(), Refusal> {
        while entries.len() >= self.settings.max_streams {
            if !self.evict_idle(entries) {
                return Err(Refusal::TooManyStreams {
                    max: self.settings.max_streams,
                });
            }
        }
        while self.snapshots.weighted_bytes() >= self.settings.max_memory {
            if !self.evict_idle(entries) {
                return Err(Refusal::OutOfMemory {
                    max: self.settings.max_memory,
                });
            }
        }
        Ok(())
    }

    /// Evicts the stream that has been without subscribers the longest; false if none is idle.
    fn evict_idle(&self, entries: &mut HashMap<Arc<str>, Arc<Entry>>) -> bool {
        let victim = entries
            .iter()
            .filter(|(_, e)| *e.stream.demand().borrow() == 0)
            .min_by_key(|(_, e)| e.idle_since())
            .map(|(name, _)| name.clone());
        let Some(entry) = victim.and_then(|name| entries.remove(&name)) else {
            return false;
        };
        self.discard(entries.len(), &entry, EvictionCause::Idle, None);
        true
    }

    /// Builds a stream and starts its demand-driven poller.
    fn create(&self, name: &Arc<str>, target: &Target, period: Duration) -> Arc<Entry> {
        let settings = &self.settings;
        let stream = Arc::new(Stream::new(
            name,
            StreamOptions {
                history: settings.history,
                history_bytes: settings.history_bytes,
                buffer: self.buffer,
                diff: settings.diff.clone(),
            },
            self.snapshots.clone(),
            self.metrics.clone(),
        ));
        let mut headers = HeaderMap::new();
        for (header, value) in &target.headers {
            headers.append(header.clone(), value.clone());
        }
        let group = host_group(&target.url);
        let poll = StreamSettings {
            name: name.to_string(),
            url: target.url.clone(),
            headers,
            interval: period,
            timeout: settings.timeout,
            max_body_bytes: settings.max_body_bytes,
            format: Format::Json,
            history: settings.history,
            history_bytes: settings.history_bytes,
            rate_limit_group: group.clone(),
            diff: settings.diff.clone(),
            on_demand: Some(settings.linger),
            views: None,
        };
        let entry = Arc::new(Entry {
            stream: stream.clone(),
            host: target.url.host_str().unwrap_or_default().to_owned(),
            periods: Mutex::new(BTreeMap::new()),
            period: watch::Sender::new(period),
            idle_since: Mutex::new(None),
            stop: self.shutdown.child_token(),
            views: OnceLock::new(),
        });
        tracing::info!(stream = %name, host = %entry.host, ?period, "dynamic stream created");
        let mut options = OnDemand {
            linger: settings.linger,
            period: Some(entry.period.subscribe()),
            keepalive: Some(settings.keepalive),
        };
        let poller = match &self.cluster {
            None => Poller::new(
                Arc::new(poll),
                self.fetcher.clone(),
                self.rate_limits.limiter(&group),
                self.metrics.clone(),
                stream.clone(),
                self.backoff,
            ),
            Some(cluster) => {
                // Shared by the nodes: this node polls only while it holds the stream's lease,
                // which goes only to nodes whose subscribers want it, at the shortest period
                // any of them asks for, and writes through the cluster's log.
                let retention = Retention {
                    ttl: (settings.linger * 2).max(Duration::from_secs(60)),
                    ..cluster
                        .node
                        .retention(settings.history, settings.history_bytes)
                };
                let lease = cluster.node.on_demand(
                    &stream,
                    retention,
                    stream.demand(),
                    entry.period.subscribe(),
                    tokio::sync::watch::channel(None).1,
                    &entry.stop,
                    &self.shutdown,
                );
                for task in lease.tasks {
                    self.tasks.spawn(task);
                }
                options.period = Some(lease.shortest);
                let writer =
                    cluster
                        .node
                        .writer(stream.clone(), retention, Some(lease.held.clone()), None);
                Poller::new(
                    Arc::new(poll),
                    self.fetcher.clone(),
                    self.rate_limits.limiter(&group),
                    self.metrics.clone(),
                    writer,
                    self.backoff,
                )
                .taking_turns(lease.held)
                .sharing_quota(cluster.quota.clone())
            }
        }
        .show_host_only();
        let me = self.me.clone();
        let retire_name = name.clone();
        self.tasks.spawn(on_demand::run(
            poller,
            stream,
            options,
            entry.stop.clone(),
            move |_| match me.upgrade() {
                Some(streams) => streams.retire(&retire_name),
                None => Idle::Stop,
            },
        ));
        entry
    }

    /// The linger period of `name` ran out: evict it unless a subscriber arrived meanwhile.
    fn retire(&self, name: &Arc<str>) -> Idle {
        let mut entries = self.lock();
        let Some(entry) = entries.get(name) else {
            return Idle::Stop;
        };
        if *entry.stream.demand().borrow() > 0 {
            return Idle::Resume;
        }
        let Some(entry) = entries.remove(name) else {
            return Idle::Stop;
        };
        self.discard(entries.len(), &entry, EvictionCause::Linger, None);
        Idle::Stop
    }

    /// Ends `name`, whose snapshot the memory bound evicted.
    fn end_for_memory(&self, name: &str) {
        let mut entries = self.lock();
        let Some(entry) = entries.remove(name) else {
            return;
        };
        let message = format!(
            "the dynamic streams outgrew their memory limit of {} bytes (proxy.max_memory) and \
             this stream was evicted; reconnect to start it again",
            self.settings.max_memory
        );
        self.discard(
            entries.len(),
            &entry,
            EvictionCause::Memory,
            Some((503, "evicted", message)),
        );
    }

    /// Stops and forgets a stream already removed from `entries` (`remaining` are left).
    fn discard(
        &self,
        remaining: usize,
        entry: &Entry,
        cause: EvictionCause,
        end: Option<(u16, &'static str, String)>,
    ) {
        let name = entry.stream.name();
        tracing::info!(stream = %name, host = %entry.host, ?cause, "dynamic stream evicted");
        entry.stop.cancel();
        if let Some(views) = entry.views.get() {
            crate::hub::Derivation::closed(views.as_ref());
        }
        match end {
            Some((status, why, message)) => entry.stream.end(status, why, message),
            None => entry.stream.close(),
        }
        self.snapshots.remove(name);
        self.metrics.forget_stream(name);
        if let Some(cluster) = &self.cluster {
            cluster.node.forget(name);
        }
        self.metrics
            .dynamic_evictions
            .get_or_create(&EvictionLabels { cause })
            .inc();
        self.metrics
            .dynamic_streams
            .set(i64::try_from(remaining).unwrap_or(i64::MAX));
    }

    /// Ends every dynamic stream's subscriptions and stops their pollers (shutdown).
    pub fn close_all(&self) {
        let entries: Vec<Arc<Entry>> = self.lock().values().cloned().collect();
        for entry in entries {
            entry.stop.cancel();
            if let Some(views) = entry.views.get() {
                crate::hub::Derivation::closed(views.as_ref());
            }
            entry.stream.close();
        }
        self.tasks.close();
    }
}

/// JSON Pointer `tokens`, written.
fn pointer(tokens: &[String]) -> String {
    tokens
        .iter()
        .map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1")))
        .collect()
}

/// Ends the streams whose snapshots the memory bound evicted, outside any stream's lock.
async fn end_evicted(
    streams: Weak<DynamicStreams>,
    mut evicted: mpsc::UnboundedReceiver<Arc<str>>,
) {
    while let Some(name) = evicted.recv().await {
        let Some(streams) = streams.upgrade() else {
            return;
        };
        streams.end_for_memory(&name);
    }
}

/// The HTTP client of dynamic streams: connects only to addresses the SSRF guard permits, and
/// follows a redirect only to an allowed host over http(s).
fn client(settings: &ProxySettings, user_agent: &str) -> Result<Fetcher, FetchError> {
    let allowed: Vec<HostPattern> = settings.allowed_hosts.clone();
    let allow_private = settings.allow_private;
    let redirects = redirect_policy(move |url| redirect_refusal(url, &allowed, allow_private));
    let builder = Fetcher::client_builder(user_agent)?
        .redirect(redirects)
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver { allow_private }));
    Fetcher::build(builder)
}

/// Why a redirect to `url` is not followed, if it is not.
fn redirect_refusal(url: &Url, allowed: &[HostPattern], allow_private: bool) -> Option<String> {
    if let Err(error) = ssrf::check_url(url, allow_private) {
        return Some(error.to_string());
    }
    let host = url.host_str().unwrap_or_default();
    if !allowed.iter().any(|p| p.matches(host)) {
        return Some(format!("{host} is not in proxy.allowed_hosts"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Arc<Entry> {
        let stream = Stream::new(
            "~t",
            StreamOptions {
                history: 1,
                history_bytes: u64::MAX,
                buffer: 4,
                diff: Default::default(),
            },
            SnapshotStore::new(),
            Arc::new(Metrics::new()),
        );
        Arc::new(Entry {
            stream: Arc::new(stream),
            host: "h".into(),
            periods: Mutex::new(BTreeMap::new()),
            period: watch::Sender::new(Duration::from_secs(5)),
            idle_since: Mutex::new(None),
            stop: CancellationToken::new(),
            views: OnceLock::new(),
        })
    }

    #[test]
    fn the_stream_polls_as_often_as_its_most_demanding_subscriber_allows() {
        let entry = entry();
        let period = entry.period.subscribe();
        let secs = |n| Duration::from_secs(n);
        let slow = entry.claim(secs(5));
        let fast = entry.claim(secs(1));
        let also_fast = entry.claim(secs(1));
        assert_eq!(*period.borrow(), secs(1));
        drop(fast);
        assert_eq!(*period.borrow(), secs(1), "another claim still asks for 1s");
        drop(also_fast);
        assert_eq!(*period.borrow(), secs(5));
        assert!(entry.idle_since().is_none());
        drop(slow);
        assert!(
            entry.idle_since().is_some(),
            "idle once the last claim is gone"
        );
        assert_eq!(*period.borrow(), secs(5), "the period stays while idle");
        let _again = entry.claim(secs(2));
        assert!(entry.idle_since().is_none());
        assert_eq!(*period.borrow(), secs(2));
    }

    #[test]
    fn redirects_only_go_to_allowed_public_hosts() {
        let allowed = vec![HostPattern::parse("*.example.com").unwrap()];
        let url = |s: &str| Url::parse(s).unwrap();
        assert_eq!(
            redirect_refusal(&url("https://a.example.com/x"), &allowed, false),
            None
        );
        let refused = redirect_refusal(&url("https://evil.test/x"), &allowed, false).unwrap();
        assert!(refused.contains("not in proxy.allowed_hosts"), "{refused}");
        let refused = redirect_refusal(&url("http://169.254.169.254/"), &allowed, false).unwrap();
        assert!(refused.contains("cloud metadata"), "{refused}");
        assert!(redirect_refusal(&url("ftp://a.example.com/"), &allowed, true).is_some());
    }
}
