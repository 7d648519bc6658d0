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

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use super::config::ViewsSettings;
use super::document::ViewDocument;
use super::select::{Compiled, same, values_at};
use super::spec::{Asked, ViewError, ViewSpec, list};
use crate::diff::{self, At, PathPattern, RelativePatch, Segment};
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
    /// The source's `view_changes` counter, looked up once (it is counted per view change).
    view_changes: prometheus_client::metrics::counter::Counter,
    budget: Arc<Budget>,
    /// Whether a view's patch can be made of its entities' own diffs: no key or ignore pattern
    /// tells one entity's index from another's, or covers whole entities (else every touched
    /// view is rebuilt and diffed whole).
    incremental: bool,
    /// The entity array's JSON Pointer, JSON-escaped (a view's entity paths start with it).
    entities_pointer: String,
    /// View changes derived from the entities' own diffs, and those rebuilt and diffed whole
    /// (a reorder, duplicate or missing keys, a new epoch, a view not in sync), one per view
    /// a source change touched.
    derived: AtomicU64,
    rebuilt: AtomicU64,
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
    /// The distinct projections (`fields=`) of the views: views sharing one share the
    /// entities' diffs of a change.
    projections: Vec<Option<Vec<Vec<String>>>>,
    /// The source's document outside its entities at its epoch and sequence number, as last
    /// derived (what views that published then hold).
    rest: Option<(u64, u64, Arc<Value>)>,
    /// The bytes the views hold, the sum of their [`View::measured`].
    bytes: u64,
    /// When a change next looks for idle views (see [`StreamViews::sweep`]).
    next_sweep: Instant,
    /// The source's entities by key at an epoch and sequence number, as last derived: the
    /// next change's `before` (see [`Groups`]).
    groups: Option<KeptGroups>,
}

/// [`Groups`] of the source's document at an epoch and sequence number, without the document.
struct KeptGroups {
    epoch: u64,
    seq: u64,
    by_key: HashMap<Arc<str>, Vec<usize>>,
    unique: bool,
}

struct View {
    compiled: Compiled,
    stream: Arc<Stream>,
    /// The view's document, built when someone needs it.
    document: Arc<ViewDocument>,
    /// Keys of the source's entities the view keeps.
    members: HashSet<Arc<str>>,
    /// The alias the view is indexed under, if any.
    indexed: Option<String>,
    /// Whether the index alone decides what the view keeps (its one filter is that equality):
    /// an entity is kept when its values pick the view there.
    decided: bool,
    /// Index of the view's projection in `Inner::projections`.
    projection: usize,
    /// Whether the fields below describe the view's document, so its next patch can be
    /// derived from the entities' diffs (else it is rebuilt and diffed whole, which syncs them).
    synced: bool,
    /// The keys of the view's entities, in its document's (the source's) order.
    order: Vec<Arc<str>>,
    /// The source's document outside its entities, as the view last published it.
    rest: Arc<Value>,
    /// Its JSON length.
    rest_len: usize,
    /// Entities the view shows at an older version than the source's (only ignored paths of
    /// them changed, and nothing else in the view): that version. They ride along with the
    /// view's next published change, as they would in a diff of its whole document.
    stale: HashMap<Arc<str>, Arc<Value>>,
    /// The length of the view's document's JSON.
    json_len: usize,
    /// The bytes the view held when last measured (after its last change): its document's
    /// JSON and its history.
    measured: u64,
}

/// An entity a change touches in a view: its key, whether the view held it, whether it does.
type Touched = (Arc<str>, bool, bool);

/// A document's entities grouped by key (an entity without one is keyed by its position).
struct Groups<'a> {
    entities: &'a [Value],
    by_key: HashMap<Arc<str>, Vec<usize>>,
    /// The document has its entity array, and every entity a key of its own.
    unique: bool,
}

