//! The dashboard at `/ui`: a page that logs in, shows the sites with the health of each link,
//! and the caller's tasks across sites with live progress.
//!
//! The page is plain HTML, JavaScript and CSS (no framework, no build step), embedded in the
//! binary, so every site serves its own dashboard and an upgrade can never pair a new page
//! with an old server. The page is just another client of the API: it logs in itself and
//! sends its token with each call, so these routes need no session.
//!
//! Every answer carries a strict Content-Security-Policy: code and styles only from this
//! origin, nothing inline, no framing, and Trusted Types, so that text from a task (a
//! resource name, an error message) can only ever be shown as text, never run.

use std::sync::LazyLock;

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::extract::Origin;

/// What the page may load and do. `default-src 'self'` keeps everything on this origin (no
/// CDN); the rest closes what `default-src` does not cover: plugins, `<base>` rewrites, form
/// posts elsewhere (the login form is sent by script; without it nothing is submitted, so a
/// password never lands in a URL), framing (clickjacking), and string-to-code sinks.
pub(crate) const POLICY: &str = "default-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'";

/// Browsers revalidate every time (a 304 when unchanged, via the ETag): the files change with
/// the binary, and a cached `app.js` that outlived an upgrade would talk to an API it was not
/// written for.
const CACHING: &str = "no-cache";

/// One embedded file.
struct Asset {
    /// The name under `/ui/`.
    name: &'static str,
    body: &'static str,
    content_type: &'static str,
    /// A strong validator of `body`, computed once.
    etag: HeaderValue,
}

fn asset(name: &'static str, body: &'static str, content_type: &'static str) -> Asset {
    let digest = Sha256::digest(body.as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    Asset {
        name,
        body,
        content_type,
        // Hex digits and quotes are always a valid header value.
        etag: HeaderValue::from_str(&format!("\"{hex}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("\"0\"")),
    }
}

static ASSETS: LazyLock<[Asset; 3]> = LazyLock::new(|| {
    [
        asset(
            "index.html",
            include_str!("../ui/index.html"),
            "text/html; charset=utf-8",
        ),
        asset(
            "app.js",
            include_str!("../ui/app.js"),
            "text/javascript; charset=utf-8",
        ),
        asset(
            "style.css",
            include_str!("../ui/style.css"),
            "text/css; charset=utf-8",
        ),
    ]
});

/// `GET /ui` and `GET /ui/`: the page.
pub(crate) async fn index(Origin(origin): Origin, headers: HeaderMap) -> Response {
    answer(origin.is_some(), "index.html", &headers)
}

/// `GET /ui/{asset}`: the page's script and style sheet.
pub(crate) async fn file(Origin(origin): Origin, uri: Uri, headers: HeaderMap) -> Response {
    // The route guarantees the prefix; anything else is simply not an asset.
    let name = uri.path().strip_prefix("/ui/").unwrap_or_default();
    answer(origin.is_some(), name, &headers)
}

/// The answer for the asset `name`. Not served on the peer link: a peer has no use for it,
/// and the link should offer nothing it does not need.
fn answer(from_peer: bool, name: &str, request: &HeaderMap) -> Response {
    let Some(asset) = ASSETS
        .iter()
        .find(|a| a.name == name)
        .filter(|_| !from_peer)
    else {
        return ApiError::NoRoute.into_response();
    };
    let unchanged = request
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag.as_bytes() == asset.etag.as_bytes());
    let mut response = if unchanged {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = asset.body.into_response();
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
        r
    };
    let headers = response.headers_mut();
    headers.insert(ETAG, asset.etag.clone());
    headers.insert(CACHE_CONTROL, HeaderValue::from_static(CACHING));
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    // The content types above are the only reading of these bytes a browser may use.
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Browsers without `frame-ancestors`.
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(from_peer: bool, name: &str, if_none_match: Option<&str>) -> Response {
        let mut headers = HeaderMap::new();
        if let Some(tag) = if_none_match {
            headers.insert(IF_NONE_MATCH, HeaderValue::from_str(tag).unwrap());
        }
        answer(from_peer, name, &headers)
    }

    fn header(r: &Response, name: impl axum::http::header::AsHeaderName) -> &str {
        r.headers().get(name).unwrap().to_str().unwrap()
    }

    #[test]
    fn assets_have_their_types_and_the_policy() {
        let cases = [
            ("index.html", "text/html; charset=utf-8"),
            ("app.js", "text/javascript; charset=utf-8"),
            ("style.css", "text/css; charset=utf-8"),
        ];
        for (name, content_type) in cases {
            let r = get(false, name, None);
            assert_eq!(r.status(), StatusCode::OK, "{name}");
            assert_eq!(header(&r, CONTENT_TYPE), content_type, "{name}");
            assert_eq!(header(&r, CONTENT_SECURITY_POLICY), POLICY, "{name}");
            assert_eq!(header(&r, CACHE_CONTROL), "no-cache", "{name}");
            assert_eq!(header(&r, X_CONTENT_TYPE_OPTIONS), "nosniff", "{name}");
        }
    }

    #[test]
    fn unknown_names_and_the_peer_link_get_no_asset() {
        for (from_peer, name) in [
            (false, ""),
            (false, "nope.js"),
            (false, "../Cargo.toml"),
            (false, "app.js/"),
            (true, "index.html"),
            (true, "app.js"),
        ] {
            let r = get(from_peer, name, None);
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{from_peer} {name}");
            assert!(r.headers().get(CONTENT_SECURITY_POLICY).is_none());
        }
    }

    #[test]
    fn revalidation_answers_not_modified() {
        let etag = header(&get(false, "app.js", None), ETAG).to_owned();
        let cases = [
            (Some(etag.as_str()), StatusCode::NOT_MODIFIED),
            (Some(&*format!("\"x\", W/{etag}")), StatusCode::NOT_MODIFIED),
            (Some("*"), StatusCode::NOT_MODIFIED),
            (Some("\"stale\""), StatusCode::OK),
            (None, StatusCode::OK),
        ];
        for (tag, status) in cases {
            let r = get(false, "app.js", tag);
            assert_eq!(r.status(), status, "{tag:?}");
            assert_eq!(header(&r, ETAG), etag);
        }
    }

    /// The policy forbids inline code and string-to-code sinks; the browser would silently
    /// refuse them, so catch them here, where the failure names the cause.
    #[test]
    fn the_page_needs_nothing_the_policy_forbids() {
        let html = include_str!("../ui/index.html").to_ascii_lowercase();
        for script in html.split("<script").skip(1) {
            let tag = script.split('>').next().unwrap_or_default();
            assert!(tag.contains("src=\"/ui/"), "inline script: <script{tag}>");
        }
        for forbidden in [" style=", "<style", "javascript:", "http://", "https://"] {
            assert!(!html.contains(forbidden), "index.html has {forbidden}");
        }
        assert!(
            !html
                .split(|c: char| c.is_whitespace())
                .any(|word| word.starts_with("on") && word.contains('=')),
            "index.html has an inline event handler"
        );
        let js = include_str!("../ui/app.js");
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            "setAttribute('style'",
        ] {
            assert!(!js.contains(sink), "app.js uses {sink}");
        }
    }
}
