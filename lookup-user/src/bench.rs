//! `lookup-bench`: per-lookup cost of the dispatcher beside its baselines,
//! all measured in one run with `BPF_PROG_TEST_RUN` (run it through
//! `cargo xtask bench`).
//!
//! Programs: the dispatcher as loaded by the agent; `bench_pass` (returns
//! `SK_PASS`); `bench_floor` (one sockmap lookup and assign); and
//! `bench_reference`, the textbook design with one trie keyed by protocol,
//! port and prefix, looked up twice. The reference holds exactly the same
//! bindings and assigns the same sockets, so every lookup of both must
//! select the same socket: the bench checks that before it times anything.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd as _, OwnedFd},
    path::Path,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    EbpfLoader,
    maps::{LpmTrie, Map, MapData, lpm_trie},
    programs::SkLookup,
};
use lookup_common::{BindingValue, KEY_HEADER_BITS};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};

use crate::{
    binding::{Binding, Family, Label, Prefix, Protocol},
    dispatcher::Dispatcher,
    socket as sock,
    sys::{self, SkLookupCtx},
};

/// The baselines' object, built by `lookup-user/build.rs`.
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lookup-baselines"));

const SK_PASS: u32 = 1;

/// What to measure.
#[derive(Clone, Debug)]
pub struct Options {
    /// Table sizes, ascending.
    pub sizes: Vec<usize>,
    /// `BPF_PROG_TEST_RUN` repeat count per trial.
    pub repeat: u32,
    /// Trials per figure; the median is reported.
    pub trials: usize,
}

/// One class of lookup, with the binding that answers it.
struct Class {
    name: &'static str,
    protocol: Protocol,
    ip: IpAddr,
    port: u16,
    /// The binding that must win, or `None` for a miss.
    binding: Option<(&'static str, &'static str, u16)>,
}

fn classes() -> Vec<Class> {
    let v4 = |s: &str| IpAddr::V4(s.parse::<Ipv4Addr>().expect("address"));
    let v6 = |s: &str| IpAddr::V6(s.parse::<Ipv6Addr>().expect("address"));
    vec![
        Class {
            name: "host, specific port",
            protocol: Protocol::Tcp,
            ip: v4("100.127.0.1"),
            port: 443,
            binding: Some(("a", "100.127.0.1", 443)),
        },
        Class {
            name: "host, wildcard port",
            protocol: Protocol::Tcp,
            ip: v4("100.127.0.2"),
            port: 8443,
            binding: Some(("b", "100.127.0.2", 0)),
        },
        Class {
            name: "wider prefix",
            protocol: Protocol::Tcp,
            ip: v4("100.126.7.9"),
            port: 80,
            binding: Some(("c", "100.126.0.0/16", 80)),
        },
        Class {
            name: "IPv6 host",
            protocol: Protocol::Tcp,
            ip: v6("2001:db8:ffff::1"),
            port: 443,
            binding: Some(("d", "2001:db8:ffff::1", 443)),
        },
        Class {
            name: "miss",
            protocol: Protocol::Tcp,
            ip: v4("198.18.0.1"),
            port: 80,
            binding: None,
        },
    ]
}

/// xorshift64*: deterministic, so every run measures the same tables and a
/// failing test names a seed that reproduces it. The seed must not be 0.
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// An index below `n`.
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// One of `items`.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.index(items.len())]
    }
}

const LABELS: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];

/// The filler bindings: mostly hosts (IPv4 in 10/8, IPv6 in 2001:db8::/32),
/// an eighth wider prefixes (IPv4 in 172.16/12, IPv6 in 2001:db8:8000::/33),
/// TCP and UDP, half on a specific port (popular ports and random ones),
/// half on every port. None of them overlaps a class's target.
fn filler(rng: &mut Rng) -> Binding {
    let protocol = if rng.below(2) == 0 {
        Protocol::Tcp
    } else {
        Protocol::Udp
    };
    let port = match rng.below(8) {
        0..=3 => 0,
        4 => 80,
        5 => 443,
        6 => 53,
        _ => 1024 + rng.below(64_000) as u16,
    };
    let v6 = rng.below(4) == 0;
    let wide = rng.below(8) == 0;
    let (addr, len) = match (v6, wide) {
        (false, false) => (
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | rng.below(1 << 24) as u32)),
            32,
        ),
        (false, true) => {
            let len = 16 + rng.below(15) as u8;
            let a = 0xac10_0000 | rng.below(1 << 20) as u32;
            (
                IpAddr::V4(Ipv4Addr::from(a & (u32::MAX << (32 - u32::from(len))))),
                len,
            )
        }
        (true, false) => (
            IpAddr::V6(Ipv6Addr::from(
                0x2001_0db8u128 << 96
                    | u128::from(rng.next_u64()) << 32 >> 32 & ((1u128 << 95) - 1),
            )),
            128,
        ),
        (true, true) => {
            let len = 48 + rng.below(77) as u8;
            let a = 0x2001_0db8_8000u128 << 80
                | u128::from(rng.next_u64()) << 16
                | u128::from(rng.next_u64() >> 48);
            (
                IpAddr::V6(Ipv6Addr::from(a & (u128::MAX << (128 - u32::from(len))))),
                len,
            )
        }
    };
    Binding {
        label: LABELS[rng.index(LABELS.len())].parse().expect("label"),
        protocol,
        prefix: Prefix::new(addr, len).expect("canonical prefix"),
        port,
    }
}

