//! The clients AI apps are written with, through Chaperone, against a model API served by
//! hypercorn (an ASGI server speaking HTTP/2 over TLS and HTTP/1.1): the official `openai` and
//! `anthropic` Python SDKs (plain and streaming, through HTTPS_PROXY-style CONNECT with
//! interception, HTTP_PROXY-style absolute form, and reverse mode), httpx with `http2=True`,
//! and aiohttp. Each call sends the app's own key; each must reach the server with ours
//! instead, streams must arrive as they are sent, and every log line must be complete and
//! right. Versions are pinned in tests/support/requirements.txt.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

fn support() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support")
}

/// The model API: hypercorn on a TLS port (h2 and http/1.1 by ALPN) and a plain one.
pub struct ModelApi {
    _server: ServerProcess,
    pub tls: u16,
    pub plain: u16,
    _certs: tempfile::TempDir,
}

impl ModelApi {
    pub fn start(pki: &TestPki) -> ModelApi {
        let (certs, cert, key) = pki.server_files();
        let mut cmd = Command::new(python());
        cmd.arg(support().join("fake_llm.py")).arg(&cert).arg(&key);
        let server = ServerProcess::start(cmd, "the hypercorn model API");
        let tls = server.port.unwrap();
        let plain = server.lines_after("plain ")[0].parse().unwrap();
        ModelApi {
            _server: server,
            tls,
            plain,
            _certs: certs,
        }
    }
}

/// An Anthropic API key as the console issues them (`sk-ant-api03-`, 93 URL-safe characters,
/// `AA`), embedded by the app.
fn fake_anthropic_key() -> String {
    let body: String = (0..6)
        .map(|_| format!("{:016x}", rand_u64()))
        .collect::<String>()
        .chars()
        .take(93)
        .collect();
    format!("sk-ant-api03-{body}AA")
}

/// Run a client script, with no proxy in its environment but what the test sets; its
/// `NAME JSON` lines by name.
fn calls_of(cmd: &mut Command) -> BTreeMap<String, Value> {
    let out = cmd
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    named_lines(&out)
}

/// Every expected call was made, and each reached the API with our key and not the app's,
/// over HTTP/2 to the TLS port and HTTP/1.1 to the plain one; each stream arrived in five
/// parts spread over its 800 ms, not in one piece.
fn assert_calls(calls: &BTreeMap<String, Value>, expected: &[&str], api: &ModelApi) {
    let mut want: Vec<&str> = expected.to_vec();
    want.sort_unstable();
    assert_eq!(calls.keys().map(String::as_str).collect::<Vec<_>>(), want);
    for (name, call) in calls {
        let seen = &call["seen"];
        assert_eq!(seen["key"], INJECTED_KEY, "{name}: {call}");
        assert_eq!(
            seen["auth"], "",
            "{name}: the app's key reached the API: {call}"
        );
        let tls = name.contains("https") || name.starts_with("httpx-http2");
        let proto = if tls { "HTTP/2" } else { "HTTP/1.1" };
        assert_eq!(seen["proto"], proto, "{name}: {call}");
        let port = if tls { api.tls } else { api.plain };
        let host = seen["host"].as_str().unwrap();
        assert!(host.ends_with(&format!(":{port}")), "{name}: {call}");
        if name.ends_with("stream") || name.ends_with("sse") {
            assert_eq!(call["parts"], 5, "{name}: {call}");
            let spread = call["spread_ms"].as_f64().unwrap();
            assert!(spread > 500.0, "{name}: arrived in one piece: {call}");
        }
    }
}

