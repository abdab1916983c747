//! `chaperone review --config F LOG...`: least privilege after deployment.
//!
//! Compares what a configuration grants with what the purpose logs show was used:
//! - routes, credentials, scopes and policies never used in the window;
//! - stages reaching destinations outside their function;
//! - a suggested, tighter policy that still allows everything seen.
//!
//! A stage's function is read from its own traffic: the kinds of destination (the route's
//! `kind` label, else the route name) that carry 95% of its allowed requests, taken busiest
//! first. An allowed request to any other kind is listed.
//!
//! The suggestion has one permit per (identity, stage, destination, route) naming the
//! methods and purposes seen, plus the current forbids and guardrail lifts verbatim. It is checked
//! before it is printed: it must validate against the schema, and every allowed request
//! in the logs is decided again under it.

use super::Exit;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cli::audit::{Seen, for_each_line};
use crate::cli::policy::{Bench, WhatIf};
use crate::config::Config;
use crate::policy::{PolicyEngine, PolicySource};

/// The fields of a purpose-log line that the review reads.
#[derive(Deserialize)]
struct Line {
    ts: String,
    identity: String,
    #[serde(default)]
    stage: String,
    #[serde(default)]
    environment: String,
    #[serde(default)]
    purpose: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    method: String,
    #[serde(default)]
    scheme: String,
    #[serde(default)]
    host: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    path: String,
    #[serde(default)]
    route: Option<String>,
    decision: String,
    #[serde(default)]
    policy_ids: Vec<String>,
    #[serde(default)]
    credential: Option<CredentialLine>,
    #[serde(default)]
    stripped: Vec<StrippedLine>,
    #[serde(default)]
    client: String,
    /// The destination's address as policy saw it, when it did.
    #[serde(default)]
    address: Option<std::net::IpAddr>,
    #[serde(default)]
    on_behalf_of: Option<OnBehalfLine>,
    #[serde(default)]
    mcp: Option<McpLine>,
}

#[derive(Deserialize)]
struct McpLine {
    #[serde(default)]
    method: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct OnBehalfLine {
    #[serde(default)]
    iss: String,
    #[serde(default)]
    sub: String,
    #[serde(default)]
    verified: bool,
}

#[derive(Deserialize)]
struct CredentialLine {
    name: String,
    #[serde(default)]
    scopes: Vec<String>,
}

#[derive(Deserialize)]
struct StrippedLine {
    #[serde(rename = "type")]
    kind: String,
}

/// A scope a route requests that no token carried in the window.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct UnusedScope {
    /// Route.
    pub(crate) route: String,
    /// Scope as configured (may hold `{purpose}`).
    pub(crate) scope: String,
}

/// A tool a route gives its own scopes that no allowed call used in the window.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct UnusedTool {
    /// Route.
    pub(crate) route: String,
    /// Tool (`routes[].tools`).
    pub(crate) tool: String,
}

/// A policy that decided no request in the window.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct UnusedPolicy {
    /// Policy id.
    pub(crate) id: String,
    /// `permit` or `forbid` (a forbid that never fired may still be a needed guard).
    pub(crate) effect: String,
}

/// Allowed traffic from a stage to a kind of destination outside its function.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Outlier {
    /// Identity.
    pub(crate) identity: String,
    /// Stage.
    pub(crate) stage: String,
    /// `host:port`.
    pub(crate) destination: String,
    /// Route, or none.
    pub(crate) route: Option<String>,
    /// The destination's kind (route `kind` label, else route name, else `unrouted`).
    pub(crate) kind: String,
    /// Allowed requests.
    pub(crate) requests: u64,
    /// Share of the stage's allowed requests, in percent.
    pub(crate) share: f64,
    /// The kinds that make up the stage's function.
    pub(crate) function: Vec<String>,
}

/// Whether the suggested policy allows what was seen.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SuggestionCheck {
    /// Allowed requests in the logs that were decided again.
    pub(crate) decided: u64,
    /// Of those, allowed under the suggestion.
    pub(crate) allowed: u64,
    /// Up to 10 that are not, with the reason.
    pub(crate) refused: Vec<String>,
}

