//! `chaperone inject`: a mutating admission webhook (AdmissionReview v1 over TLS) that adds
//! the Chaperone sidecar to pods annotated `chaperone.dev/inject: "true"`.
//!
//! The mutation is a function from pod to pod that is idempotent: it adds only what is
//! missing (the native sidecar, the proxy and CA environment of each app container, the CA
//! mount, the volumes), so injecting an injected pod changes nothing. The JSONPatch sent
//! back is the difference between the pod as received and as mutated.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};

/// The annotation that asks for injection.
pub(crate) const ANNOTATION: &str = "chaperone.dev/inject";
/// The annotation naming the ConfigMap with `chaperone.yaml` and `policy.cedar`.
pub(crate) const CONFIG_ANNOTATION: &str = "chaperone.dev/config";
/// The proxy address the app is pointed at.
const PROXY: &str = "http://127.0.0.1:15001";
/// Where the app finds the CA certificate.
const CA_PATH: &str = "/etc/chaperone/ca/ca.pem";
/// Largest AdmissionReview accepted (the API server's own request limit is 3 MiB).
const MAX_BODY: usize = 4 * 1024 * 1024;

/// What is injected: `chaperone inject --config inject.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectConfig {
    /// The Chaperone image, preferably by digest.
    pub image: String,
    /// ConfigMap with `chaperone.yaml` and `policy.cedar`, unless the pod names another in
    /// the `chaperone.dev/config` annotation. Default `chaperone-config`.
    #[serde(default = "default_config_map")]
    pub(crate) config_map: String,
    /// Secret with `ca.pem` and `ca-key.pem`. Default `chaperone-ca`.
    #[serde(default = "default_ca_secret")]
    pub(crate) ca_secret: String,
    /// Secret with the fingerprint key (`key`); none if absent.
    #[serde(default)]
    pub(crate) fingerprint_secret: Option<String>,
    /// Audience of the projected service-account token mounted for token exchange
    /// (`/var/run/secrets/chaperone/token`); no token if absent.
    #[serde(default)]
    pub(crate) token_audience: Option<String>,
    /// The sidecar's UID (it must differ from the app's). Default 65532.
    #[serde(default = "default_uid")]
    pub(crate) sidecar_uid: u32,
    /// Also add the egress lock, so the sidecar is the app's only way out of the pod (an
    /// init container, first, running `chaperone egress-lock` with NET_ADMIN); none if
    /// absent. Every injected pod gets it: a pod cannot opt out by annotation.
    #[serde(default)]
    pub(crate) egress_lock: Option<EgressLockInject>,
}

/// The injected egress lock (`egress_lock:` in inject.yaml).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EgressLockInject {
    /// The egress-lock image (deploy/Dockerfile, target `egress-lock`), preferably by digest.
    pub(crate) image: String,
    /// Destinations every container may reach directly, as addresses or CIDRs (what the
    /// apps list in `NO_PROXY` beyond loopback).
    #[serde(default, deserialize_with = "destinations")]
    pub(crate) allow: Vec<ipnet::IpNet>,
    /// Let containers query the pod's resolvers directly (port 53). Default true.
    #[serde(default = "default_true")]
    pub(crate) dns: bool,
}

fn destinations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| crate::cli::egress_lock::parse_destination(s).map_err(serde::de::Error::custom))
        .collect()
}

fn default_true() -> bool {
    true
}

fn default_config_map() -> String {
    "chaperone-config".into()
}
fn default_ca_secret() -> String {
    "chaperone-ca".into()
}
fn default_uid() -> u32 {
    65532
}

impl InjectConfig {
    /// Load and check `path`; errors name the file, line and key.
    pub fn load(path: &Path) -> Result<InjectConfig, String> {
        let file = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read: {e}"))?;
        let (_, cfg) =
            crate::config::parse_yaml::<InjectConfig>(&file, &text).map_err(|e| e.to_string())?;
        if cfg.image.trim().is_empty() {
            return Err(format!("{file}: image: must name the Chaperone image"));
        }
        if let Some(lock) = &cfg.egress_lock
            && lock.image.trim().is_empty()
        {
            return Err(format!(
                "{file}: egress_lock.image: must name the egress-lock image"
            ));
        }
        Ok(cfg)
    }
}

