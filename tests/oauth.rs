//! Token-endpoint credentials against a real authorization server (npm `oidc-provider`,
//! started on loopback from tests/support): client credentials with every client
//! authentication method, RFC 8693 token exchange (registered with oidc-provider's
//! `registerGrantType`), caching, refresh ahead, fail-closed outages with backoff and
//! recovery, and the scope and lifetime checks.

mod common;

use parking_lot::Mutex;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const CLIENT_SECRET: &str = "oauth-client-secret-4f9a1c2e7b";

/// oidc-provider on a fixed port (a helper process that prints one line per token request).
struct AuthServer {
    port: u16,
    scheme: &'static str,
    process: ServerProcess,
}

impl AuthServer {
    /// On a port of its own choosing.
    fn start() -> AuthServer {
        Self::start_with(&[])
    }

    fn start_with(env: &[(&str, String)]) -> AuthServer {
        Self::start_on(0, env)
    }

    /// On `port` (0: any), e.g. again where an earlier one ran.
    fn start_on(port: u16, env: &[(&str, String)]) -> AuthServer {
        let support = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support");
        install_once(&support);
        let mut cmd = Command::new("node");
        cmd.arg(support.join("oidc-provider.mjs"))
            .args([port.to_string(), CLIENT_SECRET.to_string()]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let scheme = if env.iter().any(|(k, _)| *k == "TLS_CERT") {
            "https"
        } else {
            "http"
        };
        let process = ServerProcess::start(cmd, "oidc-provider");
        AuthServer {
            port: process.port.expect("oidc-provider says its port"),
            scheme,
            process,
        }
    }

    fn issuer(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// Token requests received so far.
    fn token_requests(&self) -> usize {
        self.process.lines_after("token").len()
    }

    /// Subject-token `jti` of each successful token exchange.
    fn exchanges(&self) -> Vec<String> {
        self.process.lines_after("exchange ")
    }

    fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// Verify a token the upstream received against the server's JWKS, issuer and audience.
    fn verify(&self, token: &str, audience: &str, ca: Option<&Path>) -> Value {
        verify_with_jwks(
            token,
            &format!("{}/jwks", self.issuer()),
            ca,
            &self.issuer(),
            audience,
        )
    }
}

/// `npm ci` the pinned oidc-provider if it is not installed yet (once, however many tests
/// start at the same time), so `cargo test` works on a fresh clone.
fn install_once(support: &Path) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _held = LOCK.lock();
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

/// The issuer of subject and actor tokens (standing in for the Kubernetes API server that
/// signs projected service-account tokens).
struct SubjectIssuer {
    key: EncodingKey,
    jwks: Value,
}

impl SubjectIssuer {
    fn new() -> SubjectIssuer {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        let b64 = |b: &[u8]| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        };
        SubjectIssuer {
            key: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwks: json!({ "keys": [{
                "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k8s",
                "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
            }]}),
        }
    }

    fn token(&self, sub: &str, jti: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k8s".into());
        jsonwebtoken::encode(
            &h,
            &json!({
                "iss": "https://kubernetes.default.svc", "aud": "sts.test", "sub": sub,
                "jti": jti, "iat": now, "exp": now + 3600,
            }),
            &self.key,
        )
        .unwrap()
    }
}

fn curl_via(proxy: &str, url: &str) -> (u16, String) {
    curl(&["-x", proxy, url])
}

fn curl_purpose(proxy: &str, url: &str, purpose: &str) -> (u16, String) {
    curl(&[
        "-x",
        proxy,
        "-H",
        &format!("chaperone-purpose: {purpose}"),
        url,
    ])
}

fn metric(admin: std::net::SocketAddr, line_prefix: &str) -> f64 {
    let (_, text) = admin_get(admin, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Poll until `f` holds or 15 s pass.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const HEAD: &str = r#"listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity:
  id: spiffe://test.local/ns/ml/sa/agent
  workload: tool-agent
  environment: test
"#;

const TAIL: &str = r#"strip:
  mode: strip
policy:
  file: {dir}/policy.cedar
log:
  format: json
  output: stdout
"#;

fn secret_config(upstream: u16, auth_port: u16) -> String {
    format!(
        r#"{HEAD}credentials:
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
{TAIL}"#
    )
}

fn start_secret_sidecar(upstream: u16, auth_port: u16) -> Sidecar {
    Sidecar::start_with(
        &secret_config(upstream, auth_port),
        PERMISSIVE_POLICY,
        &[],
        |dir: &Path| {
            std::fs::write(dir.join("client-secret"), format!("{CLIENT_SECRET}\n")).unwrap();
        },
    )
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
async fn client_credentials_tokens_are_verified_cached_and_fetched_once() {
    let up = Upstream::start().await;
    let auth = AuthServer::start();
    let sc = start_secret_sidecar(up.addr.port(), auth.port);
    let base = format!("http://127.0.0.1:{}", up.addr.port());

    for i in 0..5 {
        let (code, body) = curl_via(&sc.proxy_url(), &format!("{base}/read/item/{i}"));
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(auth.token_requests(), 1, "five calls, one token fetch");

    let tokens: Vec<String> = up.requests().iter().map(bearer).collect();
    assert!(
        tokens.windows(2).all(|w| w[0] == w[1]),
        "the cached token is reused"
    );
    let claims = auth.verify(&tokens[0], "https://tools.test", None);
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
    let claims = auth.verify(&write_token, "https://tools.test", None);
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
    assert!(
        read["credential"].get("flags").is_none(),
        "a narrow, short token is not flagged: {read}"
    );
    let (_, metrics) = admin_get(sc.admin, "/metrics");
    for expected in [
        r#"chaperone_token_cache_total{credential="tools-basic",result="hit"} 4"#,
        r#"chaperone_token_cache_total{credential="tools-basic",result="miss"} 1"#,
        r#"chaperone_token_fetches_total{credential="tools-basic",result="ok"} 1"#,
        r#"chaperone_token_fetch_duration_seconds_count{credential="tools-basic"} 1"#,
        r#"chaperone_credentials_issued_total{credential="tools-post",kind="client_credentials",result="ok"} 8"#,
    ] {
        assert!(metrics.contains(expected), "{expected} in {metrics}");
    }
    sc.assert_never_shows(&[&tokens[0], &write_token, CLIENT_SECRET]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_closed_backs_off_then_recovers() {
    let up = Upstream::start().await;
    // The server's address, then an outage there: it is stopped before the sidecar starts
    // (and comes back on the same port below; nothing else on the machine takes it meanwhile).
    let port = AuthServer::start().port;
    let sc = start_secret_sidecar(up.addr.port(), port);
    let url = format!("http://127.0.0.1:{}/read/x", up.addr.port());
    let app_key = fake_openai_key();
    let with_app_key = |proxy: &str| {
        curl(&[
            "-x",
            proxy,
            "-H",
            &format!("authorization: Bearer {app_key}"),
            &url,
        ])
    };
    let t = Instant::now();
    let (code, body) = with_app_key(&sc.proxy_url());
    assert_eq!(code, 503, "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "bounded by the fetch timeout"
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "credential_unavailable");
    let reason = v["reason"].as_str().unwrap();
    assert!(reason.contains("tools-basic"), "{v}");
    assert_eq!(
        reason.matches("tools-basic").count(),
        1,
        "said once: {reason}"
    );
    // Straight away again: failed fast from the backoff, no second attempt.
    let (code, body) = with_app_key(&sc.proxy_url());
    assert_eq!(code, 503);
    assert!(body.contains("retrying after"), "{body}");
    assert_eq!(
        metric(
            sc.admin,
            r#"chaperone_token_fetches_total{credential="tools-basic",result="unreachable"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            sc.admin,
            r#"chaperone_token_cache_total{credential="tools-basic",result="backoff"}"#
        ),
        1.0
    );
    assert!(
        up.requests().is_empty(),
        "nothing forwarded without its credential"
    );
    let l = &sc.log_lines(2)[0];
    assert_eq!(l["status"], 503);
    assert_eq!(l["error"], "credential_unavailable");

    // The server comes up: calls succeed again within the backoff, nothing to restart.
    let auth = AuthServer::start_on(port, &[]);
    eventually("recovery", || with_app_key(&sc.proxy_url()).0 == 200);
    assert_eq!(auth.token_requests(), 1);
    let forwarded = &up.requests()[0];
    let token = bearer(forwarded);
    assert_ne!(token, app_key, "the app's own key is never forwarded");
    auth.verify(&token, "https://tools.test", None);
    sc.assert_never_shows(&[CLIENT_SECRET, &app_key, &token]);
}

/// Token exchange: the subject and actor tokens go to the server, which verifies them and
/// issues a token for the subject; per-purpose scopes give per-purpose tokens; a rotated
/// subject-token file is used for the next exchange and the old exchanged token retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_exchange_per_purpose_with_subject_rotation() {
    let up = Upstream::start().await;
    let k8s = SubjectIssuer::new();
    let jwks_dir = tempfile::tempdir().unwrap();
    let jwks_path = jwks_dir.path().join("subject-jwks.json");
    std::fs::write(&jwks_path, k8s.jwks.to_string()).unwrap();
    let auth = AuthServer::start_with(&[("SUBJECT_JWKS", jwks_path.display().to_string())]);
    let sa = "system:serviceaccount:ml:agent";
    let subject_1 = k8s.token(sa, "subject-1");
    let actor = k8s.token("system:serviceaccount:ml:chaperone", "actor-1");
    let cfg = format!(
        r#"{HEAD}  subject_token_file: {{dir}}/sa-token
credentials:
  sts:
    kind: token_exchange
    token_url: http://127.0.0.1:{port}/token
    client_id: chaperone
    client_secret_file: {{dir}}/client-secret
    actor_token_file: {{dir}}/actor-token
    requested_token_type: urn:ietf:params:oauth:token-type:access_token
routes:
  - name: tools
    match: {{ host: 127.0.0.1, port: {upstream} }}
    credential: sts
    audience: https://tools.internal
    scopes: [tools.read, "purpose:{{purpose}}"]
    purpose_default: browse
{TAIL}"#,
        port = auth.port,
        upstream = up.addr.port()
    );
    let (s1, a1) = (subject_1.clone(), actor.clone());
    let sc = Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], move |dir: &Path| {
        std::fs::write(dir.join("client-secret"), CLIENT_SECRET).unwrap();
        std::fs::write(dir.join("sa-token"), s1).unwrap();
        std::fs::write(dir.join("actor-token"), a1).unwrap();
    });
    let base = format!("http://127.0.0.1:{}", up.addr.port());
    let proxy = sc.proxy_url();

    for _ in 0..3 {
        let (code, body) = curl_purpose(&proxy, &format!("{base}/search"), "summarize");
        assert_eq!(code, 200, "{body} {}", auth.stderr());
    }
    assert_eq!(
        auth.exchanges(),
        ["subject-1"],
        "one exchange for three calls"
    );
    let token = bearer(&up.requests()[0]);
    let claims = auth.verify(&token, "https://tools.internal", None);
    assert_eq!(
        claims["sub"], sa,
        "the token speaks for the subject: {claims}"
    );
    assert_eq!(claims["act"]["sub"], "system:serviceaccount:ml:chaperone");
    assert_eq!(claims["scope"], "tools.read purpose:summarize");

    // Another purpose: a token of its own, never the first one.
    let (code, _) = curl_purpose(&proxy, &format!("{base}/search"), "translate");
    assert_eq!(code, 200);
    assert_eq!(auth.exchanges().len(), 2);
    let other = bearer(up.requests().last().unwrap());
    assert_ne!(other, token);
    assert_eq!(
        auth.verify(&other, "https://tools.internal", None)["scope"],
        "tools.read purpose:translate"
    );

    // The subject token rotates (as kubelet does for projected tokens).
    let subject_2 = k8s.token(sa, "subject-2");
    std::fs::write(sc.dir().join("sa-token"), &subject_2).unwrap();
    eventually("the rotated subject token is exchanged", || {
        curl_purpose(&proxy, &format!("{base}/search"), "summarize").0 == 200
            && auth.exchanges().last().map(String::as_str) == Some("subject-2")
    });
    let after = bearer(up.requests().last().unwrap());
    assert_ne!(
        after, token,
        "the token exchanged for the old subject is retired"
    );

    let lines = sc.log_lines(5);
    assert_eq!(lines[0]["credential"]["kind"], "token_exchange");
    assert_eq!(lines[0]["purpose"], "summarize");
    sc.assert_never_shows(&[
        &subject_1,
        &subject_2,
        &actor,
        &token,
        &other,
        CLIENT_SECRET,
    ]);
}

/// No client secret anywhere: a signed assertion (RFC 7523, RS256) and a client certificate
/// (RFC 8705) over HTTPS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_jwt_and_mtls_client_authentication() {
    let up = Upstream::start().await;
    let pki = TestPki::new();
    let files = tempfile::tempdir().unwrap();
    let path = |n: &str| files.path().join(n);
    std::fs::write(path("ca.pem"), &pki.ca_pem).unwrap();
    std::fs::write(path("server.pem"), &pki.server_cert_pem).unwrap();
    std::fs::write(path("server-key.pem"), &pki.server_key_pem).unwrap();
    // The client's assertion key: RSA, the algorithm most servers accept.
    let client_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    // Its public JWK as Chaperone computes it; the server checks signatures against it.
    let jwk = chaperone::credentials::SigningKey::from_pem(
        client_key.serialize_pem().as_bytes(),
        chaperone::credentials::Allow::AnyIncludingRsa,
    )
    .unwrap()
    .jwk()
    .clone();
    std::fs::write(path("client.jwk"), jwk.to_string()).unwrap();
    let auth = AuthServer::start_with(&[
        ("CLIENT_JWK", path("client.jwk").display().to_string()),
        ("TLS_CERT", path("server.pem").display().to_string()),
        ("TLS_KEY", path("server-key.pem").display().to_string()),
        ("TLS_CA", path("ca.pem").display().to_string()),
    ]);
    let (mtls_cert, mtls_key) = pki.client_cert("chaperone.client.test");
    let client_key_pem = client_key.serialize_pem();
    let ca_pem = pki.ca_pem.clone();
    let cfg = format!(
        r#"{HEAD}tls:
  upstream_roots: {{dir}}/ca.pem
credentials:
  tools-jwt:
    kind: client_credentials
    token_url: https://127.0.0.1:{port}/token
    client_id: chaperone-jwt
    auth_method: private_key_jwt
    client_key_file: {{dir}}/assertion-key.pem
  tools-mtls:
    kind: client_credentials
    token_url: https://127.0.0.1:{port}/token
    client_id: chaperone-mtls
    auth_method: tls_client_auth
    client_cert_file: {{dir}}/client.pem
    client_key_file: {{dir}}/client-key.pem
routes:
  - name: by-assertion
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /jwt/ }}
    credential: tools-jwt
    scopes: [tools.read]
    audience: https://tools.test
  - name: by-certificate
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /mtls/ }}
    credential: tools-mtls
    scopes: [tools.write]
    audience: https://tools.test
{TAIL}"#,
        port = auth.port,
        upstream = up.addr.port()
    );
    let sc = Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], move |dir: &Path| {
        std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
        std::fs::write(dir.join("assertion-key.pem"), client_key_pem).unwrap();
        std::fs::write(dir.join("client.pem"), mtls_cert).unwrap();
        std::fs::write(dir.join("client-key.pem"), mtls_key).unwrap();
    });
    let base = format!("http://127.0.0.1:{}", up.addr.port());
    for (path, client, scope) in [
        ("/jwt/a", "chaperone-jwt", "tools.read"),
        ("/mtls/b", "chaperone-mtls", "tools.write"),
    ] {
        let (code, body) = curl_via(&sc.proxy_url(), &format!("{base}{path}"));
        assert_eq!(code, 200, "{path}: {body} {}", auth.stderr());
        let token = bearer(up.requests().last().unwrap());
        let claims = auth.verify(
            &token,
            "https://tools.test",
            Some(&path_of(&files, "ca.pem")),
        );
        assert_eq!(claims["client_id"], client);
        assert_eq!(claims["scope"], scope);
    }
    assert_eq!(auth.token_requests(), 2);
}

