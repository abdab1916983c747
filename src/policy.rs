//! Stage 5, authorize: guardrails, then Cedar policy. Default deny; deny overrides permit.
//!
//! Entity model (DESIGN §6): principal `Workload::"<identity>"` {workload, stage, environment};
//! action `Action::"<METHOD>"` (`Action::"CONNECT"` for tunnels); resource
//! `Destination::"<host>"` {scheme, port, labels}; context {path, purpose, route,
//! stripped_types, credential, stage, environment, method}.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

use crate::config::{Identity, PolicySource};

/// What the policy sees of one request.
#[derive(Debug)]
pub struct PolicyInput<'a> {
    /// The caller.
    pub identity: &'a Identity,
    /// HTTP method, or `CONNECT` for a tunnel.
    pub action: &'a str,
    /// Destination host.
    pub host: &'a str,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// Destination port.
    pub port: u16,
    /// Path without query.
    pub path: &'a str,
    /// Purpose (never empty: `unspecified` when nothing named one).
    pub purpose: &'a str,
    /// Matched route name, or empty.
    pub route: &'a str,
    /// Labels of the matched route.
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// Types of embedded secrets found.
    pub stripped_types: &'a [&'static str],
    /// Credential the route injects, or empty.
    pub credential: &'a str,
}

/// The authorization outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    /// Whether the request may proceed.
    pub allow: bool,
    /// Ids of the policies that decided (permits on allow, forbids on deny).
    pub policy_ids: Vec<String>,
    /// Human-readable reason, for the log and the 403 body.
    pub reason: String,
}

/// Error compiling policies.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(String);

/// The policy set in force, swapped whole on reload: a request sees the old set or the new
/// one, never a mix, and loading it takes no lock.
pub struct PolicyStore {
    current: arc_swap::ArcSwap<PolicyEngine>,
    source: std::sync::Mutex<PolicySource>,
    stamps: std::sync::Mutex<Vec<crate::credentials::files::FileStamp>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PolicyStore({:?})", self.current.load())
    }
}

impl PolicyStore {
    /// A store holding `engine`, compiled from `source`.
    pub fn new(
        engine: PolicyEngine,
        source: PolicySource,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> PolicyStore {
        let stamps = Self::stamps(&source);
        PolicyStore {
            current: arc_swap::ArcSwap::from_pointee(engine),
            source: std::sync::Mutex::new(source),
            stamps: std::sync::Mutex::new(stamps),
            metrics,
        }
    }

    fn stamps(source: &PolicySource) -> Vec<crate::credentials::files::FileStamp> {
        source
            .files
            .iter()
            .flat_map(|(p, s)| std::iter::once(p).chain(s))
            .map(|p| crate::credentials::files::stamp_of(p))
            .collect()
    }

    /// The set in force now.
    pub fn current(&self) -> arc_swap::Guard<Arc<PolicyEngine>> {
        self.current.load()
    }

    /// Re-read and recompile the policy files; swap them in only if they compile (and
    /// validate, with a schema). On failure the last good set stays in force, and the error
    /// is logged and counted (`chaperone_policy_reloads_total{result="rejected"}`).
    pub fn reload(&self, why: &str) -> Result<usize, PolicyError> {
        let source = self.source.lock().expect("policy source lock").clone();
        let result = source
            .reread()
            .map_err(PolicyError)
            .and_then(|fresh| PolicyEngine::compile(&fresh).map(|e| (e, fresh)));
        let outcome = match result {
            Ok((engine, fresh)) => {
                let n = engine.len();
                self.current.store(Arc::new(engine));
                *self.source.lock().expect("policy source lock") = fresh;
                tracing::info!(policies = n, origin = %source.origin, why, "policy reloaded");
                Ok(n)
            }
            Err(e) => {
                tracing::error!(error = %e, why, "policy reload rejected; the last good policy stays in force");
                Err(e)
            }
        };
        self.metrics
            .policy_reloads
            .get_or_create(&crate::metrics::ResultLabel {
                result: if outcome.is_ok() { "ok" } else { "rejected" },
            })
            .inc();
        outcome
    }

    /// Reload when a policy or schema file changed since the last look.
    pub fn reload_if_changed(&self) {
        let source = self.source.lock().expect("policy source lock").clone();
        let now = Self::stamps(&source);
        let mut seen = self.stamps.lock().expect("policy stamps lock");
        if *seen != now {
            *seen = now;
            drop(seen);
            let _ = self.reload("file changed");
        }
    }

    /// Poll the files every `every`, and reload on SIGHUP. The handler is installed even for
    /// the embedded policy (which reloads as itself), so a SIGHUP never ends the process.
    pub fn spawn_watch(self: &Arc<Self>, every: std::time::Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut hup = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "no SIGHUP handler; policy reloads on file change only");
                    None
                }
            };
            loop {
                let sighup = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tick.tick() => {
                        let Some(store) = me.upgrade() else { break };
                        tokio::task::block_in_place(|| store.reload_if_changed());
                    }
                    _ = sighup => {
                        let Some(store) = me.upgrade() else { break };
                        tokio::task::block_in_place(|| { let _ = store.reload("SIGHUP"); });
                    }
                }
            }
        });
    }
}

