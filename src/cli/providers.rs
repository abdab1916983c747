//! `chaperone providers`: the provider catalog a route's `provider:` expands from.

use std::fmt::Write;

use serde_json::{Value, json};

use super::Exit;
use crate::route::providers::{Auth, CATALOG, Provider};

/// Print the catalog as text, or as one JSON array.
pub(crate) fn command(json: bool) -> Exit {
    let rows: Vec<Value> = CATALOG.iter().map(row).collect();
    super::print_report(json, &rows, |_| text())
}

/// One entry as JSON.
fn row(p: &Provider) -> Value {
    let (inject, sigv4_service) = match p.auth {
        Auth::Header { name, value } => (json!({"header": name, "value": value}), None),
        Auth::SigV4 { service } => (Value::Null, Some(service)),
    };
    let headers: serde_json::Map<String, Value> = p
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "name": p.name,
        "title": p.title,
        "hosts": p.hosts,
        "inject": inject,
        "sigv4_service": sigv4_service,
        "headers": headers,
        "oauth_scopes": p.scopes,
        "docs": p.docs,
    })
}

/// The catalog for a reader.
fn text() -> String {
    let mut out = String::new();
    for p in CATALOG {
        let _ = writeln!(out, "{}: {}", p.name, p.title);
        let _ = writeln!(out, "  hosts:   {} (https)", p.hosts.join(", "));
        match p.auth {
            Auth::Header { .. } => {
                let _ = writeln!(out, "  inject:  {}", p.auth);
            }
            Auth::SigV4 { .. } => {
                let _ = writeln!(out, "  signs:   {} with a credential of kind aws", p.auth);
            }
        }
        for (k, v) in p.headers {
            let _ = writeln!(out, "  adds:    {k}: {v} (unless the app sends its own)");
        }
        if !p.scopes.is_empty() {
            let _ = writeln!(
                out,
                "  scopes:  {} (for client_credentials / token_exchange)",
                p.scopes.join(" ")
            );
        }
        let _ = writeln!(out, "  docs:    {}", p.docs);
    }
    out
}