/// `client_assertion`: an assertion somebody else issued (Azure workload identity's
/// federated token, a CI OIDC token) sent from a file that is re-read on every fetch. The
/// server refuses an assertion it has seen (oidc-provider's replay detection), so the second
/// fetch fails closed until the file is rotated, and succeeds right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_assertion_from_a_file_is_reread_on_every_fetch() {
    let up = Upstream::start().await;
    let files = tempfile::tempdir().unwrap();
    let client_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let jwk = chaperone::credentials::SigningKey::from_pem(
        client_key.serialize_pem().as_bytes(),
        chaperone::credentials::Allow::AnyIncludingRsa,
    )
    .unwrap()
    .jwk()
    .clone();
    let jwk_path = files.path().join("client.jwk");
    std::fs::write(&jwk_path, jwk.to_string()).unwrap();
    let auth = AuthServer::start_with(&[("CLIENT_JWK", jwk_path.display().to_string())]);
    let token_url = format!("http://127.0.0.1:{}/token", auth.port);
    // What the issuer (a federation webhook, a CI system) writes: RFC 7523 §3 claims.
    let key = EncodingKey::from_rsa_pem(client_key.serialize_pem().as_bytes()).unwrap();
    let assertion = |jti: &str| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = jwk["kid"].as_str().map(str::to_owned);
        jsonwebtoken::encode(
            &header,
            &json!({"iss": "chaperone-jwt", "sub": "chaperone-jwt", "aud": token_url,
                    "iat": now, "exp": now + 600, "jti": jti}),
            &key,
        )
        .unwrap()
    };
    let (first, second) = (assertion("federated-1"), assertion("federated-2"));
    let cfg = format!(
        r#"{HEAD}credentials:
  federated:
    kind: client_credentials
    token_url: {token_url}
    client_id: chaperone-jwt
    auth_method: client_assertion
    client_assertion_file: {{dir}}/federated-token
routes:
  - name: read
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /read/ }}
    credential: federated
    scopes: [tools.read]
    audience: https://tools.test
  - name: write
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /write/ }}
    credential: federated
    scopes: [tools.write]
    audience: https://tools.test
{TAIL}"#,
        upstream = up.addr.port()
    );
    let first_file = first.clone();
    let sc = Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], move |dir: &Path| {
        std::fs::write(dir.join("federated-token"), first_file).unwrap();
    });
    let base = format!("http://127.0.0.1:{}", up.addr.port());

    let (code, body) = curl_via(&sc.proxy_url(), &format!("{base}/read/a"));
    assert_eq!(code, 200, "{body} {}", auth.stderr());
    let claims = auth.verify(
        &bearer(up.requests().last().unwrap()),
        "https://tools.test",
        None,
    );
    assert_eq!(claims["client_id"], "chaperone-jwt");
    assert_eq!(claims["scope"], "tools.read");

    // A second fetch (other scopes) with the same assertion: refused as a replay, fail closed.
    let (code, body) = curl_via(&sc.proxy_url(), &format!("{base}/write/a"));
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        up.requests().len(),
        1,
        "nothing reaches the upstream without a credential"
    );

    // The issuer rotates the file: the next fetch reads the new assertion.
    std::fs::write(sc.dir().join("federated-token"), &second).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await; // past the first backoff
    let (code, body) = curl_via(&sc.proxy_url(), &format!("{base}/write/b"));
    assert_eq!(code, 200, "{body} {}", auth.stderr());
    let claims = auth.verify(
        &bearer(up.requests().last().unwrap()),
        "https://tools.test",
        None,
    );
    assert_eq!(claims["scope"], "tools.write");
    assert_eq!(auth.token_requests(), 3);
    sc.assert_never_shows(&[&first, &second]);
}

