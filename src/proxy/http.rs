//! The one HTTP server: every proxy listener, every intercepted connection, the admin
//! endpoint and the admission webhook serve through [`Server`], so header limits and timers
//! cannot drift apart between them.
//!
//! A connection is HTTP/2 when it opens with the prior-knowledge preface (RFC 9113 §3.4;
//! after TLS, a client that negotiated `h2` sends it too), else HTTP/1.1 with upgrades. The
//! first bytes are read here rather than by hyper-util's `auto` server because of what
//! happens next: its rewound stream hands hyper's HTTP/1 reader the preface-sized prefix
//! alone, and hyper, finding the rest of its 8 KiB buffer short for the next read, doubles
//! it. Every keep-alive connection then kept a 16 KiB read buffer for its life. Here the
//! rest of the request head comes in the same first read ([`Rewind`]), and the buffer stays
//! at 8 KiB (BENCHMARKS.md, issue 21, session 14).

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::drain::Drain;
use super::rewind::Rewind;

/// Largest request head (request line and headers) a client may send; more gets 431 on
/// HTTP/1.1, and a refused stream on HTTP/2 (its header list limit is the same size).
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The HTTP/2 connection preface a prior-knowledge client opens with.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection's server ends with.
pub(crate) type Error = Box<dyn StdError + Send + Sync>;

/// An HTTP/1.1 and HTTP/2 server with Chaperone's limits: a request head of at most
/// [`MAX_HEAD_BYTES`], read within `header_read` (also how long an idle keep-alive connection
/// is kept), and keep-alive on.
#[derive(Debug)]
pub(crate) struct Server {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

impl Server {
    pub(crate) fn new(header_read: Duration) -> Server {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(header_read)
            // The head's own limit: the buffer's alone is not one, since a read may bring
            // more than the buffer's limit at once, and a head parsed whole is then served.
            .max_header_size(MAX_HEAD_BYTES)
            .max_buf_size(MAX_HEAD_BYTES)
            .keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(MAX_HEAD_BYTES as u32);
        Server { h1, h2 }
    }

    /// Serve `io` with `svc`, in whichever version its first bytes say.
    pub(crate) fn serve<I, S>(&self, io: I, svc: S) -> Connection<'_, I, S>
    where
        S: HttpService<Incoming>,
    {
        Connection {
            state: State::Sniffing {
                io: Some(io),
                svc: Some(svc),
                buf: [0; 24],
                filled: 0,
                closing: false,
            },
            server: self,
        }
    }
}

/// A connection being served: a future that ends when the connection does.
pub(crate) struct Connection<'a, I, S>
where
    S: HttpService<Incoming>,
{
    state: State<I, S>,
    server: &'a Server,
}

type Io<I> = TokioIo<Rewind<I>>;

// The HTTP/1 state is most connections' state for their whole life: inline, not boxed.
#[expect(
    clippy::large_enum_variant,
    reason = "HTTP/1 is the common state and lasts the connection's life; a box would only add an allocation"
)]
enum State<I, S>
where
    S: HttpService<Incoming>,
{
    /// Reading up to the preface's length, to tell the version.
    Sniffing {
        io: Option<I>,
        svc: Option<S>,
        buf: [u8; 24],
        filled: usize,
        /// Shutdown began before the version was known: the connection closes.
        closing: bool,
    },
    H1(http1::UpgradeableConnection<Io<I>, S>),
    /// Boxed: an HTTP/2 server's state is several times an HTTP/1 one's, and every
    /// connection's task would otherwise be that size, idle HTTP/1.1 keep-alives included.
    H2(Pin<Box<http2::Connection<Io<I>, S, TokioExecutor>>>),
}

/// A client connection's stream, as the server takes it.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// What serves a connection's requests, as hyper's HTTP/1.1 and HTTP/2 servers both take it.
pub(crate) trait Service:
    HttpService<
        Incoming,
        ResBody: Body<Data: Send, Error: Into<Error>> + Send + 'static,
        Error: Into<Error>,
        Future: Send + 'static,
    > + Unpin
{
}

impl<S> Service for S where
    S: HttpService<
            Incoming,
            ResBody: Body<Data: Send, Error: Into<Error>> + Send + 'static,
            Error: Into<Error>,
            Future: Send + 'static,
        > + Unpin
{
}

impl<I: Stream, S: Service> Connection<'_, I, S> {
    /// Stop taking requests: finish those in flight, then close.
    pub(crate) fn graceful_shutdown(&mut self) {
        match &mut self.state {
            State::Sniffing { closing, .. } => *closing = true,
            State::H1(c) => Pin::new(c).graceful_shutdown(),
            State::H2(c) => c.as_mut().graceful_shutdown(),
        }
    }

    /// Serve until the connection ends or, once `drain` signals shutdown, until the requests
    /// in flight are done; the connection counts as active for `drain` until then.
    pub(crate) async fn until_drained(mut self, drain: &Arc<Drain>) -> Result<(), Error> {
        let _active = drain.enter();
        tokio::select! {
            r = &mut self => r,
            () = drain.signalled() => {
                self.graceful_shutdown();
                self.await
            }
        }
    }
}

