//! Policy slicing: for one (principal, action, resource), only the policies whose scope can
//! match are handed to Cedar.
//!
//! Cedar evaluates every policy of the set it is given, about 0.5 µs each, so 100 policies
//! cost 60 µs a decision. Most policies name their action and destination in the scope
//! (`action == Action::"POST", resource == Destination::"api.openai.com"`), and a sidecar
//! sees few distinct (identity, method, host) triples, so the matching subset is computed
//! once per triple and cached.
//!
//! Policies that leave the scope open and discriminate in their first condition instead
//! (`permit(principal, action, resource) when { context.route == "search" && ... }`) are
//! sliced on that condition too: its first conjunct, when it compares an indexed context
//! attribute (or the resource) with a literal, is decided here, and the subset is cached per
//! triple and the values of the attributes some policy is indexed on.
//!
//! Exactness: a policy is left out only when it cannot be satisfied, and then Cedar would
//! have reported nothing about it either:
//! - scope: the entities Chaperone builds have no parents and no action entities are
//!   loaded, so `in E` holds exactly when the request's entity is `E`; `is T` compares the
//!   type. Anything else keeps the policy;
//! - first condition: Cedar evaluates the scope, then the conditions in order, each `&&`
//!   left to right with short-circuit. The leftmost conjunct of the first `when` is so the
//!   first expression evaluated; an indexed attribute is always in the context as a string,
//!   so when it differs from the literal that conjunct is `false` without an error, and the
//!   policy is not satisfied without a diagnostic. Only that conjunct is used: a later one
//!   might be preceded by one that errors, which Cedar would report.

use std::collections::HashMap;
use std::sync::Arc;

use cedar_policy::{
    ActionConstraint, EntityUid, Policy, PolicySet, PrincipalConstraint, ResourceConstraint,
};

/// The context attributes a first condition is indexed on: always in the context, always
/// strings, and few distinct values per sidecar (so not `path`). The caller passes their
/// values in this order.
pub(super) const INDEXED: [&str; 7] = [
    "purpose",
    "route",
    "method",
    "credential",
    "stage",
    "environment",
    "guardrail",
];

/// A policy's first conjunct, when it can be decided before Cedar is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Guard {
    /// `context.<INDEXED[i]> == "value"`.
    Context(usize, String),
    /// `resource == Destination::"host"`.
    Resource(String),
}

/// The leftmost conjunct of the first `when` condition, if it is a [`Guard`]. Read from the
/// policy's JSON form (Cedar's EST), which keeps the source's structure: `a && b && c` is
/// `(a && b) && c`, so the leftmost conjunct is found by following `left`.
fn guard_of(json: Option<&serde_json::Value>) -> Option<Guard> {
    let json = json?;
    let first = json["conditions"].get(0)?;
    if first["kind"] != "when" {
        return None;
    }
    let mut e = &first["body"];
    while let Some(and) = e.get("&&") {
        e = &and["left"];
    }
    let eq = e.get("==")?;
    for (a, b) in [(&eq["left"], &eq["right"]), (&eq["right"], &eq["left"])] {
        if let (Some(attr), Some(value)) = (a["."]["attr"].as_str(), b["Value"].as_str())
            && a["."]["left"]["Var"] == "context"
            && let Some(i) = INDEXED.iter().position(|x| *x == attr)
        {
            return Some(Guard::Context(i, value.to_string()));
        }
        let entity = &b["Value"]["__entity"];
        if a["Var"] == "resource"
            && entity["type"] == "Destination"
            && let Some(id) = entity["id"].as_str()
        {
            return Some(Guard::Resource(id.to_string()));
        }
    }
    None
}

/// The scope of one policy, reduced to what a request can be compared with.
struct Scope {
    policy: Policy,
    guard: Option<Guard>,
    principal: Vec<String>,
    principal_type: Option<String>,
    actions: Option<Vec<String>>,
    resource: Vec<String>,
    resource_type: Option<String>,
}

/// The policies of a set, and the cached subsets per request triple.
pub(super) struct Slices {
    scopes: Vec<Scope>,
    /// Which of [`INDEXED`] some policy's guard names (the others stay out of cache keys).
    keyed: [bool; INDEXED.len()],
    all: Arc<PolicySet>,
    /// Slices by (principal, action, host, indexed values); each a shared subset.
    cache: super::memo::Memo<Arc<PolicySet>>,
    /// The distinct subsets, by the scopes chosen.
    subsets: parking_lot::Mutex<HashMap<Vec<u32>, Arc<PolicySet>>>,
}

/// Distinct subsets kept at most (each is a few of the policies' pointers).
const MAX_SUBSETS: usize = 1024;

/// An id no request carries (ids are never empty and never hold NUL).
fn impossible() -> String {
    "\0".to_string()
}

fn uid_parts(uid: &EntityUid) -> (String, String) {
    (
        uid.type_name().to_string(),
        uid.id().unescaped().to_string(),
    )
}

/// The ids a `==`/`in` constraint accepts for `ty`, or `None` when it names another type
/// (then nothing of `ty` matches).
fn accepts(ty: &str, uid: &EntityUid) -> Option<String> {
    let (t, id) = uid_parts(uid);
    (t == ty).then_some(id)
}

