//! `lookupd`: the lookup agent. See `lookup::agent`.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use lookup::agent::{self, Config};

/// Loads the sk_lookup dispatcher into a network namespace (or reopens the
/// one pinned there) and serves the control socket that lookupctl talks to.
#[derive(Parser, Debug)]
#[command(name = "lookupd", version)]
struct Args {
    /// Network namespace to serve.
    #[arg(long, default_value = "/proc/self/ns/net", value_name = "PATH")]
    netns: PathBuf,
    /// Mount point of the bpf filesystem; state is pinned under <DIR>/lookup/<netns inode>/.
    #[arg(long, default_value = "/sys/fs/bpf", value_name = "DIR")]
    bpffs: PathBuf,
    /// Path of the control socket.
    #[arg(long, default_value = "/run/lookup/lookupd.sock", value_name = "PATH")]
    control: PathBuf,
    /// Apply every request on its own instead of merging concurrent ones
    /// (for benchmarks).
    #[arg(long, hide = true)]
    no_merge: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lookupd: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = Config {
        netns: args.netns,
        bpffs: args.bpffs,
        control: args.control,
        merge: !args.no_merge,
    };
    match runtime.block_on(agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lookupd: error: {}", lookup::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
