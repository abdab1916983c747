//! Per-call tokens by the standards they claim to follow, checked by a resource server written
//! with node `jose` (tests/support/resource_server.mjs): an RFC 9068 access token (`at+jwt`,
//! the destination as `aud`, `client_id`, `Authorization: Bearer`) and an OAuth Transaction
//! Token (`txntoken+jwt`, the trust domain as `aud`, in the `Txn-Token` header and never as
//! `Authorization`). Each token is accepted once; the config refuses a transaction token
//! routed into `Authorization`.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const ID: &str = "spiffe://agents.test/ns/ml/sa/support-agent";

fn resource_server(jwks_file: &Path, audience: &str) -> ServerProcess {
    let mut cmd = Command::new("node");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/resource_server.mjs"))
        .arg(jwks_file)
        .args([ID, audience, "agents.test"]);
    ServerProcess::start(cmd, "the jose resource server")
}

#[test]
fn access_tokens_and_transaction_tokens_verify_by_their_own_rules() {
    let files = tempfile::tempdir().unwrap();
    let jwks_file = files.path().join("jwks-url");
    // The resource server's origin is the access token's audience; its port is known only
    // once it listens, so the audience is set on the route.
    let rs = resource_server(&jwks_file, "https://tools.agents.test");
    let port = rs.port.unwrap();
    let cfg = format!(
        r#"listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity: {{ id: {ID}, workload: support-agent, environment: test }}
credentials:
  access: {{ kind: jwt, ttl: 60s }}
  txn: {{ kind: jwt, ttl: 60s, profile: txn_token }}
routes:
  - name: api
    match: {{ host: 127.0.0.1, port: {port}, path_prefix: /at/ }}
    credential: access
    audience: https://tools.agents.test
    scopes: [tickets.read]
  - name: internal
    match: {{ host: 127.0.0.1, port: {port}, path_prefix: /txn/ }}
    credential: txn
    scopes: [tickets.read]
strip: {{ mode: strip }}
policy: {{ file: {{dir}}/policy.cedar }}
log: {{ format: json, output: stdout }}
"#
    );
    let sc = Sidecar::start(&cfg, PERMISSIVE_POLICY, &[]);
    std::fs::write(
        &jwks_file,
        format!("http://{}/.well-known/jwks.json", sc.admin),
    )
    .unwrap();
    let get = |path: &str, extra: &[&str]| -> (u16, serde_json::Value) {
        let mut args = vec!["-x".to_string(), sc.proxy_url()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(format!("http://127.0.0.1:{port}{path}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, body) = curl(&args);
        (code, serde_json::from_str(&body).unwrap_or_default())
    };
    let purpose = ["-H", "chaperone-purpose: triage"];
    for _ in 0..2 {
        let (code, body) = get("/at/tickets", &purpose);
        assert_eq!(code, 200, "{body} {}", rs.stderr());
        assert_eq!(body["claims"]["client_id"], ID, "{body}");
        assert_eq!(body["claims"]["scope"], "tickets.read purpose:triage");
    }
    for _ in 0..2 {
        // The app's own bearer goes (stripped); the transaction token rides beside nothing.
        let (code, body) = get(
            "/txn/tickets",
            &[
                "-H",
                "chaperone-purpose: triage",
                "-H",
                "Authorization: Bearer sk-proj-AbCdEf0123456789AbCdEf0123456789AbCdEf01",
            ],
        );
        assert_eq!(code, 200, "{body} {}", rs.stderr());
        assert_eq!(body["claims"]["aud"], "agents.test", "{body}");
        assert_eq!(body["claims"]["tctx"]["purpose"], "triage");
        assert_eq!(body["claims"].get("client_id"), None, "{body}");
        assert_eq!(body["authorization"], serde_json::Value::Null, "{body}");
    }
    assert_eq!(
        rs.wait_lines_after("accepted ", 4).len(),
        4,
        "each token once"
    );
    assert!(
        rs.lines_after("refused ").is_empty(),
        "{:?}",
        rs.lines_after("refused ")
    );
    let lines = sc.lines_where(4, |l| l["kind"] == "http");
    for l in &lines {
        assert_eq!(l["credential"]["kind"], "jwt", "{l}");
    }
}

#[test]
fn a_transaction_token_is_never_routed_into_authorization() {
    let cfg = r#"identity: { id: spiffe://agents.test/ns/ml/sa/a, workload: a, environment: test }
credentials:
  txn: { kind: jwt, profile: txn_token }
  odd: { kind: jwt, profile: refresh_token }
routes:
  - name: r
    match: { host: api.example.org }
    credential: txn
    inject: { header: authorization, value: "Bearer {token}" }
policy: { file: /dev/null }
"#;
    let (_dir, path) = temp_file("bad.yaml", cfg);
    let (ok, out, err) =
        run(Command::new(bin()).args(["check", "--config", path.to_str().unwrap()]));
    assert!(!ok, "{out}");
    assert!(
        err.contains("routes[0].inject: a transaction token goes in the Txn-Token header only"),
        "{err}"
    );
    assert!(
        err.contains("credentials.odd.profile: `refresh_token` is not access_token or txn_token"),
        "{err}"
    );

    let no_domain = r#"identity: { id: agent-sa, workload: a, environment: test }
credentials:
  txn: { kind: jwt, profile: txn_token }
policy: { file: /dev/null }
"#;
    let (_dir, path) = temp_file("bad.yaml", no_domain);
    let (ok, _, err) = run(Command::new(bin()).args(["check", "--config", path.to_str().unwrap()]));
    assert!(!ok);
    assert!(err.contains("set identity.trust_domain"), "{err}");
}
