//! `[server]` keys read from files.

use crate::config::{Config, ConfigError, FileKind, parse_raw};
use crate::wire::gzip::Level;

fn load(server: &str) -> Result<Config, ConfigError> {
    let text =
        format!("[[streams]]\nname = \"a\"\nurl = \"http://example.com/a\"\n\n[server]\n{server}");
    let raw = parse_raw(&text, FileKind::Toml, None, Vec::new())?;
    crate::config::validate(raw, None, &|_| None)
}

#[test]
fn gzip_level_defaults_and_takes_one_to_nine() {
    let config = load("").unwrap();
    assert_eq!(config.server.gzip_level, Level::DEFAULT);
    for level in Level::RANGE {
        let config = load(&format!("gzip_level = {level}")).unwrap();
        assert_eq!(config.server.gzip_level.get(), level);
    }
    let shown = crate::config::describe(&load("gzip_level = 3").unwrap());
    assert!(shown.contains("gzip level 3"), "{shown}");
}

#[test]
fn gzip_levels_out_of_range_are_refused_naming_the_key_and_the_range() {
    for (value, got) in [("0", "0"), ("10", "10"), ("1000000", "1000000")] {
        let err = load(&format!("gzip_level = {value}")).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "server.gzip_level", "{err}");
        assert_eq!(
            err.problems[0].message,
            format!("expected an integer from 1 to 9, got {got}"),
            "{err}"
        );
    }
    // Not a non-negative integer: refused while reading, naming the key.
    for value in ["-1", "\"fast\"", "6.5"] {
        let err = load(&format!("gzip_level = {value}")).unwrap_err();
        assert!(err.to_string().contains("gzip_level"), "{value}: {err}");
    }
}
