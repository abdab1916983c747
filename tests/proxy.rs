//! End-to-end tests: the real binary, real upstreams on loopback, real clients (curl, Python
//! `requests`, a hyper client, raw sockets).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

const STATIC_ENV: &str = "TEST_STATIC_KEY";

fn config(upstream_port: u16, mode: &str) -> String {
    base(upstream_port, mode).yaml()
}

/// Two routes to the upstream: a static key under `/static/`, a per-call JWT under `/v1/`.
fn base(upstream_port: u16, mode: &str) -> Cfg {
    Cfg::new()
        .set("credentials", &credentials(""))
        .set(
            "routes",
            &format!(
                r#"- name: static-route
  match: {{ host: 127.0.0.1, port: {upstream_port}, path_prefix: /static/ }}
  credential: app-key
  inject: {{ header: x-api-key, value: "{{token}}" }}
- name: jwt-route
  match: {{ host: 127.0.0.1, port: {upstream_port}, path_prefix: /v1/ }}
  credential: per-call
  purpose_default: inference
  scopes: [model.invoke]
  labels: {{ sensitivity: high }}"#
            ),
        )
        .set("strip", &format!("mode: {mode}"))
        .set("timeouts", "shutdown_grace: 5s")
}

/// The static key and the per-call JWT; `jwt_extra` adds lines to the JWT credential.
fn credentials(jwt_extra: &str) -> String {
    format!(
        "app-key:\n  kind: static\n  from_env: {STATIC_ENV}\nper-call:\n  kind: jwt\n  ttl: 90s\n{jwt_extra}"
    )
}

