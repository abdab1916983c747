//! Stage 7, forward: send the request upstream over pooled keep-alive connections and stream
//! both bodies; handle hop-by-hop headers (RFC 9110 §7.6.1) and `Via` (§7.6.3).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::egress::{Chain, Egress};
use crate::error::{BoxError, ErrorCode, ProxyBody, Rejection, full};
use crate::policy::Guardrails;
use crate::proxy::Timeouts;
use crate::proxy::pool::{self, Abandoned, Client, UpstreamBody};
use crate::proxy::slots::{Capped, Saturated, Slots};
use crate::resolve::{Pins, Unpinned};
use crate::target::Target;

/// `Proxy-Connection` (a pre-standard `Connection` some clients still send).
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, never the message: removed in both directions.
/// Typed names, not strings: a lookup by `&str` parses the name first, twice per request
/// for each of these (measured in BENCHMARKS.md, issue 21).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    PROXY_CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("http2-settings"),
];

/// Remove hop-by-hop headers: the fixed set and every header the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) || headers.contains_key(PROXY_CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .chain(headers.get_all(PROXY_CONNECTION).iter())
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
}

/// Remove hop-by-hop headers from a request being forwarded. `TE: trailers` is sent on
/// when the app asked for it (gRPC requires it): this proxy passes trailers through, so it
/// can make that promise for its own hop.
pub(crate) fn strip_request_hop_by_hop(headers: &mut HeaderMap) {
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    strip_hop_by_hop(headers);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Append our `Via` entry, keeping any the message already had.
pub(crate) fn append_via(headers: &mut HeaderMap, via: &HeaderValue) {
    headers.append(header::VIA, via.clone());
}

/// Has this message already passed through this proxy instance?
pub(crate) fn is_loop(headers: &HeaderMap, pseudonym: &str) -> bool {
    headers
        .get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|entry| entry.split_whitespace().nth(1) == Some(pseudonym))
}

/// Refuse a request that has already passed through this proxy instance (508-style loop).
pub(crate) fn refuse_loop(headers: &HeaderMap, pseudonym: &str) -> Result<(), Rejection> {
    if is_loop(headers, pseudonym) {
        return Err(Rejection::new(
            ErrorCode::LoopDetected,
            "this request has already passed through this proxy",
        ));
    }
    Ok(())
}

/// A request extension the client connection's reader sets (`proxy::framing`): the head as
/// sent had both `Content-Length` and `Transfer-Encoding`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AmbiguousLength;

/// A request that says its length twice, with `Content-Length` and `Transfer-Encoding`, is
/// refused (400) and its connection closed: a server may read either (RFC 9112 §6.1 lets one
/// reject it, and says to close), and an upstream that reads the other is how requests are
/// smuggled. Envoy refuses the same. hyper keeps only `Transfer-Encoding` of the two (and
/// HTTP/2 carries neither framing header), so the request never shows both: the connection's
/// reader marks such a request instead ([`AmbiguousLength`]).
pub(crate) fn refuse_ambiguous_length(parts: &http::request::Parts) -> Result<(), Rejection> {
    if parts.extensions.get::<AmbiguousLength>().is_some() {
        let mut rej = Rejection::new(
            ErrorCode::BadRequest,
            "the request has both Content-Length and Transfer-Encoding; its length is ambiguous",
        );
        rej.close = true;
        return Err(rej);
    }
    Ok(())
}

/// Make a request that went through the stages ready for the wire: the upstream URL from
/// `target` (with the query the strip stage rewrote, if it did), no hop-by-hop headers, our
/// `Via`, HTTP/1.1 on our side (the client negotiates h2 by ALPN), and for a buffered body its
/// own length.
///
/// The host goes only in the URL's authority: the client writes it as `Host` on an HTTP/1.1
/// connection (without the scheme's default port) and as `:authority` on an HTTP/2 one, where
/// a `Host` header beside it is a malformed request (RFC 9113 8.3.1; nginx answers 400
/// "duplicate host header"). Which one a pooled connection speaks is known only when it is
/// picked, so the app's `Host` is removed here and never rewritten.
pub(crate) fn prepare(
    parts: &mut http::request::Parts,
    target: &Target,
    new_query: Option<&str>,
    via: &HeaderValue,
    body: &OutBody,
) -> Result<(), Rejection> {
    let path = target.wire_path();
    let path_and_query = match (new_query, &target.query) {
        (Some(""), _) => path.to_string(),
        (Some(q), _) => format!("{path}?{q}"),
        (None, Some(q)) => format!("{path}?{q}"),
        (None, None) => path.to_string(),
    };
    let authority = target.authority();
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
    strip_request_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    append_via(&mut parts.headers, via);
    parts.version = http::Version::HTTP_11;
    if let OutBody::Buffered(b) = body {
        // The body may have been rewritten: its length, not the client's, frames it.
        parts.headers.remove(header::TRANSFER_ENCODING);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
    }
    Ok(())
}

