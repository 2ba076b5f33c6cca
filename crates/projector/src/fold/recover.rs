//! Folds a bulk recover: each delivery it names re-queued as a retrigger is (a delivered one as
//! a redeliver is), the recovery stored with its members in chunks.

use super::{same_org, ApplyError, Fold};
use crate::codec;
use crate::event::Event;
use crate::ids::{ApiKeyId, DeliveryId, OrgId, RecoveryId};
use crate::keys;
use crate::model::{Cause, DeliveryStatus};
use crate::recovery::{get_recovery, Recovery, RecoveryFilter, RECOVERY_CHUNK_IDS};
use crate::tables::Tables;

impl<T: Tables> Fold<'_, T> {
    /// A recovery and the first of its deliveries.
    /// A recovery's records ([`Event::RecoveryRequested`], [`Event::RecoveryDeliveries`]).
    pub(super) fn recovery(&mut self, event: &Event) -> Result<(), ApplyError> {
        match event {
            Event::RecoveryRequested { id, org_id, filter, by_key, delivery_ids } => {
                self.recovery_requested(*id, *org_id, filter, *by_key, delivery_ids)
            }
            Event::RecoveryDeliveries { recovery_id, delivery_ids } => {
                self.recovery_deliveries(*recovery_id, delivery_ids)
            }
            _ => Ok(()),
        }
    }

    fn recovery_requested(
        &mut self,
        id: RecoveryId,
        org_id: OrgId,
        filter: &RecoveryFilter,
        by_key: Option<ApiKeyId>,
        delivery_ids: &[DeliveryId],
    ) -> Result<(), ApplyError> {
        self.recoveries_allowed("RecoveryRequested")?;
        if get_recovery(self.t, id)?.is_some() {
            return Err(ApplyError::AlreadyExists { kind: "recovery", id: id.0 });
        }
        let mut recovery = Recovery {
            id,
            org_id,
            filter: filter.clone(),
            by_key,
            created_at_ms: self.at_ms,
            seq: self.seq,
            queued: 0,
        };
        self.recover(&mut recovery, delivery_ids)
    }

    /// More deliveries of a recovery folded before.
    fn recovery_deliveries(&mut self, id: RecoveryId, delivery_ids: &[DeliveryId]) -> Result<(), ApplyError> {
        self.recoveries_allowed("RecoveryDeliveries")?;
        let mut recovery = get_recovery(self.t, id)?.ok_or(ApplyError::UnknownRecovery(id))?;
        self.recover(&mut recovery, delivery_ids)
    }

    fn recoveries_allowed(&self, event: &'static str) -> Result<(), ApplyError> {
        let rules = self.rules()?;
        if rules.recoveries() {
            Ok(())
        } else {
            Err(ApplyError::NotUnderRules { event, in_force: rules.0 })
        }
    }

    /// Re-queues each delivery and appends it to the recovery's members (the last chunk filled
    /// first), then writes the recovery with its new count.
    fn recover(&mut self, recovery: &mut Recovery, delivery_ids: &[DeliveryId]) -> Result<(), ApplyError> {
        let chunk_ids = RECOVERY_CHUNK_IDS as u64;
        let mut chunk = recovery.queued / chunk_ids;
        let mut members = match recovery.queued % chunk_ids {
            0 => Vec::new(),
            _ => self.t.get(&member_key(recovery.id, chunk)).unwrap_or_default(),
        };
        for &delivery_id in delivery_ids {
            let d = self.delivery(delivery_id)?;
            same_org("delivery", delivery_id.0, recovery.org_id, d.org_id)?;
            let cause = match d.status {
                DeliveryStatus::Delivered => Cause::Redeliver,
                _ => Cause::Retrigger,
            };
            self.manual(delivery_id, cause)?;
            members.extend_from_slice(delivery_id.as_bytes());
            recovery.queued += 1;
            if recovery.queued % chunk_ids == 0 {
                self.t.put(member_key(recovery.id, chunk), std::mem::take(&mut members));
                chunk += 1;
            }
        }
        if !members.is_empty() {
            self.t.put(member_key(recovery.id, chunk), members);
        }
        self.t.put(keys::recovery(recovery.id), codec::to_bytes(&*recovery));
        Ok(())
    }
}

