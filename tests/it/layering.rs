//! The layers of `src/`: the graph of `crate::<module>` references between the top-level
//! modules (outside `#[cfg(test)]` code) has no cycle, and the bottom layers, `wire` and
//! `validation`, reference nothing else of the crate.
//!
//! The sources are read as tokens (comments, strings and character literals skipped), from
//! `src/lib.rs` down the `mod` declarations, so a file only a test module declares is not read.
//! A reference is a path starting with `crate::` (`use crate::{a, b::c}` names `a` and `b`),
//! or one whose `super::`s climb to the crate root.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers that import nothing else of the crate.
const BOTTOM: [&str; 2] = ["wire", "validation"];

/// From each top-level module to the top-level modules it references, each reference with
/// the first place (`file:line`) it is made.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

#[test]
fn the_top_level_modules_reference_each_other_without_a_cycle() {
    let graph = crate_graph();
    // The scanner sees the references everyone knows of.
    for (from, to) in [("hub", "wire"), ("api", "hub"), ("app", "config")] {
        assert!(
            graph[from].contains_key(to),
            "no reference from {from} to {to} found: {graph:#?}"
        );
    }
    if let Some(cycle) = cycle(&graph) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|w| format!("{} → {} ({})", w[0], w[1], graph[&w[0]][&w[1]]))
            .collect();
        panic!(
            "the modules reference each other in a cycle: {}\n{}",
            cycle.join(" → "),
            steps.join("\n")
        );
    }
}

