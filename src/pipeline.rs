//! The request pipeline, read top to bottom: one call per stage, data flowing one way.
//!
//! ```text
//! identify -> target -> route -> strip -> authorize -> credential -> forward -> log
//! ```
//!
//! | stage      | module                   | reads                        | fills in                |
//! |------------|--------------------------|------------------------------|-------------------------|
//! | identify   | [`crate::identify`]      | the listener, request headers| caller, request id, log |
//! | target     | [`crate::target`]        | the request target, `Host`   | where it goes           |
//! | route      | [`crate::route`]         | target, method               | route, purpose          |
//! | strip      | [`crate::strip`]         | headers, query, body         | findings, new query     |
//! | authorize  | [`crate::policy`]        | all of the above             | decision, policy ids    |
//! | credential | [`crate::credentials`]   | route, caller, purpose       | injected credential     |
//! | forward    | [`crate::proxy::upstream`] | the request as now         | response                |
//! | log        | [`crate::purpose_log`]   | the [`Exchange`]'s record    | one JSON line           |
//!
//! Order matters and is deliberate:
//! - identify runs first, and creates the log guard, so even a malformed request gets a
//!   request id and a log line, and no request ends without one (a client reset, the shutdown
//!   deadline: the guard writes it on drop);
//! - strip runs before authorize so policy can see what was embedded (`stripped_types`), and
//!   before credential so the app's secret is gone before ours is injected in its place;
//! - guardrails run before policy so no policy mistake can open the metadata endpoint or the
//!   admin port;
//! - credential runs after authorize so a denied request never causes a token to be minted;
//! - log runs last, when the response body has ended, so duration and bytes are final.
//!
//! Stages are calls into their own modules; the pipeline holds them in order, reads the
//! request body (the one piece of I/O before forwarding), and keeps the log record. It never
//! touches a client connection: CONNECT tunnels and interception are the proxy's
//! ([`crate::proxy::connect`]), after [`Pipeline::decide_connect`] has decided.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::credentials::{Call, Credentials};
use crate::error::{BoxError, ErrorCode, ProxyBody, REQUEST_ID_HEADER, Rejection, full};
use crate::fingerprint::Fingerprinter;
use crate::identify::Attestation;
use crate::identify::{self, Caller, Conn};
use crate::metrics::{Metrics, StrippedLabels};
use crate::policy::{GuardrailHit, Guardrails, PolicyDecision, PolicyInput, PolicyStore};
use crate::proxy::Timeouts;
use crate::proxy::pool::UpstreamBody;
use crate::proxy::upgrade::{self, Handoff};
use crate::proxy::upstream::{self, Deadlines, OutBody, Upstream};
use crate::purpose_log::{Completion, CredentialLog, LogGuard, PurposeLog, Record, ms};
use crate::route::{self, HostMatch, Route, RouteTable};
use crate::strip::{self, BodyPlan, StripMode};
use crate::target::{self, Target};

/// Everything the stages need, built once from the configuration. Each worker thread has its
/// own clone (sharing everything but the upstream connection pool, see [`Pipeline::for_worker`]).
#[derive(Clone)]
pub(crate) struct Pipeline {
    /// Routes in match order.
    pub(crate) routes: Arc<RouteTable>,
    /// The policy set in force (swapped whole on reload).
    pub(crate) policy: Arc<PolicyStore>,
    /// Addresses refused before policy.
    pub(crate) guardrails: Guardrails,
    /// Credential sources.
    pub(crate) credentials: Arc<Credentials>,
    /// Fingerprints for embedded secrets.
    pub(crate) fingerprinter: Fingerprinter,
    /// Global strip mode.
    pub(crate) strip_mode: StripMode,
    /// Largest request body inspected for embedded secrets.
    pub(crate) body_max_bytes: usize,
    /// Purpose log.
    pub(crate) log: PurposeLog,
    /// Metrics.
    pub(crate) metrics: Arc<Metrics>,
    /// Upstream client.
    pub(crate) upstream: Upstream,
    /// Upstream TLS settings (each worker's client is built from them).
    pub(crate) upstream_tls: Arc<rustls::ClientConfig>,
    /// Whether CONNECT tunnels may be intercepted (a local CA is configured), and for which
    /// hosts never.
    pub(crate) interception: Interception,
    /// Our `Via` entry.
    pub(crate) via: HeaderValue,
    /// Our `Via` pseudonym, unique per process, for loop detection.
    pub(crate) pseudonym: String,
    /// What MCP servers said of their own authorization, per route and origin.
    pub(crate) mcp_resources: Arc<crate::mcp::auth::Resources>,
    /// Timeouts.
    pub(crate) timeouts: Timeouts,
}

/// Whether CONNECT tunnels can be intercepted.
#[derive(Debug, Clone)]
pub(crate) enum Interception {
    /// No local CA: tunnels are blind or refused.
    Off,
    /// A local CA is configured; hosts matching `passthrough` are never intercepted.
    On {
        /// Hosts always tunnelled blind.
        passthrough: Vec<HostMatch>,
    },
}

impl Interception {
    fn allows(&self, host: &str) -> bool {
        match self {
            Interception::Off => false,
            Interception::On { passthrough } => !passthrough.iter().any(|m| m.matches(host)),
        }
    }
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("pseudonym", &self.pseudonym)
            .finish_non_exhaustive()
    }
}

/// One request on its way through the stages: who sent it (identify's [`Caller`]), and its
/// purpose-log line, which every later stage fills in and whose guard writes it on whichever
/// path the request ends.
pub(crate) struct Exchange {
    /// The caller, as identify found it.
    pub(crate) caller: Caller,
    /// The log line in the making.
    pub(crate) log: LogGuard,
}

impl Exchange {
    /// Record where the request is going.
    fn describe(&mut self, t: &Target) {
        self.log.scheme = t.scheme.to_string();
        self.log.host = t.host.clone();
        self.log.port = t.port;
        self.log.path = t.path.clone();
        self.log.query = t.query.as_deref().map(strip::redact_query);
    }
}

/// Record a policy decision in the line; a denial becomes the 403 with its ids.
fn enforce(log: &mut Record, decision: PolicyDecision) -> Result<(), Rejection> {
    log.policy_ids = decision.policy_ids.clone();
    log.reason = Some(decision.reason.clone());
    if decision.allow {
        return Ok(());
    }
    let mut rej = Rejection::new(ErrorCode::PolicyDenied, decision.reason);
    rej.policy_ids = decision.policy_ids;
    Err(rej)
}

