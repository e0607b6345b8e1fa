//! What the data plane does with real traffic: precedence, pass-through,
//! refusal, and what happens when a service's socket goes away.

use std::net::SocketAddr;

use lookup_tests::{
    EchoProcess, Lab, Proto, TcpEcho, UdpEcho,
    agent::{expect_destination, metric},
    assert_answers, assert_refused,
    bindings::{first_match, parse_bindings},
    client::dial,
    process::EchoSpec,
    require_root, sa,
};

/// A TCP and a UDP server answering with `label`, registered for `label`.
struct Service {
    _tcp: TcpEcho,
    _udp: UdpEcho,
}

impl Service {
    /// Both servers on `host` (an IP literal, `127.0.0.1` or `::1`), ports
    /// picked by the kernel, registered with one `lookupctl register`.
    #[track_caller]
    fn start(lab: &Lab, label: &str, host: &str) -> Service {
        let bind = if host.contains(':') {
            format!("[{host}]:0")
        } else {
            format!("{host}:0")
        };
        let tcp = TcpEcho::new(label, &bind);
        let udp = UdpEcho::new(label, &bind);
        lab.register_fds(label, &[tcp.fd(), udp.fd()], Some(&["tcp", "udp"]))
            .ok();
        Service {
            _tcp: tcp,
            _udp: udp,
        }
    }
}

/// One binding of a precedence table; `None` binds both protocols.
struct Rule {
    label: &'static str,
    proto: Option<Proto>,
    prefix: &'static str,
    port: u16,
}

const fn rule(label: &'static str, proto: Option<Proto>, prefix: &'static str, port: u16) -> Rule {
    Rule {
        label,
        proto,
        prefix,
        port,
    }
}

