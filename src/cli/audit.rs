//! `chaperone audit LOG...`: what the purpose logs say, summarized for SREs and security
//! reviews.
//!
//! One pass over any number of files (plain, rotated, gzip; `-` for stdin), aggregating:
//! traffic by identity, stage, purpose and destination; denials with their reasons and
//! deciding policies; embedded secrets by type and fingerprint with first and last seen; and
//! the credentials used. Lines that are not purpose-log JSON are counted and the first is
//! named, never fatal: a log that was cut mid-line must still be readable.

use super::Exit;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The fields of a purpose-log line that the audit reads; everything else is skipped
/// without being copied.
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    ts: Cow<'a, str>,
    #[serde(borrow)]
    identity: Cow<'a, str>,
    #[serde(borrow, default)]
    stage: Cow<'a, str>,
    #[serde(borrow, default)]
    purpose: Cow<'a, str>,
    #[serde(borrow, default)]
    host: Cow<'a, str>,
    #[serde(default)]
    port: u16,
    #[serde(borrow, default)]
    route: Option<Cow<'a, str>>,
    #[serde(borrow)]
    decision: Cow<'a, str>,
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    policy_ids: Vec<Cow<'a, str>>,
    #[serde(borrow, default)]
    credential: Option<CredentialLine<'a>>,
    #[serde(borrow, default)]
    stripped: Vec<StrippedLine<'a>>,
    #[serde(borrow, default)]
    error: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    on_behalf_of: Option<OnBehalfLine<'a>>,
    #[serde(borrow, default)]
    mcp: Option<McpLine<'a>>,
}

#[derive(Deserialize)]
struct McpLine<'a> {
    #[serde(borrow, default)]
    method: Cow<'a, str>,
    #[serde(borrow, default)]
    name: Cow<'a, str>,
    #[serde(borrow, default)]
    hidden: Vec<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct OnBehalfLine<'a> {
    #[serde(borrow, default)]
    iss: Cow<'a, str>,
    #[serde(borrow, default)]
    sub: Cow<'a, str>,
    #[serde(default)]
    verified: bool,
}

#[derive(Deserialize)]
struct CredentialLine<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow, default)]
    scopes: Vec<Cow<'a, str>>,
    #[serde(borrow, default)]
    flags: Vec<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct StrippedLine<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    location: Cow<'a, str>,
    #[serde(borrow)]
    fingerprint: Cow<'a, str>,
}

/// First and last time seen (RFC 3339 UTC strings compare in time order).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Seen {
    /// Earliest `ts`.
    pub(crate) first: String,
    /// Latest `ts`.
    pub(crate) last: String,
}

impl Seen {
    /// Widen the window to include `ts`.
    pub(crate) fn at(&mut self, ts: &str) {
        if self.first.is_empty() || ts < self.first.as_str() {
            self.first = ts.to_string();
        }
        if ts > self.last.as_str() {
            self.last = ts.to_string();
        }
    }
}

/// Requests of one (identity, stage, purpose, destination).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Traffic {
    /// Principal.
    pub(crate) identity: String,
    /// Stage.
    pub(crate) stage: String,
    /// Purpose.
    pub(crate) purpose: String,
    /// `host:port`.
    pub(crate) destination: String,
    /// All requests.
    pub(crate) requests: u64,
    /// Allowed ones.
    pub(crate) allowed: u64,
    /// Denied ones.
    pub(crate) denied: u64,
    /// Allowed but failed (upstream or credential errors).
    pub(crate) failed: u64,
    /// When.
    pub(crate) seen: Seen,
}

/// Denials of one kind: the same stage, error, deciding policies and reason.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Denial {
    /// Stage refused.
    pub(crate) stage: String,
    /// Error code (`policy_denied`, `embedded_secret`, ...).
    pub(crate) error: String,
    /// Deciding policies (empty: no policy permits, or a guardrail).
    pub(crate) policy_ids: Vec<String>,
    /// The reason, with numbers (addresses, ports, UIDs) folded to `#` so that one cause
    /// is one row.
    pub(crate) reason: String,
    /// How many.
    pub(crate) count: u64,
    /// Purposes named.
    pub(crate) purposes: BTreeSet<String>,
    /// Destinations asked for (`host:port`).
    pub(crate) destinations: BTreeSet<String>,
    /// When.
    pub(crate) seen: Seen,
}

