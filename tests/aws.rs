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

/// boto3 calls `sts get-caller-identity` signed with the app's own key, through `proxy`
/// (or straight to moto when `proxy` is empty); prints the ARN or the error code.
fn caller_identity(moto: u16, proxy: &str) -> String {
    let script = r#"
import sys, boto3, botocore
port, proxy = sys.argv[1], sys.argv[2]
config = botocore.config.Config(proxies={"http": proxy} if proxy else {}, retries={"max_attempts": 1})
sts = boto3.client("sts", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
    aws_access_key_id=sys.argv[3], aws_secret_access_key=sys.argv[4], config=config)
try:
    print(sts.get_caller_identity()["Arn"])
except botocore.exceptions.ClientError as e:
    print("error", e.response["Error"]["Code"])
"#;
    let (ok, out, err) = run(Command::new(python())
        .args([
            "-c",
            script,
            &moto.to_string(),
            proxy,
            APP_KEY_ID,
            APP_SECRET,
        ])
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY"));
    assert!(ok, "{out}{err}");
    out.trim().to_string()
}

#[test]
fn boto3_signed_with_a_hard_coded_key_succeeds_only_re_signed_with_the_roles_session() {
    let moto = ServerProcess::start(
        {
            let mut c = Command::new(python());
            c.arg(support().join("moto_aws.py"));
            c
        },
        "moto (AWS emulator)",
    );
    let port = moto.port.unwrap();

    let cfg = Cfg::new()
        .set(
            "credentials",
            &format!(
                "aws-inference:\n  kind: aws\n  region: us-east-1\n  role_arn: arn:aws:iam::123456789012:role/inference\n  web_identity_token_file: {{dir}}/token\n  sts_endpoint: http://127.0.0.1:{port}\n  session_duration: 15m"
            ),
        )
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
    let arn = "arn:aws:sts::123456789012:assumed-role/inference/chaperone-test-inference";
    // Twice: the second is served from the cached session (moto would refuse another
    // unsigned AssumeRoleWithWebIdentity).
    assert_eq!(caller_identity(port, &proxy), arn);
    assert_eq!(caller_identity(port, &proxy), arn);
    // Without the sidecar, moto refuses the app's hard-coded key (asked after the sidecar's
    // STS call: moto counts the unauthenticated actions it allows, see moto_aws.py).
    assert_eq!(caller_identity(port, ""), "error InvalidClientTokenId");

    let lines: Vec<Value> = sc.lines_where(2, |l| l["route"] == "aws-sts");
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["credential"]["kind"], "aws", "{l}");
        assert_eq!(l["credential"]["id"], arn, "{l}");
        assert_eq!(l["credential"]["scopes"][0], "sts:us-east-1", "{l}");
        assert!(l["credential"]["expires_at"].as_u64().unwrap() > 0, "{l}");
        // The app's SigV4 Authorization carried its access key id: stripped, fingerprinted.
        assert_eq!(l["stripped"][0]["location"], "header:authorization", "{l}");
    }
    sc.assert_never_shows(&[APP_SECRET, WEB_IDENTITY_TOKEN]);
}
