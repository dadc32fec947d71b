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
                policies: vec![DEFAULT_DENY.into()],
                errors: vec![],
            },
            Err(message) => Decision {
                allowed: false,
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
            let from_request = request_entity(uid, &given)?;
            match self.entities.get(uid) {
                // Stored attributes win; request properties only fill attributes the store lacks,
                // and never add parents, so a caller cannot claim a group membership.
                Some(stored) => {
                    let entity = match from_request {
                        None => stored.clone(),
                        Some(extra) => {
                            let (uid, mut attrs, parents) = stored.clone().into_inner();
                            let (_, extra_attrs, _) = extra.into_inner();
                            for (k, v) in extra_attrs {
                                attrs.entry(k).or_insert(v);
                            }
                            Entity::new(uid, attrs, parents).map_err(|e| e.to_string())?
                        }
                    };
                    self.add_with_ancestors(entity, stored, &mut slice, &mut included);
                }
                None => {
                    let entity = from_request
                        .unwrap_or_else(|| Entity::new_no_attrs(uid.clone(), HashSet::new()));
                    included.insert(uid.clone());
                    slice.push(entity);
                }
            }
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
        entity: Entity,
        stored: &Entity,
        slice: &mut Vec<Entity>,
        included: &mut HashSet<EntityUid>,
    ) {
        if !included.insert(entity.uid()) {
            return;
        }
        slice.push(entity);
        // Stored entities carry every ancestor as a parent, so one level reaches them all.
        let (_, _, parents) = stored.clone().into_inner();
        for parent in parents {
            if let Some(found) = self.entities.get(&parent)
                && included.insert(parent)
            {
                slice.push(found.clone());
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