/// The pod with the sidecar added, or `None` when the pod does not ask for it.
pub(crate) fn mutate(cfg: &InjectConfig, pod: &Value) -> Option<Value> {
    let annotations = &pod["metadata"]["annotations"];
    if annotations[ANNOTATION].as_str() != Some("true") {
        return None;
    }
    let config_map = annotations[CONFIG_ANNOTATION]
        .as_str()
        .unwrap_or(&cfg.config_map)
        .to_string();
    let mut pod = pod.clone();
    let spec = pod["spec"].as_object_mut()?;

    // Volumes first, by name: an existing volume of the same name is the pod's own choice.
    let mut volumes = vec![
        json!({"name": "chaperone-config", "configMap": {"name": config_map}}),
        json!({"name": "chaperone-ca", "secret": {"secretName": cfg.ca_secret, "defaultMode": 0o400}}),
        json!({"name": "chaperone-ca-cert", "secret": {"secretName": cfg.ca_secret, "items": [{"key": "ca.pem", "path": "ca.pem"}]}}),
    ];
    let mut mounts = vec![
        json!({"name": "chaperone-config", "mountPath": "/etc/chaperone/config", "readOnly": true}),
        json!({"name": "chaperone-ca", "mountPath": "/etc/chaperone/ca", "readOnly": true}),
    ];
    if let Some(s) = &cfg.fingerprint_secret {
        volumes.push(json!({"name": "chaperone-fingerprint", "secret": {"secretName": s, "defaultMode": 0o400}}));
        mounts.push(json!({"name": "chaperone-fingerprint", "mountPath": "/etc/chaperone/fingerprint", "readOnly": true}));
    }
    if let Some(aud) = &cfg.token_audience {
        volumes.push(json!({"name": "chaperone-token", "projected": {"sources": [{"serviceAccountToken": {"audience": aud, "expirationSeconds": 3600, "path": "token"}}]}}));
        mounts.push(json!({"name": "chaperone-token", "mountPath": "/var/run/secrets/chaperone", "readOnly": true}));
    }
    let list = spec.entry("volumes").or_insert_with(|| json!([]));
    for v in volumes {
        add_named(list, v);
    }

    // The app containers: proxy and CA environment, and the CA certificate (never the key).
    if let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) {
        for c in containers.iter_mut() {
            let env = c
                .as_object_mut()
                .map(|o| o.entry("env").or_insert_with(|| json!([])));
            if let Some(env) = env {
                for (k, v) in [
                    ("HTTP_PROXY", PROXY),
                    ("HTTPS_PROXY", PROXY),
                    ("http_proxy", PROXY),
                    ("https_proxy", PROXY),
                    ("NO_PROXY", "localhost,127.0.0.1,::1"),
                    ("no_proxy", "localhost,127.0.0.1,::1"),
                    ("SSL_CERT_FILE", CA_PATH),
                    ("REQUESTS_CA_BUNDLE", CA_PATH),
                    ("CURL_CA_BUNDLE", CA_PATH),
                    ("NODE_EXTRA_CA_CERTS", CA_PATH),
                ] {
                    add_named(env, json!({"name": k, "value": v}));
                }
            }
            if let Some(o) = c.as_object_mut() {
                let vm = o.entry("volumeMounts").or_insert_with(|| json!([]));
                add_named(
                    vm,
                    json!({"name": "chaperone-ca-cert", "mountPath": "/etc/chaperone/ca", "readOnly": true}),
                );
            }
        }
    }

    // The native sidecar, first among init containers so it is up before any of them; then
    // the egress lock before it, so no container, the sidecar included, runs unlocked.
    let init = spec.entry("initContainers").or_insert_with(|| json!([]));
    if let Some(list) = init.as_array_mut() {
        if !list.iter().any(|c| c["name"] == "chaperone") {
            list.insert(0, sidecar(cfg, mounts));
        }
        if let Some(lock) = &cfg.egress_lock
            && !list.iter().any(|c| c["name"] == EGRESS_LOCK)
        {
            list.insert(0, egress_lock(cfg.sidecar_uid, lock));
        }
    }
    Some(pod)
}