/// A listening TCP or bound UDP socket on loopback (IPv6 sockets are
/// IPv6-only), as a registered service would hold.
pub fn server(family: Family, protocol: Protocol) -> Result<OwnedFd> {
    let (af, addr): (_, SocketAddr) = match family {
        Family::Ipv4 => (AddressFamily::Inet, "127.0.0.1:0".parse()?),
        Family::Ipv6 => (AddressFamily::Inet6, "[::1]:0".parse()?),
    };
    let ty = match protocol {
        Protocol::Tcp => SockType::Stream,
        Protocol::Udp => SockType::Datagram,
    };
    let fd = socket(af, ty, SockFlag::SOCK_CLOEXEC, None)?;
    if family == Family::Ipv6 {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    if protocol == Protocol::Tcp {
        listen(&fd, Backlog::new(64)?)?;
    }
    Ok(fd)
}

fn context(c: &Class) -> SkLookupCtx {
    let mut ctx = SkLookupCtx {
        protocol: u32::from(c.protocol.number()),
        local_port: u32::from(c.port),
        remote_port: u32::from(40_000u16.to_be()),
        ..Default::default()
    };
    match c.ip {
        IpAddr::V4(a) => {
            ctx.family = u32::from(Family::Ipv4.number());
            ctx.local_ip4 = u32::from_ne_bytes(a.octets());
            ctx.remote_ip4 = u32::from_ne_bytes([127, 0, 0, 9]);
        }
        IpAddr::V6(a) => {
            ctx.family = u32::from(Family::Ipv6.number());
            let o = a.octets();
            for i in 0..4 {
                ctx.local_ip6[i] = u32::from_ne_bytes(o[4 * i..4 * i + 4].try_into().expect("4"));
            }
            ctx.remote_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 9])];
        }
    }
    ctx
}

/// Rounds of each live-traffic measurement, a quarter second each.
const ROUNDS: usize = 16;

/// The median of `a[i] / b[i]`: runs measured next to each other are
/// compared, so drift over the whole measurement cancels.
fn paired(a: &[f64], b: &[f64]) -> f64 {
    median(a.iter().zip(b).map(|(a, b)| a / b).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn time(prog: &SkLookup, ctx: &SkLookupCtx, opts: &Options) -> Result<f64> {
    let fd = prog.fd()?;
    let mut runs = Vec::with_capacity(opts.trials);
    for _ in 0..opts.trials {
        runs.push(sys::sk_lookup_test_run(fd.as_fd(), ctx, opts.repeat)?.duration_ns);
    }
    Ok(median(runs.into_iter().map(f64::from).collect()))
}

/// One row of the result table.
pub struct Row {
    /// Bindings in the tables.
    pub size: usize,
    /// Lookup class.
    pub class: &'static str,
    /// ns per lookup: dispatcher, reference, floor, pass.
    pub ns: [f64; 4],
}

/// Runs the per-lookup benchmark in the calling thread's network namespace,
/// with the dispatcher's state under `bpffs`. Returns the rows and a report.
pub fn lookup_cost(bpffs: &Path, opts: &Options) -> Result<(Vec<Row>, String)> {
    ensure!(
        !BENCH_OBJECT.is_empty(),
        "this build carries no eBPF objects: run `cargo xtask setup` and rebuild"
    );
    let mut d = Dispatcher::open_or_create(Path::new("/proc/thread-self/ns/net"), bpffs)?;
    let ours = SkLookup::from_pin(d.location().dir.join("program"))?;

    let mut ebpf = EbpfLoader::new().load(BENCH_OBJECT)?;
    for name in ["bench_pass", "bench_floor", "bench_reference"] {
        let p: &mut SkLookup = ebpf.program_mut(name).context(name)?.try_into()?;
        p.load().with_context(|| format!("loading {name}"))?;
    }
    let ref_sockets = match ebpf.take_map("REF_SOCKETS").context("REF_SOCKETS")? {
        Map::SockMap(m) => m,
        _ => bail!("REF_SOCKETS is not a sockmap"),
    };
    let mut ref_trie: LpmTrie<MapData, lookup_common::BindingKey, BindingValue> = ebpf
        .take_map("REF_BINDINGS")
        .context("REF_BINDINGS")?
        .try_into()?;

    // Every label gets a socket of each family and protocol, in both the
    // dispatcher and (at the same index) the reference's sockmap.
    let mut keep = Vec::new();
    let mut cookies = std::collections::HashMap::new();
    for label in LABELS {
        let label: Label = label.parse()?;
        for family in [Family::Ipv4, Family::Ipv6] {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let fd = server(family, protocol)?;
                let cookie = sock::inspect(fd.as_fd())?.cookie;
                d.register(
                    &label,
                    vec![(fd.try_clone()?, format!("{label} {family} {protocol}"))],
                )?;
                let id = d
                    .destination_id(&label, family, protocol)
                    .context("registered destination")?;
                sys::sockmap_update(ref_sockets.fd().as_fd(), id, fd.as_fd())?;
                cookies.insert((label.clone(), family, protocol), cookie);
                keep.push(fd);
            }
        }
    }

    let mut add = |d: &mut Dispatcher, b: &Binding| -> Result<()> {
        d.bind(b)?;
        let id = d
            .destination_id(&b.label, b.prefix.family(), b.protocol)
            .context("destination")?;
        let s = b.selector();
        ref_trie.insert(
            &lpm_trie::Key::new(KEY_HEADER_BITS + u32::from(b.prefix.len()), s.key()),
            BindingValue {
                destination: id,
                prefix_len: u32::from(b.prefix.len()),
            },
            0,
        )?;
        Ok(())
    };
    let classes = classes();
    let mut held = 0usize;
    for c in &classes {
        if let Some((label, prefix, port)) = c.binding {
            let b = Binding::parse(label, &c.protocol.to_string(), prefix, &port.to_string())?;
            add(&mut d, &b)?;
            held += 1;
        }
    }

    let progs = [
        &ours,
        ebpf.program("bench_reference")
            .context("reference")?
            .try_into()?,
        ebpf.program("bench_floor").context("floor")?.try_into()?,
        ebpf.program("bench_pass").context("pass")?.try_into()?,
    ];
    let mut rng = Rng(0x10_0c_4b_u64);
    let mut rows = Vec::new();
    let mut report = String::new();
    for &size in &opts.sizes {
        let started = Instant::now();
        while held < size {
            let b = filler(&mut rng);
            if d.is_bound(&b.selector()) {
                continue;
            }
            add(&mut d, &b)?;
            held += 1;
        }
        eprintln!(
            "bench: {size} bindings in place ({:.1} s to add)",
            started.elapsed().as_secs_f64()
        );
        for c in &classes {
            let ctx = context(c);
            // Both dispatchers must select the same socket before timing.
            let want = c.binding.map(|(label, _, _)| {
                let family = if c.ip.is_ipv4() {
                    Family::Ipv4
                } else {
                    Family::Ipv6
                };
                cookies[&(label.parse::<Label>().expect("label"), family, c.protocol)]
            });
            for (name, p) in [("dispatcher", progs[0]), ("reference", progs[1])] {
                let r = sys::sk_lookup_test_run(p.fd()?.as_fd(), &ctx, 1)?;
                ensure!(r.retval == SK_PASS, "{name} dropped {}", c.name);
                ensure!(
                    r.cookie == want.unwrap_or(0),
                    "{name} selected cookie {} for {}, expected {:?}",
                    r.cookie,
                    c.name,
                    want
                );
            }
            let mut ns = [0.0; 4];
            for (i, p) in progs.iter().enumerate() {
                ns[i] = time(p, &ctx, opts)?;
            }
            rows.push(Row {
                size,
                class: c.name,
                ns,
            });
        }
    }
    drop(keep);

    let base = |class: &str| {
        rows.iter()
            .find(|r| r.class == class)
            .map(|r| r.ns[0])
            .unwrap_or(f64::NAN)
    };
    writeln!(
        report,
        "Per-lookup cost, BPF_PROG_TEST_RUN, repeat {}, median of {} trials (ns per lookup)",
        opts.repeat, opts.trials
    )?;
    writeln!(report)?;
    writeln!(
        report,
        "| bindings | class | dispatcher | reference | floor | pass | dispatcher / floor | dispatcher / smallest table | dispatcher / reference |"
    )?;
    writeln!(report, "|---:|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for r in &rows {
        writeln!(
            report,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.2}x | {:.2}x |",
            r.size,
            r.class,
            r.ns[0],
            r.ns[1],
            r.ns[2],
            r.ns[3],
            r.ns[0] / r.ns[2],
            r.ns[0] / base(r.class),
            r.ns[0] / r.ns[1]
        )?;
    }
    Ok((rows, report))
}