#[test]
fn wire_and_validation_reference_nothing_else_of_the_crate() {
    let graph = crate_graph();
    for bottom in BOTTOM {
        let references = &graph[bottom];
        assert!(
            references.is_empty(),
            "{bottom} is a bottom layer, yet references {}",
            references
                .iter()
                .map(|(to, at)| format!("{to} ({at})"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

#[test]
fn references_are_found_where_code_makes_them_only() {
    let source = r##"
//! Not here: crate::doc_comment
use crate::{alpha, beta::Thing};
use crate::gamma::delta as _;
use super::super::epsilon::X;
const TEXT: &str = "crate::in_a_string";
const RAW: &str = r#"crate::in_a_raw_string"#;
const QUOTE: char = '"';
fn f<'a>(x: &'a str) -> char { let _ = crate::zeta::call(); '{' }
/* crate::block_comment /* nested */ crate::still_comment */
#[cfg(test)]
mod tests {
    use crate::only_tests;
}
#[cfg(test)]
use crate::only_tests_too;
mod inline {
    use super::super::eta;
}
"##;
    // The file is the module `m::n`: two `super`s reach the root from `n`, three from
    // `n::inline`.
    let found: BTreeSet<String> = references(source, &["m".into(), "n".into()])
        .into_iter()
        .map(|(module, _)| module)
        .collect();
    let expected = ["alpha", "beta", "gamma", "epsilon", "zeta"];
    assert_eq!(found, expected.iter().map(|m| m.to_string()).collect());
}

#[test]
fn a_cycle_is_reported_with_its_path() {
    let mut graph = Graph::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e")] {
        graph
            .entry(from.into())
            .or_default()
            .insert(to.into(), String::new());
        graph.entry(to.into()).or_default();
    }
    assert_eq!(cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    graph.get_mut("c").unwrap().remove("a");
    assert_eq!(cycle(&graph), None);
}

/// The reference graph of `src/`.
fn crate_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = src.join("lib.rs");
    let text = read(&lib);
    let modules = declared_modules(&text);
    let mut graph: Graph = modules
        .iter()
        .map(|name| (name.clone(), BTreeMap::new()))
        .collect();
    for name in modules {
        let file = module_file(&src, &name);
        visit(&src, &file, vec![name], &mut graph);
    }
    graph
}

/// Reads `file` (the module at `path`) and the modules it declares, adding their references.
fn visit(src: &Path, file: &Path, path: Vec<String>, graph: &mut Graph) {
    let text = read(file);
    let shown = file.strip_prefix(src.parent().unwrap()).unwrap_or(file);
    for (module, line) in references(&text, &path) {
        if module != path[0] && graph.contains_key(&module) {
            graph
                .get_mut(&path[0])
                .unwrap()
                .entry(module)
                .or_insert_with(|| format!("{}:{line}", shown.display()));
        }
    }
    // `a.rs` and `a/mod.rs` declare their children in `a/`.
    let dir = if file.file_name().is_some_and(|name| name == "mod.rs") {
        file.parent().unwrap().to_path_buf()
    } else {
        file.with_extension("")
    };
    for child in declared_modules(&text) {
        let mut child_path = path.clone();
        child_path.push(child.clone());
        visit(src, &module_file(&dir, &child), child_path, graph);
    }
}

fn read(file: &Path) -> String {
    std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
}

/// `dir/name.rs` or `dir/name/mod.rs`.
fn module_file(dir: &Path, name: &str) -> PathBuf {
    let flat = dir.join(format!("{name}.rs"));
    if flat.exists() {
        flat
    } else {
        dir.join(name).join("mod.rs")
    }
}

/// A token of Rust source: an identifier or keyword, `::`, or one punctuation character.
#[derive(Debug, Clone, PartialEq)]
struct Token {
    text: String,
    line: usize,
}

/// The tokens of `source` that paths and items are made of; comments, string, byte-string and
/// character literals and lifetimes are left out, numbers kept as identifiers.
fn tokens(source: &str) -> Vec<Token> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let (mut i, mut line) = (0, 1);
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            loop {
                match (at(i), at(i + 1)) {
                    ('/', '*') => (depth, i) = (depth + 1, i + 2),
                    ('*', '/') => (depth, i) = (depth - 1, i + 2),
                    ('\0', _) => break,
                    (c, _) => {
                        line += usize::from(c == '\n');
                        i += 1;
                    }
                }
                if depth == 0 {
                    break;
                }
            }
        } else if let Some(end) = raw_string_end(&chars, i) {
            line += chars[i..end].iter().filter(|c| **c == '\n').count();
            i = end;
        } else if c == '"' || (c == 'b' && at(i + 1) == '"') {
            i += if c == 'b' { 2 } else { 1 };
            while i < chars.len() && chars[i] != '"' {
                let step = if chars[i] == '\\' { 2 } else { 1 };
                line += chars[i..(i + step).min(chars.len())]
                    .iter()
                    .filter(|c| **c == '\n')
                    .count();
                i += step;
            }
            i += 1;
        } else if c == '\'' || (c == 'b' && at(i + 1) == '\'') {
            let start = if c == 'b' { i + 1 } else { i };
            if at(start + 1) == '\\' {
                // An escaped character: '\n', '\'', '\u{..}'.
                i = start + 3;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(start + 2) == '\'' {
                i = start + 3;
            } else {
                // A lifetime: its name follows as an identifier.
                i = start + 1;
            }
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            // `r#type` is the identifier `type`.
            if at(i) == '#' && i - start == 1 && c == 'r' {
                i += 1;
                continue;
            }
            tokens.push(Token {
                text: chars[start..i].iter().collect(),
                line,
            });
        } else if c == ':' && at(i + 1) == ':' {
            tokens.push(Token {
                text: "::".into(),
                line,
            });
            i += 2;
        } else {
            tokens.push(Token {
                text: c.to_string(),
                line,
            });
            i += 1;
        }
    }
    tokens
}

/// Where the raw (byte) string starting at `i` ends, if one starts there.
fn raw_string_end(chars: &[char], i: usize) -> Option<usize> {
    let mut j = i;
    if chars.get(j) == Some(&'b') {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = chars[j..].iter().take_while(|c| **c == '#').count();
    j += hashes;
    if chars.get(j) != Some(&'"') {
        return None;
    }
    j += 1;
    while j < chars.len() {
        if chars[j] == '"'
            && chars[j + 1..]
                .iter()
                .take(hashes)
                .filter(|c| **c == '#')
                .count()
                == hashes
        {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    Some(chars.len())
}

/// The tokens of `source` without the items marked `#[cfg(test)]` (and without any file whose
/// inner attribute is `#![cfg(test)]`).
fn outside_tests(source: &str) -> Vec<Token> {
    let tokens = tokens(source);
    let text = |i: usize| tokens.get(i).map_or("", |t| t.text.as_str());
    let mut kept = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if text(i) == "#" && (text(i + 1) == "[" || (text(i + 1) == "!" && text(i + 2) == "[")) {
            let open = if text(i + 1) == "!" { i + 2 } else { i + 1 };
            let close = matching(&tokens, open);
            let attribute: Vec<&str> = (open + 1..close).map(text).collect();
            if attribute == ["cfg", "(", "test", ")"] {
                if text(i + 1) == "!" {
                    return Vec::new();
                }
                i = item_end(&tokens, close + 1);
            } else {
                kept.extend_from_slice(&tokens[i..=close]);
                i = close + 1;
            }
        } else {
            kept.push(tokens[i].clone());
            i += 1;
        }
    }
    kept
}

/// The index of the bracket closing the one at `open`.
fn matching(tokens: &[Token], open: usize) -> usize {
    let mut depth = 0;
    for (i, token) in tokens.iter().enumerate().skip(open) {
        match token.text.as_str() {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    tokens.len() - 1
}

/// The index after the item starting at `start` (after its own attributes): past its `;` or
/// its body's closing brace.
fn item_end(tokens: &[Token], start: usize) -> usize {
    let mut i = start;
    while i < tokens.len() {
        match tokens[i].text.as_str() {
            "#" => i = matching(tokens, i + 1) + 1,
            ";" => return i + 1,
            "{" => return matching(tokens, i) + 1,
            "(" | "[" => i = matching(tokens, i) + 1,
            _ => i += 1,
        }
    }
    i
}

/// The modules `source` declares with `mod name;` outside test code.
fn declared_modules(source: &str) -> Vec<String> {
    let tokens = outside_tests(source);
    tokens
        .windows(3)
        .filter(|w| w[0].text == "mod" && w[2].text == ";")
        .map(|w| w[1].text.clone())
        .collect()
}

/// The top-level modules `source`, the module at `path`, references outside test code, each
/// with the line of the reference.
fn references(source: &str, path: &[String]) -> Vec<(String, usize)> {
    let tokens = outside_tests(source);
    let text = |i: usize| tokens.get(i).map_or("", |t| t.text.as_str());
    let previous = |i: usize| i.checked_sub(1).map_or("", text);
    let mut found = Vec::new();
    // Inline modules opened and not yet closed: their names and the depth of their brace.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        match text(i) {
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            "mod" if text(i + 2) == "{" => {
                inline.push((text(i + 1).to_owned(), depth));
            }
            "crate" if text(i + 1) == "::" && previous(i) != "::" => {
                if text(i + 2) == "{" {
                    // `crate::{a, b::{c, d}}`: the first name of each element of the group.
                    let close = matching(&tokens, i + 2);
                    let (mut nested, mut first) = (0, true);
                    for token in &tokens[i + 3..close] {
                        match token.text.as_str() {
                            "{" => nested += 1,
                            "}" => nested -= 1,
                            "," if nested == 0 => first = true,
                            name if first && nested == 0 => {
                                found.push((name.to_owned(), token.line));
                                first = false;
                            }
                            _ => {}
                        }
                    }
                    i = close;
                } else {
                    found.push((text(i + 2).to_owned(), tokens[i].line));
                }
            }
            "super" if previous(i) != "::" => {
                let mut climbs = 0;
                let mut j = i;
                while text(j) == "super" && text(j + 1) == "::" {
                    climbs += 1;
                    j += 2;
                }
                let here = path.len() + inline.len();
                if climbs > 0 && climbs == here {
                    found.push((text(j).to_owned(), tokens[j].line));
                }
                // Past the path; `pub(super)` is one token.
                i = j.max(i + 1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// A cycle of `graph`, as the modules along it (the first again at the end), if there is one.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn walk<'a>(
        graph: &'a Graph,
        node: &'a str,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = stack[at..].iter().map(|n| n.to_string()).collect();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        stack.push(node);
        for next in graph[node].keys() {
            if let Some(cycle) = walk(graph, next, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| walk(graph, node, &mut Vec::new(), &mut done))
}
