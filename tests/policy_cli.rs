//! `chaperone policy check|eval|test|schema`: the real binary over the shipped examples and
//! over broken inputs.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn policy(args: &[&str]) -> (i32, String, String) {
    chaperone("policy", args)
}

fn example(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/policies")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// The examples' own cases pass: this is what a team would run in CI.
#[test]
fn the_example_cases_pass() {
    let (code, out, err) = policy(&[
        "test",
        "--config",
        &example("chaperone.yaml"),
        &example("CASES.yaml"),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("FAIL"), "{out}");
    let last = out.lines().last().unwrap();
    assert!(last.ends_with("passed, 0 failed"), "{last}");
    // Every theme of the examples is exercised.
    for theme in [
        "training cannot call the inference API",
        "a prod identity cannot reach dev datasets",
        "export-data is refused",
        "serving reads its region from the metadata endpoint",
        "training clones code through a tunnel",
    ] {
        assert!(out.contains(&format!("ok    {theme}")), "{theme}: {out}");
    }
}

/// The MCP example's cases pass: tool calls decided by name and by declared arguments.
#[test]
fn the_mcp_example_cases_pass() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/mcp");
    let cfg = dir.join("chaperone.yaml");
    let (code, out, err) = policy(&[
        "test",
        "--config",
        cfg.to_str().unwrap(),
        dir.join("CASES.yaml").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.ends_with("9 cases: 9 passed, 0 failed\n"), "{out}");
    let (code, out, err) = policy(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("MCP tool arguments: limit: Long, priority: String, repo: String"),
        "{out}"
    );
}

#[test]
fn a_wrong_expectation_fails_naming_the_case_line_and_what_differs() {
    let (dir, cases) = temp_file(
        "cases.yaml",
        "cases:\n  - name: right\n    stage: training\n    method: GET\n    url: https://datasets.internal.example.org/x\n    expect: allow\n  - name: wrong\n    method: POST\n    url: https://llm.internal.example.org/v1/chat/completions\n    stage: training\n    expect: allow\n    policies: [serving-calls-inference]\n",
    );
    let cases = cases.to_string_lossy().into_owned();
    let (code, out, _) = policy(&["test", "--config", &example("chaperone.yaml"), &cases]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("ok    right"), "{out}");
    assert!(out.contains(&format!("FAIL  wrong ({cases}:7)")), "{out}");
    assert!(
        out.contains("expected allow, got deny (forbidden by training-never-calls-inference)"),
        "{out}"
    );
    assert!(
        out.contains(
            "expected policies [serving-calls-inference], got [training-never-calls-inference]"
        ),
        "{out}"
    );
    assert!(out.ends_with("2 cases: 1 passed, 1 failed\n"), "{out}");

    // JSON for machines carries the same.
    let (code, out, _) = policy(&[
        "test",
        "--json",
        "--config",
        &example("chaperone.yaml"),
        &cases,
    ]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cases"][1]["passed"], false);
    assert_eq!(v["cases"][1]["line"], 7);
    assert_eq!(v["cases"][1]["got"]["decision"], "deny");

    // A malformed case file is an error (exit 2) naming the line and key.
    std::fs::write(
        dir.path().join("bad.yaml"),
        "cases:\n  - method: GET\n    urll: http://x/\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.yaml").to_string_lossy().into_owned();
    let (code, _, err) = policy(&["test", "--config", &example("chaperone.yaml"), &bad]);
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!("{bad}:3:5: cases[0].urll: Unknown field `urll`")),
        "{err}"
    );
}

#[test]
fn eval_prints_the_decision_and_exits_by_it() {
    let cfg = example("chaperone.yaml");
    let (code, out, _) = policy(&[
        "eval",
        "--config",
        &cfg,
        "--method",
        "POST",
        "--url",
        "https://llm.internal.example.org/v1/chat/completions",
        "--purpose",
        "answer-question",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("decision:  allow"), "{out}");
    assert!(out.contains("policies:  serving-calls-inference"), "{out}");
    assert!(
        out.contains("route=inference-api purpose=answer-question"),
        "{out}"
    );

    let (code, out, _) = policy(&[
        "eval",
        "--config",
        &cfg,
        "--stage",
        "training",
        "--method",
        "POST",
        "--url",
        "https://llm.internal.example.org/v1/chat/completions",
        "--json",
    ]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["decision"], "deny");
    assert_eq!(
        v["policy_ids"],
        serde_json::json!(["training-never-calls-inference"])
    );
    assert_eq!(
        v["principal"],
        r#"Workload::"spiffe://example.org/ns/ml/sa/training""#
    );
    assert_eq!(v["purpose"], "inference", "the route's default purpose");

    // Time and client address reach the policy.
    let (code, out, _) = policy(&[
        "eval",
        "--config",
        &cfg,
        "--stage",
        "training",
        "--client",
        "10.0.0.9",
        "--url",
        "https://datasets.internal.example.org/x",
        "--time",
        "2026-11-24T03:00:00Z",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("pod-local-callers-only"), "{out}");

    // Questions that cannot be answered are errors, not denials.
    for (args, want) in [
        (
            vec!["--url", "https://x.example/", "--stage", "nope"],
            "no stage `nope`",
        ),
        (vec!["--url", "ftp://x.example/"], "unsupported scheme"),
        (
            vec!["--url", "https://x.example/", "--time", "yesterday"],
            "time `yesterday`",
        ),
        (
            vec!["--url", "https://x.example/", "--purpose", "bad purpose"],
            "purpose",
        ),
    ] {
        let mut all = vec!["eval", "--config", &cfg];
        all.extend(args);
        let (code, _, err) = policy(&all);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(want), "{want}: {err}");
    }
}

#[test]
fn a_policy_that_does_not_fit_the_schema_is_refused_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "identity: { id: spiffe://t/x, workload: w, environment: dev }\nroutes:\n  - name: r\n    match: { host: api.example.org }\n    labels: { sensitivity: high }\npolicy:\n  file: p.cedar\n",
    )
    .unwrap();
    let cfg = cfg.to_string_lossy().into_owned();
    let p = dir.path().join("p.cedar");

    std::fs::write(&p, "@id(\"ok\") permit(principal, action == Action::\"GET\", resource) when { resource.labels has sensitivity && resource.labels.sensitivity == \"high\" };\n").unwrap();
    let (code, out, err) = policy(&["check", "--config", &cfg]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ok, 1 policies valid against the shipped schema (route labels: sensitivity)"),
        "{out}"
    );

    for (text, want) in [
        (
            "permit(principal, action, resource) when { context.purpse == \"x\" };",
            "purpse",
        ),
        (
            "permit(principal, action == Action::\"FETCH\", resource);",
            "FETCH",
        ),
        (
            "forbid(principal, action, resource) when { resource.labels has sensitivty && resource.labels.sensitivty == \"high\" };",
            "impossible",
        ),
    ] {
        std::fs::write(&p, text).unwrap();
        let (code, _, err) = policy(&["check", "--config", &cfg]);
        assert_eq!(code, 2, "{text}");
        assert!(err.contains("policy.file"), "{err}");
        assert!(err.contains("p.cedar"), "{err}");
        assert!(err.contains(want), "{want}: {err}");
        // `chaperone check` reports it the same way, with the config line.
        let out = Command::new(bin())
            .args(["check", "--config", &cfg])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(":7:"),
            "policy.file is on line 7"
        );
    }

    // The schema printed is the one policies are checked against, with the route labels.
    let (code, out, _) = policy(&["schema", "--config", &example("chaperone.yaml")]);
    assert_eq!(code, 0);
    assert!(
        out.contains(
            r#"type Labels = { "env"?: String, "kind"?: String, "sensitivity"?: String };"#
        ),
        "{out}"
    );
    let (code, out, _) = policy(&["schema"]);
    assert_eq!(code, 0);
    assert!(out.contains("type Labels = {};") && out.contains("client_address: ipaddr"));
}

