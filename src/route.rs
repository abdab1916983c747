//! Stage 3, route: match a request's destination to the first route that takes it.

use std::collections::BTreeMap;

use http::{HeaderName, Method};

use crate::strip::StripMode;
use crate::target::Target;

/// A host matcher: exact, or `*.suffix` for any subdomain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostMatch {
    /// Exact host, lowercase.
    Exact(String),
    /// Any host ending in `.suffix` (the suffix itself excluded).
    Subdomains(String),
}

impl HostMatch {
    /// Parse a configured host pattern.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let s = s.trim_start_matches('[').trim_end_matches(']').to_string();
        if s.is_empty() {
            return Err("host must not be empty".into());
        }
        if let Some(suffix) = s.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                return Err(format!("`{s}` is not a valid wildcard (use *.example.org)"));
            }
            return Ok(HostMatch::Subdomains(suffix.to_string()));
        }
        if s.contains('*') || s.contains('/') || s.contains(' ') {
            return Err(format!(
                "`{s}` is not a host name (a wildcard goes first: *.example.org)"
            ));
        }
        Ok(HostMatch::Exact(s))
    }

    /// Does this pattern match the host (lowercase)?
    pub(crate) fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h == host,
            HostMatch::Subdomains(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix.as_str())
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
        }
    }
}

/// The place in a request that carries a route's credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InjectInto {
    /// A header.
    Header(HeaderName),
    /// A field of the JSON or form body.
    BodyField(String),
}

/// How a route's credential is placed into the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InjectSpec {
    /// Where the credential goes.
    pub(crate) into: InjectInto,
    /// Text before `{token}`.
    pub(crate) prefix: String,
    /// Text after `{token}`.
    pub(crate) suffix: String,
}

impl InjectSpec {
    /// `authorization: Bearer {token}`.
    pub(crate) fn default_bearer() -> Self {
        InjectSpec {
            into: InjectInto::Header(http::header::AUTHORIZATION),
            prefix: "Bearer ".into(),
            suffix: String::new(),
        }
    }

    /// Parse a header name (or a body field) and a value template holding `{token}` once.
    pub(crate) fn parse(
        header: Option<&str>,
        body_field: Option<&str>,
        template: &str,
    ) -> Result<Self, String> {
        let into = match (header, body_field) {
            (Some(h), None) => InjectInto::Header(
                HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| format!("`{h}` is not a valid header name"))?,
            ),
            (None, Some(f)) if !f.is_empty() => InjectInto::BodyField(f.to_string()),
            (None, Some(_)) => return Err("`body_field` is empty".into()),
            _ => return Err("set exactly one of `header` and `body_field`".into()),
        };
        let Some((prefix, suffix)) = template.split_once("{token}") else {
            return Err("the value template must contain {token}".into());
        };
        if suffix.contains("{token}") {
            return Err("the value template must contain {token} once".into());
        }
        if template.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err("the value template has control characters".into());
        }
        Ok(InjectSpec {
            into,
            prefix: prefix.into(),
            suffix: suffix.into(),
        })
    }
}

/// A validated route.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// Route name.
    pub(crate) name: String,
    /// Host matcher.
    pub(crate) host: HostMatch,
    /// Required scheme, if any.
    pub(crate) scheme: Option<String>,
    /// Required port, if any.
    pub(crate) port: Option<u16>,
    /// Required path prefix, if any.
    pub(crate) path_prefix: Option<String>,
    /// Allowed methods; empty means any.
    pub(crate) methods: Vec<Method>,
    /// Credential injected on this route.
    pub(crate) credential: Option<String>,
    /// Where the credential goes.
    pub(crate) inject: InjectSpec,
    /// Purpose when the request names none.
    pub(crate) purpose_default: Option<String>,
    /// Labels handed to policy.
    pub(crate) labels: BTreeMap<String, String>,
    /// Token audience; default the destination origin.
    pub(crate) audience: Option<String>,
    /// RFC 8707 resource indicator for token endpoints.
    pub(crate) resource: Option<String>,
    /// Scopes for this route; `{purpose}` stands for the request's purpose.
    pub(crate) scopes: Vec<String>,
    /// Longest credential lifetime the route expects; longer ones are flagged.
    pub(crate) max_ttl: Option<std::time::Duration>,
    /// Strip mode override.
    pub(crate) strip: Option<StripMode>,
    /// Timeouts that replace the global ones on this route.
    pub(crate) timeouts: RouteTimeouts,
    /// SigV4 scope overrides, for an `aws` credential.
    pub(crate) sign: Option<SignScope>,
}

/// `routes[].sign`: what an `aws` credential signs for when the host does not say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SignScope {
    /// SigV4 signing name, where the host does not say.
    pub(crate) service: Option<String>,
    /// Region, where the host does not say.
    pub(crate) region: Option<String>,
}

/// A route's own timeouts; each absent one is the global one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RouteTimeouts {
    /// Connecting to the upstream.
    pub(crate) connect: Option<std::time::Duration>,
    /// From sending the request to the response head.
    pub(crate) response_head: Option<std::time::Duration>,
    /// Longest silence between two pieces of the response body.
    pub(crate) idle: Option<std::time::Duration>,
}

/// The placeholder for the request's purpose in a route's scopes.
pub(crate) const PURPOSE_PLACEHOLDER: &str = "{purpose}";

