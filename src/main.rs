//! The `herald` command: `serve` runs the server; `verify`, `export`, `import`, `compact`,
//! `replay` and `keys` run the tools of [`herald::offline`] on a stopped server's data; `config
//! check` lists every problem of a configuration. This file only
//! parses the arguments, prints what comes back and maps it to an exit code (2: the command line
//! or the data directory cannot be used as given; 1: a failure on the way); the work is in the
//! libraries.

use std::fmt::Display;
use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use herald::offline::{
    self, CompactOptions, ExportOptions, ImportOptions, KeyCreateOptions, KeyRevokeOptions, KeysOptions,
    NatsExportOptions, NatsImportOptions, OfflineError, PartitionId, Progress, ReplayFormat, ReplayOptions,
    ReplayRead, SplitOptions, Subject, VacuumOptions, VerifyOptions,
};
use herald::projector::{DeliveryId, EndpointId, EventId};
use herald_server::config::{herald_env, Config, LogFormat, LogSection, Overrides};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing_subscriber::EnvFilter;

/// sled allocates and frees a copy of a tree node for every key it writes; mimalloc makes each
/// of those writes about twice as cheap as glibc's malloc does (see docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Has mimalloc give memory back to the system as soon as it is freed, not after its usual
/// delay of 10 ms, which it only acts on at later allocations: `verify` keeps its resident memory
/// under `--memory-max` by dropping sled's caches, and that only counts once the pages are back.
fn return_freed_memory_at_once() {
    // SAFETY: mi_option_set only writes the option's value; purge_delay takes any number of ms.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

/// `mi_option_purge_delay` of mimalloc.h, which libmimalloc-sys does not name: the option just
/// before `mi_option_use_numa_nodes` (16), in mimalloc v2 and v3 alike.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = libmimalloc_sys::mi_option_use_numa_nodes - 1;

#[derive(Parser)]
#[command(name = "herald", version, about = "A webhook delivery engine in one binary.")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the HTTP API and the delivery engine (embedded defaults: data in ./herald-data,
    /// listening on 127.0.0.1:8080).
    Serve {
        /// A TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The data directory (overrides the file and HERALD_STORE_DATA_DIR).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The listen address (overrides the file and HERALD_SERVER_LISTEN).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Print the default configuration file and exit.
        #[arg(long)]
        print_default_config: bool,
    },
    /// Check a stopped server's data: every record's checksum and the hash chain, and the stored
    /// projection against a rebuild from the log (into a scratch store inside the data
    /// directory, deleted afterwards). Exit 0 only if all agree.
    Verify {
        #[command(flatten)]
        dir: PartDir,
        /// The memory to keep under: bytes, or a size such as 512MiB or 1GiB (at least 32MiB).
        #[arg(long, value_parser = offline::parse_memory, default_value = "512MiB")]
        memory_max: u64,
    },
    /// Write the log as NDJSON to stdout (one record a line, with its raw body for `import`).
    Export {
        #[command(flatten)]
        dir: PartDir,
        /// Leave out what holds signing secrets (each record's raw body, the checkpoint's values):
        /// for sharing with an auditor or support. Such an export cannot be imported.
        #[arg(long)]
        redact_secrets: bool,
        /// Read the partition (`--partition`) straight from its JetStream stream on these NATS
        /// servers (comma-separated nats://host:port), checking seqs and the hash chain.
        #[arg(long, requires = "partition", conflicts_with_all = ["data_dir", "config", "partitions"])]
        from_nats: Option<String>,
        /// Split a single node's log into a cluster's partitions: one export file per partition
        /// (`p<N>.ndjson`, `control.ndjson`) in `--out`, each loadable with `import --to-nats`.
        #[arg(long, requires = "out", conflicts_with_all = ["partition", "redact_secrets"])]
        partitions: Option<u32>,
        /// The directory the files of `--partitions` go in.
        #[arg(long, requires = "partitions")]
        out: Option<PathBuf>,
    },
    /// Build an empty data directory from an `export` read on stdin, then verify it; with
    /// `--to-nats`, load it into a partition's empty stream and a cluster node's replica of it.
    Import {
        #[command(flatten)]
        dir: DataDir,
        /// Write the log ahead to the partition's stream on these NATS servers (comma-separated
        /// nats://host:port); its replica goes in `<data dir>/cluster/p<N>` (or `cluster/control`).
        #[arg(long, requires_all = ["partition", "partitions"])]
        to_nats: Option<String>,
        /// The partition (its number, or `control`) the export is of (`export --partitions`).
        #[arg(long, requires = "to_nats", value_parser = PartitionId::parse)]
        partition: Option<PartitionId>,
        /// The cluster's partitions (its `partitions`; what `export --partitions` split by).
        #[arg(long, requires = "to_nats", value_parser = clap::value_parser!(u32).range(1..=1024))]
        partitions: Option<u32>,
        /// Copies NATS keeps of the stream if this creates it (the cluster's `replicas`, 1 to 5).
        #[arg(long, requires = "to_nats", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=5))]
        replicas: u16,
    },
    /// Drop the history of deliveries delivered longer ago than the retention (on a stopped
    /// server's data; a running server with `[store] retain` compacts by itself). Pending,
    /// exhausted and inactive deliveries are kept; the kept log still verifies.
    Compact {
        #[command(flatten)]
        dir: DataDir,
        /// How long to keep, such as "30d" (default: the configuration's `[store] retain`).
        #[arg(long)]
        retain: Option<String>,
        /// Then rewrite the store into a fresh one holding only what is kept, so the disk space of
        /// what was dropped comes back (sled gives little of it back by itself). Needs free space
        /// for the kept data; alone (no retention given or configured) it only rewrites.
        #[arg(long)]
        vacuum: bool,
    },
    /// The whole story of a delivery, an event or an endpoint, in log order.
    Replay {
        #[command(flatten)]
        dir: PartDir,
        /// A delivery id.
        #[arg(long, group = "subject")]
        delivery: Option<String>,
        /// An event id (the story of each of its deliveries).
        #[arg(long, group = "subject")]
        event: Option<String>,
        /// An endpoint id (its changes and the story of each of its deliveries).
        #[arg(long, group = "subject")]
        endpoint: Option<String>,
        /// A recovery id (its records and what followed for each of its deliveries).
        #[arg(long, group = "subject")]
        recovery: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Read the whole log rather than the records the index names (the cross-check; also
        /// what a store without the index, before rules 4, is read by).
        #[arg(long)]
        scan: bool,
    },
    /// The API keys of a stopped server's data: create one (the way back from a lost admin key),
    /// list them, revoke one. Each change is a record in the log, like one the API writes; the
    /// record carries no actor yet (the log does not keep who acted).
    #[command(subcommand)]
    Keys(KeysCmd),
    /// The configuration `herald serve` would run with.
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a key and print it once on stdout (herald keeps only its hash): an admin key
    /// (`--admin`), or a key of an organisation (`--org ID --scopes a,b`). The record carries no
    /// actor yet.
    #[command(group(ArgGroup::new("owner").required(true).args(["admin", "org"])))]
    Create {
        #[command(flatten)]
        dir: DataDir,
        /// An admin key, for every organisation.
        #[arg(long, conflicts_with = "scopes")]
        admin: bool,
        /// The organisation's id (a UUID).
        #[arg(long, requires = "scopes")]
        org: Option<String>,
        /// The key's scopes, separated by commas: events.write, endpoints.read, endpoints.write,
        /// deliveries.read, deliveries.write, tasks.webhooks.read, admin.
        #[arg(long, requires = "org")]
        scopes: Option<String>,
        /// The key's name.
        #[arg(long)]
        name: Option<String>,
    },
    /// List every key: id, organisation (or admin), scopes, name, created, revoked. Never a
    /// secret or its hash.
    List(DataDir),
    /// Revoke a key, by the id `keys list` shows. The record carries no actor yet.
    Revoke {
        #[command(flatten)]
        dir: DataDir,
        /// The key's id.
        id: String,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Load the configuration (the file, then the HERALD_* environment) as `herald serve` would
    /// and print every problem, one a line (exit 1), or "ok" (exit 0).
    Check {
        /// A TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// A readable timeline.
    Text,
    /// One JSON object a line, for tools.
    Ndjson,
}

/// Where the data is: `--data-dir`, or the configuration's `[store] data_dir`.
#[derive(clap::Args)]
struct DataDir {
    /// A TOML configuration file (its `[store] data_dir` is used).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Where the data is and, on a cluster node's data directory, which partition's store.
#[derive(clap::Args)]
struct PartDir {
    #[command(flatten)]
    dir: DataDir,
    /// On a cluster node's data directory: the partition whose store to work on, its number or
    /// `control` (`<data dir>/cluster/p<N>`, `<data dir>/cluster/control`).
    #[arg(long, value_parser = PartitionId::parse)]
    partition: Option<PartitionId>,
}

impl DataDir {
    fn load(&self) -> Result<Config, String> {
        let overrides = Overrides { data_dir: self.data_dir.clone(), listen: None };
        Config::load(self.config.as_deref(), herald_env(), &overrides).map_err(|e| e.to_string())
    }

    fn resolve(&self) -> Result<PathBuf, String> {
        self.load().map(|c| c.store.data_dir)
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Serve { config, data_dir, listen, print_default_config } => {
            if print_default_config {
                print!("{}", herald_server::config::DEFAULT_TOML);
                return ExitCode::SUCCESS;
            }
            match Config::load(config.as_deref(), herald_env(), &Overrides { data_dir, listen }) {
                Ok(config) => serve(config),
                Err(e) => usage(e),
            }
        }
        Cmd::Verify { dir, memory_max } => offline_in(&dir.dir, dir.partition, |data_dir, bar| {
            return_freed_memory_at_once();
            let started = std::time::Instant::now();
            let report = offline::verify(&VerifyOptions { data_dir, memory_max_bytes: memory_max }, bar)?;
            println!("{report}");
            let secs = started.elapsed().as_secs_f64();
            let rate = report.chain.records as f64 / secs.max(1e-3);
            let reopens = match report.reopens {
                (0, _) => String::new(),
                (n, took) => format!(
                    "; {n} reopens of the store to hold the memory bound took {:.1} s",
                    took.as_secs_f64()
                ),
            };
            Ok(Some(format!(
                "verified {} records in {secs:.1} s ({rate:.0} records/s; {}{reopens})",
                report.chain.records,
                bar.phase_times()
            )))
        }),
        Cmd::Export { dir, redact_secrets, from_nats, partitions, out } => {
            export(dir, redact_secrets, from_nats, partitions.zip(out))
        }
        Cmd::Import { dir, to_nats, partition, partitions, replicas } => {
            import(&dir, to_nats.zip(partition).zip(partitions), usize::from(replicas))
        }
        Cmd::Compact { dir, retain, vacuum } => compact(&dir, retain, vacuum),
        Cmd::Replay { dir, delivery, event, endpoint, recovery, format, scan } => {
            let subject = match recovery {
                Some(r) => herald_server::parse_id(&r)
                    .map(|id| Subject::Recovery(herald::projector::RecoveryId(id)))
                    .ok_or_else(|| format!("{r:?} is not an id")),
                None => parse_subject(delivery, event, endpoint),
            };
            let subject = match subject {
                Ok(s) => s,
                Err(e) => return usage(e),
            };
            let format = match format {
                Format::Text => ReplayFormat::Text,
                Format::Ndjson => ReplayFormat::Ndjson,
            };
            offline_in(&dir.dir, dir.partition, |data_dir, bar| {
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                let read = if scan { ReplayRead::Scan } else { ReplayRead::Index };
                let options = ReplayOptions { data_dir, subject, format, read };
                offline::replay(&options, &mut out, bar)
                    .map(|r| r.scanned.map(|why| format!("read by a scan: {why}")))
            })
        }
        Cmd::Keys(command) => keys(command),
        Cmd::Config(ConfigCmd::Check { config }) => config_check(config),
    }
}

/// `herald export`: of a data directory (or one partition's store in it), of a partition's
/// stream (`--from-nats`), or split into partitions (`--partitions N --out DIR`).
fn export(
    dir: PartDir,
    redact_secrets: bool,
    from_nats: Option<String>,
    split: Option<(u32, PathBuf)>,
) -> ExitCode {
    let stdout = std::io::stdout();
    if let (Some(nats_url), Some(partition)) = (from_nats, dir.partition) {
        let options = NatsExportOptions { nats_url, partition, redact_secrets };
        let mut bar = Bar::default();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let outcome = offline::export_from_nats(&options, &mut out, &mut bar);
        drop(bar);
        return report(outcome.map(|r| Some(r.to_string())));
    }
    offline_in(&dir.dir, dir.partition, |data_dir, bar| match split {
        Some((partitions, out_dir)) => {
            let report = offline::split(&SplitOptions { data_dir, partitions, out_dir }, bar)?;
            for (partition, path, records) in &report.files {
                println!("{}\t{}\t{records} records", partition.arg(), path.display());
            }
            Ok(Some(report.to_string()))
        }
        None => {
            let mut out = std::io::BufWriter::new(stdout.lock());
            let options = ExportOptions { data_dir, redact_secrets };
            offline::export(&options, &mut out, bar).map(|r| Some(r.to_string()))
        }
    })
}

/// `herald import`: into an empty data directory, or (`--to-nats`) into a partition's empty
/// stream and a cluster node's replica of it.
fn import(dir: &DataDir, to_nats: Option<((String, PartitionId), u32)>, replicas: usize) -> ExitCode {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let Some(((nats_url, partition), partitions)) = to_nats else {
        return offline(dir, |data_dir, bar| {
            offline::import(&ImportOptions { data_dir }, &mut input, bar).map(|r| Some(r.to_string()))
        });
    };
    let data_dir = match dir.resolve() {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    let options = NatsImportOptions { nats_url, partition, partitions, replicas, data_dir };
    let mut bar = Bar::default();
    let outcome = offline::import_to_nats(&options, &mut input, &mut bar);
    drop(bar);
    report(outcome.map(|r| Some(r.to_string())))
}

/// `herald keys`: the new key alone on stdout (never in a message line), what was done on stderr.
fn keys(command: KeysCmd) -> ExitCode {
    match command {
        KeysCmd::Create { dir, admin, org, scopes, name } => offline(&dir, |data_dir, _| {
            let mut options = match (admin, org, scopes) {
                (true, _, _) => KeyCreateOptions::admin(data_dir),
                (false, Some(org), Some(scopes)) => KeyCreateOptions::org(
                    data_dir,
                    offline::parse_org_id(&org)?,
                    offline::parse_scopes(&scopes)?,
                ),
                // clap asks for --admin, or --org with --scopes.
                _ => return Err(offline::KeyProblem::NoScopes.into()),
            };
            if let Some(name) = name {
                options.name = name;
            }
            let created = offline::create_key(&options)?;
            println!("{}", created.key);
            Ok(Some(created.to_string()))
        }),
        KeysCmd::List(dir) => offline(&dir, |data_dir, _| {
            print!("{}", offline::list_keys(&KeysOptions { data_dir })?);
            Ok(None)
        }),
        KeysCmd::Revoke { dir, id } => offline(&dir, |data_dir, _| {
            let id = offline::parse_key_id(&id)?;
            offline::revoke_key(&KeyRevokeOptions { data_dir, id }).map(|r| Some(r.to_string()))
        }),
    }
}

/// `herald config check`: every problem of the file and the environment, one a line on stdout.
fn config_check(file: Option<PathBuf>) -> ExitCode {
    let problems = Config::check_all(file.as_deref(), herald_env(), &Overrides::default());
    if problems.is_empty() {
        println!("ok");
        return ExitCode::SUCCESS;
    }
    for problem in &problems {
        println!("{problem}");
    }
    let n = problems.len();
    eprintln!("herald: {n} problem{} in the configuration", if n == 1 { "" } else { "s" });
    ExitCode::FAILURE
}

/// A command line or data directory that cannot be used as given: its message, and exit 2.
fn usage(message: impl Display) -> ExitCode {
    eprintln!("herald: {message}");
    ExitCode::from(2)
}

/// Runs an offline tool on the data directory `dir` names, with a progress bar; prints the
/// message it returns, if any, or its error.
fn offline(
    dir: &DataDir,
    run: impl FnOnce(PathBuf, &mut Bar) -> Result<Option<String>, OfflineError>,
) -> ExitCode {
    offline_in(dir, None, run)
}

/// [`offline`] on `partition`'s store when given (the data directory is a cluster node's).
fn offline_in(
    dir: &DataDir,
    partition: Option<PartitionId>,
    run: impl FnOnce(PathBuf, &mut Bar) -> Result<Option<String>, OfflineError>,
) -> ExitCode {
    let data_dir = match dir.resolve() {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    let mut bar = Bar::default();
    let outcome = offline::partition_dir(&data_dir, partition).and_then(|dir| run(dir, &mut bar));
    drop(bar);
    report(outcome)
}

/// Prints what an offline tool returned (its message on stderr, if any) or its error, and
/// gives its exit code.
fn report(outcome: Result<Option<String>, OfflineError>) -> ExitCode {
    match outcome {
        Ok(message) => {
            if let Some(m) = message {
                eprintln!("herald: {m}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("herald: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// 2 when the command line or the data directory cannot be used as given, 1 for a failure on
/// the way.
fn exit_code(e: &OfflineError) -> u8 {
    if e.is_usage() {
        2
    } else {
        1
    }
}

/// `herald compact`: drops by the retention, then vacuums if asked.
fn compact(dir: &DataDir, retain: Option<String>, vacuum: bool) -> ExitCode {
    let retain = match compact_retain(dir, retain, vacuum) {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    offline(dir, |data_dir, bar| {
        if let Some(retain) = retain {
            println!("{}", offline::compact(&CompactOptions::now(data_dir.clone(), retain), bar)?);
        }
        if vacuum {
            println!("{}", offline::vacuum(&VacuumOptions { data_dir }, bar)?);
        }
        Ok(None)
    })
}

/// The retention `compact` drops by: `--retain`, else the configuration's `[store] retain`;
/// `None` only with `--vacuum` (which then only rewrites).
fn compact_retain(dir: &DataDir, retain: Option<String>, vacuum: bool) -> Result<Option<Duration>, String> {
    let retain = match (retain, dir.load()) {
        (Some(text), _) => {
            Some(herald_server::config::parse_duration(&text).map_err(|e| format!("--retain: {e}"))?)
        }
        (None, Ok(config)) => config.store.retain,
        (None, Err(e)) => return Err(e),
    };
    match retain {
        None if !vacuum => {
            Err("give --retain, set [store] retain in the configuration, or give --vacuum".into())
        }
        Some(r) if r < Duration::from_secs(1) => Err("--retain must be at least 1s".into()),
        r => Ok(r),
    }
}

fn parse_subject(
    delivery: Option<String>,
    event: Option<String>,
    endpoint: Option<String>,
) -> Result<Subject, String> {
    let id = |text: &str| herald_server::parse_id(text).ok_or_else(|| format!("{text:?} is not an id"));
    match (delivery, event, endpoint) {
        (Some(d), None, None) => Ok(Subject::Delivery(DeliveryId(id(&d)?))),
        (None, Some(e), None) => Ok(Subject::Event(EventId(id(&e)?))),
        (None, None, Some(e)) => Ok(Subject::Endpoint(EndpointId(id(&e)?))),
        _ => Err("give exactly one of --delivery, --event, --endpoint, --recovery".into()),
    }
}

/// The offline tools' progress: a bar on stderr when stdout and stderr are terminals, nothing
/// otherwise.
#[derive(Default)]
struct Bar {
    shown: Option<ProgressBar>,
    /// The phases ended so far, with the time each took.
    phases: Vec<(String, Duration)>,
    /// The phase under way and when it began.
    current: Option<(String, std::time::Instant)>,
}

impl Bar {
    /// The phases' times, for a summary line: `comparing with the stored projection 1.0 s, ...`.
    fn phase_times(&self) -> String {
        let times: Vec<String> =
            self.phases.iter().map(|(what, took)| format!("{what} {:.1} s", took.as_secs_f64())).collect();
        times.join(", ")
    }
}

impl Progress for Bar {
    fn begin(&mut self, what: &str, len: u64) {
        self.end();
        self.current = Some((what.to_owned(), std::time::Instant::now()));
        let bar = ProgressBar::with_draw_target(
            Some(len),
            if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} records, {per_sec}, {eta} left")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(what.to_owned());
        self.shown = Some(bar);
    }

    fn advance(&mut self, position: u64) {
        if let Some(bar) = &self.shown {
            bar.set_position(position);
        }
    }

    fn end(&mut self) {
        if let Some(bar) = self.shown.take() {
            bar.finish_and_clear();
        }
        if let Some((what, began)) = self.current.take() {
            self.phases.push((what, began.elapsed()));
        }
    }
}

/// Installs the subscriber of `herald serve` (the libraries only emit events): lines on stderr,
/// as text or JSON (`[log] format`), at `[log] level` unless `RUST_LOG` is set, which then
/// overrides it (and takes per-module directives).
fn init_logs(log: &LogSection) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => {
            EnvFilter::try_new(&directives).map_err(|e| format!("RUST_LOG={directives:?}: {e}"))?
        }
        _ => EnvFilter::try_new(&log.level).map_err(|e| format!("[log] level {:?}: {e}", log.level))?,
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = match log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
    installed.map_err(|e| format!("installing the log subscriber: {e}"))
}

fn serve(config: Config) -> ExitCode {
    if let Err(e) = init_logs(&config.log) {
        return usage(e);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let admin_key = std::env::var("HERALD_ADMIN_KEY").ok().filter(|k| !k.is_empty());
    // In the runtime's context: the signal handlers are registered with its driver.
    let stop = {
        let _entered = runtime.enter();
        stop_signal()
    };
    let result = runtime.block_on(herald_server::serve(config, admin_key, stop));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM or SIGINT (Ctrl-C). The handlers are installed now, not when the future is first
/// polled: axum polls its shutdown signal on a task of its own, which may run only after the
/// listener already answers, and a SIGTERM before that would kill herald outright.
fn stop_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