impl Groups<'_> {
    /// The position of the entity with `key` (for unique groups).
    fn position(&self, key: &str) -> usize {
        self.by_key
            .get(key)
            .and_then(|g| g.first())
            .copied()
            .unwrap_or(usize::MAX)
    }

    fn entity(&self, key: &str) -> Option<&Value> {
        self.by_key
            .get(key)
            .and_then(|g| g.first())
            .map(|&i| &self.entities[i])
    }
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
        let incremental = incremental_safe(&settings.selector.entities, &options.diff);
        let entities_pointer = {
            let mut pointer = String::new();
            for token in &settings.selector.entities {
                pointer.push('/');
                pointer.push_str(&token.replace('~', "~0").replace('/', "~1"));
            }
            let quoted = serde_json::to_string(&pointer).unwrap_or_default();
            quoted
                .strip_prefix('"')
                .and_then(|q| q.strip_suffix('"'))
                .unwrap_or_default()
                .to_owned()
        };
        StreamViews {
            source: Arc::from(source.name()),
            incremental,
            entities_pointer,
            derived: AtomicU64::new(0),
            rebuilt: AtomicU64::new(0),
            settings,
            named_canonical,
            options,
            snapshots,
            view_changes: source
                .metrics()
                .view_changes
                .get_or_create(source.labels())
                .clone(),
            metrics: source.metrics().clone(),
            labels: source.labels().clone(),
            budget,
            inner: Mutex::new(Inner {
                epoch: source.epoch(),
                views: HashMap::new(),
                index: HashMap::new(),
                scans: Vec::new(),
                projections: Vec::new(),
                rest: None,
                bytes: 0,
                next_sweep: Instant::now(),
                groups: None,
            }),
        }
    }

    /// View changes derived from the entities' own diffs, and view changes rebuilt and diffed
    /// whole (one per view a source change touched).
    pub fn derivations(&self) -> (u64, u64) {
        (
            self.derived.load(Ordering::Relaxed),
            self.rebuilt.load(Ordering::Relaxed),
        )
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
        let resolved = self.settings.resolve_with(asked, |canonical| {
            self.named_canonical.get(canonical).map(String::as_str)
        })?;
        Ok(resolved.map(|(id, spec)| (Arc::from(id), spec)))
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
                scope: self.settings.max_views_key,
            });
        }
        if !self.budget.take() {
            return Err(ViewError::TooMany {
                max: self.budget.max,
                scope: "the server (views.max_total)",
            });
        }
        let compiled = self.settings.selector.compile(spec);
        let projection = projection_of(&mut inner.projections, &compiled);
        let current = self.snapshots.get(&self.source);
        let document = ViewDocument::new();
        let mut view = View {
            compiled,
            stream: Arc::new(
                Stream::lazy(
                    &format!("{}@{id}", self.source),
                    self.options.clone(),
                    self.snapshots.clone(),
                    self.metrics.clone(),
                    self.labels.clone(),
                    current.as_ref().map_or(source_epoch, |c| c.epoch),
                    current.as_ref().map_or(0, |c| c.seq),
                    current.as_ref().map(|c| c.at),
                    document.clone(),
                )
                .delivering_for(source),
            ),
            document,
            members: HashSet::new(),
            indexed: None,
            decided: false,
            projection,
            synced: false,
            order: Vec::new(),
            rest: Arc::new(Value::Null),
            rest_len: 0,
            stale: HashMap::new(),
            json_len: 0,
            measured: 0,
        };
        if let Some(current) = &current {
            let groups = self.groups(&current.document);
            for (key, indices) in &groups.by_key {
                if indices
                    .iter()
                    .any(|&i| view.compiled.matches(&groups.entities[i]))
                {
                    view.members.insert(key.clone());
                }
            }
            let (document, order) =
                self.build(&view.compiled, &view.members, &current.document, &groups);
            let snapshot = Arc::new(Snapshot::taken_at(
                current.epoch,
                current.seq,
                document,
                current.at,
            ));
            view.document.lock().reset(&snapshot);
            let rest = self.rest_at(&mut inner, current);
            view.sync(order, rest, snapshot.json.len(), groups.unique);
        }
        let epoch = current.as_ref().map_or(source_epoch, |c| c.epoch);
        inner.epoch = epoch;
        view.indexed = view.compiled.equalities().next().map(|(alias, values)| {
            let by_value = inner.index.entry(alias.clone()).or_default();
            for value in values {
                by_value.entry(value.clone()).or_default().push(id.clone());
            }
            alias.clone()
        });
        view.decided = view.indexed.is_some() && view.compiled.one_equality();
        if view.indexed.is_none() {
            inner.scans.push(id.clone());
        }
        let out = f(&view.stream);
        inner.views.insert(id.clone(), view);
        inner.remeasure(&id);
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

    /// [`Self::groups`] of `at`'s document, kept from the change that made it current.
    fn groups_at<'a>(&self, inner: &mut Inner, at: &'a Snapshot) -> Groups<'a> {
        let entities = self.settings.selector.entities(&at.document);
        match inner.groups.take() {
            Some(KeptGroups {
                epoch,
                seq,
                by_key,
                unique,
            }) if (epoch, seq) == (at.epoch, at.seq)
                && entities.map_or(0, Vec::len) == by_key.values().map(Vec::len).sum::<usize>() =>
            {
                Groups {
                    entities: entities.map_or(&[][..], Vec::as_slice),
                    by_key,
                    unique,
                }
            }
            _ => self.groups(&at.document),
        }
    }

    /// `document`'s entities grouped by key.
    fn groups<'a>(&self, document: &'a Value) -> Groups<'a> {
        let found = self.settings.selector.entities(document);
        let entities = found.map_or(&[][..], Vec::as_slice);
        let mut unique = found.is_some();
        let mut by_key: HashMap<Arc<str>, Vec<usize>> = HashMap::with_capacity(entities.len());
        for (i, entity) in entities.iter().enumerate() {
            let key = match self.settings.selector.key_of(entity) {
                Some(key) => Arc::from(key),
                None => {
                    unique = false;
                    Arc::from(format!("\u{0}{i}"))
                }
            };
            let group = by_key.entry(key).or_default();
            group.push(i);
            unique &= group.len() == 1;
        }
        Groups {
            entities,
            by_key,
            unique,
        }
    }

    /// The view's document of `document`: its members, in the document's order, projected;
    /// and their keys in that order.
    fn build(
        &self,
        compiled: &Compiled,
        members: &HashSet<Arc<str>>,
        document: &Value,
        groups: &Groups<'_>,
    ) -> (Value, Vec<Arc<str>>) {
        if self.settings.selector.entities(document).is_none() {
            return (document.clone(), Vec::new());
        }
        let mut kept: Vec<(usize, &Arc<str>)> = Vec::with_capacity(members.len());
        for key in members {
            let Some((key, indices)) = groups.by_key.get_key_value(key) else {
                continue;
            };
            if let [one] = indices.as_slice() {
                kept.push((*one, key));
            } else {
                kept.extend(
                    indices
                        .iter()
                        .copied()
                        .filter(|&i| compiled.matches(&groups.entities[i]))
                        .map(|i| (i, key)),
                );
            }
        }
        kept.sort_unstable_by_key(|(i, _)| *i);
        let entities = kept
            .iter()
            .map(|(i, _)| compiled.project(&groups.entities[*i]))
            .collect();
        let order = kept.into_iter().map(|(_, key)| key.clone()).collect();
        (
            self.settings
                .selector
                .replace_entities(document, Value::Array(entities)),
            order,
        )
    }

    /// The source's document outside its entities (an empty array in their place).
    fn rest_of(&self, document: &Value) -> Value {
        self.settings
            .selector
            .replace_entities(document, Value::Array(Vec::new()))
    }

    /// [`Self::rest_of`] the source's document `at`, shared with the views that hold it.
    fn rest_at(&self, inner: &mut Inner, at: &Snapshot) -> Arc<Value> {
        if let Some((epoch, seq, rest)) = &inner.rest
            && (*epoch, *seq) == (at.epoch, at.seq)
        {
            return rest.clone();
        }
        let rest = Arc::new(self.rest_of(&at.document));
        inner.rest = Some((at.epoch, at.seq, rest.clone()));
        rest
    }

    /// Publishes `document` (with its entities' keys, `order`) as view `view`'s state at the
    /// source's change `change`, diffed against the view's whole current document; `rest` is
    /// the source's document outside its entities then, and `unique` whether its entities all
    /// have keys of their own (else the view stays rebuilt whole).
    fn publish_rebuilt(
        &self,
        view: &mut View,
        (document, order): (Value, Vec<Arc<str>>),
        rest: &Arc<Value>,
        unique: bool,
        change: &Change,
    ) -> bool {
        if view.stream.seq() >= change.seq {
            // Created from this very document after the change was committed.
            return false;
        }
        let kept = view.document.clone();
        let mut held = kept.lock();
        let previous = held.current();
        let prepared = match view.stream.prepare(previous.as_deref(), document) {
            Preparation::Change(prepared) => prepared,
            Preparation::Unchanged => {
                let json_len = view.json_len;
                view.sync(order, rest.clone(), json_len, unique);
                return false;
            }
            Preparation::Ignored => {
                // The view keeps its document, older than the source's in ignored paths only.
                view.synced = false;
                return false;
            }
        };
        let json_len = prepared.json.len();
        let snapshot = Arc::new(Snapshot::with_json(
            change.epoch,
            change.seq,
            prepared.document,
            prepared.json,
            change.at,
        ));
        let as_snapshot =
            (prepared.kind == crate::wire::ChangeKind::Snapshot).then(|| snapshot.clone());
        match view.stream.append(
            change.epoch,
            change.seq,
            change.at,
            prepared.payload,
            as_snapshot,
        ) {
            Ok(Some(_)) => {
                held.reset(&snapshot);
                drop(held);
                view.sync(order, rest.clone(), json_len, unique);
                self.view_changes.inc();
                true
            }
            Ok(None) => false,
            Err(diverged) => {
                tracing::debug!(view = view.stream.name(), %diverged, "view change not applied");
                view.synced = false;
                false
            }
        }
    }

    /// Publishes view `view`'s change at the source's change `change` made of the diffs of
    /// the entities that left, entered or changed in it (`touched`: key, was a member, is
    /// one), each under its index in the view, and of the rest of the document: no document
    /// of the view is built or diffed. Whether it published; `None` when the view's state does
    /// not match the change (it must be rebuilt).
    fn publish_derived(
        &self,
        view: &mut View,
        touched: &[Touched],
        reorder: bool,
        deltas: &mut Deltas<'_>,
        change: &Change,
    ) -> Option<bool> {
        if view.stream.seq() >= change.seq {
            return Some(false);
        }
        // Entities this view shows older than the source ride along with its change.
        let mut entries: Cow<'_, [Touched]> = Cow::Borrowed(touched);
        if !view.stale.is_empty() {
            let seen: HashSet<&str> = touched.iter().map(|(k, _, _)| &**k).collect();
            let stale: Vec<Touched> = view
                .stale
                .keys()
                .filter(|k| !seen.contains(&***k))
                .map(|k| (k.clone(), true, true))
                .collect();
            entries.to_mut().extend(stale);
        }
        let before = deltas.before;
        let after = deltas.after;
        // The source reordered its entities: those of the view that are no longer in the
        // source's relative order leave and enter again at their new index.
        let moved = if reorder {
            let moved = misplaced(view, &entries, after)?;
            if !moved.is_empty() {
                let seen: HashSet<&str> = entries.iter().map(|(k, _, _)| &**k).collect();
                let untouched: Vec<Touched> = moved
                    .iter()
                    .filter(|k| !seen.contains(&***k))
                    .map(|k| (k.clone(), true, true))
                    .collect();
                entries.to_mut().extend(untouched);
            }
            moved
        } else {
            HashSet::new()
        };
        // Written into the change's scratch buffer (grown once for every view), then copied to
        // a buffer of its exact size.
        let mut json = std::mem::take(&mut deltas.scratch);
        json.clear();
        json.push(b'[');
        let mut operations = 0usize;
        let mut only_ignored = true;
        let mut json_len = view.json_len;
        let separate = |json: &mut Vec<u8>| {
            if json.len() > 1 {
                json.push(b',');
            }
        };
        // Removals, highest index first, so each index holds as the previous ones applied.
        let mut leaving: Vec<(usize, &Arc<str>)> = entries
            .iter()
            .filter(|(key, was, now)| *was && (!*now || moved.contains(key)))
            .map(|(key, _, _)| {
                let at = before.position(key);
                (view.order.partition_point(|k| before.position(k) < at), key)
            })
            .collect();
        leaving.sort_unstable_by_key(|(index, _)| std::cmp::Reverse(*index));
        for (index, key) in leaving {
            if view.order.get(index) != Some(key) {
                view.synced = false;
                return None;
            }
            separate(&mut json);
            json.extend_from_slice(b"{\"op\":\"remove\",\"path\":\"");
            self.entity_pointer(&mut json, index);
            json.extend_from_slice(b"\"}");
            view.order.remove(index);
            let old_len = match view.stale.remove(key) {
                Some(stale) => deltas.projected_len(&stale, view),
                None => deltas.old_len(key, view),
            };
            json_len = json_len.saturating_sub(old_len + usize::from(!view.order.is_empty()));
            operations += 1;
            only_ignored = false;
        }
        // Insertions, lowest final index first.
        let mut entering: Vec<(usize, &Arc<str>)> = entries
            .iter()
            .filter(|(key, was, now)| *now && (!*was || moved.contains(key)))
            .map(|(key, _, _)| (after.position(key), key))
            .collect();
        entering.sort_unstable();
        for (at, key) in entering {
            let index = view.order.partition_point(|k| after.position(k) < at);
            let value = deltas.added(key, view);
            json.reserve(value.len() + self.entities_pointer.len() + 40);
            separate(&mut json);
            json.extend_from_slice(b"{\"op\":\"add\",\"path\":\"");
            self.entity_pointer(&mut json, index);
            json.extend_from_slice(b"\",\"value\":");
            json.extend_from_slice(&value);
            json.push(b'}');
            json_len += value.len() + usize::from(!view.order.is_empty());
            view.order.insert(index, key.clone());
            operations += 1;
            only_ignored = false;
        }
        // Changes inside entities that stay, at their final index.
        let mut staying: Vec<(usize, &Arc<str>)> = entries
            .iter()
            .filter(|(key, was, now)| *was && *now && !moved.contains(key))
            .map(|(key, _, _)| (after.position(key), key))
            .collect();
        staying.sort_unstable();
        let mut changed_here: Vec<&Arc<str>> = Vec::new();
        let mut prefix = Vec::with_capacity(self.entities_pointer.len() + 8);
        for (at, key) in staying {
            let index = index_in(&view.order, key, |k| after.position(k) < at);
            if view.order.get(index) != Some(key) {
                view.synced = false;
                return None;
            }
            let fresh;
            let delta: &Delta = match view.stale.get(key) {
                Some(stale) => {
                    fresh = deltas.from(stale, key, view);
                    &fresh
                }
                None => deltas.change(key, view),
            };
            if delta.patch.operations == 0 {
                continue;
            }
            prefix.clear();
            self.entity_pointer(&mut prefix, index);
            json.reserve(delta.patch.json.len() + delta.patch.pointers.len() * prefix.len() + 2);
            separate(&mut json);
            let mut copied = 0;
            for &at in &delta.patch.pointers {
                json.extend_from_slice(&delta.patch.json[copied..at]);
                json.extend_from_slice(&prefix);
                copied = at;
            }
            json.extend_from_slice(&delta.patch.json[copied..]);
            json_len = (json_len + delta.new_len).saturating_sub(delta.old_len);
            operations += delta.patch.operations;
            only_ignored &= delta.patch.only_ignored;
            changed_here.push(key);
        }
        // The rest of the document.
        let rest = deltas.rest(&view.rest);
        if rest.operations > 0 {
            separate(&mut json);
            json.extend_from_slice(&rest.json[1..rest.json.len() - 1]);
            operations += rest.operations;
            only_ignored &= rest.only_ignored;
            json_len = (json_len + deltas.rest_len).saturating_sub(view.rest_len);
        }
        json.push(b']');
        if operations == 0 {
            deltas.scratch = json;
            return Some(false);
        }
        if only_ignored {
            // Nothing published: the view shows these entities (and the rest) as they were.
            for key in changed_here {
                if !view.stale.contains_key(key)
                    && let Some(old) = deltas.old_version(key)
                {
                    view.stale.insert(key.clone(), old);
                }
            }
            deltas.scratch = json;
            return Some(false);
        }
        let as_snapshot = diff::prefer_snapshot(json.len(), json_len, &self.options.diff);
        let payload = if as_snapshot {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&json)
        };
        deltas.scratch = json;
        let document = view.document.clone();
        let mut held = document.lock();
        let appended = if as_snapshot {
            // After this change the view shows every entity it keeps and the rest as the
            // source has them now (entities it showed older ride along): its document's JSON
            // is spliced from the entities' JSON, written once per change and projection for
            // every view that shows them, into the rest's; no tree is built until someone
            // needs the document.
            match deltas.snapshot_json(&view.order, view) {
                Some(json) => {
                    json_len = json.len();
                    let result = view.stream.append_snapshot_json(
                        change.epoch,
                        change.seq,
                        change.at,
                        json.clone(),
                    );
                    if matches!(result, Ok(Some(_))) {
                        held.reset_json(change.epoch, change.seq, change.at, json);
                    }
                    result
                }
                None => {
                    let (document, _order) =
                        self.build(&view.compiled, &view.members, deltas.current, after);
                    let snapshot = Arc::new(Snapshot::taken_at(
                        change.epoch,
                        change.seq,
                        document,
                        change.at,
                    ));
                    json_len = snapshot.json.len();
                    let result = view.stream.append(
                        change.epoch,
                        change.seq,
                        change.at,
                        snapshot.json.clone(),
                        Some(snapshot.clone()),
                    );
                    if matches!(result, Ok(Some(_))) {
                        held.reset(&snapshot);
                    }
                    result
                }
            }
        } else {
            let result =
                view.stream
                    .append(change.epoch, change.seq, change.at, payload.clone(), None);
            if matches!(result, Ok(Some(_))) {
                held.patched(change.epoch, change.seq, change.at, payload, json_len);
                if held.heavy() {
                    // As above: the source's document has the view's as it is now.
                    match deltas.snapshot_json(&view.order, view) {
                        Some(json) => held.rebase_json(json),
                        None => {
                            let (document, _order) =
                                self.build(&view.compiled, &view.members, deltas.current, after);
                            held.rebase(document);
                        }
                    }
                }
            }
            result
        };
        drop(held);
        match appended {
            Ok(Some(_)) => {
                view.json_len = json_len;
                view.rest = deltas.rest_cur.clone();
                view.rest_len = deltas.rest_len;
                view.stale.clear();
                self.view_changes.inc();
                Some(true)
            }
            Ok(None) => {
                view.synced = false;
                Some(false)
            }
            Err(diverged) => {
                tracing::debug!(view = view.stream.name(), %diverged, "view change not applied");
                view.synced = false;
                Some(false)
            }
        }
    }

    /// Appends the JSON-escaped pointer of the view's entity at `index`.
    fn entity_pointer(&self, out: &mut Vec<u8>, index: usize) {
        use std::io::Write as _;
        out.extend_from_slice(self.entities_pointer.as_bytes());
        // Writing to a Vec cannot fail.
        let _ = write!(out, "/{index}");
    }

    /// Recomputes every view from `current` (a new epoch, or no previous document to compare
    /// with): `reset` starts each view over (another epoch), else each publishes its change.
    fn recompute_all(&self, inner: &mut Inner, current: &Snapshot, change: Option<&Change>) {
        self.rebuilt
            .fetch_add(inner.views.len() as u64, Ordering::Relaxed);
        let groups = self.groups(&current.document);
        let rest = self.rest_at(inner, current);
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
        for view in inner.views.values_mut() {
            let built = self.build(&view.compiled, &view.members, &current.document, &groups);
            match change {
                Some(change) => {
                    self.publish_rebuilt(view, built, &rest, groups.unique, change);
                }
                None => {
                    let (document, order) = built;
                    let snapshot = Arc::new(Snapshot::taken_at(
                        current.epoch,
                        current.seq,
                        document,
                        current.at,
                    ));
                    let held_document = view.document.clone();
                    let mut held = held_document.lock();
                    held.reset(&snapshot);
                    view.stream.reset_to(snapshot.clone(), Vec::new());
                    drop(held);
                    view.sync(order, rest.clone(), snapshot.json.len(), groups.unique);
                }
            }
        }
        inner.epoch = current.epoch;
        let ids: Vec<Arc<str>> = inner.views.keys().cloned().collect();
        for id in &ids {
            inner.remeasure(id);
        }
    }

    /// Evicts idle views at most every eighth of the linger period (from 10 ms to 1 s): looking
    /// costs a lock of every view's stream, too much for every change of a stream with
    /// thousands of views, and a view lingers at most that much longer.
    fn sweep(&self, inner: &mut Inner, now: Instant) {
        if now < inner.next_sweep {
            return;
        }
        self.evict_idle(inner, now);
        let every =
            (self.settings.linger / 8).clamp(Duration::from_millis(10), Duration::from_secs(1));
        inner.next_sweep = now + every;
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
                inner.bytes = inner.bytes.saturating_sub(view.measured);
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

    /// Sets the gauge of the bytes the views hold (each view measured after its own changes,
    /// not every view after every change).
    fn measure(&self, inner: &Inner) {
        self.metrics
            .view_bytes
            .get_or_create(&self.labels)
            .set(i64::try_from(inner.bytes).unwrap_or(i64::MAX));
    }

    /// The views an entity with these versions may concern: those indexed under its alias
    /// values, and those that scan.
    fn candidates(&self, inner: &Inner, versions: &[&Value], out: &mut HashSet<Arc<str>>) {
        if versions.is_empty() {
            return;
        }
        for (alias, by_value) in &inner.index {
            let Some(paths) = self.settings.selector.aliases.get(alias) else {
                continue;
            };
            for entity in versions {
                for path in paths {
                    values_at(entity, path.segments(), &mut |v| {
                        if let Some(ids) = by_value.get(&*super::select::scalar_str(v)) {
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
    fn entities(&self) -> Option<&[String]> {
        // What the source learns of its entities serves derived changes, with views to derive.
        (self.incremental && !self.lock().views.is_empty())
            .then_some(self.settings.selector.entities.as_slice())
    }

    fn changed(
        &self,
        previous: Option<&Arc<Snapshot>>,
        current: &Arc<Snapshot>,
        change: &Arc<Change>,
        split: Option<&diff::Split>,
    ) {
        let mut inner = self.lock();
        self.sweep(&mut inner, Instant::now());
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
        let before = self.groups_at(&mut inner, previous);
        let after = self.groups(&current.document);
        let rest_prev = self.rest_at(&mut inner, previous);
        let rest_cur = self.rest_at(&mut inner, current);
        let rest_patch = Arc::new(diff::diff_json(&rest_prev, &rest_cur, &self.options.diff));
        let reorder = reordered(&before, &after);
        let incremental = self.incremental && before.unique && after.unique;
        let split = split.filter(|_| incremental);
        let compared = |key: &str| paired(split, before.position(key), after.position(key));
        let everything = (rest_patch.operations > 0 && !rest_patch.only_ignored) || reorder;
        // View → the entities it lost, gained or holds that changed: (key, was, is).
        let mut affected: HashMap<Arc<str>, Vec<Touched>> = if everything {
            inner
                .views
                .keys()
                .map(|id| (id.clone(), Vec::new()))
                .collect()
        } else {
            HashMap::new()
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
                    (Some(_), Some(_)) if let Some(relative) = compared(key) => relative.is_some(),
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
        let mut kept_by = HashSet::new();
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
            kept_by.clear();
            // The views the new versions' values pick keep the entity if that one equality is
            // all they filter on; those the old versions' pick may lose it.
            self.candidates(&inner, &new, &mut kept_by);
            candidates.extend(kept_by.iter().cloned());
            self.candidates(&inner, &old, &mut candidates);
            for id in &candidates {
                let Some(view) = inner.views.get_mut(id) else {
                    continue;
                };
                let was = view.members.contains(key);
                let now = if view.decided {
                    kept_by.contains(id)
                } else {
                    new.iter().any(|e| view.compiled.matches(e))
                };
                if now {
                    if !was {
                        view.members.insert(key.clone());
                    }
                } else if was {
                    view.members.remove(key);
                }
                if was || now {
                    affected
                        .entry(id.clone())
                        .or_default()
                        .push((key.clone(), was, now));
                }
            }
        }
        if affected.is_empty() {
            inner.keep_groups(current, after);
            return;
        }
        let mut deltas = Deltas {
            current: &current.document,
            previous_snapshot: previous,
            current_snapshot: current,
            split,
            before: &before,
            after: &after,
            options: &self.options.diff,
            prefix: self
                .settings
                .selector
                .entities
                .iter()
                .map(|t| At::Key(t.as_str()))
                .collect(),
            changes: HashMap::new(),
            added: HashMap::new(),
            old_lens: HashMap::new(),
            old_versions: HashMap::new(),
            rest_prev: rest_prev.clone(),
            rest_cur: rest_cur.clone(),
            rest_patch,
            rest_len: diff::json_len(&rest_cur),
            rests: HashMap::new(),
            scratch: Vec::new(),
            template: None,
            selector: &self.settings.selector,
        };
        // In the order of the views' ids, so every node computes the same events.
        let mut affected: Vec<_> = affected.into_iter().collect();
        affected.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (id, touched) in &affected {
            let Some(view) = inner.views.get_mut(id) else {
                continue;
            };
            let published = if incremental
                && view.synced
                && let Some(published) =
                    self.publish_derived(view, touched, reorder, &mut deltas, change)
            {
                self.derived.fetch_add(1, Ordering::Relaxed);
                published
            } else {
                self.rebuilt.fetch_add(1, Ordering::Relaxed);
                let built = self.build(&view.compiled, &view.members, &current.document, &after);
                self.publish_rebuilt(view, built, &rest_cur, after.unique, change)
            };
            if published {
                inner.remeasure(id);
            }
        }
        drop(deltas);
        inner.keep_groups(current, after);
        self.measure(&inner);
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
        // The views end with their source: their share of `views.max_total` and their
        // snapshots are given back (a dynamic stream's views are closed on every eviction).
        let mut inner = self.lock();
        for (_, view) in inner.views.drain() {
            view.stream.close();
            self.snapshots.remove(view.stream.name());
            self.budget.give_back();
        }
        inner.index.clear();
        inner.scans.clear();
        inner.bytes = 0;
        self.metrics.views.get_or_create(&self.labels).set(0);
        self.metrics.view_bytes.get_or_create(&self.labels).set(0);
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

impl Inner {
    /// Keeps `groups` of `at`'s document for the next change (see [`StreamViews::groups_at`]).
    fn keep_groups(&mut self, at: &Snapshot, groups: Groups<'_>) {
        self.groups = Some(KeptGroups {
            epoch: at.epoch,
            seq: at.seq,
            by_key: groups.by_key,
            unique: groups.unique,
        });
    }

    /// Measures view `id` again (after a change of it): what it holds now replaces what it
    /// held in [`Inner::bytes`].
    fn remeasure(&mut self, id: &str) {
        if let Some(view) = self.views.get_mut(id) {
            let now = view.json_len as u64 + view.stream.history_size().1;
            let was = std::mem::replace(&mut view.measured, now);
            self.bytes = self.bytes.saturating_sub(was) + now;
        }
    }
}

impl View {
    /// The view's document is the rebuilt one: its entities' keys in order, the source's rest
    /// then, its JSON length; derived patches may follow if every entity has a key of its own.
    fn sync(&mut self, order: Vec<Arc<str>>, rest: Arc<Value>, json_len: usize, unique: bool) {
        self.order = order;
        self.rest_len = diff::json_len(&rest);
        self.rest = rest;
        self.stale.clear();
        self.json_len = json_len;
        self.synced = unique;
    }
}

/// An entity's change as a view with some projection sees it.
struct Delta {
    /// Its operations, relative to the entity.
    patch: RelativePatch,
    /// The JSON lengths of the (projected) entity before and after.
    old_len: usize,
    new_len: usize,
}

/// What one source change does to its entities, computed once and shared by every view it
/// touches (per projection).
struct Deltas<'a> {
    /// The source's document after the change.
    current: &'a Value,
    /// The source's snapshots before and after: where its entities lie in their JSON, when
    /// they know it (see [`Snapshot::entity_json`]).
    previous_snapshot: &'a Snapshot,
    current_snapshot: &'a Snapshot,
    /// How the source's diff compared each entity, when it computed the change itself.
    split: Option<&'a diff::Split>,
    before: &'a Groups<'a>,
    after: &'a Groups<'a>,
    options: &'a diff::DiffOptions,
    /// The entity array's path.
    prefix: Vec<At<'a>>,
    /// (the entity's index after the change, projection) → the entity's change.
    changes: HashMap<(usize, usize), Delta>,
    /// (the entity's index after the change, projection) → its (projected) JSON then.
    added: HashMap<(usize, usize), Bytes>,
    /// (the entity's index before the change, projection) → its (projected) JSON's length
    /// then.
    old_lens: HashMap<(usize, usize), usize>,
    /// Entities as they were before the change, for views that leave them stale.
    old_versions: HashMap<Arc<str>, Arc<Value>>,
    /// The rest of the source's document before and after, and the diff between them.
    rest_prev: Arc<Value>,
    rest_cur: Arc<Value>,
    rest_patch: Arc<diff::PatchJson>,
    rest_len: usize,
    /// The rest's diff from older rests views still show, by the rest's address.
    rests: HashMap<usize, Arc<diff::PatchJson>>,
    /// The JSON of the current rest with the entities' place marked (the JSON, and where the
    /// entities go), once asked; `None` inside when there is no entity array.
    template: Option<Option<(Vec<u8>, usize, usize)>>,
    /// The entity selector, to mark the entities' place in the rest.
    selector: &'a super::select::Selector,
    /// Where a view's patch is written before it is copied out.
    scratch: Vec<u8>,
}

/// Stands in the rest's JSON for a view's entities while its snapshot's JSON is spliced.
const ENTITIES_MARK: &str = "\u{1}patchwire:view-entities\u{1}";

impl Deltas<'_> {
    /// The change of the entity with `key` in `view`'s projection.
    fn change(&mut self, key: &Arc<str>, view: &View) -> &Delta {
        let (before, after) = (self.before, self.after);
        let (i, j) = (before.position(key), after.position(key));
        let (options, prefix) = (self.options, &self.prefix);
        let (previous, current, split) =
            (self.previous_snapshot, self.current_snapshot, self.split);
        self.changes.entry((j, view.projection)).or_insert_with(|| {
            match (before.entity(key), after.entity(key)) {
                (Some(old), Some(new)) => match paired(split, i, j) {
                    // The whole entity: its diff is the source's own, its lengths are where it
                    // lies in the JSON.
                    Some(relative) if !view.compiled.projects() => Delta {
                        patch: relative.cloned().unwrap_or_else(diff::RelativePatch::empty),
                        old_len: previous
                            .entity_json_len(i)
                            .unwrap_or_else(|| diff::json_len(old)),
                        new_len: current
                            .entity_json_len(j)
                            .unwrap_or_else(|| diff::json_len(new)),
                    },
                    _ => delta(old, new, j, view, prefix, options),
                },
                _ => Delta {
                    patch: diff::RelativePatch::empty(),
                    old_len: 0,
                    new_len: 0,
                },
            }
        })
    }

    /// The change of the entity with `key` from `stale`, the version `view` shows.
    fn from(&self, stale: &Value, key: &Arc<str>, view: &View) -> Delta {
        let at = self.after.position(key);
        match self.after.entity(key) {
            Some(new) => delta(stale, new, at, view, &self.prefix, self.options),
            None => Delta {
                patch: diff::RelativePatch::empty(),
                old_len: 0,
                new_len: 0,
            },
        }
    }

    /// The (projected) JSON of the entity with `key` after the change.
    fn added(&mut self, key: &Arc<str>, view: &View) -> Bytes {
        let (after, current) = (self.after, self.current_snapshot);
        let at = after.position(key);
        self.added
            .entry((at, view.projection))
            .or_insert_with(|| {
                if !view.compiled.projects()
                    && let Some(json) = current.entity_json(at)
                {
                    return json;
                }
                let value = after
                    .entity(key)
                    .map(|e| view.compiled.project(e))
                    .unwrap_or(Value::Null);
                // Serializing a value into memory cannot fail.
                Bytes::from(serde_json::to_vec(&value).unwrap_or_default())
            })
            .clone()
    }

    /// The JSON length of the (projected) entity with `key` before the change.
    fn old_len(&mut self, key: &Arc<str>, view: &View) -> usize {
        let (before, previous) = (self.before, self.previous_snapshot);
        let at = before.position(key);
        *self
            .old_lens
            .entry((at, view.projection))
            .or_insert_with(|| {
                before.entity(key).map_or(0, |entity| {
                    (!view.compiled.projects())
                        .then(|| previous.entity_json_len(at))
                        .flatten()
                        .unwrap_or_else(|| projected_len(entity, &view.compiled))
                })
            })
    }

    /// The JSON length of `entity` in `view`'s projection.
    fn projected_len(&self, entity: &Value, view: &View) -> usize {
        projected_len(entity, &view.compiled)
    }

    /// The entity with `key` before the change.
    fn old_version(&mut self, key: &Arc<str>) -> Option<Arc<Value>> {
        let before = self.before;
        if let Some(old) = self.old_versions.get(key) {
            return Some(old.clone());
        }
        let old = Arc::new(before.entity(key)?.clone());
        self.old_versions.insert(key.clone(), old.clone());
        Some(old)
    }

    /// The JSON of `view`'s document after the change, whose entities are those with the keys
    /// `order`, in that order: the current rest's JSON with the entities' (projected) JSON in
    /// place of its empty entity array. `None` when the source has no entity array (the caller
    /// serializes the document).
    fn snapshot_json(&mut self, order: &[Arc<str>], view: &View) -> Option<Bytes> {
        if self.template.is_none() {
            let marked = self.selector.replace_entities(
                &self.rest_cur,
                Value::Array(vec![Value::String(ENTITIES_MARK.to_owned())]),
            );
            let json = serde_json::to_vec(&marked).unwrap_or_default();
            let mark =
                serde_json::to_vec(&Value::String(ENTITIES_MARK.to_owned())).unwrap_or_default();
            let mut found = json
                .windows(mark.len())
                .enumerate()
                .filter(|(_, w)| *w == mark.as_slice())
                .map(|(i, _)| i);
            // Exactly once, else the rest holds the mark itself and the caller serializes.
            let template = match (found.next(), found.next()) {
                (Some(at), None) if self.selector.entities(self.current).is_some() => {
                    Some((json, at, at + mark.len()))
                }
                _ => None,
            };
            self.template = Some(template);
        }
        if !matches!(self.template, Some(Some(_))) {
            return None;
        }
        let entities: Vec<Bytes> = order.iter().map(|k| self.added(k, view)).collect();
        let Some(Some((json, start, end))) = &self.template else {
            return None;
        };
        let len = json.len() + entities.iter().map(|e| e.len() + 1).sum::<usize>();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&json[..*start]);
        for (i, entity) in entities.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(entity);
        }
        out.extend_from_slice(&json[*end..]);
        Some(Bytes::from(out))
    }

    /// The diff of the rest of the document from `shown` (what a view shows) to the current.
    fn rest(&mut self, shown: &Arc<Value>) -> Arc<diff::PatchJson> {
        if Arc::ptr_eq(shown, &self.rest_prev) {
            return self.rest_patch.clone();
        }
        if Arc::ptr_eq(shown, &self.rest_cur) {
            return Arc::new(diff::PatchJson {
                json: b"[]".to_vec(),
                operations: 0,
                only_ignored: true,
            });
        }
        let (current, options) = (&self.rest_cur, self.options);
        self.rests
            .entry(Arc::as_ptr(shown) as usize)
            .or_insert_with(|| Arc::new(diff::diff_json(shown, current, options)))
            .clone()
    }
}

/// `old` to `new` as `view` projects them, at index `at` of the entity array at `prefix`.
fn delta(
    old: &Value,
    new: &Value,
    at: usize,
    view: &View,
    prefix: &[At<'_>],
    options: &diff::DiffOptions,
) -> Delta {
    let mut path = prefix.to_vec();
    path.push(At::Index(at));
    if view.compiled.projects() {
        let (old, new) = (view.compiled.project(old), view.compiled.project(new));
        Delta {
            patch: diff::diff_json_at(&old, &new, &path, options),
            old_len: diff::json_len(&old),
            new_len: diff::json_len(&new),
        }
    } else {
        Delta {
            patch: diff::diff_json_at(old, new, &path, options),
            old_len: diff::json_len(old),
            new_len: diff::json_len(new),
        }
    }
}

/// Where `key`, one of a view's entities, is in its `order` (sorted by `before`: its
/// entities before `key` in the source's order): a linear search in the few entities most
/// views have (no lookup of each one's position), else a binary search by position.
fn index_in(
    order: &[Arc<str>],
    key: &Arc<str>,
    mut before: impl FnMut(&Arc<str>) -> bool,
) -> usize {
    if order.len() <= 8
        && let Some(index) = order.iter().position(|k| k == key)
    {
        debug_assert_eq!(
            index,
            order.partition_point(&mut before),
            "a view's order is its source's"
        );
        return index;
    }
    order.partition_point(before)
}

/// How the source's diff compared the entity at index `i` before and `j` after the change,
/// where it paired those two (as the views do, by key): its operations, `None` when equal.
fn paired(split: Option<&diff::Split>, i: usize, j: usize) -> Option<Option<&diff::RelativePatch>> {
    let (old, relative) = split?.element(j)?;
    (old == i).then_some(relative)
}

/// The JSON length of `entity` as `compiled` projects it.
fn projected_len(entity: &Value, compiled: &Compiled) -> usize {
    if compiled.projects() {
        diff::json_len(&compiled.project(entity))
    } else {
        diff::json_len(entity)
    }
}

/// The id of `compiled`'s projection among `projections` (added if new).
fn projection_of(projections: &mut Vec<Option<Vec<Vec<String>>>>, compiled: &Compiled) -> usize {
    let fields = compiled.fields().map(<[Vec<String>]>::to_vec);
    match projections.iter().position(|p| *p == fields) {
        Some(i) => i,
        None => {
            projections.push(fields);
            projections.len() - 1
        }
    }
}

/// Whether an entity's diff is the same at every index of the entity array at `entities`
/// (so a view can splice it under its own index): no key or ignore pattern names one index,
/// and no ignore pattern covers whole entities or more (adding or removing an entity is then
/// never ignored).
fn incremental_safe(entities: &[String], options: &diff::DiffOptions) -> bool {
    let depth = entities.len();
    let reaches = |pattern: &PathPattern| {
        pattern
            .segments()
            .iter()
            .zip(entities)
            .all(|(segment, token)| match segment {
                Segment::Any => true,
                Segment::Token(t) => t == token,
            })
    };
    let index_blind = |pattern: &PathPattern| match pattern.segments().get(depth) {
        None | Some(Segment::Any) => true,
        Some(Segment::Token(_)) => false,
    };
    options
        .keys
        .iter()
        .map(|k| &k.array)
        .all(|p| !reaches(p) || index_blind(p))
        && options
            .ignore
            .iter()
            .all(|p| !reaches(p) || (p.segments().len() > depth + 1 && index_blind(p)))
}

/// The entities `view` keeps through a reordering change (`entries`: those it touches) that
/// are out of the source's new relative order, the fewest that leave the rest in order (they
/// leave and enter again at their new index, as the whole stream's diff does without moves).
/// `None` when an entity the view keeps is not in the source any more (the view is rebuilt).
fn misplaced(view: &View, entries: &[Touched], after: &Groups<'_>) -> Option<HashSet<Arc<str>>> {
    let leaving: HashSet<&str> = entries
        .iter()
        .filter(|(_, was, now)| *was && !*now)
        .map(|(key, _, _)| &**key)
        .collect();
    let kept: Vec<&Arc<str>> = view
        .order
        .iter()
        .filter(|key| !leaving.contains(&***key))
        .collect();
    let mut positions = Vec::with_capacity(kept.len());
    for key in &kept {
        let at = after.position(key);
        if at == usize::MAX {
            return None;
        }
        positions.push(at);
    }
    if positions.is_sorted() {
        return Some(HashSet::new());
    }
    let in_order = diff::increasing_subsequence(&positions);
    Some(
        kept.into_iter()
            .zip(in_order)
            .filter(|(_, stays)| !stays)
            .map(|(key, _)| key.clone())
            .collect(),
    )
}

/// Whether entities present in both documents changed their relative order (every view is
/// looked at: its own entities may have).
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
            max_views_key: "this stream",
            linger,
            named: BTreeMap::new(),
        }
    }

    fn source(max_views: usize) -> (Arc<Stream>, Arc<StreamViews>) {
        source_with(max_views, options())
    }

    fn source_with(max_views: usize, options: StreamOptions) -> (Arc<Stream>, Arc<StreamViews>) {
        let snapshots = SnapshotStore::new();
        let stream = Arc::new(Stream::new(
            "s",
            options.clone(),
            snapshots.clone(),
            Arc::new(Metrics::new()),
        ));
        let views = Arc::new(StreamViews::new(
            &stream,
            settings(std::time::Duration::from_secs(60), max_views),
            options,
            snapshots,
            Budget::new(1000),
        ));
        assert!(stream.derive(views.clone()));
        (stream, views)
    }

    #[test]
    fn closed_views_give_their_share_of_the_budget_back() {
        let snapshots = SnapshotStore::new();
        let budget = Budget::new(2);
        let make = || {
            let stream = Arc::new(Stream::new(
                "s",
                options(),
                snapshots.clone(),
                Arc::new(Metrics::new()),
            ));
            let views = Arc::new(StreamViews::new(
                &stream,
                settings(std::time::Duration::from_secs(60), 10),
                options(),
                snapshots.clone(),
                budget.clone(),
            ));
            assert!(stream.derive(views.clone()));
            (stream, views)
        };
        let ask = |views: &StreamViews, stream: &Stream, route: &str| {
            let asked =
                crate::views::spec::parse_query(Some(&format!("route={route}")), &views.aliases())
                    .unwrap();
            let (id, spec) = views.resolve(asked).unwrap().unwrap();
            views.stream(stream, id, spec)
        };
        let (stream, views) = make();
        ask(&views, &stream, "a").unwrap();
        ask(&views, &stream, "b").unwrap();
        assert!(
            matches!(ask(&views, &stream, "c"), Err(ViewError::TooMany { .. })),
            "the budget of 2 is spent"
        );
        Derivation::closed(views.as_ref());
        let (stream, views) = make();
        ask(&views, &stream, "a").unwrap();
        ask(&views, &stream, "b").expect("the closed views gave their share back");
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

    /// One edit of a document's entity list, as the incremental test applies it.
    #[derive(Debug, Clone)]
    enum Edit {
        /// Entity at `slot` (modulo the length) takes these route, n, status and stops.
        Change(usize, usize, i64, bool, Vec<u8>),
        Remove(usize),
        /// A new entity (id `n{id}`) inserted at `slot`.
        Insert(usize, u8, usize),
        /// Two entities swap places (a reorder).
        Swap(usize, usize),
        /// The entity at `slot` gets the id of another (duplicate keys).
        Duplicate(usize, usize),
        /// The entity at `slot` loses its id.
        Unkeyed(usize),
        /// The header's `t` (ignored when the test ignores) or `u` changes.
        Header(u8, bool),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            6 => (0..16usize, 0..4usize, 0..5i64, prop::bool::ANY, prop::collection::vec(0..4u8, 0..3))
                .prop_map(|(s, r, n, a, stops)| Edit::Change(s, r, n, a, stops)),
            2 => (0..16usize).prop_map(Edit::Remove),
            2 => (0..16usize, 0..40u8, 0..4usize).prop_map(|(s, id, r)| Edit::Insert(s, id, r)),
            1 => (0..16usize, 0..16usize).prop_map(|(a, b)| Edit::Swap(a, b)),
            1 => (0..16usize, 0..16usize).prop_map(|(a, b)| Edit::Duplicate(a, b)),
            1 => (0..16usize).prop_map(Edit::Unkeyed),
            2 => (0..3u8, prop::bool::ANY).prop_map(|(t, u)| Edit::Header(t, u)),
        ]
    }

    fn apply_edit(document: &mut Value, edit: &Edit) {
        let entities = document["entity"].as_array_mut().unwrap();
        let len = entities.len();
        match edit.clone() {
            Edit::Change(slot, route, n, a, stops) if len > 0 => {
                let e = &mut entities[slot % len];
                e["route"] = json!(ROUTES[route]);
                e["n"] = json!(n);
                e["status"] = json!(if a { "A" } else { "B" });
                e["stops"] = json!(
                    stops
                        .iter()
                        .map(|s| json!({"stop_id": format!("s{s}")}))
                        .collect::<Vec<_>>()
                );
            }
            Edit::Remove(slot) if len > 0 => {
                entities.remove(slot % len);
            }
            Edit::Insert(slot, id, route) => {
                let e = json!({"id": format!("n{id}"), "route": ROUTES[route], "status": "A", "n": 1, "stops": [{"stop_id": "s1"}]});
                if !entities.iter().any(|x| x["id"] == e["id"]) {
                    entities.insert(slot % (len + 1), e);
                }
            }
            Edit::Swap(a, b) if len > 0 => entities.swap(a % len, b % len),
            Edit::Duplicate(a, b) if len > 0 => {
                let id = entities[b % len]["id"].clone();
                entities[a % len]["id"] = id;
            }
            Edit::Unkeyed(slot) if len > 0 => {
                if let Some(e) = entities[slot % len].as_object_mut() {
                    e.remove("id");
                }
            }
            Edit::Header(t, u) => {
                if u {
                    document["header"]["u"] = json!(t);
                } else {
                    document["header"]["t"] = json!(t);
                }
            }
            _ => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The incremental path: each document is the previous one edited (entities changing
        /// in place, moving between views, entering and leaving, few reorders, duplicate and
        /// missing keys now and then), with and without ignored paths (a header field, and a
        /// field of every entity). A subscriber of each view rebuilds exactly the view's
        /// document as a whole-document diff decides it: the view changes when its filtered
        /// and projected document differs other than in ignored paths, and otherwise keeps
        /// what it had.
        #[test]
        fn derived_patches_rebuild_what_whole_view_diffs_decide(
            first in document(),
            steps in prop::collection::vec(prop::collection::vec(edit(), 1..5), 1..14),
            filters in prop::collection::vec(filter(), 1..6),
            ignoring in prop::bool::ANY,
        ) {
            let mut options = options();
            if ignoring {
                options.diff.ignore = vec![
                    PathPattern::parse("/header/t").unwrap(),
                    PathPattern::parse("/entity/*/status").unwrap(),
                ];
            }
            let diff_options = options.diff.clone();
            let (stream, views) = source_with(100, options);
            stream.publish(first.clone());
            let mut source = first.clone();
            let mut followers = Vec::new();
            for filter in &filters {
                let spec = filter.spec();
                let id: Arc<str> = Arc::from(spec.ad_hoc_name());
                let subscription = views.subscribe(&stream, id, spec, &Resume::Fresh).unwrap();
                let rebuilt = start(&subscription.initial);
                prop_assert_eq!(rebuilt.as_ref(), Some(&filter.of(&first)));
                let model = filter.of(&first);
                followers.push((filter.clone(), subscription, rebuilt, model));
            }
            let mut document = first;
            for edits in &steps {
                for edit in edits {
                    apply_edit(&mut document, edit);
                }
                stream.publish(document.clone());
                let published = crate::diff::diff_json(&source, &document, &diff_options);
                if published.operations > 0 && !published.only_ignored {
                    source = document.clone();
                }
                for (filter, subscription, rebuilt, model) in followers.iter_mut() {
                    let changes = follow(rebuilt, &mut subscription.live);
                    let candidate = filter.of(&source);
                    let patch = crate::diff::diff_json(model, &candidate, &diff_options);
                    let moved = patch.operations > 0 && !patch.only_ignored;
                    if moved {
                        *model = candidate;
                    }
                    prop_assert_eq!(rebuilt.as_ref(), Some(&*model), "filter {}", filter.query());
                    if !moved {
                        prop_assert_eq!(changes, 0, "an unchanged view published, filter {}", filter.query());
                    }
                    // A new subscriber gets the same document.
                    let fresh = subscription.stream().subscribe(&Resume::Fresh);
                    let fresh = start(&fresh.initial);
                    prop_assert_eq!(fresh.as_ref(), Some(&*model), "fresh, filter {}", filter.query());
                }
            }
        }
    }

    #[test]
    fn edits_in_place_derive_views_without_rebuilding_them() {
        let (stream, views) = source(10);
        let document = |n: i64, extra: bool| {
            let mut entities = vec![
                json!({"id": "a", "route": "R1", "n": n}),
                json!({"id": "b", "route": "R2", "n": 1}),
                json!({"id": "c", "route": "R1", "n": 1}),
            ];
            if extra {
                entities.insert(1, json!({"id": "d", "route": "R1", "n": 0}));
            }
            json!({"header": {"feed": "x".repeat(200)}, "entity": entities})
        };
        stream.publish(document(0, false));
        let Asked::AdHoc(spec) =
            crate::views::spec::parse_query(Some("route=R1"), &views.aliases()).unwrap()
        else {
            panic!()
        };
        let (id, spec) = views.resolve(Asked::AdHoc(spec)).unwrap().unwrap();
        let mut r1 = views.subscribe(&stream, id, spec, &Resume::Fresh).unwrap();
        stream.publish(document(1, false));
        stream.publish(document(1, true));
        stream.publish(document(2, false));
        assert_eq!(views.derivations(), (3, 0));
        let mut patches = Vec::new();
        while let Ok(StreamEvent::Change(change, _)) = r1.live.try_recv() {
            patches.push(serde_json::from_slice::<Value>(&change.payload).unwrap());
        }
        assert_eq!(
            patches,
            vec![
                json!([{"op": "replace", "path": "/entity/0/n", "value": 1}]),
                json!([{"op": "add", "path": "/entity/1", "value": {"id": "d", "route": "R1", "n": 0}}]),
                json!([{"op": "remove", "path": "/entity/1"}, {"op": "replace", "path": "/entity/0/n", "value": 2}]),
            ]
        );
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
