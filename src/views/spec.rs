//! What a view is, as written: equality filters over a stream's field aliases, an RFC 9535
//! JSONPath filter expression, and the fields kept of each entity; parsed from a query string
//! (`?route=Red,Orange&fields=trip_update/trip`) or a configured view, checked against the
//! stream's aliases, and brought to one canonical form so equivalent views are one view.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json_path::JsonPath;
use sha2::{Digest, Sha256};

use crate::diff::PathPattern;

/// Query parameters that are never filters (they belong to the subscription itself).
pub const RESERVED: [&str; 3] = ["lastEventId", "X-Sd-Token", "token"];

/// A view of a stream: which entities it keeps and which of their fields.
#[derive(Debug, Clone)]
pub struct ViewSpec {
    /// Alias → the values an entity's field must have one of (every alias must match).
    pub equals: BTreeMap<String, BTreeSet<String>>,
    /// An RFC 9535 filter expression each entity must satisfy (`@` is the entity), parsed.
    pub expression: Option<Expression>,
    /// The fields kept of each entity (JSON Pointers inside it); `None` keeps them all.
    pub fields: Option<BTreeSet<String>>,
}

/// A parsed filter expression: the query `$[?<expression>]` over an array of entities.
#[derive(Debug, Clone)]
pub struct Expression {
    /// The expression as canonically written (the parsed query's own rendering).
    pub canonical: String,
    /// The query selecting matching entities of a one-entity array.
    pub query: JsonPath,
}

/// Why a view could not be made of what was asked; the message names what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    /// A parameter that is neither a known alias nor a view parameter.
    #[error("unknown filter `{name}`; this stream's aliases are: {known}")]
    UnknownAlias {
        /// The parameter.
        name: String,
        /// The aliases that exist (comma-separated), or `none`.
        known: String,
    },
    /// An alias given without values.
    #[error("filter `{0}` has no value: write `{0}=a` or `{0}=a,b`")]
    Empty(String),
    /// A `where` expression that does not parse.
    #[error(
        "`where` is not an RFC 9535 filter expression: {message} (at character {position} of `{expression}`)"
    )]
    Expression {
        /// The expression as given.
        expression: String,
        /// What the parser said.
        message: String,
        /// Where, 1-based, in the expression.
        position: usize,
    },
    /// A `fields` entry that is not a JSON Pointer.
    #[error(
        "`fields` entry `{0}` is not a JSON Pointer inside an entity (e.g. `trip_update/trip` or `/vehicle/position`)"
    )]
    Field(String),
    /// A named view that does not exist.
    #[error("no view named `{name}` on this stream; its views are: {known}")]
    UnknownView {
        /// The name asked for.
        name: String,
        /// The views that exist, or `none`.
        known: String,
    },
    /// Ad hoc views are not allowed on this stream.
    #[error(
        "this stream serves only its configured views ({known}); ask for one with `view=<name>`"
    )]
    AdHocRefused {
        /// The views that exist, or `none`.
        known: String,
    },
    /// A parameter given twice.
    #[error("`{0}` is given twice; give each filter once (values separated by commas)")]
    Repeated(String),
    /// A configured view asked for with filters, `where`, `fields` or another view besides.
    #[error(
        "{0} is a configured view: it takes no filter, `where`, `fields` or other `view` besides; ask for the view alone, or for an ad hoc view with filters alone"
    )]
    Combined(String),
    /// This stream has no views.
    #[error(
        "stream `{0}` has no views: `view`, `where` and `fields` need [streams.filtering] in its configuration"
    )]
    NoViews(String),
    /// Too many distinct views already.
    #[error(
        "too many distinct views: at most {max} in {scope}; subscribe to an existing view or try again later"
    )]
    TooMany {
        /// The bound.
        max: usize,
        /// What it bounds.
        scope: &'static str,
    },
    /// Two different ad hoc views with the same short id.
    #[error("another view has this view's id; write the filter differently (e.g. reorder values)")]
    Collision,
    /// A malformed query string.
    #[error("the query string is not valid percent-encoded UTF-8")]
    Encoding,
}

impl ViewError {
    /// The HTTP status of the refusal: 429 for the bounds, 404 for a view that does not exist,
    /// else 400.
    pub fn status(&self) -> u16 {
        match self {
            ViewError::TooMany { .. } => 429,
            ViewError::UnknownView { .. } => 404,
            _ => 400,
        }
    }