/// Results of applying a large batch through a real agent.
pub struct ApplyResult {
    /// Bindings applied.
    pub bindings: usize,
    /// Wall time of `lookupctl apply`, seconds.
    pub seconds: f64,
    /// Peak RSS of the agent, KiB.
    pub agent_peak_kib: u64,
    /// Kernel memory of the agent's maps, bytes.
    pub map_bytes: u64,
    /// The same bindings inserted one `bpf(2)` call each into the textbook
    /// design's trie, as a CLI without an agent does, seconds.
    pub reference_seconds: f64,
    /// Single `bind` round trips, idle and during a large batch.
    pub latency: BindLatency,
    /// The agent's own account of each batch, from its log.
    pub batches: Vec<BatchTimings>,
}

/// How the agent spent a batch, in milliseconds, as it logs it.
#[derive(Debug, Default)]
pub struct BatchTimings {
    /// Parsing and sorting, before the writer.
    pub parse_ms: u64,
    /// Checking every change against the bindings.
    pub check_ms: u64,
    /// Steps the changes were written in.
    pub steps: u64,
    /// The longest step: what a small request waited at most.
    pub longest_step_ms: u64,
    /// In the writer, from start to done.
    pub total_ms: u64,
}

/// The `batch parsed` and `batch done` lines of an agent log, paired.
fn batch_timings(log: &str) -> Vec<BatchTimings> {
    let field = |line: &str, key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut out = Vec::new();
    let mut parse_ms = 0;
    for line in log.lines() {
        if line.contains("batch parsed") {
            parse_ms = field(line, "parse_ms");
        } else if line.contains("batch done") {
            out.push(BatchTimings {
                parse_ms,
                check_ms: field(line, "check_ms"),
                steps: field(line, "steps"),
                longest_step_ms: field(line, "longest_step_ms"),
                total_ms: field(line, "total_ms"),
            });
        }
    }
    out
}

/// Round-trip times of single binds, milliseconds.
pub struct BindLatency {
    /// Median with the agent idle.
    pub idle_p50_ms: f64,
    /// Worst with the agent idle.
    pub idle_max_ms: f64,
    /// Median while a batch moving every binding drains.
    pub busy_p50_ms: f64,
    /// 90th percentile while it drains.
    pub busy_p90_ms: f64,
    /// Worst while that batch drains.
    pub busy_max_ms: f64,
    /// Binds measured while it drained.
    pub busy_samples: usize,
    /// How long that batch took.
    pub batch_seconds: f64,
}