/// Append `item` to the array `list` unless an entry of the same `name` is there.
fn add_named(list: &mut Value, item: Value) {
    if let Some(a) = list.as_array_mut()
        && !a.iter().any(|x| x["name"] == item["name"])
    {
        a.push(item);
    }
}

fn sidecar(cfg: &InjectConfig, mounts: Vec<Value>) -> Value {
    json!({
        "name": "chaperone",
        "image": cfg.image,
        "restartPolicy": "Always",
        "args": ["run", "--config", "/etc/chaperone/config/chaperone.yaml"],
        "env": [{"name": "CHAPERONE_LOG_FORMAT", "value": "json"}],
        "ports": [
            {"name": "chaperone-proxy", "containerPort": 15001},
            {"name": "chaperone-admin", "containerPort": 15000}
        ],
        "startupProbe": {"httpGet": {"path": "/readyz", "port": 15000}, "periodSeconds": 1, "failureThreshold": 30},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": 15000}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 15000}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": {
            "runAsUser": cfg.sidecar_uid,
            "runAsGroup": cfg.sidecar_uid,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}
        },
        "volumeMounts": mounts
    })
}

/// The egress-lock init container's name.
const EGRESS_LOCK: &str = "chaperone-egress-lock";

/// The egress lock: runs once as root with NET_ADMIN alone (see deploy/components/egress-lock).
fn egress_lock(sidecar_uid: u32, lock: &EgressLockInject) -> Value {
    let mut args = vec!["--proxy-uid".to_string(), sidecar_uid.to_string()];
    for net in &lock.allow {
        args.extend(["--allow".to_string(), net.to_string()]);
    }
    if !lock.dns {
        args.push("--no-dns".into());
    }
    json!({
        "name": EGRESS_LOCK,
        "image": lock.image,
        "args": args,
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
            "seccompProfile": {"type": "RuntimeDefault"}
        }
    })
}

/// The AdmissionReview response for a request body, or a 400 reason.
pub(crate) fn review(cfg: &InjectConfig, body: &[u8]) -> Result<Value, String> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    if review["apiVersion"] != "admission.k8s.io/v1" || review["kind"] != "AdmissionReview" {
        return Err("expected apiVersion admission.k8s.io/v1, kind AdmissionReview".into());
    }
    let request = &review["request"];
    let uid = request["uid"]
        .as_str()
        .ok_or("request.uid is missing")?
        .to_string();
    let mut response = json!({"uid": uid, "allowed": true});
    let is_pod = request["kind"]["kind"] == "Pod" && request["kind"]["group"] == "";
    if is_pod && let Some(mutated) = mutate(cfg, &request["object"]) {
        let patch = json_patch::diff(&request["object"], &mutated);
        if !patch.0.is_empty() {
            let bytes = serde_json::to_vec(&patch).map_err(|e| e.to_string())?;
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response
    }))
}

type Stamps = (crate::files::FileStamp, crate::files::FileStamp);

/// The webhook's TLS certificate, re-read when its files change (cert-manager renews them
/// in place), so a renewal needs no restart.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<(Stamps, Arc<rustls::sign::CertifiedKey>)>,
}

impl ReloadingCert {
    fn load(cert: &Path, key: &Path) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        let key_der = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("{}: {e}", key.display()))?;
        // The provider the build selected (the crypto-backend feature).
        let provider = rustls::ServerConfig::builder().crypto_provider().clone();
        let signing = provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| format!("{}: {e}", key.display()))?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(chain, signing)))
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        use crate::files::stamp_of;
        let stamp = (stamp_of(&self.cert), stamp_of(&self.key));
        let mut cur = self.current.lock();
        if stamp != cur.0 {
            match Self::load(&self.cert, &self.key) {
                Ok(k) => *cur = (stamp, k),
                // A half-written renewal: keep serving the previous certificate.
                Err(e) => {
                    tracing::warn!(error = %e, "webhook certificate reload failed; keeping the previous one")
                }
            }
        }
        Some(cur.1.clone())
    }
}

/// How long a client has for its TLS handshake, and then for each request head (also how long
/// an idle keep-alive connection is kept): the API server sends its review at once.
const HEADER_READ: std::time::Duration = std::time::Duration::from_secs(10);