/// GCP workload identity federation's shape: a public client exchanges the pod's projected
/// token (RFC 8693, the workload identity provider as the credential's `audience`) and trades
/// the federated token for a service account's access token with IAM Credentials
/// `generateAccessToken`, served on loopback by a stand-in that verifies the bearer against the
/// authorization server's JWKS, issuer and audience as Google does. The service account's
/// token is what the upstream gets, cached like any token; a service account the federated
/// identity may not impersonate fails closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_shaped_exchange_then_service_account_impersonation() {
    let up = Upstream::start().await;
    let k8s = SubjectIssuer::new();
    let files = tempfile::tempdir().unwrap();
    let jwks_path = files.path().join("subject-jwks.json");
    std::fs::write(&jwks_path, k8s.jwks.to_string()).unwrap();
    let auth = AuthServer::start_with(&[("SUBJECT_JWKS", jwks_path.display().to_string())]);
    let wif = "//iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/pool/providers/k8s";
    let sa = "vertex-caller@proj.iam.gserviceaccount.com";
    let mut cmd = Command::new("node");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/gcp_iamcredentials.mjs"))
        .args([&format!("{}/jwks", auth.issuer()), &auth.issuer(), wif, sa]);
    let iam = ServerProcess::start(cmd, "IAM Credentials stand-in");
    let subject = k8s.token("system:serviceaccount:ml:vertex", "projected-1");
    let cfg = format!(
        r#"{HEAD}credentials:
  gcp:
    kind: token_exchange
    token_url: http://127.0.0.1:{port}/token
    client_id: chaperone-public
    auth_method: none
    subject_token_file: {{dir}}/sa-token
    requested_token_type: urn:ietf:params:oauth:token-type:access_token
    audience: '{wif}'
    impersonate: {{ service_account: {sa}, endpoint: 'http://127.0.0.1:{iam}', lifetime: 10m }}
  gcp-other:
    kind: token_exchange
    token_url: http://127.0.0.1:{port}/token
    client_id: chaperone-public
    subject_token_file: {{dir}}/sa-token
    audience: '{wif}'
    impersonate: {{ service_account: admin@proj.iam.gserviceaccount.com, endpoint: 'http://127.0.0.1:{iam}' }}
routes:
  - name: vertex
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /v1/ }}
    credential: gcp
    scopes: [tools.read]
  - name: admin
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /admin/ }}
    credential: gcp-other
    scopes: [tools.read]
{TAIL}"#,
        port = auth.port,
        iam = iam.port.unwrap(),
        upstream = up.addr.port()
    );
    let s = subject.clone();
    let sc = Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], move |dir: &Path| {
        std::fs::write(dir.join("sa-token"), s).unwrap();
    });
    let base = format!("http://127.0.0.1:{}", up.addr.port());
    let model =
        "/v1/projects/p/locations/us-central1/publishers/google/models/gemini:generateContent";
    for _ in 0..2 {
        let (code, body) = curl_via(&sc.proxy_url(), &format!("{base}{model}"));
        assert_eq!(code, 200, "{body} {} {}", auth.stderr(), iam.stderr());
    }
    let issued = iam.lines_after("issued ");
    assert_eq!(
        issued.len(),
        1,
        "the service account's token is cached: {issued:?}"
    );
    let fields: Vec<&str> = issued[0].split(' ').collect();
    assert_eq!(
        fields[1..],
        ["tools.read", "600"],
        "scopes and lifetime asked for"
    );
    let sa_token = fields[0];
    for r in up.requests() {
        assert_eq!(
            bearer(&r),
            sa_token,
            "the upstream gets the service account's token"
        );
    }
    assert_eq!(auth.exchanges(), ["projected-1"]);

    let (code, body) = curl_via(&sc.proxy_url(), &format!("{base}/admin/x"));
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("PERMISSION_DENIED"), "{body}");
    assert_eq!(up.requests().len(), 2);

    let lines = sc.lines_where(2, |l| l["route"] == "vertex");
    for l in &lines {
        assert_eq!(l["credential"]["kind"], "token_exchange", "{l}");
        assert!(l["credential"]["expires_at"].as_u64().unwrap() > 0, "{l}");
    }
    sc.assert_never_shows(&[&subject, sa_token]);
}

