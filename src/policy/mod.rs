//! Stage 5, authorize: guardrails, then Cedar policy. Default deny; deny overrides permit.
//!
//! Entity model (DESIGN §6): principal `Workload::"<identity>"` {workload, stage, environment};
//! action `Action::"<METHOD>"` (`Action::"CONNECT"` for tunnels); resource
//! `Destination::"<host>"` {scheme, port, labels}; context {path, purpose, route, method,
//! stripped_types, credential, stage, environment, client_address, request_time, guardrail,
//! upgrade}.
//! The shipped schema, `policy.cedarschema` next to this file, is the contract: every policy
//! is validated against it (strict) at load and on reload.

pub mod arguments;
mod memo;
mod slice;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, Policy,
    PolicyId, PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

use crate::identify::Identity;

/// Policy text, already read and checked to compile.
#[derive(Debug, Clone)]
pub struct PolicySource {
    /// Where the policies came from (file path or `<embedded>`).
    pub(crate) origin: String,
    /// Cedar policy text.
    pub(crate) text: String,
    /// A Cedar schema of the operator's own (`policy.schema`), replacing the shipped one.
    pub(crate) schema: Option<String>,
    /// The label keys of the configured routes: the shipped schema declares them as
    /// `resource.labels` attributes, so a policy naming any other label does not validate.
    pub(crate) label_keys: BTreeSet<String>,
    /// The MCP tool arguments the routes declare: the shipped schema declares them as
    /// `context.mcp.arguments` attributes, and calls' arguments are read by these types.
    pub(crate) mcp_arguments: arguments::Declared,
    /// The policy file and schema file it was read from (none when embedded); watched for
    /// changes and re-read on SIGHUP.
    pub(crate) files: Option<(PathBuf, Option<PathBuf>)>,
}

impl PolicySource {
    /// Policy text from memory (tests, benchmarks, the embedded observe-mode policy),
    /// validated against the shipped schema with no route labels.
    pub fn inline(origin: &str, text: &str) -> PolicySource {
        PolicySource {
            origin: origin.into(),
            text: text.into(),
            schema: None,
            label_keys: BTreeSet::new(),
            mcp_arguments: BTreeMap::new(),
            files: None,
        }
    }

    /// The same, with these route label keys declared.
    pub fn with_labels<I: IntoIterator<Item = S>, S: Into<String>>(mut self, keys: I) -> Self {
        self.label_keys = keys.into_iter().map(Into::into).collect();
        self
    }

    /// The same, with these MCP tool arguments declared.
    pub fn with_arguments(mut self, declared: arguments::Declared) -> Self {
        self.mcp_arguments = declared;
        self
    }

    /// The schema policies are validated against: the operator's own, or the shipped one
    /// with the routes' label keys.
    pub(crate) fn schema_text(&self) -> std::borrow::Cow<'_, str> {
        match &self.schema {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(crate::policy::schema_for(
                &self.label_keys,
                &self.mcp_arguments,
            )),
        }
    }

    /// Read the policy (and schema) files again, as they are now.
    pub(crate) fn reread(&self) -> Result<PolicySource, String> {
        let Some((policy, schema)) = &self.files else {
            return Ok(self.clone());
        };
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        Ok(PolicySource {
            origin: self.origin.clone(),
            text: read(policy)?,
            schema: schema.as_deref().map(read).transpose()?,
            label_keys: self.label_keys.clone(),
            mcp_arguments: self.mcp_arguments.clone(),
            files: self.files.clone(),
        })
    }
}

/// The shipped schema, with an empty `Labels` record.
pub(crate) const SHIPPED_SCHEMA: &str = include_str!("policy.cedarschema");

/// The line of the shipped schema that the routes' label keys replace.
const LABELS_LINE: &str = "type Labels = {};";

/// The line of the shipped schema that the routes' declared tool arguments replace.
const ARGUMENTS_LINE: &str = "type McpArguments = {};";

/// The shipped schema with `Labels` declaring these keys, each an optional string, and
/// `McpArguments` these arguments.
pub(crate) fn schema_for(label_keys: &BTreeSet<String>, declared: &arguments::Declared) -> String {
    debug_assert!(SHIPPED_SCHEMA.contains(LABELS_LINE));
    debug_assert!(SHIPPED_SCHEMA.contains(ARGUMENTS_LINE));
    let mut text = SHIPPED_SCHEMA.to_string();
    if !label_keys.is_empty() {
        let fields: Vec<String> = label_keys
            .iter()
            .map(|k| format!("{}?: String", serde_json::Value::String(k.clone())))
            .collect();
        text = text.replacen(
            LABELS_LINE,
            &format!("type Labels = {{ {} }};", fields.join(", ")),
            1,
        );
    }
    if !declared.is_empty() {
        text = text.replacen(ARGUMENTS_LINE, &arguments::schema_type(declared), 1);
    }
    text
}

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
    pub stripped_types: &'a [&'a str],
    /// Credential the route injects, or empty.
    pub credential: &'a str,
    /// The client's address.
    pub client: IpAddr,
    /// The destination's address: the IP literal the app named, or, when policy reads it,
    /// the address its name resolved to (pinned for the connect).
    pub address: Option<IpAddr>,
    /// When the request arrived.
    pub time: SystemTime,
    /// The guardrail the destination trips, if any: the request is then allowed only by a
    /// permit annotated `@guardrail("<kind>")` (and policy may test `context.guardrail`).
    pub guardrail: Option<&'a GuardrailHit>,
    /// The protocol the request asks to switch to (`websocket`), or empty.
    pub upgrade: &'a str,
    /// The user the request acts for, when its route exchanges a user's token.
    pub on_behalf_of: Option<OnBehalfOf<'a>>,
    /// The MCP message decided, on a route with `mcp: true`.
    pub mcp: Option<McpContext<'a>>,
}

/// `context.mcp`: one JSON-RPC message of an MCP POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct McpContext<'a> {
    /// `tools/call`, `tools/list`, ...
    pub method: &'a str,
    /// The tool or prompt name, or the resource uri; "" when the method names none.
    pub name: &'a str,
    /// A tool call's arguments.
    pub arguments: McpArguments<'a>,
}

/// What is known of a tool call's arguments when it is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McpArguments<'a> {
    /// Not a tool call, or it has none.
    None,
    /// The call's `params.arguments`.
    Given(&'a serde_json::Value),
}

/// `context.on_behalf_of`: the user a request acts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnBehalfOf<'a> {
    /// The user token's `iss`.
    pub issuer: &'a str,
    /// Its `sub`.
    pub subject: &'a str,
    /// Whether its signature was checked against the issuer's keys.
    pub verified: bool,
}

/// The authorization outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    /// Whether the request may proceed.
    pub allow: bool,
    /// Ids of the policies that decided (permits on allow, forbids on deny).
    pub(crate) policy_ids: Vec<String>,
    /// Human-readable reason, for the log and the 403 body.
    pub(crate) reason: String,
}

/// Error compiling policies.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(String);

/// The policy set in force, swapped whole on reload: a request sees the old set or the new
/// one, never a mix, and loading it takes no lock.
pub(crate) struct PolicyStore {
    current: arc_swap::ArcSwap<PolicyEngine>,
    source: parking_lot::Mutex<PolicySource>,
    stamps: parking_lot::Mutex<Vec<crate::files::FileStamp>>,
    /// Changed files as last seen, not yet reloaded: they must look the same at the next
    /// look before they are.
    unsettled: parking_lot::Mutex<Option<Vec<crate::files::FileStamp>>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PolicyStore({:?})", self.current.load())
    }
}