fn static_value() -> String {
    format!("static-sidecar-secret-{:x}", rand_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_request_has_secret_stripped_credential_injected_and_one_log_line() {
    let up = Upstream::start().await;
    let value = static_value();
    let sc = Sidecar::start(
        &config(up.addr.port(), "strip"),
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, &value)],
    );
    let key = fake_openai_key();
    let key2 = fake_openai_key();
    let url = format!(
        "http://127.0.0.1:{}/static/chat?model=m1&api_key={key2}",
        up.addr.port()
    );
    let (code, body) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-H",
        &format!("Authorization: Bearer {key}"),
        "-H",
        "chaperone-purpose: answer-question",
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"q":"hi"}"#,
        &url,
    ]);
    assert_eq!(code, 200, "{body}");

    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(
        r.header("x-api-key"),
        Some(value.as_str()),
        "injected credential"
    );
    assert!(
        r.header("authorization").is_none(),
        "app's authorization header must be gone"
    );
    assert!(
        r.header("chaperone-purpose").is_none(),
        "purpose header must not be forwarded"
    );
    assert!(
        !r.all_text().contains(&key) && !r.all_text().contains(&key2),
        "embedded secret reached upstream: {r:?}"
    );
    assert_eq!(
        r.uri, "/static/chat?model=m1",
        "credential query parameter removed, others kept"
    );
    assert!(
        r.header("via")
            .is_some_and(|v| v.starts_with("1.1 chaperone-"))
    );
    assert_eq!(r.body, r#"{"q":"hi"}"#);

    let lines = sc.log_lines(1);
    assert_eq!(lines.len(), 1);
    let l = &lines[0];
    for k in [
        "ts",
        "request_id",
        "trace_id",
        "identity",
        "workload",
        "stage",
        "environment",
        "purpose",
        "method",
        "scheme",
        "host",
        "port",
        "path",
        "route",
        "decision",
        "policy_ids",
        "credential",
        "stripped",
        "status",
        "duration_ms",
        "upstream_ms",
        "error",
    ] {
        assert!(l.get(k).is_some(), "log line lacks {k}: {l}");
    }
    assert_eq!(l["identity"], "spiffe://test.local/ns/ml/sa/inference");
    assert_eq!(l["workload"], "test-inference");
    assert_eq!(l["purpose"], "answer-question");
    assert_eq!(l["route"], "static-route");
    assert_eq!(l["decision"], "allow");
    assert_eq!(l["status"], 200);
    assert_eq!(l["policy_ids"], serde_json::json!(["allow-all"]));
    assert_eq!(l["credential"]["name"], "app-key");
    assert_eq!(l["credential"]["kind"], "static");
    assert!(l["credential"]["id"].as_str().unwrap().starts_with("fp:"));
    assert_eq!(l["query"], "model=<redacted>&api_key=<redacted>");
    assert_eq!(l["request_id"].as_str(), r.header("chaperone-request-id"));
    let stripped: Vec<(String, String)> = l["stripped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["type"].as_str().unwrap().to_string(),
                f["location"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        stripped.contains(&("openai_project_key".into(), "header:authorization".into())),
        "{stripped:?}"
    );
    assert!(
        stripped.contains(&("openai_project_key".into(), "query:api_key".into())),
        "{stripped:?}"
    );

    let out = sc.output();
    for secret in [&key, &key2, &value] {
        assert!(
            !out.contains(secret.as_str()),
            "a secret reached the proxy's output"
        );
    }
    let (_, metrics) = admin_get(sc.admin, "/metrics");
    assert!(
        metrics.contains(
            r#"chaperone_stripped_secrets_total{type="openai_project_key",location="header"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"route="static-route",decision="allow",status="200""#),
        "{metrics}"
    );
    for secret in [&key, &key2, &value] {
        assert!(!metrics.contains(secret.as_str()));
    }
}

async fn jwks(sc: &Sidecar) -> JwkSet {
    let (code, body) = admin_get(sc.admin, "/.well-known/jwks.json");
    assert_eq!(code, 200);
    let body = body.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap()
}

fn verify(jwks: &JwkSet, token: &str, aud: &str) -> Value {
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("kid in JWKS");
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_audience(&[aud]);
    v.set_issuer(&["spiffe://test.local/ns/ml/sa/inference"]);
    jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &v)
        .unwrap()
        .claims
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_via_http_proxy_gets_a_fresh_verified_token_per_call() {
    let up = Upstream::start().await;
    let sc = Sidecar::start(
        &config(up.addr.port(), "strip"),
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, "unused-static-value")],
    );
    let script = format!(
        r#"
import requests
for purpose in ["summarize-ticket", "answer-question"]:
    r = requests.post("http://127.0.0.1:{port}/v1/chat/completions", json={{"q": 1}},
                      headers={{"chaperone-purpose": purpose, "X-Api-Key": "sk-proj-a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8s9T0"}})
    print(r.status_code, r.headers.get("chaperone-request-id"))
"#,
        port = up.addr.port()
    );
    let (ok, out, err) = run(Command::new(python())
        .args(["-c", &script])
        .env("HTTP_PROXY", sc.proxy_url())
        .env_remove("NO_PROXY")
        .env_remove("no_proxy"));
    assert!(ok, "python failed: {err}");
    let statuses: Vec<&str> = out
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(statuses, ["200", "200"], "{out}");

    let set = jwks(&sc).await;
    let reqs = up.requests();
    assert_eq!(reqs.len(), 2);
    let aud = format!("http://127.0.0.1:{}", up.addr.port());
    let lines = sc.log_lines(2);
    let mut jtis = Vec::new();
    for (r, purpose) in reqs.iter().zip(["summarize-ticket", "answer-question"]) {
        assert!(
            r.header("x-api-key").is_none(),
            "embedded key header stripped"
        );
        let token = r
            .header("authorization")
            .unwrap()
            .strip_prefix("Bearer ")
            .unwrap();
        let claims = verify(&set, token, &aud);
        assert_eq!(claims["sub"], "spiffe://test.local/ns/ml/sa/inference");
        assert_eq!(claims["tctx"]["purpose"], purpose);
        assert_eq!(claims["tctx"]["workload"], "test-inference");
        assert_eq!(claims["rctx"]["method"], "POST");
        assert_eq!(claims["scope"], format!("model.invoke purpose:{purpose}"));
        assert_eq!(claims["txn"].as_str(), r.header("chaperone-request-id"));
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            90
        );
        let line = lines
            .iter()
            .find(|l| l["request_id"] == claims["txn"])
            .expect("log line for the call");
        assert_eq!(
            line["credential"]["id"], claims["jti"],
            "the log names the token by its jti"
        );
        assert!(
            !line.to_string().contains(token),
            "the token itself is never logged"
        );
        jtis.push(claims["jti"].as_str().unwrap().to_string());
    }
    assert_ne!(jtis[0], jtis[1], "each call gets its own token");
    assert!(
        !sc.output()
            .contains("sk-proj-a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8s9T0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_denial_is_a_403_json_error_logged_as_deny() {
    let up = Upstream::start().await;
    let sc = Sidecar::start(
        &config(up.addr.port(), "strip"),
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, "v-static-value")],
    );
    let url = format!("http://127.0.0.1:{}/v1/files", up.addr.port());
    let (code, body) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-H",
        "chaperone-purpose: exfiltrate",
        &url,
    ]);
    assert_eq!(code, 403);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "policy_denied");
    assert_eq!(body["policy_ids"], serde_json::json!(["no-exfiltration"]));
    assert!(body["reason"].as_str().unwrap().contains("no-exfiltration"));
    assert!(
        up.requests().is_empty(),
        "a denied request never reaches the upstream"
    );
    let l = &sc.log_lines(1)[0];
    assert_eq!(l["decision"], "deny");
    assert_eq!(l["purpose"], "exfiltrate");
    assert_eq!(l["error"], "policy_denied");
    assert_eq!(l["request_id"], body["request_id"]);
    assert!(
        l["credential"].is_null(),
        "no credential is obtained for a denied request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_deny_when_no_policy_permits() {
    let up = Upstream::start().await;
    let sc = Sidecar::start(
        &config(up.addr.port(), "strip"),
        "forbid(principal, action, resource) when { context.purpose == \"x\" };",
        &[(STATIC_ENV, "v-static-value")],
    );
    let (code, body) = curl(&[
        "-x",
        &sc.proxy_url(),
        &format!("http://127.0.0.1:{}/anything", up.addr.port()),
    ]);
    assert_eq!(code, 403);
    assert!(body.contains("no policy permits this request"), "{body}");
    assert!(up.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_mode_refuses_embedded_secrets_without_echoing_them() {
    let up = Upstream::start().await;
    let sc = Sidecar::start(
        &config(up.addr.port(), "block"),
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, "v-static-value")],
    );
    let key = fake_openai_key();
    let (code, body) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-H",
        &format!("x-api-key: {key}"),
        &format!("http://127.0.0.1:{}/v1/x", up.addr.port()),
    ]);
    assert_eq!(code, 403);
    assert!(
        body.contains("embedded_secret") && body.contains("header:x-api-key"),
        "{body}"
    );
    assert!(!body.contains(&key));
    assert!(up.requests().is_empty());
    assert!(!sc.output().contains(&key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_mode_proxies_reports_and_injects_nothing() {
    let up = Upstream::start().await;
    let sc = Sidecar::start_observe();
    assert!(sc.output().contains("OBSERVE MODE"));
    let key = fake_openai_key();
    let (code, _) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-H",
        &format!("Authorization: Bearer {key}"),
        &format!("http://127.0.0.1:{}/v1/x", up.addr.port()),
    ]);
    assert_eq!(code, 200);
    let r = &up.requests()[0];
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {key}").as_str()),
        "report mode leaves it"
    );
    let l = &sc.log_lines(1)[0];
    assert_eq!(l["strip_mode"], "report");
    assert_eq!(l["stripped"][0]["type"], "openai_project_key");
    assert!(l["credential"].is_null());
    assert!(!sc.output().contains(&key));
    // Guardrails hold even in observe mode.
    let (code, body) = curl(&[
        "-x",
        &sc.proxy_url(),
        "http://169.254.169.254/latest/meta-data/",
    ]);
    assert_eq!(code, 403, "{body}");
    let (code, _) = curl(&[
        "-x",
        &sc.proxy_url(),
        &format!("http://{}/metrics", sc.admin),
    ]);
    assert_eq!(
        code, 403,
        "the admin port is not reachable through the proxy"
    );
    // SIGHUP (a habit of operators) reloads the embedded policy; it never ends the process.
    let pid = sc.child.as_ref().unwrap().id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(Duration::from_millis(300));
    let (code, _) = curl(&[
        "-x",
        &sc.proxy_url(),
        &format!("http://127.0.0.1:{}/v1/after-hup", up.addr.port()),
    ]);
    assert_eq!(code, 200, "still serving after SIGHUP");
}

