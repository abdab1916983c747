//! Client credentials against a second, independent authorization server: Debian's
//! `glewlwyd` (C, OpenID Connect plugin), set up through its admin API by
//! tests/support/glewlwyd.py on loopback. Same contract as with oidc-provider: tokens verify
//! against the server's JWKS, many calls and concurrent misses cost one fetch each, both
//! secret methods work, nothing secret reaches the sidecar's output.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const CLIENT_SECRET: &str = "glewlwyd-client-secret-93be1f0c";

/// glewlwyd on a free port of the helper's choosing (`ServerProcess::port`).
fn start_glewlwyd(work: &Path) -> ServerProcess {
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/glewlwyd.py"))
        .args(["0", CLIENT_SECRET, work.to_str().unwrap()])
        .env("GLEWLWYD_LOG", "INFO");
    ServerProcess::start(cmd, "glewlwyd (apt-get install glewlwyd)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glewlwyd_client_credentials_basic_and_post() {
    let up = Upstream::start().await;
    let work = tempfile::tempdir().unwrap();
    let gw = start_glewlwyd(work.path());
    let port = gw.port.expect("the helper says its port");
    let issuer = format!("http://127.0.0.1:{port}");
    let cfg = format!(
        r#"listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity:
  id: spiffe://test.local/ns/ml/sa/agent
  workload: tool-agent
  environment: test
credentials:
  gw-basic:
    kind: client_credentials
    token_url: {issuer}/api/oidc/token
    client_id: chaperone
    client_secret_file: {{dir}}/client-secret
  gw-post:
    kind: client_credentials
    token_url: {issuer}/api/oidc/token
    client_id: chaperone
    client_secret_file: {{dir}}/client-secret
    auth_method: client_secret_post
routes:
  - name: read
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /read/ }}
    credential: gw-basic
    scopes: [tools.read]
  - name: write
    match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /write/ }}
    credential: gw-post
    scopes: [tools.write]
policy:
  file: {{dir}}/policy.cedar
log:
  output: stdout
"#,
        upstream = up.addr.port()
    );
    let sc = Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], |dir: &Path| {
        std::fs::write(dir.join("client-secret"), CLIENT_SECRET).unwrap();
    });
    let base = format!("http://127.0.0.1:{}", up.addr.port());
    let issued = || gw.count("Access token generated for client 'chaperone'");

    for i in 0..5 {
        let (code, body) = curl(&["-x", &sc.proxy_url(), &format!("{base}/read/{i}")]);
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(issued(), 1, "five calls, one token");
    let read = bearer(&up.requests()[0]);
    assert!(up.requests().iter().all(|r| bearer(r) == read));
    // glewlwyd puts the granted scopes in `aud` when no resource is asked for.
    let claims = verify_with_jwks(
        &read,
        &format!("{issuer}/api/oidc/jwks"),
        None,
        &issuer,
        "tools.read",
    );
    assert_eq!(claims["scope"], "tools.read");
    assert_eq!(claims["client_id"], "chaperone");

    let proxy = sc.proxy_url();
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let (p, u) = (proxy.clone(), format!("{base}/write/{i}"));
            std::thread::spawn(move || curl(&["-x", &p, &u]).0)
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 200);
    }
    assert_eq!(issued(), 2, "concurrent misses share one fetch");
    let write = bearer(up.requests().last().unwrap());
    let claims = verify_with_jwks(
        &write,
        &format!("{issuer}/api/oidc/jwks"),
        None,
        &issuer,
        "tools.write",
    );
    assert_eq!(claims["scope"], "tools.write");

    let lines = sc.log_lines(11);
    assert!(
        lines
            .iter()
            .all(|l| l["credential"]["kind"] == "client_credentials")
    );
    sc.assert_never_shows(&[&read, &write, CLIENT_SECRET]);
}