/// One line per call, each right: allowed, 200 from the upstream, our credential, the app's
/// key stripped, and ended as the client ended it.
fn assert_lines(sc: &Sidecar, n: usize) -> Vec<Value> {
    let lines = sc.lines_where(n, |l| l["kind"] == "http");
    assert_eq!(lines.len(), n, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["answered_by"], "upstream", "{l}");
        assert_eq!(l["error"], Value::Null, "{l}");
        assert_eq!(l["credential"]["name"], "app-key", "{l}");
        assert_eq!(l["stripped"].as_array().unwrap().len(), 1, "{l}");
        // A client stops reading a stream at its end event (`[DONE]`, `message_stop`) and
        // may close before the upstream's last frame comes through: that is
        // `client_closed`, not an error (audit counts it as a good call). The clients name
        // their calls' purpose, `call` or `stream`.
        match (l["completion"].as_str().unwrap(), l["purpose"].as_str()) {
            ("complete", Some("call" | "stream")) | ("client_closed", Some("stream")) => {}
            _ => panic!("{l}"),
        }
    }
    lines
}

#[test]
fn openai_and_anthropic_sdks_httpx_http2_and_aiohttp_against_hypercorn() {
    let pki = TestPki::new();
    let api = ModelApi::start(&pki);
    let sc = injecting_sidecar(&[api.tls, api.plain], &pki.ca_pem, PERMISSIVE_POLICY, |c| c);
    let (openai_key, anthropic_key) = (fake_openai_key(), fake_anthropic_key());
    let calls = calls_of(
        Command::new(python())
            .arg(support().join("sdk_clients.py"))
            .arg(sc.proxy_url())
            .arg(sc.dir().join("ca.pem"))
            .args([api.tls.to_string(), api.plain.to_string()])
            .args([&openai_key, &anthropic_key]),
    );
    let expected = [
        "openai-https",
        "openai-https-stream",
        "openai-http",
        "openai-http-stream",
        "openai-reverse",
        "openai-reverse-stream",
        "anthropic-https",
        "anthropic-https-stream",
        "anthropic-http",
        "anthropic-http-stream",
        "httpx-http2",
        "httpx-http2-sse",
        "aiohttp-https",
        "aiohttp-https-sse",
        "aiohttp-http",
        "aiohttp-http-sse",
    ];
    assert_calls(&calls, &expected, &api);
    let lines = assert_lines(&sc, expected.len());
    // The anthropic SDK (2.x) sends its key as a bearer token; recognized as Anthropic's.
    let anthropic: Vec<&Value> = lines
        .iter()
        .filter(|l| l["path"] == "/v1/messages")
        .collect();
    assert_eq!(anthropic.len(), 4);
    for l in anthropic {
        assert_eq!(l["stripped"][0]["type"], "anthropic_api_key", "{l}");
    }
    sc.assert_never_shows(&[&openai_key, &anthropic_key, INJECTED_KEY]);
}

/// axios (npm, pinned in tests/support/package-lock.json) the three ways Node apps point it
/// at a proxy: the `proxy` option, `https_proxy` from the environment (axios 1.21 tunnels
/// https through CONNECT itself), and an `HttpsProxyAgent`.
#[test]
fn node_axios_through_the_proxy_option_the_environment_and_an_agent() {
    let pki = TestPki::new();
    let api = ModelApi::start(&pki);
    let sc = injecting_sidecar(&[api.tls, api.plain], &pki.ca_pem, PERMISSIVE_POLICY, |c| c);
    let key = fake_openai_key();
    let calls = calls_of(
        Command::new("node")
            .arg(support().join("axios_client.mjs"))
            .arg(sc.proxy_url())
            .arg(format!("https://localhost:{}", api.tls))
            .arg(format!("http://127.0.0.1:{}", api.plain))
            .arg(&key)
            .current_dir(support())
            .env("NODE_EXTRA_CA_CERTS", sc.dir().join("ca.pem"))
            .env("https_proxy", sc.proxy_url()),
    );
    let expected = [
        "axios-http",
        "axios-http-sse",
        "axios-https-env",
        "axios-https-env-sse",
        "axios-https-agent",
        "axios-https-agent-sse",
    ];
    assert_calls(&calls, &expected, &api);
    assert_lines(&sc, expected.len());
    sc.assert_never_shows(&[&key, INJECTED_KEY]);
}