/// One embedded secret, by type and fingerprint.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Secret {
    /// Detector type, e.g. `openai_project_key`.
    #[serde(rename = "type")]
    pub(crate) kind: String,
    /// Keyed fingerprint (the same key gives the same fingerprint across lines).
    pub(crate) fingerprint: String,
    /// Requests that carried it.
    pub(crate) count: u64,
    /// Where in the requests (`header:authorization`, `body:api_key`, ...).
    pub(crate) locations: BTreeSet<String>,
    /// Who sent it (`identity (stage)`).
    pub(crate) senders: BTreeSet<String>,
    /// Where it was going.
    pub(crate) destinations: BTreeSet<String>,
    /// When.
    pub(crate) seen: Seen,
}

/// One credential, as used.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CredentialUse {
    /// Credential name.
    pub(crate) name: String,
    /// Kind (`jwt`, `client_credentials`, ...).
    pub(crate) kind: String,
    /// Requests it was injected into.
    pub(crate) requests: u64,
    /// Distinct tokens (by id).
    pub(crate) tokens: u64,
    /// Scopes granted.
    pub(crate) scopes: BTreeSet<String>,
    /// Routes it was used on.
    pub(crate) routes: BTreeSet<String>,
    /// Flags raised (`unrequested_scope`, `ttl_exceeds_max`, ...) and how often.
    pub(crate) flags: BTreeMap<String, u64>,
    /// When.
    pub(crate) seen: Seen,
}

/// The audit of a set of logs.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Report {
    /// Purpose-log lines read.
    pub(crate) lines: u64,
    /// Lines skipped as not purpose-log JSON.
    pub(crate) skipped: u64,
    /// Where the first skipped line was (`FILE:LINE`).
    pub(crate) first_skipped: Option<String>,
    /// The window the lines cover.
    pub(crate) window: Seen,
    /// Requests allowed / denied in all.
    pub(crate) allowed: u64,
    /// Denied in all.
    pub(crate) denied: u64,
    /// By identity, stage, purpose and destination; busiest first.
    pub(crate) traffic: Vec<Traffic>,
    /// Denials, most frequent first.
    pub(crate) denials: Vec<Denial>,
    /// Embedded secrets, most frequent first.
    pub(crate) secrets: Vec<Secret>,
    /// Credentials, most used first.
    pub(crate) credentials: Vec<CredentialUse>,
    /// Who acted for whom, for what: requests made on behalf of users.
    pub(crate) delegations: Vec<Delegation>,
    /// MCP tools: who called each, what was refused, how often it was hidden from a listing.
    pub(crate) tools: Vec<ToolUse>,
}

/// Calls to one MCP tool on one route.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ToolUse {
    pub(crate) route: String,
    pub(crate) tool: String,
    /// `tools/call` requests, allowed and denied.
    pub(crate) calls: u64,
    pub(crate) allowed: u64,
    pub(crate) denied: u64,
    /// Who called it (`identity (stage)`).
    pub(crate) callers: BTreeSet<String>,
    /// The policies that refused calls to it.
    pub(crate) denied_by: BTreeSet<String>,
    /// `tools/list` answers it was left out of.
    pub(crate) hidden: u64,
    pub(crate) seen: Seen,
}

/// Requests one workload (identity and stage) made on behalf of one user, for one purpose.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Delegation {
    /// The user: the user token's `sub`.
    pub(crate) user: String,
    /// The user token's issuer.
    pub(crate) issuer: String,
    /// Whether every one of these requests had the user's token verified.
    pub(crate) verified: bool,
    /// The workload that acted.
    pub(crate) identity: String,
    /// Its stage.
    pub(crate) stage: String,
    /// For what.
    pub(crate) purpose: String,
    /// Requests, allowed and denied.
    pub(crate) requests: u64,
    pub(crate) allowed: u64,
    pub(crate) denied: u64,
    /// Where to.
    pub(crate) destinations: BTreeSet<String>,
    pub(crate) seen: Seen,
}

