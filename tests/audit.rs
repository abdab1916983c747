//! `chaperone audit`: the real binary over purpose logs the real sidecar wrote, split into
//! a rotated plain file and a gzip file, as logrotate leaves them.

mod common;

use std::process::Command;

use common::*;

fn audit(args: &[&str]) -> (i32, String, String) {
    chaperone("audit", args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_summarizes_what_the_sidecar_logged() {
    let up = Upstream::start().await;
    let port = up.addr.port();
    let yaml = format!(
        "listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity: {{ id: spiffe://t/ns/ml/sa/agent, workload: agent, environment: test }}
stages:
  - {{ name: training, listen: 127.0.0.1:0, id: spiffe://t/ns/ml/sa/training }}
credentials:
  per-call: {{ kind: jwt, ttl: 60s }}
routes:
  - name: model
    match: {{ host: 127.0.0.1, port: {port}, path_prefix: /v1/ }}
    credential: per-call
    purpose_default: inference
    scopes: [model.invoke]
policy: {{ file: {{dir}}/policy.cedar }}
log: {{ format: json, output: stdout }}
"
    );
    let policy = r#"@id("main-infers")
permit(principal, action, resource) when { principal.stage == "main" && context.route == "model" };
@id("training-reads")
permit(principal, action == Action::"GET", resource) when { principal.stage == "training" && context.path like "/datasets/*" };
@id("no-export")
forbid(principal, action, resource) when { context.purpose == "export-data" };
"#;
    let mut sc = Sidecar::start(&yaml, policy, &[]);
    let (main, training) = (sc.proxy_url(), format!("http://{}", sc.proxies[1]));
    let base = format!("http://127.0.0.1:{port}");
    let key = fake_openai_key();
    for _ in 0..3 {
        assert_eq!(curl(&["-x", &main, &format!("{base}/v1/chat")]).0, 200);
    }
    // The same hard-coded key twice: one fingerprint, two sightings.
    for _ in 0..2 {
        let auth = format!("Authorization: Bearer {key}");
        assert_eq!(
            curl(&["-x", &main, "-H", &auth, &format!("{base}/v1/chat")]).0,
            200
        );
    }
    assert_eq!(
        curl(&[
            "-x",
            &main,
            "-H",
            "chaperone-purpose: export-data",
            &format!("{base}/v1/chat")
        ])
        .0,
        403
    );
    assert_eq!(
        curl(&["-x", &training, &format!("{base}/datasets/a")]).0,
        200
    );
    for _ in 0..2 {
        assert_eq!(curl(&["-x", &training, &format!("{base}/v1/chat")]).0, 403);
    }
    let lines = sc.log_lines(9);
    assert_eq!(lines.len(), 9);
    sc.terminate();

    // Rotated as logrotate leaves it: the older half compressed, the newer plain.
    let log = std::fs::read_to_string(&sc.stdout).unwrap();
    let all: Vec<&str> = log.lines().collect();
    let dir = sc.dir();
    std::fs::write(dir.join("purpose.log.2"), all[..4].join("\n") + "\n").unwrap();
    assert!(
        Command::new("gzip")
            .arg(dir.join("purpose.log.2"))
            .status()
            .unwrap()
            .success()
    );
    // A line cut by a crash mid-write is skipped, not fatal.
    std::fs::write(
        dir.join("purpose.log.1"),
        all[4..].join("\n") + "\n{\"ts\":\"2026-",
    )
    .unwrap();
    let (gz, plain) = (
        dir.join("purpose.log.2.gz").to_string_lossy().into_owned(),
        dir.join("purpose.log.1").to_string_lossy().into_owned(),
    );

    let (code, out, err) = audit(&[&plain, &gz]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("9 requests from "), "{out}");
    assert!(out.contains(": 6 allowed, 3 denied"), "{out}");
    assert!(
        out.contains("1 lines skipped as not purpose-log JSON (first at "),
        "{out}"
    );
    assert!(
        out.contains(&format!("purpose.log.1:{}", all.len() - 4 + 1)),
        "{out}"
    );
    // Traffic rows: the busiest first.
    let traffic = section(&out, "Traffic by identity");
    let first_row = traffic.lines().nth(2).unwrap();
    assert!(
        first_row.contains("spiffe://t/ns/ml/sa/agent") && first_row.contains("inference"),
        "{traffic}"
    );
    assert!(
        first_row.split_whitespace().any(|w| w == "5"),
        "5 inference calls: {traffic}"
    );
    // Denials grouped by cause, with the deciding policies.
    let denials = section(&out, "Denials");
    assert!(denials.contains("no-export"), "{denials}");
    assert!(
        denials.contains("no policy permits this request"),
        "{denials}"
    );
    assert!(
        denials
            .lines()
            .any(|l| l.trim_start().starts_with("2 ") && l.contains("training")),
        "{denials}"
    );
    // The key by fingerprint, never by value.
    let secrets = section(&out, "Embedded secrets");
    assert!(secrets.contains("openai_project_key"), "{secrets}");
    assert!(secrets.contains("header:authorization"), "{secrets}");
    assert!(!out.contains(&key));
    let creds = section(&out, "Credentials used");
    assert!(
        creds.contains("per-call") && creds.contains("model.invoke"),
        "{creds}"
    );

    // JSON for machines, from stdin as well.
    let mut child = Command::new(bin())
        .args(["audit", "--json", "-", &gz])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        std::fs::read(&plain).unwrap().as_slice(),
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["lines"], 9);
    assert_eq!(r["denied"], 3);
    let secret = &r["secrets"][0];
    assert_eq!(secret["count"], 2);
    assert_eq!(secret["type"], "openai_project_key");
    let fp = lines
        .iter()
        .find_map(|l| l["stripped"][0]["fingerprint"].as_str())
        .unwrap();
    assert_eq!(secret["fingerprint"], fp);
    assert!(secret["seen"]["first"].as_str().unwrap() <= secret["seen"]["last"].as_str().unwrap());
    let cred = &r["credentials"][0];
    assert_eq!(cred["name"], "per-call");
    assert_eq!(cred["requests"], 5);
    assert_eq!(cred["tokens"], 5, "one token per call");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&key));

    // A missing file is an error naming it.
    let (code, _, err) = audit(&["/nonexistent/purpose.log"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/purpose.log"), "{err}");
}

/// The text of one titled table of the report.
fn section<'a>(out: &'a str, title: &str) -> &'a str {
    let start = out
        .find(title)
        .unwrap_or_else(|| panic!("no {title} in {out}"));
    let rest = &out[start..];
    let end = rest[1..].find("\n\n").map_or(rest.len(), |e| e + 1);
    &rest[..end]
}