impl PolicyStore {
    /// A store holding `engine`, compiled from `source`.
    pub(crate) fn new(
        engine: Arc<PolicyEngine>,
        source: PolicySource,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> PolicyStore {
        let stamps = Self::stamps(&source);
        engine.log_warnings(&source.origin);
        PolicyStore {
            current: arc_swap::ArcSwap::new(engine),
            source: parking_lot::Mutex::new(source),
            stamps: parking_lot::Mutex::new(stamps),
            unsettled: parking_lot::Mutex::new(None),
            metrics,
        }
    }

    fn stamps(source: &PolicySource) -> Vec<crate::files::FileStamp> {
        source
            .files
            .iter()
            .flat_map(|(p, s)| std::iter::once(p).chain(s))
            .map(|p| crate::files::stamp_of(p))
            .collect()
    }

    /// The set in force now.
    pub(crate) fn current(&self) -> arc_swap::Guard<Arc<PolicyEngine>> {
        self.current.load()
    }

    /// Re-read and recompile the policy files; swap them in only if they compile (and
    /// validate, with a schema). On failure the last good set stays in force, and the error
    /// is logged and counted (`chaperone_policy_reloads_total{result="rejected"}`).
    pub(crate) fn reload(&self, why: &str) -> Result<usize, PolicyError> {
        let source = self.source.lock().clone();
        let result = source
            .reread()
            .map_err(PolicyError)
            .and_then(|fresh| PolicyEngine::compile(&fresh).map(|e| (e, fresh)));
        let outcome = match result {
            Ok((engine, fresh)) => {
                let n = engine.len();
                engine.log_warnings(&source.origin);
                self.current.store(Arc::new(engine));
                *self.source.lock() = fresh;
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

    /// Reload when a policy or schema file changed, once it has settled: the change is
    /// taken when the files look the same at two looks in a row (a polling interval apart),
    /// so a file written in place in steps is never enforced half-written (a permit live
    /// before the forbid written after it). A file replaced by an atomic rename settles the
    /// same way; SIGHUP reloads at once.
    pub(crate) fn reload_if_changed(&self) {
        let source = self.source.lock().clone();
        let now = Self::stamps(&source);
        let mut seen = self.stamps.lock();
        let mut unsettled = self.unsettled.lock();
        if *seen == now {
            *unsettled = None;
            return;
        }
        if unsettled.as_ref() != Some(&now) {
            *unsettled = Some(now);
            return;
        }
        *unsettled = None;
        *seen = now;
        drop((seen, unsettled));
        let _ = self.reload("file changed");
    }

    /// Poll the files every `every`, and reload on SIGHUP. The handler is installed even for
    /// the embedded policy (which reloads as itself), so a SIGHUP never ends the process.
    pub(crate) fn spawn_watch(self: &Arc<Self>, every: std::time::Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut checks = crate::files::OffLoop::new("policy file");
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
                        checks.run(move || store.reload_if_changed());
                    }
                    _ = sighup => {
                        let Some(store) = me.upgrade() else { break };
                        let reload = move || { let _ = store.reload("SIGHUP"); };
                        if !checks.run_after(std::time::Duration::from_secs(5), reload).await {
                            tracing::warn!("SIGHUP: the previous policy read has not returned; not reloaded");
                        }
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
    /// The policies whose scope can match a request, per (principal, action, resource).
    slices: slice::Slices,
    /// Principal and resource entities, which are the same for every request from one
    /// identity to one destination on one route. Building them dominated a decision's cost
    /// (see BENCHMARKS.md); the key is the exact attribute text, so a hit is always exact.
    entities: memo::Memo<Arc<Entities>>,
    /// Validator warnings (e.g. a policy that can never apply), for `policy check` and the log.
    warnings: Vec<String>,
    /// `ip(...)` and `datetime(...)` context values, built once per client address and per
    /// second: Cedar parses the extension function's name on every construction, which
    /// cost 8 µs a decision (see BENCHMARKS.md).
    extension_values: ExtensionValues,
    /// Request contexts by exact content, for the second they describe.
    contexts: memo::Memo<Context>,
    /// Decisions by their entities' and context's keys together ([`Self::evaluate`]).
    decisions: memo::Memo<PolicyDecision>,
    /// The MCP tool arguments policy reads, and their types.
    mcp_arguments: arguments::Declared,
    /// The policies as `tools/list` filtering asks them ([`listing_set`]).
    listing: PolicySet,
    /// Some policy reads `context.address`: names are resolved before deciding.
    reads_address: bool,
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
    /// Parse, name (by `@id` annotation) and validate policies against the schema (the
    /// shipped one with the routes' label keys, or the operator's own).
    pub fn compile(src: &PolicySource) -> Result<PolicyEngine, PolicyError> {
        let parsed = PolicySet::from_str(&src.text).map_err(|e| {
            PolicyError(format!(
                "{}: policy does not parse: {}",
                src.origin,
                render(&e)
            ))
        })?;
        if parsed.templates().next().is_some() {
            return Err(PolicyError(format!(
                "{}: policy templates (`?principal`, `?resource`) are not supported; write the entity out",
                src.origin
            )));
        }
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
            if let Some(kind) = named.annotation("guardrail")
                && !GUARDRAIL_KINDS.contains(&kind)
            {
                return Err(PolicyError(format!(
                    "{}: policy `{}`: @guardrail(\"{kind}\") names no guardrail; use one of {}",
                    src.origin,
                    named.id(),
                    GUARDRAIL_KINDS.join(", ")
                )));
            }
            set.add(named)
                .map_err(|e| PolicyError(format!("{}: {}", src.origin, render(&e))))?;
        }
        let schema_origin = match &src.files {
            Some((_, Some(schema))) => schema.display().to_string(),
            _ => "the shipped policy.cedarschema".to_string(),
        };
        // Each policy's JSON form (EST), made once: slicing, the address check and the
        // listing set all read it. Cedar parses the policy's text again to make it, the
        // largest part of compiling (BENCHMARKS.md), so two thirds are made on a second
        // thread while this one reads the schema and validates, and the rest after.
        let policies: Vec<&Policy> = set.policies().collect();
        let (helped, own) = policies.split_at(policies.len() * 2 / 3);
        let (validated, ests) = std::thread::scope(|s| {
            let helper = s.spawn(|| json_forms(helped));
            let validated = Schema::from_cedarschema_str(&src.schema_text())
                .map(|(schema, _)| Validator::new(schema).validate(&set, ValidationMode::Strict));
            let mut ests = json_forms(own);
            match helper.join() {
                Ok(more) => ests.extend(more),
                Err(panic) => std::panic::resume_unwind(panic),
            }
            (validated, ests)
        });
        let result = validated
            .map_err(|e| PolicyError(format!("{schema_origin} does not parse: {}", render(&e))))?;
        if !result.validation_passed() {
            let errs: Vec<String> = result.validation_errors().map(|e| render(e)).collect();
            return Err(PolicyError(format!(
                "{}: policy does not validate against {schema_origin}: {}",
                src.origin,
                errs.join("; ")
            )));
        }
        // A policy that can never apply is refused, not warned about: it is almost always a
        // misspelt label or attribute guarded by `has`, and a forbid that never fires is a
        // hole nobody sees.
        let impossible: Vec<String> = result
            .validation_warnings()
            .filter(|w| matches!(w, cedar_policy::ValidationWarning::ImpossiblePolicy(_)))
            .map(|w| render(w))
            .collect();
        if !impossible.is_empty() {
            return Err(PolicyError(format!(
                "{}: {} (check attribute and label names against {schema_origin})",
                src.origin,
                impossible.join("; ")
            )));
        }
        let warnings = result.validation_warnings().map(|w| render(w)).collect();
        let ty = |s: &str| EntityTypeName::from_str(s).expect("valid type name");
        let listing = listing_set(&set, &ests).map_err(|e| {
            PolicyError(format!(
                "{}: cannot prepare the policies for tools/list filtering (please report this): {e}",
                src.origin
            ))
        })?;
        let reads_address = reads_address(&ests);
        Ok(PolicyEngine {
            slices: slice::Slices::new(&set, &ests),
            set,
            authorizer: Authorizer::new(),
            entities: memo::Memo::new(4096, 4 << 20),
            warnings,
            extension_values: ExtensionValues::default(),
            // The second is part of the key, so stale entries only wait for the next clear.
            contexts: memo::Memo::new(1024, 4 << 20),
            decisions: memo::Memo::new(2048, 2 << 20),
            mcp_arguments: src.mcp_arguments.clone(),
            listing,
            reads_address,
            workload_type: ty("Workload"),
            destination_type: ty("Destination"),
            action_type: ty("Action"),
        })
    }

    /// Whether some policy reads `context.address`, so a destination named by host name is
    /// resolved before deciding ([`crate::resolve`]).
    pub fn reads_address(&self) -> bool {
        self.reads_address
    }

    /// Number of policies in force.
    pub(crate) fn len(&self) -> usize {
        self.set.policies().count()
    }

    /// Log each validator warning (mixed scripts, confusable identifiers, ...).
    fn log_warnings(&self, origin: &str) {
        for w in &self.warnings {
            tracing::warn!(origin, warning = %w, "policy validator warning");
        }
    }

    /// Validator warnings, one line each.
    pub(crate) fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// An annotation of a policy, e.g. `guardrail`.
    pub(crate) fn annotation(&self, id: &str, key: &str) -> Option<&str> {
        self.set.annotation(&PolicyId::new(id), key)
    }

    /// `permit` or `forbid`.
    pub(crate) fn effect(&self, id: &str) -> Option<&'static str> {
        self.set
            .policy(&PolicyId::new(id))
            .map(|p| match p.effect() {
                cedar_policy::Effect::Permit => "permit",
                cedar_policy::Effect::Forbid => "forbid",
            })
    }

    /// A policy's Cedar text, as written.
    pub(crate) fn policy_text(&self, id: &str) -> Option<String> {
        self.set.policy(&PolicyId::new(id)).map(|p| p.to_string())
    }

    /// Ids of every policy, in file order.
    pub(crate) fn policy_ids(&self) -> Vec<String> {
        self.set.policies().map(|p| p.id().to_string()).collect()
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

    /// Whether policy could permit this tool call for some arguments (a `tools/list` answer
    /// is being filtered; the input's arguments are ignored): `false` only when it is denied
    /// whatever they are. Decided over [`listing_set`], where what policies read of the
    /// arguments is unknown, by Cedar's partial evaluation. An error counts as a denial.
    pub fn may_permit(&self, input: &PolicyInput<'_>) -> bool {
        let without = input.mcp.map(|m| McpContext {
            arguments: McpArguments::None,
            ..m
        });
        let input = PolicyInput {
            mcp: without,
            ..*input
        };
        let Ok((request, entities)) = self.request(&input, None) else {
            return false;
        };
        let partial = self
            .authorizer
            .is_authorized_partial(&request, &self.listing, &entities);
        partial.decision() != Some(Decision::Deny)
    }

    /// A decision is a function of what its entities and context hold, and both are keyed
    /// by exactly that (see [`Self::entities_key`], [`Self::context_key`]), so decisions are
    /// kept by the two keys together: a sidecar repeats the same request shape many times a
    /// second, and only its first in each second is evaluated.
    fn evaluate(&self, input: &PolicyInput<'_>) -> Result<PolicyDecision, String> {
        let entities_key = self.entities_key(input);
        let context_key = self.context_key(input);
        let second = context_key.second;
        let decision_key = context_key.memo.then(|| {
            let mut k = String::with_capacity(entities_key.len() + context_key.key.len() + 1);
            k.push_str(&entities_key);
            k.push('\u{1}');
            k.push_str(&context_key.key);
            k
        });
        if let Some(k) = &decision_key
            && let Some(hit) = self.decisions.get(k)
        {
            return Ok(hit);
        }
        let (request, entities) = self.request_keyed(input, None, entities_key, context_key)?;
        let slice = self.slices.for_request(
            &input.identity.id,
            input.action,
            input.host,
            &indexed_values(input),
        );
        let decision = self.conclude(input, &request, &slice, &entities)?;
        if let Some(k) = decision_key {
            let size = decision.reason.len()
                + decision
                    .policy_ids
                    .iter()
                    .map(|p| p.len() + 24)
                    .sum::<usize>()
                + 64;
            self.decisions
                .insert_in_second(k, decision.clone(), size, second);
        }
        Ok(decision)
    }

    /// The Cedar request and entities for this input; with a schema, both are checked
    /// against it (tests use that to hold the runtime shapes to the shipped schema).
    fn request(
        &self,
        input: &PolicyInput<'_>,
        schema: Option<&Schema>,
    ) -> Result<(Request, Arc<Entities>), String> {
        let keys = (self.entities_key(input), self.context_key(input));
        self.request_keyed(input, schema, keys.0, keys.1)
    }

    /// [`Self::request`], with the memo keys made already.
    fn request_keyed(
        &self,
        input: &PolicyInput<'_>,
        schema: Option<&Schema>,
        entities_key: String,
        context_key: ContextKey<'_>,
    ) -> Result<(Request, Arc<Entities>), String> {
        let id = input.identity;
        let principal =
            EntityUid::from_type_name_and_id(self.workload_type.clone(), EntityId::new(&id.id));
        let resource = EntityUid::from_type_name_and_id(
            self.destination_type.clone(),
            EntityId::new(input.host),
        );
        let action =
            EntityUid::from_type_name_and_id(self.action_type.clone(), EntityId::new(input.action));
        let entities = self.entities_for(input, entities_key, &principal, &resource)?;
        let context = self.context_for(input, context_key)?;
        let request = Request::new(principal, action, resource, context, schema)
            .map_err(|e| e.to_string())?;
        Ok((request, entities))
    }

    /// The request context (its attributes named in [`slice::INDEXED`] must stay strings,
    /// present in every context: see [`indexed_values`]). Building one is most of a decision's cost (Cedar evaluates each
    /// value as an expression), and a sidecar repeats the same request shape many times a
    /// second, so contexts are kept per exact content for the second they describe.
    fn context_key<'i>(&self, input: &PolicyInput<'i>) -> ContextKey<'i> {
        use std::fmt::Write;
        let id = input.identity;
        let secs = input
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut key = String::with_capacity(160);
        // NUL occurs in none of these: paths are URI paths, the rest are validated names.
        let _ = write!(
            key,
            "{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0{secs}\0{}\0{}",
            input.path,
            input.purpose,
            input.route,
            input.action,
            input.credential,
            id.stage,
            id.environment,
            input.client,
            input.guardrail.map_or("", |g| g.kind),
            input.upgrade,
        );
        if let Some(u) = input.on_behalf_of {
            let _ = write!(key, "\0user\0{}\0{}\0{}", u.issuer, u.subject, u.verified);
        }
        if let Some(a) = input.address {
            let _ = write!(key, "\0address\0{a}");
        }
        // A call's arguments are in the key as far as policy reads them (the declared ones,
        // as the client wrote them); a context whose read arguments are longer than
        // ARGUMENTS_MEMO_MAX is built each time, so client-chosen values cannot make the memo
        // large.
        let mut memo = true;
        let given = match input.mcp.map(|m| m.arguments) {
            _ if self.mcp_arguments.is_empty() => None,
            None | Some(McpArguments::None) => None,
            Some(McpArguments::Given(v)) => {
                let start = key.len();
                key.push_str("\0args");
                match v {
                    serde_json::Value::Object(m) => {
                        for name in self.mcp_arguments.keys() {
                            if let Some(x) = m.get(name) {
                                let _ = write!(key, "\0{name}={x}");
                            }
                        }
                    }
                    serde_json::Value::Null => {}
                    _ => key.push_str("\0!"),
                }
                memo = key.len() - start <= ARGUMENTS_MEMO_MAX;
                Some(v)
            }
        };
        if let Some(m) = input.mcp {
            let _ = write!(key, "\0mcp\0{}\0{}", m.method, m.name);
        }
        for t in input.stripped_types {
            key.push('\0');
            key.push_str(t);
        }
        ContextKey {
            key,
            second: secs,
            memo,
            given,
        }
    }

    /// The request context for `input`, whose [`Self::context_key`] is `key`.
    fn context_for(&self, input: &PolicyInput<'_>, key: ContextKey<'_>) -> Result<Context, String> {
        let ContextKey {
            key,
            second,
            memo,
            given,
        } = key;
        let id = input.identity;
        if memo && let Some(hit) = self.contexts.get(&key) {
            return Ok(hit);
        }
        let s = |v: &str| RestrictedExpression::new_string(v.to_string());
        let user = input.on_behalf_of.map(|u| {
            let record = RestrictedExpression::new_record([
                ("issuer".to_string(), s(u.issuer)),
                ("subject".to_string(), s(u.subject)),
                (
                    "verified".to_string(),
                    RestrictedExpression::new_bool(u.verified),
                ),
            ]);
            record.map(|r| ("on_behalf_of".to_string(), r))
        });
        let user = user.transpose().map_err(|e| e.to_string())?;
        let mcp = input
            .mcp
            .map(|m| {
                let args = given
                    .and_then(|v| arguments::record(&self.mcp_arguments, Some(v)))
                    .map(|a| ("arguments".to_string(), a));
                RestrictedExpression::new_record(
                    [
                        ("method".to_string(), s(m.method)),
                        ("name".to_string(), s(m.name)),
                    ]
                    .into_iter()
                    .chain(args),
                )
                .map(|r| ("mcp".to_string(), r))
            })
            .transpose()
            .map_err(|e| e.to_string())?;
        let address = input
            .address
            .map(|a| ("address".to_string(), self.extension_values.ip(a)));
        let context = Context::from_pairs(
            [
                ("path".to_string(), s(input.path)),
                ("purpose".to_string(), s(input.purpose)),
                ("route".to_string(), s(input.route)),
                ("method".to_string(), s(input.action)),
                (
                    "stripped_types".to_string(),
                    RestrictedExpression::new_set(input.stripped_types.iter().map(|t| s(t))),
                ),
                ("credential".to_string(), s(input.credential)),
                ("stage".to_string(), s(&id.stage)),
                ("environment".to_string(), s(&id.environment)),
                (
                    "client_address".to_string(),
                    self.extension_values.ip(input.client),
                ),
                (
                    "request_time".to_string(),
                    self.extension_values.datetime(input.time),
                ),
                (
                    "guardrail".to_string(),
                    s(input.guardrail.map_or("", |g| g.kind)),
                ),
                ("upgrade".to_string(), s(input.upgrade)),
            ]
            .into_iter()
            .chain(user)
            .chain(mcp)
            .chain(address),
        )
        .map_err(|e| e.to_string())?;
        if memo {
            // A context holds its attributes' values: about what its key spells.
            let size = key.len() * 2 + CONTEXT_BYTES;
            self.contexts
                .insert_in_second(key, context.clone(), size, second);
        }
        Ok(context)
    }

    /// Authorize `request` against `set` and explain the outcome.
    fn conclude(
        &self,
        input: &PolicyInput<'_>,
        request: &Request,
        set: &PolicySet,
        entities: &Entities,
    ) -> Result<PolicyDecision, String> {
        let response = self.authorizer.is_authorized(request, set, entities);
        // Sorted: Cedar reports them as a set, and a log line should not vary run to run.
        let mut policy_ids: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|p| p.to_string())
            .collect();
        policy_ids.sort_unstable();
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        Ok(match response.decision() {
            Decision::Allow => match input.guardrail {
                // A guarded destination needs a permit that names the guardrail it lifts:
                // a broad `permit(principal, action, resource)` must not open it by accident.
                Some(g) => {
                    let lifting: Vec<String> = response
                        .diagnostics()
                        .reason()
                        .filter(|p| self.set.annotation(p, "guardrail") == Some(g.kind))
                        .map(|p| p.to_string())
                        .collect();
                    if lifting.is_empty() {
                        PolicyDecision {
                            allow: false,
                            policy_ids: vec![],
                            reason: format!(
                                "guardrail: {}; only a permit annotated @guardrail(\"{}\") can allow it",
                                g.why, g.kind
                            ),
                        }
                    } else {
                        PolicyDecision {
                            allow: true,
                            reason: format!(
                                "guardrail `{}` lifted and permitted by {}",
                                g.kind,
                                lifting.join(", ")
                            ),
                            policy_ids: lifting,
                        }
                    }
                }
                None => PolicyDecision {
                    allow: true,
                    reason: format!("permitted by {}", policy_ids.join(", ")),
                    policy_ids,
                },
            },
            Decision::Deny if !policy_ids.is_empty() => PolicyDecision {
                allow: false,
                reason: format!("forbidden by {}", policy_ids.join(", ")),
                policy_ids,
            },
            Decision::Deny => PolicyDecision {
                allow: false,
                policy_ids,
                reason: match (input.guardrail, errors.is_empty()) {
                    (Some(g), _) => format!("guardrail: {}", g.why),
                    (None, true) => "no policy permits this request".to_string(),
                    (None, false) => format!(
                        "no policy permits this request (evaluation errors: {})",
                        errors.join("; ")
                    ),
                },
            },
        })
    }
}

impl PolicyEngine {
    /// The principal and resource entities for this request, built once per distinct
    /// (identity, destination, route) and then shared.
    fn entities_key(&self, input: &PolicyInput<'_>) -> String {
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
        key
    }

