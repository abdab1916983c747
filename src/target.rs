//! Stage 1, accept: work out where a request is going from its request target.
//!
//! - absolute-form `http://host/path` (the app set `HTTP_PROXY`), and `https://host/path`
//!   from clients that send https URLs to the proxy instead of tunnelling (axios);
//! - origin-form `/path` with `Host` (reverse mode: the app's base URL or DNS points here);
//! - authority-form `host:port` (CONNECT), see [`connect_target`].

use http::header::HOST;
use http::request::Parts;
use http::uri::Authority;

use crate::error::{ErrorCode, Rejection};

/// Where a request is going, as the proxy understood it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// `http` or `https`.
    pub(crate) scheme: &'static str,
    /// Lowercase host name or IP literal (no brackets).
    pub(crate) host: String,
    /// Destination port.
    pub(crate) port: u16,
    /// Path without the query.
    pub(crate) path: String,
    /// Raw query, if any.
    pub(crate) query: Option<String>,
}

impl Target {
    /// The origin (`scheme://host[:port]`), default ports omitted; the default token audience.
    pub(crate) fn origin(&self) -> String {
        let default = matches!((self.scheme, self.port), ("http", 80) | ("https", 443));
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if default {
            format!("{}://{}", self.scheme, host)
        } else {
            format!("{}://{}:{}", self.scheme, host, self.port)
        }
    }
}

impl Target {
    /// The authority the upstream is asked for: brackets around IPv6 literals, and the port
    /// only when it is not the scheme's default (`Host` never carries a default port).
    pub(crate) fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = matches!((self.scheme, self.port), ("http", 80) | ("https", 443));
        if default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

fn bad(reason: impl Into<String>) -> Rejection {
    Rejection::new(ErrorCode::BadRequest, reason)
}

/// A host as the proxy names it everywhere (routes, policy, guardrails, the upstream URL):
/// lower-case, without brackets or a trailing dot, and an IP address in its one canonical
/// form, whichever of the forms resolvers accept the app wrote: `2130706433`, `127.1`,
/// `0x7f000001` and `0177.0.0.1` are all `127.0.0.1` (as `inet_aton` reads them), `0` is
/// `0.0.0.0`, and an IPv6 literal is compressed, an IPv4-mapped one (`::ffff:127.0.0.1`)
/// written as the IPv4 address it is. Otherwise a policy on `Destination::"127.0.0.1"` could
/// be passed by spelling the address another way.
pub(crate) fn normalize_host(h: &str) -> String {
    let h = h
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if h.contains(':') {
        return match h.parse::<std::net::Ipv6Addr>() {
            Ok(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => v6.to_string(),
            },
            Err(_) => h,
        };
    }
    match inet_aton(&h) {
        Some(v4) => v4.to_string(),
        None => h,
    }
}

/// An IPv4 address in any form `inet_aton` accepts: one to four parts, each decimal, octal
/// (leading `0`) or hexadecimal (`0x`), the last filling the remaining bytes.
fn inet_aton(s: &str) -> Option<std::net::Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for p in &parts {
        let (digits, radix) = if let Some(h) = p.strip_prefix("0x") {
            (h, 16)
        } else if p.len() > 1 && p.starts_with('0') {
            (&p[1..], 8)
        } else {
            (*p, 10)
        };
        if digits.is_empty() && radix != 16 || !digits.chars().all(|c| c.is_digit(radix)) {
            return None;
        }
        let v = if digits.is_empty() {
            0
        } else {
            u32::from_str_radix(digits, radix).ok()?
        };
        values.push(v);
    }
    let (last, head) = values.split_last()?;
    if head.iter().any(|&v| v > 255) {
        return None;
    }
    let room = 32 - 8 * head.len() as u32;
    if room < 32 && *last >> room != 0 {
        return None;
    }
    let mut n = 0u32;
    for (i, v) in head.iter().enumerate() {
        n |= v << (24 - 8 * i as u32);
    }
    Some(std::net::Ipv4Addr::from(n | last))
}

/// The host policy decides on: [`Target::host`], with `localhost` (and any `.localhost`
/// name, which resolvers answer with loopback, RFC 6761) as `127.0.0.1`.
pub(crate) fn policy_host(host: &str) -> &str {
    if host == "localhost" || host.ends_with(".localhost") {
        "127.0.0.1"
    } else {
        host
    }
}

/// Where a (non-CONNECT) request is going, and the URL userinfo if the app put one there:
/// from its request target, or, for a request decrypted from an intercepted tunnel, the
/// tunnel's `origin` (see [`intercepted_target`]).
pub(crate) fn resolve(
    parts: &Parts,
    origin: Option<&Target>,
) -> Result<(Target, Option<String>), Rejection> {
    match origin {
        Some(o) => Ok((intercepted_target(parts, o)?, None)),
        None => target(parts),
    }
}

