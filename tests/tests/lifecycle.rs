//! The agent's life: pinned state, steering while it is down, restarts.

use std::{
    collections::BTreeMap, os::unix::fs::MetadataExt, path::Path, process::Command, time::Duration,
};

use lookup_tests::{
    Lab, NetNs, Proto, TcpEcho, TempDir, UdpEcho,
    agent::{expect_destination, metric},
    assert_answers, assert_refused, bins,
    process::run_with_timeout,
    require_root,
};
use serde_json::Value;

/// The pinned objects the contract names.
const PINS: [&str; 10] = [
    "program",
    "link",
    "LOOKUP_HOSTS",
    "LOOKUP_PREFIXES",
    "LOOKUP_PORTS",
    "LOOKUP_WIDE",
    "LOOKUP_SOCKETS",
    "LOOKUP_METRICS",
    "LOOKUP_DESTS",
    "LOOKUP_META",
];

/// Inode of every entry of the state directory: equal before and after a
/// restart only if the agent reopened the state instead of recreating it.
fn pin_inodes(dir: &Path) -> BTreeMap<String, u64> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| {
            let e = e.expect("dir entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().expect("stat pin").ino(),
            )
        })
        .collect()
}

/// A status with the counters taken out, to compare state across time.
fn without_metrics(status: &Value) -> Value {
    let mut s = status.clone();
    if let Some(ds) = s["destinations"].as_array_mut() {
        for d in ds {
            if let Some(o) = d.as_object_mut() {
                o.remove("metrics");
            }
        }
    }
    s
}

/// Steering set-up shared by the restart tests: `web` registered and bound
/// on 192.0.2.0/24 port 80, `ghost` bound on 192.0.2.99 without a socket.
struct Web {
    _tcp: TcpEcho,
    _udp: UdpEcho,
}

#[track_caller]
fn steer_web(lab: &Lab) -> Web {
    let tcp = TcpEcho::new("web", "127.0.0.1:0");
    let udp = UdpEcho::new("web", "127.0.0.1:0");
    lab.register_fds("web", &[tcp.fd(), udp.fd()], None).ok();
    for proto in Proto::ALL {
        lab.bind("web", proto, "192.0.2.0/24", 80);
        lab.bind("ghost", proto, "192.0.2.99", 0);
    }
    check_steering("agent running");
    Web {
        _tcp: tcp,
        _udp: udp,
    }
}

#[track_caller]
fn check_steering(when: &str) {
    eprintln!("checking steering: {when}");
    for proto in Proto::ALL {
        assert_answers(proto, "192.0.2.1:80", "web");
        assert_refused(proto, "192.0.2.99:80");
    }
}

#[test]
fn agent_pins_its_state_per_netns() {
    if !require_root() {
        return;
    }
    let lab = Lab::new(&[]);
    let dir = lab.state_dir();
    let inodes = pin_inodes(&dir);
    let missing: Vec<_> = PINS.iter().filter(|p| !inodes.contains_key(**p)).collect();
    assert!(
        missing.is_empty(),
        "{} lacks {missing:?}; it has {:?}",
        dir.display(),
        inodes.keys().collect::<Vec<_>>()
    );
}

#[test]
fn kill_9_keeps_steering_and_restart_resumes() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new(&["192.0.2.0/24"]);
    let _web = steer_web(&lab);
    let bindings = lab.bindings_json();
    let status = lab.status_json();
    let pins = pin_inodes(&lab.state_dir());

    lab.kill9();
    check_steering("agent killed with SIGKILL");

    lab.restart();
    assert_eq!(
        lab.bindings_json(),
        bindings,
        "bindings changed across kill -9 and restart"
    );
    let after = lab.status_json();
    assert_eq!(
        without_metrics(&after),
        without_metrics(&status),
        "status (without counters) changed across kill -9 and restart"
    );
    // The counters live in the pinned maps: they kept counting while the
    // agent was dead, and the restart did not reset them.
    for proto in Proto::ALL {
        let (b, a) = (
            expect_destination(&status, "web", "ipv4", proto),
            expect_destination(&after, "web", "ipv4", proto),
        );
        assert!(
            metric(a, "lookups") > metric(b, "lookups"),
            "web/{proto}: lookups went from {} to {} over traffic while the agent was down",
            metric(b, "lookups"),
            metric(a, "lookups")
        );
        let (b, a) = (
            expect_destination(&status, "ghost", "ipv4", proto),
            expect_destination(&after, "ghost", "ipv4", proto),
        );
        assert!(
            metric(a, "misses") > metric(b, "misses"),
            "ghost/{proto}: misses did not grow while the agent was down"
        );
    }
    assert_eq!(
        pin_inodes(&lab.state_dir()),
        pins,
        "the restarted agent re-pinned its state instead of reopening it"
    );

    // The restarted agent is fully functional.
    check_steering("agent restarted");
    for proto in Proto::ALL {
        lab.bind("web", proto, "192.0.2.0/24", 8080);
        assert_answers(proto, "192.0.2.1:8080", "web");
    }
    lab.ctl_ok(&["unregister", "web", "ipv4", "tcp"]);
    assert_refused(Proto::Tcp, "192.0.2.1:80");
}

