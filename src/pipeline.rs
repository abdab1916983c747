//! The request pipeline, read top to bottom: one call per stage, data flowing one way.
//!
//! ```text
//! identify -> accept -> route -> strip -> authorize -> credential -> forward -> log
//! ```
//!
//! Order matters and is deliberate:
//! - identify runs first so even a malformed request gets a request id and a log line;
//! - strip runs before authorize so policy can see what was embedded (`stripped_types`), and
//!   before credential so the app's secret is gone before ours is injected in its place;
//! - guardrails run before policy so no policy mistake can open the metadata endpoint or the
//!   admin port;
//! - credential runs after authorize so a denied request never causes a token to be minted;
//! - log runs last, when the response body has ended, so duration and bytes are final.
//!
//! Stages are plain functions in their own modules; only this file builds the log record.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST, HeaderValue, TRANSFER_ENCODING};
use http::{Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use secrecy::ExposeSecret;

use crate::credentials::{Credentials, MintRequest};
use crate::error::{BoxError, ErrorCode, ProxyBody, Rejection, full};
use crate::fingerprint::Fingerprinter;
use crate::identify::{self, Caller, Conn, REQUEST_ID_HEADER, UNSPECIFIED_PURPOSE};
use crate::metrics::{CredentialLabels, Metrics, RequestLabels, RouteLabels, StrippedLabels};
use crate::policy::{GuardrailHit, Guardrails, PolicyInput, PolicyStore};
use crate::proxy::Timeouts;
use crate::proxy::attest::Attestation;
use crate::proxy::upstream::{self, OutBody, Upstream};
use crate::purpose_log::{CredentialLog, PurposeLog, Record};
use crate::route::{InjectInto, RouteTable, Target};
use crate::strip::BodyPlan;
use crate::strip::StripMode;
use crate::{strip, target};

/// Everything the stages need, built once from the configuration. Each worker thread has its
/// own clone (sharing everything but the upstream connection pool, see [`Pipeline::for_worker`]).
#[derive(Clone)]
pub struct Pipeline {
    /// Routes in match order.
    pub routes: Arc<RouteTable>,
    /// The policy set in force (swapped whole on reload).
    pub policy: Arc<PolicyStore>,
    /// Addresses refused before policy.
    pub guardrails: Guardrails,
    /// Credential sources.
    pub credentials: Arc<Credentials>,
    /// Fingerprints for embedded secrets.
    pub fingerprinter: Fingerprinter,
    /// Global strip mode.
    pub strip_mode: StripMode,
    /// Largest request body inspected for embedded secrets.
    pub body_max_bytes: usize,
    /// Purpose log.
    pub log: PurposeLog,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Upstream client.
    pub upstream: Upstream,
    /// Upstream TLS settings (each worker's client is built from them).
    pub upstream_tls: Arc<rustls::ClientConfig>,
    /// TLS interception, when a local CA is configured.
    pub intercept: Option<Arc<crate::proxy::intercept::Interceptor>>,
    /// Shutdown draining for intercepted connections.
    pub drain: Arc<crate::proxy::drain::Drain>,
    /// Our `Via` entry.
    pub via: HeaderValue,
    /// Our `Via` pseudonym, unique per process, for loop detection.
    pub pseudonym: String,
    /// Timeouts.
    pub timeouts: Timeouts,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("pseudonym", &self.pseudonym)
            .finish_non_exhaustive()
    }
}

fn strip_mode_name(m: StripMode) -> &'static str {
    match m {
        StripMode::Strip => "strip",
        StripMode::Block => "block",
        StripMode::Report => "report",
    }
}

impl Pipeline {
    /// A copy for one worker thread: shared stages, its own upstream pool, so a request and
    /// the upstream connection it uses live on the same thread (no cross-thread wakeups).
    pub fn for_worker(&self) -> Pipeline {
        let mut p = self.clone();
        p.upstream = Upstream::new(
            &self.timeouts,
            self.upstream_tls.clone(),
            Arc::new(self.guardrails.clone()),
        );
        p
    }

