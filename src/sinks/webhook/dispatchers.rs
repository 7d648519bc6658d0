//! The dispatchers running on this node, started and stopped while the process runs: one per
//! stream of the hub (started with the sink, then as a configuration reload adds a stream;
//! replaced when its source changes; stopped when it is removed) and one per view an enabled
//! endpoint receives (started and stopped as endpoints come, go and change, whether from the
//! file or the admin API).
//!
//! Each dispatcher runs under its own cancellation token, tracked by a [`TaskTracker`]:
//! stopping one cancels its token and waits for it to return, and shutdown waits for all of
//! them. What a stopped dispatcher had queued stays in the outbox and is delivered by the
//! worker as usual (a removed stream's pending deliveries drain; nothing new is queued for
//! it). A dispatcher started later resumes from the endpoints' cursors, like one started
//! with the process.
//!
//! In a cluster on a shared store, a stream's dispatcher runs under its lease (see
//! [`super::dispatcher::Dispatcher::leased`]); a view's runs under its source stream's, so a
//! view whose source has no lease on this node is not followed (it would be dispatched twice).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dispatcher::{Committed, Dispatcher, Lease, ResyncRoutes};
use super::outbox::Outbox;
use super::registry::Registry;
use crate::hub::{Hub, Stream};
use crate::views::Views;

/// How long stopping a dispatcher waits for it to return before leaving it to finish alone
/// (it stops at its next await; an outbox write in progress completes or fails on its own).
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Why [`Dispatchers::start_stream`] did not start a stream's dispatcher.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotStarted {
    /// On a shared store every stream's dispatcher runs under its lease's fence; without one,
    /// every node would dispatch it.
    #[error(
        "stream {0:?} has no lease fence: on a shared webhook store its dispatcher runs only \
         under its lease"
    )]
    NoFence(String),
    /// The sink is shutting down.
    #[error("the webhook sink is shutting down")]
    ShuttingDown,
}

/// One running dispatcher.
struct Running {
    token: CancellationToken,
    handle: JoinHandle<()>,
    /// A stream's: up to where its changes are committed (a push waits on it).
    committed: Option<Committed>,
    /// A view's: its source stream.
    source: Option<String>,
}

/// A view some enabled endpoint receives: its source stream and, for an ad hoc view, its
/// filter as written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WantedView {
    source: String,
    query: Option<String>,
}

/// The dispatchers of this node, by the name their deliveries are under (a stream's, or a
/// view's `{stream}@{view}`).
pub struct Dispatchers {
    outbox: Arc<dyn Outbox>,
    registry: Arc<Registry>,
    backlog_limit: usize,
    wake: Arc<Notify>,
    hub: Arc<Hub>,
    views: Arc<Views>,
    routes: ResyncRoutes,
    /// On a shared store: how often a leased dispatcher looks for pairs owed a snapshot.
    /// `None`: a store of this node's own, where dispatchers run unfenced.
    shared: Option<Duration>,
    /// Each stream's lease on this node (a shared store): its dispatcher's and its views'.
    leases: Mutex<HashMap<String, Lease>>,
    running: Mutex<HashMap<String, Running>>,
    /// Held while dispatchers start or stop, so a reload, the admin API and the periodic
    /// check change them one at a time.
    changing: tokio::sync::Mutex<()>,
    /// Views that could not be followed, so each is logged once until it can.
    refused: Mutex<HashSet<String>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Dispatchers {
    /// No dispatchers yet. With `shared` (a shared store) every dispatcher runs under a lease
    /// and looks for pairs owed a snapshot that often.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        outbox: Arc<dyn Outbox>,
        registry: Arc<Registry>,
        backlog_limit: usize,
        wake: Arc<Notify>,
        hub: Arc<Hub>,
        views: Arc<Views>,
        shared: Option<Duration>,
        shutdown: CancellationToken,
    ) -> Self {
        Dispatchers {
            outbox,
            registry,
            backlog_limit,
            wake,
            hub,
            views,
            routes: ResyncRoutes::new(),
            shared,
            leases: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            changing: tokio::sync::Mutex::new(()),
            refused: Mutex::new(HashSet::new()),
            tracker: TaskTracker::new(),
            shutdown,
        }
    }

