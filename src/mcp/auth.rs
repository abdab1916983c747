//! MCP authorization, done for the agent: an MCP server that wants a token answers `401` with
//! `WWW-Authenticate: Bearer resource_metadata="..."` (MCP's authorization spec, RFC 9728
//! §5.1). The sidecar reads that protected-resource metadata from the server's own origin,
//! checks it names the server (`resource`) and an authorization server the route's credential
//! gets its tokens from (`authorization_servers`), and obtains the route's token for that
//! `resource` (RFC 8707), with the scopes the challenge asks for when the route names none. The
//! request is then sent again, once; what was found is kept per route and origin, so later
//! requests carry the right token from the start. Agents never handle MCP OAuth themselves,
//! and never see a token.
//!
//! This module reads and checks; the pipeline fetches the metadata through the forward path
//! (same guardrails, same TLS) and asks the credential stage for the token.

use std::collections::HashMap;

use http::{HeaderMap, Uri};
use parking_lot::Mutex;
use serde_json::Value;

/// The largest protected-resource metadata document read.
pub(crate) const METADATA_MAX_BYTES: usize = 64 * 1024;

/// Routes and origins remembered at most (a full table is cleared: each entry is found again
/// by one 401).
const REMEMBERED: usize = 1024;

/// What a `401`'s `WWW-Authenticate` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    /// `resource_metadata`: where the protected-resource metadata is.
    pub(crate) metadata: String,
    /// `scope`, split.
    pub(crate) scopes: Vec<String>,
}

/// What the sidecar found out about an MCP server's authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Discovered {
    /// The server's resource identifier: the token's RFC 8707 `resource`.
    pub(crate) resource: String,
    /// Scopes the server asked for (used when the route names none).
    pub(crate) scopes: Vec<String>,
}

/// The challenge of a response that asks for a token (`401`) or for more scopes (`403` with
/// `error="insufficient_scope"`, MCP's step-up), when it names protected-resource metadata.
pub(crate) fn challenge(status: http::StatusCode, headers: &HeaderMap) -> Option<Challenge> {
    let step_up = status == http::StatusCode::FORBIDDEN;
    if status != http::StatusCode::UNAUTHORIZED && !step_up {
        return None;
    }
    headers
        .get_all(http::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            if step_up && param(v, "error").as_deref() != Some("insufficient_scope") {
                return None;
            }
            let metadata = param(v, "resource_metadata")?;
            let scopes = param(v, "scope")
                .map(|s| s.split_ascii_whitespace().map(str::to_owned).collect())
                .unwrap_or_default();
            Some(Challenge { metadata, scopes })
        })
}

/// An auth-param's value (a token or a quoted string, RFC 9110 §11.2), by name.
fn param(header: &str, name: &str) -> Option<String> {
    let bytes = header.as_bytes();
    let mut from = 0;
    while let Some(at) = header[from..].find(name).map(|i| i + from) {
        from = at + name.len();
        let starts_param = at == 0 || matches!(bytes[at - 1], b' ' | b',' | b'\t');
        let rest = header[from..].trim_start_matches([' ', '\t']);
        let Some(value) = rest.strip_prefix('=').filter(|_| starts_param) else {
            continue;
        };
        let value = value.trim_start_matches([' ', '\t']);
        if let Some(quoted) = value.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.chars();
            while let Some(c) = chars.next() {
                match c {
                    '"' => return Some(out),
                    '\\' => out.extend(chars.next()),
                    c => out.push(c),
                }
            }
            return None; // unterminated
        }
        let end = value.find([',', ' ', '\t']).unwrap_or(value.len());
        return Some(value[..end].to_string());
    }
    None
}

/// `scheme://host:port` of an absolute URL, lower-cased, with the default port written out.
pub(crate) fn origin_of(url: &str) -> Option<String> {
    let uri: Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let host = uri.host()?.to_ascii_lowercase();
    let port = uri.port_u16().or(match scheme.as_str() {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    })?;
    Some(format!("{scheme}://{host}:{port}"))
}