/// The review.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Review {
    /// Purpose-log lines read.
    pub(crate) lines: u64,
    /// Lines skipped as not purpose-log JSON.
    pub(crate) skipped: u64,
    /// The window the logs cover.
    pub(crate) window: Seen,
    /// Routes no allowed request used.
    pub(crate) unused_routes: Vec<String>,
    /// Credentials never injected.
    pub(crate) unused_credentials: Vec<String>,
    /// Scopes no token carried.
    pub(crate) unused_scopes: Vec<UnusedScope>,
    /// Tools with their own scopes that were never called.
    pub(crate) unused_tools: Vec<UnusedTool>,
    /// Policies that decided nothing.
    pub(crate) unused_policies: Vec<UnusedPolicy>,
    /// Stages reaching destinations outside their function.
    pub(crate) outside_function: Vec<Outlier>,
    /// Routes that acted for users: how many users, for what, and whether any user token
    /// went unverified.
    pub(crate) delegation: Vec<DelegatedRoute>,
    /// A tighter policy that allows everything seen.
    pub(crate) suggested_policy: String,
    /// Its check against the logs.
    pub(crate) suggestion_check: SuggestionCheck,
}

/// A route's allowed requests on behalf of users.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct DelegatedRoute {
    pub(crate) route: String,
    /// Distinct users (issuer and subject).
    pub(crate) users: u64,
    /// Requests whose user token was not verified against the issuer's keys.
    pub(crate) unverified: u64,
    pub(crate) requests: u64,
    pub(crate) purposes: BTreeSet<String>,
    /// The acting workloads (identity and stage).
    pub(crate) actors: BTreeSet<String>,
}

/// (identity, stage, scheme, host, port, tunnel, route).
type GrantKey = (String, String, String, String, u16, bool, String);

/// Allowed traffic of one (identity, stage, destination, route).
#[derive(Default)]
struct Grant {
    methods: BTreeSet<String>,
    purposes: BTreeSet<String>,
    requests: u64,
    route: Option<String>,
    /// On an MCP route: the tools called, and the other MCP methods used.
    tools: BTreeSet<String>,
    mcp_methods: BTreeSet<String>,
}

