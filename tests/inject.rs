//! `chaperone inject`: the real webhook over TLS, real AdmissionReview v1 requests (curl),
//! the returned JSONPatch applied to the pod, and the patched pod validated offline with
//! PyPI `kubernetes-validate --strict`.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use serde_json::{Value, json};

struct Webhook {
    child: std::process::Child,
    url: String,
    ca: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Webhook {
    start_with("")
}

/// The webhook with `extra` appended to its inject.yaml.
fn start_with(extra: &str) -> Webhook {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("tls.crt"), &pki.server_cert_pem).unwrap();
    std::fs::write(p("tls.key"), &pki.server_key_pem).unwrap();
    std::fs::write(p("ca.pem"), &pki.ca_pem).unwrap();
    std::fs::write(
        p("inject.yaml"),
        "image: registry.example.org/platform/chaperone@sha256:0000000000000000000000000000000000000000000000000000000000000000
fingerprint_secret: chaperone-fingerprint
token_audience: sts.example.org
"
        .to_string()
            + extra,
    )
    .unwrap();
    let stderr = p("stderr.log");
    let child = Command::new(bin())
        .args(["inject", "--listen", "127.0.0.1:0", "--config"])
        .arg(p("inject.yaml"))
        .arg("--tls-cert")
        .arg(p("tls.crt"))
        .arg("--tls-key")
        .arg(p("tls.key"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let url = loop {
        let all = std::fs::read_to_string(&stderr).unwrap_or_default();
        // Whole lines only: the line may be caught half-written.
        let text = &all[..all.rfind('\n').map_or(0, |i| i + 1)];
        if let Some((_, rest)) = text.split_once("webhook listening on ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "webhook did not start: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    Webhook {
        child,
        url,
        ca: p("ca.pem"),
        _dir: dir,
    }
}

/// A pod as a ReplicaSet creates it, in a namespace with injection on.
fn pod(annotated: bool) -> Value {
    let mut annotations = json!({"prometheus.io/scrape": "false"});
    if annotated {
        annotations["chaperone.dev/inject"] = json!("true");
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "support-assistant-7d9f8b6c5d-",
            "namespace": "ml",
            "labels": {"app": "support-assistant", "pod-template-hash": "7d9f8b6c5d"},
            "annotations": annotations
        },
        "spec": {
            "serviceAccountName": "support-assistant",
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true},
            "containers": [{
                "name": "app",
                "image": "registry.example.org/ml/support-assistant:1.0.0",
                "env": [{"name": "LOG_LEVEL", "value": "info"}],
                "securityContext": {"runAsUser": 10001},
                "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}}
            }]
        }
    })
}

fn review(object: &Value, kind: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "ml",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "dryRun": false
        }
    })
}

fn post(w: &Webhook, body: &str) -> (u16, Value) {
    let (code, text) = curl(&[
        "--cacert",
        w.ca.to_str().unwrap(),
        "-H",
        "content-type: application/json",
        "--data-binary",
        body,
        &w.url,
    ]);
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// `kubernetes-validate --strict` on a pod (named as the API server would from
/// generateName, which the validator needs).
fn validate(pod: &Value) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.json");
    let mut named = pod.clone();
    named["metadata"]["name"] = json!("support-assistant-7d9f8b6c5d-x2k9q");
    std::fs::write(&file, serde_json::to_string_pretty(&named).unwrap()).unwrap();
    let out = must(
        Command::new(k8s_tool("kubernetes-validate"))
            .args(["--strict"])
            .arg(&file),
    );
    assert!(out.contains("passed for resource pod"), "{out}");
}