fn memlock(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    use std::os::fd::AsRawFd as _;
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("memlock:")
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

fn peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// `count` distinct filler bindings from `seed`, as `bind` lines and as
/// bindings.
fn filler_batch(seed: u64, count: usize) -> (String, Vec<Binding>) {
    let mut rng = Rng(seed);
    let mut seen = std::collections::HashSet::new();
    let mut text = String::with_capacity(count * 40);
    let mut bindings = Vec::with_capacity(count);
    while bindings.len() < count {
        let b = filler(&mut rng);
        if seen.insert(b.selector()) {
            let _ = writeln!(
                text,
                "bind {} {} {} {}",
                b.label, b.protocol, b.prefix, b.port
            );
            bindings.push(b);
        }
    }
    (text, bindings)
}

/// Starts `lookupd` (next to this executable) on a bpffs of its own, feeds
/// it `count` bindings with `lookupctl apply`, and measures.
pub fn apply_through_agent(scratch: &Path, bpffs: &Path, count: usize) -> Result<ApplyResult> {
    use std::process::Command;
    // A namespace of its own: the per-lookup part left a dispatcher attached
    // to the previous one.
    unshare_net()?;
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .to_owned();
    let control = scratch.join("lookupd.sock");
    let guard = Agent::start(&bin, bpffs, &control)?;

    let (text, bindings) = filler_batch(0x00ab_cdef, count);
    let file = scratch.join("bindings.txt");
    std::fs::write(&file, &text)?;
    drop(text);

    let started = Instant::now();
    let out = Command::new(bin.join("lookupctl"))
        .arg("--control")
        .arg(&control)
        .arg("apply")
        .arg(&file)
        .output()
        .context("running lookupctl apply")?;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "lookupctl apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = guard.0.id();
    let agent_peak_kib = peak_kib(pid);

    // Single binds while the same million bindings are moved to another
    // label in one batch, against single binds with the agent idle.
    let single = |client: &crate::cli::Client, i: u32| -> Result<f64> {
        let b = Binding::parse(
            "solo",
            "tcp",
            &Ipv4Addr::from(0xc633_6400 + i).to_string(),
            "80",
        )?;
        let started = Instant::now();
        client
            .call(&crate::proto::Request::Bind { binding: b }, &[])
            .map_err(anyhow::Error::msg)?;
        Ok(started.elapsed().as_secs_f64() * 1e3)
    };
    let client = crate::cli::Client::new(control.clone(), false);
    let mut idle = Vec::new();
    for i in 0..50 {
        idle.push(single(&client, i)?);
    }
    let moved: String = std::fs::read_to_string(&file)?.replace("bind a ", "bind h ");
    std::fs::write(&file, moved)?;
    let mover = {
        let (bin, control, file) = (bin.clone(), control.clone(), file.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let out = Command::new(bin.join("lookupctl"))
                .arg("--control")
                .arg(&control)
                .arg("apply")
                .arg(&file)
                .output();
            (out, started.elapsed().as_secs_f64())
        })
    };
    let mut busy = Vec::new();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut i = 100;
    while !mover.is_finished() {
        busy.push(single(&client, i)?);
        i += 1;
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let (out, batch_seconds) = mover
        .join()
        .map_err(|_| anyhow::anyhow!("mover panicked"))?;
    let out = out?;
    ensure!(
        out.status.success(),
        "second apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pct = |mut v: Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let latency = BindLatency {
        idle_p50_ms: pct(idle.clone(), 0.5),
        idle_max_ms: pct(idle, 1.0),
        busy_p50_ms: pct(busy.clone(), 0.5),
        busy_p90_ms: pct(busy.clone(), 0.9),
        busy_max_ms: pct(busy.clone(), 1.0),
        busy_samples: busy.len(),
        batch_seconds,
    };

    let mut map_bytes = 0;
    for entry in std::fs::read_dir(bpffs.join("lookup"))? {
        let dir = entry?.path();
        for pin in std::fs::read_dir(&dir)? {
            let pin = pin?.path();
            let name = pin.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("LOOKUP_") {
                let fd = sys::obj_get(&pin)?;
                map_bytes += memlock(fd.as_fd());
            }
        }
    }
    drop(guard);
    let batches =
        batch_timings(&std::fs::read_to_string(control.with_extension("log")).unwrap_or_default());

    // The baseline: the same bindings, one syscall each, into the
    // reference program's trie.
    let mut ebpf = EbpfLoader::new().load(BENCH_OBJECT)?;
    let mut trie: LpmTrie<MapData, lookup_common::BindingKey, BindingValue> = ebpf
        .take_map("REF_BINDINGS")
        .context("REF_BINDINGS")?
        .try_into()?;
    let started = Instant::now();
    for b in &bindings {
        trie.insert(
            &lpm_trie::Key::new(
                KEY_HEADER_BITS + u32::from(b.prefix.len()),
                b.selector().key(),
            ),
            BindingValue {
                destination: 0,
                prefix_len: u32::from(b.prefix.len()),
            },
            0,
        )?;
    }
    let reference_seconds = started.elapsed().as_secs_f64();
    Ok(ApplyResult {
        bindings: count,
        seconds,
        agent_peak_kib,
        map_bytes,
        reference_seconds,
        latency,
        batches,
    })
}

/// Concurrent clients sending single requests, merged by the agent and
/// applied one by one.
pub struct ClientsResult {
    /// Client threads.
    pub clients: usize,
    /// Requests per second, median and latency (ms) at p50 and p99: with
    /// the agent merging concurrent requests.
    pub merged: (f64, f64, f64),
    /// The same with `lookupd --no-merge`.
    pub one_by_one: (f64, f64, f64),
}

/// `clients` threads each send single `bind`s (the mix of [`filler`], one
/// label per client) as fast as they are answered, for `seconds`, against
/// `lookupd` merging requests and against `lookupd --no-merge`, alternately
/// twice on the same pinned state; medians of the two runs of each.
pub fn concurrent_clients(
    scratch: &Path,
    bpffs: &Path,
    clients: usize,
    seconds: f64,
) -> Result<ClientsResult> {
    unshare_net()?;
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .to_owned();
    let control = scratch.join("clients.sock");
    let run = |args: &[&str], round: u64| -> Result<(f64, Vec<f64>)> {
        let _agent = Agent::start_with(&bin, bpffs, &control, args)?;
        let started = Instant::now();
        let threads: Vec<_> = (0..clients)
            .map(|t| {
                let control = control.clone();
                std::thread::spawn(move || -> Result<Vec<f64>> {
                    let client = crate::cli::Client::new(control, false);
                    let mut rng = Rng((round << 32 | t as u64) * 0x9e37_79b9 + 1);
                    let label: Label = format!("c{t}").parse()?;
                    let mut latencies = Vec::new();
                    while started.elapsed().as_secs_f64() < seconds {
                        let mut binding = filler(&mut rng);
                        binding.label = label.clone();
                        let sent = Instant::now();
                        client
                            .call(&crate::proto::Request::Bind { binding }, &[])
                            .map_err(anyhow::Error::msg)?;
                        latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok(latencies)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in threads {
            all.extend(t.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
        }
        Ok((all.len() as f64 / started.elapsed().as_secs_f64(), all))
    };
    let summary = |runs: Vec<(f64, Vec<f64>)>| {
        let rate = median(runs.iter().map(|r| r.0).collect());
        let mut all: Vec<f64> = runs.into_iter().flat_map(|r| r.1).collect();
        all.sort_by(f64::total_cmp);
        let at = |q: f64| all[((all.len() as f64 - 1.0) * q).round() as usize];
        (rate, at(0.5), at(0.99))
    };
    let (mut merged, mut one_by_one) = (Vec::new(), Vec::new());
    for round in 0..2 {
        merged.push(run(&[], round * 2)?);
        one_by_one.push(run(&["--no-merge"], round * 2 + 1)?);
    }
    Ok(ClientsResult {
        clients,
        merged: summary(merged),
        one_by_one: summary(one_by_one),
    })
}

/// The concurrent-clients figures as a report.
pub fn clients_report(r: &ClientsResult) -> String {
    let (m, o) = (r.merged, r.one_by_one);
    format!(
        "Concurrent single binds: {} clients, each sending one `bind` at a time (7/8 host \
         bindings, 1/8 wider), through lookupd merging concurrent requests and through \
         `lookupd --no-merge`, alternately\n\n\
         | figure | merged | one by one | merged / one by one |\n\
         |---|---:|---:|---:|\n\
         | binds per second | {:.0} | {:.0} | {:.2}x |\n\
         | latency p50 (ms) | {:.2} | {:.2} | {:.2}x |\n\
         | latency p99 (ms) | {:.2} | {:.2} | {:.2}x |\n",
        r.clients,
        m.0,
        o.0,
        m.0 / o.0,
        m.1,
        o.1,
        m.1 / o.1,
        m.2,
        o.2,
        m.2 / o.2,
    )
}

/// A `lookupd` started for a benchmark, killed when dropped.
struct Agent(std::process::Child);

impl Agent {
    /// Starts the `lookupd` in `bin` and waits until it answers on `control`.
    fn start(bin: &Path, bpffs: &Path, control: &Path) -> Result<Self> {
        Self::start_with(bin, bpffs, control, &[])
    }

    /// [`Agent::start`], with more arguments for `lookupd`.
    fn start_with(bin: &Path, bpffs: &Path, control: &Path, args: &[&str]) -> Result<Self> {
        let _ = std::fs::remove_file(control);
        let child = std::process::Command::new(bin.join("lookupd"))
            .arg("--bpffs")
            .arg(bpffs)
            .arg("--control")
            .arg(control)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            // Its log goes next to the control socket: the bench reads the
            // agent's own timings of a batch from it.
            .stderr(
                std::fs::File::options()
                    .append(true)
                    .create(true)
                    .open(control.with_extension("log"))
                    .context("agent log")?,
            )
            .spawn()
            .context("starting lookupd")?;
        let agent = Self(child);
        for _ in 0..400 {
            if std::os::unix::net::UnixStream::connect(control).is_ok() {
                return Ok(agent);
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        bail!("lookupd did not come up on {}", control.display())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The apply figures as a report.
fn apply_table(r: &ApplyResult) -> String {
    format!(
        "Applying {} bindings through lookupd (`lookupctl apply`)\n\n\
         | figure | lookup | baseline: one bpf(2) call per binding into the textbook trie | ratio |\n\
         |---|---:|---:|---:|\n\
         | wall time | {:.2} s | {:.2} s | {:.2}x |\n\
         | bindings per second | {:.0} | {:.0} | {:.2}x |\n\
         | agent peak RSS | {:.1} MiB | | |\n\
         | kernel memory of the maps | {:.1} MiB | | |\n",
        r.bindings,
        r.seconds,
        r.reference_seconds,
        r.seconds / r.reference_seconds,
        r.bindings as f64 / r.seconds,
        r.bindings as f64 / r.reference_seconds,
        (r.bindings as f64 / r.seconds) / (r.bindings as f64 / r.reference_seconds),
        r.agent_peak_kib as f64 / 1024.0,
        r.map_bytes as f64 / (1024.0 * 1024.0),
    )
}

pub fn apply_report(r: &ApplyResult) -> String {
    let mut out = apply_table(r);
    let l = &r.latency;
    if l.busy_samples == 0 {
        let _ = writeln!(
            out,
            "\nSingle `lookupctl bind` round trips during the batch: n/a (it drained in {:.2} s, \
             before a bind could be timed; use a larger --apply)",
            l.batch_seconds
        );
        return out;
    }
    let _ = write!(
        out,
        "\nSingle `lookupctl bind` round trips (ms) while a batch moving all {} bindings drains \
         ({:.2} s), against the same with the agent idle\n\n\
         | figure | idle | during the batch ({} binds) | ratio |\n\
         |---|---:|---:|---:|\n\
         | median | {:.2} | {:.2} | {:.1}x |\n\
         | 90th percentile | | {:.2} | |\n\
         | worst | {:.2} | {:.2} | {:.1}x |\n",
        r.bindings,
        l.batch_seconds,
        l.busy_samples,
        l.idle_p50_ms,
        l.busy_p50_ms,
        l.busy_p50_ms / l.idle_p50_ms,
        l.busy_p90_ms,
        l.idle_max_ms,
        l.busy_max_ms,
        l.busy_max_ms / l.idle_max_ms,
    );
    if !r.batches.is_empty() {
        let _ = write!(
            out,
            "\nThe agent's account of each batch (its log, ms)\n\n\
             | batch | parse and sort | check | steps | longest step | writer total |\n\
             |---|---:|---:|---:|---:|---:|\n"
        );
        for (i, b) in r.batches.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                ["apply", "move"].get(i).copied().unwrap_or("more"),
                b.parse_ms,
                b.check_ms,
                b.steps,
                b.longest_step_ms,
                b.total_ms
            );
        }
    }
    out
}

/// Results of the live-traffic phase.
pub struct TrafficResult {
    /// TCP connections per second: straight to the server, and steered by
    /// the dispatcher holding `bindings` bindings.
    pub tcp_direct: f64,
    /// See `tcp_direct`.
    pub tcp_steered: f64,
    /// Straight to the server with the dispatcher attached (a miss).
    pub tcp_attached: f64,
    /// See `tcp_attached`.
    pub udp_attached: f64,
    /// UDP request/response exchanges per second, direct and steered.
    pub udp_direct: f64,
    /// See `udp_direct`.
    pub udp_steered: f64,
    /// Steered against direct without a program, and against direct with
    /// the dispatcher attached: medians of the ratios of runs measured one
    /// after the other.
    pub tcp_ratios: (f64, f64),
    /// See `tcp_ratios`.
    pub udp_ratios: (f64, f64),
    /// Bindings the dispatcher held while steering.
    pub bindings: usize,
    /// Binding changes per second the agent absorbed during the churn run.
    pub churn_rate: f64,
    /// Changes applied during the churn run.
    pub churn_changes: usize,
    /// Connections made during the churn run, to changing and to unchanged
    /// bindings.
    pub churn_connections: (usize, usize),
    /// Connections answered by a server their binding never pointed at.
    pub misdirected: usize,
    /// Connections to unchanged bindings that failed.
    pub failed_unchanged: usize,
    /// Connections to changing bindings that failed.
    pub failed_changing: usize,
}

/// Where the live-traffic servers listen, reached directly: an address of
/// the same kind as the steered ones (not loopback), so that both sides take
/// the same routes and pass the same hooks. On the project's VM a send to a
/// non-loopback address costs about 4% more than one to 127.0.0.1 even
/// without any sk_lookup program; a loopback baseline would charge that to
/// the dispatcher.
const SERVER_NET: &str = "198.51.102.0/24";
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 102, 1);

fn tcp_server(name: &'static str) -> Result<(std::net::TcpListener, u16)> {
    let l = std::net::TcpListener::bind((SERVER_IP, 0))?;
    let port = l.local_addr()?.port();
    let server = l.try_clone()?;
    std::thread::spawn(move || {
        for c in server.incoming() {
            let Ok(mut c) = c else { continue };
            let _ = std::io::Write::write_all(&mut c, name.as_bytes());
        }
    });
    Ok((l, port))
}

/// A UDP server that answers with its name from the address each request
/// was sent to (IP_PKTINFO), as a service behind sk_lookup must: a steered
/// request arrives at an address the socket is not bound to, and a
/// connected client accepts only an answer from the address and port it
/// sent to, so the server listens on the steered port.
fn udp_server(name: &'static str) -> Result<(std::net::UdpSocket, u16)> {
    use nix::sys::socket::{
        ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, sendmsg,
    };
    use std::io::{IoSlice, IoSliceMut};
    let s = std::net::UdpSocket::bind((SERVER_IP, 53))?;
    setsockopt(&s, sockopt::Ipv4PacketInfo, &true)?;
    let port = s.local_addr()?.port();
    let server = s.try_clone()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut space = nix::cmsg_space!(libc::in_pktinfo);
        loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let Ok(msg) = recvmsg::<SockaddrIn>(
                server.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            ) else {
                return;
            };
            let Some(peer) = msg.address else { continue };
            let Some(dst) = msg
                .cmsgs()
                .ok()
                .into_iter()
                .flatten()
                .find_map(|c| match c {
                    ControlMessageOwned::Ipv4PacketInfo(i) => Some(i.ipi_addr),
                    _ => None,
                })
            else {
                continue;
            };
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: dst,
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            let _ = sendmsg(
                server.as_raw_fd(),
                &[IoSlice::new(name.as_bytes())],
                &[ControlMessage::Ipv4PacketInfo(&info)],
                MsgFlags::empty(),
                Some(&peer),
            );
        }
    });
    Ok((s, port))
}

/// A UDP client connected to `target`: the answer then finds it by its
/// connection, before any sk_lookup program, as an answer leaving the host
/// for a remote client would never meet the program at all.
fn udp_client(target: SocketAddr) -> Result<std::net::UdpSocket> {
    let c = std::net::UdpSocket::bind("0.0.0.0:0")?;
    c.connect(target)?;
    c.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    Ok(c)
}

/// One TCP connection: who answered, or the error.
fn dial(addr: SocketAddr) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    // Abortive close: no TIME_WAIT, so a long run does not run out of ports.
    nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    let mut name = String::new();
    s.read_to_string(&mut name)?;
    Ok(name)
}

fn rate(seconds: f64, mut once: impl FnMut() -> Result<()>) -> Result<f64> {
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        once()?;
        n += 1;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Live traffic through a real agent: connection and datagram rates with and
/// without the dispatcher (the same servers), then sustained churn while
/// connections run. Runs in a network namespace of its own; `bpffs` must be
/// a fresh bpffs.
pub fn traffic(
    scratch: &Path,
    bpffs: &Path,
    bindings: usize,
    churn_seconds: f64,
) -> Result<TrafficResult> {
    use crate::{cli::Client, proto::Request};
    // One CPU for client, servers and agent (see pin_to_cpu0).
    pin_to_cpu0()?;
    // The baseline: the same servers in a namespace without any program,
    // measured alternately with the dispatcher's, so drift hits both alike.
    let plain = Netns::new()?;
    let (_plain_tcp, plain_tcp_port) = tcp_server("A")?;
    let (_plain_udp, _) = udp_server("A")?;
    let plain_tcp = SocketAddr::new(SERVER_IP.into(), plain_tcp_port);
    let plain_udp = udp_client(SocketAddr::new(SERVER_IP.into(), 53))?;

    let steering = Netns::new()?;
    let (_a, a_port) = tcp_server("A")?;
    let (_b, _) = tcp_server("B")?;
    let (_c, _) = tcp_server("C")?;
    let (ua, ua_port) = udp_server("A")?;
    let direct_tcp = SocketAddr::new(SERVER_IP.into(), a_port);
    let direct_udp = udp_client(SocketAddr::new(SERVER_IP.into(), ua_port))?;

    // The agent, with `bindings` filler bindings plus the ones we dial.
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .to_owned();
    let control = scratch.join("traffic.sock");
    let _agent = Agent::start(&bin, bpffs, &control)?;
    let client = Client::new(control.clone(), false);
    for (label, fd) in [
        ("A", _a.as_fd()),
        ("B", _b.as_fd()),
        ("C", _c.as_fd()),
        ("A", ua.as_fd()),
    ] {
        client
            .call(
                &Request::Register {
                    label: label.parse()?,
                    names: vec![format!("bench {label}")],
                },
                &[fd],
            )
            .map_err(anyhow::Error::msg)?;
    }
    let (mut text, _) = filler_batch(0x7e57, bindings);
    // Dialled: a stable /24 on C; 4096 hosts in 100.64/20 that move between
    // A and B, under a /16 on C that must never answer for them.
    writeln!(text, "bind C tcp 198.51.100.0/24 80")?;
    writeln!(text, "bind A tcp 198.51.101.0/24 80")?;
    writeln!(text, "bind A udp 198.51.101.0/24 53")?;
    writeln!(text, "bind C tcp 100.64.0.0/16 80")?;
    const MOVING: u32 = 4096;
    for i in 0..MOVING {
        writeln!(text, "bind A tcp {} 80", Ipv4Addr::from(0x6440_0000 + i))?;
    }
    client
        .call(&Request::Apply { lines: text }, &[])
        .map_err(anyhow::Error::msg)?;
    for p in ["198.51.100.0/24", "198.51.101.0/24", "100.64.0.0/16"] {
        route_local(p)?;
    }

    let steered_tcp: SocketAddr = "198.51.101.7:80".parse()?;
    let steered_udp = udp_client("198.51.101.7:53".parse()?)?;
    // "Attached" reaches the server at its own address with the dispatcher
    // attached (a miss, so the normal lookup): the cost of having it.
    let tcp = |ns: &Netns, to: SocketAddr| -> Result<f64> {
        ns.enter()?;
        rate(0.25, || {
            ensure!(dial(to)? == "A", "wrong server");
            Ok(())
        })
    };
    let udp = |c: &std::net::UdpSocket| rate(0.25, || udp_exchange(c, "A"));
    let (mut tcp_direct, mut tcp_steered, mut tcp_attached) = (Vec::new(), Vec::new(), Vec::new());
    let (mut udp_direct, mut udp_steered, mut udp_attached) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        tcp_direct.push(tcp(&plain, plain_tcp)?);
        tcp_steered.push(tcp(&steering, steered_tcp)?);
        tcp_attached.push(tcp(&steering, direct_tcp)?);
        udp_direct.push(udp(&plain_udp)?);
        udp_steered.push(udp(&steered_udp)?);
        udp_attached.push(udp(&direct_udp)?);
    }
    steering.enter()?;
    // The churn below runs on both CPUs.
    unpin()?;

    // Churn: one thread moves the 4096 hosts between A and B in batches as
    // fast as the agent takes them; this thread dials meanwhile.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churner = {
        let stop = std::sync::Arc::clone(&stop);
        let control = control.clone();
        std::thread::spawn(move || -> Result<(usize, f64)> {
            let client = Client::new(control, false);
            let started = Instant::now();
            let mut changes = 0usize;
            let mut round = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let label = if round.is_multiple_of(2) { "B" } else { "A" };
                let mut lines = String::with_capacity(MOVING as usize * 32);
                for i in 0..MOVING {
                    writeln!(
                        lines,
                        "bind {label} tcp {} 80",
                        Ipv4Addr::from(0x6440_0000 + i)
                    )?;
                }
                client
                    .call(&Request::Apply { lines }, &[])
                    .map_err(anyhow::Error::msg)?;
                changes += MOVING as usize;
                round += 1;
            }
            Ok((changes, started.elapsed().as_secs_f64()))
        })
    };
    let (mut misdirected, mut failed_unchanged, mut failed_changing) = (0, 0, 0);
    let (mut to_changing, mut to_unchanged) = (0, 0);
    let started = Instant::now();
    let mut i = 0u32;
    while started.elapsed().as_secs_f64() < churn_seconds {
        let moving: SocketAddr =
            SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x6440_0000 + i % MOVING)), 80);
        match dial(moving) {
            Ok(n) if n == "A" || n == "B" => {}
            Ok(_) => misdirected += 1,
            Err(_) => failed_changing += 1,
        }
        to_changing += 1;
        let fixed: SocketAddr = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, (i % 250) as u8 + 1)),
            80,
        );
        match dial(fixed) {
            Ok(n) if n == "C" => {}
            Ok(_) => misdirected += 1,
            Err(_) => failed_unchanged += 1,
        }
        to_unchanged += 1;
        i = i.wrapping_add(1);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (churn_changes, churn_secs) = churner
        .join()
        .map_err(|_| anyhow::anyhow!("churn thread panicked"))??;
    let med = median;
    Ok(TrafficResult {
        tcp_ratios: (
            paired(&tcp_steered, &tcp_direct),
            paired(&tcp_steered, &tcp_attached),
        ),
        udp_ratios: (
            paired(&udp_steered, &udp_direct),
            paired(&udp_steered, &udp_attached),
        ),
        tcp_direct: med(tcp_direct),
        tcp_attached: med(tcp_attached),
        tcp_steered: med(tcp_steered),
        udp_direct: med(udp_direct),
        udp_attached: med(udp_attached),
        udp_steered: med(udp_steered),
        bindings: bindings + 4 + MOVING as usize,
        churn_rate: churn_changes as f64 / churn_secs,
        churn_changes,
        churn_connections: (to_changing, to_unchanged),
        misdirected,
        failed_unchanged,
        failed_changing,
    })
}

