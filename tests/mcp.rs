//! MCP-aware policy (issue 19) against the official MCP Python SDK: an `MCPServer` over
//! streamable HTTP with a harmless and a dangerous tool (answering in SSE, and in JSON); the
//! SDK's `Client`, and the TypeScript SDK's (`@modelcontextprotocol/client` on undici's
//! `EnvHttpProxyAgent`), through HTTP_PROXY. Policy decides each tool call (`context.mcp`, with
//! the arguments the route declares), `tools/list` offers only the tools policy could permit,
//! a refused call is answered with the JSON-RPC error the client expects and never reaches
//! the server, the allowed one does with a token scoped to its tool, a header that disagrees
//! with the body is refused, and the line names each tool.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

fn support() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support")
}

/// The `tools/list` line says the listing offered one tool and hid the dangerous one.
fn assert_listing_hid_the_dangerous_tool(lines: &[Value]) {
    let list = lines
        .iter()
        .find(|l| l["mcp"]["method"] == "tools/list")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(
        list["mcp"]["hidden"],
        serde_json::json!(["delete_repository"])
    );
    assert_eq!(list["mcp"]["offered"], 1, "{list}");
}

/// Run an agent (an MCP client command) through the sidecar as `HTTP_PROXY`.
fn through(mut agent: Command, sc: &Sidecar) -> std::process::Output {
    agent
        .env("HTTP_PROXY", sc.proxy_url())
        .env("http_proxy", sc.proxy_url())
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap()
}

