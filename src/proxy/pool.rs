//! The forward stage's connections to upstreams: one pool per worker thread, on hyper's
//! connection API (`hyper::client::conn`), in place of hyper-util's legacy client.
//!
//! The legacy client is built to be shared by threads: every request locked its pool twice,
//! cloned its connector, boxed two futures and, on HTTP/1.1, spawned a task to put the
//! connection back once it was ready again. Here a worker's requests and its connections
//! live on one thread, so the pool is a map under a lock no other thread takes, and a
//! connection goes back when its response body ends, from that body ([`UpstreamBody`]).
//!
//! What it keeps of the legacy client's behaviour:
//! - HTTP/1.1 connections are used one exchange at a time, most recently used first; an
//!   HTTP/2 connection (by ALPN, or prior knowledge for an HTTP/2-only pool) is shared by
//!   every request to its upstream.
//! - A request that finds no idle connection connects, and meanwhile waits for one to come
//!   back: at `max_connections_per_upstream` (the connector's [`Capped`] wait) that is how a
//!   waiting request is served. A connect that a returned connection overtook finishes in
//!   the background, and its connection joins the pool (cut short, it would be closed as
//!   soon as made).
//! - A request that an idle connection could not take (the upstream closed it as it was
//!   picked) is sent again on another; nothing of it had been written.
//! - HTTP/1.1 requests carry `Host` and go in origin form, or in absolute form to an upstream
//!   proxy ([`crate::egress`]); HTTP/2 requests carry `:authority` from the URL.
//! - An idle connection is closed after [`IDLE_TIMEOUT`].
//! - While a connection to an HTTP/2 upstream is being made, the requests that find no
//!   connection wait for it rather than each open their own, as the legacy client's
//!   "connecting" lock had them do. An upstream is known to speak HTTP/2 once ALPN chose it
//!   (kept while the pool has a connection to it), or from the start in an HTTP/2-only pool.
//!   A request waits for one such connect at most: when it fails, the request connects
//!   itself, so an upstream that stopped answering costs it one connect timeout, not one per
//!   request queued before it.
//!
//! And one thing it did not do: an HTTP/1.1 response body dropped before its end, with a
//! short rest, is read to its end in the background so its connection serves again
//! ([`DRAIN_MAX_BYTES`]).
//!
//! [`Capped`]: crate::proxy::slots::Capped

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{BoxError, ProxyBody};

/// How long a connection may sit idle in the pool before it is closed.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// An HTTP/1.1 response body dropped before its end (the app went away mid-response, or
/// reset its stream) is read to its end in the background when it says it has at most this
/// much left, so its connection serves again; a longer one is dropped with its connection.
/// HTTP/1.1 cannot abandon a response midway: without this, a client resetting streams after
/// each response head would cost the upstream a new connection per stream.
pub(crate) const DRAIN_MAX_BYTES: u64 = 64 * 1024;

/// How long such a body may take to read.
pub(crate) const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Bodies one pool drains at a time; past this, a dropped body's connection is closed.
const DRAINING_MAX: usize = 64;

/// What a pool connects with: a URL's scheme and authority in, a connection out.
pub(crate) trait Connect:
    tower::Service<
        Uri,
        Response: hyper::rt::Read + hyper::rt::Write + Connection + Send + Unpin + 'static,
        Error: Into<BoxError>,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<C> Connect for C where
    C: tower::Service<
            Uri,
            Response: hyper::rt::Read + hyper::rt::Write + Connection + Send + Unpin + 'static,
            Error: Into<BoxError>,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// A pool of connections to upstreams, and the connector that makes them.
#[derive(Clone)]
pub(crate) struct Client<C> {
    connector: C,
    /// Speak HTTP/2 on every connection (prior knowledge), whatever ALPN said.
    http2_only: bool,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    shared: Arc<Shared>,
}

/// The pool itself, shared by the client's clones and the bodies that give connections back.
struct Shared {
    idle: Mutex<HashMap<Box<str>, Idle>>,
    /// Woken when a connection is put back or an HTTP/2 one is added.
    returned: Notify,
    idle_timeout: Duration,
    /// The task closing connections idle past the timeout was started.
    reaping: AtomicBool,
    /// Dropped bodies being read to their end.
    draining: AtomicUsize,
    /// Connects to HTTP/2 upstreams started so far, to tell them apart.
    attempts: AtomicU64,
}

/// The connections to one upstream not in use.
#[derive(Default)]
struct Idle {
    /// HTTP/1.1, each ready for a request; the last one was used last.
    http1: Vec<Parked>,
    /// The HTTP/2 connection, shared, and when a request last took it.
    http2: Option<(http2::SendRequest<ProxyBody>, Instant)>,
    /// ALPN chose HTTP/2 for a connection to this upstream.
    speaks_h2: bool,
    /// The connect to this HTTP/2 upstream under way, which requests wait for.
    connecting_h2: Option<u64>,
}

impl Idle {
    /// Nothing to keep: no connection, no connect under way, nothing learned.
    fn is_empty(&self) -> bool {
        self.http1.is_empty()
            && self.http2.is_none()
            && self.connecting_h2.is_none()
            && !self.speaks_h2
    }
}

/// What a request that found no idle connection does.
enum Begin {
    /// Connect, holding the HTTP/2 attempt others may wait for, if the upstream speaks it.
    Connect(Option<Attempt>),
    /// Wait for this HTTP/2 attempt.
    Wait(u64),
}

