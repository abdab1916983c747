//! Configuration: parse YAML with positions, validate every key, build runtime settings.
//!
//! Loading is all-or-nothing and happens before any listener binds. Syntax and schema errors
//! (unknown keys, wrong types) stop the parse at the first one, since serde cannot continue
//! past them; every semantic error after that (bad addresses, dangling references, unreadable
//! files, policy that does not parse) is collected and reported together, each as
//! `FILE:LINE:COL: key: message`.

mod schema;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use marked_yaml::{LoaderOptions, Marker, Node};

pub(crate) use schema::*;

use crate::credentials::{CredentialSpec, JwtSpec, KeySource, StaticSource};
use crate::egress::UpstreamProxy;
use crate::identify::Identity;
use crate::policy::PolicySource;
use crate::proxy::{ListenAddr, ListenerSpec, Timeouts, TlsSettings};
use crate::purpose_log::{LogFormat, LogOutput};
use crate::route::{HostMatch, InjectSpec, Route, RouteTimeouts};
use crate::strip::StripSettings;

/// Default proxy listener.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:15001";
/// Default admin listener.
pub(crate) const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
/// Default cap on client connections per listener.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default inspected body size for embedded secrets.
pub(crate) const DEFAULT_BODY_MAX_BYTES: u64 = 64 * 1024;
/// Longest lifetime a locally minted per-call token may have.
pub(crate) const MAX_JWT_TTL: Duration = Duration::from_secs(300);

/// One configuration problem, located in the source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError {
    /// The file the problem is in.
    pub(crate) file: String,
    /// 1-based line, 0 when unknown.
    pub(crate) line: usize,
    /// 1-based column, 0 when unknown.
    pub(crate) column: usize,
    /// Dotted path of the key, e.g. `routes[0].credential`.
    pub(crate) key: String,
    /// What is wrong, in words a user can act on.
    pub(crate) message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = if self.key.is_empty() {
            "(root)"
        } else {
            &self.key
        };
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.column, key, self.message
        )
    }
}

/// Every problem found in one configuration.
#[derive(Debug, Clone)]
pub(crate) struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// The file the configuration came from, or `<embedded defaults>`.
    pub(crate) source: String,
    /// True when running on embedded defaults: proxy and report, inject nothing.
    pub(crate) observe_mode: bool,
    /// The main listener and then one per stage.
    pub(crate) listeners: Vec<ListenerSpec>,
    /// Admin server address.
    pub(crate) admin: SocketAddr,
    /// TLS interception and upstream TLS.
    pub(crate) tls: TlsSettings,
    /// Credential sources by name.
    pub(crate) credentials: BTreeMap<String, CredentialSpec>,
    /// Routes in match order.
    pub(crate) routes: Vec<Route>,
    /// Embedded-secret handling.
    pub(crate) strip: StripSettings,
    /// Authorization policy.
    pub(crate) policy: PolicySource,
    /// Purpose-log format.
    pub(crate) log_format: LogFormat,
    /// Purpose-log output.
    pub(crate) log_output: LogOutput,
    /// Timeouts.
    pub(crate) timeouts: Timeouts,
    /// Proxy worker threads.
    pub(crate) workers: usize,
    /// The policy compiled from `policy` when the file was validated (not for the embedded
    /// one), so starting does not compile it a second time.
    pub(crate) policy_engine: Option<Arc<crate::policy::PolicyEngine>>,
    /// Client connections open at most per listener.
    pub(crate) max_connections: usize,
    /// Connections each worker keeps open to one upstream at most.
    pub(crate) max_connections_per_upstream: usize,
    /// The corporate proxy connections out go through, if any.
    pub(crate) upstream_proxy: Option<UpstreamProxy>,
}

impl Config {
    /// Load and validate a configuration file.
    pub(crate) fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let (file, text) = read_file(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_yaml(&file, &text, base, false)
    }

    /// The embedded defaults: observe mode, everything proxied and reported, nothing injected.
    pub(crate) fn embedded_default() -> Config {
        let mut cfg = Self::from_yaml(
            "<embedded defaults>",
            EMBEDDED_DEFAULTS,
            Path::new("."),
            true,
        )
        .expect("embedded defaults are valid");
        cfg.observe_mode = true;
        cfg
    }

    /// Parse and validate YAML text; relative paths resolve against `base`.
    pub(crate) fn from_yaml(
        file: &str,
        text: &str,
        base: &Path,
        embedded: bool,
    ) -> Result<Config, ConfigErrors> {
        match validate(file, text, base, embedded)? {
            (Some(cfg), problems) if problems.is_empty() => Ok(cfg),
            (_, problems) => Err(ConfigErrors(
                problems.into_iter().map(|p| p.error).collect(),
            )),
        }
    }

    /// Load for deciding policy offline (`chaperone policy ...` in an app's CI): everything
    /// is validated as by [`Config::load`], except that secret material which exists only
    /// where the sidecar runs (credential and TLS files, `from_env` variables) may be
    /// missing. The policy files must be readable. Returns the config and what was
    /// overlooked, to be mentioned.
    pub(crate) fn load_offline(path: &Path) -> Result<(Config, Vec<ConfigError>), ConfigErrors> {
        let (file, text) = read_file(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let (cfg, problems) = validate(&file, &text, base, false)?;
        let (overlooked, errors): (Vec<Problem>, Vec<Problem>) =
            problems.into_iter().partition(|p| p.pod_only);
        let (overlooked, errors): (Vec<ConfigError>, Vec<ConfigError>) = (
            overlooked.into_iter().map(|p| p.error).collect(),
            errors.into_iter().map(|p| p.error).collect(),
        );
        match cfg {
            Some(cfg) if errors.is_empty() => Ok((cfg, overlooked)),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

/// Observe mode (DESIGN §3): proxy everything but the guardrail addresses, report embedded
/// secrets without touching them, inject nothing, log every request.
const EMBEDDED_DEFAULTS: &str = r#"
listen: 127.0.0.1:15001
admin: 127.0.0.1:15000
identity:
  id: spiffe://chaperone.local/observe
  workload: unknown
  environment: unknown
strip:
  mode: report
log:
  format: json
  output: stdout
"#;

/// Observe mode permits everything that passes the guardrails.
pub(crate) const OBSERVE_POLICY: &str =
    "@id(\"observe-mode-permit-all\")\npermit(principal, action, resource);\n";

/// A config file's name and text.
fn read_file(path: &Path) -> Result<(String, String), ConfigErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((file, text)),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file,
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read the file: {e}"),
        }])),
    }
}

/// Parse and validate: the config as far as it could be built, and every problem found.
fn validate(
    file: &str,
    text: &str,
    base: &Path,
    embedded: bool,
) -> Result<(Option<Config>, Vec<Problem>), ConfigErrors> {
    let (node, raw) = parse_yaml::<FileConfig>(file, text).map_err(|e| ConfigErrors(vec![e]))?;
    let mut v = Validator {
        file,
        root: &node,
        base,
        problems: Vec::new(),
        compiled_policy: None,
    };
    let cfg = v.build(raw, embedded);
    Ok((cfg, v.problems))
}

/// Parse YAML into `T` (unknown keys rejected by `T`), keeping the node for positions. The
/// error names the file, line and key.
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(
    file: &str,
    text: &str,
) -> Result<(Node, T), ConfigError> {
    let opts = LoaderOptions::default().error_on_duplicate_keys(true);
    let node =
        marked_yaml::parse_yaml_with_options(0, text, opts).map_err(|e| load_error(file, &e))?;
    let typed: T = marked_yaml::from_node(&node).map_err(|e| {
        let mark = e.start_mark();
        let key = e.path().unwrap_or("").trim_start_matches('.').to_string();
        let (line, column) = mark.map(|m| (m.line(), m.column())).unwrap_or((0, 0));
        ConfigError {
            file: file.to_string(),
            line,
            column,
            key,
            message: e.into_inner().to_string(),
        }
    })?;
    Ok((node, typed))
}

fn load_error(file: &str, e: &marked_yaml::LoadError) -> ConfigError {
    use marked_yaml::LoadError as L;
    let (mark, message): (Option<&Marker>, String) = match e {
        L::TopLevelMustBeMapping(m) => (Some(m), "the top level must be a mapping".into()),
        L::TopLevelMustBeSequence(m) => (Some(m), "the top level must be a sequence".into()),
        L::UnexpectedAnchor(m) => (Some(m), "YAML anchors are not supported".into()),
        L::MappingKeyMustBeScalar(m) => (Some(m), "mapping keys must be plain strings".into()),
        L::UnexpectedTag(m) => (Some(m), "YAML tags are not supported".into()),
        L::ScanError(m, s) => (Some(m), format!("YAML syntax error: {s}")),
        L::DuplicateKey(d) => (
            d.key.span().start(),
            format!("duplicate key `{}`", d.key.as_str()),
        ),
        #[allow(unreachable_patterns)]
        other => (None, other.to_string()),
    };
    let (line, column) = mark.map(|m| (m.line(), m.column())).unwrap_or((0, 0));
    ConfigError {
        file: file.to_string(),
        line,
        column,
        key: String::new(),
        message,
    }
}

/// One step of a key path.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Idx(usize),
}

/// A problem found in validation.
struct Problem {
    error: ConfigError,
    /// Secret material that exists only where the sidecar runs (credential and TLS files,
    /// `from_env` variables) is missing: an error for the sidecar, overlooked offline.
    pod_only: bool,
}

/// Semantic validation with positions.
struct Validator<'a> {
    file: &'a str,
    root: &'a Node,
    base: &'a Path,
    /// In the order found.
    problems: Vec<Problem>,
    /// The policy as compiled to validate it, kept so starting does not compile it again.
    compiled_policy: Option<Arc<crate::policy::PolicyEngine>>,
}

