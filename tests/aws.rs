//! `kind: aws` against a real AWS emulator: PyPI moto in server mode with request
//! authentication on (tests/support/moto_aws.py), driven by boto3, the AWS SDK for Python,
//! through HTTP_PROXY. The app signs with a hard-coded key moto does not know; the call
//! succeeds only because Chaperone obtained session credentials for the role with
//! AssumeRoleWithWebIdentity and re-signed the request with SigV4.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

fn support() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support")
}

const APP_KEY_ID: &str = "AKIA2OGYBAH6VQRPXU4N";
const APP_SECRET: &str = "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";
const WEB_IDENTITY_TOKEN: &str =
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bWw6aW5mZXJlbmNlIn0.c2lnbmF0dXJl";

/// boto3 calls `sts get-caller-identity` at `endpoint`, signed with the app's own key,
/// through `proxy` (or straight there when `proxy` is empty), trusting `ca` for HTTPS; prints
/// the ARN or the error code.
fn caller_identity(endpoint: &str, proxy: &str, ca: &str) -> String {
    let script = r#"
import sys, boto3, botocore
endpoint, proxy, ca = sys.argv[1:4]
scheme = endpoint.split(":")[0]
config = botocore.config.Config(proxies={scheme: proxy} if proxy else {}, retries={"max_attempts": 1})
sts = boto3.client("sts", endpoint_url=endpoint, region_name="us-east-1", verify=ca or None,
    aws_access_key_id=sys.argv[4], aws_secret_access_key=sys.argv[5], config=config)
try:
    print(sts.get_caller_identity()["Arn"])
except botocore.exceptions.ClientError as e:
    print("error", e.response["Error"]["Code"])
"#;
    let (ok, out, err) = run(Command::new(python())
        .args(["-c", script, endpoint, proxy, ca, APP_KEY_ID, APP_SECRET])
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY"));
    assert!(ok, "{out}{err}");
    out.trim().to_string()
}

/// moto, over HTTPS with the test PKI's certificate when `pki` is given.
fn moto(pki: Option<&TestPki>) -> (ServerProcess, Option<tempfile::TempDir>) {
    let mut cmd = Command::new(python());
    cmd.arg(support().join("moto_aws.py"));
    let certs = pki.map(|pki| {
        let (dir, cert, key) = pki.server_files();
        cmd.arg(cert).arg(key);
        dir
    });
    (ServerProcess::start(cmd, "moto (AWS emulator)"), certs)
}

/// The `aws` credential for the role `inference`, getting its session from `sts`.
fn aws_credential(sts: &str, extra: &str) -> String {
    format!(
        "aws-inference:\n  kind: aws\n  region: us-east-1\n  role_arn: arn:aws:iam::123456789012:role/inference\n  web_identity_token_file: {{dir}}/token\n  sts_endpoint: {sts}\n  session_duration: 15m\n{extra}"
    )
}

/// A sidecar that intercepts HTTPS with a CA of its own and trusts the test PKI's CA
/// upstream (moto over TLS), with the `aws` credential (`extra` appended to it) and `routes`.
fn intercepting_sidecar(pki: &TestPki, sts: &str, extra: &str, routes: &str) -> Sidecar {
    let cfg = Cfg::new()
        .set(
            "tls",
            "ca_cert: {dir}/ca.pem\nca_key: {dir}/ca-key.pem\nupstream_roots: {dir}/upstream-ca.pem",
        )
        .set("credentials", &aws_credential(sts, extra))
        .set("routes", routes)
        .set("strip", "mode: strip")
        .yaml();
    let ca = pki.ca_pem.clone();
    Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], move |dir: &Path| {
        std::fs::write(dir.join("token"), WEB_IDENTITY_TOKEN).unwrap();
        std::fs::write(dir.join("upstream-ca.pem"), &ca).unwrap();
        let (ok, _, err) =
            run(Command::new(bin()).args(["ca", "init", "--out", dir.to_str().unwrap()]));
        assert!(ok, "{err}");
    })
}

