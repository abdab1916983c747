//! Real servers behind Chaperone: nginx from Debian over plain HTTP/1.1 and over TLS with
//! HTTP/2 (`listen ... ssl http2`, nginx 1.22), reached by real clients (curl, Python requests
//! and httpx) through the forward proxy and through intercepted HTTPS. Each asserts the
//! status, that nginx saw the injected credential and the right host (one `Host` or
//! `:authority`, no default port), never the app's key, and that the purpose log says the
//! same.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

const KEY: &str = INJECTED_KEY;

/// nginx echoing what it received: protocol, host, the injected key and any Authorization.
const ECHO: &str = r#"default_type text/plain;
    return 200 "proto=$server_protocol host=$http_host key=$http_x_api_key auth=$http_authorization\n";"#;

fn nginx_plain() -> Nginx {
    Nginx::start(
        &format!("server {{\n    listen 127.0.0.1:{{port}};\n    location / {{ {ECHO} }}\n  }}"),
        &[],
    )
}

fn nginx_h2(pki: &TestPki) -> Nginx {
    Nginx::start(
        &format!(
            "server {{\n    listen 127.0.0.1:{{port}} ssl http2;\n    \
             ssl_certificate {{dir}}/cert.pem;\n    ssl_certificate_key {{dir}}/key.pem;\n    \
             location / {{ {ECHO} }}\n  }}"
        ),
        &[
            ("cert.pem", &pki.server_cert_pem),
            ("key.pem", &pki.server_key_pem),
        ],
    )
}

/// A sidecar injecting `x-api-key` on every route to `localhost`/`127.0.0.1` at `ports`, with
/// interception (its own CA, trusting `upstream_ca`), permitting everything.
fn sidecar(ports: &[u16], upstream_ca: &str) -> Sidecar {
    injecting_sidecar(ports, upstream_ca, PERMISSIVE_POLICY, |c| c)
}

/// nginx over plain HTTP behind a sidecar that has a CA (so it intercepts CONNECT).
fn plain_behind_a_ca() -> (Nginx, Sidecar) {
    let plain = nginx_plain();
    let sc = sidecar(&[plain.port], &TestPki::new().ca_pem);
    (plain, sc)
}

/// nginx saw the sidecar's key and no `Authorization` (the app's key was stripped).
fn assert_injected(echo: &str) {
    let e = echoed(echo);
    assert_eq!(e["key"], KEY, "{echo}");
    assert_eq!(e["auth"], "", "the app's key was stripped: {echo}");
}

/// A client script's output, one `CLIENT STATUS ECHO` line per call: it succeeded, made `n`
/// calls, each answered 200; returns (client, echo) of each.
fn replies(out: &std::process::Output, n: usize) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replies: Vec<(String, String)> = text
        .lines()
        .map(|l| {
            let (client, rest) = l.split_once(' ').unwrap();
            let echo = rest
                .strip_prefix("200 ")
                .unwrap_or_else(|| panic!("{client}: {l}"));
            (client.to_string(), echo.to_string())
        })
        .collect();
    assert_eq!(replies.len(), n, "{text}");
    replies
}