    /// The principal and resource entities for `input`, whose [`Self::entities_key`] is
    /// `key`.
    fn entities_for(
        &self,
        input: &PolicyInput<'_>,
        key: String,
        principal: &EntityUid,
        resource: &EntityUid,
    ) -> Result<Arc<Entities>, String> {
        let id = input.identity;
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
        let size = key.len() * 2 + ENTITIES_BYTES;
        self.entities.insert(key, entities.clone(), size);
        Ok(entities)
    }
}

/// Cached `ip(...)` and `datetime(...)` expressions.
#[derive(Default)]
struct ExtensionValues {
    ips: parking_lot::Mutex<HashMap<IpAddr, RestrictedExpression>>,
    second: parking_lot::Mutex<Option<(u64, RestrictedExpression)>>,
}

impl ExtensionValues {
    /// A client address; at most 1024 distinct ones are kept (a sidecar sees its pod).
    fn ip(&self, ip: IpAddr) -> RestrictedExpression {
        let mut ips = self.ips.lock();
        if let Some(e) = ips.get(&ip) {
            return e.clone();
        }
        let e = RestrictedExpression::new_ip(ip.to_string());
        if ips.len() >= 1024 {
            ips.clear();
        }
        ips.insert(ip, e.clone());
        e
    }

    /// The request time, to the second (UTC).
    fn datetime(&self, t: SystemTime) -> RestrictedExpression {
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut slot = self.second.lock();
        match &*slot {
            Some((s, e)) if *s == secs => e.clone(),
            _ => {
                let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
                let e = RestrictedExpression::new_datetime(
                    humantime::format_rfc3339_seconds(at).to_string(),
                );
                *slot = Some((secs, e.clone()));
                e
            }
        }
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

/// The request's values of the context attributes policies are sliced on, in the order of
/// [`slice::INDEXED`]; each is the value `context_for` gives that attribute.
fn indexed_values<'a>(input: &PolicyInput<'a>) -> [&'a str; slice::INDEXED.len()] {
    [
        input.purpose,
        input.route,
        input.action,
        input.credential,
        &input.identity.stage,
        &input.identity.environment,
        input.guardrail.map_or("", |g| g.kind),
    ]
}

/// The policies as `tools/list` filtering asks them: whatever a policy reads of an MCP tool
/// call's arguments (`context.mcp.arguments`, `context.mcp has arguments`) is made an unknown
/// (Cedar's `unknown(...)`), so partial evaluation tells a tool no call could be permitted
/// (a forbid that holds whatever the arguments, or no permit that could) from one some calls
/// could. Cedar's evaluator leaves `has` on a record holding an unknown undecided, so the
/// unknowns go into the policies rather than into the context.
fn listing_set(set: &PolicySet, ests: &Ests) -> Result<PolicySet, String> {
    let mut out = PolicySet::new();
    for p in set.policies() {
        let est = ests
            .get(p.id())
            .and_then(Option::as_ref)
            .ok_or_else(|| format!("policy `{}` has no JSON form", p.id()))?;
        // Most policies read no arguments: looked at first, copied only when one does.
        let policy = if reads_context_attr(est, "mcp") {
            let mut est = est.clone();
            if unknown_arguments(&mut est) {
                cedar_policy::Policy::from_json(Some(p.id().clone()), est)
                    .map_err(|e| e.to_string())?
            } else {
                p.clone()
            }
        } else {
            p.clone()
        };
        out.add(policy).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Each policy's JSON form (Cedar's EST), `None` where Cedar could not make one.
type Ests = HashMap<PolicyId, Option<serde_json::Value>>;

fn json_forms(policies: &[&Policy]) -> Ests {
    policies
        .iter()
        .map(|p| (p.id().clone(), p.to_json().ok()))
        .collect()
}

/// Whether a policy reads `context.address` (tests it with `has`, or reads it); one without
/// a JSON form is assumed to.
fn reads_address(ests: &Ests) -> bool {
    ests.values().any(|est| {
        est.as_ref()
            .is_none_or(|e| reads_context_attr(e, "address"))
    })
}

/// Whether a policy's JSON form reads `context.<attr>` (or tests it with `has`).
fn reads_context_attr(v: &serde_json::Value, attr: &str) -> bool {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let here = [".", "has"].iter().any(|op| {
                m.get(*op)
                    .is_some_and(|inner| inner["attr"] == attr && inner["left"]["Var"] == "context")
            });
            here || m.values().any(|x| reads_context_attr(x, attr))
        }
        Value::Array(items) => items.iter().any(|x| reads_context_attr(x, attr)),
        _ => false,
    }
}

/// Replace, in a policy's JSON form, every `context.mcp.arguments` and `context.mcp has
/// arguments` with an unknown; whether any was.
fn unknown_arguments(v: &mut serde_json::Value) -> bool {
    use serde_json::{Value, json};
    let context_mcp = json!({".": {"left": {"Var": "context"}, "attr": "mcp"}});
    match v {
        Value::Object(m) => {
            for (op, name) in [(".", "arguments"), ("has", "has_arguments")] {
                if m.len() == 1
                    && let Some(inner) = m.get(op)
                    && inner["attr"] == "arguments"
                    && inner["left"] == context_mcp
                {
                    *v = json!({"unknown": [{"Value": name}]});
                    return true;
                }
            }
            let mut any = false;
            for x in m.values_mut() {
                any |= unknown_arguments(x);
            }
            any
        }
        Value::Array(items) => {
            let mut any = false;
            for x in items {
                any |= unknown_arguments(x);
            }
            any
        }
        _ => false,
    }
}

/// A request context's memo key, whether it may be memoised (a call's read arguments are
/// short enough), and the call's arguments as given.
struct ContextKey<'i> {
    key: String,
    /// The Unix second the context describes (its `request_time`).
    second: u64,
    memo: bool,
    given: Option<&'i serde_json::Value>,
}

