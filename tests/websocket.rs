//! WebSocket through Chaperone (DESIGN §9): the handshake goes through every stage (the app's
//! key stripped, ours injected, policy with `context.upgrade`), then the connection is relayed
//! both ways and logged at close with the bytes each way. Real clients (PyPI `websockets`, npm
//! `ws` with `http-proxy-agent`/`https-proxy-agent`) and a real server (`websockets`,
//! tests/support/ws_echo.py), over `ws://` through the forward proxy and through a CONNECT
//! tunnel, `wss://` through interception, and reverse mode.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn support() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support")
}

/// The echo server, over `ws://`, or `wss://` with the test PKI's certificate for localhost.
struct Echo {
    server: ServerProcess,
    port: u16,
    _certs: Option<tempfile::TempDir>,
}

impl Echo {
    fn start(pki: Option<&TestPki>) -> Echo {
        let mut cmd = Command::new(python());
        cmd.arg(support().join("ws_echo.py"));
        let certs = pki.map(|pki| {
            let (dir, cert, key) = pki.server_files();
            cmd.arg(cert).arg(key);
            dir
        });
        let server = ServerProcess::start(cmd, "the WebSocket echo server");
        let port = server.port.unwrap();
        Echo {
            server,
            port,
            _certs: certs,
        }
    }
}

/// What the echo server saw in a handshake (its first message): our key, not the app's.
fn assert_handshake_injected(hello: &Value) {
    assert_eq!(hello["key"], INJECTED_KEY, "{hello}");
    assert_eq!(hello["auth"], "", "the app's key was stripped: {hello}");
}

/// The lines of upgraded connections, once `n` of them are written; exactly `n`.
fn upgrade_lines(sc: &Sidecar, n: usize) -> Vec<Value> {
    let lines = sc.lines_where(n, |l| !l["upgrade"].is_null());
    assert_eq!(lines.len(), n, "{lines:#?}");
    lines
}

/// A WebSocket line that ran to a normal close: 101, our credential, the app's key stripped,
/// bytes both ways.
fn assert_relayed(l: &Value) {
    assert_eq!(l["status"], 101, "{l}");
    assert_eq!(l["decision"], "allow", "{l}");
    assert_eq!(l["upgrade"]["protocol"], "websocket", "{l}");
    assert!(l["upgrade"]["bytes_in"].as_u64().unwrap() > 0, "{l}");
    assert!(l["upgrade"]["bytes_out"].as_u64().unwrap() > 0, "{l}");
    assert_eq!(l["completion"], "complete", "{l}");
    assert_eq!(l["error"], Value::Null, "{l}");
    assert_eq!(l["credential"]["name"], "app-key", "{l}");
    assert_eq!(l["stripped"][0]["type"], "openai_project_key", "{l}");
}

/// A client script's conversations by name: exactly `names`.
fn conversations(out: &std::process::Output, names: &[&str]) -> BTreeMap<String, Value> {
    let got = named_lines(out);
    let mut want = names.to_vec();
    want.sort_unstable();
    assert_eq!(got.keys().map(String::as_str).collect::<Vec<_>>(), want);
    got
}

/// The two echo servers (`ws://`, and `wss://` with the test PKI) and a sidecar injecting our
/// key on both.
fn echoes() -> (Echo, Echo, Sidecar) {
    let pki = TestPki::new();
    let (plain, tls) = (Echo::start(None), Echo::start(Some(&pki)));
    let ports = [plain.port, tls.port];
    let sc = injecting_sidecar(&ports, &pki.ca_pem, PERMISSIVE_POLICY, |c| c);
    (plain, tls, sc)
}

