//! The log through its public API: group commit, reads, tails, verification, store failures.

use std::sync::Arc;
use std::time::Duration;

use herald_log::{
    keyspace, read_records, record, verify, verify_paged, verify_paged_each, AppendOnly, CorruptKind,
    CorruptRecord, Durability, FailingStore, Log, LogConfig, LogError, Machine, MemStore, SledStore, Store,
    StoreError, Tx, VolatileStore, WriteBatch,
};

fn config() -> LogConfig {
    LogConfig { batch_commands_max: 64, queue_commands_max: 1024, durability: Durability::Sync }
}

fn body(i: u64) -> Vec<u8> {
    format!("event-{i}").into_bytes()
}

#[test]
fn concurrent_appenders_get_gapless_seqs_and_share_flushes() {
    let store = Arc::new(MemStore::new());
    let log = Log::open(store.clone(), AppendOnly, config()).unwrap();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..200u64)
                    .map(|i| log.submit(vec![(i, body(t * 1000 + i))]).unwrap().unwrap()[0])
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=1600).collect::<Vec<_>>());
    let stats = log.stats();
    assert_eq!(stats.commands, 1600);
    assert!(stats.batches <= 1600);
    // The longest flush is one of the flushes summed: no more than all, no less than the mean.
    assert!(stats.flush_us_max <= stats.flush_us_total, "{stats:?}");
    assert!(stats.flush_us_max * stats.batches >= stats.flush_us_total, "{stats:?}");
    // Every flush is in one bucket of the histogram; the longest in the last bucket that has one.
    assert_eq!(stats.flush_us_buckets.iter().sum::<u64>(), stats.batches, "{stats:?}");
    let top = stats.flush_us_buckets.iter().rposition(|&n| n > 0).unwrap();
    assert!(herald_log::FLUSH_BUCKETS_US.get(top).is_none_or(|&b| stats.flush_us_max <= b), "{stats:?}");
    assert!(top == 0 || stats.flush_us_max > herald_log::FLUSH_BUCKETS_US[top - 1], "{stats:?}");
    assert_eq!(log.committed_seq(), 1600);
    let recs = log.read(1595, 100).unwrap();
    assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1595, 1596, 1597, 1598, 1599, 1600]);
    log.close();
    let report = verify(store.as_ref(), &mut |_| {}).unwrap();
    assert_eq!((report.records, report.first_seq, report.last_seq), (1600, 1, 1600));
}

#[test]
fn reopening_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let first_hash;
    {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 8 << 20).unwrap());
        let log = Log::open(store, AppendOnly, config()).unwrap();
        log.submit(vec![(1, body(1)), (2, body(2))]).unwrap().unwrap();
        first_hash = log.read(2, 1).unwrap()[0].hash;
        log.close();
    }
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 8 << 20).unwrap());
    let log = Log::open(store.clone(), AppendOnly, config()).unwrap();
    assert_eq!(log.submit(vec![(3, body(3))]).unwrap().unwrap(), vec![3]);
    assert_eq!(log.read(3, 1).unwrap()[0].prev_hash, first_hash);
    log.close();
    assert_eq!(verify(store.as_ref(), &mut |_| {}).unwrap().last_seq, 3);
}

#[test]
fn tail_wakes_on_new_records_and_reads_from_its_cursor() {
    let log = Log::open(Arc::new(MemStore::new()), AppendOnly, config()).unwrap();
    log.submit(vec![(1, body(1))]).unwrap().unwrap();
    let mut tail = log.tail(1);
    assert_eq!(tail.next(10, Duration::from_millis(10)).unwrap().len(), 1);
    assert!(tail.next(10, Duration::from_millis(20)).unwrap().is_empty());
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            log.submit(vec![(2, body(2)), (3, body(3))]).unwrap().unwrap();
        })
    };
    let got = tail.next(10, Duration::from_secs(10)).unwrap();
    writer.join().unwrap();
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(tail.cursor(), 4);
}

/// A machine with a rule, to show that a rejected command writes nothing and later commands in
/// the same batch see earlier ones.
struct Counter;

impl Machine for Counter {
    /// Add this much to the counter; rejected when it would go above 10.
    type Command = u64;
    type Reply = u64;
    type Rejection = String;

    fn execute(&mut self, add: u64, tx: &mut Tx<'_>) -> Result<u64, String> {
        let key = vec![keyspace::USER_FIRST, b'c'];
        let now = tx.get(&key).map(|v| u64::from_be_bytes(v.try_into().unwrap())).unwrap_or(0);
        tx.append(0, add.to_be_bytes().to_vec());
        tx.put(key, (now + add).to_be_bytes().to_vec());
        if now + add > 10 {
            return Err(format!("{now} + {add} is over 10"));
        }
        Ok(now + add)
    }
}

#[test]
fn rejected_commands_write_nothing_and_batches_see_their_own_writes() {
    let store = Arc::new(MemStore::new());
    let log = Log::open(store.clone(), Counter, LogConfig { batch_commands_max: 8, ..config() }).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for add in [4u64, 4, 4, 2] {
        let tx = tx.clone();
        log.submit_with(add, move |out| tx.send((add, out)).unwrap());
    }
    drop(tx);
    let mut outs: Vec<_> = rx.iter().collect();
    outs.sort_by_key(|(add, out)| (*add, format!("{out:?}")));
    let oks: Vec<u64> = outs.iter().filter_map(|(_, o)| o.clone().unwrap().ok()).collect();
    assert_eq!(oks.iter().max(), Some(&10));
    assert_eq!(outs.iter().filter(|(_, o)| o.clone().unwrap().is_err()).count(), 1);
    log.close();
    assert_eq!(store.get(&[keyspace::USER_FIRST, b'c']).unwrap(), Some(10u64.to_be_bytes().to_vec()));
    assert_eq!(verify(store.as_ref(), &mut |_| {}).unwrap().records, 3);
}