/// A DNS resolver that drops guarded addresses (metadata, link-local) from every answer, so
/// the address that is checked is the address connected to: no DNS-rebinding bypass. The one
/// exception is a name guarded itself (`metadata.google.internal`), whose addresses of the
/// same kind pass: policy saw that guardrail and a permit lifted it.
///
/// While a policy reads `context.address`, a name is reached only at the address policy saw
/// ([`Pins`]); a name no decision pinned is not connected to.
#[derive(Clone, Debug, Default)]
pub(crate) struct GuardedResolver {
    pins: Arc<Pins>,
}

impl tower::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let pinned = self.pins.for_connect(name.as_str());
        Box::pin(async move {
            match pinned {
                Ok(Some(ip)) => {
                    return screen(name.as_str(), vec![SocketAddr::new(ip, 0)]).map(Vec::into_iter);
                }
                Ok(None) => {}
                Err(Unpinned) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!(
                            "guardrail: {name} was not resolved for a policy decision (policy reads context.address); not connected"
                        ),
                    ));
                }
            }
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            screen(name.as_str(), addrs).map(Vec::into_iter)
        })
    }
}

/// The addresses of `name` that may be connected to; a `PermissionDenied` error (which
/// `is_guardrail` recognizes) when guarded addresses were all it had.
pub(crate) fn screen(name: &str, addrs: Vec<SocketAddr>) -> std::io::Result<Vec<SocketAddr>> {
    // A name that is itself guarded (`metadata.google.internal`) was decided by policy as
    // that kind, so only a permit lifting it brought the request here: its addresses of that
    // kind are what was allowed. Any other name resolving to a guarded address is refused,
    // whatever policy said of the name.
    let named = Guardrails::default().check(name, 0).map(|h| h.kind);
    let mut refused = None;
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| match Guardrails::check_ip(a.ip()) {
            Some(hit) if Some(hit.kind) == named => true,
            Some(hit) => {
                refused = Some(hit.why);
                false
            }
            None => true,
        })
        .collect();
    match (allowed.is_empty(), refused) {
        (true, Some(why)) => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("guardrail: {name} resolves to a refused address: {why}"),
        )),
        _ => Ok(allowed),
    }
}

/// Connects like [`HttpConnector`], then checks the address actually connected to against
/// the guardrails (with its port, which the resolver does not know): a name that resolves to
/// one of the sidecar's own listeners is refused before a byte is sent. A destination that
/// already tripped a guardrail as named (an IP literal, `localhost`) was decided by policy
/// with that knowledge, so it is not checked twice.
#[derive(Clone)]
pub(crate) struct GuardedConnector<R = GuardedResolver> {
    http: HttpConnector<R>,
    guard: Arc<Guardrails>,
}

impl<R> GuardedConnector<R> {
    /// Wrap a connector.
    pub(crate) fn new(http: HttpConnector<R>, guard: Arc<Guardrails>) -> Self {
        GuardedConnector { http, guard }
    }
}

impl<R> tower::Service<Uri> for GuardedConnector<R>
where
    HttpConnector<R>: tower::Service<Uri, Response = TokioIo<TcpStream>>,
    <HttpConnector<R> as tower::Service<Uri>>::Error: Into<BoxError>,
    <HttpConnector<R> as tower::Service<Uri>>::Future: Send + 'static,
{
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        let decided = uri
            .host()
            .is_some_and(|h| self.guard.check(h, port).is_some());
        let guard = self.guard.clone();
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let io = connecting.await.map_err(Into::into)?;
            if !decided
                && let Ok(peer) = io.inner().peer_addr()
                && let Some(hit) = guard.check_addr(peer)
            {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("guardrail: the destination resolves to {peer}: {}", hit.why),
                )
                .into());
            }
            Ok(io)
        })
    }
}

type Connector = hyper_rustls::HttpsConnector<Capped<Chain<GuardedConnector>>>;

