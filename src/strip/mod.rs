//! Stage 4, strip: find secrets the app embedded in a request, note a keyed fingerprint of
//! each (never the value), and remove them when the mode says so.
//!
//! Places inspected: `authorization` and `proxy-authorization`, the API-key headers, any
//! other header whose value is a known token format, query parameters, and URL userinfo.

mod formats;

use std::borrow::Cow;

use http::header::{AUTHORIZATION, PROXY_AUTHORIZATION};
use http::{HeaderMap, HeaderName};
use percent_encoding::percent_decode_str;
use serde::Serialize;

pub use formats::{classify, is_placeholder, known_types};

use crate::config::StripMode;
use crate::fingerprint::Fingerprinter;

/// Headers whose whole value is a credential by convention.
const API_KEY_HEADERS: &[&str] = &[
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "private-token",
    "x-vault-token",
    "x-auth-token",
    "x-access-token",
    "openai-api-key",
    "dd-api-key",
    "dd-application-key",
    "ocp-apim-subscription-key",
    "x-functions-key",
    "x-shopify-access-token",
];

/// Query parameter names that carry credentials by convention (compared lowercase).
const CREDENTIAL_PARAMS: &[&str] = &[
    "api_key",
    "apikey",
    "api-key",
    "key",
    "token",
    "access_token",
    "auth",
    "auth_token",
    "secret",
    "client_secret",
    "password",
    "passwd",
    "private_token",
];

/// One embedded secret found in a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Credential type, e.g. `openai_project_key`, `bearer`, `basic`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Where it was, e.g. `header:authorization`, `query:api_key`, `userinfo`.
    pub location: String,
    /// Keyed fingerprint of the value.
    pub fingerprint: String,
}

/// The outcome of inspecting one request.
#[derive(Debug, Default)]
pub struct StripReport {
    /// Every secret found.
    pub findings: Vec<Finding>,
    /// The rewritten path-and-query when the query or userinfo changed.
    pub new_path_and_query: Option<String>,
}

/// Inspect the request head for embedded secrets; in `strip` mode remove them from `headers`
/// and return the query without them. `block` and `report` leave the request untouched.
pub fn inspect(
    fp: &Fingerprinter,
    mode: StripMode,
    headers: &mut HeaderMap,
    query: Option<&str>,
    userinfo: Option<&str>,
) -> StripReport {
    let mut report = StripReport::default();
    let remove = mode == StripMode::Strip;

    let mut doomed: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter() {
        let Ok(v) = value.to_str() else { continue };
        let kind = if name == AUTHORIZATION || name == PROXY_AUTHORIZATION {
            authorization_kind(v)
        } else if API_KEY_HEADERS.contains(&name.as_str()) {
            (!is_placeholder(v)).then(|| classify(v.trim()).unwrap_or("api_key"))
        } else {
            classify_in_header(v)
        };
        if let Some(kind) = kind {
            report.findings.push(Finding {
                kind,
                location: format!("header:{}", name.as_str()),
                fingerprint: fp.fingerprint(credential_part(v).as_bytes()),
            });
            if !doomed.contains(name) {
                doomed.push(name.clone());
            }
        }
    }
    if remove {
        for name in doomed {
            headers.remove(name);
        }
    }

    if let Some(ui) = userinfo {
        let password = ui.split_once(':').map_or(ui, |(_, p)| p);
        report.findings.push(Finding {
            kind: "url_userinfo",
            location: "userinfo".into(),
            fingerprint: fp.fingerprint(password.as_bytes()),
        });
    }

    if let Some(q) = query {
        let mut kept: Vec<&str> = Vec::new();
        let mut changed = false;
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let name = percent_decode_str(k).decode_utf8_lossy();
            let value = decode_query_value(v);
            let kind = if CREDENTIAL_PARAMS.contains(&name.to_ascii_lowercase().as_str()) {
                (!is_placeholder(&value)).then(|| classify(&value).unwrap_or("credential_param"))
            } else {
                classify(&value).filter(|_| !is_placeholder(&value))
            };
            match kind {
                Some(kind) => {
                    report.findings.push(Finding {
                        kind,
                        location: format!("query:{name}"),
                        fingerprint: fp.fingerprint(value.as_bytes()),
                    });
                    changed = true;
                }
                None => kept.push(pair),
            }
        }
        if remove && changed {
            report.new_path_and_query = Some(kept.join("&"));
        }
    }
    if remove && userinfo.is_some() && report.new_path_and_query.is_none() {
        report.new_path_and_query = query.map(str::to_owned);
    }
    report
}

