//! Publish: an event and one delivery per subscribed endpoint (and to the inline url), answered
//! again, not published twice, for an idempotency key seen within its window.

use std::sync::Arc;

use herald_log::Tx;
use herald_projector::{
    get_endpoint_settings, get_event, idempotency_lookup, list_endpoints, org_secret, subscribes,
    valid_ordering_key, DeliveryId, DeliveryOrder, EndpointId, Event, EventId, NewDelivery, OrgId, TxRead,
    NEW_DELIVERY_BYTES, ORDERING_KEY_BYTES_MAX, PUBLISHED_DELIVERIES_BYTES_MAX,
};
use uuid::Uuid;

use super::{
    invalid, new_secret, sequenced_id, valid_event_type, CommandError, Commands, Reply, Run,
    FAN_OUT_ENDPOINTS_MAX, IDEMPOTENCY_KEY_BYTES_MAX,
};

/// Endpoints read per page while fanning out an event.
const FAN_OUT_PAGE_LEN: usize = 256;
/// Bytes of endpoint lists [`Commands`] keeps for publishes (urls and event types, counted
/// with [`FanOut::bytes`]), at most: past it the lists are let go and read again, and a list
/// larger than it alone is used once and not kept.
const FAN_OUT_KEPT_BYTES_MAX: usize = 16 << 20;

/// What a publish needs of an endpoint to fan out to it.
pub(super) struct FanOut {
    id: EndpointId,
    url: String,
    enabled_events: Vec<String>,
    /// Its ordering is `per_key`: a publish with a key to it writes an `OrderingKeySet`.
    per_key: bool,
}

impl FanOut {
    /// What keeping it costs, about.
    fn bytes(&self) -> usize {
        64 + self.url.len() + self.enabled_events.iter().map(|e| e.len() + 24).sum::<usize>()
    }
}

/// The fields of a [`Command::Publish`](super::Command::Publish).
pub(super) struct Publish {
    pub(super) id: EventId,
    pub(super) org_id: OrgId,
    pub(super) event_type: String,
    pub(super) payload: Vec<u8>,
    pub(super) call_id: Option<Uuid>,
    pub(super) webhook_url: Option<String>,
    pub(super) idempotency_key: Option<String>,
    pub(super) ordering_key: Option<String>,
}

/// Where an event goes: an endpoint (at its url), or the inline url (`None`); and whether the
/// endpoint's ordering is `per_key`.
type Target = (Option<EndpointId>, String, bool);