/// Pooled clients to upstreams: HTTP/1.1, and for `https` HTTP/2 or HTTP/1.1 by ALPN, with the
/// upstream's certificate and host name always verified. One set of pools per connect timeout
/// in use (the global one, then each route's own), since a connector has one connect timeout;
/// in each set, beside that pool, one that speaks only HTTP/1.1 (for upgrades) and one only
/// HTTP/2 (for gRPC, also to plain `http://` upstreams): see [`Wire`].
#[derive(Clone)]
pub(crate) struct Upstream {
    clients: Vec<Pools>,
    /// Direct, or through the upstream proxy.
    egress: Egress,
    /// `max_connections_per_upstream`: each pool's cap.
    per_upstream: usize,
    /// Abandoned exchanges being finished in the background ([`Exchange`]).
    finishing: Arc<AtomicUsize>,
    /// Names pinned to the address policy saw, shared by every worker.
    pins: Arc<Pins>,
}

/// The pools for one connect timeout.
#[derive(Clone)]
struct Pools {
    connect: Duration,
    /// HTTP/2 or HTTP/1.1 by ALPN for `https`, HTTP/1.1 for `http`.
    any: Client<Connector>,
    /// HTTP/1.1 only.
    http1: Client<Connector>,
    /// HTTP/2 only, also for `http` (prior knowledge, h2c).
    http2: Client<Connector>,
}

/// Which HTTP version a request needs upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// Whatever the upstream offers (ALPN), HTTP/1.1 in plain text.
    Any,
    /// HTTP/1.1: an upgrade (WebSocket) is an HTTP/1.1 mechanism.
    Http1,
    /// HTTP/2: gRPC runs only on HTTP/2, so to a plain `http://` upstream it goes as h2c
    /// with prior knowledge (RFC 9113 3.3), as gRPC clients send it.
    Http2,
}

impl Wire {
    fn of(headers: &http::HeaderMap) -> Wire {
        let grpc = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/grpc"));
        if headers.contains_key(header::UPGRADE) {
            Wire::Http1
        } else if grpc {
            Wire::Http2
        } else {
            Wire::Any
        }
    }
}

/// How long one request may take upstream, phase by phase (the route's own, else global).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deadlines {
    /// Connecting.
    pub(crate) connect: Duration,
    /// From sending the request to the response head.
    pub(crate) response_head: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upstream")
    }
}

impl Upstream {
    /// Clients with the global connect timeout and each of `connects` (the routes' own), and
    /// the upstream TLS settings.
    pub(crate) fn new(
        t: &Timeouts,
        connects: &[Duration],
        tls: Arc<rustls::ClientConfig>,
        guard: Arc<Guardrails>,
        egress: Egress,
        per_upstream: usize,
        pins: Arc<Pins>,
    ) -> Self {
        let mut all = vec![t.connect];
        for c in connects {
            if !all.contains(c) {
                all.push(*c);
            }
        }
        let clients = all
            .into_iter()
            .map(|connect| {
                let client = |wire| {
                    Reach {
                        connect,
                        tls: &tls,
                        guard: &guard,
                        egress: &egress,
                        per_upstream,
                        pins: &pins,
                    }
                    .client(wire)
                };
                Pools {
                    connect,
                    any: client(Wire::Any),
                    http1: client(Wire::Http1),
                    http2: client(Wire::Http2),
                }
            })
            .collect();
        Upstream {
            clients,
            egress,
            per_upstream,
            finishing: Arc::default(),
            pins,
        }
    }

    /// The names pinned for policy ([`crate::resolve`]).
    pub(crate) fn pins(&self) -> &Arc<Pins> {
        &self.pins
    }

    /// `max_connections_per_upstream`.
    pub(crate) fn per_upstream(&self) -> usize {
        self.per_upstream
    }

    /// How this client reaches upstreams (for others that connect out the same way).
    pub(crate) fn egress(&self) -> &Egress {
        &self.egress
    }

    /// One exchange of `req` on `client`, finished in the background when abandoned after
    /// it was sent on HTTP/1.1 (see [`finish`]).
    async fn exchange(
        &self,
        client: &Client<Connector>,
        req: Request<ProxyBody>,
        deadline: tokio::time::Instant,
    ) -> Result<Response<UpstreamBody>, pool::Error> {
        let finishing = self.finishing.clone();
        client
            .request(req, move |abandoned| finish(abandoned, deadline, finishing))
            .await
    }