/// A connect to an HTTP/2 upstream under way. When it ends, however it ends (the connection
/// shared, an error, the request gone), the requests waiting for it are woken.
struct Attempt {
    shared: Arc<Shared>,
    key: Box<str>,
    id: u64,
}

impl Attempt {
    /// ALPN chose HTTP/1.1 this time: the upstream is no longer taken to speak HTTP/2, and
    /// requests stop waiting for its connects.
    fn spoke_http1(&self) {
        if let Some(e) = self.shared.idle.lock().get_mut(&*self.key) {
            e.speaks_h2 = false;
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        {
            let mut idle = self.shared.idle.lock();
            if let Some(e) = idle.get_mut(&*self.key) {
                if e.connecting_h2 == Some(self.id) {
                    e.connecting_h2 = None;
                }
                if e.is_empty() {
                    idle.remove(&*self.key);
                }
            }
        }
        self.shared.returned.notify_waiters();
    }
}

/// An idle HTTP/1.1 connection.
struct Parked {
    tx: http1::SendRequest<ProxyBody>,
    /// To an upstream proxy: requests in absolute form.
    proxied: bool,
    since: Instant,
}

/// A connection a request may use.
enum Conn {
    Http1(http1::SendRequest<ProxyBody>),
    Http2(http2::SendRequest<ProxyBody>),
}

struct Checked {
    conn: Conn,
    proxied: bool,
    /// It served a request before (so a request it could not take may go on another).
    reused: bool,
}

/// A failed exchange: connecting, or on the connection.
#[derive(Debug)]
pub(crate) struct Error {
    connect: bool,
    cause: BoxError,
}

impl Error {
    /// The connection to the upstream could not be made; nothing was sent.
    pub(crate) fn is_connect(&self) -> bool {
        self.connect
    }

    fn connect(cause: impl Into<BoxError>) -> Self {
        Error {
            connect: true,
            cause: cause.into(),
        }
    }

    fn send(cause: impl Into<BoxError>) -> Self {
        Error {
            connect: false,
            cause: cause.into(),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.connect {
            f.write_str("connecting to the upstream failed")
        } else {
            f.write_str("the exchange with the upstream failed")
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.cause)
    }
}

/// The key connections are pooled under, as the connector's cap counts them
/// ([`crate::proxy::slots::key`]); the URL must name its scheme and host.
fn key_of(uri: &Uri) -> Result<Box<str>, Error> {
    if uri.scheme().is_none() || uri.authority().is_none() {
        return Err(Error::send("the upstream URL has no scheme or host"));
    }
    Ok(crate::proxy::slots::key(uri))
}

impl<C: Connect> Client<C> {
    /// A pool connecting with `connector`; `http2_only` speaks HTTP/2 on every connection.
    pub(crate) fn new(connector: C, http2_only: bool) -> Self {
        Self::with_idle_timeout(connector, http2_only, IDLE_TIMEOUT)
    }

    fn with_idle_timeout(connector: C, http2_only: bool, idle_timeout: Duration) -> Self {
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new());
        Client {
            connector,
            http2_only,
            h1: http1::Builder::new(),
            h2,
            shared: Arc::new(Shared {
                idle: Mutex::new(HashMap::new()),
                returned: Notify::new(),
                idle_timeout,
                reaping: AtomicBool::new(false),
                draining: AtomicUsize::new(0),
                attempts: AtomicU64::new(0),
            }),
        }
    }

    /// Send `req` (its URL absolute: the scheme and authority pick the upstream) on an idle
    /// connection or a new one.
    ///
    /// Dropped before the request was handed to a connection (waiting for one, connecting),
    /// nothing was sent. Dropped after, on HTTP/1.1, the exchange is handed to `finish` (the
    /// forward stage's `upstream::finish` completes it in the background): cancelling it would
    /// close the connection.
    pub(crate) async fn request(
        &self,
        mut req: Request<ProxyBody>,
        finish: impl FnOnce(Abandoned) + Send + Unpin,
    ) -> Result<Response<UpstreamBody>, Error> {
        let key = key_of(req.uri())?;
        let uri = req.uri().clone();
        let mut finish = Some(finish);
        loop {
            let checked = self.checkout(&key, &uri).await?;
            let reused = checked.reused;
            let set_host = match &checked.conn {
                Conn::Http1(_) => to_http1(&mut req, checked.proxied),
                Conn::Http2(_) => false,
            };
            let unsent = match checked.conn {
                Conn::Http2(mut tx) => match tx.try_send_request(req).await {
                    Ok(resp) => return Ok(resp.map(UpstreamBody::from)),
                    Err(e) => e,
                },
                Conn::Http1(mut tx) => {
                    let sending = Box::pin(tx.try_send_request(req));
                    let back = Back {
                        shared: self.shared.clone(),
                        key: key.clone(),
                        tx,
                        proxied: checked.proxied,
                    };
                    let mut in_flight = InFlight {
                        sending: Some(sending),
                        back: Some(back),
                        finish: finish.take(),
                    };
                    match (&mut in_flight).await {
                        Ok(resp) => return Ok(resp),
                        Err(e) => {
                            finish = in_flight.finish.take();
                            e
                        }
                    }
                }
            };
            let mut unsent = unsent;
            match unsent.take_message() {
                Some(mut again) if reused => {
                    tracing::debug!(error = %unsent.error(), "a pooled connection could not take the request; sending it on another");
                    *again.uri_mut() = uri.clone();
                    if set_host {
                        again.headers_mut().remove(header::HOST);
                    }
                    req = again;
                }
                _ => return Err(Error::send(unsent.into_error())),
            }
        }
    }