    /// Handle one request that came in on `conn`; `origin` is the CONNECT target when the
    /// request was decrypted from an intercepted tunnel.
    pub async fn handle(
        self: Arc<Self>,
        conn: Arc<Conn>,
        origin: Option<Arc<Target>>,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let mut rec = Record::new(SystemTime::now());
        rec.client = conn.label.clone();
        rec.caller_uid = conn.attestation.uid();
        rec.method = req.method().to_string();
        rec.strip_mode = strip_mode_name(self.strip_mode);

        let (mut parts, body) = req.into_parts();
        // Stage 2 (first, see the module docs): identify.
        let (caller, purpose_ok) =
            identify::identify(&conn.identity, &mut parts.headers, conn.client);
        rec.request_id = caller.request_id.clone();
        rec.trace_id = caller.trace_id.clone();
        rec.identity = caller.identity.id.clone();
        rec.workload = caller.identity.workload.clone();
        rec.stage = caller.identity.stage.clone();
        rec.environment = caller.identity.environment.clone();
        rec.purpose = caller
            .purpose
            .clone()
            .unwrap_or_else(|| UNSPECIFIED_PURPOSE.into());

        // A caller the listener does not admit is refused before anything else is looked at.
        let purpose_ok = match &conn.attestation {
            Attestation::Refused(why) => Err(Rejection::new(ErrorCode::PolicyDenied, why.clone())),
            _ => purpose_ok.map_err(|reason| Rejection::new(ErrorCode::BadRequest, reason)),
        };
        let result = match purpose_ok {
            Err(rej) => Err(rej),
            Ok(()) if parts.method == Method::CONNECT && origin.is_none() => {
                let req = Request::from_parts(parts, body);
                return self.connect(&conn, &caller, req, rec, start).await;
            }
            Ok(()) => {
                self.run(&caller, origin.as_deref(), parts, body, &mut rec)
                    .await
            }
        };
        match result {
            Ok(resp) => {
                let (mut head, body) = resp.into_parts();
                upstream::strip_hop_by_hop(&mut head.headers);
                upstream::append_via(&mut head.headers, &self.via);
                if let Ok(v) = HeaderValue::from_str(&caller.request_id) {
                    head.headers.insert(REQUEST_ID_HEADER.clone(), v);
                }
                rec.status = head.status.as_u16();
                let body = LoggedBody {
                    inner: body,
                    done: Some(Completion {
                        rec,
                        start,
                        pipeline: self.clone(),
                    }),
                    ended: false,
                };
                Response::from_parts(head, body.boxed_unsync())
            }
            Err(rej) => self.reject(rec, rej, start, &caller.request_id),
        }
    }

