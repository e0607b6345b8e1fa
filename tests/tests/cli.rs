//! `lookupctl` input handling: errors name the input, and change nothing.

use std::process::Command;

use lookup_tests::{
    Lab, Proto, TcpEcho, assert_answers, bindings::parse_bindings, bins, process::run_with_timeout,
    require_root,
};

/// Runs every case, then reports all failures at once.
#[test]
fn invalid_input_names_the_input_and_changes_nothing() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24"]);
    lab.bind("web", Proto::Tcp, "192.0.2.0/24", 80);
    lab.bind("web", Proto::Udp, "2001:db8::/32", 0);
    let bindings = lab.bindings_json();
    let status = lab.status_json();

    let long = "a".repeat(256);
    // (arguments, text the error must contain)
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["bind", "web", "tcp", "10.0.0.1/33", "80"],
            "10.0.0.1/33",
        ),
        (
            vec!["bind", "web", "tcp", "2001:db8::/129", "80"],
            "2001:db8::/129",
        ),
        (vec!["bind", "web", "tcp", "127.1", "80"], "127.1"),
        (vec!["bind", "web", "tcp", "10.0.0.1/x", "80"], "10.0.0.1/x"),
        (vec!["bind", "web", "tcp", "10.0.0.1", "65536"], "65536"),
        (vec!["bind", "web", "tcp", "10.0.0.1", "-1"], "-1"),
        (vec!["bind", "web", "tcp", "10.0.0.1", "http"], "http"),
        (vec!["bind", "web", "sctp", "10.0.0.1", "80"], "sctp"),
        (vec!["bind", "", "tcp", "10.0.0.1", "80"], "label"),
        (vec!["bind", &long, "tcp", "10.0.0.1", "80"], "label"),
        // A label no batch line could name.
        (vec!["bind", "a b", "tcp", "10.0.0.1", "80"], "\"a b\""),
        (vec!["bind", "a#b", "tcp", "10.0.0.1", "80"], "\"a#b\""),
        // Host bits set: the hint names the prefix to use.
        (vec!["bind", "web", "tcp", "10.0.0.1/8", "80"], "10.0.0.0/8"),
        (
            vec!["bind", "web", "tcp", "2001:db8::1/32", "80"],
            "2001:db8::/32",
        ),
        // IPv4-mapped IPv6: the hint names the IPv4 form.
        (
            vec!["bind", "web", "tcp", "::ffff:192.0.2.1", "80"],
            "192.0.2.1",
        ),
        (
            vec!["bind", "web", "tcp", "::ffff:192.0.2.0/120", "80"],
            "192.0.2.0/24",
        ),
        (
            vec!["unbind", "web", "tcp", "10.0.0.1/33", "80"],
            "10.0.0.1/33",
        ),
        (vec!["unbind", "web", "sctp", "192.0.2.0/24", "80"], "sctp"),
        // No such binding, and a label that differs.
        (
            vec!["unbind", "web", "tcp", "192.0.2.0/24", "81"],
            "192.0.2.0/24",
        ),
        (
            vec!["unbind", "other", "tcp", "192.0.2.0/24", "80"],
            "other",
        ),
        (vec!["unregister", "web", "ipv5", "tcp"], "ipv5"),
        (vec!["unregister", "web", "ipv4", "sctp"], "sctp"),
        (
            vec![
                "register-pid",
                "not-a-pid-or-file",
                "web",
                "tcp",
                "127.0.0.1",
                "80",
            ],
            "not-a-pid-or-file",
        ),
        (
            vec!["register-pid", "1", "web", "sctp", "127.0.0.1", "80"],
            "sctp",
        ),
        (
            vec!["register-pid", "1", "web", "tcp", "127.0.0.1/8", "80"],
            "127.0.0.1/8",
        ),
        (
            vec!["register-pid", "1", "web", "tcp", "127.0.0.1", "65536"],
            "65536",
        ),
    ];
    let mut failures = Vec::new();
    for (args, needle) in &cases {
        let out = lab.ctl(args);
        let shown: Vec<String> = args
            .iter()
            .map(|a| {
                if a.len() > 20 {
                    format!("<{} bytes>", a.len())
                } else {
                    a.to_string()
                }
            })
            .collect();
        if out.success() {
            failures.push(format!("{shown:?}: accepted\n{out}"));
        } else if !out.stderr.contains(needle) {
            failures.push(format!(
                "{shown:?}: stderr does not contain {needle:?}\n{out}"
            ));
        } else if *needle == "192.0.2.1"
            && out.stderr.matches("192.0.2.1").count()
                <= out.stderr.matches("::ffff:192.0.2.1").count()
        {
            failures.push(format!("{shown:?}: no hint to use plain 192.0.2.1\n{out}"));
        }
        if lab.bindings_json() != bindings {
            failures.push(format!("{shown:?}: bindings changed"));
        }
    }
    assert_eq!(
        lab.status_json(),
        status,
        "failed commands changed the status"
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn labels_up_to_255_bytes_work() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24"]);
    let label = "l".repeat(255);
    let tcp = TcpEcho::new(&label, "127.0.0.1:0");
    lab.register_fds(&label, &[tcp.fd()], None).ok();
    lab.bind(&label, Proto::Tcp, "192.0.2.1", 0);
    assert_answers(Proto::Tcp, "192.0.2.1:1", &label);
    lab.ctl_ok(&["unbind", &label, "tcp", "192.0.2.1", "0"]);
    lab.ctl_ok(&["unregister", &label, "ipv4", "tcp"]);
}

