//! An I/O wrapper that fails with `TimedOut` when no byte moves for a while, and counts bytes.
//! Wrapping the client side of a tunnel sees traffic in both directions.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// See the module docs.
pub(crate) struct IdleTimeout<'a, T> {
    inner: &'a mut T,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    read: u64,
    written: u64,
    /// The idle timer fired.
    idled: bool,
    /// The inner stream returned an error.
    failed: bool,
}

impl<'a, T> IdleTimeout<'a, T> {
    /// Wrap `inner`; the clock starts now.
    pub(crate) fn new(inner: &'a mut T, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            read: 0,
            written: 0,
            idled: false,
            failed: false,
        }
    }

    /// Bytes (read from, written to) the inner stream so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.read, self.written)
    }

    /// Whether the stream fell silent for the whole idle period (the error it then gave).
    pub(crate) fn idled(&self) -> bool {
        self.idled
    }

    /// Whether the inner stream itself failed (as opposed to the other side of a copy).
    pub(crate) fn failed(&self) -> bool {
        self.failed
    }

    fn progressed(&mut self) {
        self.timer.as_mut().reset(Instant::now() + self.idle);
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.idled = true;
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("idle for {:?}", self.idle),
                ))
            }
            Poll::Pending => Ok(()),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut *self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                self.read += n as u64;
                self.progressed();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                self.failed = true;
                Poll::Ready(Err(e))
            }
            Poll::Pending => match self.check(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut *self.inner).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                self.written += n as u64;
                self.progressed();
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => {
                self.failed = true;
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut *self.inner).poll_flush(cx);
        self.failed |= matches!(r, Poll::Ready(Err(_)));
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut *self.inner).poll_shutdown(cx);
        self.failed |= matches!(r, Poll::Ready(Err(_)));
        r
    }
}