const ASSUMED: &str = "arn:aws:sts::123456789012:assumed-role/inference/chaperone-test-inference";

/// Both calls answered by the role's session; their lines say so, and the app's key was
/// stripped.
fn assert_signed_lines(sc: &Sidecar) {
    let lines: Vec<Value> = sc.lines_where(2, |l| l["route"] == "aws-sts");
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["credential"]["kind"], "aws", "{l}");
        assert_eq!(l["credential"]["id"], ASSUMED, "{l}");
        assert_eq!(l["credential"]["scopes"][0], "sts:us-east-1", "{l}");
        assert!(l["credential"]["expires_at"].as_u64().unwrap() > 0, "{l}");
        // The app's SigV4 Authorization carried its access key id: stripped, fingerprinted.
        assert_eq!(l["stripped"][0]["type"], "aws_access_key_id", "{l}");
        assert_eq!(l["stripped"][0]["location"], "header:authorization", "{l}");
    }
    sc.assert_never_shows(&[APP_SECRET, WEB_IDENTITY_TOKEN]);
}

#[test]
fn boto3_signed_with_a_hard_coded_key_succeeds_only_re_signed_with_the_roles_session() {
    let (moto, _) = moto(None);
    let port = moto.port.unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let cfg = Cfg::new()
        .set("credentials", &aws_credential(&endpoint, ""))
        .set(
            "routes",
            &format!(
                "- name: aws-sts\n  match: {{ host: 127.0.0.1, port: {port} }}\n  credential: aws-inference\n  sign: {{ service: sts }}"
            ),
        )
        .set("strip", "mode: strip")
        .yaml();
    let sc = Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], |dir: &Path| {
        std::fs::write(dir.join("token"), WEB_IDENTITY_TOKEN).unwrap();
    });
    let proxy = sc.proxy_url();
    // Twice: the second is served from the cached session (moto would refuse another
    // unsigned AssumeRoleWithWebIdentity).
    assert_eq!(caller_identity(&endpoint, &proxy, ""), ASSUMED);
    assert_eq!(caller_identity(&endpoint, &proxy, ""), ASSUMED);
    // Without the sidecar, moto refuses the app's hard-coded key (asked after the sidecar's
    // STS call: moto counts the unauthenticated actions it allows, see moto_aws.py).
    assert_eq!(
        caller_identity(&endpoint, "", ""),
        "error InvalidClientTokenId"
    );
    assert_signed_lines(&sc);
}

/// boto3 speaks HTTPS: through HTTPS_PROXY the tunnel is intercepted, the request re-signed
/// and sent on over TLS to moto (its certificate verified against `upstream_roots`); STS is
/// reached over TLS too.
#[test]
fn boto3_over_https_is_intercepted_and_re_signed() {
    let pki = TestPki::new();
    let (moto, _certs) = moto(Some(&pki));
    let port = moto.port.unwrap();
    let endpoint = format!("https://localhost:{port}");
    let sc = intercepting_sidecar(
        &pki,
        &endpoint,
        "",
        &format!(
            "- name: aws-sts\n  match: {{ host: localhost, port: {port} }}\n  credential: aws-inference\n  sign: {{ service: sts }}"
        ),
    );
    let trust = sc.dir().join("ca.pem");
    let trust = trust.to_str().unwrap();
    assert_eq!(caller_identity(&endpoint, &sc.proxy_url(), trust), ASSUMED);
    assert_eq!(caller_identity(&endpoint, &sc.proxy_url(), trust), ASSUMED);
    assert_signed_lines(&sc);
}