#[test]
fn sigterm_exits_zero_and_keeps_steering() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new(&["192.0.2.0/24"]);
    let _web = steer_web(&lab);
    let bindings = lab.bindings_json();
    let status = lab.status_json();

    lab.sigterm();
    check_steering("agent stopped with SIGTERM");

    lab.restart();
    assert_eq!(
        lab.bindings_json(),
        bindings,
        "bindings changed across SIGTERM and restart"
    );
    assert_eq!(
        without_metrics(&lab.status_json()),
        without_metrics(&status),
        "status (without counters) changed across SIGTERM and restart"
    );
    check_steering("agent restarted after SIGTERM");

    // Twice more, to catch state that only survives one restart.
    for round in 0..2 {
        lab.sigterm();
        lab.restart();
        assert_eq!(
            lab.bindings_json(),
            bindings,
            "bindings changed after restart {round}"
        );
        check_steering("after another SIGTERM and restart");
    }
}

/// SIGTERM while a large batch is being written: the agent finishes it (a
/// batch is all or nothing), answers its client, then exits.
#[test]
fn sigterm_finishes_a_batch_in_progress() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new(&[]);
    const LINES: u32 = 300_000;
    let file = lab.tmp.join("big.txt");
    let text: String = (0..LINES)
        .map(|i| {
            format!(
                "bind bulk tcp {} 80\n",
                std::net::Ipv4Addr::from(0x0a00_0000 + i)
            )
        })
        .collect();
    std::fs::write(&file, text).expect("write batch");
    let mut cmd = Command::new(bins::binary(bins::LOOKUPCTL));
    cmd.args(["--control", lab.control().to_str().expect("utf-8"), "apply"])
        .arg(&file);
    let client = std::thread::spawn(move || run_with_timeout(&mut cmd, Duration::from_secs(120)));
    // Stop it once the batch has reached the writer.
    let started = std::time::Instant::now();
    while !lab.log_text().contains("batch parsed") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the batch never arrived; log:\n{}",
            lab.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    lab.sigterm();
    let log = lab.log_text();
    let (Some(stop), Some(done)) = (log.find("SIGTERM"), log.find("batch done")) else {
        panic!("no stop or no batch end in the log:\n{log}");
    };
    assert!(
        stop < done,
        "the batch ended before the stop, so this proves nothing; log:\n{log}"
    );
    let out = client.join().expect("client thread");
    assert!(
        out.status.success() && out.stdout.contains(&format!("{LINES} bound")),
        "the batch's client: {} {}",
        out.stdout,
        out.stderr
    );
    lab.restart();
    let status = lab.status_json();
    let bulk = expect_destination(&status, "bulk", "ipv4", Proto::Tcp);
    assert_eq!(bulk["bindings"], LINES, "{bulk}");
}

#[test]
fn agent_refuses_a_bpffs_that_is_not_one() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::new(&[]);
    let tmp = TempDir::new("notbpf");
    let mut cmd = Command::new(bins::binary(bins::LOOKUPD));
    cmd.arg("--bpffs")
        .arg(tmp.path())
        .arg("--control")
        .arg(tmp.join("lookupd.sock"))
        .env_remove("LOOKUP_CONTROL");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(10));
    assert!(
        !out.status.success(),
        "lookupd started on a plain directory as bpffs:\n{}",
        out.stderr
    );
    let low = out.stderr.to_lowercase();
    assert!(
        low.contains("bpf") && low.contains(&tmp.path().display().to_string().to_lowercase()),
        "the error should say {} is not a bpffs:\n{}",
        tmp.path().display(),
        out.stderr
    );
}

#[test]
fn restart_recovers_a_program_pin_lost_mid_upgrade() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new(&["192.0.2.0/24"]);
    let _web = steer_web(&lab);
    let dir = lab.state_dir();

    // As if killed between switching the link and re-pinning: the program
    // the link runs is pinned only as program-new.
    lab.kill9();
    std::fs::rename(dir.join("program"), dir.join("program-new")).expect("move pin");
    check_steering("program pin moved aside");
    lab.restart();
    assert!(dir.join("program").exists(), "program pin not restored");
    assert!(!dir.join("program-new").exists(), "program-new left behind");
    check_steering("restarted after an interrupted upgrade");

    // With no program pin at all, the agent pins what the link runs.
    lab.kill9();
    std::fs::remove_file(dir.join("program")).expect("remove pin");
    lab.restart();
    assert!(
        dir.join("program").exists(),
        "program not re-pinned from the link"
    );
    check_steering("restarted without a program pin");
    lab.bind("web", Proto::Tcp, "192.0.2.0/24", 8080);
    assert_answers(Proto::Tcp, "192.0.2.1:8080", "web");
}

#[test]
fn agent_never_deletes_a_file_that_is_not_its_socket() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::new(&[]);
    let tmp = TempDir::new("control");
    let bpffs = lookup_tests::BpfFs::new();
    let precious = tmp.join("precious.txt");
    std::fs::write(&precious, "data").expect("write");
    let mut cmd = Command::new(bins::binary(bins::LOOKUPD));
    cmd.arg("--bpffs")
        .arg(bpffs.path())
        .arg("--control")
        .arg(&precious)
        .env_remove("LOOKUP_CONTROL");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(10));
    assert!(
        !out.status.success(),
        "lookupd took over a regular file:\n{}",
        out.stderr
    );
    assert!(out.stderr.contains("precious.txt"), "{}", out.stderr);
    assert_eq!(
        std::fs::read_to_string(&precious).expect("still there"),
        "data"
    );
    // And it created no state on the way out.
    assert!(
        std::fs::read_dir(bpffs.path().join("lookup")).map_or(true, |mut d| d.next().is_none()),
        "a refused start left pinned state behind"
    );
}
