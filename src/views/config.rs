//! A stream's views as configured: `[streams.filtering]` (where its entities are, what
//! identifies one, the aliases filters use, whether ad hoc views are allowed and their bounds)
//! and its named `[[streams.views]]`; the shape as written (serde, unknown keys rejected), the
//! defaults (a `gtfs-rt` stream has views without any table), and the pure validation.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;

use super::select::{Selector, tokens};
use super::spec::{Asked, ViewError, ViewSpec, list, parse_expression, parse_fields, split_values};
use crate::diff::{KeyPath, PathPattern};
use crate::validation::{Problems, duration_in, integer_in, is_valid_name, usize_of};

/// Built-in defaults.
pub mod defaults {
    use std::time::Duration;

    /// `streams.filtering.ad_hoc`.
    pub const AD_HOC: bool = true;
    /// `streams.filtering.max_views`.
    pub const MAX_VIEWS: u64 = 1000;
    /// `streams.filtering.linger`.
    pub const LINGER: Duration = Duration::from_secs(300);
    /// `views.max_total`.
    pub const MAX_TOTAL: u64 = 10_000;

    /// A `gtfs-rt` stream's filtering when it has no `[streams.filtering]`: entities by `id`,
    /// and the aliases riders' apps filter on (MBTA's V3 API filters the same way).
    pub const GTFS_RT_ENTITIES: &str = "/entity";
    /// The key of a `gtfs-rt` entity.
    pub const GTFS_RT_KEY: &str = "id";
    /// The aliases of a `gtfs-rt` stream: name → where in an entity.
    pub const GTFS_RT_ALIASES: [(&str, &[&str]); 4] = [
        (
            "route",
            &[
                "/trip_update/trip/route_id",
                "/vehicle/trip/route_id",
                "/alert/informed_entity/*/route_id",
            ],
        ),
        (
            "trip",
            &[
                "/trip_update/trip/trip_id",
                "/vehicle/trip/trip_id",
                "/alert/informed_entity/*/trip/trip_id",
            ],
        ),
        (
            "stop",
            &[
                "/trip_update/stop_time_update/*/stop_id",
                "/vehicle/stop_id",
                "/alert/informed_entity/*/stop_id",
            ],
        ),
        (
            "vehicle",
            &["/trip_update/vehicle/id", "/vehicle/vehicle/id"],
        ),
    ];
}

/// Inclusive bounds.
pub mod limits {
    use std::time::Duration;

    /// `streams.filtering.max_views`.
    pub const MAX_VIEWS: (u64, u64) = (1, 100_000);
    /// `streams.filtering.linger`.
    pub const LINGER: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(86_400));
    /// `views.max_total`.
    pub const MAX_TOTAL: (u64, u64) = (1, 1_000_000);
}

/// One value or several (`route = "Red"` or `route = ["Red", "Orange"]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One string (for filter values, comma-separated values).
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(one) => vec![one.as_str()],
            OneOrMany::Many(many) => many.iter().map(String::as_str).collect(),
        }
    }
}

/// `[streams.filtering]`: what views of the stream select on.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFiltering {
    /// JSON Pointer of the array of entities (e.g. `/vehicles`); required unless the stream is
    /// `gtfs-rt` (default `/entity`).
    pub entities: Option<String>,
    /// Path of an entity's identity inside it (e.g. `id`, `vehicle/vehicle/id`).
    pub key: Option<String>,
    /// Alias → JSON Pointer pattern(s) inside an entity (`*` any member or element).
    #[serde(default)]
    pub aliases: BTreeMap<String, OneOrMany>,
    /// Whether subscriptions may describe views in their query string
    /// ([default](defaults::AD_HOC)).
    pub ad_hoc: Option<bool>,
    /// Distinct views of the stream at once ([default](defaults::MAX_VIEWS),
    /// [bounds](limits::MAX_VIEWS)).
    pub max_views: Option<u64>,
    /// How long a view nobody subscribes to is kept ([default](defaults::LINGER),
    /// [bounds](limits::LINGER)).
    #[serde(default, with = "humantime_serde::option")]
    pub linger: Option<Duration>,
}