/// Fail closed: with STS unreachable no request goes out (503 `credential_unavailable`, the
/// reason naming STS); a body larger than the credential signs is refused with 413 before
/// anything is fetched.
#[test]
fn no_session_no_request_and_oversized_bodies_are_413() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().port();
    drop(closed);
    let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_port = up.local_addr().unwrap().port();
    let cfg = Cfg::new()
        .set(
            "credentials",
            &aws_credential(&format!("http://127.0.0.1:{dead}"), "  body_max_bytes: 64\n"),
        )
        .set(
            "routes",
            &format!(
                "- name: aws-sts\n  match: {{ host: 127.0.0.1, port: {up_port} }}\n  credential: aws-inference\n  sign: {{ service: sts }}"
            ),
        )
        .yaml();
    let sc = Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], |dir: &Path| {
        std::fs::write(dir.join("token"), WEB_IDENTITY_TOKEN).unwrap();
    });
    let url = format!("http://127.0.0.1:{up_port}/");
    let (code, body) = curl(&["-s", "-x", &sc.proxy_url(), &url]);
    assert_eq!(code, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "credential_unavailable", "{v}");
    assert!(v["reason"].as_str().unwrap().contains("STS"), "{v}");
    let big = "a".repeat(1000);
    let (code, body) = curl(&["-s", "-x", &sc.proxy_url(), "--data", &big, &url]);
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("body_too_large"), "{body}");
    // Nothing reached the upstream.
    up.set_nonblocking(true).unwrap();
    assert!(
        up.accept().is_err(),
        "a request went out without a signature"
    );
    sc.assert_never_shows(&[WEB_IDENTITY_TOKEN]);
}

/// Without `role_arn`: the container credentials endpoint the environment names, as EKS Pod
/// Identity sets it up (`AWS_CONTAINER_CREDENTIALS_FULL_URI` and the token file), read with
/// the token on every fetch.
#[test]
fn the_container_credentials_endpoint_of_eks_pod_identity() {
    let token = "pod-identity-token-3c1f9e";
    let mut cmd = Command::new(python());
    cmd.arg(support().join("moto_aws.py"))
        .args(["--container", token]);
    let moto = ServerProcess::start(cmd, "moto (AWS emulator)");
    let port = moto.port.unwrap();
    let container: u16 = moto.lines_after("container ")[0].parse().unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let cfg = Cfg::new()
        .set(
            "credentials",
            "aws-pod:\n  kind: aws\n  region: us-east-1",
        )
        .set(
            "routes",
            &format!(
                "- name: aws-sts\n  match: {{ host: 127.0.0.1, port: {port} }}\n  credential: aws-pod\n  sign: {{ service: sts }}"
            ),
        )
        .yaml();
    let uri = format!("http://127.0.0.1:{container}/v1/credentials");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("eks-pod-identity-token");
    std::fs::write(&token_file, token).unwrap();
    let sc = Sidecar::start(
        &cfg,
        PERMISSIVE_POLICY,
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token_file.to_str().unwrap(),
            ),
        ],
    );
    let assumed = "arn:aws:sts::123456789012:assumed-role/inference/pod-identity";
    assert_eq!(caller_identity(&endpoint, &sc.proxy_url(), ""), assumed);
    let l = &sc.lines_where(1, |l| l["route"] == "aws-sts")[0];
    assert_eq!(l["credential"]["kind"], "aws", "{l}");
    assert!(
        l["credential"]["id"]
            .as_str()
            .unwrap()
            .starts_with("container-credentials:ASIA"),
        "{l}"
    );
    sc.assert_never_shows(&[token, APP_SECRET]);
}

