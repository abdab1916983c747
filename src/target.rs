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
    /// Path without the query, normalised ([`normalize_path`]): what routes, policy, the
    /// line and minted tokens see.
    pub(crate) path: String,
    /// Raw query, if any.
    pub(crate) query: Option<String>,
    /// The path as forwarded, when it is not `path`: the app's own bytes with dot segments
    /// resolved (percent-encodings kept as sent, so a signature over them still holds).
    pub(crate) wire_path: Option<String>,
    /// The path holds an encoded slash or backslash (`%2F`, `%5C`, `\`), which servers read
    /// differently; refused unless the route allows them.
    pub(crate) encoded_separators: bool,
}

impl Target {
    /// A target with `path` as given (already normal).
    pub(crate) fn new(scheme: &'static str, host: String, port: u16, path: String) -> Target {
        Target {
            scheme,
            host,
            port,
            path,
            query: None,
            wire_path: None,
            encoded_separators: false,
        }
    }

    /// The path as it goes upstream.
    pub(crate) fn wire_path(&self) -> &str {
        self.wire_path.as_deref().unwrap_or(&self.path)
    }

    /// Set the path from a request's raw path: normalised for everyone, and the bytes to
    /// forward when they differ.
    fn with_raw_path(mut self, raw: &str) -> Result<Target, Rejection> {
        let raw = if raw.is_empty() { "/" } else { raw };
        let n = normalize_path(raw).map_err(bad)?;
        self.path = n.path;
        self.wire_path = n.wire.filter(|w| w != &self.path);
        self.encoded_separators = n.encoded_separators;
        Ok(self)
    }

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
    // The common spellings, already canonical, cost no parse: a lower-case name that does
    // not start with a digit (no inet_aton form does not), and a dotted quad as Rust reads
    // one (strictly four decimal parts, no leading zeros: the canonical form).
    let b = h.as_bytes();
    if b.first().is_some_and(u8::is_ascii_lowercase)
        && !b.ends_with(b".")
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.'))
        && !h.starts_with("0x")
    {
        return h.to_string();
    }
    if h.parse::<std::net::Ipv4Addr>().is_ok() {
        return h.to_string();
    }
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

/// A path as everyone after the target stage sees it, and as it is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NormalPath {
    /// For routes, policy and the line: unreserved characters decoded, other
    /// percent-encodings in upper case, dot segments removed (RFC 3986 §6.2.2, §5.2.4).
    pub(crate) path: String,
    /// The bytes to forward when dot segments were removed: the app's own segments (and
    /// percent-encodings) otherwise as sent.
    pub(crate) wire: Option<String>,
    /// An encoded `/` or `\` (or a bare `\`) in a segment.
    pub(crate) encoded_separators: bool,
}

/// Normalise a request path, so that a route's `path_prefix` and a policy's `context.path`
/// cannot be passed by spelling a path another way: `/public/../private/keys`,
/// `/public/%2e%2e/private`, `/%70rivate` are all `/private/...`. A NUL (`%00`) is refused.
pub(crate) fn normalize_path(raw: &str) -> Result<NormalPath, String> {
    if !raw.starts_with('/') {
        // `*` (OPTIONS) and the like: nothing to resolve.
        return Ok(NormalPath {
            path: raw.to_string(),
            wire: None,
            encoded_separators: false,
        });
    }
    let mut encoded_separators = false;
    // Each segment as policy sees it and as it was sent.
    let mut out: Vec<(String, &str)> = Vec::new();
    let segments: Vec<&str> = raw[1..].split('/').collect();
    let mut dots = false;
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        let norm = normal_segment(seg, &mut encoded_separators)?;
        match norm.as_str() {
            "." | ".." => {
                dots = true;
                if norm == ".." {
                    out.pop();
                }
                // A dot segment at the end leaves the path ending in `/`.
                if i == last {
                    out.push((String::new(), ""));
                }
            }
            _ => out.push((norm, seg)),
        }
    }
    let join = |f: &dyn Fn(&(String, &str)) -> String| {
        let mut p = String::with_capacity(raw.len());
        for s in &out {
            p.push('/');
            p.push_str(&f(s));
        }
        if p.is_empty() {
            p.push('/');
        }
        p
    };
    let path = join(&|(n, _)| n.clone());
    let wire = dots.then(|| join(&|(_, w)| (*w).to_string()));
    Ok(NormalPath {
        path,
        wire,
        encoded_separators,
    })
}

/// One segment: `%XX` of an unreserved character decoded, other `%xx` upper-cased.
fn normal_segment(seg: &str, encoded_separators: &mut bool) -> Result<String, String> {
    let b = seg.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' {
            *encoded_separators = true;
        }
        if c == b'%'
            && let Some(hex) = seg.get(i + 1..i + 3)
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            match v {
                0 => return Err("the request path holds an encoded NUL (%00)".into()),
                b'/' | b'\\' => *encoded_separators = true,
                _ => {}
            }
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                out.push(v);
            } else {
                out.push(b'%');
                out.extend_from_slice(hex.to_ascii_uppercase().as_bytes());
            }
            i += 3;
            continue;
        }
        out.push(c);
        i += 1;
    }
    // Only ASCII bytes were put in for ASCII bytes taken out: still UTF-8.
    Ok(String::from_utf8(out)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
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
    let port = authority
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    let mut t = Target::new(scheme, host, port, String::new()).with_raw_path(uri.path())?;
    t.query = uri.query().map(str::to_owned);
    Ok((t, userinfo))
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
    let mut t = Target::new(
        origin.scheme,
        origin.host.clone(),
        origin.port,
        String::new(),
    )
    .with_raw_path(parts.uri.path())?;
    t.query = parts.uri.query().map(str::to_owned);
    Ok(t)
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
    Ok(Target::new(
        if port == 443 { "https" } else { "tcp" },
        normalize_host(a.host()),
        port,
        String::new(),
    ))
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
    fn paths_have_one_spelling_for_routes_and_policy() {
        let n = |p: &str| normalize_path(p).unwrap();
        for (raw, path, wire) in [
            ("/v1/chat/completions", "/v1/chat/completions", None),
            (
                "/public/../private/keys",
                "/private/keys",
                Some("/private/keys"),
            ),
            (
                "/public/%2e%2e/private/keys",
                "/private/keys",
                Some("/private/keys"),
            ),
            ("/public/%2E%2E/%70rivate", "/private", Some("/%70rivate")),
            ("/public/./x", "/public/x", Some("/public/x")),
            ("/a/b/..", "/a/", Some("/a/")),
            ("/../../etc/passwd", "/etc/passwd", Some("/etc/passwd")),
            ("/%7Euser/%3a%41", "/~user/%3AA", None),
            (
                "/model/anthropic.claude-v2%3A1/invoke",
                "/model/anthropic.claude-v2%3A1/invoke",
                None,
            ),
            ("/", "/", None),
            ("//double", "//double", None),
        ] {
            let got = n(raw);
            assert_eq!(got.path, path, "{raw}");
            assert_eq!(got.wire.as_deref(), wire, "{raw}");
            assert!(!got.encoded_separators, "{raw}");
        }
        for ambiguous in [
            "/api/v4/projects/group%2Fproject",
            "/a%5cb",
            "/a\\b",
            "/x%2f..",
        ] {
            assert!(n(ambiguous).encoded_separators, "{ambiguous}");
        }
        assert!(normalize_path("/file%00.txt").is_err());
        assert_eq!(n("*").path, "*");
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
