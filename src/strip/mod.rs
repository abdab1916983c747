//! Stage 4, strip: find secrets the app embedded in a request, note a keyed fingerprint of
//! each (never the value), and remove them when the mode says so.
//!
//! Places inspected, each occurrence on its own:
//! - `authorization` and `proxy-authorization` (any scheme), the API-key headers, and any
//!   other header whose value holds a known token format or whose name is a credential name
//!   with a high-entropy value;
//! - each cookie of `cookie` (only the offending cookies are removed);
//! - each query parameter (percent-decoded), URL userinfo;
//! - JSON and form bodies, field by field ([`inspect_body`]).
//!
//! In every value the detector looks for known formats anywhere in the text (a key pasted in
//! a prompt, a `.env` file in a string), then for credential-named fields with high-entropy
//! values, then for `NAME=value` / `"name": "value"` assignments inside the text.

pub(crate) mod body;
mod formats;
#[doc(hidden)]
pub mod fuzzing;
mod names;
pub(crate) mod path;

use std::borrow::Cow;
use std::path::PathBuf;

use http::header::{COOKIE, HeaderValue, SEC_WEBSOCKET_PROTOCOL};
use http::{HeaderMap, HeaderName};
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};

pub use body::{BodyKind, BodyPlan};
pub(crate) use formats::{Hit, classify, find_tokens, is_placeholder};
pub(crate) use names::named_value;

use crate::error::{ErrorCode, Rejection};
use crate::fingerprint::Fingerprinter;
/// What happens to a secret the app embedded in a request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StripMode {
    /// Remove it; the route's credential (if any) is injected in its place.
    #[default]
    Strip,
    /// Refuse the request with 403 `embedded_secret`.
    Block,
    /// Forward unchanged and log it (observe mode).
    Report,
}

impl StripMode {
    /// The name in the config and the log line.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StripMode::Strip => "strip",
            StripMode::Block => "block",
            StripMode::Report => "report",
        }
    }
}

/// Validated strip settings.
#[derive(Debug, Clone)]
pub(crate) struct StripSettings {
    /// Global mode.
    pub(crate) mode: StripMode,
    /// Largest body inspected.
    pub(crate) body_max_bytes: u64,
    /// Fingerprint key file, if any.
    pub(crate) fingerprint_key_file: Option<PathBuf>,
}

/// How a header's value is judged.
enum HeaderRule {
    /// `authorization`, `proxy-authorization`: a credential whatever its shape.
    Authorization,
    /// A header whose whole value is a credential by convention.
    ApiKey,
    /// `cookie`: each cookie on its own.
    Cookie,
    /// `sec-websocket-protocol`: each subprotocol on its own. Browser-style WebSocket clients
    /// carry keys there (OpenAI Realtime's `openai-insecure-api-key.<key>`, Deepgram's
    /// `token, <key>`), since a browser cannot set `Authorization` on a handshake.
    Subprotocols,
    /// A header whose grammar (a length, a media type, a trace context, an entity tag)
    /// leaves no room for a credential: not inspected.
    Structured,
    /// Anything else: known formats in the value, or a credential name with a high-entropy
    /// value.
    Other,
}

fn header_rule(name: &HeaderName) -> HeaderRule {
    match name.as_str() {
        "authorization" | "proxy-authorization" => HeaderRule::Authorization,
        "x-api-key"
        | "api-key"
        | "x-goog-api-key"
        | "private-token"
        | "x-vault-token"
        | "x-auth-token"
        | "x-access-token"
        | "openai-api-key"
        | "dd-api-key"
        | "dd-application-key"
        | "ocp-apim-subscription-key"
        | "x-functions-key"
        | "x-shopify-access-token"
        // An AWS session token the app signs with: a credential whatever its shape.
        | "x-amz-security-token" => HeaderRule::ApiKey,
        "cookie" => HeaderRule::Cookie,
        "sec-websocket-protocol" => HeaderRule::Subprotocols,
        "host"
        | "content-length"
        | "content-type"
        | "content-encoding"
        | "accept"
        | "accept-encoding"
        | "accept-language"
        | "connection"
        | "te"
        | "traceparent"
        | "tracestate"
        | "cache-control"
        | "pragma"
        | "if-none-match"
        | "if-match"
        | "if-modified-since"
        | "if-unmodified-since"
        | "date"
        | "expect"
        | "upgrade"
        | "keep-alive"
        | "via"
        | "chaperone-purpose"
        | "chaperone-request-id" => HeaderRule::Structured,
        _ => HeaderRule::Other,
    }
}

