//! Invariants of what a hostile client and a broken config file reach first, checked on
//! arbitrary input: by the `cargo fuzz` targets (`fuzz/fuzz_targets/request_head.rs`,
//! `fuzz/fuzz_targets/config.rs`) and, on pseudo-random input, by `tests/fuzz_invariants.rs`
//! so CI exercises them without a nightly toolchain. Each panics when an invariant breaks.
//! (The secret detector's are in [`crate::strip::fuzzing`].)

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Request};

use crate::identify::Identity;
use crate::target;

/// A request head built from `data` (method, target, a few headers), through every stage
/// that reads a head before policy: where it goes (host and path normalised), who sent it,
/// what secrets its path and headers hold, and its MCP messages.
pub fn request_head(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let method = parts.next().unwrap_or("GET");
    let uri = parts.next().unwrap_or("/");
    let mut b = Request::builder();
    if let Ok(m) = http::Method::from_bytes(method.trim().as_bytes()) {
        b = b.method(m);
    }
    b = b.uri(uri.trim());
    let mut headers = HeaderMap::new();
    for line in parts.by_ref().take(16) {
        if let Some((k, v)) = line.split_once(':')
            && let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.trim().as_bytes()),
                HeaderValue::from_bytes(v.trim().as_bytes()),
            )
        {
            headers.append(k, v);
        }
    }
    let body: Vec<u8> = parts.collect::<Vec<_>>().join("\n").into_bytes();
    let Ok(req) = b.body(()) else { return };
    let (mut head, ()) = req.into_parts();
    head.headers = headers;

    // The path: normalising is idempotent, leaves no dot segment, and keeps its leading `/`.
    let raw = head.uri.path();
    if let Ok(n) = target::normalize_path(raw) {
        let again = target::normalize_path(&n.path).expect("a normal path normalises");
        assert_eq!(again.path, n.path, "idempotent: {raw:?}");
        if raw.starts_with('/') {
            assert!(n.path.starts_with('/'), "{raw:?} -> {:?}", n.path);
            assert!(
                !n.path.split('/').any(|s| s == ".." || s == "."),
                "{raw:?} -> {:?}",
                n.path
            );
        }
    }
    // The host: idempotent, and a host that names an IP address names it one way.
    if let Some(h) = head.uri.host() {
        let once = target::normalize_host(h);
        assert_eq!(target::normalize_host(&once), once, "idempotent: {h:?}");
        if let Ok(ip) = once.parse::<std::net::IpAddr>() {
            assert_eq!(ip.to_string(), once, "{h:?}");
        }
    }
    // Where it goes: never a panic, and what is logged of a path never holds its secrets.
    if let Ok((t, _)) = target::resolve(&head, None) {
        let found = crate::strip::path::secrets(&t.path);
        let shown = crate::strip::path::redacted(&t.path, &found);
        for (_, at) in &found {
            let secret = &t.path[at.clone()];
            assert!(!shown.contains(secret), "{shown:?} shows {secret:?}");
        }
    }
    // Who sent it: a refused purpose is never kept; the request id is printable and not a
    // credential.
    let identity = Arc::new(Identity {
        id: "spiffe://fuzz/x".into(),
        workload: "w".into(),
        stage: "main".into(),
        environment: "fuzz".into(),
    });
    let client: SocketAddr = "127.0.0.1:1".parse().expect("literal");
    let mut headers = head.headers.clone();
    let (caller, verdict) = crate::identify::identify(&identity, &mut headers, client);
    if verdict.is_err() {
        assert!(caller.purpose.is_none());
    }
    assert!(!caller.request_id.is_empty() && caller.request_id.len() <= 128);
    assert!(!crate::strip::holds_credential(&caller.request_id));
    // MCP messages: never a panic; a body that parses names each call's method.
    if let Ok(calls) = crate::mcp::calls(&head.headers, &body) {
        for c in calls {
            assert!(!c.method.is_empty() || c.name.is_empty());
        }
    }
}

/// A config file's text: loading never panics, and every error it reports names the file,
/// the line and the column (`FILE:LINE:COL: ...`).
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Err(errors) =
        crate::config::Config::from_yaml("fuzz.yaml", &text, Path::new("/nonexistent"), false)
    {
        for e in errors.0 {
            let shown = e.to_string();
            assert!(shown.starts_with("fuzz.yaml:"), "{shown}");
            let mut fields = shown.splitn(4, ':');
            let (_, line, col) = (fields.next(), fields.next(), fields.next());
            assert!(
                line.is_some_and(|l| l.parse::<usize>().is_ok())
                    && col.is_some_and(|c| c.parse::<usize>().is_ok()),
                "{shown}"
            );
        }
    }
}
