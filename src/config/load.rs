//! Loading: a TOML or YAML file plus `PATCHWIRE__*` environment overrides, read with the
//! `config` crate, deserialized into [`RawConfig`] with key paths, then validated.

use std::collections::BTreeMap;
use std::path::Path;

use std::cell::Cell;

use config::{Environment, File, FileFormat, Source, Value, ValueKind};
use serde_path_to_error::Segment;

use super::de::{DeError, Node, is_stand_in, stand_in};
use super::model::Config;
use super::raw::RawConfig;
use super::validate::validate;
use crate::validation::{BYTES_EXPECTED, ConfigError, DURATION_EXPECTED, Problem};

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "PATCHWIRE";
/// Separator between the levels of a key in an override's name:
/// `PATCHWIRE__SERVER__LISTEN` sets `server.listen`, `PATCHWIRE__STREAMS__0__INTERVAL` sets
/// `streams[0].interval`.
pub const ENV_SEPARATOR: &str = "__";

/// The largest list index an override may name (`PATCHWIRE__STREAMS__<index>__...`).
pub const MAX_OVERRIDE_INDEX: usize = 10_000;

/// The syntax of a configuration file, chosen by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `.toml`
    Toml,
    /// `.yaml` or `.yml`
    Yaml,
}

impl FileKind {
    /// The kind of `path` by its extension (case-insensitive), `None` for any other extension.
    pub fn from_path(path: &Path) -> Option<FileKind> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "toml" => Some(FileKind::Toml),
            "yaml" | "yml" => Some(FileKind::Yaml),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            FileKind::Toml => "TOML",
            FileKind::Yaml => "YAML",
        }
    }

    fn format(self) -> FileFormat {
        match self {
            FileKind::Toml => FileFormat::Toml,
            FileKind::Yaml => FileFormat::Yaml,
        }
    }
}

/// Loads and validates the configuration at `path`, applying `PATCHWIRE__*` overrides from the
/// process environment and resolving `${VAR}` references from it.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let mut overrides = Vec::new();
    let mut problems = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if !is_override(name) {
            continue;
        }
        match value.into_string() {
            Ok(value) => overrides.push((name.to_owned(), value)),
            Err(_) => problems.push(Problem {
                key: override_key(name),
                message: format!("the environment variable {name} is not valid UTF-8"),
            }),
        }
    }
    if !problems.is_empty() {
        return Err(ConfigError {
            file: Some(path.to_path_buf()),
            problems,
        });
    }
    load_with(path, &|name| std::env::var(name).ok(), overrides)
}

/// [`load`] with the environment passed in: `env` resolves `${VAR}` references, `overrides`
/// are environment variables `(NAME, VALUE)` of which those named `PATCHWIRE__...` override keys
/// (others are ignored).
pub fn load_with(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    overrides: Vec<(String, String)>,
) -> Result<Config, ConfigError> {
    let sources = override_sources(&overrides);
    let text = read_text(path)?;
    let parsed = parse_partial(&text.0, text.1, Some(path), overrides)?;
    if parsed.problems.is_empty() {
        return validate(parsed.raw, Some(path), env).map_err(|e| annotate(e, &sources));
    }
    // Every problem at once: the shape's problems, and when the file was read whole, what
    // validation finds in the rest (not at or under a key already reported: a key left out
    // because its value was wrong would be reported again as missing).
    let mut problems = parsed.problems;
    if parsed.complete
        && let Err(e) = validate(parsed.raw, Some(path), env)
    {
        let reported: Vec<String> = problems.iter().map(|p| p.key.clone()).collect();
        problems.extend(
            annotate(e, &sources)
                .problems
                .into_iter()
                .filter(|p| !reported.iter().any(|key| is_at_or_under(&p.key, key))),
        );
    }
    Err(ConfigError {
        file: Some(path.to_path_buf()),
        problems,
    })
}

/// Whether `key` is `parent` or a key inside it (`streams[0].url` is under `streams[0]`).
fn is_at_or_under(key: &str, parent: &str) -> bool {
    key.strip_prefix(parent)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// Reads `path` and `overrides` (as in [`load_with`]) into the file's shape, without
/// validation.
pub fn load_raw(path: &Path, overrides: Vec<(String, String)>) -> Result<RawConfig, ConfigError> {
    let (text, kind) = read_text(path)?;
    parse_raw(&text, kind, Some(path), overrides)
}

/// The text of `path` and its syntax.
fn read_text(path: &Path) -> Result<(String, FileKind), ConfigError> {
    let file_error = |message: String| ConfigError {
        file: Some(path.to_path_buf()),
        problems: vec![Problem {
            key: String::new(),
            message,
        }],
    };
    let Some(kind) = FileKind::from_path(path) else {
        return Err(file_error(
            "expected a file name ending in .toml, .yaml or .yml (the extension selects the \
             syntax)"
                .to_owned(),
        ));
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        file_error(match e.kind() {
            std::io::ErrorKind::NotFound => "file not found".to_owned(),
            std::io::ErrorKind::InvalidData => "expected a UTF-8 text file".to_owned(),
            _ => format!("cannot read the file: {e}"),
        })
    })?;
    Ok((text, kind))
}