/// Secret stores as the source of `static` credentials, read from moto (authentication on)
/// with the role's session: a JSON secret's field from Secrets Manager and a SecureString
/// from SSM are injected; a rotated secret is picked up at the next refresh; when the store
/// goes away the last good value serves until `max_stale`, then the route fails closed with
/// the reason. No value reaches a log line, an error body or a metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_manager_and_ssm_values_are_injected_refreshed_and_kept_through_an_outage() {
    let up = Upstream::start().await;
    let (first, second) = (fake_openai_key(), fake_openai_key());
    let slack = format!(
        "xoxb-{}-{}-{:016x}",
        rand_u64() % 1_000_000_000,
        rand_u64() % 1_000_000_000,
        rand_u64()
    );
    let mut cmd = Command::new(python());
    cmd.arg(support().join("moto_aws.py"))
        .env(
            "SEED_SECRET",
            format!(
                "prod/openai={}",
                serde_json::json!({"api_key": first, "org": "org-1"})
            ),
        )
        .env("SEED_PARAMETER", format!("/prod/slack/token={slack}"));
    let moto = ServerProcess::start(cmd, "moto (AWS emulator)");
    let port = moto.port.unwrap();
    let control: u16 = moto.lines_after("control ")[0].parse().unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let upstream = up.addr.port();
    let cfg = Cfg::new()
        .set(
            "credentials",
            &format!(
                "{}openai:\n  kind: static\n  from_aws_secret: {{ credential: aws-inference, secret_id: prod/openai, json_key: api_key, endpoint: '{endpoint}' }}\n  refresh: 1s\n  max_stale: 10s\nslack:\n  kind: static\n  from_aws_parameter: {{ credential: aws-inference, name: /prod/slack/token, endpoint: '{endpoint}' }}\n",
                aws_credential(&endpoint, "")
            ),
        )
        .set(
            "routes",
            &format!(
                "- name: openai\n  match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /openai/ }}\n  credential: openai\n- name: slack\n  match: {{ host: 127.0.0.1, port: {upstream}, path_prefix: /slack/ }}\n  credential: slack\n"
            ),
        )
        .yaml();
    let sc = Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], |dir: &Path| {
        std::fs::write(dir.join("token"), WEB_IDENTITY_TOKEN).unwrap();
    });
    let proxy = sc.proxy_url();
    let get = |path: &str| curl(&["-x", &proxy, &format!("http://127.0.0.1:{upstream}{path}")]);
    let until = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {}",
                sc.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    // Read in the background at start; until then the route fails closed, and the sidecar
    // is not ready.
    until("the first read", &|| get("/openai/a").0 == 200);
    until("ready once both are read", &|| {
        curl(&[&format!("http://{}/readyz", sc.admin)]).0 == 200
    });
    assert_eq!(bearer(up.requests().last().unwrap()), first);
    assert_eq!(get("/slack/a").0, 200);
    assert_eq!(bearer(up.requests().last().unwrap()), slack);

    // Rotation: a new version of the secret is used from the next refresh on.
    let (code, _) = curl(&[
        "-X",
        "POST",
        "--data",
        &serde_json::json!({"api_key": second}).to_string(),
        &format!("http://127.0.0.1:{control}/"),
    ]);
    assert_eq!(code, 204);
    until("the rotated value", &|| {
        get("/openai/b").0 == 200 && bearer(up.requests().last().unwrap()) == second
    });

    // The store goes away: the last good value serves, then the route fails closed.
    drop(moto);
    let (code, body) = get("/openai/c");
    assert_eq!(code, 200, "{body}");
    assert_eq!(bearer(up.requests().last().unwrap()), second);
    until("failing closed after max_stale", &|| {
        get("/openai/d").0 == 503
    });
    let (code, body) = get("/openai/e");
    assert_eq!(code, 503);
    assert!(
        body.contains("credential_unavailable") && body.contains("max_stale"),
        "{body}"
    );

    let lines = sc.lines_where(4, |l| l["route"] == "openai" && l["status"] == 200);
    for l in &lines {
        assert_eq!(l["credential"]["kind"], "static", "{l}");
        assert!(
            l["credential"]["id"].as_str().unwrap().starts_with("fp:"),
            "{l}"
        );
    }
    assert!(
        sc.output().contains("secret read from the store"),
        "{}",
        sc.output()
    );
    sc.assert_never_shows(&[&first, &second, &slack, WEB_IDENTITY_TOKEN]);
}

