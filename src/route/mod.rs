//! Stage 3, route: match a request's destination to the first route that takes it.
//!
//! `providers` is the catalog a route's `provider:` expands from (hosts, credential shape,
//! version headers of each vendor).

pub(crate) mod providers;

use std::collections::BTreeMap;

use http::{HeaderName, Method};

use crate::strip::StripMode;
use crate::target::Target;

/// A host matcher: exact; `*.suffix` for any subdomain; or one `*` inside a name standing
/// for part of one label (`bedrock-runtime.*.amazonaws.com`, `*-aiplatform.googleapis.com`),
/// the shape of regional endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostMatch {
    /// Exact host, lowercase.
    Exact(String),
    /// Any host ending in `.suffix` (the suffix itself excluded).
    Subdomains(String),
    /// `prefix`, then one or more characters other than `.`, then `suffix`.
    InLabel {
        /// Text before the `*`.
        prefix: String,
        /// Text after the `*`.
        suffix: String,
    },
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
        if s.contains(['/', ' ']) || (s.contains(':') && s.contains('*')) {
            return Err(format!("`{s}` is not a host name"));
        }
        if let Some((prefix, suffix)) = s.split_once('*') {
            // One `*` that leaves a dotted name on at least one side: a regional endpoint.
            if suffix.contains('*') || !(prefix.contains('.') || suffix.contains('.')) {
                return Err(format!(
                    "`{s}` is not a valid wildcard (use *.example.org, or one * within a label as in bedrock-runtime.*.amazonaws.com)"
                ));
            }
            return Ok(HostMatch::InLabel {
                prefix: prefix.to_string(),
                suffix: suffix.to_string(),
            });
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
            HostMatch::InLabel { prefix, suffix } => {
                host.len() > prefix.len() + suffix.len()
                    && host.starts_with(prefix.as_str())
                    && host.ends_with(suffix.as_str())
                    && !host[prefix.len()..host.len() - suffix.len()].contains('.')
            }
        }
    }
}

impl std::fmt::Display for HostMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostMatch::Exact(h) if h.contains(':') => write!(f, "[{h}]"),
            HostMatch::Exact(h) => f.write_str(h),
            HostMatch::Subdomains(s) => write!(f, "*.{s}"),
            HostMatch::InLabel { prefix, suffix } => write!(f, "{prefix}*{suffix}"),
        }
    }
}

/// The hosts a route takes: any of them matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hosts(pub(crate) Vec<HostMatch>);

impl Hosts {
    /// Does any pattern match the host (lowercase)?
    pub(crate) fn matches(&self, host: &str) -> bool {
        self.0.iter().any(|h| h.matches(host))
    }
}

impl std::fmt::Display for Hosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, h) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{h}")?;
        }
        Ok(())
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
    /// Host matchers.
    pub(crate) host: Hosts,
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
    /// The catalog entry the route was expanded from.
    pub(crate) provider: Option<&'static providers::Provider>,
    /// Headers added to the forwarded request when the app sent none of that name (the
    /// version headers a vendor requires).
    pub(crate) add_headers: Vec<(HeaderName, http::HeaderValue)>,
    /// An MCP server: its POSTs are read message by message.
    pub(crate) mcp: bool,
    /// On an MCP route, the scopes of each tool's calls (instead of `scopes`).
    pub(crate) tools: BTreeMap<String, Vec<String>>,
    /// Paths may hold encoded slashes and backslashes (`%2F`: GitLab's project ids).
    pub(crate) allow_encoded_slashes: bool,
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