/// The destination of a non-CONNECT request, and the URL userinfo if the app put one there.
pub(crate) fn target(parts: &Parts) -> Result<(Target, Option<String>), Rejection> {
    let uri = &parts.uri;
    let (scheme, authority, userinfo) = match uri.scheme_str() {
        // Absolute form. `https://` too: clients such as axios send https URLs to an HTTP
        // proxy this way instead of tunnelling (the app-to-proxy hop is plain, on loopback,
        // like every `http://` one), and the proxy makes the TLS connection itself.
        Some(scheme @ ("http" | "https")) => {
            let a = uri
                .authority()
                .ok_or_else(|| bad("absolute URL without a host"))?;
            let userinfo = a.as_str().rsplit_once('@').map(|(u, _)| u.to_string());
            let scheme = if scheme == "https" { "https" } else { "http" };
            (scheme, a.clone(), userinfo)
        }
        Some(other) => return Err(bad(format!("unsupported scheme `{other}`"))),
        None => {
            let host = parts
                .headers
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .ok_or_else(|| bad("origin-form request without a Host header"))?;
            let a: Authority = host.parse().map_err(|_| bad("malformed Host header"))?;
            if a.as_str().contains('@') {
                return Err(bad("malformed Host header"));
            }
            ("http", a, None)
        }
    };
    let host = normalize_host(authority.host());
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    Ok((
        Target {
            scheme,
            host,
            port: authority
                .port_u16()
                .unwrap_or(if scheme == "https" { 443 } else { 80 }),
            path: if uri.path().is_empty() {
                "/".into()
            } else {
                uri.path().to_string()
            },
            query: uri.query().map(str::to_owned),
        },
        userinfo,
    ))
}

/// The destination of a request served from a CONNECT tunnel to `origin`: always that host
/// and port, over the tunnel's scheme (`https` when its TLS was terminated here, `http` for
/// plain HTTP in the tunnel). A request naming another host is refused, so one CONNECT
/// authorization cannot carry requests for a different destination.
pub(crate) fn intercepted_target(parts: &Parts, origin: &Target) -> Result<Target, Rejection> {
    let named = match parts.uri.authority() {
        Some(a) => Some(a.host().to_string()),
        None => parts
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<Authority>().ok())
            .map(|a| a.host().to_string()),
    };
    if let Some(h) = named
        && normalize_host(&h) != origin.host
    {
        return Err(bad(format!(
            "the request names host `{h}`, but the tunnel was opened to `{}`",
            origin.host
        )));
    }
    Ok(Target {
        scheme: origin.scheme,
        host: origin.host.clone(),
        port: origin.port,
        path: if parts.uri.path().is_empty() {
            "/".into()
        } else {
            parts.uri.path().to_string()
        },
        query: parts.uri.query().map(str::to_owned),
    })
}

/// The destination of a CONNECT request (`host:port`, port required).
pub(crate) fn connect_target(parts: &Parts) -> Result<Target, Rejection> {
    let a = parts
        .uri
        .authority()
        .ok_or_else(|| bad("CONNECT needs host:port"))?;
    let port = a
        .port_u16()
        .ok_or_else(|| bad("CONNECT needs an explicit port"))?;
    if a.as_str().contains('@') {
        return Err(bad("CONNECT target must not carry userinfo"));
    }
    Ok(Target {
        scheme: if port == 443 { "https" } else { "tcp" },
        host: normalize_host(a.host()),
        port,
        path: String::new(),
        query: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, host: Option<&str>) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn absolute_form() {
        let (t, ui) = target(&parts("http://user:pw@API.Example.org:8080/v1/x?a=1", None)).unwrap();
        assert_eq!(t.host, "api.example.org");
        assert_eq!(t.port, 8080);
        assert_eq!(t.path, "/v1/x");
        assert_eq!(t.query.as_deref(), Some("a=1"));
        assert_eq!(ui.as_deref(), Some("user:pw"));
    }

    #[test]
    fn addresses_have_one_name_however_written() {
        for (written, canonical) in [
            ("2130706433", "127.0.0.1"),
            ("127.1", "127.0.0.1"),
            ("0x7f000001", "127.0.0.1"),
            ("0x7F.0.0.1", "127.0.0.1"),
            ("0177.0.0.1", "127.0.0.1"),
            ("127.0.0.1.", "127.0.0.1"),
            ("0", "0.0.0.0"),
            ("[::ffff:127.0.0.1]", "127.0.0.1"),
            ("[::FFFF:7f00:1]", "127.0.0.1"),
            ("[0:0:0:0:0:0:0:1]", "::1"),
            ("169.254.43518", "169.254.169.254"),
            ("Api.Example.Org.", "api.example.org"),
            ("1.example", "1.example"),
            ("256.1.1.1", "256.1.1.1"),
            ("1.2.3.4.5", "1.2.3.4.5"),
            ("08.1.1.1", "08.1.1.1"),
            ("4294967296", "4294967296"),
        ] {
            assert_eq!(normalize_host(written), canonical, "{written}");
        }
        assert_eq!(policy_host("localhost"), "127.0.0.1");
        assert_eq!(policy_host("app.localhost"), "127.0.0.1");
        assert_eq!(
            policy_host("localhost.example.org"),
            "localhost.example.org"
        );
    }

    #[test]
    fn origin_form_uses_host() {
        let (t, ui) = target(&parts("/v1/x", Some("[::1]:9000"))).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9000));
        assert!(ui.is_none());
        assert!(target(&parts("/v1/x", None)).is_err());
    }

    #[test]
    fn https_absolute_form_is_an_https_target() {
        let (t, _) = target(&parts("https://A.test/v1/x?q=1", None)).unwrap();
        assert_eq!(
            (t.scheme, t.host.as_str(), t.port),
            ("https", "a.test", 443)
        );
        assert_eq!(
            (t.path.as_str(), t.query.as_deref()),
            ("/v1/x", Some("q=1"))
        );
        let (t, _) = target(&parts("https://a.test:8443/", None)).unwrap();
        assert_eq!(t.port, 8443);
        assert_eq!(
            target(&parts("ftp://a.test/", None)).unwrap_err().code,
            ErrorCode::BadRequest
        );
    }
}
