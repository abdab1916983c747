//! Connections to upstreams under a hostile or runaway client (issue 20.2): resetting
//! HTTP/2 streams at a steady pace must not cost the upstream one connection per stream, and
//! no client holds more than `max_connections_per_upstream` open to one upstream.
//!
//! The client is hyper's HTTP/2 client over prior knowledge (a reset is dropping a response
//! future: hyper sends RST_STREAM(CANCEL)); the upstream a plain HTTP/1.1 server that counts
//! what it accepts.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP/1.1 keep-alive upstream answering every request `delay` after reading its head.
struct Counting {
    port: u16,
    /// Connections accepted.
    accepted: Arc<AtomicUsize>,
    /// Request heads read.
    requests: Arc<AtomicUsize>,
    /// Connections open now, and the most open at once.
    open: Arc<AtomicUsize>,
    most_open: Arc<AtomicUsize>,
}

impl Counting {
    async fn start(delay: Duration) -> Counting {
        Counting::start_split(delay, Duration::ZERO).await
    }

    /// As [`Counting::start`], but the body's second byte comes `pause` after the head and
    /// the first.
    async fn start_split(delay: Duration, pause: Duration) -> Counting {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let c = Counting {
            port,
            accepted: Arc::default(),
            requests: Arc::default(),
            open: Arc::default(),
            most_open: Arc::default(),
        };
        let (accepted, requests, open, most_open) = (
            c.accepted.clone(),
            c.requests.clone(),
            c.open.clone(),
            c.most_open.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                most_open.fetch_max(now, Ordering::SeqCst);
                let (requests, open) = (requests.clone(), open.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    'conn: loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            requests.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\no";
                            if sock.write_all(answer).await.is_err() {
                                break 'conn;
                            }
                            if !pause.is_zero() {
                                tokio::time::sleep(pause).await;
                            }
                            if sock.write_all(b"k").await.is_err() {
                                break 'conn;
                            }
                        }
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        c
    }
}

impl Counting {
    /// The upstream read `requests` request heads, over at most `most` connections.
    fn served_over_at_most(&self, requests: usize, most: usize, what: &str) {
        assert_eq!(self.requests.load(Ordering::SeqCst), requests);
        let accepted = self.accepted.load(Ordering::SeqCst);
        eprintln!("{accepted} upstream connections for {requests} {what}");
        assert!(
            accepted <= most,
            "{accepted} upstream connections for {requests} {what}"
        );
    }
}

/// An HTTP/2 connection with prior knowledge to the sidecar's proxy listener.
async fn h2_client(sc: &Sidecar) -> SendRequest<Empty<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(sc.proxy).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("an HTTP/2 connection to the proxy");
    tokio::spawn(conn);
    send
}

fn get(port: u16, id: &str) -> hyper::Request<Empty<Bytes>> {
    hyper::Request::get(format!("http://127.0.0.1:{port}/v1/{id}"))
        .header("chaperone-request-id", id)
        .body(Empty::new())
        .unwrap()
}

fn config(port: u16, extra: &[(&str, &str)]) -> String {
    let mut cfg = Cfg::new().set("workers", "1").set(
        "routes",
        &format!("- name: counted\n  match: {{ host: 127.0.0.1, port: {port} }}"),
    );
    for (k, v) in extra {
        cfg = cfg.set(k, v);
    }
    cfg.yaml()
}