/// A secret store that cannot be read at start keeps the sidecar out of readiness (its routes
/// would only fail closed), naming the credential and nothing of the store's answer; the
/// sidecar stays alive.
#[test]
fn an_unread_secret_store_keeps_the_sidecar_not_ready() {
    let closed = "http://127.0.0.1:1";
    let cfg = Cfg::new()
        .set(
            "credentials",
            &format!(
                "{}openai:\n  kind: static\n  from_aws_secret: {{ credential: aws-inference, secret_id: prod/openai, json_key: api_key, endpoint: '{closed}' }}\n  refresh: 1s\n",
                aws_credential(closed, "")
            ),
        )
        .set(
            "routes",
            "- name: openai\n  match: { host: api.openai.com }\n  credential: openai\n",
        )
        .yaml();
    let sc = Sidecar::start_with(&cfg, PERMISSIVE_POLICY, &[], |dir: &Path| {
        std::fs::write(dir.join("token"), WEB_IDENTITY_TOKEN).unwrap();
    });
    // Past the first attempts (each fails at once: nothing listens).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (code, body) = curl(&[&format!("http://{}/readyz", sc.admin)]);
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        body,
        "not ready: no value read yet from the secret store for openai\n"
    );
    assert_eq!(curl(&[&format!("http://{}/healthz", sc.admin)]).0, 200);
    sc.assert_never_shows(&[WEB_IDENTITY_TOKEN]);
}

/// Bedrock Runtime as boto3 calls it, InvokeModel and InvokeModelWithResponseStream, through
/// HTTP_PROXY against a loopback Bedrock that recomputes each signature with botocore (so our
/// canonicalisation, `:` in the model id included, is checked against the SDK's own) and
/// streams its answer in AWS's event-stream framing. The app signs with a hard-coded key,
/// which the server refuses when called directly; through the sidecar every call is re-signed
/// with the session from the container credentials endpoint, for the service and region the
/// app's own signature named (the loopback host names none, and the route has no `sign:`),
/// and the stream's events arrive as they are sent. A request with no signature to go by is
/// refused, saying what to set.
#[test]
fn boto3_bedrock_runtime_invoke_and_event_stream_are_re_signed() {
    let token = "pod-identity-token-bedrock";
    let mut cmd = Command::new(python());
    cmd.arg(support().join("fake_bedrock.py")).arg(token);
    let bedrock = ServerProcess::start(cmd, "the loopback Bedrock Runtime");
    let port = bedrock.port.unwrap();
    let cfg = Cfg::new()
        .set("credentials", "aws-pod:\n  kind: aws\n  region: us-east-1")
        .set(
            "routes",
            &format!(
                "- name: bedrock\n  match: {{ host: 127.0.0.1, port: {port}, path_prefix: /model/ }}\n  credential: aws-pod"
            ),
        )
        .set("strip", "mode: strip")
        .yaml();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("eks-pod-identity-token");
    std::fs::write(&token_file, token).unwrap();
    let uri = format!("http://127.0.0.1:{port}/v1/credentials");
    let sc = Sidecar::start(
        &cfg,
        PERMISSIVE_POLICY,
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token_file.to_str().unwrap(),
            ),
        ],
    );
    let script = r#"
import json, sys, time, boto3, botocore
endpoint, proxy, key_id, secret = sys.argv[1:5]
def client(proxies):
    return boto3.client("bedrock-runtime", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=key_id, aws_secret_access_key=secret,
        config=botocore.config.Config(proxies=proxies, retries={"max_attempts": 1}))
model = "anthropic.claude-3-haiku-20240307-v1:0"
ask = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 16,
                  "messages": [{"role": "user", "content": "hello"}]})
try:
    client({}).invoke_model(modelId=model, body=ask)
    print("direct", json.dumps("accepted"))
except botocore.exceptions.ClientError as e:
    print("direct", json.dumps(e.response["Error"]["Code"]))
