//! `chaperone demo`: the main job end to end on loopback, with nothing else installed.
//!
//! Two upstreams verify every token against the sidecar's JWKS (fetched over HTTP from the
//! admin port, as a real service would), each by the rules of the token profile it takes: a
//! "model API" outside the trust domain takes RFC 9068 access tokens (`at+jwt`, its own origin
//! as `aud`, `Authorization: Bearer`); an internal "ticket service" inside the trust domain
//! takes transaction tokens (`txntoken+jwt`, the trust domain as `aud`, the `Txn-Token`
//! header, never `Authorization`). The sidecar runs on ephemeral ports with an embedded demo
//! config. A scripted agent then calls through it: once with a hard-coded key, under two
//! purposes and both hops, once for a purpose policy forbids, once at the cloud metadata
//! endpoint. The demo checks every outcome and exits non-zero if the product did not do its
//! job.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use super::Exit;
use crate::config::Config;

const IDENTITY: &str = "spiffe://demo.local/ns/agents/sa/support-agent";

/// A hard-coded key, as apps paste them: it has a real OpenAI project-key shape.
fn hard_coded_key() -> String {
    format!("sk-proj-{}", "DemoKey0nlyForChaperone_".repeat(2))
}

const POLICY: &str = r#"// Demo policy: the support agent may call the model API to answer questions and
// summarize tickets; bulk export is forbidden whatever else permits it.
@id("support-agent-may-use-model-api")
permit (principal, action == Action::"POST", resource)
when {
  context.route == "model-api" &&
  principal.workload == "support-agent" &&
  ["answer-question", "summarize-ticket"].contains(context.purpose)
};

@id("support-agent-may-read-tickets")
permit (principal, action == Action::"POST", resource)
when {
  context.route == "ticket-service" &&
  principal.workload == "support-agent" &&
  context.purpose == "summarize-ticket"
};

@id("no-bulk-export")
forbid (principal, action, resource)
when { context.purpose == "export-data" };
"#;

/// The demo's trust domain: the transaction token's audience.
const TRUST_DOMAIN: &str = "demo.local";

fn config_yaml(
    upstream: SocketAddr,
    tickets: SocketAddr,
    policy: &std::path::Path,
    log: &std::path::Path,
) -> String {
    format!(
        r#"listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity:
  id: {IDENTITY}
  trust_domain: {TRUST_DOMAIN}
  workload: support-agent
  environment: demo
credentials:
  per-call:
    kind: jwt
    profile: access_token   # RFC 9068, for an API outside the trust domain
    ttl: 60s
  txn:
    kind: jwt
    profile: txn_token      # for services inside the trust domain (Txn-Token header)
    ttl: 60s
routes:
  - name: model-api
    match: {{ host: 127.0.0.1, port: {port}, path_prefix: /v1/ }}
    credential: per-call
    inject: {{ header: authorization, value: "Bearer {{token}}" }}
    scopes: [model.invoke]
    labels: {{ data: customer-tickets, sensitivity: high }}
  - name: ticket-service
    match: {{ host: 127.0.0.1, port: {tickets_port}, path_prefix: /internal/ }}
    credential: txn
    scopes: [tickets.read]
    labels: {{ data: customer-tickets, sensitivity: high }}
strip:
  mode: strip
policy:
  file: {policy}
log:
  format: json
  output: {log}
"#,
        port = upstream.port(),
        tickets_port = tickets.port(),
        policy = policy.display(),
        log = log.display(),
    )
}

/// What the model API saw on one request.
#[derive(Debug, Clone, Default)]
struct Seen {
    verified: bool,
    error: Option<String>,
    claims: Value,
    app_key_seen: bool,
}

/// Which token profile an upstream takes, and so how it verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takes {
    /// RFC 9068 access tokens as `Authorization: Bearer`, `aud` = its origin.
    AccessToken,
    /// Transaction tokens in `Txn-Token`, `aud` = the trust domain.
    TxnToken,
}