    /// An idle connection to `key`, else a new one; a connection put back while connecting
    /// is taken instead.
    async fn checkout(&self, key: &str, uri: &Uri) -> Result<Checked, Error> {
        if let Some(c) = self.shared.take(key) {
            return Ok(c);
        }
        let mut waited_on = None;
        let attempt = loop {
            let returned = self.shared.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            match self.shared.begin(key, self.http2_only, waited_on) {
                Begin::Connect(attempt) => break attempt,
                Begin::Wait(id) => waited_on = Some(id),
            }
            returned.await;
            if let Some(c) = self.shared.take(key) {
                return Ok(c);
            }
        };
        let mut connecting = self.connect(key, uri, attempt);
        loop {
            let returned = self.shared.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(c) = self.shared.take(key) {
                // The connect goes on in the background, and its connection into the pool:
                // cut short, it would be closed as soon as made.
                let shared = self.shared.clone();
                let key = Box::from(key);
                tokio::spawn(async move {
                    if let Ok(Checked {
                        conn: Conn::Http1(tx),
                        proxied,
                        ..
                    }) = connecting.await
                    {
                        shared.park(key, tx, proxied);
                    }
                });
                return Ok(c);
            }
            tokio::select! {
                biased;
                made = &mut connecting => return made,
                () = returned => {}
            }
        }
    }

    /// Connect to `uri`'s upstream and hand the connection to hyper: HTTP/2 when ALPN chose
    /// it or the pool speaks only HTTP/2 (then it is shared through the pool at once),
    /// HTTP/1.1 otherwise. Boxed: the request future stays small for the usual request,
    /// which finds an idle connection. `attempt` is held until the connection is shared or
    /// the connect failed.
    fn connect(
        &self,
        key: &str,
        uri: &Uri,
        attempt: Option<Attempt>,
    ) -> Pin<Box<dyn Future<Output = Result<Checked, Error>> + Send>> {
        let connector = self.connector.clone();
        let (h1, h2) = (self.h1.clone(), self.h2.clone());
        let http2_only = self.http2_only;
        let shared = self.shared.clone();
        let (key, dst): (Box<str>, Uri) = (key.into(), uri.clone());
        Box::pin(async move {
            let attempt = attempt;
            let io = tower::ServiceExt::oneshot(connector, dst)
                .await
                .map_err(Error::connect)?;
            let connected = io.connected();
            let proxied = connected.is_proxied();
            if http2_only || connected.is_negotiated_h2() {
                let (mut tx, conn) = h2.handshake(io).await.map_err(Error::send)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                    }
                });
                tx.ready().await.map_err(Error::send)?;
                shared.add_http2(key, tx.clone());
                Ok(Checked {
                    conn: Conn::Http2(tx),
                    proxied,
                    reused: false,
                })
            } else {
                if let Some(a) = &attempt {
                    a.spoke_http1();
                }
                let (mut tx, conn) = h1.handshake(io).await.map_err(Error::send)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
                    }
                });
                tx.ready().await.map_err(Error::send)?;
                Ok(Checked {
                    conn: Conn::Http1(tx),
                    proxied,
                    reused: false,
                })
            }
        })
    }
}

/// Make `req` ready for an HTTP/1.1 connection: `Host` from the URL (without the scheme's
/// default port) when it has none, and the request target in origin form, or absolute form
/// to an upstream proxy. Says whether `Host` was added.
fn to_http1(req: &mut Request<ProxyBody>, proxied: bool) -> bool {
    let mut set = false;
    if !req.headers().contains_key(header::HOST)
        && let Some(host) = host_header(req.uri())
    {
        req.headers_mut().insert(header::HOST, host);
        set = true;
    }
    if !proxied {
        let origin = match req.uri().path_and_query() {
            Some(pq) if pq.as_str() != "/" => {
                let mut parts = http::uri::Parts::default();
                parts.path_and_query = Some(pq.clone());
                Uri::from_parts(parts).ok()
            }
            _ => None,
        };
        *req.uri_mut() = origin.unwrap_or_else(|| Uri::from_static("/"));
    }
    set
}

/// `Host` for a URL: its host, and its port unless it is the scheme's default.
fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    match uri.port_u16() {
        Some(p) if p != default => HeaderValue::from_str(&format!("{host}:{p}")).ok(),
        _ => HeaderValue::from_str(host).ok(),
    }
}

impl Shared {
    /// An idle connection to `key`: the HTTP/2 one, else the HTTP/1.1 one used last that is
    /// still open and ready. Connections found closed or idle too long are dropped (closed).
    fn take(&self, key: &str) -> Option<Checked> {
        let mut idle = self.idle.lock();
        let entry = idle.get_mut(key)?;
        let now = Instant::now();
        if let Some((tx, used)) = &mut entry.http2 {
            if !tx.is_closed() {
                *used = now;
                return Some(Checked {
                    conn: Conn::Http2(tx.clone()),
                    proxied: false,
                    reused: true,
                });
            }
            entry.http2 = None;
        }
        let mut found = None;
        while let Some(p) = entry.http1.pop() {
            if p.tx.is_ready() && now.duration_since(p.since) < self.idle_timeout {
                found = Some(Checked {
                    conn: Conn::Http1(p.tx),
                    proxied: p.proxied,
                    reused: true,
                });
                break;
            }
        }
        if entry.is_empty() {
            idle.remove(key);
        }
        found
    }