/// What nginx echoed, as `key=value` pairs.
fn echoed(body: &str) -> std::collections::HashMap<String, String> {
    body.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn nginx_http2_over_tls_and_http1_through_the_proxy_with_curl_and_python() {
    let pki = TestPki::new();
    let h2 = nginx_h2(&pki);
    let plain = nginx_plain();
    let sc = sidecar(&[h2.port, plain.port], &pki.ca_pem);
    let ca = sc.dir().join("ca.pem");
    let app_key = fake_openai_key();
    let proxy = sc.proxy_url();
    let https_url = format!("https://localhost:{}/v1/chat/completions", h2.port);
    let http_url = format!("http://127.0.0.1:{}/v1/models", plain.port);
    let auth = format!("Authorization: Bearer {app_key}");

    // curl, HTTP/1.1 and HTTP/2 to the app's side; the upstream side is HTTP/2 by ALPN.
    for version in ["--http1.1", "--http2"] {
        let (rc, code, body) = curl_raw(&[
            version,
            "--proxy",
            &proxy,
            "--cacert",
            ca.to_str().unwrap(),
            "-H",
            &auth,
            &https_url,
        ]);
        assert_eq!((rc, code), (0, 200), "{version}: {body}");
        let e = echoed(&body);
        assert_eq!(e["proto"], "HTTP/2.0", "{body}");
        assert_eq!(e["host"], format!("localhost:{}", h2.port), "{body}");
        assert_eq!(e["key"], KEY, "{body}");
        assert_eq!(e["auth"], "", "the app's key was stripped: {body}");
    }
    // Plain HTTP/1.1 upstream through the forward proxy.
    let (rc, code, body) = curl_raw(&["--proxy", &proxy, "-H", &auth, &http_url]);
    assert_eq!((rc, code), (0, 200), "{body}");
    let e = echoed(&body);
    assert_eq!(e["proto"], "HTTP/1.1", "{body}");
    assert_eq!(e["host"], format!("127.0.0.1:{}", plain.port), "{body}");
    assert_eq!(e["key"], KEY, "{body}");

    // Python requests and httpx, the clients under the openai and anthropic SDKs.
    let script = r#"
import sys, requests, httpx
proxy, ca, https_url, http_url, key = sys.argv[1:6]
headers = {"Authorization": "Bearer " + key}
proxies = {"http": proxy, "https": proxy}
for url in (https_url, http_url):
    r = requests.get(url, headers=headers, proxies=proxies, verify=ca, timeout=10)
    print("requests", r.status_code, r.text.strip())
    with httpx.Client(proxy=proxy, verify=ca, timeout=10) as c:
        r = c.get(url, headers=headers)
        print("httpx", r.status_code, r.text.strip())
"#;
    let out = Command::new(python())
        .args(["-c", script, &proxy, ca.to_str().unwrap(), &https_url])
        .args([&http_url, &app_key])
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .output()
        .unwrap();
    for (client, echo) in replies(&out, 4) {
        assert_injected(&echo);
        let host = &echoed(&echo)["host"];
        assert!(
            !host.ends_with(":443") && !host.ends_with(":80"),
            "{client}: {echo}"
        );
    }

    // The log says the same: every request allowed, 200, the key stripped, no error.
    let http = sc.lines_where(7, |l| l["kind"] == "http");
    assert_eq!(http.len(), 7, "{http:?}");
    for l in &http {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["answered_by"], "upstream", "{l}");
        assert_eq!(l["decision"], "allow", "{l}");
        assert_eq!(l["error"], Value::Null, "{l}");
        assert_eq!(l["completion"], "complete", "{l}");
        assert_eq!(l["stripped"][0]["type"], "openai_project_key", "{l}");
        let tls = l["port"] == h2.port;
        let version = if tls { "HTTP/2.0" } else { "HTTP/1.1" };
        assert_eq!(l["upstream_version"], version, "{l}");
    }
    sc.assert_never_shows(&[&app_key, KEY]);
}