    /// The pool for `connect` and the HTTP version the request needs.
    fn client(&self, connect: Duration, wire: Wire) -> &Client<Connector> {
        let pools = self
            .clients
            .iter()
            .find(|p| p.connect == connect)
            .unwrap_or(&self.clients[0]);
        match wire {
            Wire::Any => &pools.any,
            Wire::Http1 => &pools.http1,
            Wire::Http2 => &pools.http2,
        }
    }

    /// Send a request; the response head must arrive within `deadlines.response_head`.
    /// Returns the response and the time it took.
    ///
    /// A request whose body is small and of known length (at most [`REPLAY_MAX_BYTES`]) is
    /// buffered so it can be sent again when the connection to the upstream cannot be made
    /// (nothing reached the upstream, so this is safe for any method). Larger or streaming
    /// bodies are streamed and not retried.
    pub(crate) async fn send(
        &self,
        mut parts: http::request::Parts,
        body: OutBody,
        deadlines: Deadlines,
    ) -> Result<(Response<UpstreamBody>, Duration), Rejection> {
        let start = Instant::now();
        let wire = Wire::of(&parts.headers);
        let client = self.client(deadlines.connect, wire);
        // An `http://` request through the upstream proxy carries the proxy's credentials
        // itself (the app's own `Proxy-Authorization` was removed as hop-by-hop).
        if let Some(auth) = self.egress.authorization_for(&parts.uri) {
            parts.headers.insert(header::PROXY_AUTHORIZATION, auth);
        }
        let deadline = tokio::time::Instant::now() + deadlines.response_head;
        let timed_out = || {
            Rejection::new(
                ErrorCode::UpstreamTimeout,
                format!(
                    "the upstream did not answer within {:?}",
                    deadlines.response_head
                ),
            )
        };
        let streamed = match body {
            OutBody::Buffered(b) => Err(b),
            OutBody::Prefixed(head, rest) => Ok(Prefixed {
                head: Some(head),
                rest,
            }
            .boxed_unsync()),
            OutBody::Stream(b) if b.size_hint().exact().is_some_and(|n| n <= REPLAY_MAX_BYTES) => {
                match tokio::time::timeout_at(deadline, b.collect()).await {
                    Ok(Ok(c)) => Err(c.to_bytes()),
                    Ok(Err(e)) => {
                        return Err(Rejection::new(
                            ErrorCode::BadRequest,
                            format!("reading the request body failed: {e}"),
                        ));
                    }
                    Err(_) => return Err(timed_out()),
                }
            }
            OutBody::Stream(b) => Ok(b.map_err(BoxError::from).boxed_unsync()),
        };
        let bytes = match streamed {
            Err(bytes) => bytes,
            Ok(body) => {
                let req = Request::from_parts(parts, body);
                let exchange = self.exchange(client, req, deadline);
                return match tokio::time::timeout_at(deadline, exchange).await {
                    Ok(Ok(resp)) => Ok((resp, start.elapsed())),
                    Ok(Err(e)) => Err(failed(&e)),
                    Err(_) => Err(timed_out()),
                };
            }
        };
        let mut attempt = 0;
        loop {
            let mut req = Request::new(full(bytes.clone()));
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = parts.uri.clone();
            *req.version_mut() = parts.version;
            *req.headers_mut() = parts.headers.clone();
            let exchange = self.exchange(client, req, deadline);
            match tokio::time::timeout_at(deadline, exchange).await {
                Ok(Ok(resp)) => return Ok((resp, start.elapsed())),
                Ok(Err(e))
                    if e.is_connect()
                        && attempt < CONNECT_RETRIES.len()
                        && !is_guardrail(&e)
                        && !is_saturated(&e) =>
                {
                    tracing::debug!(error = %describe(&e), attempt, "upstream connect failed; retrying");
                    tokio::time::sleep(CONNECT_RETRIES[attempt]).await;
                    attempt += 1;
                }
                Ok(Err(e)) => return Err(failed(&e)),
                Err(_) => return Err(timed_out()),
            }
        }
    }
}

/// Abandoned exchanges one worker finishes at a time; past this, one is cancelled (and its
/// HTTP/1.1 connection closed) as before.
const FINISHING_MAX: usize = 64;

