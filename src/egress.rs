//! How this process reaches the network: directly, or through an upstream proxy (a corporate
//! egress proxy, `upstream_proxy` in the config, DESIGN §9), with `no_proxy` naming what is
//! reached directly. Used by everything that connects out: the forward stage's upstream
//! client, blind CONNECT tunnels, and the token endpoints.
//!
//! Through the proxy, `https://` destinations (and blind tunnels) are reached with a CONNECT
//! tunnel (TLS stays end to end: the upstream's certificate is verified as before), and
//! `http://` ones by sending the request to the proxy in absolute form. Which destinations
//! skip the proxy follows curl's `NO_PROXY` conventions (names match their subdomains, IP
//! addresses and CIDR ranges, `*` for all), as implemented by hyper-util's proxy matcher, the
//! same code reqwest uses.
//!
//! The proxy then resolves names itself: the guardrails that check the address a name
//! resolves to (metadata, link-local) see only the proxy's address for proxied destinations;
//! names and IP literals are still checked by policy before anything is sent.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpStream;

use crate::error::BoxError;

/// Validated `upstream_proxy` settings.
#[derive(Clone)]
pub(crate) struct UpstreamProxy {
    /// `http://host:port` of the proxy.
    pub(crate) url: Uri,
    /// Destinations reached directly (curl's `NO_PROXY` entries).
    pub(crate) no_proxy: Vec<String>,
    /// `user:password` for the proxy (from `auth_file`), sent as Basic
    /// `Proxy-Authorization`.
    pub(crate) credentials: Option<SecretString>,
}

impl std::fmt::Debug for UpstreamProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamProxy")
            .field("url", &self.url)
            .field("no_proxy", &self.no_proxy)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The way out: direct, or through the upstream proxy for the destinations it covers.
/// Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Egress {
    via: Option<Arc<Via>>,
}

struct Via {
    matcher: Matcher,
    proxy: Uri,
    authorization: Option<HeaderValue>,
    tcp: HttpConnector,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.via {
            None => f.write_str("Egress::Direct"),
            Some(v) => write!(f, "Egress::Via({})", v.proxy),
        }
    }
}

impl Egress {
    /// Everything direct.
    pub(crate) fn direct() -> Egress {
        Egress::default()
    }

    /// Through `proxy`, except what its `no_proxy` names.
    pub(crate) fn new(proxy: Option<&UpstreamProxy>) -> Egress {
        let Some(p) = proxy else {
            return Egress::direct();
        };
        let url = p.url.to_string();
        let matcher = Matcher::builder()
            .http(url.as_str())
            .https(url.as_str())
            .no(p.no_proxy.join(","))
            .build();
        let authorization = p.credentials.as_ref().and_then(|c| {
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(c.expose_secret());
            let mut v = HeaderValue::from_str(&format!("Basic {token}")).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        Egress {
            via: Some(Arc::new(Via {
                matcher,
                proxy: p.url.clone(),
                authorization,
                tcp,
            })),
        }
    }

    /// The proxy `uri` goes through, if any.
    fn via(&self, uri: &Uri) -> Option<&Arc<Via>> {
        self.via
            .as_ref()
            .filter(|v| v.matcher.intercept(uri).is_some())
    }

    /// Whether connections to `scheme://authority` go through the upstream proxy (which then
    /// resolves the name itself).
    pub(crate) fn covers(&self, scheme: &str, authority: &str) -> bool {
        self.via.is_some()
            && format!("{scheme}://{authority}/")
                .parse::<Uri>()
                .is_ok_and(|u| self.via(&u).is_some())
    }

    /// The `Proxy-Authorization` an `http://` request to `uri` carries: it is sent to the
    /// proxy in absolute form, so the proxy reads its credentials from the request itself.
    pub(crate) fn authorization_for(&self, uri: &Uri) -> Option<HeaderValue> {
        if uri.scheme_str() != Some("http") {
            return None;
        }
        self.via(uri)?.authorization.clone()
    }

    /// A CONNECT tunnel to `host:port` through the proxy, for a blind tunnel of our own.
    /// `None` when the destination is reached directly.
    pub(crate) async fn tunnel(
        &self,
        host: &str,
        port: u16,
    ) -> Option<Result<TcpStream, BoxError>> {
        let uri = tunnel_uri(host, port)?;
        let via = self.via(&uri)?.clone();
        Some(async move { Ok(tunnel(&via, uri).await?.into_inner()) }.await)
    }

    /// Wrap a direct connector: connections to destinations the proxy covers go through it.
    pub(crate) fn connector<C>(&self, direct: C) -> Chain<C> {
        Chain {
            direct,
            egress: self.clone(),
        }
    }
}

/// The URI a tunnel to `host:port` is matched as.
fn tunnel_uri(host: &str, port: u16) -> Option<Uri> {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    format!("https://{host}:{port}/").parse().ok()
}

async fn tunnel(via: &Via, uri: Uri) -> Result<TokioIo<TcpStream>, BoxError> {
    let mut t = Tunnel::new(via.proxy.clone(), via.tcp.clone());
    if let Some(a) = &via.authorization {
        t = t.with_auth(a.clone());
    }
    tower::ServiceExt::oneshot(t, uri).await.map_err(|e| {
        Box::new(std::io::Error::other(format!(
            "through the upstream proxy {}: {e}",
            via.proxy
        ))) as BoxError
    })
}

/// A connector that goes through the upstream proxy where it applies; see [`Egress`].
#[derive(Clone)]
pub(crate) struct Chain<C> {
    direct: C,
    egress: Egress,
}

/// A connection made by [`Chain`]: to the destination (directly or tunnelled), or to the
/// proxy itself, which takes `http://` requests in absolute form.
pub(crate) struct Chained<T> {
    io: T,
    /// Connected to the proxy, not through a tunnel.
    to_proxy: bool,
    /// Kept for as long as the connection is open (a connection cap's slot).
    held: Option<Box<dyn Send + Sync>>,
}

impl<T> Chained<T> {
    fn new(io: T, to_proxy: bool) -> Self {
        Chained {
            io,
            to_proxy,
            held: None,
        }
    }

    /// Keep `guard` until this connection is dropped (closed).
    pub(crate) fn hold(&mut self, guard: impl Send + Sync + 'static) {
        self.held = Some(Box::new(guard));
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Chained<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chained")
            .field("io", &self.io)
            .field("to_proxy", &self.to_proxy)
            .finish()
    }
}

impl<C> tower::Service<Uri> for Chain<C>
where
    C: tower::Service<Uri, Response = TokioIo<TcpStream>>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = Chained<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let Some(via) = self.egress.via(&uri).cloned() else {
            let connecting = self.direct.call(uri);
            return Box::pin(async move {
                let io = connecting.await.map_err(Into::into)?;
                Ok(Chained::new(io, false))
            });
        };
        if uri.scheme_str() == Some("https") {
            return Box::pin(async move {
                let io = tunnel(&via, uri).await?;
                Ok(Chained::new(io, false))
            });
        }
        Box::pin(async move {
            let mut tcp = via.tcp.clone();
            let io = tower::Service::call(&mut tcp, via.proxy.clone())
                .await
                .map_err(|e| {
                    std::io::Error::other(format!(
                        "cannot connect to the upstream proxy {}: {e}",
                        via.proxy
                    ))
                })?;
            Ok(Chained::new(io, true))
        })
    }
}