impl Commands {
    /// The organisation's live endpoints, from [`Commands::fan_out`] or read (and kept).
    fn fan_out_of(&mut self, tx: &Tx<'_>, org_id: OrgId) -> Result<Arc<[FanOut]>, CommandError> {
        if let Some(list) = self.fan_out.get(&org_id) {
            return Ok(list.clone());
        }
        let mut list = Vec::new();
        let mut after = None;
        loop {
            let page = list_endpoints(&TxRead(tx), org_id, after, FAN_OUT_PAGE_LEN)?;
            for e in page.items {
                // Read once per endpoint while the list is kept, not per publish.
                let per_key = get_endpoint_settings(&TxRead(tx), e.id)?.ordering == DeliveryOrder::PerKey;
                list.push(FanOut { id: e.id, url: e.url, enabled_events: e.enabled_events, per_key });
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let bytes = list.iter().map(FanOut::bytes).sum::<usize>();
        let list: Arc<[FanOut]> = list.into();
        if bytes > FAN_OUT_KEPT_BYTES_MAX {
            return Ok(list);
        }
        if self.fan_out_bytes + bytes > FAN_OUT_KEPT_BYTES_MAX {
            self.forget_fan_out();
        }
        self.fan_out_bytes += bytes;
        self.fan_out.insert(org_id, list.clone());
        Ok(list)
    }

    pub(super) fn forget_fan_out(&mut self) {
        self.fan_out.clear();
        self.fan_out_bytes = 0;
    }
}

impl Run<'_, '_> {
    pub(super) fn publish(&mut self, mut p: Publish) -> Result<Reply, CommandError> {
        if !self.actor.sees(p.org_id) {
            return Err(invalid("org_id", "a key may publish only for its own organisation"));
        }
        if p.ordering_key.as_deref().is_some_and(|key| !valid_ordering_key(key)) {
            return Err(invalid(
                "ordering_key",
                format!("must be 1 to {ORDERING_KEY_BYTES_MAX} visible ASCII characters"),
            ));
        }
        if let Some(key) = &p.idempotency_key {
            if let Some(first) = self.published_before(p.org_id, key)? {
                return Ok(first);
            }
        }
        if !valid_event_type(&p.event_type) {
            return Err(invalid("event_type", "must match [A-Za-z0-9._-]{1,128}"));
        }
        let event_bytes_max = self.machine.limits.event_bytes_max;
        if p.payload.len() > event_bytes_max {
            return Err(invalid("payload", format!("over {event_bytes_max} bytes")));
        }
        if let Some(url) = &p.webhook_url {
            self.check_url("webhook_url", url)?;
        }
        let targets = self.targets(p.org_id, &p.event_type, p.webhook_url.take())?;
        Ok(self.published(p, targets))
    }

    /// The answer to the publish that first used idempotency `key` within its window, if one did.
    fn published_before(&self, org_id: OrgId, key: &str) -> Result<Option<Reply>, CommandError> {
        if key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
            return Err(invalid("Idempotency-Key", format!("1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes")));
        }
        let Some(hit) = idempotency_lookup(&self.read(), org_id, key, self.at_ms)? else {
            return Ok(None);
        };
        let first = get_event(&self.read(), hit.event_id)?.ok_or_else(|| CommandError::Internal {
            message: format!("idempotency hit {} has no event", hit.event_id),
        })?;
        Ok(Some(Reply::Published {
            id: first.id,
            created_at_ms: first.created_at_ms,
            delivery_ids: first.delivery_ids,
            replayed: true,
        }))
    }

    /// Where the event goes: each subscribed endpoint (at its current url), then the inline url
    /// if any (whose organisation gets a signing secret with its first one).
    fn targets(
        &mut self,
        org_id: OrgId,
        event_type: &str,
        webhook_url: Option<String>,
    ) -> Result<Vec<Target>, CommandError> {
        let mut targets: Vec<Target> = Vec::new();
        let fan_out = self.machine.fan_out_of(self.tx, org_id)?;
        for endpoint in fan_out.iter().filter(|e| subscribes(&e.enabled_events, event_type)) {
            if targets.len() >= FAN_OUT_ENDPOINTS_MAX {
                return Err(CommandError::Conflict {
                    reason: format!("the organisation has over {FAN_OUT_ENDPOINTS_MAX} subscribed endpoints"),
                });
            }
            targets.push((Some(endpoint.id), endpoint.url.clone(), endpoint.per_key));
        }
        if let Some(url) = webhook_url {
            if org_secret(&self.read(), org_id)?.is_none() {
                self.events.push(Event::OrgSecretSet { org_id, secret: new_secret()? });
            }
            targets.push((None, url, false));
        }
        Ok(targets)
    }

    /// Stages the event and its deliveries in one record, as many as fit its budget; any beyond
    /// follow in records of their own; then, for an ordered publish, its `OrderingKeySet`.
    fn published(&mut self, p: Publish, targets: Vec<Target>) -> Reply {
        let Publish {
            id,
            org_id,
            event_type,
            payload,
            call_id,
            webhook_url: _,
            idempotency_key,
            ordering_key,
        } = p;
        // A publish without a key, or to no `per_key` endpoint, writes and reads nothing more.
        let ordered = !targets.is_empty()
            && (ordering_key.is_some() || (call_id.is_some() && targets.iter().any(|t| t.2)));
        let at_ms = self.at_ms;
        let mut delivery_ids = Vec::with_capacity(targets.len());
        let mut deliveries = Vec::with_capacity(targets.len());
        let mut rest = Vec::new();
        let mut budget = PUBLISHED_DELIVERIES_BYTES_MAX;
        for (n, (endpoint_id, url, _)) in targets.into_iter().enumerate() {
            let seq = self.machine.next_id_seq(at_ms);
            let delivery = DeliveryId(sequenced_id(at_ms, seq, &[id.as_bytes(), &(n as u64).to_be_bytes()]));
            delivery_ids.push(delivery);
            let cost = url.len() + NEW_DELIVERY_BYTES;
            if rest.is_empty() && cost <= budget {
                budget -= cost;
                deliveries.push(NewDelivery { id: delivery, endpoint_id, url, next_attempt_at_ms: at_ms });
            } else {
                rest.push(Event::DeliveryCreated {
                    id: delivery,
                    event_id: id,
                    org_id,
                    endpoint_id,
                    url,
                    next_attempt_at_ms: at_ms,
                });
            }
        }
        self.events.push(Event::EventPublishedWithDeliveries {
            id,
            org_id,
            event_type,
            payload,
            call_id,
            idempotency_key,
            deliveries,
        });
        self.events.extend(rest);
        if ordered {
            self.events.push(Event::OrderingKeySet { event_id: id, ordering_key });
        }
        Reply::Published { id, created_at_ms: at_ms, delivery_ids, replayed: false }
    }
}
