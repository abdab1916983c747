//! Embedded secrets in bodies and cookies, end to end: the real binary between Python
//! `requests`/`httpx` or curl and a recording upstream on loopback.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

const STATIC_ENV: &str = "TEST_BODY_KEY";

fn config(upstream_port: u16, mode: &str, body_max: usize) -> String {
    format!(
        r#"listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity:
  id: spiffe://test.local/ns/ml/sa/agent
  workload: test-agent
  environment: test
credentials:
  body-key:
    kind: static
    from_env: {STATIC_ENV}
  per-call:
    kind: jwt
    ttl: 60s
routes:
  - name: key-in-body
    match: {{ host: 127.0.0.1, port: {upstream_port}, path_prefix: /body/ }}
    credential: body-key
    inject: {{ body_field: api_key }}
  - name: chat
    match: {{ host: 127.0.0.1, port: {upstream_port}, path_prefix: /v1/ }}
    credential: per-call
strip:
  mode: {mode}
  body_max_bytes: {body_max}
policy:
  file: {{dir}}/policy.cedar
log:
  format: json
  output: stdout
"#
    )
}

/// An upstream and a sidecar in front of it, with the given strip mode and body limit; the
/// static credential is not used by the routes these tests call.
async fn start(mode: &str, body_max: usize) -> (Upstream, Sidecar) {
    start_holding(mode, body_max, "unused-static-value").await
}

/// Like [`start`], with the sidecar holding `key` as the static credential the `/body/`
/// route injects into `api_key`.
async fn start_holding(mode: &str, body_max: usize, key: &str) -> (Upstream, Sidecar) {
    let up = Upstream::start().await;
    let sc = Sidecar::start(
        &config(up.addr.port(), mode, body_max),
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, key)],
    );
    (up, sc)
}

/// Run a Python script through the sidecar; its stdout lines.
fn python_through(sc: &Sidecar, script: &str) -> Vec<String> {
    let (ok, out, err) = run(Command::new(python())
        .args(["-c", script])
        .env("HTTP_PROXY", sc.proxy_url())
        .env_remove("NO_PROXY")
        .env_remove("no_proxy"));
    assert!(ok, "python failed: {err}");
    out.lines().map(str::to_string).collect()
}

/// Every request the upstream saw has a Content-Length that fits its (possibly rewritten)
/// body, and none of `secrets` anywhere.
fn assert_framed_without(reqs: &[Recorded], secrets: &[&str]) {
    for r in reqs {
        assert_eq!(
            r.header("content-length"),
            Some(r.body.len().to_string().as_str()),
            "framing follows the body: {}",
            r.uri
        );
        for s in secrets {
            assert!(!r.all_text().contains(s), "{} carried a secret", r.uri);
        }
    }
}