/// Parses configuration `text` of syntax `kind` (read from `file`, if any, for messages) and
/// applies `overrides` (as in [`load_with`]), without validation.
pub fn parse_raw(
    text: &str,
    kind: FileKind,
    file: Option<&Path>,
    overrides: Vec<(String, String)>,
) -> Result<RawConfig, ConfigError> {
    let parsed = parse_partial(text, kind, file, overrides)?;
    if parsed.problems.is_empty() {
        Ok(parsed.raw)
    } else {
        Err(ConfigError {
            file: file.map(Path::to_path_buf),
            problems: parsed.problems,
        })
    }
}

/// The file's shape as far as it could be read, and every problem found reading it.
struct Parsed {
    /// The configuration without the keys found wrong (meaningless if not `complete`).
    raw: RawConfig,
    /// Every problem with the shape: unknown keys, wrong types, missing keys, list gaps.
    problems: Vec<Problem>,
    /// True when `raw` is the configuration minus the keys found wrong, nothing made up in
    /// their place, so that validating it finds real problems only.
    complete: bool,
}

/// Most shape problems reported from one file (each costs one more pass over the tree).
const MAX_SHAPE_PROBLEMS: usize = 200;

fn parse_partial(
    text: &str,
    kind: FileKind,
    file: Option<&Path>,
    overrides: Vec<(String, String)>,
) -> Result<Parsed, ConfigError> {
    let fail = |problems: Vec<Problem>| ConfigError {
        file: file.map(Path::to_path_buf),
        problems,
    };
    let sources = override_sources(&overrides);
    // The `config` crate grows an array up to any index it is given; refuse absurd ones rather
    // than allocate them.
    let too_large: Vec<Problem> = overrides
        .iter()
        .filter(|(name, _)| is_override(name))
        .filter(|(name, _)| {
            name.split(ENV_SEPARATOR).skip(1).any(|part| {
                !part.is_empty()
                    && part.bytes().all(|b| b.is_ascii_digit())
                    && part
                        .parse::<usize>()
                        .map_or(true, |i| i > MAX_OVERRIDE_INDEX)
            })
        })
        .map(|(name, _)| Problem {
            key: override_key(name),
            message: format!(
                "expected list indexes of at most {MAX_OVERRIDE_INDEX} in the environment \
                 variable {name}"
            ),
        })
        .collect();
    if !too_large.is_empty() {
        return Err(fail(too_large));
    }
    let env_map: config::Map<String, String> = overrides
        .into_iter()
        .filter(|(name, _)| is_override(name))
        .map(|(name, value)| (indexed_override_name(&name), value))
        .collect();
    let built = config::Config::builder()
        .add_source(File::from_str(text, kind.format()))
        .add_source(
            Environment::with_prefix(ENV_PREFIX)
                .separator(ENV_SEPARATOR)
                .source(Some(env_map)),
        )
        .build()
        .and_then(|c| c.collect())
        .map_err(|e| {
            let message = match e {
                config::ConfigError::FileParse { cause, .. } => {
                    format!(
                        "invalid {} syntax: {}",
                        kind.name(),
                        cause.to_string().trim_end()
                    )
                }
                other => format!("cannot read the configuration: {other}"),
            };
            fail(vec![Problem {
                key: String::new(),
                message,
            }])
        })?;
    let mut tree = Value::new(None, ValueKind::Table(built));
    let mut problems = gap_problems(&tree, &sources);
    // The entries from a gap on exist only because of it, and its problem says so: drop them,
    // so that what comes before is read and validated as it is.
    truncate_gaps(&mut tree);
    let mut complete = true;
    let raw = loop {
        let substituted = Cell::new(false);
        match serde_path_to_error::deserialize::<_, RawConfig>(Node(tree.clone(), &substituted)) {
            Ok(raw) => {
                complete &= !substituted.get();
                break raw;
            }
            Err(e) => {
                let segments: Vec<Segment> = e.path().iter().cloned().collect();
                let path = e.path().to_string();
                let error = e.into_inner();
                let value = node_at(&mut tree, &segments).cloned();
                let problem =
                    annotate_problem(explain(&path, error.clone(), value.as_ref()), &sources);
                let repeated = problems.contains(&problem);
                if !repeated {
                    problems.push(problem);
                }
                let mended = !repeated
                    && problems.len() < MAX_SHAPE_PROBLEMS
                    && mend(&mut tree, &segments, &error);
                if !mended {
                    complete = false;
                    break RawConfig::default();
                }
            }
        }
    };
    Ok(Parsed {
        raw,
        problems,
        complete,
    })
}

