//! The views of one stream, computed incrementally from its changes.
//!
//! A view is a stream of its own (sparse: it changes at some of its source's sequence numbers
//! only, so its ids are the source's), created when first subscribed and evicted after its
//! linger period unwatched. Its subscribers are served by the same sinks as any stream.
//!
//! Per change, the work follows what changed, not views × document: the source's entities are
//! grouped by key in the documents before and after, and only the changed groups are looked at.
//! Each changed entity's old and new alias values pick, through an index of the views'
//! equality filters, the views it can leave or enter; views without equality filters (only an
//! expression, or only a projection) evaluate the changed entities themselves. Only views that
//! gained, lost or hold a changed entity are rebuilt (from their members, in the source's order)
//! and diffed against their own document; a change outside the entity array that is not
//! ignored touches every view.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde_json::Value;

use super::config::ViewsSettings;
use super::select::{Compiled, same, values_at};
use super::spec::{Asked, ViewError, ViewSpec, list};
use crate::diff;
use crate::hub::{
    Change, Derivation, Preparation, Recovery, Resume, Stream, StreamOptions, Subscription,
    UpstreamFailure,
};
use crate::metrics::{Metrics, StreamLabels};
use crate::snapshot::{Snapshot, SnapshotStore};

/// How many views exist across every stream, against `views.max_total`.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    /// At most `max` views in all.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            max,
        })
    }

    fn take(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.max).then_some(used + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(1))
            });
    }
}

/// The views of one stream: resolves what subscriptions ask for, and derives every view's
/// changes from the stream's.
pub struct StreamViews {
    source: Arc<str>,
    settings: ViewsSettings,
    /// Canonical form of each named view's spec → its name, so an equivalent ad hoc view is it.
    named_canonical: HashMap<String, String>,
    options: StreamOptions,
    snapshots: SnapshotStore,
    metrics: Arc<Metrics>,
    labels: StreamLabels,
    budget: Arc<Budget>,
    inner: Mutex<Inner>,
}

struct Inner {
    /// The source's epoch as last seen.
    epoch: u64,
    views: HashMap<Arc<str>, View>,
    /// Alias → value → the views whose equality filter on that alias keeps the value.
    index: HashMap<String, HashMap<String, Vec<Arc<str>>>>,
    /// Views without an equality filter: they evaluate every changed entity.
    scans: Vec<Arc<str>>,
}

struct View {
    compiled: Compiled,
    stream: Arc<Stream>,
    /// Keys of the source's entities the view keeps.
    members: HashSet<Arc<str>>,
    /// The alias the view is indexed under, if any.
    indexed: Option<String>,
}

/// A document's entities grouped by key (an entity without one is keyed by its position).
struct Groups<'a> {
    entities: &'a [Value],
    by_key: HashMap<Arc<str>, Vec<usize>>,
}

impl StreamViews {
    /// The views of stream `source`, whose views' streams use `options` (the source's),
    /// `snapshots` and `metrics`, within `budget`.
    pub fn new(
        source: &Stream,
        settings: ViewsSettings,
        options: StreamOptions,
        snapshots: SnapshotStore,
        budget: Arc<Budget>,
    ) -> Self {
        let named_canonical = settings
            .named
            .iter()
            .map(|(name, spec)| (spec.canonical(), name.clone()))
            .collect();
        StreamViews {
            source: Arc::from(source.name()),
            settings,
            named_canonical,
            options,
            snapshots,
            metrics: source.metrics().clone(),
            labels: source.labels().clone(),
            budget,
            inner: Mutex::new(Inner {
                epoch: source.epoch(),
                views: HashMap::new(),
                index: HashMap::new(),
                scans: Vec::new(),
            }),
        }
    }

    /// The settings the views were configured with.
    pub fn settings(&self) -> &ViewsSettings {
        &self.settings
    }

    /// The aliases filters may use.
    pub fn aliases(&self) -> std::collections::BTreeSet<String> {
        self.settings.selector.alias_names()
    }