/// Binds every rule, dials every target and checks the answer against the
/// expected label, both on the wire and in the order `bindings` prints.
/// Reports every mismatch at once.
#[track_caller]
fn check_precedence(lab: &Lab, host: &str, rules: &[Rule], targets: &[(Proto, &str, &str)]) {
    let mut labels: Vec<&str> = rules.iter().map(|r| r.label).collect();
    labels.sort_unstable();
    labels.dedup();
    let _services: Vec<Service> = labels
        .iter()
        .map(|l| Service::start(lab, l, host))
        .collect();
    let mut bound = 0;
    for r in rules {
        for proto in Proto::ALL {
            if r.proto.is_none_or(|p| p == proto) {
                lab.bind(r.label, proto, r.prefix, r.port);
                bound += 1;
            }
        }
    }
    let rows = parse_bindings(&lab.bindings_json());
    assert_eq!(
        rows.len(),
        bound,
        "bindings lists {} rows after {bound} binds: {rows:#?}",
        rows.len()
    );

    let mut failures = Vec::new();
    for &(proto, target, want) in targets {
        let addr = sa(target);
        match dial(proto, addr) {
            Ok(got) if got == want => {}
            Ok(got) => failures.push(format!(
                "{proto} {addr}: answered by {got:?}, expected {want:?}"
            )),
            Err(e) => failures.push(format!(
                "{proto} {addr}: {e} ({:?}), expected {want:?}",
                e.kind()
            )),
        }
        let first = first_match(&rows, proto, addr).map(|b| b.label.as_str());
        if first != Some(want) {
            failures.push(format!(
                "{proto} {addr}: first matching row of `lookupctl bindings` is {first:?}, \
                 expected {want:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "precedence mismatches:\n  {}\nbindings in printed order:\n{rows:#?}",
        failures.join("\n  ")
    );
}

#[test]
fn precedence_ipv4() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24", "198.51.100.0/24"]);
    let tcp = Some(Proto::Tcp);
    let udp = Some(Proto::Udp);
    let rules = [
        rule("any", None, "0.0.0.0/0", 0),
        rule("any-22", None, "0.0.0.0/0", 22),
        rule("net", None, "192.0.2.0/24", 0),
        rule("net-443", None, "192.0.2.0/24", 443),
        rule("half", None, "192.0.2.0/25", 0),
        rule("host", None, "192.0.2.1", 0),
        rule("host-80", None, "192.0.2.1", 80),
        rule("tcp-only", tcp, "192.0.2.3", 0),
        rule("udp-only", udp, "192.0.2.4", 53),
    ];
    // A plain server outside every IPv4 binding's family: 0.0.0.0/0 must not
    // capture IPv6.
    let _v6_tcp = TcpEcho::new("plain-v6", "[::1]:4242");
    let _v6_udp = UdpEcho::new("plain-v6", "[::1]:4242");
    let mut targets = Vec::new();
    for proto in Proto::ALL {
        targets.extend([
            // Host binding with the port beats the host binding without.
            (proto, "192.0.2.1:80", "host-80"),
            // The longest prefix wins even over a specific port.
            (proto, "192.0.2.1:443", "host"),
            (proto, "192.0.2.1:8080", "host"),
            (proto, "192.0.2.2:443", "half"),
            (proto, "192.0.2.2:80", "half"),
            // Equal prefix: the specific port beats port 0.
            (proto, "192.0.2.200:443", "net-443"),
            (proto, "192.0.2.200:80", "net"),
            (proto, "192.0.2.200:65535", "net"),
            (proto, "192.0.2.200:22", "net"),
            (proto, "198.51.100.1:443", "any"),
            (proto, "198.51.100.1:22", "any-22"),
            (proto, "127.0.0.1:4242", "any"),
            (proto, "[::1]:4242", "plain-v6"),
        ]);
    }
    // The protocol must match.
    targets.extend([
        (Proto::Tcp, "192.0.2.3:80", "tcp-only"),
        (Proto::Udp, "192.0.2.3:80", "half"),
        (Proto::Udp, "192.0.2.4:53", "udp-only"),
        (Proto::Tcp, "192.0.2.4:53", "half"),
        (Proto::Udp, "192.0.2.4:54", "half"),
    ]);
    // `plain-v6` is not in `bindings`, so skip the order check for it.
    check_precedence_with_passthrough(&lab, "127.0.0.1", &rules, &targets);
}

#[test]
fn precedence_ipv6() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["2001:db8::/32", "2001:db9::/32"]);
    let tcp = Some(Proto::Tcp);
    let udp = Some(Proto::Udp);
    let rules = [
        rule("any", None, "::/0", 0),
        rule("any-22", None, "::/0", 22),
        rule("net", None, "2001:db8::/32", 0),
        rule("net-443", None, "2001:db8::/32", 443),
        rule("half", None, "2001:db8::/33", 0),
        rule("host", None, "2001:db8::1", 0),
        rule("host-80", None, "2001:db8::1", 80),
        rule("tcp-only", tcp, "2001:db8::3", 0),
        rule("udp-only", udp, "2001:db8::4", 53),
    ];
    // ::/0 must never capture IPv4.
    let _v4_tcp = TcpEcho::new("plain-v4", "127.0.0.1:4242");
    let _v4_udp = UdpEcho::new("plain-v4", "127.0.0.1:4242");
    let mut targets = Vec::new();
    for proto in Proto::ALL {
        targets.extend([
            (proto, "[2001:db8::1]:80", "host-80"),
            (proto, "[2001:db8::1]:443", "host"),
            (proto, "[2001:db8::1]:8080", "host"),
            (proto, "[2001:db8::2]:443", "half"),
            (proto, "[2001:db8::2]:80", "half"),
            // Outside 2001:db8::/33 (bit 32 set), inside 2001:db8::/32.
            (proto, "[2001:db8:8000::1]:443", "net-443"),
            (proto, "[2001:db8:8000::1]:80", "net"),
            (proto, "[2001:db8:8000::1]:22", "net"),
            (proto, "[2001:db9::1]:443", "any"),
            (proto, "[2001:db9::1]:22", "any-22"),
            (proto, "[::1]:4242", "any"),
            (proto, "127.0.0.1:4242", "plain-v4"),
        ]);
    }
    targets.extend([
        (Proto::Tcp, "[2001:db8::3]:80", "tcp-only"),
        (Proto::Udp, "[2001:db8::3]:80", "half"),
        (Proto::Udp, "[2001:db8::4]:53", "udp-only"),
        (Proto::Tcp, "[2001:db8::4]:53", "half"),
    ]);
    check_precedence_with_passthrough(&lab, "::1", &rules, &targets);
}

/// [`check_precedence`] for the targets some binding covers, plus plain
/// answers (no binding in `bindings`) for the rest.
#[track_caller]
fn check_precedence_with_passthrough(
    lab: &Lab,
    host: &str,
    rules: &[Rule],
    targets: &[(Proto, &str, &str)],
) {
    let (plain, steered): (Vec<_>, Vec<_>) = targets
        .iter()
        .copied()
        .partition(|(_, _, want)| want.starts_with("plain-"));
    check_precedence(lab, host, rules, &steered);
    let rows = parse_bindings(&lab.bindings_json());
    for (proto, target, want) in plain {
        assert_eq!(
            first_match(&rows, proto, sa(target)).map(|b| b.label.clone()),
            None,
            "{proto} {target} should match no binding"
        );
        assert_answers(proto, target, want);
    }
}

#[test]
fn no_binding_passes_through() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&[]);
    let servers: Vec<_> = ["127.0.0.1:8000", "[::1]:8000"]
        .into_iter()
        .map(|a| {
            (
                TcpEcho::new(&format!("plain {a}"), a),
                UdpEcho::new(&format!("plain {a}"), a),
            )
        })
        .collect();
    let check_plain = |why: &str| {
        for (t, u) in &servers {
            for (proto, addr, name) in [
                (Proto::Tcp, t.addr(), t.name()),
                (Proto::Udp, u.addr(), u.name()),
            ] {
                match dial(proto, addr) {
                    Ok(got) if got == name => {}
                    other => panic!("{why}: {proto} {addr} should reach {name:?}, got {other:?}"),
                }
            }
        }
    };
    check_plain("no bindings at all");

    // A binding for another port of the same address reserves that port only.
    for proto in Proto::ALL {
        lab.bind("elsewhere", proto, "127.0.0.1", 8001);
        lab.bind("elsewhere", proto, "::1", 8001);
    }
    check_plain("bindings for port 8001 only");
    for proto in Proto::ALL {
        assert_refused(proto, "127.0.0.1:8001");
        assert_refused(proto, "[::1]:8001");
    }

    // A binding for the other protocol leaves this one alone.
    lab.bind("tcp-only", Proto::Tcp, "127.0.0.1", 0);
    assert_refused(Proto::Tcp, "127.0.0.1:8000");
    assert_answers(Proto::Udp, "127.0.0.1:8000", "plain 127.0.0.1:8000");
    lab.ctl_ok(&["unbind", "tcp-only", "tcp", "127.0.0.1", "0"]);
    check_plain("after unbinding tcp 127.0.0.1 port 0");

    // IPv6 everything does not touch IPv4, and the reverse.
    for proto in Proto::ALL {
        lab.bind("v6-all", proto, "::/0", 0);
    }
    for proto in Proto::ALL {
        assert_answers(proto, "127.0.0.1:8000", "plain 127.0.0.1:8000");
        assert_refused(proto, "[::1]:8000");
    }
    for proto in Proto::ALL {
        lab.ctl_ok(&["unbind", "v6-all", proto.as_str(), "::/0", "0"]);
        lab.bind("v4-all", proto, "0.0.0.0/0", 0);
    }
    for proto in Proto::ALL {
        assert_refused(proto, "127.0.0.1:8000");
        assert_answers(proto, "[::1]:8000", "plain [::1]:8000");
    }
    for proto in Proto::ALL {
        lab.ctl_ok(&["unbind", "v4-all", proto.as_str(), "0.0.0.0/0", "0"]);
    }
    check_plain("after unbinding everything");
}