impl<I: Stream, S: Service> Future for Connection<'_, I, S> {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let server = self.server;
        loop {
            match &mut self.state {
                State::Sniffing {
                    io,
                    svc,
                    buf,
                    filled,
                    closing,
                } => {
                    if *closing {
                        return Poll::Ready(Ok(()));
                    }
                    let stream = io.as_mut().expect("polled after the version was read");
                    let h2 = loop {
                        let before = *filled;
                        let mut rb = ReadBuf::new(&mut buf[before..]);
                        ready!(Pin::new(&mut *stream).poll_read(cx, &mut rb))?;
                        let n = rb.filled().len();
                        *filled += n;
                        // HTTP/2 only while every byte so far is the preface's.
                        if n == 0 || buf[before..*filled] != H2_PREFACE[before..*filled] {
                            break false;
                        }
                        if *filled == H2_PREFACE.len() {
                            break true;
                        }
                    };
                    let prefix = Bytes::copy_from_slice(&buf[..*filled]);
                    let io = TokioIo::new(Rewind::new(prefix, io.take().expect("taken once")));
                    let svc = svc.take().expect("taken once");
                    self.state = if h2 {
                        State::H2(Box::pin(server.h2.serve_connection(io, svc)))
                    } else {
                        State::H1(server.h1.serve_connection(io, svc).with_upgrades())
                    };
                }
                State::H1(c) => return Pin::new(c).poll(cx).map_err(Into::into),
                State::H2(c) => return c.as_mut().poll(cx).map_err(Into::into),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use std::convert::Infallible;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn hello(req: Request<Incoming>) -> Result<Response<String>, Infallible> {
        Ok(Response::new(format!("{:?} {}", req.version(), req.uri())))
    }

    /// A raw client on one end of a pipe, the server on the other.
    async fn exchange(sent: &[u8]) -> String {
        let (client, server_end) = tokio::io::duplex(256 * 1024);
        let server = Server::new(Duration::from_secs(5));
        let serving = tokio::spawn(async move {
            let svc = hyper::service::service_fn(hello);
            let _ = server.serve(server_end, svc).await;
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        wr.write_all(sent).await.unwrap();
        let mut got = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut got))
            .await
            .unwrap()
            .unwrap();
        drop((rd, wr));
        let _ = serving.await;
        String::from_utf8_lossy(&got[..n]).into_owned()
    }

    #[tokio::test]
    async fn http1_is_served_however_its_first_bytes_arrive() {
        let got = exchange(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(got.ends_with("HTTP/1.1 /a"), "{got}");
        // A line that starts like the preface, and is not.
        let got = exchange(b"PRI /b HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    }

    /// hyper's buffer limit alone lets a head through when a read brings it whole.
    #[tokio::test]
    async fn a_head_over_the_limit_is_refused_even_when_it_arrives_whole() {
        let mut head = b"GET / HTTP/1.1\r\nHost: x\r\nx-big: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        head.extend(b"\r\n\r\n");
        let got = exchange(&head).await;
        assert!(got.starts_with("HTTP/1.1 431"), "{got}");
        let mut head = b"GET / HTTP/1.1\r\nHost: x\r\nx-big: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES - 100));
        head.extend(b"\r\n\r\n");
        let got = exchange(&head).await;
        assert!(got.starts_with("HTTP/1.1 200"), "just under it: {got}");
    }

    #[tokio::test]
    async fn the_preface_serves_http2() {
        let (client, server_end) = tokio::io::duplex(64 * 1024);
        let server = Server::new(Duration::from_secs(5));
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(hello);
            let _ = server.serve(server_end, svc).await;
        });
        let (mut tx, conn) = hyper::client::conn::http2::handshake::<_, _, String>(
            TokioExecutor::new(),
            TokioIo::new(client),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let res = tx
            .send_request(Request::get("http://x/h2").body(String::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.version(), http::Version::HTTP_2);
        use http_body_util::BodyExt;
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"HTTP/2.0 http://x/h2");
    }

    #[tokio::test]
    async fn shutdown_before_the_first_byte_closes_the_connection() {
        let (_client, server_end) = tokio::io::duplex(1024);
        let server = Server::new(Duration::from_secs(5));
        let svc = hyper::service::service_fn(hello);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let drain = Drain::new(rx);
        let serving = server.serve(server_end, svc).until_drained(&drain);
        tokio::pin!(serving);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(
            serving.as_mut().poll(&mut cx).is_pending(),
            "waits for a first byte"
        );
        tx.send(true).unwrap();
        let done = tokio::time::timeout(Duration::from_secs(5), serving).await;
        assert!(matches!(done, Ok(Ok(()))), "{done:?}");
        assert!(drain.wait_idle(Duration::from_millis(10)).await);
    }
}