/// One `[[streams.views]]` entry: a named view.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawView {
    /// Served as `/streams/{stream}@{name}` and `?view={name}`.
    pub name: String,
    /// Alias → the values kept (any of them): `"Red,Orange"` or `["Red", "Orange"]`.
    #[serde(default)]
    pub filter: BTreeMap<String, OneOrMany>,
    /// An RFC 9535 filter expression each kept entity satisfies (`@` is the entity).
    #[serde(rename = "where")]
    pub where_: Option<String>,
    /// Fields kept of each entity (JSON Pointers inside it); all without it.
    pub fields: Option<OneOrMany>,
}

/// `[views]`: bounds across every stream.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawViews {
    /// Distinct views at once, over all streams ([default](defaults::MAX_TOTAL),
    /// [bounds](limits::MAX_TOTAL)).
    pub max_total: Option<u64>,
}

/// A stream's views, validated.
#[derive(Debug, Clone)]
pub struct ViewsSettings {
    /// Where entities are and how aliases read them.
    pub selector: Selector,
    /// Whether ad hoc views are allowed.
    pub ad_hoc: bool,
    /// Distinct views at once.
    pub max_views: usize,
    /// The setting `max_views` comes from, named when a subscription is refused at the bound.
    pub max_views_key: &'static str,
    /// How long an unwatched view is kept.
    pub linger: Duration,
    /// The named views, by name.
    pub named: BTreeMap<String, ViewSpec>,
}

impl ViewsSettings {
    /// The view `asked` names among these settings: its id (the configured name, or `~` and a
    /// hash of the ad hoc spec's canonical form; an ad hoc spec equal to a named view's is that
    /// view) and spec; `None` for the whole stream. What `StreamViews::resolve` answers at run
    /// time, known from the configuration alone (a broker sink's view is named at start).
    pub fn resolve(&self, asked: Asked) -> Result<Option<(String, ViewSpec)>, ViewError> {
        self.resolve_with(asked, |canonical| {
            self.named
                .iter()
                .find(|(_, spec)| spec.canonical() == canonical)
                .map(|(name, _)| name.as_str())
        })
    }

    /// [`ViewsSettings::resolve`], with `named_as` answering which named view an ad hoc
    /// spec's canonical form is (the one rule, for callers that keep an index of them).
    pub fn resolve_with<'a>(
        &'a self,
        asked: Asked,
        named_as: impl FnOnce(&str) -> Option<&'a str>,
    ) -> Result<Option<(String, ViewSpec)>, ViewError> {
        match asked {
            Asked::Whole => Ok(None),
            Asked::Named(name) => match self.named.get(&name) {
                Some(spec) => Ok(Some((name, spec.clone()))),
                None => Err(ViewError::UnknownView {
                    name,
                    known: list(self.named.keys()),
                }),
            },
            Asked::AdHoc(spec) => {
                if let Some(name) = named_as(&spec.canonical()) {
                    return Ok(Some((name.to_owned(), spec)));
                }
                if !self.ad_hoc {
                    return Err(ViewError::AdHocRefused {
                        known: list(self.named.keys()),
                    });
                }
                Ok(Some((spec.ad_hoc_name(), spec)))
            }
        }
    }
}

impl RawViews {
    /// The total bound, validated at `views.max_total`.
    pub fn validate(&self, problems: &mut Problems) -> usize {
        usize_of(integer_in(
            problems,
            "views.max_total",
            self.max_total,
            defaults::MAX_TOTAL,
            limits::MAX_TOTAL,
        ))
    }
}

