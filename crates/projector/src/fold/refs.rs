//! Folds the record refs (rules 4 on, `KS_RECORD_REFS`): which records touched a delivery, an
//! endpoint or the store-wide settings, so that a replay reads those records alone.
//!
//! What it costs: one small pair (25-byte key, 1-byte value) per record that writes a delivery's
//! row after its creation (an attempt, a retrigger, a cascade), plus one per endpoint or settings
//! record. A delivery created pending in its event's publish record has none: its creation is
//! that record, whose seq the event row keeps (`EventRecord::seq`), so a publish writes nothing
//! more.

use super::{ApplyError, Fold};
use crate::event::Event;
use crate::ids::DeliveryId;
use crate::keys;
use crate::model::DeliveryStatus;
use crate::refs::{REFS_FROM, STORE_WIDE};
use crate::tables::Tables;

impl<T: Tables> Fold<'_, T> {
    /// The record being folded wrote delivery `id`'s row, which is now in `status`.
    pub(super) fn touched(&mut self, id: DeliveryId, status: DeliveryStatus) -> Result<(), ApplyError> {
        if self.rules()?.delivery_record_refs() {
            self.t.put(keys::record_ref(id.as_bytes(), self.seq), vec![keys::status_byte(status)]);
        }
        Ok(())
    }

    /// The refs of an endpoint's own records, of an event's ordering key and of the settings records,
    /// after `event` folded.
    pub(super) fn refs_of(&mut self, event: &Event) -> Result<(), ApplyError> {
        let subject = match event {
            Event::EndpointCreated { id, .. }
            | Event::EndpointUpdated { id, .. }
            | Event::EndpointDeleted { id }
            | Event::EndpointSecretRotated { id, .. }
            | Event::EndpointEnabled { id }
            | Event::EndpointDeliverySettingsSet { id, .. } => *id.as_bytes(),
            // an event's ordering key, told in its event's story
            Event::OrderingKeySet { event_id, .. } => *event_id.as_bytes(),
            Event::PolicySet(_) | Event::RulesAdopted { .. } => STORE_WIDE,
            _ => return Ok(()),
        };
        if !self.rules()?.delivery_record_refs() {
            return Ok(());
        }
        if matches!(event, Event::RulesAdopted { .. }) && self.t.get(REFS_FROM).is_none() {
            self.t.put(REFS_FROM.to_vec(), self.seq.to_be_bytes().to_vec());
        }
        self.t.put(keys::record_ref(&subject, self.seq), Vec::new());
        Ok(())
    }
}