/// Pins the calling thread (and what it starts) to CPU 0: on a small VM,
/// where the scheduler places two ping-ponging threads swings a run by tens
/// of percent; on one CPU the comparison is of the work done.
fn pin_to_cpu0() -> Result<()> {
    let mut one = nix::sched::CpuSet::new();
    one.set(0)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).context("sched_setaffinity")
}

/// Undoes [`pin_to_cpu0`].
fn unpin() -> Result<()> {
    let mut all = nix::sched::CpuSet::new();
    for cpu in 0..nix::sched::CpuSet::count() {
        let _ = all.set(cpu);
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &all).context("sched_setaffinity")
}

/// Makes every address of `prefix` local to this namespace.
fn route_local(prefix: &str) -> Result<()> {
    let s = std::process::Command::new("ip")
        .args(["route", "add", "local", prefix, "dev", "lo"])
        .status()?;
    ensure!(s.success(), "ip route add local {prefix}");
    Ok(())
}

/// One UDP request and its answer on a connected client, which must come
/// from server `name`.
fn udp_exchange(client: &std::net::UdpSocket, name: &str) -> Result<()> {
    client.send(b"x")?;
    let mut buf = [0u8; 8];
    let n = client.recv(&mut buf)?;
    ensure!(
        &buf[..n] == name.as_bytes(),
        "UDP answered by {:?}",
        &buf[..n]
    );
    Ok(())
}

