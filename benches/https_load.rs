//! HTTPS load generator for benches/load-https.sh: keep-alive HTTP/1.1 over TLS, directly or
//! through an HTTP proxy's CONNECT (as an app with HTTPS_PROXY does), trusting a given CA.
//! Connections are opened (and TLS sessions established) before the clock starts, so the
//! figures are for warm connections.
//!
//! `cargo bench --bench https_load -- --url https://localhost:8443/ --cacert ca.pem
//!  [--proxy 127.0.0.1:15001] [--connections 64] [--seconds 10]`
//! prints `requests_per_second p50_us p99_us`. Without arguments it prints usage and exits.
//!
//! With `--handshakes N` (and `--proxy`) it instead times N CONNECT-and-TLS handshakes, one
//! at a time, each to a host the proxy has not seen (so the proxy issues a leaf certificate),
//! then N to the URL's host (its leaf cached), and prints `new_p50_us warm_p50_us`; without
//! `--proxy`, only the URL's host (`- warm_p50_us`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    url: http::Uri,
    cacert: String,
    proxy: Option<String>,
    connections: usize,
    seconds: u64,
    handshakes: usize,
}

fn args() -> Option<Args> {
    let mut it = std::env::args().skip(1).filter(|a| a != "--bench");
    let (mut url, mut cacert, mut proxy, mut connections, mut seconds) = (None, None, None, 1, 10);
    let mut handshakes = 0;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--url" => url = it.next().map(|u| u.parse().expect("url")),
            "--cacert" => cacert = it.next(),
            "--proxy" => proxy = it.next(),
            "--connections" => connections = it.next()?.parse().ok()?,
            "--seconds" => seconds = it.next()?.parse().ok()?,
            "--handshakes" => handshakes = it.next()?.parse().ok()?,
            _ => return None,
        }
    }
    Some(Args {
        url: url?,
        cacert: cacert?,
        proxy,
        connections,
        seconds,
        handshakes,
    })
}

/// TCP to the host (through the proxy's CONNECT when there is one), then TLS.
async fn tls_stream(
    proxy: Option<&str>,
    host: &str,
    port: u16,
    tls: &tokio_rustls::TlsConnector,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = match proxy {
        None => TcpStream::connect((host, port)).await.unwrap(),
        Some(p) => {
            let mut s = TcpStream::connect(p).await.unwrap();
            s.write_all(
                format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(s.read_u8().await.unwrap());
            }
            assert!(
                head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"),
                "{}",
                String::from_utf8_lossy(&head)
            );
            s
        }
    };
    tcp.set_nodelay(true).unwrap();
    tls.connect(host.to_string().try_into().unwrap(), tcp)
        .await
        .unwrap()
}

async fn connect(
    a: &Args,
    tls: &tokio_rustls::TlsConnector,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let host = a.url.host().unwrap().to_string();
    let port = a.url.port_u16().unwrap_or(443);
    let stream = tls_stream(a.proxy.as_deref(), &host, port, tls).await;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// The median of N handshakes, one at a time, to the hosts `host(i)` names.
async fn handshake_p50(
    a: &Args,
    tls: &tokio_rustls::TlsConnector,
    host: impl Fn(usize) -> String,
) -> f64 {
    let port = a.url.port_u16().unwrap_or(443);
    let mut took = Vec::with_capacity(a.handshakes);
    for i in 0..a.handshakes {
        let t = Instant::now();
        let s = tls_stream(a.proxy.as_deref(), &host(i), port, tls).await;
        took.push(t.elapsed().as_nanos() as u64);
        drop(s);
    }
    took.sort_unstable();
    took[took.len() / 2] as f64 / 1000.0
}

fn main() {
    let Some(a) = args() else {
        eprintln!(
            "usage: https_load --url URL --cacert PEM [--proxy HOST:PORT] [--connections N] [--seconds S]"
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(&a.cacert).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        if a.handshakes > 0 {
            // Hosts nobody has named before in this proxy's life: the run's nanos in the name.
            let run = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let known = a.url.host().unwrap().to_string();
            let warm = handshake_p50(&a, &tls, |_| known.clone()).await;
            if a.proxy.is_none() {
                // Direct, only the host that resolves: the TLS handshake's own cost.
                println!("- {warm:.0}");
                return;
            }
            let new = handshake_p50(&a, &tls, |i| format!("h{i}-{run}.bench.test")).await;
            println!("{new:.0} {warm:.0}");
            return;
        }
        let a = Arc::new(a);
        let mut senders = Vec::new();
        for _ in 0..a.connections {
            senders.push(connect(&a, &tls).await);
        }
        let deadline = Instant::now() + Duration::from_secs(a.seconds);
        let mut tasks = Vec::new();
        for mut send in senders {
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(100_000);
                let host = a.url.authority().unwrap().to_string();
                let path = a
                    .url
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or("/".into());
                while Instant::now() < deadline {
                    let req = http::Request::get(path.as_str())
                        .header("host", host.as_str())
                        .header(
                            "authorization",
                            "Bearer sk-proj-Ab1_Cd2-Ef3_Gh4-Ab1_Cd2-Ef3_Gh4-Ab1_Cd2-Ef3_Gh4-",
                        )
                        .header("chaperone-purpose", "bench")
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let t = Instant::now();
                    send.ready().await.unwrap();
                    let resp = send.send_request(req).await.unwrap();
                    assert!(resp.status().is_success(), "status {}", resp.status());
                    resp.into_body().collect().await.unwrap();
                    lat.push(t.elapsed().as_nanos() as u64);
                }
                lat
            }));
        }
        let started = Instant::now();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let secs = started.elapsed().as_secs_f64().max(a.seconds as f64);
        all.sort_unstable();
        let pct =
            |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0;
        println!(
            "{:.0} {:.0} {:.0}",
            all.len() as f64 / secs,
            pct(0.50),
            pct(0.99)
        );
    });
}