/// What a memoised request context and an entity pair hold beyond their text, roughly
/// (Cedar's values, maps and extension values).
const CONTEXT_BYTES: usize = 2048;
const ENTITIES_BYTES: usize = 1024;

/// The longest text of a call's read arguments that a memoised context is keyed by.
const ARGUMENTS_MEMO_MAX: usize = 256;

/// The guardrails' kinds, as `@guardrail("...")` annotations and `context.guardrail` name them.
pub(crate) const GUARDRAIL_KINDS: [&str; 3] = ["metadata", "link_local", "own_listener"];

/// A destination a guardrail refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardrailHit {
    /// `metadata`, `link_local` or `own_listener`.
    pub(crate) kind: &'static str,
    /// What the destination is, for the log and the 403 body.
    pub(crate) why: String,
}

/// Destinations refused before policy unless a permit annotated `@guardrail("<kind>")`
/// allows them: cloud metadata, link-local, and the sidecar's own listeners (which would
/// loop or expose the admin API).
#[derive(Debug, Clone, Default)]
pub(crate) struct Guardrails {
    own: Vec<SocketAddr>,
}

impl Guardrails {
    /// Guardrails protecting these local listeners.
    pub(crate) fn new(own: Vec<SocketAddr>) -> Self {
        Guardrails { own }
    }