#[test]
fn check_lists_every_error_with_file_line_and_key() {
    let (_dir, bad) = temp_file(
        "bad.yaml",
        "listen: 127.0.0.1:15001\nidentity:\n  id: spiffe://t/x\n  workload: w\n  environment: e\ncredentials:\n  k:\n    kind: static\n    from_env: SURELY_UNSET_VAR_FOR_TEST\nroutes:\n  - name: r\n    match: { host: api.test }\n    credential: nope\npolicy:\n  file: missing.cedar\n",
    );
    let (ok, _, err) = run(Command::new(bin()).args(["check", "--config", bad.to_str().unwrap()]));
    assert!(!ok);
    let file = bad.display().to_string();
    for want in [
        format!(
            "{file}:9:5: credentials.k.from_env: environment variable SURELY_UNSET_VAR_FOR_TEST"
        ),
        format!("{file}:13:5: routes[0].credential: no credential named `nope`"),
        format!("{file}:15:3: policy.file: cannot read"),
    ] {
        assert!(err.contains(&want), "missing `{want}` in:\n{err}");
    }

    std::fs::write(&bad, "listen: 127.0.0.1:1\nadmin: [oops\n").unwrap();
    let (ok, _, err) = run(Command::new(bin()).args(["check", "--config", bad.to_str().unwrap()]));
    assert!(!ok);
    assert!(err.starts_with(&format!("{file}:")), "{err}");

    std::fs::write(&bad, "identity:\n  id: a\n  workload: w\n  environment: e\n  colour: blue\npolicy: { file: p }\n").unwrap();
    let (ok, _, err) = run(Command::new(bin()).args(["check", "--config", bad.to_str().unwrap()]));
    assert!(!ok);
    assert!(
        err.contains(&format!("{file}:5:3: identity")) && err.contains("colour"),
        "{err}"
    );

    // `run` refuses the same config before binding anything.
    let (ok, _, err) = run(Command::new(bin()).args(["run", "--config", bad.to_str().unwrap()]));
    assert!(!ok);
    assert!(err.contains("not started"), "{err}");
}

/// The cloud examples, with the files a pod would have (the CA, the projected token) put
/// where they name them: every key is one the loader takes, each checks clean, and `check`
/// shows what its `provider:` route expanded to.
#[test]
fn cloud_examples_pass_check_where_their_files_exist() {
    for (example, expanded) in [
        (
            "bedrock.yaml",
            "route bedrock (provider bedrock): https://bedrock-runtime.*.amazonaws.com, bedrock-runtime-fips.*.amazonaws.com, bedrock-agent-runtime.*.amazonaws.com, bedrock-agent.*.amazonaws.com, bedrock.*.amazonaws.com; credential bedrock signs SigV4 (service bedrock, region from the host)",
        ),
        (
            "azure-openai.yaml",
            "route azure-openai (provider azure_openai): https://*.openai.azure.com, *.cognitiveservices.azure.com, *.services.ai.azure.com; credential entra into authorization: Bearer {token}; scopes https://cognitiveservices.azure.com/.default",
        ),
        (
            "vertex.yaml",
            "route vertex (provider vertex): https://aiplatform.googleapis.com, *-aiplatform.googleapis.com; credential gcp into authorization: Bearer {token}; scopes https://www.googleapis.com/auth/cloud-platform",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (ok, _, err) =
            run(Command::new(bin()).args(["ca", "init", "--out", d.to_str().unwrap()]));
        assert!(ok, "{err}");
        std::fs::write(d.join("token"), "eyJhbGciOiJSUzI1NiJ9.e30.c2ln").unwrap();
        std::fs::copy("examples/policy.cedar", d.join("policy.cedar")).unwrap();
        let token = d.join("token");
        let text = std::fs::read_to_string(format!("examples/{example}"))
            .unwrap()
            .replace("/etc/chaperone/", &format!("{}/", d.display()))
            .replace(
                "/var/run/secrets/eks.amazonaws.com/serviceaccount/token",
                token.to_str().unwrap(),
            )
            .replace(
                "/var/run/secrets/azure/tokens/azure-identity-token",
                token.to_str().unwrap(),
            )
            .replace("/var/run/secrets/tokens/gcp-token", token.to_str().unwrap());
        std::fs::write(d.join(example), text).unwrap();
        let (ok, out, err) =
            run(Command::new(bin()).args(["check", "--config", d.join(example).to_str().unwrap()]));
        assert!(ok, "{example}: {out}{err}");
        assert!(out.contains(expanded), "{example}: {out}");
    }
}

#[test]
fn examples_quickstart_passes_check() {
    let (ok, out, err) =
        run(Command::new(bin()).args(["check", "--config", "examples/quickstart.yaml"]));
    assert!(ok, "{err}");
    assert!(out.contains("ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_requests_get_4xx_and_the_proxy_keeps_serving() {
    let up = Upstream::start().await;
    let sc = Sidecar::start(
        &config(up.addr.port(), "strip"),
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, "v-static-value")],
    );
    let (code, _) = raw_request(sc.proxy, "THIS IS NOT HTTP\r\n\r\n");
    assert_eq!(code, 400);
    let (code, _) = raw_request(
        sc.proxy,
        "GET http://127.0.0.1:1/\x01\x02 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(code, 400);
    let huge = "a".repeat(100 * 1024);
    let (code, _) = raw_request(
        sc.proxy,
        &format!(
            "GET http://127.0.0.1:{}/ HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n",
            up.addr.port()
        ),
    );
    assert_eq!(code, 431, "oversized headers");
    let (code, _) = raw_request(sc.proxy, "GET /no-host HTTP/1.1\r\n\r\n");
    assert!((400..500).contains(&code), "{code}");
    let (code, body) = raw_request(
        sc.proxy,
        "GET ftp://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 400);
    assert!(body.contains("bad_request") && body.contains("unsupported scheme"));
    let (code, body) = raw_request(
        sc.proxy,
        "GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\nchaperone-purpose: has spaces\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 400, "{body}");
    // Still serving.
    let (code, _) = curl(&[
        "-x",
        &sc.proxy_url(),
        &format!("http://127.0.0.1:{}/ok", up.addr.port()),
    ]);
    assert_eq!(code, 200);
    assert!(sc.output().lines().all(|l| !l.contains("panicked")));
    // Those the parser refused before any stage saw them have their lines too.
    let refused = sc.lines_where(3, |l| {
        l["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("the HTTP parser refused"))
    });
    let statuses: Vec<u64> = refused
        .iter()
        .filter_map(|l| l["status"].as_u64())
        .collect();
    assert!(statuses.contains(&431), "{refused:#?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 400).count(),
        2,
        "the garbage line and the bad byte: {refused:#?}"
    );
    assert!(
        refused
            .iter()
            .all(|l| l["decision"] == "deny" && !l["request_id"].as_str().unwrap_or("").is_empty())
    );
}

/// A request with both Content-Length and Transfer-Encoding is the shape of request
/// smuggling: refused with 400 and the connection closed, and the upstream never sees it (or
/// what was hidden in its body); it has its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_two_lengths_is_refused_and_its_connection_closed() {
    use std::io::{Read, Write};
    let up = Upstream::start().await;
    let sc = Sidecar::start(
        &config(up.addr.port(), "strip"),
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, "v-static-value")],
    );
    let port = up.addr.port();
    // The chunked body ends early and hides a second request that a reader going by
    // Content-Length would take as the body, and one going by chunks as the next request.
    let smuggled = format!(
        "POST http://127.0.0.1:{port}/first HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 60\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET http://127.0.0.1:{port}/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    let mut s = std::net::TcpStream::connect(sc.proxy).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(smuggled.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("Content-Length and Transfer-Encoding"),
        "{answer}"
    );
    assert!(
        !answer[12..].contains("HTTP/1.1 "),
        "one answer, then the connection was closed: {answer}"
    );
    assert!(
        up.requests().is_empty(),
        "the upstream saw nothing: {:?}",
        up.requests()
            .iter()
            .map(|r| r.uri.clone())
            .collect::<Vec<_>>()
    );
    // The other order (hyper drops the later Content-Length without a word).
    let reversed = format!(
        "POST http://127.0.0.1:{port}/second HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
    );
    let (code, answer) = raw_request(sc.proxy, &reversed);
    assert_eq!(code, 400, "{answer}");
    assert!(up.requests().is_empty());
    let lines = sc.lines_where(2, |l| l["status"] == 400);
    assert_eq!(lines[0]["error"], "bad_request", "{lines:?}");
    assert_eq!(lines[0]["path"], "/first");
    assert_eq!(lines[1]["path"], "/second");
    // A chunked request alone is served.
    let (code, _) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-H",
        "transfer-encoding: chunked",
        "--data",
        "{}",
        &format!("http://127.0.0.1:{port}/chunked"),
    ]);
    assert_eq!(code, 200);
}

