//! `lookupctl`: changes and shows steering through the agent. See `lookup::cli`.

fn main() -> std::process::ExitCode {
    lookup::cli::main()
}
