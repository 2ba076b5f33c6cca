//! The writer thread and its flusher: batches commands, runs them through the machine, applies
//! each batch atomically and flushes it on a second thread while the next one is applied.
//!
//! After the store refuses a write (a full disk: a failed apply, flush or read), the writer
//! refuses every command with that error, without running it, until it has reopened the store
//! (which then holds whole batches only, as after a restart), written a probe, and read the
//! head of the log back: the next batch sees each failed batch wholly applied or wholly absent.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use crate::keyspace;
use crate::log::{
    read_head, AfterFlush, Answer, Callback, Head, LogConfig, LogError, Machine, Msg, Queued, Shared,
    FLUSH_BUCKETS_US, RESUME_WAIT_FIRST, RESUME_WAIT_MAX,
};
use crate::record::Hash;
use crate::store::{Store, StoreError, WriteBatch};
use crate::tx::Tx;
use crate::write_ahead::{encoded_len, WriteAhead, WriteAheadError};

pub(crate) struct Writer<M: Machine> {
    store: Arc<dyn Store>,
    machine: M,
    config: LogConfig,
    shared: Arc<Shared>,
    next_seq: u64,
    last_hash: Hash,
    /// Times the writer resumed after a refusal (the probe's value).
    resumes: u64,
    /// The callers of a batch whose apply or read failed, answered once the store is reopened:
    /// by then nothing of the batch is visible.
    failed: Option<(Vec<Answer<M>>, StoreError)>,
    /// Where each batch with records goes before it is applied (see `write_ahead.rs`).
    write_ahead: Option<Arc<dyn WriteAhead>>,
}

/// A batch applied to the store and waiting for its flush.
struct Flushing<M: Machine> {
    answers: Vec<Answer<M>>,
    records: u64,
    store_writes: u64,
    commands: u64,
    next_seq: u64,
    after: AfterFlush,
}

/// What the writer hands its flusher.
enum ToFlusher<M: Machine> {
    Batch(Flushing<M>),
    /// Answered once every batch sent before it is flushed (or failed) and answered.
    Barrier(Sender<()>),
}

/// The flushing half of the writer: batch k is flushed here while the writer applies batch k+1,
/// so a command arriving during a flush waits for the next flush, not for two.
struct Flusher {
    store: Arc<dyn Store>,
    durability: crate::store::Durability,
    shared: Arc<Shared>,
    /// Wakes an idle writer when a flush failed, so it starts resuming at once.
    poke: Sender<()>,
}