/// Aggregates as lines are read.
#[derive(Default)]
pub(crate) struct Auditor {
    report: Report,
    traffic: HashMap<(String, String, String, String), Traffic>,
    denials: HashMap<(String, String, String, String), Denial>,
    secrets: HashMap<(String, String), Secret>,
    credentials: HashMap<(String, String), (CredentialUse, HashSet<u64>)>,
    delegations: HashMap<(String, String, String, String, String), Delegation>,
    tools: HashMap<(String, String), ToolUse>,
}

/// What is called for each non-empty line: the input's name, the 1-based line number, and
/// the line without surrounding whitespace.
pub(crate) type LineFn<'a> = dyn FnMut(&str, u64, &[u8]) + 'a;

/// Call `f` for every non-empty line of the file at `path`: gzip when it starts with the gzip
/// magic (rotated logs), else plain; `-` is stdin.
pub(crate) fn for_each_line(path: &Path, f: &mut LineFn<'_>) -> std::io::Result<()> {
    let name = path.display().to_string();
    if name == "-" {
        return lines_of("<stdin>", std::io::stdin().lock(), f);
    }
    let mut file = BufReader::new(std::fs::File::open(path)?);
    if file.fill_buf()?.starts_with(&[0x1f, 0x8b]) {
        lines_of(&name, flate2::bufread::MultiGzDecoder::new(file), f)
    } else {
        lines_of(&name, file, f)
    }
}

fn lines_of(name: &str, input: impl Read, f: &mut LineFn<'_>) -> std::io::Result<()> {
    let mut r = BufReader::with_capacity(256 * 1024, input);
    let mut buf = Vec::with_capacity(4096);
    let mut n = 0u64;
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        n += 1;
        let line = buf.trim_ascii();
        if !line.is_empty() {
            f(name, n, line);
        }
    }
}

