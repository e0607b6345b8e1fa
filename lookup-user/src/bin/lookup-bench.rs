//! `lookup-bench`: see `lookup::bench`. Run it as root through
//! `cargo xtask bench`; it makes a private network and mount namespace and
//! a bpffs of its own, so it touches nothing outside itself.

use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, ensure};
use clap::Parser;
use lookup::bench::{self, Options};
use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, unshare},
};

/// Measures lookup's data plane against its baselines in one run.
#[derive(Parser, Debug)]
#[command(name = "lookup-bench", version)]
struct Args {
    /// Table sizes to measure, ascending.
    #[arg(long, value_delimiter = ',', default_value = "4,10000,100000,1000000")]
    sizes: Vec<usize>,
    /// BPF_PROG_TEST_RUN repeat count per trial.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Trials per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Bindings to apply through a real agent, then to move in one batch
    /// while single binds are timed (0 skips that part).
    #[arg(long, default_value_t = 1_000_000)]
    apply: usize,
    /// Client threads sending single binds at once, to a merging agent and
    /// to one that applies requests one by one (0 skips that part).
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of each concurrent-clients run (four runs).
    #[arg(long, default_value_t = 2.0)]
    clients_seconds: f64,
    /// Bindings the dispatcher holds during the live-traffic part (0 skips
    /// that part).
    #[arg(long, default_value_t = 1_000_000)]
    traffic: usize,
    /// Seconds of churn with live connections.
    #[arg(long, default_value_t = 5.0)]
    churn_seconds: f64,
}

fn isolate() -> Result<tempdir::Dir> {
    unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS)
        .context("unshare (are we root?)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")?;
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("ip")?;
    ensure!(status.success(), "ip link set lo up failed");
    bpffs()
}

mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> anyhow::Result<Self> {
            let p = nix::unistd::mkdtemp(&std::env::temp_dir().join("lookup-bench-XXXXXX"))?;
            Ok(Self(p))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(&self.0);
        }
    }
}

/// A fresh bpffs on a temporary directory (inside our mount namespace).
fn bpffs() -> Result<tempdir::Dir> {
    let dir = tempdir::Dir::new()?;
    mount(
        Some("bpf"),
        dir.path(),
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting bpffs")?;
    Ok(dir)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let run = || -> Result<()> {
        let dir = isolate()?;
        let opts = Options {
            sizes: args.sizes.clone(),
            repeat: args.repeat,
            trials: args.trials,
        };
        let (_, report) = bench::lookup_cost(dir.path(), &opts)?;
        println!("{report}");
        if args.apply > 0 {
            let bpffs = bpffs()?;
            let scratch = tempdir::Dir::new()?;
            let r = bench::apply_through_agent(scratch.path(), bpffs.path(), args.apply)?;
            println!("{}", bench::apply_report(&r));
            let _ = std::fs::remove_file(scratch.path().join("bindings.txt"));
            let _ = std::fs::remove_file(scratch.path().join("lookupd.sock"));
        }
        if args.clients > 0 {
            let bpffs = bpffs()?;
            let scratch = tempdir::Dir::new()?;
            let r = bench::concurrent_clients(
                scratch.path(),
                bpffs.path(),
                args.clients,
                args.clients_seconds,
            )?;
            println!("{}", bench::clients_report(&r));
            let _ = std::fs::remove_file(scratch.path().join("clients.sock"));
        }
        if args.traffic > 0 {
            let bpffs = bpffs()?;
            let scratch = tempdir::Dir::new()?;
            let r = bench::traffic(
                scratch.path(),
                bpffs.path(),
                args.traffic,
                args.churn_seconds,
            )?;
            println!("{}", bench::traffic_report(&r));
            let f = bench::udp_floor()?;
            println!(
                "UDP through the floor program (one sockmap assign, same setup): no program {:.0}/s, \
                 direct with it attached {:.0}/s, steered {:.0}/s; steered / no program {:.3}x, \
                 steered / direct {:.3}x\n",
                f.none, f.attached, f.steered, f.steered_vs_none, f.steered_vs_attached
            );
            let _ = std::fs::remove_file(scratch.path().join("traffic.sock"));
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lookup-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
