//! `chaperone scan`: the real binary over a HAR file and JSON lines.

mod common;

use common::*;

fn scan(args: &[&str]) -> (i32, String, String) {
    chaperone("scan", args)
}

#[test]
fn scan_reports_what_strip_would_remove_from_a_har_file() {
    let key = fake_openai_key();
    let gh = "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";
    let aws_secret = "q9Vt2Lx7Rb4Nw8Kc1Hd5Fg3Jy6Ms0Pz+Ae/Ui7Ok";
    // HAR 1.2 as browsers and proxies export it (pseudo-headers included).
    let har = serde_json::json!({
        "log": {
            "version": "1.2",
            "creator": {"name": "test", "version": "1"},
            "entries": [
                {"request": {
                    "method": "POST",
                    "url": "https://api.openai.com/v1/chat/completions",
                    "httpVersion": "HTTP/2",
                    "headers": [
                        {"name": ":authority", "value": "api.openai.com"},
                        {"name": "authorization", "value": format!("Bearer {key}")},
                        {"name": "content-type", "value": "application/json"}
                    ],
                    "queryString": [],
                    "postData": {"mimeType": "application/json",
                                 "text": format!(r#"{{"model":"m","messages":[{{"content":"use {gh}"}}]}}"#)}
                }},
                {"request": {
                    "method": "GET",
                    "url": "https://api.github.com/user?access_token=abc123def456ghi789&per_page=5",
                    "headers": [{"name": "accept", "value": "application/json"}]
                }},
                {"request": {
                    "method": "POST",
                    "url": "https://sts.example/token",
                    "headers": [],
                    "postData": {"mimeType": "application/x-www-form-urlencoded",
                                 "params": [{"name": "aws_secret_access_key", "value": aws_secret}]}
                }},
                {"request": {
                    "method": "GET",
                    "url": "https://cdn.example/app.js",
                    "headers": [{"name": "if-none-match", "value": "\"33a64df551425fcc55e4d42a148795d9f25f89d4\""}]
                }}
            ]
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("session.har");
    std::fs::write(&file, har.to_string()).unwrap();

    let (code, out, err) = scan(&[file.to_str().unwrap()]);
    assert_eq!(code, 1, "secrets found: exit 1\n{out}{err}");
    assert!(
        out.contains("request 1: POST https://api.openai.com/v1/chat/completions"),
        "{out}"
    );
    assert!(out.contains("openai_project_key") && out.contains("header:authorization"));
    assert!(out.contains("github_pat") && out.contains("body:content"));
    assert!(out.contains(
        "request 2: GET https://api.github.com/user?access_token=<redacted>&per_page=<redacted>"
    ));
    assert!(out.contains("credential_field") && out.contains("query:access_token"));
    assert!(out.contains("aws_secret_access_key") && out.contains("body:aws_secret_access_key"));
    assert!(
        !out.contains("request 4"),
        "a clean request is not listed: {out}"
    );
    assert!(
        out.contains("4 embedded secret(s) in 3 of 4 request(s)"),
        "{out}"
    );
    for secret in [key.as_str(), gh, aws_secret, "abc123def456ghi789"] {
        assert!(!out.contains(secret) && !err.contains(secret));
    }

    // --json: one object per request, machine-readable.
    let (code, out, _) = scan(&["--json", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["findings"][0]["type"], "openai_project_key");
    assert_eq!(lines[3]["findings"].as_array().unwrap().len(), 0);
}

#[test]
fn scan_reads_json_lines_and_names_the_bad_line() {
    let key = fake_openai_key();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("requests.jsonl");
    std::fs::write(
        &good,
        format!(
            "{}\n{}\n",
            serde_json::json!({"method": "POST", "url": "http://model.local/v1/x",
                               "headers": [["x-api-key", key]], "body": {"q": 1}}),
            serde_json::json!({"url": "http://model.local/health", "headers": {"accept": "*/*"}})
        ),
    )
    .unwrap();
    let (code, out, _) = scan(&[good.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("header:x-api-key") && !out.contains(&key));

    let clean = dir.path().join("clean.jsonl");
    std::fs::write(&clean, "{\"url\": \"http://model.local/health\"}\n").unwrap();
    let (code, out, _) = scan(&[clean.to_str().unwrap()]);
    assert_eq!(code, 0, "nothing found: exit 0\n{out}");
    assert!(out.contains("0 embedded secret(s) in 0 of 1 request(s)"));

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"url\": \"http://a/\"}\n{oops\n").unwrap();
    let (code, _, err) = scan(&[bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("bad.jsonl: line 2: not JSON"), "{err}");
}