/// Digit runs folded to `#`, so that reasons differing only in an address, port or UID
/// count as one.
fn fold_numbers(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_digits = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

impl Auditor {
    /// A new, empty audit.
    pub(crate) fn new() -> Auditor {
        Auditor::default()
    }

    /// Read every line of `input`; `name` is used to locate skipped lines.
    #[cfg(test)]
    fn read(&mut self, name: &str, input: impl Read) -> std::io::Result<()> {
        lines_of(name, input, &mut |name, n, line| self.line(name, n, line))
    }

    /// Read a file: gzip when it starts with the gzip magic, else plain; `-` is stdin.
    pub(crate) fn read_path(&mut self, path: &Path) -> std::io::Result<()> {
        for_each_line(path, &mut |name, n, line| self.line(name, n, line))
    }

    fn line(&mut self, name: &str, n: u64, line: &[u8]) {
        match serde_json::from_slice::<Line<'_>>(line) {
            Ok(l) => self.add(&l),
            Err(_) => {
                self.report.skipped += 1;
                if self.report.first_skipped.is_none() {
                    self.report.first_skipped = Some(format!("{name}:{n}"));
                }
            }
        }
    }

    fn add(&mut self, l: &Line<'_>) {
        let r = &mut self.report;
        r.lines += 1;
        r.window.at(&l.ts);
        let denied = l.decision == "deny";
        if denied {
            r.denied += 1;
        } else if l.decision == "allow" {
            r.allowed += 1;
        }
        let destination = if l.host.is_empty() {
            String::new()
        } else {
            format!("{}:{}", l.host, l.port)
        };

        let t = self
            .traffic
            .entry((
                l.identity.to_string(),
                l.stage.to_string(),
                l.purpose.to_string(),
                destination.clone(),
            ))
            .or_insert_with(|| Traffic {
                identity: l.identity.to_string(),
                stage: l.stage.to_string(),
                purpose: l.purpose.to_string(),
                destination: destination.clone(),
                requests: 0,
                allowed: 0,
                denied: 0,
                failed: 0,
                seen: Seen::default(),
            });
        t.requests += 1;
        if denied {
            t.denied += 1;
        } else {
            t.allowed += 1;
            if l.error.is_some() {
                t.failed += 1;
            }
        }
        t.seen.at(&l.ts);

        if denied {
            let error = l.error.as_deref().unwrap_or("").to_string();
            let ids: Vec<String> = l.policy_ids.iter().map(|p| p.to_string()).collect();
            let reason = fold_numbers(l.reason.as_deref().unwrap_or(""));
            let d = self
                .denials
                .entry((
                    l.stage.to_string(),
                    error.clone(),
                    ids.join(","),
                    reason.clone(),
                ))
                .or_insert_with(|| Denial {
                    stage: l.stage.to_string(),
                    error,
                    policy_ids: ids,
                    reason,
                    count: 0,
                    purposes: BTreeSet::new(),
                    destinations: BTreeSet::new(),
                    seen: Seen::default(),
                });
            d.count += 1;
            insert_capped(&mut d.purposes, &l.purpose);
            insert_capped(&mut d.destinations, &destination);
            d.seen.at(&l.ts);
        }

        for s in &l.stripped {
            let e = self
                .secrets
                .entry((s.kind.to_string(), s.fingerprint.to_string()))
                .or_insert_with(|| Secret {
                    kind: s.kind.to_string(),
                    fingerprint: s.fingerprint.to_string(),
                    count: 0,
                    locations: BTreeSet::new(),
                    senders: BTreeSet::new(),
                    destinations: BTreeSet::new(),
                    seen: Seen::default(),
                });
            e.count += 1;
            insert_capped(&mut e.locations, &s.location);
            insert_capped(&mut e.senders, &format!("{} ({})", l.identity, l.stage));
            insert_capped(&mut e.destinations, &destination);
            e.seen.at(&l.ts);
        }

        if let Some(u) = &l.on_behalf_of {
            let d = self
                .delegations
                .entry((
                    u.iss.to_string(),
                    u.sub.to_string(),
                    l.identity.to_string(),
                    l.stage.to_string(),
                    l.purpose.to_string(),
                ))
                .or_insert_with(|| Delegation {
                    user: u.sub.to_string(),
                    issuer: u.iss.to_string(),
                    verified: true,
                    identity: l.identity.to_string(),
                    stage: l.stage.to_string(),
                    purpose: l.purpose.to_string(),
                    requests: 0,
                    allowed: 0,
                    denied: 0,
                    destinations: BTreeSet::new(),
                    seen: Seen::default(),
                });
            d.requests += 1;
            if denied {
                d.denied += 1;
            } else {
                d.allowed += 1;
            }
            d.verified &= u.verified;
            insert_capped(&mut d.destinations, &destination);
            d.seen.at(&l.ts);
        }

        if let Some(m) = &l.mcp {
            let route = l.route.as_deref().unwrap_or("");
            if m.method == "tools/call" && !m.name.is_empty() {
                let t = tool_use(&mut self.tools, route, &m.name);
                t.calls += 1;
                if denied {
                    t.denied += 1;
                    for p in &l.policy_ids {
                        insert_capped(&mut t.denied_by, p);
                    }
                } else {
                    t.allowed += 1;
                }
                insert_capped(&mut t.callers, &format!("{} ({})", l.identity, l.stage));
                t.seen.at(&l.ts);
            }
            for h in &m.hidden {
                let t = tool_use(&mut self.tools, route, h);
                t.hidden += 1;
                t.seen.at(&l.ts);
            }
        }

        if let Some(c) = &l.credential {
            let (u, ids) = self
                .credentials
                .entry((c.name.to_string(), c.kind.to_string()))
                .or_insert_with(|| {
                    (
                        CredentialUse {
                            name: c.name.to_string(),
                            kind: c.kind.to_string(),
                            requests: 0,
                            tokens: 0,
                            scopes: BTreeSet::new(),
                            routes: BTreeSet::new(),
                            flags: BTreeMap::new(),
                            seen: Seen::default(),
                        },
                        HashSet::new(),
                    )
                });
            u.requests += 1;
            // Distinct tokens are counted by a hash of the id: 8 bytes per token, so a
            // million per-call tokens cost 8 MB, not the ids themselves.
            let mut h = std::collections::hash_map::DefaultHasher::new();
            c.id.hash(&mut h);
            ids.insert(h.finish());
            for s in &c.scopes {
                insert_capped(&mut u.scopes, s);
            }
            if let Some(route) = &l.route {
                insert_capped(&mut u.routes, route);
            }
            for f in &c.flags {
                *u.flags.entry(f.to_string()).or_default() += 1;
            }
            u.seen.at(&l.ts);
        }
    }

    /// The report, each table sorted by size (then by name, for a stable order).
    pub(crate) fn finish(mut self) -> Report {
        let mut r = std::mem::take(&mut self.report);
        r.traffic = self.traffic.into_values().collect();
        r.traffic.sort_by(|a, b| {
            b.requests.cmp(&a.requests).then_with(|| {
                (&a.identity, &a.stage, &a.purpose, &a.destination).cmp(&(
                    &b.identity,
                    &b.stage,
                    &b.purpose,
                    &b.destination,
                ))
            })
        });
        r.denials = self.denials.into_values().collect();
        r.denials.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| (&a.stage, &a.reason).cmp(&(&b.stage, &b.reason)))
        });
        r.secrets = self.secrets.into_values().collect();
        r.secrets.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| (&a.kind, &a.fingerprint).cmp(&(&b.kind, &b.fingerprint)))
        });
        r.credentials = self
            .credentials
            .into_values()
            .map(|(mut u, ids)| {
                u.tokens = ids.len() as u64;
                u
            })
            .collect();
        r.credentials.sort_by(|a, b| {
            b.requests
                .cmp(&a.requests)
                .then_with(|| a.name.cmp(&b.name))
        });
        r.tools = self.tools.into_values().collect();
        r.tools.sort_by(|a, b| {
            (b.calls, b.hidden)
                .cmp(&(a.calls, a.hidden))
                .then_with(|| (&a.route, &a.tool).cmp(&(&b.route, &b.tool)))
        });
        r.delegations = self.delegations.into_values().collect();
        r.delegations.sort_by(|a, b| {
            b.requests.cmp(&a.requests).then_with(|| {
                (&a.user, &a.identity, &a.purpose).cmp(&(&b.user, &b.identity, &b.purpose))
            })
        });
        r
    }
}