/// Compiled policies and the authorizer.
pub struct PolicyEngine {
    set: PolicySet,
    authorizer: Authorizer,
    /// Principal and resource entities, which are the same for every request from one
    /// identity to one destination on one route. Building them dominated a decision's cost
    /// (see BENCHMARKS.md); the key is the exact attribute text, so a hit is always exact.
    entities: moka::sync::Cache<String, Arc<Entities>>,
    workload_type: EntityTypeName,
    destination_type: EntityTypeName,
    action_type: EntityTypeName,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PolicyEngine({} policies)", self.set.policies().count())
    }
}

impl PolicyEngine {
    /// Parse, name (by `@id` annotation) and optionally validate policies.
    pub fn compile(src: &PolicySource) -> Result<PolicyEngine, PolicyError> {
        let parsed = PolicySet::from_str(&src.text).map_err(|e| {
            PolicyError(format!(
                "{}: policy does not parse: {}",
                src.origin,
                render(&e)
            ))
        })?;
        // Policies are named by their @id annotation so logs say which rule decided;
        // unannotated ones keep Cedar's positional ids (policy0, policy1, ...).
        let mut set = PolicySet::new();
        let mut seen = HashSet::new();
        for p in parsed.policies() {
            let named = match p.annotation("id") {
                Some(id) => p.new_id(PolicyId::new(id)),
                None => p.clone(),
            };
            if !seen.insert(named.id().to_string()) {
                return Err(PolicyError(format!(
                    "{}: two policies have the id `{}`",
                    src.origin,
                    named.id()
                )));
            }
            set.add(named)
                .map_err(|e| PolicyError(format!("{}: {}", src.origin, render(&e))))?;
        }
        if let Some(schema_text) = &src.schema {
            let (schema, _warnings) = Schema::from_cedarschema_str(schema_text).map_err(|e| {
                PolicyError(format!("policy schema does not parse: {}", render(&e)))
            })?;
            let result = Validator::new(schema).validate(&set, ValidationMode::Strict);
            if !result.validation_passed() {
                let errs: Vec<String> = result.validation_errors().map(|e| render(e)).collect();
                return Err(PolicyError(format!(
                    "{}: policy does not validate against the schema: {}",
                    src.origin,
                    errs.join("; ")
                )));
            }
        }
        let ty = |s: &str| EntityTypeName::from_str(s).expect("valid type name");
        Ok(PolicyEngine {
            set,
            authorizer: Authorizer::new(),
            entities: moka::sync::Cache::new(4096),
            workload_type: ty("Workload"),
            destination_type: ty("Destination"),
            action_type: ty("Action"),
        })
    }

    /// Number of policies in force.
    pub fn len(&self) -> usize {
        self.set.policies().count()
    }

    /// True when no policy is loaded (everything is denied).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decide one request.
    pub fn decide(&self, input: &PolicyInput<'_>) -> PolicyDecision {
        match self.evaluate(input) {
            Ok(d) => d,
            Err(e) => PolicyDecision {
                allow: false,
                policy_ids: vec![],
                reason: format!("policy evaluation failed: {e}"),
            },
        }
    }