    /// A machine-readable cause.
    pub fn cause(&self) -> &'static str {
        match self {
            ViewError::TooMany { .. } => "too-many-views",
            ViewError::UnknownView { .. } => "no-such-view",
            ViewError::NoViews(_) | ViewError::AdHocRefused { .. } => "views-not-allowed",
            _ => "bad-view",
        }
    }
}

/// What a subscription asks for: the whole stream, a configured view, or an ad hoc one.
#[derive(Debug, Clone)]
pub enum Asked {
    /// The whole stream (no view parameter).
    Whole,
    /// A view configured under this name.
    Named(String),
    /// A view described in the query string.
    AdHoc(ViewSpec),
}

/// Reads a subscription's query string: `view=<name>` for a configured view, else alias
/// filters, `where` and `fields` for an ad hoc one; other parameters (`lastEventId`, tokens)
/// are the subscription's own. Only names in `aliases` are filters.
pub fn parse_query(query: Option<&str>, aliases: &BTreeSet<String>) -> Result<Asked, ViewError> {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(Asked::Whole);
    };
    let mut named = None;
    let mut equals = BTreeMap::new();
    let mut expression = None;
    let mut fields = None;
    let mut seen = BTreeSet::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(raw_name)?;
        let value = decode(raw_value)?;
        if RESERVED.contains(&name.as_str()) || name.starts_with("X-Sd-") {
            continue;
        }
        if !seen.insert(name.clone()) {
            return Err(ViewError::Repeated(name));
        }
        match name.as_str() {
            "view" => named = Some(value),
            "where" => expression = Some(value),
            "fields" => fields = Some(value),
            _ if aliases.contains(&name) => {
                equals.insert(name, value);
            }
            _ => {
                return Err(ViewError::UnknownAlias {
                    name,
                    known: list(aliases),
                });
            }
        }
    }
    if let Some(name) = named {
        if !equals.is_empty() || expression.is_some() || fields.is_some() {
            return Err(ViewError::Combined(format!("`view={name}`")));
        }
        return Ok(Asked::Named(name));
    }
    if equals.is_empty() && expression.is_none() && fields.is_none() {
        return Ok(Asked::Whole);
    }
    let equals = equals
        .into_iter()
        .map(|(alias, values)| Ok((alias.clone(), split_values(&alias, &values)?)))
        .collect::<Result<_, ViewError>>()?;
    Ok(Asked::AdHoc(ViewSpec {
        equals,
        expression: expression.as_deref().map(parse_expression).transpose()?,
        fields: fields.as_deref().map(parse_fields).transpose()?,
    }))
}

/// The values of a filter: comma-separated, trimmed, deduplicated and sorted.
pub fn split_values(alias: &str, values: &str) -> Result<BTreeSet<String>, ViewError> {
    let set: BTreeSet<String> = values
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect();
    if set.is_empty() {
        return Err(ViewError::Empty(alias.to_owned()));
    }
    Ok(set)
}

/// Parses an RFC 9535 filter expression (`@.vehicle.current_status == 'STOPPED_AT'`).
pub fn parse_expression(expression: &str) -> Result<Expression, ViewError> {
    let wrapped = format!("$[?{expression}]");
    let query = JsonPath::parse(&wrapped).map_err(|e| ViewError::Expression {
        expression: expression.to_owned(),
        message: e.message().to_owned(),
        // The wrapper adds three characters before the expression.
        position: e.position().saturating_sub(3).max(1),
    })?;
    Ok(Expression {
        canonical: query.to_string(),
        query,
    })
}

/// Parses `fields`: comma-separated JSON Pointers inside an entity (the leading `/` optional).
pub fn parse_fields(fields: &str) -> Result<BTreeSet<String>, ViewError> {
    let mut set = BTreeSet::new();
    for field in fields.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        let pointer = if field.starts_with('/') {
            field.to_owned()
        } else {
            format!("/{field}")
        };
        match PathPattern::parse(&pointer) {
            Ok(pattern) if pattern.wildcards() == 0 && !pointer.ends_with('/') => {
                set.insert(pointer);
            }
            _ => return Err(ViewError::Field(field.to_owned())),
        }
    }
    if set.is_empty() {
        return Err(ViewError::Field(fields.to_owned()));
    }
    Ok(set)
}