/// nginx ends a connection after `keepalive_requests` requests: on HTTP/2 with GOAWAY, on
/// HTTP/1.1 with `Connection: close` on the last answer. Through the sidecar's pool, every
/// request past each limit goes on a new connection: 120 requests on three connections to
/// each upstream, all answered 200 (Python httpx, one client: one tunnel, one keep-alive
/// connection to the sidecar).
#[test]
fn upstream_connections_nginx_retires_are_replaced_without_a_failed_request() {
    let pki = TestPki::new();
    // Each answer names the upstream connection it came on.
    let limit = "keepalive_requests 50;";
    let conn = r#"return 200 "conn=$connection\n";"#;
    let h2 = Nginx::start(
        &format!(
            "server {{\n    listen 127.0.0.1:{{port}} ssl http2;\n    {limit}\n    \
             ssl_certificate {{dir}}/cert.pem;\n    ssl_certificate_key {{dir}}/key.pem;\n    \
             location / {{ {conn} }}\n  }}"
        ),
        &[
            ("cert.pem", &pki.server_cert_pem),
            ("key.pem", &pki.server_key_pem),
        ],
    );
    let plain = Nginx::start(
        &format!(
            "server {{\n    listen 127.0.0.1:{{port}};\n    {limit}\n    location / {{ {conn} }}\n  }}"
        ),
        &[],
    );
    let sc = sidecar(&[h2.port, plain.port], &pki.ca_pem);
    let ca = sc.dir().join("ca.pem");
    let script = r#"
import sys, httpx
proxy, ca = sys.argv[1:3]
for url in sys.argv[3:5]:
    with httpx.Client(proxy=proxy, verify=ca, timeout=10) as c:
        replies = [c.get(url) for _ in range(120)]
    conns = {r.text for r in replies}
    print(url, sum(r.status_code == 200 for r in replies), len(replies), len(conns))
"#;
    let https_url = format!("https://localhost:{}/v1/models", h2.port);
    let http_url = format!("http://127.0.0.1:{}/v1/models", plain.port);
    let out = Command::new(python())
        .args(["-c", script, &sc.proxy_url(), ca.to_str().unwrap()])
        .args([&https_url, &http_url])
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            format!("{https_url} 120 120 3"),
            format!("{http_url} 120 120 3")
        ],
        "{stdout}"
    );
    let lines = sc.lines_where(240, |l| l["kind"] == "http");
    let versions: std::collections::BTreeSet<String> = lines
        .iter()
        .map(|l| l["upstream_version"].as_str().unwrap_or("none").to_string())
        .collect();
    assert_eq!(
        versions,
        ["HTTP/1.1".to_string(), "HTTP/2.0".to_string()].into(),
        "both upstreams answered on their own protocol"
    );
    assert!(
        lines.iter().all(|l| l["status"] == 200),
        "every line says 200"
    );
    // The injected key, across every connection retired and made again.
    sc.assert_never_shows(&[KEY]);
}

/// A 502 the upstream chose and a 502 Chaperone made are told apart: by the app (ours carry
/// `chaperone-error` and a JSON reason) and in the line (`answered_by`, `error`). Likewise a
/// 403 of the upstream's and a policy refusal.
#[test]
fn an_upstream_error_status_and_one_the_proxy_made_are_told_apart() {
    let nginx = Nginx::start(
        "server {\n    listen 127.0.0.1:{port};\n    location /bad-gateway { return 502 \"nginx says 502\\n\"; }\n    location /not-yours { return 403; }\n  }",
        &[],
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = closed.local_addr().unwrap().port();
    drop(closed);
    let sc = sidecar(&[nginx.port, dead_port], &TestPki::new().ca_pem);
    let proxy = sc.proxy_url();
    let get = |url: String, id: &str| {
        let (rc, code, out) = curl_raw(&[
            "-s",
            "-i",
            "--proxy",
            &proxy,
            "-H",
            &format!("chaperone-request-id: {id}"),
            &url,
        ]);
        assert_eq!(rc, 0, "{out}");
        (code, out.to_ascii_lowercase())
    };
    let (code, theirs) = get(
        format!("http://127.0.0.1:{}/bad-gateway", nginx.port),
        "theirs-502",
    );
    assert_eq!(code, 502, "{theirs}");
    assert!(!theirs.contains("chaperone-error"), "{theirs}");
    let (code, ours) = get(
        format!("http://127.0.0.1:{dead_port}/v1/models"),
        "ours-502",
    );
    assert_eq!(code, 502, "{ours}");
    assert!(
        ours.contains("chaperone-error: upstream_unreachable"),
        "{ours}"
    );
    let (code, theirs403) = get(
        format!("http://127.0.0.1:{}/not-yours", nginx.port),
        "theirs-403",
    );
    assert_eq!(code, 403, "{theirs403}");
    assert!(!theirs403.contains("chaperone-error"), "{theirs403}");
    let (code, ours403) = get(
        format!("http://127.0.0.1:{}/forbidden/x", nginx.port),
        "ours-403",
    );
    assert_eq!(code, 403, "{ours403}");
    assert!(
        ours403.contains("chaperone-error: policy_denied"),
        "{ours403}"
    );

    let lines = sc.log_lines(4);
    let line = |id: &str| {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("{id}: {lines:#?}"))
            .clone()
    };
    for (id, by, error) in [
        ("theirs-502", "upstream", Value::Null),
        ("ours-502", "chaperone", "upstream_unreachable".into()),
        ("theirs-403", "upstream", Value::Null),
        ("ours-403", "chaperone", "policy_denied".into()),
    ] {
        let l = line(id);
        assert_eq!(l["answered_by"], by, "{l}");
        assert_eq!(l["error"], error, "{l}");
    }
    assert_eq!(line("theirs-502")["upstream_version"], "HTTP/1.1");
    assert_eq!(line("ours-502")["upstream_version"], Value::Null);
}

