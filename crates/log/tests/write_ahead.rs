//! The write-ahead seam: a batch is applied only after the write-ahead stored it; a failure
//! applies nothing and tells the batch's callers; a fence refuses everything after; batches are
//! cut at the write-ahead's size.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_log::{
    decode_records, encode_records, keyspace, verify, write_ahead_position, AppendOnly, Durability, Log,
    LogConfig, LogError, MemStore, Record, Store, WriteAhead, WriteAheadError,
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Accept,
    Unavailable,
    Fence,
}

/// A write-ahead kept in memory: it stores each batch (encoded, as a real one would send it)
/// or fails as told. The first append may wait for a gate, so that commands pile up behind it.
struct InMemory {
    mode: Mutex<Mode>,
    stored: Mutex<Vec<Vec<u8>>>,
    bytes_max: usize,
    gate: Mutex<Option<crossbeam_channel::Receiver<()>>>,
}

impl InMemory {
    fn new(mode: Mode, bytes_max: usize) -> Arc<InMemory> {
        Arc::new(InMemory {
            mode: Mutex::new(mode),
            stored: Mutex::default(),
            bytes_max,
            gate: Mutex::default(),
        })
    }

    fn batches(&self) -> Vec<Vec<Record>> {
        let stored = self.stored.lock().unwrap();
        stored.iter().map(|b| decode_records(b, 0).unwrap()).collect()
    }
}

impl WriteAhead for InMemory {
    fn batch_bytes_max(&self) -> usize {
        self.bytes_max
    }

    fn append(&self, records: &[Record]) -> Result<u64, WriteAheadError> {
        if let Some(gate) = self.gate.lock().unwrap().take() {
            gate.recv_timeout(Duration::from_secs(10)).expect("the test opens the gate");
        }
        match *self.mode.lock().unwrap() {
            Mode::Accept => {
                let mut stored = self.stored.lock().unwrap();
                stored.push(encode_records(records));
                Ok(stored.len() as u64 * 10)
            }
            Mode::Unavailable => Err(WriteAheadError::Unavailable("no quorum".into())),
            Mode::Fence => Err(WriteAheadError::Fenced("another writer wrote seq 7".into())),
        }
    }
}

fn config() -> LogConfig {
    LogConfig { batch_commands_max: 64, queue_commands_max: 1024, durability: Durability::Flush }
}

fn bodies(n: usize) -> Vec<(u64, Vec<u8>)> {
    (0..n).map(|i| (1_000 + i as u64, format!("event-{i}").into_bytes())).collect()
}

#[test]
fn a_batch_is_applied_after_the_write_ahead_stored_it_with_its_position() {
    let store = Arc::new(MemStore::new());
    let wa = InMemory::new(Mode::Accept, usize::MAX);
    let log = Log::open_write_ahead(store.clone(), AppendOnly, config(), wa.clone()).unwrap();
    assert_eq!(log.submit(bodies(2)).unwrap().unwrap(), vec![1, 2]);
    assert_eq!(log.submit(bodies(1)).unwrap().unwrap(), vec![3]);
    log.close();
    let batches = wa.batches();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches.concat(), herald_log::read_records(store.as_ref(), 1, 10).unwrap());
    assert_eq!(write_ahead_position(store.as_ref()).unwrap(), 20, "the position after the last batch");
    assert_eq!(verify(store.as_ref(), &mut |_| {}).unwrap().last_seq, 3);
}

#[test]
fn without_a_write_ahead_nothing_of_it_is_stored() {
    let store = Arc::new(MemStore::new());
    let log = Log::open(store.clone(), AppendOnly, config()).unwrap();
    log.submit(bodies(3)).unwrap().unwrap();
    log.close();
    assert_eq!(store.get(keyspace::META_WRITE_AHEAD).unwrap(), None);
    assert_eq!(write_ahead_position(store.as_ref()).unwrap(), 0);
}