/// A capability URL's secret (Telegram's `/bot<token>/`, a webhook's token) and a key in a
/// path segment: refused in strip mode (a path cannot lose it and still mean the same),
/// forwarded in report mode; the line, the error and the response never show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_the_path_are_refused_or_reported_and_never_logged() {
    let up = Upstream::start().await;
    let port = up.addr.port();
    let telegram = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw";
    let key = fake_openai_key();
    for mode in ["strip", "report"] {
        let sc = Sidecar::start(
            &config(port, mode),
            PERMISSIVE_POLICY,
            &[(STATIC_ENV, "v-static-value")],
        );
        for path in [
            format!("/bot{telegram}/sendMessage"),
            format!("/v1/keys/{key}"),
        ] {
            let (code, body) = curl(&[
                "-x",
                &sc.proxy_url(),
                &format!("http://127.0.0.1:{port}{path}"),
            ]);
            let want = if mode == "strip" { 403 } else { 200 };
            assert_eq!(code, want, "{mode} {path}: {body}");
            assert!(!body.contains(telegram) && !body.contains(&key), "{body}");
        }
        let lines = sc.lines_where(2, |l| l["stripped"][0]["location"] == "path");
        assert_eq!(lines.len(), 2, "{mode}: {}", sc.output());
        assert_eq!(lines[0]["path"], "/<redacted>/sendMessage");
        assert_eq!(lines[0]["stripped"][0]["type"], "telegram_bot_token");
        assert_eq!(lines[1]["path"], "/v1/keys/<redacted>");
        sc.assert_never_shows(&[telegram, &key]);
    }
    // Report mode forwarded the paths as the app wrote them.
    let seen: Vec<String> = up.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0].contains(telegram), "{seen:?}");
}

/// A path has one spelling: `..`, `%2e%2e` and encoded unreserved characters cannot pass a
/// policy on `context.path` (or a route's prefix), and what policy decided on is what is
/// forwarded; encoded slashes are refused unless a route expects them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_spelled_otherwise_meet_the_same_policy() {
    let up = Upstream::start().await;
    let port = up.addr.port();
    let policy = format!(
        "{PERMISSIVE_POLICY}\n@id(\"no-private\")\nforbid(principal, action, resource) when {{ context.path like \"/private/*\" }};\n"
    );
    let sc = Sidecar::start(
        &config(port, "strip"),
        &policy,
        &[(STATIC_ENV, "v-static-value")],
    );
    let get = |path: &str| {
        raw_request(
            sc.proxy,
            &format!(
                "GET http://127.0.0.1:{port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
            ),
        )
    };
    for path in [
        "/private/keys",
        "/public/../private/keys",
        "/public/%2e%2e/private/keys",
        "/public/%2E%2E/%70rivate/keys",
        "/./private/./keys",
    ] {
        let (code, body) = get(path);
        assert_eq!(code, 403, "{path}: {body}");
        assert!(body.contains("no-private"), "{path}: {body}");
    }
    let (code, body) = get("/public/a%2F..%2F..%2Fprivate/keys");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("allow_encoded_slashes"), "{body}");
    assert!(
        up.requests().is_empty(),
        "nothing refused reached the upstream"
    );
    let (code, _) = get("/public/./docs/../readme");
    assert_eq!(code, 200);
    assert_eq!(
        up.requests()[0].uri,
        "/public/readme",
        "forwarded as decided"
    );
}