#[test]
fn bindings_json_is_documented_shape() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&[]);
    lab.bind("web", Proto::Tcp, "192.0.2.0/24", 80);
    lab.bind("web", Proto::Udp, "2001:db8::1", 0);
    let json = lab.bindings_json();
    let rows = parse_bindings(&json);
    assert_eq!(rows.len(), 2, "{json}");
    // A bare address is a host prefix.
    let host = rows
        .iter()
        .find(|r| r.protocol == Proto::Udp)
        .expect("udp row");
    assert_eq!((host.len, host.port), (128, 0), "{json}");
    let net = rows
        .iter()
        .find(|r| r.protocol == Proto::Tcp)
        .expect("tcp row");
    assert_eq!(
        (net.addr.to_string().as_str(), net.len, net.port),
        ("192.0.2.0", 24, 80),
        "{json}"
    );
    // Human output mentions every binding too.
    let text = lab.ctl_ok(&["bindings"]).stdout;
    assert!(
        text.contains("192.0.2.0/24") && text.contains("web"),
        "bindings output:\n{text}"
    );
    let status = lab.status_json();
    assert_eq!(
        status["bindings"], json["bindings"],
        "status and bindings disagree"
    );
    // Bind is idempotent: the same binding again changes nothing.
    lab.bind("web", Proto::Tcp, "192.0.2.0/24", 80);
    assert_eq!(
        lab.bindings_json(),
        json,
        "binding the same thing twice changed bindings"
    );
}

#[test]
fn control_path_comes_from_the_environment() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&[]);
    lab.bind("web", Proto::Tcp, "192.0.2.0/24", 80);
    let mut cmd = Command::new(bins::binary(bins::LOOKUPCTL));
    cmd.args(["--json", "bindings"])
        .env("LOOKUP_CONTROL", lab.control());
    let out = run_with_timeout(&mut cmd, std::time::Duration::from_secs(20));
    assert!(
        out.status.success(),
        "LOOKUP_CONTROL was not used:\n{}",
        out.stderr
    );
    let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(json, lab.bindings_json());
}

#[test]
fn status_filters_by_label_and_counts_bindings() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&[]);
    lab.bind("web", Proto::Tcp, "192.0.2.0/24", 80);
    lab.bind("web", Proto::Tcp, "192.0.2.0/24", 443);
    lab.bind("api", Proto::Udp, "192.0.2.1", 53);

    let all = lab.status_json();
    assert_eq!(parse_bindings(&all).len(), 3, "{all}");
    let web = lookup_tests::agent::expect_destination(&all, "web", "ipv4", Proto::Tcp);
    assert_eq!(web["bindings"], 2, "{web}");
    assert!(web["socket_cookie"].is_null(), "{web}");
    let api = lookup_tests::agent::expect_destination(&all, "api", "ipv4", Proto::Udp);
    assert_eq!(api["bindings"], 1, "{api}");

    let only = lab.ctl_json(&["status", "web"]);
    let rows = parse_bindings(&only);
    assert!(
        rows.len() == 2 && rows.iter().all(|r| r.label == "web"),
        "status web shows other labels' bindings: {only}"
    );
    let dests = only["destinations"].as_array().expect("destinations");
    assert!(
        !dests.is_empty() && dests.iter().all(|d| d["label"] == "web"),
        "status web shows other labels' destinations: {only}"
    );
    // The human form names the label too.
    let text = lab.ctl_ok(&["status", "web"]).stdout;
    assert!(
        text.contains("web") && !text.contains("api"),
        "status web:\n{text}"
    );
}

