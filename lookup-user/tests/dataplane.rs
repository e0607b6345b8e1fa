//! The loaded program against the precedence rules, lookup by lookup.
//!
//! Random binding sets (IPv4 and IPv6, host and wider prefixes, specific and
//! wildcard ports, overlaps, a label without sockets) go through the real
//! `Dispatcher` into the real maps; random lookups run through the real
//! program with `BPF_PROG_TEST_RUN` and must pick exactly the socket named
//! by the first match in `bindings()` order, the order `lookupctl bindings`
//! prints. Needs root.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use aya::programs::SkLookup;
use lookup::{
    bench::Rng,
    binding::{Binding, Family, Label, Prefix, Protocol},
    dispatcher::Dispatcher,
    sys::{self, SkLookupCtx},
};
use lookup_tests::{BpfFs, NetNs, require_root};

const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

fn server(family: Family, protocol: Protocol) -> (OwnedFd, u64) {
    let fd = lookup::bench::server(family, protocol).expect("server socket");
    let cookie = lookup::socket::inspect(fd.as_fd()).expect("inspect").cookie;
    (fd, cookie)
}

/// A dispatcher in a network namespace and bpffs of its own; `None` (and
/// the test passes) without root, as `require_root` says.
fn lab() -> Option<(NetNs, BpfFs, Dispatcher)> {
    if !require_root() {
        return None;
    }
    let ns = NetNs::new(&[]);
    let fs = BpfFs::new();
    let d = Dispatcher::open_or_create(Path::new("/proc/thread-self/ns/net"), fs.path())
        .expect("open dispatcher");
    Some((ns, fs, d))
}

/// The cookie of each label's socket per family and protocol.
type Cookies = HashMap<(Label, Family, Protocol), u64>;

/// Registers a socket of every family and protocol for each label: the
/// sockets to keep open, and their cookies.
fn serve_labels(d: &mut Dispatcher, labels: &[Label]) -> (Vec<OwnedFd>, Cookies) {
    let mut keep = Vec::new();
    let mut cookies = HashMap::new();
    for label in labels {
        for family in [Family::Ipv4, Family::Ipv6] {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let (fd, cookie) = server(family, protocol);
                let copy = fd.try_clone().expect("dup");
                d.register(label, vec![(copy, format!("{label} {family} {protocol}"))])
                    .expect("register");
                cookies.insert((label.clone(), family, protocol), cookie);
                keep.push(fd);
            }
        }
    }
    (keep, cookies)
}

fn v4_pool(rng: &mut Rng) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        rng.index(3) as u8,
        rng.index(3) as u8,
        rng.index(6) as u8,
    )
}

fn v6_pool(rng: &mut Rng) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        rng.index(3) as u16,
        0,
        0,
        0,
        rng.index(3) as u16,
        rng.index(6) as u16,
    )
}

fn random_binding(rng: &mut Rng, labels: &[Label]) -> Binding {
    let protocol = rng.pick(&[Protocol::Tcp, Protocol::Udp]);
    let (addr, len) = if rng.index(2) == 0 {
        (
            IpAddr::V4(v4_pool(rng)),
            rng.pick(&[0u8, 8, 16, 23, 24, 29, 32, 32, 32]),
        )
    } else {
        (
            IpAddr::V6(v6_pool(rng)),
            rng.pick(&[0u8, 32, 48, 64, 112, 125, 128, 128, 128]),
        )
    };
    // Mask through the parser so the prefix is canonical.
    let masked = match addr {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(
            u32::from(a) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0),
        )),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(
            u128::from(a) & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0),
        )),
    };
    Binding {
        label: labels[rng.index(labels.len())].clone(),
        protocol,
        prefix: Prefix::new(masked, len).expect("canonical prefix"),
        port: rng.pick(&[0u16, 80, 443, 8080]),
    }
}

fn context(protocol: Protocol, ip: IpAddr, port: u16) -> SkLookupCtx {
    let mut ctx = SkLookupCtx {
        protocol: u32::from(protocol.number()),
        local_port: u32::from(port),
        remote_port: u32::from(40000u16.to_be()),
        ..Default::default()
    };
    match ip {
        IpAddr::V4(a) => {
            ctx.family = u32::from(Family::Ipv4.number());
            ctx.local_ip4 = u32::from_ne_bytes(a.octets());
            ctx.remote_ip4 = u32::from_ne_bytes([127, 0, 0, 9]);
        }
        IpAddr::V6(a) => {
            ctx.family = u32::from(Family::Ipv6.number());
            let o = a.octets();
            for i in 0..4 {
                ctx.local_ip6[i] = u32::from_ne_bytes(o[4 * i..4 * i + 4].try_into().unwrap());
            }
            ctx.remote_ip6[3] = u32::from_ne_bytes([0, 0, 0, 9]);
        }
    }
    ctx
}