fn path_of(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
    dir.path().join(name)
}

/// Refresh ahead: a token past three quarters of its cache window is refreshed in the
/// background while the current one is served. Scope and lifetime checks flag a token
/// broader than asked or longer-lived than the route's max_ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_and_broad_or_long_tokens_are_flagged() {
    let up = Upstream::start().await;
    let k8s = SubjectIssuer::new();
    let files = tempfile::tempdir().unwrap();
    let jwks_path = files.path().join("subject-jwks.json");
    std::fs::write(&jwks_path, k8s.jwks.to_string()).unwrap();
    // 14 s tokens: handed out for 4 s (skew 10 s), refreshed from 3 s on.
    let auth = AuthServer::start_with(&[
        ("TOKEN_TTL", "14".into()),
        ("SUBJECT_JWKS", jwks_path.display().to_string()),
        ("EXCHANGE_GRANTS_ALL", "1".into()),
    ]);
    let subject = k8s.token("system:serviceaccount:ml:agent", "s-1");
    let cfg = format!(
        r#"{HEAD}credentials:
  cc:
    kind: client_credentials
    token_url: http://127.0.0.1:{port}/token
    client_id: chaperone
    client_secret_file: {{dir}}/client-secret
  sts:
    kind: token_exchange
    token_url: http://127.0.0.1:{port}/token
    client_id: chaperone
    client_secret_file: {{dir}}/client-secret
    subject_token_file: {{dir}}/sa-token
routes:
  - name: short
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /cc/ }}
    credential: cc
    audience: https://tools.test
    scopes: [tools.read]
    max_ttl: 10s
  - name: greedy
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /te/ }}
    credential: sts
    audience: https://tools.test
    scopes: [tools.read]
{TAIL}"#,
        port = auth.port,
        upstream = up.addr.port()
    );
    let sc = Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], move |dir: &Path| {
        std::fs::write(dir.join("client-secret"), CLIENT_SECRET).unwrap();
        std::fs::write(dir.join("sa-token"), subject).unwrap();
    });
    let base = format!("http://127.0.0.1:{}", up.addr.port());
    let proxy = sc.proxy_url();

    let t0 = Instant::now();
    assert_eq!(curl_via(&proxy, &format!("{base}/cc/1")).0, 200);
    let first = bearer(&up.requests()[0]);
    assert_eq!(auth.token_requests(), 1);
    std::thread::sleep(Duration::from_millis(3300).saturating_sub(t0.elapsed()));
    // Past the refresh point, before the end of the window: served from the cache…
    assert_eq!(curl_via(&proxy, &format!("{base}/cc/2")).0, 200);
    assert_eq!(bearer(&up.requests()[1]), first);
    // …while one refresh runs in the background.
    eventually("the background refresh", || auth.token_requests() == 2);
    // Once its answer is stored (a moment after the server counted the request), the
    // refreshed token is what requests get.
    let mut n = 2;
    eventually("the refreshed token is served", || {
        assert_eq!(curl_via(&proxy, &format!("{base}/cc/{}", n + 1)).0, 200);
        n += 1;
        bearer(&up.requests()[n - 1]) != first
    });
    assert_eq!(
        auth.token_requests(),
        2,
        "one background refresh, nothing fetched inline"
    );
    assert_eq!(
        metric(
            sc.admin,
            r#"chaperone_token_cache_total{credential="cc",result="miss"}"#
        ),
        1.0,
        "no request waited for the refresh"
    );

    // The exchange grants more than asked for.
    assert_eq!(curl_via(&proxy, &format!("{base}/te/1")).0, 200);
    let lines = sc.log_lines(n + 1);
    let short = lines.iter().find(|l| l["route"] == "short").unwrap();
    assert_eq!(short["credential"]["flags"], json!(["ttl_exceeds_max"]));
    let greedy = lines.iter().find(|l| l["route"] == "greedy").unwrap();
    assert_eq!(greedy["credential"]["flags"], json!(["unrequested_scope"]));
    assert_eq!(
        greedy["credential"]["scopes"],
        json!(["tools.read", "tools.write"])
    );
    assert_eq!(
        metric(
            sc.admin,
            r#"chaperone_credential_flags_total{credential="cc",flag="ttl_exceeds_max"}"#
        ),
        n as f64
    );
    assert_eq!(
        metric(
            sc.admin,
            r#"chaperone_credential_flags_total{credential="sts",flag="unrequested_scope"}"#
        ),
        1.0
    );
}