    /// Whether this destination (as named: host name or IP literal) trips a guardrail.
    pub(crate) fn check(&self, host: &str, port: u16) -> Option<GuardrailHit> {
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        if h == "metadata.google.internal" || h == "metadata" || h == "instance-data" {
            return Some(GuardrailHit {
                kind: "metadata",
                why: format!("{h} is a cloud metadata endpoint"),
            });
        }
        let ip = if h == "localhost" || h.ends_with(".localhost") {
            IpAddr::from([127, 0, 0, 1])
        } else {
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .ok()?
        };
        self.check_addr(SocketAddr::new(ip, port))
    }

    /// Whether this resolved (or connected) address trips a guardrail.
    pub(crate) fn check_addr(&self, addr: SocketAddr) -> Option<GuardrailHit> {
        if let Some(hit) = Self::check_ip(addr.ip()) {
            return Some(hit);
        }
        // 0.0.0.0 and :: reach this host when connected to: for the sidecar's own listeners
        // they are loopback.
        let ip = match unmapped(addr.ip()) {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let port = addr.port();
        for own in &self.own {
            let same_ip = own.ip() == ip
                || (own.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified()))
                || (own.ip().is_loopback() && ip.is_loopback());
            if same_ip && own.port() == port {
                return Some(GuardrailHit {
                    kind: "own_listener",
                    why: format!("{ip}:{port} is one of the sidecar's own listeners"),
                });
            }
        }
        None
    }

