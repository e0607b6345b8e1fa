//! `lookupctl`: one module per subcommand. Nouns (`bindings`, `status`)
//! read; verbs (`bind`, `register`, ...) change state through the agent.

mod apply;
mod bind;
mod client;
mod register;
mod show;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

pub use client::Client;

/// Changes and shows sk_lookup steering through lookupd.
#[derive(Parser, Debug)]
#[command(name = "lookupctl", version)]
pub struct Cli {
    /// Control socket of lookupd.
    #[arg(
        long,
        global = true,
        env = "LOOKUP_CONTROL",
        default_value = "/run/lookup/lookupd.sock",
        value_name = "PATH"
    )]
    pub control: PathBuf,
    /// Print output as JSON (for write commands: what was done).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands. Arguments are plain strings so that bad input is
/// reported in our own words, naming the input.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Steer <protocol> traffic for <prefix>:<port> to <label> (port 0: every port).
    Bind {
        /// Label whose socket takes the traffic.
        label: String,
        /// tcp or udp.
        protocol: String,
        /// IP prefix, e.g. 192.0.2.0/24; a bare IP is a host prefix.
        prefix: String,
        /// 0..=65535; 0 means every port.
        port: String,
    },
    /// Remove a binding (the label must match).
    Unbind {
        /// Label the binding points at.
        label: String,
        /// tcp or udp.
        protocol: String,
        /// IP prefix.
        prefix: String,
        /// Port.
        port: String,
    },
    /// Apply many binds and unbinds at once, from FILE or standard input:
    /// one `bind|unbind <label> <tcp|udp> <prefix> <port>` per line (`#`
    /// comments and blank lines are ignored). All are checked before any is
    /// applied; on any error nothing changes.
    Apply {
        /// The file; `-` or nothing reads standard input.
        file: Option<PathBuf>,
    },
    /// List bindings in precedence order: the first that matches wins.
    Bindings,
    /// Register the sockets passed by systemd socket activation for <label>.
    Register {
        /// Label the sockets serve.
        label: String,
    },
    /// Register a socket copied from a running process.
    RegisterPid {
        /// Process id, or path to a pidfile.
        target: String,
        /// Label the socket serves.
        label: String,
        /// tcp or udp.
        protocol: String,
        /// Address the socket is bound to.
        ip: String,
        /// Port the socket is bound to.
        port: String,
    },
    /// Remove the socket of <label> for a family and protocol.
    Unregister {
        /// Label.
        label: String,
        /// ipv4 or ipv6.
        family: String,
        /// tcp or udp.
        protocol: String,
    },
    /// Show bindings, destinations with their sockets, and counters.
    Status {
        /// Only this label.
        label: Option<String>,
    },
}

/// Why a command failed; printed as `lookupctl: error: ...`.
pub type CmdResult = Result<(), String>;

/// Entry point of the `lookupctl` binary.
pub fn main() -> ExitCode {
    // Like any Unix filter: `lookupctl status | head` ends quietly.
    // SAFETY: set before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("lookupctl: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> CmdResult {
    let client = Client::new(cli.control.clone(), cli.json);
    match cli.command {
        Command::Bind {
            label,
            protocol,
            prefix,
            port,
        } => bind::bind(&client, &label, &protocol, &prefix, &port),
        Command::Unbind {
            label,
            protocol,
            prefix,
            port,
        } => bind::unbind(&client, &label, &protocol, &prefix, &port),
        Command::Apply { file } => apply::apply(&client, file.as_deref()),
        Command::Bindings => show::bindings(&client, cli.json),
        Command::Register { label } => register::register(&client, &label),
        Command::RegisterPid {
            target,
            label,
            protocol,
            ip,
            port,
        } => register::register_pid(&client, &target, &label, &protocol, &ip, &port),
        Command::Unregister {
            label,
            family,
            protocol,
        } => register::unregister(&client, &label, &family, &protocol),
        Command::Status { label } => show::status(&client, label.as_deref(), cli.json),
    }
}
