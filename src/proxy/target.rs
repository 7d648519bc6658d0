//! The request target of a dynamic stream: `/{upstream URL}` with the proxy's own parameters
//! (`X-Sd-Token`, `X-Sd-Header`, and the signature's `X-Auth-Sd-Ts`, `X-Auth-Sd-S`) taken out
//! of the query: never forwarded upstream, never part of the stream's identity. Pure.
//!
//! Both spellings Streamdata.io clients use are accepted: the URL appended as is
//! (`/https://api.example.com/v1/prices?currency=eur&X-Sd-Token=…`) and the URL
//! percent-encoded as one segment (`/https%3A%2F%2Fapi.example.com%2Fv1%2Fprices?X-Sd-Token=…`).
//! Query parameters that are not the proxy's are forwarded byte for byte, in their order.

use http::{HeaderName, HeaderValue};
use url::Url;

use super::signature::{SIGNATURE_PARAM, Signed, TIMESTAMP_PARAM};

/// The query parameter (and request header) carrying the client's application token.
pub const TOKEN_PARAM: &str = "X-Sd-Token";
/// The repeatable query parameter carrying a header to send upstream, as `Name: value`.
pub const HEADER_PARAM: &str = "X-Sd-Header";
/// The view's RFC 9535 filter expression over each entity (query parameter or header).
pub const WHERE_PARAM: &str = "X-Sd-Where";
/// The view's fields of each entity, comma-separated JSON Pointers (query parameter or header).
pub const FIELDS_PARAM: &str = "X-Sd-Fields";
/// The JSON Pointer of the entity array views select from (query parameter or header).
pub const ENTITIES_PARAM: &str = "X-Sd-Entities";
/// The JSON Pointer, inside an entity, of the field that identifies it (query parameter or
/// header).
pub const KEY_PARAM: &str = "X-Sd-Key";
/// The view parameters, in the order [`ViewParams::get`] takes.
pub const VIEW_PARAMS: [&str; 4] = [WHERE_PARAM, FIELDS_PARAM, ENTITIES_PARAM, KEY_PARAM];

/// A view of the dynamic stream, as asked (`X-Sd-Where`, `X-Sd-Fields`, `X-Sd-Entities`,
/// `X-Sd-Key`): never sent upstream, never part of the stream's identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewParams {
    /// `X-Sd-Where`, `X-Sd-Fields`, `X-Sd-Entities`, `X-Sd-Key`, decoded.
    pub values: [Option<String>; 4],
}

impl ViewParams {
    /// The value of parameter `name` (one of [`VIEW_PARAMS`]).
    pub fn get(&self, name: &str) -> Option<&str> {
        let i = VIEW_PARAMS
            .iter()
            .position(|p| p.eq_ignore_ascii_case(name))?;
        self.values[i].as_deref()
    }

    /// Whether a view is asked for.
    pub fn is_empty(&self) -> bool {
        self.values.iter().all(Option::is_none)
    }

    /// Fills what the query string did not give from the request's headers of the same names.
    pub fn or_headers(&mut self, headers: &http::HeaderMap) {
        for (value, name) in self.values.iter_mut().zip(VIEW_PARAMS) {
            if value.is_none() {
                *value = headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| v.trim().to_owned());
            }
        }
    }
}

/// Headers a client may not set upstream: the HTTP client manages them, or they would let a
/// client defeat the shared poller's conditional requests.
const MANAGED_HEADERS: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "content-type",
    "accept-encoding",
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    "if-range",
    "range",
    "expect",
];

/// A dynamic stream request, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The upstream URL, the proxy's parameters removed.
    pub url: Url,
    /// Headers to send upstream (from `X-Sd-Header`), in the order given.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The token from the query string, if any.
    pub token: Option<String>,
    /// The Streamdata.io signature (`X-Auth-Sd-Ts`, `X-Auth-Sd-S`), if either was sent; a
    /// missing half is empty (and fails verification).
    pub signed: Option<Signed>,
    /// The view asked for in the query string (the request's headers may add to it).
    pub view: ViewParams,
}