/// An address has one name: however the app spells 127.0.0.1 (or the sidecar's own
/// listeners, or 0.0.0.0, which reaches whatever listens on this host), policy, routes and
/// guardrails see the same address, on plain requests and on CONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_spelled_otherwise_meet_the_same_policy_and_guardrails() {
    let up = Upstream::start().await;
    let port = up.addr.port();
    let policy = format!(
        "{PERMISSIVE_POLICY}\n@id(\"not-loopback\")\nforbid(principal, action, resource == Destination::\"127.0.0.1\") when {{ resource.port == {port} }};\n"
    );
    let sc = Sidecar::start(
        &config(port, "strip"),
        &policy,
        &[(STATIC_ENV, "v-static-value")],
    );
    for host in [
        "127.0.0.1",
        "2130706433",
        "127.1",
        "0x7f000001",
        "0177.0.0.1",
        "[::ffff:127.0.0.1]",
        "localhost",
        "app.localhost",
    ] {
        let (code, body) = raw_request(
            sc.proxy,
            &format!(
                "GET http://{host}:{port}/x HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(code, 403, "{host}: {body}");
        assert!(body.contains("not-loopback"), "{host}: {body}");
    }
    assert!(up.requests().is_empty());
    // The admin port and the proxy's own listener, through a tunnel, by any name.
    let (admin, proxy) = (sc.admin.port(), sc.proxy.port());
    for authority in [
        format!("0.0.0.0:{admin}"),
        format!("0:{admin}"),
        format!("[::ffff:0.0.0.0]:{admin}"),
        format!("[::]:{admin}"),
        format!("0x7f000001:{admin}"),
        format!("2130706433:{proxy}"),
        format!("0:{proxy}"),
    ] {
        let (code, body) = raw_request(
            sc.proxy,
            &format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
        );
        assert_eq!(code, 403, "{authority}: {body}");
        assert!(body.contains("own listeners"), "{authority}: {body}");
        let (code, body) = raw_request(
            sc.proxy,
            &format!(
                "GET http://{authority}/metrics HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(code, 403, "{authority}: {body}");
    }
    let lines = sc.lines_where(1, |l| l["method"] == "CONNECT");
    assert_eq!(
        lines[0]["host"], "0.0.0.0",
        "the line names the address: {lines:?}"
    );
}

/// The address a name resolves to is a policy attribute (`context.address`) once a policy
/// reads it: the name is resolved before deciding, the connection goes to the address policy
/// saw, and the line says which. An IP literal is its own address; a name that does not
/// resolve fails before policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_decides_on_the_address_a_name_resolves_to_and_the_connect_goes_there() {
    let up = Upstream::start().await;
    let port = up.addr.port();
    let policy = format!(
        r#"@id("to-loopback")
permit (principal, action, resource)
when {{ context has address && context.address.isLoopback() && resource.port == {port} }};
@id("not-127-0-0-2")
forbid (principal, action, resource)
when {{ context has address && context.address == ip("127.0.0.2") }};
"#
    );
    let sc = Sidecar::start(&Cfg::new().yaml(), &policy, &[]);
    let get = |host: &str, path: &str| {
        raw_request(
            sc.proxy,
            &format!(
                "GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
            ),
        )
    };
    // `localhost` is permitted only by its address, which it resolves to.
    let (code, body) = get("localhost", "/named");
    assert_eq!(code, 200, "{body}");
    assert_eq!(up.requests().len(), 1);
    let line = &sc.lines_where(1, |l| l["path"] == "/named")[0];
    assert_eq!(line["address"], "127.0.0.1", "{line}");
    assert_eq!(
        line["policy_ids"],
        serde_json::json!(["to-loopback"]),
        "{line}"
    );

    // A literal is its own address.
    let (code, body) = get("127.0.0.2", "/literal");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("not-127-0-0-2"), "{body}");

    // Through a tunnel: the CONNECT is decided on the address, and so is the request in it.
    let (code, body) = curl(&[
        "-p",
        "-x",
        &sc.proxy_url(),
        &format!("http://localhost:{port}/tunnelled"),
    ]);
    assert_eq!(code, 200, "{body}");
    let tunnel = &sc.lines_where(1, |l| l["method"] == "CONNECT")[0];
    assert_eq!(tunnel["address"], "127.0.0.1", "{tunnel}");
    assert_eq!(up.requests().len(), 2);

    // A name that does not resolve is an error before policy, never a permit without the
    // address.
    let (code, body) = get("no-such-host.invalid", "/unresolved");
    assert_eq!(code, 502, "{body}");
    assert!(
        body.contains("cannot resolve no-such-host.invalid"),
        "{body}"
    );
    assert_eq!(up.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_client_and_pooled_upstream_connections() {
    let up = Upstream::start().await;
    let sc = Sidecar::start(
        &config(up.addr.port(), "strip"),
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, "v-static-value")],
    );
    let stream = tokio::net::TcpStream::connect(sc.proxy).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for i in 0..25 {
        let req = http::Request::get(format!("http://127.0.0.1:{}/item/{i}", up.addr.port()))
            .header("host", format!("127.0.0.1:{}", up.addr.port()))
            .body(Full::new(Bytes::new()))
            .unwrap();
        tx.ready().await.expect("same client connection stays open");
        let resp = tx
            .send_request(req)
            .await
            .expect("request on the kept-alive connection");
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("chaperone-request-id").is_some());
        assert!(
            resp.headers().get("x-upstream-hop").is_none(),
            "response hop-by-hop header removed"
        );
        assert!(resp.headers().get("via").is_some());
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(up.requests().len(), 25);
    assert!(
        up.connections.load(std::sync::atomic::Ordering::SeqCst) <= 2,
        "upstream connections are pooled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_dropped_and_loops_detected() {
    let up = Upstream::start().await;
    let sc = Sidecar::start(
        &config(up.addr.port(), "strip"),
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, "v-static-value")],
    );
    let url = format!("http://127.0.0.1:{}/hop", up.addr.port());
    let (code, _) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-H",
        "Connection: x-drop-me",
        "-H",
        "x-drop-me: 1",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "TE: gzip",
        "-H",
        "Proxy-Authorization: Basic dXNlcjpodW50ZXIy",
        "-H",
        "x-keep-me: 1",
        &url,
    ]);
    assert_eq!(code, 200);
    let r = &up.requests()[0];
    for gone in [
        "x-drop-me",
        "keep-alive",
        "te",
        "proxy-authorization",
        "connection",
    ] {
        assert!(
            r.header(gone).is_none()
                || (gone == "connection" && r.header(gone) == Some("keep-alive")),
            "{gone} forwarded: {r:?}"
        );
    }
    assert_eq!(r.header("x-keep-me"), Some("1"));
    let via = r.header("via").unwrap().to_string();
    let (code, body) = curl(&["-x", &sc.proxy_url(), "-H", &format!("Via: {via}"), &url]);
    assert_eq!(code, 508, "{body}");
    assert!(body.contains("loop_detected"));
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_are_policy_checked_and_logged() {
    let up = Upstream::start().await;
    // An echo server to tunnel to.
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in echo.incoming() {
            let mut s = s.unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let routes = base(up.addr.port(), "strip");
    let mut with_443 = routes.yaml();
    with_443 = with_443.replace(
        "routes:\n",
        "routes:\n  - name: tls-only-api\n    match: { host: api.tls-only.example, port: 443 }\n    credential: app-key\n    inject: { header: x-api-key, value: \"{token}\" }\n",
    );
    let sc = Sidecar::start(
        &with_443,
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, "v-static-value")],
    );

    let mut s = std::net::TcpStream::connect(sc.proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "CONNECT {echo_addr} HTTP/1.1\r\nHost: {echo_addr}\r\nchaperone-purpose: tool-call\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 512];
    let n = s.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"ping through the tunnel").unwrap();
    let mut back = [0u8; 23];
    s.read_exact(&mut back).unwrap();
    assert_eq!(
        &back, b"ping through the tunnel",
        "tunnel passes bytes untouched"
    );
    drop(s);

    let (code, body) = raw_request(
        sc.proxy,
        &format!(
            "CONNECT {echo_addr} HTTP/1.1\r\nHost: {echo_addr}\r\nchaperone-purpose: exfiltrate\r\n\r\n"
        ),
    );
    assert_eq!(code, 403);
    assert!(body.contains("policy_denied"));
    // A host whose route injects a credential cannot be blindly tunnelled: on 443 (TLS) the
    // CONNECT is refused, since without a CA nothing can inject into it.
    let (code, body) = raw_request(
        sc.proxy,
        "CONNECT api.tls-only.example:443 HTTP/1.1\r\nHost: api.tls-only.example:443\r\n\r\n",
    );
    assert_eq!(code, 403);
    assert!(body.contains("TLS interception"), "{body}");
    // On another port, plain HTTP in the tunnel is served through the pipeline and gets the
    // credential (undici's proxy agents send http:// that way).
    let mut s = std::net::TcpStream::connect(sc.proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let a = up.addr;
    write!(s, "CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n\r\n").unwrap();
    let mut r = reader(s.try_clone().unwrap());
    assert_eq!(read_status(&mut r), 200);
    write!(
        s,
        "GET /static/in-tunnel HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert!(rest.contains(" 200 "), "{rest}");
    let inner = up
        .requests()
        .into_iter()
        .find(|q| q.uri.ends_with("/static/in-tunnel"))
        .expect("the tunnelled request reached the upstream");
    assert_eq!(inner.header("x-api-key"), Some("v-static-value"));
    drop(s);

    let lines = sc.log_lines(3);
    let tunnel = lines
        .iter()
        .find(|l| l["kind"] == "tunnel" && l["decision"] == "allow")
        .expect("tunnel logged");
    assert_eq!(tunnel["method"], "CONNECT");
    assert_eq!(tunnel["purpose"], "tool-call");
    assert_eq!(tunnel["bytes_in"], 23);
    assert_eq!(tunnel["bytes_out"], 23);
    assert!(
        lines.iter().any(|l| l["kind"] == "tunnel"
            && l["decision"] == "deny"
            && l["purpose"] == "exfiltrate")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let up = Upstream::start().await;
    let mut sc = Sidecar::start(
        &config(up.addr.port(), "strip"),
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, "v-static-value")],
    );
    let proxy = sc.proxy_url();
    let url = format!("http://127.0.0.1:{}/slow", up.addr.port());
    let in_flight = std::thread::spawn(move || curl(&["-x", &proxy, &url]));
    // Wait until the upstream has the request, then ask the sidecar to stop.
    for _ in 0..200 {
        if !up.requests().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = sc.terminate();
    let (code, _) = in_flight.join().unwrap();
    assert_eq!(
        code, 200,
        "the in-flight request completed during the drain"
    );
    assert!(status.success(), "{status:?}");
    let lines = sc.log_lines(1);
    assert_eq!(lines.len(), 1, "its log line was flushed before exit");
    assert_eq!(lines[0]["path"], "/slow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_a_502_json_error() {
    let sc = Sidecar::start_observe();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, body) = curl(&["-x", &sc.proxy_url(), &format!("http://127.0.0.1:{port}/")]);
    assert_eq!(code, 502);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "upstream_unreachable");
    let l = &sc.log_lines(1)[0];
    assert_eq!(l["status"], 502);
    assert_eq!(l["error"], "upstream_unreachable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let up = Upstream::start().await;
    let sc = Sidecar::start(
        &config(up.addr.port(), "strip"),
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, "v-static-value")],
    );
    assert_eq!(admin_get(sc.admin, "/healthz").0, 200);
    assert_eq!(admin_get(sc.admin, "/readyz").0, 200);
    assert_eq!(admin_get(sc.admin, "/nope").0, 404);
    let set = jwks(&sc).await;
    assert_eq!(set.keys.len(), 1);
    let key = fake_openai_key();
    let (code, _) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-H",
        &format!("x-api-key: {key}"),
        &format!("http://127.0.0.1:{}/v1/m", up.addr.port()),
    ]);
    assert_eq!(code, 200);
    let (code, metrics) = admin_get(sc.admin, "/metrics");
    assert_eq!(code, 200);
    for name in [
        "chaperone_requests_total",
        "chaperone_request_duration_seconds",
        "chaperone_stripped_secrets_total",
        "chaperone_credentials_issued_total",
        "chaperone_tunnels_open",
    ] {
        let family = name.trim_end_matches("_total");
        assert!(
            metrics.contains(&format!("# TYPE {family} ")),
            "{name} missing:\n{metrics}"
        );
    }
    assert!(
        metrics.contains(
            r#"chaperone_credentials_issued_total{credential="per-call",kind="jwt",result="ok"} 1"#
        ),
        "{metrics}"
    );
    assert!(!metrics.contains(&key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stage_listener_speaks_for_its_own_identity() {
    let up = Upstream::start().await;
    let yaml = base(up.addr.port(), "strip")
        .set(
            "stages",
            "- name: training\n  listen: 127.0.0.1:0\n  id: spiffe://test.local/ns/ml/sa/training",
        )
        .yaml();
    let policy = r#"@id("training-reads-datasets")
permit(principal, action == Action::"GET", resource) when { principal.stage == "training" && context.path like "/datasets/*" };
@id("main-may-infer")
permit(principal, action, resource) when { principal.stage == "main" };
"#;
    let sc = Sidecar::start(&yaml, policy, &[(STATIC_ENV, "v-static-value")]);
    assert_eq!(sc.proxies.len(), 2, "main and training listeners");
    let training = format!("http://{}", sc.proxies[1]);
    let base = format!("http://127.0.0.1:{}", up.addr.port());
    let (code, _) = curl(&["-x", &training, &format!("{base}/datasets/a.parquet")]);
    assert_eq!(code, 200);
    let (code, body) = curl(&["-x", &training, &format!("{base}/v1/chat/completions")]);
    assert_eq!(
        code, 403,
        "the training stage cannot call the inference API: {body}"
    );
    let (code, _) = curl(&[
        "-x",
        &sc.proxy_url(),
        &format!("{base}/v1/chat/completions"),
    ]);
    assert_eq!(code, 200, "the main stage can");
    let lines = sc.log_lines(3);
    let by_stage = |stage: &str| {
        lines
            .iter()
            .filter(|l| l["stage"] == stage)
            .collect::<Vec<_>>()
    };
    assert_eq!(by_stage("training").len(), 2);
    for l in by_stage("training") {
        assert_eq!(l["identity"], "spiffe://test.local/ns/ml/sa/training");
    }
    assert_eq!(
        by_stage("main")[0]["identity"],
        "spiffe://test.local/ns/ml/sa/inference"
    );
}

/// A changed signing-key file rotates the per-call token key; the previous public key stays
/// in the JWKS so tokens already issued keep verifying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_signing_key_rotation_keeps_the_old_key_published() {
    let up = Upstream::start().await;
    let cfg = base(up.addr.port(), "strip")
        .set(
            "credentials",
            &credentials("  signing_key: {dir}/signing.pem"),
        )
        .yaml();
    let first = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let first_pem = first.serialize_pem();
    let sc = Sidecar::start_with(
        &cfg,
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, "unused-static-value")],
        move |dir: &Path| std::fs::write(dir.join("signing.pem"), first_pem).unwrap(),
    );
    let url = format!("http://127.0.0.1:{}/v1/models", up.addr.port());
    let token_of = |r: &Recorded| {
        r.header("authorization")
            .unwrap()
            .strip_prefix("Bearer ")
            .unwrap()
            .to_string()
    };
    assert_eq!(curl(&["-x", &sc.proxy_url(), &url]).0, 200);
    let old = token_of(&up.requests()[0]);
    let old_kid = jsonwebtoken::decode_header(&old).unwrap().kid.unwrap();
    assert_eq!(jwks(&sc).await.keys.len(), 1);

    let second = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    std::fs::write(sc.dir().join("signing.pem"), second.serialize_pem()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while jwks(&sc).await.keys.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new key was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(curl(&["-x", &sc.proxy_url(), &url]).0, 200);
    let new = token_of(&up.requests()[1]);
    assert_ne!(
        jsonwebtoken::decode_header(&new).unwrap().kid.unwrap(),
        old_kid,
        "the new key signs"
    );
    let set = jwks(&sc).await;
    let aud = format!("http://127.0.0.1:{}", up.addr.port());
    verify(&set, &old, &aud);
    verify(&set, &new, &aud);
    assert!(sc.output().contains("signing key rotated"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reloads_on_change_and_sighup_and_keeps_the_last_good_set() {
    let up = Upstream::start().await;
    let sc = Sidecar::start(
        &config(up.addr.port(), "strip"),
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, "v-static-value")],
    );
    let url = format!("http://127.0.0.1:{}/v1/reload", up.addr.port());
    let call = || curl(&["-x", &sc.proxy_url(), &url]);
    let eventually = |want: u16| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (code, body) = call();
            if code == want {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still {code}, wanted {want}: {body}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // Wait until `n` reloads have been rejected, by the metric.
    let rejected_reloads = |n: u32| {
        let want = format!(r#"chaperone_policy_reloads_total{{result="rejected"}} {n}"#);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !admin_get(sc.admin, "/metrics").1.contains(&want) {
            assert!(
                std::time::Instant::now() < deadline,
                "reload {n} never rejected"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(call().0, 200);

    // A changed file is picked up without a restart.
    let policy = sc.dir().join("policy.cedar");
    std::fs::write(
        &policy,
        "@id(\"deny-all-for-now\")\nforbid(principal, action, resource);\n@id(\"allow\")\npermit(principal, action, resource);\n",
    )
    .unwrap();
    let body = eventually(403);
    assert!(body.contains("deny-all-for-now"), "{body}");

    // A broken policy is rejected: the last good set stays in force, the proxy stays ready.
    std::fs::write(&policy, "permit(principal, action, resource").unwrap();
    rejected_reloads(1);
    let (code, body) = call();
    assert_eq!(code, 403, "last good policy still decides: {body}");
    assert!(body.contains("deny-all-for-now"));
    assert_eq!(admin_get(sc.admin, "/readyz").0, 200);
    assert!(sc.output().contains("policy reload rejected"));

    // A policy that parses but does not validate against the shipped schema (a misspelt
    // context attribute) is rejected the same way.
    std::fs::write(
        &policy,
        "permit(principal, action, resource) when { context.purpse == \"x\" };",
    )
    .unwrap();
    rejected_reloads(2);
    assert_eq!(call().0, 403, "last good policy still decides");
    assert!(
        sc.output()
            .contains("does not validate against the shipped policy.cedarschema")
    );

    // SIGHUP reloads at once.
    std::fs::write(&policy, PERMISSIVE_POLICY).unwrap();
    let pid = sc.child.as_ref().unwrap().id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    eventually(200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !sc.output().contains("SIGHUP") {
        assert!(std::time::Instant::now() < deadline, "{}", sc.output());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        admin_get(sc.admin, "/metrics")
            .1
            .contains(r#"chaperone_policy_reloads_total{result="ok"}"#)
    );
}

/// A guarded destination (here the sidecar's own admin port) is refused even under a
/// permit-all policy, and reachable only through a permit annotated with the guardrail it
/// lifts; a forbid still wins.
#[tokio::test(flavor = "multi_thread")]
async fn a_guardrail_is_lifted_only_by_an_annotated_permit() {
    let up = Upstream::start().await;
    let policy = format!(
        "{PERMISSIVE_POLICY}\n@id(\"probe-own-health\")\n@guardrail(\"own_listener\")\npermit(principal, action == Action::\"GET\", resource == Destination::\"127.0.0.1\") when {{ context.guardrail == \"own_listener\" && (context.path == \"/healthz\" || context.path == \"/metrics\") }};\n@id(\"metrics-stay-private\")\nforbid(principal, action, resource) when {{ context.guardrail == \"own_listener\" && context.path == \"/metrics\" }};\n"
    );
    let sc = Sidecar::start(
        &config(up.addr.port(), "strip"),
        &policy,
        &[(STATIC_ENV, "v")],
    );
    let via = |path: &str| curl(&["-x", &sc.proxy_url(), &format!("http://{}{path}", sc.admin)]);
    let (code, body) = via("/healthz");
    assert_eq!(code, 200, "{body}");
    let (code, body) = via("/readyz");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains(r#"@guardrail(\"own_listener\")"#), "{body}");
    let (code, body) = via("/metrics");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("metrics-stay-private"), "{body}");
    let lines = sc.log_lines(3);
    let health = lines.iter().find(|l| l["path"] == "/healthz").unwrap();
    assert_eq!(health["decision"], "allow");
    assert_eq!(
        health["policy_ids"],
        serde_json::json!(["probe-own-health"])
    );
    // The proxy's own listener stays refused: the permit names the guardrail, not the port,
    // but its condition only admits two paths, and the loop check holds anyway.
    let (code, _) = curl(&["-x", &sc.proxy_url(), &format!("http://{}/v1/x", sc.proxy)]);
    assert_eq!(code, 403);
}

/// A stage listener that lists `callers.uids` serves only processes of those UIDs, as the
/// kernel attests them: the same curl is refused on a stage that does not admit its UID and
/// served on one that does; as root, curl run as another user (what another container is)
/// cannot use a stage reserved for a different UID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_refuses_callers_of_another_uid() {
    let up = Upstream::start().await;
    let me = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    let other = if me == 0 { 65534 } else { me + 4242 };
    let yaml = base(up.addr.port(), "strip")
        .set(
            "stages",
            &format!(
                "- name: training
  listen: 127.0.0.1:0
  id: spiffe://test.local/ns/ml/sa/training
  callers: {{ uids: [{other}] }}
- name: serving
  listen: 127.0.0.1:0
  id: spiffe://test.local/ns/ml/sa/serving
  callers: {{ uids: [{me}] }}"
            ),
        )
        .yaml();
    let sc = Sidecar::start(&yaml, PERMISSIVE_POLICY, &[(STATIC_ENV, "v")]);
    let (training, serving) = (
        format!("http://{}", sc.proxies[1]),
        format!("http://{}", sc.proxies[2]),
    );
    let url = format!("http://127.0.0.1:{}/v1/attest", up.addr.port());

    let (code, body) = curl(&["-x", &training, &url]);
    assert_eq!(code, 403, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "policy_denied");
    assert!(
        v["reason"].as_str().unwrap().contains(&format!(
            "belongs to uid {me}; this listener admits uid {other}"
        )),
        "{body}"
    );
    assert_eq!(
        up.requests().len(),
        0,
        "nothing forwarded for a refused caller"
    );

    let (code, body) = curl(&["-x", &serving, &url]);
    assert_eq!(code, 200, "{body}");
    // CONNECT is refused the same way, before any tunnel is set up.
    let (code, body) = raw_request(
        sc.proxies[1],
        "CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n",
    );
    assert_eq!(code, 403, "{body}");

    let lines = sc.log_lines(3);
    let refused = lines.iter().find(|l| l["stage"] == "training").unwrap();
    assert_eq!(refused["decision"], "deny");
    assert!(refused.get("caller_uid").is_none());
    let served = lines.iter().find(|l| l["stage"] == "serving").unwrap();
    assert_eq!(served["decision"], "allow");
    assert_eq!(served["caller_uid"], me);

    // Another user, as another container would be: refused on the stage reserved for this
    // process's UID, admitted on its own.
    if me == 0 {
        let as_other = |proxy: &str| curl_as_nobody(&["-x", proxy, &url]);
        assert_eq!(as_other(&serving), "403");
        assert_eq!(as_other(&training), "200");
    }
}

/// A stage can listen on a Unix socket: callers are attested with `SO_PEERCRED`, the app
/// sends origin-form requests over it (`curl --unix-socket`), and a process of another UID
/// is refused even though the socket file lets it connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_stage_attests_callers_with_peer_credentials() {
    let up = Upstream::start().await;
    let me = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    let other = if me == 0 { 65534 } else { me + 4242 };
    let yaml = base(up.addr.port(), "strip")
        .set(
            "stages",
            &format!(
                "- name: training
  listen: unix:{{dir}}/training.sock
  id: spiffe://test.local/ns/ml/sa/training
  callers: {{ uids: [{me}] }}
- name: evaluation
  listen: unix:{{dir}}/evaluation.sock
  id: spiffe://test.local/ns/ml/sa/evaluation
  callers: {{ uids: [{other}] }}"
            ),
        )
        .yaml();
    let sc = Sidecar::start(&yaml, PERMISSIVE_POLICY, &[(STATIC_ENV, "v")]);
    assert!(
        sc.output().contains(&format!(
            "proxy listening on unix:{}/training.sock",
            sc.dir().display()
        )),
        "{}",
        sc.output()
    );
    let sock = |name: &str| sc.dir().join(name).to_string_lossy().into_owned();
    let url = format!("http://127.0.0.1:{}/v1/over-unix", up.addr.port());

    let (code, body) = curl(&["--unix-socket", &sock("training.sock"), &url]);
    assert_eq!(code, 200, "{body}");
    let (code, body) = curl(&["--unix-socket", &sock("evaluation.sock"), &url]);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains(&format!(
            "belongs to uid {me}; this listener admits uid {other}"
        )),
        "{body}"
    );
    assert_eq!(up.requests().len(), 1);
    let lines = sc.log_lines(2);
    let served = lines.iter().find(|l| l["stage"] == "training").unwrap();
    assert_eq!(served["caller_uid"], me);
    assert_eq!(served["identity"], "spiffe://test.local/ns/ml/sa/training");
    assert!(
        served["client"].as_str().unwrap().starts_with("unix:pid="),
        "{served}"
    );

    if me == 0 {
        let as_other = |name: &str| curl_as_nobody(&["--unix-socket", &sock(name), &url]);
        assert_eq!(as_other("training.sock"), "403");
        assert_eq!(as_other("evaluation.sock"), "200");
    }
}