/// `chaperone webhook`: 0 on a clean stop, 2 on a config, TLS or bind error.
pub(crate) fn command(
    config: &Path,
    listen: SocketAddr,
    tls_cert: &Path,
    tls_key: &Path,
) -> super::Exit {
    super::init_tracing("info");
    let cfg = match InjectConfig::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chaperone webhook: {e}");
            return super::Exit::Error;
        }
    };
    match super::runtime().block_on(serve(listen, tls_cert, tls_key, cfg)) {
        Ok(()) => super::Exit::Ok,
        Err(e) => {
            eprintln!("chaperone webhook: {e}");
            super::Exit::Error
        }
    }
}

/// Serve the webhook on `addr` until the process ends: `POST /mutate` (AdmissionReview v1)
/// and `GET /healthz`.
pub(crate) async fn serve(
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
    cfg: InjectConfig,
) -> Result<(), String> {
    let first = ReloadingCert::load(cert, key)?;
    let resolver = ReloadingCert {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        current: Mutex::new((
            (crate::files::stamp_of(cert), crate::files::stamp_of(key)),
            first,
        )),
    };
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("chaperone webhook: webhook listening on https://{local}/mutate");
    let cfg = Arc::new(cfg);
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let (acceptor, cfg) = (acceptor.clone(), cfg.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HEADER_READ, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(client = %peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let svc = hyper::service::service_fn(move |req| {
                let cfg = cfg.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&cfg, req).await) }
            });
            let _ = crate::proxy::http::Server::new(HEADER_READ)
                .serve(tls, svc)
                .await;
        });
    }
}

async fn handle(cfg: &InjectConfig, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Value| {
        let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, json!({"status": "ok"})),
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        json!({"error": "bad_request", "reason": format!("cannot read the body: {e}")}),
                    );
                }
            };
            match review(cfg, &body) {
                Ok(v) => reply(StatusCode::OK, v),
                Err(reason) => reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "bad_request", "reason": reason}),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "reason": "POST /mutate or GET /healthz"}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InjectConfig {
        InjectConfig {
            image: "chaperone:test".into(),
            config_map: default_config_map(),
            ca_secret: default_ca_secret(),
            fingerprint_secret: Some("chaperone-fingerprint".into()),
            token_audience: Some("sts.example.org".into()),
            sidecar_uid: 65532,
            egress_lock: None,
        }
    }

    fn pod(annotated: bool) -> Value {
        let mut p = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "annotations": {}},
            "spec": {"containers": [{"name": "app", "image": "app:1", "env": [{"name": "HTTP_PROXY", "value": "http://mine:1"}]}]}
        });
        if annotated {
            p["metadata"]["annotations"][ANNOTATION] = json!("true");
        }
        p
    }

    #[test]
    fn injects_once_and_keeps_what_the_pod_set() {
        let c = cfg();
        assert!(mutate(&c, &pod(false)).is_none());
        let once = mutate(&c, &pod(true)).unwrap();
        assert_eq!(once["spec"]["initContainers"][0]["name"], "chaperone");
        assert_eq!(once["spec"]["initContainers"][0]["restartPolicy"], "Always");
        let env = once["spec"]["containers"][0]["env"].as_array().unwrap();
        let proxy: Vec<_> = env.iter().filter(|e| e["name"] == "HTTP_PROXY").collect();
        assert_eq!(proxy.len(), 1);
        assert_eq!(
            proxy[0]["value"], "http://mine:1",
            "the pod's own setting wins"
        );
        assert_eq!(mutate(&c, &once).unwrap(), once, "idempotent");
        let mut named = pod(true);
        named["metadata"]["annotations"][CONFIG_ANNOTATION] = json!("team-config");
        let m = mutate(&c, &named).unwrap();
        assert!(
            m["spec"]["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["configMap"]["name"] == "team-config")
        );
    }

    #[test]
    fn malformed_reviews_are_refused_with_a_reason() {
        let c = cfg();
        assert!(
            review(&c, b"{")
                .unwrap_err()
                .contains("not an AdmissionReview")
        );
        assert!(review(&c, br#"{"apiVersion":"v1","kind":"Pod"}"#).is_err());
        let no_uid =
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#;
        assert!(review(&c, no_uid).unwrap_err().contains("uid"));
    }
}
