//! The `herald` command: `serve` runs the server. Parsing and error reporting live here; the
//! work is in the libraries.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use herald_server::config::{herald_env, Config, Overrides};

mod offline;

/// sled allocates and frees a copy of a tree node for every key it writes; mimalloc makes each
/// of those writes about twice as cheap as glibc's malloc does (see docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// projection against a rebuild from the log. Exit 0 only if all agree.
    Verify(DataDir),
    /// Write the log as NDJSON to stdout (one record a line, with its raw body for `import`).
    Export(DataDir),
    /// Build an empty data directory from an `export` read on stdin, then verify it.
    Import(DataDir),
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
        dir: DataDir,
        /// A delivery id.
        #[arg(long, group = "subject")]
        delivery: Option<String>,
        /// An event id (the story of each of its deliveries).
        #[arg(long, group = "subject")]
        event: Option<String>,
        /// An endpoint id (its changes and the story of each of its deliveries).
        #[arg(long, group = "subject")]
        endpoint: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
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

impl DataDir {
    fn load(&self) -> Result<Config, String> {
        let overrides = Overrides { data_dir: self.data_dir.clone(), listen: None };
        Config::load(self.config.as_deref(), herald_env(), &overrides).map_err(|e| e.to_string())
    }

    fn resolve(&self) -> Result<PathBuf, String> {
        self.load().map(|c| c.store.data_dir)
    }
}

fn offline(
    dir: &DataDir,
    run: impl FnOnce(&std::path::Path) -> Result<Option<String>, offline::Failure>,
) -> ExitCode {
    let path = match dir.resolve() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("herald: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&path) {
        Ok(message) => {
            if let Some(m) = message {
                eprintln!("herald: {m}");
            }
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("herald: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn parse_subject(
    delivery: Option<String>,
    event: Option<String>,
    endpoint: Option<String>,
) -> Result<offline::Subject, String> {
    let id = |text: &str| herald_server::util::parse_id(text).ok_or_else(|| format!("{text:?} is not an id"));
    match (delivery, event, endpoint) {
        (Some(d), None, None) => Ok(offline::Subject::Delivery(herald::projector::DeliveryId(id(&d)?))),
        (None, Some(e), None) => Ok(offline::Subject::Event(herald::projector::EventId(id(&e)?))),
        (None, None, Some(e)) => Ok(offline::Subject::Endpoint(herald::projector::EndpointId(id(&e)?))),
        _ => Err("give exactly one of --delivery, --event, --endpoint".into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Serve { config, data_dir, listen, print_default_config } => {
            if print_default_config {
                print!("{}", herald_server::config::DEFAULT_TOML);
                return ExitCode::SUCCESS;
            }
            let config = match Config::load(config.as_deref(), herald_env(), &Overrides { data_dir, listen })
            {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("herald: {e}");
                    return ExitCode::from(2);
                }
            };
            serve(config)
        }
        Cmd::Verify(dir) => offline(&dir, |p| {
            let report = offline::verify_dir(p)?;
            println!("{report}");
            Ok(None)
        }),
        Cmd::Export(dir) => offline(&dir, |p| {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            offline::export_dir(p, &mut out).map(Some)
        }),
        Cmd::Import(dir) => offline(&dir, |p| {
            let stdin = std::io::stdin();
            let mut input = stdin.lock();
            offline::import_dir(p, &mut input).map(Some)
        }),
        Cmd::Compact { dir, retain, vacuum } => {
            let retain = match (retain, dir.load()) {
                (Some(text), _) => herald_server::config::parse_duration(&text)
                    .map(Some)
                    .map_err(|e| format!("--retain: {e}")),
                (None, Ok(config)) => Ok(config.store.retain),
                (None, Err(e)) => Err(e),
            };
            let retain = match retain {
                Ok(None) if !vacuum => {
                    eprintln!(
                        "herald: give --retain, set [store] retain in the configuration, or give --vacuum"
                    );
                    return ExitCode::from(2);
                }
                Ok(Some(r)) if r < std::time::Duration::from_secs(1) => {
                    eprintln!("herald: --retain must be at least 1s");
                    return ExitCode::from(2);
                }
                Ok(r) => r,
                Err(e) => {
                    eprintln!("herald: {e}");
                    return ExitCode::from(2);
                }
            };
            offline(&dir, |p| {
                if let Some(retain) = retain {
                    println!("{}", offline::compact_dir(p, retain)?);
                }
                if vacuum {
                    println!("{}", offline::vacuum_dir(p)?);
                }
                Ok(None)
            })
        }
        Cmd::Replay { dir, delivery, event, endpoint, format } => {
            let subject = match parse_subject(delivery, event, endpoint) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("herald: {e}");
                    return ExitCode::from(2);
                }
            };
            offline(&dir, |p| {
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                offline::replay_dir(p, subject, format == Format::Ndjson, &mut out).map(|_| None)
            })
        }
    }
}

fn serve(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let admin_key = std::env::var("HERALD_ADMIN_KEY").ok().filter(|k| !k.is_empty());
    let result = runtime.block_on(herald_server::serve(config, admin_key, stop_signal()));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM or SIGINT (Ctrl-C).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