/// In an app's CI the secrets the sidecar reads in production are not there: policy
/// commands still work (and say what they overlooked), `check` still refuses, and a missing
/// policy file is still an error.
#[test]
fn policy_commands_work_without_the_deployments_secret_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "identity: { id: spiffe://t/x, workload: w, environment: prod }
tls: { ca_cert: /var/run/chaperone/ca.pem, ca_key: /var/run/chaperone/ca-key.pem }
credentials:
  vendor: { kind: static, from_file: /var/run/secrets/vendor-key }
  env-key: { kind: static, from_env: CHAPERONE_TEST_SURELY_UNSET_VAR }
routes:
  - name: vendor
    match: { host: api.vendor.example }
    credential: vendor
policy:
  file: p.cedar
",
    )
    .unwrap();
    let cfg = cfg.to_string_lossy().into_owned();
    std::fs::write(
        dir.path().join("p.cedar"),
        "@id(\"vendor\") permit(principal, action, resource == Destination::\"api.vendor.example\");\n",
    )
    .unwrap();
    let (code, out, err) = policy(&["check", "--config", &cfg]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok, 1 policies"), "{out}");
    assert!(
        err.contains("not needed to decide policy: tls.ca_cert, tls.ca_key, credentials.env-key.from_env, credentials.vendor.from_file"),
        "{err}"
    );
    let (code, out, _) = policy(&[
        "eval",
        "--config",
        &cfg,
        "--url",
        "https://api.vendor.example/v1",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("route=vendor"), "{out}");

    // The sidecar itself would not start on this: `check` says so.
    let out = Command::new(bin())
        .args(["check", "--config", &cfg])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/var/run/secrets/vendor-key"));

    // Other mistakes are not overlooked, and the policy must be readable.
    std::fs::remove_file(dir.path().join("p.cedar")).unwrap();
    let (code, _, err) = policy(&["check", "--config", &cfg]);
    assert_eq!(code, 2);
    assert!(
        err.contains("policy.file") && err.contains("p.cedar"),
        "{err}"
    );
}

/// `--user` puts `context.on_behalf_of` in the question, so rules about users can be tested
/// before any user token exists; the schema accepts `context has on_behalf_of`.
#[test]
fn eval_can_ask_on_behalf_of_a_user() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.cedar"),
        r#"@id("users-only")
permit(principal, action, resource) when { context has on_behalf_of && context.on_behalf_of.verified };
@id("not-mallory")
forbid(principal, action, resource) when { context has on_behalf_of && context.on_behalf_of.subject == "mallory" };
"#,
    )
    .unwrap();
    let cfg = dir.path().join("chaperone.yaml");
    std::fs::write(
        &cfg,
        "identity: { id: spiffe://example.org/ns/ml/sa/agent, workload: agent, environment: prod }\npolicy: { file: policy.cedar }\n",
    )
    .unwrap();
    let cfg = cfg.to_string_lossy().into_owned();
    let ask = |extra: &[&str]| {
        let mut all = vec![
            "eval",
            "--config",
            &cfg,
            "--url",
            "https://api.example.org/x",
        ];
        all.extend_from_slice(extra);
        policy(&all)
    };
    let (code, out, err) = ask(&[
        "--user",
        "alice",
        "--user-issuer",
        "https://idp.example.org",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("users-only"), "{out}");
    let (code, out, _) = ask(&["--user", "mallory"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not-mallory"), "{out}");
    let (code, out, _) = ask(&[]);
    assert_eq!(code, 1, "no user, no permit: {out}");
}