/// On behalf of a user (RFC 8693 delegation): the user's token comes in a request header, is
/// verified against the issuer's JWKS before it goes anywhere, removed before forwarding, and
/// exchanged with the workload's own token as the actor. The upstream gets a token that says
/// both (`sub` the user, `act.sub` the workload); tokens are cached per user token and
/// purpose, never handed to another user; policy sees `context.on_behalf_of`; the line says who.
/// A request without a user token, or with a forged one, is 401 and nothing is exchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_behalf_of_a_user_the_exchange_carries_both_user_and_workload() {
    let up = Upstream::start().await;
    let idp = SubjectIssuer::new();
    let files = tempfile::tempdir().unwrap();
    let jwks_path = files.path().join("subject-jwks.json");
    std::fs::write(&jwks_path, idp.jwks.to_string()).unwrap();
    let auth = AuthServer::start_with(&[("SUBJECT_JWKS", jwks_path.display().to_string())]);
    let workload = idp.token("system:serviceaccount:ml:chaperone", "workload-1");
    let (alice, alice_2, bob) = (
        idp.token("alice", "alice-1"),
        idp.token("alice", "alice-2"),
        idp.token("bob", "bob-1"),
    );
    let forged = SubjectIssuer::new().token("alice", "forged-1");
    let cfg = format!(
        r#"{HEAD}  subject_token_file: {{dir}}/workload-token
credentials:
  for-user:
    kind: token_exchange
    token_url: http://127.0.0.1:{port}/token
    client_id: chaperone
    client_secret_file: {{dir}}/client-secret
    subject_from: {{ header: x-user-token }}
    subject_jwks_url: http://127.0.0.1:{port}/subject-jwks
    subject_issuer: https://kubernetes.default.svc
    subject_audience: sts.test
    requested_token_type: urn:ietf:params:oauth:token-type:access_token
routes:
  - name: tickets
    match: {{ host: 127.0.0.1, port: {upstream} }}
    credential: for-user
    audience: https://tools.test
    scopes: [tools.read]
{TAIL}"#,
        port = auth.port,
        upstream = up.addr.port()
    );
    // Bob may read, but not delete; nobody may act for an unverified user.
    let policy = r#"permit(principal, action, resource) when { context has on_behalf_of && context.on_behalf_of.verified };