#[test]
fn a_batch_the_write_ahead_refused_is_not_applied_and_the_next_one_takes_its_seqs() {
    let store = Arc::new(MemStore::new());
    let wa = InMemory::new(Mode::Unavailable, usize::MAX);
    let log = Log::open_write_ahead(store.clone(), AppendOnly, config(), wa.clone()).unwrap();
    let err = log.submit(bodies(2)).unwrap_err();
    assert_eq!(err, LogError::WriteAhead(WriteAheadError::Unavailable("no quorum".into())));
    assert!(err.to_string().contains("nothing of the batch was applied here"), "{err}");
    assert_eq!(log.committed_seq(), 0);
    assert_eq!(herald_log::read_head(store.as_ref()).unwrap().next_seq, 1, "nothing applied");
    assert_eq!(log.fenced(), None);
    // Unavailable is not a fence: the next batch is tried, and gets the seqs the first would have.
    *wa.mode.lock().unwrap() = Mode::Accept;
    assert_eq!(log.submit(bodies(1)).unwrap().unwrap(), vec![1]);
    log.close();
    assert_eq!(verify(store.as_ref(), &mut |_| {}).unwrap().last_seq, 1);
}

#[test]
fn a_fenced_writer_refuses_every_later_command_and_applies_nothing() {
    let store = Arc::new(MemStore::new());
    let wa = InMemory::new(Mode::Accept, usize::MAX);
    let log = Log::open_write_ahead(store.clone(), AppendOnly, config(), wa.clone()).unwrap();
    assert_eq!(log.submit(bodies(1)).unwrap().unwrap(), vec![1]);
    *wa.mode.lock().unwrap() = Mode::Fence;
    let fenced = WriteAheadError::Fenced("another writer wrote seq 7".into());
    assert_eq!(log.submit(bodies(1)).unwrap_err(), LogError::WriteAhead(fenced.clone()));
    assert_eq!(log.fenced(), Some(fenced.clone()));
    // Even a write-ahead that would take it now: the writer stepped down for good.
    *wa.mode.lock().unwrap() = Mode::Accept;
    for _ in 0..3 {
        assert_eq!(log.submit(bodies(2)).unwrap_err(), LogError::WriteAhead(fenced.clone()));
    }
    log.close();
    assert_eq!(wa.batches().len(), 1, "nothing after the fence reached the write-ahead");
    assert_eq!(verify(store.as_ref(), &mut |_| {}).unwrap().last_seq, 1, "nothing after the fence applied");
    assert_eq!(write_ahead_position(store.as_ref()).unwrap(), 10);
}

#[test]
fn batches_are_cut_once_their_records_reach_the_write_aheads_size() {
    let store = Arc::new(MemStore::new());
    // Each command appends one record of the same size.
    let one = herald_log::encoded_len(&Record {
        seq: 1,
        at_ms: 0,
        body: b"event-0".to_vec(),
        checksum: [0; 32],
        prev_hash: [0; 32],
        hash: [0; 32],
    });
    let wa = InMemory::new(Mode::Accept, one * 3);
    let (open, gate) = crossbeam_channel::bounded(1);
    *wa.gate.lock().unwrap() = Some(gate);
    let log = Log::open_write_ahead(store.clone(), AppendOnly, config(), wa.clone()).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    // The first command's batch waits at the gate while ten more queue up behind it.
    for i in 0..11u64 {
        let tx = tx.clone();
        log.submit_with(vec![(i, b"event-0".to_vec())], move |out| tx.send(out).unwrap());
        if i == 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    open.send(()).unwrap();
    let outs: Vec<_> = (0..11).map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
    assert!(outs.iter().all(|o| matches!(o, Ok(Ok(_)))), "{outs:?}");
    log.close();
    let sizes: Vec<usize> = wa.batches().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![1, 3, 3, 3, 1], "cut at three records of {one} bytes");
    assert_eq!(verify(store.as_ref(), &mut |_| {}).unwrap().last_seq, 11);
}