#[test]
fn apply_changes_all_or_nothing() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24"]);
    let web = TcpEcho::new("web", "127.0.0.1:0");
    let api = TcpEcho::new("api", "127.0.0.2:0");
    lab.ctl_ok(&[
        "register-pid",
        &std::process::id().to_string(),
        "web",
        "tcp",
        "127.0.0.1",
        &web.addr().port().to_string(),
    ]);
    lab.ctl_ok(&[
        "register-pid",
        &std::process::id().to_string(),
        "api",
        "tcp",
        "127.0.0.2",
        &api.addr().port().to_string(),
    ]);

    let file = lab.tmp.join("batch.txt");
    std::fs::write(
        &file,
        "# a batch\nbind web tcp 192.0.2.0/24 0\nbind api tcp 192.0.2.7 80\n\nbind api tcp 192.0.2.128/25 443\n",
    )
    .expect("write batch");
    let out = lab.ctl_ok(&["apply", file.to_str().expect("utf-8")]);
    assert!(
        out.stdout.contains("applied 3 changes: 3 bound"),
        "{}",
        out.stdout
    );
    assert_answers(Proto::Tcp, "192.0.2.7:80", "api");
    assert_answers(Proto::Tcp, "192.0.2.7:81", "web");
    assert_answers(Proto::Tcp, "192.0.2.200:443", "api");
    assert_answers(Proto::Tcp, "192.0.2.9:443", "web");

    // A bad line, or an unbind that does not match, refuses the whole batch.
    let before = lab.bindings_json();
    std::fs::write(
        &file,
        "unbind api tcp 192.0.2.7 80\nbind web tcp 10.0.0.1/8 80\n",
    )
    .expect("write");
    let err = lab.ctl_err(&["apply", file.to_str().expect("utf-8")]);
    assert!(
        err.stderr.contains("line 2") && err.stderr.contains("10.0.0.0/8"),
        "{}",
        err.stderr
    );
    std::fs::write(
        &file,
        "unbind api tcp 192.0.2.7 80\nunbind web tcp 192.0.2.128/25 443\n",
    )
    .expect("write");
    let err = lab.ctl_err(&["apply", file.to_str().expect("utf-8")]);
    assert!(
        err.stderr.contains("line 2") && err.stderr.contains("\"api\""),
        "{}",
        err.stderr
    );
    assert_eq!(
        lab.bindings_json(),
        before,
        "a refused batch changed the bindings"
    );
    assert_answers(Proto::Tcp, "192.0.2.7:80", "api");

    // Moves and removals, from standard input.
    let mut cmd = Command::new(bins::binary(bins::LOOKUPCTL));
    cmd.args([
        "--control",
        lab.control().to_str().expect("utf-8"),
        "apply",
        "-",
    ]);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn lookupctl");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"bind web tcp 192.0.2.7 80\nunbind api tcp 192.0.2.128/25 443\n")
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("lookupctl apply -");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("1 moved, 1 unbound"), "{stdout}");
    assert_answers(Proto::Tcp, "192.0.2.7:80", "web");
    assert_answers(Proto::Tcp, "192.0.2.200:443", "web");
}