impl Validator<'_> {
    /// Record an error at a key path; the position is that of the deepest node that exists.
    fn err(&mut self, path: &[Seg<'_>], message: impl Into<String>) {
        self.record(path, message.into(), false);
    }

    /// Record that secret material the sidecar needs is missing here (see
    /// [`Problem::pod_only`]).
    fn absent(&mut self, path: &[Seg<'_>], message: impl Into<String>) {
        self.record(path, message.into(), true);
    }

    fn record(&mut self, path: &[Seg<'_>], message: String, pod_only: bool) {
        let mut node = Some(self.root);
        let mut mark = self.root.span().start().copied();
        for seg in path {
            node = match (node, seg) {
                (Some(Node::Mapping(m)), Seg::Key(k)) => {
                    // Point at the key itself: that is where the user looks.
                    if let Some((key, _)) = m.iter().find(|(key, _)| key.as_str() == *k) {
                        mark = key.span().start().copied().or(mark);
                    }
                    m.get_node(k)
                }
                (Some(Node::Sequence(s)), Seg::Idx(i)) => s.get_node(*i),
                _ => None,
            };
            if let (Some(n), Seg::Idx(_)) = (node, seg) {
                mark = n.span().start().copied().or(mark);
            }
        }
        let (line, column) = mark.map(|m| (m.line(), m.column())).unwrap_or((0, 0));
        let mut key = String::new();
        for seg in path {
            match seg {
                Seg::Key(k) => {
                    if !key.is_empty() {
                        key.push('.');
                    }
                    key.push_str(k);
                }
                Seg::Idx(i) => key.push_str(&format!("[{i}]")),
            }
        }
        self.problems.push(Problem {
            error: ConfigError {
                file: self.file.to_string(),
                line,
                column,
                key,
                message,
            },
            pod_only,
        });
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn addr(&mut self, path: &[Seg<'_>], value: Option<&str>, default: &str) -> SocketAddr {
        let s = value.unwrap_or(default);
        match s.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.err(
                    path,
                    format!("`{s}` is not an IP:port address (e.g. 127.0.0.1:15001)"),
                );
                default.parse().expect("default address")
            }
        }
    }

    fn duration(&mut self, path: &[Seg<'_>], value: Option<&str>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    self.err(path, "must be longer than zero");
                    default
                }
                Err(e) => {
                    self.err(
                        path,
                        format!("`{s}` is not a duration with units (e.g. 30s, 500ms): {e}"),
                    );
                    default
                }
            },
        }
    }

    fn nonempty(&mut self, path: &[Seg<'_>], value: &str) {
        if value.trim().is_empty() {
            self.err(path, "must not be empty");
        }
    }

    fn build(&mut self, raw: FileConfig, embedded: bool) -> Option<Config> {
        use Seg::*;
        let listen = self.addr(&[Key("listen")], raw.listen.as_deref(), DEFAULT_LISTEN);
        let admin = self.addr(&[Key("admin")], raw.admin.as_deref(), DEFAULT_ADMIN);

        let id = &raw.identity;
        self.nonempty(&[Key("identity"), Key("id")], &id.id);
        if id.id.starts_with("spiffe://") && !valid_spiffe_id(&id.id) {
            self.err(
                &[Key("identity"), Key("id")],
                "not a valid SPIFFE ID (spiffe://trust-domain/path, lowercase trust domain)",
            );
        }
        self.nonempty(&[Key("identity"), Key("workload")], &id.workload);
        self.nonempty(&[Key("identity"), Key("environment")], &id.environment);
        let identity = Identity {
            id: id.id.clone(),
            workload: id.workload.clone(),
            stage: id.stage.clone().unwrap_or_else(|| "main".into()),
            environment: id.environment.clone(),
        };

        let callers = self.callers(
            &[Key("identity"), Key("callers"), Key("uids")],
            id.callers.as_ref(),
        );
        let mut listeners = vec![ListenerSpec {
            addr: ListenAddr::Tcp(listen),
            identity: identity.clone(),
            callers,
        }];
        let mut seen_addrs = HashSet::from([listen, admin]);
        let mut seen_unix = HashSet::new();
        if listen == admin && listen.port() != 0 {
            self.err(
                &[Key("admin")],
                "the admin address must differ from `listen`",
            );
        }
        let mut stage_names = HashSet::from([identity.stage.clone()]);
        for (i, st) in raw.stages.iter().enumerate() {
            self.nonempty(&[Key("stages"), Idx(i), Key("name")], &st.name);
            if !stage_names.insert(st.name.clone()) {
                self.err(
                    &[Key("stages"), Idx(i), Key("name")],
                    format!("stage `{}` is defined twice", st.name),
                );
            }
            let at = [Key("stages"), Idx(i), Key("listen")];
            let addr = match st.listen.strip_prefix("unix:") {
                Some(path) => {
                    let path = self.path(path);
                    if seen_unix.contains(&path) {
                        self.err(
                            &at,
                            format!("{} is already used by another listener", path.display()),
                        );
                    }
                    match path.parent() {
                        Some(dir) if dir.is_dir() => {}
                        _ => self.err(
                            &at,
                            format!("the directory of {} does not exist (in Kubernetes, mount an emptyDir shared with the stage's container)", path.display()),
                        ),
                    }
                    seen_unix.insert(path.clone());
                    ListenAddr::Unix(path)
                }
                None => {
                    let addr = self.addr(&at, Some(&st.listen), DEFAULT_LISTEN);
                    if !seen_addrs.insert(addr) && addr.port() != 0 {
                        self.err(&at, format!("{addr} is already used by another listener"));
                    }
                    ListenAddr::Tcp(addr)
                }
            };
            let callers = self.callers(
                &[Key("stages"), Idx(i), Key("callers"), Key("uids")],
                st.callers.as_ref(),
            );
            listeners.push(ListenerSpec {
                addr,
                identity: Identity {
                    id: st.id.clone().unwrap_or_else(|| identity.id.clone()),
                    workload: identity.workload.clone(),
                    stage: st.name.clone(),
                    environment: identity.environment.clone(),
                },
                callers,
            });
        }

        let tls = match &raw.tls {
            None => TlsSettings::default(),
            Some(t) => self.tls(t),
        };

        let subject_token_file = id.subject_token_file.as_deref().map(|f| self.path(f));
        let trust_domain = match &id.trust_domain {
            Some(td) if td.trim().is_empty() || td.contains(char::is_whitespace) => {
                self.err(
                    &[Key("identity"), Key("trust_domain")],
                    "a trust domain is one name without spaces (example.org)",
                );
                None
            }
            Some(td) => Some(td.clone()),
            None => identity
                .id
                .strip_prefix("spiffe://")
                .map(|rest| rest.split('/').next().unwrap_or(rest).to_string()),
        };
        let mut credentials = BTreeMap::new();
        for (name, c) in &raw.credentials {
            let p = [Key("credentials"), Key(name.as_str())];
            if let Some(spec) = self.credential(
                &p,
                name,
                c,
                &identity,
                subject_token_file.as_ref(),
                trust_domain.as_deref(),
            ) {
                credentials.insert(name.clone(), spec);
            }
        }

        // A chained assertion comes from a token-endpoint credential that is not chained
        // itself (no cycles).
        for (name, spec) in &credentials {
            if let CredentialSpec::OAuth(o) = spec
                && let crate::credentials::Grant::JwtBearer(crate::credentials::Assertion::From(
                    other,
                )) = &o.grant
            {
                let fits = matches!(credentials.get(other), Some(CredentialSpec::OAuth(x))
                    if !matches!(x.grant, crate::credentials::Grant::JwtBearer(_)));
                if !fits {
                    self.err(
                        &[
                            Key("credentials"),
                            Key(name.as_str()),
                            Key("assertion_from"),
                        ],
                        format!(
                            "`{other}` is not a client_credentials or token_exchange credential"
                        ),
                    );
                }
            }
        }
        // A secret store is read with one of the `aws` credentials.
        for (name, spec) in &credentials {
            if let CredentialSpec::Static {
                source: StaticSource::Store(s),
                ..
            } = spec
                && !matches!(credentials.get(&s.credential), Some(CredentialSpec::Aws(_)))
            {
                let key = match s.store {
                    crate::credentials::stores::Store::SecretsManager { .. } => "from_aws_secret",
                    crate::credentials::stores::Store::Parameter { .. } => "from_aws_parameter",
                };
                let aws: Vec<&str> = credentials
                    .iter()
                    .filter(|(_, c)| matches!(c, CredentialSpec::Aws(_)))
                    .map(|(n, _)| n.as_str())
                    .collect();
                self.err(
                    &[
                        Key("credentials"),
                        Key(name.as_str()),
                        Key(key),
                        Key("credential"),
                    ],
                    format!(
                        "`{}` is not a credential of kind aws (those defined: {})",
                        s.credential,
                        if aws.is_empty() {
                            "none".into()
                        } else {
                            aws.join(", ")
                        }
                    ),
                );
            }
        }

        let mut routes = Vec::new();
        let mut route_names = HashSet::new();
        for (i, r) in raw.routes.iter().enumerate() {
            if !route_names.insert(r.name.clone()) {
                self.err(
                    &[Key("routes"), Idx(i), Key("name")],
                    format!("route `{}` is defined twice", r.name),
                );
            }
            if let Some(route) = self.route(i, r, &credentials) {
                routes.push(route);
            }
        }

        let body_max_bytes = raw.strip.body_max_bytes.unwrap_or(DEFAULT_BODY_MAX_BYTES);
        if body_max_bytes > 16 * 1024 * 1024 {
            self.err(
                &[Key("strip"), Key("body_max_bytes")],
                "at most 16 MiB (bodies this size are buffered)",
            );
        }
        let fingerprint_key_file = raw.strip.fingerprint_key_file.as_deref().map(|f| {
            let p = self.path(f);
            if let Err(e) = std::fs::metadata(&p) {
                self.absent(
                    &[Key("strip"), Key("fingerprint_key_file")],
                    format!("cannot read {}: {e}", p.display()),
                );
            }
            p
        });
        let strip = StripSettings {
            mode: raw.strip.mode,
            body_max_bytes,
            fingerprint_key_file,
        };

        let label_keys: BTreeSet<String> = routes
            .iter()
            .flat_map(|r| r.labels.keys().cloned())
            .collect();
        let mcp_arguments = self.mcp_arguments(&raw.routes);
        let policy = match (&raw.policy, embedded) {
            (None, true) => PolicySource::inline("<embedded>", OBSERVE_POLICY)
                .with_labels(label_keys)
                .with_arguments(mcp_arguments),
            (None, false) => {
                self.err(&[Key("policy")], "a policy file is required (`policy: { file: policy.cedar }`); without one every request is denied");
                PolicySource::inline("", "")
            }
            (Some(p), _) => self.policy(p, label_keys, mcp_arguments),
        };

        let log_format = match raw.log.format.as_deref() {
            None | Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(other) => {
                self.err(
                    &[Key("log"), Key("format")],
                    format!("`{other}` is not a log format: use json or pretty"),
                );
                LogFormat::Json
            }
        };
        let log_output = match raw.log.output.as_deref() {
            None | Some("stdout") => LogOutput::Stdout,
            Some("stderr") => LogOutput::Stderr,
            Some(path) => {
                let p = self.path(path);
                match p.parent() {
                    Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
                        self.err(
                            &[Key("log"), Key("output")],
                            format!("directory {} does not exist", dir.display()),
                        );
                    }
                    _ => {}
                }
                LogOutput::File(p)
            }
        };

        let t = &raw.timeouts;
        let k = |name| [Key("timeouts"), Key(name)];
        let timeouts = Timeouts {
            connect: self.duration(&k("connect"), t.connect.as_deref(), Duration::from_secs(5)),
            response_head: match (&t.response_head, &t.request) {
                (Some(_), Some(_)) => {
                    self.err(
                        &k("request"),
                        "`request` is the former name of `response_head`: set one of them",
                    );
                    Duration::from_secs(300)
                }
                (Some(v), None) => self.duration(&k("response_head"), Some(v), Duration::ZERO),
                (None, v) => self.duration(&k("request"), v.as_deref(), Duration::from_secs(300)),
            },
            header_read: self.duration(
                &k("header_read"),
                t.header_read.as_deref(),
                Duration::from_secs(30),
            ),
            idle: self.duration(&k("idle"), t.idle.as_deref(), Duration::from_secs(300)),
            shutdown_grace: self.duration(
                &k("shutdown_grace"),
                t.shutdown_grace.as_deref(),
                Duration::from_secs(10),
            ),
        };

        let upstream_proxy = raw
            .upstream_proxy
            .as_ref()
            .and_then(|p| self.upstream_proxy(p));

        let workers = match raw.workers {
            None => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(64),
            Some(n @ 1..=256) => n,
            Some(_) => {
                self.err(&[Key("workers")], "between 1 and 256");
                1
            }
        };

        let max_connections = match raw.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(n @ 1..=1_000_000) => n,
            Some(_) => {
                self.err(&[Key("max_connections")], "between 1 and 1000000");
                DEFAULT_MAX_CONNECTIONS
            }
        };

        let max_connections_per_upstream = match raw.max_connections_per_upstream {
            None => crate::proxy::slots::DEFAULT_PER_UPSTREAM,
            Some(n @ 1..=100_000) => n,
            Some(_) => {
                self.err(
                    &[Key("max_connections_per_upstream")],
                    "between 1 and 100000",
                );
                crate::proxy::slots::DEFAULT_PER_UPSTREAM
            }
        };

        Some(Config {
            source: self.file.to_string(),
            observe_mode: false,
            listeners,
            admin,
            tls,
            credentials,
            routes,
            strip,
            policy,
            log_format,
            log_output,
            timeouts,
            workers,
            policy_engine: self.compiled_policy.take(),
            max_connections,
            max_connections_per_upstream,
            upstream_proxy,
        })
    }

    fn upstream_proxy(&mut self, p: &UpstreamProxyConfig) -> Option<UpstreamProxy> {
        use Seg::*;
        let at = |k| [Key("upstream_proxy"), Key(k)];
        let url: Option<http::Uri> = match p.url.parse::<http::Uri>() {
            Ok(u) if u.scheme_str() != Some("http") => {
                self.err(
                    &at("url"),
                    "an http:// proxy URL (the proxy is reached in plain HTTP; https:// upstreams stay TLS end to end through its CONNECT tunnels)",
                );
                None
            }
            Ok(u) if u.authority().is_some_and(|a| a.as_str().contains('@')) => {
                self.err(
                    &at("url"),
                    "credentials never go in the URL: put `user:password` in a file and name it in `auth_file`",
                );
                None
            }
            Ok(u) if u.host().is_none_or(str::is_empty) => {
                self.err(&at("url"), "the URL names no host");
                None
            }
            Ok(u) => Some(u),
            Err(e) => {
                self.err(&at("url"), format!("not a URL: {e}"));
                None
            }
        };
        for (i, n) in p.no_proxy.iter().enumerate() {
            if n.trim().is_empty() || n.contains(',') {
                self.err(
                    &[Key("upstream_proxy"), Key("no_proxy"), Idx(i)],
                    "one host name, IP address, CIDR range or `*` per entry",
                );
            }
        }
        let credentials = p.auth_file.as_deref().and_then(|f| {
            let path = self.path(f);
            match std::fs::read_to_string(&path) {
                // Never echo the content: it is a secret.
                Ok(s) if s.trim().contains(':') => {
                    Some(secrecy::SecretString::from(s.trim().to_string()))
                }
                Ok(_) => {
                    self.err(
                        &at("auth_file"),
                        format!("{} does not hold `user:password`", path.display()),
                    );
                    None
                }
                Err(e) => {
                    self.absent(
                        &at("auth_file"),
                        format!("cannot read {}: {e}", path.display()),
                    );
                    None
                }
            }
        });
        Some(UpstreamProxy {
            url: url?,
            no_proxy: p.no_proxy.iter().map(|n| n.trim().to_string()).collect(),
            credentials,
        })
    }

    fn callers(&mut self, at: &[Seg<'_>], c: Option<&CallersConfig>) -> Option<Vec<u32>> {
        let c = c?;
        if c.uids.is_empty() {
            self.err(
                at,
                "list at least one UID (omit `callers` to admit any local process)",
            );
        }
        Some(c.uids.clone())
    }

    fn tls(&mut self, t: &TlsConfig) -> TlsSettings {
        use Seg::*;
        let mut out = TlsSettings::default();
        let read = |v: &mut Self, key: &'static str, f: &str| -> Option<String> {
            let p = v.path(f);
            match std::fs::read_to_string(&p) {
                Ok(s) => Some(s),
                Err(e) => {
                    v.absent(
                        &[Key("tls"), Key(key)],
                        format!("cannot read {}: {e}", p.display()),
                    );
                    None
                }
            }
        };
        match (&t.ca_cert, &t.ca_key) {
            (Some(c), Some(k)) => {
                let cert = read(self, "ca_cert", c);
                let key = read(self, "ca_key", k);
                if let (Some(cert), Some(key)) = (cert, key) {
                    match crate::tls::LeafIssuer::from_pem(&cert, &key) {
                        Ok(_) => out.ca = Some((cert, secrecy::SecretString::from(key))),
                        Err(e) => self.err(
                            &[Key("tls"), Key("ca_cert")],
                            format!("cannot use the CA: {e}"),
                        ),
                    }
                }
            }
            (None, None) => {}
            _ => self.err(
                &[Key("tls")],
                "ca_cert and ca_key go together (create them with `chaperone ca init --out DIR`)",
            ),
        }
        out.upstream_roots = match t.upstream_roots.as_deref() {
            None | Some("system") => crate::tls::UpstreamRoots::System,
            Some(path) => crate::tls::UpstreamRoots::Bundle(self.path(path)),
        };
        if out.ca.is_some()
            && let Err(e) = crate::tls::client_config(&out.upstream_roots)
        {
            self.err(&[Key("tls"), Key("upstream_roots")], e.to_string());
        }
        for (i, h) in t.passthrough.iter().enumerate() {
            match HostMatch::parse(h) {
                Ok(m) => out.passthrough.push(m),
                Err(e) => self.err(&[Key("tls"), Key("passthrough"), Idx(i)], e),
            }
        }
        out
    }

    fn credential(
        &mut self,
        p: &[Seg<'_>],
        name: &str,
        c: &CredentialConfig,
        identity: &Identity,
        default_subject: Option<&PathBuf>,
        trust_domain: Option<&str>,
    ) -> Option<CredentialSpec> {
        let at = |k: &'static str| -> Vec<Seg<'_>> {
            let mut v = p.to_vec();
            v.push(Seg::Key(k));
            v
        };
        match c {
            CredentialConfig::Jwt {
                ttl,
                signing_key,
                rotate_every,
                issuer,
                profile,
            } => {
                let profile = match profile.as_deref() {
                    None | Some("access_token") => crate::credentials::Profile::AccessToken,
                    Some("txn_token") => match trust_domain {
                        Some(td) => crate::credentials::Profile::TxnToken {
                            trust_domain: td.to_string(),
                        },
                        None => {
                            self.err(&at("profile"), "a transaction token's audience is the trust domain: set identity.trust_domain (or use a spiffe:// identity id)");
                            return None;
                        }
                    },
                    Some(other) => {
                        self.err(
                            &at("profile"),
                            format!("`{other}` is not access_token or txn_token"),
                        );
                        return None;
                    }
                };
                let ttl = self.duration(&at("ttl"), ttl.as_deref(), Duration::from_secs(60));
                if ttl > MAX_JWT_TTL {
                    self.err(&at("ttl"), "per-call tokens live at most 300s");
                }
                let key = match (signing_key, rotate_every) {
                    (Some(_), Some(_)) => {
                        self.err(&at("rotate_every"), "a signing_key file rotates when the file changes; rotate_every is for generated keys");
                        return None;
                    }
                    (None, r) => KeySource::Generated {
                        rotate_every: r.as_deref().map(|r| {
                            let d = self.duration(&at("rotate_every"), Some(r), Duration::ZERO);
                            if d < Duration::from_secs(60) {
                                self.err(&at("rotate_every"), "at least 1m");
                            }
                            d
                        }),
                    },
                    (Some(f), None) => {
                        let path = self.path(f);
                        // A generated key cannot be bad: nothing to check, no throwaway key.
                        self.signing_key(
                            &at("signing_key"),
                            &path,
                            crate::credentials::Allow::EdOrEc,
                        );
                        KeySource::File(path)
                    }
                };
                let spec = JwtSpec {
                    name: name.to_string(),
                    ttl,
                    issuer: issuer.clone().unwrap_or_else(|| identity.id.clone()),
                    key,
                    profile,
                };
                Some(CredentialSpec::Jwt(spec))
            }
            CredentialConfig::ClientCredentials { .. } => self.oauth(
                p,
                name,
                EndpointFields::of(c)?,
                Some(crate::credentials::Grant::ClientCredentials),
            ),
            CredentialConfig::JwtBearer {
                assertion_file,
                assertion_from,
                ..
            } => {
                let assertion = match (assertion_file, assertion_from) {
                    (Some(f), None) => {
                        let path = self.path(f);
                        if let Err(e) = std::fs::metadata(&path) {
                            self.absent(
                                &at("assertion_file"),
                                format!("cannot read {}: {e}", path.display()),
                            );
                        }
                        Some(crate::credentials::Assertion::File(path))
                    }
                    (None, Some(other)) => Some(crate::credentials::Assertion::From(other.clone())),
                    _ => {
                        self.err(p, "a jwt_bearer credential takes exactly one of assertion_file or assertion_from");
                        None
                    }
                };
                self.oauth(
                    p,
                    name,
                    EndpointFields::of(c)?,
                    assertion.map(crate::credentials::Grant::JwtBearer),
                )
            }
            CredentialConfig::TokenExchange {
                subject_token_file,
                subject_token_type,
                actor_token_file,
                actor_token_type,
                requested_token_type,
                audience,
                impersonate: impersonate_cfg,
                subject_from,
                subject_jwks_url,
                subject_issuer,
                subject_audience,
                ..
            } => {
                let user = match subject_from {
                    None => {
                        for (k, v) in [
                            ("subject_jwks_url", subject_jwks_url),
                            ("subject_issuer", subject_issuer),
                            ("subject_audience", subject_audience),
                        ] {
                            if v.is_some() {
                                self.err(&at(k), "verifies a user's token: needs subject_from");
                            }
                        }
                        None
                    }
                    Some(sf) => {
                        let mut hp = at("subject_from");
                        hp.push(Seg::Key("header"));
                        let header = match http::HeaderName::from_bytes(sf.header.as_bytes()) {
                            Ok(h) if h != http::header::HOST => Some(h),
                            _ => {
                                self.err(
                                    &hp,
                                    format!(
                                        "`{}` is not a header a user token can come in",
                                        sf.header
                                    ),
                                );
                                None
                            }
                        };
                        if subject_token_file.is_some() {
                            self.err(&at("subject_token_file"), "with subject_from the subject is the user's token from the request; the workload's own token goes as actor_token_file");
                        }
                        let jwks = subject_jwks_url.as_deref().and_then(|u| match u.parse::<http::Uri>() {
                            Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some() => Some(uri),
                            Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some_and(is_loopback_host) => Some(uri),
                            _ => {
                                self.err(&at("subject_jwks_url"), format!("`{u}` is not an https URL (http is allowed on loopback addresses only)"));
                                None
                            }
                        });
                        if jwks.is_none() && subject_jwks_url.is_none() {
                            for (k, v) in [
                                ("subject_issuer", subject_issuer),
                                ("subject_audience", subject_audience),
                            ] {
                                if v.is_some() {
                                    self.err(
                                        &at(k),
                                        "checked against the JWKS: needs subject_jwks_url",
                                    );
                                }
                            }
                        }
                        header.map(|header| crate::credentials::UserSubject {
                            header,
                            jwks_url: jwks,
                            issuer: subject_issuer.clone(),
                            audience: subject_audience.clone(),
                        })
                    }
                };
                if subject_from.is_some() && user.is_none() {
                    return None; // reported above
                }
                let impersonate = impersonate_cfg.as_ref().and_then(|i| {
                    let mut ip = at("impersonate");
                    ip.push(Seg::Key("service_account"));
                    let sa = &i.service_account;
                    if !sa.contains('@') || sa.contains(['/', ' ']) {
                        self.err(&ip, format!("`{sa}` is not a service account email (NAME@PROJECT.iam.gserviceaccount.com)"));
                    }
                    let endpoint = i.endpoint.as_deref().unwrap_or(crate::credentials::IAM_CREDENTIALS);
                    let endpoint = match endpoint.parse::<http::Uri>() {
                        Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => Some(u),
                        Ok(u) if u.scheme_str() == Some("http") && u.host().is_some_and(is_loopback_host) => Some(u),
                        _ => {
                            ip.pop();
                            ip.push(Seg::Key("endpoint"));
                            self.err(&ip, format!("`{endpoint}` is not an https URL (http is allowed on loopback addresses only)"));
                            None
                        }
                    };
                    let mut lp = at("impersonate");
                    lp.push(Seg::Key("lifetime"));
                    let lifetime = self.duration(&lp, i.lifetime.as_deref(), Duration::from_secs(3600));
                    if lifetime < Duration::from_secs(60) || lifetime > Duration::from_secs(3600) {
                        self.err(&lp, "between 1m and 1h (longer needs an organization policy exception; ask for it deliberately)");
                    }
                    Some(crate::credentials::Impersonate {
                        service_account: sa.clone(),
                        endpoint: endpoint?,
                        lifetime,
                    })
                });
                if impersonate.is_none() && impersonate_cfg.is_some() {
                    return None; // reported above
                }
                let subject = match subject_token_file
                    .as_deref()
                    .map(|f| self.path(f))
                    .or_else(|| default_subject.cloned())
                {
                    _ if user.is_some() => Some(PathBuf::new()),
                    Some(path) => {
                        if let Err(e) = std::fs::metadata(&path) {
                            self.absent(
                                &at("subject_token_file"),
                                format!("cannot read {}: {e}", path.display()),
                            );
                        }
                        Some(path)
                    }
                    None => {
                        self.err(p, "token exchange needs a subject token: set subject_token_file here or identity.subject_token_file");
                        None
                    }
                };
                let token_type = |v: &mut Self, key: &'static str, t: &Option<String>| -> String {
                    let t = t
                        .clone()
                        .unwrap_or_else(|| crate::credentials::TOKEN_TYPE_JWT.into());
                    if !t.starts_with("urn:") {
                        v.err(&at(key), format!("`{t}` is not a token type URI (urn:ietf:params:oauth:token-type:...)"));
                    }
                    t
                };
                let subject_token_type = token_type(self, "subject_token_type", subject_token_type);
                // On behalf of a user, the workload's own token is the actor.
                let actor_file = actor_token_file
                    .as_deref()
                    .map(|f| self.path(f))
                    .or_else(|| user.as_ref().and(default_subject.cloned()));
                if user.is_some() && actor_file.is_none() {
                    self.err(p, "on behalf of a user the workload's own token goes as the actor: set actor_token_file or identity.subject_token_file");
                }
                let actor = match actor_file {
                    Some(path) => {
                        if let Err(e) = std::fs::metadata(&path) {
                            self.absent(
                                &at("actor_token_file"),
                                format!("cannot read {}: {e}", path.display()),
                            );
                        }
                        Some((path, token_type(self, "actor_token_type", actor_token_type)))
                    }
                    None => {
                        if actor_token_type.is_some() {
                            self.err(&at("actor_token_type"), "needs actor_token_file");
                        }
                        None
                    }
                };
                if requested_token_type.is_some() {
                    token_type(self, "requested_token_type", requested_token_type);
                }
                let grant = subject.map(|subject_token_file| {
                    crate::credentials::Grant::TokenExchange(Box::new(
                        crate::credentials::Exchange {
                            subject: match user {
                                Some(u) => crate::credentials::Subject::User(u),
                                None => crate::credentials::Subject::File(subject_token_file),
                            },
                            subject_token_type,
                            actor,
                            requested_token_type: requested_token_type.clone(),
                            audience: audience.clone(),
                            impersonate: impersonate.clone(),
                        },
                    ))
                });
                self.oauth(p, name, EndpointFields::of(c)?, grant)
            }
            CredentialConfig::Static {
                from_env,
                from_file,
                from_aws_secret,
                from_aws_parameter,
                refresh,
                max_stale,
            } => {
                let stored = from_aws_secret.is_some() || from_aws_parameter.is_some();
                if !stored {
                    for (k, v) in [("refresh", refresh), ("max_stale", max_stale)] {
                        if v.is_some() {
                            self.err(&at(k), "only a secret store (from_aws_secret, from_aws_parameter) is refreshed");
                        }
                    }
                }
                let store = match (from_aws_secret, from_aws_parameter) {
                    (Some(sm), None) => Some((
                        crate::credentials::stores::Store::SecretsManager {
                            secret_id: sm.secret_id.clone(),
                            version_stage: sm.version_stage.clone(),
                            json_key: sm.json_key.clone(),
                        },
                        &sm.credential,
                        &sm.endpoint,
                        "from_aws_secret",
                    )),
                    (None, Some(ps)) => Some((
                        crate::credentials::stores::Store::Parameter {
                            name: ps.name.clone(),
                        },
                        &ps.credential,
                        &ps.endpoint,
                        "from_aws_parameter",
                    )),
                    _ => None,
                };
                let source = match (from_env, from_file) {
                    (None, None)
                        if store.is_some()
                            && !(from_aws_secret.is_some() && from_aws_parameter.is_some()) =>
                    {
                        let (store, credential, endpoint, key) = store?;
                        let endpoint = endpoint.as_deref().and_then(|e| match e.parse::<http::Uri>() {
                            Ok(u) if matches!(u.scheme_str(), Some("https"))
                                || (u.scheme_str() == Some("http") && u.host().is_some_and(is_loopback_host)) =>
                            {
                                Some(u)
                            }
                            _ => {
                                let mut at_e = at(key);
                                at_e.push(Seg::Key("endpoint"));
                                self.err(&at_e, format!("`{e}` is not an https URL (http is allowed on loopback addresses only)"));
                                None
                            }
                        });
                        let refresh = self.duration(
                            &at("refresh"),
                            refresh.as_deref(),
                            Duration::from_secs(300),
                        );
                        let max_stale = self.duration(
                            &at("max_stale"),
                            max_stale.as_deref(),
                            Duration::from_secs(3600),
                        );
                        if refresh.is_zero() {
                            self.err(&at("refresh"), "must be longer than 0s");
                        }
                        if max_stale < refresh {
                            self.err(&at("max_stale"), format!("shorter than refresh ({}s): the value would go stale between two reads", refresh.as_secs()));
                        }
                        StaticSource::Store(crate::credentials::stores::StoreSpec {
                            store,
                            credential: credential.clone(),
                            endpoint,
                            refresh,
                            max_stale,
                        })
                    }
                    (Some(var), None) if !stored => {
                        if std::env::var_os(var).is_none_or(|v| v.is_empty()) {
                            self.absent(
                                &at("from_env"),
                                format!("environment variable {var} is not set or empty"),
                            );
                        }
                        StaticSource::Env(var.clone())
                    }
                    (None, Some(f)) if !stored => {
                        let path = self.path(f);
                        if let Err(e) = crate::files::read_regular(&path) {
                            self.absent(
                                &at("from_file"),
                                format!("cannot read {}: {e}", path.display()),
                            );
                        }
                        StaticSource::File(path)
                    }
                    _ => {
                        self.err(p, "a static credential takes exactly one of from_env, from_file, from_aws_secret or from_aws_parameter (secrets are never inline)");
                        return None;
                    }
                };
                Some(CredentialSpec::Static {
                    name: name.to_string(),
                    source,
                })
            }
            CredentialConfig::Aws {
                region,
                role_arn,
                web_identity_token_file,
                sts_endpoint,
                session_duration,
                session_name,
                body_max_bytes,
                timeout,
            } => {
                self.nonempty(&at("region"), region);
                let source = match (role_arn, web_identity_token_file) {
                    (Some(role_arn), Some(token_file)) => self.web_identity(
                        p,
                        region,
                        role_arn,
                        token_file,
                        sts_endpoint.as_deref(),
                        session_duration.as_deref(),
                        session_name
                            .clone()
                            .unwrap_or_else(|| format!("chaperone-{}", identity.workload)),
                    )?,
                    (None, None) => self.container_endpoint(p)?,
                    _ => {
                        self.err(p, "role_arn and web_identity_token_file go together (without both, the container credentials endpoint is used)");
                        return None;
                    }
                };
                Some(CredentialSpec::Aws(crate::credentials::AwsSpec {
                    name: name.to_string(),
                    region: region.clone(),
                    source,
                    body_max_bytes: match body_max_bytes.as_deref().map(str::parse::<usize>) {
                        None => 8 * 1024 * 1024,
                        Some(Ok(n)) if n > 0 => n,
                        Some(_) => {
                            self.err(&at("body_max_bytes"), "a number of bytes, above 0");
                            8 * 1024 * 1024
                        }
                    },
                    timeout: self.duration(
                        &at("timeout"),
                        timeout.as_deref(),
                        Duration::from_secs(5),
                    ),
                }))
            }
        }
    }

    /// `kind: aws` with a role: STS AssumeRoleWithWebIdentity.
    #[allow(clippy::too_many_arguments)]
    fn web_identity(
        &mut self,
        p: &[Seg<'_>],
        region: &str,
        role_arn: &str,
        token_file: &str,
        sts_endpoint: Option<&str>,
        session_duration: Option<&str>,
        session_name: String,
    ) -> Option<crate::credentials::aws::SessionSource> {
        let at = |k: &'static str| -> Vec<Seg<'_>> {
            let mut v = p.to_vec();
            v.push(Seg::Key(k));
            v
        };
        if !role_arn.starts_with("arn:aws") || !role_arn.contains(":role/") {
            self.err(
                &at("role_arn"),
                "an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)",
            );
        }
        let token_file = self.path(token_file);
        if let Err(e) = std::fs::metadata(&token_file) {
            self.absent(
                &at("web_identity_token_file"),
                format!("cannot read {}: {e}", token_file.display()),
            );
        }
        let endpoint = sts_endpoint
            .map(str::to_string)
            .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
        let Some(sts_endpoint) = endpoint
            .parse::<http::Uri>()
            .ok()
            .filter(|u| matches!(u.scheme_str(), Some("https" | "http")) && u.host().is_some())
        else {
            self.err(&at("sts_endpoint"), "an https:// URL");
            return None;
        };
        let session_duration = self.duration(
            &at("session_duration"),
            session_duration,
            Duration::from_secs(3600),
        );
        if !(900..=43_200).contains(&session_duration.as_secs()) {
            self.err(
                &at("session_duration"),
                "between 15m and 12h (STS's limits)",
            );
        }
        let valid_name = (2..=64).contains(&session_name.len())
            && session_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "=,.@-_".contains(c));
        if !valid_name {
            self.err(
                &at("session_name"),
                "2 to 64 characters of letters, digits and =,.@-_ (STS's rule)",
            );
        }
        Some(crate::credentials::aws::SessionSource::WebIdentity {
            role_arn: role_arn.to_string(),
            web_identity_token_file: token_file,
            sts_endpoint,
            session_duration,
            session_name,
        })
    }

    /// `kind: aws` without a role: the container credentials endpoint the environment names
    /// (EKS Pod Identity and ECS set it in the pod), as the AWS SDKs find it.
    fn container_endpoint(
        &mut self,
        p: &[Seg<'_>],
    ) -> Option<crate::credentials::aws::SessionSource> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let uri = match (
            env("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
            env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
        ) {
            (Some(full), _) => full,
            (None, Some(relative)) => format!("http://169.254.170.2{relative}"),
            (None, None) => {
                self.absent(
                    p,
                    "without role_arn the container credentials endpoint is used, but AWS_CONTAINER_CREDENTIALS_FULL_URI (EKS Pod Identity) and AWS_CONTAINER_CREDENTIALS_RELATIVE_URI (ECS) are not set",
                );
                return None;
            }
        };
        let Some(uri) = uri.parse::<http::Uri>().ok().filter(|u| u.host().is_some()) else {
            self.err(
                p,
                format!("AWS_CONTAINER_CREDENTIALS_FULL_URI is not a URL: {uri}"),
            );
            return None;
        };
        let token_file = env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").map(PathBuf::from);
        if let Some(f) = &token_file
            && let Err(e) = std::fs::metadata(f)
        {
            self.absent(
                p,
                format!(
                    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE: cannot read {}: {e}",
                    f.display()
                ),
            );
        }
        Some(crate::credentials::aws::SessionSource::Container { uri, token_file })
    }

    /// Read and parse a PEM signing key now, so a bad key is a config error at `at`, not a
    /// failure on every request.
    fn signing_key(&mut self, at: &[Seg<'_>], path: &Path, allow: crate::credentials::Allow) {
        match crate::files::read_regular(path) {
            Err(e) => self.absent(at, format!("cannot read {}: {e}", path.display())),
            Ok(pem) => {
                if let Err(e) = crate::credentials::SigningKey::from_pem(&pem, allow) {
                    self.err(at, e.to_string());
                }
            }
        }
    }

    /// A token-endpoint credential: token URL, client authentication and timeout, shared by
    /// both OAuth kinds, with the grant (`None` when its own keys had errors, already
    /// reported).
    fn oauth(
        &mut self,
        p: &[Seg<'_>],
        name: &str,
        f: EndpointFields<'_>,
        grant: Option<crate::credentials::Grant>,
    ) -> Option<CredentialSpec> {
        use crate::credentials::ClientAuth;
        let at = |k: &'static str| -> Vec<Seg<'_>> {
            let mut v = p.to_vec();
            v.push(Seg::Key(k));
            v
        };
        let url = match f.token_url.parse::<http::Uri>() {
            Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => Some(u),
            Ok(u) if u.scheme_str() == Some("http") && u.host().is_some_and(is_loopback_host) => {
                Some(u)
            }
            Ok(u) if u.scheme_str() == Some("http") => {
                self.err(&at("token_url"), "use https (http is allowed on loopback addresses only: credentials would cross the network in the clear)");
                None
            }
            _ => {
                self.err(
                    &at("token_url"),
                    format!("`{}` is not an absolute https URL", f.token_url),
                );
                None
            }
        };
        if f.auth_method.is_some_and(|m| m != "none")
            || f.client_secret_file.is_some()
            || !f.allow_none
        {
            self.nonempty(&at("client_id"), f.client_id);
        }
        let file =
            |v: &mut Self, key: &'static str, value: Option<&str>, needed_by: &str| match value {
                Some(x) => {
                    let path = v.path(x);
                    if let Err(e) = crate::files::read_regular(&path) {
                        v.absent(&at(key), format!("cannot read {}: {e}", path.display()));
                    }
                    Some(path)
                }
                None => {
                    v.err(p, format!("{needed_by} needs {key}"));
                    None
                }
            };
        let method = f.auth_method.unwrap_or(match f.client_secret_file {
            None if f.allow_none => "none",
            _ => "client_secret_basic",
        });
        // Keys that the chosen method does not use are a mistake worth naming.
        let unused: &[(&str, Option<&str>)] = &[
            ("client_secret_file", f.client_secret_file),
            ("client_key_file", f.client_key_file),
            ("client_cert_file", f.client_cert_file),
            ("assertion_audience", f.assertion_audience),
            ("client_assertion_file", f.client_assertion_file),
        ];
        let used: &[&str] = match method {
            "client_secret_basic" | "client_secret_post" => &["client_secret_file"],
            "private_key_jwt" => &["client_key_file", "assertion_audience"],
            "client_assertion" => &["client_assertion_file"],
            "tls_client_auth" | "self_signed_tls_client_auth" => {
                &["client_key_file", "client_cert_file"]
            }
            _ => &[],
        };
        for (k, v) in unused {
            if v.is_some() && !used.contains(k) {
                self.err(&at(k), format!("not used by auth_method {method}"));
            }
        }
        let auth = match method {
            "client_secret_basic" => ClientAuth::Basic(file(
                self,
                "client_secret_file",
                f.client_secret_file,
                "client_secret_basic",
            )?),
            "client_secret_post" => ClientAuth::Post(file(
                self,
                "client_secret_file",
                f.client_secret_file,
                "client_secret_post",
            )?),
            "private_key_jwt" => {
                let Some(key_file) = f.client_key_file.map(|k| self.path(k)) else {
                    self.err(p, "private_key_jwt needs client_key_file");
                    return None;
                };
                self.signing_key(
                    &at("client_key_file"),
                    &key_file,
                    crate::credentials::Allow::AnyIncludingRsa,
                );
                ClientAuth::PrivateKeyJwt {
                    key_file,
                    audience: f
                        .assertion_audience
                        .map_or_else(|| f.token_url.to_string(), str::to_owned),
                }
            }
            "client_assertion" => {
                // The Azure workload identity webhook names the projected token file so.
                let from_env = std::env::var(AZURE_FEDERATED_TOKEN_FILE).ok();
                let Some(given) = f.client_assertion_file.or(from_env.as_deref()) else {
                    self.err(p, format!("client_assertion needs client_assertion_file (or {AZURE_FEDERATED_TOKEN_FILE} in the environment)"));
                    return None;
                };
                ClientAuth::AssertionFile(file(
                    self,
                    "client_assertion_file",
                    Some(given),
                    "client_assertion",
                )?)
            }
            // Both differ only in how the server checks the certificate (RFC 8705 §2.1, §2.2).
            "tls_client_auth" | "self_signed_tls_client_auth" => {
                let cert_file = file(self, "client_cert_file", f.client_cert_file, method);
                let key_file = file(self, "client_key_file", f.client_key_file, method);
                ClientAuth::TlsClientAuth {
                    cert_file: cert_file?,
                    key_file: key_file?,
                }
            }
            "none" if f.allow_none => ClientAuth::None,
            other => {
                self.err(
                    &at("auth_method"),
                    format!(
                        "`{other}` is not one of client_secret_basic, client_secret_post, private_key_jwt, client_assertion, tls_client_auth{}",
                        if f.allow_none { ", none" } else { "" }
                    ),
                );
                return None;
            }
        };
        let timeout = self.duration(&at("timeout"), f.timeout, Duration::from_secs(2));
        let dpop = match (f.dpop, f.dpop_rotate_every) {
            (Some(true), every) => {
                let d = self.duration(&at("dpop_rotate_every"), every, Duration::from_secs(86400));
                if d < Duration::from_secs(60) {
                    self.err(&at("dpop_rotate_every"), "at least 1m");
                }
                Some(d)
            }
            (_, Some(_)) => {
                self.err(&at("dpop_rotate_every"), "needs dpop: true");
                None
            }
            _ => None,
        };
        let per_call = f.per_call == Some(true);
        let revocation_url = match (f.revoke_on_completion == Some(true), f.revocation_url) {
            (true, Some(u)) => {
                if !per_call {
                    self.err(
                        &at("revoke_on_completion"),
                        "revokes a token used by one request only: needs per_call: true",
                    );
                }
                match u.parse::<http::Uri>() {
                    Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some() => {
                        Some(uri)
                    }
                    Ok(uri)
                        if uri.scheme_str() == Some("http")
                            && uri.host().is_some_and(is_loopback_host) =>
                    {
                        Some(uri)
                    }
                    _ => {
                        self.err(&at("revocation_url"), format!("`{u}` is not an https URL (http is allowed on loopback addresses only)"));
                        None
                    }
                }
            }
            (true, None) => {
                self.err(&at("revoke_on_completion"), "needs revocation_url");
                None
            }
            (false, Some(_)) => {
                self.err(&at("revocation_url"), "used by revoke_on_completion: true");
                None
            }
            (false, None) => None,
        };
        Some(CredentialSpec::OAuth(Box::new(
            crate::credentials::OAuthSpec {
                name: name.to_string(),
                token_url: url?,
                client_id: f.client_id.to_string(),
                auth,
                grant: grant?,
                timeout,
                dpop,
                per_call,
                revocation_url,
            },
        )))
    }

    fn route(
        &mut self,
        i: usize,
        r: &RouteConfig,
        credentials: &BTreeMap<String, CredentialSpec>,
    ) -> Option<Route> {
        use Seg::*;
        let no_match = MatchConfig::default();
        let m = r.match_.as_ref().unwrap_or(&no_match);
        let mp = |k: &'static str| [Key("routes"), Idx(i), Key("match"), Key(k)];
        self.nonempty(&[Key("routes"), Idx(i), Key("name")], &r.name);
        let provider = r.provider.as_deref().and_then(|n| {
            let found = crate::route::providers::find(n);
            if found.is_none() {
                self.err(
                    &[Key("routes"), Idx(i), Key("provider")],
                    format!(
                        "`{n}` is not in the provider catalog ({}); `chaperone providers` lists them",
                        crate::route::providers::names()
                    ),
                );
            }
            found
        });
        let patterns: Vec<&str> = match (&m.host, provider) {
            (Some(h), _) => h.0.iter().map(String::as_str).collect(),
            (None, Some(p)) => p.hosts.to_vec(),
            (None, None) if r.provider.is_some() => return None, // reported above
            (None, None) => {
                self.err(
                    &[Key("routes"), Idx(i)],
                    "a route needs `match.host` or a `provider`",
                );
                return None;
            }
        };
        if patterns.is_empty() {
            self.err(&mp("host"), "the list of hosts is empty");
            return None;
        }
        let mut host = Vec::new();
        for (j, h) in patterns.iter().enumerate() {
            match HostMatch::parse(h) {
                Ok(h) => host.push(h),
                Err(e) if m.host.as_ref().is_some_and(|h| h.0.len() > 1) => self.err(
                    &[Key("routes"), Idx(i), Key("match"), Key("host"), Idx(j)],
                    e,
                ),
                Err(e) => self.err(&mp("host"), e),
            }
        }
        if host.len() < patterns.len() {
            return None;
        }
        let scheme = match m.scheme.as_deref() {
            // Vendors are served over HTTPS: a provider's credential never goes out in clear.
            None if provider.is_some() => Some("https".to_string()),
            None => None,
            Some(s @ ("http" | "https")) => Some(s.to_string()),
            Some(s) => {
                self.err(&mp("scheme"), format!("`{s}` is not http or https"));
                None
            }
        };
        if let Some(pp) = &m.path_prefix
            && !pp.starts_with('/')
        {
            self.err(&mp("path_prefix"), "must start with /");
        }
        let mut methods = Vec::new();
        for meth in &m.methods {
            match http::Method::from_bytes(meth.to_ascii_uppercase().as_bytes()) {
                Ok(x) => methods.push(x),
                Err(_) => self.err(&mp("methods"), format!("`{meth}` is not an HTTP method")),
            }
        }
        if let Some(c) = &r.credential
            && !credentials.contains_key(c)
        {
            let known: Vec<_> = credentials.keys().map(String::as_str).collect();
            self.err(
                &[Key("routes"), Idx(i), Key("credential")],
                format!(
                    "no credential named `{c}` (defined: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
        // The route's credential, once: how it is injected depends on its kind.
        let credential = r.credential.as_ref().and_then(|c| credentials.get(c));
        let by_provider = match provider.map(|p| p.auth) {
            Some(crate::route::providers::Auth::Header { name, value }) => {
                InjectSpec::parse(Some(name), None, value).ok()
            }
            _ => None,
        };
        // A DPoP-bound token goes as `Authorization: DPoP`, beside its proof.
        let dpop =
            credential.is_some_and(|c| matches!(c, CredentialSpec::OAuth(o) if o.dpop.is_some()));
        if dpop && r.inject.is_some() {
            self.err(
                &[Key("routes"), Idx(i), Key("inject")],
                "a DPoP-bound token goes in `Authorization: DPoP` with its proof in `DPoP`; leave inject out",
            );
        }
        // A transaction token travels in its own header, never as an access token.
        let txn_token = credential.is_some_and(|c| {
            matches!(c, CredentialSpec::Jwt(j) if matches!(j.profile, crate::credentials::Profile::TxnToken { .. }))
        });
        let inject = match &r.inject {
            None if txn_token => InjectSpec {
                into: crate::route::InjectInto::Header(http::HeaderName::from_static(
                    crate::credentials::TXN_TOKEN_HEADER,
                )),
                prefix: String::new(),
                suffix: String::new(),
            },
            None if dpop => InjectSpec {
                into: crate::route::InjectInto::Header(http::header::AUTHORIZATION),
                prefix: "DPoP ".into(),
                suffix: String::new(),
            },
            None => by_provider.unwrap_or_else(InjectSpec::default_bearer),
            Some(inj) => {
                match InjectSpec::parse(
                    inj.header.as_deref(),
                    inj.body_field.as_deref(),
                    inj.value.as_deref().unwrap_or("{token}"),
                ) {
                    Ok(s) => s,
                    Err(e) => {
                        self.err(&[Key("routes"), Idx(i), Key("inject")], e);
                        InjectSpec::default_bearer()
                    }
                }
            }
        };
        if txn_token
            && r.inject.is_some()
            && inject.into
                != crate::route::InjectInto::Header(http::HeaderName::from_static(
                    crate::credentials::TXN_TOKEN_HEADER,
                ))
        {
            self.err(
                &[Key("routes"), Idx(i), Key("inject")],
                "a transaction token goes in the Txn-Token header only: the draft forbids using one as an access token (use profile: access_token for an Authorization bearer)",
            );
        }
        if r.inject.is_some() && r.credential.is_none() {
            self.err(
                &[Key("routes"), Idx(i), Key("inject")],
                "`inject` needs a `credential` to inject",
            );
        }
        for (j, s) in r.scopes.iter().enumerate() {
            let rest = s.replace(crate::route::PURPOSE_PLACEHOLDER, "");
            if s.is_empty() || s.contains(char::is_whitespace) {
                self.err(
                    &[Key("routes"), Idx(i), Key("scopes"), Idx(j)],
                    "a scope is one non-empty token without spaces",
                );
            } else if rest.contains(['{', '}']) {
                self.err(
                    &[Key("routes"), Idx(i), Key("scopes"), Idx(j)],
                    "the only placeholder in a scope is {purpose}",
                );
            }
        }
        let max_ttl = r.max_ttl.as_deref().map(|m| {
            self.duration(
                &[Key("routes"), Idx(i), Key("max_ttl")],
                Some(m),
                Duration::ZERO,
            )
        });
        if let Some(res) = &r.resource
            && !res
                .parse::<http::Uri>()
                .is_ok_and(|u| u.scheme().is_some() && u.host().is_some())
        {
            self.err(
                &[Key("routes"), Idx(i), Key("resource")],
                "a resource indicator is an absolute URI (RFC 8707 §2)",
            );
        }
        if let Some(p) = &r.purpose_default
            && let Err(e) = crate::identify::validate_purpose(p)
        {
            self.err(&[Key("routes"), Idx(i), Key("purpose_default")], e);
        }
        let signs = credential.is_some_and(|c| matches!(c, CredentialSpec::Aws(_)));
        let provider_signs = match provider.map(|p| p.auth) {
            Some(crate::route::providers::Auth::SigV4 { service }) => Some(service),
            _ => None,
        };
        if let (Some(p), Some(_)) = (provider, credential) {
            let at = [Key("routes"), Idx(i), Key("credential")];
            match (provider_signs, signs) {
                (Some(_), false) => self.err(
                    &at,
                    format!(
                        "provider {} takes SigV4-signed requests: it needs a credential of kind aws",
                        p.name
                    ),
                ),
                (None, true) => self.err(
                    &at,
                    format!(
                        "provider {} takes `{}`, not a SigV4 signature: a credential of kind aws does not fit",
                        p.name, p.auth
                    ),
                ),
                _ => {}
            }
        }
        let sign = match (&r.sign, signs) {
            (Some(_), false) => {
                self.err(
                    &[Key("routes"), Idx(i), Key("sign")],
                    "`sign` goes with a credential of kind aws",
                );
                None
            }
            (Some(s), true) => Some(crate::route::SignScope {
                service: s.service.clone().or(provider_signs.map(str::to_owned)),
                region: s.region.clone(),
            }),
            (None, true) => provider_signs.map(|service| crate::route::SignScope {
                service: Some(service.to_owned()),
                region: None,
            }),
            (None, false) => None,
        };
        // A vendor's token issuer expects its own scopes (Entra's `.default`, Google's
        // cloud-platform); a locally minted or static credential has none to ask for.
        let scopes = match (r.scopes.is_empty(), provider, credential) {
            (true, Some(p), Some(CredentialSpec::OAuth(_))) => {
                p.scopes.iter().map(|s| s.to_string()).collect()
            }
            _ => r.scopes.clone(),
        };
        if !r.tools.is_empty() && !r.mcp {
            self.err(
                &[Key("routes"), Idx(i), Key("tools")],
                "`tools` names an MCP server's tools: it goes with `mcp: true`",
            );
        }
        let tools = r
            .tools
            .iter()
            .filter(|(_, t)| !t.scopes.is_empty())
            .map(|(name, t)| (name.clone(), t.scopes.clone()))
            .collect();
        let add_headers = provider
            .map(|p| {
                p.headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            http::HeaderName::from_static(k),
                            http::HeaderValue::from_static(v),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let timeouts = match &r.timeouts {
            None => RouteTimeouts::default(),
            Some(t) => {
                let mut d = |key: &'static str, v: &Option<String>| {
                    v.as_deref().map(|v| {
                        self.duration(
                            &[Key("routes"), Idx(i), Key("timeouts"), Key(key)],
                            Some(v),
                            Duration::ZERO,
                        )
                    })
                };
                RouteTimeouts {
                    connect: d("connect", &t.connect),
                    response_head: d("response_head", &t.response_head),
                    idle: d("idle", &t.idle),
                }
            }
        };
        Some(Route {
            name: r.name.clone(),
            host: crate::route::Hosts(host),
            scheme,
            port: m.port,
            path_prefix: m.path_prefix.clone(),
            methods,
            credential: r.credential.clone(),
            inject,
            purpose_default: r.purpose_default.clone(),
            labels: r.labels.clone(),
            audience: r.audience.clone(),
            resource: r.resource.clone(),
            scopes,
            max_ttl,
            strip: r.strip,
            timeouts,
            sign,
            provider,
            add_headers,
            mcp: r.mcp,
            tools,
            allow_encoded_slashes: r.allow_encoded_slashes,
        })
    }

    /// The MCP tool arguments the routes declare for policy (`tools.<tool>.arguments`), one
    /// type per name across all routes, as the schema has one `McpArguments` record.
    fn mcp_arguments(&mut self, routes: &[RouteConfig]) -> crate::policy::arguments::Declared {
        use crate::policy::arguments::ArgType;
        use Seg::*;
        let mut declared: crate::policy::arguments::Declared = BTreeMap::new();
        for (i, r) in routes.iter().enumerate() {
            for (tool, t) in &r.tools {
                for (name, ty) in &t.arguments {
                    let at = [
                        Key("routes"),
                        Idx(i),
                        Key("tools"),
                        Key(tool),
                        Key("arguments"),
                        Key(name),
                    ];
                    let Some(ty) = ArgType::parse(ty) else {
                        self.err(
                            &at,
                            format!(
                                "`{ty}` is not an argument type policy can read: use one of {}",
                                ArgType::NAMES.join(", ")
                            ),
                        );
                        continue;
                    };
                    match declared.get(name) {
                        Some(other) if *other != ty => self.err(
                            &at,
                            format!(
                                "argument `{name}` is declared {} elsewhere; policy reads one type per argument name (`context.mcp.arguments.{name}`)",
                                other.cedar()
                            ),
                        ),
                        _ => {
                            declared.insert(name.clone(), ty);
                        }
                    }
                }
            }
        }
        declared
    }

    fn policy(
        &mut self,
        p: &PolicyConfig,
        label_keys: BTreeSet<String>,
        mcp_arguments: crate::policy::arguments::Declared,
    ) -> PolicySource {
        use Seg::*;
        let path = self.path(&p.file);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                self.err(
                    &[Key("policy"), Key("file")],
                    format!("cannot read {}: {e}", path.display()),
                );
                String::new()
            }
        };
        let schema_path = p.schema.as_deref().map(|s| self.path(s));
        let schema = p.schema.as_deref().and_then(|s| {
            let sp = self.path(s);
            match std::fs::read_to_string(&sp) {
                Ok(t) => Some(t),
                Err(e) => {
                    self.err(
                        &[Key("policy"), Key("schema")],
                        format!("cannot read {}: {e}", sp.display()),
                    );
                    None
                }
            }
        });
        let src = PolicySource {
            origin: path.display().to_string(),
            text,
            schema,
            label_keys,
            mcp_arguments,
            files: Some((path, schema_path)),
        };
        if !src.text.is_empty() {
            match crate::policy::PolicyEngine::compile(&src) {
                Ok(engine) => self.compiled_policy = Some(Arc::new(engine)),
                Err(e) => self.err(&[Key("policy"), Key("file")], e.to_string()),
            }
        }
        src
    }
}

/// Where the Azure workload identity webhook puts the federated token's path.
const AZURE_FEDERATED_TOKEN_FILE: &str = "AZURE_FEDERATED_TOKEN_FILE";

/// The token-endpoint keys both OAuth kinds share.
struct EndpointFields<'a> {
    token_url: &'a str,
    client_id: &'a str,
    auth_method: Option<&'a str>,
    client_secret_file: Option<&'a str>,
    client_key_file: Option<&'a str>,
    client_cert_file: Option<&'a str>,
    assertion_audience: Option<&'a str>,
    client_assertion_file: Option<&'a str>,
    dpop: Option<bool>,
    dpop_rotate_every: Option<&'a str>,
    per_call: Option<bool>,
    revoke_on_completion: Option<bool>,
    revocation_url: Option<&'a str>,
    timeout: Option<&'a str>,
    /// Token exchange may use a public client.
    allow_none: bool,
}

impl<'a> EndpointFields<'a> {
    /// The shared keys of a `client_credentials` or `token_exchange` credential.
    fn of(c: &'a CredentialConfig) -> Option<Self> {
        match c {
            CredentialConfig::ClientCredentials {
                token_url,
                client_id,
                auth_method,
                client_secret_file,
                client_key_file,
                client_cert_file,
                assertion_audience,
                client_assertion_file,
                dpop,
                dpop_rotate_every,
                per_call,
                revoke_on_completion,
                revocation_url,
                timeout,
            }
            | CredentialConfig::JwtBearer {
                token_url,
                client_id,
                auth_method,
                client_secret_file,
                client_key_file,
                client_cert_file,
                assertion_audience,
                client_assertion_file,
                dpop,
                dpop_rotate_every,
                per_call,
                revoke_on_completion,
                revocation_url,
                timeout,
                ..
            }
            | CredentialConfig::TokenExchange {
                token_url,
                client_id,
                auth_method,
                client_secret_file,
                client_key_file,
                client_cert_file,
                assertion_audience,
                client_assertion_file,
                dpop,
                dpop_rotate_every,
                per_call,
                revoke_on_completion,
                revocation_url,
                timeout,
                ..
            } => Some(EndpointFields {
                token_url,
                client_id,
                auth_method: auth_method.as_deref(),
                client_secret_file: client_secret_file.as_deref(),
                client_key_file: client_key_file.as_deref(),
                client_cert_file: client_cert_file.as_deref(),
                assertion_audience: assertion_audience.as_deref(),
                client_assertion_file: client_assertion_file.as_deref(),
                dpop: *dpop,
                dpop_rotate_every: dpop_rotate_every.as_deref(),
                per_call: *per_call,
                revoke_on_completion: *revoke_on_completion,
                revocation_url: revocation_url.as_deref(),
                timeout: timeout.as_deref(),
                allow_none: matches!(
                    c,
                    CredentialConfig::TokenExchange { .. } | CredentialConfig::JwtBearer { .. }
                ),
            }),
            CredentialConfig::Jwt { .. }
            | CredentialConfig::Static { .. }
            | CredentialConfig::Aws { .. } => None,
        }
    }
}

/// `localhost` or a loopback IP literal.
fn is_loopback_host(h: &str) -> bool {
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A SPIFFE ID: `spiffe://` + lowercase trust domain + optional path of non-empty segments.
fn valid_spiffe_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    let (td, path) = rest.split_once('/').map_or((rest, ""), |(a, b)| (a, b));
    let td_ok = !td.is_empty()
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    let path_ok = path.is_empty()
        || path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        });
    td_ok && path_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strip::StripMode;

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_yaml("test.yaml", text, Path::new("."), true)
    }

    #[test]
    fn embedded_defaults_are_observe_mode() {
        let c = Config::embedded_default();
        assert!(c.observe_mode);
        assert_eq!(c.strip.mode, StripMode::Report);
        assert_eq!(
            c.listeners[0].addr,
            ListenAddr::Tcp(DEFAULT_LISTEN.parse().unwrap())
        );
        assert_eq!(c.admin, DEFAULT_ADMIN.parse().unwrap());
        assert!(c.routes.is_empty());
    }

    #[test]
    fn unknown_key_is_located() {
        let err = load("identity:\n  id: a\n  workload: w\n  environment: e\n  colour: blue\n")
            .unwrap_err();
        let e = &err.0[0];
        assert_eq!((e.line, e.column), (5, 3), "{e}");
        assert!(e.message.contains("colour"), "{e}");
        assert!(e.to_string().starts_with("test.yaml:5:3: identity"), "{e}");
    }

    #[test]
    fn mcp_tools_are_checked_where_they_are_written() {
        let text = "\
identity: { id: 'spiffe://t/a', workload: w, environment: e }
routes:
  - name: tools
    match: { host: mcp.example.org }
    mcp: true
    tools:
      search: { scopes: [docs.read], arguments: { repo: String, limit: long } }
  - name: plain
    match: { host: api.example.org }
    tools: { search: [docs.read] }
";
        let err = load(text).unwrap_err().to_string();
        assert!(
            err.contains("test.yaml:7:65: routes[0].tools.search.arguments.limit: `long` is not an argument type"),
            "{err}"
        );
        let unknown = load("routes:\n  - name: t\n    match: { host: m.example.org }\n    mcp: true\n    tools:\n      list: { arguments: { repo: Long }, scope: [x] }\n")
            .unwrap_err()
            .to_string();
        assert!(
            unknown.contains("test.yaml:6:42: routes[0].tools.list.scope: Unknown field `scope`"),
            "an unknown key in the long form, located: {unknown}"
        );
        assert!(
            err.contains(
                "routes[1].tools: `tools` names an MCP server's tools: it goes with `mcp: true`"
            ),
            "{err}"
        );
        let ok = load(
            "identity: { id: 'spiffe://t/a', workload: w, environment: e }\nroutes:\n  - name: t\n    match: { host: m.example.org }\n    mcp: true\n    tools:\n      a: [s.a]\n      b: { arguments: { repo: String } }\n      c: { scopes: [s.c], arguments: { repo: Long } }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            ok.contains("argument `repo` is declared String elsewhere"),
            "{ok}"
        );
    }

    #[test]
    fn syntax_error_is_located() {
        let err = load("listen: 127.0.0.1:1\nadmin: [oops\n").unwrap_err();
        assert!(err.0[0].line >= 2, "{}", err);
        assert!(err.to_string().starts_with("test.yaml:"), "{err}");
    }

    #[test]
    fn every_semantic_error_is_reported_at_once() {
        let text = "\
listen: nope
identity: { id: 'spiffe://Bad/x', workload: w, environment: e }
credentials:
  k: { kind: static }
routes:
  - name: r
    match: { host: api.example.org, scheme: ftp }
    credential: missing
timeouts:
  request: fast
";
        let err = load(text).unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|e| e.key.as_str()).collect();
        for want in [
            "listen",
            "identity.id",
            "credentials.k",
            "routes[0].match.scheme",
            "routes[0].credential",
            "timeouts.request",
        ] {
            assert!(keys.contains(&want), "missing {want} in {err}");
        }
        let cred = err
            .0
            .iter()
            .find(|e| e.key == "routes[0].credential")
            .unwrap();
        assert_eq!(cred.line, 8, "{cred}");
    }

    #[test]
    fn upstream_proxy_urls_are_http_without_credentials() {
        let cfg = |proxy: &str| {
            format!(
                "identity: {{ id: i, workload: w, environment: e }}\nupstream_proxy:\n  url: {proxy}\n  no_proxy: [localhost, '10.0.0.0/8', 'a,b']\n"
            )
        };
        for (url, says) in [
            ("https://proxy.corp:3128", "an http:// proxy URL"),
            (
                "http://user:hunter2@proxy.corp:3128",
                "credentials never go in the URL",
            ),
        ] {
            let err = load(&cfg(url)).unwrap_err();
            let e = err
                .0
                .iter()
                .find(|e| e.key == "upstream_proxy.url")
                .unwrap_or_else(|| panic!("{err}"));
            assert!(e.message.contains(says), "{e}");
            assert_eq!(e.line, 3, "{e}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
            assert!(
                err.0.iter().any(|e| e.key == "upstream_proxy.no_proxy[2]"),
                "{err}"
            );
        }
        let text = "identity: { id: i, workload: w, environment: e }\nupstream_proxy: { url: 'http://proxy.corp:3128', no_proxy: [localhost] }\n";
        let ok = load(text).unwrap();
        let p = ok.upstream_proxy.unwrap();
        assert_eq!(p.url, "http://proxy.corp:3128/");
        assert_eq!(p.no_proxy, ["localhost"]);
    }

    #[test]
    fn aws_credentials_are_checked_as_a_whole() {
        let text = "\
identity: { id: i, workload: w, environment: e }
credentials:
  a:
    kind: aws
    region: us-east-1
    role_arn: inference
    web_identity_token_file: /nonexistent/token
    session_duration: 5m
    session_name: 'has spaces'
routes:
  - name: r
    match: { host: api.example.org }
    sign: { service: bedrock }
";
        let err = load(text).unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|e| e.key.as_str()).collect();
        for want in [
            "credentials.a.role_arn",
            "credentials.a.web_identity_token_file",
            "credentials.a.session_duration",
            "credentials.a.session_name",
            "routes[0].sign",
        ] {
            assert!(keys.contains(&want), "missing {want} in {err}");
        }
    }

    #[test]
    fn provider_routes_expand_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "k").unwrap();
        let text = format!(
            "\
identity: {{ id: i, workload: w, environment: e }}
credentials:
  key: {{ kind: static, from_file: {k} }}
  entra: {{ kind: client_credentials, token_url: 'https://login.test/token', client_id: c, client_secret_file: {k} }}
routes:
  - {{ name: claude, provider: anthropic, credential: key }}
  - {{ name: az, provider: azure_openai, credential: entra }}
  - {{ name: az-own, provider: azure_openai, credential: entra, scopes: [a.b], inject: {{ header: api-key }} }}
  - {{ name: many, match: {{ host: [a.example, '*.b.example', 'c-*.example.org'] }} }}
",
            k = key.display()
        );
        let cfg = load(&text).unwrap();
        let r = &cfg.routes;
        assert_eq!(r[0].host.to_string(), "api.anthropic.com");
        assert_eq!(r[0].scheme.as_deref(), Some("https"));
        assert_eq!(
            r[0].inject,
            InjectSpec::parse(Some("x-api-key"), None, "{token}").unwrap()
        );
        assert_eq!(r[0].add_headers.len(), 1);
        assert!(r[0].scopes.is_empty(), "a static key asks for no scopes");
        assert_eq!(
            r[1].scopes,
            ["https://cognitiveservices.azure.com/.default"]
        );
        assert_eq!(r[1].inject, InjectSpec::default_bearer());
        assert_eq!(r[2].scopes, ["a.b"], "the route's own keys win");
        assert_eq!(
            r[2].inject,
            InjectSpec::parse(Some("api-key"), None, "{token}").unwrap()
        );
        assert_eq!(r[3].scheme, None);
        assert!(r[3].host.matches("x.b.example") && r[3].host.matches("c-1.example.org"));

        let bad = format!(
            "\
identity: {{ id: i, workload: w, environment: e }}
credentials:
  key: {{ kind: static, from_file: {k} }}
  aws: {{ kind: aws, region: us-east-1, role_arn: 'arn:aws:iam::123456789012:role/r', web_identity_token_file: {k} }}
routes:
  - {{ name: typo, provider: open-ai }}
  - {{ name: nothing }}
  - {{ name: unsigned, provider: bedrock, credential: key }}
  - {{ name: signed, provider: openai, credential: aws }}
  - {{ name: hosts, match: {{ host: [ok.example, 'bad*'] }} }}
  - {{ name: empty, match: {{ host: [] }} }}
",
            k = key.display()
        );
        let err = load(&bad).unwrap_err();
        let found = |key: &str, text: &str| {
            err.0
                .iter()
                .any(|e| e.key == key && e.message.contains(text))
        };
        assert!(
            found("routes[0].provider", "not in the provider catalog"),
            "{err}"
        );
        assert!(
            found("routes[1]", "needs `match.host` or a `provider`"),
            "{err}"
        );
        assert!(found("routes[2].credential", "kind aws"), "{err}");
        assert!(found("routes[3].credential", "does not fit"), "{err}");
        assert!(found("routes[4].match.host[1]", "wildcard"), "{err}");
        assert!(found("routes[5].match.host", "empty"), "{err}");
    }

    #[test]
    fn secret_store_sources_are_checked() {
        let text = "\
identity: { id: i, workload: w, environment: e }
credentials:
  key: { kind: static, from_env: HOME }
  a: { kind: static, from_aws_secret: { credential: key, secret_id: s } }
  b: { kind: static, from_aws_parameter: { credential: nope, name: /p }, refresh: 10m, max_stale: 1m }
  c: { kind: static, from_env: HOME, from_aws_secret: { credential: key, secret_id: s } }
  d: { kind: static, from_env: HOME, refresh: 1m }
  e: { kind: static, from_aws_secret: { credential: key, secret_id: s, endpoint: 'http://sm.example' } }
";
        let err = load(text).unwrap_err();
        let found = |key: &str, text: &str| {
            err.0
                .iter()
                .any(|e| e.key == key && e.message.contains(text))
        };
        assert!(
            found(
                "credentials.a.from_aws_secret.credential",
                "not a credential of kind aws"
            ),
            "{err}"
        );
        assert!(
            found(
                "credentials.b.from_aws_parameter.credential",
                "(those defined: none)"
            ),
            "{err}"
        );
        assert!(
            found("credentials.b.max_stale", "shorter than refresh"),
            "{err}"
        );
        assert!(found("credentials.c", "exactly one of"), "{err}");
        assert!(
            found("credentials.d.refresh", "only a secret store"),
            "{err}"
        );
        assert!(
            found("credentials.e.from_aws_secret.endpoint", "loopback"),
            "{err}"
        );
    }

    #[test]
    fn stage_callers_are_uids() {
        let ok = load(
            "identity: { id: a, workload: w, environment: e, callers: { uids: [1000] } }
stages:
  - { name: training, listen: 127.0.0.1:0, callers: { uids: [1001, 1002] } }
  - { name: open, listen: 127.0.0.1:0 }
policy: { file: /dev/null }
",
        )
        .unwrap();
        let callers: Vec<_> = ok.listeners.iter().map(|l| l.callers.clone()).collect();
        assert_eq!(
            callers,
            vec![Some(vec![1000]), Some(vec![1001, 1002]), None]
        );
        let err = load(
            "identity: { id: a, workload: w, environment: e }
stages:
  - name: training
    listen: 127.0.0.1:0
    callers: { uids: [] }
policy: { file: /dev/null }
",
        )
        .unwrap_err();
        assert_eq!(err.0[0].key, "stages[0].callers.uids", "{err}");
        assert!(err.0[0].message.contains("at least one UID"), "{err}");
        let err = load(
            "identity: { id: a, workload: w, environment: e }
stages:
  - { name: t, listen: 127.0.0.1:0, callers: { uids: [-1] } }
policy: { file: /dev/null }
",
        )
        .unwrap_err();
        assert!(err.0[0].key.starts_with("stages[0].callers.uids"), "{err}");
        let unix = load(
            "identity: { id: a, workload: w, environment: e }
stages:
  - { name: t, listen: 'unix:/tmp/t.sock' }
  - { name: u, listen: 'unix:/nonexistent-dir/u.sock' }
policy: { file: /dev/null }
",
        )
        .unwrap_err();
        assert_eq!(unix.0.len(), 1, "{unix}");
        assert_eq!(unix.0[0].key, "stages[1].listen");
        assert!(unix.0[0].message.contains("does not exist"), "{unix}");
    }

    #[test]
    fn token_endpoint_credentials_are_checked_as_a_whole() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        let text = format!(
            "\
identity: {{ id: a, workload: w, environment: e }}
credentials:
  te: {{ kind: token_exchange, token_url: 'https://sts.test/token', client_id: c }}
  pk: {{ kind: client_credentials, token_url: 'https://idp.test/token', client_id: c, auth_method: private_key_jwt }}
  fed: {{ kind: client_credentials, token_url: 'https://idp.test/token', client_id: c, auth_method: client_assertion, client_key_file: {s} }}
  imp: {{ kind: token_exchange, token_url: 'https://sts.test/token', subject_token_file: {s}, impersonate: {{ service_account: nobody, lifetime: 2h }} }}
  nameless: {{ kind: token_exchange, token_url: 'https://sts.test/token', subject_token_file: {s}, client_secret_file: {s} }}
  obo-file: {{ kind: token_exchange, token_url: 'https://sts.test/token', client_id: c, client_secret_file: {s}, subject_from: {{ header: x-user }}, subject_token_file: {s}, actor_token_file: {s} }}
  obo-noactor: {{ kind: token_exchange, token_url: 'https://sts.test/token', client_id: c, client_secret_file: {s}, subject_from: {{ header: x-user }} }}
  jwks-alone: {{ kind: token_exchange, token_url: 'https://sts.test/token', client_id: c, subject_token_file: {s}, subject_jwks_url: 'https://idp.test/jwks' }}
  revoke-cached: {{ kind: client_credentials, token_url: 'https://idp.test/token', client_id: c, client_secret_file: {s}, revoke_on_completion: true, revocation_url: 'https://idp.test/revoke' }}
  revoke-nowhere: {{ kind: client_credentials, token_url: 'https://idp.test/token', client_id: c, client_secret_file: {s}, per_call: true, revoke_on_completion: true }}
  dpop-fast: {{ kind: client_credentials, token_url: 'https://idp.test/token', client_id: c, client_secret_file: {s}, dpop: true, dpop_rotate_every: 10s }}
  jb-neither: {{ kind: jwt_bearer, token_url: 'https://idp.test/token', client_id: c }}
  jb-loop: {{ kind: jwt_bearer, token_url: 'https://idp.test/token', client_id: c, assertion_from: jb-neither }}
  extra: {{ kind: client_credentials, token_url: 'https://idp.test/token', client_id: c, client_secret_file: {s}, client_cert_file: {s} }}
  plain: {{ kind: client_credentials, token_url: 'http://idp.test/token', client_id: c, client_secret_file: {s} }}
  rot: {{ kind: jwt, signing_key: {s}, rotate_every: 1h }}
routes:
  - name: r
    match: {{ host: api.example.org }}
    scopes: ['ok:{{purpose}}', 'bad:{{stage}}']
    resource: not-a-uri
    max_ttl: soon
",
            s = secret.display()
        );
        let err = load(&text).unwrap_err();
        let found = |key: &str, text: &str| {
            err.0
                .iter()
                .any(|e| e.key == key && e.message.contains(text))
        };
        assert!(found("credentials.te", "subject token"), "{err}");
        assert!(
            found("credentials.pk", "private_key_jwt needs client_key_file"),
            "{err}"
        );
        if std::env::var_os(AZURE_FEDERATED_TOKEN_FILE).is_none() {
            assert!(
                found(
                    "credentials.fed",
                    "client_assertion needs client_assertion_file"
                ),
                "{err}"
            );
        }
        assert!(
            found(
                "credentials.imp.impersonate.service_account",
                "not a service account email"
            ),
            "{err}"
        );
        assert!(
            found("credentials.imp.impersonate.lifetime", "between 1m and 1h"),
            "{err}"
        );
        assert!(
            !err.0.iter().any(|e| e.key == "credentials.imp.client_id"),
            "a public client needs no id: {err}"
        );
        assert!(found("credentials.nameless.client_id", ""), "{err}");
        assert!(
            found(
                "credentials.obo-file.subject_token_file",
                "the user's token"
            ),
            "{err}"
        );
        assert!(
            found("credentials.obo-noactor", "goes as the actor"),
            "{err}"
        );
        assert!(
            found(
                "credentials.jwks-alone.subject_jwks_url",
                "needs subject_from"
            ),
            "{err}"
        );
        for (key, text) in [
            (
                "credentials.revoke-cached.revoke_on_completion",
                "needs per_call",
            ),
            (
                "credentials.revoke-nowhere.revoke_on_completion",
                "needs revocation_url",
            ),
            ("credentials.dpop-fast.dpop_rotate_every", "at least 1m"),
            (
                "credentials.jb-neither",
                "exactly one of assertion_file or assertion_from",
            ),
            (
                "credentials.jb-loop.assertion_from",
                "is not a client_credentials or token_exchange credential",
            ),
        ] {
            assert!(found(key, text), "{key}: {err}");
        }
        assert!(
            found(
                "credentials.fed.client_key_file",
                "not used by auth_method client_assertion"
            ),
            "{err}"
        );
        assert!(
            found(
                "credentials.extra.client_cert_file",
                "not used by auth_method client_secret_basic"
            ),
            "{err}"
        );
        assert!(found("credentials.plain.token_url", "use https"), "{err}");
        assert!(
            found("credentials.rot.rotate_every", "generated keys"),
            "{err}"
        );
        assert!(found("routes[0].scopes[1]", "{purpose}"), "{err}");
        assert!(
            !err.0.iter().any(|e| e.key == "routes[0].scopes[0]"),
            "{err}"
        );
        assert!(found("routes[0].resource", "absolute URI"), "{err}");
        assert!(err.0.iter().any(|e| e.key == "routes[0].max_ttl"), "{err}");
    }

    #[test]
    fn jwt_ttl_is_capped() {
        let err = load(
            "identity: { id: a, workload: w, environment: e }\ncredentials:\n  t: { kind: jwt, ttl: 10m }\n",
        )
        .unwrap_err();
        assert_eq!(err.0[0].key, "credentials.t.ttl", "{err}");
        assert_eq!(err.0[0].line, 3);
    }

    #[test]
    fn spiffe_ids() {
        assert!(valid_spiffe_id("spiffe://example.org/ns/ml/sa/inference"));
        assert!(valid_spiffe_id("spiffe://example.org"));
        assert!(!valid_spiffe_id("spiffe://Example.org/x"));
        assert!(!valid_spiffe_id("spiffe://example.org//x"));
        assert!(!valid_spiffe_id("spiffe:///x"));
    }
}