impl<T: Connection> Connection for Chained<T> {
    fn connected(&self) -> Connected {
        // Through the proxy for `http://`: requests go in absolute form.
        self.io.connected().proxy(self.to_proxy)
    }
}

impl<T: Read + Unpin> Read for Chained<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Chained<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn via(no_proxy: &[&str]) -> Egress {
        Egress::new(Some(&UpstreamProxy {
            url: "http://proxy.corp.example:3128".parse().unwrap(),
            no_proxy: no_proxy.iter().map(|s| s.to_string()).collect(),
            credentials: Some(SecretString::from("svc:s3cret")),
        }))
    }

    #[test]
    fn no_proxy_follows_curl_conventions() {
        let e = via(&["internal.example", "10.0.0.0/8", "localhost"]);
        let through = |u: &str| e.via(&u.parse().unwrap()).is_some();
        assert!(through("https://api.openai.com/v1"));
        assert!(through("http://example.org/"));
        assert!(!through("https://internal.example/"));
        assert!(
            !through("https://models.internal.example/"),
            "subdomains too"
        );
        assert!(through("https://notinternal.example/"));
        assert!(!through("http://10.1.2.3:8000/"));
        assert!(!through("http://localhost:8080/"));
        let tunnelled =
            |e: &Egress, h: &str, p: u16| tunnel_uri(h, p).is_some_and(|u| e.via(&u).is_some());
        assert!(!tunnelled(&Egress::direct(), "api.openai.com", 443));
        assert!(tunnelled(&e, "api.openai.com", 443));
        assert!(!tunnelled(&e, "10.9.9.9", 5432));
    }

    #[test]
    fn proxy_credentials_go_only_on_proxied_http_requests_and_never_show() {
        let e = via(&["internal.example"]);
        let auth = e
            .authorization_for(&"http://example.org/".parse().unwrap())
            .unwrap();
        assert_eq!(auth, "Basic c3ZjOnMzY3JldA==");
        assert!(auth.is_sensitive());
        // https goes through a tunnel, whose CONNECT carries them; direct requests none.
        assert!(
            e.authorization_for(&"https://example.org/".parse().unwrap())
                .is_none()
        );
        assert!(
            e.authorization_for(&"http://internal.example/".parse().unwrap())
                .is_none()
        );
        let shown = format!(
            "{e:?} {:?}",
            UpstreamProxy {
                url: "http://p:1".parse().unwrap(),
                no_proxy: vec![],
                credentials: Some(SecretString::from("svc:s3cret")),
            }
        );
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
