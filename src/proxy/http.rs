//! The one HTTP server builder: every proxy listener, every intercepted connection and the
//! admission webhook serve through [`builder`], so header limits and timers cannot drift
//! apart between them.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

/// Largest request head (request line and headers) a client may send; more gets 431 on
/// HTTP/1.1, and a refused stream on HTTP/2 (its header list limit is the same size).
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// An HTTP/1.1 and HTTP/2 server with Chaperone's limits: a request head of at most
/// [`MAX_HEAD_BYTES`], read within `header_read` (also how long an idle keep-alive connection
/// is kept), and keep-alive on.
pub(crate) fn builder(header_read: Duration) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32);
    b
}
