//! Policy slicing: a request evaluates only the policies whose scope can match it.
//!
//! Policies are grouped by their principal scope (`principal == X`, or anything else), their
//! action scope (`action == A`, or anything else) and the resource type their scope names
//! (`resource is T`, `resource == T::"x"`, or none). A request needs the groups that match its
//! principal, action and resource type, or say "any". Other scopes (`in`, `is` on principals,
//! action lists, which may involve hierarchies) stay in the "any" groups, so slicing never has to
//! reason about membership.
//!
//! INVARIANT (exact-slicing): a policy scoped `principal == X`, `action == A` or to resource type
//! T cannot apply to a request with another principal, action or resource type, and Cedar checks scopes before conditions, so leaving
//! it out changes neither the decision, nor the deciding policies, nor the errors. The property
//! test `sliced_evaluation_equals_full_evaluation_on_random_requests` checks this against the full
//! set.

use cedar_policy::{
    ActionConstraint, EntityTypeName, EntityUid, Policy, PolicySet, PrincipalConstraint,
    ResourceConstraint,
};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

type GroupKey = (Option<EntityUid>, Option<EntityUid>, Option<EntityTypeName>);
type SliceKey = (Option<EntityUid>, Option<EntityUid>, Option<EntityTypeName>);

/// Most cached slices kept; past this the cache starts over (it only saves work).
const CACHE_LIMIT: usize = 200_000;

pub(crate) struct PolicyIndex {
    groups: HashMap<GroupKey, Vec<Policy>>,
    keyed_principals: HashSet<EntityUid>,
    keyed_actions: HashSet<EntityUid>,
    keyed_types: HashSet<EntityTypeName>,
    cache: RwLock<HashMap<SliceKey, Arc<PolicySet>>>,
}

impl PolicyIndex {
    pub(crate) fn new(set: &PolicySet) -> Self {
        let mut groups: HashMap<GroupKey, Vec<Policy>> = HashMap::new();
        let mut keyed_principals = HashSet::new();
        for policy in set.policies() {
            let principal = match policy.principal_constraint() {
                PrincipalConstraint::Eq(uid) => {
                    keyed_principals.insert(uid.clone());
                    Some(uid)
                }
                _ => None,
            };
            let action = match policy.action_constraint() {
                ActionConstraint::Eq(uid) => Some(uid),
                _ => None,
            };
            let resource_type = match policy.resource_constraint() {
                ResourceConstraint::Is(t) | ResourceConstraint::IsIn(t, _) => Some(t),
                ResourceConstraint::Eq(uid) => Some(uid.type_name().clone()),
                _ => None,
            };
            groups
                .entry((principal, action, resource_type))
                .or_default()
                .push(policy.clone());
        }
        let keyed_actions = groups.keys().filter_map(|(_, a, _)| a.clone()).collect();
        let keyed_types = groups.keys().filter_map(|(_, _, t)| t.clone()).collect();
        Self {
            groups,
            keyed_principals,
            keyed_actions,
            keyed_types,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// How many slices are cached.
    #[cfg(test)]
    pub(crate) fn cached_slices(&self) -> usize {
        self.cache.read().map(|c| c.len()).unwrap_or(0)
    }

    /// The policies a request by `principal` for `action` on a resource of `resource_type` can
    /// match.
    pub(crate) fn for_request(
        &self,
        principal: &EntityUid,
        action: &EntityUid,
        resource_type: &EntityTypeName,
    ) -> Arc<PolicySet> {
        // Keys are normalised to what some policy is keyed on: principals, actions and types no
        // policy names share the "any" slice. That keeps the cache bounded by the policy set, not
        // by what callers send (AuthZEN callers choose action names and types freely).
        let key: SliceKey = (
            self.keyed_principals
                .contains(principal)
                .then(|| principal.clone()),
            self.keyed_actions.contains(action).then(|| action.clone()),
            self.keyed_types
                .contains(resource_type)
                .then(|| resource_type.clone()),
        );
        if let Some(set) = self.cache.read().ok().and_then(|c| c.get(&key).cloned()) {
            return set;
        }
        let mut set = PolicySet::new();
        let principals: &[Option<EntityUid>] = if key.0.is_some() {
            &[None, key.0.clone()]
        } else {
            &[None]
        };
        let actions: &[Option<EntityUid>] = if key.1.is_some() {
            &[None, key.1.clone()]
        } else {
            &[None]
        };
        let types: &[Option<EntityTypeName>] = if key.2.is_some() {
            &[None, key.2.clone()]
        } else {
            &[None]
        };
        for p in principals {
            for a in actions {
                for r in types {
                    for policy in self
                        .groups
                        .get(&(p.clone(), a.clone(), r.clone()))
                        .into_iter()
                        .flatten()
                    {
                        // Ids are unique in the full set, so adding cannot fail.
                        let _ = set.add(policy.clone());
                    }
                }
            }
        }
        let set = Arc::new(set);
        if let Ok(mut cache) = self.cache.write() {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(key, set.clone());
        }
        set
    }
}