/// What a CONNECT may become, as [`Pipeline::decide_connect`] decided.
#[derive(Debug)]
pub(crate) struct ConnectPlan {
    /// The tunnel's destination.
    pub(crate) target: Target,
    /// What the tunnel does with what it carries.
    pub(crate) mode: TunnelMode,
    /// The guardrail kind a permit lifted for this destination, if any.
    pub(crate) lifted: Option<&'static str>,
    /// The destination's address as policy saw it; a pin holds a blind tunnel's connect to
    /// it while this lives.
    pub(crate) address: Address,
}

/// What a tunnel does with its bytes. Plain HTTP in a tunnel (undici's proxy agents, Python
/// WebSocket clients and `curl --proxytunnel` send `http://` and `ws://` that way) is always
/// served through the pipeline, request by request, like the same request sent in absolute
/// form; the modes differ in what they do with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TunnelMode {
    /// TLS is terminated with the local CA, and each request inside goes through the pipeline.
    Intercept,
    /// TLS is spliced to the destination unseen (policy permitted the CONNECT). With
    /// `sniff`, plain HTTP is told apart first and served through the pipeline; without
    /// (a passthrough host, whose bytes are never looked at), everything is spliced.
    Blind {
        /// Tell plain HTTP from TLS by the first byte.
        sniff: bool,
    },
    /// Only plain HTTP may pass: a route wants to see these requests and there is no CA to
    /// intercept TLS, so a tunnel that turns out to carry TLS is closed, with the reason in its
    /// line.
    PlainOnly,
}

/// What the forward stage got back, and what passing it on needs.
struct Forwarded {
    /// The upstream's response.
    response: Response<UpstreamBody>,
    /// How long its body (or an upgraded connection) may fall silent.
    idle: Duration,
    /// The `Upgrade` the request asked for, if it did.
    upgrade: Option<HeaderValue>,
    /// On an MCP route, the filter for the answers to the POST's `tools/list` requests.
    listing: Option<crate::mcp::listing::Listing>,
}

/// What the authorize stage decides on, besides the caller and what strip found.
#[derive(Clone, Copy)]
struct Ask<'a> {
    action: &'a str,
    target: &'a Target,
    route: Option<&'a Route>,
    purpose: &'a str,
    /// The protocol the request asks to switch to, or "".
    upgrade: &'a str,
    /// The user it acts for.
    user: Option<&'a crate::credentials::Delegation>,
    /// The MCP message decided.
    mcp: Option<&'a crate::mcp::McpCall>,
    /// The destination's address, where known ([`Address`]).
    address: Option<IpAddr>,
}

/// The destination's address as policy sees it ([`Pipeline::address`]).
#[derive(Debug)]
pub(crate) enum Address {
    /// Not known: a name, and no policy reads the address (or an upstream proxy resolves it).
    Unknown,
    /// The app named an IP literal.
    Literal(IpAddr),
    /// The name's address, pinned for the connect while this is held.
    Pinned(crate::resolve::Pinned),
}

impl Address {
    fn ip(&self) -> Option<IpAddr> {
        match self {
            Address::Unknown => None,
            Address::Literal(ip) => Some(*ip),
            Address::Pinned(p) => Some(p.addr),
        }
    }

    /// The address a name is pinned to: the only one to connect to.
    pub(crate) fn pinned(&self) -> Option<IpAddr> {
        match self {
            Address::Pinned(p) => Some(p.addr),
            _ => None,
        }
    }
}

/// The pipeline's answer to a request, for the proxy to send.
#[derive(Debug)]
pub(crate) enum Reply {
    /// A response; its body writes the line when it ends.
    Response(Response<ProxyBody>),
    /// A 101: send it, then relay the switched connection ([`upgrade::relay`]), which writes
    /// the line at close.
    Switch(Response<ProxyBody>, Handoff),
}

impl Pipeline {
    /// A copy for one worker thread: shared stages, its own upstream pool, so a request and
    /// the upstream connection it uses live on the same thread (no cross-thread wakeups).
    pub(crate) fn for_worker(&self) -> Pipeline {
        let mut p = self.clone();
        p.upstream = Upstream::new(
            &self.timeouts,
            &self.routes.connect_timeouts(),
            self.upstream_tls.clone(),
            Arc::new(self.guardrails.clone()),
            self.upstream.egress().clone(),
            self.upstream.per_upstream(),
            self.upstream.pins().clone(),
        );
        p
    }