/// One conversation as each client script reports it: the handshake carried our key, an echo
/// came back, and five messages sent 200 ms apart arrived as they were sent (the first long
/// before the last), not in one piece at the end.
fn assert_conversation(name: &str, c: &Value) {
    assert_handshake_injected(&c["hello"]);
    assert_eq!(c["echo"], "ping-1", "{name}: {c}");
    assert_eq!(c["parts"], 5, "{name}: {c}");
    let spread = c["spread_ms"].as_f64().unwrap();
    assert!(
        spread > 500.0,
        "{name}: the stream arrived in one piece: {c}"
    );
}

#[test]
fn python_websockets_over_ws_and_wss_through_the_proxy_and_in_reverse_mode() {
    let (plain, tls, sc) = echoes();
    let app_key = fake_openai_key();
    let script = r#"
import asyncio, json, socket, ssl, sys, time
from websockets.asyncio.client import connect
proxy_port, ca, ws_url, wss_url, key = sys.argv[1:6]
headers = {"Authorization": "Bearer " + key}

async def talk(name, uri, headers=headers, **kw):
    async with connect(uri, additional_headers=headers, open_timeout=10, **kw) as ws:
        subprotocol = ws.subprotocol
        hello = json.loads(await ws.recv())
        await ws.send("ping-1")
        echo = await ws.recv()
        await ws.send("stream 5 200")
        times = []
        for _ in range(5):
            await ws.recv()
            times.append(time.monotonic())
    spread = (times[-1] - times[0]) * 1000
    print(name, json.dumps({"hello": hello, "echo": echo, "parts": len(times), "spread_ms": spread, "subprotocol": subprotocol}), flush=True)

async def main():
    trust = ssl.create_default_context(cafile=ca)
    # ws:// and wss:// with HTTP(S)_PROXY from the environment: websockets tunnels both
    # through CONNECT (plain HTTP in the tunnel for ws://, TLS intercepted for wss://).
    await talk("ws-proxy", ws_url)
    await talk("wss-proxy", wss_url, ssl=trust)
    # Reverse mode: the connection goes to the sidecar, the Host names the upstream.
    sock = socket.create_connection(("127.0.0.1", int(proxy_port)))
    await talk("ws-reverse", ws_url, proxy=None, sock=sock)
    # A browser-style client (no Authorization on a browser's handshake): OpenAI Realtime's
    # key in the subprotocol list.
    offered = ["realtime", "openai-insecure-api-key." + key, "openai-beta.realtime-v1"]
    await talk("wss-key-in-subprotocol", wss_url, headers={}, ssl=trust, subprotocols=offered)

asyncio.run(main())
"#;
    let proxy = sc.proxy_url();
    let proxy_port = proxy.rsplit(':').next().unwrap().to_string();
    let out = Command::new(python())
        .args(["-c", script, &proxy_port])
        .arg(sc.dir().join("ca.pem"))
        .arg(format!("ws://127.0.0.1:{}/v1/realtime?model=m", plain.port))
        .arg(format!("wss://localhost:{}/v1/realtime", tls.port))
        .arg(&app_key)
        .env("HTTP_PROXY", &proxy)
        .env("HTTPS_PROXY", &proxy)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    let got = conversations(
        &out,
        &[
            "ws-proxy",
            "wss-proxy",
            "ws-reverse",
            "wss-key-in-subprotocol",
        ],
    );
    for (name, c) in &got {
        assert_conversation(name, c);
    }
    // The key left the subprotocol list; the protocol the server speaks stayed, and was picked.
    let realtime = &got["wss-key-in-subprotocol"];
    assert_eq!(
        realtime["hello"]["protocols"], "realtime, openai-beta.realtime-v1",
        "{realtime}"
    );
    assert_eq!(realtime["subprotocol"], "realtime", "{realtime}");
    assert_eq!(got["ws-proxy"]["hello"]["path"], "/v1/realtime?model=m");
    let wss = &got["wss-proxy"];
    assert_eq!(
        wss["hello"]["host"],
        format!("localhost:{}", tls.port),
        "{wss}"
    );

    let lines = upgrade_lines(&sc, 4);
    for l in &lines {
        assert_relayed(l);
    }
    let tls = lines.iter().filter(|l| l["scheme"] == "https").count();
    assert_eq!(tls, 2, "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l["stripped"][0]["location"] == "header:sec-websocket-protocol"),
        "{lines:#?}"
    );
    // The query's values are redacted in the line, as for any request.
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["query"] == "model=<redacted>")
            .count(),
        2,
        "{lines:#?}"
    );
    sc.assert_never_shows(&[&app_key, INJECTED_KEY]);
}

