//! The live console at `/`: a page built into the binary (HTML, CSS and JavaScript embedded
//! at build time; no build step, nothing fetched from elsewhere) that shows what any client
//! can get from the public API (`/streams`, the streams' SSE and JSON views) and, with the
//! admin token typed into the page, the webhook admin API. It costs the server nothing while
//! nobody looks: the page does all the work and pauses when hidden.
//!
//! Served with a strict Content-Security-Policy (scripts, styles and connections to this
//! origin only, no inline code), a strong `ETag` per file (`304` on `If-None-Match`) and
//! `Cache-Control: no-cache`, so a browser revalidates and a new binary's console is seen at
//! once. A client that accepts gzip gets each file gzip-compressed (compressed once, at its
//! first such request), with a tag of its own and `Vary: Accept-Encoding`.

use std::sync::OnceLock;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use sha2::{Digest as _, Sha256};

use crate::api::subscribe::accepts_gzip;

/// The policy every console file is served with: nothing but this origin, no inline code,
/// no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One embedded file, and what is computed of it once.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    /// Its tag and its gzip representation's.
    tags: OnceLock<(String, String)>,
    /// Its gzip representation, made at the first request that accepts it.
    gzip: OnceLock<Bytes>,
}

impl Asset {
    const fn new(body: &'static [u8], content_type: &'static str) -> Asset {
        Asset {
            body,
            content_type,
            tags: OnceLock::new(),
            gzip: OnceLock::new(),
        }
    }

    fn tags(&self) -> &(String, String) {
        self.tags.get_or_init(|| {
            let plain = etag(self.body);
            let gzip = format!("{}+gzip\"", plain.trim_end_matches('"'));
            (plain, gzip)
        })
    }

    fn gzip(&self) -> Bytes {
        self.gzip
            .get_or_init(|| crate::wire::gzip::member(self.body, crate::wire::gzip::Level::BEST))
            .clone()
    }
}

static INDEX: Asset = Asset::new(include_bytes!("index.html"), "text/html; charset=utf-8");
static SCRIPT: Asset = Asset::new(
    include_bytes!("console.js"),
    "text/javascript; charset=utf-8",
);
static STYLE: Asset = Asset::new(include_bytes!("console.css"), "text/css; charset=utf-8");
static ICON: Asset = Asset::new(include_bytes!("icon.svg"), "image/svg+xml");

/// The console's routes: `/` and its files under `/console/`.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|headers: HeaderMap| serve(&INDEX, headers)))
        .route(
            "/console/console.js",
            get(|headers: HeaderMap| serve(&SCRIPT, headers)),
        )
        .route(
            "/console/console.css",
            get(|headers: HeaderMap| serve(&STYLE, headers)),
        )
        .route(
            "/console/icon.svg",
            get(|headers: HeaderMap| serve(&ICON, headers)),
        )
}

/// A strong tag naming the file's bytes.
fn etag(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

async fn serve(asset: &'static Asset, headers: HeaderMap) -> Response {
    let (plain_tag, gzip_tag) = asset.tags();
    let gzip = accepts_gzip(&headers);
    let tag = if gzip { gzip_tag } else { plain_tag };
    // Either tag names the same file: either revalidates.
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == plain_tag || t == gzip_tag || t == "*");
    let mut response = Response::new(match (matches, gzip) {
        (true, _) => Body::empty(),
        (false, true) => Body::from(asset.gzip()),
        (false, false) => Body::from(asset.body),
    });
    if matches {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
    }
    let set = response.headers_mut();
    if !matches {
        set.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        if gzip {
            set.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
    }
    set.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    if let Ok(tag) = HeaderValue::from_str(tag) {
        set.insert(header::ETAG, tag);
    }
    set.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    set.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    set.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    set.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    set.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_differ_per_file_and_are_quoted() {
        let tags = [INDEX.body, SCRIPT.body, STYLE.body, ICON.body].map(etag);
        for tag in &tags {
            assert!(
                tag.starts_with('"') && tag.ends_with('"') && tag.len() == 26,
                "{tag}"
            );
        }
        assert_eq!(
            tags.iter().collect::<std::collections::HashSet<_>>().len(),
            4
        );
    }

    #[test]
    fn the_gzip_representation_decodes_to_the_file_and_has_its_own_tag() {
        use std::io::Read as _;
        for asset in [&INDEX, &SCRIPT, &STYLE, &ICON] {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&asset.gzip()[..])
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, asset.body);
            assert!(
                asset.gzip().len() < asset.body.len(),
                "{}",
                asset.content_type
            );
            let (plain, gzip) = asset.tags();
            assert_ne!(plain, gzip);
            assert!(gzip.starts_with('"') && gzip.ends_with("+gzip\""), "{gzip}");
        }
    }
}
