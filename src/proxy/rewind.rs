//! A stream with bytes already read put back in front of it: CONNECT reads the tunnel's first
//! byte to tell a TLS ClientHello from plain HTTP, and the HTTP server the first bytes of a
//! connection to tell its version ([`super::http`]), then hand the whole stream on.
//!
//! The read that returns the prefix also reads what the stream has ready behind it, so the
//! reader gets the prefix and the rest of, say, a request head at once, as it would have
//! without the peek: hyper sizes its buffer by what one read brings.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, with `prefix` read first.
pub(crate) struct Rewind<T> {
    prefix: Bytes,
    inner: T,
    /// An error met reading past the prefix, returned by the next read.
    failed: Option<io::Error>,
}

impl<T> Rewind<T> {
    pub(crate) fn new(prefix: Bytes, inner: T) -> Self {
        Rewind {
            prefix,
            inner,
            failed: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Err(e));
        }
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        if self.prefix.is_empty() && buf.remaining() > 0 {
            // Whatever is ready behind the prefix comes with it; nothing ready is no wait
            // (the prefix is this read's answer), and an error waits for the next read.
            if let Poll::Ready(Err(e)) = Pin::new(&mut self.inner).poll_read(cx, buf) {
                self.failed = Some(e);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn one_read_brings_the_prefix_and_what_is_ready_behind_it() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b" / HTTP/1.1\r\n").await.unwrap();
        let mut r = Rewind::new(Bytes::from_static(b"GET"), a);
        let mut got = [0u8; 64];
        let n = r.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"GET / HTTP/1.1\r\n");
        // Nothing ready behind it: the prefix alone, without waiting.
        let (a, _b) = tokio::io::duplex(64);
        let mut r = Rewind::new(Bytes::from_static(b"GET"), a);
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), r.read(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got[..n], b"GET");
    }

    /// A stream that fails every read.
    struct Broken;
    impl AsyncRead for Broken {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    #[tokio::test]
    async fn an_error_behind_the_prefix_comes_after_it() {
        let mut r = Rewind::new(Bytes::from_static(b"GET"), Broken);
        let mut got = [0u8; 16];
        let n = r.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"GET");
        let e = r.read(&mut got).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn the_prefix_comes_first_then_the_stream_both_ways() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut r = Rewind::new(Bytes::from_static(b"GE"), a);
        b.write_all(b"T / HTTP/1.1").await.unwrap();
        let mut got = [0u8; 14];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1");
        r.write_all(b"ok").await.unwrap();
        let mut back = [0u8; 2];
        b.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ok");
    }
}