/// Plain HTTP inside a CONNECT tunnel, as undici's proxy agents and Python WebSocket clients
/// send `http://`/`ws://` through an HTTPS_PROXY-style tunnel (here curl `--proxytunnel`): with a
/// CA configured it used to meet a TLS alert; now the first byte tells, and the requests go
/// through the pipeline like any other.
#[test]
fn plain_http_inside_a_connect_tunnel_goes_through_the_pipeline() {
    let (plain, sc) = plain_behind_a_ca();
    let app_key = fake_openai_key();
    let url = format!("http://127.0.0.1:{}/v1/models", plain.port);
    let (rc, code, body) = curl_raw(&[
        "--proxytunnel",
        "--proxy",
        &sc.proxy_url(),
        "-H",
        &format!("Authorization: Bearer {app_key}"),
        "-H",
        "chaperone-request-id: tunnelled-http",
        &url,
    ]);
    assert_eq!((rc, code), (0, 200), "{body}");
    assert_injected(&body);
    assert_eq!(
        echoed(&body)["host"],
        format!("127.0.0.1:{}", plain.port),
        "{body}"
    );
    let lines = sc.log_lines(2);
    let inner = lines
        .iter()
        .find(|l| l["request_id"] == "tunnelled-http")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(inner["kind"], "http", "{inner}");
    assert_eq!(inner["scheme"], "http", "{inner}");
    assert_eq!(inner["status"], 200, "{inner}");
    assert_eq!(
        inner["stripped"][0]["type"], "openai_project_key",
        "{inner}"
    );
    let tunnel = lines
        .iter()
        .find(|l| l["kind"] == "intercept")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(tunnel["scheme"], "http", "{tunnel}");
    assert!(
        tunnel["reason"].as_str().unwrap().contains("plain HTTP"),
        "{tunnel}"
    );
    // Neither HTTP nor TLS, in a tunnel opened to see requests (no CONNECT permit was asked):
    // closed, the reason in the tunnel's line, nothing reaches the destination.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(sc.proxy).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let a = format!("127.0.0.1:{}", plain.port);
    write!(s, "CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n\r\n").unwrap();
    let mut r = reader(s.try_clone().unwrap());
    assert_eq!(read_status(&mut r), 200);
    s.write_all(b"ssh-like opaque bytes\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    assert!(
        !String::from_utf8_lossy(&rest).contains("proto="),
        "reached nginx"
    );
    let lines = sc.log_lines(3);
    let refused = lines
        .iter()
        .find(|l| l["kind"] == "intercept" && !l["error"].is_null())
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("neither HTTP nor TLS"),
        "{refused}"
    );
    sc.assert_never_shows(&[&app_key, KEY]);
}

/// Node's standard proxy agents (undici `ProxyAgent`, and `EnvHttpProxyAgent` reading
/// `HTTP_PROXY`/`HTTPS_PROXY`) through the sidecar: `http://` is tunnelled through CONNECT as
/// plain HTTP, `https://` intercepted with the CA from `NODE_EXTRA_CA_CERTS` (README's trust
/// row), both served through the pipeline.
#[test]
fn node_undici_proxy_agents_through_the_tunnel_for_http_and_https() {
    let pki = TestPki::new();
    let (plain, h2) = (nginx_plain(), nginx_h2(&pki));
    let sc = sidecar(&[plain.port, h2.port], &pki.ca_pem);
    let app_key = fake_openai_key();
    let http_url = format!("http://127.0.0.1:{}/v1/models", plain.port);
    let https_url = format!("https://localhost:{}/v1/models", h2.port);
    let script = r#"
import { ProxyAgent, EnvHttpProxyAgent, fetch } from 'undici';
const [proxy, key, ...urls] = process.argv.slice(1);
for (const url of urls) {
  for (const [name, agent] of [['ProxyAgent', new ProxyAgent(proxy)], ['EnvHttpProxyAgent', new EnvHttpProxyAgent()]]) {
    const r = await fetch(url, { dispatcher: agent, headers: { authorization: `Bearer ${key}` } });
    console.log(name, r.status, (await r.text()).trim());
  }
}
"#;
    let out = node_script(script, &sc, &app_key)
        .args([&http_url, &https_url])
        .env("HTTP_PROXY", sc.proxy_url())
        .env("HTTPS_PROXY", sc.proxy_url())
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    for (_, echo) in replies(&out, 4) {
        assert_injected(&echo);
    }
    sc.assert_never_shows(&[&app_key, KEY]);
}

