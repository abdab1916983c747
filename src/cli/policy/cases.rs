//! Deciding requests without sending them: `chaperone policy eval` and `policy test`.
//!
//! A what-if request goes through the same steps as a real one up to the decision: route
//! match, purpose (header, else the route's default, else `unspecified`), guardrails, then
//! the policy, with the identity of the chosen stage. Nothing is sent, minted or logged.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use http::Method;
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, parse_yaml};
use crate::identify::Identity;
use crate::policy::{GuardrailHit, Guardrails, PolicyDecision, PolicyEngine, PolicyInput};
use crate::route::RouteTable;
use crate::target::Target;

/// One request to decide: the arguments of `policy eval` (clap), or one case of a CASES
/// file (serde).
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub(crate) struct WhatIf {
    /// What the case shows, printed with its result.
    #[serde(default)]
    #[arg(skip)]
    pub(crate) name: Option<String>,
    /// HTTP method, or `CONNECT` for a blind tunnel (then `url` may be `host:port`).
    #[arg(long, default_value = "GET")]
    pub(crate) method: String,
    /// Absolute URL (`http://` or `https://`; for https this is the request as seen inside
    /// the intercepted tunnel).
    #[arg(long)]
    pub(crate) url: String,
    /// Purpose the app names (`chaperone-purpose`); absent: the route's default.
    #[serde(default)]
    #[arg(long)]
    pub(crate) purpose: Option<String>,
    /// Stage whose listener the request arrives on (`stages[].name`); absent: the main
    /// identity.
    #[serde(default)]
    #[arg(long)]
    pub(crate) stage: Option<String>,
    /// Override the identity's environment, to ask "what if prod called this?".
    #[serde(default)]
    #[arg(long)]
    pub(crate) environment: Option<String>,
    /// Override the principal id (SPIFFE ID or service account).
    #[serde(default)]
    #[arg(long)]
    pub(crate) principal: Option<String>,
    /// Client address; default 127.0.0.1 (the app in the same pod).
    #[serde(default)]
    #[arg(long)]
    pub(crate) client: Option<IpAddr>,
    /// The address the destination resolves to (`context.address`); default: the URL's host
    /// when it is an IP literal, else absent.
    #[serde(default)]
    #[arg(long)]
    pub(crate) address: Option<IpAddr>,
    /// Request time, RFC 3339 (`2026-11-24T09:00:00Z`); default now.
    #[serde(default)]
    #[arg(long)]
    pub(crate) time: Option<String>,
    /// Types of embedded secrets the request carried (`context.stripped_types`); repeat
    /// the flag for several.
    #[serde(default)]
    #[arg(long)]
    pub(crate) stripped: Vec<String>,
    /// The protocol the request asks to switch to (`context.upgrade`, e.g. `websocket`);
    /// absent: a plain request.
    #[serde(default)]
    #[arg(long)]
    pub(crate) upgrade: Option<String>,
    /// The user the request acts for (`context.on_behalf_of.subject`), for routes that
    /// exchange a user's token (taken as verified).
    #[serde(default)]
    #[arg(long)]
    pub(crate) user: Option<String>,
    /// The user token's issuer (`context.on_behalf_of.issuer`).
    #[serde(default)]
    #[arg(long)]
    pub(crate) user_issuer: Option<String>,
    /// The MCP method asked (`context.mcp.method`, e.g. `tools/call`), for `mcp: true` routes.
    #[serde(default)]
    #[arg(long)]
    pub(crate) mcp_method: Option<String>,
    /// The tool or prompt name, or resource uri (`context.mcp.name`).
    #[serde(default)]
    #[arg(long)]
    pub(crate) mcp_name: Option<String>,
    /// A tool call's arguments as a JSON object (`context.mcp.arguments`, as far as the
    /// routes declare them), e.g. `{"repo": "public"}`.
    #[serde(default)]
    #[arg(long)]
    pub(crate) mcp_arguments: Option<String>,
    /// Expected decision (`allow` or `deny`); required in a CASES file.
    #[serde(default)]
    #[arg(skip)]
    pub(crate) expect: Option<Expected>,
    /// Expected deciding policy ids, in any order (permits on allow, forbids on deny; empty
    /// for "no policy permits").
    #[serde(default)]
    #[arg(skip)]
    pub(crate) policies: Option<Vec<String>>,
    /// Text the reason must contain.
    #[serde(default)]
    #[arg(skip)]
    pub(crate) reason_contains: Option<String>,
}

/// An expected decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Expected {
    /// The request may proceed.
    Allow,
    /// The request is refused.
    Deny,
}

/// A CASES file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesFile {
    /// The cases, decided in order.
    cases: Vec<WhatIf>,
}