    /// Where resync requests reach this node's dispatchers.
    pub fn routes(&self) -> ResyncRoutes {
        self.routes.clone()
    }

    /// Every stream's views (an endpoint's `streams` are resolved against them).
    pub fn views(&self) -> &Arc<Views> {
        &self.views
    }

    /// Up to where `stream`'s changes are committed, if its dispatcher runs here.
    pub fn committed(&self, stream: &str) -> Option<Committed> {
        self.lock().get(stream).and_then(|r| r.committed.clone())
    }

    /// The names of the running dispatchers (streams and views), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().keys().cloned().collect();
        names.sort();
        names
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        // Entries are inserted and removed whole: a poisoned map is still consistent.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts `stream`'s dispatcher, replacing the one it had (its source changed), and
    /// follows again the views of it that endpoints receive. `keep_document`: store the
    /// stream's documents with its changes (a push stream outside a cluster, so a restart
    /// continues it). `fence`: the stream's lease on this node, required on a shared store
    /// (the dispatcher and its views' run only while it is held, their writes fenced by it).
    pub async fn start_stream(
        &self,
        stream: Arc<Stream>,
        keep_document: bool,
        fence: Option<Lease>,
    ) -> Result<(), NotStarted> {
        let _changing = self.changing.lock().await;
        let name = stream.name().to_owned();
        self.stop(&name).await;
        self.launch_stream(stream, keep_document, fence)?;
        self.reconcile(&[name.as_str()]).await;
        Ok(())
    }

    /// Starts the dispatchers of `streams` (each with whether it keeps its documents and its
    /// lease, as [`Dispatchers::start_stream`] takes them), then those of the views endpoints
    /// receive: the sink starting.
    pub async fn start_all(&self, streams: Vec<(Arc<Stream>, bool, Option<Lease>)>) {
        let _changing = self.changing.lock().await;
        for (stream, keep_document, fence) in streams {
            let name = stream.name().to_owned();
            self.stop(&name).await;
            if let Err(error) = self.launch_stream(stream, keep_document, fence) {
                tracing::error!(stream = %name, %error, "cannot dispatch the stream's webhooks");
            }
        }
        self.reconcile(&[]).await;
    }

    /// Starts `stream`'s dispatcher (none runs for it).
    fn launch_stream(
        &self,
        stream: Arc<Stream>,
        keep_document: bool,
        fence: Option<Lease>,
    ) -> Result<(), NotStarted> {
        if self.shutdown.is_cancelled() {
            return Err(NotStarted::ShuttingDown);
        }
        let name = stream.name().to_owned();
        if self.shared.is_some() && fence.is_none() {
            return Err(NotStarted::NoFence(name));
        }
        let (sender, requests) = mpsc::unbounded_channel();
        let mut dispatcher = Dispatcher::new(
            stream,
            self.outbox.clone(),
            self.registry.clone(),
            self.backlog_limit,
            self.wake.clone(),
            requests,
            keep_document,
        );
        // On a store of this node's own, this node alone dispatches, unfenced.
        if let (Some(lease), Some(poll)) = (fence, self.shared) {
            self.leases().insert(name.clone(), lease.clone());
            dispatcher = dispatcher.leased(lease, poll);
        }
        let committed = dispatcher.committed();
        self.spawn(name, dispatcher, sender, Some(committed), None);
        Ok(())
    }

    fn spawn(
        &self,
        name: String,
        dispatcher: Dispatcher,
        sender: mpsc::UnboundedSender<super::dispatcher::Resync>,
        committed: Option<Committed>,
        source: Option<String>,
    ) {
        let token = self.shutdown.child_token();
        self.routes.insert(name.clone(), sender);
        let handle = self.tracker.spawn(dispatcher.run(token.clone()));
        self.lock().insert(
            name,
            Running {
                token,
                handle,
                committed,
                source,
            },
        );
    }

