//! Every request gets exactly one purpose-log line, on whichever path it ends: here the paths
//! where no response is ever sent (the client resets its HTTP/2 stream, or the shutdown
//! deadline cuts the request), which used to leave no line at all.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn config(shutdown_grace: &str) -> String {
    Cfg::new()
        .set("strip", "mode: strip")
        .set("timeouts", &format!("shutdown_grace: {shutdown_grace}"))
        .yaml()
}

/// The line for `request_id`, waiting up to `within` for it; every line for it is returned.
fn lines_for(sc: &Sidecar, request_id: &str, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let found: Vec<Value> = sc
            .log_lines(0)
            .into_iter()
            .filter(|l| l["request_id"] == request_id)
            .collect();
        if !found.is_empty() || Instant::now() > deadline {
            // Give a duplicate the chance to show up too.
            std::thread::sleep(Duration::from_millis(200));
            return sc
                .log_lines(0)
                .into_iter()
                .filter(|l| l["request_id"] == request_id)
                .collect();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_that_resets_its_http2_stream_still_gets_its_line() {
    let up = Silent::start();
    let sc = Sidecar::start(&config("10s"), PERMISSIVE_POLICY, &[]);
    let secret = fake_openai_key();
    // h2c with prior knowledge, origin-form (reverse mode): curl gives up after 1 s, closing
    // the stream while the sidecar still waits for the upstream's response head.
    let (rc, _, _) = curl_raw(&[
        "--http2-prior-knowledge",
        "-m",
        "1",
        "-H",
        &format!("Host: 127.0.0.1:{}", up.port),
        "-H",
        "chaperone-request-id: reset-by-client-1",
        "-H",
        "chaperone-purpose: answer-question",
        "-H",
        &format!("Authorization: Bearer {secret}"),
        &format!("{}/v1/chat", sc.proxy_url()),
    ]);
    assert_eq!(rc, 28, "curl should have timed out");
    up.wait_accepted(1);
    let lines = lines_for(&sc, "reset-by-client-1", Duration::from_secs(5));
    assert_eq!(lines.len(), 1, "exactly one line: {lines:?}");
    let l = &lines[0];
    assert_eq!(l["completion"], "client_closed", "{l}");
    assert_eq!(l["error"], "client_closed", "{l}");
    assert_eq!(l["decision"], "allow", "{l}");
    assert_eq!(l["purpose"], "answer-question", "{l}");
    assert_eq!(l["path"], "/v1/chat", "{l}");
    assert_eq!(l["stripped"][0]["type"], "openai_project_key", "{l}");
    sc.assert_never_shows(&[&secret]);
}

#[test]
fn a_request_cut_by_the_shutdown_deadline_still_gets_its_line() {
    let up = Silent::start();
    let mut sc = Sidecar::start(&config("1s"), PERMISSIVE_POLICY, &[]);
    let client = Command::new("curl")
        .args([
            "-s",
            "-m",
            "20",
            "-x",
            &sc.proxy_url(),
            "-H",
            "chaperone-request-id: cut-by-shutdown-1",
            &format!("http://127.0.0.1:{}/v1/batch", up.port),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    up.wait_accepted(1);
    let status = sc.terminate();
    assert!(status.success(), "{status}");
    let lines: Vec<Value> = sc
        .log_lines(0)
        .into_iter()
        .filter(|l| l["request_id"] == "cut-by-shutdown-1")
        .collect();
    assert_eq!(lines.len(), 1, "exactly one line: {lines:?}");
    assert_eq!(lines[0]["completion"], "shutdown", "{}", lines[0]);
    assert_eq!(lines[0]["error"], "shutdown", "{}", lines[0]);
    assert_eq!(lines[0]["path"], "/v1/batch", "{}", lines[0]);
    let _ = client.wait_with_output();
}

fn line_for(sc: &Sidecar, request_id: &str) -> Value {
    let lines = lines_for(sc, request_id, Duration::from_secs(5));
    assert_eq!(lines.len(), 1, "exactly one line: {lines:?}");
    lines.into_iter().next().unwrap()
}

/// An SSE stream the client closes after `[DONE]` while the upstream keeps it open, as the
/// SDKs do: the call succeeded, so the line says `client_closed` without an error.
#[test]
fn an_sse_client_that_leaves_after_done_is_client_closed_not_a_failure() {
    use std::io::Write;
    let port = raw_upstream(|mut s, _| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
              19\r\ndata: {\"delta\":\"hello\"}\n\n\r\ne\r\ndata: [DONE]\n\n\r\n",
        );
        std::thread::sleep(Duration::from_secs(10));
    });
    let sc = Sidecar::start(&config("10s"), PERMISSIVE_POLICY, &[]);
    let script = r#"
import sys, requests
proxy, url = sys.argv[1], sys.argv[2]
with requests.get(url, proxies={"http": proxy}, stream=True, timeout=10,
                  headers={"chaperone-request-id": "sse-done-1"}) as r:
    for line in r.iter_lines():
        if line == b"data: [DONE]":
            print("done", r.status_code)
            break
"#;
    let out = Command::new(python())
        .args([
            "-c",
            script,
            &sc.proxy_url(),
            &format!("http://127.0.0.1:{port}/v1/chat/completions"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "done 200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let l = line_for(&sc, "sse-done-1");
    assert_eq!(l["status"], 200, "{l}");
    assert_eq!(l["completion"], "client_closed", "{l}");
    assert_eq!(l["error"], Value::Null, "{l}");
    assert_eq!(l["bytes_out"], 39, "both events reached the app: {l}");
}

/// An upstream that breaks off mid-body: `response_incomplete`, with the error.
#[test]
fn an_upstream_that_breaks_off_is_response_incomplete() {
    use std::io::Write;
    let port = raw_upstream(|mut s, _| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"partial\":",
        );
        let _ = s.flush();
        std::thread::sleep(Duration::from_millis(200));
        // Dropped: the connection closes 989 bytes short.
    });
    let sc = Sidecar::start(&config("10s"), PERMISSIVE_POLICY, &[]);
    let (rc, _, _) = curl_raw(&[
        "-x",
        &sc.proxy_url(),
        "-H",
        "chaperone-request-id: broken-1",
        &format!("http://127.0.0.1:{port}/v1/batch"),
    ]);
    assert_ne!(rc, 0, "curl saw the short body");
    let l = line_for(&sc, "broken-1");
    assert_eq!(l["completion"], "response_incomplete", "{l}");
    assert!(
        l["error"].as_str().unwrap_or("").contains("upstream body"),
        "{l}"
    );
}

/// A response that ends with trailers (gRPC's shape) is complete when they arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_trailers_is_complete() {
    let up = Upstream::start().await;
    let sc = Sidecar::start(&config("10s"), PERMISSIVE_POLICY, &[]);
    // HTTP/1.1 (chunked trailers) through the forward proxy, and HTTP/2 (a trailing HEADERS
    // frame; hyper's server does not poll the body again after it) in reverse mode.
    let upstream = format!("127.0.0.1:{}", up.addr.port());
    let h1 = ["-x", &sc.proxy_url(), "--raw"];
    let h2 = [
        "--http2-prior-knowledge",
        "-H",
        &format!("Host: {upstream}"),
    ];
    for (id, how, url) in [
        ("trailers-h1", &h1[..], format!("http://{upstream}/grpc")),
        ("trailers-h2", &h2[..], format!("{}/grpc", sc.proxy_url())),
    ] {
        let mut args = how.to_vec();
        let rid = format!("chaperone-request-id: {id}");
        args.extend(["-H", "TE: trailers", "-H", &rid, &url]);
        let (rc, code, _) = curl_raw(&args);
        assert_eq!((rc, code), (0, 200), "{id}");
        let l = line_for(&sc, id);
        assert_eq!(l["completion"], "complete", "{l}");
        assert_eq!(l["error"], Value::Null, "{l}");
    }
}