#[test]
fn binding_without_socket_refuses_even_an_exact_listener() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24", "2001:db8::/32"]);
    let exact = ["192.0.2.1:80", "[2001:db8::1]:80"];
    let _servers: Vec<_> = exact
        .iter()
        .map(|a| (TcpEcho::new("exact", a), UdpEcho::new("exact", a)))
        .collect();
    for a in exact {
        for proto in Proto::ALL {
            assert_answers(proto, a, "exact");
        }
    }
    for proto in Proto::ALL {
        lab.bind("ghost", proto, "192.0.2.1", 80);
        lab.bind("ghost", proto, "2001:db8::1", 80);
    }
    for a in exact {
        for proto in Proto::ALL {
            assert_refused(proto, a);
        }
    }
    let status = lab.status_json();
    for family in ["ipv4", "ipv6"] {
        for proto in Proto::ALL {
            let d = expect_destination(&status, "ghost", family, proto);
            assert!(d["socket_cookie"].is_null(), "ghost has a socket: {d}");
            let (lookups, misses) = (metric(d, "lookups"), metric(d, "misses"));
            assert!(misses >= 1, "refusal not counted as a miss: {d}");
            assert_eq!(lookups, misses, "every lookup of ghost was a miss: {d}");
            for e in [
                "errors_family",
                "errors_protocol",
                "errors_state",
                "errors_other",
            ] {
                assert_eq!(metric(d, e), 0, "{e} counted for a missing socket: {d}");
            }
        }
    }
    // Unbinding gives the address back to the normal socket lookup.
    for proto in Proto::ALL {
        lab.ctl_ok(&["unbind", "ghost", proto.as_str(), "192.0.2.1", "80"]);
        lab.ctl_ok(&["unbind", "ghost", proto.as_str(), "2001:db8::1", "80"]);
    }
    for a in exact {
        for proto in Proto::ALL {
            assert_answers(proto, a, "exact");
        }
    }
}