/// Query parameter names that carry credentials by convention (compared lowercase): any
/// value that is not a placeholder counts, entropy or not.
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
    /// Where it was: `header:NAME`, `cookie:NAME`, `query:NAME`, `userinfo`, `body:FIELD`.
    pub(crate) location: String,
    /// Keyed fingerprint of the value.
    pub(crate) fingerprint: String,
}

impl Finding {
    /// The kind of place (`header`, `cookie`, `query`, `userinfo`, `body`): a metric label
    /// of bounded cardinality.
    pub(crate) fn place(&self) -> &str {
        self.location
            .split_once(':')
            .map_or(self.location.as_str(), |(p, _)| p)
    }
}

/// The outcome of inspecting one request head.
#[derive(Debug, Default)]
pub struct StripReport {
    /// Every secret found.
    pub findings: Vec<Finding>,
    /// The rewritten query (without `?`) when the query or userinfo changed.
    pub(crate) new_path_and_query: Option<String>,
}

/// The strip stage's verdict on one request, once its head and body are inspected
/// (`findings` is all of it, `body` the body's part with the fields they were in): `Ok` when it
/// may go on (secrets in the head are already removed in strip mode), or the 403
/// `embedded_secret` that refuses it.
///
/// A secret in a body cannot be cut out without changing what the request says: in strip
/// mode it is replaced when the route's credential goes into that very field (`body_field`),
/// and otherwise refused rather than forwarded. Block mode refuses any secret; report mode
/// none.
pub(crate) fn verdict(
    mode: StripMode,
    findings: &[Finding],
    body: &[BodyFinding],
    body_field: Option<&str>,
) -> Result<(), Rejection> {
    let refused: Vec<&Finding> = match mode {
        StripMode::Block => findings.iter().collect(),
        // A secret in the path cannot be cut out either (`path`).
        StripMode::Strip => body
            .iter()
            .filter(|f| body_field != Some(f.field.as_str()))
            .map(|f| &f.finding)
            .chain(findings.iter().filter(|f| f.location == "path"))
            .collect(),
        StripMode::Report => Vec::new(),
    };
    if refused.is_empty() {
        return Ok(());
    }
    let places: Vec<String> = refused
        .iter()
        .map(|f| format!("{} in {}", f.kind, f.location))
        .collect();
    let advice = if mode == StripMode::Block {
        "remove them and let the sidecar inject credentials"
    } else if refused.iter().all(|f| f.location == "path") {
        "a secret in the URL path is not forwarded; keep capability URLs out of the app, or set the route's `strip: report`"
    } else {
        "a secret in a body is not forwarded; remove it from the app, or set the route's `inject.body_field` to the field that carries the key"
    };
    Err(Rejection::new(
        ErrorCode::EmbeddedSecret,
        format!(
            "the request carries embedded secrets ({}); {advice}",
            places.join(", ")
        ),
    ))
}

/// Every secret in one value held under `name` (a header, cookie, parameter or field name):
/// the type and the secret's text (for its fingerprint).
pub(crate) fn secrets_in<'v>(name: &str, value: &'v str, out: &mut Vec<(&'static str, &'v str)>) {
    let mut hits: Vec<Hit> = Vec::new();
    find_tokens(value, &mut hits);
    // A capability URL anywhere in the value (a webhook in a JSON field, a form value, a
    // header): its secret part, as the vendor documents the URL.
    if memchr::memmem::find(value.as_bytes(), b"://").is_some() {
        capability_urls(value, &mut hits);
    }
    // A value that is a credential wrapped whole: an AWS session token (whose shape has no
    // prefix of its own but its base64 start), a PEM key or a service-account JSON in
    // base64 (custom headers carry them so).
    if hits.is_empty()
        && let Some(kind) = wrapped(value)
    {
        out.push((kind, value.trim()));
        return;
    }
    let gcp = hits.iter().any(|h| h.kind == "private_key_pem")
        && (name == "private_key" || value.contains("\"service_account\""));
    if hits.is_empty()
        && let Some(kind) = named_value(name, value)
    {
        out.push((kind, value.trim()));
        return;
    }
    if value.len() > 8 && memchr::memchr2(b'=', b':', value.as_bytes()).is_some() {
        names::find_assignments(value, &mut hits);
    }
    for h in hits {
        let kind = if gcp && h.kind == "private_key_pem" {
            "gcp_service_account_key"
        } else {
            h.kind
        };
        out.push((kind, h.of(value)));
    }
}