    fn evaluate(&self, input: &PolicyInput<'_>) -> Result<PolicyDecision, String> {
        let s = |v: &str| RestrictedExpression::new_string(v.to_string());
        let id = input.identity;
        let principal =
            EntityUid::from_type_name_and_id(self.workload_type.clone(), EntityId::new(&id.id));
        let resource = EntityUid::from_type_name_and_id(
            self.destination_type.clone(),
            EntityId::new(input.host),
        );
        let action =
            EntityUid::from_type_name_and_id(self.action_type.clone(), EntityId::new(input.action));
        let entities = self.entities_for(input, &principal, &resource)?;
        let context = Context::from_pairs([
            ("path".to_string(), s(input.path)),
            ("purpose".to_string(), s(input.purpose)),
            ("route".to_string(), s(input.route)),
            (
                "stripped_types".to_string(),
                RestrictedExpression::new_set(input.stripped_types.iter().map(|t| s(t))),
            ),
            ("credential".to_string(), s(input.credential)),
            ("stage".to_string(), s(&id.stage)),
            ("environment".to_string(), s(&id.environment)),
            ("method".to_string(), s(input.action)),
        ])
        .map_err(|e| e.to_string())?;
        let request =
            Request::new(principal, action, resource, context, None).map_err(|e| e.to_string())?;
        let response = self
            .authorizer
            .is_authorized(&request, &self.set, &entities);
        let policy_ids: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|p| p.to_string())
            .collect();
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        Ok(match response.decision() {
            Decision::Allow => PolicyDecision {
                allow: true,
                reason: format!("permitted by {}", policy_ids.join(", ")),
                policy_ids,
            },
            Decision::Deny if !policy_ids.is_empty() => PolicyDecision {
                allow: false,
                reason: format!("forbidden by {}", policy_ids.join(", ")),
                policy_ids,
            },
            Decision::Deny => PolicyDecision {
                allow: false,
                policy_ids,
                reason: if errors.is_empty() {
                    "no policy permits this request".to_string()
                } else {
                    format!(
                        "no policy permits this request (evaluation errors: {})",
                        errors.join("; ")
                    )
                },
            },
        })
    }
}

impl PolicyEngine {
    /// The principal and resource entities for this request, built once per distinct
    /// (identity, destination, route) and then shared.
    fn entities_for(
        &self,
        input: &PolicyInput<'_>,
        principal: &EntityUid,
        resource: &EntityUid,
    ) -> Result<Arc<Entities>, String> {
        use std::fmt::Write;
        let id = input.identity;
        let mut key = String::with_capacity(128);
        // NUL cannot occur in any of these fields' values as configured or parsed.
        let _ = write!(
            key,
            "{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}",
            id.id,
            id.workload,
            id.stage,
            id.environment,
            input.host,
            input.scheme,
            input.port,
            input.route
        );
        if let Some(labels) = input.labels {
            for (k, v) in labels {
                let _ = write!(key, "\0{k}={v}");
            }
        }
        if let Some(hit) = self.entities.get(&key) {
            return Ok(hit);
        }
        let s = |v: &str| RestrictedExpression::new_string(v.to_string());
        let principal_entity = Entity::new(
            principal.clone(),
            HashMap::from([
                ("workload".to_string(), s(&id.workload)),
                ("stage".to_string(), s(&id.stage)),
                ("environment".to_string(), s(&id.environment)),
            ]),
            HashSet::new(),
        )
        .map_err(|e| e.to_string())?;
        let labels = input
            .labels
            .map(|l| l.iter().map(|(k, v)| (k.clone(), s(v))).collect::<Vec<_>>())
            .unwrap_or_default();
        let resource_entity = Entity::new(
            resource.clone(),
            HashMap::from([
                ("scheme".to_string(), s(input.scheme)),
                (
                    "port".to_string(),
                    RestrictedExpression::new_long(i64::from(input.port)),
                ),
                (
                    "labels".to_string(),
                    RestrictedExpression::new_record(labels).map_err(|e| e.to_string())?,
                ),
            ]),
            HashSet::new(),
        )
        .map_err(|e| e.to_string())?;
        let entities = Arc::new(
            Entities::from_entities([principal_entity, resource_entity], None)
                .map_err(|e| e.to_string())?,
        );
        self.entities.insert(key, entities.clone());
        Ok(entities)
    }
}