/// Check the metadata's address: on the MCP server's own origin (the sidecar fetches nothing
/// else a server names), and its parsed form.
pub(crate) fn metadata_uri(challenge: &Challenge, server_origin: &str) -> Result<Uri, String> {
    if origin_of(&challenge.metadata).as_deref() != Some(server_origin) {
        return Err(format!(
            "the server's resource_metadata {:?} is not on its own origin {server_origin}",
            challenge.metadata
        ));
    }
    challenge
        .metadata
        .parse()
        .map_err(|e| format!("resource_metadata {:?}: {e}", challenge.metadata))
}

/// Read protected-resource metadata (RFC 9728 §2) fetched for a request to `request_url`
/// (origin and path): its `resource` must name the server the request went to (its origin,
/// and a path the request's is under), and `authorization_servers` must include one on the
/// origin of `token_origin`, where the route's credential gets its tokens.
pub(crate) fn read_metadata(
    body: &[u8],
    request_url: &str,
    token_origin: &str,
    challenge: &Challenge,
) -> Result<Discovered, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the protected-resource metadata is not JSON ({e})"))?;
    let resource = v
        .get("resource")
        .and_then(Value::as_str)
        .ok_or("the protected-resource metadata names no `resource`")?;
    let names_server = origin_of(resource).is_some_and(|o| Some(o) == origin_of(request_url))
        && resource.parse::<Uri>().is_ok_and(|r| {
            let path = r.path().trim_end_matches('/');
            let asked = request_url
                .parse::<Uri>()
                .map(|u| u.path().to_string())
                .unwrap_or_default();
            path.is_empty() || asked == path || asked.starts_with(&format!("{path}/"))
        });
    if !names_server {
        return Err(format!(
            "the protected-resource metadata is for {resource:?}, not the server asked ({request_url})"
        ));
    }
    let servers: Vec<&str> = v
        .get("authorization_servers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !servers
        .iter()
        .any(|s| origin_of(s).as_deref() == Some(token_origin))
    {
        return Err(format!(
            "the server trusts authorization servers {servers:?}; the route's credential gets its tokens from {token_origin}"
        ));
    }
    // The scopes the challenge names, else those the server lists (MCP's scope selection).
    let scopes = if challenge.scopes.is_empty() {
        v.get("scopes_supported")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    } else {
        challenge.scopes.clone()
    };
    Ok(Discovered {
        resource: resource.to_string(),
        scopes,
    })
}

/// What was found per (route, origin).
#[derive(Debug, Default)]
pub(crate) struct Resources {
    found: Mutex<HashMap<(String, String), Discovered>>,
}

impl Resources {
    /// What was found for `route` at `origin`.
    pub(crate) fn get(&self, route: &str, origin: &str) -> Option<Discovered> {
        self.found
            .lock()
            .get(&(route.to_string(), origin.to_string()))
            .cloned()
    }