/// Changes `tree` so that the next pass goes past the problem `error` at `segments`: an
/// unknown key is removed, a missing key or a value of the wrong type becomes a
/// [`stand_in`]. False when the path cannot be followed (nothing would change).
fn mend(tree: &mut Value, segments: &[Segment], error: &DeError) -> bool {
    let message = error.0.as_str();
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.trim_end_matches('`').to_owned();
        return match node_at(tree, segments).map(|v| &mut v.kind) {
            Some(ValueKind::Table(table)) if !table.contains_key(&field) => {
                table.insert(field, stand_in());
                true
            }
            _ => false,
        };
    }
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    if message.starts_with("unknown field `") {
        if let (Segment::Map { key }, Some(ValueKind::Table(table))) =
            (last, node_at(tree, parents).map(|v| &mut v.kind))
        {
            return table.remove(key).is_some();
        }
        return false;
    }
    match node_at(tree, segments) {
        Some(node) if !is_stand_in(node) => {
            *node = stand_in();
            true
        }
        _ => false,
    }
}

/// The node at `segments` of `tree`.
fn node_at<'t>(tree: &'t mut Value, segments: &[Segment]) -> Option<&'t mut Value> {
    let mut node = tree;
    for segment in segments {
        node = match (segment, &mut node.kind) {
            (Segment::Map { key }, ValueKind::Table(table)) => table.get_mut(key)?,
            (Segment::Seq { index }, ValueKind::Array(items)) => items.get_mut(*index)?,
            _ => return None,
        };
    }
    Some(node)
}

/// An override past the end of a list (`PATCHWIRE__STREAMS__7__INTERVAL` when the file has
/// one stream) leaves empty entries before it; each such list is one problem, at the key the
/// variable sets and naming it.
fn gap_problems(tree: &Value, sources: &BTreeMap<String, String>) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut lists = Vec::new();
    collect_gaps(tree, String::new(), &mut lists);
    for (list, len) in lists {
        for (key, name) in sources {
            let Some(index) = key
                .strip_prefix(list.as_str())
                .and_then(|rest| rest.strip_prefix('['))
                .and_then(|rest| rest.split_once(']'))
                .and_then(|(index, _)| index.parse::<usize>().ok())
            else {
                continue;
            };
            if index > len {
                problems.push(Problem {
                    key: key.clone(),
                    message: format!(
                        "the environment variable {name} sets `{list}[{index}]`, but `{list}` has \
                         {len} entries: a variable can change an entry or add the next one \
                         (`{list}[{len}]`), not leave a gap"
                    ),
                });
            }
        }
    }
    problems
}