/// The Python SDK's client, asking `url` (then `args`).
fn python_client(url: &str) -> Command {
    let mut c = Command::new(python());
    c.arg(support().join("mcp_client.py")).arg(url);
    c
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
    let out = through(python_client(&format!("http://127.0.0.1:{port}/mcp")), &sc);
    let calls = named_lines(&out);
    // The listing offers only what policy could permit; the agent calls the hidden tool anyway.
    assert_eq!(
        calls["tools"],
        serde_json::json!(["search_docs"]),
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
    let ran = server.wait_lines_after("called ", 1);
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
    assert_eq!(
        delete["status"], 200,
        "the line says what the client got: {delete}"
    );
    assert_eq!(delete["error"], "policy_denied", "{delete}");
    assert_eq!(delete["policy_ids"], serde_json::json!(["never-delete"]));
    assert_eq!(delete["answered_by"], "chaperone");
    assert_listing_hid_the_dangerous_tool(&lines);

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
    assert_eq!(server.wait_lines_after("called ", 1).len(), 1);
    sc.assert_never_shows(&[INJECTED_KEY]);
}

/// Permits read a tool call's arguments; each tool's token carries the tool's scopes.
const ARGUMENT_POLICY: &str = r#"@id("mcp-session")
permit(principal, action, resource) when { context has mcp && context.mcp.method != "tools/call" };
@id("public-docs-only")
permit(principal, action, resource) when {
  context has mcp && context.mcp.name == "search_docs" &&
  context.mcp has arguments && context.mcp.arguments has repo && context.mcp.arguments.repo == "public"
};
@id("never-delete")
forbid(principal, action, resource) when { context has mcp && context.mcp.name == "delete_repository" };
@id("session-end")
permit(principal, action == Action::"DELETE", resource);
@id("stream")
permit(principal, action == Action::"GET", resource);
"#;

/// The JWT claims of `Bearer <jwt>` (unverified: the sidecar minted it; the test reads it).
fn claims(authorization: &str) -> Value {
    use base64::Engine;
    let jwt = authorization.strip_prefix("Bearer ").expect(authorization);
    let payload = jwt.split('.').nth(1).expect(jwt);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn tools_list_is_filtered_arguments_decide_and_each_tool_gets_its_scopes() {
    // The Python SDK's client against both framings; the TypeScript SDK's against SSE.
    for (framing, agent) in [("sse", "python"), ("json", "python"), ("sse", "typescript")] {
        let mut cmd = Command::new(python());
        cmd.arg(support().join("mcp_server.py"));
        if framing == "json" {
            cmd.arg("--json");
        }
        let server = ServerProcess::start(cmd, "the MCP server (Python SDK)");
        let port = server.port.unwrap();
        let cfg = Cfg::new()
            .set("credentials", "per-call:\n  kind: jwt\n  ttl: 60s")
            .set(
                "routes",
                &format!(
                    "- name: tools
  match: {{ host: 127.0.0.1, port: {port}, path_prefix: /mcp }}
  credential: per-call
  scopes: [mcp.session]
  mcp: true
  tools:
    search_docs: {{ scopes: [docs.read], arguments: {{ repo: String }} }}
    delete_repository: [repo.admin]
"
                ),
            )
            .yaml();
        let sc = Sidecar::start(&cfg, ARGUMENT_POLICY, &[]);
        let url = format!("http://127.0.0.1:{port}/mcp");
        let mut client = match agent {
            "python" => python_client(&url),
            _ => {
                let mut c = Command::new("node");
                c.arg("mcp_client_ts.mjs").arg(&url).current_dir(support());
                c
            }
        };
        client.arg(
            serde_json::json!([
                ["search_docs", {"query": "sidecar", "repo": "public"}],
                ["search_docs", {"query": "keys", "repo": "private"}],
                ["search_docs", {"query": "keys", "repo": ["public", "private"]}],
                ["delete_repository", {"name": "prod"}],
            ])
            .to_string(),
        );
        let out = through(client, &sc);
        let calls = named_lines(&out);
        assert_eq!(
            calls["tools"],
            serde_json::json!(["search_docs"]),
            "{agent} {framing}: a tool permitted for some arguments is offered, one forbidden whatever they are is not: {calls:?}"
        );
        assert_eq!(
            calls["search_docs"]["text"], "3 results for sidecar in public",
            "{framing}: {calls:?}"
        );
        // Refused as MCP errors the agent can read: no permit for a private repository or
        // for arguments of the wrong type; the forbid for the dangerous tool.
        for refused in ["search_docs#2", "search_docs#3"] {
            let r = &calls[refused];
            assert!(r["raised"].is_string(), "{agent} {framing} {refused}: {r}");
            assert!(
                r["message"]
                    .as_str()
                    .is_some_and(|m| m.ends_with("no policy permits this request")),
                "{agent}: {r}"
            );
        }
        assert!(
            calls["delete_repository"]
                .to_string()
                .contains("never-delete")
        );
        let ran = server.wait_lines_after("called ", 1);
        assert_eq!(
            ran.len(),
            1,
            "{framing}: only the permitted call ran: {ran:?}"
        );
        let auth = ran[0].rsplit(' ').next().unwrap();
        let c = claims(&format!("Bearer {auth}"));
        let scope = c["scope"].as_str().unwrap_or_default();
        assert!(
            scope.split(' ').any(|s| s == "docs.read") && !scope.contains("mcp.session"),
            "{framing}: the tool call's token has the tool's scopes, not the route's: {c}"
        );
        assert!(scope.contains("purpose:tool:search_docs"), "{c}");

        let lines = sc.lines_where(6, |l| l["route"] == "tools" && l["method"] == "POST");
        assert_listing_hid_the_dangerous_tool(&lines);
        let denied: Vec<&Value> = lines
            .iter()
            .filter(|l| l["mcp"]["name"] == "search_docs" && l["decision"] == "deny")
            .collect();
        assert_eq!(denied.len(), 2, "{framing}: {lines:#?}");
        assert!(
            denied
                .iter()
                .all(|l| l["policy_ids"] == serde_json::json!([])),
            "denied by default: no permit applied ({denied:#?})"
        );
        // The arguments are never logged.
        assert!(!sc.output().contains("\"private\""), "{}", sc.output());
        if (framing, agent) == ("sse", "python") {
            audit_and_review_by_tool(&sc, port);
        }
    }
}

/// `audit` counts each tool's calls and the listings it was hidden from; `review` proposes
/// a permit naming the tools and MCP methods used, and nothing else.
fn audit_and_review_by_tool(sc: &Sidecar, port: u16) {
    let (code, out, err) = chaperone("audit", &["--json", sc.stdout.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    let tool = |name: &str| -> Value {
        r["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tool"] == name)
            .unwrap_or_else(|| panic!("{name}: {}", r["tools"]))
            .clone()
    };
    let search = tool("search_docs");
    assert_eq!(
        (&search["calls"], &search["allowed"], &search["denied"]),
        (&Value::from(3), &Value::from(1), &Value::from(2)),
        "{search}"
    );
    let delete = tool("delete_repository");
    assert_eq!(
        (&delete["denied"], &delete["hidden"]),
        (&Value::from(1), &Value::from(1))
    );
    assert_eq!(delete["denied_by"], serde_json::json!(["never-delete"]));

    let dir = sc.dir();
    let suggested = dir.join("suggested.cedar");
    let (code, out, err) = chaperone(
        "review",
        &[
            "--json",
            "--config",
            dir.join("config.yaml").to_str().unwrap(),
            "--suggest-out",
            suggested.to_str().unwrap(),
            sc.stdout.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        r["suggestion_check"]["allowed"], r["suggestion_check"]["decided"],
        "{}",
        r["suggestion_check"]
    );
    assert_eq!(
        r["unused_tools"],
        serde_json::json!([{"route": "tools", "tool": "delete_repository"}])
    );
    let text = std::fs::read_to_string(&suggested).unwrap();
    assert!(
        text.contains(
            r#"context.mcp.method == "tools/call" && ["search_docs"].contains(context.mcp.name)"#
        ),
        "{text}"
    );
    // Under the suggestion, an MCP method the policy permitted but nobody used is refused.
    let eval = |policy: &str, method: &str, name: &str| -> String {
        std::fs::write(dir.join("policy.cedar"), policy).unwrap();
        let url = format!("http://127.0.0.1:{port}/mcp");
        let (_, out, err) = chaperone(
            "policy",
            &[
                "eval",
                "--config",
                dir.join("config.yaml").to_str().unwrap(),
                "--method",
                "POST",
                "--mcp-method",
                method,
                "--mcp-name",
                name,
                "--url",
                &url,
            ],
        );
        format!("{out}{err}")
    };
    let loose = eval(ARGUMENT_POLICY, "resources/read", "file:///etc");
    assert!(loose.contains("decision:  allow"), "{loose}");
    let tight = eval(&text, "resources/read", "file:///etc");
    assert!(tight.contains("decision:  deny"), "{tight}");
    let used = eval(&text, "tools/call", "search_docs");
    assert!(used.contains("decision:  allow"), "{used}");
    std::fs::write(dir.join("policy.cedar"), ARGUMENT_POLICY).unwrap();
}

const CLIENT_SECRET: &str = "mcp-oauth-client-secret-9d2e4b";

/// oidc-provider issuing tokens for the resource asked for, and an MCP server it protects.
fn protected_server(trusts: Option<&str>) -> (ServerProcess, ServerProcess, String) {
    let mut auth = Command::new("node");
    auth.arg(support().join("oidc-provider.mjs"))
        .args(["0", CLIENT_SECRET])
        .env("RESOURCE_AUDIENCE", "1");
    let auth = ServerProcess::start(auth, "oidc-provider");
    let issuer = format!("http://127.0.0.1:{}", auth.port.unwrap());
    let mut cmd = Command::new(python());
    cmd.arg(support().join("mcp_server.py"))
        .args(["--oauth", trusts.unwrap_or(&issuer)]);
    let server = ServerProcess::start(cmd, "the MCP server with OAuth (Python SDK)");
    (auth, server, issuer)
}

fn oauth_sidecar(port: u16, issuer: &str) -> Sidecar {
    let cfg = Cfg::new()
        .set(
            "credentials",
            &format!(
                "mcp-oauth:\n  kind: client_credentials\n  token_url: {issuer}/token\n  client_id: chaperone\n  client_secret_file: {{dir}}/client-secret"
            ),
        )
        .set(
            "routes",
            &format!(
                "- name: tools\n  match: {{ host: 127.0.0.1, port: {port}, path_prefix: /mcp }}\n  credential: mcp-oauth\n  mcp: true\n"
            ),
        )
        .yaml();
    Sidecar::start_with(&cfg, POLICY, &[], |dir| {
        std::fs::write(dir.join("client-secret"), CLIENT_SECRET).unwrap();
    })
}

/// MCP's own authorization (RFC 9728 protected-resource metadata, RFC 8707 resource
/// indicators) is done by the sidecar: the agent holds no token and knows nothing of OAuth.
#[test]
fn an_mcp_servers_oauth_is_answered_for_the_agent() {
    let (auth, server, issuer) = protected_server(None);
    let port = server.port.unwrap();
    let resource = format!("http://127.0.0.1:{port}/mcp");
    let sc = oauth_sidecar(port, &issuer);
    let out = through(python_client(&resource), &sc);
    let calls = named_lines(&out);
    assert_eq!(
        calls["tools"],
        serde_json::json!(["search_docs"]),
        "{calls:?}"
    );
    assert_eq!(
        calls["search_docs"]["text"],
        "3 results for sidecar in public"
    );
    let ran = server.wait_lines_after("called ", 1);
    assert_eq!(ran.len(), 1, "{ran:?}");
    let token = ran[0].rsplit(' ').next().unwrap();
    let c = claims(&format!("Bearer {token}"));
    assert_eq!(
        c["aud"], resource,
        "a token for this server (RFC 8707): {c}"
    );
    assert!(
        c["scope"]
            .as_str()
            .unwrap_or_default()
            .contains("tools.read"),
        "the scope the server's challenge asked for: {c}"
    );
    // One refusal taught the sidecar the resource; every later request carried the right
    // token from the start, from the cache.
    assert_eq!(
        server.lines_after("rejected").len(),
        1,
        "{}",
        server.stderr()
    );
    assert_eq!(auth.lines_after("token").len(), 2, "{}", auth.stderr());
    // (server/discover, tools/list, tools/call: MCP 2026-07-28 needs no initialize.)
    let lines = sc.lines_where(3, |l| l["route"] == "tools" && l["decision"] == "allow");
    assert!(
        lines
            .iter()
            .all(|l| l["status"] == 200 || l["status"] == 202 || l["method"] != "POST"),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["credential"]["resource"] == resource),
        "{lines:#?}"
    );
    sc.assert_never_shows(&[CLIENT_SECRET, token]);
}

/// A server whose metadata names an authorization server the route's credential does not
/// use gets no token: the request fails closed, with the reason.
#[test]
fn an_mcp_server_trusting_another_authorization_server_fails_closed() {
    let (_auth, server, issuer) = protected_server(Some("https://idp.elsewhere.test"));
    let port = server.port.unwrap();
    let sc = oauth_sidecar(port, &issuer);
    let (code, body) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-H",
        "content-type: application/json",
        "-H",
        "accept: application/json, text/event-stream",
        "--data",
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        &format!("http://127.0.0.1:{port}/mcp"),
    ]);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("trusts authorization servers"), "{body}");
    assert!(body.contains("idp.elsewhere.test"), "{body}");
    assert!(server.lines_after("called ").is_empty());
}
