//! Policy slicing: for one (principal, action, resource), only the policies whose scope can
//! match are handed to Cedar.
//!
//! Cedar evaluates every policy of the set it is given, about 0.5 µs each, so 100 policies
//! cost 60 µs a decision. Most policies name their action and destination in the scope
//! (`action == Action::"POST", resource == Destination::"api.openai.com"`), and a sidecar
//! sees few distinct (identity, method, host) triples, so the matching subset is computed
//! once per triple and cached.
//!
//! Exactness: a policy is left out only when its scope cannot match. The entities Chaperone
//! builds have no parents and no action entities are loaded, so `in E` holds exactly when
//! the request's entity is `E`; `is T` compares the type. Anything else keeps the policy.

use std::sync::Arc;

use cedar_policy::{
    ActionConstraint, EntityUid, Policy, PolicySet, PrincipalConstraint, ResourceConstraint,
};

/// The scope of one policy, reduced to what a request can be compared with.
struct Scope {
    policy: Policy,
    principal: Vec<String>,
    principal_type: Option<String>,
    actions: Option<Vec<String>>,
    resource: Vec<String>,
    resource_type: Option<String>,
}

/// The policies of a set, and the cached subsets per request triple.
pub(super) struct Slices {
    scopes: Vec<Scope>,
    all: Arc<PolicySet>,
    cache: super::memo::Memo<Arc<PolicySet>>,
}

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
    pub(super) fn new(set: &PolicySet) -> Slices {
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
                    principal,
                    principal_type,
                    actions,
                    resource,
                    resource_type,
                }
            })
            .collect();
        Slices {
            scopes,
            all: Arc::new(set.clone()),
            cache: super::memo::Memo::new(4096),
        }
    }

    /// The policies whose scope can match this request, in file order.
    pub(super) fn for_request(&self, principal: &str, action: &str, host: &str) -> Arc<PolicySet> {
        let key = format!("{principal}\0{action}\0{host}");
        if let Some(hit) = self.cache.get(&key) {
            return hit;
        }
        let mut set = PolicySet::new();
        for s in &self.scopes {
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
            if principal_ok && action_ok && resource_ok {
                // Ids are unique in the source set, so adding cannot fail; if it did, the
                // whole set decides (never a subset missing a forbid).
                if set.add(s.policy.clone()).is_err() {
                    return self.all.clone();
                }
            }
        }
        let set = Arc::new(set);
        self.cache.insert(key, set.clone());
        set
    }
}
