//! The `herald` command: `serve` runs the server. Parsing and error reporting live here; the
//! work is in the libraries.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald_server::config::{herald_env, Config, Overrides};

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
