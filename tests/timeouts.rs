//! Timeouts as long calls need them (DESIGN §9): `response_head` (default 300 s, as long as an
//! LLM may think) and `idle` (silence inside a body), globally and per route; a stream that
//! keeps sending is never cut.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Two routes to `port`: `/fast/` with its own 1 s `response_head` and `idle`, everything else
/// on the global timeouts (defaults, or `global`).
fn config(port: u16, global: Option<&str>) -> String {
    let mut cfg = Cfg::new().set("strip", "mode: strip").set(
        "routes",
        &format!(
            "- name: fast\n  match: {{ host: 127.0.0.1, port: {port}, path_prefix: /fast/ }}\n  \
             timeouts: {{ response_head: 1s, idle: 1s }}\n\
             - name: slow\n  match: {{ host: 127.0.0.1, port: {port} }}"
        ),
    );
    if let Some(g) = global {
        cfg = cfg.set("timeouts", g);
    }
    cfg.yaml()
}

fn line(sc: &Sidecar, request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(l) = sc
            .log_lines(0)
            .into_iter()
            .find(|l| l["request_id"] == request_id)
        {
            return l;
        }
        assert!(Instant::now() < deadline, "no line for {request_id}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_route_answers_504_after_its_own_response_head_while_the_default_waits_longer() {
    let up = Silent::start();
    let sc = Sidecar::start(&config(up.port, None), PERMISSIVE_POLICY, &[]);
    let t = Instant::now();
    let (code, body) = curl(&[
        "-x",
        &sc.proxy_url(),
        "-H",
        "chaperone-request-id: fast-504",
        &format!("http://127.0.0.1:{}/fast/v1/chat", up.port),
    ]);
    assert_eq!(code, 504, "{body}");
    assert!(
        body.contains("upstream_timeout") && body.contains("1s"),
        "{body}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(line(&sc, "fast-504")["error"], "upstream_timeout");
    // The same upstream on the global default (300 s): still waiting when the client gives
    // up after 3 s, where the former 30 s default would have been as patient but no more.
    let (rc, _, _) = curl_raw(&[
        "-m",
        "3",
        "-x",
        &sc.proxy_url(),
        &format!("http://127.0.0.1:{}/v1/chat", up.port),
    ]);
    assert_eq!(rc, 28, "the default response_head is long");
}

#[test]
fn the_global_response_head_applies_and_its_former_name_still_works() {
    let up = Silent::start();
    for key in ["response_head", "request"] {
        let sc = Sidecar::start(
            &config(up.port, Some(&format!("{key}: 1s"))),
            PERMISSIVE_POLICY,
            &[],
        );
        let t = Instant::now();
        let (code, body) = curl(&[
            "-x",
            &sc.proxy_url(),
            &format!("http://127.0.0.1:{}/v1/chat", up.port),
        ]);
        assert_eq!(code, 504, "{key}: {body}");
        assert!(t.elapsed() < Duration::from_secs(5), "{key}");
    }
}

#[test]
fn bad_timeouts_are_config_errors_with_file_line_and_key() {
    let (_dir, file) = temp_file(
        "config.yaml",
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nidentity: { id: spiffe://t.test/x, workload: w, environment: e }\n\
         routes:\n  - name: r\n    match: { host: a.test }\n    timeouts: { idle: soon }\n\
         timeouts:\n  request: 10s\n  response_head: 20s\n",
    );
    let (code, _, err) = chaperone("check", &["--config", file.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("config.yaml:7:") && err.contains("routes[0].timeouts.idle"),
        "{err}"
    );
    assert!(
        err.contains("timeouts.request") && err.contains("response_head"),
        "{err}"
    );
}

/// A body that falls silent longer than the route's `idle` is given up on; one that keeps
/// sending (SSE every 300 ms for over 2 s, idle 1 s) is relayed as it arrives and never cut.
#[test]
fn silence_in_a_body_is_cut_and_a_stream_that_keeps_sending_is_not() {
    let port = raw_upstream(|mut s, head| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        if head.contains("/fast/stall") {
            let _ = s.write_all(b"c\r\ndata: first\n\r\n");
            std::thread::sleep(Duration::from_secs(4));
            return;
        }
        for i in 0..8 {
            let event = format!("data: {i}\n\n");
            let _ = s.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes());
            std::thread::sleep(Duration::from_millis(300));
        }
        let _ = s.write_all(b"0\r\n\r\n");
    });
    let sc = Sidecar::start(&config(port, None), PERMISSIVE_POLICY, &[]);

    // Stalled: the client gets the first event, then the response breaks off.
    let (rc, _, _) = curl_raw(&[
        "-N",
        "-x",
        &sc.proxy_url(),
        "-H",
        "chaperone-request-id: stalled",
        &format!("http://127.0.0.1:{port}/fast/stall"),
    ]);
    assert_ne!(rc, 0, "a cut response is not a success for the client");
    let l = line(&sc, "stalled");
    assert_eq!(l["completion"], "response_incomplete", "{l}");
    assert!(
        l["error"].as_str().unwrap().contains("timeouts.idle"),
        "{l}"
    );
    assert!(
        l["duration_ms"].as_f64().unwrap() < 3000.0,
        "cut after ~1 s: {l}"
    );

    // Streaming for 2.4 s in events 300 ms apart, on the same 1 s idle: all arrive, one by one.
    let mut child = Command::new("curl")
        .args([
            "-sN",
            "-x",
            &sc.proxy_url(),
            "-H",
            "chaperone-request-id: streaming",
        ])
        .arg(format!("http://127.0.0.1:{port}/fast/stream"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut at = Vec::new();
    for l in BufReader::new(child.stdout.take().unwrap()).lines() {
        let l = l.unwrap();
        if l.starts_with("data: ") {
            at.push((l, start.elapsed()));
        }
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(at.len(), 8, "{at:?}");
    assert!(
        at[7].1 - at[0].1 > Duration::from_millis(1500),
        "relayed as they came, not buffered: {at:?}"
    );
    let l = line(&sc, "streaming");
    assert_eq!(l["completion"], "complete", "{l}");
    assert_eq!(l["error"], Value::Null, "{l}");
}

/// A sidecar with one route to `up` and `key: value` set.
fn routed_sidecar(up: &Upstream, key: &str, value: &str) -> Sidecar {
    let cfg = Cfg::new()
        .set(key, value)
        .set(
            "routes",
            &format!(
                "- name: up\n  match: {{ host: 127.0.0.1, port: {} }}",
                up.addr.port()
            ),
        )
        .yaml();
    Sidecar::start(&cfg, PERMISSIVE_POLICY, &[])
}

/// A client connection must get its first request in within `header_read`, and one with
/// nothing in flight is closed after `header_read` of silence, whichever HTTP version it
/// speaks: a connection that sends nothing, one that drips the HTTP/2 preface, and one that
/// sits idle after its HTTP/2 SETTINGS are all closed (and counted). A CONNECT tunnel that
/// falls quiet is the tunnel's business (`idle`), not this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_dripping_and_idle_client_connections_are_closed() {
    use std::io::Read;
    let up = Upstream::start().await;
    let sc = routed_sidecar(&up, "timeouts", "header_read: 1s");
    let closed_within = |mut s: std::net::TcpStream, what: &str| {
        s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        let t = Instant::now();
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue, // an h2 server's SETTINGS, say
                Err(e) => panic!("{what}: still open after {:?}: {e}", t.elapsed()),
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "{what}: {:?}",
            t.elapsed()
        );
    };
    // Sends nothing.
    closed_within(std::net::TcpStream::connect(sc.proxy).unwrap(), "silent");
    // Drips the HTTP/2 preface, a byte every 300 ms.
    let drip = std::net::TcpStream::connect(sc.proxy).unwrap();
    let dripper = drip.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        for b in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
            if (&dripper).write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    drip.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    closed_within(drip, "dripping preface");
    let _ = t.join();
    // A whole preface and SETTINGS, then nothing.
    let mut h2 = std::net::TcpStream::connect(sc.proxy).unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    closed_within(h2, "idle after SETTINGS");
    // (Counted as the connection is let go: the client may see it closed a moment before.)
    let want = r#"chaperone_connections_closed_total{stage="main",reason="silent"} 3"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut metrics = String::new();
    while !metrics.contains(want) && Instant::now() < deadline {
        metrics = admin_get(sc.admin, "/metrics").1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(metrics.contains(want), "{metrics}");
    // A keep-alive HTTP/1.1 client that made a request is closed after header_read too.
    let mut h1 = std::net::TcpStream::connect(sc.proxy).unwrap();
    write!(
        h1,
        "GET http://127.0.0.1:{}/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        up.addr.port()
    )
    .unwrap();
    closed_within(h1, "idle keep-alive");
}

/// Each listener keeps at most `max_connections` open: one more gets a 503 that says why
/// and is counted; the ones open are served, and room comes back when they close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_over_its_connection_cap_refuses_with_a_reason() {
    let up = Upstream::start().await;
    let sc = routed_sidecar(&up, "max_connections", "3");
    let held: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(sc.proxy).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (code, body) = raw_request(
        sc.proxy,
        "GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("max_connections"), "{body}");
    let (_, metrics) = admin_get(sc.admin, "/metrics");
    assert!(
        metrics.contains(r#"chaperone_connections_refused_total{stage="main"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"chaperone_connections_open{stage="main"} 3"#),
        "{metrics}"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let (code, _) = curl(&[
        "-x",
        &sc.proxy_url(),
        &format!("http://127.0.0.1:{}/ok", up.addr.port()),
    ]);
    assert_eq!(code, 200);
}

/// A blind CONNECT tunnel silent for longer than header_read, once it has started, stays
/// open (its own limit is `idle`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_tunnel_outlives_header_read() {
    use std::io::Read;
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                let mut s = s;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let cfg = Cfg::new().set("timeouts", "header_read: 1s").yaml();
    let sc = Sidecar::start(&cfg, PERMISSIVE_POLICY, &[]);
    let mut s = std::net::TcpStream::connect(sc.proxy).unwrap();
    write!(
        s,
        "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.contains(" 200"), "{status}");
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l == "\r\n" {
            break;
        }
    }
    // (What a tunnel carries is told by its first bytes, which must come within header_read.)
    s.write_all(b"hello\n").unwrap();
    let mut back = String::new();
    r.read_line(&mut back).unwrap();
    assert_eq!(back, "hello\n");
    std::thread::sleep(Duration::from_millis(2500));
    s.write_all(b"ping\n").unwrap();
    back.clear();
    r.read_line(&mut back).unwrap();
    assert_eq!(back, "ping\n");
}