/// A network namespace of the bench's own, with loopback up and the
/// servers' network local; entered on creation.
struct Netns(std::fs::File);

impl Netns {
    fn new() -> Result<Self> {
        unshare_net()?;
        route_local(SERVER_NET)?;
        Ok(Self(std::fs::File::open("/proc/thread-self/ns/net")?))
    }

    /// Moves the calling thread into this namespace; sockets made from
    /// then on belong to it (sockets made before stay where they were).
    fn enter(&self) -> Result<()> {
        nix::sched::setns(&self.0, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")
    }
}

fn unshare_net() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare")?;
    let s = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    ensure!(s.success(), "ip link set lo up");
    Ok(())
}

/// UDP through the floor program: exchanges per second (medians) and the
/// paired ratios.
pub struct FloorResult {
    /// No program in the namespace.
    pub none: f64,
    /// Direct, with the floor program attached.
    pub attached: f64,
    /// Steered by the floor program.
    pub steered: f64,
    /// Median of steered / none, run by run.
    pub steered_vs_none: f64,
    /// Median of steered / attached, run by run.
    pub steered_vs_attached: f64,
}

/// UDP request/response rates through the floor program (one sockmap
/// assign for port 53, nothing else), set up like [`traffic`]: without a
/// program, direct with the floor attached, and steered by it, alternating.
/// Separates the hook's cost from the dispatcher's.
pub fn udp_floor() -> Result<FloorResult> {
    pin_to_cpu0()?;
    let _plain = Netns::new()?;
    let (_plain_server, _) = udp_server("A")?;
    let plain = udp_client(SocketAddr::new(SERVER_IP.into(), 53))?;
    let _floor = Netns::new()?;
    let (server, port) = udp_server("A")?;
    route_local("198.51.101.0/24")?;
    let mut ebpf = EbpfLoader::new().load(BENCH_OBJECT)?;
    let sockets = match ebpf.take_map("REF_SOCKETS").context("REF_SOCKETS")? {
        Map::SockMap(m) => m,
        _ => bail!("REF_SOCKETS is not a sockmap"),
    };
    sys::sockmap_update(sockets.fd().as_fd(), 0, server.as_fd())?;
    let prog: &mut SkLookup = ebpf
        .program_mut("bench_floor_port")
        .context("floor")?
        .try_into()?;
    prog.load()?;
    let netns = std::fs::File::open("/proc/thread-self/ns/net")?;
    prog.attach(&netns)?;
    let direct = udp_client(SocketAddr::new(SERVER_IP.into(), port))?;
    let steered = udp_client("198.51.101.7:53".parse()?)?;
    let (mut none, mut d, mut st) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        none.push(rate(0.25, || udp_exchange(&plain, "A"))?);
        st.push(rate(0.25, || udp_exchange(&steered, "A"))?);
        d.push(rate(0.25, || udp_exchange(&direct, "A"))?);
    }
    unpin()?;
    Ok(FloorResult {
        steered_vs_none: paired(&st, &none),
        steered_vs_attached: paired(&st, &d),
        none: median(none),
        attached: median(d),
        steered: median(st),
    })
}