impl Route {
    /// The body field the route's credential goes into, when it has a credential and injects
    /// it into the body.
    pub(crate) fn body_field(&self) -> Option<&str> {
        match &self.inject.into {
            InjectInto::BodyField(f) if self.credential.is_some() => Some(f),
            _ => None,
        }
    }

    /// The scopes for one call: borrowed when they do not name the purpose, else expanded.
    pub(crate) fn scopes_for<'a>(&'a self, purpose: &str) -> std::borrow::Cow<'a, [String]> {
        if self.scopes.iter().any(|s| s.contains(PURPOSE_PLACEHOLDER)) {
            std::borrow::Cow::Owned(
                self.scopes
                    .iter()
                    .map(|s| s.replace(PURPOSE_PLACEHOLDER, purpose))
                    .collect(),
            )
        } else {
            std::borrow::Cow::Borrowed(&self.scopes)
        }
    }

    fn matches(&self, method: &Method, t: &Target) -> bool {
        self.host.matches(&t.host)
            && self.scheme.as_deref().is_none_or(|s| s == t.scheme)
            && self.port.is_none_or(|p| p == t.port)
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| t.path.starts_with(p))
            && (self.methods.is_empty() || self.methods.contains(method))
    }
}

/// The purpose a request serves: what the app said (`chaperone-purpose`), else the route's
/// default, else `unspecified`, so policy can always read one.
pub(crate) fn purpose<'a>(asked: Option<&'a str>, route: Option<&'a Route>) -> &'a str {
    asked
        .or(route.and_then(|r| r.purpose_default.as_deref()))
        .unwrap_or(crate::identify::UNSPECIFIED_PURPOSE)
}

/// The routes, in match order.
#[derive(Debug, Clone, Default)]
pub(crate) struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Build from validated routes.
    pub(crate) fn new(routes: Vec<Route>) -> Self {
        RouteTable { routes }
    }

    /// The first route that takes this request.
    pub(crate) fn find(&self, method: &Method, target: &Target) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(method, target))
    }

    /// The connect timeouts routes set for themselves.
    pub(crate) fn connect_timeouts(&self) -> Vec<std::time::Duration> {
        self.routes
            .iter()
            .filter_map(|r| r.timeouts.connect)
            .collect()
    }

    /// Does any route take requests for this host and port, over either scheme (a CONNECT
    /// tunnel may carry TLS or plain HTTP)?
    pub(crate) fn any_for(&self, host: &str, port: u16) -> bool {
        self.routes
            .iter()
            .any(|r| r.host.matches(host) && r.port.is_none_or(|p| p == port))
    }

    /// The first route that would inject a credential into HTTPS requests to this host and
    /// port: a CONNECT to it cannot be a blind tunnel.
    pub(crate) fn find_for_tunnel(&self, host: &str, port: u16) -> Option<&Route> {
        self.routes.iter().find(|r| {
            r.credential.is_some()
                && r.host.matches(host)
                && r.port.is_none_or(|p| p == port)
                && r.scheme.as_deref().is_none_or(|s| s == "https")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str) -> Route {
        Route {
            name: "r".into(),
            host: HostMatch::parse(host).unwrap(),
            scheme: None,
            port: None,
            path_prefix: Some("/v1/".into()),
            methods: vec![Method::POST],
            credential: None,
            inject: InjectSpec::default_bearer(),
            purpose_default: None,
            labels: BTreeMap::new(),
            audience: None,
            resource: None,
            scopes: vec![],
            max_ttl: None,
            strip: None,
            timeouts: Default::default(),
            sign: None,
        }
    }

    fn target(host: &str, path: &str) -> Target {
        Target {
            scheme: "http",
            host: host.into(),
            port: 80,
            path: path.into(),
            query: None,
        }
    }

    #[test]
    fn matching() {
        let t = RouteTable::new(vec![route("*.example.org")]);
        assert!(
            t.find(&Method::POST, &target("api.example.org", "/v1/x"))
                .is_some()
        );
        assert!(
            t.find(&Method::POST, &target("example.org", "/v1/x"))
                .is_none()
        );
        assert!(
            t.find(&Method::POST, &target("evilexample.org", "/v1/x"))
                .is_none()
        );
        assert!(
            t.find(&Method::GET, &target("api.example.org", "/v1/x"))
                .is_none()
        );
        assert!(
            t.find(&Method::POST, &target("api.example.org", "/v2/x"))
                .is_none()
        );
    }

    #[test]
    fn inject_template() {
        let s = InjectSpec::parse(Some("x-api-key"), None, "{token}").unwrap();
        assert_eq!((s.prefix.as_str(), s.suffix.as_str()), ("", ""));
        assert!(InjectSpec::parse(Some("authorization"), None, "Bearer").is_err());
        assert!(InjectSpec::parse(Some("bad header"), None, "{token}").is_err());
        let b = InjectSpec::parse(None, Some("api_key"), "{token}").unwrap();
        assert_eq!(b.into, InjectInto::BodyField("api_key".into()));
        assert!(InjectSpec::parse(Some("x"), Some("api_key"), "{token}").is_err());
        assert!(InjectSpec::parse(None, None, "{token}").is_err());
    }

    #[test]
    fn origin() {
        let mut t = target("api.example.org", "/");
        assert_eq!(t.origin(), "http://api.example.org");
        t.port = 8080;
        assert_eq!(t.origin(), "http://api.example.org:8080");
        t.host = "::1".into();
        assert_eq!(t.origin(), "http://[::1]:8080");
    }
}