fn decode_query_value(v: &str) -> Cow<'_, str> {
    if v.contains('+') {
        Cow::Owned(
            percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned(),
        )
    } else {
        percent_decode_str(v).decode_utf8_lossy()
    }
}

/// `authorization` values are credentials whatever their shape, unless a placeholder.
fn authorization_kind(v: &str) -> Option<&'static str> {
    let (scheme, rest) = v.trim().split_once(' ').unwrap_or(("", v.trim()));
    let token = rest.trim();
    if is_placeholder(token) {
        return None;
    }
    Some(match scheme.to_ascii_lowercase().as_str() {
        "basic" => "basic",
        "bearer" | "token" => classify(token).unwrap_or("bearer"),
        _ => classify(token).unwrap_or("authorization"),
    })
}

/// Any other header: a known token format as the value, or as a `Bearer`-style value.
fn classify_in_header(v: &str) -> Option<&'static str> {
    let t = credential_part(v);
    classify(t).filter(|_| !is_placeholder(t))
}

/// The credential within a header value: after an auth scheme if there is one.
fn credential_part(v: &str) -> &str {
    let v = v.trim();
    match v.split_once(' ') {
        Some((scheme, rest))
            if !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphabetic()) =>
        {
            rest.trim()
        }
        _ => v,
    }
}

/// Render a query with every value redacted, for the log: `a=<redacted>&b=<redacted>`.
pub fn redact_query(q: &str) -> String {
    q.split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) => format!("{k}=<redacted>"),
            None => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn key() -> String {
        format!("sk-proj-{}", "Zx9_".repeat(12))
    }

    #[test]
    fn strips_headers_and_query() {
        let fp = Fingerprinter::new(b"0123456789abcdef0123456789abcdef");
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {}", key())).unwrap(),
        );
        h.insert(
            "x-api-key",
            HeaderValue::from_static("raw-secret-value-123"),
        );
        h.insert("x-custom", HeaderValue::from_str(&key()).unwrap());
        h.insert("accept", HeaderValue::from_static("application/json"));
        h.insert(
            "x-request-id",
            HeaderValue::from_static("550e8400-e29b-41d4-a716-446655440000"),
        );
        let q = format!("model=gpt&api_key={}&n=1", key());
        let r = inspect(&fp, StripMode::Strip, &mut h, Some(&q), None);
        let kinds: Vec<_> = r
            .findings
            .iter()
            .map(|f| (f.kind, f.location.as_str()))
            .collect();
        assert!(
            kinds.contains(&("openai_project_key", "header:authorization")),
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&("api_key", "header:x-api-key")),
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&("openai_project_key", "header:x-custom")),
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&("openai_project_key", "query:api_key")),
            "{kinds:?}"
        );
        assert_eq!(r.findings.len(), 4);
        assert!(
            h.get("authorization").is_none()
                && h.get("x-api-key").is_none()
                && h.get("x-custom").is_none()
        );
        assert!(h.get("accept").is_some() && h.get("x-request-id").is_some());
        assert_eq!(r.new_path_and_query.as_deref(), Some("model=gpt&n=1"));
        // The same key gets the same fingerprint wherever it was, and never shows itself.
        let fps: Vec<_> = r
            .findings
            .iter()
            .filter(|f| f.kind == "openai_project_key")
            .map(|f| &f.fingerprint)
            .collect();
        assert!(fps.windows(2).all(|w| w[0] == w[1]));
        assert!(!format!("{r:?}").contains(&key()));
    }

    #[test]
    fn report_and_block_leave_the_request_alone() {
        let fp = Fingerprinter::new(b"0123456789abcdef0123456789abcdef");
        for mode in [StripMode::Report, StripMode::Block] {
            let mut h = HeaderMap::new();
            h.insert(
                "authorization",
                HeaderValue::from_static("Basic dXNlcjpwYXNzd29yZA=="),
            );
            let r = inspect(&fp, mode, &mut h, Some("key=abcdefgh12345678"), None);
            assert_eq!(r.findings.len(), 2);
            assert!(h.get("authorization").is_some());
            assert!(r.new_path_and_query.is_none());
        }
    }

    #[test]
    fn placeholders_pass() {
        let fp = Fingerprinter::new(b"0123456789abcdef0123456789abcdef");
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer ${OPENAI_API_KEY}"),
        );
        h.insert("x-api-key", HeaderValue::from_static("<your-key>"));
        let r = inspect(&fp, StripMode::Strip, &mut h, Some("key=sk-..."), None);
        assert!(r.findings.is_empty(), "{:?}", r.findings);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn redacts_query_values() {
        assert_eq!(
            redact_query("a=1&key=s3cret&flag"),
            "a=<redacted>&key=<redacted>&flag"
        );
    }
}