/// Finish an exchange abandoned after its request went out on an HTTP/1.1 connection.
///
/// Dropped before the response head came (the client reset its stream or closed its
/// connection), such an exchange is finished in the background rather than cancelled.
/// HTTP/1.1 cannot abandon a request midway, so cancelling closes the connection and the next
/// request opens another: a client resetting streams at a steady pace ("paced rapid reset")
/// would cost the upstream one new connection per stream. Finished, the connection goes back
/// to the pool: the response is dropped, and the pool reads a short body to its end first
/// ([`pool::DRAIN_MAX_BYTES`]), as for a body the app stopped reading.
///
/// Bounded on every side: at most [`FINISHING_MAX`] at a time per worker, each within the
/// request's own response deadline, and the body as the pool bounds it. Dropped before a
/// connection was handed to it (waiting for one, connecting), an exchange is cancelled:
/// nothing was sent. On HTTP/2 it is cancelled too (the pool never calls this): the stream's
/// reset frees nothing but the stream.
fn finish(abandoned: Abandoned, deadline: tokio::time::Instant, finishing: Arc<AtomicUsize>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if finishing.fetch_add(1, Ordering::Relaxed) >= FINISHING_MAX {
        finishing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let counted = Finishing(finishing);
    runtime.spawn(async move {
        let _counted = counted;
        let _ = tokio::time::timeout_at(deadline, abandoned.response()).await;
    });
}

/// One exchange counted in [`Upstream::finishing`] until dropped.
struct Finishing(Arc<AtomicUsize>);

impl Drop for Finishing {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl OutBody {
    /// The body, when it was read whole (the credential stage may inject into it).
    pub(crate) fn buffered_mut(&mut self) -> Option<&mut Bytes> {
        match self {
            OutBody::Buffered(b) => Some(b),
            _ => None,
        }
    }
}

/// How a pool reaches upstreams.
struct Reach<'a> {
    /// Gives up connecting after this.
    connect: Duration,
    tls: &'a Arc<rustls::ClientConfig>,
    guard: &'a Arc<Guardrails>,
    egress: &'a Egress,
    /// Keeps at most this many connections open to one upstream.
    per_upstream: usize,
    pins: &'a Arc<Pins>,
}

impl Reach<'_> {
    /// A pooled client speaking `wire`.
    fn client(&self, wire: Wire) -> Client<Connector> {
        let Reach {
            connect,
            tls,
            guard,
            egress,
            per_upstream,
            pins,
        } = *self;
        let mut http = HttpConnector::new_with_resolver(GuardedResolver { pins: pins.clone() });
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect));
        http.set_keepalive(Some(Duration::from_secs(60)));
        http.enforce_http(false);
        let http = egress.connector(GuardedConnector::new(http, guard.clone()));
        let http = Capped::new(http, Slots::new(per_upstream), connect);
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((**tls).clone())
            .https_or_http()
            .enable_http1();
        let http = match wire {
            Wire::Http1 => builder.wrap_connector(http),
            Wire::Any | Wire::Http2 => builder.enable_http2().wrap_connector(http),
        };
        // Idle connections are bounded by the cap: each holds a slot while open.
        Client::new(http, wire == Wire::Http2)
    }
}

/// A request body on its way upstream.
#[derive(Debug)]
pub(crate) enum OutBody {
    /// As the client sends it.
    Stream(Incoming),
    /// Read whole (inspected, perhaps rewritten); sent with its exact length.
    Buffered(Bytes),
    /// The first bytes, read for inspection before the body proved larger than the limit;
    /// the rest still comes from the client.
    Prefixed(Bytes, Incoming),
}

/// What [`read_up_to`] got.
#[derive(Debug)]
pub(crate) enum BodyRead<B = Incoming> {
    /// The whole body, at most the limit.
    Whole(Bytes),
    /// More than the limit: what was read, and the rest of the stream.
    Partial(Bytes, B),
}

/// Read a request body until it ends or passes `max` bytes. Trailers are not kept (request
/// trailers are all but unused by HTTP APIs; a buffered body is sent with a length).
pub(crate) async fn read_up_to<B>(mut body: B, max: usize) -> Result<BodyRead<B>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > max {
                return Ok(BodyRead::Partial(buf.freeze(), body));
            }
        }
    }
    Ok(BodyRead::Whole(buf.freeze()))
}

/// A body that yields bytes already read, then the rest of the client's stream.
struct Prefixed {
    head: Option<Bytes>,
    rest: Incoming,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(head))));
        }
        Pin::new(&mut self.rest)
            .poll_frame(cx)
            .map_err(BoxError::from)
    }
}