struct ModelApi {
    jwks_url: Mutex<Option<String>>,
    jwks: tokio::sync::Mutex<Option<JwkSet>>,
    seen: Mutex<Vec<Seen>>,
    origin: String,
    takes: Takes,
}

impl ModelApi {
    async fn jwks(&self) -> Result<JwkSet, String> {
        let mut cached = self.jwks.lock().await;
        if let Some(j) = cached.as_ref() {
            return Ok(j.clone());
        }
        let url = self.jwks_url.lock().clone().ok_or("no JWKS URL yet")?;
        let (status, body) = http_get(&url).await?;
        if status != StatusCode::OK {
            return Err(format!("JWKS fetch gave {status}"));
        }
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        *cached = Some(set.clone());
        Ok(set)
    }

    /// Verify by the profile's rules: `typ`, `aud`, the claims it requires.
    async fn verify(&self, token: &str) -> Result<Value, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        let (typ, audience) = match self.takes {
            Takes::AccessToken => ("at+jwt", self.origin.as_str()),
            Takes::TxnToken => ("txntoken+jwt", TRUST_DOMAIN),
        };
        if header.typ.as_deref() != Some(typ) {
            return Err(format!("typ is {:?}, not {typ}", header.typ));
        }
        let kid = header.kid.ok_or("token has no kid")?;
        let set = self.jwks().await?;
        let jwk = set.find(&kid).ok_or("kid not in the JWKS")?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_audience(&[audience]);
        v.set_issuer(&[IDENTITY]);
        v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        let claims = jsonwebtoken::decode::<Value>(token, &key, &v)
            .map(|d| d.claims)
            .map_err(|e| e.to_string())?;
        let required: &[&str] = match self.takes {
            // RFC 9068 §2.2.
            Takes::AccessToken => &["client_id", "iat", "jti"],
            // The Transaction Tokens draft's required claims.
            Takes::TxnToken => &["iat", "txn", "scope"],
        };
        match required.iter().find(|c| claims.get(**c).is_none()) {
            Some(missing) => Err(format!("no `{missing}` claim")),
            None => Ok(claims),
        }
    }

    /// The token where the profile says it travels; a transaction token presented as an
    /// access token is refused.
    fn token_of(&self, headers: &http::HeaderMap) -> Result<String, String> {
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match self.takes {
            Takes::AccessToken => bearer
                .map(str::to_owned)
                .ok_or_else(|| "no bearer token".into()),
            Takes::TxnToken => {
                if bearer.is_some() {
                    return Err("an Authorization header on a transaction-token service".into());
                }
                headers
                    .get("txn-token")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                    .ok_or_else(|| "no Txn-Token header".into())
            }
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let app_key = hard_coded_key();
        let app_key_seen = req
            .headers()
            .values()
            .any(|v| v.to_str().is_ok_and(|s| s.contains(&app_key)));
        let mut seen = Seen {
            app_key_seen,
            ..Seen::default()
        };
        match self.token_of(req.headers()) {
            Err(e) => seen.error = Some(e),
            Ok(t) => match self.verify(&t).await {
                Ok(claims) => {
                    seen.verified = true;
                    seen.claims = claims;
                }
                Err(e) => seen.error = Some(e),
            },
        }
        let status = if seen.verified {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        let body = json!({
            "verified": seen.verified,
            "error": seen.error,
            "purpose": seen.claims.pointer("/tctx/purpose"),
            "jti": seen.claims.get("jti"),
            "choices": [{"message": {"role": "assistant", "content": "Here is your answer."}}],
        });
        self.seen.lock().push(seen);
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/json"),
        );
        resp
    }
}

/// Start an upstream that takes `takes` on a loopback port of its own.
async fn serve_api(takes: Takes) -> Result<(Arc<ModelApi>, SocketAddr), String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let api = Arc::new(ModelApi {
        jwks_url: Mutex::new(None),
        jwks: tokio::sync::Mutex::new(None),
        seen: Mutex::new(Vec::new()),
        origin: format!("http://{addr}"),
        takes,
    });
    let served = api.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let api = served.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(api.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok((api, addr))
}

