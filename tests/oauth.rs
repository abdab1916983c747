//! OAuth 2.0 client credentials against a real authorization server (npm `oidc-provider`,
//! started on loopback from tests/support): tokens verified against the server's JWKS, one
//! fetch for many calls and for concurrent misses, fail closed on an outage, recovery.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

const CLIENT_SECRET: &str = "oauth-client-secret-4f9a1c2e7b";

/// oidc-provider on a fixed port; counts token requests; killed on drop.
struct AuthServer {
    port: u16,
    child: Child,
    token_requests: Arc<Mutex<usize>>,
}

impl AuthServer {
    fn start(port: u16) -> AuthServer {
        let support = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support");
        install_once(&support);
        let mut child = Command::new("node")
            .arg(support.join("oidc-provider.mjs"))
            .args([port.to_string(), CLIENT_SECRET.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node");
        let stdout = child.stdout.take().unwrap();
        let token_requests = Arc::new(Mutex::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let counter = token_requests.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match line.as_str() {
                    "ready" => {
                        let _ = ready_tx.send(());
                    }
                    "token" => *counter.lock().unwrap() += 1,
                    _ => {}
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("oidc-provider did not start");
        AuthServer {
            port,
            child,
            token_requests,
        }
    }

    fn token_requests(&self) -> usize {
        *self.token_requests.lock().unwrap()
    }

    fn jwks(&self) -> JwkSet {
        let (code, text) = raw_request(
            format!("127.0.0.1:{}", self.port).parse().unwrap(),
            &format!(
                "GET /jwks HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
                self.port
            ),
        );
        assert_eq!(code, 200, "{text}");
        serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap()
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `npm ci` the pinned oidc-provider if it is not installed yet (once, however many tests
/// start at the same time), so `cargo test` works on a fresh clone.
fn install_once(support: &Path) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _held = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if support.join("node_modules/oidc-provider").is_dir() {
        return;
    }
    let (ok, _, err) = run(Command::new("npm")
        .args([
            "ci",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--prefix",
        ])
        .arg(support));
    assert!(ok, "npm ci --prefix tests/support failed: {err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(upstream: u16, auth_port: u16) -> String {
    format!(
        r#"listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity:
  id: spiffe://test.local/ns/ml/sa/agent
  workload: tool-agent
  environment: test
credentials:
  tools-basic:
    kind: client_credentials
    token_url: http://127.0.0.1:{auth_port}/token
    client_id: chaperone
    client_secret_file: {{dir}}/client-secret
    timeout: 1s
  tools-post:
    kind: client_credentials
    token_url: http://127.0.0.1:{auth_port}/token
    client_id: chaperone-post
    client_secret_file: {{dir}}/client-secret
    auth_method: client_secret_post
routes:
  - name: tools-read
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /read/ }}
    credential: tools-basic
    audience: https://tools.test
    scopes: [tools.read]
  - name: tools-write
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /write/ }}
    credential: tools-post
    audience: https://tools.test
    scopes: [tools.write]
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

fn start_sidecar(upstream: u16, auth_port: u16) -> Sidecar {
    Sidecar::start_with(
        &config(upstream, auth_port),
        PERMISSIVE_POLICY,
        &[],
        |dir: &Path| {
            std::fs::write(dir.join("client-secret"), format!("{CLIENT_SECRET}\n")).unwrap();
        },
    )
}

fn curl_via(proxy: &str, url: &str) -> (u16, String) {
    curl(&["-x", proxy, url])
}

fn bearer(r: &Recorded) -> String {
    r.header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .expect("bearer token")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_tokens_are_verified_cached_and_fetched_once() {
    let up = Upstream::start().await;
    let auth = AuthServer::start(free_port());
    let sc = start_sidecar(up.addr.port(), auth.port);
    let base = format!("http://127.0.0.1:{}", up.addr.port());

    for i in 0..5 {
        let (code, body) = curl_via(&sc.proxy_url(), &format!("{base}/read/item/{i}"));
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(auth.token_requests(), 1, "five calls, one token fetch");

    let jwks = auth.jwks();
    let tokens: Vec<String> = up.requests().iter().map(bearer).collect();
    assert!(
        tokens.windows(2).all(|w| w[0] == w[1]),
        "the cached token is reused"
    );
    let header = jsonwebtoken::decode_header(&tokens[0]).unwrap();
    let key = DecodingKey::from_jwk(jwks.find(header.kid.as_deref().unwrap()).unwrap()).unwrap();
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&["https://tools.test"]);
    v.set_issuer(&[format!("http://127.0.0.1:{}", auth.port)]);
    let claims = jsonwebtoken::decode::<Value>(&tokens[0], &key, &v)
        .expect("the server's own signature")
        .claims;
    assert_eq!(
        claims["scope"], "tools.read",
        "only the route's scope was requested"
    );
    assert_eq!(claims["client_id"], "chaperone");

    // Eight concurrent first calls on the other route (client_secret_post): one fetch.
    let proxy = sc.proxy_url();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (p, u) = (proxy.clone(), format!("{base}/write/doc/{i}"));
            std::thread::spawn(move || curl_via(&p, &u).0)
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
    assert_eq!(
        auth.token_requests(),
        2,
        "concurrent misses share one fetch"
    );
    let write_token = bearer(up.requests().last().unwrap());
    let claims = jsonwebtoken::decode::<Value>(&write_token, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["scope"], "tools.write");
    assert_eq!(claims["client_id"], "chaperone-post");

    let lines = sc.log_lines(13);
    let read = lines.iter().find(|l| l["route"] == "tools-read").unwrap();
    assert_eq!(read["credential"]["kind"], "client_credentials");
    assert_eq!(
        read["credential"]["id"],
        claims_jti(&tokens[0]),
        "the log names the token by its jti"
    );
    let (_, metrics) = admin_get(sc.admin, "/metrics");
    assert!(
        metrics.contains(r#"chaperone_token_cache_total{credential="tools-basic",result="hit"} 4"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"chaperone_token_cache_total{credential="tools-basic",result="miss"} 1"#),
        "{metrics}"
    );
    let out = sc.output();
    for secret in [tokens[0].as_str(), write_token.as_str(), CLIENT_SECRET] {
        assert!(
            !out.contains(secret) && !metrics.contains(secret),
            "a secret reached the output"
        );
    }
}

fn claims_jti(token: &str) -> String {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let v: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    v["jti"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_closed_then_recovers() {
    let up = Upstream::start().await;
    let port = free_port();
    // No authorization server yet.
    let sc = start_sidecar(up.addr.port(), port);
    let url = format!("http://127.0.0.1:{}/read/x", up.addr.port());
    let t = Instant::now();
    let (code, body) = curl_via(&sc.proxy_url(), &url);
    assert_eq!(code, 503, "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "bounded by the fetch timeout"
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "credential_unavailable");
    assert!(v["reason"].as_str().unwrap().contains("tools-basic"), "{v}");
    assert!(
        up.requests().is_empty(),
        "nothing forwarded without its credential"
    );
    let l = &sc.log_lines(1)[0];
    assert_eq!(l["status"], 503);
    assert_eq!(l["error"], "credential_unavailable");

    // The server comes up: the next call succeeds, nothing to restart.
    let auth = AuthServer::start(port);
    let (code, body) = curl_via(&sc.proxy_url(), &url);
    assert_eq!(code, 200, "{body}");
    assert_eq!(auth.token_requests(), 1);
    assert!(!sc.output().contains(CLIENT_SECRET));
}