#[test]
fn service_that_exits_is_refused_not_hung() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24", "2001:db8::/32"]);
    let mut svc = EchoProcess::spawn(
        "svc",
        EchoSpec::default()
            .tcp("127.0.0.1:0")
            .tcp("[::1]:0")
            .udp("127.0.0.1:0")
            .udp("[::1]:0"),
    );
    let pid = svc.pid().to_string();
    for &(proto, addr) in svc.bound() {
        lab.register_pid(&pid, "svc", proto, &addr.ip().to_string(), addr.port())
            .ok();
        let prefix = if addr.is_ipv4() {
            "192.0.2.0/24"
        } else {
            "2001:db8::/32"
        };
        lab.bind("svc", proto, prefix, 0);
    }
    let targets: [(Proto, SocketAddr); 4] = [
        (Proto::Tcp, sa("192.0.2.10:80")),
        (Proto::Udp, sa("192.0.2.10:53")),
        (Proto::Tcp, sa("[2001:db8::10]:80")),
        (Proto::Udp, sa("[2001:db8::10]:53")),
    ];
    for (proto, addr) in targets {
        assert_answers(proto, addr, "svc");
    }
    let status = lab.status_json();
    for family in ["ipv4", "ipv6"] {
        for proto in Proto::ALL {
            let d = expect_destination(&status, "svc", family, proto);
            assert!(
                d["socket_cookie"].is_u64(),
                "registered socket has no cookie: {d}"
            );
        }
    }

    svc.kill();
    // The agent must not keep a copy of the socket: with the service gone
    // the kernel drops it from the sockmap and the binding refuses at once.
    for (proto, addr) in targets {
        assert_refused(proto, addr);
    }
    let status = lab.status_json();
    for family in ["ipv4", "ipv6"] {
        for proto in Proto::ALL {
            let d = expect_destination(&status, "svc", family, proto);
            assert!(
                d["socket_cookie"].is_null(),
                "status still shows a socket after the service exited: {d}"
            );
            assert!(
                metric(d, "misses") >= 1,
                "refusal not counted as a miss: {d}"
            );
        }
    }
}

