//! The engine on a log that writes ahead (cluster mode's seam): every batch, those of the open
//! included, reaches the write-ahead before it is applied; a partition claim is recorded; a
//! fenced write-ahead refuses commands and applies nothing.

use std::sync::{Arc, Mutex};

use herald_engine::clock::ManualClock;
use herald_engine::sender::{AttemptRequest, SendFuture, SendOutcome, Sender};
use herald_engine::{Actor, Command, CommandError, Engine, EngineConfig, EngineError, Parts};
use herald_log::{read_records, LogError, MemStore, Record, Store, WriteAhead, WriteAheadError};
use herald_projector::{decode, Event, OrgId, Policy};
use uuid::Uuid;

/// No receiver: these tests publish to no endpoint.
struct NoSender;

impl Sender for NoSender {
    fn send(&self, _: AttemptRequest) -> SendFuture<'_> {
        Box::pin(async { SendOutcome::Response { status: 200, excerpt: Vec::new(), retry_after_ms: None } })
    }
}

/// Keeps every batch; fences every batch after `fence_after` of them.
struct Recording {
    batches: Mutex<Vec<Vec<Record>>>,
    fence_after: usize,
}

impl WriteAhead for Recording {
    fn batch_bytes_max(&self) -> usize {
        usize::MAX
    }

    fn append(&self, records: &[Record]) -> Result<u64, WriteAheadError> {
        let mut batches = self.batches.lock().unwrap();
        if batches.len() >= self.fence_after {
            return Err(WriteAheadError::Fenced("another node claimed the partition".into()));
        }
        batches.push(records.to_vec());
        Ok(batches.len() as u64)
    }
}

fn open(store: &Arc<MemStore>, write_ahead: Arc<Recording>) -> Engine {
    let parts = Parts {
        store: store.clone() as Arc<dyn Store>,
        clock: Arc::new(ManualClock::new(1_700_000_000_000)),
        sender: Arc::new(NoSender),
    };
    Engine::open_with_write_ahead(EngineConfig::default(), parts, write_ahead).unwrap()
}

/// A command that writes a record: a policy other than the one in force.
fn policy() -> Command {
    Command::SetPolicy(Policy { failures_max: 7, ..Policy::default() })
}

fn claim(epoch: u64) -> Command {
    Command::ClaimPartition { node_id: "node-a".into(), epoch }
}

#[test]
fn every_batch_goes_through_the_write_ahead_and_a_claim_is_recorded() {
    let store = Arc::new(MemStore::new());
    let write_ahead = Arc::new(Recording { batches: Mutex::default(), fence_after: usize::MAX });
    let engine = open(&store, write_ahead.clone());
    engine.execute_blocking(Actor::admin(), claim(1)).unwrap();
    engine.execute_blocking(Actor::admin(), policy()).unwrap();
    engine.shutdown();
    let written: Vec<Record> = write_ahead.batches.lock().unwrap().concat();
    assert_eq!(
        written,
        read_records(store.as_ref(), 1, usize::MAX).unwrap(),
        "nothing applied that was not written ahead"
    );
    let events: Vec<Event> = written.iter().map(|r| decode(&r.body).unwrap()).collect();
    assert!(
        matches!(events[0], Event::RulesAdopted { version: 5 }),
        "the open's own records first: {events:?}"
    );
    assert!(events.contains(&Event::PartitionClaimed { node_id: "node-a".into(), epoch: 1 }));
    assert_eq!(
        herald_log::write_ahead_position(store.as_ref()).unwrap(),
        write_ahead.batches.lock().unwrap().len() as u64
    );
}

#[test]
fn a_fenced_engine_refuses_commands_and_applies_nothing() {
    let store = Arc::new(MemStore::new());
    let write_ahead = Arc::new(Recording { batches: Mutex::default(), fence_after: usize::MAX });
    let engine = open(&store, write_ahead.clone());
    engine.shutdown();
    let opened = write_ahead.batches.lock().unwrap().len();
    let head = read_records(store.as_ref(), 1, usize::MAX).unwrap().len();
    let fenced = Arc::new(Recording {
        batches: Mutex::new(write_ahead.batches.lock().unwrap().clone()),
        fence_after: opened,
    });
    let engine = open(&store, fenced);
    for command in [claim(2), policy()] {
        match engine.execute_blocking(Actor::admin(), command) {
            Err(EngineError::Log(LogError::WriteAhead(WriteAheadError::Fenced(_)))) => {}
            other => panic!("{other:?}"),
        }
    }
    engine.shutdown();
    assert_eq!(read_records(store.as_ref(), 1, usize::MAX).unwrap().len(), head, "nothing applied");
}

#[test]
fn an_organisations_key_cannot_claim_a_partition() {
    let store = Arc::new(MemStore::new());
    let write_ahead = Arc::new(Recording { batches: Mutex::default(), fence_after: usize::MAX });
    let engine = open(&store, write_ahead);
    let by_org = Actor { org_id: Some(OrgId(Uuid::from_u128(7))), key_id: None };
    match engine.execute_blocking(by_org, claim(1)) {
        Err(EngineError::Command(CommandError::NotFound { .. })) => {}
        other => panic!("{other:?}"),
    }
    engine.shutdown();
}
