//! gRPC through Chaperone with real grpcio on both ends (tests/support/grpc_echo.py): the
//! client tunnels every call with CONNECT (the `grpc.http_proxy` channel argument, as
//! `grpc_proxy`/`https_proxy` would), over an insecure channel (HTTP/2 with prior knowledge
//! inside the tunnel, which goes on to the plain server as h2c) and over TLS (intercepted,
//! HTTP/2 by ALPN). Unary and server-streaming calls: our key reaches the server and the
//! app's does not, messages stream as sent, and each call's line ends complete with its
//! trailers.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

fn support() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support")
}

#[test]
fn grpcio_unary_and_streaming_over_insecure_and_tls_channels() {
    let pki = TestPki::new();
    let (_certs, cert, key) = pki.server_files();
    let mut serve = Command::new(python());
    serve
        .arg(support().join("grpc_echo.py"))
        .arg("serve")
        .args([&cert, &key]);
    let server = ServerProcess::start(serve, "the grpcio server");
    let tls = server.port.unwrap();
    let plain: u16 = server.lines_after("plain ")[0].parse().unwrap();
    let sc = injecting_sidecar(&[plain, tls], &pki.ca_pem, PERMISSIVE_POLICY, |c| c);
    let app_key = fake_openai_key();
    let out = Command::new(python())
        .arg(support().join("grpc_echo.py"))
        .arg("call")
        .arg(sc.proxy_url())
        .arg(sc.dir().join("ca.pem"))
        .args([plain.to_string(), tls.to_string(), app_key.clone()])
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("grpc_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    let calls = named_lines(&out);
    assert_eq!(
        calls.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "grpc-insecure",
            "grpc-insecure-stream",
            "grpc-tls",
            "grpc-tls-stream"
        ],
    );
    for (name, call) in &calls {
        assert_eq!(call["seen"]["key"], INJECTED_KEY, "{name}: {call}");
        assert_eq!(call["seen"]["auth"], "", "{name}: {call}");
        if name.ends_with("stream") {
            assert_eq!(call["parts"], 5, "{name}: {call}");
            let spread = call["spread_ms"].as_f64().unwrap();
            assert!(spread > 500.0, "{name}: arrived in one piece: {call}");
        }
    }

    let lines = sc.lines_where(4, |l| l["kind"] == "http");
    assert_eq!(lines.len(), 4, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["completion"], "complete", "{l}");
        assert_eq!(l["error"], Value::Null, "{l}");
        assert_eq!(l["upstream_version"], "HTTP/2.0", "{l}");
        assert_eq!(l["credential"]["name"], "app-key", "{l}");
        assert_eq!(l["stripped"][0]["type"], "openai_project_key", "{l}");
    }
    let schemes: Vec<&str> = lines
        .iter()
        .map(|l| l["scheme"].as_str().unwrap())
        .collect();
    assert_eq!(
        schemes.iter().filter(|s| **s == "http").count(),
        2,
        "{lines:#?}"
    );
    sc.assert_never_shows(&[&app_key, INJECTED_KEY]);
}