/// Read the logs and review them against `cfg`.
pub(crate) fn review(
    cfg: &Config,
    engine: &PolicyEngine,
    logs: &[&Path],
) -> Result<Review, String> {
    let mut lines = 0u64;
    let mut skipped = 0u64;
    let mut window = Seen::default();
    let mut routes_used = BTreeSet::new();
    let mut credentials_used = BTreeSet::new();
    let mut scopes_seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut policies_used = BTreeSet::new();
    let mut grants: BTreeMap<GrantKey, Grant> = BTreeMap::new();
    let mut seen_allowed: Vec<WhatIf> = Vec::new();
    let mut lifted: BTreeSet<String> = BTreeSet::new();
    let mut delegated: BTreeMap<String, (DelegatedRoute, BTreeSet<(String, String)>)> =
        BTreeMap::new();
    let mut tools_called: BTreeSet<(String, String)> = BTreeSet::new();

    for path in logs {
        for_each_line(path, &mut |_, _, bytes| {
            let Ok(l) = serde_json::from_slice::<Line>(bytes) else {
                skipped += 1;
                return;
            };
            lines += 1;
            window.at(&l.ts);
            policies_used.extend(l.policy_ids.iter().cloned());
            // The CONNECT of an intercepted tunnel is not a policy decision: each request
            // inside it is, with its own line.
            if l.decision != "allow" || l.kind == "intercept" {
                return;
            }
            if let Some(r) = &l.route {
                routes_used.insert(r.clone());
            }
            if let (Some(u), Some(r)) = (&l.on_behalf_of, &l.route) {
                let (d, users) = delegated.entry(r.clone()).or_default();
                d.route = r.clone();
                d.requests += 1;
                if !u.verified {
                    d.unverified += 1;
                }
                d.purposes.insert(l.purpose.clone());
                d.actors.insert(format!("{} ({})", l.identity, l.stage));
                users.insert((u.iss.clone(), u.sub.clone()));
            }
            if let Some(c) = &l.credential {
                credentials_used.insert(c.name.clone());
                if let Some(r) = &l.route {
                    scopes_seen
                        .entry(r.clone())
                        .or_default()
                        .extend(c.scopes.iter().cloned());
                }
            }
            let tunnel = l.kind == "tunnel";
            for id in &l.policy_ids {
                if engine.annotation(id, "guardrail").is_some() {
                    lifted.insert(id.clone());
                }
            }
            let g = grants
                .entry((
                    l.identity.clone(),
                    l.stage.clone(),
                    l.scheme.clone(),
                    l.host.clone(),
                    l.port,
                    tunnel,
                    l.route.clone().unwrap_or_default(),
                ))
                .or_default();
            g.methods.insert(if tunnel {
                "CONNECT".into()
            } else {
                l.method.clone()
            });
            g.purposes.insert(l.purpose.clone());
            g.requests += 1;
            g.route = l.route.clone();
            match &l.mcp {
                Some(m) if m.method == "tools/call" => {
                    g.tools.insert(m.name.clone());
                    tools_called.insert((l.route.clone().unwrap_or_default(), m.name.clone()));
                }
                Some(m) => {
                    g.mcp_methods.insert(m.method.clone());
                }
                None => {}
            }
            seen_allowed.push(what_if(&l, tunnel));
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }

    let unused_routes = cfg
        .routes
        .iter()
        .map(|r| r.name.clone())
        .filter(|n| !routes_used.contains(n))
        .collect();
    let unused_credentials = cfg
        .credentials
        .keys()
        .filter(|n| !credentials_used.contains(*n))
        .cloned()
        .collect();
    let mut unused_scopes = Vec::new();
    for r in &cfg.routes {
        let seen = scopes_seen.get(&r.name);
        for scope in &r.scopes {
            let used = seen.is_some_and(|s| s.iter().any(|x| scope_matches(scope, x)));
            if !used && routes_used.contains(&r.name) {
                unused_scopes.push(UnusedScope {
                    route: r.name.clone(),
                    scope: scope.clone(),
                });
            }
        }
    }
    let unused_tools = cfg
        .routes
        .iter()
        .filter(|r| routes_used.contains(&r.name))
        .flat_map(|r| r.tools.keys().map(move |t| (r.name.clone(), t.clone())))
        .filter(|k| !tools_called.contains(k))
        .map(|(route, tool)| UnusedTool { route, tool })
        .collect();
    let unused_policies = engine
        .policy_ids()
        .into_iter()
        .filter(|id| !policies_used.contains(id))
        .map(|id| UnusedPolicy {
            effect: engine.effect(&id).unwrap_or("permit").to_string(),
            id,
        })
        .collect();

    let outside_function = outliers(cfg, &grants);
    let suggested_policy = suggest(engine, &grants, &lifted);
    let suggestion_check = check(cfg, &suggested_policy, &seen_allowed)?;
    let delegation = delegated
        .into_values()
        .map(|(mut d, users)| {
            d.users = users.len() as u64;
            d
        })
        .collect();
    Ok(Review {
        lines,
        skipped,
        window,
        unused_routes,
        unused_credentials,
        unused_scopes,
        unused_tools,
        unused_policies,
        outside_function,
        delegation,
        suggested_policy,
        suggestion_check,
    })
}

/// Does a token scope `seen` come from the configured `scope` (with `{purpose}`)?
fn scope_matches(scope: &str, seen: &str) -> bool {
    match scope.split_once(crate::route::PURPOSE_PLACEHOLDER) {
        None => scope == seen,
        Some((pre, post)) => {
            seen.len() > pre.len() + post.len() && seen.starts_with(pre) && seen.ends_with(post)
        }
    }
}

/// The request of a log line, to decide it again.
fn what_if(l: &Line, tunnel: bool) -> WhatIf {
    let host = if l.host.contains(':') {
        format!("[{}]", l.host)
    } else {
        l.host.clone()
    };
    WhatIf {
        method: if tunnel {
            "CONNECT".into()
        } else {
            l.method.clone()
        },
        url: if tunnel {
            format!("{host}:{}", l.port)
        } else {
            format!("{}://{host}:{}{}", l.scheme, l.port, l.path)
        },
        purpose: Some(l.purpose.clone()),
        stage: Some(l.stage.clone()),
        environment: Some(l.environment.clone()),
        principal: Some(l.identity.clone()),
        client: l
            .client
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip()),
        address: l.address,
        time: Some(l.ts.clone()),
        stripped: l.stripped.iter().map(|s| s.kind.clone()).collect(),
        mcp_method: l.mcp.as_ref().map(|m| m.method.clone()),
        mcp_name: l.mcp.as_ref().map(|m| m.name.clone()),
        ..Default::default()
    }
}

/// Stages' allowed traffic to kinds of destination outside the kinds that carry 95% of it.
fn outliers(cfg: &Config, grants: &BTreeMap<GrantKey, Grant>) -> Vec<Outlier> {
    let kind_of = |route: &Option<String>| -> String {
        match route {
            None => "unrouted".into(),
            Some(name) => cfg
                .routes
                .iter()
                .find(|r| &r.name == name)
                .and_then(|r| r.labels.get("kind").cloned())
                .unwrap_or_else(|| name.clone()),
        }
    };
    let mut by_stage: BTreeMap<(&str, &str), BTreeMap<String, u64>> = BTreeMap::new();
    for ((id, stage, ..), g) in grants {
        *by_stage
            .entry((id, stage))
            .or_default()
            .entry(kind_of(&g.route))
            .or_default() += g.requests;
    }
    let mut out = Vec::new();
    for ((id, stage), kinds) in &by_stage {
        let total: u64 = kinds.values().sum();
        let mut ranked: Vec<(&String, &u64)> = kinds.iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let mut function = Vec::new();
        let mut covered = 0u64;
        for (k, n) in &ranked {
            if covered * 100 >= total * 95 {
                break;
            }
            function.push((*k).clone());
            covered += **n;
        }
        for ((gid, gstage, _, host, port, ..), g) in grants {
            if gid != id || gstage != stage {
                continue;
            }
            let kind = kind_of(&g.route);
            if !function.contains(&kind) {
                out.push(Outlier {
                    identity: gid.clone(),
                    stage: gstage.clone(),
                    destination: format!("{host}:{port}"),
                    route: g.route.clone(),
                    kind,
                    requests: g.requests,
                    share: (g.requests as f64) * 100.0 / (total as f64),
                    function: function.clone(),
                });
            }
        }
    }
    out
}

/// A Cedar string literal.
fn lit(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The suggested policy: one permit per (identity, stage, destination, route) seen allowed,
/// then
/// the current forbids and the guardrail lifts that were used, verbatim.
fn suggest(
    engine: &PolicyEngine,
    grants: &BTreeMap<GrantKey, Grant>,
    lifted: &BTreeSet<String>,
) -> String {
    use std::fmt::Write;
    let mut out = String::from(
        "// Suggested by `chaperone review`: one permit per identity, stage and destination seen\n// allowed, naming only the methods and purposes used; the current forbids and the\n// guardrail lifts that were used, unchanged. Review before use.\n",
    );
    let mut n = 0;
    for ((id, stage, scheme, host, port, tunnel, route), g) in grants {
        // A guarded destination is allowed by its lifting permit, copied below.
        if !*tunnel && host_is_guarded_literal(host) {
            continue;
        }
        n += 1;
        let methods: Vec<String> = g
            .methods
            .iter()
            .map(|m| format!("Action::{}", lit(m)))
            .collect();
        let purposes: Vec<String> = g.purposes.iter().map(|p| lit(p)).collect();
        let scheme_cond = if *tunnel {
            String::new()
        } else {
            format!(
                " &&\n  resource.scheme == {} &&\n  context.route == {}",
                lit(scheme),
                lit(route)
            )
        };
        let _ = write!(
            out,
            "\n@id(\"seen-{n}-{}\")\npermit (\n  principal == Workload::{},\n  action in [{}],\n  resource == Destination::{}\n)\nwhen {{\n  principal.stage == {} &&\n  resource.port == {port}{scheme_cond} &&\n  [{}].contains(context.purpose){}\n}};\n",
            slug(stage),
            lit(id),
            methods.join(", "),
            lit(host),
            lit(stage),
            purposes.join(", "),
            mcp_condition(g),
        );
    }
    for id in engine.policy_ids() {
        let keep = engine.effect(&id) == Some("forbid") || lifted.contains(&id);
        if keep && let Some(text) = engine.policy_text(&id) {
            let _ = write!(out, "\n{text}\n");
        }
    }
    out
}

/// On an MCP route, the permit names the tools called and the other MCP methods used (a
/// request that carries no MCP message, such as the stream's GET, is not limited by it).
fn mcp_condition(g: &Grant) -> String {
    let set =
        |items: &BTreeSet<String>| items.iter().map(|i| lit(i)).collect::<Vec<_>>().join(", ");
    let mut allowed = Vec::new();
    if !g.tools.is_empty() {
        allowed.push(format!(
            "(context.mcp.method == \"tools/call\" && [{}].contains(context.mcp.name))",
            set(&g.tools)
        ));
    }
    if !g.mcp_methods.is_empty() {
        allowed.push(format!(
            "[{}].contains(context.mcp.method)",
            set(&g.mcp_methods)
        ));
    }
    if allowed.is_empty() {
        return String::new();
    }
    format!(
        " &&\n  (if context has mcp then\n    {}\n  else true)",
        allowed.join(" ||\n    ")
    )
}

/// Hosts that trip a guardrail as written (their lines were allowed by a lifting permit).
fn host_is_guarded_literal(host: &str) -> bool {
    crate::policy::Guardrails::new(vec![])
        .check(host, 0)
        .is_some_and(|g| g.kind != "own_listener")
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// Compile the suggestion with the config's label keys and decide every allowed request
/// seen under it.
fn check(cfg: &Config, text: &str, seen: &[WhatIf]) -> Result<SuggestionCheck, String> {
    let mut src = PolicySource::inline("suggested policy", text);
    src.label_keys = cfg.policy.label_keys.clone();
    src.mcp_arguments = cfg.policy.mcp_arguments.clone();
    src.schema = cfg.policy.schema.clone();
    let engine = PolicyEngine::compile(&src)
        .map_err(|e| format!("the suggested policy does not compile (please report this): {e}"))?;
    let bench = Bench::new(cfg, &engine);
    let mut result = SuggestionCheck {
        decided: 0,
        allowed: 0,
        refused: Vec::new(),
    };
    for w in seen {
        result.decided += 1;
        match bench.decide(w) {
            Ok(d) if d.decision == "allow" => result.allowed += 1,
            Ok(d) => {
                if result.refused.len() < 10 {
                    result
                        .refused
                        .push(format!("{} {}: {}", w.method, w.url, d.reason));
                }
            }
            Err(e) => {
                if result.refused.len() < 10 {
                    result.refused.push(format!("{} {}: {e}", w.method, w.url));
                }
            }
        }
    }
    Ok(result)
}

/// The review as text for people.
pub(crate) fn render(r: &Review) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Reviewed {} requests from {} to {}{}",
        r.lines,
        r.window.first,
        r.window.last,
        if r.skipped > 0 {
            format!(" ({} lines skipped as not purpose-log JSON)", r.skipped)
        } else {
            String::new()
        }
    );
    let list = |out: &mut String, title: &str, items: Vec<String>| {
        let _ = writeln!(out, "\n{title}");
        if items.is_empty() {
            let _ = writeln!(out, "  (none)");
        }
        for i in items {
            let _ = writeln!(out, "  {i}");
        }
    };
    list(&mut out, "Routes never used", r.unused_routes.clone());
    list(
        &mut out,
        "Credentials never used",
        r.unused_credentials.clone(),
    );
    list(
        &mut out,
        "Scopes never granted on a used route",
        r.unused_scopes
            .iter()
            .map(|s| format!("{}: {}", s.route, s.scope))
            .collect(),
    );
    if !r.unused_tools.is_empty() {
        list(
            &mut out,
            "MCP tools with their own scopes never called",
            r.unused_tools
                .iter()
                .map(|t| format!("{}: {}", t.route, t.tool))
                .collect(),
        );
    }
    list(
        &mut out,
        "Policies that decided nothing",
        r.unused_policies
            .iter()
            .map(|p| {
                if p.effect == "forbid" {
                    format!(
                        "{} (forbid: never fired; it may still be a needed guard)",
                        p.id
                    )
                } else {
                    format!("{} (permit)", p.id)
                }
            })
            .collect(),
    );
    list(
        &mut out,
        "Stages reaching destinations outside their function",
        r.outside_function
            .iter()
            .map(|o| {
                format!(
                    "{} ({}) -> {} [{}]: {} requests, {:.1}% of its traffic; its function: {}",
                    o.identity,
                    o.stage,
                    o.destination,
                    o.kind,
                    o.requests,
                    o.share,
                    o.function.join(", ")
                )
            })
            .collect(),
    );
    list(
        &mut out,
        "Routes acting for users",
        r.delegation
            .iter()
            .map(|d| {
                format!(
                    "{}: {} users, {} requests by {} for {}{}",
                    d.route,
                    d.users,
                    d.requests,
                    d.actors.iter().cloned().collect::<Vec<_>>().join(", "),
                    d.purposes.iter().cloned().collect::<Vec<_>>().join(", "),
                    if d.unverified > 0 {
                        format!(
                            "; {} with an UNVERIFIED user token (set subject_jwks_url)",
                            d.unverified
                        )
                    } else {
                        String::new()
                    }
                )
            })
            .collect(),
    );
    let c = &r.suggestion_check;
    let _ = writeln!(
        out,
        "\nSuggested policy: allows {} of the {} allowed requests seen{}",
        c.allowed,
        c.decided,
        if c.allowed == c.decided {
            String::new()
        } else {
            format!("; NOT allowed: {}", c.refused.join("; "))
        }
    );
    let _ = writeln!(out, "{}", r.suggested_policy);
    out
}

/// `chaperone review --config F LOG...`: 0, or 2 on a config or log error.
pub(crate) fn command(
    config: &std::path::Path,
    logs: &[PathBuf],
    json: bool,
    suggest_out: Option<&std::path::Path>,
) -> Exit {
    let Some((cfg, engine)) = super::policy::load(config, &mut std::io::stderr()) else {
        return Exit::Error;
    };
    let paths: Vec<&std::path::Path> = logs.iter().map(PathBuf::as_path).collect();
    let r = match review(&cfg, &engine, &paths) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaperone review: {e}");
            return Exit::Error;
        }
    };
    if let Some(out) = suggest_out
        && let Err(e) = std::fs::write(out, &r.suggested_policy)
    {
        eprintln!("chaperone review: {}: {e}", out.display());
        return Exit::Error;
    }
    super::print_report(json, &r, render)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_templates_match_what_tokens_carry() {
        assert!(scope_matches("tickets.{purpose}", "tickets.summarize"));
        assert!(!scope_matches("tickets.{purpose}", "tickets."));
        assert!(!scope_matches("tickets.{purpose}", "other.summarize"));
        assert!(scope_matches("model.invoke", "model.invoke"));
        assert!(!scope_matches("model.invoke", "model.invoke.all"));
    }

    #[test]
    fn cedar_literals_are_escaped() {
        assert_eq!(lit(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(lit("x\ny"), "\"x\\u{a}y\"");
    }
}