/// Bodies up to this size with a known length are buffered so a failed connect can be retried.
pub(crate) const REPLAY_MAX_BYTES: u64 = 64 * 1024;

/// Waits before each retry of a connect that failed (connection refused, reset, timed out).
const CONNECT_RETRIES: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(400)];

/// [`GuardedResolver`] and [`GuardedConnector`] refuse with `PermissionDenied`: no retry can
/// change that answer.
fn is_guardrail(e: &pool::Error) -> bool {
    crate::error::innermost(e)
        .downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
}

/// A pool at `max_connections_per_upstream` had none free: retrying would only wait again.
fn is_saturated(e: &pool::Error) -> bool {
    crate::error::innermost(e).is::<Saturated>()
}

/// The rejection for a failed upstream call.
fn failed(e: &pool::Error) -> Rejection {
    if is_guardrail(e) {
        Rejection::new(
            ErrorCode::PolicyDenied,
            crate::error::innermost(e).to_string(),
        )
    } else if is_saturated(e) {
        Rejection::new(
            ErrorCode::TooManyConnections,
            crate::error::innermost(e).to_string(),
        )
    } else {
        Rejection::new(ErrorCode::UpstreamUnreachable, describe(e))
    }
}

/// A reason for a failed upstream call, from the innermost cause.
fn describe(e: &pool::Error) -> String {
    let cause = crate::error::innermost(e);
    if e.is_connect() {
        format!("cannot connect to the upstream: {cause}")
    } else {
        format!("the upstream connection failed: {cause}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert(
            "proxy-authorization",
            HeaderValue::from_static("Basic Zm9vOmJhcg=="),
        );
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn te_trailers_survives_for_requests() {
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip, trailers"));
        strip_request_hop_by_hop(&mut h);
        assert_eq!(h.get("te").unwrap(), "trailers");
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_request_hop_by_hop(&mut h);
        assert!(h.get("te").is_none());
    }

    #[test]
    fn resolved_guarded_addresses_are_refused_unless_the_name_is_guarded_as_that_kind() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let metadata = a("169.254.169.254:0");
        let link_local = a("169.254.1.1:0");
        let public = a("203.0.113.7:0");
        // is_guardrail relies on this kind to skip connect retries.
        let err = screen("rebound.example.org", vec![metadata]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().starts_with("guardrail:"), "{err}");
        // Guarded answers are dropped; the rest is kept.
        assert_eq!(
            screen("mixed.example.org", vec![metadata, public]).unwrap(),
            [public]
        );
        // The metadata name's own metadata address passes (policy lifted it), but not a
        // link-local address of another kind.
        assert_eq!(
            screen("metadata.google.internal", vec![metadata]).unwrap(),
            [metadata]
        );
        assert!(screen("Metadata.Google.Internal.", vec![link_local]).is_err());
        assert_eq!(screen("api.example.org", vec![public]).unwrap(), [public]);
    }

    #[test]
    fn loop_detection() {
        let mut h = HeaderMap::new();
        h.insert(
            "via",
            HeaderValue::from_static("1.1 squid, 1.1 chaperone-abc"),
        );
        assert!(is_loop(&h, "chaperone-abc"));
        assert!(!is_loop(&h, "chaperone-def"));
    }

    /// A name that resolves onto one of the sidecar's own listeners is refused after the
    /// connect, before anything is sent; the same listener named as the literal it is was
    /// decided by policy and passes.
    #[tokio::test]
    async fn a_name_resolving_to_an_own_listener_is_refused_after_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let own = listener.local_addr().unwrap();
        let resolver = tower::service_fn(move |_: Name| async move {
            Ok::<_, std::io::Error>(vec![own].into_iter())
        });
        let guard = Arc::new(Guardrails::new(vec![own]));
        let mut c = GuardedConnector::new(HttpConnector::new_with_resolver(resolver), guard);
        let named: Uri = format!("http://innocent.example:{}/", own.port())
            .parse()
            .unwrap();
        let err = match tower::Service::call(&mut c, named).await {
            Ok(_) => panic!("connected to an own listener by name"),
            Err(e) => e,
        };
        let io = err.downcast_ref::<std::io::Error>().expect("an io error");
        assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(io.to_string().contains("own listeners"), "{io}");
        let literal: Uri = format!("http://{own}/").parse().unwrap();
        assert!(tower::Service::call(&mut c, literal).await.is_ok());
    }
}