/// npm `ws`, the WebSocket client of Node apps and agent UIs, with the proxy agents it
/// documents: `http-proxy-agent` sends `ws://` to the proxy in absolute form (the forward
/// proxy's own path), `https-proxy-agent` tunnels `wss://` through CONNECT (intercepted; the
/// CA from `NODE_EXTRA_CA_CERTS`, README's trust row).
#[test]
fn node_ws_through_http_and_https_proxy_agents() {
    let (plain, tls, sc) = echoes();
    let app_key = fake_openai_key();
    let script = r#"
import WebSocket from 'ws';
import { HttpProxyAgent } from 'http-proxy-agent';
import { HttpsProxyAgent } from 'https-proxy-agent';
const [proxy, key, wsUrl, wssUrl] = process.argv.slice(1);

function talk(name, url, agent) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { agent, headers: { authorization: `Bearer ${key}` } });
    const got = [];
    const times = [];
    ws.on('error', reject);
    ws.on('message', (data) => {
      const text = data.toString();
      got.push(text);
      if (got.length === 1) ws.send('ping-1');
      else if (got.length === 2) ws.send('stream 5 200');
      else {
        times.push(performance.now());
        if (times.length === 5) ws.close(1000);
      }
    });
    ws.on('close', () => {
      console.log(name, JSON.stringify({
        hello: JSON.parse(got[0]), echo: got[1], parts: times.length,
        spread_ms: times[times.length - 1] - times[0],
      }));
      resolve();
    });
  });
}

await talk('ws-http-proxy-agent', wsUrl, new HttpProxyAgent(proxy));
await talk('wss-https-proxy-agent', wssUrl, new HttpsProxyAgent(proxy));
"#;
    let out = node_script(script, &sc, &app_key)
        .arg(format!("ws://127.0.0.1:{}/v1/realtime", plain.port))
        .arg(format!("wss://localhost:{}/v1/realtime", tls.port))
        .output()
        .unwrap();
    let names = ["ws-http-proxy-agent", "wss-https-proxy-agent"];
    for (name, c) in conversations(&out, &names) {
        assert_conversation(&name, &c);
    }
    let lines = upgrade_lines(&sc, 2);
    for l in &lines {
        assert_relayed(l);
    }
    // The ws:// handshake came in absolute form, not through a tunnel: no CONNECT line for it.
    let tunnels: Vec<Value> = sc
        .log_lines(0)
        .into_iter()
        .filter(|l| l["method"] == "CONNECT")
        .collect();
    assert_eq!(tunnels.len(), 1, "{tunnels:#?}");
    assert_eq!(tunnels[0]["port"], tls.port, "{tunnels:#?}");
    sc.assert_never_shows(&[&app_key, INJECTED_KEY]);
}

/// A WebSocket opened by hand, frame by frame, through the forward proxy.
struct RawWs {
    stream: TcpStream,
    reader: std::io::BufReader<TcpStream>,
}

