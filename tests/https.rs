//! HTTPS through CONNECT: interception with the local CA, upstream TLS, HTTP/2, tunnels.
//! Real clients (curl, Python requests and httpx) and a loopback HTTPS upstream with its own
//! test CA.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

const STATIC_ENV: &str = "TLS_TEST_STATIC_KEY";
const STATIC_VALUE: &str = "tls-static-sidecar-value-0123";

/// Routes to `localhost` are intercepted (a credential is injected); `127.0.0.1` is passthrough.
fn config(port: u16) -> String {
    format!(
        r#"listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity:
  id: spiffe://test.local/ns/ml/sa/inference
  workload: test-inference
  environment: test
tls:
  ca_cert: {{dir}}/ca.pem
  ca_key: {{dir}}/ca-key.pem
  upstream_roots: {{dir}}/upstream-ca.pem
  passthrough: [127.0.0.1]
credentials:
  app-key:
    kind: static
    from_env: {STATIC_ENV}
routes:
  - name: tls-api
    match: {{ host: localhost, port: {port}, scheme: https }}
    credential: app-key
    inject: {{ header: x-api-key, value: "{{token}}" }}
strip:
  mode: strip
policy:
  file: {{dir}}/policy.cedar
log:
  format: json
  output: stdout
"#
    )
}

/// curl through the sidecar's CONNECT, trusting `ca` for the TLS it sees.
fn through(sc: &Sidecar, ca: &Path, args: &[&str]) -> (i32, u16, String) {
    let proxy = sc.proxy_url();
    let mut all = vec!["--proxy", proxy.as_str(), "--cacert", ca.to_str().unwrap()];
    all.extend_from_slice(args);
    curl_raw(&all)
}