/// Why a request target is not a stream the proxy can open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not an absolute http(s) URL after the proxy's origin.
    #[error(
        "expected an absolute http or https URL after the proxy's address, e.g. \
         /https://api.example.com/v1/prices, got {0:?}"
    )]
    NotAUrl(String),
    /// The URL does not parse.
    #[error("the upstream URL {url:?} is invalid: {reason}")]
    Invalid {
        /// The URL as it would have been requested.
        url: String,
        /// The parser's reason.
        reason: String,
    },
    /// An `X-Sd-Header` value that is not `Name: value`, or names a managed header.
    #[error("X-Sd-Header {value:?}: {reason}")]
    Header {
        /// The parameter's decoded value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Whether a request path names a dynamic stream (`/http:…`, `/https:…`, or their encoded
/// forms), as opposed to one of the proxy's own routes.
pub fn is_dynamic_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let starts = |prefix: &str| {
        rest.get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    starts("http:") || starts("https:") || starts("http%3a") || starts("https%3a")
}

/// Parses the request's path and query into the upstream URL, the headers to forward and the
/// token. `path` starts with `/`; `query` is the raw query string, if any.
pub fn parse(path: &str, query: Option<&str>) -> Result<Target, TargetError> {
    let rest = path.strip_prefix('/').unwrap_or(path);
    let lower = rest.get(..8).unwrap_or(rest).to_ascii_lowercase();
    // The encoded form: the whole URL (and possibly its own query) is one escaped segment.
    let (base, inner_query, whole) =
        if lower.starts_with("http%3a") || lower.starts_with("https%3a") {
            let decoded = percent_decode(rest)
                .filter(|d| !d.contains(['\r', '\n']))
                .ok_or_else(|| TargetError::NotAUrl(rest.to_owned()))?;
            let whole = decoded.clone();
            match decoded.split_once('?') {
                Some((base, q)) => (base.to_owned(), Some(q.to_owned()), whole),
                None => (decoded, None, whole),
            }
        } else {
            (rest.to_owned(), None, rest.to_owned())
        };
    let base = restore_double_slash(&base);
    let scheme = base.get(..8).unwrap_or(&base).to_ascii_lowercase();
    if !(scheme.starts_with("http://") || scheme.starts_with("https://")) {
        return Err(TargetError::NotAUrl(rest.to_owned()));
    }

    let mut kept: Vec<&str> = Vec::new();
    let mut headers = Vec::new();
    let mut token = None;
    let (mut timestamp, mut signature) = (None, None);
    let mut view = ViewParams::default();
    for pair in inner_query
        .as_deref()
        .into_iter()
        .chain(query)
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = form_decode(raw_name);
        if name.eq_ignore_ascii_case(TOKEN_PARAM) {
            token = Some(form_decode(raw_value)).filter(|t| !t.is_empty());
        } else if name.eq_ignore_ascii_case(HEADER_PARAM) {
            headers.push(forwarded_header(&form_decode(raw_value))?);
        } else if let Some(i) = VIEW_PARAMS
            .iter()
            .position(|p| name.eq_ignore_ascii_case(p))
        {
            view.values[i] = Some(form_decode(raw_value));
        } else if name.eq_ignore_ascii_case(TIMESTAMP_PARAM) {
            timestamp = Some(percent_decode(raw_value).unwrap_or_default());
        } else if name.eq_ignore_ascii_case(SIGNATURE_PARAM) {
            // Not form-decoded: a `+` of base64 left unescaped stays a `+`.
            signature = Some(percent_decode(raw_value).unwrap_or_default());
        } else {
            kept.push(pair);
        }
    }
    let mut upstream = base.split('#').next().unwrap_or_default().to_owned();
    if !kept.is_empty() {
        upstream.push(if upstream.contains('?') { '&' } else { '?' });
        upstream.push_str(&kept.join("&"));
    }
    let url = Url::parse(&upstream).map_err(|e| TargetError::Invalid {
        url: upstream.clone(),
        reason: e.to_string(),
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(TargetError::NotAUrl(upstream));
    }
    let signed = (timestamp.is_some() || signature.is_some()).then(|| {
        let whole = match query {
            Some(q) => format!("{whole}?{q}"),
            None => whole,
        };
        Signed {
            url: restore_double_slash(signed_url(&whole)),
            timestamp: timestamp.unwrap_or_default(),
            signature: signature.unwrap_or_default(),
        }
    });
    Ok(Target {
        url,
        headers,
        token,
        signed,
        view,
    })
}

/// The URL a Streamdata.io client signed: the request target up to the `?` or `&` before
/// `X-Auth-Sd-Ts` (the SDK appends the signature to the URL it signed, and its own
/// parameters after that); the whole target when there is none.
fn signed_url(whole: &str) -> &str {
    let marker = TIMESTAMP_PARAM.len() + 1;
    for (i, b) in whole.bytes().enumerate() {
        if (b == b'?' || b == b'&')
            && whole
                .get(i + 1..i + 1 + marker)
                .is_some_and(|p| p.eq_ignore_ascii_case(&format!("{TIMESTAMP_PARAM}=")))
        {
            return &whole[..i];
        }
    }
    whole
}

/// Some clients and intermediaries collapse `//` in paths: `https:/api.example.com` is read
/// as `https://api.example.com`.
fn restore_double_slash(base: &str) -> String {
    for scheme in ["https:", "http:"] {
        if let Some(head) = base.get(..scheme.len())
            && head.eq_ignore_ascii_case(scheme)
        {
            let after = &base[scheme.len()..];
            if after.starts_with('/') && !after.starts_with("//") {
                return format!("{scheme}/{after}");
            }
        }
    }
    base.to_owned()
}

/// `Name: value` from an `X-Sd-Header` parameter.
fn forwarded_header(value: &str) -> Result<(HeaderName, HeaderValue), TargetError> {
    let error = |reason: &str| TargetError::Header {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let (name, header_value) = value
        .split_once(':')
        .ok_or_else(|| error("expected `Name: value`"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| error("expected a header name of letters, digits and !#$%&'*+-.^_`|~"))?;
    if MANAGED_HEADERS.contains(&name.as_str()) || name.as_str().starts_with("x-sd-") {
        return Err(error(
            "this header is managed by the proxy and cannot be forwarded",
        ));
    }
    let header_value = HeaderValue::from_str(header_value.trim())
        .map_err(|_| error("expected a header value of visible characters"))?;
    Ok((name, header_value))
}

/// Decodes `application/x-www-form-urlencoded` text (`+` is a space).
fn form_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Decodes `%XX` escapes (not `+`); `None` when the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let value = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(path: &str, query: Option<&str>) -> Target {
        parse(path, query).unwrap_or_else(|e| panic!("{path}?{query:?}: {e}"))
    }

    #[test]
    fn the_proxy_parameters_are_removed_and_the_rest_kept_in_order() {
        let t = ok(
            "/https://api.example.com/v1/prices",
            Some(
                "currency=eur&X-Sd-Token=abc%2B1&b=%20x+y&X-Sd-Header=Authorization%3A%20Bearer%20s3cret&a=1&a=2",
            ),
        );
        assert_eq!(
            t.url.as_str(),
            "https://api.example.com/v1/prices?currency=eur&b=%20x+y&a=1&a=2"
        );
        assert_eq!(t.token.as_deref(), Some("abc+1"));
        assert_eq!(t.headers.len(), 1);
        assert_eq!(t.headers[0].0, "authorization");
        assert_eq!(t.headers[0].1, "Bearer s3cret");
    }

    #[test]
    fn the_signature_is_taken_out_and_the_signed_url_is_what_precedes_it() {
        let t = ok(
            "/https://api.example.com/v1/prices",
            Some("currency=eur&X-Auth-Sd-Ts=1700000000000&X-Auth-Sd-S=ab%2Bc%3D&X-Sd-Token=tok"),
        );
        assert_eq!(
            t.url.as_str(),
            "https://api.example.com/v1/prices?currency=eur"
        );
        let signed = t.signed.expect("a signature");
        assert_eq!(signed.url, "https://api.example.com/v1/prices?currency=eur");
        assert_eq!(signed.timestamp, "1700000000000");
        assert_eq!(signed.signature, "ab+c=");
        assert_eq!(t.token.as_deref(), Some("tok"));

        // A URL without a query: the SDK appends `?X-Auth-Sd-Ts=...`.
        let t = ok(
            "/https://api.example.com/v1",
            Some("X-Auth-Sd-Ts=1&X-Auth-Sd-S=x+y"),
        );
        let signed = t.signed.expect("a signature");
        assert_eq!(signed.url, "https://api.example.com/v1");
        assert_eq!(signed.signature, "x+y", "a raw + stays a +");
        assert_eq!(t.url.as_str(), "https://api.example.com/v1");
        assert!(ok("/https://api.example.com/v1", None).signed.is_none());
    }

    #[test]
    fn parameter_names_match_case_insensitively_and_repeat() {
        let t = ok(
            "/http://x.example/a",
            Some("x-sd-token=t&X-SD-HEADER=A:1&x-sd-header=B:%202"),
        );
        assert_eq!(t.url.as_str(), "http://x.example/a");
        assert_eq!(t.token.as_deref(), Some("t"));
        let names: Vec<_> = t
            .headers
            .iter()
            .map(|(n, v)| format!("{n}={}", v.to_str().unwrap()))
            .collect();
        assert_eq!(names, ["a=1", "b=2"]);
    }

    #[test]
    fn the_encoded_form_is_decoded() {
        let t = ok(
            "/https%3A%2F%2Fapi.example.com%2Fv1%2Fprices%3Fcurrency%3Deur",
            Some("X-Sd-Token=abc&limit=5"),
        );
        assert_eq!(
            t.url.as_str(),
            "https://api.example.com/v1/prices?currency=eur&limit=5"
        );
        assert_eq!(t.token.as_deref(), Some("abc"));
    }

    #[test]
    fn a_collapsed_double_slash_is_restored() {
        let t = ok("/https:/api.example.com/x", None);
        assert_eq!(t.url.as_str(), "https://api.example.com/x");
    }

    #[test]
    fn fragments_are_dropped_and_no_token_is_none() {
        let t = ok("/http://x.example/a#frag", Some("X-Sd-Token="));
        assert_eq!(t.url.as_str(), "http://x.example/a");
        assert_eq!(t.token, None);
    }

    #[test]
    fn bad_targets_are_refused_with_a_reason() {
        for (path, query) in [
            ("/ftp://x.example/a", None),
            ("/https://", None),
            ("/streams/x", None),
            ("/https%3A%2F%2F", None),
            ("/https%3A%2F%2Fx.example%0A", None),
        ] {
            assert!(parse(path, query).is_err(), "{path}");
        }
        let err = parse("/http://x.example/", Some("X-Sd-Header=NoColon")).unwrap_err();
        assert!(err.to_string().contains("expected `Name: value`"), "{err}");
        let err = parse("/http://x.example/", Some("X-Sd-Header=Host%3A%20evil")).unwrap_err();
        assert!(err.to_string().contains("managed by the proxy"), "{err}");
        let err = parse(
            "/http://x.example/",
            Some("X-Sd-Header=If-None-Match%3A%20x"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("managed by the proxy"), "{err}");
        let err = parse("/http://x.example/", Some("X-Sd-Header=A%3A%20x%0Ay")).unwrap_err();
        assert!(err.to_string().contains("visible characters"), "{err}");
    }

    #[test]
    fn view_parameters_are_taken_out_of_the_upstream_url() {
        let t = ok(
            "/https://api.example.com/v1/prices",
            Some(
                "a=1&X-Sd-Where=%40.price+%3E+2&x-sd-fields=id,price&X-Sd-Entities=/items&X-Sd-Key=/id&b=2",
            ),
        );
        assert_eq!(t.url.as_str(), "https://api.example.com/v1/prices?a=1&b=2");
        assert_eq!(t.view.get(WHERE_PARAM), Some("@.price > 2"));
        assert_eq!(t.view.get(FIELDS_PARAM), Some("id,price"));
        assert_eq!(t.view.get(ENTITIES_PARAM), Some("/items"));
        assert_eq!(t.view.get(KEY_PARAM), Some("/id"));
        let plain = ok("/https://api.example.com/v1/prices", Some("a=1&b=2"));
        assert!(plain.view.is_empty());
        assert_eq!(
            plain.url, t.url,
            "a view is not part of the upstream's identity"
        );
        let mut headers = http::HeaderMap::new();
        headers.insert("x-sd-fields", http::HeaderValue::from_static("name"));
        headers.insert("x-sd-where", http::HeaderValue::from_static("@.a == 1"));
        let mut view = t.view.clone();
        view.or_headers(&headers);
        assert_eq!(view.get(FIELDS_PARAM), Some("id,price"), "the query's wins");
        let mut view = plain.view;
        view.or_headers(&headers);
        assert_eq!(view.get(FIELDS_PARAM), Some("name"));
        assert_eq!(view.get(WHERE_PARAM), Some("@.a == 1"));
    }

    #[test]
    fn dynamic_paths_are_recognized() {
        for path in ["/http://a", "/HTTPS://a", "/https%3A%2F%2Fa", "/http%3a//a"] {
            assert!(is_dynamic_path(path), "{path}");
        }
        for path in ["/streams/a", "/", "", "/httpx", "/metrics"] {
            assert!(!is_dynamic_path(path), "{path}");
        }
    }

    proptest! {
        /// Whatever the query holds, the proxy's parameters never reach the upstream URL, and
        /// parsing never panics.
        #[test]
        fn proxy_parameters_never_reach_the_upstream(
            pairs in proptest::collection::vec(("[a-zA-Z-]{1,12}", "[ -~]{0,12}"), 0..8),
            token in "[A-Za-z0-9]{1,20}",
        ) {
            let mut query: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}={}", url::form_urlencoded::byte_serialize(k.as_bytes()).collect::<String>(),
                    url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()))
                .collect();
            query.insert(pairs.len() / 2, format!("X-Sd-Token={token}"));
            let query = query.join("&");
            if let Ok(t) = parse("/https://api.example.com/p", Some(&query)) {
                let upstream_query = t.url.query().unwrap_or("").to_ascii_lowercase();
                prop_assert!(!upstream_query.contains("x-sd-"));
                prop_assert_eq!(t.token.as_deref(), Some(token.as_str()));
            }
        }
    }
}