@id("bob-may-not-delete")
forbid(principal, action, resource) when { context has on_behalf_of && context.on_behalf_of.subject == "bob" && context.purpose == "delete" };
"#;
    let w = workload.clone();
    let sc = Sidecar::start_with(&cfg, policy, &[], move |dir: &Path| {
        std::fs::write(dir.join("client-secret"), CLIENT_SECRET).unwrap();
        std::fs::write(dir.join("workload-token"), w).unwrap();
    });
    let base = format!("http://127.0.0.1:{}", up.addr.port());
    let proxy = sc.proxy_url();
    let call = |user: Option<&str>, purpose: &str| -> (u16, String) {
        let mut args = vec![
            "-x".to_string(),
            proxy.clone(),
            "-H".into(),
            format!("chaperone-purpose: {purpose}"),
        ];
        if let Some(u) = user {
            args.extend(["-H".into(), format!("x-user-token: Bearer {u}")]);
        }
        args.push(format!("{base}/tickets"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&args)
    };
    let verify = |token: &str| auth.verify(token, "https://tools.test", None);

    let (code, body) = call(Some(&alice), "read");
    assert_eq!(code, 200, "{body} {}", auth.stderr());
    let alice_token = bearer(up.requests().last().unwrap());
    let claims = verify(&alice_token);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["act"]["sub"], "system:serviceaccount:ml:chaperone");
    assert!(
        up.requests()
            .last()
            .unwrap()
            .header("x-user-token")
            .is_none(),
        "the user's token is removed before forwarding"
    );
    // The same user token again: served from the cache.
    assert_eq!(call(Some(&alice), "read").0, 200);
    assert_eq!(bearer(up.requests().last().unwrap()), alice_token);
    assert_eq!(auth.exchanges(), ["alice-1"]);
    // Another token, even of the same user, and another user: exchanged for themselves.
    assert_eq!(call(Some(&alice_2), "read").0, 200);
    assert_eq!(call(Some(&bob), "read").0, 200);
    let bob_token = bearer(up.requests().last().unwrap());
    assert_ne!(bob_token, alice_token);
    assert_eq!(verify(&bob_token)["sub"], "bob");
    assert_eq!(auth.exchanges(), ["alice-1", "alice-2", "bob-1"]);

    // Policy sees the user.
    let (code, body) = call(Some(&bob), "delete");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("bob-may-not-delete"), "{body}");
    // No user, or a forged one: 401, and nothing exchanged.
    let (code, body) = call(None, "read");
    assert_eq!(code, 401, "{body}");
    assert!(
        body.contains("user_token_required") && body.contains("x-user-token"),
        "{body}"
    );
    let (code, body) = call(Some(&forged), "read");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("user_token_invalid"), "{body}");
    assert_eq!(auth.exchanges().len(), 3);
    assert_eq!(up.requests().len(), 4);

    let lines = sc.lines_where(7, |l| l["kind"] == "http");
    assert_eq!(lines.len(), 7, "{lines:#?}");
    assert_eq!(lines[0]["on_behalf_of"]["sub"], "alice", "{}", lines[0]);
    assert_eq!(
        lines[0]["on_behalf_of"]["iss"],
        "https://kubernetes.default.svc"
    );
    assert_eq!(lines[0]["on_behalf_of"]["verified"], true);
    assert_eq!(lines[4]["on_behalf_of"]["sub"], "bob");
    assert_eq!(lines[4]["decision"], "deny");
    assert_eq!(lines[5]["status"], 401);
    assert_eq!(lines[5]["on_behalf_of"], serde_json::Value::Null);
    assert_eq!(lines[6]["status"], 401);
    // `chaperone audit` over these lines says who acted for whom, for what.
    let (_dir, log) = temp_file(
        "purpose.jsonl",
        &lines
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let (ok, out, err) = run(Command::new(bin()).args(["audit", "--json", log.to_str().unwrap()]));
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let who: Vec<(String, u64, u64)> = report["delegations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                format!(
                    "{} {}",
                    d["user"].as_str().unwrap(),
                    d["purpose"].as_str().unwrap()
                ),
                d["allowed"].as_u64().unwrap(),
                d["denied"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        who,
        [
            ("alice read".to_string(), 3, 0),
            ("bob delete".to_string(), 0, 1),
            ("bob read".to_string(), 1, 0),
        ],
        "{out}"
    );
    // `chaperone review` says which routes acted for users, and whether every token was
    // verified.
    let (ok, out, err) = run(Command::new(bin()).args([
        "review",
        "--json",
        "--config",
        sc.dir().join("config.yaml").to_str().unwrap(),
        log.to_str().unwrap(),
    ]));
    assert!(ok, "{err}");
    let review: serde_json::Value = serde_json::from_str(&out).unwrap();
    let d = &review["delegation"][0];
    assert_eq!(d["route"], "tickets", "{out}");
    assert_eq!(d["users"], 2, "alice and bob: {out}");
    assert_eq!(d["unverified"], 0, "{out}");
    assert_eq!(d["requests"], 4, "the allowed ones: {out}");
    sc.assert_never_shows(&[
        &alice,
        &alice_2,
        &bob,
        &forged,
        &workload,
        &alice_token,
        &bob_token,
        CLIENT_SECRET,
    ]);
}