/// Without a CA nothing can intercept TLS, but plain HTTP in a CONNECT tunnel can still be
/// seen: it is served through the pipeline like the same request in absolute form. To a route
/// that injects a credential, plain HTTP gets the credential and TLS is refused (closed, the
/// reason in the tunnel's line); to a destination no route names, a CONNECT policy permits
/// carries TLS spliced unseen and plain HTTP through the pipeline (the app's key stripped).
#[test]
fn without_a_ca_tunnelled_plain_http_is_served_and_tls_is_spliced_or_refused() {
    let pki = TestPki::new();
    let (routed, unrouted, tls) = (nginx_plain(), nginx_plain(), nginx_h2(&pki));
    let sc = injecting_sidecar(&[routed.port], "", PERMISSIVE_POLICY, |c| c.unset("tls"));
    let proxy = sc.proxy_url();
    let app_key = fake_openai_key();
    let auth = format!("Authorization: Bearer {app_key}");
    let tunnelled = |url: &str, id: &str| {
        curl_raw(&[
            "--proxytunnel",
            "--proxy",
            &proxy,
            "-H",
            &auth,
            "-H",
            &format!("chaperone-request-id: {id}"),
            url,
        ])
    };

    let (rc, code, body) = tunnelled(
        &format!("http://127.0.0.1:{}/v1/models", routed.port),
        "routed",
    );
    assert_eq!((rc, code), (0, 200), "{body}");
    assert_injected(&body);
    let (rc, code, body) = tunnelled(
        &format!("http://127.0.0.1:{}/v1/models", unrouted.port),
        "unrouted",
    );
    assert_eq!((rc, code), (0, 200), "{body}");
    let e = echoed(&body);
    assert_eq!(
        (e["key"].as_str(), e["auth"].as_str()),
        ("", ""),
        "stripped, nothing injected: {body}"
    );
    // TLS to the credentialed route's port: refused after the 200.
    let (rc, _, body) = curl_raw(&[
        "--proxy",
        &proxy,
        "-k",
        &format!("https://127.0.0.1:{}/", routed.port),
    ]);
    assert_ne!(rc, 0, "TLS passed a plain-only tunnel: {body}");
    // TLS to a destination no route names: spliced end to end (nginx's own certificate).
    let ca = temp_file("upstream-ca.pem", &pki.ca_pem);
    let (rc, code, body) = curl_raw(&[
        "--proxy",
        &proxy,
        "--cacert",
        ca.1.to_str().unwrap(),
        &format!("https://localhost:{}/v1/models", tls.port),
    ]);
    assert_eq!((rc, code), (0, 200), "{body}");
    assert_eq!(
        echoed(&body)["key"],
        "",
        "a spliced tunnel is not seen: {body}"
    );

    let lines = sc.log_lines(6);
    let by_id = |id: &str| {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("{id}: {lines:#?}"))
    };
    for id in ["routed", "unrouted"] {
        let l = by_id(id);
        assert_eq!(
            (l["kind"].as_str(), l["scheme"].as_str()),
            (Some("http"), Some("http")),
            "{l}"
        );
        assert_eq!(l["stripped"][0]["type"], "openai_project_key", "{l}");
    }
    assert_eq!(by_id("routed")["credential"]["name"], "app-key");
    let connects: Vec<&Value> = lines.iter().filter(|l| l["method"] == "CONNECT").collect();
    let refused = connects
        .iter()
        .find(|l| l["decision"] == "deny")
        .unwrap_or_else(|| panic!("{connects:#?}"));
    assert_eq!(refused["port"], routed.port, "{refused}");
    assert!(
        refused["reason"].as_str().unwrap().contains("carries TLS"),
        "{refused}"
    );
    let spliced = connects
        .iter()
        .find(|l| l["port"] == tls.port)
        .unwrap_or_else(|| panic!("{connects:#?}"));
    assert_eq!(spliced["kind"], "tunnel", "{spliced}");
    assert!(spliced["bytes_in"].as_u64().unwrap() > 0, "{spliced}");
    assert!(spliced["bytes_out"].as_u64().unwrap() > 0, "{spliced}");
    sc.assert_never_shows(&[&app_key, KEY]);
}