    /// The view `asked` names: its id (the configured name, or `~` and a hash of the ad hoc
    /// spec's canonical form) and spec. `None` for the whole stream.
    pub fn resolve(&self, asked: Asked) -> Result<Option<(Arc<str>, ViewSpec)>, ViewError> {
        match asked {
            Asked::Whole => Ok(None),
            Asked::Named(name) => match self.settings.named.get(&name) {
                Some(spec) => Ok(Some((Arc::from(name.as_str()), spec.clone()))),
                None => Err(ViewError::UnknownView {
                    name,
                    known: list(self.settings.named.keys()),
                }),
            },
            Asked::AdHoc(spec) => {
                if let Some(name) = self.named_canonical.get(&spec.canonical()) {
                    return Ok(Some((Arc::from(name.as_str()), spec)));
                }
                if !self.settings.ad_hoc {
                    return Err(ViewError::AdHocRefused {
                        known: list(self.settings.named.keys()),
                    });
                }
                Ok(Some((Arc::from(spec.ad_hoc_name()), spec)))
            }
        }
    }

    /// The view named `id` (a configured name, or the `~…` id of an ad hoc view that exists
    /// now): its spec.
    pub fn by_id(&self, id: &str) -> Result<(Arc<str>, ViewSpec), ViewError> {
        if let Some(spec) = self.settings.named.get(id) {
            return Ok((Arc::from(id), spec.clone()));
        }
        let inner = self.lock();
        match inner.views.get(id) {
            Some(view) if id.starts_with('~') => Ok((Arc::from(id), view.compiled.spec.clone())),
            _ => Err(ViewError::UnknownView {
                name: id.to_owned(),
                known: list(self.settings.named.keys()),
            }),
        }
    }

    /// Subscribes to view `id` of `source` (created if it does not exist yet).
    pub fn subscribe(
        &self,
        source: &Stream,
        id: Arc<str>,
        spec: ViewSpec,
        resume: &Resume,
    ) -> Result<Subscription, ViewError> {
        self.with_view(source, id, spec, |stream| stream.subscribe(resume))
    }

    /// The stream of view `id` of `source` (created if it does not exist yet).
    pub fn stream(
        &self,
        source: &Stream,
        id: Arc<str>,
        spec: ViewSpec,
    ) -> Result<Arc<Stream>, ViewError> {
        self.with_view(source, id, spec, Arc::clone)
    }