impl Flusher {
    fn run<M: Machine>(self, recv: Receiver<ToFlusher<M>>) {
        for msg in recv {
            match msg {
                ToFlusher::Batch(item) => self.flush(item),
                ToFlusher::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    fn flush<M: Machine>(&self, item: Flushing<M>) {
        let Flushing { answers, records, store_writes, commands, next_seq, after } = item;
        let started = Instant::now();
        if let Err(e) = self.store.flush(self.durability) {
            {
                let mut stats = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
                stats.failed_batches += 1;
                stats.last_batch_failed = true;
            }
            self.shared.set_refusal(Some(e.clone()));
            let _ = self.poke.try_send(());
            if let Some(after) = after {
                after(false);
            }
            answer_failed::<M>(answers, LogError::Store(e));
            return;
        }
        let flush_us = started.elapsed().as_micros() as u64;
        {
            let mut stats = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
            stats.batches += 1;
            stats.commands += commands;
            stats.records += records;
            stats.store_writes += store_writes;
            stats.flush_us_total += flush_us;
            stats.flush_us_max = stats.flush_us_max.max(flush_us);
            stats.flush_us_buckets[FLUSH_BUCKETS_US.partition_point(|&bound| bound < flush_us)] += 1;
            stats.last_batch_commands = commands;
            stats.last_batch_failed = false;
        }
        if let Some(after) = after {
            after(true);
        }
        self.shared.committed_through(next_seq - 1);
        for (cb, res) in answers {
            cb(Ok(res));
        }
    }
}

/// Answers a batch that failed: a rejected command still learns why it was rejected.
fn answer_failed<M: Machine>(answers: Vec<Answer<M>>, e: LogError) {
    for (cb, res) in answers {
        match res {
            Err(rejection) => cb(Ok(Err(rejection))),
            Ok(_) => cb(Err(e.clone())),
        }
    }
}

impl<M: Machine> Writer<M> {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        machine: M,
        config: LogConfig,
        shared: Arc<Shared>,
        head: Head,
        write_ahead: Option<Arc<dyn WriteAhead>>,
    ) -> Writer<M> {
        Writer {
            store,
            machine,
            config,
            shared,
            next_seq: head.next_seq,
            last_hash: head.last_hash,
            resumes: 0,
            failed: None,
            write_ahead,
        }
    }

    pub(crate) fn run(mut self, urgent: Receiver<Queued<M>>, recv: Receiver<Msg<M>>) {
        // One batch may wait while another flushes: bounded, like every queue.
        let (to_flusher, flushes) = crossbeam_channel::bounded::<ToFlusher<M>>(1);
        let (poke, poked) = crossbeam_channel::bounded(1);
        let flusher = Flusher {
            store: self.store.clone(),
            durability: self.config.durability,
            shared: self.shared.clone(),
            poke: poke.clone(),
        };
        // The writer holds a sender too, so `poked` never disconnects (a flusher that panicked
        // would otherwise make every select return at once).
        let _poke = poke;
        let flushing =
            std::thread::Builder::new().name("herald-log-flush".into()).spawn(move || flusher.run(flushes));
        let flushing = match flushing {
            Ok(handle) => handle,
            Err(e) => {
                // No flusher: refuse every command rather than acknowledge undurable ones.
                let error = StoreError::Io(format!("spawning the flusher: {e}"));
                return refuse_all::<M>(&urgent, &recv, &error);
            }
        };
        self.batches(&urgent, &recv, &to_flusher, &poked);
        drop(to_flusher);
        let _ = flushing.join();
    }

    /// Forms batches: the urgent queue first, then the ordinary one, up to `batch_commands_max`.
    /// A stop ends the loop once the commands queued ahead of it in the ordinary queue, and
    /// whatever the urgent queue holds by then, are committed (or refused, while the store
    /// refuses writes).
    fn batches(
        &mut self,
        urgent: &Receiver<Queued<M>>,
        recv: &Receiver<Msg<M>>,
        to_flusher: &Sender<ToFlusher<M>>,
        poked: &Receiver<()>,
    ) {
        let batch_max = self.config.batch_commands_max.max(1);
        let mut batch: Vec<Queued<M>> = Vec::with_capacity(batch_max);
        let mut stop = false;
        while !stop {
            if self.shared.refusal().is_some() {
                stop = self.refuse_until_resumed(urgent, recv, to_flusher);
                continue;
            }
            // Commands a batch cut short left (see `commit`) go first, without waiting.
            if batch.is_empty() {
                crossbeam_channel::select_biased! {
                    recv(urgent) -> q => match q {
                        Ok(q) => batch.push(q),
                        // Both senders go together: the ordinary queue is closed as well.
                        Err(_) => stop = true,
                    },
                    recv(recv) -> msg => match msg {
                        Ok(Msg::Command(c, cb)) => batch.push((c, cb)),
                        Ok(Msg::Stop) | Err(_) => stop = true,
                    },
                    // A flush failed: the loop's head starts resuming.
                    recv(poked) -> _ => {},
                }
            }
            while !stop && batch.len() < batch_max {
                if let Ok(q) = urgent.try_recv() {
                    batch.push(q);
                    continue;
                }
                match recv.try_recv() {
                    Ok(Msg::Command(c, cb)) => batch.push((c, cb)),
                    Ok(Msg::Stop) => stop = true,
                    Err(_) => break,
                }
            }
            self.commit(&mut batch, to_flusher);
        }
        self.answer_failed_batch();
        // What the urgent queue holds at the stop is committed too, in batches of the usual size.
        loop {
            batch.extend(urgent.try_iter().take(batch_max));
            if batch.is_empty() {
                break;
            }
            self.commit(&mut batch, to_flusher);
            // Stopping: no reopen follows, so a failed batch is answered at once.
            self.answer_failed_batch();
        }
    }

    /// Runs the commands of `batch` and commits them as one batch. With a write-ahead, the
    /// batch ends once its records reach its `batch_bytes_max`: the commands after stay in
    /// `batch`, not run, for the next one.
    fn commit(&mut self, batch: &mut Vec<(M::Command, Callback<M>)>, to_flusher: &Sender<ToFlusher<M>>) {
        if let Some(refusal) = self.shared.refusal() {
            for (_, cb) in batch.drain(..) {
                cb(Err(LogError::Store(refusal.clone())));
            }
            return;
        }
        if let Some(fenced) = self.write_ahead.as_ref().and_then(|_| self.shared.fenced()) {
            for (_, cb) in batch.drain(..) {
                cb(Err(LogError::WriteAhead(fenced.clone())));
            }
            return;
        }
        let store = self.store.clone();
        let mut tx = Tx::new(store.as_ref(), self.next_seq, self.last_hash);
        tx.command_bytes_max = self.write_ahead.as_ref().map(|w| w.command_bytes_max());
        let answers = self.run_commands(batch, &mut tx);
        let commands = answers.len() as u64;
        // A read that failed reads as absent: the batch fails with that error, and `finish`
        // (which would take a missing value for a damaged one) does not run.
        if let Some(e) = tx.error() {
            return self.fail(answers, e);
        }
        if let Err(e) = self.machine.finish(&mut tx) {
            return self.fail(answers, e);
        }
        if let Some(e) = tx.error() {
            return self.fail(answers, e);
        }
        if tx.is_empty() {
            for (cb, res) in answers {
                cb(Ok(res));
            }
            return;
        }
        let position = match self.write_ahead(&tx) {
            Ok(position) => position,
            Err(e) => return self.refuse_written_ahead(answers, e),
        };
        let (next_seq, last_hash) = tx.chain_state();
        let (mut writes, records) = tx.into_parts();
        if let Some(position) = position {
            writes.put(keyspace::META_WRITE_AHEAD.to_vec(), position.to_be_bytes().to_vec());
        }
        if let Err(e) = self.store.apply(&writes) {
            return self.fail(answers, e);
        }
        // Applied: the records are in the store from here on, durable or not, so the chain moves
        // on. If the flush fails, their callers are told so (not acknowledged), and the reopen
        // that follows keeps the batch wholly or drops it wholly.
        self.next_seq = next_seq;
        self.last_hash = last_hash;
        let after = self.machine.applied(&records);
        let store_writes = writes.len() as u64;
        let item =
            Flushing { answers, records: records.len() as u64, store_writes, commands, next_seq, after };
        if let Err(unsent) = to_flusher.send(ToFlusher::Batch(item)) {
            // The flusher is gone (it cannot be while the writer runs): answer, never acknowledge.
            if let ToFlusher::Batch(item) = unsent.into_inner() {
                answer_failed::<M>(
                    item.answers,
                    LogError::Store(StoreError::Io("the flusher stopped".into())),
                );
            }
        }
    }

    /// Runs the commands of `batch` into `tx`, each in its savepoint, and returns their
    /// answers. With a write-ahead, once the records reach its `batch_bytes_max` the rest are
    /// left in `batch`, not run.
    fn run_commands(&mut self, batch: &mut Vec<Queued<M>>, tx: &mut Tx<'_>) -> Vec<Answer<M>> {
        let mut answers: Vec<Answer<M>> = Vec::with_capacity(batch.len());
        let bytes_max = self.write_ahead.as_ref().map(|w| w.batch_bytes_max());
        let mut bytes = 0;
        for (command, cb) in std::mem::take(batch) {
            if bytes_max.is_some_and(|max| bytes >= max) {
                batch.push((command, cb));
                continue;
            }
            let records_before = tx.records().len();
            tx.savepoint();
            let res = self.machine.execute(command, tx);
            if res.is_ok() {
                tx.release();
            } else {
                tx.rollback();
            }
            answers.push((cb, res));
            if bytes_max.is_some() {
                bytes += tx.records().iter().skip(records_before).map(encoded_len).sum::<usize>();
            }
        }
        answers
    }

    /// Hands the batch's records to the write-ahead, if there is one and the batch has records
    /// (a batch of projection writes alone, such as a compaction's, is this store's own):
    /// the position to store with the batch.
    fn write_ahead(&self, tx: &Tx<'_>) -> Result<Option<u64>, WriteAheadError> {
        match &self.write_ahead {
            Some(write_ahead) if !tx.records().is_empty() => write_ahead.append(tx.records()).map(Some),
            _ => Ok(None),
        }
    }

    /// A batch the write-ahead did not store: nothing of it is applied, its callers are told
    /// why (a rejected command still learns its rejection); a fenced writer refuses from now on.
    fn refuse_written_ahead(&mut self, answers: Vec<Answer<M>>, e: WriteAheadError) {
        self.batch_failed();
        if matches!(e, WriteAheadError::Fenced(_)) {
            *self.shared.fenced.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
        }
        answer_failed::<M>(answers, LogError::WriteAhead(e));
    }

    /// A batch that was not applied: the machine forgets it, the stats count it.
    fn batch_failed(&mut self) {
        self.machine.aborted();
        let mut stats = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.failed_batches += 1;
        stats.last_batch_failed = true;
    }

    fn fail(&mut self, answers: Vec<Answer<M>>, e: StoreError) {
        self.batch_failed();
        // A damaged value stays damaged after a reopen, so its batch is answered at once; any
        // other error may have left part of the batch in the store's memory, or the store
        // refusing everything from now on: its callers are answered after the reopen.
        if matches!(e, StoreError::Corrupt(_)) {
            return answer_failed::<M>(answers, LogError::Store(e));
        }
        self.shared.set_refusal(Some(e.clone()));
        self.failed = Some((answers, e));
    }

    /// Answers the callers of the last failed batch, if they are still waiting.
    fn answer_failed_batch(&mut self) {
        if let Some((answers, e)) = self.failed.take() {
            answer_failed::<M>(answers, LogError::Store(e));
        }
    }

    /// While the store refuses writes: tries to resume, at once and then at growing intervals,
    /// and answers every command that arrives meanwhile with the refusal, without running it.
    /// Returns true if a stop came.
    fn refuse_until_resumed(
        &mut self,
        urgent: &Receiver<Queued<M>>,
        recv: &Receiver<Msg<M>>,
        to_flusher: &Sender<ToFlusher<M>>,
    ) -> bool {
        let mut wait = RESUME_WAIT_FIRST;
        loop {
            let resumed = self.resume(to_flusher);
            self.answer_failed_batch();
            let refusal = match resumed {
                Ok(()) => return false,
                Err(e) => e,
            };
            self.shared.set_refusal(Some(refusal.clone()));
            let until = Instant::now() + wait;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                crossbeam_channel::select_biased! {
                    recv(urgent) -> q => match q {
                        Ok((_, cb)) => cb(Err(LogError::Store(refusal.clone()))),
                        Err(_) => return true,
                    },
                    recv(recv) -> msg => match msg {
                        Ok(Msg::Command(_, cb)) => cb(Err(LogError::Store(refusal.clone()))),
                        Ok(Msg::Stop) | Err(_) => return true,
                    },
                    default(left) => break,
                }
            }
            wait = (wait * 2).min(RESUME_WAIT_MAX);
        }
    }

    /// Reopens the store, proves it takes a write and a flush, and continues the chain from
    /// the log's last record in it. Nothing the writer applied before is flushed after the
    /// reopen: the flusher has answered every batch first.
    fn resume(&mut self, to_flusher: &Sender<ToFlusher<M>>) -> Result<(), StoreError> {
        let (done_tx, done) = crossbeam_channel::bounded(1);
        if to_flusher.send(ToFlusher::Barrier(done_tx)).is_ok() {
            let _ = done.recv();
        }
        self.store.reopen()?;
        let mut probe = WriteBatch::default();
        probe.put(keyspace::META_PROBE.to_vec(), (self.resumes + 1).to_be_bytes().to_vec());
        self.store.apply(&probe)?;
        self.store.flush(self.config.durability)?;
        let head = read_head(self.store.as_ref()).map_err(|e| match e {
            LogError::Store(e) => e,
            other => StoreError::Corrupt(other.to_string()),
        })?;
        self.resumes += 1;
        self.next_seq = head.next_seq;
        self.last_hash = head.last_hash;
        // Anything the machine remembers may come from a batch the reopen dropped.
        self.machine.aborted();
        // What the reopened store holds is flushed: durable, even the records of batches whose
        // callers were told their flush failed.
        self.shared.committed_through(head.next_seq - 1);
        self.shared.stats.lock().unwrap_or_else(|e| e.into_inner()).last_batch_failed = false;
        self.shared.set_refusal(None);
        Ok(())
    }
}

/// Refuses every command with `error` until both queues close.
fn refuse_all<M: Machine>(urgent: &Receiver<Queued<M>>, recv: &Receiver<Msg<M>>, error: &StoreError) {
    loop {
        crossbeam_channel::select! {
            recv(urgent) -> q => match q {
                Ok((_, cb)) => cb(Err(LogError::Store(error.clone()))),
                Err(_) => return,
            },
            recv(recv) -> msg => match msg {
                Ok(Msg::Command(_, cb)) => cb(Err(LogError::Store(error.clone()))),
                Ok(Msg::Stop) => {}
                Err(_) => return,
            },
        }
    }
}