    /// Stops stream `name`'s dispatcher (the stream was removed) and those of its views. Its
    /// deliveries already queued stay and are delivered.
    pub async fn stop_stream(&self, name: &str) {
        let _changing = self.changing.lock().await;
        self.stop(name).await;
        self.leases().remove(name);
        self.reconcile(&[name]).await;
    }

    /// Starts and stops view dispatchers so that exactly the views enabled endpoints receive
    /// are followed; those of the streams in `restarted` (their views or source changed) are
    /// followed anew.
    pub async fn reconcile_views(&self, restarted: &[&str]) {
        let _changing = self.changing.lock().await;
        self.reconcile(restarted).await;
    }

    /// The views enabled endpoints receive, by name.
    fn wanted(&self) -> BTreeMap<String, WantedView> {
        let mut wanted = BTreeMap::new();
        for endpoint in self.registry.all() {
            if !endpoint.enabled() {
                continue;
            }
            for name in &endpoint.record.streams {
                if self.hub.get(name).is_some() {
                    continue;
                }
                let Some((source, _)) = name.split_once('@') else {
                    // A stream removed while an endpoint still names it: nothing to follow.
                    continue;
                };
                wanted.entry(name.clone()).or_insert_with(|| WantedView {
                    source: source.to_owned(),
                    query: endpoint.record.view_filters.get(name).cloned(),
                });
            }
        }
        wanted
    }