    /// Handle one (non-CONNECT, or decrypted) request that came in on `conn`; `origin` is the
    /// CONNECT target when the request was decrypted from an intercepted tunnel.
    pub(crate) async fn handle(
        self: Arc<Self>,
        conn: Arc<Conn>,
        origin: Option<Arc<Target>>,
        req: Request<Incoming>,
    ) -> Reply {
        let (mut parts, body) = req.into_parts();
        // Stage: identify (first, see the module docs). From here on the request has its line.
        let (mut x, admitted) = self.identify(&conn, &mut parts);
        let result = match admitted {
            Ok(()) => self.run(&mut x, origin.as_deref(), parts, body).await,
            Err(rej) => Err(rej),
        };
        match result {
            Ok(Forwarded {
                response,
                idle,
                upgrade: Some(asked),
                ..
            }) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                self.switch(x, response, &asked, idle)
            }
            Ok(f) => Reply::Response(self.respond(x, f.response, f.idle, f.listing)),
            Err(rej) => Reply::Response(self.reject(x, rej)),
        }
    }

    /// A log line for a request on `conn`: who is calling (the listener's identity) and from
    /// where; the rest is filled in as the request goes.
    fn begin_line(&self, conn: &Conn) -> LogGuard {
        let mut log = self.log.begin();
        log.client = conn.label.clone();
        log.caller_uid = conn.attestation.uid();
        log.identity = conn.identity.id.clone();
        log.workload = conn.identity.workload.clone();
        log.stage = conn.identity.stage.clone();
        log.environment = conn.identity.environment.clone();
        log.strip_mode = self.strip_mode.as_str();
        log.purpose = route::purpose(None, None).to_string();
        log
    }

    /// Identify the caller of a request on `conn` and open its log line; `Err` when the
    /// listener does not admit the caller, or the request's purpose header is malformed.
    pub(crate) fn identify(
        &self,
        conn: &Conn,
        parts: &mut Parts,
    ) -> (Exchange, Result<(), Rejection>) {
        let mut log = self.begin_line(conn);
        log.method = parts.method.to_string();
        let (caller, purpose_ok) =
            identify::identify(&conn.identity, &mut parts.headers, conn.client);
        log.request_id = caller.request_id.clone();
        log.trace_id = caller.trace_id.clone();
        log.purpose = route::purpose(caller.purpose.as_deref(), None).to_string();
        // A caller the listener does not admit is refused before anything else is looked at.
        let admitted = match &conn.attestation {
            Attestation::Refused(why) => Err(Rejection::new(ErrorCode::PolicyDenied, why.clone())),
            _ => purpose_ok.map_err(|reason| Rejection::new(ErrorCode::BadRequest, reason)),
        };
        (Exchange { caller, log }, admitted)
    }

    /// The stages after identify, in order, for an HTTP request; each fills in `x`. Returns
    /// the upstream's response and what the proxy needs to pass it on.
    async fn run(
        &self,
        x: &mut Exchange,
        origin: Option<&Target>,
        mut parts: Parts,
        body: Incoming,
    ) -> Result<Forwarded, Rejection> {
        // Stage: target. Where the request goes; a request that looped back, or whose length
        // is ambiguous, is refused.
        let (mut target, userinfo) = target::resolve(&parts, origin)?;
        x.describe(&target);
        upstream::refuse_loop(&parts.headers, &self.pseudonym)?;
        upstream::refuse_ambiguous_length(&parts)?;

        // Stage: route. Which route takes it, and so which purpose it serves.
        let route = self.routes.find(&parts.method, &target);
        let purpose = route::purpose(x.caller.purpose.as_deref(), route);
        x.log.route = route.map(|r| r.name.clone());
        // An encoded `/` or `\` is read as a separator by some servers and not by others;
        // only a route that expects them (`allow_encoded_slashes`) takes them.
        if target.encoded_separators && !route.is_some_and(|r| r.allow_encoded_slashes) {
            return Err(Rejection::new(
                ErrorCode::BadRequest,
                "the request path holds an encoded slash or a backslash (%2F, %5C, \\), which servers read differently; a route that expects them says `allow_encoded_slashes: true`",
            ));
        }
        x.log.purpose = purpose.to_string();
        // A WebSocket (or other upgrade) handshake is a request like any other; it is only
        // noted here, for policy and the line, before the forward stage drops hop-by-hop
        // headers.
        let asked = upgrade::requested(parts.version, &parts.headers);
        x.log.upgrade = asked.as_ref().map(upgrade::log_entry);
        // An AWS request names the service and region it was signed for (not secret); an
        // `aws` route re-signs for the same where neither its `sign:` nor the host says. Read
        // now: the strip stage removes the app's signature.
        let signed_for = crate::credentials::aws::signed_for(&parts.headers);

        // Stage: on behalf of. A route whose credential exchanges a user's token takes it out
        // of the request here (it reaches neither the strip stage, the line nor the upstream)
        // and verifies it; a request without one is refused (401).
        let user = match route {
            Some(r) => self.credentials.user_for(r, &mut parts.headers).await?,
            None => None,
        };
        x.log.on_behalf_of = user.as_ref().map(|u| crate::purpose_log::OnBehalfLog {
            iss: u.issuer.clone(),
            sub: u.subject.clone(),
            verified: u.verified,
        });

        // Stage: strip. The app's embedded secrets: removed, reported or refused.
        let (mut body, new_query, redacted_path) = self
            .strip(
                &mut x.log,
                route,
                &mut parts,
                &target,
                userinfo.as_deref(),
                body,
            )
            .await?;
        // A secret in the path (forwarded only in report mode) is seen by no later stage:
        // policy and minted tokens get the path as the line shows it.
        let wire = redacted_path.map(|p| {
            let wire = target.clone();
            target.path = p;
            wire
        });

        // Stage: MCP. On an MCP route, a POST's JSON-RPC messages: each is decided on its
        // own below, and a tool call serves `tool:<name>` unless the app named a purpose.
        let mcp_calls = match route {
            Some(r) if r.mcp && parts.method == http::Method::POST => {
                body = self.whole_body(body, self.body_max_bytes).await?;
                let bytes = body.buffered_mut().map(|b| b.clone()).unwrap_or_default();
                let calls = crate::mcp::calls(&parts.headers, &bytes)
                    .map_err(|why| Rejection::new(ErrorCode::BadRequest, why))?;
                x.log.mcp = crate::mcp::McpLog::of(&calls, &parts.headers);
                calls
            }
            _ => Vec::new(),
        };
        let tool_purpose = match mcp_calls.as_slice() {
            [c] if x.caller.purpose.is_none() => c.purpose(),
            _ => None,
        };
        if let Some(p) = &tool_purpose {
            x.log.purpose.clone_from(p);
        }
        let purpose = tool_purpose.as_deref().unwrap_or(purpose);

        // Stage: resolve. Where a policy reads `context.address`, the destination's name is
        // resolved now and pinned until the exchange ends, so the connection goes to the
        // address policy saw (`crate::resolve`). An IP literal is its own address.
        let address = self.address(&target).await?;
        x.log.address = address.ip().map(|a| a.to_string());

        // Stage: authorize. Guardrails, then policy (default deny); on an MCP route, every
        // message of the POST, and a refused request gets the JSON-RPC error its client
        // expects.
        let action = parts.method.as_str();
        let switch_to = asked
            .as_ref()
            .map(upgrade::protocol_name)
            .unwrap_or_default();
        let ask = Ask {
            action,
            target: &target,
            route,
            purpose,
            upgrade: &switch_to,
            user: user.as_ref(),
            mcp: None,
            address: address.ip(),
        };
        if mcp_calls.is_empty() {
            self.authorize(&x.caller, &mut x.log, &ask)?;
        }
        for call in &mcp_calls {
            let ask = Ask {
                mcp: Some(call),
                ..ask
            };
            self.authorize(&x.caller, &mut x.log, &ask)
                .map_err(|mut rej| {
                    rej.jsonrpc_id = call.id.clone().map(Box::new);
                    rej
                })?;
        }
        x.log.decision = "allow";
        // A `tools/list` answer will offer only the tools policy could permit this caller to
        // call (read uncompressed, so it can be).
        let listing = crate::mcp::listing::Listing::for_calls(&mcp_calls, || {
            self.tool_offer(&x.caller, &ask, &x.log.stripped)
        });
        if listing.is_some() {
            parts.headers.remove(header::ACCEPT_ENCODING);
        }

        // Stage: credential. Obtained for this call and injected; fail closed. An MCP tool
        // call's token is scoped to its tool where the route says.
        let tools: Vec<&str> = mcp_calls
            .iter()
            .filter(|c| c.method == "tools/call")
            .map(|c| c.name.as_str())
            .collect();
        // An MCP server's own authorization, as found before (RFC 9728, see
        // `crate::mcp::auth`): the token is for the resource it names, with the scopes it
        // asked for where the route names none.
        let mcp_auth = route
            .filter(|r| r.mcp && r.resource.is_none())
            .and_then(|r| {
                let token_origin = self.credentials.token_origin(r.credential.as_deref()?)?;
                let server_origin = crate::mcp::auth::origin_of(&target.origin())?;
                Some((r, token_origin, server_origin))
            });
        let found = mcp_auth
            .as_ref()
            .and_then(|(r, _, server)| self.mcp_resources.get(&r.name, server));
        let method = parts.method.clone();
        let call = route.map(|_| Call {
            caller: &x.caller,
            target: &target,
            method: method.as_str(),
            purpose,
            query: match new_query.as_deref() {
                Some(q) => Some(q),
                None => target.query.as_deref(),
            },
            signed_for: signed_for.as_ref(),
            user: user.as_ref(),
            tools: &tools,
            resource: found.as_ref().map(|f| f.resource.as_str()),
            asked_scopes: found.as_ref().map_or(&[], |f| f.scopes.as_slice()),
        });
        if let (Some(route), Some(call)) = (route, call) {
            // A credential that signs the whole request (`aws`) needs the whole body first.
            if let Some(limit) = route.credential.as_deref().and_then(|c| {
                self.credentials.body_to_sign(
                    c,
                    route,
                    &target,
                    &parts.headers,
                    signed_for.as_ref(),
                )
            }) {
                body = self.whole_body(body, limit).await?;
            }
            let mut issued = self
                .credentials
                .inject(route, call, &mut parts.headers, body.buffered_mut())
                .await?;
            // A per-call token is revoked once the request is over, however it ends.
            if let Some(r) = issued.as_mut().and_then(|i| i.revoke.take()) {
                x.log.then(move || r.spawn());
            }
            x.log.credential = issued.map(CredentialLog::from);
            if let (Some(c), Some(f)) = (x.log.credential.as_mut(), &found) {
                c.resource = Some(f.resource.clone());
            }
        }

        // Stage: forward, within the route's timeouts (else the global ones).
        let wire = wire.as_ref().unwrap_or(&target);
        upstream::prepare(&mut parts, wire, new_query.as_deref(), &self.via, &body)?;
        if let Some(protocol) = &asked {
            upgrade::restore(&mut parts.headers, protocol);
        }
        let own = route.map(|r| r.timeouts).unwrap_or_default();
        let deadlines = Deadlines {
            connect: own.connect.unwrap_or(self.timeouts.connect),
            response_head: own.response_head.unwrap_or(self.timeouts.response_head),
        };
        // DPoP: a request whose body is in hand can be sent again, once, with a new proof,
        // when the upstream asks for a nonce (RFC 9449 §9).
        let dpop = route.filter(|r| {
            r.credential
                .as_deref()
                .is_some_and(|c| self.credentials.dpop_of(c).is_some())
        });
        let htu = dpop.map(|_| {
            crate::credentials::dpop::htu(wire.scheme, &wire.authority(), wire.wire_path())
        });
        // The same, once, for an MCP server that asks for a token for itself (a 401 naming
        // its protected-resource metadata).
        let replayable = dpop.is_some() || mcp_auth.is_some();
        let replay = match (replayable, &body) {
            (true, OutBody::Buffered(b)) => Some(b.clone()),
            (true, OutBody::Stream(s)) if s.is_end_stream() => Some(Bytes::new()),
            _ => None,
        };
        let mut again = replay.map(|b| {
            let mut head = Request::new(()).into_parts().0;
            head.method = parts.method.clone();
            head.uri = parts.uri.clone();
            head.version = parts.version;
            head.headers = parts.headers.clone();
            (head, b)
        });
        let (mut response, mut took) = self.upstream.send(parts, body, deadlines).await?;
        if let (Some(r), Some(htu)) = (dpop, htu.as_deref()) {
            let wants_nonce =
                self.credentials
                    .dpop_answer(r, htu, response.status(), response.headers());
            if let (true, Some((mut head, b))) = (wants_nonce, again.take()) {
                self.credentials.dpop_reproof(r, htu, &mut head)?;
                let (second, t) = self
                    .upstream
                    .send(head, OutBody::Buffered(b), deadlines)
                    .await?;
                self.credentials
                    .dpop_answer(r, htu, second.status(), second.headers());
                response = second;
                took += t;
            }
        }
        if let (Some((r, token_origin, server_origin)), Some(call)) = (&mcp_auth, call)
            && let Some(challenge) =
                crate::mcp::auth::challenge(response.status(), response.headers())
            && let Some((mut head, b)) = again.take()
        {
            let discovered = self
                .discover(&target, server_origin, &challenge, token_origin, deadlines)
                .await?;
            // Asked again for what it was given: the 401 stands, as the server sent it.
            if found.as_ref() != Some(&discovered) {
                self.mcp_resources
                    .put(&r.name, server_origin, discovered.clone());
                let call = Call {
                    resource: Some(&discovered.resource),
                    asked_scopes: &discovered.scopes,
                    ..call
                };
                let mut issued = self
                    .credentials
                    .inject(r, call, &mut head.headers, None)
                    .await?;
                if let Some(rv) = issued.as_mut().and_then(|i| i.revoke.take()) {
                    x.log.then(move || rv.spawn());
                }
                x.log.credential = issued.map(CredentialLog::from);
                if let Some(c) = x.log.credential.as_mut() {
                    c.resource = Some(discovered.resource.clone());
                }
                let (second, t) = self
                    .upstream
                    .send(head, OutBody::Buffered(b), deadlines)
                    .await?;
                response = second;
                took += t;
            }
        }
        x.log.upstream_ms = Some(ms(took));
        Ok(Forwarded {
            response,
            idle: own.idle.unwrap_or(self.timeouts.idle),
            upgrade: asked,
            listing,
        })
    }

    /// The strip stage: inspect the head (secrets there are removed in strip mode), read and
    /// inspect the body when it is one we can, record every finding, and let
    /// [`strip::verdict`] decide. Returns the body to forward and the rewritten query, if the
    /// head's changed.
    async fn strip(
        &self,
        log: &mut Record,
        route: Option<&Route>,
        parts: &mut Parts,
        target: &Target,
        userinfo: Option<&str>,
        body: Incoming,
    ) -> Result<(OutBody, Option<String>, Option<String>), Rejection> {
        let mode = route.and_then(|r| r.strip).unwrap_or(self.strip_mode);
        log.strip_mode = mode.as_str();
        let head = strip::inspect(
            &self.fingerprinter,
            mode,
            &mut parts.headers,
            target.query.as_deref(),
            userinfo,
        );
        let in_path = strip::path::secrets(&target.path);
        let redacted_path =
            (!in_path.is_empty()).then(|| strip::path::redacted(&target.path, &in_path));
        if let Some(p) = &redacted_path {
            log.path.clone_from(p);
        }
        let (body, body_findings) = self.read_body(&parts.headers, body, log).await?;
        let mut findings = head.findings;
        findings.extend(in_path.iter().map(|(kind, at)| {
            strip::Finding {
                kind,
                location: "path".into(),
                fingerprint: self
                    .fingerprinter
                    .fingerprint(target.path[at.clone()].as_bytes()),
            }
        }));
        findings.extend(body_findings.iter().map(|f| f.finding.clone()));
        self.count_findings(&findings);
        log.stripped = findings;
        strip::verdict(
            mode,
            &log.stripped,
            &body_findings,
            route.and_then(Route::body_field),
        )?;
        Ok((body, head.new_path_and_query, redacted_path))
    }

    /// The resolve stage: the destination's address for policy. An IP literal is its own; a
    /// name is resolved and pinned ([`crate::resolve`]) only when a policy reads
    /// `context.address` and this sidecar resolves it (not an upstream proxy). A name that
    /// does not resolve fails the request (502); one that resolves only to guarded addresses
    /// is refused (403), as the connector would.
    async fn address(&self, target: &Target) -> Result<Address, Rejection> {
        // `localhost` is 127.0.0.1 to policy as a destination, but its address is what it
        // resolves to, like any name.
        if let Ok(ip) = target.host.parse::<IpAddr>() {
            return Ok(Address::Literal(ip));
        }
        let reads = self.policy.current().reads_address();
        let pins = self.upstream.pins();
        pins.set_on(reads);
        if !reads
            || self
                .upstream
                .egress()
                .covers(target.scheme, &target.authority())
        {
            return Ok(Address::Unknown);
        }
        let name = target.host.as_str();
        let choose = |answer: Vec<IpAddr>| {
            let addrs = answer
                .into_iter()
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            let allowed = upstream::screen(name, addrs).map_err(|e| e.to_string())?;
            // One address, which policy decides on and the connect then uses alone: IPv4
            // first where the name has both (as Envoy's `V4_PREFERRED`), most pods' network.
            allowed
                .iter()
                .find(|a| a.is_ipv4())
                .or(allowed.first())
                .map(SocketAddr::ip)
                .ok_or_else(|| format!("{name} has no addresses"))
        };
        match pins.hold(name, self.timeouts.connect, choose).await {
            Ok(pinned) => Ok(Address::Pinned(pinned)),
            Err(why) if why.starts_with("guardrail:") => {
                Err(Rejection::new(ErrorCode::PolicyDenied, why))
            }
            Err(why) => Err(Rejection::new(ErrorCode::UpstreamUnreachable, why)),
        }
    }

    /// The authorize stage, over what the earlier stages found (the strip stage's findings are
    /// in the line already): a destination a guardrail trips is refused unless a permit
    /// annotated `@guardrail("<kind>")` allows it, so no broad permit can open the metadata
    /// endpoint or the admin port by mistake; then Cedar decides, default deny.
    fn authorize(&self, caller: &Caller, log: &mut Record, ask: &Ask<'_>) -> Result<(), Rejection> {
        let Ask {
            action,
            target,
            address: _,
            route,
            purpose,
            upgrade,
            user,
            mcp,
        } = *ask;
        let stripped_types: Vec<&'static str> = log.stripped.iter().map(|f| f.kind).collect();
        let guard = self.guardrails.check(&target.host, target.port);
        let decision = self.policy.current().decide(&PolicyInput {
            identity: &caller.identity,
            action,
            host: target::policy_host(&target.host),
            scheme: target.scheme,
            port: target.port,
            path: &target.path,
            purpose,
            route: route.map_or("", |r| r.name.as_str()),
            labels: route.map(|r| &r.labels),
            stripped_types: &stripped_types,
            credential: route.and_then(|r| r.credential.as_deref()).unwrap_or(""),
            client: caller.client.ip(),
            address: ask.address,
            time: SystemTime::now(),
            guardrail: guard.as_ref(),
            upgrade,
            on_behalf_of: user.map(|u| crate::policy::OnBehalfOf {
                issuer: &u.issuer,
                subject: &u.subject,
                verified: u.verified,
            }),
            mcp: mcp.map(crate::mcp::McpCall::context),
        });
        enforce(log, decision)
    }

    /// MCP authorization: read the protected-resource metadata a 401 named (on the server's
    /// own origin, through the forward path) and check it (`crate::mcp::auth`). A server
    /// whose metadata cannot be read or trusted fails the request closed (503).
    async fn discover(
        &self,
        target: &Target,
        server_origin: &str,
        challenge: &crate::mcp::auth::Challenge,
        token_origin: &str,
        deadlines: Deadlines,
    ) -> Result<crate::mcp::auth::Discovered, Rejection> {
        use crate::mcp::auth;
        let failed = |why: String| {
            Rejection::new(
                ErrorCode::CredentialUnavailable,
                format!("MCP authorization: {why}"),
            )
        };
        let uri = auth::metadata_uri(challenge, server_origin).map_err(failed)?;
        let mut head = Request::new(()).into_parts().0;
        head.uri = uri;
        head.headers
            .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        upstream::append_via(&mut head.headers, &self.via);
        let (resp, _) = self
            .upstream
            .send(head, OutBody::Buffered(Bytes::new()), deadlines)
            .await
            .map_err(|r| failed(format!("fetching {}: {}", challenge.metadata, r.reason)))?;
        if resp.status() != StatusCode::OK {
            return Err(failed(format!(
                "{} answered {}",
                challenge.metadata,
                resp.status()
            )));
        }
        let read = tokio::time::timeout(
            deadlines.response_head,
            upstream::read_up_to(resp.into_body(), auth::METADATA_MAX_BYTES),
        )
        .await;
        let body = match read {
            Ok(Ok(upstream::BodyRead::Whole(b))) => b,
            Ok(Ok(upstream::BodyRead::Partial(..))) => {
                return Err(failed(format!(
                    "{} is larger than {} bytes",
                    challenge.metadata,
                    auth::METADATA_MAX_BYTES
                )));
            }
            Ok(Err(e)) => return Err(failed(format!("reading {}: {e}", challenge.metadata))),
            Err(_) => {
                return Err(failed(format!(
                    "{} did not arrive in time",
                    challenge.metadata
                )));
            }
        };
        let url = format!("{}{}", target.origin(), target.path);
        auth::read_metadata(&body, &url, token_origin, challenge).map_err(failed)
    }

    /// Whether a tool may be offered to this caller in a `tools/list` answer: some call to
    /// it could be permitted (its purpose `tool:<name>` unless the app named one), decided
    /// against the policies in force when the list was asked for.
    fn tool_offer(
        &self,
        caller: &Caller,
        ask: &Ask<'_>,
        stripped: &[strip::Finding],
    ) -> crate::mcp::listing::Offer {
        let engine = arc_swap::Guard::into_inner(self.policy.current());
        let identity = caller.identity.clone();
        let client = caller.client.ip();
        // The purpose the list was asked with serves a tool whose name makes no purpose.
        let named = caller.purpose.clone();
        let asked = ask.purpose.to_string();
        let target = ask.target.clone();
        let route = ask
            .route
            .map(|r| (r.name.clone(), r.labels.clone(), r.credential.clone()));
        let user = ask
            .user
            .map(|u| (u.issuer.clone(), u.subject.clone(), u.verified));
        let action = ask.action.to_string();
        let address = ask.address;
        let stripped: Vec<&'static str> = stripped.iter().map(|f| f.kind).collect();
        Box::new(move |tool: &str| {
            let purpose = named
                .clone()
                .or_else(|| crate::mcp::tool_purpose(tool))
                .unwrap_or_else(|| asked.clone());
            let (name, labels, credential) = match &route {
                Some((n, l, c)) => (n.as_str(), Some(l), c.as_deref().unwrap_or("")),
                None => ("", None, ""),
            };
            engine.may_permit(&PolicyInput {
                identity: &identity,
                action: &action,
                host: target::policy_host(&target.host),
                scheme: target.scheme,
                port: target.port,
                path: &target.path,
                purpose: &purpose,
                route: name,
                labels,
                stripped_types: &stripped,
                credential,
                client,
                address,
                time: SystemTime::now(),
                guardrail: None,
                upgrade: "",
                on_behalf_of: user.as_ref().map(|(i, s, v)| crate::policy::OnBehalfOf {
                    issuer: i,
                    subject: s,
                    verified: *v,
                }),
                mcp: Some(crate::policy::McpContext {
                    method: "tools/call",
                    name: tool,
                    arguments: crate::policy::McpArguments::None,
                }),
            })
        })
    }

    /// CONNECT, decided before the proxy answers 200 ([`TunnelMode`]): intercept (a CA is
    /// configured and a route or the strip rules want to see the requests; each decrypted
    /// request then goes through the whole pipeline), plain HTTP only (no CA, and a route
    /// wants the requests: they are served if they are plain HTTP), tunnel blind (nothing to
    /// inject, or a passthrough host; decided by `Action::"CONNECT"` policy; without a CA,
    /// plain HTTP inside is still served through the pipeline), or refuse.
    pub(crate) async fn decide_connect(
        &self,
        x: &mut Exchange,
        parts: &Parts,
    ) -> Result<ConnectPlan, Rejection> {
        let target = target::connect_target(parts)?;
        x.describe(&target);
        let purpose = x.log.purpose.clone();
        // Stage: resolve, as for a request (see `run`).
        let address = self.address(&target).await?;
        x.log.address = address.ip().map(|a| a.to_string());
        let at = address.ip();
        let decide = |x: &Exchange, guard: Option<&GuardrailHit>| {
            self.policy.current().decide(&PolicyInput {
                identity: &x.caller.identity,
                action: "CONNECT",
                host: target::policy_host(&target.host),
                scheme: target.scheme,
                port: target.port,
                path: "",
                purpose: &purpose,
                route: "",
                labels: None,
                stripped_types: &[],
                credential: "",
                client: x.caller.client.ip(),
                address: at,
                time: SystemTime::now(),
                guardrail: guard,
                upgrade: "",
                on_behalf_of: None,
                mcp: None,
            })
        };
        // A guarded destination needs a CONNECT permit that lifts the guardrail even when the
        // tunnel is then intercepted (each request inside is checked again).
        let guard = self.guardrails.check(&target.host, target.port);
        if let Some(g) = &guard {
            let decision = decide(x, Some(g));
            enforce(&mut x.log, decision)?;
        }
        let lifted = guard.map(|g| g.kind);
        let plan = |mode| ConnectPlan {
            target: target.clone(),
            mode,
            lifted,
            address,
        };
        let intercepting = self.interception.allows(&target.host);
        let wanted = self.routes.any_for(&target.host, target.port);
        if intercepting && (wanted || self.strip_mode != StripMode::Report) {
            return Ok(plan(TunnelMode::Intercept));
        }
        // Without a CA (or for a passthrough host) the requests inside a TLS tunnel cannot be
        // seen. Plain HTTP can: what a tunnel carries is told by its first byte.
        let no_ca = matches!(self.interception, Interception::Off);
        // A route that injects a credential cannot be served through a blind tunnel: the
        // app's requests would go out without it (and perhaps with its own secret). Plain HTTP
        // to it can still be served, except on 443, where a tunnel is TLS.
        if let Some(route) = self.routes.find_for_tunnel(&target.host, target.port) {
            x.log.route = Some(route.name.clone());
            if no_ca && target.port != 443 {
                x.log.reason = Some(format!(
                    "plain HTTP only: route `{}` injects a credential and there is no CA to intercept TLS",
                    route.name
                ));
                return Ok(plan(TunnelMode::PlainOnly));
            }
            let reason = format!(
                "route `{}` injects a credential into requests to {}; a blind tunnel cannot do that (TLS interception is needed)",
                route.name, target.host
            );
            x.log.reason = Some(reason.clone());
            return Err(Rejection::new(ErrorCode::PolicyDenied, reason));
        }
        if lifted.is_none() {
            let decision = decide(x, None);
            // A destination routes name needs no CONNECT permit for plain HTTP: each request
            // inside is authorized on its own, as the same request in absolute form would be.
            if !decision.allow && no_ca && wanted {
                x.log.reason = Some(
                    "plain HTTP only: a route names this destination and policy permits no blind tunnel to it"
                        .into(),
                );
                return Ok(plan(TunnelMode::PlainOnly));
            }
            enforce(&mut x.log, decision)?;
        }
        Ok(plan(TunnelMode::Blind { sniff: no_ca }))
    }

    /// Stage: strip, for the body: read a JSON or form body of at most `body_max_bytes` and
    /// inspect it. Other bodies, and larger or compressed ones, are streamed untouched; the
    /// log line says which (`body_scan`).
    async fn read_body(
        &self,
        headers: &http::HeaderMap,
        body: Incoming,
        log: &mut Record,
    ) -> Result<(OutBody, Vec<strip::BodyFinding>), Rejection> {
        let kind = match strip::body::plan(headers) {
            BodyPlan::Inspect(kind) => kind,
            BodyPlan::Encoded => {
                log.body_scan = Some("skipped_encoded");
                return Ok((OutBody::Stream(body), Vec::new()));
            }
            BodyPlan::NotApplicable => return Ok((OutBody::Stream(body), Vec::new())),
        };
        let max = self.body_max_bytes;
        if body.size_hint().lower() > max as u64 {
            log.body_scan = Some("skipped_too_large");
            return Ok((OutBody::Stream(body), Vec::new()));
        }
        let read = self.read_within(body, max).await?;
        match read {
            upstream::BodyRead::Whole(bytes) => {
                log.body_scan = Some("inspected");
                let found = strip::inspect_body(&self.fingerprinter, &kind, &bytes);
                Ok((OutBody::Buffered(bytes), found))
            }
            upstream::BodyRead::Partial(head, rest) => {
                log.body_scan = Some("skipped_too_large");
                Ok((OutBody::Prefixed(head, rest), Vec::new()))
            }
        }
    }

    /// Read a request body whole, up to `limit` bytes (a request signed over its body's hash
    /// cannot be streamed); a larger one is refused with 413.
    async fn whole_body(&self, body: OutBody, limit: usize) -> Result<OutBody, Rejection> {
        let too_large = || {
            Rejection::new(
                ErrorCode::BodyTooLarge,
                format!(
                    "the request body is larger than the {limit} bytes this route reads whole (to sign it, or to read its MCP messages)"
                ),
            )
        };
        let (head, rest) = match body {
            OutBody::Buffered(b) if b.len() > limit => return Err(too_large()),
            OutBody::Buffered(b) => return Ok(OutBody::Buffered(b)),
            OutBody::Stream(s) => (Bytes::new(), s),
            OutBody::Prefixed(head, rest) => (head, rest),
        };
        let room = limit.checked_sub(head.len()).ok_or_else(too_large)?;
        let read = self.read_within(rest, room).await?;
        match read {
            upstream::BodyRead::Whole(tail) if head.is_empty() => Ok(OutBody::Buffered(tail)),
            upstream::BodyRead::Whole(tail) => {
                let mut all = bytes::BytesMut::from(&head[..]);
                all.extend_from_slice(&tail);
                Ok(OutBody::Buffered(all.freeze()))
            }
            upstream::BodyRead::Partial(..) => Err(too_large()),
        }
    }

    /// Read a request body until it ends or passes `max` bytes, within `header_read`.
    async fn read_within(
        &self,
        body: Incoming,
        max: usize,
    ) -> Result<upstream::BodyRead, Rejection> {
        let within = self.timeouts.header_read;
        tokio::time::timeout(within, upstream::read_up_to(body, max))
            .await
            .map_err(|_| {
                Rejection::new(
                    ErrorCode::BadRequest,
                    format!("the request body did not arrive within {within:?}"),
                )
            })?
            .map_err(|e| {
                Rejection::new(
                    ErrorCode::BadRequest,
                    format!("reading the request body failed: {e}"),
                )
            })
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

    /// The upstream's response, on its way to the app: hop-by-hop headers out, our `Via` and
    /// the request id in; the line is written when its body ends (or is dropped), and the body
    /// is given up on when it falls silent for `idle`.
    fn respond(
        &self,
        mut x: Exchange,
        resp: Response<UpstreamBody>,
        idle: Duration,
        listing: Option<crate::mcp::listing::Listing>,
    ) -> Response<ProxyBody> {
        use crate::mcp::listing::{Filtered, Framing};
        let (mut head, body) = resp.into_parts();
        self.pass_on(&mut x, &mut head, None);
        // An MCP server's answer to `tools/list`: filtered on its way, so its length changes;
        // one that cannot be read is replaced by a JSON-RPC error.
        let filter = match listing {
            Some(l) if head.status == StatusCode::OK => match Framing::of(&head.headers) {
                Ok(Some(framing)) => Some((l, framing, None)),
                Ok(None) => None,
                Err(why) => Some((l, Framing::Json, Some(why))),
            },
            _ => None,
        };
        let Some((listing, framing, withheld)) = filter else {
            let body = LoggedBody::new(body, x.log, idle);
            return Response::from_parts(head, body.boxed_unsync());
        };
        head.headers.remove(header::CONTENT_LENGTH);
        if withheld.is_some() {
            head.headers.remove(header::CONTENT_ENCODING);
            head.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        let filtered = Filtered::new(body, framing, listing, withheld);
        let body = LoggedBody::new(filtered, x.log, idle);
        Response::from_parts(head, body.boxed_unsync())
    }

    /// An upstream response head on its way to the app: hop-by-hop headers out (the upgrade
    /// ones back in for a switch to `upgrade`), our `Via` and the request id in; the line
    /// notes who answered and how.
    fn pass_on(
        &self,
        x: &mut Exchange,
        head: &mut http::response::Parts,
        upgrade: Option<&HeaderValue>,
    ) {
        upstream::strip_hop_by_hop(&mut head.headers);
        if let Some(protocol) = upgrade {
            upgrade::restore(&mut head.headers, protocol);
        }
        upstream::append_via(&mut head.headers, &self.via);
        if let Ok(v) = HeaderValue::from_str(&x.caller.request_id) {
            head.headers.insert(REQUEST_ID_HEADER.clone(), v);
        }
        x.log.status = head.status.as_u16();
        x.log.answered_by = Some("upstream");
        x.log.upstream_version = Some(version_name(head.version));
    }

    /// The upstream agreed to switch protocols: pass its 101 on (with the upgrade headers,
    /// which hop-by-hop removal took, our `Via` and the request id) and hand the proxy what it
    /// needs to relay the switched connection. The line is written when that closes.
    fn switch(
        &self,
        mut x: Exchange,
        mut resp: Response<UpstreamBody>,
        asked: &HeaderValue,
        idle: Duration,
    ) -> Reply {
        let upstream_side = hyper::upgrade::on(&mut resp);
        let (mut head, _) = resp.into_parts();
        let agreed = head.headers.get(header::UPGRADE).cloned();
        self.pass_on(&mut x, &mut head, Some(agreed.as_ref().unwrap_or(asked)));
        let handoff = Handoff {
            upstream: upstream_side,
            log: x.log,
            idle,
        };
        Reply::Switch(Response::from_parts(head, full(Bytes::new())), handoff)
    }

    /// Answer a refusal or failure with its JSON body, and write its line.
    pub(crate) fn reject(&self, mut x: Exchange, rej: Rejection) -> Response<ProxyBody> {
        let resp = rej.to_response(&x.caller.request_id);
        let rec = &mut x.log;
        // What the client got: a refused MCP call is a JSON-RPC error in a 200.
        rec.status = resp.status().as_u16();
        rec.answered_by = Some("chaperone");
        rec.error = Some(rej.code.as_str().to_string());
        if rej.code.is_denial() {
            rec.decision = "deny";
        }
        // The refusal's own reason, always: a guardrail that refuses the address a permitted
        // request resolved to must not be logged as "permitted by" (and its line names no
        // permit; a policy denial carries the ids that decided it).
        rec.reason = Some(rej.reason);
        if rej.code.is_denial() || !rej.policy_ids.is_empty() {
            rec.policy_ids = rej.policy_ids;
        }
        x.log.finish();
        resp
    }

    /// The line of a request the HTTP parser refused before any stage saw it (a bad byte,
    /// a head too large, a malformed request line): hyper answered it (400, or 431 for a head
    /// too large) and closed the connection; it still gets its line, with the parser's reason.
    pub(crate) fn refused_by_parser(&self, conn: &Conn, e: &hyper::Error) {
        if !e.is_parse() && !e.is_parse_too_large() {
            return;
        }
        let mut log = self.begin_line(conn);
        log.request_id = uuid::Uuid::new_v4().to_string();
        log.decision = "deny";
        log.answered_by = Some("chaperone");
        let too_large = e.is_parse_too_large();
        log.status = if too_large { 431 } else { 400 };
        log.error = Some(
            if too_large {
                "header_too_large"
            } else {
                ErrorCode::BadRequest.as_str()
            }
            .to_string(),
        );
        log.reason = Some(format!("the HTTP parser refused the request: {e}"));
        log.finish();
    }
}

/// How the log line names an HTTP version.
fn version_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// The upstream response body, streamed to the app; the line is written when it ends or is
/// dropped, so it has the real duration and byte count. How it ended:
/// - its last frame, its trailers (a response with trailers is over when they arrive, whether
///   or not the server polls the body once more), or every byte its length promised (a
///   server writing a sized body stops there, trailers or not): `complete`;
/// - an error reading the upstream's body: `response_incomplete`, with the error;
/// - dropped before either (the app went away, e.g. an SSE client that closes after
///   `[DONE]` while the stream stays open): `client_closed`, not an error, or `shutdown` when
///   the drain deadline cut it.
struct LoggedBody<B: Relayed> {
    inner: B,
    log: Option<LogGuard>,
    ended: bool,
    /// The body's length, when the upstream declared it.
    length: Option<u64>,
    /// Longest silence between two frames.
    idle: Duration,
    /// The silence timer, from the first time the body had nothing to give.
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A response body as the upstream sent it, or as a stage rewrote it on the way; what the
/// rewriting did goes into the line when it is written.
trait Relayed: Body<Data = Bytes, Error: Into<BoxError>> + Unpin {
    /// Note in the line what was done to the body.
    fn note(&self, _log: &mut Record) {}
}

impl Relayed for UpstreamBody {}

impl<B: Relayed> Relayed for crate::mcp::listing::Filtered<B> {
    fn note(&self, log: &mut Record) {
        if let Some(m) = log.mcp.as_mut() {
            m.offered = Some(self.listing.offered);
            m.hidden.clone_from(&self.listing.hidden);
        }
    }
}

impl<B: Relayed> LoggedBody<B> {
    fn new(inner: B, log: LogGuard, idle: Duration) -> Self {
        LoggedBody {
            length: inner.size_hint().exact(),
            inner,
            log: Some(log),
            ended: false,
            idle,
            silence: None,
        }
    }
}

impl<B: Relayed> Body for LoggedBody<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner)
            .poll_frame(cx)
            .map_err(Into::<BoxError>::into)
        {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(timer) = this.silence.as_mut() {
                    timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + this.idle);
                }
                if let (Some(data), Some(log)) = (frame.data_ref(), this.log.as_mut()) {
                    log.bytes_out += data.len() as u64;
                }
                if frame.is_trailers() {
                    this.ended = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(log) = this.log.as_mut() {
                    log.error = Some(format!("upstream body: {e}"));
                    log.completion = Completion::ResponseIncomplete;
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .silence
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // Silent for too long: give up on the upstream (a stream that keeps sending
                // is never cut; only silence is).
                let why = format!("upstream body: nothing for {idle:?} (timeouts.idle)");
                if let Some(log) = this.log.as_mut() {
                    log.error = Some(why.clone());
                    log.completion = Completion::ResponseIncomplete;
                }
                Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    why,
                )
                .into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Relayed> Drop for LoggedBody<B> {
    fn drop(&mut self) {
        if let Some(mut log) = self.log.take() {
            self.inner.note(&mut log);
            let delivered = self.length.is_some_and(|n| n == log.bytes_out);
            let unfinished = !self.ended && !delivered && !self.inner.is_end_stream();
            if unfinished && log.completion == Completion::Complete {
                log.completion = log.abandoned();
            }
            log.finish();
        }
    }
}
