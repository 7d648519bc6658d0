//! The one way a URL is shown: in logs, error messages and events, `/streams`, the admin API
//! and `patchwire check`.
//!
//! Configured URLs may carry secrets (`${VAR}` interpolation is allowed in userinfo and query
//! values; webhook URLs often hold a token). So a shown URL never has userinfo or a fragment,
//! and every query value is replaced by `REDACTED` except those of the few parameter names in
//! [`SHOWN_PARAMS`], which only ever select or shape a document. Names are kept: they tell an
//! operator which URL it is without revealing what it authenticates with.

use std::fmt;

use url::Url;

/// Query parameters whose values are shown as they are: they choose a format, a language or
/// a page, never authenticate. Matched exactly (ASCII case-insensitively).
pub const SHOWN_PARAMS: &[&str] = &["format", "lang", "limit", "offset", "page", "per_page"];

/// What replaces a hidden query value.
pub const HIDDEN: &str = "REDACTED";

/// A URL safe to show: no userinfo, no fragment, query values hidden (see the module docs).
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(String);

impl Redacted {
    /// `url` without its secrets.
    pub fn new(url: &Url) -> Self {
        let mut shown = url.clone();
        // Both only fail for URLs that cannot have userinfo (`data:`, `mailto:`), which then
        // have none to hide.
        let _ = shown.set_password(None);
        let _ = shown.set_username("");
        shown.set_fragment(None);
        if url.query().is_some() {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(name, value)| {
                    let value = if SHOWN_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(&name)) {
                        value.into_owned()
                    } else {
                        HIDDEN.to_owned()
                    };
                    (name.into_owned(), value)
                })
                .collect();
            shown.set_query(None);
            if !pairs.is_empty() {
                shown.query_pairs_mut().extend_pairs(pairs);
            }
        }
        Redacted(shown.into())
    }

    /// Only the scheme, host and port of `url` (dynamic streams: their URLs belong to the
    /// client that asked for them, so logs and events name the host only).
    pub fn host_only(url: &Url) -> Self {
        Redacted(url.origin().ascii_serialization())
    }

    /// The redacted URL.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl serde::Serialize for Redacted {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shown(url: &str) -> String {
        Redacted::new(&Url::parse(url).expect("valid URL")).to_string()
    }

    #[test]
    fn userinfo_fragment_and_query_values_are_hidden() {
        assert_eq!(
            shown("https://user:pw@example.com/v1?key=s3cret&route=12&format=json#frag"),
            "https://example.com/v1?key=REDACTED&route=REDACTED&format=json"
        );
        assert_eq!(
            shown("https://token@example.com/v1"),
            "https://example.com/v1"
        );
        assert_eq!(
            shown("http://127.0.0.1:8081/feeds/fleet"),
            "http://127.0.0.1:8081/feeds/fleet"
        );
        assert_eq!(
            shown("http://x.example/?PAGE=2&Page=3"),
            "http://x.example/?PAGE=2&Page=3"
        );
    }

    #[test]
    fn host_only_keeps_the_origin() {
        let url = Url::parse("https://u:p@api.example.com:8443/a/b?k=v").expect("valid URL");
        assert_eq!(
            Redacted::host_only(&url).as_str(),
            "https://api.example.com:8443"
        );
    }

    proptest! {
        #[test]
        fn a_secret_in_userinfo_query_or_fragment_is_never_shown(
            secret in "[A-Za-z0-9_-]{8,24}",
            name in "[a-z_]{1,10}",
        ) {
            prop_assume!(!SHOWN_PARAMS.contains(&name.as_str()) && !name.contains(&secret));
            for text in [
                format!("https://{secret}@x.example/a"),
                format!("https://u:{secret}@x.example/a"),
                format!("https://x.example/a?{name}={secret}&format=json"),
                format!("https://x.example/a#{secret}"),
            ] {
                let Ok(url) = Url::parse(&text) else { continue };
                let out = Redacted::new(&url).to_string();
                prop_assert!(!out.contains(&secret), "{out}");
            }
        }
    }
}
