//! `chaperone review`: the real binary over the purpose log a real sidecar wrote, against
//! the config it ran with; the suggested policy is then used with `policy eval`.

mod common;

use std::process::Command;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_finds_unused_grants_outliers_and_suggests_a_tighter_policy() {
    let up = Upstream::start().await;
    let port = up.addr.port();
    let yaml = format!(
        "listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity: {{ id: spiffe://t/ns/ml/sa/serving, workload: assistant, environment: test, stage: serving }}
stages:
  - {{ name: training, listen: 127.0.0.1:0, id: spiffe://t/ns/ml/sa/training }}
credentials:
  per-call: {{ kind: jwt, ttl: 60s }}
  never-used: {{ kind: jwt, ttl: 60s }}
routes:
  - name: model
    match: {{ host: 127.0.0.1, port: {port}, path_prefix: /v1/ }}
    credential: per-call
    purpose_default: inference
    scopes: [model.invoke]
    labels: {{ kind: inference }}
  - name: datasets
    match: {{ host: 127.0.0.1, port: {port}, path_prefix: /datasets/ }}
    credential: per-call
    purpose_default: training
    scopes: [\"datasets.{{purpose}}\"]
    labels: {{ kind: dataset }}
  - name: old-api
    match: {{ host: old.internal.example.org }}
    credential: never-used
policy: {{ file: {{dir}}/policy.cedar }}
log: {{ format: json, output: stdout }}
"
    );
    let policy = r#"@id("serving-infers")
permit(principal, action, resource) when { principal.stage == "serving" && context.route == "model" };
@id("training-reads")
permit(principal, action, resource) when { principal.stage == "training" && context.route == "datasets" };
@id("training-may-infer")
permit(principal, action, resource) when { principal.stage == "training" && context.route == "model" };
@id("old-api")
permit(principal, action, resource) when { context.route == "old-api" };
@id("no-export")
forbid(principal, action, resource) when { context.purpose == "export-data" };
"#;
    let mut sc = Sidecar::start(&yaml, policy, &[]);
    let (serving, training) = (sc.proxy_url(), format!("http://{}", sc.proxies[1]));
    let base = format!("http://127.0.0.1:{port}");
    for i in 0..5 {
        assert_eq!(
            curl(&["-x", &serving, "-d", "{}", &format!("{base}/v1/chat/{i}")]).0,
            200
        );
    }
    for i in 0..20 {
        assert_eq!(
            curl(&["-x", &training, &format!("{base}/datasets/shard-{i}")]).0,
            200
        );
    }
    // Once, training calls the model: allowed by policy, outside its function.
    assert_eq!(
        curl(&["-x", &training, "-d", "{}", &format!("{base}/v1/chat/x")]).0,
        200
    );
    sc.log_lines(26);
    sc.terminate();

    let dir = sc.dir().to_path_buf();
    let cfg = dir.join("config.yaml");
    let suggested = dir.join("suggested.cedar");
    let out = Command::new(bin())
        .args(["review", "--json", "--config"])
        .arg(&cfg)
        .arg("--suggest-out")
        .arg(&suggested)
        .arg(&sc.stdout)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["lines"], 26);
    assert_eq!(r["unused_routes"], serde_json::json!(["old-api"]));
    assert_eq!(r["unused_credentials"], serde_json::json!(["never-used"]));
    assert_eq!(
        r["unused_scopes"],
        serde_json::json!([]),
        "datasets.{{purpose}} was granted as datasets.training"
    );
    let unused: Vec<(String, String)> = r["unused_policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().into(),
                p["effect"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        unused,
        vec![
            ("old-api".into(), "permit".into()),
            ("no-export".into(), "forbid".into())
        ]
    );
    let outliers = r["outside_function"].as_array().unwrap();
    assert_eq!(outliers.len(), 1, "{outliers:?}");
    assert_eq!(outliers[0]["stage"], "training");
    assert_eq!(outliers[0]["kind"], "inference");
    assert_eq!(outliers[0]["requests"], 1);
    assert_eq!(outliers[0]["function"], serde_json::json!(["dataset"]));
    // The suggestion was checked against everything seen.
    assert_eq!(r["suggestion_check"]["decided"], 26);
    assert_eq!(
        r["suggestion_check"]["allowed"], 26,
        "{}",
        r["suggestion_check"]
    );

    // Used in place of the original, it still allows what was seen and no longer what was
    // merely permitted: training may POST to the model (seen) but not GET it (never seen),
    // and the forbid is kept.
    let text = std::fs::read_to_string(&suggested).unwrap();
    assert!(text.contains("@id(\"no-export\")"), "{text}");
    std::fs::copy(&suggested, dir.join("policy.cedar")).unwrap();
    let eval = |stage: &str, method: &str, path: &str, purpose: &str| {
        let out = Command::new(bin())
            .args(["policy", "eval", "--config"])
            .arg(&cfg)
            .args([
                "--stage",
                stage,
                "--method",
                method,
                "--purpose",
                purpose,
                "--url",
            ])
            .arg(format!("{base}{path}"))
            .output()
            .unwrap();
        out.status.code().unwrap()
    };
    assert_eq!(eval("training", "POST", "/v1/chat/y", "inference"), 0);
    assert_eq!(eval("training", "GET", "/v1/chat/y", "inference"), 1);
    assert_eq!(eval("training", "GET", "/datasets/shard-99", "training"), 0);
    assert_eq!(
        eval("training", "GET", "/datasets/shard-99", "export-data"),
        1
    );
    assert_eq!(eval("serving", "GET", "/datasets/shard-1", "training"), 1);

    // The text report says the same for people.
    let out = Command::new(bin())
        .args(["review", "--config"])
        .arg(&cfg)
        .arg(&sc.stdout)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Routes never used\n  old-api"), "{text}");
    assert!(text.contains("no-export (forbid: never fired"), "{text}");
    assert!(
        text.contains("Suggested policy: allows 26 of the 26 allowed requests seen"),
        "{text}"
    );
}