/// The secret parts of capability URLs in `text` (Telegram bot URLs, Slack, Discord and
/// Teams webhooks: [`path::secrets`]'s vendor rules), as hits in `text`.
fn capability_urls(text: &str, hits: &mut Vec<Hit>) {
    const VENDOR_KINDS: [&str; 4] = [
        "telegram_bot_token",
        "slack_webhook_url",
        "discord_webhook_token",
        "teams_webhook_url",
    ];
    let mut from = 0;
    while let Some(at) = memchr::memmem::find(&text.as_bytes()[from..], b"://").map(|i| i + from) {
        from = at + 3;
        let rest = &text[from..];
        let end = rest
            .find(|c: char| {
                c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | '?' | '#')
            })
            .unwrap_or(rest.len());
        let url = &rest[..end];
        let Some(slash) = url.find('/') else { continue };
        let path_start = from + slash;
        let path = &text[path_start..from + end];
        for (kind, r) in path::secrets(path) {
            if VENDOR_KINDS.contains(&kind)
                && !hits
                    .iter()
                    .any(|h| h.start < path_start + r.end && path_start + r.start < h.end)
            {
                hits.push(Hit {
                    start: path_start + r.start,
                    end: path_start + r.end,
                    kind,
                });
            }
        }
    }
}

/// A value that is a credential as a whole, though no format of its own shows it: an AWS
/// STS session token (base64 of a binary blob that starts the same way in every token), or
/// base64 of a PEM private key or of a GCP service-account key file.
fn wrapped(value: &str) -> Option<&'static str> {
    use base64::Engine;
    let v = value.trim();
    let base64ish = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
    };
    if v.len() < 64 || !base64ish(v) {
        return None;
    }
    if v.len() >= 100 && (v.starts_with("IQoJb3JpZ2luX2Vj") || v.starts_with("FwoGZXIvYXdzE")) {
        return Some("aws_session_token");
    }
    let engines = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let decoded = engines.iter().find_map(|e| e.decode(v).ok())?;
    let text = String::from_utf8_lossy(&decoded);
    if text.contains("\"service_account\"") && text.contains("private_key") {
        return Some("gcp_service_account_key");
    }
    if text.contains("PRIVATE KEY-----") {
        return Some("private_key_pem");
    }
    None
}