/// Scopes with the purpose put in for its placeholder (borrowed when none names it).
fn expand<'a>(scopes: &'a [String], purpose: &str) -> std::borrow::Cow<'a, [String]> {
    if scopes.iter().any(|s| s.contains(PURPOSE_PLACEHOLDER)) {
        std::borrow::Cow::Owned(
            scopes
                .iter()
                .map(|s| s.replace(PURPOSE_PLACEHOLDER, purpose))
                .collect(),
        )
    } else {
        std::borrow::Cow::Borrowed(scopes)
    }
}

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
    /// On an MCP route, a POST calling tools the route lists gets those tools' scopes (all
    /// of them, for a batch) instead of the route's.
    pub(crate) fn scopes_for<'a>(
        &'a self,
        purpose: &str,
        tools: &[&str],
    ) -> std::borrow::Cow<'a, [String]> {
        let own: Vec<&Vec<String>> = tools.iter().filter_map(|t| self.tools.get(*t)).collect();
        let scopes = match own.as_slice() {
            [] => &self.scopes,
            [one] => *one,
            many => {
                let mut all: Vec<String> = many.iter().flat_map(|s| s.iter().cloned()).collect();
                all.sort_unstable();
                all.dedup();
                return std::borrow::Cow::Owned(expand(&all, purpose).into_owned());
            }
        };
        expand(scopes, purpose)
    }

    /// What the route takes and does, in one line (what `chaperone check` prints, so a
    /// `provider:` expansion can be read).
    pub(crate) fn describe(&self, signs: bool) -> String {
        let mut out = format!("route {}", self.name);
        if let Some(p) = self.provider {
            out.push_str(&format!(" (provider {})", p.name));
        }
        out.push_str(&format!(
            ": {}://{}",
            self.scheme.as_deref().unwrap_or("http(s)"),
            self.host
        ));
        if let Some(port) = self.port {
            out.push_str(&format!(" port {port}"));
        }
        if let Some(p) = &self.path_prefix {
            out.push_str(&format!(" {p}*"));
        }
        if !self.methods.is_empty() {
            let m: Vec<&str> = self.methods.iter().map(Method::as_str).collect();
            out.push_str(&format!(" [{}]", m.join(" ")));
        }
        match &self.credential {
            None => out.push_str("; no credential"),
            Some(c) if signs => {
                let s = self.sign.clone().unwrap_or_default();
                out.push_str(&format!(
                    "; credential {c} signs SigV4 (service {}, region {})",
                    s.service.as_deref().unwrap_or("from the host"),
                    s.region.as_deref().unwrap_or("from the host")
                ));
            }
            Some(c) => {
                let into = match &self.inject.into {
                    InjectInto::Header(h) => format!("{h}: "),
                    InjectInto::BodyField(f) => format!("body field {f} = "),
                };
                out.push_str(&format!(
                    "; credential {c} into {into}{}{{token}}{}",
                    self.inject.prefix, self.inject.suffix
                ));
            }
        }
        if !self.scopes.is_empty() {
            out.push_str(&format!("; scopes {}", self.scopes.join(" ")));
        }
        if self.mcp {
            out.push_str("; MCP");
        }
        for (tool, scopes) in &self.tools {
            out.push_str(&format!("; tool {tool} scopes {}", scopes.join(" ")));
        }
        for (k, v) in &self.add_headers {
            out.push_str(&format!(
                "; adds {k}: {} unless sent",
                v.to_str().unwrap_or("?")
            ));
        }
        out
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
            host: Hosts(vec![HostMatch::parse(host).unwrap()]),
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
            provider: None,
            add_headers: vec![],
            mcp: false,
            tools: BTreeMap::new(),
            allow_encoded_slashes: false,
        }
    }

    fn target(host: &str, path: &str) -> Target {
        Target::new("http", host.into(), 80, path.into())
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
    fn wildcards_within_a_label() {
        let h = HostMatch::parse("bedrock-runtime.*.amazonaws.com").unwrap();
        assert!(h.matches("bedrock-runtime.us-east-1.amazonaws.com"));
        assert!(!h.matches("bedrock-runtime.amazonaws.com"));
        assert!(
            !h.matches("bedrock-runtime.a.b.amazonaws.com"),
            "one label only"
        );
        assert!(!h.matches("bedrock-runtime.evil.com.amazonaws.com.evil"));
        let v = HostMatch::parse("*-aiplatform.googleapis.com").unwrap();
        assert!(v.matches("us-central1-aiplatform.googleapis.com"));
        assert!(!v.matches("aiplatform.googleapis.com"));
        assert!(!v.matches("evil.us-aiplatform.googleapis.com"));
        assert_eq!(v.to_string(), "*-aiplatform.googleapis.com");
        for bad in ["*", "a*b", "*.*.example.org", "x.*.*.y", "*.", "a b"] {
            assert!(HostMatch::parse(bad).is_err(), "{bad}");
        }
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