    /// A request found no idle connection to `key`: whether it connects, or waits for the
    /// HTTP/2 connect under way (having waited for `waited_on` already, it waits for no
    /// other).
    fn begin(self: &Arc<Self>, key: &str, http2_only: bool, waited_on: Option<u64>) -> Begin {
        let mut idle = self.idle.lock();
        let entry = match idle.get_mut(key) {
            Some(e) if e.speaks_h2 || http2_only => e,
            None if http2_only => idle.entry(key.into()).or_default(),
            _ => return Begin::Connect(None),
        };
        if let Some(id) = entry.connecting_h2
            && waited_on.is_none_or(|w| w == id)
        {
            return Begin::Wait(id);
        }
        let id = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        entry.connecting_h2 = Some(id);
        Begin::Connect(Some(Attempt {
            shared: self.clone(),
            key: key.into(),
            id,
        }))
    }

    /// Share a new HTTP/2 connection to `key`, unless one that is open already is.
    fn add_http2(self: &Arc<Self>, key: Box<str>, tx: http2::SendRequest<ProxyBody>) {
        {
            let mut idle = self.idle.lock();
            let entry = idle.entry(key).or_default();
            entry.speaks_h2 = true;
            match &entry.http2 {
                Some((open, _)) if !open.is_closed() => return,
                _ => entry.http2 = Some((tx, Instant::now())),
            }
        }
        self.returned.notify_waiters();
        self.reap_later();
    }

    /// Put an HTTP/1.1 connection back, ready for the next request.
    fn park(self: &Arc<Self>, key: Box<str>, tx: http1::SendRequest<ProxyBody>, proxied: bool) {
        self.idle.lock().entry(key).or_default().http1.push(Parked {
            tx,
            proxied,
            since: Instant::now(),
        });
        self.returned.notify_waiters();
        self.reap_later();
    }

    /// Start, once, the task that closes connections idle past the timeout. It ends with the
    /// pool.
    fn reap_later(self: &Arc<Self>) {
        if self.reaping.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.reaping.store(false, Ordering::Relaxed);
            return;
        };
        let pool: Weak<Shared> = Arc::downgrade(self);
        let every = (self.idle_timeout / 6).max(Duration::from_millis(10));
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.reap();
            }
        });
    }

    /// Close the connections idle past the timeout, and those found closed.
    fn reap(&self) {
        let now = Instant::now();
        let timeout = self.idle_timeout;
        self.idle.lock().retain(|_, e| {
            e.http1
                .retain(|p| !p.tx.is_closed() && now.duration_since(p.since) < timeout);
            if e.http2
                .as_ref()
                .is_some_and(|(tx, used)| tx.is_closed() || now.duration_since(*used) >= timeout)
            {
                e.http2 = None;
            }
            // What was learned of an upstream goes with its last connection.
            !e.http1.is_empty() || e.http2.is_some() || e.connecting_h2.is_some()
        });
    }

    /// Let the shared HTTP/2 connection to `key` go, as when the upstream ends it, keeping
    /// what was learned of the upstream (for tests).
    #[cfg(test)]
    fn close_http2(&self, key: &str) {
        let gone = self.idle.lock().get_mut(key).and_then(|e| e.http2.take());
        assert!(gone.is_some(), "an HTTP/2 connection to close");
    }

    /// Idle connections to `key` (for tests).
    #[cfg(test)]
    fn idle(&self, key: &str) -> (usize, bool) {
        self.idle
            .lock()
            .get(key)
            .map_or((0, false), |e| (e.http1.len(), e.http2.is_some()))
    }
}

/// An HTTP/1.1 connection in use, to be put back when its exchange is over.
struct Back {
    shared: Arc<Shared>,
    key: Box<str>,
    tx: http1::SendRequest<ProxyBody>,
    proxied: bool,
}