    /// Whether this address trips a guardrail whatever the port (metadata, link-local).
    pub(crate) fn check_ip(ip: IpAddr) -> Option<GuardrailHit> {
        let ip = unmapped(ip);
        // AWS, Azure, GCP, OCI, OpenStack and most others; ECS task metadata; AWS over IPv6;
        // Alibaba Cloud.
        let metadata = [
            IpAddr::from([169, 254, 169, 254]),
            IpAddr::from([169, 254, 170, 2]),
            "fd00:ec2::254".parse().expect("literal"),
            IpAddr::from([100, 100, 100, 200]),
        ];
        if metadata.contains(&ip) {
            return Some(GuardrailHit {
                kind: "metadata",
                why: format!("{ip} is a cloud metadata address"),
            });
        }
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        };
        link_local.then(|| GuardrailHit {
            kind: "link_local",
            why: format!("{ip} is a link-local address"),
        })
    }
}

/// The IPv4 address an IPv6 one reaches, where it embeds one: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`, deprecated but still routed by some
/// stacks), and NAT64 (`64:ff9b::/96`, RFC 6052, and the local-use `64:ff9b:1::/48`, RFC
/// 8215, whose translator sends it on as IPv4).
fn unmapped(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    let tail = std::net::Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7]));
    let compatible = s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1);
    let nat64 = s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0; 4] || s[2] == 1);
    if compatible || nat64 {
        IpAddr::V4(tail)
    } else {
        ip
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
        PolicyEngine::compile(
            &PolicySource::inline("test.cedar", text).with_labels(["sensitivity"]),
        )
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
            client: IpAddr::from([127, 0, 0, 1]),
            address: None,
            time: SystemTime::now(),
            guardrail: None,
            upgrade: "",
            on_behalf_of: None,
            mcp: None,
        }
    }

    /// `context.address` is read where it is given, and an engine knows whether any policy
    /// reads it (the pipeline resolves names only then).
    #[test]
    fn the_destination_address_is_a_policy_attribute_when_given() {
        let id = ident();
        let e = engine(
            r#"@id("allow") permit (principal, action, resource);
            @id("no-private") forbid (principal, action, resource)
            when { context has address && context.address.isInRange(ip("10.0.0.0/8")) };"#,
        );
        assert!(e.reads_address());
        let at = |a: Option<[u8; 4]>| PolicyInput {
            address: a.map(IpAddr::from),
            ..input(&id, "inference", None)
        };
        let private = e.decide(&at(Some([10, 1, 2, 3])));
        assert!(!private.allow);
        assert_eq!(private.policy_ids, ["no-private"]);
        assert!(e.decide(&at(Some([203, 0, 113, 7]))).allow);
        // The memoised context of one address is not another's.
        assert!(!e.decide(&at(Some([10, 1, 2, 3]))).allow);
        assert!(e.decide(&at(None)).allow);
        let plain = engine(r#"@id("allow") permit (principal, action, resource);"#);
        assert!(!plain.reads_address());
    }

    /// A decision is kept by everything Cedar reads: the same request shape is answered
    /// from the memo, and a request that differs in any one read attribute is decided anew.
    #[test]
    fn decisions_are_memoised_by_everything_cedar_reads() {
        let id = ident();
        let e = engine(
            r#"@id("a") permit (principal, action, resource)
            when { context.purpose == "inference" && context.client_address.isLoopback()
                   && resource.labels has sensitivity };"#,
        );
        let labels = BTreeMap::from([("sensitivity".to_string(), "high".to_string())]);
        let base = input(&id, "inference", Some(&labels));
        assert!(e.decide(&base).allow);
        assert!(e.decisions.used() > 0, "kept");
        assert!(e.decide(&base).allow, "from the memo, the same");
        assert!(
            !e.decide(&input(&id, "other", Some(&labels))).allow,
            "purpose"
        );
        assert!(!e.decide(&input(&id, "inference", None)).allow, "labels");
        let remote = PolicyInput {
            client: IpAddr::from([10, 0, 0, 1]),
            ..base
        };
        assert!(!e.decide(&remote).allow, "client address");
        let elsewhere = PolicyInput {
            host: "api.example.org",
            ..base
        };
        assert!(
            e.decide(&elsewhere).allow,
            "another destination, decided on its own"
        );
        assert!(e.decide(&base).allow);
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
        let err = PolicyEngine::compile(&PolicySource::inline(
            "p.cedar",
            "permit(principal, action, resource",
        ))
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
        assert!(g.check("169.254.170.2", 80).is_some());
        assert_eq!(g.check("169.254.1.1", 80).unwrap().kind, "link_local");
        assert_eq!(g.check("[fe80::1]", 80).unwrap().kind, "link_local");
        assert!(g.check("metadata.google.internal", 80).is_some());
        assert!(g.check("[fd00:ec2::254]", 80).is_some());
        assert!(g.check("::ffff:169.254.169.254", 80).is_some());
        assert!(g.check("127.0.0.1", 15000).is_some());
        assert!(g.check("127.0.0.1", 15001).is_some());
        assert!(g.check("localhost", 15000).is_some());
        assert!(g.check("127.0.0.1", 8080).is_none());
        assert!(g.check("api.openai.com", 443).is_none());
        // Every other way of writing them (the target stage canonicalises the inet_aton
        // forms first; these are what reach the guardrails as addresses).
        for (host, kind) in [
            ("0.0.0.0", "own_listener"),
            ("[::]", "own_listener"),
            ("[::ffff:0.0.0.0]", "own_listener"),
            ("[::1]", "own_listener"),
            ("100.100.100.200", "metadata"),
            ("[::169.254.169.254]", "metadata"),
            ("[::a9fe:a9fe]", "metadata"),
            ("[64:ff9b::a9fe:a9fe]", "metadata"),
            ("[64:ff9b::169.254.169.254]", "metadata"),
            ("[64:ff9b:1::a9fe:a9fe]", "metadata"),
            ("[64:ff9b::a9fe:101]", "link_local"),
        ] {
            let port = if kind == "own_listener" { 15000 } else { 80 };
            assert_eq!(g.check(host, port).map(|h| h.kind), Some(kind), "{host}");
        }
        assert!(g.check("0.0.0.0", 8080).is_none(), "not a listener");
        assert!(
            g.check("[64:ff9b::808:808]", 80).is_none(),
            "8.8.8.8 through NAT64"
        );
        assert!(g.check("[2001:db8::a9fe:a9fe]", 80).is_none());
    }

    #[track_caller]
    fn compile_err(text: &str) -> String {
        PolicyEngine::compile(&PolicySource::inline("p.cedar", text).with_labels(["sensitivity"]))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn shipped_schema_catches_typos_unknown_labels_and_actions() {
        let e =
            compile_err(r#"permit(principal, action, resource) when { context.purpse == "x" };"#);
        assert!(
            e.contains("does not validate against the shipped policy.cedarschema"),
            "{e}"
        );
        assert!(e.contains("purpse"), "{e}");
        let e = compile_err(
            r#"forbid(principal, action, resource) when { resource.labels has sensitivty && resource.labels.sensitivty == "high" };"#,
        );
        assert!(
            e.contains("for policy `policy0`, policy is impossible"),
            "{e}"
        );
        let e = compile_err(r#"permit(principal, action == Action::"FETCH", resource);"#);
        assert!(e.contains("FETCH"), "{e}");
        let e =
            compile_err(r#"permit(principal, action, resource) when { principal.stage == 3 };"#);
        assert!(e.contains("does not validate"), "{e}");
        // A label no route declares is unknown even when spelled as a route might.
        let none = PolicyEngine::compile(&PolicySource::inline(
            "p.cedar",
            r#"permit(principal, action, resource) when { resource.labels has team && resource.labels.team == "ml" };"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(none.contains("impossible"), "{none}");
        let e = compile_err(r#"@guardrail("admin") permit(principal, action, resource);"#);
        assert!(e.contains("names no guardrail"), "{e}");
    }

    #[test]
    fn schema_for_quotes_label_keys() {
        let keys: BTreeSet<String> = ["data-class".to_string(), "sensitivity".into()].into();
        let text = schema_for(&keys, &BTreeMap::new());
        assert!(
            text.contains(r#"type Labels = { "data-class"?: String, "sensitivity"?: String };"#)
        );
        let _ = Schema::from_cedarschema_str(&text).unwrap();
        let e = PolicyEngine::compile(
            &PolicySource::inline(
                "p.cedar",
                r#"permit(principal, action, resource) when { resource.labels has "data-class" && resource.labels["data-class"] == "pii" };"#,
            )
            .with_labels(["data-class"]),
        );
        assert!(e.is_ok(), "{e:?}");
    }

    /// Requests to thousands of new hosts (denied, under 100 policies no scope slices) share
    /// one policy subset, and every memo stays within its byte budget: memory does not grow
    /// with the destinations a client names.
    #[test]
    fn new_destinations_do_not_grow_the_caches() {
        let text: String = (0..100)
            .map(|i| {
                format!(
                    "@id(\"p{i}\") permit(principal, action, resource) when {{ context.path like \"/only-{i}/*\" }};\n"
                )
            })
            .collect();
        let e = engine(&text);
        let id = ident();
        for n in 0..4000 {
            let host = format!("h{n}-{}.example.org", "x".repeat(200));
            let mut i = input(&id, "inference", None);
            i.host = &host;
            assert!(!e.decide(&i).allow);
        }
        assert_eq!(e.slices.subsets(), 1, "one shared subset");
        assert!(e.entities.used() <= 4 << 20);
        assert!(e.contexts.used() <= 4 << 20);
    }

    #[test]
    fn a_policy_file_is_reloaded_only_once_it_has_settled() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.cedar");
        let permit = r#"@id("allow-all") permit(principal, action, resource);"#;
        std::fs::write(&file, "").unwrap();
        let mut src = PolicySource::inline(&file.display().to_string(), "");
        src.files = Some((file.clone(), None));
        let store = PolicyStore::new(
            Arc::new(PolicyEngine::compile(&src).unwrap()),
            src,
            Arc::new(crate::metrics::Metrics::default()),
        );
        // Written in two steps, the first seen alone: a permit without its forbid.
        std::fs::write(&file, permit).unwrap();
        store.reload_if_changed();
        assert_eq!(
            store.current().len(),
            0,
            "not yet: it may still be being written"
        );
        let both = format!(
            "{permit}\n@id(\"no-export\") forbid(principal, action, resource) when {{ context.purpose == \"export\" }};"
        );
        std::fs::write(&file, &both).unwrap();
        store.reload_if_changed();
        assert_eq!(
            store.current().len(),
            0,
            "changed again since the last look"
        );
        store.reload_if_changed();
        assert_eq!(store.current().len(), 2, "settled: both at once");
        store.reload_if_changed();
        assert_eq!(store.current().len(), 2);
    }

    #[test]
    fn runtime_request_matches_the_shipped_schema() {
        let id = ident();
        let e = engine("");
        let schema = Schema::from_cedarschema_str(&schema_for(
            &["sensitivity".to_string()].into(),
            &BTreeMap::new(),
        ))
        .unwrap()
        .0;
        let labels = BTreeMap::from([("sensitivity".to_string(), "high".to_string())]);
        for labels in [None, Some(&labels)] {
            let inp = input(&id, "inference", labels);
            let (_, entities) = e
                .request(&inp, Some(&schema))
                .expect("context fits the schema");
            Entities::from_entities(entities.iter().cloned(), Some(&schema))
                .expect("entities fit the schema");
        }
        let mut connect = input(&id, "inference", None);
        connect.action = "CONNECT";
        e.request(&connect, Some(&schema))
            .expect("CONNECT fits the schema");
    }

    fn tools_engine(text: &str) -> PolicyEngine {
        use arguments::ArgType;
        let declared = BTreeMap::from([
            ("repo".to_string(), ArgType::String),
            ("limit".to_string(), ArgType::Long),
        ]);
        PolicyEngine::compile(&PolicySource::inline("tools.cedar", text).with_arguments(declared))
            .unwrap()
    }

    const TOOL_POLICY: &str = r#"@id("session")
permit(principal, action, resource) when { context has mcp && context.mcp.method != "tools/call" };
@id("public-search")
permit(principal, action, resource) when {
  context has mcp && context.mcp.name == "search_docs" &&
  context.mcp has arguments && context.mcp.arguments has repo && context.mcp.arguments.repo == "public" &&
  (if context.mcp.arguments has limit then context.mcp.arguments.limit <= 50 else true)
};
@id("never-delete")
forbid(principal, action, resource) when { context has mcp && context.mcp.name == "delete_repository" };
@id("no-private")
forbid(principal, action, resource) when { context has mcp && context.mcp has arguments && context.mcp.arguments has repo && context.mcp.arguments.repo == "private" };
@id("admins-delete")
permit(principal, action, resource) when { context has mcp && context.mcp.name == "delete_repository" };
"#;

    #[test]
    fn tool_arguments_are_read_by_their_declared_types() {
        let id = ident();
        let e = tools_engine(TOOL_POLICY);
        let call = |args: serde_json::Value| {
            let mut i = input(&id, "tool:search_docs", None);
            i.mcp = Some(McpContext {
                method: "tools/call",
                name: "search_docs",
                arguments: McpArguments::Given(&args),
            });
            e.decide(&i)
        };
        let d = call(serde_json::json!({"query": "x", "repo": "public"}));
        assert!(d.allow, "{d:?}");
        assert_eq!(d.policy_ids, vec!["public-search"]);
        assert!(call(serde_json::json!({"repo": "public", "limit": 10})).allow);
        assert!(!call(serde_json::json!({"repo": "public", "limit": 500})).allow);
        let private = call(serde_json::json!({"repo": "private"}));
        assert_eq!(
            (private.allow, private.policy_ids),
            (false, vec!["no-private".to_string()])
        );
        assert!(!call(serde_json::json!({"query": "x"})).allow);
        // Of another type than declared: `arguments` is absent, the permit does not apply.
        assert!(!call(serde_json::json!({"repo": ["public"]})).allow);
        assert!(!call(serde_json::json!({"repo": "public", "limit": "10"})).allow);
        // The context memo is keyed by the values policy reads: asked again, the same answers;
        // a value too long to key by is decided afresh each time.
        assert!(call(serde_json::json!({"repo": "public"})).allow);
        assert!(!call(serde_json::json!({"repo": "private"})).allow);
        assert!(call(serde_json::json!({"repo": "public", "query": "x".repeat(4096)})).allow);
        let long = "p".repeat(ARGUMENTS_MEMO_MAX + 1);
        for _ in 0..2 {
            assert!(!call(serde_json::json!({ "repo": long })).allow);
            assert!(call(serde_json::json!({"repo": "public"})).allow);
        }
    }

    #[test]
    fn a_tool_is_offered_unless_denied_whatever_its_arguments() {
        let id = ident();
        let e = tools_engine(TOOL_POLICY);
        let offered = |name: &str| {
            let purpose = format!("tool:{name}");
            let mut i = input(&id, &purpose, None);
            i.mcp = Some(McpContext {
                method: "tools/call",
                name,
                arguments: McpArguments::None,
            });
            e.may_permit(&i)
        };
        assert!(
            offered("search_docs"),
            "permitted for some arguments, forbidden for others"
        );
        assert!(
            !offered("delete_repository"),
            "forbidden whatever the arguments"
        );
        assert!(!offered("drop_tables"), "no permit could apply");
        let open = tools_engine(
            r#"permit(principal, action, resource) when { context has mcp && context.mcp.name like "*" };"#,
        );
        let mut i = input(&id, "tool:x", None);
        i.mcp = Some(McpContext {
            method: "tools/call",
            name: "anything",
            arguments: McpArguments::None,
        });
        assert!(open.may_permit(&i));
    }

    #[test]
    fn client_address_and_request_time_are_in_context() {
        let id = ident();
        let e = engine(
            r#"@id("office-hours-from-pod")
permit(principal, action, resource)
when { context.client_address.isInRange(ip("10.0.0.0/8")) && context.request_time.toTime() >= duration("9h") && context.request_time.toTime() < duration("18h") };"#,
        );
        let at = |t: &str| humantime::parse_rfc3339(t).unwrap();
        let mut i = input(&id, "inference", None);
        i.client = "10.1.2.3".parse().unwrap();
        i.time = at("2026-11-24T10:00:00Z");
        assert!(e.decide(&i).allow);
        i.time = at("2026-11-24T19:00:00Z");
        assert!(!e.decide(&i).allow);
        i.time = at("2026-11-24T10:00:00Z");
        i.client = "192.168.1.2".parse().unwrap();
        assert!(!e.decide(&i).allow);
    }

    #[test]
    fn a_guardrail_is_lifted_only_by_an_annotated_permit() {
        let id = ident();
        let g = Guardrails::new(vec![]);
        let hit = g.check("169.254.169.254", 80).unwrap();
        assert_eq!(hit.kind, "metadata");
        let mut i = input(&id, "inference", None);
        i.guardrail = Some(&hit);
        let broad = engine("permit(principal, action, resource);");
        let d = broad.decide(&i);
        assert!(!d.allow);
        assert!(
            d.reason.contains(r#"@guardrail("metadata")"#),
            "{}",
            d.reason
        );
        let lifted = engine(
            r#"permit(principal, action, resource);
@id("metadata-for-inference")
@guardrail("metadata")
permit(principal, action, resource) when { context.guardrail == "metadata" && principal.workload == "inference" };"#,
        );
        let d = lifted.decide(&i);
        assert!(d.allow, "{d:?}");
        assert_eq!(d.policy_ids, vec!["metadata-for-inference"]);
        // The annotation must name the guardrail tripped.
        let own = g.check("127.0.0.1", 1).is_none();
        assert!(own);
        let other = Guardrails::new(vec!["127.0.0.1:15000".parse().unwrap()]);
        let hit = other.check("localhost", 15000).unwrap();
        assert_eq!(hit.kind, "own_listener");
        i.guardrail = Some(&hit);
        assert!(!lifted.decide(&i).allow);
        // A forbid still wins over a lifting permit.
        let forbidden = engine(
            r#"@guardrail("metadata") permit(principal, action, resource);
@id("never-metadata") forbid(principal, action, resource) when { context.guardrail == "metadata" };"#,
        );
        let hit = g.check("metadata.google.internal", 80).unwrap();
        i.guardrail = Some(&hit);
        let d = forbidden.decide(&i);
        assert!(!d.allow);
        assert_eq!(d.policy_ids, vec!["never-metadata"]);
    }

    /// Slicing must never change a decision: compare with Cedar over the whole set on every
    /// combination of principal, action and destination the policies mention (and some
    /// they do not).
    #[test]
    fn slicing_decides_exactly_as_the_whole_set() {
        let text = r#"
@id("a") permit(principal == Workload::"spiffe://t/ns/ml/sa/inference", action == Action::"POST", resource == Destination::"api.openai.com");
@id("b") permit(principal, action in [Action::"GET", Action::"HEAD"], resource == Destination::"datasets.internal");
@id("c") permit(principal in Workload::"spiffe://t/other", action, resource);
@id("d") permit(principal is Workload, action == Action::"PUT", resource is Destination);
@id("e") forbid(principal, action, resource in Destination::"api.openai.com") when { context.purpose == "export-data" };
@id("f") permit(principal is Workload in Workload::"spiffe://t/ns/ml/sa/inference", action == Action::"CONNECT", resource is Destination in Destination::"github.com");
@id("g") forbid(principal, action == Action::"DELETE", resource);
@id("h") permit(principal, action, resource) when { context.route == "r" };
@id("i") permit(principal, action, resource) when { context.purpose == "inference" && context.route == "r" && resource.port == 443 };
@id("j") forbid(principal, action, resource) when { "q" == context.route };
@id("k") permit(principal, action, resource) when { resource == Destination::"github.com" && context.method == "GET" };
@id("l") permit(principal, action, resource) when { context.method == "PATCH" } when { context.purpose == "p" };
@id("m") permit(principal, action, resource) when { context.stage == "main" && context.environment == "prod" };
@id("n") permit(principal, action, resource) when { context.environment == "staging" };
@id("o") forbid(principal, action, resource) when { context.credential == "none" };
@id("p") permit(principal, action == Action::"HEAD", resource) when { context.guardrail == "" && context.path like "/v1/*" };
@id("q") permit(principal, action, resource) unless { context.route == "r" };
@id("r") permit(principal, action, resource) when { true && context.route == "never" };
@id("s") permit(principal, action, resource) when { context.path == "/v1/chat/completions" && context.purpose == "p" };
"#;
        let e = engine(text);
        let mut other = ident();
        other.id = "spiffe://t/other".into();
        let ids = [ident(), other];
        let mut compared = 0;
        for id in &ids {
            for action in ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "PATCH"] {
                for host in [
                    "api.openai.com",
                    "datasets.internal",
                    "github.com",
                    "x.example",
                ] {
                    for (purpose, route, credential) in [
                        ("inference", "r", "openai"),
                        ("export-data", "", "none"),
                        ("p", "q", "openai"),
                    ] {
                        let mut i = input(id, purpose, None);
                        i.action = action;
                        i.host = host;
                        i.route = route;
                        i.credential = credential;
                        let (request, entities) = e.request(&i, None).unwrap();
                        let whole = e.conclude(&i, &request, &e.set, &entities).unwrap();
                        assert_eq!(e.decide(&i), whole, "{} {action} {host} {purpose}", id.id);
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(compared, 2 * 7 * 4 * 3);
        // And slices really are smaller: of the 19 policies, c and g by scope, then the
        // unguarded and matching ones (l on its first condition only; q, r and s cannot be
        // decided before Cedar).
        let i = input(&ids[1], "p", None);
        let mut values = indexed_values(&i);
        values[2] = "PATCH";
        let slice = e
            .slices
            .for_request("spiffe://t/other", "PATCH", "x.example", &values);
        let mut ids_in: Vec<String> = slice.policies().map(|p| p.id().to_string()).collect();
        ids_in.sort();
        assert_eq!(ids_in, ["c", "l", "m", "q", "r", "s"]);
        // Every indexed attribute really is sliced on: a value no policy names leaves the
        // guarded policies out.
        let none = ["none"; slice::INDEXED.len()];
        let slice = e
            .slices
            .for_request("spiffe://t/other", "PATCH", "x.example", &none);
        let mut ids_in: Vec<String> = slice.policies().map(|p| p.id().to_string()).collect();
        ids_in.sort();
        assert_eq!(ids_in, ["c", "o", "q", "r", "s"]);
    }

    #[test]
    fn validator_warnings_are_kept_for_check_and_the_log() {
        let e = engine(
            "permit(principal, action, resource) when { context.purpose == \"ab\u{202E}cd\" };",
        );
        assert_eq!(e.warnings().len(), 1, "{:?}", e.warnings());
        assert!(
            engine("permit(principal, action, resource);")
                .warnings()
                .is_empty()
        );
    }
}