    /// Stages 1 and 3 to 7 for an HTTP request; fills `rec` as it goes.
    async fn run(
        &self,
        caller: &Caller,
        origin: Option<&Target>,
        mut parts: http::request::Parts,
        body: Incoming,
        rec: &mut Record,
    ) -> Result<Response<Incoming>, Rejection> {
        // Stage 1: accept.
        let (target, userinfo) = match origin {
            Some(o) => (target::intercepted_target(&parts, o)?, None),
            None => target::target(&parts)?,
        };
        describe_target(rec, &target);
        if upstream::is_loop(&parts.headers, &self.pseudonym) {
            return Err(Rejection::new(
                ErrorCode::LoopDetected,
                "this request has already passed through this proxy",
            ));
        }

        // Stage 3: route.
        let route = self.routes.find(&parts.method, &target);
        rec.route = route.map(|r| r.name.clone());
        let purpose = caller
            .purpose
            .as_deref()
            .or(route.and_then(|r| r.purpose_default.as_deref()))
            .unwrap_or(UNSPECIFIED_PURPOSE);
        rec.purpose = purpose.to_string();

        // Stage 4: strip.
        let mode = route.and_then(|r| r.strip).unwrap_or(self.strip_mode);
        rec.strip_mode = strip_mode_name(mode);
        let report = strip::inspect(
            &self.fingerprinter,
            mode,
            &mut parts.headers,
            target.query.as_deref(),
            userinfo.as_deref(),
        );
        let (mut body, body_findings) = self.read_body(&parts.headers, body, rec).await?;
        let mut findings = report.findings;
        findings.extend(body_findings.iter().map(|f| f.finding.clone()));
        self.count_findings(&findings);
        rec.stripped = findings.clone();
        let body_field = route.and_then(|r| match &r.inject.into {
            InjectInto::BodyField(f) if r.credential.is_some() => Some(f.as_str()),
            _ => None,
        });
        // A secret in a body cannot be cut out without changing what the request says; in
        // strip mode it is replaced when the route's credential goes into that very field,
        // and otherwise refused rather than forwarded.
        let refused: Vec<&strip::Finding> = match mode {
            StripMode::Block => findings.iter().collect(),
            StripMode::Strip => body_findings
                .iter()
                .filter(|f| body_field != Some(f.field.as_str()))
                .map(|f| &f.finding)
                .collect(),
            StripMode::Report => Vec::new(),
        };
        if !refused.is_empty() {
            let places: Vec<String> = refused
                .iter()
                .map(|f| format!("{} in {}", f.kind, f.location))
                .collect();
            let advice = if mode == StripMode::Block {
                "remove them and let the sidecar inject credentials"
            } else {
                "a secret in a body is not forwarded; remove it from the app, or set the route's `inject.body_field` to the field that carries the key"
            };
            return Err(Rejection::new(
                ErrorCode::EmbeddedSecret,
                format!(
                    "the request carries embedded secrets ({}); {advice}",
                    places.join(", ")
                ),
            ));
        }
        let stripped_types: Vec<&'static str> = findings.iter().map(|f| f.kind).collect();

        // Stage 5: authorize (guardrails, then policy). A destination a guardrail trips is
        // refused unless a permit annotated `@guardrail("<kind>")` allows it, so no broad
        // permit can open the metadata endpoint or the admin port by mistake.
        let guard = self.guardrails.check(&target.host, target.port);
        let decision = self.policy.current().decide(&PolicyInput {
            identity: &caller.identity,
            action: parts.method.as_str(),
            host: &target.host,
            scheme: target.scheme,
            port: target.port,
            path: &target.path,
            purpose,
            route: route.map_or("", |r| r.name.as_str()),
            labels: route.map(|r| &r.labels),
            stripped_types: &stripped_types,
            credential: route.and_then(|r| r.credential.as_deref()).unwrap_or(""),
            client: caller.client.ip(),
            time: SystemTime::now(),
            guardrail: guard.as_ref(),
        });
        enforce(rec, decision)?;
        rec.decision = "allow";

        // Stage 6: credential. Fail closed: no credential, no forwarding.
        if let Some(route) = route
            && let Some(name) = &route.credential
        {
            let audience = route.audience.clone().unwrap_or_else(|| target.origin());
            let scopes = route.scopes_for(purpose);
            let obtained = self
                .credentials
                .obtain(
                    name,
                    &MintRequest {
                        subject: &caller.identity.id,
                        audience: &audience,
                        requested_audience: route.audience.as_deref(),
                        resource: route.resource.as_deref(),
                        max_ttl: route.max_ttl,
                        txn: &caller.request_id,
                        scopes: &scopes,
                        workload: &caller.identity.workload,
                        stage: &caller.identity.stage,
                        environment: &caller.identity.environment,
                        purpose,
                        method: parts.method.as_str(),
                        host: &target.host,
                        path: &target.path,
                    },
                )
                .await;
            let issued = match obtained {
                Ok(i) => i,
                Err(e) => {
                    self.metrics
                        .credentials_issued
                        .get_or_create(&CredentialLabels {
                            credential: name.clone(),
                            kind: "unknown",
                            result: "error",
                        })
                        .inc();
                    return Err(Rejection::new(
                        ErrorCode::CredentialUnavailable,
                        format!("credential `{name}`: {e}"),
                    ));
                }
            };
            self.metrics
                .credentials_issued
                .get_or_create(&CredentialLabels {
                    credential: name.clone(),
                    kind: issued.kind,
                    result: "ok",
                })
                .inc();
            let inj = &route.inject;
            let value = format!(
                "{}{}{}",
                inj.prefix,
                issued.value.expose_secret(),
                inj.suffix
            );
            match &inj.into {
                InjectInto::Header(header) => {
                    let mut hv = HeaderValue::from_str(&value).map_err(|_| {
                        Rejection::new(
                            ErrorCode::CredentialUnavailable,
                            format!("credential `{name}` is not a valid header value"),
                        )
                    })?;
                    hv.set_sensitive(true);
                    parts.headers.insert(header.clone(), hv);
                }
                InjectInto::BodyField(field) => {
                    body = inject_into_body(&parts.headers, body, field, &value).map_err(|why| {
                        Rejection::new(
                            ErrorCode::BadRequest,
                            format!(
                                "route `{}` puts its credential into the body field `{field}`: {why}",
                                route.name
                            ),
                        )
                    })?;
                }
            }
            rec.credential = Some(CredentialLog {
                name: issued.name,
                kind: issued.kind,
                id: issued.id,
                expires_at: issued.expires_at,
                scopes: issued.scopes,
                flags: issued.flags,
            });
        }

        // Stage 7: forward.
        let path_and_query = match (&report.new_path_and_query, &target.query) {
            (Some(q), _) if q.is_empty() => target.path.clone(),
            (Some(q), _) => format!("{}?{}", target.path, q),
            (None, Some(q)) => format!("{}?{}", target.path, q),
            (None, None) => target.path.clone(),
        };
        let authority = authority_of(&target);
        parts.uri = Uri::builder()
            .scheme(target.scheme)
            .authority(authority.as_str())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| {
                Rejection::new(
                    ErrorCode::BadRequest,
                    format!("cannot build the upstream URL: {e}"),
                )
            })?;
        upstream::strip_request_hop_by_hop(&mut parts.headers);
        parts.headers.insert(
            HOST,
            HeaderValue::from_str(&authority)
                .map_err(|_| Rejection::new(ErrorCode::BadRequest, "bad host"))?,
        );
        upstream::append_via(&mut parts.headers, &self.via);
        parts.version = http::Version::HTTP_11;
        if let OutBody::Buffered(b) = &body {
            // The body may have been rewritten: its length, not the client's, frames it.
            parts.headers.remove(TRANSFER_ENCODING);
            parts
                .headers
                .insert(CONTENT_LENGTH, HeaderValue::from(b.len()));
        }
        let (resp, took) = self.upstream.send(parts, body).await?;
        rec.upstream_ms = Some(ms(took));
        Ok(resp)
    }

    /// CONNECT: decide before answering 200. Intercept (a CA is configured and a route or the
    /// strip rules want to see the requests; each decrypted request then goes through the
    /// whole pipeline), tunnel blind (nothing to inject, or a passthrough host; decided by
    /// `Action::"CONNECT"` policy), or deny.
    async fn connect(
        self: Arc<Self>,
        conn: &Arc<Conn>,
        caller: &Caller,
        req: Request<Incoming>,
        mut rec: Record,
        start: Instant,
    ) -> Response<ProxyBody> {
        rec.kind = "tunnel";
        let (parts, body) = req.into_parts();
        let decided = (|| {
            let target = target::connect_target(&parts)?;
            describe_target(&mut rec, &target);
            let purpose = rec.purpose.clone();
            let decide = |guard: Option<&GuardrailHit>| {
                self.policy.current().decide(&PolicyInput {
                    identity: &caller.identity,
                    action: "CONNECT",
                    host: &target.host,
                    scheme: target.scheme,
                    port: target.port,
                    path: "",
                    purpose: &purpose,
                    route: "",
                    labels: None,
                    stripped_types: &[],
                    credential: "",
                    client: caller.client.ip(),
                    time: SystemTime::now(),
                    guardrail: guard,
                })
            };
            // A guarded destination needs a CONNECT permit that lifts the guardrail even
            // when the tunnel is then intercepted (each request inside is checked again).
            let guard = self.guardrails.check(&target.host, target.port);
            if let Some(g) = &guard {
                enforce(&mut rec, decide(Some(g)))?;
            }
            let lifted = guard.map(|g| g.kind);
            if let Some(icpt) = &self.intercept
                && !icpt.is_passthrough(&target.host)
                && (self.routes.any_for(&target.host, target.port)
                    || self.strip_mode != StripMode::Report)
            {
                return Ok((target, Some(icpt.clone()), lifted));
            }
            // A route that injects a credential cannot be served through a blind tunnel: the
            // app's requests would go out without it (and perhaps with its own secret).
            if let Some(route) = self.routes.find_for_tunnel(&target.host, target.port) {
                let reason = format!(
                    "route `{}` injects a credential into requests to {}; a blind tunnel cannot do that (TLS interception is needed)",
                    route.name, target.host
                );
                rec.route = Some(route.name.clone());
                rec.reason = Some(reason.clone());
                return Err(Rejection::new(ErrorCode::PolicyDenied, reason));
            }
            let decision = match lifted {
                Some(_) => return Ok((target, None, lifted)),
                None => decide(None),
            };
            enforce(&mut rec, decision)?;
            Ok((target, None, None))
        })();
        let (target, intercept, lifted) = match decided {
            Ok(t) => t,
            Err(rej) => return self.reject(rec, rej, start, &caller.request_id),
        };
        rec.decision = "allow";
        if let Some(icpt) = intercept {
            return self.intercept(
                conn.clone(),
                icpt,
                target,
                Request::from_parts(parts, body),
                rec,
                start,
            );
        }
        let upstream = match crate::proxy::connect::connect(
            &target,
            &self.guardrails,
            lifted,
            self.timeouts.connect,
        )
        .await
        {
            Ok(s) => s,
            Err(rej) => return self.reject(rec, rej, start, &caller.request_id),
        };
        rec.upstream_ms = Some(ms(start.elapsed()));
        rec.status = 200;
        let me = self.clone();
        let req = Request::from_parts(parts, body);
        tokio::spawn(async move {
            me.metrics.tunnels_open.inc();
            let outcome = crate::proxy::connect::splice(req, upstream, me.timeouts.idle).await;
            me.metrics.tunnels_open.dec();
            match outcome {
                Ok((up, down)) => {
                    rec.bytes_in = Some(up);
                    rec.bytes_out = down;
                }
                Err((up, down, e)) => {
                    rec.bytes_in = Some(up);
                    rec.bytes_out = down;
                    rec.error = Some(e);
                }
            }
            me.finish(rec, start);
        });
        tunnel_established(&caller.request_id)
    }

    /// Answer 200 and serve the tunnel's decrypted requests; the CONNECT itself is logged
    /// when the connection ends (kind `intercept`), with any handshake failure.
    fn intercept(
        self: Arc<Self>,
        conn: Arc<Conn>,
        icpt: Arc<crate::proxy::intercept::Interceptor>,
        target: Target,
        req: Request<Incoming>,
        mut rec: Record,
        start: Instant,
    ) -> Response<ProxyBody> {
        rec.kind = "intercept";
        rec.scheme = "https".into();
        rec.status = 200;
        rec.reason = Some("intercepted: each request inside is authorized on its own".into());
        let me = self.clone();
        let client = conn.client;
        let response = tunnel_established(&rec.request_id);
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => {
                    rec.error = Some(format!("upgrade failed: {e}"));
                    me.finish(rec, start);
                    return;
                }
            };
            match crate::proxy::intercept::serve(me.clone(), icpt, conn, target, upgraded).await {
                Ok(n) => {
                    rec.reason = Some(format!(
                        "intercepted: {n} request(s), each authorized and logged on its own"
                    ));
                }
                Err(e) => {
                    tracing::warn!(client = %client, host = %rec.host, error = %e, "intercepted TLS handshake failed");
                    rec.error = Some(format!("tls_handshake_failed: {e}"));
                }
            }
            me.finish(rec, start);
        });
        response
    }

    /// Stage 4, for the body: read a JSON or form body of at most `body_max_bytes` and
    /// inspect it. Other bodies, and larger or compressed ones, are streamed untouched; the
    /// log line says which (`body_scan`).
    async fn read_body(
        &self,
        headers: &http::HeaderMap,
        body: Incoming,
        rec: &mut Record,
    ) -> Result<(OutBody, Vec<strip::BodyFinding>), Rejection> {
        let kind = match strip::body::plan(headers) {
            BodyPlan::Inspect(kind) => kind,
            BodyPlan::Encoded => {
                rec.body_scan = Some("skipped_encoded");
                return Ok((OutBody::Stream(body), Vec::new()));
            }
            BodyPlan::NotApplicable => return Ok((OutBody::Stream(body), Vec::new())),
        };
        let max = self.body_max_bytes;
        if body.size_hint().lower() > max as u64 {
            rec.body_scan = Some("skipped_too_large");
            return Ok((OutBody::Stream(body), Vec::new()));
        }
        let read = tokio::time::timeout(self.timeouts.request, upstream::read_up_to(body, max))
            .await
            .map_err(|_| {
                Rejection::new(
                    ErrorCode::BadRequest,
                    format!(
                        "the request body did not arrive within {:?}",
                        self.timeouts.request
                    ),
                )
            })?
            .map_err(|e| {
                Rejection::new(
                    ErrorCode::BadRequest,
                    format!("reading the request body failed: {e}"),
                )
            })?;
        match read {
            upstream::BodyRead::Whole(bytes) => {
                rec.body_scan = Some("inspected");
                let found = strip::inspect_body(&self.fingerprinter, &kind, &bytes);
                Ok((OutBody::Buffered(bytes), found))
            }
            upstream::BodyRead::Partial(head, rest) => {
                rec.body_scan = Some("skipped_too_large");
                Ok((OutBody::Prefixed(head, rest), Vec::new()))
            }
        }
    }

    fn count_findings(&self, findings: &[strip::Finding]) {
        for f in findings {
            let location = f.place().to_string();
            self.metrics
                .stripped
                .get_or_create(&StrippedLabels {
                    r#type: f.kind,
                    location,
                })
                .inc();
        }
    }

    /// Answer a refusal or failure with its JSON body, and log it.
    fn reject(
        &self,
        rec: Record,
        rej: Rejection,
        start: Instant,
        request_id: &str,
    ) -> Response<ProxyBody> {
        let resp = rej.to_response(request_id);
        self.finish_rejected(rec, &rej, start);
        resp
    }

    fn finish_rejected(&self, mut rec: Record, rej: &Rejection, start: Instant) {
        rec.status = rej.code.status().as_u16();
        rec.error = Some(rej.code.as_str().to_string());
        if rej.code.is_denial() {
            rec.decision = "deny";
        }
        if rec.reason.is_none() || !rej.code.is_denial() {
            rec.reason = Some(rej.reason.clone());
        }
        if !rej.policy_ids.is_empty() {
            rec.policy_ids = rej.policy_ids.clone();
        }
        self.finish(rec, start);
    }

    /// Stage 8: log, and count.
    fn finish(&self, mut rec: Record, start: Instant) {
        let elapsed = start.elapsed();
        rec.duration_ms = ms(elapsed);
        let route = rec.route.clone().unwrap_or_else(|| "none".into());
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                route: route.clone(),
                decision: rec.decision,
                status: rec.status,
            })
            .inc();
        self.metrics
            .duration
            .get_or_create(&RouteLabels { route })
            .observe(elapsed.as_secs_f64());
        self.log.emit(&rec);
    }
}

