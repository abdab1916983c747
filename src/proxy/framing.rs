//! What a client connection's reader watches: request heads (below), and the connection's
//! activity, so a connection that sends nothing, drips its first request, or sits idle with
//! nothing in flight is closed ([`serve_watched`]), whichever HTTP version it speaks.
//!
//! Request smuggling's first shape: a request head with both `Content-Length` and
//! `Transfer-Encoding`. hyper lets `Transfer-Encoding` win (RFC 9112 §6.3), drops
//! `Content-Length` before the service sees the request, and closes the connection after it;
//! nothing smuggled reaches an upstream, but the request itself would still be served. Such a
//! request is refused instead (400, as Envoy does), which needs what hyper no longer shows:
//! the head as sent.
//!
//! [`Watched`] wraps a client connection and reads the bytes hyper reads, line by line, with
//! a few bytes of state: a block of lines (up to a blank line) with both headers at line
//! starts is counted. When a request that still carries `Transfer-Encoding` reaches the
//! service and the count has grown since the last request, the request is marked
//! `AmbiguousLength` for the pipeline to refuse. A body that holds such a block of lines
//! can only mark a chunked request that follows it on the same connection: the cost of a
//! false alarm falls on the client that wrote both.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::upstream::AmbiguousLength;

/// The longest line prefix kept: `transfer-encoding:` is 18 bytes.
const PREFIX: usize = 18;

/// What a connection's reader keeps, shared with its service.
#[derive(Debug)]
pub(crate) struct Heads {
    /// Blocks of lines seen with both headers.
    both: AtomicU64,
    /// The count when the last request was served.
    served: AtomicU64,
    /// When the connection was accepted.
    start: Instant,
    /// Milliseconds after `start` of the last byte read or written.
    last_io: AtomicU64,
    /// Requests handed to the service so far.
    requests: AtomicU64,
    /// Requests whose service call has not returned yet.
    in_flight: AtomicU64,
}

impl Default for Heads {
    fn default() -> Self {
        Heads {
            both: AtomicU64::new(0),
            served: AtomicU64::new(0),
            start: Instant::now(),
            last_io: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        }
    }
}

/// A request in the service; counted in flight until dropped.
pub(crate) struct InFlight(Arc<Heads>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Heads {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_io.store(ms, Ordering::Relaxed);
    }

    /// A request reached the service: it is in flight until the guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Mark `req` when its head was one of the ambiguous ones.
    pub(crate) fn mark<B>(&self, req: &mut http::Request<B>) {
        let now = self.both.load(Ordering::Acquire);
        let before = self.served.swap(now, Ordering::AcqRel);
        if now > before && req.headers().contains_key(http::header::TRANSFER_ENCODING) {
            req.extensions_mut().insert(AmbiguousLength);
        }
    }
}

/// A client connection whose incoming lines are watched for ambiguous heads.
pub(crate) struct Watched<I> {
    inner: I,
    heads: Arc<Heads>,
    /// The current line's first bytes, lower-cased.
    line: [u8; PREFIX],
    len: usize,
    /// The current line has more bytes than `line` keeps.
    long: bool,
    content_length: bool,
    transfer_encoding: bool,
}

impl<I> Watched<I> {
    /// Watch `inner`; the count is read through the returned [`Heads`].
    pub(crate) fn new(inner: I) -> (Self, Arc<Heads>) {
        let heads = Arc::new(Heads::default());
        (
            Watched {
                inner,
                heads: heads.clone(),
                line: [0; PREFIX],
                len: 0,
                long: false,
                content_length: false,
                transfer_encoding: false,
            },
            heads,
        )
    }

    fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            // The line's first bytes are kept; the rest of it is skipped to its end.
            let end = memchr::memchr(b'\n', bytes);
            let upto = end.unwrap_or(bytes.len());
            for &b in &bytes[..upto] {
                if self.len < PREFIX {
                    self.line[self.len] = b.to_ascii_lowercase();
                    self.len += 1;
                } else {
                    self.long = true;
                    break;
                }
            }
            let Some(end) = end else { return };
            self.end_line();
            bytes = &bytes[end + 1..];
        }
    }

    fn end_line(&mut self) {
        let line = &self.line[..self.len];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() && !self.long {
            if self.content_length && self.transfer_encoding {
                self.heads.both.fetch_add(1, Ordering::AcqRel);
            }
            self.content_length = false;
            self.transfer_encoding = false;
        } else if line.starts_with(b"content-length:") {
            self.content_length = true;
        } else if line.starts_with(b"transfer-encoding:") {
            self.transfer_encoding = true;
        }
        self.len = 0;
        self.long = false;
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled
            && buf.filled().len() > before
        {
            this.heads.touch();
            this.scan(&buf.filled()[before..]);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled
            && *n > 0
        {
            self.heads.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled
            && *n > 0
        {
            self.heads.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why a connection was closed by [`serve_watched`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// No request arrived within `header_read` of the connection opening (nothing sent, or
    /// an HTTP/2 preface or first head dripped slower than that).
    Silent,
    /// Nothing in flight and no byte either way for `header_read`.
    Idle,
}

impl Closed {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Closed::Silent => "silent",
            Closed::Idle => "idle",
        }
    }
}

/// Serve `conn` (the HTTP server's future over a [`Watched`] stream), closing it when its
/// first request has not arrived within `header_read`, or when it has nothing in flight and
/// has been silent both ways for `header_read` (hyper keeps the second promise itself for
/// HTTP/1.1, not for HTTP/2, whose pings keep a connection open). `Err` says why it was
/// closed; otherwise the server's own result.
pub(crate) async fn serve_watched<F, T>(
    conn: F,
    heads: &Heads,
    header_read: Duration,
) -> Result<T, Closed>
where
    F: std::future::Future<Output = T>,
{
    tokio::pin!(conn);
    let mut deadline = tokio::time::Instant::from_std(heads.start) + header_read;
    loop {
        tokio::select! {
            out = conn.as_mut() => return Ok(out),
            () = tokio::time::sleep_until(deadline) => {
                if heads.requests.load(Ordering::Acquire) == 0 {
                    return Err(Closed::Silent);
                }
                let last = heads.start + Duration::from_millis(heads.last_io.load(Ordering::Relaxed));
                let quiet_until = tokio::time::Instant::from_std(last) + header_read;
                if heads.in_flight.load(Ordering::Acquire) == 0
                    && tokio::time::Instant::now() >= quiet_until
                {
                    return Err(Closed::Idle);
                }
                deadline = quiet_until.max(tokio::time::Instant::now() + header_read / 4);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(chunks: &[&[u8]]) -> u64 {
        let (mut w, heads) = Watched::new(());
        for c in chunks {
            w.scan(c);
        }
        heads.both.load(Ordering::Acquire)
    }

    #[test]
    fn both_headers_in_one_head_are_counted_however_split() {
        let head = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\ncontent-LENGTH: 5\r\n\r\n";
        assert_eq!(count(&[head]), 1);
        for cut in 1..head.len() {
            assert_eq!(count(&[&head[..cut], &head[cut..]]), 1, "{cut}");
        }
        // Bare LF line ends too.
        assert_eq!(
            count(&[b"POST / HTTP/1.1\nContent-Length: 1\nTransfer-Encoding: chunked\n\n"]),
            1
        );
    }

    #[test]
    fn one_header_or_separate_heads_are_not() {
        assert_eq!(
            count(&[b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"]),
            0
        );
        assert_eq!(
            count(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]),
            0
        );
        assert_eq!(
            count(&[
                b"POST /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ]),
            0,
            "one in each of two heads"
        );
        // A header whose name only starts like one of them.
        assert_eq!(
            count(&[
                b"POST / HTTP/1.1\r\nContent-Length-X: 1\r\nX-Transfer-Encoding: chunked\r\n\r\n"
            ]),
            0
        );
    }

    #[test]
    fn only_a_chunked_request_after_an_ambiguous_head_is_marked() {
        let heads = Heads::default();
        let req = |te: bool| {
            let mut b = http::Request::builder();
            if te {
                b = b.header("transfer-encoding", "chunked");
            }
            b.body(()).unwrap()
        };
        let mut r = req(true);
        heads.mark(&mut r);
        assert!(r.extensions().get::<AmbiguousLength>().is_none());
        heads.both.fetch_add(1, Ordering::AcqRel);
        let mut r = req(true);
        heads.mark(&mut r);
        assert!(r.extensions().get::<AmbiguousLength>().is_some());
        let mut r = req(true);
        heads.mark(&mut r);
        assert!(r.extensions().get::<AmbiguousLength>().is_none(), "once");
        heads.both.fetch_add(1, Ordering::AcqRel);
        let mut r = req(false);
        heads.mark(&mut r);
        assert!(r.extensions().get::<AmbiguousLength>().is_none());
    }
}
