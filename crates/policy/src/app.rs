//! Decisions for applications other than the gateway: requests that name their own entity
//! types, actions and attributes (the AuthZEN API). Types and actions live in one configured
//! Cedar namespace (`<namespace>::<type>`, `<namespace>::Action::"<name>"`), declared by
//! `.cedarschema` files in the policy directory, with entities from `.entities.json` files.
//!
//! A subject or resource known to the entity files is used as stored (its attributes and
//! ancestors); otherwise it is built from the request's `properties`. A type that is not a valid
//! Cedar name, or that no policy mentions, is simply denied.

use crate::{DEFAULT_DENY, Decision, ERROR_DENY, PolicyEngine};
use cedar_policy::{Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, Request};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::str::FromStr;

/// A subject or resource as an application names it.
#[derive(Clone, Copy, Debug)]
pub struct AppEntity<'a> {
    /// Type, e.g. `user` (becomes `<namespace>::user`).
    pub entity_type: &'a str,
    /// Id.
    pub id: &'a str,
    /// Attributes, used when the entity files do not hold this entity.
    pub properties: Option<&'a Value>,
}

/// One application decision request.
#[derive(Clone, Copy, Debug)]
pub struct AppRequest<'a> {
    /// The Cedar namespace of the application's types and actions.
    pub namespace: &'a str,
    /// Who asks.
    pub subject: AppEntity<'a>,
    /// The action name (`<namespace>::Action::"<name>"`).
    pub action: &'a str,
    /// What is acted on.
    pub resource: AppEntity<'a>,
    /// Request context (a JSON object), if any.
    pub context: Option<&'a Value>,
}

impl PolicyEngine {
    /// Decides an application request (fail-closed like every decision).
    pub fn decide_app(&self, req: &AppRequest<'_>) -> Decision {
        match self.try_decide_app(req) {
            Ok(Some(d)) => d,
            Ok(None) => Decision {
                allowed: false,
                approvals: Vec::new(),
                policies: vec![DEFAULT_DENY.into()],
                errors: vec![],
            },
            Err(message) => Decision {
                allowed: false,
                approvals: Vec::new(),
                policies: vec![ERROR_DENY.into()],
                errors: vec![message],
            },
        }
    }

    /// The ids of the stored entities of `<namespace>::<entity_type>`, sorted.
    pub fn app_entity_ids(&self, namespace: &str, entity_type: &str) -> Vec<String> {
        let Some(type_name) = type_name(namespace, entity_type) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = self
            .entities
            .keys()
            .filter(|uid| *uid.type_name() == type_name)
            .map(|uid| uid.id().unescaped().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// The action names the schema declares in `namespace`, sorted.
    pub fn app_actions(&self, namespace: &str) -> Vec<String> {
        let action_type = format!("{namespace}::Action");
        let mut names: Vec<String> = self
            .schema
            .actions()
            .filter(|a| a.type_name().to_string() == action_type)
            .map(|a| a.id().unescaped().to_string())
            .collect();
        names.sort();
        names
    }

    /// `Ok(None)` when a name is not a valid Cedar name: nothing can permit it.
    fn try_decide_app(&self, req: &AppRequest<'_>) -> Result<Option<Decision>, String> {
        let (Some(subject_type), Some(resource_type), Some(action_type)) = (
            type_name(req.namespace, req.subject.entity_type),
            type_name(req.namespace, req.resource.entity_type),
            type_name(req.namespace, "Action"),
        ) else {
            return Ok(None);
        };
        let subject_uid =
            EntityUid::from_type_name_and_id(subject_type, EntityId::new(req.subject.id));
        let resource_uid =
            EntityUid::from_type_name_and_id(resource_type, EntityId::new(req.resource.id));
        let action_uid = EntityUid::from_type_name_and_id(action_type, EntityId::new(req.action));

        let mut slice: Vec<Entity> = Vec::new();
        let mut included: HashSet<EntityUid> = HashSet::new();
        for (uid, given) in [(&subject_uid, req.subject), (&resource_uid, req.resource)] {
            if included.contains(uid) {
                continue;
            }
            match self.entities.get(uid) {
                // INVARIANT (stored-is-authoritative): an entity the PDP holds is used exactly as
                // stored (attributes, parents, tags); request properties cannot change what the
                // directory says about it.
                Some(stored) => {
                    self.add_with_ancestors(stored, &self.entities, &mut slice, &mut included)
                }
                None => {
                    let entity = request_entity(uid, &given)?
                        .unwrap_or_else(|| Entity::new_no_attrs(uid.clone(), HashSet::new()));
                    included.insert(uid.clone());
                    slice.push(entity);
                }
            }
        }
        // The action and its groups, so `action in <group>` works as the schema declares.
        if let Some(stored) = self.actions.get(&action_uid) {
            self.add_with_ancestors(stored, &self.actions, &mut slice, &mut included);
        }
        let entities = Entities::from_entities(slice, None).map_err(|e| e.to_string())?;
        let context = match req.context {
            Some(Value::Object(map)) => Context::from_json_value(Value::Object(map.clone()), None)
                .map_err(|e| format!("context: {e}"))?,
            Some(Value::Null) | None => Context::empty(),
            Some(_) => return Err("the context must be a JSON object".into()),
        };
        let request = Request::new(
            subject_uid.clone(),
            action_uid.clone(),
            resource_uid.clone(),
            context,
            None,
        )
        .map_err(|e| e.to_string())?;
        Ok(Some(self.authorize(
            &subject_uid,
            &action_uid,
            &resource_uid,
            &request,
            &entities,
        )))
    }

    fn add_with_ancestors(
        &self,
        stored: &crate::StoredEntity,
        store: &std::collections::HashMap<EntityUid, crate::StoredEntity>,
        slice: &mut Vec<Entity>,
        included: &mut HashSet<EntityUid>,
    ) {
        if !included.insert(stored.entity.uid()) {
            return;
        }
        slice.push(stored.entity.clone());
        for ancestor in &stored.ancestors {
            if let Some(found) = store.get(ancestor)
                && included.insert(ancestor.clone())
            {
                slice.push(found.entity.clone());
            }
        }
    }
}

/// The entity a request describes through `properties`, if it gives any.
fn request_entity(uid: &EntityUid, given: &AppEntity<'_>) -> Result<Option<Entity>, String> {
    let attrs = match given.properties {
        Some(Value::Object(map)) if !map.is_empty() => Value::Object(map.clone()),
        Some(Value::Object(_) | Value::Null) | None => return Ok(None),
        Some(_) => {
            return Err(format!(
                "the properties of `{}` must be a JSON object",
                given.id
            ));
        }
    };
    let value = json!({
        "uid": { "type": uid.type_name().to_string(), "id": given.id },
        "attrs": attrs,
        "parents": [],
    });
    Entity::from_json_value(value, None)
        .map(Some)
        .map_err(|e| format!("properties of `{}`: {e}", given.id))
}

fn type_name(namespace: &str, name: &str) -> Option<EntityTypeName> {
    if namespace.is_empty() || name.is_empty() || name.contains("::") {
        return None;
    }
    EntityTypeName::from_str(&format!("{namespace}::{name}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> PolicyEngine {
        // One directory per engine: the tests run in parallel in one process.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "palisade-app-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("app.cedarschema"),
            r#"namespace App {
                entity user;
                entity doc tags String;
                action writes;
                action read appliesTo { principal: [user], resource: [doc] };
                action edit in [writes] appliesTo { principal: [user], resource: [doc] };
            }"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("app.cedar"),
            r#"@id("app.read") permit (principal, action == App::Action::"read", resource);
               @id("app.writes") permit (principal, action in App::Action::"writes", resource);
               @id("app.legal-hold") forbid (principal, action, resource is App::doc) when { resource.hasTag("legal_hold") };"#,
        )
        .unwrap();
        // Two entity files: schema-aware parsing adds the action entities to each; they must not
        // count as duplicates.
        std::fs::write(
            dir.join("users.entities.json"),
            r#"[{"uid":{"type":"App::user","id":"alice"},"attrs":{},"parents":[]}]"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("docs.entities.json"),
            r#"[{"uid":{"type":"App::doc","id":"d1"},"attrs":{},"parents":[],"tags":{"legal_hold":"case-7"}},
                {"uid":{"type":"App::doc","id":"d2"},"attrs":{},"parents":[]}]"#,
        )
        .unwrap();
        PolicyEngine::load(Some(&dir), &[]).unwrap()
    }