/// Milliseconds with microsecond precision, for the log.
fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// The empty 200 that opens a CONNECT tunnel (blind or intercepted).
fn tunnel_established(request_id: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::new()));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER.clone(), v);
    }
    resp
}

fn describe_target(rec: &mut Record, t: &Target) {
    rec.scheme = t.scheme.to_string();
    rec.host = t.host.clone();
    rec.port = t.port;
    rec.path = t.path.clone();
    rec.query = t.query.as_deref().map(strip::redact_query);
}

fn authority_of(t: &Target) -> String {
    let host = if t.host.contains(':') {
        format!("[{}]", t.host)
    } else {
        t.host.clone()
    };
    if t.port == 80 {
        host
    } else {
        format!("{host}:{}", t.port)
    }
}

struct Completion {
    rec: Record,
    start: Instant,
    pipeline: Arc<Pipeline>,
}

/// Put a credential into a field of a buffered JSON, form or multipart body.
fn inject_into_body(
    headers: &http::HeaderMap,
    body: OutBody,
    field: &str,
    value: &str,
) -> Result<OutBody, String> {
    let (BodyPlan::Inspect(kind), OutBody::Buffered(bytes)) = (strip::body::plan(headers), &body)
    else {
        return Err(
            "the request needs a JSON, form or multipart body (uncompressed, at most `strip.body_max_bytes`)"
                .into(),
        );
    };
    let out = strip::body::inject_field(&kind, bytes, field, value)?;
    Ok(OutBody::Buffered(Bytes::from(out)))
}

/// The upstream response body, streamed to the app; logs the request when it ends or is
/// dropped (client gone), so the log line has the real duration and byte count.
struct LoggedBody {
    inner: Incoming,
    done: Option<Completion>,
    ended: bool,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(done)) = (frame.data_ref(), this.done.as_mut()) {
                    done.rec.bytes_out += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(done) = this.done.as_mut() {
                    done.rec.error = Some(format!("upstream body: {e}"));
                }
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(mut done) = self.done.take() {
            if !self.ended && !self.inner.is_end_stream() && done.rec.error.is_none() {
                done.rec.error = Some("response_incomplete".into());
            }
            done.pipeline.finish(done.rec, done.start);
        }
    }
}

/// Record a policy decision in the log record; a denial becomes the 403 with its ids.
fn enforce(rec: &mut Record, decision: crate::policy::PolicyDecision) -> Result<(), Rejection> {
    rec.policy_ids = decision.policy_ids.clone();
    rec.reason = Some(decision.reason.clone());
    if decision.allow {
        return Ok(());
    }
    let mut rej = Rejection::new(ErrorCode::PolicyDenied, decision.reason);
    rej.policy_ids = decision.policy_ids;
    Err(rej)
}