/// A request for an `https://` URL sent to the proxy in absolute form, over plain HTTP (older
/// axios releases and some HTTP libraries do this instead of tunnelling): the proxy makes the
/// TLS connection, verifying the upstream, and the request goes through every stage.
#[test]
fn an_https_url_in_absolute_form_is_served_over_tls_upstream() {
    let pki = TestPki::new();
    let api = ModelApi::start(&pki);
    let sc = injecting_sidecar(&[api.tls], &pki.ca_pem, PERMISSIVE_POLICY, |c| c);
    let key = fake_openai_key();
    let target = format!("https://localhost:{}/echo", api.tls);
    let (code, body) = raw_request(
        sc.proxy,
        &format!(
            "GET {target} HTTP/1.1\r\nHost: localhost:{}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n",
            api.tls
        ),
    );
    assert_eq!(code, 200, "{body}");
    let (_, json) = body.split_once("\r\n\r\n").unwrap();
    let seen: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(seen["key"], INJECTED_KEY, "{seen}");
    assert_eq!(seen["auth"], "", "{seen}");
    assert_eq!(seen["proto"], "HTTP/2", "{seen}");
    let l = &sc.log_lines(1)[0];
    assert_eq!(
        (l["scheme"].as_str(), l["status"].as_u64()),
        (Some("https"), Some(200)),
        "{l}"
    );
    sc.assert_never_shows(&[&key, INJECTED_KEY]);
}

/// Java's `java.net.http.HttpClient` (the JDK on the machine): HTTP/2 through the intercepted
/// tunnel, and on `http://` its h2c upgrade offer is not passed on (the request is served
/// as HTTP/1.1 through the pipeline).
#[test]
fn java_httpclient_through_the_proxy() {
    let pki = TestPki::new();
    let api = ModelApi::start(&pki);
    let sc = injecting_sidecar(&[api.tls, api.plain], &pki.ca_pem, PERMISSIVE_POLICY, |c| c);
    let key = fake_openai_key();
    let proxy = sc.proxy_url();
    let (host, port) = proxy
        .trim_start_matches("http://")
        .rsplit_once(':')
        .unwrap();
    let calls = calls_of(
        Command::new("java")
            .arg(support().join("java/Client.java"))
            .args([host, port])
            .arg(sc.dir().join("ca.pem"))
            .arg(format!("https://localhost:{}", api.tls))
            .arg(format!("http://127.0.0.1:{}", api.plain))
            .arg(&key),
    );
    let expected = ["java-https", "java-https-sse", "java-http", "java-http-sse"];
    assert_calls(&calls, &expected, &api);
    assert_eq!(calls["java-https"]["client_version"], "HTTP_2");
    assert_eq!(calls["java-http"]["client_version"], "HTTP_1_1");
    let lines = assert_lines(&sc, expected.len());
    for l in &lines {
        assert!(l["upgrade"].is_null(), "{l}");
    }
    sc.assert_never_shows(&[&key, INJECTED_KEY]);
}