/// `upstream_proxy` through a real squid that requires proxy authentication: an `http://`
/// upstream is reached by sending the request to squid in absolute form (with the
/// credentials from `auth_file`), an intercepted `https://` one through a CONNECT tunnel of
/// squid's (TLS end to end: the upstream's certificate still verified), and without a CA a
/// blind tunnel likewise; what `no_proxy` names goes direct. The upstream sees our credential
/// either way, and squid's credentials appear nowhere in what the sidecar prints.
#[test]
fn upstream_proxy_chains_through_squid_except_what_no_proxy_names() {
    let pki = TestPki::new();
    let (plain, h2, unrouted) = (nginx_plain(), nginx_h2(&pki), nginx_h2(&pki));
    let squid = Squid::start();
    let auth = format!("{}:{}\n", Squid::USER, Squid::PASSWORD);
    let chained = |c: Cfg| {
        c.set(
            "upstream_proxy",
            &format!(
                "url: http://127.0.0.1:{}\nno_proxy: [localhost]\nauth_file: {{dir}}/proxy-auth",
                squid.port
            ),
        )
    };
    let files = [("proxy-auth", auth.as_str())];
    let sc = injecting_sidecar_with(
        &[plain.port, h2.port],
        &pki.ca_pem,
        PERMISSIVE_POLICY,
        chained,
        &files,
    );
    let proxy = sc.proxy_url();
    let ca = sc.dir().join("ca.pem");
    let get = |proxy: &str, ca: &Path, url: String| {
        let (rc, code, body) =
            curl_raw(&["--proxy", proxy, "--cacert", ca.to_str().unwrap(), &url]);
        assert_eq!((rc, code), (0, 200), "{url}: {body}");
        echoed(&body)
    };
    // Through squid: http in absolute form, https through its tunnel.
    let e = get(
        &proxy,
        &ca,
        format!("http://127.0.0.1:{}/via-squid", plain.port),
    );
    assert_eq!(e["key"], KEY, "{e:?}");
    let e = get(
        &proxy,
        &ca,
        format!("https://127.0.0.1:{}/via-squid-tls", h2.port),
    );
    assert_eq!(
        (e["key"].as_str(), e["proto"].as_str()),
        (KEY, "HTTP/2.0"),
        "{e:?}"
    );
    // Direct: no_proxy names localhost.
    let e = get(
        &proxy,
        &ca,
        format!("http://localhost:{}/direct", plain.port),
    );
    assert_eq!(e["key"], KEY, "{e:?}");
    sc.assert_never_shows(&[Squid::PASSWORD, INJECTED_KEY]);

    // Without a CA, a blind tunnel policy permits goes through squid as well.
    let blind = injecting_sidecar_with(
        &[],
        &pki.ca_pem,
        PERMISSIVE_POLICY,
        |c| chained(c).unset("tls"),
        &files,
    );
    let upstream_ca = blind.dir().join("upstream-ca.pem");
    let e = get(
        &blind.proxy_url(),
        &upstream_ca,
        format!("https://127.0.0.1:{}/blind", unrouted.port),
    );
    assert_eq!(e["key"], "", "a blind tunnel is not seen: {e:?}");
    blind.assert_never_shows(&[Squid::PASSWORD]);

    // Squid logs a tunnel when it closes: the sidecar's pooled one closes with the sidecar.
    drop((sc, blind));
    let log = squid.access(3);
    let user = Squid::USER;
    for expected in [
        format!("GET http://127.0.0.1:{}/via-squid 200 {user}", plain.port),
        format!("CONNECT 127.0.0.1:{} 200 {user}", h2.port),
        format!("CONNECT 127.0.0.1:{} 200 {user}", unrouted.port),
    ] {
        assert!(log.contains(&expected), "{expected}: {log:#?}");
    }
    assert_eq!(log.len(), 3, "no_proxy went through squid: {log:#?}");
}