fn start(up: &Upstream, upstream_ca: &str) -> Sidecar {
    let ca = upstream_ca.to_string();
    Sidecar::start_with(
        &config(up.addr.port()),
        PERMISSIVE_POLICY,
        &[(STATIC_ENV, STATIC_VALUE)],
        move |dir: &Path| {
            std::fs::write(dir.join("upstream-ca.pem"), &ca).unwrap();
            let (ok, _, err) =
                run(Command::new(bin()).args(["ca", "init", "--out", dir.to_str().unwrap()]));
            assert!(ok, "{err}");
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_intercepted_https_http1_and_http2() {
    let pki = TestPki::new();
    let up = Upstream::start_tls(&pki).await;
    let sc = start(&up, &pki.ca_pem);
    let ca = sc.dir().join("ca.pem");
    let key = fake_openai_key();
    let url = format!("https://localhost:{}/v1/chat?model=x", up.addr.port());
    for version in ["--http1.1", "--http2"] {
        let (rc, code, body) = through(
            &sc,
            &ca,
            &[
                version,
                "-H",
                &format!("Authorization: Bearer {key}"),
                "-H",
                "chaperone-purpose: answer-question",
                &url,
            ],
        );
        assert_eq!((rc, code), (0, 200), "{version}: {body}");
    }
    let reqs = up.requests();
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        assert_eq!(
            r.header("x-api-key"),
            Some(STATIC_VALUE),
            "credential injected over TLS"
        );
        assert!(r.header("authorization").is_none());
        assert!(r.header("chaperone-purpose").is_none());
        assert!(!r.all_text().contains(&key));
        assert_eq!(r.version, "HTTP/2.0", "upstream speaks HTTP/2 by ALPN");
    }
    // Each call logs its CONNECT (kind intercept) and the request inside (kind http).
    let lines = sc.log_lines(4);
    let http: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "http").collect();
    assert_eq!(http.len(), 2, "{lines:?}");
    for l in http {
        assert_eq!(l["scheme"], "https");
        assert_eq!(l["route"], "tls-api");
        assert_eq!(l["purpose"], "answer-question");
        assert_eq!(l["stripped"][0]["type"], "openai_project_key");
        assert_eq!(l["status"], 200);
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["kind"] == "intercept" && l["scheme"] == "https")
            .count(),
        2
    );
    assert!(!sc.output().contains(&key) && !sc.output().contains(STATIC_VALUE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_and_httpx_through_https_proxy() {
    let pki = TestPki::new();
    let up = Upstream::start_tls(&pki).await;
    let sc = start(&up, &pki.ca_pem);
    let ca = sc.dir().join("ca.pem");
    let script = format!(
        r#"
import requests, httpx
url = "https://localhost:{port}/v1/embeddings"
r = requests.post(url, json={{"input": "x"}}, headers={{"chaperone-purpose": "embed", "x-api-key": "sk-proj-a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8s9T0"}})
print("requests", r.status_code)
with httpx.Client(proxy="{proxy}", verify="{ca}") as c:
    r = c.get(url, headers={{"chaperone-purpose": "embed"}})
    print("httpx", r.status_code)
"#,
        port = up.addr.port(),
        proxy = sc.proxy_url(),
        ca = ca.display()
    );
    let (ok, out, err) = run(Command::new(python())
        .args(["-c", &script])
        .env("HTTPS_PROXY", sc.proxy_url())
        .env("REQUESTS_CA_BUNDLE", &ca)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy"));
    assert!(ok, "python failed: {err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["requests 200", "httpx 200"]
    );
    let reqs = up.requests();
    assert_eq!(reqs.len(), 2);
    assert!(
        reqs.iter()
            .all(|r| r.header("x-api-key") == Some(STATIC_VALUE))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_hosts_are_tunnelled_untouched() {
    let pki = TestPki::new();
    let up = Upstream::start_tls(&pki).await;
    let sc = start(&up, &pki.ca_pem);
    // The app trusts the upstream's own CA: the TLS session is end to end.
    let dir = tempfile::tempdir().unwrap();
    let upstream_ca = dir.path().join("up.pem");
    std::fs::write(&upstream_ca, &pki.ca_pem).unwrap();
    let (rc, code, body) = through(
        &sc,
        &upstream_ca,
        &[
            "-H",
            "Authorization: Bearer app-own-token-kept-as-is",
            &format!("https://127.0.0.1:{}/direct", up.addr.port()),
        ],
    );
    assert_eq!((rc, code), (0, 200), "{body}");
    let r = &up.requests()[0];
    assert_eq!(
        r.header("authorization"),
        Some("Bearer app-own-token-kept-as-is"),
        "a tunnel does not touch bytes"
    );
    assert!(r.header("x-api-key").is_none());
    let lines = sc.log_lines(1);
    assert!(
        lines
            .iter()
            .any(|l| l["kind"] == "tunnel" && l["decision"] == "allow")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_with_an_untrusted_certificate_is_a_502() {
    let pki = TestPki::new();
    let up = Upstream::start_tls(&pki).await;
    // Chaperone trusts a different CA than the one that signed the upstream.
    let other = TestPki::new();
    let sc = start(&up, &other.ca_pem);
    let ca = sc.dir().join("ca.pem");
    let (rc, code, body) = through(
        &sc,
        &ca,
        &[&format!("https://localhost:{}/v1/x", up.addr.port())],
    );
    assert_eq!((rc, code), (0, 502), "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "upstream_unreachable");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("certificate"),
        "{body}"
    );
    assert!(up.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_ca_fails_and_the_proxy_keeps_serving() {
    let pki = TestPki::new();
    let up = Upstream::start_tls(&pki).await;
    let sc = start(&up, &pki.ca_pem);
    let url = format!("https://localhost:{}/v1/x", up.addr.port());
    // No --cacert: curl checks against the system store, which does not hold our CA.
    let (rc, _, _) = curl_raw(&["--proxy", &sc.proxy_url(), &url]);
    assert_eq!(rc, 60, "curl must refuse the unknown CA (exit 60)");
    let ca = sc.dir().join("ca.pem");
    let (rc, code, _) = through(&sc, &ca, &[&url]);
    assert_eq!((rc, code), (0, 200), "still serving");
    let lines = sc.log_lines(3);
    let failed = lines
        .iter()
        .find(|l| {
            l["kind"] == "intercept"
                && l["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("tls_handshake_failed"))
        })
        .unwrap_or_else(|| panic!("handshake failure logged: {lines:?}"));
    assert_eq!(failed["host"], "localhost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_another_host_inside_a_tunnel_is_refused() {
    let pki = TestPki::new();
    let up = Upstream::start_tls(&pki).await;
    let sc = start(&up, &pki.ca_pem);
    let ca = sc.dir().join("ca.pem");
    let (rc, code, body) = through(
        &sc,
        &ca,
        &[
            "-H",
            "Host: evil.example",
            &format!("https://localhost:{}/v1/x", up.addr.port()),
        ],
    );
    assert_eq!((rc, code), (0, 400), "{body}");
    assert!(body.contains("tunnel was opened to"));
    assert!(up.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_trailers_passes_through_an_intercepted_tunnel() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pki = TestPki::new();
    let up = Upstream::start_tls(&pki).await;
    let sc = start(&up, &pki.ca_pem);
    let port = up.addr.port();

    // CONNECT by hand, then TLS trusting the sidecar's CA, then HTTP/2 (as a gRPC client does).
    let mut tcp = tokio::net::TcpStream::connect(sc.proxy).await.unwrap();
    tcp.write_all(
        format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let ca = std::fs::read(sc.dir().join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS with the sidecar's leaf for localhost");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("https://localhost:{port}/grpc"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .header("chaperone-purpose", "tool-call")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02yo")))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers reach the client");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert_eq!(trailers.get("grpc-message").unwrap(), "ok");
    assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x02hi");
    let r = &up.requests()[0];
    assert_eq!(
        r.header("te"),
        Some("trailers"),
        "gRPC servers require TE: trailers"
    );
    assert_eq!(r.header("x-api-key"), Some(STATIC_VALUE));
    assert_eq!(r.body.as_bytes(), b"\0\0\0\0\x02yo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_intercepted_requests() {
    let pki = TestPki::new();
    let up = Upstream::start_tls(&pki).await;
    let mut sc = start(&up, &pki.ca_pem);
    let ca = sc.dir().join("ca.pem").to_str().unwrap().to_string();
    let proxy = sc.proxy_url();
    let url = format!("https://localhost:{}/slow", up.addr.port());
    let in_flight =
        std::thread::spawn(move || curl_raw(&["--proxy", &proxy, "--cacert", &ca, &url]));
    for _ in 0..300 {
        if !up.requests().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        !up.requests().is_empty(),
        "the request reached the upstream"
    );
    let status = sc.terminate();
    let (rc, code, _) = in_flight.join().unwrap();
    assert_eq!(
        (rc, code),
        (0, 200),
        "the intercepted request finished during the drain"
    );
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_inspected_inside_intercepted_http2() {
    let pki = TestPki::new();
    let up = Upstream::start_tls(&pki).await;
    let sc = start(&up, &pki.ca_pem);
    let ca = sc.dir().join("ca.pem");
    let key = fake_openai_key();
    let url = format!("https://localhost:{}/v1/chat", up.addr.port());
    let json = ["-H", "content-type: application/json", "--http2"];
    let leaked = format!(r#"{{"messages":[{{"content":"my key: {key}"}}]}}"#);
    let mut args = json.to_vec();
    args.extend(["--data-binary", &leaked, &url]);
    let (rc, code, body) = through(&sc, &ca, &args);
    assert_eq!((rc, code), (0, 403), "{body}");
    assert!(
        body.contains("embedded_secret") && body.contains("body:content"),
        "{body}"
    );
    assert!(up.requests().is_empty(), "the secret never left");

    let clean = r#"{"messages":[{"content":"hello"}],"max_tokens":64}"#;
    let mut args = json.to_vec();
    args.extend(["--data-binary", clean, &url]);
    let (rc, code, body) = through(&sc, &ca, &args);
    assert_eq!((rc, code), (0, 200), "{body}");
    let r = &up.requests()[0];
    assert_eq!(r.version, "HTTP/2.0");
    assert_eq!(r.body, clean, "a clean body passes byte for byte");
    assert_eq!(r.header("x-api-key"), Some(STATIC_VALUE));
    let lines = sc.log_lines(4);
    let http: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "http").collect();
    assert_eq!(http.len(), 2);
    assert!(http.iter().all(|l| l["body_scan"] == "inspected"));
    sc.assert_never_shows(&[&key, STATIC_VALUE]);
}

/// Intercepted connections serve through the same HTTP server builder as the listeners, so a
/// request head over 64 KiB is refused there too, never forwarded (hyper's default limit
/// would take ~400 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intercepted_request_head_over_64_kib_is_refused_as_on_the_listener() {
    let pki = TestPki::new();
    let up = Upstream::start_tls(&pki).await;
    let sc = start(&up, &pki.ca_pem);
    let ca = sc.dir().join("ca.pem");
    let url = format!("https://localhost:{}/v1/models", up.addr.port());
    let big = format!("x-big: {}", "a".repeat(70 * 1024));
    let (rc, code, body) = through(&sc, &ca, &["--http1.1", "-H", &big, &url]);
    assert_eq!((rc, code), (0, 431), "{body}");
    let (_, code, body) = through(&sc, &ca, &["--http2", "-H", &big, &url]);
    assert_ne!(code, 200, "{body}");
    assert!(up.requests().is_empty(), "an oversized head was forwarded");
    // The same request within the limit goes through.
    let (rc, code, body) = through(&sc, &ca, &["--http1.1", "-H", "x-small: a", &url]);
    assert_eq!((rc, code), (0, 200), "{body}");
}

/// A gRPC-shaped response (data, then trailers) from an HTTP/2 upstream through interception
/// is complete when its trailers arrive: hyper's server stops polling the body there, and the
/// line must not call the call `response_incomplete`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_ending_in_trailers_is_logged_complete() {
    let pki = TestPki::new();
    let up = Upstream::start_tls(&pki).await;
    let sc = start(&up, &pki.ca_pem);
    let ca = sc.dir().join("ca.pem");
    let url = format!("https://localhost:{}/grpc", up.addr.port());
    for version in ["--http2", "--http1.1"] {
        let (rc, code, _) = through(
            &sc,
            &ca,
            &[
                version,
                "--raw",
                "-H",
                "TE: trailers",
                "-H",
                "chaperone-request-id: grpc-trailers",
                &url,
            ],
        );
        assert_eq!((rc, code), (0, 200), "{version}");
    }
    let lines: Vec<Value> = sc
        .log_lines(4)
        .into_iter()
        .filter(|l| l["request_id"] == "grpc-trailers")
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        assert_eq!(l["completion"], "complete", "{l}");
        assert_eq!(l["error"], Value::Null, "{l}");
    }
}