/// Lists of `tree` with an empty entry, each with the number of entries before the first.
fn collect_gaps(tree: &Value, key: String, out: &mut Vec<(String, usize)>) {
    match &tree.kind {
        ValueKind::Table(table) => {
            for (name, value) in table {
                let child = if key.is_empty() {
                    name.clone()
                } else {
                    format!("{key}.{name}")
                };
                collect_gaps(value, child, out);
            }
        }
        ValueKind::Array(items) => {
            if let Some(first) = items.iter().position(|v| matches!(v.kind, ValueKind::Nil)) {
                out.push((key.clone(), first));
            }
            for (i, item) in items.iter().enumerate() {
                collect_gaps(item, format!("{key}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Cuts every list of `tree` at its first empty entry (see [`gap_problems`]).
fn truncate_gaps(tree: &mut Value) {
    match &mut tree.kind {
        ValueKind::Table(table) => table.values_mut().for_each(truncate_gaps),
        ValueKind::Array(items) => {
            if let Some(first) = items.iter().position(|v| matches!(v.kind, ValueKind::Nil)) {
                items.truncate(first);
            }
            items.iter_mut().for_each(truncate_gaps);
        }
        _ => {}
    }
}

fn is_override(name: &str) -> bool {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    name.len() > prefix.len()
        && name
            .get(..prefix.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(&prefix))
}

/// `PATCHWIRE__STREAMS__0__URL` becomes `PATCHWIRE__STREAMS[0]__URL`, which the `config` crate
/// reads as an index into the `streams` array rather than a table key `"0"`.
fn indexed_override_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    for (i, part) in name.split(ENV_SEPARATOR).enumerate() {
        if i > 1 && !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            out.push('[');
            out.push_str(part);
            out.push(']');
        } else {
            if i > 0 {
                out.push_str(ENV_SEPARATOR);
            }
            out.push_str(part);
        }
    }
    out
}

/// The dotted key an override sets: `PATCHWIRE__STREAMS__0__URL` sets `streams[0].url`.
fn override_key(name: &str) -> String {
    let mut key = String::new();
    for part in name.split(ENV_SEPARATOR).skip(1) {
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(&part.to_ascii_lowercase());
        }
    }
    key
}

fn override_sources(overrides: &[(String, String)]) -> BTreeMap<String, String> {
    overrides
        .iter()
        .filter(|(name, _)| is_override(name))
        .map(|(name, _)| (override_key(name), name.clone()))
        .collect()
}

/// Adds "(set by environment variable X)" to problems at keys an override set.
fn annotate(mut error: ConfigError, sources: &BTreeMap<String, String>) -> ConfigError {
    error.problems = error
        .problems
        .into_iter()
        .map(|p| annotate_problem(p, sources))
        .collect();
    error
}

/// [`annotate`] for one problem.
fn annotate_problem(mut problem: Problem, sources: &BTreeMap<String, String>) -> Problem {
    let source = sources
        .iter()
        .find(|(key, _)| is_at_or_under(&problem.key, key));
    if let Some((_, name)) = source
        && !problem.message.contains(name.as_str())
    {
        problem.message = format!("{} (set by environment variable {name})", problem.message);
    }
    problem
}

/// Turns serde's messages into "what is wrong, what was expected" at the full key path;
/// `value` is the value found there, if any, for the reason a parser refused it.
fn explain(path: &str, error: DeError, value: Option<&Value>) -> Problem {
    let message = error.0;
    let join = |field: &str| {
        if path == "." || path.is_empty() {
            field.to_owned()
        } else {
            format!("{path}.{field}")
        }
    };
    let root_or = |p: &str| {
        if p == "." {
            String::new()
        } else {
            p.to_owned()
        }
    };
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((field, expected)) = rest.split_once('`')
    {
        let valid = list_of_names(expected);
        // `serde_path_to_error` already includes the unknown key in the path.
        let key = if path.ends_with(field) {
            root_or(path)
        } else {
            join(field)
        };
        return Problem {
            key,
            message: format!("unknown key `{field}`; valid keys here: {valid}"),
        };
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.trim_end_matches('`');
        return Problem {
            key: join(field),
            message: "missing required key".to_owned(),
        };
    }
    if let Some(rest) = message.strip_prefix("unknown variant `")
        && let Some((variant, expected)) = rest.split_once('`')
    {
        return Problem {
            key: root_or(path),
            message: format!(
                "expected one of {}, got {variant:?}",
                list_of_names(expected)
            ),
        };
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix)
            && let Some((got, expected)) = rest.rsplit_once(", expected ")
        {
            let reason = value
                .and_then(|v| parse_failure(expected, v))
                .map(|why| format!(" ({why})"))
                .unwrap_or_default();
            return Problem {
                key: root_or(path),
                message: format!("expected {}, got {got}{reason}", plain_expected(expected)),
            };
        }
    }
    Problem {
        key: root_or(path),
        message,
    }
}

/// Why the parser of a duration or size key refused the string `value`: the crates' serde
/// errors say only what was expected.
fn parse_failure(expected: &str, value: &Value) -> Option<String> {
    let ValueKind::String(text) = &value.kind else {
        return None;
    };
    match expected {
        HUMANTIME_EXPECTED => humantime::parse_duration(text).err().map(|e| e.to_string()),
        e if BYTESIZE_EXPECTED.contains(&e) => text.parse::<bytesize::ByteSize>().err(),
        _ => None,
    }
}

/// "expected one of `a`, `b`" / "expected `a`" / "there are no fields" as "a, b".
fn list_of_names(expected: &str) -> String {
    let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// What `humantime_serde` says a duration key expects.
const HUMANTIME_EXPECTED: &str = "a duration";
/// What `bytesize` says a size key expects: any value, an unparsable string, a negative integer.
const BYTESIZE_EXPECTED: [&str; 3] = [
    "an integer or string",
    "parsable string",
    "integer overflow",
];

/// Serde's type names in words a configuration author reads.
fn plain_expected(expected: &str) -> String {
    match expected {
        HUMANTIME_EXPECTED => DURATION_EXPECTED.to_owned(),
        e if BYTESIZE_EXPECTED.contains(&e) => BYTES_EXPECTED.to_owned(),
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer".to_owned(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "a boolean" | "a string" => expected.to_owned(),
        "a sequence" => "a list".to_owned(),
        "a map" => "a table".to_owned(),
        other if other.starts_with("struct ") => "a table".to_owned(),
        other if other.starts_with("an unsigned ") => "a non-negative integer".to_owned(),
        other => other.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_names_map_to_keys() {
        assert_eq!(override_key("PATCHWIRE__SERVER__LISTEN"), "server.listen");
        assert_eq!(override_key("PATCHWIRE__STREAMS__0__URL"), "streams[0].url");
        assert_eq!(
            indexed_override_name("PATCHWIRE__STREAMS__12__HEADERS__X_KEY"),
            "PATCHWIRE__STREAMS[12]__HEADERS__X_KEY"
        );
        assert!(is_override("PATCHWIRE__LOG__FORMAT"));
        assert!(is_override("patchwire__log__format"));
        assert!(!is_override("PATCHWIRE_LOG"));
        assert!(!is_override("PATCHWIRE__"));
        assert!(!is_override("OTHER__LOG"));
        assert!(
            !is_override("PATCHWIRE_\u{e9}__LOG"),
            "a multi-byte character across the prefix"
        );
    }

    #[test]
    fn explains_serde_messages() {
        let p = explain(
            "server.listn",
            DeError("unknown field `listn`, expected one of `listen`, `retry`".to_owned()),
            None,
        );
        assert_eq!(p.key, "server.listn");
        assert_eq!(
            p.message,
            "unknown key `listn`; valid keys here: listen, retry"
        );
        let p = explain(
            "streams[0]",
            DeError("missing field `url`".to_owned()),
            None,
        );
        assert_eq!(p.key, "streams[0].url");
        let p = explain(
            "streams[0].history",
            DeError("invalid type: string \"x\", expected u64".to_owned()),
            None,
        );
        assert_eq!(
            p.message,
            "expected a non-negative integer, got string \"x\""
        );
    }

    /// The `streams[0].<key>` of a one-stream file that sets `line`, or the problem there.
    fn stream_key(line: &str) -> Result<RawConfig, String> {
        let text = format!("[[streams]]\nname = \"a\"\nurl = \"http://a.example/\"\n{line}\n");
        parse_raw(&text, FileKind::Toml, None, Vec::new()).map_err(|e| e.to_string())
    }

    #[test]
    fn durations_parse_humantime_strings_and_reject_bare_numbers() {
        let d = stream_key("interval = \"1h 30m\"").unwrap().streams[0].interval;
        assert_eq!(d, Some(std::time::Duration::from_secs(5400)));
        let d = stream_key("interval = \"500ms\"").unwrap().streams[0].interval;
        assert_eq!(d, Some(std::time::Duration::from_millis(500)));
        let err = stream_key("interval = \"5\"").unwrap_err();
        assert!(err.contains("expected a duration"), "{err}");
        assert!(
            err.contains("time unit needed"),
            "the parser's reason: {err}"
        );
        let err = stream_key("interval = 5").unwrap_err();
        assert!(err.contains("a duration with a unit"), "{err}");
    }

    #[test]
    fn byte_counts_accept_integers_and_size_strings() {
        let size =
            |line: &str| stream_key(line).map(|raw| raw.streams[0].max_body.map(|b| b.as_u64()));
        assert_eq!(size("max_body = 2048").unwrap(), Some(2048));
        assert_eq!(
            size("max_body = \"16 MiB\"").unwrap(),
            Some(16 * 1024 * 1024)
        );
        assert_eq!(size("max_body = \"512KB\"").unwrap(), Some(512_000));
        assert_eq!(size("max_body = \"4096\"").unwrap(), Some(4096));
        let err = size("max_body = -1").unwrap_err();
        assert!(err.contains("a size in bytes"), "{err}");
        let err = size("max_body = \"lots\"").unwrap_err();
        assert!(err.contains("a size in bytes"), "{err}");
        assert!(err.contains("couldn't parse"), "the parser's reason: {err}");
        let err = size("max_body = 1.5").unwrap_err();
        assert!(err.contains("a size in bytes"), "{err}");
    }
}