/// DPoP (RFC 9449) against oidc-provider demanding nonces at its token endpoint and a `jose`
/// resource server demanding them too: the token comes bound to the sidecar's key
/// (`token_type: DPoP`, `cnf.jkt`), every request carries `Authorization: DPoP` and a fresh
/// proof bound to its method, URL and token; each server's first `use_dpop_nonce` is answered
/// by one retry with the nonce, after which the nonce is sent from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_bound_tokens_with_a_proof_per_request_and_nonces_honoured() {
    let auth = AuthServer::start_with(&[("DPOP_NONCE", "1".into())]);
    let mut cmd = Command::new("node");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/dpop_resource.mjs"))
        .args([&auth.issuer(), "https://tools.test", "nonce"]);
    let rs = ServerProcess::start(cmd, "the DPoP resource server");
    let port = rs.port.unwrap();
    let cfg = format!(
        r#"{HEAD}credentials:
  bound:
    kind: client_credentials
    token_url: http://127.0.0.1:{auth_port}/token
    client_id: chaperone
    client_secret_file: {{dir}}/client-secret
    dpop: true
routes:
  - name: tools
    match: {{ host: 127.0.0.1, port: {port} }}
    credential: bound
    audience: https://tools.test
    scopes: [tools.read]
{TAIL}"#,
        auth_port = auth.port,
    );
    let sc = Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], |dir: &Path| {
        std::fs::write(dir.join("client-secret"), CLIENT_SECRET).unwrap();
    });
    let url = format!("http://127.0.0.1:{port}/tickets/1?expand=all");
    let (code, body) = curl_via(&sc.proxy_url(), &url);
    assert_eq!(code, 200, "{body} {} {}", auth.stderr(), rs.stderr());
    let first: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(first["client_id"], "chaperone");
    assert_eq!(
        auth.token_requests(),
        2,
        "the token endpoint asked for a nonce once"
    );
    assert_eq!(
        rs.lines_after("refused "),
        ["no nonce"],
        "the resource server too"
    );
    // Again, and with a body: the nonce goes from the start, the token is the cached one,
    // every proof is new.
    let (code, body) = curl(&["-x", &sc.proxy_url(), "--json", r#"{"note":"x"}"#, &url]);
    assert_eq!(code, 200, "{body} {}", rs.stderr());
    let (code, _) = curl_via(&sc.proxy_url(), &url);
    assert_eq!(code, 200);
    assert_eq!(auth.token_requests(), 2);
    let accepted = rs.wait_lines_after("accepted ", 3);
    assert_eq!(accepted.len(), 3, "{accepted:?}");
    let jkts: std::collections::BTreeSet<&str> = accepted
        .iter()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(jkts.len(), 1, "one key: {accepted:?}");
    assert_eq!(rs.lines_after("refused ").len(), 1);
    sc.assert_never_shows(&[CLIENT_SECRET]);
}

/// A DPoP credential whose server issues plain bearer tokens fails closed rather than send a
/// bearer token as if it were bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dpop_credential_refuses_an_unbound_token() {
    let up = Upstream::start().await;
    // A token endpoint that ignores DPoP: answers bearer tokens.
    let (_dir, tokens) = temp_file(
        "serve.py",
        r#"import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"access_token": "plain-bearer-token-123", "token_type": "Bearer", "expires_in": 300}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
s = HTTPServer(("127.0.0.1", 0), H)
print("ready", s.server_port, flush=True)
s.serve_forever()
"#,
    );
    let mut cmd = Command::new("python3");
    cmd.arg(&tokens);
    let ts = ServerProcess::start(cmd, "a bearer-only token endpoint");
    let cfg = format!(
        r#"{HEAD}credentials:
  bound:
    kind: client_credentials
    token_url: http://127.0.0.1:{tp}/token
    client_id: chaperone
    client_secret_file: {{dir}}/client-secret
    dpop: true
routes:
  - name: tools
    match: {{ host: 127.0.0.1, port: {upstream} }}
    credential: bound
{TAIL}"#,
        tp = ts.port.unwrap(),
        upstream = up.addr.port()
    );
    let sc = Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], |dir: &Path| {
        std::fs::write(dir.join("client-secret"), CLIENT_SECRET).unwrap();
    });
    let (code, body) = curl_via(
        &sc.proxy_url(),
        &format!("http://127.0.0.1:{}/x", up.addr.port()),
    );
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("token_type Bearer"), "{body}");
    assert!(up.requests().is_empty());
    sc.assert_never_shows(&["plain-bearer-token-123", CLIENT_SECRET]);
}