fn line_for<'a>(lines: &'a [Value], path: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["path"] == path)
        .unwrap_or_else(|| panic!("no log line for {path}: {lines:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_in_the_injected_body_field_is_replaced_in_json_and_form_bodies() {
    let sidecar_key = format!("sidecar-held-{:x}", rand_u64());
    let (up, sc) = start_holding("strip", 65536, &sidecar_key).await;
    let port = up.addr.port();
    let (k1, k2) = (fake_openai_key(), fake_openai_key());
    let script = format!(
        r#"
import httpx, requests
with httpx.Client(proxy="{proxy}") as c:
    r = c.post("http://127.0.0.1:{port}/body/json", json={{"model": "m", "api_key": "{k1}", "n": 1, "tags": ["a", "b"]}})
    print(r.status_code)
    r = c.post("http://127.0.0.1:{port}/body/added", json={{"model": "m"}})
    print(r.status_code)
r = requests.post("http://127.0.0.1:{port}/body/form", data={{"q": "hello world", "api_key": "{k2}"}})
print(r.status_code)
"#,
        proxy = sc.proxy_url()
    );
    assert_eq!(python_through(&sc, &script), ["200", "200", "200"]);

    let reqs = up.requests();
    assert_eq!(reqs.len(), 3);
    let json: Value = serde_json::from_str(&reqs[0].body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"model": "m", "api_key": sidecar_key, "n": 1, "tags": ["a", "b"]})
    );
    let added: Value = serde_json::from_str(&reqs[1].body).unwrap();
    assert_eq!(
        added,
        serde_json::json!({"api_key": sidecar_key, "model": "m"})
    );
    assert_eq!(
        reqs[2].body,
        format!("q=hello+world&api_key={sidecar_key}"),
        "only the field's value changes"
    );
    assert_framed_without(&reqs, &[&k1, &k2]);

    let lines = sc.log_lines(3);
    let l = line_for(&lines, "/body/json");
    assert_eq!(l["stripped"][0]["type"], "openai_project_key");
    assert_eq!(l["stripped"][0]["location"], "body:api_key");
    assert_eq!(l["body_scan"], "inspected");
    assert_eq!(l["status"], 200);
    let f = line_for(&lines, "/body/form");
    assert_eq!(f["stripped"][0]["location"], "body:api_key");
    assert_ne!(
        l["stripped"][0]["fingerprint"], f["stripped"][0]["fingerprint"],
        "two keys, two fingerprints"
    );
    assert!(
        line_for(&lines, "/body/added")["stripped"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    sc.assert_never_shows(&[&k1, &k2, &sidecar_key]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_elsewhere_in_a_body_is_refused_in_strip_mode_never_forwarded() {
    let (up, sc) = start("strip", 65536).await;
    let port = up.addr.port();
    let key = fake_openai_key();
    let gh = "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";
    // The same key three ways: in a prompt, JSON-escaped (`\u002d` for `-`), and in a
    // chunked body (a generator: no Content-Length); then a benign request of the same shape.
    let escaped = key.replace('-', "\\u002d");
    let script = format!(
        r#"
import json, requests
u = "http://127.0.0.1:{port}/v1/chat"
r = requests.post(u + "/prompt", json={{"messages": [{{"role": "user", "content": "my key is {key}, summarize"}}]}})
print(r.status_code, r.json()["error"], r.json()["reason"])
r = requests.post(u + "/escaped", data='{{"input": "{escaped}"}}', headers={{"content-type": "application/json"}})
print(r.status_code, r.json()["error"])
def gen():
    yield b'{{"tools": [{{"name": "gh", "token": "'
    yield b'{gh}'
    yield b'"}}]}}'
r = requests.post(u + "/chunked", data=gen(), headers={{"content-type": "application/json"}})
print(r.status_code, r.json()["error"])
r = requests.post(u + "/benign", json={{"messages": [{{"content": "hello"}}], "request_id": "550e8400-e29b-41d4-a716-446655440000", "max_tokens": 256}})
print(r.status_code)
"#
    );
    let out = python_through(&sc, &script);
    assert!(out[0].starts_with("403 embedded_secret "), "{out:?}");
    assert!(
        out[0].contains("openai_project_key in body:content") && out[0].contains("body_field"),
        "the reason says what and where, and how to fix it: {out:?}"
    );
    assert_eq!(out[1], "403 embedded_secret");
    assert_eq!(out[2], "403 embedded_secret");
    assert_eq!(out[3], "200");

    let reqs = up.requests();
    assert_eq!(
        reqs.len(),
        1,
        "only the benign request reached the upstream"
    );
    assert!(reqs[0].uri.ends_with("/benign"));
    let lines = sc.log_lines(4);
    assert_eq!(
        line_for(&lines, "/v1/chat/chunked")["stripped"][0]["type"],
        "github_pat"
    );
    assert_eq!(
        line_for(&lines, "/v1/chat/chunked")["stripped"][0]["location"],
        "body:token"
    );
    assert_eq!(
        line_for(&lines, "/v1/chat/escaped")["stripped"][0]["type"],
        "openai_project_key"
    );
    // The escaped and the plain key are one key: one fingerprint.
    assert_eq!(
        line_for(&lines, "/v1/chat/escaped")["stripped"][0]["fingerprint"],
        line_for(&lines, "/v1/chat/prompt")["stripped"][0]["fingerprint"]
    );
    sc.assert_never_shows(&[&key, gh]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_forwards_the_body_unchanged_and_logs_every_occurrence() {
    let (up, sc) = start("report", 65536).await;
    let port = up.addr.port();
    let (k1, k2) = (fake_openai_key(), fake_openai_key());
    let body = format!(r#"{{"a": "{k1}", "b": ["x {k2} y", "{k1}"]}}"#);
    let (code, _) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-H",
        "content-type: application/json",
        "--data-binary",
        &body,
        &format!("http://127.0.0.1:{port}/v1/report"),
    ]);
    assert_eq!(code, 200);
    assert_eq!(up.requests()[0].body, body, "byte for byte");
    let lines = sc.log_lines(1);
    let found: Vec<(String, String)> = lines[0]["stripped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["location"].as_str().unwrap().to_string(),
                f["fingerprint"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(found.len(), 3, "{found:?}");
    assert_eq!(
        found.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(),
        ["body:a", "body:b", "body:b"]
    );
    assert_eq!(
        found[0].1, found[2].1,
        "the same key twice, one fingerprint"
    );
    assert_ne!(found[0].1, found[1].1);
    let (_, metrics) = admin_get(sc.admin, "/metrics");
    assert!(
        metrics.contains(
            r#"chaperone_stripped_secrets_total{type="openai_project_key",location="body"} 3"#
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_holding_tokens_are_removed_one_by_one() {
    let (up, sc) = start("strip", 65536).await;
    let port = up.addr.port();
    let gh = "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";
    let session = "Zq8Xw2Lm5Pn9Rt3Vb7Kc1Hd4Fg6Jy0Ts";
    let (code, _) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-b",
        &format!("theme=dark; gh={gh}; auth_token={session}; lang=en"),
        &format!("http://127.0.0.1:{port}/v1/cookies"),
    ]);
    assert_eq!(code, 200);
    let r = &up.requests()[0];
    assert_eq!(r.header("cookie"), Some("theme=dark; lang=en"));
    let lines = sc.log_lines(1);
    let locs: Vec<&str> = lines[0]["stripped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["location"].as_str().unwrap())
        .collect();
    assert_eq!(locs, ["cookie:gh", "cookie:auth_token"]);
    sc.assert_never_shows(&[gh, session]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_stream_through_whole_and_the_log_says_so() {
    let (up, sc) = start("strip", 1024).await;
    let port = up.addr.port();
    let filler = "x".repeat(4000);
    let script = format!(
        r#"
import requests
u = "http://127.0.0.1:{port}/v1/big"
body = '{{"doc": "{filler}"}}'
print(requests.post(u + "/sized", data=body, headers={{"content-type": "application/json"}}).status_code)
def gen():
    for i in range(0, len(body), 700):
        yield body[i:i + 700].encode()
print(requests.post(u + "/chunked", data=gen(), headers={{"content-type": "application/json"}}).status_code)
"#
    );
    assert_eq!(python_through(&sc, &script), ["200", "200"]);
    let reqs = up.requests();
    let expected = format!(r#"{{"doc": "{filler}"}}"#);
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        assert_eq!(r.body, expected, "{} arrived whole", r.uri);
    }
    let lines = sc.log_lines(2);
    for path in ["/v1/big/sized", "/v1/big/chunked"] {
        assert_eq!(line_for(&lines, path)["body_scan"], "skipped_too_large");
    }
}

/// multipart/form-data (file uploads, form posts): a key in the injected field is replaced
/// and a missing field is added as a part; a key in an uploaded file is refused; a clean
/// upload passes byte for byte. Python requests, httpx and curl build the bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_fields_and_uploaded_files_are_inspected() {
    let sidecar_key = format!("sidecar-held-{:x}", rand_u64());
    let (up, sc) = start_holding("strip", 65536, &sidecar_key).await;
    let port = up.addr.port();
    let (k1, k2) = (fake_openai_key(), fake_openai_key());
    let script = format!(
        r#"
import httpx, requests
r = requests.post("http://127.0.0.1:{port}/body/upload", data={{"purpose": "fine-tune", "api_key": "{k1}"}}, files={{"file": ("train.jsonl", b'{{"prompt": "hi"}}\n')}})
print(r.status_code)
with httpx.Client(proxy="{proxy}") as c:
    r = c.post("http://127.0.0.1:{port}/body/added", data={{"purpose": "fine-tune"}}, files={{"file": ("a.txt", b"hello")}})
    print(r.status_code)
"#,
        proxy = sc.proxy_url()
    );
    assert_eq!(python_through(&sc, &script), ["200", "200"]);

    // A key in an uploaded .env file, on a route that injects no body field: refused.
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join(".env");
    std::fs::write(&env_file, format!("DEBUG=1\nOPENAI_API_KEY={k2}\n")).unwrap();
    let (code, body) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-F",
        "purpose=assistants",
        "-F",
        &format!("file=@{}", env_file.display()),
        &format!("http://127.0.0.1:{port}/v1/files"),
    ]);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("embedded_secret") && body.contains("body:file"),
        "{body}"
    );

    // A clean upload reaches the upstream as curl sent it.
    let clean = dir.path().join("notes.txt");
    std::fs::write(&clean, "line one\nline two\n").unwrap();
    let (code, _) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-F",
        &format!("file=@{};type=text/plain", clean.display()),
        &format!("http://127.0.0.1:{port}/v1/files/clean"),
    ]);
    assert_eq!(code, 200);

    let reqs = up.requests();
    assert_eq!(reqs.len(), 3, "the .env upload never reached the upstream");
    let replaced = &reqs[0].body;
    assert!(
        replaced.contains(&format!("name=\"api_key\"\r\n\r\n{sidecar_key}\r\n--")),
        "{replaced}"
    );
    assert!(
        replaced.contains("{\"prompt\": \"hi\"}\n"),
        "the file is untouched"
    );
    let added = &reqs[1].body;
    assert!(
        added.contains(&format!("name=\"api_key\"\r\n\r\n{sidecar_key}\r\n--")),
        "{added}"
    );
    assert!(added.trim_end().ends_with("--"), "still closed: {added}");
    let clean_body = &reqs[2].body;
    assert!(clean_body.contains(
        "filename=\"notes.txt\"\r\nContent-Type: text/plain\r\n\r\nline one\nline two\n\r\n--"
    ));
    assert_framed_without(&reqs, &[&k1, &k2]);

    let lines = sc.log_lines(4);
    let upload = line_for(&lines, "/body/upload");
    assert_eq!(upload["stripped"][0]["location"], "body:api_key");
    assert_eq!(upload["body_scan"], "inspected");
    let refused = line_for(&lines, "/v1/files");
    assert_eq!(refused["error"], "embedded_secret");
    assert_eq!(refused["stripped"][0]["type"], "openai_project_key");
    assert_eq!(refused["stripped"][0]["location"], "body:file");
    assert!(
        line_for(&lines, "/v1/files/clean")["stripped"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    sc.assert_never_shows(&[&k1, &k2, &sidecar_key]);
}
