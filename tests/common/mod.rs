//! Test harness: the real `chaperone` binary, real upstreams on 127.0.0.1 port 0.
#![allow(dead_code)]

pub mod netns;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub version: String,
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// The bearer token a recorded request carried.
#[allow(dead_code)]
pub fn bearer(r: &Recorded) -> String {
    r.header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .expect("bearer token")
        .to_string()
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// Everything the upstream saw, as one string, for "never contains" checks.
    pub fn all_text(&self) -> String {
        format!(
            "{} {} {:?} {}",
            self.method, self.uri, self.headers, self.body
        )
    }
}

/// A loopback upstream that records every request and answers 200 JSON.
/// `/slow` waits 600 ms before answering.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Recorded>>>,
    pub connections: Arc<AtomicUsize>,
}

/// A test CA and a server certificate for `localhost` and 127.0.0.1 signed by it.
pub struct TestPki {
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
    /// The server certificate (localhost, 127.0.0.1) and its key, for servers not in Rust.
    pub server_cert_pem: String,
    pub server_key_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test upstream CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = params.signed_by(&key, &issuer).unwrap();
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let mut server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TestPki {
            ca_pem: ca_cert.pem(),
            server: Arc::new(server),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
            issuer,
        }
    }

    /// The server certificate and key as files, for servers not in Rust: (their directory,
    /// cert.pem, key.pem).
    pub fn server_files(&self) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &self.server_cert_pem).unwrap();
        std::fs::write(&key, &self.server_key_pem).unwrap();
        (dir, cert, key)
    }

    /// A client certificate for `dns_name` signed by the test CA: (cert PEM, key PEM).
    #[allow(dead_code)]
    pub fn client_cert(&self, dns_name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![dns_name.to_string()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

impl Upstream {
    pub async fn start() -> Upstream {
        Self::start_inner(None).await
    }

    /// An HTTPS upstream (HTTP/2 and HTTP/1.1 by ALPN) with the given PKI.
    pub async fn start_tls(pki: &TestPki) -> Upstream {
        Self::start_inner(Some(tokio_rustls::TlsAcceptor::from(pki.server.clone()))).await
    }

    async fn start_inner(tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (s2, c2) = (seen.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c2.fetch_add(1, Ordering::SeqCst);
                let seen = s2.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            let rec = Recorded {
                                version: format!("{:?}", parts.version),
                                method: parts.method.to_string(),
                                uri: parts.uri.to_string(),
                                headers: parts
                                    .headers
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.to_string(),
                                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                        )
                                    })
                                    .collect(),
                                body: String::from_utf8_lossy(&body).into_owned(),
                            };
                            seen.lock().push(rec);
                            if parts.uri.path() == "/slow" {
                                tokio::time::sleep(Duration::from_millis(600)).await;
                            }
                            if parts.uri.path() == "/grpc" {
                                // A gRPC-shaped answer: data, then trailers.
                                let mut trailers = http::HeaderMap::new();
                                trailers.insert("grpc-status", "0".parse().unwrap());
                                trailers.insert("grpc-message", "ok".parse().unwrap());
                                let body = Full::new(Bytes::from_static(b"\0\0\0\0\x02hi"))
                                    .with_trailers(async move { Some(Ok(trailers)) })
                                    .boxed_unsync();
                                let mut resp = Response::new(body);
                                resp.headers_mut()
                                    .insert("content-type", "application/grpc".parse().unwrap());
                                return Ok::<_, Infallible>(resp);
                            }
                            let mut resp = Response::new(
                                Full::new(Bytes::from_static(br#"{"ok":true}"#)).boxed_unsync(),
                            );
                            resp.headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            resp.headers_mut().insert(
                                "connection",
                                "keep-alive, x-upstream-hop".parse().unwrap(),
                            );
                            resp.headers_mut()
                                .insert("x-upstream-hop", "1".parse().unwrap());
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    match tls {
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            seen,
            connections,
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().clone()
    }
}

/// A running `chaperone` process with its own temp dir; killed on drop.
pub struct Sidecar {
    pub proxy: SocketAddr,
    /// Every proxy listener, main first, then stages in config order.
    pub proxies: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_chaperone")
}

/// A config whose policy permits everything except the purpose `exfiltrate` and the path
/// prefix `/forbidden`.
pub const PERMISSIVE_POLICY: &str = r#"@id("allow-all")
permit(principal, action, resource);
@id("no-exfiltration")
forbid(principal, action, resource) when { context.purpose == "exfiltrate" };
@id("no-forbidden-path")
forbid(principal, action, resource) when { context.path like "/forbidden*" };
"#;

impl Sidecar {
    /// Start with a config; `{dir}` in the YAML is replaced by the temp dir. Listen and admin
    /// must be 127.0.0.1:0; the bound addresses are read from the start-up banner.
    pub fn start(yaml: &str, policy: &str, env: &[(&str, &str)]) -> Sidecar {
        Self::start_with(yaml, policy, env, |_| {})
    }

    /// Like [`Sidecar::start`], with `prepare` run on the temp dir first (to create files the
    /// config names).
    pub fn start_with(
        yaml: &str,
        policy: &str,
        env: &[(&str, &str)],
        prepare: impl FnOnce(&Path),
    ) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path());
        std::fs::write(dir.path().join("policy.cedar"), policy).unwrap();
        let cfg = dir.path().join("config.yaml");
        std::fs::write(&cfg, yaml.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
        Self::spawn(dir, &[], &["run", "--config", cfg.to_str().unwrap()], env)
    }

    /// Like [`Sidecar::start`], run through `wrapper` (e.g. `ip netns exec NS setpriv
    /// --reuid U ...`); the temp dir is made readable to the user it runs as.
    pub fn start_wrapped(wrapper: &[&str], yaml: &str, policy: &str) -> Sidecar {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("policy.cedar"), policy).unwrap();
        let cfg = dir.path().join("config.yaml");
        std::fs::write(&cfg, yaml.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
        Self::spawn(
            dir,
            wrapper,
            &["run", "--config", cfg.to_str().unwrap()],
            &[],
        )
    }

    /// Start on embedded defaults (observe mode) on ephemeral ports.
    pub fn start_observe() -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        Self::spawn(
            dir,
            &[],
            &["run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
            &[],
        )
    }

    fn spawn(
        dir: tempfile::TempDir,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Sidecar {
        let stdout = dir.path().join("stdout.log");
        let stderr = dir.path().join("stderr.log");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.args(args)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut sc = Sidecar {
            proxy: "0.0.0.0:0".parse().unwrap(),
            proxies: Vec::new(),
            admin: "0.0.0.0:0".parse().unwrap(),
            child: Some(child),
            dir,
            stdout,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let all = std::fs::read_to_string(&sc.stderr).unwrap_or_default();
            // Whole lines only: the banner may be caught half-written.
            let text = &all[..all.rfind('\n').map_or(0, |i| i + 1)];
            let find = |marker: &str| {
                text.lines().find_map(|l| {
                    l.split_once(marker)
                        .map(|(_, rest)| rest.split_whitespace().next().unwrap().to_string())
                })
            };
            if let (Some(p), Some(a)) =
                (find("proxy listening on http://"), find("admin on http://"))
            {
                sc.proxy = p.parse().unwrap();
                sc.admin = a.parse().unwrap();
                sc.proxies = text
                    .lines()
                    .filter_map(|l| l.split_once("proxy listening on http://"))
                    .map(|(_, rest)| rest.split_whitespace().next().unwrap().parse().unwrap())
                    .collect();
                break;
            }
            if let Some(status) = sc.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("chaperone exited with {status}: {text}");
            }
            assert!(Instant::now() < deadline, "chaperone did not start: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
        sc
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy)
    }

    /// Purpose-log lines written to stdout so far (waits briefly for the writer thread).
    pub fn log_lines(&self, at_least: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines: Vec<serde_json::Value> = std::fs::read_to_string(&self.stdout)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            if lines.len() >= at_least || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The lines `keep` picks, once there are `n` of them (or after 10 s, with what there
    /// is): lines of other kinds, a tunnel's, say, may come first or in between.
    pub fn lines_where(
        &self,
        n: usize,
        keep: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines: Vec<serde_json::Value> =
                self.log_lines(0).into_iter().filter(|l| keep(l)).collect();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the process printed.
    pub fn output(&self) -> String {
        format!(
            "{}\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Assert that none of `secrets` appears in anything the sidecar printed (purpose log,
    /// diagnostics) or serves on `/metrics`.
    #[allow(dead_code)]
    pub fn assert_never_shows(&self, secrets: &[&str]) {
        let out = self.output();
        let (_, metrics) = admin_get(self.admin, "/metrics");
        for (i, secret) in secrets.iter().enumerate() {
            assert!(!out.contains(secret), "secret #{i} reached the output");
            assert!(!metrics.contains(secret), "secret #{i} reached /metrics");
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        sigterm_and_wait(&mut child, Duration::from_secs(20))
            .expect("chaperone did not exit after SIGTERM")
    }
}

/// Send `child` SIGTERM and wait up to `within` for it to exit: its status, or `None` if it
/// is still running.
fn sigterm_and_wait(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A plain HTTP/1.1 GET to the admin server.
pub fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    raw_request(
        admin,
        &format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"),
    )
}

/// Write raw bytes to an address and read one response (head, then `content-length` bytes
/// of body, or until the server closes); returns (status, text).
pub fn raw_request(addr: SocketAddr, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            });
            if len.is_some_and(|n| body.len() >= n) {
                break;
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Read the first response head from a buffered reader; returns the status.
pub fn read_status(r: &mut impl BufRead) -> u16 {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

pub fn reader(s: std::net::TcpStream) -> BufReader<std::net::TcpStream> {
    BufReader::new(s)
}

/// A hard-coded key with a real OpenAI project-key shape, unique per call.
pub fn fake_openai_key() -> String {
    let n: u64 = rand_u64();
    format!(
        "sk-proj-{:016x}{}",
        n, "Qw3_rTy7-uIo9pAs1dFg2hJk4lZx6cVb8nM0"
    )
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

/// Run a command and return (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install it: see .ci/run)"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run curl (silent) and return (exit code, HTTP status, body).
pub fn curl_raw(args: &[&str]) -> (i32, u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl: {e} (install it: see .ci/run)"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        out.status.code().unwrap_or(-1),
        code.trim().parse().unwrap_or(0),
        body.to_string(),
    )
}

/// curl that must succeed at the transport level; returns (HTTP status, body).
pub fn curl(args: &[&str]) -> (u16, String) {
    let (rc, code, body) = curl_raw(args);
    assert_eq!(rc, 0, "curl failed with exit code {rc}");
    (code, body)
}

/// A helper server run as a child process (an authorization server in Node or Python): its
/// stdout lines are recorded, it is ready once it prints `ready`, and it is killed on drop.
#[allow(dead_code)]
pub struct ServerProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    /// The port it bound, when it says so (`ready PORT`).
    pub port: Option<u16>,
}

#[allow(dead_code)]
impl ServerProcess {
    pub fn start(mut cmd: Command, what: &str) -> ServerProcess {
        use std::io::Read;
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let mut err_pipe = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let seen = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "ready" || line.starts_with("ready ") {
                    let _ = ready_tx.send(line.strip_prefix("ready ").and_then(|p| p.parse().ok()));
                }
                seen.lock().push(line);
            }
        });
        let e = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err_pipe.read(&mut buf) {
                e.lock().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let Ok(port) = ready_rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            panic!("{what} did not start: {}", stderr.lock().as_str());
        };
        ServerProcess {
            child,
            lines,
            stderr,
            port,
        }
    }

    /// Stdout lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Stdout lines starting with `prefix` once there are `n` of them (or after 5 s, with
    /// what there is): the server prints as it answers, and its output is read by another
    /// thread, so a line can trail the response the test already has.
    pub fn wait_lines_after(&self, prefix: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines = self.lines_after(prefix);
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stdout lines starting with `prefix`, with the prefix removed.
    pub fn lines_after(&self, prefix: &str) -> Vec<String> {
        self.lines
            .lock()
            .iter()
            .filter_map(|l| l.strip_prefix(prefix).map(str::to_owned))
            .collect()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().clone()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Verify a JWT against a JWKS fetched from `jwks_url` (with curl, trusting `ca` if given):
/// signature by the key its `kid` names, issuer and audience. Returns the claims.
#[allow(dead_code)]
pub fn verify_with_jwks(
    token: &str,
    jwks_url: &str,
    ca: Option<&Path>,
    issuer: &str,
    audience: &str,
) -> serde_json::Value {
    let mut args = vec!["--noproxy", "*"];
    if let Some(ca) = ca {
        args.extend(["--cacert", ca.to_str().unwrap()]);
    }
    args.push(jwks_url);
    let (code, body) = curl(&args);
    assert_eq!(code, 200, "{body}");
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&body).unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    let jwk = jwks
        .find(header.kid.as_deref().expect("kid"))
        .expect("the token's key is in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.set_audience(&[audience]);
    v.set_issuer(&[issuer]);
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
        .expect("signed by the authorization server")
        .claims
}

/// A Kubernetes tool (`kubectl`, `kubernetes-validate`, and the `python3` that has PyYAML)
/// from the venv `.ci/run` installs in `target/k8s-tools`, else from PATH.
#[allow(dead_code)]
/// The Python with the pinned test clients and servers (tests/support/requirements.txt):
/// the venv tests/run.sh makes under target/, so the machine's own Python packages are
/// neither needed nor touched.
pub fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-python/bin/python3");
    assert!(
        venv.exists(),
        "{} is missing: run tests/run.sh once, which makes it",
        venv.display()
    );
    venv
}

pub fn k8s_tool(name: &str) -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/k8s-tools/bin")
        .join(name);
    if venv.exists() {
        venv
    } else {
        PathBuf::from(name)
    }
}

/// Run a command that must succeed; its stdout.
#[allow(dead_code)]
pub fn must(cmd: &mut Command) -> String {
    let (ok, out, err) = run(cmd);
    assert!(ok, "{cmd:?} failed: {err}{out}");
    out
}

/// Run `chaperone SUB ARGS...`: (exit code, stdout, stderr).
#[allow(dead_code)]
pub fn chaperone(sub: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).arg(sub).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run curl as another user (uid and gid 65534, no groups) with `args`; the HTTP status it
/// printed. Needs root and util-linux `setpriv`.
#[allow(dead_code)]
pub fn curl_as_nobody(args: &[&str]) -> String {
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("setpriv (util-linux)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file `name` holding `text` in a new temp dir (kept alive by the returned guard).
#[allow(dead_code)]
pub fn temp_file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// A JSON array of strings (container args, say) as `&str`s.
#[allow(dead_code)]
pub fn strs(v: &serde_json::Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

/// A sidecar configuration built from top-level sections: tests set or replace a whole section
/// (`stages`, `credentials`, ...) by its key, never by editing YAML text. `{dir}` stands for
/// the sidecar's temp dir, as in [`Sidecar::start`].
#[derive(Clone, Debug)]
pub struct Cfg {
    sections: Vec<(String, String)>,
}

#[allow(dead_code)]
impl Cfg {
    /// Ephemeral listen and admin ports, a test identity, `{dir}/policy.cedar`, JSON lines on
    /// stdout.
    pub fn new() -> Cfg {
        Cfg {
            sections: Vec::new(),
        }
        .set("listen", "127.0.0.1:0")
        .set("admin", "127.0.0.1:0")
        .set(
            "identity",
            "id: spiffe://test.local/ns/ml/sa/inference\nworkload: test-inference\nenvironment: test",
        )
        .set("policy", "file: {dir}/policy.cedar")
        .set("log", "format: json\noutput: stdout")
    }

    /// Set section `key` to `value`: a scalar, or a block (indented under the key here).
    pub fn set(mut self, key: &str, value: &str) -> Cfg {
        let value = value.trim_end().to_string();
        match self.sections.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.sections.push((key.to_string(), value)),
        }
        self
    }

    /// Leave section `key` out.
    pub fn unset(mut self, key: &str) -> Cfg {
        self.sections.retain(|(k, _)| k != key);
        self
    }

    /// The YAML text.
    pub fn yaml(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.sections {
            if v.contains('\n') || v.contains(": ") || v.starts_with("- ") {
                out.push_str(&format!("{k}:\n"));
                for line in v.lines() {
                    out.push_str(&format!("  {line}\n"));
                }
            } else {
                out.push_str(&format!("{k}: {v}\n"));
            }
        }
        out
    }
}

/// nginx from Debian, on loopback, with a `server { ... }` block of the test's: `{port}` in it
/// is the port it listens on, `{dir}` its own temp dir (certificates go there). nginx takes a
/// fixed port, so a free one is picked and, should another process bind it first, nginx is
/// started again on another.
#[allow(dead_code)]
pub struct Nginx {
    pub port: u16,
    child: Child,
    pub dir: tempfile::TempDir,
}

#[allow(dead_code)]
impl Nginx {
    pub fn start(server: &str, files: &[(&str, &str)]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let d = dir.path().to_str().unwrap().to_string();
        let log = dir.path().join("error.log");
        let (port, child) = on_a_free_port("nginx", &log, |port| {
            let conf = format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  \
                 fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  {}\n}}\n",
                server
                    .replace("{port}", &port.to_string())
                    .replace("{dir}", &d)
            );
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf).unwrap();
            Command::new("nginx")
                .args(["-c", conf_path.to_str().unwrap(), "-e"])
                .arg(&log)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("nginx (apt-get install nginx-light; tests/run.sh does)")
        });
        Nginx { port, child, dir }
    }
}

/// Start a server that takes a fixed port (`start` is given one that was free a moment ago)
/// and wait until it accepts connections; should another process take the port first (the
/// server exits saying so in `log`), try another.
fn on_a_free_port(what: &str, log: &Path, start: impl Fn(u16) -> Child) -> (u16, Child) {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = start(port);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (port, child);
            }
            if let Some(status) = child.try_wait().unwrap() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                assert!(
                    text.contains("Address already in use"),
                    "{what} exited with {status}: {text}"
                );
                break;
            }
            assert!(Instant::now() < deadline, "{what} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("{what} found no free port in 5 tries");
}

/// Squid from Debian as a corporate egress proxy on loopback, requiring Basic proxy
/// authentication (`user`/`password` below) and logging each request as
/// `METHOD URL STATUS USER` (`access()`).
pub struct Squid {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Squid {
    pub const USER: &'static str = "svc-egress";
    pub const PASSWORD: &'static str = "squid-proxy-pw-5b2f";

    pub fn start() -> Squid {
        let dir = tempfile::tempdir().unwrap();
        // Squid started as root runs as its own user, which must write its logs here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        let (ok, hash, err) =
            run(Command::new("openssl").args(["passwd", "-apr1", Self::PASSWORD]));
        assert!(ok, "{err}");
        std::fs::write(
            dir.path().join("passwd"),
            format!("{}:{}\n", Self::USER, hash.trim()),
        )
        .unwrap();
        let log = dir.path().join("cache.log");
        let (port, child) = on_a_free_port("squid", &log, |port| {
            let conf = format!(
                "http_port 127.0.0.1:{port}\npid_filename {d}/squid.pid\n\
                 logformat chap %rm %ru %>Hs %un\naccess_log stdio:{d}/access.log chap\n\
                 cache_log {d}/cache.log\ncache deny all\ncache_mem 8 MB\ncoredump_dir {d}\n\
                 shutdown_lifetime 0 seconds\n\
                 auth_param basic program /usr/lib/squid/basic_ncsa_auth {d}/passwd\n\
                 acl authed proxy_auth REQUIRED\nhttp_access allow authed\nhttp_access deny all\n"
            );
            let conf_path = dir.path().join("squid.conf");
            std::fs::write(&conf_path, conf).unwrap();
            Command::new("squid")
                .args(["-N", "-f", conf_path.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("squid (apt-get install squid; tests/run.sh does)")
        });
        Squid { port, child, dir }
    }

    /// The requests squid has logged so far, `METHOD URL STATUS USER` each (it writes its
    /// log as requests end, so wait for `at_least`).
    pub fn access(&self, at_least: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines: Vec<String> = std::fs::read_to_string(self.dir.path().join("access.log"))
                .unwrap_or_default()
                .lines()
                // The readiness probe: a connection that sent nothing.
                .filter(|l| !l.contains("error:transaction-end-before-headers"))
                .map(str::to_owned)
                .collect();
            if lines.len() >= at_least || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    /// SIGTERM, nginx's fast shutdown: the master stops its workers, then exits. A SIGKILL
    /// to the master alone left each worker running, listening, under PID 1.
    fn drop(&mut self) {
        if sigterm_and_wait(&mut self.child, Duration::from_secs(5)).is_some() {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An upstream that accepts connections, reads the request and never answers.
#[allow(dead_code)]
pub struct Silent {
    pub port: u16,
    accepted: Arc<AtomicUsize>,
}

#[allow(dead_code)]
impl Silent {
    pub fn start() -> Silent {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for mut s in listener.incoming().flatten() {
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = std::io::Read::read(&mut s, &mut [0u8; 4096]);
                count.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        Silent { port, accepted }
    }

    pub fn wait_accepted(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.accepted.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "the request never reached the upstream"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An upstream that answers each connection with `respond`, given the socket and the request
/// head it read (raw bytes, then whatever it does with the socket).
#[allow(dead_code)]
pub fn raw_upstream(respond: fn(std::net::TcpStream, String)) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 8192];
                let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                respond(s, head);
            });
        }
    });
    port
}

/// The key [`injecting_sidecar`] injects as `x-api-key`, and the variable it reads it from.
pub const INJECTED_KEY_ENV: &str = "CONFORMANCE_STATIC_KEY";
pub const INJECTED_KEY: &str = "conformance-sidecar-key-0123456789";

/// A sidecar injecting `x-api-key` on every route to `localhost`/`127.0.0.1` at `ports`, with
/// interception (its own CA, trusting `upstream_ca`), strip mode, `policy`, and whatever
/// `more` then sets or unsets.
pub fn injecting_sidecar(
    ports: &[u16],
    upstream_ca: &str,
    policy: &str,
    more: impl FnOnce(Cfg) -> Cfg,
) -> Sidecar {
    injecting_sidecar_with(ports, upstream_ca, policy, more, &[])
}

/// [`injecting_sidecar`], with `files` (name, text) written to its directory before it starts.
pub fn injecting_sidecar_with(
    ports: &[u16],
    upstream_ca: &str,
    policy: &str,
    more: impl FnOnce(Cfg) -> Cfg,
    files: &[(&str, &str)],
) -> Sidecar {
    let routes: String = ports
        .iter()
        .flat_map(|p| {
            ["localhost", "127.0.0.1"].map(|h| {
                format!(
                    "- name: {}-{p}\n  match: {{ host: {h}, port: {p} }}\n  credential: app-key\n  inject: {{ header: x-api-key, value: \"{{token}}\" }}\n",
                    h.replace('.', "-")
                )
            })
        })
        .collect();
    let cfg = Cfg::new()
        .set(
            "tls",
            "ca_cert: {dir}/ca.pem\nca_key: {dir}/ca-key.pem\nupstream_roots: {dir}/upstream-ca.pem",
        )
        .set(
            "credentials",
            &format!("app-key:\n  kind: static\n  from_env: {INJECTED_KEY_ENV}"),
        )
        .set("routes", &routes)
        .set("strip", "mode: strip");
    let cfg = more(cfg).yaml();
    let ca = upstream_ca.to_string();
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    Sidecar::start_with(
        &cfg,
        policy,
        &[(INJECTED_KEY_ENV, INJECTED_KEY)],
        move |dir: &Path| {
            for (name, text) in &files {
                std::fs::write(dir.join(name), text).unwrap();
            }
            std::fs::write(dir.join("upstream-ca.pem"), &ca).unwrap();
            let (ok, _, err) =
                run(Command::new(bin()).args(["ca", "init", "--out", dir.to_str().unwrap()]));
            assert!(ok, "{err}");
        },
    )
}

/// A client script's report: it ran to success, printing one `NAME JSON` line per call;
/// the calls by name.
pub fn named_lines(
    out: &std::process::Output,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(|l| {
            let (name, json) = l
                .split_once(' ')
                .unwrap_or_else(|| panic!("not `NAME JSON`: {l}"));
            let v = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {l}"));
            (name.to_string(), v)
        })
        .collect()
}

/// A Node ES module given inline, run from tests/support (so it imports the pinned npm
/// packages there), with the proxy URL and the app's key as its first two arguments and
/// `NODE_EXTRA_CA_CERTS` trusting the sidecar's CA.
pub fn node_script(script: &str, sc: &Sidecar, app_key: &str) -> Command {
    let mut cmd = Command::new("node");
    cmd.args([
        "--input-type=module",
        "-e",
        script,
        &sc.proxy_url(),
        app_key,
    ])
    .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support"))
    .env("NODE_EXTRA_CA_CERTS", sc.dir().join("ca.pem"));
    cmd
}