/// Validates a stream's `filtering` and `views` at `key` (`streams[i]`); `gtfs_rt`: the stream
/// is `format = "gtfs-rt"` (it has views without a table). `None` (no problem): the stream has
/// no views (a `json` stream without `[streams.filtering]`).
pub fn validate(
    key: &str,
    gtfs_rt: bool,
    filtering: Option<&RawFiltering>,
    views: &[RawView],
    problems: &mut Problems,
) -> Option<ViewsSettings> {
    let Some(filtering) = filtering
        .cloned()
        .or_else(|| gtfs_rt.then(RawFiltering::default))
    else {
        if !views.is_empty() {
            problems.push(
                format!("{key}.views"),
                "named views need [streams.filtering] (at least `entities` and `key`) on a \
                 `json` stream: where its entities are and what identifies one",
            );
        }
        return None;
    };
    let fkey = format!("{key}.filtering");
    let before = problems.len();
    let entities = match (&filtering.entities, gtfs_rt) {
        (Some(pointer), _) => entities_pointer(problems, &format!("{fkey}.entities"), pointer),
        (None, true) => tokens(defaults::GTFS_RT_ENTITIES),
        (None, false) => {
            problems.push(
                format!("{fkey}.entities"),
                "missing required key: the JSON Pointer of the array of entities views filter \
                 (e.g. \"/vehicles\")",
            );
            Vec::new()
        }
    };
    let key_path = match (&filtering.key, gtfs_rt) {
        (Some(path), _) => match KeyPath::parse(path) {
            Ok(path) => path.fields().to_vec(),
            Err(message) => {
                problems.push(format!("{fkey}.key"), message);
                Vec::new()
            }
        },
        (None, true) => vec![defaults::GTFS_RT_KEY.to_owned()],
        (None, false) => {
            problems.push(
                format!("{fkey}.key"),
                "missing required key: the path of an entity's identity inside it (e.g. \"id\")",
            );
            Vec::new()
        }
    };
    let mut aliases = BTreeMap::new();
    if filtering.aliases.is_empty() && gtfs_rt {
        for (name, paths) in defaults::GTFS_RT_ALIASES {
            let patterns = paths
                .iter()
                .filter_map(|p| PathPattern::parse(p).ok())
                .collect();
            aliases.insert(name.to_owned(), patterns);
        }
    }
    for (name, paths) in &filtering.aliases {
        let akey = format!("{fkey}.aliases.{name}");
        if !is_alias(name) {
            problems.push(
                &akey,
                format!(
                    "expected an alias of 1 to 32 letters, digits or '_' (not `view`, `where` or \
                     `fields`), got {name:?}"
                ),
            );
            continue;
        }
        let mut patterns = Vec::new();
        for path in paths.items() {
            let pointer = if path.starts_with('/') {
                path.to_owned()
            } else {
                format!("/{path}")
            };
            match PathPattern::parse(&pointer) {
                Ok(pattern) if pointer.len() > 1 => patterns.push(pattern),
                Ok(_) => problems.push(&akey, "expected a field inside an entity, got the entity"),
                Err(message) => problems.push(&akey, message),
            }
        }
        if patterns.is_empty() && problems.len() == before {
            problems.push(&akey, "expected at least one JSON Pointer inside an entity");
        }
        aliases.insert(name.clone(), patterns);
    }
    let max_views = usize_of(integer_in(
        problems,
        &format!("{fkey}.max_views"),
        filtering.max_views,
        defaults::MAX_VIEWS,
        limits::MAX_VIEWS,
    ));
    let linger = duration_in(
        problems,
        &format!("{fkey}.linger"),
        filtering.linger,
        defaults::LINGER,
        limits::LINGER,
    );
    let selector = Selector {
        entities,
        key: key_path,
        aliases,
    };
    let known = selector.alias_names();
    let mut named = BTreeMap::new();
    for (i, view) in views.iter().enumerate() {
        let vkey = format!("{key}.views[{i}]");
        if !is_valid_name(&view.name) || view.name.starts_with('~') {
            problems.push(
                format!("{vkey}.name"),
                format!(
                    "expected 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or \
                     digit, got {:?}",
                    view.name
                ),
            );
            continue;
        }
        match view_spec(view, &known) {
            Ok(spec) => {
                if named.insert(view.name.clone(), spec).is_some() {
                    problems.push(
                        format!("{vkey}.name"),
                        format!("view {:?} is defined twice in this stream", view.name),
                    );
                }
            }
            Err((field, error)) => problems.push(format!("{vkey}.{field}"), error.to_string()),
        }
    }
    (problems.len() == before).then(|| ViewsSettings {
        selector,
        ad_hoc: filtering.ad_hoc.unwrap_or(defaults::AD_HOC),
        max_views,
        max_views_key: "this stream (its filtering.max_views)",
        linger,
        named,
    })
}

/// A named view's spec; the error names the key it is at.
fn view_spec(
    view: &RawView,
    known: &BTreeSet<String>,
) -> Result<ViewSpec, (&'static str, ViewError)> {
    let mut equals = BTreeMap::new();
    for (alias, values) in &view.filter {
        if !known.contains(alias) {
            return Err((
                "filter",
                ViewError::UnknownAlias {
                    name: alias.clone(),
                    known: super::spec::list(known),
                },
            ));
        }
        let joined = values.items().join(",");
        equals.insert(
            alias.clone(),
            split_values(alias, &joined).map_err(|e| ("filter", e))?,
        );
    }
    let expression = view
        .where_
        .as_deref()
        .map(parse_expression)
        .transpose()
        .map_err(|e| ("where", e))?;
    let fields = view
        .fields
        .as_ref()
        .map(|f| parse_fields(&f.items().join(",")))
        .transpose()
        .map_err(|e| ("fields", e))?;
    Ok(ViewSpec {
        equals,
        expression,
        fields,
    })
}