#[test]
fn a_failing_store_fails_the_whole_batch_cleanly_and_the_log_recovers() {
    let mem = MemStore::new();
    let failing = FailingStore::new(mem.clone(), u64::MAX);
    let store: Arc<dyn Store> = Arc::new(failing.clone());
    let log = Log::open(store, AppendOnly, config()).unwrap();
    log.submit(vec![(1, body(1))]).unwrap().unwrap();
    // The disk is full: the apply of the next batch fails.
    failing.fail_after(0);
    let err = log.submit(vec![(2, body(2)), (3, body(3))]).unwrap_err();
    assert!(matches!(err, LogError::Store(StoreError::Injected { .. })), "{err:?}");
    assert_eq!(log.committed_seq(), 1);
    assert_eq!(mem.with_map(|m| m.keys().filter(|k| k[0] == keyspace::RECORD).count()), 1);
    // Space returns: once the writer has resumed, the next append continues the chain without a gap.
    failing.heal();
    wait_resumed(&log);
    assert_eq!(log.submit(vec![(4, body(4))]).unwrap().unwrap(), vec![2]);
    log.close();
    assert_eq!(verify(&mem, &mut |_| {}).unwrap().last_seq, 2);
}

#[test]
fn a_failed_flush_is_not_acknowledged() {
    let mem = MemStore::new();
    let failing = FailingStore::new(mem.clone(), u64::MAX);
    let log = Log::open(Arc::new(failing.clone()), AppendOnly, config()).unwrap();
    failing.fail_after(1); // the apply succeeds, the flush fails
    assert!(matches!(log.submit(vec![(1, body(1))]), Err(LogError::Store(_))));
    assert_eq!(log.committed_seq(), 0);
    failing.heal();
    wait_resumed(&log);
    // A store in memory only keeps what it applied: the record is there, and durable now.
    assert_eq!(log.submit(vec![(2, body(2))]).unwrap().unwrap(), vec![2]);
    assert_eq!(log.committed_seq(), 2);
    log.close();
    assert_eq!(verify(&mem, &mut |_| {}).unwrap().records, 2);
}

