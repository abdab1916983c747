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

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::upstream::AmbiguousLength;

/// The longest line prefix kept: `transfer-encoding:` is 18 bytes.
const PREFIX: usize = 18;

/// The count a connection's reader keeps, shared with its service.
#[derive(Debug, Default)]
pub(crate) struct Heads {
    /// Blocks of lines seen with both headers.
    both: AtomicU64,
    /// The count when the last request was served.
    served: AtomicU64,
}

impl Heads {
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
        if let Poll::Ready(Ok(())) = &polled {
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
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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