fn member_key(id: RecoveryId, chunk: u64) -> Vec<u8> {
    keys::recovery_members(id, u32::try_from(chunk).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use crate::keys;
    use crate::recovery::*;
    use crate::testkit::*;
    use crate::{ApplyError, DeliveryStatus, Event, MemTables, ReadTables, RecoveryId};
    use uuid::Uuid;

    const RULES_4: Event = Event::RulesAdopted { version: 4 };

    fn recovery_id(n: u128) -> RecoveryId {
        RecoveryId(Uuid::from_u128(n))
    }

    fn filter(statuses: &[DeliveryStatus], max: u32) -> RecoveryFilter {
        RecoveryFilter {
            statuses: statuses.to_vec(),
            endpoint_id: None,
            event_type: None,
            created_after_ms: None,
            created_before_ms: None,
            max,
        }
    }

    fn requested(n: u128, ids: &[u32]) -> Event {
        Event::RecoveryRequested {
            id: recovery_id(n),
            org_id: org(1),
            filter: filter(&[DeliveryStatus::Exhausted], 10),
            by_key: Some(key_id(1)),
            delivery_ids: ids.iter().map(|d| dl(*d)).collect(),
        }
    }

    /// Endpoint e1, then deliveries d1..=dn of events v1..=vn created at 1000, 2000, ...: d1
    /// exhausted, d2 delivered, d3 pending, d4 exhausted, ...
    fn history(n: u32) -> Vec<(u64, Event)> {
        let mut events = vec![(0, RULES_4), (0, endpoint(1))];
        for d in 1..=n {
            let at = u64::from(d) * 1_000;
            events.push((at, publish(d)));
            events.push((at, delivery(d, d, Some(1), at)));
            match d % 3 {
                1 => events.push((at, fail(d, 1, None))),
                2 => events.push((at, ok(d, 1))),
                _ => {}
            }
        }
        events
    }

    #[test]
    fn a_recovery_requeues_as_a_retrigger_or_redeliver_and_counts_its_members_now() {
        let mut events = history(3);
        events.push((9_000, requested(1, &[1, 2])));
        let t = check(
            &events,
            "e1 active
             d1 pending a=1 m=1 next=9000 manual
             d2 pending a=1 m=1 next=9000 manual
             d3 pending a=0 next=3000",
        );
        let recovery = get_recovery(&t, recovery_id(1)).unwrap().unwrap();
        assert_eq!((recovery.queued, recovery.seq, recovery.created_at_ms), (2, 11, 9_000));
        assert_eq!(recovery.by_key, Some(key_id(1)));
        assert_eq!(recovery_members(&t, recovery_id(1), 0).unwrap(), vec![dl(1), dl(2)]);
        let counts = recovery_counts(&t, &recovery).unwrap();
        assert_eq!(counts, RecoveryCounts { queued: 2, delivered: 0, pending: 2, failed: 0 });

        // d1 delivered, d2 fails for good; a member retention dropped counts as delivered.
        events.push((9_100, ok(1, 2)));
        events.push((9_200, fail(2, 2, None)));
        let mut t = run(&events);
        let counts = recovery_counts(&t, &recovery).unwrap();
        assert_eq!(counts, RecoveryCounts { queued: 2, delivered: 1, pending: 0, failed: 1 });
        crate::tables::Tables::delete(&mut t, &keys::delivery(dl(1)));
        assert_eq!(recovery_counts(&t, &recovery).unwrap().delivered, 1);
    }

    #[test]
    fn recoveries_fold_only_under_rules_4_and_refuse_what_no_retrigger_may() {
        let mut before_4 = history(1);
        before_4.remove(0);
        before_4.push((9_000, requested(1, &[1])));
        check_err(&before_4, ApplyError::NotUnderRules { event: "RecoveryRequested", in_force: 1 });

        // a pending delivery cannot be recovered; nor twice in one recovery
        let mut pending = history(3);
        pending.push((9_000, requested(1, &[1, 3])));
        assert!(matches!(run_err(&pending), ApplyError::TransitionNotAllowed { .. }));
        let mut twice = history(1);
        twice.push((9_000, requested(1, &[1, 1])));
        assert!(matches!(run_err(&twice), ApplyError::TransitionNotAllowed { .. }));

        let mut unknown = history(1);
        unknown
            .push((9_000, Event::RecoveryDeliveries { recovery_id: recovery_id(7), delivery_ids: vec![] }));
        check_err(&unknown, ApplyError::UnknownRecovery(recovery_id(7)));
        let mut again = history(4);
        again.push((9_000, requested(1, &[1])));
        again.push((9_000, requested(1, &[4])));
        check_err(&again, ApplyError::AlreadyExists { kind: "recovery", id: Uuid::from_u128(1) });
    }

    fn run_err(events: &[(u64, Event)]) -> ApplyError {
        let (last, before) = events.split_last().unwrap();
        let mut t = run(before);
        crate::apply(&mut t, events.len() as u64, last.0, &last.1).unwrap_err()
    }

    /// Members are chunked by their order alone: one record or several give the same chunks.
    #[test]
    fn members_chunk_the_same_however_the_records_split_them() {
        let n = 3 * 300; // 300 exhausted: d1, d4, ...
        let base = history(n);
        let failed: Vec<u32> = (1..=n).filter(|d| d % 3 == 1).collect();
        let whole = {
            let mut e = base.clone();
            e.push((1_000_000, requested(1, &failed)));
            run(&e)
        };
        let split = {
            let mut e = base.clone();
            e.push((1_000_000, requested(1, &failed[..100])));
            for part in failed[100..].chunks(77) {
                let ids = part.iter().map(|d| dl(*d)).collect();
                e.push((
                    1_000_000,
                    Event::RecoveryDeliveries { recovery_id: recovery_id(1), delivery_ids: ids },
                ));
            }
            run(&e)
        };
        assert_consistent(&split);
        let members = |t: &MemTables| {
            t.scan(&[keys::KS_RECOVERY_MEMBERS], &[keys::KS_RECOVERY_MEMBERS + 1], usize::MAX)
        };
        assert_eq!(members(&whole), members(&split));
        assert_eq!(members(&whole).len(), 2, "300 members: one full chunk of 256 and one of 44");
        let recovery = get_recovery(&split, recovery_id(1)).unwrap().unwrap();
        assert_eq!(recovery.queued, 300);
        assert_eq!(recovery_counts(&split, &recovery).unwrap().pending, 300);
    }

    #[test]
    fn selection_is_oldest_first_filtered_and_bounded() {
        let t = run(&history(9));
        let ids = |f: &RecoveryFilter| {
            let s = select_recovery(&t, org(1), f).unwrap();
            (s.delivery_ids.iter().map(|d| label(d.0)).collect::<Vec<_>>().join(" "), s.truncated)
        };
        use DeliveryStatus::{Delivered, Exhausted, Inactive, Pending};
        assert_eq!(ids(&filter(&[Exhausted, Inactive], 10)), ("d1 d4 d7".into(), false));
        assert_eq!(ids(&filter(&[Exhausted, Delivered], 10)), ("d1 d2 d4 d5 d7 d8".into(), false));
        assert_eq!(ids(&filter(&[Exhausted, Delivered], 3)), ("d1 d2 d4".into(), true));
        assert_eq!(ids(&filter(&[Exhausted], 3)), ("d1 d4 d7".into(), false));
        assert_eq!(ids(&filter(&[Pending], 10)).0, "d3 d6 d9", "the filter's statuses, whatever they are");
        let window = RecoveryFilter {
            created_after_ms: Some(1_000),
            created_before_ms: Some(7_000),
            ..filter(&[Exhausted], 10)
        };
        assert_eq!(ids(&window), ("d4".into(), false));
        for (pattern, expected) in [
            ("call.*", "d1 d4 d7"),
            ("call.queued", "d1 d4 d7"),
            ("*", "d1 d4 d7"),
            ("call", ""),
            ("callx.*", ""),
        ] {
            let f = RecoveryFilter { event_type: Some(pattern.into()), ..filter(&[Exhausted], 10) };
            assert_eq!(ids(&f).0, expected, "{pattern}");
            let f = RecoveryFilter { event_type: Some(pattern.into()), ..filter(&[Exhausted, Delivered], 2) };
            let want: Vec<&str> = ["d1", "d2"].into_iter().filter(|_| !expected.is_empty()).collect();
            assert_eq!(ids(&f).0, want.join(" "), "{pattern} with delivered");
        }
        let on_endpoint = |e| RecoveryFilter { endpoint_id: Some(ep(e)), ..filter(&[Exhausted], 10) };
        assert_eq!(ids(&on_endpoint(1)).0, "d1 d4 d7");
        assert_eq!(ids(&on_endpoint(2)).0, "");
        assert_eq!(
            select_recovery(&t, org(2), &filter(&[Exhausted], 10)).unwrap(),
            RecoverySelection::default()
        );
    }
}