/// Waits (bounded) until the writer has resumed after a refusal.
fn wait_resumed<M: Machine>(log: &Log<M>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Some(refusal) = log.refusal() {
        assert!(std::time::Instant::now() < deadline, "the writer did not resume: {refusal}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The counter's value in the store.
fn counter(store: &dyn Store) -> Option<u64> {
    store.get(&[keyspace::USER_FIRST, b'c']).unwrap().map(|v| u64::from_be_bytes(v.try_into().unwrap()))
}

#[test]
fn a_batch_torn_by_a_full_disk_is_dropped_whole_and_the_writer_resumes_by_itself() {
    let disk = VolatileStore::new();
    let failing = FailingStore::new(disk.clone(), u64::MAX).with_torn_writes();
    let log = Log::open(Arc::new(failing.clone()), Counter, config()).unwrap();
    assert_eq!(log.submit(2).unwrap().unwrap(), 2);
    // The disk fills: the next batch's apply fails after writing half of it (its record, not
    // its counter), as sled may leave a batch in memory.
    failing.fail_after(0);
    let err = log.submit(3).unwrap_err();
    assert!(matches!(err, LogError::Store(StoreError::Injected { .. })), "{err:?}");
    // While the disk is full every command is refused with the cause, without running, and reads
    // answer what is durable.
    let refused = log.submit(1).unwrap_err();
    assert!(matches!(refused, LogError::Store(StoreError::Injected { .. })), "{refused:?}");
    assert!(log.refusal().is_some());
    assert_eq!(counter(&disk), Some(2));
    assert_eq!(verify(&disk, &mut |_| {}).unwrap().last_seq, 1);
    // Space returns: the writer reopens the store and resumes without a restart.
    failing.heal();
    wait_resumed(&log);
    assert!(!log.stats().last_batch_failed);
    assert_eq!(log.submit(3).unwrap().unwrap(), 5);
    assert_eq!(log.committed_seq(), 2);
    log.close();
    disk.crash();
    assert_eq!(counter(&disk), Some(5));
    let report = verify(&disk, &mut |_| {}).unwrap();
    assert_eq!((report.records, report.last_seq), (2, 2));
}

#[test]
fn a_batch_whose_flush_failed_is_gone_after_the_reopen_and_its_seq_is_taken_again() {
    let disk = VolatileStore::new();
    let failing = FailingStore::new(disk.clone(), u64::MAX);
    let log = Log::open(Arc::new(failing.clone()), Counter, config()).unwrap();
    assert_eq!(log.submit(1).unwrap().unwrap(), 1);
    failing.fail_after(1); // the apply goes through, the flush fails
    assert!(matches!(log.submit(4), Err(LogError::Store(_))));
    failing.heal();
    wait_resumed(&log);
    // The reopen dropped the unflushed batch whole: the counter and the chain are as before it.
    assert_eq!(counter(&disk), Some(1));
    assert_eq!(log.submit(2).unwrap().unwrap(), 3);
    assert_eq!(log.read(1, 10).unwrap().iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
    log.close();
    disk.crash();
    assert_eq!(counter(&disk), Some(3));
    assert_eq!(verify(&disk, &mut |_| {}).unwrap().records, 2);
}

#[test]
fn a_stop_while_the_store_refuses_writes_answers_every_command() {
    let failing = FailingStore::new(VolatileStore::new(), u64::MAX);
    let log = Log::open(Arc::new(failing.clone()), Counter, config()).unwrap();
    failing.fail_after(0);
    assert!(log.submit(1).is_err());
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..10 {
        let tx = tx.clone();
        log.submit_urgent_with(1, move |out| tx.send(out).unwrap());
    }
    drop(tx);
    assert!(log.close_within(Duration::from_secs(10)));
    let outs: Vec<_> = rx.iter().collect();
    assert_eq!(outs.len(), 10);
    assert!(outs.iter().all(|o| matches!(o, Err(LogError::Store(_)))), "{outs:?}");
}

fn damaged(seqs: u64, f: impl FnOnce(&MemStore)) -> LogError {
    let store = MemStore::new();
    let log = Log::open(Arc::new(store.clone()), AppendOnly, config()).unwrap();
    for i in 1..=seqs {
        let size = if i == 3 { 30_000 } else { 100 };
        log.submit(vec![(i, vec![i as u8; size])]).unwrap().unwrap();
    }
    log.close();
    f(&store);
    let err = verify(&store, &mut |_| {}).unwrap_err();
    // Read a key or two at a time, the check names the same record (a chunked one spans pages).
    for page_keys in [1, 2] {
        let paged = verify_paged(&store, page_keys, &mut || Ok(()), &mut |_| {}).unwrap_err();
        assert_eq!(paged, err, "{page_keys} keys a page");
    }
    err
}

/// A log of six records, the third in several chunks.
fn six_records_one_chunked() -> MemStore {
    let store = MemStore::new();
    let log = Log::open(Arc::new(store.clone()), AppendOnly, config()).unwrap();
    for i in 1..=6u64 {
        let size = if i == 3 { 30_000 } else { 100 };
        log.submit(vec![(i, vec![i as u8; size])]).unwrap().unwrap();
    }
    log.close();
    store
}

#[test]
fn verify_hands_each_checked_record_in_order_once_and_stops_where_told() {
    let store = six_records_one_chunked();
    let whole = verify(&store, &mut |_| {}).unwrap();
    let every = read_records(&store, 1, 100).unwrap();
    for page_keys in [1, 2, 100] {
        let mut handed = Vec::new();
        let report = verify_paged_each(&store, page_keys, &mut || Ok(()), &mut |_| {}, &mut |r| {
            handed.push(r);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!((report, &handed), (whole.clone(), &every), "{page_keys} keys a page");
    }
    let mut handed = 0;
    let stopped = verify_paged_each(&store, 1, &mut || Ok(()), &mut |_| {}, &mut |r| {
        handed += 1;
        if r.seq == 4 {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!((handed, stopped.records, stopped.last_seq), (4, 4, 4));
}

#[test]
fn verify_in_pages_gives_the_same_report_and_stops_at_an_error_between_them() {
    let store = six_records_one_chunked();
    let whole = verify(&store, &mut |_| {}).unwrap();
    let keys = store.with_map(|m| m.keys().filter(|k| k[0] == keyspace::RECORD).count());
    for page_keys in 1..=keys + 1 {
        let mut pages = 0;
        let paged = verify_paged(
            &store,
            page_keys,
            &mut || {
                pages += 1;
                Ok(())
            },
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(paged, whole, "{page_keys} keys a page");
        assert_eq!(pages, keys / page_keys, "pages after the first, {page_keys} keys a page");
    }
    let refused = verify_paged(&store, 2, &mut || Err(StoreError::Io("reopening".into())), &mut |_| {});
    assert_eq!(refused.unwrap_err(), LogError::Store(StoreError::Io("reopening".into())));
}

#[test]
fn verify_names_the_seq_of_a_flipped_byte_a_truncated_tail_a_removed_or_swapped_record() {
    let flipped = damaged(5, |s| s.with_map(|m| m.get_mut(&record::head_key(4)).unwrap()[60] ^= 1));
    assert_eq!(flipped, LogError::Corrupt(CorruptRecord { seq: 4, kind: CorruptKind::ChainBroken }));
    let body_flip =
        damaged(5, |s| s.with_map(|m| *m.get_mut(&record::head_key(2)).unwrap().last_mut().unwrap() ^= 1));
    assert_eq!(body_flip, LogError::Corrupt(CorruptRecord { seq: 2, kind: CorruptKind::ChecksumMismatch }));
    // The tail record is large (chunked); its last chunk was torn off.
    let truncated = damaged(3, |s| {
        s.with_map(|m| {
            let last = m.keys().rfind(|k| k[0] == keyspace::RECORD).unwrap().clone();
            m.remove(&last);
        })
    });
    assert_eq!(truncated, LogError::Corrupt(CorruptRecord { seq: 3, kind: CorruptKind::Truncated }));
    let removed = damaged(5, |s| s.with_map(|m| m.remove(&record::head_key(2)).map(|_| ())).unwrap_or(()));
    assert_eq!(removed, LogError::Corrupt(CorruptRecord { seq: 2, kind: CorruptKind::Gap { found: 3 } }));
    let swapped = damaged(5, |s| {
        s.with_map(|m| {
            let a = m.remove(&record::head_key(4)).unwrap();
            let b = m.insert(record::head_key(5), a).unwrap();
            m.insert(record::head_key(4), b);
        })
    });
    assert_eq!(swapped, LogError::Corrupt(CorruptRecord { seq: 4, kind: CorruptKind::ChecksumMismatch }));
}

#[test]
fn opening_a_log_with_a_torn_tail_reports_it() {
    let store = MemStore::new();
    let log = Log::open(Arc::new(store.clone()), AppendOnly, config()).unwrap();
    log.submit(vec![(1, vec![1; 20_000])]).unwrap().unwrap();
    log.close();
    store.with_map(|m| {
        let last = m.keys().rfind(|k| k[0] == keyspace::RECORD).unwrap().clone();
        m.remove(&last);
    });
    let err = Log::open(Arc::new(store), AppendOnly, config()).err().unwrap();
    assert_eq!(err, LogError::Corrupt(CorruptRecord { seq: 1, kind: CorruptKind::Truncated }));
}

#[test]
fn a_newer_store_format_is_refused_and_left_untouched() {
    let store = MemStore::new();
    let mut b = WriteBatch::default();
    b.put(keyspace::META_FORMAT.to_vec(), vec![herald_log::STORE_FORMAT + 1]);
    store.apply(&b).unwrap();
    let before = store.with_map(|m| m.clone());
    let err = Log::open(Arc::new(store.clone()), AppendOnly, config()).err().unwrap();
    assert_eq!(
        err,
        LogError::NewerFormat { found: herald_log::STORE_FORMAT + 1, known: herald_log::STORE_FORMAT }
    );
    assert!(err.to_string().contains("refusing"));
    assert_eq!(store.with_map(|m| m.clone()), before);
}

#[test]
fn an_older_store_format_opens_as_it_is_until_it_is_upgraded() {
    let store = MemStore::new();
    let mut b = WriteBatch::default();
    b.put(keyspace::META_FORMAT.to_vec(), vec![herald_log::STORE_FORMAT_OLDEST]);
    store.apply(&b).unwrap();
    let format = |store: &MemStore| store.get(keyspace::META_FORMAT).unwrap();
    let log = Log::open(Arc::new(store.clone()), AppendOnly, config()).unwrap();
    log.close();
    assert_eq!(format(&store), Some(vec![herald_log::STORE_FORMAT_OLDEST]), "opening writes no format");
    assert!(herald_log::upgrade_format(&store).unwrap());
    assert_eq!(format(&store), Some(vec![herald_log::STORE_FORMAT]));
    assert!(!herald_log::upgrade_format(&store).unwrap(), "once");
}

/// A machine that records the order it runs commands in; command 0 first waits for a signal,
/// so commands queue behind it.
struct Ordered {
    gate: crossbeam_channel::Receiver<()>,
    started: crossbeam_channel::Sender<()>,
    order: Arc<std::sync::Mutex<Vec<u64>>>,
}

impl Machine for Ordered {
    type Command = u64;
    type Reply = ();
    type Rejection = ();
    fn execute(&mut self, label: u64, tx: &mut Tx<'_>) -> Result<(), ()> {
        if label == 0 {
            let _ = self.started.send(());
            let _ = self.gate.recv_timeout(Duration::from_secs(10));
        }
        self.order.lock().unwrap().push(label);
        tx.append(0, label.to_be_bytes().to_vec());
        Ok(())
    }
}

#[test]
fn an_urgent_command_goes_ahead_of_the_ordinary_backlog_and_a_stop_commits_it() {
    let (open, gate) = crossbeam_channel::unbounded();
    let (started_tx, started) = crossbeam_channel::unbounded();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = MemStore::new();
    let log = Log::open(
        Arc::new(store.clone()),
        Ordered { gate, started: started_tx, order: order.clone() },
        LogConfig { batch_commands_max: 4, queue_commands_max: 64, durability: Durability::Flush },
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let answer = |tx: &std::sync::mpsc::Sender<u64>, label: u64| {
        let tx = tx.clone();
        move |o: herald_log::Outcome<Ordered>| {
            assert_eq!(o, Ok(Ok(())), "command {label}");
            tx.send(label).unwrap();
        }
    };
    log.submit_with(0, answer(&tx, 0));
    started.recv_timeout(Duration::from_secs(5)).unwrap();
    // The writer holds command 0; ten ordinary commands queue behind it, then an urgent one.
    for label in 1..=10 {
        log.submit_with(label, answer(&tx, label));
    }
    log.submit_urgent_with(100, answer(&tx, 100));
    open.send(()).unwrap();
    let answered: Vec<u64> = (0..12).map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
    let executed = order.lock().unwrap().clone();
    assert_eq!(
        executed,
        vec![0, 100, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        "the urgent one is first in the next batch"
    );
    assert_eq!(answered, executed, "answered in the order committed");

    // An urgent command queued before a stop is committed before the writer ends.
    log.submit_with(0, answer(&tx, 0));
    started.recv_timeout(Duration::from_secs(5)).unwrap();
    log.submit_urgent_with(200, answer(&tx, 200));
    let closer = {
        let log = log.clone();
        std::thread::spawn(move || log.close())
    };
    open.send(()).unwrap();
    closer.join().unwrap();
    let mut after: Vec<u64> = (0..2).map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
    after.sort_unstable();
    assert_eq!(after, vec![0, 200]);
    assert_eq!(verify(&store, &mut |_| {}).unwrap().last_seq, 14);
}

/// When the urgent queue is full, an urgent command joins the ordinary queue: it waits its turn
/// there but is neither refused nor lost.
#[test]
fn an_urgent_command_that_finds_its_queue_full_joins_the_ordinary_one() {
    let (open, gate) = crossbeam_channel::unbounded();
    let (started_tx, started) = crossbeam_channel::unbounded();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Both queues hold 4 (the urgent one holds min(URGENT_QUEUE_COMMANDS, queue_commands_max)).
    let log = Log::open(
        Arc::new(MemStore::new()),
        Ordered { gate, started: started_tx, order: order.clone() },
        LogConfig { batch_commands_max: 16, queue_commands_max: 4, durability: Durability::Flush },
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let answer = |label: u64| {
        let tx = tx.clone();
        move |o: herald_log::Outcome<Ordered>| tx.send((label, o)).unwrap()
    };
    log.submit_with(0, answer(0));
    started.recv_timeout(Duration::from_secs(5)).unwrap();
    for label in 101..=106 {
        log.submit_urgent_with(label, answer(label));
    }
    open.send(()).unwrap();
    for _ in 0..7 {
        let (label, outcome) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(outcome, Ok(Ok(())), "command {label}");
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 101, 102, 103, 104, 105, 106]);
}

#[test]
fn try_submit_refuses_when_the_queue_is_full() {
    // A machine that blocks until told, so the queue fills behind it.
    struct Gate(crossbeam_channel::Receiver<()>, crossbeam_channel::Sender<()>);
    impl Machine for Gate {
        type Command = ();
        type Reply = ();
        type Rejection = ();
        fn execute(&mut self, _: (), tx: &mut Tx<'_>) -> Result<(), ()> {
            let _ = self.1.send(());
            let _ = self.0.recv_timeout(Duration::from_secs(10));
            tx.append(0, vec![]);
            Ok(())
        }
    }
    let (open, gate) = crossbeam_channel::unbounded();
    let (started_tx, started) = crossbeam_channel::unbounded();
    let log = Log::open(
        Arc::new(MemStore::new()),
        Gate(gate, started_tx),
        LogConfig { batch_commands_max: 1, queue_commands_max: 1, durability: Durability::Flush },
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..4 {
        if i == 1 {
            // The writer has taken the first command and is holding it.
            started.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        let tx = tx.clone();
        log.try_submit_with((), move |o| tx.send(o.map(|_| ())).unwrap());
    }
    // The writer holds one, the queue one; the others were refused at once.
    let busy: Vec<_> = (0..2).map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
    assert_eq!(busy, vec![Err(LogError::Busy), Err(LogError::Busy)]);
    for _ in 0..2 {
        open.send(()).unwrap();
    }
    for _ in 0..2 {
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Ok(()));
    }
}

#[test]
fn a_directory_in_use_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let held = SledStore::open(dir.path(), 1 << 20).unwrap();
    let err = SledStore::open(dir.path(), 1 << 20).err().unwrap();
    assert!(err.to_string().contains("in use by another herald process"), "{err}");
    drop(held);
    // Once released (sled lets go of its lock a moment after the drop), it opens again.
    SledStore::open(dir.path(), 1 << 20).unwrap();
}

/// A store whose flush takes a while, and which counts the batches applied during a flush.
struct SlowFlush {
    inner: MemStore,
    in_flush: std::sync::atomic::AtomicBool,
    applied_during_flush: std::sync::atomic::AtomicU64,
}

impl SlowFlush {
    fn new() -> SlowFlush {
        SlowFlush {
            inner: MemStore::new(),
            in_flush: Default::default(),
            applied_during_flush: Default::default(),
        }
    }
}

impl Store for SlowFlush {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }
    fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> std::ops::ControlFlow<()>,
    ) -> Result<(), StoreError> {
        self.inner.scan(from, to, visit)
    }
    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<herald_log::Pair>, StoreError> {
        self.inner.last(from, to)
    }
    fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        if self.in_flush.load(std::sync::atomic::Ordering::SeqCst) {
            self.applied_during_flush.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.apply(batch)
    }
    fn flush(&self, d: Durability) -> Result<(), StoreError> {
        self.in_flush.store(true, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(3));
        self.in_flush.store(false, std::sync::atomic::Ordering::SeqCst);
        self.inner.flush(d)
    }
}

/// The writer applies the next batch while the last one flushes; still, a command is answered
/// only once a flush that covers its batch is done, and the durable seq only grows.
#[test]
fn batches_are_applied_while_the_previous_one_flushes_and_answered_only_once_flushed() {
    let store = Arc::new(SlowFlush::new());
    let log = Log::open(store.clone(), AppendOnly, config()).unwrap();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut last_committed = 0;
                for i in 0..25 {
                    let seqs = log.submit(vec![(t, body(t * 100 + i))]).unwrap().unwrap();
                    let committed = log.committed_seq();
                    assert!(seqs[0] <= committed, "seq {} acknowledged before it was durable", seqs[0]);
                    assert!(committed >= last_committed, "the durable seq went back");
                    last_committed = committed;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let overlapped = store.applied_during_flush.load(std::sync::atomic::Ordering::SeqCst);
    assert!(overlapped > 0, "no batch was applied during a flush");
    log.close();
    assert_eq!(verify(store.as_ref(), &mut |_| {}).unwrap().last_seq, 200);
}

/// A writer stuck on a stalled disk does not hold `close_within` or the log's drop; the closed
/// log refuses at once what comes after, and what was stuck is never acknowledged early.
#[test]
fn close_within_leaves_a_stuck_writer_behind_and_refuses_later_commands() {
    let store = Arc::new(herald_log::HeldStore::new(MemStore::new()));
    let log = Log::open(store.clone(), AppendOnly, config()).unwrap();
    store.hold(true);
    let (tx, rx) = std::sync::mpsc::channel();
    log.submit_with(vec![(1, body(1))], move |out| {
        let _ = tx.send(out.is_ok());
    });
    let began = std::time::Instant::now();
    assert!(!log.close_within(Duration::from_millis(50)), "a stuck writer reported as stopped");
    assert!(began.elapsed() < Duration::from_millis(500), "close_within waited {:?}", began.elapsed());
    assert!(rx.try_recv().is_err(), "answered while its write was stuck");
    assert!(matches!(log.submit(vec![(2, body(2))]), Err(LogError::Closed)));
    let began = std::time::Instant::now();
    drop(log);
    assert!(began.elapsed() < Duration::from_millis(500), "the drop waited for the stuck writer");
    // The disk comes back: the writer left behind finishes what it held, durably, then ends.
    store.hold(false);
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
}

/// Appends bodies, or cuts the log through a seq and appends a note in the same batch.
struct Cutter;

enum CutCommand {
    Append(Vec<u8>),
    CutThrough(u64),
}

impl Machine for Cutter {
    type Command = CutCommand;
    type Reply = u64;
    type Rejection = LogError;

    fn execute(&mut self, command: CutCommand, tx: &mut Tx<'_>) -> Result<u64, LogError> {
        match command {
            CutCommand::Append(body) => Ok(tx.append(1, body).seq),
            CutCommand::CutThrough(seq) => {
                tx.cut_through(seq)?;
                Ok(tx.append(2, b"cut".to_vec()).seq)
            }
        }
    }
}

#[test]
fn a_cut_drops_the_prefix_and_the_kept_log_still_verifies_from_its_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 8 << 20).unwrap());
    let log = Log::open(store.clone(), Cutter, config()).unwrap();
    for i in 1..=6u64 {
        // Record 3 is chunked: every one of its keys must go.
        let size = if i == 3 { 30_000 } else { 100 };
        log.submit(CutCommand::Append(vec![i as u8; size])).unwrap().unwrap();
    }
    let hash_4 = log.read(4, 1).unwrap()[0].hash;
    // Nothing is cut that is not stored after the anchor; a refused cut writes nothing.
    for bad in [0, 7, 99] {
        let refused = log.submit(CutCommand::CutThrough(bad)).unwrap();
        assert!(matches!(refused, Err(LogError::Cut { .. })), "{bad}: {refused:?}");
    }
    assert_eq!(log.submit(CutCommand::CutThrough(4)).unwrap().unwrap(), 7);
    assert!(matches!(
        log.submit(CutCommand::CutThrough(4)).unwrap(),
        Err(LogError::Cut { anchor_seq: 4, .. })
    ));
    log.close();
    drop(log);
    let report = verify(store.as_ref(), &mut |_| {}).unwrap();
    assert_eq!((report.records, report.first_seq, report.last_seq), (3, 5, 7));
    let head = herald_log::read_head(store.as_ref()).unwrap();
    assert_eq!((head.anchor_seq, head.anchor_hash, head.next_seq), (4, hash_4, 8));
    let mut left = 0;
    store
        .scan(&record::head_key(0), &record::head_key(5), &mut |_, _| {
            left += 1;
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(left, 0, "record keys before the anchor are gone");
    drop(store);

    // Reopened, the chain goes on from the kept records; a removed first kept record is caught.
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 8 << 20).unwrap());
    let log = Log::open(store.clone(), Cutter, config()).unwrap();
    assert_eq!(log.submit(CutCommand::Append(b"after".to_vec())).unwrap().unwrap(), 8);
    log.close();
    assert_eq!(verify(store.as_ref(), &mut |_| {}).unwrap().last_seq, 8);
    let mut batch = WriteBatch::default();
    batch.delete(record::head_key(5));
    store.apply(&batch).unwrap();
    assert_eq!(
        verify(store.as_ref(), &mut |_| {}).unwrap_err(),
        LogError::Corrupt(CorruptRecord { seq: 5, kind: CorruptKind::Gap { found: 6 } })
    );
}

/// A record read by its keys is the record a range read returns, also when its body spans
/// several chunks; a missing seq is `None`, and a missing chunk is named.
#[test]
fn read_record_by_key_matches_the_range_read_and_names_a_missing_chunk() {
    let store = MemStore::new();
    let log = Log::open(Arc::new(store.clone()), AppendOnly, config()).unwrap();
    let big = vec![7u8; record::CHUNK_BYTES * 2 + 100];
    log.submit(vec![(1, body(1)), (2, big.clone()), (3, body(3))]).unwrap().unwrap();
    log.close();
    for seq in 1..=3 {
        let by_key = herald_log::read_record(&store, seq).unwrap().unwrap();
        assert_eq!(by_key, read_records(&store, seq, 1).unwrap()[0], "seq {seq}");
    }
    assert_eq!(herald_log::read_record(&store, 2).unwrap().unwrap().body, big);
    assert_eq!(herald_log::read_record(&store, 4).unwrap(), None);
    store.with_map(|m| {
        let chunk = m.keys().find(|k| k.len() == 11 && k[1..9] == 2u64.to_be_bytes() && k[10] == 2).cloned();
        m.remove(&chunk.unwrap());
    });
    let err = herald_log::read_record(&store, 2).unwrap_err();
    assert_eq!(err, LogError::Corrupt(CorruptRecord { seq: 2, kind: CorruptKind::Truncated }), "{err}");
}

/// A machine that stages each command's word under a scratch key it never stores, and folds
/// them in `finish` into one stored value: every word accepted so far, sorted.
struct Words;

const SCRATCH: u8 = keyspace::USER_FIRST + 1;

impl Machine for Words {
    /// The word, and whether to reject the command after staging it.
    type Command = (&'static str, bool);
    type Reply = ();
    type Rejection = String;

    fn execute(&mut self, (word, reject): (&'static str, bool), tx: &mut Tx<'_>) -> Result<(), String> {
        tx.append(0, word.as_bytes().to_vec());
        tx.put([&[SCRATCH][..], word.as_bytes()].concat(), Vec::new());
        if reject {
            return Err(format!("{word} is rejected"));
        }
        Ok(())
    }

    fn finish(&mut self, tx: &mut Tx<'_>) -> Result<(), StoreError> {
        let staged = tx.take_staged(&[SCRATCH], &[SCRATCH + 1]);
        assert!(tx.staged(&[SCRATCH], &[SCRATCH + 1]).is_empty(), "taken");
        if staged.iter().any(|(k, _)| k.ends_with(b"broken")) {
            return Err(StoreError::Corrupt("a broken word".into()));
        }
        let key = vec![keyspace::USER_FIRST, b'w'];
        let stored = tx.get(&key).unwrap_or_default();
        let mut words: Vec<&[u8]> = stored.split(|b| *b == b' ').filter(|w| !w.is_empty()).collect();
        words.extend(staged.iter().map(|(k, _)| &k[1..]));
        words.sort_unstable();
        tx.put(key, words.join(&b' '));
        Ok(())
    }
}

#[test]
fn a_machine_finishes_each_batch_before_it_is_written() {
    let store = Arc::new(MemStore::new());
    let log = Log::open(store.clone(), Words, LogConfig { batch_commands_max: 8, ..config() }).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for (word, reject) in [("pear", false), ("fig", true), ("apple", false), ("kiwi", false)] {
        let tx = tx.clone();
        log.submit_with((word, reject), move |out| tx.send(out).unwrap());
    }
    drop(tx);
    assert_eq!(rx.iter().filter(|o| matches!(o, Ok(Ok(())))).count(), 3);
    let scratch: Vec<Vec<u8>> = store.with_map(|m| m.keys().filter(|k| k[0] == SCRATCH).cloned().collect());
    assert!(scratch.is_empty(), "staged scratch keys are never stored: {scratch:?}");
    // The rejected command's staged word was undone with it.
    assert_eq!(store.get(&[keyspace::USER_FIRST, b'w']).unwrap(), Some(b"apple kiwi pear".to_vec()));
    // A finish that fails fails the batch: nothing of it is written, every caller is told.
    let before = log.committed_seq();
    let out = log.submit(("broken", false));
    assert!(matches!(out, Err(LogError::Store(StoreError::Corrupt(_)))), "{out:?}");
    assert_eq!(log.committed_seq(), before);
    assert_eq!(store.get(&[keyspace::USER_FIRST, b'w']).unwrap(), Some(b"apple kiwi pear".to_vec()));
    log.close();
    assert_eq!(verify(store.as_ref(), &mut |_| {}).unwrap().records, 3);
}

/// Appends bodies, each alone or grouped (see `Tx::append_grouped`), or cuts the log.
struct Grouping;

enum GroupCommand {
    /// Bodies appended in one command; `true`: grouped.
    Append(Vec<(Vec<u8>, bool)>),
    CutThrough(u64),
}

impl Machine for Grouping {
    type Command = GroupCommand;
    type Reply = Vec<u64>;
    type Rejection = LogError;

    fn execute(&mut self, command: GroupCommand, tx: &mut Tx<'_>) -> Result<Vec<u64>, LogError> {
        match command {
            GroupCommand::Append(bodies) => Ok(bodies
                .into_iter()
                .map(
                    |(body, grouped)| {
                        if grouped {
                            tx.append_grouped(1, body).seq
                        } else {
                            tx.append(1, body).seq
                        }
                    },
                )
                .collect()),
            GroupCommand::CutThrough(seq) => {
                tx.cut_through(seq)?;
                Ok(vec![tx.append(2, b"cut".to_vec()).seq])
            }
        }
    }
}

/// 40 records: runs of grouped ones (longer than a group holds, and with bodies too large to
/// share one) between records stored alone, one of them chunked.
fn grouped_history() -> Vec<(Vec<u8>, bool)> {
    (1..=40u64)
        .map(|i| {
            let grouped = !matches!(i, 1 | 20 | 21 | 33);
            let size = match i {
                21 => 20_000,
                25..=27 => 3_000,
                _ => 40 + i as usize,
            };
            (vec![i as u8; size], grouped)
        })
        .collect()
}

#[test]
fn grouped_records_read_back_one_by_one_and_in_ranges_and_survive_a_reopen_and_cuts() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path(), 8 << 20).unwrap());
    let log = Log::open(store.clone(), Grouping, config()).unwrap();
    let history = grouped_history();
    assert_eq!(
        log.submit(GroupCommand::Append(history.clone())).unwrap().unwrap(),
        (1..=40).collect::<Vec<_>>()
    );
    let mut keys = 0;
    store
        .scan(&record::head_key(0), &record::record_keys_end(), &mut |_, _| {
            keys += 1;
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert!(keys < 20, "{keys} stored keys for 40 records");
    let all = log.read(1, 100).unwrap();
    assert_eq!(
        all.iter().map(|r| r.body.clone()).collect::<Vec<_>>(),
        history.iter().map(|(b, _)| b.clone()).collect::<Vec<_>>()
    );
    for seq in 1..=40u64 {
        let one = herald_log::read_record(store.as_ref(), seq).unwrap().unwrap();
        assert_eq!(one, all[seq as usize - 1], "read_record({seq})");
        for limit in [1, 3, 17] {
            let got = log.read(seq, limit).unwrap();
            assert_eq!(
                got,
                all[seq as usize - 1..(seq as usize - 1 + limit).min(40)],
                "read({seq}, {limit})"
            );
        }
    }
    assert_eq!(herald_log::read_record(store.as_ref(), 41).unwrap(), None);
    log.close();
    drop(log);
    assert_eq!(verify(store.as_ref(), &mut |_| {}).unwrap().last_seq, 40);

    // Reopened: the chain goes on from the last record, inside a group.
    let log = Log::open(store.clone(), Grouping, config()).unwrap();
    assert_eq!(log.submit(GroupCommand::Append(vec![(b"next".to_vec(), true)])).unwrap().unwrap(), vec![41]);
    assert_eq!(log.read(41, 1).unwrap()[0].prev_hash, all[39].hash);
    // Cuts inside groups and between them: the kept records still read and verify.
    let mut next = 42;
    for through in [3, 4, 17, 22, 29] {
        let kept_hash = log.read(through, 1).unwrap()[0].hash;
        assert_eq!(log.submit(GroupCommand::CutThrough(through)).unwrap().unwrap(), vec![next]);
        next += 1;
        let head = herald_log::read_head(store.as_ref()).unwrap();
        assert_eq!((head.anchor_seq, head.anchor_hash), (through, kept_hash));
        let report = verify(store.as_ref(), &mut |_| {}).unwrap();
        assert_eq!((report.first_seq, report.last_seq), (through + 1, next - 1), "cut through {through}");
        let kept = log.read(through + 1, 100).unwrap();
        assert_eq!(kept.len() as u64, next - 1 - through);
        assert_eq!(kept[0], all[through as usize], "the first kept record is as it was");
        assert_eq!(herald_log::read_record(store.as_ref(), through).unwrap(), None, "cut records are gone");
        assert_eq!(
            herald_log::read_record(store.as_ref(), through + 1).unwrap().unwrap(),
            all[through as usize]
        );
    }
    log.close();
}

/// A store that, on the first `get` of `target`, answers as it was and then lets a cut land:
/// a read that meets a cut between its own steps.
struct CutBetween {
    inner: MemStore,
    target: Vec<u8>,
    cut: std::sync::Mutex<Option<WriteBatch>>,
}

impl Store for CutBetween {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let value = self.inner.get(key)?;
        if key == self.target {
            if let Some(cut) = self.cut.lock().unwrap().take() {
                self.inner.apply(&cut)?;
            }
        }
        Ok(value)
    }
    fn scan(&self, from: &[u8], to: &[u8], visit: herald_log::Visit<'_>) -> Result<(), StoreError> {
        self.inner.scan(from, to, visit)
    }
    fn last(&self, from: &[u8], to: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.inner.last(from, to)
    }
    fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        self.inner.apply(batch)
    }
    fn flush(&self, durability: Durability) -> Result<(), StoreError> {
        self.inner.flush(durability)
    }
}

/// A cut through a group stores the rest of it under the first kept record's key. A read of
/// that record which looked for its key just before the cut and for the group just after it
/// still finds it.
#[test]
fn a_record_whose_group_a_cut_moves_under_it_is_found_mid_cut() {
    let before = MemStore::new();
    let log = Log::open(Arc::new(before.clone()), Grouping, config()).unwrap();
    let bodies: Vec<(Vec<u8>, bool)> = (1..=5u8).map(|i| (vec![i; 40], true)).collect();
    log.submit(GroupCommand::Append(bodies)).unwrap().unwrap();
    log.close();
    let all = Log::open(Arc::new(before.clone()), Grouping, config()).unwrap().read(1, 10).unwrap();
    // The same store cut through seq 2, elsewhere; the difference is the cut's batch.
    let after = MemStore::new();
    let old = before.with_map(|m| m.clone());
    after.with_map(|m| *m = old.clone());
    let log = Log::open(Arc::new(after.clone()), Grouping, config()).unwrap();
    log.submit(GroupCommand::CutThrough(2)).unwrap().unwrap();
    log.close();
    let new = after.with_map(|m| m.clone());
    let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> =
        old.keys().filter(|k| !new.contains_key(*k)).map(|k| (k.clone(), None)).collect();
    writes.extend(
        new.iter().filter(|(k, v)| old.get(*k) != Some(v)).map(|(k, v)| (k.clone(), Some(v.clone()))),
    );
    assert!(new.contains_key(&record::head_key(3)), "the rest of the group is stored under seq 3");

    let racing = CutBetween {
        inner: before,
        target: record::head_key(3),
        cut: std::sync::Mutex::new(Some(WriteBatch { writes })),
    };
    let got = herald_log::read_record(&racing, 3).unwrap();
    assert!(racing.cut.lock().unwrap().is_none(), "the cut landed during the read");
    assert_eq!(got.as_ref(), Some(&all[2]));
    assert_eq!(herald_log::read_record(&racing, 4).unwrap().as_ref(), Some(&all[3]));
}