fn check_lookups(
    seed: u64,
    rng: &mut Rng,
    d: &Dispatcher,
    prog: &SkLookup,
    cookies: &Cookies,
    rounds: usize,
) -> (usize, usize, usize) {
    let sorted = d.bindings();
    let fd = prog.fd().expect("program fd");
    let (mut steered, mut dropped, mut passed) = (0, 0, 0);
    for _ in 0..rounds {
        let protocol = rng.pick(&[Protocol::Tcp, Protocol::Udp]);
        let ip = if rng.index(2) == 0 {
            IpAddr::V4(v4_pool(rng))
        } else {
            IpAddr::V6(v6_pool(rng))
        };
        let port = rng.pick(&[80u16, 443, 8080, 22]);
        let family = if ip.is_ipv4() {
            Family::Ipv4
        } else {
            Family::Ipv6
        };
        let expected = match Binding::select(&sorted, protocol, ip, port) {
            None => (SK_PASS, 0),
            Some(b) => match cookies.get(&(b.label.clone(), family, protocol)) {
                Some(&c) => (SK_PASS, c),
                None => (SK_DROP, 0),
            },
        };
        let ctx = context(protocol, ip, port);
        let got = sys::sk_lookup_test_run(fd.as_fd(), &ctx, 1)
            .unwrap_or_else(|e| panic!("seed {seed}: test run for {protocol} {ip}:{port}: {e}"));
        assert_eq!(
            (got.retval, got.cookie),
            expected,
            "seed {seed}: {protocol} {ip}:{port}: the program disagrees with the first match in \
             precedence order {:?}\nbindings:\n{}",
            Binding::select(&sorted, protocol, ip, port),
            sorted
                .iter()
                .map(|b| format!("  {b}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        match expected {
            (SK_PASS, 0) => passed += 1,
            (SK_PASS, _) => steered += 1,
            _ => dropped += 1,
        }
    }
    (steered, dropped, passed)
}

#[test]
fn data_plane_matches_precedence_order() {
    let Some((_ns, _fs, mut d)) = lab() else {
        return;
    };
    let prog = SkLookup::from_pin(d.location().dir.join("program")).expect("pinned program");

    // Labels a..d have a socket of every family and protocol; "nosock" has none.
    let labels: Vec<Label> = ["a", "b", "c", "d", "nosock"]
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    let (keep, cookies) = serve_labels(&mut d, &labels[..4]);

    let mut totals = (0, 0, 0);
    for seed in [1u64, 2, 3, 0x5eed] {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        for _ in 0..400 {
            let b = random_binding(&mut rng, &labels);
            d.bind(&b)
                .unwrap_or_else(|e| panic!("seed {seed}: bind {b}: {e}"));
        }
        let (s, x, p) = check_lookups(seed, &mut rng, &d, &prog, &cookies, 3000);
        totals = (totals.0 + s, totals.1 + x, totals.2 + p);

        // Remove a random half, then the rest, checking after each step.
        let mut all = d.bindings();
        for i in (0..all.len()).rev() {
            if rng.index(2) == 0 {
                let b = all.swap_remove(i);
                d.unbind(&b)
                    .unwrap_or_else(|e| panic!("seed {seed}: unbind {b}: {e}"));
            }
        }
        check_lookups(seed, &mut rng, &d, &prog, &cookies, 1000);
        for b in all {
            d.unbind(&b)
                .unwrap_or_else(|e| panic!("seed {seed}: unbind {b}: {e}"));
        }
        assert!(d.bindings().is_empty());

        // The same through batches: a random set in one batch, then a batch
        // that moves, removes and adds at once.
        let text = |lines: &[(bool, Binding)]| {
            lines
                .iter()
                .map(|(bind, b)| {
                    format!(
                        "{} {} {} {} {}\n",
                        if *bind { "bind" } else { "unbind" },
                        b.label,
                        b.protocol,
                        b.prefix,
                        b.port
                    )
                })
                .collect::<String>()
        };
        let first: Vec<(bool, Binding)> = (0..400)
            .map(|_| (true, random_binding(&mut rng, &labels)))
            .collect();
        d.apply_batch(lookup::batch::parse(&text(&first)).expect("batch parses"))
            .unwrap_or_else(|e| panic!("seed {seed}: first batch: {e}"));
        check_lookups(seed, &mut rng, &d, &prog, &cookies, 1000);
        let mut second = Vec::new();
        for b in d.bindings() {
            match rng.index(3) {
                0 => second.push((false, b)),
                1 => {
                    let mut moved = b.clone();
                    moved.label = labels[rng.index(labels.len())].clone();
                    second.push((true, moved));
                }
                _ => {}
            }
        }
        for _ in 0..150 {
            second.push((true, random_binding(&mut rng, &labels)));
        }
        d.apply_batch(lookup::batch::parse(&text(&second)).expect("batch parses"))
            .unwrap_or_else(|e| panic!("seed {seed}: second batch: {e}"));
        check_lookups(seed, &mut rng, &d, &prog, &cookies, 1000);
        let all: Vec<(bool, Binding)> = d.bindings().into_iter().map(|b| (false, b)).collect();
        d.apply_batch(lookup::batch::parse(&text(&all)).expect("batch parses"))
            .unwrap_or_else(|e| panic!("seed {seed}: emptying batch: {e}"));
        assert!(d.bindings().is_empty());
        let (s, x, p) = check_lookups(seed, &mut rng, &d, &prog, &cookies, 200);
        assert_eq!(
            (s, x),
            (0, 0),
            "seed {seed}: with no bindings every lookup passes"
        );
        totals.2 += p;
    }
    // One address with more specific ports than its entry holds inline:
    // the rest live in the overflow table, which only this path reads.
    let host = |port: u16, label: &Label| Binding {
        label: label.clone(),
        protocol: Protocol::Tcp,
        prefix: "10.9.9.9".parse().expect("prefix"),
        port,
    };
    for port in 1..=7u16 {
        d.bind(&host(port, &labels[usize::from(port) % 4]))
            .expect("bind host port");
    }
    d.bind(&host(0, &labels[3])).expect("bind host wildcard");
    let fd = prog.fd().expect("program fd");
    for round in 0..2 {
        for port in 1..=9u16 {
            let want = if port <= 7 && !(round == 1 && port % 2 == 0) {
                &labels[usize::from(port) % 4]
            } else {
                &labels[3]
            };
            let ip: IpAddr = "10.9.9.9".parse().expect("ip");
            let got = sys::sk_lookup_test_run(fd.as_fd(), &context(Protocol::Tcp, ip, port), 1)
                .expect("test run");
            assert_eq!(
                got.cookie,
                cookies[&(want.clone(), Family::Ipv4, Protocol::Tcp)],
                "round {round}: port {port} should go to {want}"
            );
        }
        // Then drop the even ports, inline and overflow alike.
        for port in [2u16, 4, 6].into_iter().filter(|_| round == 0) {
            d.unbind(&host(port, &labels[usize::from(port) % 4]))
                .expect("unbind");
        }
    }

    // The sets must exercise all three outcomes, or the test proves little.
    assert!(
        totals.0 > 1000 && totals.1 > 100 && totals.2 > 500,
        "outcomes {totals:?}"
    );
    drop(keep);
}

/// Groups of concurrent requests, as the churn engine merges them, against
/// a model that applies them one after the other: every request must be
/// accepted or refused exactly as if alone and in order, and the merged
/// result must steer like the model's bindings.
#[test]
fn merged_groups_act_as_requests_in_order() {
    use lookup::{
        binding::Selector,
        churn::{Changes, apply_merged},
    };
    let Some((_ns, _fs, mut d)) = lab() else {
        return;
    };
    let prog = SkLookup::from_pin(d.location().dir.join("program")).expect("pinned program");
    let labels: Vec<Label> = ["a", "b", "c", "nosock"]
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    let (keep, cookies) = serve_labels(&mut d, &labels[..3]);

    // The model: bindings by selector, changed one request at a time.
    type Model = HashMap<Selector, Label>;
    fn unbind_in(model: &mut Model, b: &Binding) -> Result<(), String> {
        match model.get(&b.selector()) {
            None => Err(format!("no binding {}", b.selector())),
            Some(l) if l != &b.label => Err(format!("belongs to label \"{l}\"")),
            Some(_) => {
                model.remove(&b.selector());
                Ok(())
            }
        }
    }
    let mut model = Model::new();
    let (mut accepted, mut refused, mut merged_lines) = (0, 0, 0);
    for seed in [11u64, 12, 13] {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        for round in 0..30 {
            // Unbinds mostly of bindings that exist, some with the wrong
            // label; binds of random selectors, often ones already bound.
            let pick = |rng: &mut Rng, model: &Model| -> (bool, Binding) {
                let existing: Vec<_> = model.iter().collect();
                if !existing.is_empty() && rng.index(2) == 0 {
                    let (s, l) = existing[rng.index(existing.len())];
                    let label = if rng.index(5) == 0 {
                        labels[rng.index(labels.len())].clone()
                    } else {
                        l.clone()
                    };
                    let b = Binding {
                        label,
                        protocol: s.protocol,
                        prefix: s.prefix,
                        port: s.port,
                    };
                    // Mostly unbinds; the rest rebinds, to the same label or
                    // another.
                    (rng.index(3) == 0, b)
                } else {
                    (true, random_binding(rng, &labels))
                }
            };
            let mut requests = Vec::new();
            let mut expected = Vec::new();
            for _ in 0..1 + rng.index(40) {
                match rng.index(3) {
                    0 | 1 => {
                        let (bind, b) = pick(&mut rng, &model);
                        if bind {
                            let was = model.insert(b.selector(), b.label.clone());
                            expected.push(Ok(match was {
                                Some(l) if l == b.label => "already bound".to_string(),
                                Some(_) => "rebound".to_string(),
                                None => "bound".to_string(),
                            }));
                            requests.push(Changes::Bind(b));
                        } else {
                            expected
                                .push(unbind_in(&mut model, &b).map(|()| "unbound".to_string()));
                            requests.push(Changes::Unbind(b));
                        }
                    }
                    _ => {
                        let mut staged = model.clone();
                        let mut text = String::new();
                        let mut outcome = Ok("applied".to_string());
                        for line in 1..=1 + rng.index(6) {
                            let (bind, b) = pick(&mut rng, &staged);
                            text += &format!(
                                "{} {} {} {} {}\n",
                                if bind { "bind" } else { "unbind" },
                                b.label,
                                b.protocol,
                                b.prefix,
                                b.port
                            );
                            if bind {
                                staged.insert(b.selector(), b.label.clone());
                            } else if let Err(e) = unbind_in(&mut staged, &b)
                                && outcome.is_ok()
                            {
                                outcome = Err(format!("line {line}: \t{e}"));
                            }
                        }
                        if outcome.is_ok() {
                            // What it did, per binding it touched.
                            let lines = text.lines().count();
                            let touched: std::collections::HashSet<Selector> = text
                                .lines()
                                .map(|l| {
                                    let w: Vec<&str> = l.split(' ').collect();
                                    Binding::parse(w[1], w[2], w[3], w[4]).unwrap().selector()
                                })
                                .collect();
                            let (mut bound, mut moved, mut unbound) = (0, 0, 0);
                            for s in &touched {
                                match (model.get(s), staged.get(s)) {
                                    (None, Some(_)) => bound += 1,
                                    (Some(a), Some(b)) if a != b => moved += 1,
                                    (Some(_), None) => unbound += 1,
                                    _ => {}
                                }
                            }
                            outcome = Ok(format!(
                                "applied {lines} change{}: {bound} bound, {moved} moved, {unbound} unbound, {} unchanged",
                                if lines == 1 { "" } else { "s" },
                                lines - bound - moved - unbound
                            ));
                            model = staged;
                        }
                        merged_lines += text.lines().count();
                        expected.push(outcome);
                        requests.push(Changes::Apply(
                            lookup::batch::parse(&text).expect("batch parses"),
                        ));
                    }
                }
            }
            let got = apply_merged(&mut d, &requests);
            for (i, (got, want)) in got.iter().zip(&expected).enumerate() {
                let ok = match (got, want) {
                    (Ok(g), Ok(w)) => g.starts_with(w.as_str()),
                    // Every tab-separated part of the expected message.
                    (Err(g), Err(w)) => w.split('\t').all(|part| g.contains(part)),
                    _ => false,
                };
                assert!(
                    ok,
                    "seed {seed} round {round}: request {i} ({:?}) gave {got:?}, expected {want:?}",
                    requests[i]
                );
                if got.is_ok() {
                    accepted += 1;
                } else {
                    refused += 1;
                }
            }
            let mut now: Vec<String> = d.bindings().iter().map(ToString::to_string).collect();
            let mut want: Vec<String> = model
                .iter()
                .map(|(s, l)| {
                    Binding {
                        label: l.clone(),
                        protocol: s.protocol,
                        prefix: s.prefix,
                        port: s.port,
                    }
                    .to_string()
                })
                .collect();
            now.sort();
            want.sort();
            assert_eq!(
                now, want,
                "seed {seed} round {round}: bindings after the group"
            );
            check_lookups(seed, &mut rng, &d, &prog, &cookies, 300);
        }
    }
    assert!(
        accepted > 500 && refused > 50 && merged_lines > 300,
        "accepted {accepted}, refused {refused}, batch lines {merged_lines}"
    );
    drop(keep);
}

/// A group whose merged change cannot be applied (here: more labels than
/// destinations) is undone and applied request by request, so each request
/// still gets its own outcome and the accepted ones stay.
#[test]
fn a_failing_group_falls_back_to_one_by_one() {
    use lookup::churn::{Changes, apply_merged};
    let Some((_ns, _fs, mut d)) = lab() else {
        return;
    };
    let limit = lookup_common::MAX_DESTINATIONS as usize;
    let requests: Vec<Changes> = (0..limit + 5)
        .map(|i| {
            Changes::Bind(Binding {
                label: format!("l{i}").parse().unwrap(),
                protocol: Protocol::Tcp,
                prefix: format!("10.1.{}.{}/32", i / 256, i % 256).parse().unwrap(),
                port: 80,
            })
        })
        .collect();
    let got = apply_merged(&mut d, &requests);
    for (i, outcome) in got.iter().enumerate() {
        if i < limit {
            assert!(
                outcome.as_ref().is_ok_and(|m| m.starts_with("bound")),
                "request {i}: {outcome:?}"
            );
        } else {
            let e = outcome.as_ref().expect_err("past the destination limit");
            assert!(
                e.contains(&format!("l{i}")) && e.contains("destinations are in use"),
                "request {i}: {e}"
            );
        }
    }
    assert_eq!(d.bindings().len(), limit);

    // After a merged group fails, every request is tried again on its own:
    // the unbind, refused against the group's bind that never happened,
    // now finds the binding as it is.
    let host = |label: &str| Binding {
        label: label.parse().unwrap(),
        protocol: Protocol::Tcp,
        prefix: "10.1.0.0".parse().unwrap(),
        port: 80,
    };
    let got = apply_merged(
        &mut d,
        &[Changes::Bind(host("fresh")), Changes::Unbind(host("l0"))],
    );
    assert!(
        got[0]
            .as_ref()
            .is_err_and(|e| e.contains("destinations are in use")),
        "{got:?}"
    );
    assert_eq!(
        got[1].as_deref(),
        Ok("unbound tcp 10.1.0.0/32 port 80 -> l0"),
        "{got:?}"
    );
    assert_eq!(d.bindings().len(), limit - 1);
}

/// A batch is checked in precedence order, but its refusal names the first
/// bad line of the input, as the merged path (which checks in input order)
/// does: the same batch gets the same answer whichever path it takes.
#[test]
fn a_refused_batch_names_its_first_bad_line() {
    use lookup::churn::{Changes, apply_merged};
    let Some((_ns, _fs, mut d)) = lab() else {
        return;
    };
    // Line 2 (a host) sorts before line 1 (a /8); line 3 is fine.
    let text = "unbind a tcp 10.0.0.0/8 80\nunbind a tcp 10.0.0.1 80\nbind a tcp 10.0.0.2 80\n";
    let parse = || lookup::batch::parse(text).expect("parses");
    let direct = d.apply_batch(parse()).expect_err("refused").to_string();
    assert!(
        direct.starts_with("line 1: no binding tcp 10.0.0.0/8 port 80"),
        "{direct}"
    );
    let merged = apply_merged(&mut d, &[Changes::Apply(parse())]);
    assert_eq!(merged, vec![Err(direct)]);
    assert!(d.bindings().is_empty(), "a refused batch changes nothing");
}

/// A full host table refuses one more host with an error that says so, and
/// nothing changes: not the bindings, not what the data plane answers.
#[test]
fn a_full_host_table_refuses_and_changes_nothing() {
    use lookup::churn::{Changes, apply_merged};
    let Some((_ns, _fs, mut d)) = lab() else {
        return;
    };
    let prog = SkLookup::from_pin(d.location().dir.join("program")).expect("pinned program");
    let label: Label = "a".parse().unwrap();
    let (fd, cookie) = server(Family::Ipv4, Protocol::Tcp);
    d.register(&label, vec![(fd.try_clone().expect("dup"), "a".into())])
        .expect("register");
    let max = lookup_common::MAX_BINDINGS;
    let host = |i: u32| Ipv4Addr::from(0x0a00_0000 + i);
    let mut text = String::with_capacity(max as usize * 28);
    for i in 0..max {
        text.push_str(&format!("bind a tcp {} 80\n", host(i)));
    }
    d.apply_batch(lookup::batch::parse(&text).expect("parses"))
        .expect("a full table's worth fits");
    drop(text);
    assert_eq!(d.binding_count(), max as usize);

    let one_more = Binding {
        label: label.clone(),
        protocol: Protocol::Tcp,
        prefix: Prefix::new(IpAddr::V4(host(max)), 32).unwrap(),
        port: 80,
    };
    let batch = lookup::batch::parse(&format!("bind a tcp {} 80\n", host(max))).unwrap();
    let e = d
        .apply_batch(batch)
        .expect_err("the table is full")
        .to_string();
    assert!(e.contains("more than 1048576 host bindings"), "{e}");
    let got = apply_merged(&mut d, &[Changes::Bind(one_more.clone())]);
    let e = got[0].as_ref().expect_err("the table is full");
    assert!(
        e.contains(&format!("{}", one_more.selector())) && e.contains("full"),
        "{e}"
    );
    assert_eq!(d.binding_count(), max as usize);
    let fd_prog = prog.fd().expect("program fd");
    for (ip, want) in [(host(0), cookie), (host(max - 1), cookie), (host(max), 0)] {
        let got = sys::sk_lookup_test_run(
            fd_prog.as_fd(),
            &context(Protocol::Tcp, IpAddr::V4(ip), 80),
            1,
        )
        .expect("test run");
        assert_eq!((got.retval, got.cookie), (SK_PASS, want), "{ip}");
    }
    // A moved binding still fits: the table is full, not frozen.
    let mut moved = one_more.clone();
    moved.prefix = Prefix::new(IpAddr::V4(host(7)), 32).unwrap();
    moved.label = "b".parse().unwrap();
    assert!(apply_merged(&mut d, &[Changes::Bind(moved)])[0].is_ok());

    // Room for two: a batch adding two hosts keeps that room while it is
    // written in steps, and a bind served between its steps is refused
    // rather than leaving the batch half applied.
    let freed = lookup::batch::parse(&format!(
        "unbind a tcp {} 80\nunbind a tcp {} 80\n",
        host(0),
        host(1)
    ))
    .unwrap();
    d.apply_batch(freed).expect("unbinds");
    let two = lookup::batch::parse(&format!(
        "bind a tcp {} 80\nbind a tcp {} 80\n",
        host(max),
        host(max + 1)
    ))
    .unwrap();
    let mut check = d.begin_check(two);
    assert!(d.check_some(&mut check, usize::MAX).expect("checks"));
    let mut plan = d.plan_batch(check).expect("fits");
    let mut between = one_more;
    between.prefix = Prefix::new(IpAddr::V4(host(max + 2)), 32).unwrap();
    let e = d
        .bind(&between)
        .expect_err("the room is the batch's")
        .to_string();
    assert!(e.contains("full"), "{e}");
    while !plan.is_done() {
        d.apply_chunk(&mut plan, 1).expect("the batch's step fits");
    }
    let summary = d.finish_batch(plan).expect("finish");
    assert!(summary.contains("2 bound"), "{summary}");
    assert_eq!(d.binding_count(), max as usize);
    drop(fd);
}

/// A large batch is checked, then written in steps with other requests
/// served between them. A removal it checked is not applied to a binding
/// another request has moved since: that request counts as coming after
/// the batch, and its binding stays. A binding the batch sets is set
/// whatever happened in between, as if the batch came last.
#[test]
fn a_batch_does_not_remove_what_others_moved_meanwhile() {
    let Some((_ns, _fs, mut d)) = lab() else {
        return;
    };
    let b = |label: &str, prefix: &str| Binding {
        label: label.parse().unwrap(),
        protocol: Protocol::Tcp,
        prefix: prefix.parse().unwrap(),
        port: 80,
    };
    for prefix in ["10.0.0.1", "10.0.0.2", "10.9.0.0/16", "10.8.0.0/16"] {
        d.bind(&b("a", prefix)).expect("bind");
    }
    let batch = lookup::batch::parse(
        "unbind a tcp 10.0.0.1 80\nunbind a tcp 10.9.0.0/16 80\n\
         unbind a tcp 10.0.0.2 80\nunbind a tcp 10.8.0.0/16 80\n\
         bind c tcp 10.0.0.3 80\n",
    )
    .unwrap();
    let mut check = d.begin_check(batch);
    assert!(d.check_some(&mut check, usize::MAX).expect("checks"));
    let mut plan = d.plan_batch(check).expect("plans");
    // Between the check and the writes, another client moves two of the
    // bindings the batch removes, and binds what the batch binds.
    d.bind(&b("z", "10.0.0.1")).expect("move host");
    d.bind(&b("z", "10.9.0.0/16")).expect("move prefix");
    d.bind(&b("z", "10.0.0.3")).expect("bind host");
    while !plan.is_done() {
        d.apply_chunk(&mut plan, 1).expect("step");
    }
    let summary = d.finish_batch(plan).expect("finish");
    assert!(summary.contains("2 unbound"), "{summary}");
    let mut now: Vec<String> = d.bindings().iter().map(ToString::to_string).collect();
    now.sort();
    assert_eq!(
        now,
        [
            "tcp 10.0.0.1/32 port 80 -> z",
            "tcp 10.0.0.3/32 port 80 -> c",
            "tcp 10.9.0.0/16 port 80 -> z",
        ]
    );
}

fn tcp80(label: &str, prefix: &str) -> Binding {
    Binding {
        label: label.parse().unwrap(),
        protocol: Protocol::Tcp,
        prefix: prefix.parse().unwrap(),
        port: 80,
    }
}

fn sorted_bindings(d: &Dispatcher) -> Vec<String> {
    let mut v: Vec<String> = d.bindings().iter().map(ToString::to_string).collect();
    v.sort();
    v
}

/// The removal guard holds even when the label the batch checked against
/// loses its last binding meanwhile and its destination id goes to another
/// label: ids are compared with their generation.
#[test]
fn a_batch_removal_is_not_fooled_by_a_reused_destination() {
    let Some((_ns, _fs, mut d)) = lab() else {
        return;
    };
    for p in ["10.0.0.1", "10.9.0.0/16"] {
        d.bind(&tcp80("a", p)).unwrap();
    }
    let batch = lookup::batch::parse(
        "unbind a tcp 10.0.0.1 80\nunbind a tcp 10.9.0.0/16 80\nbind c tcp 10.0.0.3 80\n",
    )
    .unwrap();
    let mut check = d.begin_check(batch);
    assert!(d.check_some(&mut check, usize::MAX).unwrap());
    let mut plan = d.plan_batch(check).unwrap();
    // Another client frees label a's id, and z gets it.
    for p in ["10.0.0.1", "10.9.0.0/16"] {
        d.unbind(&tcp80("a", p)).unwrap();
    }
    for p in ["10.0.0.1", "10.9.0.0/16"] {
        d.bind(&tcp80("z", p)).unwrap();
    }
    while !plan.is_done() {
        d.apply_chunk(&mut plan, 1).unwrap();
    }
    d.finish_batch(plan).unwrap();
    assert_eq!(
        sorted_bindings(&d),
        [
            "tcp 10.0.0.1/32 port 80 -> z",
            "tcp 10.0.0.3/32 port 80 -> c",
            "tcp 10.9.0.0/16 port 80 -> z"
        ]
    );
}

/// A label an earlier lookupd accepted (with a space) is read back from the
/// pinned state with its bindings, and its destination is never handed to
/// another label.
#[test]
fn labels_pinned_by_an_earlier_agent_keep_their_bindings() {
    use aya::maps::{Array, Map, MapData};
    use lookup_common::{DestinationRecord, map_names};
    let Some((_ns, fs, mut d)) = lab() else {
        return;
    };
    d.bind(&tcp80("ab", "10.0.0.1")).unwrap();
    let dir = d.location().dir.clone();
    drop(d);
    // What an earlier lookupd wrote for `bind "a b" ...`.
    let data = MapData::from_pin(dir.join(map_names::DESTINATIONS)).unwrap();
    let mut records: Array<MapData, DestinationRecord> = Map::Array(data).try_into().unwrap();
    let mut r = records.get(&0, 0).unwrap();
    r.label[..3].copy_from_slice(b"a b");
    r.label_len = 3;
    records.set(0, r, 0).unwrap();
    drop(records);
    let mut d = Dispatcher::open_or_create(Path::new("/proc/thread-self/ns/net"), fs.path())
        .expect("reopen");
    assert_eq!(sorted_bindings(&d), ["tcp 10.0.0.1/32 port 80 -> a b"]);
    d.bind(&tcp80("new", "10.0.0.2")).unwrap();
    assert_eq!(
        sorted_bindings(&d),
        [
            "tcp 10.0.0.1/32 port 80 -> a b",
            "tcp 10.0.0.2/32 port 80 -> new"
        ]
    );
}

/// A step that fails part way is undone. Where the step removed a prefix
/// and the undo brings it back under another table, the old table is
/// emptied before it is free for the next new prefix.
#[test]
fn an_undone_step_leaves_no_stale_port_entries() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use lookup_common::{BindingKey, HostValue, map_names};
    let Some((_ns, _fs, mut d)) = lab() else {
        return;
    };
    let prog = SkLookup::from_pin(d.location().dir.join("program")).expect("pinned program");
    let labels: Vec<Label> = ["a", "r"].iter().map(|l| l.parse().unwrap()).collect();
    let (keep, cookies) = serve_labels(&mut d, &labels);
    // Table 0 for 20.1/16, table 1 for 20.2/16 (port 80 -> a); 0 freed.
    d.bind(&tcp80("a", "20.1.0.0/16")).unwrap();
    d.bind(&tcp80("a", "20.2.0.0/16")).unwrap();
    d.unbind(&tcp80("a", "20.1.0.0/16")).unwrap();
    // The host map one entry short of full, then filled from outside, so
    // the next host write fails in the kernel.
    let max = lookup_common::MAX_BINDINGS;
    let host = |i: u32| Ipv4Addr::from(0x0a00_0000 + i);
    let text: String = (0..max - 1)
        .map(|i| format!("bind a tcp {} 80\n", host(i)))
        .collect();
    d.apply_batch(lookup::batch::parse(&text).unwrap()).unwrap();
    drop(text);
    let data = MapData::from_pin(d.location().dir.join(map_names::HOSTS)).unwrap();
    let mut hosts: BpfHashMap<MapData, BindingKey, HostValue> =
        Map::HashMap(data).try_into().unwrap();
    let mut outsider = BindingKey {
        protocol: 17,
        family: 2,
        port: [0, 0],
        addr: [0; 16],
    };
    outsider.addr[..4].copy_from_slice(&[203, 0, 113, 1]);
    let value = HostValue {
        default_destination: lookup_common::NO_DESTINATION,
        more: 0,
        ports: [0; lookup_common::HOST_INLINE_PORTS],
        destinations: [0; lookup_common::HOST_INLINE_PORTS],
    };
    hosts.insert(outsider, value, 0).unwrap();
    // One step: a new host (which fails) and the removal of 20.2/16.
    let batch = lookup::batch::parse(&format!(
        "bind a tcp {} 80\nunbind a tcp 20.2.0.0/16 80\n",
        host(max)
    ))
    .unwrap();
    let mut check = d.begin_check(batch);
    assert!(d.check_some(&mut check, usize::MAX).unwrap());
    let mut plan = d.plan_batch(check).unwrap();
    d.apply_chunk(&mut plan, usize::MAX)
        .expect_err("the host write fails");
    d.finish_batch(plan).unwrap();
    hosts.remove(&outsider).unwrap();
    assert!(
        sorted_bindings(&d).contains(&"tcp 20.2.0.0/16 port 80 -> a".to_string()),
        "the failed step was undone"
    );
    // A new prefix with a port 0 binding only: port 80 must go to r.
    d.bind(&Binding {
        port: 0,
        ..tcp80("r", "30.0.0.0/8")
    })
    .unwrap();
    let fd = prog.fd().expect("program fd");
    for (ip, want) in [("30.0.0.1", "r"), ("20.2.0.1", "a")] {
        let got = sys::sk_lookup_test_run(
            fd.as_fd(),
            &context(Protocol::Tcp, ip.parse().unwrap(), 80),
            1,
        )
        .unwrap();
        assert_eq!(
            got.cookie,
            cookies[&(want.parse().unwrap(), Family::Ipv4, Protocol::Tcp)],
            "{ip}:80 must go to {want}"
        );
    }
    drop(keep);
}
