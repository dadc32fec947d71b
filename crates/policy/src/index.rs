//! Policy slicing: a request evaluates only the policies whose scope can match it.
//!
//! Policies are grouped by their principal scope (`principal == X`, or anything else) and their
//! action scope (`action == A`, or anything else). A request for principal P and action A needs
//! exactly four groups: (any, any), (any, A), (P, any) and (P, A). Other scopes (`in`, `is`,
//! action lists, which may involve hierarchies) stay in the "any" groups, so slicing never has to
//! reason about membership.
//!
//! INVARIANT (exact-slicing): a policy scoped `principal == X` or `action == A` cannot apply to a
//! request with another principal or action, and Cedar checks scopes before conditions, so leaving
//! it out changes neither the decision, nor the deciding policies, nor the errors. The property
//! test `sliced_evaluation_equals_full_evaluation_on_random_requests` checks this against the full
//! set.

use cedar_policy::{ActionConstraint, EntityUid, Policy, PolicySet, PrincipalConstraint};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

type GroupKey = (Option<EntityUid>, Option<EntityUid>);
type SliceKey = (Option<EntityUid>, EntityUid);

/// Most cached slices kept; past this the cache starts over (it only saves work).
const CACHE_LIMIT: usize = 200_000;

pub(crate) struct PolicyIndex {
    groups: HashMap<GroupKey, Vec<Policy>>,
    keyed_principals: HashSet<EntityUid>,
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
            groups
                .entry((principal, action))
                .or_default()
                .push(policy.clone());
        }
        Self {
            groups,
            keyed_principals,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// The policies a request by `principal` for `action` can match.
    pub(crate) fn for_request(&self, principal: &EntityUid, action: &EntityUid) -> Arc<PolicySet> {
        // Principals without policies of their own share one slice per action.
        let own = self
            .keyed_principals
            .contains(principal)
            .then(|| principal.clone());
        let key = (own, action.clone());
        if let Some(set) = self.cache.read().ok().and_then(|c| c.get(&key).cloned()) {
            return set;
        }
        let mut set = PolicySet::new();
        let groups = [
            (None, None),
            (None, Some(action.clone())),
            (key.0.clone(), None),
            (key.0.clone(), Some(action.clone())),
        ];
        for (i, group) in groups.iter().enumerate() {
            // Without own policies the last two groups repeat the first two.
            if key.0.is_none() && i >= 2 {
                break;
            }
            for policy in self.groups.get(group).into_iter().flatten() {
                // Ids are unique in the full set, so adding cannot fail.
                let _ = set.add(policy.clone());
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
