//! Stage: MCP. On a route with `mcp: true`, the JSON-RPC messages of MCP's streamable HTTP
//! transport (DESIGN §10): each message's method, and for `tools/call` and `prompts/get` the
//! name, for `resources/read` the uri, so that policy decides, and the line names, each tool
//! call rather than each `POST /mcp`.
//!
//! The `Mcp-Method` and `Mcp-Name` headers (MCP 2026-07-28), when present, must agree with the
//! body: a header that says one tool while the body calls another is an attack on whatever
//! routes or authorizes by header, and is refused (400).

pub(crate) mod auth;
pub(crate) mod listing;

use http::HeaderMap;
use serde::Serialize;
use serde_json::Value;

/// `Mcp-Method`.
pub(crate) const METHOD_HEADER: &str = "mcp-method";
/// `Mcp-Name`.
pub(crate) const NAME_HEADER: &str = "mcp-name";
/// `Mcp-Session-Id`.
pub(crate) const SESSION_HEADER: &str = "mcp-session-id";

/// One JSON-RPC request or notification of an MCP POST.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct McpCall {
    /// `tools/call`, `tools/list`, `initialize`, ...
    pub method: String,
    /// The tool or prompt name, or the resource uri; "" when the method names none.
    pub name: String,
    /// The request id (absent on notifications).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    /// A tool call's `params.arguments` (never logged: they may hold anything).
    #[serde(skip)]
    pub arguments: Option<Value>,
}

/// The purpose a call to tool `name` serves when the app names none: `tool:<name>`, when
/// that is a valid purpose (DESIGN §10).
pub(crate) fn tool_purpose(name: &str) -> Option<String> {
    let p = format!("tool:{name}");
    (!name.is_empty() && crate::identify::validate_purpose(&p).is_ok()).then_some(p)
}

impl McpCall {
    /// The purpose this message serves when the app names none: a tool call's `tool:<name>`.
    pub(crate) fn purpose(&self) -> Option<String> {
        (self.method == "tools/call")
            .then(|| tool_purpose(&self.name))
            .flatten()
    }

    /// What policy is told of this message.
    pub fn context(&self) -> crate::policy::McpContext<'_> {
        crate::policy::McpContext {
            method: &self.method,
            name: &self.name,
            arguments: match &self.arguments {
                Some(a) if self.method == "tools/call" => crate::policy::McpArguments::Given(a),
                _ => crate::policy::McpArguments::None,
            },
        }
    }
}

/// What the line says of an MCP POST: its (first) call and the session.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct McpLog {
    pub(crate) method: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) session: Option<String>,
    /// Messages in the POST, when more than one (a batch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) batch: Option<usize>,
    /// For `tools/list`: how many tools the answer offered the caller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) offered: Option<usize>,
    /// For `tools/list`: the tools left out of the answer, as no call to them could be
    /// permitted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) hidden: Vec<String>,
}

impl McpLog {
    pub(crate) fn of(calls: &[McpCall], headers: &HeaderMap) -> Option<McpLog> {
        let first = calls.first()?;
        Some(McpLog {
            method: first.method.clone(),
            name: first.name.clone(),
            id: first.id.clone(),
            session: headers
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.chars().take(128).collect()),
            batch: (calls.len() > 1).then_some(calls.len()),
            offered: None,
            hidden: Vec::new(),
        })
    }
}

/// The calls of one POST body (a message or a batch); responses the client sends back (to a
/// server's request) carry no method and are not calls.
pub fn calls(headers: &HeaderMap, body: &[u8]) -> Result<Vec<McpCall>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        format!("an MCP route takes JSON-RPC messages; this body is not JSON ({e})")
    })?;
    let messages: Vec<Value> = match v {
        Value::Array(items) => items,
        one => vec![one],
    };
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        let Value::Object(mut obj) = m else {
            return Err("a JSON-RPC message is an object".into());
        };
        let Some(method) = obj.get("method") else {
            continue; // a response
        };
        let method = method
            .as_str()
            .ok_or("a JSON-RPC `method` is a string")?
            .to_string();
        let params = obj.get("params");
        let name = match method.as_str() {
            "tools/call" | "prompts/get" => params.and_then(|p| p.get("name")),
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                params.and_then(|p| p.get("uri"))
            }
            _ => None,
        };
        let name = match name {
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(format!("`{method}` names its target with a string")),
        };
        if name.is_empty()
            && matches!(
                method.as_str(),
                "tools/call" | "prompts/get" | "resources/read"
            )
        {
            return Err(format!("`{method}` without a name"));
        }
        let arguments = match obj.get_mut("params") {
            Some(Value::Object(p)) if method == "tools/call" => p.remove("arguments"),
            _ => None,
        };
        out.push(McpCall {
            method,
            name,
            id: obj.remove("id"),
            arguments,
        });
    }
    agree(headers, &out)?;
    Ok(out)
}

/// `Mcp-Method` and `Mcp-Name` say what the body does, or the request is refused.
fn agree(headers: &HeaderMap, calls: &[McpCall]) -> Result<(), String> {
    let header = |name: &str| -> Result<Option<&str>, String> {
        let mut values = headers.get_all(name).iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(format!("more than one `{name}` header"));
        }
        first
            .map(|v| v.to_str().map_err(|_| format!("`{name}` is not text")))
            .transpose()
    };
    let (method, name) = (header(METHOD_HEADER)?, header(NAME_HEADER)?);
    if method.is_none() && name.is_none() {
        return Ok(());
    }
    let [call] = calls else {
        return Err(format!(
            "`Mcp-Method`/`Mcp-Name` describe one message; this body holds {}",
            calls.len()
        ));
    };
    if let Some(m) = method
        && m != call.method
    {
        return Err(format!(
            "the Mcp-Method header says `{m}`, the body `{}`",
            call.method
        ));
    }
    if let Some(n) = name
        && n != call.name
    {
        return Err(format!(
            "the Mcp-Name header says `{n}`, the body `{}`",
            call.name
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn calls_names_and_batches() {
        let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search_docs","arguments":{"q":"x"}}}"#;
        let c = calls(&h(&[]), body).unwrap();
        assert_eq!(c[0].method, "tools/call");
        assert_eq!(c[0].name, "search_docs");
        assert_eq!(c[0].id, Some(serde_json::json!(7)));
        let batch = br#"[{"jsonrpc":"2.0","method":"notifications/initialized"},
            {"jsonrpc":"2.0","id":"a","method":"resources/read","params":{"uri":"file:///x"}},
            {"jsonrpc":"2.0","id":3,"result":{}}]"#;
        let c = calls(&h(&[]), batch).unwrap();
        assert_eq!(c.len(), 2, "the response is not a call");
        assert_eq!((c[1].name.as_str(), c[0].id.clone()), ("file:///x", None));
        assert!(calls(&h(&[]), b"not json").is_err());
        assert!(
            calls(
                &h(&[]),
                br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#
            )
            .is_err()
        );
    }

    #[test]
    fn headers_must_agree_with_the_body() {
        let body =
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_docs"}}"#;
        assert!(
            calls(
                &h(&[("mcp-method", "tools/call"), ("mcp-name", "search_docs")]),
                body
            )
            .is_ok()
        );
        let e = calls(&h(&[("mcp-name", "search_docs")]), br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repository"}}"#).unwrap_err();
        assert!(e.contains("Mcp-Name"), "{e}");
        assert!(calls(&h(&[("mcp-method", "tools/list")]), body).is_err());
        assert!(calls(&h(&[("mcp-name", "a"), ("mcp-name", "b")]), body).is_err());
    }
}
