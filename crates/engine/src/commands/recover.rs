//! Bulk recover: the organisation's deliveries matching a filter, selected in the writer thread
//! (so only those still matching at commit time are queued) and re-queued in one command, recorded
//! as one recovery whose ids fill as many records as they need.

use herald_projector::{
    select_recovery, DeliveryId, DeliveryStatus, Event, OrgId, RecoveryFilter, RecoveryId, RecoverySelection,
    RECOVERY_IDS_PER_RECORD,
};

use super::{invalid, valid_event_type, CommandError, Reply, Run, EVENT_TYPE_BYTES_MAX};

/// Deliveries one recover selects at most (API.md: `max` is 1..=100000).
pub const RECOVER_MAX: u32 = 100_000;
/// Delivery ids a recover's answer shows.
pub const RECOVER_SAMPLE_LEN: usize = 25;

/// What a recover answers (a dry run's too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// `None` for a dry run.
    pub recovery_id: Option<RecoveryId>,
    /// Deliveries selected (at most `max`).
    pub matched: u64,
    /// Deliveries re-queued: as many as selected, 0 on a dry run.
    pub queued: u64,
    /// More deliveries matched than `max`.
    pub truncated: bool,
    /// The first selected, oldest first.
    pub sample: Vec<DeliveryId>,
}

impl Recovered {
    /// The answer to a selection, re-queued under `recovery_id` (`None`: a dry run).
    pub fn of(selection: &RecoverySelection, recovery_id: Option<RecoveryId>) -> Recovered {
        let matched = selection.delivery_ids.len() as u64;
        Recovered {
            recovery_id,
            matched,
            queued: if recovery_id.is_some() { matched } else { 0 },
            truncated: selection.truncated,
            sample: selection.delivery_ids.iter().take(RECOVER_SAMPLE_LEN).copied().collect(),
        }
    }
}

/// Whether `s` is an event-type pattern: an exact type, `*`, or a prefix ending in `.*` whose
/// prefix is a type (`call.*`); at most [`EVENT_TYPE_BYTES_MAX`] bytes.
pub fn valid_event_pattern(s: &str) -> bool {
    s == "*"
        || valid_event_type(s)
        || (s.len() <= EVENT_TYPE_BYTES_MAX && s.strip_suffix(".*").is_some_and(valid_event_type))
}

/// The filter's own checks (the server checks the same, naming the field of its body).
pub fn check_recovery_filter(filter: &RecoveryFilter) -> Result<(), CommandError> {
    if filter.statuses.is_empty() {
        return Err(invalid("status", "at least one of exhausted, inactive, delivered"));
    }
    if let Some(bad) = filter.statuses.iter().find(|s| **s == DeliveryStatus::Pending) {
        return Err(invalid(
            "status",
            format!("{} is not one of exhausted, inactive, delivered", bad.name()),
        ));
    }
    if !(1..=RECOVER_MAX).contains(&filter.max) {
        return Err(invalid("max", format!("must be 1 to {RECOVER_MAX}")));
    }
    if let Some(pattern) = filter.event_type.as_deref().filter(|p| !valid_event_pattern(p)) {
        return Err(invalid("event_type", format!("{pattern:?} is not an event type, \"*\" nor a prefix.*")));
    }
    Ok(())
}

impl Run<'_, '_> {
    /// Selects and re-queues, or refuses having written nothing. A recover that selects nothing
    /// is recorded all the same: it is an operator's act.
    pub(super) fn recover(
        &mut self,
        id: RecoveryId,
        org_id: OrgId,
        filter: RecoveryFilter,
    ) -> Result<Reply, CommandError> {
        if !self.actor.sees(org_id) {
            return Err(invalid("org_id", "a key may act only for its own organisation"));
        }
        check_recovery_filter(&filter)?;
        let selection = select_recovery(&self.read(), org_id, &filter)?;
        let answer = Recovered::of(&selection, Some(id));
        let mut records = selection.delivery_ids.chunks(RECOVERY_IDS_PER_RECORD);
        let first = records.next().unwrap_or_default().to_vec();
        let by_key = self.actor.key_id;
        self.events.push(Event::RecoveryRequested { id, org_id, filter, by_key, delivery_ids: first });
        for ids in records {
            self.events.push(Event::RecoveryDeliveries { recovery_id: id, delivery_ids: ids.to_vec() });
        }
        Ok(Reply::Recovered(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_patterns() {
        for good in ["*", "call.ended", "call.*", "a.b.*", "x-y_z.*"] {
            assert!(valid_event_pattern(good), "{good}");
        }
        let long = format!("{}.*", "a".repeat(EVENT_TYPE_BYTES_MAX - 1));
        for bad in ["", "call*", "*.ended", ".*", "call.**", "c*ll.x", "**", "call.*.x", "call .*", &long] {
            assert!(!valid_event_pattern(bad), "{bad}");
        }
    }
}