impl RawWs {
    /// Send the handshake for `url` (absolute form, as to an HTTP proxy) with the app's key;
    /// returns the connection and the response head.
    fn open(proxy: &str, url: &str, app_key: &str) -> (RawWs, u16, String) {
        let addr = proxy.trim_start_matches("http://");
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let host = url.trim_start_matches("http://").split('/').next().unwrap();
        write!(
            stream,
            "GET {url} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {app_key}\r\n\r\n"
        )
        .unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut head = String::new();
        loop {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).unwrap() > 0, "closed: {head}");
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (RawWs { stream, reader }, status, head)
    }

    /// Send a masked text frame (RFC 6455 5.2; clients must mask).
    fn send(&mut self, text: &str) {
        let mask = [0x11u8, 0x22, 0x33, 0x44];
        let mut frame = vec![0x81, 0x80 | u8::try_from(text.len()).unwrap()];
        frame.extend_from_slice(&mask);
        frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).unwrap();
    }

    /// Read one unmasked frame from the server: (opcode, payload); `None` at end of stream.
    fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        self.reader.read_exact(&mut h).ok()?;
        let len = match h[1] & 0x7f {
            126 => {
                let mut n = [0u8; 2];
                self.reader.read_exact(&mut n).ok()?;
                usize::from(u16::from_be_bytes(n))
            }
            n => usize::from(n),
        };
        let mut payload = vec![0u8; len];
        self.reader.read_exact(&mut payload).ok()?;
        Some((h[0] & 0x0f, payload))
    }

    /// The server's first message: what its handshake carried.
    fn hello(&mut self) -> Value {
        let (op, payload) = self.recv().expect("the server's first message");
        assert_eq!(op, 1);
        serde_json::from_slice(&payload).unwrap()
    }
}

/// Policy sees `context.upgrade`: a policy may refuse WebSocket on one path and allow it
/// elsewhere. The refused handshake gets the JSON 403 every refusal gets, and never reaches
/// the server; an upstream that declines to upgrade (nginx serving a plain page) answers as
/// usual, and the line still says an upgrade was asked for.
#[test]
fn policy_decides_on_context_upgrade_and_a_declined_upgrade_is_a_plain_response() {
    let echo = Echo::start(None);
    let nginx = Nginx::start(
        "server {\n    listen 127.0.0.1:{port};\n    location / { return 200 \"plain page\\n\"; }\n  }",
        &[],
    );
    let policy = format!(
        "{PERMISSIVE_POLICY}\n@id(\"no-websocket-to-admin\")\nforbid(principal, action, resource) when {{ context.upgrade == \"websocket\" && context.path like \"/admin*\" }};\n"
    );
    let sc = injecting_sidecar(
        &[echo.port, nginx.port],
        &TestPki::new().ca_pem,
        &policy,
        |c| c,
    );
    let proxy = sc.proxy_url();
    let app_key = fake_openai_key();

    let denied = format!("http://127.0.0.1:{}/admin/socket", echo.port);
    let (mut ws, status, head) = RawWs::open(&proxy, &denied, &app_key);
    assert_eq!(status, 403, "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("{head}"))
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    ws.reader.read_exact(&mut body).unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "policy_denied", "{body}");
    assert!(body["request_id"].is_string(), "{body}");

    let allowed = format!("http://127.0.0.1:{}/socket", echo.port);
    let (mut ws, status, head) = RawWs::open(&proxy, &allowed, &app_key);
    assert_eq!(status, 101, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert!(lower.contains("chaperone-request-id: "), "{head}");
    assert_handshake_injected(&ws.hello());
    drop(ws);

    let declined = format!("http://127.0.0.1:{}/socket", nginx.port);
    let (mut ws, status, head) = RawWs::open(&proxy, &declined, &app_key);
    assert_eq!(status, 200, "{head}");
    let mut page = vec![0u8; "plain page\n".len()];
    ws.reader.read_exact(&mut page).unwrap();
    assert_eq!(page, b"plain page\n");

    let lines = sc.log_lines(3);
    let refused = lines
        .iter()
        .find(|l| l["path"] == "/admin/socket")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(refused["decision"], "deny", "{refused}");
    assert_eq!(
        refused["policy_ids"][0], "no-websocket-to-admin",
        "{refused}"
    );
    assert_eq!(refused["upgrade"]["protocol"], "websocket", "{refused}");
    assert_eq!(refused["upgrade"]["bytes_in"], 0, "{refused}");
    let plain = lines
        .iter()
        .find(|l| l["port"] == nginx.port)
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(plain["status"], 200, "{plain}");
    assert_eq!(plain["upgrade"]["protocol"], "websocket", "{plain}");
    assert_eq!(plain["completion"], "complete", "{plain}");
    // The refused handshake never reached the echo server; the allowed one did.
    assert_eq!(echo.server.lines_after("handshake "), ["/socket"]);
    sc.assert_never_shows(&[&app_key, INJECTED_KEY]);
}

/// A WebSocket with nothing moving either way for `timeouts.idle` is closed, and its line says
/// so; one that keeps talking is not (the conversations above run past no idle limit, this
/// one's messages keep it open past several).
#[test]
fn a_websocket_silent_both_ways_for_idle_is_closed_and_logged() {
    let echo = Echo::start(None);
    let sc = injecting_sidecar(
        &[echo.port],
        &TestPki::new().ca_pem,
        PERMISSIVE_POLICY,
        |c| c.set("timeouts", "idle: 1s"),
    );
    let url = format!("http://127.0.0.1:{}/socket", echo.port);
    let (mut ws, status, head) = RawWs::open(&sc.proxy_url(), &url, &fake_openai_key());
    assert_eq!(status, 101, "{head}");
    ws.hello();
    // Talking keeps it open: 6 messages 400 ms apart, 2.4 s on a 1 s idle limit.
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(400));
        ws.send(&format!("m{i}"));
        assert_eq!(ws.recv().unwrap().1, format!("m{i}").as_bytes());
    }
    // Silence closes it.
    let silent = Instant::now();
    assert!(ws.recv().is_none(), "the connection should be closed");
    let waited = silent.elapsed();
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    let l = &upgrade_lines(&sc, 1)[0];
    assert_eq!(l["completion"], "response_incomplete", "{l}");
    assert!(
        l["error"].as_str().unwrap().contains("timeouts.idle"),
        "{l}"
    );
    assert!(l["upgrade"]["bytes_in"].as_u64().unwrap() > 0, "{l}");
}