    /// The names of the views that exist now, with their subscriber counts.
    pub fn list(&self) -> Vec<(Arc<str>, String, usize)> {
        let inner = self.lock();
        let mut out: Vec<_> = inner
            .views
            .iter()
            .map(|(id, view)| {
                (
                    id.clone(),
                    view.compiled.spec.canonical(),
                    view.stream.subscriber_count(),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Runs `f` on the view's stream, creating the view first if needed; under the views'
    /// lock, so the view is not evicted before `f` subscribes.
    fn with_view<R>(
        &self,
        source: &Stream,
        id: Arc<str>,
        spec: ViewSpec,
        f: impl FnOnce(&Arc<Stream>) -> R,
    ) -> Result<R, ViewError> {
        // The source's state lock is never taken under the views' lock (its derivation calls
        // take them in the other order): read what is needed of it first.
        let source_epoch = source.epoch();
        let mut inner = self.lock();
        if let Some(view) = inner.views.get(&id) {
            if view.compiled.spec.canonical() != spec.canonical() {
                // Two ad hoc specs with the same 48-bit hash: refuse the second.
                return Err(ViewError::Collision);
            }
            return Ok(f(&view.stream));
        }
        self.evict_idle(&mut inner, Instant::now());
        if inner.views.len() >= self.settings.max_views {
            return Err(ViewError::TooMany {
                max: self.settings.max_views,
                scope: "this stream",
            });
        }
        if !self.budget.take() {
            return Err(ViewError::TooMany {
                max: self.budget.max,
                scope: "the server (views.max_total)",
            });
        }
        let compiled = self.settings.selector.compile(spec);
        let current = self.snapshots.get(&self.source);
        let mut members = HashSet::new();
        let snapshot = current.as_ref().map(|current| {
            let groups = self.groups(&current.document);
            for (key, indices) in &groups.by_key {
                if indices
                    .iter()
                    .any(|&i| compiled.matches(&groups.entities[i]))
                {
                    members.insert(key.clone());
                }
            }
            let document = self.build(&compiled, &members, &current.document, &groups);
            Snapshot::taken_at(current.epoch, current.seq, document, current.at)
        });
        let epoch = current.as_ref().map_or(source_epoch, |c| c.epoch);
        inner.epoch = epoch;
        let stream = Arc::new(
            Stream::derived(
                &format!("{}@{id}", self.source),
                self.options.clone(),
                self.snapshots.clone(),
                self.metrics.clone(),
                self.labels.clone(),
                epoch,
                snapshot,
            )
            .delivering_for(source),
        );
        let indexed = compiled.equalities().next().map(|(alias, values)| {
            let by_value = inner.index.entry(alias.clone()).or_default();
            for value in values {
                by_value.entry(value.clone()).or_default().push(id.clone());
            }
            alias.clone()
        });
        if indexed.is_none() {
            inner.scans.push(id.clone());
        }
        let out = f(&stream);
        inner.views.insert(
            id,
            View {
                compiled,
                stream,
                members,
                indexed,
            },
        );
        self.metrics
            .views
            .get_or_create(&self.labels)
            .set(inner.views.len() as i64);
        self.measure(&inner);
        Ok(out)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `document`'s entities grouped by key.
    fn groups<'a>(&self, document: &'a Value) -> Groups<'a> {
        let entities = self
            .settings
            .selector
            .entities(document)
            .map_or(&[][..], Vec::as_slice);
        let mut by_key: HashMap<Arc<str>, Vec<usize>> = HashMap::with_capacity(entities.len());
        for (i, entity) in entities.iter().enumerate() {
            let key = match self.settings.selector.key_of(entity) {
                Some(key) => Arc::from(key),
                None => Arc::from(format!("\u{0}{i}")),
            };
            by_key.entry(key).or_default().push(i);
        }
        Groups { entities, by_key }
    }

    /// The view's document of `document`: its members, in the document's order, projected.
    fn build(
        &self,
        compiled: &Compiled,
        members: &HashSet<Arc<str>>,
        document: &Value,
        groups: &Groups<'_>,
    ) -> Value {
        if self.settings.selector.entities(document).is_none() {
            return document.clone();
        }
        let mut kept: Vec<usize> = Vec::with_capacity(members.len());
        for key in members {
            let Some(indices) = groups.by_key.get(key) else {
                continue;
            };
            if let [one] = indices.as_slice() {
                kept.push(*one);
            } else {
                kept.extend(
                    indices
                        .iter()
                        .copied()
                        .filter(|&i| compiled.matches(&groups.entities[i])),
                );
            }
        }
        kept.sort_unstable();
        let entities = kept
            .into_iter()
            .map(|i| compiled.project(&groups.entities[i]))
            .collect();
        self.settings
            .selector
            .replace_entities(document, Value::Array(entities))
    }

    /// Publishes `document` as view `view`'s state at the source's change `change`.
    fn publish(&self, view: &View, document: Value, change: &Change) -> bool {
        if view.stream.seq() >= change.seq {
            // Created from this very document after the change was committed.
            return false;
        }
        let previous = view.stream.snapshot();
        let prepared = match view.stream.prepare(previous.as_deref(), document) {
            Preparation::Change(prepared) => prepared,
            Preparation::Unchanged | Preparation::Ignored => return false,
        };
        match view
            .stream
            .commit(change.epoch, change.seq, change.at, prepared)
        {
            Ok(Some(_)) => {
                self.metrics.view_changes.get_or_create(&self.labels).inc();
                true
            }
            Ok(None) => false,
            Err(diverged) => {
                tracing::debug!(view = view.stream.name(), %diverged, "view change not applied");
                false
            }
        }
    }

    /// Recomputes every view from `current` (a new epoch, or no previous document to compare
    /// with): `reset` starts each view over (another epoch), else each publishes its change.
    fn recompute_all(&self, inner: &mut Inner, current: &Snapshot, change: Option<&Change>) {
        let groups = self.groups(&current.document);
        for view in inner.views.values_mut() {
            view.members.clear();
            for (key, indices) in &groups.by_key {
                if indices
                    .iter()
                    .any(|&i| view.compiled.matches(&groups.entities[i]))
                {
                    view.members.insert(key.clone());
                }
            }
        }
        for view in inner.views.values() {
            let document = self.build(&view.compiled, &view.members, &current.document, &groups);
            match change {
                Some(change) => {
                    self.publish(view, document, change);
                }
                None => {
                    view.stream
                        .reset(current.epoch, current.seq, document, current.at, Vec::new())
                }
            }
        }
        inner.epoch = current.epoch;
    }

    /// Evicts the views nobody watched for their linger period.
    fn evict_idle(&self, inner: &mut Inner, now: Instant) {
        let linger = self.settings.linger;
        let mut evicted = Vec::new();
        for (id, view) in &inner.views {
            if let Some(since) = view.stream.idle_since()
                && now.saturating_duration_since(since) >= linger
            {
                evicted.push(id.clone());
            }
        }
        for id in evicted {
            if let Some(view) = inner.views.remove(&id) {
                match &view.indexed {
                    Some(alias) => {
                        if let Some(by_value) = inner.index.get_mut(alias) {
                            for ids in by_value.values_mut() {
                                ids.retain(|other| *other != id);
                            }
                            by_value.retain(|_, ids| !ids.is_empty());
                        }
                    }
                    None => inner.scans.retain(|other| *other != id),
                }
                view.stream.close();
                self.snapshots.remove(view.stream.name());
                self.budget.give_back();
                self.metrics
                    .view_evictions
                    .get_or_create(&self.labels)
                    .inc();
            }
        }
        inner.index.retain(|_, by_value| !by_value.is_empty());
        self.metrics
            .views
            .get_or_create(&self.labels)
            .set(inner.views.len() as i64);
    }

    /// Updates the bytes the views hold.
    fn measure(&self, inner: &Inner) {
        let bytes: u64 = inner
            .views
            .values()
            .map(|view| {
                let document = view.stream.snapshot().map_or(0, |s| s.json.len() as u64);
                document + view.stream.history_size().1
            })
            .sum();
        self.metrics
            .view_bytes
            .get_or_create(&self.labels)
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Whether anything outside the entity array changed in a way the stream does not ignore.
    fn rest_changed(&self, previous: &Value, current: &Value) -> bool {
        let selector = &self.settings.selector;
        let empty = Value::Array(Vec::new());
        let before = selector.replace_entities(previous, empty.clone());
        let after = selector.replace_entities(current, empty);
        if before == after {
            return false;
        }
        let patch = diff::diff_json(&before, &after, &self.options.diff);
        patch.operations > 0 && !patch.only_ignored
    }

    /// The views an entity with these versions may concern: those indexed under its alias
    /// values, and those that scan.
    fn candidates(&self, inner: &Inner, versions: &[&Value], out: &mut HashSet<Arc<str>>) {
        for (alias, by_value) in &inner.index {
            let Some(paths) = self.settings.selector.aliases.get(alias) else {
                continue;
            };
            for entity in versions {
                for path in paths {
                    values_at(entity, path.segments(), &mut |v| {
                        if let Some(ids) = by_value.get(&super::select::scalar_text(v)) {
                            out.extend(ids.iter().cloned());
                        }
                    });
                }
            }
        }
        out.extend(inner.scans.iter().cloned());
    }
}

impl Derivation for StreamViews {
    fn changed(
        &self,
        previous: Option<&Arc<Snapshot>>,
        current: &Arc<Snapshot>,
        change: &Arc<Change>,
    ) {
        let mut inner = self.lock();
        self.evict_idle(&mut inner, Instant::now());
        if inner.views.is_empty() {
            inner.epoch = current.epoch;
            return;
        }
        if current.epoch != inner.epoch {
            self.recompute_all(&mut inner, current, None);
            self.measure(&inner);
            return;
        }
        let Some(previous) =
            previous.filter(|p| p.epoch == current.epoch && p.seq + 1 == change.seq)
        else {
            self.recompute_all(&mut inner, current, Some(change));
            self.measure(&inner);
            return;
        };
        let before = self.groups(&previous.document);
        let after = self.groups(&current.document);
        let everything =
            self.rest_changed(&previous.document, &current.document) || reordered(&before, &after);
        let mut affected: HashSet<Arc<str>> = if everything {
            inner.views.keys().cloned().collect()
        } else {
            HashSet::new()
        };
        let changed_keys = before
            .by_key
            .keys()
            .filter(|k| !after.by_key.contains_key(*k))
            .chain(after.by_key.keys())
            .filter(|key| {
                let old = before.by_key.get(*key);
                let new = after.by_key.get(*key);
                match (old, new) {
                    (Some(old), Some(new)) => {
                        old.len() != new.len()
                            || old
                                .iter()
                                .zip(new)
                                .any(|(&a, &b)| !same(&before.entities[a], &after.entities[b]))
                    }
                    _ => true,
                }
            });
        let mut candidates = HashSet::new();
        for key in changed_keys {
            let old: Vec<&Value> = before
                .by_key
                .get(key)
                .map(|g| g.iter().map(|&i| &before.entities[i]).collect())
                .unwrap_or_default();
            let new: Vec<&Value> = after
                .by_key
                .get(key)
                .map(|g| g.iter().map(|&i| &after.entities[i]).collect())
                .unwrap_or_default();
            candidates.clear();
            let versions: Vec<&Value> = old.iter().chain(new.iter()).copied().collect();
            self.candidates(&inner, &versions, &mut candidates);
            for id in &candidates {
                let Some(view) = inner.views.get_mut(id) else {
                    continue;
                };
                let was = view.members.contains(key);
                let now = new.iter().any(|e| view.compiled.matches(e));
                if now {
                    if !was {
                        view.members.insert(key.clone());
                    }
                } else if was {
                    view.members.remove(key);
                }
                if was || now {
                    affected.insert(id.clone());
                }
            }
        }
        for id in &affected {
            if let Some(view) = inner.views.get(id) {
                let document = self.build(&view.compiled, &view.members, &current.document, &after);
                self.publish(view, document, change);
            }
        }
        if !affected.is_empty() {
            self.measure(&inner);
        }
    }

    fn reset(&self, current: &Arc<Snapshot>) {
        let mut inner = self.lock();
        self.recompute_all(&mut inner, current, None);
        self.measure(&inner);
    }

    fn failed(&self, failure: &Arc<UpstreamFailure>) {
        let inner = self.lock();
        for view in inner.views.values() {
            view.stream.fail(
                failure.status,
                failure.cause,
                failure.message.clone(),
                failure.retry_in,
            );
        }
    }

    fn recovered(&self, _recovery: &Arc<Recovery>) {
        let inner = self.lock();
        for view in inner.views.values() {
            view.stream.recover();
        }
    }

    fn kept_alive(&self) {
        let inner = self.lock();
        for view in inner.views.values() {
            view.stream.keep_alive();
        }
    }

    fn closed(&self) {
        let inner = self.lock();
        for view in inner.views.values() {
            view.stream.close();
        }
    }

    fn subscribers(&self) -> usize {
        let inner = self.lock();
        inner
            .views
            .values()
            .map(|view| view.stream.subscriber_count())
            .sum()
    }
}

/// Whether entities present in both documents changed their relative order (a view keeps the
/// source's order, so every view is rebuilt).
fn reordered(before: &Groups<'_>, after: &Groups<'_>) -> bool {
    let order = |groups: &Groups<'_>, other: &Groups<'_>| {
        let mut keyed: Vec<(usize, &Arc<str>)> = groups
            .by_key
            .iter()
            .filter(|(key, _)| other.by_key.contains_key(*key))
            .flat_map(|(key, indices)| indices.iter().map(move |&i| (i, key)))
            .collect();
        keyed.sort_unstable_by_key(|(i, _)| *i);
        keyed
            .into_iter()
            .map(|(_, key)| key.clone())
            .collect::<Vec<_>>()
    };
    order(before, after) != order(after, before)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;
    use serde_json::{Map, json};
    use tokio::sync::broadcast::error::TryRecvError;

    use super::*;
    use crate::diff::{DiffOptions, PathPattern};
    use crate::hub::{Initial, StreamEvent};
    use crate::views::select::Selector;
    use crate::views::spec::{parse_expression, parse_fields};
    use crate::wire::ChangeKind;

    const ROUTES: [&str; 4] = ["R1", "R2", "R3", "R4"];

    fn options() -> StreamOptions {
        StreamOptions {
            history: 1000,
            history_bytes: u64::MAX,
            buffer: 10_000,
            diff: DiffOptions::default(),
        }
    }

    fn settings(linger: std::time::Duration, max_views: usize) -> ViewsSettings {
        let mut aliases = BTreeMap::new();
        aliases.insert(
            "route".to_owned(),
            vec![PathPattern::parse("/route").unwrap()],
        );
        aliases.insert(
            "stop".to_owned(),
            vec![PathPattern::parse("/stops/*/stop_id").unwrap()],
        );
        ViewsSettings {
            selector: Selector {
                entities: vec!["entity".into()],
                key: vec!["id".into()],
                aliases,
            },
            ad_hoc: true,
            max_views,
            linger,
            named: BTreeMap::new(),
        }
    }

    fn source(max_views: usize) -> (Arc<Stream>, Arc<StreamViews>) {
        let snapshots = SnapshotStore::new();
        let stream = Arc::new(Stream::new(
            "s",
            options(),
            snapshots.clone(),
            Arc::new(Metrics::new()),
        ));
        let views = Arc::new(StreamViews::new(
            &stream,
            settings(std::time::Duration::from_secs(60), max_views),
            options(),
            snapshots,
            Budget::new(1000),
        ));
        assert!(stream.derive(views.clone()));
        (stream, views)
    }

    /// A filter as the test writes it: evaluated here, independently of the views' code.
    #[derive(Debug, Clone)]
    struct Filter {
        routes: Option<BTreeSet<&'static str>>,
        stop: Option<&'static str>,
        /// `@.n > k`
        more_than: Option<i64>,
        /// `@.status == 'A'`
        status_a: bool,
        fields: Option<BTreeSet<&'static str>>,
    }

    impl Filter {
        fn query(&self) -> String {
            let mut parts = Vec::new();
            if let Some(routes) = &self.routes {
                parts.push(format!(
                    "route={}",
                    routes.iter().copied().collect::<Vec<_>>().join(",")
                ));
            }
            if let Some(stop) = self.stop {
                parts.push(format!("stop={stop}"));
            }
            let mut expression = Vec::new();
            if let Some(k) = self.more_than {
                expression.push(format!("@.n > {k}"));
            }
            if self.status_a {
                expression.push("@.status == 'A'".to_owned());
            }
            if !expression.is_empty() {
                parts.push(format!("where={}", expression.join(" && ")));
            }
            if let Some(fields) = &self.fields {
                parts.push(format!(
                    "fields={}",
                    fields.iter().copied().collect::<Vec<_>>().join(",")
                ));
            }
            parts.join("&")
        }

        fn spec(&self) -> ViewSpec {
            let mut equals = BTreeMap::new();
            if let Some(routes) = &self.routes {
                equals.insert(
                    "route".to_owned(),
                    routes.iter().map(|r| (*r).to_owned()).collect(),
                );
            }
            if let Some(stop) = self.stop {
                equals.insert("stop".to_owned(), BTreeSet::from([stop.to_owned()]));
            }
            let mut expression = Vec::new();
            if let Some(k) = self.more_than {
                expression.push(format!("@.n > {k}"));
            }
            if self.status_a {
                expression.push("@.status == 'A'".to_owned());
            }
            ViewSpec {
                equals,
                expression: (!expression.is_empty())
                    .then(|| parse_expression(&expression.join(" && ")).unwrap()),
                fields: self.fields.as_ref().map(|f| {
                    parse_fields(&f.iter().copied().collect::<Vec<_>>().join(",")).unwrap()
                }),
            }
        }

        fn keeps(&self, entity: &Value) -> bool {
            let route_ok = self
                .routes
                .as_ref()
                .is_none_or(|routes| entity["route"].as_str().is_some_and(|r| routes.contains(r)));
            let stop_ok = self.stop.is_none_or(|stop| {
                entity["stops"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["stop_id"] == stop))
            });
            let n_ok = self
                .more_than
                .is_none_or(|k| entity["n"].as_i64().is_some_and(|n| n > k));
            let status_ok = !self.status_a || entity["status"] == "A";
            route_ok && stop_ok && n_ok && status_ok
        }

        /// The view of `document`, computed directly.
        fn of(&self, document: &Value) -> Value {
            let mut out = document.clone();
            let kept: Vec<Value> = document["entity"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| self.keeps(e))
                .map(|e| match &self.fields {
                    None => e.clone(),
                    Some(fields) => {
                        let mut projected = Map::new();
                        for field in fields.iter().copied().chain(["id"]) {
                            if let Some(v) = e.get(field) {
                                projected.insert(field.to_owned(), v.clone());
                            }
                        }
                        Value::Object(projected)
                    }
                })
                .collect();
            out["entity"] = Value::Array(kept);
            out
        }
    }

    fn entity() -> impl Strategy<Value = Value> {
        (
            0..12u8,
            0..4usize,
            prop::bool::ANY,
            0..5i64,
            prop::collection::vec(0..4u8, 0..3),
        )
            .prop_map(|(id, route, a, n, stops)| {
                json!({
                    "id": format!("e{id}"),
                    "route": ROUTES[route],
                    "status": if a { "A" } else { "B" },
                    "n": n,
                    "stops": stops.iter().map(|s| json!({"stop_id": format!("s{s}")})).collect::<Vec<_>>(),
                })
            })
    }

    fn document() -> impl Strategy<Value = Value> {
        (0..3u8, prop::collection::vec(entity(), 0..10)).prop_map(|(t, entities)| {
            // Unique ids, in the generated order.
            let mut seen = BTreeSet::new();
            let entities: Vec<Value> = entities
                .into_iter()
                .filter(|e| seen.insert(e["id"].as_str().unwrap_or_default().to_owned()))
                .collect();
            json!({"header": {"t": t}, "entity": entities})
        })
    }

    fn filter() -> impl Strategy<Value = Filter> {
        (
            prop::option::of(prop::collection::btree_set(
                prop::sample::select(&ROUTES[..]),
                1..3,
            )),
            prop::option::of(prop::sample::select(&["s0", "s1", "s2", "s3"][..])),
            prop::option::of(0..4i64),
            prop::bool::weighted(0.3),
            prop::option::of(prop::collection::btree_set(
                prop::sample::select(&["route", "n", "status"][..]),
                1..3,
            )),
        )
            .prop_map(|(routes, stop, more_than, status_a, fields)| Filter {
                routes,
                stop,
                more_than,
                status_a,
                fields,
            })
    }

    /// What a subscriber rebuilds from its events; `None` before any document. Also says
    /// whether any change event arrived.
    fn follow(
        rebuilt: &mut Option<Value>,
        live: &mut tokio::sync::broadcast::Receiver<StreamEvent>,
    ) -> usize {
        let mut changes = 0;
        loop {
            match live.try_recv() {
                Ok(StreamEvent::Change(change, _)) => {
                    changes += 1;
                    match change.kind {
                        ChangeKind::Snapshot => {
                            *rebuilt = Some(serde_json::from_slice(&change.payload).unwrap());
                        }
                        ChangeKind::Patch => {
                            let patch: json_patch::Patch =
                                serde_json::from_slice(&change.payload).unwrap();
                            let document = rebuilt.as_mut().expect("a patch before a document");
                            json_patch::patch(document, &patch).unwrap();
                        }
                    }
                }
                Ok(StreamEvent::Reset(snapshot)) => {
                    *rebuilt = Some(snapshot.document.clone());
                }
                Ok(_) => {}
                Err(TryRecvError::Empty | TryRecvError::Closed) => return changes,
                Err(TryRecvError::Lagged(n)) => panic!("lagged by {n}"),
            }
        }
    }

    fn start(initial: &[Initial]) -> Option<Value> {
        let mut rebuilt = None;
        for event in initial {
            match event {
                Initial::Snapshot(s) => rebuilt = Some(s.document.clone()),
                Initial::Change(c) => match c.kind {
                    ChangeKind::Snapshot => {
                        rebuilt = Some(serde_json::from_slice(&c.payload).unwrap())
                    }
                    ChangeKind::Patch => {
                        let patch: json_patch::Patch = serde_json::from_slice(&c.payload).unwrap();
                        json_patch::patch(rebuilt.as_mut().unwrap(), &patch).unwrap();
                    }
                },
                Initial::Failure(_) => {}
            }
        }
        rebuilt
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// A subscriber of each view rebuilds exactly what filtering and projecting each
        /// upstream document directly gives, gets nothing when its view did not change, and a
        /// subscriber resuming from any of its ids rebuilds the same.
        #[test]
        fn subscribers_of_views_rebuild_the_filtered_documents(
            documents in prop::collection::vec(document(), 1..12),
            filters in prop::collection::vec(filter(), 1..5),
            subscribe_at in 0..12usize,
        ) {
            let (stream, views) = source(100);
            let mut followers = Vec::new();
            let mut published = 0;
            for (i, document) in documents.iter().enumerate() {
                if i == subscribe_at.min(documents.len() - 1) {
                    for filter in &filters {
                        let spec = filter.spec();
                        let id: Arc<str> = Arc::from(spec.ad_hoc_name());
                        let subscription = views.subscribe(&stream, id, spec, &Resume::Fresh).unwrap();
                        let rebuilt = start(&subscription.initial);
                        followers.push((filter.clone(), subscription, rebuilt, Vec::new()));
                    }
                }
                let before: Vec<Option<Value>> = followers.iter().map(|f| f.2.clone()).collect();
                stream.publish(document.clone());
                published += 1;
                for (k, (filter, subscription, rebuilt, ids)) in followers.iter_mut().enumerate() {
                    let changes = follow(rebuilt, &mut subscription.live);
                    let expected = filter.of(document);
                    prop_assert_eq!(rebuilt.as_ref(), Some(&expected), "filter {}", filter.query());
                    if before[k].as_ref() == Some(&expected) {
                        prop_assert_eq!(changes, 0, "an untouched view published, filter {}", filter.query());
                    }
                    ids.push((subscription.stream().name().to_owned(), stream.epoch(), subscription.stream().seq(), expected));
                }
            }
            prop_assert!(published > 0);
            // Resuming from any id a subscriber saw replays exactly to the current view.
            for (filter, subscription, rebuilt, ids) in &followers {
                for (name, epoch, seq, at) in ids {
                    let resumed = subscription.stream().subscribe(&Resume::After(format!("{name}:{epoch}:{seq}")));
                    let mut from = Some(at.clone());
                    let replayed = resumed.initial.iter().all(|i| matches!(i, Initial::Change(_)));
                    prop_assert!(replayed, "a resume within history replays changes, filter {}", filter.query());
                    for event in &resumed.initial {
                        if let Initial::Change(c) = event {
                            match c.kind {
                                ChangeKind::Snapshot => from = Some(serde_json::from_slice(&c.payload).unwrap()),
                                ChangeKind::Patch => {
                                    let patch: json_patch::Patch = serde_json::from_slice(&c.payload).unwrap();
                                    json_patch::patch(from.as_mut().unwrap(), &patch).unwrap();
                                }
                            }
                        }
                    }
                    prop_assert_eq!(&from, rebuilt);
                }
            }
        }
    }

    #[test]
    fn equivalent_filters_share_a_view_and_bounds_hold() {
        let (stream, views) = source(2);
        stream.publish(json!({"entity": [{"id": "a", "route": "R1"}]}));
        let asked =
            |q: &str| match crate::views::spec::parse_query(Some(q), &views.aliases()).unwrap() {
                Asked::AdHoc(spec) => views.resolve(Asked::AdHoc(spec)).unwrap().unwrap(),
                other => panic!("{other:?}"),
            };
        let (a, spec_a) = asked("route=R1,R2");
        let (b, spec_b) = asked("route=R2,R1,R1");
        assert_eq!(a, b);
        let first = views.stream(&stream, a, spec_a).unwrap();
        let second = views.stream(&stream, b, spec_b).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        let (c, spec_c) = asked("route=R3");
        let _held = views.subscribe(&stream, c, spec_c, &Resume::Fresh).unwrap();
        let (d, spec_d) = asked("route=R4");
        let refused = views.stream(&stream, d, spec_d).unwrap_err();
        assert_eq!(refused.status(), 429);
        assert!(
            refused.to_string().contains("at most 2 in this stream"),
            "{refused}"
        );
        assert_eq!(
            first.snapshot().unwrap().document,
            json!({"entity": [{"id": "a", "route": "R1"}]})
        );
    }

    #[test]
    fn an_entity_moving_between_views_is_a_remove_here_and_an_add_there() {
        let (stream, views) = source(10);
        // A header long enough that patches are smaller than the view's document.
        let header = json!({"feed": "x".repeat(200)});
        stream.publish(json!({"header": header, "entity": [{"id": "v1", "route": "R1", "n": 1}, {"id": "v2", "route": "R2", "n": 1}]}));
        let open = |q: &str| {
            let Asked::AdHoc(spec) =
                crate::views::spec::parse_query(Some(q), &views.aliases()).unwrap()
            else {
                panic!()
            };
            let (id, spec) = views.resolve(Asked::AdHoc(spec)).unwrap().unwrap();
            views.subscribe(&stream, id, spec, &Resume::Fresh).unwrap()
        };
        let mut r1 = open("route=R1");
        let mut r2 = open("route=R2");
        stream.publish(json!({"header": header, "entity": [{"id": "v1", "route": "R2", "n": 1}, {"id": "v2", "route": "R2", "n": 1}]}));
        let patch = |live: &mut tokio::sync::broadcast::Receiver<StreamEvent>| match live.try_recv()
        {
            Ok(StreamEvent::Change(change, _)) => {
                serde_json::from_slice::<Value>(&change.payload).unwrap()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(
            patch(&mut r1.live),
            json!([{"op": "remove", "path": "/entity/0"}])
        );
        assert_eq!(
            patch(&mut r2.live),
            json!([{"op": "add", "path": "/entity/0", "value": {"id": "v1", "route": "R2", "n": 1}}])
        );
    }
}