    async fn reconcile(&self, restarted: &[&str]) {
        let wanted = self.wanted();
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|name| wanted.contains_key(name));
        let stale: Vec<String> = self
            .lock()
            .iter()
            .filter_map(|(name, running)| {
                let source = running.source.as_deref()?;
                let keep = wanted.contains_key(name)
                    && !restarted.contains(&source)
                    && self.hub.get(source).is_some();
                (!keep).then(|| name.clone())
            })
            .collect();
        for name in stale {
            tracing::info!(view = %name, "no longer dispatching the view's webhooks");
            self.stop(&name).await;
        }
        if self.shutdown.is_cancelled() {
            return;
        }
        for (name, view) in wanted {
            if self.lock().contains_key(&name) {
                continue;
            }
            match self.launch_view(&name, &view) {
                Ok(()) => {
                    self.refused
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&name);
                    tracing::info!(view = %name, "dispatching the view's webhooks");
                }
                Err(why) => {
                    let first = self
                        .refused
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(name.clone());
                    if first {
                        tracing::error!(view = %name, %why, "cannot follow the view for its webhooks");
                    }
                }
            }
        }
    }

    /// Starts the dispatcher of view `name`; `Err` says why it cannot be followed now.
    fn launch_view(&self, name: &str, view: &WantedView) -> Result<(), String> {
        let target = match &view.query {
            Some(query) => self.views.target(&self.hub, &view.source, Some(query)),
            None => self.views.target(&self.hub, name, None),
        };
        let target = match target {
            Some(Ok(target)) => target,
            Some(Err(error)) => return Err(error.to_string()),
            None => return Err("its stream does not exist".to_owned()),
        };
        let lease = match self.shared {
            Some(poll) => match self.leases().get(&view.source) {
                Some(lease) => Some((lease.clone(), poll)),
                None => {
                    return Err(format!(
                        "stream {:?} has no lease on this node to dispatch its views under",
                        view.source
                    ));
                }
            },
            None => None,
        };
        let stream = target.stream().map_err(|e| e.to_string())?;
        let (sender, requests) = mpsc::unbounded_channel();
        let mut dispatcher = Dispatcher::view(
            target,
            stream,
            self.outbox.clone(),
            self.registry.clone(),
            self.backlog_limit,
            self.wake.clone(),
            requests,
        );
        if let Some((lease, poll)) = lease {
            dispatcher = dispatcher.leased(lease, poll);
        }
        self.spawn(
            name.to_owned(),
            dispatcher,
            sender,
            None,
            Some(view.source.clone()),
        );
        Ok(())
    }

    /// Stops dispatcher `name`, if it runs, and waits for it to return.
    async fn stop(&self, name: &str) {
        let Some(running) = self.lock().remove(name) else {
            return;
        };
        self.routes.remove(name);
        running.token.cancel();
        if tokio::time::timeout(STOP_WAIT, running.handle)
            .await
            .is_err()
        {
            tracing::warn!(stream = %name, "a stopped webhook dispatcher is still finishing");
        }
    }

    /// Until `shutdown`: follows the endpoints' views every `every` (in a cluster other nodes
    /// change endpoints; the worker disables failing ones). Then waits for every dispatcher
    /// to return.
    pub async fn run(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => self.reconcile_views(&[]).await,
            }
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::diff::DiffOptions;
    use crate::hub::StreamOptions;
    use crate::metrics::Metrics;
    use crate::sinks::webhook::outbox::sqlite::SqliteOutbox;
    use crate::snapshot::SnapshotStore;

    fn stream(name: &str) -> Arc<Stream> {
        Arc::new(Stream::new(
            name,
            StreamOptions {
                history: 10,
                history_bytes: u64::MAX,
                buffer: 64,
                diff: DiffOptions::default(),
            },
            SnapshotStore::new(),
            Arc::new(Metrics::new()),
        ))
    }

    async fn dispatchers(shared: Option<Duration>, shutdown: &CancellationToken) -> Dispatchers {
        let outbox: Arc<dyn Outbox> = Arc::new(
            SqliteOutbox::open(Path::new(":memory:"))
                .await
                .expect("an in-memory outbox"),
        );
        Dispatchers::new(
            outbox,
            Arc::new(Registry::new()),
            100,
            Arc::new(Notify::new()),
            Arc::new(Hub::new()),
            Arc::new(Views::new()),
            shared,
            shutdown.clone(),
        )
    }

    #[tokio::test]
    async fn a_stream_dispatcher_starts_is_replaced_and_stops() {
        let shutdown = CancellationToken::new();
        let dispatchers = dispatchers(None, &shutdown).await;
        let s = stream("s");
        dispatchers
            .start_stream(s.clone(), false, None)
            .await
            .expect("started");
        assert_eq!(dispatchers.names(), ["s"]);
        assert!(dispatchers.committed("s").is_some());
        let first = dispatchers.routes().get("s").expect("a route");
        // Replaced (a change of source): one dispatcher still, with a new route.
        dispatchers
            .start_stream(s.clone(), true, None)
            .await
            .expect("replaced");
        assert_eq!(dispatchers.names(), ["s"]);
        let second = dispatchers.routes().get("s").expect("a route");
        assert!(!first.same_channel(&second));
        assert!(first.is_closed(), "the first dispatcher returned");
        dispatchers.stop_stream("s").await;
        assert!(dispatchers.names().is_empty());
        assert!(dispatchers.committed("s").is_none());
        assert!(dispatchers.routes().get("s").is_none());
        assert!(second.is_closed(), "the second dispatcher returned");
    }

    #[tokio::test]
    async fn on_a_shared_store_a_stream_needs_its_fence_and_nothing_starts_at_shutdown() {
        let shutdown = CancellationToken::new();
        let shared = dispatchers(Some(Duration::from_millis(500)), &shutdown).await;
        assert_eq!(
            shared.start_stream(stream("s"), false, None).await,
            Err(NotStarted::NoFence("s".into()))
        );
        assert!(shared.names().is_empty());
        let (_holder, fence) = tokio::sync::watch::channel(None);
        shared
            .start_stream(stream("s"), false, Some(fence))
            .await
            .expect("started under its lease");
        assert_eq!(shared.names(), ["s"]);

        let alone = Arc::new(dispatchers(None, &shutdown).await);
        let run = tokio::spawn(alone.clone().run(Duration::from_secs(1), shutdown.clone()));
        alone
            .start_stream(stream("t"), false, None)
            .await
            .expect("started");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("shutdown waits for the dispatchers, which stop")
            .expect("no panic");
        assert_eq!(
            alone.start_stream(stream("u"), false, None).await,
            Err(NotStarted::ShuttingDown)
        );
    }
}