br = client({"http": proxy})
r = br.invoke_model(modelId=model, body=ask, contentType="application/json")
print("invoke", r["body"].read().decode())
r = br.invoke_model_with_response_stream(modelId=model, body=ask)
parts, times = [], []
for ev in r["body"]:
    parts.append(json.loads(ev["chunk"]["bytes"]))
    times.append(time.monotonic())
print("stream", json.dumps({"first": parts[0], "parts": len(parts),
                            "spread_ms": (times[-1] - times[0]) * 1000}))
"#;
    let out = Command::new(python())
        .args(["-c", script])
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(sc.proxy_url())
        .args([APP_KEY_ID, APP_SECRET])
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .output()
        .unwrap();
    let calls = named_lines(&out);
    assert_eq!(calls["direct"], "UnrecognizedClientException", "{calls:?}");
    let seen = &calls["invoke"]["seen"];
    assert_eq!(seen["key"], "ASIAFAKEBEDROCK00001", "{seen}");
    assert_eq!(
        (&seen["service"], &seen["region"]),
        (&"bedrock".into(), &"us-east-1".into())
    );
    assert_eq!(
        seen["path"], "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke",
        "the model id's `:` as boto3 encodes it, signed as AWS canonicalises it"
    );
    assert_eq!(
        calls["invoke"]["asked"]["max_tokens"], 16,
        "the body arrived whole"
    );
    let stream = &calls["stream"];
    assert_eq!(stream["parts"], 5, "{stream}");
    assert_eq!(stream["first"]["seen"]["key"], "ASIAFAKEBEDROCK00001");
    assert!(
        stream["spread_ms"].as_f64().unwrap() > 500.0,
        "the event stream arrived in one piece: {stream}"
    );
    assert_eq!(
        bedrock.lines_after("refused ").len(),
        1,
        "only the direct call was refused"
    );
    // The server is no pushover: the session's key with a made-up signature is refused.
    let (code, _) = curl(&[
        "-X",
        "POST",
        "-H",
        "Authorization: AWS4-HMAC-SHA256 Credential=ASIAFAKEBEDROCK00001/20261201/us-east-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature=0000000000000000000000000000000000000000000000000000000000000000",
        "-H",
        "X-Amz-Date: 20261201T000000Z",
        "-H",
        &format!("X-Amz-Security-Token: FwoGZXIvYXdzEFAKE{}", "t".repeat(120)),
        "--data",
        "{}",
        &format!("http://127.0.0.1:{port}/model/m/invoke"),
    ]);
    assert_eq!(code, 403);
    // The server prints its verdict as it answers; its output is read as it comes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while bedrock.lines_after("refused ").len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        bedrock.lines_after("refused ").last().map(String::as_str),
        Some("SignatureDoesNotMatch")
    );

    let lines = sc.lines_where(2, |l| l["route"] == "bedrock");
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["credential"]["kind"], "aws", "{l}");
        assert_eq!(
            l["credential"]["id"], "arn:aws:iam::123456789012:role/bedrock-caller",
            "{l}"
        );
        assert_eq!(l["stripped"][0]["type"], "aws_access_key_id", "{l}");
    }
    let (code, body) = curl(&[
        "-x",
        &sc.proxy_url(),
        "--data",
        "{}",
        &format!("http://127.0.0.1:{port}/model/m/invoke"),
    ]);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("set `sign.service`"), "{body}");
    sc.assert_never_shows(&[
        APP_SECRET,
        token,
        "fake/bedrock/secret/",
        "FwoGZXIvYXdzEFAKE",
    ]);
}