async fn http_get(url: &str) -> Result<(StatusCode, Bytes), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    let addr = uri.authority().ok_or("no authority")?.as_str().to_string();
    let req = Request::get(uri.path())
        .header("host", &addr)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    send(&addr, req).await
}

/// One request on a fresh connection to `addr` (a proxy, for absolute-form requests).
async fn send(addr: &str, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

struct Step {
    title: &'static str,
    purpose: Option<&'static str>,
    url: String,
    app_key: bool,
    expect: StatusCode,
}

/// `chaperone demo`: 0 when the product did its job, 1 when a check failed, 2 when the demo
/// could not run.
pub(crate) fn command() -> Exit {
    super::init_tracing("warn");
    super::runtime().block_on(run())
}

/// Run the demo; prints a summary and where the purpose log is.
pub(crate) async fn run() -> Exit {
    match run_inner().await {
        Ok(true) => Exit::Ok,
        Ok(false) => Exit::Finding,
        Err(e) => {
            eprintln!("demo failed: {e}");
            Exit::Error
        }
    }
}

async fn run_inner() -> Result<bool, String> {
    let dir = std::env::temp_dir().join(format!("chaperone-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let policy_path = dir.join("policy.cedar");
    let log_path = dir.join("purpose-log.jsonl");
    std::fs::write(&policy_path, POLICY).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&log_path);

    // The model API (outside the trust domain) and the ticket service (inside it).
    let (api, api_addr) = serve_api(Takes::AccessToken).await?;
    let (tickets, tickets_addr) = serve_api(Takes::TxnToken).await?;

    // The sidecar, on the same config loader users run.
    let yaml = config_yaml(api_addr, tickets_addr, &policy_path, &log_path);
    let cfg = Config::from_yaml("<demo config>", &yaml, &dir, false).map_err(|e| e.to_string())?;
    let running = crate::sidecar::start(cfg)
        .await
        .map_err(|e| e.to_string())?;
    let proxy = running.proxy_addrs[0].to_string();
    for s in [&api, &tickets] {
        *s.jwks_url.lock() = Some(format!(
            "http://{}/.well-known/jwks.json",
            running.admin_addr
        ));
    }

    println!(
        "Chaperone demo: an AI agent calls a model API through the sidecar (all on 127.0.0.1).\n"
    );
    println!(
        "  model API       http://{api_addr}  takes access tokens (at+jwt, Authorization: Bearer)"
    );
    println!(
        "  ticket service  http://{tickets_addr}  takes transaction tokens (txntoken+jwt, Txn-Token, aud {TRUST_DOMAIN})"
    );
    println!("  both verify every token against the sidecar's JWKS");
    println!("  sidecar         http://{proxy}  identity {IDENTITY}");
    println!(
        "  admin           http://{}  /healthz /readyz /metrics /.well-known/jwks.json\n",
        running.admin_addr
    );

    let steps = [
        Step {
            title: "answer a question (the app has a hard-coded OpenAI key)",
            purpose: Some("answer-question"),
            url: format!("http://{api_addr}/v1/chat/completions"),
            app_key: true,
            expect: StatusCode::OK,
        },
        Step {
            title: "summarize a support ticket",
            purpose: Some("summarize-ticket"),
            url: format!("http://{api_addr}/v1/chat/completions"),
            app_key: false,
            expect: StatusCode::OK,
        },
        Step {
            title: "read the ticket's history from the internal ticket service",
            purpose: Some("summarize-ticket"),
            url: format!("http://{tickets_addr}/internal/tickets/4711"),
            app_key: false,
            expect: StatusCode::OK,
        },
        Step {
            title: "export all customer tickets",
            purpose: Some("export-data"),
            url: format!("http://{api_addr}/v1/files"),
            app_key: false,
            expect: StatusCode::FORBIDDEN,
        },
        Step {
            title: "read the cloud metadata endpoint",
            purpose: None,
            url: "http://169.254.169.254/latest/meta-data/iam/security-credentials/".into(),
            app_key: false,
            expect: StatusCode::FORBIDDEN,
        },
    ];

    let mut ok = true;
    let mut allowed = 0;
    let mut denied = 0;
    for (i, step) in steps.iter().enumerate() {
        let mut b = Request::post(step.url.as_str()).header("content-type", "application/json");
        if let Some(p) = step.purpose {
            b = b.header("chaperone-purpose", p);
        }
        if step.app_key {
            b = b.header("authorization", format!("Bearer {}", hard_coded_key()));
        }
        let req = b
            .body(Full::new(Bytes::from_static(
                br#"{"model":"demo","messages":[{"role":"user","content":"hello"}]}"#,
            )))
            .map_err(|e| e.to_string())?;
        let service = if step.url.contains(&tickets_addr.to_string()) {
            &tickets
        } else {
            &api
        };
        let seen_before = service.seen.lock().len();
        let (status, body) = send(&proxy, req).await?;
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        println!("{}. {}", i + 1, step.title);
        if status != step.expect {
            ok = false;
            println!("   FAIL: expected {}, got {status}: {body}", step.expect);
            continue;
        }
        if status == StatusCode::OK {
            allowed += 1;
            let seen = service
                .seen
                .lock()
                .get(seen_before)
                .cloned()
                .unwrap_or_default();
            if !seen.verified || seen.app_key_seen {
                ok = false;
            }
            let (who, what) = match service.takes {
                Takes::AccessToken => ("the model API", "an access token"),
                Takes::TxnToken => ("the ticket service", "a transaction token"),
            };
            println!(
                "   -> {status}: {who} verified {what} minted for this call (jti {}, purpose {}, scope \"{}\", expires in {}s)",
                seen.claims["jti"].as_str().unwrap_or("?"),
                seen.claims
                    .pointer("/tctx/purpose")
                    .and_then(Value::as_str)
                    .unwrap_or("?"),
                seen.claims["scope"].as_str().unwrap_or(""),
                seen.claims["exp"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(seen.claims["iat"].as_u64().unwrap_or(0)),
            );
            if step.app_key {
                println!(
                    "      the hard-coded key was stripped before forwarding; {who} {} it",
                    if seen.app_key_seen {
                        "SAW"
                    } else {
                        "never saw"
                    }
                );
            }
        } else {
            denied += 1;
            println!(
                "   -> {status} {}: {}",
                body["error"].as_str().unwrap_or("?"),
                body["reason"].as_str().unwrap_or("?")
            );
        }
    }

    running.shutdown().await;
    let log =
        std::fs::read_to_string(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let stripped: Vec<String> = lines
        .iter()
        .flat_map(|l| l["stripped"].as_array().cloned().unwrap_or_default())
        .map(|f| {
            format!(
                "{} in {} (fingerprint {})",
                f["type"].as_str().unwrap_or("?"),
                f["location"].as_str().unwrap_or("?"),
                f["fingerprint"].as_str().unwrap_or("?")
            )
        })
        .collect();
    let leaked = log.contains(&hard_coded_key());
    if leaked || stripped.is_empty() || lines.len() != steps.len() {
        ok = false;
    }

    println!(
        "\nSummary: {} calls, {allowed} allowed with a fresh per-call token each, {denied} denied.",
        steps.len()
    );
    for s in &stripped {
        println!("  stripped: {s}");
    }
    println!(
        "  the hard-coded key appears in the purpose log: {}",
        if leaked {
            "YES (bug)"
        } else {
            "no (only its fingerprint)"
        }
    );
    println!(
        "\nPurpose log, one JSON line per request: {}",
        log_path.display()
    );
    if let Some(first) = lines.first() {
        let show = json!({
            "identity": first["identity"], "workload": first["workload"], "purpose": first["purpose"],
            "route": first["route"], "decision": first["decision"], "policy_ids": first["policy_ids"],
            "credential": first["credential"], "stripped": first["stripped"], "status": first["status"],
        });
        println!("  first line, abridged: {show}");
    }
    println!(
        "\n{}",
        if ok {
            "demo: every check held"
        } else {
            "demo: FAILED, see above"
        }
    );
    Ok(ok)
}