impl Back {
    /// The exchange is over: park the connection once it is ready for another request (at
    /// once, as a rule: the connection was read to the end of the response), or let it go if
    /// it is closing.
    fn give_back(self) {
        if self.tx.is_closed() {
            return;
        }
        if self.tx.is_ready() {
            let Back {
                shared,
                key,
                tx,
                proxied,
            } = self;
            shared.park(key, tx, proxied);
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut back = self;
        runtime.spawn(async move {
            if back.tx.ready().await.is_ok() {
                let Back {
                    shared,
                    key,
                    tx,
                    proxied,
                } = back;
                shared.park(key, tx, proxied);
            }
        });
    }
}

type Sending = Pin<
    Box<dyn Future<Output = Result<Response<Incoming>, TrySendError<Request<ProxyBody>>>> + Send>,
>;

/// An HTTP/1.1 exchange that was handed to its connection and whose response head has not
/// come: what the caller's `finish` gets when the request is dropped at that point.
pub(crate) struct Abandoned {
    sending: Sending,
    back: Back,
}

impl Abandoned {
    /// The response head, with the body that puts the connection back when it ends or is
    /// dropped.
    pub(crate) async fn response(self) -> Result<Response<UpstreamBody>, Error> {
        let Abandoned { sending, back } = self;
        match sending.await {
            Ok(resp) => Ok(resp.map(|b| UpstreamBody {
                inner: Some(b),
                back: Some(back),
            })),
            Err(e) => Err(Error::send(e.into_error())),
        }
    }
}

/// An HTTP/1.1 request handed to its connection; see [`Client::request`].
struct InFlight<F: FnOnce(Abandoned)> {
    sending: Option<Sending>,
    back: Option<Back>,
    finish: Option<F>,
}

impl<F: FnOnce(Abandoned) + Unpin> Future for InFlight<F> {
    type Output = Result<Response<UpstreamBody>, TrySendError<Request<ProxyBody>>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(sending) = this.sending.as_mut() else {
            return Poll::Pending;
        };
        let out = std::task::ready!(sending.as_mut().poll(cx));
        this.sending = None;
        let back = this.back.take();
        Poll::Ready(out.map(|resp| {
            resp.map(|inner| UpstreamBody {
                inner: Some(inner),
                back,
            })
        }))
    }
}

impl<F: FnOnce(Abandoned)> Drop for InFlight<F> {
    fn drop(&mut self) {
        if let (Some(sending), Some(back), Some(finish)) =
            (self.sending.take(), self.back.take(), self.finish.take())
        {
            finish(Abandoned { sending, back });
        }
    }
}

/// An upstream response body; on HTTP/1.1 its connection goes back to the pool when it ends,
/// or, dropped before its end, once the rest is read ([`DRAIN_MAX_BYTES`]).
pub(crate) struct UpstreamBody {
    /// Taken only when dropped.
    inner: Option<Incoming>,
    back: Option<Back>,
}

impl From<Incoming> for UpstreamBody {
    fn from(inner: Incoming) -> Self {
        UpstreamBody {
            inner: Some(inner),
            back: None,
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let out = std::task::ready!(Pin::new(inner).poll_frame(cx));
        if out.is_none()
            && let Some(back) = self.back.take()
        {
            back.give_back();
        }
        Poll::Ready(out)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        let Some(back) = self.back.take() else {
            return;
        };
        let Some(inner) = self.inner.take() else {
            return back.give_back();
        };
        if inner.is_end_stream() {
            return back.give_back();
        }
        let short = inner
            .size_hint()
            .upper()
            .is_some_and(|n| n <= DRAIN_MAX_BYTES);
        let runtime = tokio::runtime::Handle::try_current();
        let Some(slot) = short.then(|| Draining::take(&back.shared)).flatten() else {
            // Dropped unread: hyper reads what has arrived and closes the connection if
            // the body is not over.
            drop(inner);
            return back.give_back();
        };
        let Ok(runtime) = runtime else {
            return;
        };
        runtime.spawn(async move {
            let _slot = slot;
            let mut inner = inner;
            let read = tokio::time::timeout(DRAIN_TIME, async {
                while let Some(frame) = inner.frame().await {
                    if frame.is_err() {
                        return false;
                    }
                }
                true
            });
            if let Ok(true) = read.await {
                back.give_back();
            }
        });
    }
}

/// One body counted in [`Shared::draining`] until dropped.
struct Draining(Arc<Shared>);

impl Draining {
    fn take(shared: &Arc<Shared>) -> Option<Draining> {
        if shared.draining.fetch_add(1, Ordering::Relaxed) >= DRAINING_MAX {
            shared.draining.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Draining(shared.clone()))
    }
}

impl Drop for Draining {
    fn drop(&mut self) {
        self.0.draining.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioIo;

    /// An upstream on 127.0.0.1 answering every request `delay` after its head, over
    /// HTTP/1.1, or with `http2` over HTTP/2 (h2c) and HTTP/1.1 both, as the first bytes say;
    /// it counts the connections it accepted and has open.
    struct Upstream {
        port: u16,
        accepted: Arc<AtomicUsize>,
        open: Arc<AtomicUsize>,
    }

    impl Upstream {
        async fn start(delay: Duration, http2: bool) -> Upstream {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let (a, o) = (accepted.clone(), open.clone());
            tokio::spawn(async move {
                loop {
                    let (sock, _) = listener.accept().await.unwrap();
                    a.fetch_add(1, Ordering::SeqCst);
                    o.fetch_add(1, Ordering::SeqCst);
                    let o = o.clone();
                    tokio::spawn(async move {
                        let svc =
                            hyper::service::service_fn(move |req: Request<Incoming>| async move {
                                tokio::time::sleep(delay).await;
                                let host = req
                                    .headers()
                                    .get(header::HOST)
                                    .map(|h| h.to_str().unwrap().to_string());
                                let body = format!(
                                    "{} {} host={host:?}",
                                    req.version() == http::Version::HTTP_2,
                                    req.uri()
                                );
                                Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                    Bytes::from(body),
                                )))
                            });
                        if http2 {
                            let server = crate::proxy::http::Server::new(Duration::from_secs(30));
                            let _ = server.serve(sock, svc).await;
                        } else {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(sock), svc)
                                .await;
                        }
                        o.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            });
            Upstream {
                port,
                accepted,
                open,
            }
        }

        fn url(&self, path: &str) -> Uri {
            format!("http://127.0.0.1:{}{path}", self.port)
                .parse()
                .unwrap()
        }

        fn key(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    fn get(uri: Uri) -> Request<ProxyBody> {
        let mut req = Request::new(crate::error::full(Bytes::new()));
        *req.uri_mut() = uri;
        req
    }

    async fn call<C: Connect>(client: &Client<C>, uri: Uri) -> String {
        let resp = client.request(get(uri), |_| {}).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Sequential requests go over one connection, in origin form with `Host`; between
    /// them it waits idle in the pool.
    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let up = Upstream::start(Duration::ZERO, false).await;
        let client = Client::new(HttpConnector::new(), false);
        for i in 0..3 {
            let body = call(&client, up.url(&format!("/v1/x?i={i}"))).await;
            assert_eq!(
                body,
                format!("false /v1/x?i={i} host=Some(\"127.0.0.1:{}\")", up.port)
            );
            assert_eq!(client.shared.idle(&up.key()), (1, false));
        }
        assert_eq!(up.accepted(), 1);
    }

    /// Requests at once each get a connection; later ones reuse those.
    #[tokio::test]
    async fn concurrent_requests_open_connections_that_later_requests_reuse() {
        let up = Upstream::start(Duration::from_millis(100), false).await;
        let client = Client::new(HttpConnector::new(), false);
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let (client, uri) = (client.clone(), up.url("/"));
                tokio::spawn(async move { call(&client, uri).await })
            })
            .collect();
        for c in calls {
            c.await.unwrap();
        }
        assert_eq!(up.accepted(), 4);
        assert_eq!(client.shared.idle(&up.key()), (4, false));
        for _ in 0..4 {
            call(&client, up.url("/")).await;
        }
        assert_eq!(up.accepted(), 4);
    }