/// S3 through intercepted HTTPS, as boto3 talks to it: uploads larger than `body_max_bytes`
/// stream, signed over their headers (`UNSIGNED-PAYLOAD`, or boto3's own `aws-chunked` framing
/// with a CRC trailer, `STREAMING-UNSIGNED-PAYLOAD-TRAILER`, kept as framed); moto checks the
/// signatures and the checksums, and what comes back is what was sent. An upload in signed
/// chunks cannot be re-signed and gets a 400 that says so.
#[test]
fn s3_uploads_stream_past_the_signing_bound_over_https() {
    let pki = TestPki::new();
    let (moto, _certs) = moto(Some(&pki));
    let port = moto.port.unwrap();
    let endpoint = format!("https://localhost:{port}");
    let sc = intercepting_sidecar(
        &pki,
        &endpoint,
        "  body_max_bytes: '1048576'\n",
        &format!(
            "- name: s3\n  match: {{ host: localhost, port: {port} }}\n  credential: aws-inference\n  sign: {{ service: s3 }}\n- name: s3-plain\n  match: {{ host: 127.0.0.1, port: {port} }}\n  credential: aws-inference\n  sign: {{ service: s3 }}"
        ),
    );
    let script = r#"
import hashlib, json, os, sys, boto3, botocore
endpoint, proxy, ca, key_id, secret = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", verify=ca,
    aws_access_key_id=key_id, aws_secret_access_key=secret,
    config=botocore.config.Config(proxies={"https": proxy}, retries={"max_attempts": 1},
                                  s3={"addressing_style": "path"}))
sha = lambda b: hashlib.sha256(b).hexdigest()
s3.create_bucket(Bucket="models")
for key, body, kind in [("weights.bin", os.urandom(3 * 1024 * 1024), "application/octet-stream"),
                        ("small.json", json.dumps({"k": "v" * 100}).encode(), "application/json")]:
    s3.put_object(Bucket="models", Key=key, Body=body, ContentType=kind)
    got = s3.get_object(Bucket="models", Key=key)["Body"].read()
    print(key, json.dumps({"sent": sha(body), "got": sha(got), "size": len(got)}))
# After the sidecar's one STS call (moto counts the unauthenticated actions it allows).
direct = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", verify=False,
    aws_access_key_id=key_id, aws_secret_access_key=secret,
    config=botocore.config.Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}))
try:
    direct.list_buckets()
    print("direct", json.dumps("accepted"))
except botocore.exceptions.ClientError as e:
    print("direct", json.dumps(e.response["Error"]["Code"]))
"#;
    let trust = sc.dir().join("ca.pem");
    let out = Command::new(python())
        .args([
            "-c",
            script,
            &endpoint,
            &sc.proxy_url(),
            trust.to_str().unwrap(),
        ])
        .args([APP_KEY_ID, APP_SECRET])
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .output()
        .unwrap();
    let calls = named_lines(&out);
    assert_eq!(
        calls["direct"], "InvalidAccessKeyId",
        "moto refuses the app's own key"
    );
    for (key, size) in [("weights.bin", 3 * 1024 * 1024), ("small.json", 109)] {
        let c = &calls[key];
        assert_eq!(c["sent"], c["got"], "{key}: {c}");
        assert_eq!(c["size"], size, "{key}: {c}");
    }
    let lines = sc.lines_where(5, |l| l["route"] == "s3");
    assert_eq!(lines.len(), 5, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["credential"]["scopes"][0], "s3:us-east-1", "{l}");
    }
    // The 3 MiB upload passed a 1 MiB signing bound: it streamed.
    assert!(
        lines
            .iter()
            .any(|l| l["method"] == "PUT" && l["path"] == "/models/weights.bin"),
        "{lines:#?}"
    );

    // Signed chunks (the Java SDK v1 over HTTP) cannot be re-signed: a clear 400.
    let (code, body) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-X",
        "PUT",
        "-H",
        "x-amz-content-sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
        "--data",
        "5;chunk-signature=00\r\nhello\r\n",
        &format!("http://127.0.0.1:{port}/models/chunked"),
    ]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("signed chunks"), "{body}");
    sc.assert_never_shows(&[APP_SECRET, WEB_IDENTITY_TOKEN]);
}