#[test]
fn binds_are_served_while_a_large_batch_drains() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24"]);
    let file = lab.tmp.join("big.txt");
    let mut text = String::new();
    for i in 0..200_000u32 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        text.push_str(&format!("bind bulk tcp {ip} 80\n"));
    }
    std::fs::write(&file, text).expect("write batch");
    let mut cmd = Command::new(bins::binary(bins::LOOKUPCTL));
    cmd.args(["--control", lab.control().to_str().expect("utf-8"), "apply"])
        .arg(&file);
    let batch =
        std::thread::spawn(move || run_with_timeout(&mut cmd, std::time::Duration::from_secs(120)));
    // Single binds from another client while the batch runs (some land
    // before it, some between its chunks, some after: all must succeed).
    for i in 0..20u8 {
        lab.ctl_ok(&["bind", "solo", "tcp", &format!("192.0.2.{}", i + 1), "80"]);
    }
    let out = batch.join().expect("batch thread");
    assert!(out.status.success(), "batch failed: {}", out.stderr);
    assert!(out.stdout.contains("200000 bound"), "{}", out.stdout);
    let status = lab.status_json();
    let solo = lookup_tests::agent::expect_destination(&status, "solo", "ipv4", Proto::Tcp);
    assert_eq!(solo["bindings"], 20, "{solo}");
    let bulk = lookup_tests::agent::expect_destination(&status, "bulk", "ipv4", Proto::Tcp);
    assert_eq!(bulk["bindings"], 200_000, "{bulk}");
}

/// Many clients at once, as the agent merges their requests: each gets the
/// answer its own request deserves, in its own order, and the result is
/// what they asked for together.
#[test]
fn concurrent_clients_each_get_their_own_answer() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&["192.0.2.0/24"]);
    let web = TcpEcho::new("web", "127.0.0.1:0");
    let me = std::process::id().to_string();
    lab.register_pid(&me, "web", Proto::Tcp, "127.0.0.1", web.addr().port())
        .ok();
    let control = lab.control().to_str().expect("utf-8").to_owned();
    const CLIENTS: u8 = 16;
    const HOSTS: u8 = 12;
    std::thread::scope(|scope| {
        for k in 0..CLIENTS {
            let control = control.clone();
            scope.spawn(move || {
                let ctl = |args: &[String]| {
                    let mut cmd = Command::new(bins::binary(bins::LOOKUPCTL));
                    cmd.args(["--control", &control]).args(args);
                    run_with_timeout(&mut cmd, std::time::Duration::from_secs(60))
                };
                let words = |s: String| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
                let label = format!("t{k}");
                for j in 0..HOSTS {
                    let out = ctl(&words(format!("bind {label} tcp 10.{k}.0.{j} 80")));
                    assert_eq!(
                        out.stdout.trim(),
                        format!("bound tcp 10.{k}.0.{j}/32 port 80 -> {label}"),
                        "client {k}: {}",
                        out.stderr
                    );
                }
                // The wrong label is refused, naming the right one.
                let out = ctl(&words(format!("unbind other tcp 10.{k}.0.0 80")));
                assert!(
                    !out.status.success() && out.stderr.contains(&format!("label \"{label}\"")),
                    "client {k}: {} {}",
                    out.stdout,
                    out.stderr
                );
                for j in (0..HOSTS).step_by(2) {
                    let out = ctl(&words(format!("unbind {label} tcp 10.{k}.0.{j} 80")));
                    assert!(
                        out.status.success() && out.stdout.contains("unbound"),
                        "client {k}: {}",
                        out.stderr
                    );
                }
                let out = ctl(&words(format!("bind web tcp 10.{k}.0.1 80")));
                assert_eq!(
                    out.stdout.trim(),
                    format!("rebound tcp 10.{k}.0.1/32 port 80 -> web (was {label})"),
                    "client {k}: {}",
                    out.stderr
                );
                let out = ctl(&words(format!("bind web tcp 192.0.2.{} 80", k + 1)));
                assert!(out.status.success(), "client {k}: {}", out.stderr);
            });
        }
    });
    let mut got: Vec<String> = parse_bindings(&lab.bindings_json())
        .into_iter()
        .map(|b| format!("{} {}/{} {}", b.label, b.addr, b.len, b.port))
        .collect();
    got.sort();
    let mut want = Vec::new();
    for k in 0..CLIENTS {
        want.push(format!("web 192.0.2.{}/32 80", k + 1));
        want.push(format!("web 10.{k}.0.1/32 80"));
        for j in (3..HOSTS).step_by(2) {
            want.push(format!("t{k} 10.{k}.0.{j}/32 80"));
        }
    }
    want.sort();
    assert_eq!(got, want);
    for k in 0..CLIENTS {
        assert_answers(Proto::Tcp, format!("192.0.2.{}:80", k + 1).as_str(), "web");
    }
}