/// A decision and what it was made from.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Explained {
    /// `allow` or `deny`.
    pub(crate) decision: &'static str,
    /// Deciding policy ids.
    pub(crate) policy_ids: Vec<String>,
    /// Why.
    pub(crate) reason: String,
    /// `Workload::"<id>"`.
    pub(crate) principal: String,
    /// `Action::"<METHOD>"`.
    pub(crate) action: String,
    /// `Destination::"<host>"`.
    pub(crate) resource: String,
    /// Stage and environment of the principal.
    pub(crate) stage: String,
    /// Environment of the principal.
    pub(crate) environment: String,
    /// Matched route, if any.
    pub(crate) route: Option<String>,
    /// The purpose policy saw.
    pub(crate) purpose: String,
    /// The guardrail the destination trips, if any.
    pub(crate) guardrail: Option<String>,
}

/// The outcome of one case.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CaseOutcome {
    /// Case name, or `case N`.
    pub(crate) name: String,
    /// Line of the case in its file.
    pub(crate) line: usize,
    /// Whether every expectation held.
    pub(crate) passed: bool,
    /// The expectations that did not hold.
    pub(crate) problems: Vec<String>,
    /// The decision.
    pub(crate) got: Option<Explained>,
}

/// The outcomes of a CASES file.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CaseReport {
    /// One per case, in file order.
    pub(crate) cases: Vec<CaseOutcome>,
}

impl CaseReport {
    /// Whether every case passed.
    pub(crate) fn passed(&self) -> bool {
        self.cases.iter().all(|c| c.passed)
    }
}

/// What a what-if request is decided against: a loaded configuration's routes, identities
/// and listeners, and a policy engine.
pub(crate) struct Bench<'a> {
    cfg: &'a Config,
    engine: &'a PolicyEngine,
    routes: RouteTable,
    guardrails: Guardrails,
}

impl<'a> Bench<'a> {
    /// A bench over this configuration and its compiled policy.
    pub(crate) fn new(cfg: &'a Config, engine: &'a PolicyEngine) -> Bench<'a> {
        let mut own: Vec<SocketAddr> = cfg.listeners.iter().filter_map(|l| l.addr.tcp()).collect();
        own.push(cfg.admin);
        Bench {
            cfg,
            engine,
            routes: RouteTable::new(cfg.routes.clone()),
            guardrails: Guardrails::new(own),
        }
    }

    /// Decide one request.
    pub(crate) fn decide(&self, w: &WhatIf) -> Result<Explained, String> {
        let method = Method::from_bytes(w.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("`{}` is not an HTTP method", w.method))?;
        let connect = method == Method::CONNECT;
        let target = parse_target(&w.url, connect)?;
        let mut identity: Identity = match &w.stage {
            None => self.cfg.listeners[0].identity.clone(),
            Some(s) => self
                .cfg
                .listeners
                .iter()
                .find(|l| &l.identity.stage == s)
                .map(|l| l.identity.clone())
                .ok_or_else(|| {
                    let known: Vec<&str> = self
                        .cfg
                        .listeners
                        .iter()
                        .map(|l| l.identity.stage.as_str())
                        .collect();
                    format!(
                        "no stage `{s}` in {} (stages: {})",
                        self.cfg.source,
                        known.join(", ")
                    )
                })?,
        };
        if let Some(e) = &w.environment {
            identity.environment = e.clone();
        }
        if let Some(p) = &w.principal {
            identity.id = p.clone();
        }
        let route = if connect {
            None
        } else {
            self.routes.find(&method, &target)
        };
        // A tool call serves `tool:<name>` unless the request names a purpose, as on the wire.
        let tool_purpose = match (w.mcp_method.as_deref(), w.mcp_name.as_deref()) {
            (Some("tools/call"), Some(name)) if route.is_some_and(|r| r.mcp) => {
                crate::mcp::tool_purpose(name)
            }
            _ => None,
        };
        let purpose = w
            .purpose
            .as_deref()
            .or(tool_purpose.as_deref())
            .or(route.and_then(|r| r.purpose_default.as_deref()))
            .unwrap_or(crate::identify::UNSPECIFIED_PURPOSE);
        let arguments: Option<serde_json::Value> = w
            .mcp_arguments
            .as_deref()
            .map(|a| {
                serde_json::from_str(a).map_err(|e| format!("mcp_arguments: not JSON ({e}): {a}"))
            })
            .transpose()?;
        crate::identify::validate_purpose(purpose).map_err(|e| format!("purpose: {e}"))?;
        let time = match &w.time {
            None => SystemTime::now(),
            Some(t) => humantime::parse_rfc3339_weak(t).map_err(|e| {
                format!("time `{t}`: {e} (use RFC 3339, e.g. 2026-11-24T09:00:00Z)")
            })?,
        };
        let stripped: Vec<&str> = w.stripped.iter().map(String::as_str).collect();
        let guard: Option<GuardrailHit> = self.guardrails.check(&target.host, target.port);
        let d: PolicyDecision = self.engine.decide(&PolicyInput {
            identity: &identity,
            action: method.as_str(),
            host: crate::target::policy_host(&target.host),
            scheme: target.scheme,
            port: target.port,
            path: if connect { "" } else { &target.path },
            purpose,
            route: route.map_or("", |r| r.name.as_str()),
            labels: route.map(|r| &r.labels),
            stripped_types: &stripped,
            credential: route.and_then(|r| r.credential.as_deref()).unwrap_or(""),
            client: w.client.unwrap_or(IpAddr::from([127, 0, 0, 1])),
            address: w.address.or_else(|| {
                crate::target::policy_host(&target.host)
                    .parse::<IpAddr>()
                    .ok()
            }),
            time,
            guardrail: guard.as_ref(),
            upgrade: w.upgrade.as_deref().unwrap_or(""),
            on_behalf_of: w.user.as_deref().map(|sub| crate::policy::OnBehalfOf {
                issuer: w.user_issuer.as_deref().unwrap_or(""),
                subject: sub,
                verified: true,
            }),
            mcp: w
                .mcp_method
                .as_deref()
                .map(|method| crate::policy::McpContext {
                    method,
                    name: w.mcp_name.as_deref().unwrap_or(""),
                    arguments: arguments
                        .as_ref()
                        .map_or(crate::policy::McpArguments::None, |a| {
                            crate::policy::McpArguments::Given(a)
                        }),
                }),
        });
        Ok(Explained {
            decision: if d.allow { "allow" } else { "deny" },
            policy_ids: d.policy_ids,
            reason: d.reason,
            principal: format!("Workload::{:?}", identity.id),
            action: format!("Action::{:?}", method.as_str()),
            resource: format!("Destination::{:?}", target.host),
            stage: identity.stage,
            environment: identity.environment,
            route: route.map(|r| r.name.clone()),
            purpose: purpose.to_string(),
            guardrail: guard.map(|g| g.kind.to_string()),
        })
    }

    /// Decide every case of a CASES file and compare with its expectations. A file that does
    /// not parse is an error naming the line and key.
    pub(crate) fn run(&self, file: &str, text: &str) -> Result<CaseReport, ConfigError> {
        let (node, parsed) = parse_yaml::<CasesFile>(file, text)?;
        let lines: Vec<usize> = node
            .as_mapping()
            .and_then(|m| m.get_sequence("cases"))
            .map(|s| {
                s.iter()
                    .map(|n| n.span().start().map_or(0, |m| m.line()))
                    .collect()
            })
            .unwrap_or_default();
        let cases = parsed
            .cases
            .iter()
            .enumerate()
            .map(|(i, case)| {
                let name = case
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("case {}", i + 1));
                let line = lines.get(i).copied().unwrap_or(0);
                let mut problems = Vec::new();
                if case.expect.is_none() {
                    problems.push("no `expect:` (allow or deny)".to_string());
                }
                let got = match self.decide(case) {
                    Ok(got) => Some(got),
                    Err(e) => {
                        problems.push(e);
                        None
                    }
                };
                if let Some(g) = &got {
                    problems.extend(check(case, g));
                }
                CaseOutcome {
                    name,
                    line,
                    passed: problems.is_empty(),
                    problems,
                    got,
                }
            })
            .collect();
        Ok(CaseReport { cases })
    }
}