/// The tokens of the entity array's pointer (no wildcards: one array per stream).
fn entities_pointer(problems: &mut Problems, key: &str, pointer: &str) -> Vec<String> {
    match PathPattern::parse(pointer) {
        Ok(pattern) if pattern.wildcards() == 0 && !pointer.is_empty() => tokens(pointer),
        _ => {
            problems.push(
                key,
                format!(
                    "expected the JSON Pointer of one array, starting with `/` and without `*` \
                     (e.g. \"/vehicles\"), got {pointer:?}"
                ),
            );
            Vec::new()
        }
    }
}

/// Whether `name` can be an alias: a query parameter name that is none of the view's own.
fn is_alias(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !matches!(name, "view" | "where" | "fields" | "token" | "lastEventId")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems_of(
        gtfs_rt: bool,
        filtering: Option<RawFiltering>,
        views: Vec<RawView>,
    ) -> (Option<ViewsSettings>, Vec<String>) {
        let mut problems = Problems::default();
        let settings = validate(
            "streams[0]",
            gtfs_rt,
            filtering.as_ref(),
            &views,
            &mut problems,
        );
        let text = match problems.finish(None, ()) {
            Ok(()) => Vec::new(),
            Err(error) => error
                .problems
                .iter()
                .map(|p| format!("{}: {}", p.key, p.message))
                .collect(),
        };
        (settings, text)
    }

    #[test]
    fn gtfs_rt_streams_have_views_without_a_table() {
        let (settings, problems) = problems_of(true, None, vec![]);
        assert!(problems.is_empty(), "{problems:?}");
        let settings = settings.unwrap();
        assert_eq!(settings.selector.entities, vec!["entity"]);
        assert_eq!(
            settings
                .selector
                .alias_names()
                .into_iter()
                .collect::<Vec<_>>(),
            vec!["route", "stop", "trip", "vehicle"]
        );
        let (none, problems) = problems_of(false, None, vec![]);
        assert!(none.is_none() && problems.is_empty());
    }

    #[test]
    fn bad_tables_name_the_key() {
        let filtering = RawFiltering {
            entities: Some("/a/*".into()),
            key: Some("/id".into()),
            aliases: BTreeMap::from([("where".to_owned(), OneOrMany::One("x".into()))]),
            linger: Some(Duration::ZERO),
            ..Default::default()
        };
        let (_, problems) = problems_of(false, Some(filtering), vec![]);
        let keys: Vec<&str> = problems
            .iter()
            .map(|p| p.split(':').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            vec![
                "streams[0].filtering.entities",
                "streams[0].filtering.key",
                "streams[0].filtering.aliases.where",
                "streams[0].filtering.linger",
            ],
            "{problems:?}"
        );
        let (_, problems) = problems_of(
            false,
            None,
            vec![RawView {
                name: "red".into(),
                filter: BTreeMap::new(),
                where_: None,
                fields: None,
            }],
        );
        assert!(problems[0].starts_with("streams[0].views: named views need"));
    }

    #[test]
    fn named_views_are_checked_against_the_aliases() {
        let view = |filter: &[(&str, &str)], where_: Option<&str>| RawView {
            name: "v".into(),
            filter: filter
                .iter()
                .map(|(a, v)| ((*a).to_owned(), OneOrMany::One((*v).to_owned())))
                .collect(),
            where_: where_.map(str::to_owned),
            fields: None,
        };
        let (_, problems) = problems_of(true, None, vec![view(&[("line", "1")], None)]);
        assert_eq!(
            problems,
            vec![
                "streams[0].views[0].filter: unknown filter `line`; this stream's aliases are: \
                 route, stop, trip, vehicle"
            ]
        );
        let (_, problems) = problems_of(true, None, vec![view(&[], Some("@.x =="))]);
        assert!(problems[0].starts_with("streams[0].views[0].where: `where` is not"));
        let (settings, problems) =
            problems_of(true, None, vec![view(&[("route", "Red, Orange")], None)]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(settings.unwrap().named["v"].canonical(), "route=Orange,Red");
    }
}