/// On SIGTERM an open WebSocket keeps working through the shutdown grace period, then is
/// closed; its line is written with the bytes each way and `completion: shutdown`, and the
/// sidecar exits cleanly.
#[test]
fn shutdown_lets_a_websocket_talk_through_the_grace_period_then_cuts_and_logs_it() {
    let echo = Echo::start(None);
    let mut sc = injecting_sidecar(
        &[echo.port],
        &TestPki::new().ca_pem,
        PERMISSIVE_POLICY,
        |c| c.set("timeouts", "shutdown_grace: 2s"),
    );
    let url = format!("http://127.0.0.1:{}/socket", echo.port);
    let (mut ws, status, head) = RawWs::open(&sc.proxy_url(), &url, &fake_openai_key());
    assert_eq!(status, 101, "{head}");
    ws.hello();
    let pid = sc.child.as_ref().unwrap().id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let signalled = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    ws.send("after-the-signal");
    assert_eq!(ws.recv().unwrap().1, b"after-the-signal");
    assert!(ws.recv().is_none(), "the connection should be cut");
    let cut = signalled.elapsed();
    assert!(cut >= Duration::from_millis(1500), "cut after {cut:?}");
    let exit = sc.child.as_mut().unwrap().wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    let l = &upgrade_lines(&sc, 1)[0];
    assert_eq!(l["completion"], "shutdown", "{l}");
    assert_eq!(l["status"], 101, "{l}");
    assert!(l["upgrade"]["bytes_in"].as_u64().unwrap() > 0, "{l}");
    assert!(l["upgrade"]["bytes_out"].as_u64().unwrap() > 0, "{l}");
}