/// The patch of a review response, applied to `pod`.
fn apply(pod: &Value, resp: &Value) -> Value {
    assert_eq!(resp["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(resp["kind"], "AdmissionReview");
    assert_eq!(
        resp["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(resp["response"]["allowed"], true);
    assert_eq!(resp["response"]["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(resp["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    out
}

#[test]
fn the_webhook_injects_a_valid_sidecar_once() {
    let w = start();
    let original = pod(true);
    let (code, resp) = post(&w, &review(&original, "Pod").to_string());
    assert_eq!(code, 200, "{resp}");
    let patched = apply(&original, &resp);

    // What was added.
    let spec = &patched["spec"];
    let side = &spec["initContainers"][0];
    assert_eq!(side["name"], "chaperone");
    assert_eq!(side["restartPolicy"], "Always");
    assert_eq!(side["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_ne!(side["securityContext"]["runAsUser"], 10001);
    let app = &spec["containers"][0];
    let env = |n: &str| {
        app["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == n)
            .map(|e| e["value"].clone())
    };
    assert_eq!(env("HTTPS_PROXY"), Some(json!("http://127.0.0.1:15001")));
    assert_eq!(
        env("LOG_LEVEL"),
        Some(json!("info")),
        "the app's own env is kept"
    );
    assert_eq!(
        env("SSL_CERT_FILE"),
        Some(json!("/etc/chaperone/ca/ca.pem"))
    );
    let volumes = spec["volumes"].as_array().unwrap();
    let vol = |n: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == n)
            .unwrap_or_else(|| panic!("no {n}"))
    };
    assert_eq!(
        vol("chaperone-config")["configMap"]["name"],
        "chaperone-config"
    );
    assert_eq!(
        vol("chaperone-ca-cert")["secret"]["items"][0]["key"],
        "ca.pem"
    );
    assert_eq!(
        vol("chaperone-token")["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "sts.example.org"
    );

    // The patched pod is a valid Pod for the API server's schema; no egress lock unless
    // configured.
    validate(&patched);
    assert_eq!(spec["initContainers"].as_array().unwrap().len(), 1);

    // Idempotent: an injected pod gets no patch.
    let (code, again) = post(&w, &review(&patched, "Pod").to_string());
    assert_eq!(code, 200);
    assert_eq!(again["response"]["allowed"], true);
    assert!(again["response"]["patch"].is_null(), "{again}");

    // Not annotated, or not a pod: allowed untouched.
    let (_, plain) = post(&w, &review(&pod(false), "Pod").to_string());
    assert_eq!(plain["response"]["allowed"], true);
    assert!(plain["response"]["patch"].is_null());
    let (_, other) = post(
        &w,
        &review(&json!({"kind": "ConfigMap"}), "ConfigMap").to_string(),
    );
    assert!(other["response"]["patch"].is_null());

    // Garbage is a 400 with a reason, and the webhook keeps serving.
    let (code, bad) = post(&w, "{\"apiVersion\":");
    assert_eq!(code, 400);
    assert_eq!(bad["error"], "bad_request");
    let (code, _) = curl(&[
        "--cacert",
        w.ca.to_str().unwrap(),
        &w.url.replace("/mutate", "/healthz"),
    ]);
    assert_eq!(code, 200);
}

#[test]
fn with_egress_lock_configured_the_lock_is_injected_first_once() {
    let w = start_with(
        "egress_lock:
  image: registry.example.org/platform/chaperone-egress-lock@sha256:0000000000000000000000000000000000000000000000000000000000000000
  allow: [10.96.0.1, 10.100.0.0/16]
  dns: false
",
    );
    let original = pod(true);
    let (code, resp) = post(&w, &review(&original, "Pod").to_string());
    assert_eq!(code, 200, "{resp}");
    let patched = apply(&original, &resp);
    let inits = patched["spec"]["initContainers"].as_array().unwrap();
    let names: Vec<&str> = inits.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["chaperone-egress-lock", "chaperone"]);
    let lock = &inits[0];
    let args = strs(&lock["args"]);
    assert_eq!(
        args,
        [
            "--proxy-uid",
            "65532",
            "--allow",
            "10.96.0.1/32",
            "--allow",
            "10.100.0.0/16",
            "--no-dns"
        ]
    );
    assert_eq!(
        inits[1]["securityContext"]["runAsUser"], 65532,
        "the exempt UID is the sidecar's"
    );
    assert_eq!(
        lock["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN"])
    );
    validate(&patched);
    // The real binary takes these arguments.
    let (ok, out, err) = run(Command::new(bin())
        .arg("egress-lock")
        .args(&args)
        .arg("--print"));
    assert!(
        ok && out.contains("-d 10.100.0.0/16 -j RETURN"),
        "{err}{out}"
    );

    // Idempotent; and a pod injected before the lock was configured gets only the lock.
    let (_, again) = post(&w, &review(&patched, "Pod").to_string());
    assert!(again["response"]["patch"].is_null(), "{again}");
    let plain = start();
    let (_, resp) = post(&plain, &review(&original, "Pod").to_string());
    let unlocked = apply(&original, &resp);
    let (_, resp) = post(&w, &review(&unlocked, "Pod").to_string());
    let relocked = apply(&unlocked, &resp);
    assert_eq!(relocked, patched);
}

#[test]
fn a_bad_egress_lock_config_is_refused_with_file_and_key() {
    let (_dir, file) = temp_file(
        "inject.yaml",
        "image: chaperone:1\negress_lock:\n  image: lock:1\n  allow: [10.0.0.0/40]\n",
    );
    let (code, _, err) = chaperone(
        "inject",
        &[
            "--config",
            file.to_str().unwrap(),
            "--tls-cert",
            "/nonexistent",
            "--tls-key",
            "/nonexistent",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("inject.yaml")
            && err.contains("egress_lock.allow")
            && err.contains("10.0.0.0/40"),
        "{err}"
    );
}

/// The webhook serves through the proxy's one HTTP server builder: a request head over 64 KiB
/// gets 431 as on every other listener (hyper's default would take ~400 KiB).
#[test]
fn the_webhook_refuses_a_request_head_over_64_kib() {
    let w = start();
    let big = format!("x-big: {}", "a".repeat(70 * 1024));
    let with_big_head = |version: &str| {
        let ca = w.ca.to_str().unwrap();
        let (_, code, _) = curl_raw(&[
            version,
            "--cacert",
            ca,
            "-H",
            &big,
            "--data-binary",
            "{}",
            &w.url,
        ]);
        code
    };
    assert_eq!(with_big_head("--http1.1"), 431);
    // Over HTTP/2 the header list limit is the same size: the request is not served.
    assert_ne!(with_big_head("--http2"), 200);
    // Within the limit the same request is served.
    let (code, _) = post(&w, &review(&pod(true), "Pod").to_string());
    assert_eq!(code, 200);
}

/// A client that completes TLS and then sends its request head slowly (or never) is cut off
/// by the header-read timer instead of holding a connection and a task forever.
#[test]
fn the_webhook_closes_a_connection_whose_request_head_never_ends() {
    let w = start();
    let hostport = w
        .url
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let script = r#"
import socket, ssl, sys, time
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection((host, port)), server_hostname=host)
s.sendall(b"POST /mutate HTTP/1.1\r\nHost: x\r\n")
s.settimeout(30)
start = time.monotonic()
try:
    data = s.recv(4096)
except (ssl.SSLError, ConnectionResetError):
    data = b""
print("closed after %.1f s: %r" % (time.monotonic() - start, data[:40]))
"#;
    let out = Command::new(python())
        .args(["-c", script, host, port, w.ca.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let secs: f64 = text
        .split_whitespace()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{text} {}", String::from_utf8_lossy(&out.stderr)));
    assert!(secs < 20.0, "the half-sent request head was held: {text}");
}

/// Loopback unless told otherwise: in a cluster the manifest passes `--listen 0.0.0.0:8443`.
#[test]
fn the_webhook_listens_on_loopback_by_default() {
    let (code, out, err) = chaperone("webhook", &["--help"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[default: 127.0.0.1:8443]"), "{out}");
}