/// The row of one tool on one route.
fn tool_use<'a>(
    tools: &'a mut HashMap<(String, String), ToolUse>,
    route: &str,
    tool: &str,
) -> &'a mut ToolUse {
    tools
        .entry((route.to_string(), tool.to_string()))
        .or_insert_with(|| ToolUse {
            route: route.to_string(),
            tool: tool.to_string(),
            calls: 0,
            allowed: 0,
            denied: 0,
            callers: BTreeSet::new(),
            denied_by: BTreeSet::new(),
            hidden: 0,
            seen: Seen::default(),
        })
}

/// Sets in the report list at most this many values (a `...` entry says more were seen),
/// so a scan of many distinct destinations cannot blow up the report.
const SET_CAP: usize = 50;

fn insert_capped(set: &mut BTreeSet<String>, v: &str) {
    if v.is_empty() || set.contains(v) {
        return;
    }
    if set.len() < SET_CAP {
        set.insert(v.to_string());
    } else {
        set.insert("...".to_string());
    }
}

/// The report as tables for people; `top` rows per table.
pub(crate) fn render(r: &Report, top: usize) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} requests from {} to {}: {} allowed, {} denied",
        r.lines, r.window.first, r.window.last, r.allowed, r.denied
    );
    if r.skipped > 0 {
        let _ = writeln!(
            out,
            "{} lines skipped as not purpose-log JSON (first at {})",
            r.skipped,
            r.first_skipped.as_deref().unwrap_or("?")
        );
    }
    section(
        &mut out,
        "Traffic by identity, stage, purpose and destination",
        &[
            "identity",
            "stage",
            "purpose",
            "destination",
            "requests",
            "allowed",
            "denied",
            "failed",
            "last seen",
        ],
        &r.traffic,
        top,
        |t| {
            vec![
                t.identity.clone(),
                t.stage.clone(),
                t.purpose.clone(),
                t.destination.clone(),
                t.requests.to_string(),
                t.allowed.to_string(),
                t.denied.to_string(),
                t.failed.to_string(),
                t.seen.last.clone(),
            ]
        },
    );
    section(
        &mut out,
        "Denials",
        &[
            "count",
            "stage",
            "error",
            "policies",
            "reason",
            "destinations",
        ],
        &r.denials,
        top,
        |d| {
            vec![
                d.count.to_string(),
                d.stage.clone(),
                d.error.clone(),
                if d.policy_ids.is_empty() {
                    "-".into()
                } else {
                    d.policy_ids.join(",")
                },
                d.reason.clone(),
                join(&d.destinations),
            ]
        },
    );
    section(
        &mut out,
        "Embedded secrets (by type and fingerprint, never the value)",
        &[
            "type",
            "fingerprint",
            "count",
            "first seen",
            "last seen",
            "locations",
            "sent by",
        ],
        &r.secrets,
        top,
        |s| {
            vec![
                s.kind.clone(),
                s.fingerprint.clone(),
                s.count.to_string(),
                s.seen.first.clone(),
                s.seen.last.clone(),
                join(&s.locations),
                join(&s.senders),
            ]
        },
    );
    section(
        &mut out,
        "Credentials used",
        &[
            "credential",
            "kind",
            "requests",
            "tokens",
            "scopes",
            "routes",
            "flags",
        ],
        &r.credentials,
        top,
        |c| {
            vec![
                c.name.clone(),
                c.kind.clone(),
                c.requests.to_string(),
                c.tokens.to_string(),
                join(&c.scopes),
                join(&c.routes),
                c.flags
                    .iter()
                    .map(|(f, n)| format!("{f}={n}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        },
    );
    if !r.tools.is_empty() {
        section(
            &mut out,
            "MCP tools: calls by tool, and listings they were hidden from",
            &[
                "route",
                "tool",
                "calls",
                "allowed",
                "denied",
                "denied by",
                "hidden from lists",
                "callers",
                "last seen",
            ],
            &r.tools,
            top,
            |t| {
                vec![
                    t.route.clone(),
                    t.tool.clone(),
                    t.calls.to_string(),
                    t.allowed.to_string(),
                    t.denied.to_string(),
                    join(&t.denied_by),
                    t.hidden.to_string(),
                    join(&t.callers),
                    t.seen.last.clone(),
                ]
            },
        );
    }
    if !r.delegations.is_empty() {
        section(
            &mut out,
            "On behalf of users: who acted for whom, for what",
            &[
                "user",
                "issuer",
                "verified",
                "acting identity",
                "stage",
                "purpose",
                "requests",
                "allowed",
                "denied",
                "destinations",
                "last seen",
            ],
            &r.delegations,
            top,
            |d| {
                vec![
                    d.user.clone(),
                    d.issuer.clone(),
                    if d.verified { "yes" } else { "NO" }.into(),
                    d.identity.clone(),
                    d.stage.clone(),
                    d.purpose.clone(),
                    d.requests.to_string(),
                    d.allowed.to_string(),
                    d.denied.to_string(),
                    join(&d.destinations),
                    d.seen.last.clone(),
                ]
            },
        );
    }
    out
}

/// One table of the report: a blank line and its title, the first `top` items as rows, and
/// how many were left out.
fn section<T>(
    out: &mut String,
    title: &str,
    head: &[&str],
    items: &[T],
    top: usize,
    row: impl Fn(&T) -> Vec<String>,
) {
    use std::fmt::Write;
    let _ = writeln!(out, "\n{title}");
    let rows: Vec<Vec<String>> = items.iter().take(top).map(row).collect();
    table(out, head, &rows);
    if items.len() > top {
        let _ = writeln!(
            out,
            "  ... {} more (--top N, or --json for all)",
            items.len() - top
        );
    }
}

fn join(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(" ")
}

/// Columns padded to their widest cell; `(none)` for an empty table.
fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    use std::fmt::Write;
    if rows.is_empty() {
        let _ = writeln!(out, "  (none)");
        return;
    }
    let mut width: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::from(" ");
        for (cell, w) in cells.zip(&width) {
            let _ = write!(s, " {cell:<w$}");
        }
        let _ = writeln!(out, "{}", s.trim_end());
    };
    line(out, &mut head.iter().copied());
    for row in rows {
        line(out, &mut row.iter().map(String::as_str));
    }
}

/// `chaperone audit LOG...`: 0, or 2 when a log cannot be read.
pub(crate) fn command(logs: &[PathBuf], json: bool, top: usize) -> Exit {
    let mut a = Auditor::new();
    for path in logs {
        if let Err(e) = a.read_path(path) {
            eprintln!("chaperone audit: {}: {e}", path.display());
            return Exit::Error;
        }
    }
    let report = a.finish();
    super::print_report(json, &report, |r| render(r, top))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_fold_so_one_cause_is_one_row() {
        assert_eq!(
            fold_numbers("the connection from 127.0.0.1:39142 belongs to uid 0"),
            "the connection from #.#.#.#:# belongs to uid #"
        );
        assert_eq!(fold_numbers("no policy permits"), "no policy permits");
    }

    #[test]
    fn delegations_say_who_acted_for_whom_for_what() {
        let mut a = Auditor::new();
        let line = |sub: &str, purpose: &str, decision: &str, verified: bool| {
            format!(
                r#"{{"ts":"2026-12-01T10:00:00.000Z","identity":"spiffe://t/agent","stage":"main","purpose":"{purpose}","host":"tickets.internal","port":443,"decision":"{decision}","on_behalf_of":{{"iss":"https://idp","sub":"{sub}","verified":{verified}}}}}"#
            )
        };
        let text = [
            line("alice", "read", "allow", true),
            line("alice", "read", "allow", true),
            line("bob", "delete", "deny", true),
            line("mallory", "read", "allow", false),
            r#"{"ts":"2026-12-01T10:00:01.000Z","identity":"spiffe://t/agent","decision":"allow"}"#
                .to_string(),
        ]
        .join("\n");
        a.read("log", text.as_bytes()).unwrap();
        let r = a.finish();
        assert_eq!(r.delegations.len(), 3, "{:?}", r.delegations);
        let alice = &r.delegations[0];
        assert_eq!(
            (alice.user.as_str(), alice.requests, alice.verified),
            ("alice", 2, true)
        );
        let bob = r.delegations.iter().find(|d| d.user == "bob").unwrap();
        assert_eq!((bob.denied, bob.purpose.as_str()), (1, "delete"));
        assert!(
            !r.delegations
                .iter()
                .find(|d| d.user == "mallory")
                .unwrap()
                .verified
        );
        let text = render(&r, 20);
        assert!(text.contains("On behalf of users"), "{text}");
        assert!(text.contains("tickets.internal:443"), "{text}");
    }

    #[test]
    fn tools_are_counted_by_call_and_by_listing() {
        let line = |decision: &str, mcp: &str, ids: &str| {
            format!(
                r#"{{"ts":"2026-12-01T10:00:00.000Z","identity":"spiffe://t/agent","stage":"main","purpose":"p","host":"tools.internal","port":443,"route":"tools","decision":"{decision}","policy_ids":[{ids}],"mcp":{mcp}}}"#
            )
        };
        let text = [
            line(
                "allow",
                r#"{"method":"tools/list","hidden":["delete_repository"]}"#,
                "",
            ),
            line(
                "allow",
                r#"{"method":"tools/call","name":"search_docs","id":1}"#,
                r#""search""#,
            ),
            line(
                "allow",
                r#"{"method":"tools/call","name":"search_docs","id":2}"#,
                r#""search""#,
            ),
            line(
                "deny",
                r#"{"method":"tools/call","name":"delete_repository","id":3}"#,
                r#""never-delete""#,
            ),
            line("allow", r#"{"method":"initialize"}"#, ""),
        ]
        .join("\n");
        let mut a = Auditor::new();
        a.read("log", text.as_bytes()).unwrap();
        let r = a.finish();
        assert_eq!(r.tools.len(), 2, "{:?}", r.tools);
        let search = &r.tools[0];
        assert_eq!(
            (
                search.tool.as_str(),
                search.calls,
                search.allowed,
                search.hidden
            ),
            ("search_docs", 2, 2, 0)
        );
        let delete = &r.tools[1];
        assert_eq!((delete.calls, delete.denied, delete.hidden), (1, 1, 1));
        assert!(delete.denied_by.contains("never-delete"));
        let text = render(&r, 10);
        assert!(text.contains("MCP tools"), "{text}");
    }

    #[test]
    fn a_cut_line_is_skipped_and_named() {
        let mut a = Auditor::new();
        let text = "{\"ts\":\"2026-11-24T10:00:00.000Z\",\"identity\":\"i\",\"decision\":\"allow\"}\n{\"ts\":\"2026-11-24T10:00:01\n\n";
        a.read("log", text.as_bytes()).unwrap();
        let r = a.finish();
        assert_eq!((r.lines, r.skipped), (1, 1));
        assert_eq!(r.first_skipped.as_deref(), Some("log:2"));
    }
}
