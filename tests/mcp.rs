//! MCP-aware policy (issue 19) against the official MCP Python SDK: an `MCPServer` over
//! streamable HTTP with a harmless and a dangerous tool, and the SDK's `Client` through
//! HTTP_PROXY. Policy decides each tool call (`context.mcp`), a refused call is answered with
//! the JSON-RPC error the client expects and never reaches the server, the allowed one does
//! with the route's credential, a header that disagrees with the body is refused, and the
//! line names each tool.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

fn support() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support")
}

const POLICY: &str = r#"@id("mcp-session")
permit(principal, action, resource) when { context has mcp && context.mcp.method != "tools/call" };
@id("search-is-fine")
permit(principal, action, resource) when { context has mcp && context.mcp.name == "search_docs" };
@id("never-delete")
forbid(principal, action, resource) when { context has mcp && context.mcp.name == "delete_repository" };
@id("session-end")
permit(principal, action == Action::"DELETE", resource);
@id("stream")
permit(principal, action == Action::"GET", resource);
"#;

#[test]
fn each_tool_call_is_decided_logged_and_refused_as_mcp_expects() {
    let mut cmd = Command::new(python());
    cmd.arg(support().join("mcp_server.py"));
    let server = ServerProcess::start(cmd, "the MCP server (Python SDK)");
    let port = server.port.unwrap();
    let cfg = Cfg::new()
        .set(
            "credentials",
            &format!("tools-key:\n  kind: static\n  from_env: {INJECTED_KEY_ENV}"),
        )
        .set(
            "routes",
            &format!(
                "- name: tools\n  match: {{ host: 127.0.0.1, port: {port}, path_prefix: /mcp }}\n  credential: tools-key\n  mcp: true\n"
            ),
        )
        .yaml();
    let sc = Sidecar::start(&cfg, POLICY, &[(INJECTED_KEY_ENV, INJECTED_KEY)]);
    let out = Command::new(python())
        .arg(support().join("mcp_client.py"))
        .arg(format!("http://127.0.0.1:{port}/mcp"))
        .env("HTTP_PROXY", sc.proxy_url())
        .env("http_proxy", sc.proxy_url())
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    let calls = named_lines(&out);
    assert_eq!(
        calls["tools"],
        serde_json::json!(["delete_repository", "search_docs"]),
        "{calls:?}"
    );
    assert_eq!(calls["search_docs"]["error"], false, "{calls:?}");
    assert_eq!(
        calls["search_docs"]["text"],
        "3 results for sidecar in public"
    );
    // The refusal reaches the agent as an MCP error naming the policy, not a dropped call.
    let refused = calls["delete_repository"].to_string();
    assert!(refused.contains("never-delete"), "{refused}");
    let ran = server.lines_after("called ");
    assert_eq!(
        ran.len(),
        1,
        "the refused tool never reached the server: {ran:?}"
    );
    assert!(ran[0].starts_with("search_docs "), "{ran:?}");
    assert!(
        ran[0].ends_with(INJECTED_KEY),
        "the allowed call carried the route's credential: {ran:?}"
    );

    let lines = sc.lines_where(4, |l| l["route"] == "tools" && l["method"] == "POST");
    let tool_line = |name: &str| -> Value {
        lines
            .iter()
            .find(|l| l["mcp"]["name"] == name)
            .unwrap_or_else(|| panic!("no line for {name}: {lines:#?}"))
            .clone()
    };
    let search = tool_line("search_docs");
    assert_eq!(search["mcp"]["method"], "tools/call", "{search}");
    assert_eq!(search["purpose"], "tool:search_docs", "{search}");
    assert_eq!(search["decision"], "allow");
    // (MCP 2026-07-28 servers are stateless: no `Mcp-Session-Id`, so no `session`.)
    let delete = tool_line("delete_repository");
    assert_eq!(delete["decision"], "deny", "{delete}");
    assert_eq!(delete["policy_ids"], serde_json::json!(["never-delete"]));
    assert_eq!(delete["answered_by"], "chaperone");
    assert!(
        lines.iter().any(|l| l["mcp"]["method"] == "tools/list"),
        "{lines:#?}"
    );

    // A header that says one tool while the body calls another is an attack: 400.
    let (code, body) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-H",
        "content-type: application/json",
        "-H",
        "accept: application/json, text/event-stream",
        "-H",
        "Mcp-Method: tools/call",
        "-H",
        "Mcp-Name: search_docs",
        "--data",
        r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"delete_repository","arguments":{"name":"prod"}}}"#,
        &format!("http://127.0.0.1:{port}/mcp"),
    ]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("Mcp-Name"), "{body}");
    assert_eq!(server.lines_after("called ").len(), 1);
    sc.assert_never_shows(&[INJECTED_KEY]);
}