/// The traffic figures as a report.
pub fn traffic_report(r: &TrafficResult) -> String {
    format!(
        "Live traffic on loopback, one client, everything pinned to one CPU; {} quarter-second \
         runs of each, alternating: the same servers in a namespace without a program, and in \
         the dispatcher's namespace reached at their own address and steered. Rates are medians; \
         ratios are medians of the ratios of runs made one after the other\n\n\
         | figure | direct, no program | direct, dispatcher attached | steered ({} bindings) | steered / direct, no program | steered / direct, attached |\n\
         |---|---:|---:|---:|---:|---:|\n\
         | TCP connections per second | {:.0} | {:.0} | {:.0} | {:.3}x | {:.3}x |\n\
         | UDP request/response per second | {:.0} | {:.0} | {:.0} | {:.3}x | {:.3}x |\n\n\
         Churn: 4096 host bindings moved between two labels in batches through lookupd while connections ran\n\n\
         | figure | value |\n\
         |---|---:|\n\
         | binding changes applied | {} |\n\
         | changes per second | {:.0} |\n\
         | connections to changing bindings | {} |\n\
         | connections to unchanged bindings | {} |\n\
         | misdirected connections | {} |\n\
         | failed connections to unchanged bindings | {} |\n\
         | failed connections to changing bindings | {} |\n",
        ROUNDS,
        r.bindings,
        r.tcp_direct,
        r.tcp_attached,
        r.tcp_steered,
        r.tcp_ratios.0,
        r.tcp_ratios.1,
        r.udp_direct,
        r.udp_attached,
        r.udp_steered,
        r.udp_ratios.0,
        r.udp_ratios.1,
        r.churn_changes,
        r.churn_rate,
        r.churn_connections.0,
        r.churn_connections.1,
        r.misdirected,
        r.failed_unchanged,
        r.failed_changing,
    )
}