    /// A connection the upstream closed while idle is not used: the next request connects
    /// again and succeeds.
    #[tokio::test]
    async fn a_connection_closed_while_idle_is_not_used() {
        let (port, accepted) = raw_upstream(|mut sock| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = [0u8; 1024];
            let _ = sock.read(&mut buf).await;
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            // Keep-alive as far as the client knows; closed a moment later.
            tokio::time::sleep(Duration::from_millis(20)).await;
        })
        .await;
        let client = Client::new(HttpConnector::new(), false);
        let uri: Uri = format!("http://127.0.0.1:{port}/").parse().unwrap();
        assert_eq!(call(&client, uri.clone()).await, "ok");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(call(&client, uri).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A connection idle past the timeout is closed, by the reaper, without any request.
    #[tokio::test]
    async fn idle_connections_are_closed_after_the_timeout() {
        let up = Upstream::start(Duration::ZERO, false).await;
        let client =
            Client::with_idle_timeout(HttpConnector::new(), false, Duration::from_millis(100));
        call(&client, up.url("/")).await;
        assert_eq!(up.open.load(Ordering::SeqCst), 1);
        for _ in 0..100 {
            if up.open.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            up.open.load(Ordering::SeqCst),
            0,
            "the idle connection was closed"
        );
        assert_eq!(client.shared.idle(&up.key()), (0, false));
    }

    /// A connector whose first connect is immediate and whose later ones take `later`, or
    /// never finish (`None`), as a connect at `max_connections_per_upstream` waits for a slot.
    #[derive(Clone)]
    struct FirstThen {
        http: HttpConnector,
        made: Arc<AtomicUsize>,
        later: Option<Duration>,
    }

    impl FirstThen {
        fn new(made: usize, later: Option<Duration>) -> Self {
            FirstThen {
                http: HttpConnector::new(),
                made: Arc::new(AtomicUsize::new(made)),
                later,
            }
        }
    }

    impl tower::Service<Uri> for FirstThen {
        type Response = TokioIo<tokio::net::TcpStream>;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, uri: Uri) -> Self::Future {
            let later = (self.made.fetch_add(1, Ordering::SeqCst) > 0).then_some(self.later);
            let connecting = self.http.call(uri);
            Box::pin(async move {
                match later {
                    Some(None) => std::future::pending().await,
                    Some(Some(wait)) => tokio::time::sleep(wait).await,
                    None => {}
                }
                connecting.await.map_err(Into::into)
            })
        }
    }

