//! `cargo xtask`: sets up a machine for lookup, builds it, runs the agent and
//! runs the whole test suite. The alias lives in `.cargo/config.toml`.
mod bench;
mod build;
mod cmd;
mod run;
mod setup;
mod test;
mod units;

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Set up, build, run and test lookup"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the toolchain the build needs (Debian packages, bpf-linker,
    /// the `lookup-bpf` rustup toolchain); fast when all is present.
    Setup,
    /// Set up, then build lookupd, lookupctl and the test binaries.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Set up, build (release), mount bpffs, then run lookupd in the
    /// foreground. Arguments after `--` go to lookupd.
    Run {
        /// Arguments for lookupd, for example `-- --control /tmp/lookup.sock`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Set up, build (release) and run the benchmarks as root: tables of
    /// figures with ratios to baselines measured in the same run (see
    /// BENCHMARKS.md). Arguments after `--` go to lookup-bench; `cargo xtask
    /// bench -- --help` lists them.
    Bench {
        /// Arguments for lookup-bench.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Set up, then fmt, clippy (host and eBPF), systemd-analyze verify and
    /// cargo test for the workspace. Arguments after `--` go to the test
    /// binaries (a test name filter, `--nocapture`, ...).
    Test {
        /// Arguments for the test binaries.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::setup(),
        Command::Build { release } => build::build(release).map(drop),
        Command::Run { args } => run::run(&args),
        Command::Test { args } => test::test(&args),
        Command::Bench { args } => bench::bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(["xtask"].iter().chain(args))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
    }

    #[test]
    fn run_passes_arguments_to_lookupd_with_or_without_dashes() {
        for args in [
            &["run", "--", "--control", "/tmp/l.sock"][..],
            &["run", "--control", "/tmp/l.sock"][..],
        ] {
            let Command::Run { args: got } = parse(args) else {
                panic!("{args:?} is not run");
            };
            assert_eq!(got, ["--control", "/tmp/l.sock"], "{args:?}");
        }
        let Command::Run { args: got } = parse(&["run", "--", "--help"]) else {
            panic!("not run");
        };
        assert_eq!(got, ["--help"]);
    }

    #[test]
    fn test_passes_arguments_to_the_test_binaries() {
        let Command::Test { args } = parse(&["test", "--", "precedence", "--nocapture"]) else {
            panic!("not test");
        };
        assert_eq!(args, ["precedence", "--nocapture"]);
        let Command::Test { args } = parse(&["test"]) else {
            panic!("not test");
        };
        assert!(args.is_empty());
    }

    #[test]
    fn build_release_flag() {
        assert!(matches!(
            parse(&["build", "--release"]),
            Command::Build { release: true }
        ));
        assert!(matches!(
            parse(&["build"]),
            Command::Build { release: false }
        ));
    }
}
