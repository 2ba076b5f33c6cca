//! Crash test: a child process appends through group commit and prints every acknowledgement;
//! the parent kills it with SIGKILL at a random moment, reopens the log, and checks that every
//! acknowledged record is there with its exact body and that the log is a clean, chained prefix.
//! Some records are near the largest event size, to prove they survive too (and never go to
//! sled's blob files, which sled does not fsync).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use herald_log::{read_records, verify, AppendOnly, Durability, Log, LogConfig, SledStore, Store};

const CHILD_ENV: &str = "HERALD_LOG_CRASH_CHILD_DIR";
const ROUND_ENV: &str = "HERALD_LOG_CRASH_ROUND";
const APPENDERS: u64 = 4;
/// The largest event herald accepts is 256 KiB of payload; its record carries a little more.
const LARGE_BODY_BYTES: usize = 256 * 1024 + 900;
const CHILD_LIFETIME_MAX: Duration = Duration::from_secs(30);

fn expected_body(round: u64, thread: u64, i: u64) -> Vec<u8> {
    let len = if i % 8 == 3 { LARGE_BODY_BYTES } else { 64 + (i as usize * 37) % 300 };
    let mut b = format!("r{round} t{thread} i{i} ").into_bytes();
    let mut x = round.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (thread << 32) ^ i;
    while b.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.push(x as u8);
    }
    b
}

fn open(dir: &Path) -> Arc<dyn Store> {
    Arc::new(SledStore::open(dir, 16 << 20).expect("open sled"))
}

/// The child: does nothing unless the parent started it with the directory in the environment.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let round: u64 = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
    let config = LogConfig { batch_commands_max: 64, queue_commands_max: 256, durability: Durability::Sync };
    let log = Log::open(open(Path::new(&dir)), AppendOnly, config).unwrap();
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let started = Instant::now();
    let threads: Vec<_> = (0..APPENDERS)
        .map(|t| {
            let log = log.clone();
            let out = out.clone();
            std::thread::spawn(move || {
                for i in 0.. {
                    if started.elapsed() > CHILD_LIFETIME_MAX {
                        return;
                    }
                    let seq = log.submit(vec![(i, expected_body(round, t, i))]).unwrap().unwrap()[0];
                    let mut out = out.lock().unwrap();
                    writeln!(out, "ack {seq} {t} {i}").unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn acknowledged_records_survive_sigkill_as_a_clean_prefix() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let seed = std::env::var("HERALD_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    println!("crash test seed {seed} (set HERALD_CRASH_SEED to replay the kill times)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let rounds = 12u64;
    let mut total_acked = 0usize;
    let mut large_acked = 0usize;
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter(|l| l.starts_with("ack "))
                .collect::<Vec<_>>()
        });
        // Let it open the store and get going, then kill it mid-flight.
        std::thread::sleep(Duration::from_millis(150 + rng.below(400)));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        let acks = reader.join().unwrap();
        let store = open(dir.path());
        let report = verify(store.as_ref(), &mut |_| {})
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): log not a clean prefix: {e}"));
        for line in &acks {
            let f: Vec<u64> = line.split(' ').skip(1).map(|x| x.parse().unwrap()).collect();
            let (seq, t, i) = (f[0], f[1], f[2]);
            assert!(seq <= report.last_seq, "round {round} (seed {seed}): acked seq {seq} lost");
            let rec = read_records(store.as_ref(), seq, 1).unwrap().remove(0);
            assert_eq!(rec.seq, seq);
            assert!(
                rec.body == expected_body(round, t, i),
                "round {round} (seed {seed}): seq {seq} has another body"
            );
            if rec.body.len() == LARGE_BODY_BYTES {
                large_acked += 1;
            }
        }
        total_acked += acks.len();
        drop(store);
    }
    println!("{rounds} kills, {total_acked} acknowledged appends checked, {large_acked} of them large");
    assert!(total_acked as u64 > rounds, "the child acknowledged too little to test anything");
    assert!(large_acked > 0, "no large record was acknowledged");
    let blobs = dir.path().join("blobs");
    let blob_files = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
    assert_eq!(blob_files, 0, "sled wrote blob files, which it never fsyncs");
}
