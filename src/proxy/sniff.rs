//! What a CONNECT tunnel carries, told from its first bytes: a TLS ClientHello, an HTTP
//! request (HTTP/1.x request line, or HTTP/2's prior-knowledge preface), or some other
//! protocol. A protocol whose server speaks first (SMTP, MySQL) sends nothing from the app's
//! side; when the destination is already connected, its first bytes decide instead.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

/// What a tunnel's first bytes showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// A TLS record carrying a handshake message (RFC 8446 5.1).
    Tls,
    /// An HTTP/1.x request line or the HTTP/2 connection preface.
    Http,
    /// Neither.
    Other,
    /// The destination spoke first, before the app sent anything.
    ServerFirst,
}

/// The longest method an HTTP request line is taken to start with; a longer run of letters
/// is not HTTP.
const MAX_METHOD: usize = 20;

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Classify `buf`, or `None` when more bytes are needed to tell.
///
/// HTTP/1.x starts with a method, a token of upper-case letters (RFC 9110 9.1: methods are
/// case-sensitive and every registered one is upper-case), then a space; `PRI * HTTP/2.0`
/// (the HTTP/2 preface, RFC 9113 3.4) is such a line too.
pub(crate) fn classify(buf: &[u8]) -> Option<Seen> {
    let first = *buf.first()?;
    if first == TLS_HANDSHAKE {
        return Some(Seen::Tls);
    }
    for (i, &b) in buf.iter().enumerate().take(MAX_METHOD + 1) {
        match b {
            b' ' if i > 0 => return Some(Seen::Http),
            b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD => {}
            _ => return Some(Seen::Other),
        }
    }
    None
}

/// Read from the app's side of a tunnel until its first bytes tell what it carries, within
/// `within`; returns what was seen and the bytes read (to be put back). With `server`, the
/// destination already connected, a destination that speaks first decides before the app
/// sends anything.
pub(crate) async fn sniff<I>(
    io: &mut I,
    within: Duration,
    server: Option<&TcpStream>,
) -> Result<(Seen, Bytes), String>
where
    I: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(MAX_METHOD + 1);
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let empty = buf.is_empty();
        let server_first = async {
            match server {
                Some(s) => drop(s.readable().await),
                None => std::future::pending::<()>().await,
            }
        };
        let n = tokio::select! {
            biased;
            r = io.read_buf(&mut buf) => r.map_err(|e| format!("reading the tunnel failed: {e}"))?,
            () = server_first, if empty => return Ok((Seen::ServerFirst, Bytes::new())),
            () = tokio::time::sleep_until(deadline) => {
                if empty {
                    return Err(format!("the app sent nothing through the tunnel within {within:?}"));
                }
                return Ok((Seen::Other, buf.freeze()));
            }
        };
        if let Some(seen) = classify(&buf) {
            return Ok((seen, buf.freeze()));
        }
        if n == 0 {
            if buf.is_empty() {
                return Err("the app closed the tunnel without sending anything".into());
            }
            return Ok((Seen::Other, buf.freeze()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_tls_http_and_anything_else() {
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Seen::Tls));
        for line in [
            &b"GET / HTTP/1.1"[..],
            b"POST /v1",
            b"OPTIONS *",
            b"PROPFIND /d",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert_eq!(classify(line), Some(Seen::Http), "{line:?}");
        }
        // Not yet: a method still being read.
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"DELETE"), None);
        // Other protocols: SSH's banner, a PostgreSQL startup message, lower case, a line
        // starting with a space, a run of letters too long for a method.
        for other in [
            &b"SSH-2.0-OpenSSH_9.6"[..],
            &[0, 0, 0, 8, 4, 210, 22, 47],
            b"ping through the tunnel",
            b" GET /",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        ] {
            assert_eq!(classify(other), Some(Seen::Other), "{other:?}");
        }
    }

    #[tokio::test]
    async fn bytes_arriving_one_by_one_are_read_until_they_tell() {
        let (mut app, mut tunnel) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for b in b"POST /v1 HTTP/1.1\r\n" {
                app.write_all(&[*b]).await.unwrap();
                tokio::task::yield_now().await;
            }
            app
        });
        let (seen, read) = sniff(&mut tunnel, Duration::from_secs(5), None)
            .await
            .unwrap();
        assert_eq!(seen, Seen::Http);
        assert!(read.starts_with(b"POST "), "{read:?}");
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_server_that_speaks_first_decides_when_the_app_is_silent() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"220 smtp.example ESMTP\r\n").await.unwrap();
            s
        });
        let upstream = TcpStream::connect(addr).await.unwrap();
        let (_app, mut tunnel) = tokio::io::duplex(64);
        let (seen, read) = sniff(&mut tunnel, Duration::from_secs(5), Some(&upstream))
            .await
            .unwrap();
        assert_eq!(seen, Seen::ServerFirst);
        assert!(read.is_empty());
        drop(server.await.unwrap());
    }
}
