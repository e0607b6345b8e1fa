//! The harness itself, without an agent: if these fail, every other result
//! is meaningless.

use lookup_tests::{
    BpfFs, EchoProcess, NetNs, Proto, TcpEcho, UdpEcho, assert_answers, assert_refused,
    netns::current_inode, process::EchoSpec, require_root,
};

#[test]
fn netns_is_private_and_restored() {
    if !require_root() {
        return;
    }
    let before = current_inode();
    {
        let ns = NetNs::new(&["192.0.2.0/24", "2001:db8::/32"]);
        assert_ne!(ns.inode(), before, "unshare did not change the netns");
        ns.assert_current();
        // A listener in the test's namespace on a fixed port cannot collide
        // with anything outside it.
        let _tcp = TcpEcho::new("inside", "127.0.0.1:80");
        assert_answers(Proto::Tcp, "127.0.0.1:80", "inside");
        // Threads spawned from the test thread share its namespace.
        let inode = ns.inode();
        std::thread::spawn(move || assert_eq!(current_inode(), inode))
            .join()
            .expect("a thread spawned from the test thread is in another netns");
    }
    assert_eq!(
        current_inode(),
        before,
        "NetNs drop did not restore the netns"
    );
}

#[test]
fn in_process_servers_answer_over_both_families() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::new(&["192.0.2.0/24", "2001:db8::/32"]);
    for addr in ["127.0.0.1:7", "192.0.2.1:7", "[::1]:7", "[2001:db8::1]:7"] {
        let tcp = TcpEcho::new(&format!("tcp {addr}"), addr);
        let udp = UdpEcho::new(&format!("udp {addr}"), addr);
        assert_answers(Proto::Tcp, tcp.addr(), tcp.name());
        assert_answers(Proto::Udp, udp.addr(), udp.name());
    }
    // Nothing bound: a refusal, for UDP via ICMP on a connected socket.
    for addr in ["127.0.0.1:9", "192.0.2.1:9", "[::1]:9", "[2001:db8::1]:9"] {
        assert_refused(Proto::Tcp, addr);
        assert_refused(Proto::Udp, addr);
    }
}

#[test]
fn udp_answers_come_from_the_address_dialled() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::new(&["192.0.2.0/24", "2001:db8::/32"]);
    // Wildcard-bound servers receive traffic for other local addresses: the
    // reply must come from the address the client used, or the connected
    // client drops it.
    let v4 = UdpEcho::new("any4", "0.0.0.0:53");
    let v6 = UdpEcho::new("any6", "[::]:53");
    assert_answers(Proto::Udp, "192.0.2.44:53", v4.name());
    assert_answers(Proto::Udp, "127.0.0.1:53", v4.name());
    assert_answers(Proto::Udp, "[2001:db8::44]:53", v6.name());
    assert_answers(Proto::Udp, "[::1]:53", v6.name());
}

#[test]
fn echo_server_process_reports_ports() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::new(&["192.0.2.0/24"]);
    let p = EchoProcess::spawn(
        "proc",
        EchoSpec::default()
            .tcp("127.0.0.1:0")
            .tcp("[::1]:0")
            .udp("127.0.0.1:0")
            .udp("[::1]:0"),
    );
    assert_eq!(p.bound().len(), 4);
    for &(proto, addr) in p.bound() {
        assert_ne!(addr.port(), 0, "READY line kept port 0");
        assert_answers(proto, addr, "proc");
    }
    let tcp = p.addr(Proto::Tcp);
    let udp = p.addr(Proto::Udp);
    let mut p = p;
    p.kill();
    assert_refused(Proto::Tcp, tcp);
    assert_refused(Proto::Udp, udp);
}

#[test]
fn bpffs_instances_are_private() {
    if !require_root() {
        return;
    }
    let a = BpfFs::new();
    let b = BpfFs::new();
    let fs = nix::sys::statfs::statfs(a.path()).expect("statfs");
    assert_eq!(
        fs.filesystem_type(),
        nix::sys::statfs::BPF_FS_MAGIC,
        "not a bpffs"
    );
    std::fs::create_dir(a.path().join("only-in-a")).expect("mkdir in bpffs");
    assert!(
        !b.path().join("only-in-a").exists(),
        "bpffs instances share state"
    );
    let path = a.path().to_path_buf();
    drop(a);
    assert!(!path.exists(), "bpffs mount point left behind");
}
