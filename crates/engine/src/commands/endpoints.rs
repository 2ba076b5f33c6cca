//! The endpoint commands: create, update, delete, rotate its secret, enable it again.

use herald_projector::{
    get_endpoint, get_endpoint_settings, policy, DeliverySettings, Endpoint, EndpointId, EndpointStatus,
    Event, OrgId,
};

use super::delivery_settings::DeliverySettingsPatch;
use super::{
    check_name, invalid, new_secret, valid_event_pattern, CommandError, Reply, Run, ENABLED_EVENTS_MAX,
};
use crate::sender::check_url;
use crate::signing::Secret;

fn check_enabled_events(events: &[String]) -> Result<(), CommandError> {
    if events.is_empty() {
        return Err(invalid("enabled_events", "must hold at least one event type or \"*\""));
    }
    if events.len() > ENABLED_EVENTS_MAX {
        return Err(invalid("enabled_events", format!("at most {ENABLED_EVENTS_MAX} entries")));
    }
    match events.iter().find(|e| !valid_event_pattern(e)) {
        Some(bad) => Err(invalid(
            "enabled_events",
            format!("{bad:?} is not \"*\", an event type [A-Za-z0-9._-]{{1,128}} nor a prefix pattern such as \"call.*\""),
        )),
        None => Ok(()),
    }
}

/// The secret given (checked), or a new one, as `whsec_<base64>`.
fn given_or_new_secret(secret: Option<&str>) -> Result<String, CommandError> {
    match secret {
        Some(s) => Ok(Secret::parse(s).map_err(|e| invalid("secret", e.to_string()))?.to_whsec()),
        None => new_secret(),
    }
}

/// What [`Command::CreateEndpoint`](super::Command::CreateEndpoint) asks for.
pub(super) struct NewEndpoint {
    pub id: EndpointId,
    pub org_id: OrgId,
    pub url: String,
    pub name: String,
    pub enabled_events: Vec<String>,
    pub secret: Option<String>,
    pub settings: DeliverySettingsPatch,
}

impl Run<'_, '_> {
    /// Checks a url given in `field`.
    pub(super) fn check_url(&self, field: &'static str, url: &str) -> Result<(), CommandError> {
        check_url(url, self.machine.limits.allow_private_targets).map_err(|e| invalid(field, e.to_string()))
    }

    /// The endpoint, which the actor sees and which is not deleted.
    fn endpoint(&self, id: EndpointId) -> Result<Endpoint, CommandError> {
        match get_endpoint(&self.read(), id)? {
            Some(e) if self.actor.sees(e.org_id) && !e.is_deleted() => Ok(e),
            _ => Err(CommandError::NotFound { what: "endpoint", id: id.to_string() }),
        }
    }

    pub(super) fn create_endpoint(&mut self, new: NewEndpoint) -> Result<Reply, CommandError> {
        let NewEndpoint { id, org_id, url, name, enabled_events, secret, settings } = new;
        if !self.actor.sees(org_id) {
            return Err(invalid("org_id", "only an admin key may create endpoints for another organisation"));
        }
        self.check_url("url", &url)?;
        check_name(&name)?;
        check_enabled_events(&enabled_events)?;
        let settings = settings.applied_to(&DeliverySettings::default())?;
        let secret = given_or_new_secret(secret.as_deref())?;
        self.events.push(Event::EndpointCreated {
            id,
            org_id,
            url,
            name,
            enabled_events,
            secret: secret.clone(),
        });
        if settings != DeliverySettings::default() {
            self.events.push(Event::EndpointDeliverySettingsSet { id, settings });
        }
        Ok(Reply::Endpoint { id, secret })
    }

    pub(super) fn update_endpoint(
        &mut self,
        id: EndpointId,
        url: Option<String>,
        name: Option<String>,
        enabled_events: Option<Vec<String>>,
        settings: &DeliverySettingsPatch,
    ) -> Result<Reply, CommandError> {
        self.endpoint(id)?;
        let current = get_endpoint_settings(&self.read(), id)?;
        let settings = settings.applied_to(&current)?;
        if let Some(url) = &url {
            self.check_url("url", url)?;
        }
        if let Some(name) = &name {
            check_name(name)?;
        }
        if let Some(e) = &enabled_events {
            check_enabled_events(e)?;
        }
        // A PATCH that changes no setting still records that it was made (as before settings).
        if url.is_some() || name.is_some() || enabled_events.is_some() || settings == current {
            self.events.push(Event::EndpointUpdated { id, url, name, enabled_events });
        }
        if settings != current {
            self.events.push(Event::EndpointDeliverySettingsSet { id, settings });
        }
        Ok(Reply::Done)
    }

    pub(super) fn delete_endpoint(&mut self, id: EndpointId) -> Result<Reply, CommandError> {
        self.endpoint(id)?;
        self.events.push(Event::EndpointDeleted { id });
        Ok(Reply::Done)
    }

    pub(super) fn rotate_secret(
        &mut self,
        id: EndpointId,
        secret: Option<&str>,
    ) -> Result<Reply, CommandError> {
        self.endpoint(id)?;
        let secret = given_or_new_secret(secret)?;
        // The overlap of the policy in force, which a `SetPolicy` may have changed.
        let overlap_ms = policy(&self.read())?.rotation_overlap_ms;
        let previous_expires_at_ms = self.at_ms.saturating_add(overlap_ms);
        self.events.push(Event::EndpointSecretRotated { id, secret: secret.clone(), previous_expires_at_ms });
        Ok(Reply::Endpoint { id, secret })
    }

    pub(super) fn enable_endpoint(&mut self, id: EndpointId) -> Result<Reply, CommandError> {
        if self.endpoint(id)?.status == EndpointStatus::Inactive {
            tracing::info!(endpoint_id = %id, "endpoint active again: enabled");
        }
        self.events.push(Event::EndpointEnabled { id });
        Ok(Reply::Done)
    }
}