    /// A request that finds no idle connection and cannot connect takes one put back
    /// while it waits.
    #[tokio::test]
    async fn a_waiting_request_takes_a_connection_put_back() {
        let up = Upstream::start(Duration::from_millis(150), false).await;
        let client = Client::new(FirstThen::new(0, None), false);
        let first = {
            let (client, uri) = (client.clone(), up.url("/first"));
            tokio::spawn(async move { call(&client, uri).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        let second = tokio::time::timeout(Duration::from_secs(5), call(&client, up.url("/second")))
            .await
            .expect("the second request took the first one's connection");
        assert!(second.contains("/second"), "{second}");
        assert!(first.await.unwrap().contains("/first"));
        assert_eq!(up.accepted(), 1);
    }

    /// A connect that a connection put back overtook is not thrown away: it finishes in the
    /// background and its connection waits in the pool, open.
    #[tokio::test]
    async fn a_connect_overtaken_by_a_connection_put_back_joins_the_pool() {
        let up = Upstream::start(Duration::from_millis(50), false).await;
        let client = Client::new(FirstThen::new(0, Some(Duration::from_millis(200))), false);
        let first = {
            let (client, uri) = (client.clone(), up.url("/first"));
            tokio::spawn(async move { call(&client, uri).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(call(&client, up.url("/second")).await.contains("/second"));
        first.await.unwrap();
        assert_eq!(
            up.accepted(),
            1,
            "the second request took the first's connection"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(up.accepted(), 2);
        assert_eq!(
            up.open.load(Ordering::SeqCst),
            2,
            "the late connection stays open"
        );
        assert_eq!(client.shared.idle(&up.key()), (2, false));
    }

    /// A connection that says whether ALPN chose HTTP/2 (an h2c upstream stands in for TLS).
    struct SaysH2(TokioIo<tokio::net::TcpStream>, bool);

    impl Connection for SaysH2 {
        fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
            let c = self.0.connected();
            if self.1 { c.negotiated_h2() } else { c }
        }
    }

    impl hyper::rt::Read for SaysH2 {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: hyper::rt::ReadBufCursor<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
        }
    }

    impl hyper::rt::Write for SaysH2 {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
        }
    }

    /// Connects as ALPN would to an HTTP/2 upstream (HTTP/1.1 once `h2` is cleared); its
    /// first connect fails after `fail_first` when set. Counts its connects.
    #[derive(Clone)]
    struct AlpnH2 {
        http: HttpConnector,
        made: Arc<AtomicUsize>,
        fail_first: Option<Duration>,
        h2: Arc<AtomicBool>,
    }

    impl AlpnH2 {
        fn new(fail_first: Option<Duration>) -> Self {
            AlpnH2 {
                http: HttpConnector::new(),
                made: Arc::default(),
                fail_first,
                h2: Arc::new(AtomicBool::new(true)),
            }
        }
    }

    impl tower::Service<Uri> for AlpnH2 {
        type Response = SaysH2;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<SaysH2, BoxError>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, uri: Uri) -> Self::Future {
            let first = self.made.fetch_add(1, Ordering::SeqCst) == 0;
            let fail = self.fail_first.filter(|_| first);
            let connecting = self.http.call(uri);
            let h2 = self.h2.load(Ordering::SeqCst);
            Box::pin(async move {
                if let Some(after) = fail {
                    tokio::time::sleep(after).await;
                    return Err("refused, as the test has it".into());
                }
                let io = connecting.await?;
                Ok(SaysH2(io, h2))
            })
        }
    }

    async fn at_once<C: Connect>(client: &Client<C>, up: &Upstream, n: usize) -> Vec<String> {
        let calls: Vec<_> = (0..n)
            .map(|i| {
                let (client, uri) = (client.clone(), up.url(&format!("/b{i}")));
                tokio::spawn(async move {
                    let resp = client.request(get(uri), |_| {}).await?;
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    Ok::<_, Error>(String::from_utf8(body.to_vec()).unwrap())
                })
            })
            .collect();
        let mut out = Vec::new();
        for c in calls {
            out.push(match c.await.unwrap() {
                Ok(body) => body,
                Err(e) => format!("error: {e}"),
            });
        }
        out
    }

    /// In an HTTP/2-only pool, the first requests, all at once, share the one connection the
    /// first of them makes.
    #[tokio::test]
    async fn first_http2_requests_at_once_share_one_new_connection() {
        let up = Upstream::start(Duration::from_millis(50), true).await;
        let client = Client::new(HttpConnector::new(), true);
        let bodies = at_once(&client, &up, 8).await;
        assert!(
            bodies.iter().all(|b| b.starts_with("true http")),
            "{bodies:?}"
        );
        assert_eq!(up.accepted(), 1);
    }

    /// An upstream ALPN chose HTTP/2 for is remembered: when its connection is gone, the
    /// requests at once that find none share the next one.
    #[tokio::test]
    async fn an_upstream_known_to_speak_http2_is_reconnected_once_for_requests_at_once() {
        let up = Upstream::start(Duration::from_millis(50), true).await;
        let client = Client::new(AlpnH2::new(None), false);
        assert!(call(&client, up.url("/learn")).await.starts_with("true"));
        assert_eq!(up.accepted(), 1);
        // The connection goes (as on the upstream's GOAWAY), the knowledge stays.
        client.shared.close_http2(&up.key());
        let bodies = at_once(&client, &up, 8).await;
        assert!(
            bodies.iter().all(|b| b.starts_with("true http")),
            "{bodies:?}"
        );
        assert_eq!(up.accepted(), 2, "one new connection for the eight");
    }

    /// An upstream whose ALPN answer turned to HTTP/1.1 is no longer taken to speak HTTP/2:
    /// requests stop waiting for its connects.
    #[tokio::test]
    async fn an_upstream_that_turns_to_http1_is_no_longer_taken_for_http2() {
        let up = Upstream::start(Duration::from_millis(50), true).await;
        let alpn = AlpnH2::new(None);
        let client = Client::new(alpn.clone(), false);
        assert!(call(&client, up.url("/learn")).await.starts_with("true"));
        let known = |c: &Client<AlpnH2>| {
            c.shared
                .idle
                .lock()
                .get(&*up.key())
                .is_some_and(|e| e.speaks_h2)
        };
        assert!(known(&client));
        client.shared.close_http2(&up.key());
        alpn.h2.store(false, Ordering::SeqCst);
        let bodies = at_once(&client, &up, 4).await;
        assert!(bodies.iter().all(|b| b.starts_with("false")), "{bodies:?}");
        assert!(!known(&client), "HTTP/1.1 now");
    }

    /// Requests that waited for an HTTP/2 connect that failed connect themselves, at once,
    /// rather than wait for each other's.
    #[tokio::test]
    async fn requests_waiting_for_a_failed_http2_connect_connect_themselves() {
        let up = Upstream::start(Duration::from_millis(50), true).await;
        let client = Client::new(AlpnH2::new(Some(Duration::from_millis(100))), true);
        let bodies = at_once(&client, &up, 4).await;
        let failed = bodies.iter().filter(|b| b.starts_with("error")).count();
        assert_eq!(
            failed, 1,
            "only the request whose connect failed: {bodies:?}"
        );
        assert!(up.accepted() >= 1);
        // Afterwards one shared connection serves again.
        let before = up.accepted();
        assert!(
            at_once(&client, &up, 4)
                .await
                .iter()
                .all(|b| b.starts_with("true"))
        );
        assert_eq!(up.accepted(), before);
    }

    /// An HTTP/2-only pool shares one connection among requests at once, and sends the URL
    /// as `:authority`, with no `Host` header.
    #[tokio::test]
    async fn http2_requests_share_one_connection() {
        let up = Upstream::start(Duration::from_millis(50), true).await;
        let client = Client::new(HttpConnector::new(), true);
        call(&client, up.url("/warm")).await;
        let calls: Vec<_> = (0..8)
            .map(|i| {
                let (client, uri) = (client.clone(), up.url(&format!("/s{i}")));
                tokio::spawn(async move { call(&client, uri).await })
            })
            .collect();
        for (i, c) in calls.into_iter().enumerate() {
            let body = c.await.unwrap();
            assert!(
                body.starts_with(&format!("true http://127.0.0.1:{}/s{i}", up.port)),
                "{body}"
            );
            assert!(body.ends_with("host=None"), "{body}");
        }
        assert_eq!(up.accepted(), 1);
        assert_eq!(client.shared.idle(&up.key()), (0, true));
    }

    /// An HTTP/1.1 request dropped after it was sent is handed to `finish`; finished, its
    /// connection goes back to the pool and serves the next request.
    #[tokio::test]
    async fn an_abandoned_exchange_is_handed_over_and_its_connection_comes_back() {
        let up = Upstream::start(Duration::from_millis(100), false).await;
        let client = Client::new(HttpConnector::new(), false);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let abandoning = client.request(get(up.url("/abandoned")), move |a| {
            let _ = tx.send(a);
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(30), abandoning)
                .await
                .is_err(),
            "no answer yet"
        );
        let abandoned = rx.await.expect("handed to finish");
        let resp = abandoned.response().await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("/abandoned"));
        assert_eq!(client.shared.idle(&up.key()), (1, false));
        call(&client, up.url("/next")).await;
        assert_eq!(up.accepted(), 1);
    }

    /// An upstream on 127.0.0.1 that serves each connection it accepts with `serve`, and
    /// counts them.
    async fn raw_upstream<F, Fut>(serve: F) -> (u16, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (sock, _) = listener.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(sock));
            }
        });
        (port, accepted)
    }

    /// Answer each request on `sock` with a body of `length` bytes: its first half at once,
    /// the rest `later`.
    async fn answer_in_two_halves(mut sock: tokio::net::TcpStream, length: usize, later: Duration) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            seen.clear();
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n");
            let body = vec![b'x'; length];
            let (first, rest) = body.split_at(length / 2);
            if sock.write_all(head.as_bytes()).await.is_err()
                || sock.write_all(first).await.is_err()
            {
                return;
            }
            tokio::time::sleep(later).await;
            if sock.write_all(rest).await.is_err() {
                return;
            }
        }
    }

    /// A short body dropped midway is read to its end in the background, and its connection
    /// serves the next request; a long one goes with its connection.
    #[tokio::test]
    async fn a_body_dropped_midway_is_drained_when_short_and_its_connection_reused() {
        for (length, connections) in [(10, 1), (2 * DRAIN_MAX_BYTES as usize, 2)] {
            let (port, accepted) = raw_upstream(move |sock| {
                answer_in_two_halves(sock, length, Duration::from_millis(100))
            })
            .await;
            let client = Client::new(HttpConnector::new(), false);
            let uri: Uri = format!("http://127.0.0.1:{port}/").parse().unwrap();
            let resp = client.request(get(uri.clone()), |_| {}).await.unwrap();
            assert_eq!(resp.status(), 200);
            drop(resp);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let resp = client.request(get(uri), |_| {}).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), length);
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                connections,
                "a body of {length} bytes"
            );
        }
    }

    /// Dropped while connecting, a request hands nothing to `finish`: nothing was sent.
    #[tokio::test]
    async fn a_request_dropped_before_it_was_sent_is_not_finished() {
        let client = Client::new(FirstThen::new(1, None), false);
        let finished = Arc::new(AtomicBool::new(false));
        let f = finished.clone();
        let req = client.request(get("http://127.0.0.1:9/".parse().unwrap()), move |_| {
            f.store(true, Ordering::SeqCst);
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(30), req)
                .await
                .is_err()
        );
        assert!(!finished.load(Ordering::SeqCst));
    }
}