/// `per_call: true` fetches a token for each request and caches none; with
/// `revoke_on_completion` each is revoked (RFC 7009) once its response has ended, off the
/// response path: oidc-provider's introspection then says it is no longer active, while a
/// per-call token without revocation stays active until it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_tokens_are_revoked_once_their_response_has_ended() {
    let up = Upstream::start().await;
    let auth = AuthServer::start_with(&[("OPAQUE_TOKENS", "1".into())]);
    let port = auth.port;
    let cfg = format!(
        r#"{HEAD}credentials:
  one-shot:
    kind: client_credentials
    token_url: http://127.0.0.1:{port}/token
    client_id: chaperone
    client_secret_file: {{dir}}/client-secret
    per_call: true
    revoke_on_completion: true
    revocation_url: http://127.0.0.1:{port}/token/revocation
  kept:
    kind: client_credentials
    token_url: http://127.0.0.1:{port}/token
    client_id: chaperone
    client_secret_file: {{dir}}/client-secret
    per_call: true
routes:
  - name: revoked
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /revoked/ }}
    credential: one-shot
    scopes: [tools.read]
  - name: kept
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /kept/ }}
    credential: kept
    scopes: [tools.read]
{TAIL}"#,
        upstream = up.addr.port()
    );
    let sc = Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], |dir: &Path| {
        std::fs::write(dir.join("client-secret"), CLIENT_SECRET).unwrap();
    });
    let base = format!("http://127.0.0.1:{}", up.addr.port());
    let active = |token: &str| -> bool {
        let (code, body) = curl(&[
            "-u",
            &format!("chaperone:{CLIENT_SECRET}"),
            "-d",
            &format!("token={token}"),
            &format!("http://127.0.0.1:{port}/token/introspection"),
        ]);
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["active"] == true
    };
    let mut tokens = Vec::new();
    for path in ["/revoked/a", "/revoked/b"] {
        let (code, body) = curl_via(&sc.proxy_url(), &format!("{base}{path}"));
        assert_eq!(code, 200, "{body} {}", auth.stderr());
        tokens.push(bearer(up.requests().last().unwrap()));
    }
    assert_ne!(tokens[0], tokens[1], "a token per request");
    assert_eq!(auth.token_requests(), 2, "nothing cached");
    for t in &tokens {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while active(t) {
            assert!(
                std::time::Instant::now() < deadline,
                "still active after its response"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    let (code, _) = curl_via(&sc.proxy_url(), &format!("{base}/kept/a"));
    assert_eq!(code, 200);
    let kept = bearer(up.requests().last().unwrap());
    assert!(
        active(&kept),
        "without revoke_on_completion a token lives on"
    );
    let (_, metrics) = admin_get(sc.admin, "/metrics");
    assert!(
        metrics
            .contains(r#"chaperone_token_revocations_total{credential="one-shot",result="ok"} 2"#),
        "{metrics}"
    );
    sc.assert_never_shows(&[&tokens[0], &tokens[1], &kept, CLIENT_SECRET]);
}

/// RFC 7523 §2.1 as a grant: an assertion traded for an access token. From a file (a
/// federated JWT), and chained (the MCP enterprise-managed authorization shape: an ID-JAG
/// obtained by token exchange, then traded at the resource's authorization server): the
/// exchange's token becomes the jwt-bearer grant's assertion, and the upstream's token
/// names the original subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_bearer_grant_from_a_file_and_chained_after_an_exchange() {
    let up = Upstream::start().await;
    let k8s = SubjectIssuer::new();
    let files = tempfile::tempdir().unwrap();
    let jwks_path = files.path().join("subject-jwks.json");
    std::fs::write(&jwks_path, k8s.jwks.to_string()).unwrap();
    let auth = AuthServer::start_with(&[("SUBJECT_JWKS", jwks_path.display().to_string())]);
    let federated = k8s.token("system:serviceaccount:ml:agent", "fed-1");
    let cfg = format!(
        r#"{HEAD}credentials:
  from-file:
    kind: jwt_bearer
    token_url: http://127.0.0.1:{port}/token
    client_id: chaperone
    client_secret_file: {{dir}}/client-secret
    assertion_file: {{dir}}/federated
  id-jag:
    kind: token_exchange
    token_url: http://127.0.0.1:{port}/token
    client_id: chaperone
    client_secret_file: {{dir}}/client-secret
    subject_token_file: {{dir}}/federated
  chained:
    kind: jwt_bearer
    token_url: http://127.0.0.1:{port}/token
    client_id: chaperone
    client_secret_file: {{dir}}/client-secret
    assertion_from: id-jag
routes:
  - name: file
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /file/ }}
    credential: from-file
    audience: https://tools.test
    scopes: [tools.read]
  - name: chained
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /chained/ }}
    credential: chained
    audience: https://tools.test
    scopes: [tools.read]
{TAIL}"#,
        port = auth.port,
        upstream = up.addr.port()
    );
    let f = federated.clone();
    let sc = Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], move |dir: &Path| {
        std::fs::write(dir.join("client-secret"), CLIENT_SECRET).unwrap();
        std::fs::write(dir.join("federated"), f).unwrap();
    });
    let base = format!("http://127.0.0.1:{}", up.addr.port());
    for path in ["/file/a", "/chained/a", "/chained/b"] {
        let (code, body) = curl_via(&sc.proxy_url(), &format!("{base}{path}"));
        assert_eq!(code, 200, "{path}: {body} {}", auth.stderr());
        let claims = auth.verify(
            &bearer(up.requests().last().unwrap()),
            "https://tools.test",
            None,
        );
        assert_eq!(
            claims["sub"], "system:serviceaccount:ml:agent",
            "{path}: {claims}"
        );
    }
    assert_eq!(
        auth.process.lines_after("jwt-bearer "),
        [
            "external system:serviceaccount:ml:agent",
            "chained system:serviceaccount:ml:agent"
        ],
        "the chained token was cached for the second request"
    );
    assert_eq!(auth.exchanges(), ["fed-1"]);
    let lines = sc.lines_where(3, |l| l["kind"] == "http");
    assert_eq!(lines[1]["credential"]["kind"], "jwt_bearer", "{}", lines[1]);
    sc.assert_never_shows(&[&federated, CLIENT_SECRET]);
}

/// A token endpoint whose error description echoes what it was sent: the client secret
/// (form or Basic) never reaches the 503, the line or the log; the error code does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoing_token_endpoint_cannot_leak_the_client_secret() {
    fn echo(mut s: std::net::TcpStream, request: String) {
        use std::io::Write;
        let said: String = request
            .lines()
            .filter(|l| l.starts_with("authorization:") || l.contains("client_secret="))
            .collect::<Vec<_>>()
            .join(" ")
            .replace(['"', '\\'], "");
        let body = format!(
            r#"{{"error":"invalid_client","error_description":"you sent {said} and also\nline two"}}"#
        );
        let _ = write!(
            s,
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    let auth_port = raw_upstream(echo);
    let up = Upstream::start().await;
    let sc = start_secret_sidecar(up.addr.port(), auth_port);
    for path in ["read", "write"] {
        let (code, body) = curl(&[
            "-x",
            &sc.proxy_url(),
            &format!("http://127.0.0.1:{}/{path}/x", up.addr.port()),
        ]);
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("invalid_client"), "{body}");
        assert!(body.contains("description withheld"), "{path}: {body}");
        assert!(!body.contains(CLIENT_SECRET), "{body}");
    }
    sc.lines_where(2, |l| l["status"] == 503);
    sc.assert_never_shows(&[CLIENT_SECRET]);
    assert!(up.requests().is_empty());
}

/// A secret file that would block its reader (a FIFO: nothing ever writes to it) is a
/// config error at start, and, swapped in later, fails its own route closed at once with the
/// reason, while other routes are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_file_that_blocks_fails_its_route_closed_and_stalls_no_other() {
    let auth = AuthServer::start();
    let up = Upstream::start().await;
    let port = up.addr.port();
    // At start: refused with the file and the reason, not hung.
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(Command::new("mkfifo").arg(dir.path().join("client-secret")));
    assert!(ok, "{err}");
    std::fs::write(dir.path().join("policy.cedar"), PERMISSIVE_POLICY).unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        secret_config(port, auth.port).replace("{dir}", dir.path().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("timeout")
        .args(["20", bin(), "check", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("not a regular file"),
        "{text}"
    );

    // Swapped in while running: that route fails closed at once; the other is served.
    let sc = start_secret_sidecar(port, auth.port);
    let secret = sc.dir().join("client-secret");
    std::fs::remove_file(&secret).unwrap();
    let (ok, _, err) = run(Command::new("mkfifo").arg(&secret));
    assert!(ok, "{err}");
    let started = Instant::now();
    let (code, body) = curl(&[
        "-x",
        &sc.proxy_url(),
        "--max-time",
        "20",
        &format!("http://127.0.0.1:{port}/read/x"),
    ]);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not a regular file"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once, not after a hang: {:?}",
        started.elapsed()
    );
    assert!(sc.output().lines().all(|l| !l.contains("panicked")));
}