/// Waits (up to 10 s) until `n` says at least `want`.
async fn reaches(n: &AtomicUsize, want: usize) {
    for _ in 0..1000 {
        if n.load(Ordering::SeqCst) >= want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("reached only {} of {want}", n.load(Ordering::SeqCst));
}

/// Each stream is reset once its request has reached the upstream, which answers 50 ms later;
/// the next stream follows 5 ms after the reset. Cancelling each exchange would close its
/// HTTP/1.1 connection, so every stream would need a new one (100 for 100). Finished in the
/// background, the connections go back to the pool: about as many as the upstream has
/// requests in hand at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_stream_resets_do_not_cost_an_upstream_connection_each() {
    const STREAMS: usize = 100;
    let up = Counting::start(Duration::from_millis(50)).await;
    let sc = Sidecar::start(&config(up.port, &[]), PERMISSIVE_POLICY, &[]);
    let mut send = h2_client(&sc).await;
    for i in 0..STREAMS {
        let seen = up.requests.load(Ordering::SeqCst);
        send.ready().await.expect("the client connection stays up");
        let mut response = Box::pin(send.send_request(get(up.port, &format!("reset-{i}"))));
        tokio::select! {
            r = &mut response => panic!("stream {i} was answered before its reset: {r:?}"),
            () = reaches(&up.requests, seen + 1) => {}
        }
        drop(response);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    up.served_over_at_most(STREAMS, STREAMS / 5, "reset streams");

    // The client's connection still serves.
    let answer = send.send_request(get(up.port, "after")).await.unwrap();
    assert_eq!(answer.status(), 200);

    // Every reset stream has its one line.
    let lines = sc.log_lines(STREAMS + 1);
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for l in &lines {
        if let Some(id) = l["request_id"].as_str() {
            *per_id.entry(id.to_string()).or_default() += 1;
        }
    }
    for i in 0..STREAMS {
        assert_eq!(per_id.get(&format!("reset-{i}")), Some(&1), "reset-{i}");
    }
}

/// Each stream is reset once its response head has arrived, while the upstream still owes the
/// body's last byte (50 ms later). Dropped mid-body, an HTTP/1.1 response closes its
/// connection unless the rest is read: the pool reads a short rest to its end in the
/// background, so the connections go back to the pool rather than one per stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_resets_after_the_response_head_do_not_cost_an_upstream_connection_each() {
    const STREAMS: usize = 40;
    let up = Counting::start_split(Duration::ZERO, Duration::from_millis(50)).await;
    let sc = Sidecar::start(&config(up.port, &[]), PERMISSIVE_POLICY, &[]);
    let mut send = h2_client(&sc).await;
    for i in 0..STREAMS {
        send.ready().await.expect("the client connection stays up");
        let response = send
            .send_request(get(up.port, &format!("head-{i}")))
            .await
            .expect("a response head");
        assert_eq!(response.status(), 200);
        drop(response);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    up.served_over_at_most(STREAMS, STREAMS / 4, "streams reset after the head");
    let lines = sc.log_lines(STREAMS);
    assert_eq!(lines.len(), STREAMS, "one line per stream");
}

/// With the cap at 3, nine requests at once to an upstream taking 300 ms each reach it over
/// at most three connections: the rest wait for one to come back to the pool, and all are
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_one_upstream_are_capped_and_waiting_requests_reuse_them() {
    let up = Counting::start(Duration::from_millis(300)).await;
    let sc = Sidecar::start(
        &config(up.port, &[("max_connections_per_upstream", "3")]),
        PERMISSIVE_POLICY,
        &[],
    );
    let send = h2_client(&sc).await;
    let calls: Vec<_> = (0..9)
        .map(|i| {
            let mut send = send.clone();
            let req = get(up.port, &format!("capped-{i}"));
            tokio::spawn(async move {
                send.ready().await.unwrap();
                let r = send.send_request(req).await.unwrap();
                let status = r.status();
                let body = r.into_body().collect().await.unwrap().to_bytes();
                (status, body)
            })
        })
        .collect();
    for c in calls {
        let (status, body) = c.await.unwrap();
        assert_eq!(status, 200, "{body:?}");
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 9);
    let most = up.most_open.load(Ordering::SeqCst);
    assert!(most <= 3, "{most} connections open at once past a cap of 3");
}

/// When the capped connections stay busy past the connect timeout, the request waiting for
/// one is refused 503 `too_many_connections`, naming the setting, and logged so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_past_the_connect_timeout_for_a_capped_upstream_gets_503() {
    let up = Counting::start(Duration::from_secs(3)).await;
    let sc = Sidecar::start(
        &config(
            up.port,
            &[
                ("max_connections_per_upstream", "2"),
                ("timeouts", "connect: 300ms\nresponse_head: 5s"),
            ],
        ),
        PERMISSIVE_POLICY,
        &[],
    );
    let send = h2_client(&sc).await;
    let busy: Vec<_> = (0..2)
        .map(|i| {
            let mut send = send.clone();
            let req = get(up.port, &format!("busy-{i}"));
            tokio::spawn(async move {
                send.ready().await.unwrap();
                send.send_request(req).await.unwrap().status()
            })
        })
        .collect();
    reaches(&up.requests, 2).await;
    let mut send3 = send.clone();
    send3.ready().await.unwrap();
    let r = send3.send_request(get(up.port, "third")).await.unwrap();
    let status = r.status();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("too_many_connections") && body.contains("max_connections_per_upstream"),
        "{body}"
    );
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    for b in busy {
        assert_eq!(b.await.unwrap(), 200);
    }
    let line = sc
        .lines_where(3, |l| l["request_id"] == "third")
        .into_iter()
        .next()
        .expect("a line for the refused request");
    assert_eq!(line["status"], 503, "{line}");
    assert_eq!(line["error"], "too_many_connections", "{line}");
}