fn decode(raw: &str) -> Result<String, ViewError> {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ViewError::Encoding)
}

/// Names as the error messages list them.
pub fn list<'a>(names: impl IntoIterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.into_iter().map(String::as_str).collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

impl ViewSpec {
    /// The view's canonical form: equivalent specs (values reordered or repeated, aliases in
    /// another order, spaces in the expression) have the same one.
    pub fn canonical(&self) -> String {
        let mut out = String::new();
        for (alias, values) in &self.equals {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            let _ = write!(out, "{alias}={}&", values.join(","));
        }
        if let Some(expression) = &self.expression {
            let _ = write!(out, "where={}&", expression.canonical);
        }
        if let Some(fields) = &self.fields {
            let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
            let _ = write!(out, "fields={}&", fields.join(","));
        }
        out.pop();
        out
    }

    /// A short stable name for an ad hoc view: `~` and 12 hex digits of its canonical form's
    /// SHA-256 (the same on every node and every restart, so its event ids are too).
    pub fn ad_hoc_name(&self) -> String {
        let digest = Sha256::digest(self.canonical().as_bytes());
        let mut name = String::from("~");
        for byte in &digest[..6] {
            let _ = write!(name, "{byte:02x}");
        }
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aliases() -> BTreeSet<String> {
        ["route", "stop"].iter().map(|s| (*s).to_owned()).collect()
    }

    fn ad_hoc(query: &str) -> ViewSpec {
        match parse_query(Some(query), &aliases()) {
            Ok(Asked::AdHoc(spec)) => spec,
            other => panic!("{query}: {other:?}"),
        }
    }

    #[test]
    fn equivalent_queries_are_one_view() {
        let a = ad_hoc("route=Red,Orange&stop=1");
        let b = ad_hoc("stop=1&route=Orange,Red,Red");
        let c = ad_hoc("route=Orange%2CRed&stop=1");
        assert_eq!(a.canonical(), "route=Orange,Red&stop=1");
        assert_eq!(a.canonical(), b.canonical());
        assert_eq!(a.canonical(), c.canonical());
        assert_eq!(a.ad_hoc_name(), b.ad_hoc_name());
        let spaced = ad_hoc("where=@.x%20%3D%3D%201");
        let tight = ad_hoc("where=@.x==1");
        assert_eq!(spaced.canonical(), tight.canonical());
        assert_eq!(
            ad_hoc("fields=a/b,/c").canonical(),
            ad_hoc("fields=/c,/a/b").canonical()
        );
    }

    #[test]
    fn the_subscriptions_own_parameters_are_not_filters() {
        assert!(matches!(
            parse_query(Some("lastEventId=s:1:2&X-Sd-Token=t"), &aliases()),
            Ok(Asked::Whole)
        ));
        assert!(matches!(
            parse_query(Some("view=red&lastEventId=x"), &aliases()),
            Ok(Asked::Named(name)) if name == "red"
        ));
    }

    #[test]
    fn a_named_view_takes_no_filter_besides() {
        for query in [
            "view=red&route=Red",
            "route=Red&view=red",
            "view=red&where=@.a",
            "view=red&fields=a",
        ] {
            assert!(
                matches!(parse_query(Some(query), &aliases()), Err(ViewError::Combined(v)) if v == "`view=red`"),
                "{query}"
            );
        }
    }

    #[test]
    fn bad_filters_say_what_and_where() {
        let unknown = parse_query(Some("line=Red"), &aliases()).unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "unknown filter `line`; this stream's aliases are: route, stop"
        );
        assert_eq!(
            parse_query(Some("route="), &aliases()).unwrap_err(),
            ViewError::Empty("route".into())
        );
        match parse_query(Some("where=@.x%20%3D%3D"), &aliases()) {
            Err(ViewError::Expression { position, .. }) => assert!(position >= 1),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_query(Some("fields=a/*/b"), &aliases()),
            Err(ViewError::Field(_))
        ));
        assert!(matches!(
            parse_query(Some("route=a&route=b"), &aliases()),
            Err(ViewError::Repeated(_))
        ));
    }
}