#[test]
fn unregister_refuses_traffic_and_rejects_absent_destinations() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24"]);
    let _svc = Service::start(&lab, "web", "127.0.0.1");
    for proto in Proto::ALL {
        lab.bind("web", proto, "192.0.2.0/24", 0);
        assert_answers(proto, "192.0.2.5:80", "web");
    }

    lab.ctl_ok(&["unregister", "web", "ipv4", "tcp"]);
    assert_refused(Proto::Tcp, "192.0.2.5:80");
    assert_answers(Proto::Udp, "192.0.2.5:80", "web");
    lab.ctl_ok(&["unregister", "web", "ipv4", "udp"]);
    assert_refused(Proto::Udp, "192.0.2.5:80");
    let status = lab.status_json();
    for proto in Proto::ALL {
        let d = expect_destination(&status, "web", "ipv4", proto);
        assert!(
            d["socket_cookie"].is_null(),
            "unregistered but has a socket: {d}"
        );
    }

    // Errors for what is not there, and nothing changes.
    let before = lab.status_json();
    lab.ctl_err(&["unregister", "web", "ipv4", "tcp"])
        .stderr_mentions(&["web"]);
    lab.ctl_err(&["unregister", "web", "ipv6", "udp"])
        .stderr_mentions(&["web"]);
    lab.ctl_err(&["unregister", "nobody", "ipv4", "tcp"])
        .stderr_mentions(&["nobody"]);
    assert_eq!(
        lab.status_json(),
        before,
        "a failed unregister changed the status"
    );

    // Registering again brings the binding back.
    let _again = Service::start(&lab, "web", "127.0.0.1");
    for proto in Proto::ALL {
        assert_answers(proto, "192.0.2.5:80", "web");
    }
}

#[test]
fn socket_that_turns_bad_is_refused_and_counted() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24"]);
    let udp = UdpEcho::new("web", "127.0.0.1:0");
    lab.register_fds("web", &[udp.fd()], None).ok();
    lab.bind("web", Proto::Udp, "192.0.2.0/24", 53);
    assert_answers(Proto::Udp, "192.0.2.1:53", "web");

    // Registration checked the socket, but its owner can still connect it
    // afterwards; the kernel then refuses to assign it, and the data plane
    // must refuse the datagram and count why.
    lookup_tests::sock::connect(udp.fd(), sa("127.0.0.1:9")).expect("connect the server socket");
    assert_refused(Proto::Udp, "192.0.2.1:53");
    let status = lab.status_json();
    let d = expect_destination(&status, "web", "ipv4", Proto::Udp);
    assert!(
        d["socket_cookie"].is_u64(),
        "the connected socket is still in the sockmap: {d}"
    );
    assert!(
        metric(d, "errors_state") >= 1,
        "a connected socket is counted as errors_state: {d}"
    );
    assert_eq!(
        metric(d, "misses"),
        0,
        "not a miss: the socket is there: {d}"
    );
    for e in ["errors_family", "errors_protocol", "errors_other"] {
        assert_eq!(metric(d, e), 0, "wrong reason counted: {d}");
    }
}

#[test]
fn unbind_falls_back_and_bind_moves_a_binding() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24"]);
    let _a = Service::start(&lab, "a", "127.0.0.1");
    let _b = Service::start(&lab, "b", "127.0.0.1");
    for proto in Proto::ALL {
        lab.bind("a", proto, "192.0.2.0/24", 0);
        lab.bind("b", proto, "192.0.2.1", 0);
        assert_answers(proto, "192.0.2.1:80", "b");
        assert_answers(proto, "192.0.2.2:80", "a");
    }
    // Without the more specific binding, the wider one takes over.
    for proto in Proto::ALL {
        lab.ctl_ok(&["unbind", "b", proto.as_str(), "192.0.2.1", "0"]);
        assert_answers(proto, "192.0.2.1:80", "a");
    }
    // Binding an existing (protocol, prefix, port) to another label moves it.
    for proto in Proto::ALL {
        lab.bind("b", proto, "192.0.2.0/24", 0);
        assert_answers(proto, "192.0.2.1:80", "b");
        assert_answers(proto, "192.0.2.2:80", "b");
    }
    let rows = parse_bindings(&lab.bindings_json());
    assert_eq!(
        rows.len(),
        2,
        "one binding per protocol after the move: {rows:#?}"
    );
    assert!(rows.iter().all(|r| r.label == "b"), "{rows:#?}");
    let status = lab.status_json();
    for proto in Proto::ALL {
        let b = expect_destination(&status, "b", "ipv4", proto);
        assert_eq!(b["bindings"], 1, "{b}");
        if let Some(a) = lookup_tests::agent::destination(&status, "a", "ipv4", proto) {
            assert_eq!(a["bindings"], 0, "a lost its only binding: {a}");
        }
    }
}
