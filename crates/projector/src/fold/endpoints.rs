//! Folds the endpoint events (created, updated, deleted, secret rotated, enabled again) and the
//! cascade that turns an endpoint's pending deliveries inactive when it stops taking them.

use super::{check_transition, ApplyError, Fold};
use crate::codec;
use crate::delivery_settings::{DeliveryOrder, DeliverySettings};
use crate::ids::{DeliveryId, EndpointId, OrgId};
use crate::index;
use crate::keys;
use crate::model::{Cause, DeliveryStatus, Endpoint, EndpointStatus, PreviousSecret, PREVIOUS_SECRETS_MAX};
use crate::query::{self, CorruptValue};
use crate::tables::Tables;

/// How many pending deliveries one page of a cascade (an endpoint going inactive or being
/// deleted) reads at a time.
pub const CASCADE_PAGE_LEN: usize = 256;

/// The reason an endpoint's deliveries carry when it is deleted.
pub const ENDPOINT_DELETED_REASON: &str = "endpoint deleted";

impl<T: Tables> Fold<'_, T> {
    pub(super) fn endpoint_created(
        &mut self,
        id: EndpointId,
        org_id: OrgId,
        url: &str,
        name: &str,
        enabled_events: &[String],
        secret: &str,
    ) -> Result<(), ApplyError> {
        if query::get_endpoint(self.t, id)?.is_some() {
            return Err(ApplyError::AlreadyExists { kind: "endpoint", id: id.0 });
        }
        let endpoint = Endpoint {
            id,
            org_id,
            name: name.to_string(),
            url: url.to_string(),
            enabled_events: enabled_events.to_vec(),
            status: EndpointStatus::Active,
            inactive_reason: None,
            secret: secret.to_string(),
            previous_secrets: Vec::new(),
            deleted_at_ms: None,
            failure_run_at_ms: Vec::new(),
            created_at_ms: self.at_ms,
            updated_at_ms: self.at_ms,
        };
        self.t.put(keys::endpoint_by_org(org_id, id), Vec::new());
        self.put_endpoint(&endpoint);
        Ok(())
    }

    pub(super) fn endpoint_updated(
        &mut self,
        id: EndpointId,
        url: Option<&str>,
        name: Option<&str>,
        enabled_events: Option<&[String]>,
    ) -> Result<(), ApplyError> {
        let mut endpoint = self.live_endpoint(id)?;
        if let Some(url) = url {
            endpoint.url = url.to_string();
        }
        if let Some(name) = name {
            endpoint.name = name.to_string();
        }
        if let Some(enabled_events) = enabled_events {
            endpoint.enabled_events = enabled_events.to_vec();
        }
        endpoint.updated_at_ms = self.at_ms;
        self.put_endpoint(&endpoint);
        Ok(())
    }

    pub(super) fn delivery_settings_set(
        &mut self,
        id: EndpointId,
        settings: &DeliverySettings,
    ) -> Result<(), ApplyError> {
        let rules = self.rules()?;
        if !rules.endpoint_delivery_settings() {
            return Err(ApplyError::BeforeItsRules {
                kind: "EndpointDeliverySettingsSet",
                in_force: rules.0,
            });
        }
        let mut endpoint = self.live_endpoint(id)?;
        let was_per_key = query::get_endpoint_settings(self.t, id)?.ordering == DeliveryOrder::PerKey;
        if *settings == DeliverySettings::default() {
            self.t.delete(&keys::endpoint_settings(id));
        } else {
            self.t.put(keys::endpoint_settings(id), codec::to_bytes(settings));
        }
        endpoint.updated_at_ms = self.at_ms;
        self.put_endpoint(&endpoint);
        let per_key = settings.ordering == DeliveryOrder::PerKey;
        if per_key != was_per_key {
            self.order_switched(id, per_key)?;
        }
        Ok(())
    }

    pub(super) fn endpoint_deleted(&mut self, id: EndpointId) -> Result<(), ApplyError> {
        let mut endpoint = self.live_endpoint(id)?;
        endpoint.deleted_at_ms = Some(self.at_ms);
        endpoint.updated_at_ms = self.at_ms;
        self.t.delete(&keys::endpoint_by_org(endpoint.org_id, id));
        self.put_endpoint(&endpoint);
        self.deactivate_pending(id, ENDPOINT_DELETED_REASON, Cause::EndpointDeleted)
    }

    pub(super) fn endpoint_secret_rotated(
        &mut self,
        id: EndpointId,
        secret: &str,
        previous_expires_at_ms: u64,
    ) -> Result<(), ApplyError> {
        let mut endpoint = self.live_endpoint(id)?;
        let at_ms = self.at_ms;
        endpoint.previous_secrets.retain(|p| p.expires_at_ms > at_ms);
        let previous = std::mem::replace(&mut endpoint.secret, secret.to_string());
        endpoint
            .previous_secrets
            .insert(0, PreviousSecret { secret: previous, expires_at_ms: previous_expires_at_ms });
        endpoint.previous_secrets.truncate(PREVIOUS_SECRETS_MAX);
        endpoint.updated_at_ms = at_ms;
        self.put_endpoint(&endpoint);
        Ok(())
    }

    pub(super) fn endpoint_enabled(&mut self, id: EndpointId) -> Result<(), ApplyError> {
        let mut endpoint = self.live_endpoint(id)?;
        endpoint.status = EndpointStatus::Active;
        endpoint.inactive_reason = None;
        endpoint.failure_run_at_ms.clear();
        endpoint.updated_at_ms = self.at_ms;
        self.put_endpoint(&endpoint);
        Ok(())
    }

    /// Every pending delivery of the endpoint turns inactive with `reason`. Pages through the
    /// (endpoint, pending) index; each page moves the cursor forward, so the loop ends after at
    /// most (pending deliveries / CASCADE_PAGE_LEN + 1) pages.
    pub(super) fn deactivate_pending(
        &mut self,
        endpoint_id: EndpointId,
        reason: &str,
        cause: Cause,
    ) -> Result<(), ApplyError> {
        let mut from = None;
        while let Some(page) = self.pending_page(endpoint_id, &mut from)? {
            for id in page {
                let old = self.delivery(id)?;
                check_transition(id, Some(old.status), DeliveryStatus::Inactive, cause)?;
                let mut new = old.clone();
                new.status = DeliveryStatus::Inactive;
                new.next_attempt_at_ms = None;
                new.inactive_reason = Some(reason.to_string());
                new.updated_at_ms = self.at_ms;
                self.put_delivery(Some(&old), &new)?;
            }
        }
        Ok(())
    }

    /// The next page (at most [`CASCADE_PAGE_LEN`]) of the endpoint's pending deliveries, in
    /// creation order, from the cursor `from` (`None`: the first page), which it moves past the
    /// page; `None` when there are no more.
    pub(super) fn pending_page(
        &self,
        endpoint_id: EndpointId,
        from: &mut Option<Vec<u8>>,
    ) -> Result<Option<Vec<DeliveryId>>, ApplyError> {
        let prefix = keys::key(
            keys::KS_DELIVERY_BY_ENDPOINT_STATUS,
            &[endpoint_id.as_bytes(), &[keys::status_byte(DeliveryStatus::Pending)]],
        );
        let end = keys::prefix_end(&prefix).unwrap_or_else(|| vec![0xff; prefix.len() + 1]);
        let start = from.take().unwrap_or_else(|| prefix.clone());
        let page = index::scan(self.t, &prefix, &start, &end, CASCADE_PAGE_LEN, index::Walk::Forward)?;
        let Some(last) = page.last() else { return Ok(None) };
        *from = Some(keys::successor(last));
        let ids = page.iter().map(|key| {
            keys::parse_timed(key).map(|(_, id)| id).ok_or_else(|| CorruptValue { key: key.clone() })
        });
        Ok(Some(ids.collect::<Result<Vec<_>, _>>()?))
    }
}