    /// Remember what was found.
    pub(crate) fn put(&self, route: &str, origin: &str, found: Discovered) {
        let mut map = self.found.lock();
        if map.len() >= REMEMBERED {
            map.clear();
        }
        map.insert((route.to_string(), origin.to_string()), found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn www(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.append(http::header::WWW_AUTHENTICATE, v.parse().unwrap());
        h
    }

    fn challenge(h: &HeaderMap) -> Option<Challenge> {
        super::challenge(http::StatusCode::UNAUTHORIZED, h)
    }

    #[test]
    fn the_challenge_names_the_metadata_and_scopes() {
        let c = challenge(&www(
            r#"Bearer error="invalid_token", resource_metadata="http://127.0.0.1:8000/.well-known/oauth-protected-resource/mcp", scope="tools.read tools.write""#,
        ))
        .unwrap();
        assert_eq!(
            c.metadata,
            "http://127.0.0.1:8000/.well-known/oauth-protected-resource/mcp"
        );
        assert_eq!(c.scopes, vec!["tools.read", "tools.write"]);
        let c = challenge(&www(
            "Bearer resource_metadata=https://a.test/.well-known/oauth-protected-resource",
        ))
        .unwrap();
        assert_eq!(
            c.metadata,
            "https://a.test/.well-known/oauth-protected-resource"
        );
        assert!(c.scopes.is_empty());
        assert!(challenge(&www(r#"Bearer realm="x", error="invalid_token""#)).is_none());
        // A 403 is a challenge only when it asks for more scopes.
        let step_up = www(
            r#"Bearer error="insufficient_scope", scope="tools.write", resource_metadata="https://a.test/.well-known/oauth-protected-resource""#,
        );
        let c = super::challenge(http::StatusCode::FORBIDDEN, &step_up).unwrap();
        assert_eq!(c.scopes, vec!["tools.write"]);
        let refused = www(r#"Bearer error="invalid_token", resource_metadata="https://a.test/x""#);
        assert!(super::challenge(http::StatusCode::FORBIDDEN, &refused).is_none());
        assert!(super::challenge(http::StatusCode::OK, &step_up).is_none());
        // A name that only ends like the param is not it.
        assert!(challenge(&www(r#"Bearer x_resource_metadata="https://evil.test""#)).is_none());
        assert_eq!(
            param(r#"Bearer a="q\"uote", b=1"#, "a").as_deref(),
            Some("q\"uote")
        );
    }

    #[test]
    fn metadata_is_read_only_from_the_servers_origin() {
        let c = |m: &str| Challenge {
            metadata: m.into(),
            scopes: vec![],
        };
        let origin = "https://mcp.test:443";
        assert!(
            metadata_uri(
                &c("https://mcp.test/.well-known/oauth-protected-resource"),
                origin
            )
            .is_ok()
        );
        assert!(metadata_uri(&c("https://MCP.test:443/.well-known/x"), origin).is_ok());
        for elsewhere in [
            "https://evil.test/.well-known/oauth-protected-resource",
            "http://mcp.test/.well-known/oauth-protected-resource",
            "https://mcp.test:8443/x",
            "http://169.254.169.254/latest/meta-data",
            "/relative",
        ] {
            assert!(metadata_uri(&c(elsewhere), origin).is_err(), "{elsewhere}");
        }
    }

    #[test]
    fn metadata_must_name_the_server_and_a_known_authorization_server() {
        let c = Challenge {
            metadata: String::new(),
            scopes: vec!["tools.read".into()],
        };
        let doc = |resource: &str, servers: &str| {
            format!(
                r#"{{"resource":"{resource}","authorization_servers":[{servers}],"scopes_supported":["tools.read"]}}"#
            )
        };
        let as_ = r#""https://idp.test/tenant/v2.0""#;
        let ok = read_metadata(
            doc("https://mcp.test/mcp", as_).as_bytes(),
            "https://mcp.test/mcp",
            "https://idp.test:443",
            &c,
        )
        .unwrap();
        assert_eq!(ok.resource, "https://mcp.test/mcp");
        assert_eq!(ok.scopes, vec!["tools.read"]);
        let listed = read_metadata(
            doc("https://mcp.test/mcp", as_).as_bytes(),
            "https://mcp.test/mcp",
            "https://idp.test:443",
            &Challenge {
                metadata: String::new(),
                scopes: vec![],
            },
        )
        .unwrap();
        assert_eq!(
            listed.scopes,
            vec!["tools.read"],
            "scopes_supported, when the challenge names none"
        );
        // A resource at the origin covers every path under it.
        assert!(
            read_metadata(
                doc("https://mcp.test", as_).as_bytes(),
                "https://mcp.test/mcp",
                "https://idp.test:443",
                &c
            )
            .is_ok()
        );
        for (resource, url) in [
            ("https://other.test/mcp", "https://mcp.test/mcp"),
            ("https://mcp.test/admin", "https://mcp.test/mcp"),
            ("https://mcp.test/mc", "https://mcp.test/mcp"),
        ] {
            let e = read_metadata(
                doc(resource, as_).as_bytes(),
                url,
                "https://idp.test:443",
                &c,
            )
            .unwrap_err();
            assert!(e.contains("not the server asked"), "{e}");
        }
        let e = read_metadata(
            doc("https://mcp.test/mcp", r#""https://evil.test""#).as_bytes(),
            "https://mcp.test/mcp",
            "https://idp.test:443",
            &c,
        )
        .unwrap_err();
        assert!(e.contains("trusts authorization servers"), "{e}");
        assert!(
            read_metadata(
                b"<html>",
                "https://mcp.test/mcp",
                "https://idp.test:443",
                &c
            )
            .is_err()
        );
    }
}