impl Slices {
    /// Slices of `set`, whose policies' JSON forms are `ests` (made once per compile: Cedar
    /// parses a policy's text again for each).
    pub(super) fn new(set: &PolicySet, ests: &super::Ests) -> Slices {
        let scopes = set
            .policies()
            .map(|p| {
                // An empty `principal` list with no type means "any"; a `None` entry
                // ("nothing can match") is kept as an impossible id.
                let (principal, principal_type) = match p.principal_constraint() {
                    PrincipalConstraint::Any => (vec![], None),
                    PrincipalConstraint::Eq(u) | PrincipalConstraint::In(u) => (
                        vec![accepts("Workload", &u).unwrap_or_else(impossible)],
                        None,
                    ),
                    PrincipalConstraint::Is(t) => (vec![], Some(t.to_string())),
                    PrincipalConstraint::IsIn(t, u) => (
                        vec![accepts("Workload", &u).unwrap_or_else(impossible)],
                        Some(t.to_string()),
                    ),
                };
                let actions = match p.action_constraint() {
                    ActionConstraint::Any => None,
                    ActionConstraint::Eq(u) => {
                        Some(vec![accepts("Action", &u).unwrap_or_else(impossible)])
                    }
                    ActionConstraint::In(us) => Some(
                        us.iter()
                            .map(|u| accepts("Action", u).unwrap_or_else(impossible))
                            .collect(),
                    ),
                };
                let (resource, resource_type) = match p.resource_constraint() {
                    ResourceConstraint::Any => (vec![], None),
                    ResourceConstraint::Eq(u) | ResourceConstraint::In(u) => (
                        vec![accepts("Destination", &u).unwrap_or_else(impossible)],
                        None,
                    ),
                    ResourceConstraint::Is(t) => (vec![], Some(t.to_string())),
                    ResourceConstraint::IsIn(t, u) => (
                        vec![accepts("Destination", &u).unwrap_or_else(impossible)],
                        Some(t.to_string()),
                    ),
                };
                Scope {
                    policy: p.clone(),
                    guard: guard_of(ests.get(p.id()).and_then(Option::as_ref)),
                    principal,
                    principal_type,
                    actions,
                    resource,
                    resource_type,
                }
            })
            .collect::<Vec<Scope>>();
        let mut keyed = [false; INDEXED.len()];
        for s in &scopes {
            if let Some(Guard::Context(i, _)) = s.guard {
                keyed[i] = true;
            }
        }
        Slices {
            scopes,
            keyed,
            all: Arc::new(set.clone()),
            cache: super::memo::Memo::new(4096, 2 << 20),
            subsets: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// The policies whose scope and first conjunct can match this request, in file order.
    /// `values` are the request's values of [`INDEXED`], in that order.
    pub(super) fn for_request(
        &self,
        principal: &str,
        action: &str,
        host: &str,
        values: &[&str; INDEXED.len()],
    ) -> Arc<PolicySet> {
        let mut key = format!("{principal}\0{action}\0{host}");
        for (v, _) in values.iter().zip(self.keyed).filter(|(_, k)| *k) {
            key.push('\0');
            key.push_str(v);
        }
        if let Some(hit) = self.cache.get(&key) {
            return hit;
        }
        let mut chosen: Vec<u32> = Vec::new();
        for (i, s) in self.scopes.iter().enumerate() {
            let principal_ok = s.principal_type.as_deref().is_none_or(|t| t == "Workload")
                && (s.principal.is_empty() || s.principal.iter().any(|p| p == principal));
            let action_ok = s
                .actions
                .as_ref()
                .is_none_or(|a| a.iter().any(|x| x == action));
            let resource_ok = s
                .resource_type
                .as_deref()
                .is_none_or(|t| t == "Destination")
                && (s.resource.is_empty() || s.resource.iter().any(|r| r == host));
            let guard_ok = match &s.guard {
                None => true,
                Some(Guard::Context(i, value)) => values[*i] == value,
                Some(Guard::Resource(h)) => h == host,
            };
            if principal_ok && action_ok && resource_ok && guard_ok {
                chosen.push(i as u32);
            }
        }
        // Requests to many destinations mostly choose the same policies (every new host the
        // same unscoped ones): each distinct subset is built once and shared, so a memo
        // entry costs its key, not a policy set.
        let set = self.subset(chosen);
        self.cache.insert(key, set.clone(), 0);
        set
    }

    /// Distinct subsets built so far.
    #[cfg(test)]
    pub(super) fn subsets(&self) -> usize {
        self.subsets.lock().len()
    }

    /// The policy set of these scopes, built once per distinct subset.
    fn subset(&self, chosen: Vec<u32>) -> Arc<PolicySet> {
        let mut subsets = self.subsets.lock();
        if let Some(set) = subsets.get(&chosen) {
            return set.clone();
        }
        let mut set = PolicySet::new();
        for &i in &chosen {
            // Ids are unique in the source set, so adding cannot fail; if it did, the whole
            // set decides (never a subset missing a forbid).
            if set.add(self.scopes[i as usize].policy.clone()).is_err() {
                return self.all.clone();
            }
        }
        let set = Arc::new(set);
        if subsets.len() >= MAX_SUBSETS {
            subsets.clear();
        }
        subsets.insert(chosen, set.clone());
        set
    }
}