/// A custom header holding an Azure account key whole: a storage account or Cosmos DB key is
/// 512 random bits in base64, 86 characters and `==` (Microsoft's "Manage storage account
/// access keys"). A SHA-512 digest or an Ed25519 signature has that shape too, so a header
/// whose name says it holds one of those (`x-content-sha512`, `x-signature`, `repr-digest`)
/// is left alone.
fn is_account_key(name: &str, value: &str) -> bool {
    let v = value.trim().as_bytes();
    let shape = v.len() == 88
        && v.ends_with(b"==")
        && v[..86]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        && formats::classes(&v[..86]) >= 3;
    if !shape {
        return false;
    }
    const NOT_A_KEY: [&str; 12] = [
        "digest",
        "hash",
        "checksum",
        "sum",
        "sha",
        "sig",
        "signature",
        "hmac",
        "mac",
        "integrity",
        "nonce",
        "fingerprint",
    ];
    !name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .any(|w| {
            let w = w.to_ascii_lowercase();
            NOT_A_KEY.contains(&w.as_str())
                || ["sha", "digest", "hash", "sig", "checksum", "md5", "blake"]
                    .iter()
                    .any(|p| w.starts_with(p))
        })
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
    let mut cookies: Option<String> = None;
    let mut subprotocols: Option<String> = None;
    for (name, value) in headers.iter() {
        // Bytes, not only valid text: a value with one non-ASCII byte (`lang=José` beside a
        // token in a Cookie) is inspected like any other. Secrets are ASCII, so what is found
        // is the bytes sent.
        let v = String::from_utf8_lossy(value.as_bytes());
        let v = v.as_ref();
        let mut found: Vec<(&'static str, &str)> = Vec::new();
        match header_rule(name) {
            HeaderRule::Cookie => {
                let kept = inspect_cookies(fp, v, &mut report.findings);
                if kept.len() != v.len() {
                    cookies = Some(kept);
                }
                continue;
            }
            HeaderRule::Subprotocols => {
                let kept = inspect_subprotocols(fp, v, &mut report.findings);
                if kept.len() != v.len() {
                    subprotocols = Some(kept);
                }
                continue;
            }
            HeaderRule::Authorization => {
                if let Some(kind) = authorization_kind(v) {
                    found.push((kind, credential_part(v)));
                }
            }
            HeaderRule::ApiKey => {
                if !is_placeholder(v) {
                    found.push((classify(v.trim()).unwrap_or("api_key"), v.trim()));
                }
            }
            HeaderRule::Structured => continue,
            HeaderRule::Other => {
                secrets_in(name.as_str(), credential_part(v), &mut found);
                if found.is_empty() && is_account_key(name.as_str(), v) {
                    found.push(("azure_storage_account_key", v.trim()));
                }
            }
        }
        for &(kind, secret) in &found {
            report.findings.push(Finding {
                kind,
                location: format!("header:{}", name.as_str()),
                fingerprint: fp.fingerprint(secret.as_bytes()),
            });
        }
        if !found.is_empty() && !doomed.contains(name) {
            doomed.push(name.clone());
        }
    }
    if remove {
        for name in doomed {
            headers.remove(name);
        }
        for (name, kept) in [(COOKIE, cookies), (SEC_WEBSOCKET_PROTOCOL, subprotocols)] {
            let Some(kept) = kept else { continue };
            headers.remove(&name);
            if let Ok(v) = HeaderValue::from_bytes(kept.as_bytes())
                && !kept.is_empty()
            {
                headers.insert(name, v);
            }
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
        let azure_sas = q.split('&').any(|p| p.starts_with("sv="));
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let name = percent_decode_str(k).decode_utf8_lossy();
            let value = decode_query_value(v);
            let mut found: Vec<(&'static str, &str)> = Vec::new();
            let lower = name.to_ascii_lowercase();
            if azure_sas && lower == "sig" && value.len() >= 40 {
                found.push(("azure_sas_signature", &value));
            } else if lower.starts_with("x-amz-") {
                // A presigned S3 URL: scoped and short-lived by design, like the credentials
                // Chaperone injects; its signature and key id are not an embedded secret.
            } else {
                secrets_in(&name, &value, &mut found);
                if found.is_empty()
                    && CREDENTIAL_PARAMS.contains(&lower.as_str())
                    && !is_placeholder(&value)
                {
                    found.push(("credential_param", &value));
                }
                // A bare `?glpat-...`, or a key used as a parameter's name.
                if found.is_empty() {
                    let mut hits = Vec::new();
                    find_tokens(&name, &mut hits);
                    found.extend(hits.into_iter().map(|h| (h.kind, h.of(&name))));
                }
            }
            for &(kind, secret) in &found {
                report.findings.push(Finding {
                    kind,
                    location: format!("query:{name}"),
                    fingerprint: fp.fingerprint(secret.as_bytes()),
                });
            }
            if found.is_empty() {
                kept.push(pair);
            } else {
                changed = true;
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

/// Check each cookie of a `cookie` header; returns the header without the cookies that hold
/// secrets (the same text when none do).
fn inspect_cookies(fp: &Fingerprinter, v: &str, findings: &mut Vec<Finding>) -> String {
    let mut kept: Vec<&str> = Vec::new();
    for pair in v.split(';') {
        let mut found = Vec::new();
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (name, raw) = (name.trim(), value.trim().trim_matches('"'));
        // Cookie values are often percent-encoded (RFC 6265 leaves the encoding to the app).
        let value = percent_decode_str(raw).decode_utf8_lossy();
        secrets_in(name, &value, &mut found);
        for &(kind, secret) in &found {
            findings.push(Finding {
                kind,
                location: format!("cookie:{name}"),
                fingerprint: fp.fingerprint(secret.as_bytes()),
            });
        }
        if found.is_empty() {
            kept.push(pair.trim());
        }
    }
    if kept.len() == v.split(';').count() {
        v.to_string()
    } else {
        kept.join("; ")
    }
}

/// The subprotocols of a WebSocket handshake without those that carry a credential: a
/// protocol holding a known secret format, and the pair a `token` or `bearer` marker makes with
/// the value after it (`token, <key>`). The rest are kept in order, so the server can still
/// pick the protocol the app speaks (`realtime`).
fn inspect_subprotocols(fp: &Fingerprinter, v: &str, findings: &mut Vec<Finding>) -> String {
    let all: Vec<&str> = v.split(',').map(str::trim).collect();
    let mut kept: Vec<&str> = Vec::new();
    let mut marker = false;
    for p in &all {
        let mut found = Vec::new();
        if marker && !p.is_empty() && !is_placeholder(p) {
            found.push((classify(p).unwrap_or("api_key"), *p));
        } else {
            secrets_in("sec-websocket-protocol", p, &mut found);
        }
        marker = p.eq_ignore_ascii_case("token") || p.eq_ignore_ascii_case("bearer");
        for &(kind, secret) in &found {
            findings.push(Finding {
                kind,
                location: "header:sec-websocket-protocol".into(),
                fingerprint: fp.fingerprint(secret.as_bytes()),
            });
        }
        if found.is_empty() {
            kept.push(p);
        } else if kept
            .last()
            .is_some_and(|m| m.eq_ignore_ascii_case("token") || m.eq_ignore_ascii_case("bearer"))
        {
            // The marker only said what follows; without it, it offers no protocol.
            kept.pop();
        }
    }
    if kept.len() == all.len() {
        v.to_string()
    } else {
        kept.join(", ")
    }
}

/// One secret found in a body, with the field that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyFinding {
    /// Type, location `body:FIELD` and fingerprint.
    pub finding: Finding,
    /// The innermost field name holding it (`""` for a top-level value or plain text).
    pub(crate) field: String,
}

/// Inspect a JSON, form or multipart body: every string value (every part's content), with
/// the name of the field holding it. A body that claims to be JSON or multipart but is not
/// is inspected as plain text.
pub fn inspect_body(fp: &Fingerprinter, kind: &BodyKind, bytes: &[u8]) -> Vec<BodyFinding> {
    let mut out = Vec::new();
    let note = |field: &str, text: &str, out: &mut Vec<BodyFinding>| {
        let mut found = Vec::new();
        secrets_in(field, text, &mut found);
        for &(kind, secret) in &found {
            out.push(BodyFinding {
                finding: Finding {
                    kind,
                    location: if field.is_empty() {
                        "body".into()
                    } else {
                        format!("body:{field}")
                    },
                    fingerprint: fp.fingerprint(secret.as_bytes()),
                },
                field: field.to_string(),
            });
        }
    };
    match kind {
        BodyKind::Json => {
            let text = match std::str::from_utf8(bytes) {
                Ok(t) => Cow::Borrowed(t),
                Err(_) => String::from_utf8_lossy(bytes),
            };
            let mut service_account = false;
            let walked = body::walk_json(&text, |v| {
                if let Some(t) = v.text {
                    service_account |= v.field == "type" && t == "service_account";
                    note(v.field, t, &mut out);
                }
            });
            if walked.is_err() {
                out.clear();
                note("", &text, &mut out);
            }
            if service_account {
                for f in &mut out {
                    if f.finding.kind == "private_key_pem" {
                        f.finding.kind = "gcp_service_account_key";
                    }
                }
            }
        }
        BodyKind::Form => body::walk_form(bytes, |p| note(&p.name, &p.value, &mut out)),
        // Each part as text under its field name: a form field is judged like a form
        // value, and an uploaded file (a `.env`, a notebook, a config) is searched for
        // tokens and credential assignments anywhere in it.
        BodyKind::Multipart(boundary) => {
            // What lies outside the parts is sent too, so it is searched as plain text.
            let mut parts = Vec::new();
            match body::walk_multipart(bytes, boundary, |p| parts.push(p)) {
                Ok(framing) => {
                    for p in parts {
                        note(&p.name, &String::from_utf8_lossy(&bytes[p.range]), &mut out);
                    }
                    for outside in [framing.preamble, framing.epilogue] {
                        note("", &String::from_utf8_lossy(&bytes[outside]), &mut out);
                    }
                }
                Err(body::NotMultipart) => note("", &String::from_utf8_lossy(bytes), &mut out),
            }
        }
    }
    out
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
    if let Some(key_id) = sigv4_key_id(v) {
        return Some(classify(key_id).unwrap_or("aws_access_key_id"));
    }
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

/// The access key id an AWS SigV4 (or SigV4a) `Authorization` value signs with:
/// `AWS4-HMAC-SHA256 Credential=AKIA.../20260101/us-east-1/sts/aws4_request, ...`. The key
/// id is what identifies the hard-coded key (the signature changes with every request).
fn sigv4_key_id(v: &str) -> Option<&str> {
    let (scheme, rest) = v.trim().split_once(' ')?;
    if !scheme.starts_with("AWS4-") {
        return None;
    }
    let cred = rest
        .split(',')
        .find_map(|p| p.trim().strip_prefix("Credential="))?;
    cred.split('/').next().filter(|k| !k.is_empty())
}

/// The credential within a header value: after an auth scheme if there is one (for an AWS
/// signature, the access key id it names).
fn credential_part(v: &str) -> &str {
    if let Some(key_id) = sigv4_key_id(v) {
        return key_id;
    }
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
/// Whether `text` holds anything shaped like a credential the detector knows (for text that
/// is relayed from elsewhere, such as an authorization server's error description).
pub(crate) fn holds_credential(text: &str) -> bool {
    let mut hits = Vec::new();
    formats::find_tokens(text, &mut hits);
    !hits.is_empty()
}

/// The query as the line shows it: every value redacted, and a name that holds anything
/// credential-shaped (a bare `?glpat-...`, a key used as a parameter's name) too.
pub(crate) fn redact_query(q: &str) -> String {
    let mut out = String::with_capacity(q.len() + 16);
    for (i, pair) in q.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        let (k, valued) = pair
            .split_once('=')
            .map_or((pair, false), |(k, _)| (k, true));
        let name = percent_decode_str(k).decode_utf8_lossy();
        out.push_str(if holds_credential(&name) {
            "<redacted>"
        } else {
            k
        });
        if valued {
            out.push_str("=<redacted>");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn key() -> String {
        format!("sk-proj-{}", "Zx9_".repeat(12))
    }

    /// An app signing its own AWS requests: the access key id in its SigV4 `Authorization`
    /// is what is found and fingerprinted (the same key, the same fingerprint, whatever the
    /// signature).
    #[test]
    fn a_sigv4_authorization_is_found_by_its_access_key_id() {
        let fp = Fingerprinter::new(b"0123456789abcdef0123456789abcdef");
        let value = |sig: &str| {
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIA2OGYBAH6VQRPXU4N/20261201/us-east-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature={sig}"
            )
        };
        let mut prints = Vec::new();
        for sig in ["00aa", "11bb"] {
            let mut h = HeaderMap::new();
            h.insert("authorization", HeaderValue::from_str(&value(sig)).unwrap());
            let r = inspect(&fp, StripMode::Strip, &mut h, None, None);
            assert_eq!(r.findings.len(), 1);
            assert_eq!(r.findings[0].kind, "aws_access_key_id");
            prints.push(r.findings[0].fingerprint.clone());
            assert!(h.get("authorization").is_none());
        }
        assert_eq!(prints[0], prints[1]);
        assert_eq!(prints[0], fp.fingerprint(b"AKIA2OGYBAH6VQRPXU4N"));
    }

    /// Capability URLs inside bodies and headers, and credentials wrapped whole in base64
    /// (a PEM key, a service-account file) or shaped only by their start (an AWS session
    /// token), as the held-out corpus found them missed.
    #[test]
    fn capability_urls_and_wrapped_credentials_are_found() {
        use base64::Engine;
        let fp = Fingerprinter::new(b"0123456789abcdef0123456789abcdef");
        let slack = "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX";
        let discord = format!(
            "https://discord.com/api/webhooks/123456789012345678/{}",
            "Zx9_".repeat(17)
        );
        let body = format!(
            r#"{{"notify": {{"url": "{slack}", "fallback": "{discord}?wait=true"}}, "note": "see https://example.org/docs"}}"#
        );
        let found = inspect_body(&fp, &BodyKind::Json, body.as_bytes());
        let kinds: Vec<&str> = found.iter().map(|f| f.finding.kind).collect();
        assert_eq!(
            kinds,
            vec!["slack_webhook_url", "discord_webhook_token"],
            "{found:?}"
        );
        let form = format!(
            "hook={}",
            percent_encoding::utf8_percent_encode(slack, percent_encoding::NON_ALPHANUMERIC)
        );
        let found = inspect_body(&fp, &BodyKind::Form, form.as_bytes());
        assert_eq!(found.len(), 1, "{found:?}");

        let pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n";
        let sa = r#"{"type": "service_account", "project_id": "p", "private_key": "x"}"#;
        let session = format!("IQoJb3JpZ2luX2VjEJr{}", "A".repeat(300));
        for (header, value, kind) in [
            (
                "x-signing-key",
                base64::engine::general_purpose::STANDARD.encode(pem),
                "private_key_pem",
            ),
            (
                "x-gcp-creds",
                base64::engine::general_purpose::STANDARD.encode(sa),
                "gcp_service_account_key",
            ),
            ("x-upstream-session", session.clone(), "aws_session_token"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header, HeaderValue::from_str(&value).unwrap());
            let r = inspect(&fp, StripMode::Strip, &mut h, None, None);
            assert_eq!(
                r.findings.iter().map(|f| f.kind).collect::<Vec<_>>(),
                vec![kind],
                "{header}"
            );
            assert!(h.get(header).is_none());
        }
        // Ordinary base64 and URLs are not.
        let mut h = HeaderMap::new();
        h.insert(
            "x-trace",
            HeaderValue::from_str(
                &base64::engine::general_purpose::STANDARD.encode("a".repeat(90)),
            )
            .unwrap(),
        );
        h.insert(
            "x-link",
            HeaderValue::from_static("https://hooks.slack.com/services/billing"),
        );
        assert!(
            inspect(&fp, StripMode::Strip, &mut h, None, None)
                .findings
                .is_empty()
        );
    }

    /// A secret in the query as a bare parameter, or as a parameter's name, is found,
    /// stripped and never logged.
    #[test]
    fn query_secrets_without_a_value_are_found() {
        let fp = Fingerprinter::new(b"0123456789abcdef0123456789abcdef");
        let gitlab = "glpat-Xk3vR8pQ2mN7wZ4tY9aB";
        for q in [
            format!("{gitlab}&page=2"),
            format!("page=2&{gitlab}="),
            format!("{}=1&page=2", key()),
        ] {
            let mut h = HeaderMap::new();
            let r = inspect(&fp, StripMode::Strip, &mut h, Some(&q), None);
            assert_eq!(r.findings.len(), 1, "{q}: {:?}", r.findings);
            assert_eq!(r.new_path_and_query.as_deref(), Some("page=2"), "{q}");
            let logged = redact_query(&q);
            assert!(
                !logged.contains("glpat-") && !logged.contains("sk-proj-"),
                "{logged}"
            );
            assert!(logged.contains("page=<redacted>"), "{logged}");
        }
        assert_eq!(redact_query("debug&x=1"), "debug&x=<redacted>");
    }

    /// A header value with bytes beyond ASCII is inspected all the same: a Slack token in a
    /// Cookie beside `lang=José` (UTF-8) or a Latin-1 byte, and a key in a custom header whose
    /// value has one; the other cookies keep their bytes.
    #[test]
    fn azure_account_keys_in_custom_headers_are_told_from_digests_by_their_names() {
        // 64 bytes in base64, as the Azure portal shows a key.
        let key = "BwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyAhIiMkJSYnKCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4/QEFCQ0RFRg==";
        assert_eq!(key.len(), 88);
        assert!(is_account_key("x-azure-storage", key));
        assert!(is_account_key("X-Cosmos-Master", key));
        for digest_name in [
            "x-content-sha512",
            "repr-digest",
            "x-signature",
            "X-Signature-Ed25519",
            "x-hub-hmac",
            "x-checksum",
        ] {
            assert!(!is_account_key(digest_name, key), "{digest_name}");
        }
        // Not the shape: a byte short, no padding, or a word.
        assert!(!is_account_key("x-azure-storage", &key[1..]));
        assert!(!is_account_key(
            "x-azure-storage",
            &format!("{}AA", &key[..86])
        ));
        assert!(!is_account_key(
            "x-azure-storage",
            &format!("{}==", "a".repeat(86))
        ));
    }

    #[test]
    fn values_with_non_ascii_bytes_are_inspected() {
        let fp = Fingerprinter::new(b"0123456789abcdef0123456789abcdef");
        let slack = "xoxb-2048193847562-3917462058134-Qw7Rt2Yp9Lk4Xz8Vb3Nm6Hs1";
        for lang in [&b"lang=Jos\xc3\xa9"[..], &b"lang=Jos\xe9"[..]] {
            let mut cookie = lang.to_vec();
            cookie.extend_from_slice(format!("; session={slack}; theme=dark").as_bytes());
            let mut h = HeaderMap::new();
            h.insert("cookie", HeaderValue::from_bytes(&cookie).unwrap());
            let mut note = b"caf\xc3\xa9 ".to_vec();
            note.extend_from_slice(key().as_bytes());
            h.insert("x-note", HeaderValue::from_bytes(&note).unwrap());
            let r = inspect(&fp, StripMode::Strip, &mut h, None, None);
            let kinds: Vec<&str> = r.findings.iter().map(|f| f.kind).collect();
            assert!(kinds.contains(&"slack_bot_token"), "{kinds:?}");
            assert!(kinds.contains(&"openai_project_key"), "{kinds:?}");
            let kept = h.get("cookie").unwrap().as_bytes();
            assert!(!String::from_utf8_lossy(kept).contains("xoxb-"));
            assert!(
                kept.ends_with(b"theme=dark"),
                "{:?}",
                String::from_utf8_lossy(kept)
            );
            assert!(h.get("x-note").is_none());
        }
        let utf8 = HeaderValue::from_bytes(b"lang=Jos\xc3\xa9; session=x").unwrap();
        let mut h = HeaderMap::new();
        h.insert("cookie", utf8.clone());
        let mut with_key = utf8.as_bytes().to_vec();
        with_key.extend_from_slice(format!("; k={slack}").as_bytes());
        h.insert("cookie", HeaderValue::from_bytes(&with_key).unwrap());
        inspect(&fp, StripMode::Strip, &mut h, None, None);
        assert_eq!(h.get("cookie").unwrap(), &utf8, "valid UTF-8 kept as sent");
    }

    /// Keys browser-style WebSocket clients put in the subprotocol list, as the vendors
    /// document them: OpenAI Realtime (`realtime`, `openai-insecure-api-key.<key>`,
    /// `openai-beta.realtime-v1`) and Deepgram (`token, <key>`). The key goes; the protocols
    /// the server picks from stay, in order.
    #[test]
    fn websocket_subprotocols_lose_their_keys_and_keep_their_protocols() {
        let fp = Fingerprinter::new(b"0123456789abcdef0123456789abcdef");
        let deepgram_key = "3f1e5c9a7b2d4e6f8a0b1c2d3e4f5a6b7c8d9e0f";
        let cases = [
            (
                format!(
                    "realtime, openai-insecure-api-key.{}, openai-beta.realtime-v1",
                    key()
                ),
                Some("realtime, openai-beta.realtime-v1"),
                "openai_project_key",
            ),
            (format!("token, {deepgram_key}"), None, "api_key"),
            (
                format!("chat, Bearer, {deepgram_key}"),
                Some("chat"),
                "api_key",
            ),
        ];
        for (value, kept, kind) in cases {
            let mut h = HeaderMap::new();
            h.insert(
                "sec-websocket-protocol",
                HeaderValue::from_str(&value).unwrap(),
            );
            let r = inspect(&fp, StripMode::Strip, &mut h, None, None);
            assert_eq!(r.findings.len(), 1, "{value}: {:?}", r.findings);
            assert_eq!(r.findings[0].kind, kind, "{value}");
            assert_eq!(r.findings[0].location, "header:sec-websocket-protocol");
            assert_eq!(
                h.get("sec-websocket-protocol").map(|v| v.to_str().unwrap()),
                kept,
                "{value}"
            );
        }
        // Protocols without a key are left exactly as they were.
        let mut h = HeaderMap::new();
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("graphql-transport-ws, mqtt"),
        );
        assert!(
            inspect(&fp, StripMode::Strip, &mut h, None, None)
                .findings
                .is_empty()
        );
        assert_eq!(h["sec-websocket-protocol"], "graphql-transport-ws, mqtt");
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