/// The expectations of `case` that `got` does not meet.
fn check(case: &WhatIf, got: &Explained) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(e) = case.expect {
        let want = match e {
            Expected::Allow => "allow",
            Expected::Deny => "deny",
        };
        if want != got.decision {
            problems.push(format!(
                "expected {want}, got {} ({})",
                got.decision, got.reason
            ));
        }
    }
    if let Some(want) = &case.policies {
        let want: BTreeSet<&str> = want.iter().map(String::as_str).collect();
        let have: BTreeSet<&str> = got.policy_ids.iter().map(String::as_str).collect();
        if want != have {
            problems.push(format!(
                "expected policies [{}], got [{}]",
                want.into_iter().collect::<Vec<_>>().join(", "),
                have.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    if let Some(want) = &case.reason_contains
        && !got.reason.contains(want.as_str())
    {
        problems.push(format!(
            "expected the reason to contain {want:?}, got {:?}",
            got.reason
        ));
    }
    problems
}

/// The target of a what-if URL: `http(s)://host[:port]/path?query`, or `host:port` for
/// CONNECT.
fn parse_target(url: &str, connect: bool) -> Result<Target, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => "http",
        Some("https") => "https",
        None if connect => "https",
        Some(other) => return Err(format!("`{url}`: unsupported scheme `{other}`")),
        None => {
            return Err(format!(
                "`{url}`: an absolute http:// or https:// URL is needed"
            ));
        }
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{url}` has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("`{url}`: leave credentials out of the URL"));
    }
    let host = crate::target::normalize_host(authority.host());
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    let port = match (authority.port_u16(), scheme) {
        (Some(p), _) => p,
        (None, "http") => 80,
        (None, _) => 443,
    };
    let raw = if uri.path().is_empty() {
        "/"
    } else {
        uri.path()
    };
    let path = crate::target::normalize_path(raw).map_err(|e| format!("`{url}`: {e}"))?;
    let mut t = Target::new(scheme, host, port, path.path);
    t.query = uri.query().map(str::to_string);
    Ok(t)
}