    fn ask(engine: &PolicyEngine, action: &str, doc: &str) -> Decision {
        engine.decide_app(&AppRequest {
            namespace: "App",
            subject: AppEntity {
                entity_type: "user",
                id: "alice",
                properties: None,
            },
            action,
            resource: AppEntity {
                entity_type: "doc",
                id: doc,
                properties: None,
            },
            context: None,
        })
    }

    #[test]
    fn action_groups_and_entity_tags_reach_the_policies() {
        let engine = engine();
        assert_eq!(
            ask(&engine, "edit", "d2").policies,
            ["app.writes"],
            "edit is in the writes group"
        );
        assert_eq!(
            ask(&engine, "edit", "d1").policies,
            ["app.legal-hold"],
            "the tag must make the forbid fire"
        );
        assert!(!ask(&engine, "read", "d1").allowed);
        assert!(ask(&engine, "read", "d2").allowed);
    }

    #[test]
    fn names_chosen_by_callers_do_not_grow_the_slice_cache() {
        let engine = engine();
        for i in 0..500 {
            let action = format!("made-up-{i}");
            let kind = format!("type{i}");
            let d = engine.decide_app(&AppRequest {
                namespace: "App",
                subject: AppEntity {
                    entity_type: "user",
                    id: "alice",
                    properties: None,
                },
                action: &action,
                resource: AppEntity {
                    entity_type: &kind,
                    id: "x",
                    properties: None,
                },
                context: None,
            });
            assert!(!d.allowed);
        }
        assert!(
            engine.index.cached_slices() <= 2,
            "{} slices cached",
            engine.index.cached_slices()
        );
    }

    #[test]
    fn request_properties_cannot_override_a_stored_entity() {
        let engine = engine();
        // d1 is stored with the legal-hold tag; a caller describing it differently changes nothing.
        let props = serde_json::json!({ "anything": true });
        let d = engine.decide_app(&AppRequest {
            namespace: "App",
            subject: AppEntity {
                entity_type: "user",
                id: "alice",
                properties: None,
            },
            action: "edit",
            resource: AppEntity {
                entity_type: "doc",
                id: "d1",
                properties: Some(&props),
            },
            context: None,
        });
        assert_eq!(d.policies, ["app.legal-hold"]);
    }
}