fn render(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Addresses no request may reach, checked before policy: cloud metadata, link-local, and
/// the sidecar's own listeners (which would loop or expose the admin API).
#[derive(Debug, Clone, Default)]
pub struct Guardrails {
    own: Vec<SocketAddr>,
}

impl Guardrails {
    /// Guardrails protecting these local listeners.
    pub fn new(own: Vec<SocketAddr>) -> Self {
        Guardrails { own }
    }

    /// Why this destination is refused, if it is.
    pub fn check(&self, host: &str, port: u16) -> Option<String> {
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        if h == "metadata.google.internal" || h == "metadata" || h == "instance-data" {
            return Some(format!("{h} is a cloud metadata endpoint"));
        }
        let ip = if h == "localhost" || h.ends_with(".localhost") {
            IpAddr::from([127, 0, 0, 1])
        } else {
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .ok()?
        };
        if let Some(why) = Self::check_ip(ip) {
            return Some(why);
        }
        for own in &self.own {
            let same_ip = own.ip() == ip
                || (own.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified()))
                || (own.ip().is_loopback() && ip.is_loopback());
            if same_ip && own.port() == port {
                return Some(format!("{ip}:{port} is one of the sidecar's own listeners"));
            }
        }
        None
    }

    /// Why this resolved address is refused whatever the port, if it is.
    pub fn check_ip(ip: IpAddr) -> Option<String> {
        let ip = match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        let metadata_v6: IpAddr = "fd00:ec2::254".parse().expect("literal");
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        };
        (ip == metadata_v6 || link_local)
            .then(|| format!("{ip} is a link-local or cloud metadata address"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident() -> Identity {
        Identity {
            id: "spiffe://t/ns/ml/sa/inference".into(),
            workload: "inference".into(),
            stage: "main".into(),
            environment: "prod".into(),
        }
    }

    fn engine(text: &str) -> PolicyEngine {
        PolicyEngine::compile(&PolicySource {
            origin: "test.cedar".into(),
            text: text.into(),
            schema: None,
            files: None,
        })
        .unwrap()
    }

    fn input<'a>(
        id: &'a Identity,
        purpose: &'a str,
        labels: Option<&'a BTreeMap<String, String>>,
    ) -> PolicyInput<'a> {
        PolicyInput {
            identity: id,
            action: "POST",
            host: "api.openai.com",
            scheme: "https",
            port: 443,
            path: "/v1/chat/completions",
            purpose,
            route: "openai",
            labels,
            stripped_types: &["openai_project_key"],
            credential: "openai",
        }
    }

    #[test]
    fn default_deny_and_named_permits() {
        let id = ident();
        let e = engine("");
        let d = e.decide(&input(&id, "inference", None));
        assert!(!d.allow);
        assert_eq!(d.reason, "no policy permits this request");

        let e = engine(
            r#"@id("inference-may-call-openai")
permit(principal, action == Action::"POST", resource == Destination::"api.openai.com")
when { principal.stage == "main" && context.purpose == "inference" && resource.port == 443 };"#,
        );
        let d = e.decide(&input(&id, "inference", None));
        assert!(d.allow, "{d:?}");
        assert_eq!(d.policy_ids, vec!["inference-may-call-openai"]);
        assert!(!e.decide(&input(&id, "training", None)).allow);
    }

    #[test]
    fn forbid_overrides_permit_and_labels_are_visible() {
        let id = ident();
        let e = engine(
            r#"permit(principal, action, resource);
@id("no-high-sensitivity-in-dev")
forbid(principal, action, resource) when { resource.labels has sensitivity && resource.labels.sensitivity == "high" && context.stripped_types.contains("openai_project_key") };"#,
        );
        let labels = BTreeMap::from([("sensitivity".to_string(), "high".to_string())]);
        let d = e.decide(&input(&id, "inference", Some(&labels)));
        assert!(!d.allow);
        assert_eq!(d.policy_ids, vec!["no-high-sensitivity-in-dev"]);
        assert!(e.decide(&input(&id, "inference", None)).allow);
    }

    #[test]
    fn bad_policy_is_an_error() {
        let err = PolicyEngine::compile(&PolicySource {
            origin: "p.cedar".into(),
            text: "permit(principal, action, resource".into(),
            schema: None,
            files: None,
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("p.cedar: policy does not parse"),
            "{err}"
        );
    }

    #[test]
    fn guardrails() {
        let g = Guardrails::new(vec![
            "127.0.0.1:15000".parse().unwrap(),
            "0.0.0.0:15001".parse().unwrap(),
        ]);
        assert!(g.check("169.254.169.254", 80).is_some());
        assert!(g.check("metadata.google.internal", 80).is_some());
        assert!(g.check("[fd00:ec2::254]", 80).is_some());
        assert!(g.check("::ffff:169.254.169.254", 80).is_some());
        assert!(g.check("127.0.0.1", 15000).is_some());
        assert!(g.check("127.0.0.1", 15001).is_some());
        assert!(g.check("localhost", 15000).is_some());
        assert!(g.check("127.0.0.1", 8080).is_none());
        assert!(g.check("api.openai.com", 443).is_none());
    }
}
