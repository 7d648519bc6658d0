//! `${VAR}` references in configuration values (URLs, header values).
//!
//! `${NAME}` is replaced by the variable `NAME` (letters, digits and `_`, not starting with a
//! digit); `$${` stands for a literal `${`; any other `$` is kept as it is.

/// Why a value's `${VAR}` references could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolateError {
    /// `${NAME}` names a variable that is not set.
    #[error("references the environment variable {name} (`${{{name}}}`), which is not set")]
    Undefined {
        /// The variable's name.
        name: String,
    },
    /// A `${` without its closing `}`.
    #[error("has a `${{` at byte {at} without its closing `}}` (write `$${{` for a literal `${{`)")]
    Unterminated {
        /// Byte offset of the `${`.
        at: usize,
    },
    /// `${...}` whose content is not a variable name.
    #[error(
        "has `${{{name}}}`, expected a variable name of letters, digits and `_` between the \
         braces (write `$${{` for a literal `${{`)"
    )]
    InvalidName {
        /// What was between the braces.
        name: String,
    },
}

fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Replaces every `${NAME}` in `text` with `env(NAME)`, and `$${` with `${`.
///
/// Stops at the first problem; the replacement text is not scanned again, so a variable's value
/// may itself contain `${`.
pub fn interpolate(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, InterpolateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let at = text.len() - after.len();
            let close = tail
                .find('}')
                .ok_or(InterpolateError::Unterminated { at })?;
            let name = &tail[..close];
            if !is_valid_name(name) {
                return Err(InterpolateError::InvalidName {
                    name: name.to_owned(),
                });
            }
            let value = env(name).ok_or_else(|| InterpolateError::Undefined {
                name: name.to_owned(),
            })?;
            out.push_str(&value);
            rest = &tail[close + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The names of the variables `text` references, in order (for messages and `check`).
pub fn references(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        let after = &rest[dollar..];
        if let Some(tail) = after.strip_prefix("$${") {
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            match tail.find('}') {
                Some(close) => {
                    names.push(tail[..close].to_owned());
                    rest = &tail[close + 1..];
                }
                None => break,
            }
        } else {
            rest = &after[1..];
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cr3t".to_owned()),
            "EMPTY" => Some(String::new()),
            "NESTED" => Some("${TOKEN}".to_owned()),
            _ => None,
        }
    }

    #[test]
    fn replaces_references() {
        assert_eq!(
            interpolate("Bearer ${TOKEN}", &env).as_deref(),
            Ok("Bearer s3cr3t")
        );
        assert_eq!(
            interpolate("${TOKEN}${EMPTY}-${TOKEN}", &env).as_deref(),
            Ok("s3cr3t-s3cr3t")
        );
    }

    #[test]
    fn escapes_and_lone_dollars_are_literal() {
        assert_eq!(interpolate("$${TOKEN}", &env).as_deref(), Ok("${TOKEN}"));
        assert_eq!(interpolate("cost $5 $", &env).as_deref(), Ok("cost $5 $"));
        assert_eq!(interpolate("$$", &env).as_deref(), Ok("$$"));
        assert_eq!(interpolate("$$$${X}", &env).as_deref(), Ok("$$${X}"));
    }

    #[test]
    fn values_are_not_rescanned() {
        assert_eq!(interpolate("${NESTED}", &env).as_deref(), Ok("${TOKEN}"));
    }

    #[test]
    fn reports_undefined_unterminated_and_invalid_names() {
        assert_eq!(
            interpolate("a ${MISSING} b", &env),
            Err(InterpolateError::Undefined {
                name: "MISSING".to_owned()
            })
        );
        assert_eq!(
            interpolate("ab${TOKEN", &env),
            Err(InterpolateError::Unterminated { at: 2 })
        );
        assert_eq!(
            interpolate("${1X}", &env),
            Err(InterpolateError::InvalidName {
                name: "1X".to_owned()
            })
        );
        assert_eq!(
            interpolate("${}", &env),
            Err(InterpolateError::InvalidName {
                name: String::new()
            })
        );
        let message = InterpolateError::Undefined {
            name: "API_TOKEN".to_owned(),
        }
        .to_string();
        assert!(message.contains("API_TOKEN") && message.contains("not set"));
    }

    #[test]
    fn lists_references() {
        assert_eq!(
            references("${A}/$${B}/${C_1}/${"),
            vec!["A".to_owned(), "C_1".to_owned()]
        );
    }

    /// Escapes `text` so that interpolation gives it back unchanged.
    fn escape(text: &str) -> String {
        text.replace("${", "$${")
    }

    proptest! {
        #[test]
        fn text_without_references_is_unchanged(text in "[^$]*") {
            prop_assert_eq!(interpolate(&text, &env), Ok(text.clone()));
        }

        #[test]
        fn escaped_text_round_trips(text in "[a-z${}]{0,40}") {
            // Escaping `${` as `$${` does not round-trip when `$` precedes `${` (`$${` reads
            // as an escape), so only inputs without `$$` are compared.
            prop_assume!(!text.contains("$$"));
            prop_assert_eq!(interpolate(&escape(&text), &|_| None), Ok(text.clone()));
        }

        #[test]
        fn references_are_replaced_by_their_values(
            parts in proptest::collection::vec(("[a-z /:]{0,8}", "[A-Z_][A-Z0-9_]{0,6}"), 0..5),
            value in "[a-zA-Z0-9${}]{0,10}",
        ) {
            let text: String = parts.iter().map(|(lit, name)| format!("{lit}${{{name}}}")).collect();
            let expected: String = parts.iter().map(|(lit, _)| format!("{lit}{value}")).collect();
            let lookup = |_: &str| Some(value.clone());
            prop_assert_eq!(interpolate(&text, &lookup), Ok(expected));
        }
    }
}