/// Routes that name a `provider:` instead of spelling out the vendor's shape. The official
/// SDKs, each sending the app's own key: the `anthropic` SDK gets `x-api-key`, the `openai`
/// SDK's `AzureOpenAI` (which sends `api-key`) gets an Entra-style bearer. GitHub's required
/// version header is added when the app sends none and left alone when it does. A provider's
/// route is HTTPS only: the same host over plain HTTP gets no credential. `chaperone check`
/// shows what each route expanded to.
#[test]
fn provider_routes_give_each_vendor_its_documented_shape() {
    let pki = TestPki::new();
    let api = ModelApi::start(&pki);
    let (tls, plain) = (api.tls, api.plain);
    let routes = format!(
        "- name: claude\n  provider: anthropic\n  match: {{ host: localhost, port: {tls}, path_prefix: /v1/messages }}\n  credential: app-key\n\
         - name: azure\n  provider: azure_openai\n  match: {{ host: localhost, port: {tls}, path_prefix: /openai/ }}\n  credential: app-key\n\
         - name: gh\n  provider: github\n  match: {{ host: [localhost, 127.0.0.1], port: {tls}, path_prefix: /echo }}\n  credential: app-key\n\
         - name: gh-plain\n  provider: github\n  match: {{ host: 127.0.0.1, port: {plain} }}\n  credential: app-key\n"
    );
    let sc = injecting_sidecar(&[], &pki.ca_pem, PERMISSIVE_POLICY, |c| {
        c.set("routes", &routes)
    });

    let (ok, out, err) = run(Command::new(bin())
        .args([
            "check",
            "--config",
            sc.dir().join("config.yaml").to_str().unwrap(),
        ])
        .env(INJECTED_KEY_ENV, INJECTED_KEY));
    assert!(ok, "{out}{err}");
    for expanded in [
        format!(
            "route claude (provider anthropic): https://localhost port {tls} /v1/messages*; credential app-key into x-api-key: {{token}}"
        ),
        format!(
            "route azure (provider azure_openai): https://localhost port {tls} /openai/*; credential app-key into authorization: Bearer {{token}}"
        ),
        format!(
            "route gh (provider github): https://localhost, 127.0.0.1 port {tls} /echo*; credential app-key into authorization: Bearer {{token}}; adds x-github-api-version: 2022-11-28 unless sent"
        ),
    ] {
        assert!(out.contains(&expanded), "{expanded}\nnot in\n{out}");
    }

    let (anthropic_key, azure_key) = (
        fake_anthropic_key(),
        format!("{:016x}{:016x}", rand_u64(), rand_u64()),
    );
    let calls = calls_of(
        Command::new(python())
            .arg(support().join("provider_clients.py"))
            .arg(sc.proxy_url())
            .arg(sc.dir().join("ca.pem"))
            .arg(tls.to_string())
            .args([&anthropic_key, &azure_key]),
    );
    let claude = &calls["anthropic"]["seen"];
    assert_eq!(claude["key"], INJECTED_KEY, "{claude}");
    assert_eq!(claude["auth"], "", "{claude}");
    // The SDK pins its own version (2.x sends a newer one than the catalog's); it goes through.
    assert!(
        claude["other"]["anthropic-version"]
            .as_str()
            .is_some_and(|v| v != "2023-06-01"),
        "{claude}"
    );
    let azure = &calls["azure"]["seen"];
    assert_eq!(azure["auth"], format!("Bearer {INJECTED_KEY}"), "{azure}");
    assert_eq!(azure["key"], "", "{azure}");
    assert!(
        azure["other"].get("api-key").is_none(),
        "the app's Azure key reached the API: {azure}"
    );
    assert_eq!(
        azure["path"],
        "/openai/deployments/gpt-4o-prod/chat/completions"
    );

    let (proxy, ca) = (sc.proxy_url(), sc.dir().join("ca.pem"));
    let echo = |url: &str, extra: &[&str]| -> Value {
        let mut args = vec!["--proxy", &proxy, "--cacert", ca.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.push(url);
        let (code, body) = curl(&args);
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let gh = echo(&format!("https://127.0.0.1:{tls}/echo"), &[]);
    assert_eq!(gh["auth"], format!("Bearer {INJECTED_KEY}"), "{gh}");
    assert_eq!(gh["other"]["x-github-api-version"], "2022-11-28", "{gh}");
    let pinned = echo(
        &format!("https://localhost:{tls}/echo"),
        &["-H", "X-GitHub-Api-Version: 2026-03-10"],
    );
    assert_eq!(pinned["other"]["x-github-api-version"], "2026-03-10");
    let clear = echo(&format!("http://127.0.0.1:{plain}/echo"), &[]);
    assert_eq!(
        clear["auth"], "",
        "a provider's credential went out in clear: {clear}"
    );
    assert!(clear["other"].get("x-github-api-version").is_none());

    let lines = sc.lines_where(5, |l| l["kind"] == "http");
    let routes: Vec<&str> = lines
        .iter()
        .map(|l| l["route"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(routes, ["claude", "azure", "gh", "gh", "-"], "{lines:#?}");
    for l in &lines[..2] {
        assert_eq!(l["stripped"].as_array().unwrap().len(), 1, "{l}");
    }
    sc.assert_never_shows(&[&anthropic_key, &azure_key, INJECTED_KEY]);
}
