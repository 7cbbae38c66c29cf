//! `tart run`'s networks with real dnsmasq, nftables and QEMU (TCG), inside network
//! namespaces each test makes ([`NetLab`]): the "host" namespace where tart builds its bridge,
//! and an "outside" one standing in for the world, with HTTP servers. Guests are the test guest
//! with our agent; they fetch pages with busybox `wget` through `tart exec`.

use std::fs;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use tart_testkit::netlab::{FAR, HOST_UPLINK, OUTSIDE, PRIVATE_FAR};
use tart_testkit::NetLab;

mod common;
use common::{fails_with, stop, wait_for, Home};

const GATEWAY: &str = "192.168.64.1";

/// Runs `script` in the guest with `sh -c`; its exit code and output.
fn guest(home: &Home, vm: &str, script: &str) -> (i32, String) {
    let out = home.tart().args(["exec", vm, "sh", "-c", script]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// The page at `http://<address>/` as the guest sees it, or `None` when it cannot get it
/// within 5 s. (busybox nc: Debian's static busybox wget crashes.)
fn fetch(home: &Home, vm: &str, address: &str) -> Option<String> {
    let (host, port) = address.split_once(':').unwrap();
    let (code, text) = guest(
        home,
        vm,
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {host} {port}"),
    );
    let (head, body) = text.split_once("\r\n\r\n")?;
    (code == 0 && head.starts_with("HTTP/1.0 200")).then(|| body.to_owned())
}

/// busybox httpd in the guest on `port`, serving `page` (and a newline).
fn serve_in_guest(home: &Home, vm: &str, port: u16, page: &str) {
    let (code, text) = guest(
        home,
        vm,
        &format!("mkdir -p /tmp/www && echo {page} >/tmp/www/index.html && httpd -p {port} -h /tmp/www"),
    );
    assert_eq!(code, 0, "{text}");
}

fn can_ping(home: &Home, vm: &str, target: &str) -> bool {
    guest(home, vm, &format!("ping -c 1 -W 3 {target}")).0 == 0
}

/// The address the guest reports on its console (`TART-TEST-GUEST: ip <iface> <addr>`).
fn guest_address(home: &Home, serial: u32, iface: &str) -> Ipv4Addr {
    let marker = format!("TART-TEST-GUEST: ip {iface} ");
    let log = wait_for(&home.serial(serial), &marker);
    log.lines()
        .find_map(|line| line.trim().strip_prefix(&marker))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Waits for the guest agent (exec works from then on).
fn wait_for_agent(home: &Home, vm: &str) {
    home.ok(&["ip", "--resolver", "agent", "--wait", "120", vm]);
}

/// Nothing of any VM is left: no per-VM chains or map elements, no taps or macvtaps, no
/// reservations, leases or attachment records.
fn assert_nothing_left(lab: &NetLab) {
    let ruleset = lab.output_in(&lab.host, "nft", &["list", "ruleset"]);
    assert!(!ruleset.contains("vm-") && !ruleset.contains("elements"), "{ruleset}");
    let links = lab.output_in(&lab.host, "ip", &["-o", "link"]);
    assert!(!links.contains("tarttap") && !links.contains("tartmv"), "{links}");
    for dir in ["hosts", "attachments"] {
        let left: Vec<_> = fs::read_dir(lab.state_path().join(dir)).unwrap().flatten().collect();
        assert!(left.is_empty(), "{dir}: {left:?}");
    }
    let leases = || fs::read_to_string(lab.lease_file()).unwrap_or_default();
    eventually(&format!("leases are released: {}", leases()), || {
        leases().trim().is_empty()
    });
}

fn mac_of(home: &Home, vm: &str) -> String {
    let config = fs::read_to_string(home.dir.path().join(format!("home/vms/{vm}/config.json"))).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["macAddress"].as_str().unwrap().to_lowercase()
}

/// Waits up to 10 s for `condition` (dnsmasq applies a release a moment after it is sent).
fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Shared NAT and host-only side by side; a SIGKILLed `tart run` is cleaned up by the next
/// command. With br_netfilter on (VM-to-VM frames pass the IPv4 hooks too).
#[test]
fn shared_nat_and_host_only_networks() {
    let mut lab = NetLab::new();
    lab.set_bridge_nf_call_iptables(true);
    let home = Home::with_image(tart_testkit::test_guest_image_with_agent()).in_lab(&lab);
    home.add_vm("hostonly", tart_testkit::test_guest_image_with_agent());
    lab.serve_http(&lab.outside.clone(), "0.0.0.0", 8080, "outside page");

    let nat = home.run_vm("guest", 1, &[]);
    let mut host_only = home.run_vm("hostonly", 2, &["--net-host"]);
    wait_for_agent(&home, "guest");
    wait_for_agent(&home, "hostonly");
    lab.serve_http(&lab.host.clone(), GATEWAY, 8000, "gateway page");

    // Each gets a lease; tart ip (dhcp, the default, and arp) reports the guest's own address.
    let nat_ip = guest_address(&home, 1, "eth0");
    let host_only_ip = guest_address(&home, 2, "eth0");
    assert_eq!(home.ok(&["ip", "--wait", "60", "guest"]).trim(), nat_ip.to_string());
    assert_eq!(
        home.ok(&["ip", "--wait", "60", "hostonly"]).trim(),
        host_only_ip.to_string()
    );
    assert!(nat_ip.octets()[3] < 128, "dynamic range: {nat_ip}");
    assert!(host_only_ip.octets()[3] >= 128, "reserved range: {host_only_ip}");
    assert!(can_ping(&home, "guest", GATEWAY));
    assert_eq!(
        home.ok(&["ip", "--resolver", "arp", "guest"]).trim(),
        nat_ip.to_string()
    );

    // NAT: the gateway's services, the outside world and the host's other address.
    assert_eq!(
        fetch(&home, "guest", &format!("{GATEWAY}:8000")).as_deref(),
        Some("gateway page")
    );
    assert_eq!(
        fetch(&home, "guest", &format!("{OUTSIDE}:8080")).as_deref(),
        Some("outside page")
    );
    assert!(can_ping(&home, "guest", HOST_UPLINK));
    // Host-only: the host and the other VM, nothing beyond.
    assert_eq!(
        fetch(&home, "hostonly", &format!("{GATEWAY}:8000")).as_deref(),
        Some("gateway page")
    );
    assert!(can_ping(&home, "hostonly", &nat_ip.to_string()));
    assert_eq!(fetch(&home, "hostonly", &format!("{OUTSIDE}:8080")), None);
    assert!(!can_ping(&home, "hostonly", FAR));

    // Killed: its tap goes with QEMU, its rules, reservation and lease with the next command.
    let host_only_mac = mac_of(&home, "hostonly");
    host_only.kill().unwrap();
    host_only.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab
        .output_in(&lab.host, "ip", &["-o", "link"])
        .matches("tarttap")
        .count()
        > 1
    {
        assert!(Instant::now() < deadline, "the killed VM's tap outlived its QEMU");
        std::thread::sleep(Duration::from_millis(100));
    }
    home.ok(&["list"]);
    let ruleset = lab.output_in(&lab.host, "nft", &["list", "ruleset"]);
    assert!(!ruleset.contains(&host_only_ip.to_string()), "{ruleset}");
    let leases = || fs::read_to_string(lab.lease_file()).unwrap();
    eventually(&format!("the killed VM's lease is released: {}", leases()), || {
        !leases().contains(&host_only_mac)
    });
    assert!(leases().contains(&nat_ip.to_string()), "{}", leases());

    stop(&home, "guest", nat);
    assert_nothing_left(&lab);
    // The network itself stays for the next VM: bridge, base rules, dnsmasq.
    assert!(lab.output_in(&lab.host, "ip", &["-o", "link"]).contains("tart0"));
    assert!(lab.dnsmasq_pid().is_some());
}

/// Softnet: the outside world, not the other VM, the host's other address, the gateway's
/// services or private ranges (unless allowed); blocked ranges win; exposed ports answer from
/// the host; only its own MAC and address get out. With br_netfilter off: the bridge's own
/// rules keep the VMs apart.
#[test]
fn softnet_isolates_the_vm() {
    let mut lab = NetLab::new();
    lab.set_bridge_nf_call_iptables(false);
    let home = Home::with_image(tart_testkit::test_guest_image_with_agent()).in_lab(&lab);
    home.add_vm("peer", tart_testkit::test_guest_image_with_agent());
    let outside = lab.outside.clone();
    lab.serve_http(&outside, "0.0.0.0", 8080, "outside page");
    lab.serve_http(&lab.host.clone(), HOST_UPLINK, 8001, "host page");

    let softnet = home.run_vm(
        "guest",
        1,
        &[
            "--net-softnet-allow",
            &format!("10.99.0.0/24,{FAR}/32"),
            "--net-softnet-block",
            "203.0.113.0/24",
            "--net-softnet-expose",
            "18080:8000",
        ],
    );
    let peer = home.run_vm("peer", 2, &[]);
    wait_for_agent(&home, "guest");
    wait_for_agent(&home, "peer");
    lab.serve_http(&lab.host.clone(), GATEWAY, 8000, "gateway page");
    let softnet_ip = guest_address(&home, 1, "eth0");
    let peer_ip = guest_address(&home, 2, "eth0");
    assert_eq!(home.ok(&["ip", "guest"]).trim(), softnet_ip.to_string());

    assert_eq!(
        fetch(&home, "guest", &format!("{OUTSIDE}:8080")).as_deref(),
        Some("outside page")
    );
    assert_eq!(
        fetch(&home, "guest", &format!("{PRIVATE_FAR}:8080")).as_deref(),
        Some("outside page")
    );
    assert_eq!(
        fetch(&home, "guest", &format!("{FAR}:8080")),
        None,
        "blocked wins over allowed"
    );
    assert_eq!(fetch(&home, "guest", &format!("{HOST_UPLINK}:8001")), None);
    assert_eq!(fetch(&home, "guest", &format!("{GATEWAY}:8000")), None);
    assert!(!can_ping(&home, "guest", &peer_ip.to_string()));
    assert!(!can_ping(&home, "peer", &softnet_ip.to_string()));
    // The same places from a plain NAT VM, so the failures above are Softnet's doing.
    assert_eq!(
        fetch(&home, "peer", &format!("{FAR}:8080")).as_deref(),
        Some("outside page")
    );
    assert_eq!(
        fetch(&home, "peer", &format!("{HOST_UPLINK}:8001")).as_deref(),
        Some("host page")
    );

    // An exposed port, from the host's loopback and its other address.
    serve_in_guest(&home, "guest", 8000, "softnet guest page");
    for host in ["127.0.0.1", HOST_UPLINK] {
        let page = lab.output_in(&lab.host, "curl", &["-s", "-m", "10", &format!("{host}:18080")]);
        assert_eq!(page, "softnet guest page\n", "through {host}");
    }

    // Anti-spoofing: another source address does not get out, its own does.
    let (code, text) = guest(&home, "guest", "ip addr add 192.168.64.77/24 dev eth0");
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        guest(&home, "guest", &format!("ping -c 1 -W 3 -I 192.168.64.77 {OUTSIDE}")).0,
        1
    );
    assert!(can_ping(&home, "guest", OUTSIDE));

    stop(&home, "guest", softnet);
    stop(&home, "peer", peer);
    assert_nothing_left(&lab);
}

/// `--net-bridged` to a host bridge (a tap on it) and to a plain interface (a macvtap), one NIC
/// each, with the outside namespace's own dnsmasq serving both segments.
#[test]
fn bridged_to_a_bridge_and_an_interface() {
    let mut lab = NetLab::new();
    let (host, outside) = (lab.host.clone(), lab.outside.clone());
    lab.ip(&host, &["link", "add", "brlab", "type", "bridge"]);
    lab.ip(&host, &["addr", "add", "10.50.0.1/24", "dev", "brlab"]);
    for (ours, theirs, address) in [("lan1", "lan0", "10.50.0.2/24"), ("phys0", "lan2", "10.60.0.2/24")] {
        lab.ip(
            &host,
            &[
                "link", "add", ours, "type", "veth", "peer", "name", theirs, "netns", &outside,
            ],
        );
        lab.ip(&outside, &["addr", "add", address, "dev", theirs]);
        lab.ip(&outside, &["link", "set", theirs, "up"]);
        lab.ip(&host, &["link", "set", ours, "up"]);
    }
    lab.ip(&host, &["link", "set", "lan1", "master", "brlab"]);
    lab.ip(&host, &["link", "set", "brlab", "up"]);
    let leases = lab.state_path().join("lan.leases");
    let mut dnsmasq = lab.command_in(&outside, "dnsmasq");
    dnsmasq
        .args([
            "--conf-file=/dev/null",
            "--keep-in-foreground",
            "--port=0",
            "--bind-interfaces",
        ])
        .args(["--interface=lan0", "--interface=lan2"])
        .args([
            "--dhcp-range=10.50.0.10,10.50.0.50,1h",
            "--dhcp-range=10.60.0.10,10.60.0.50,1h",
        ])
        .arg(format!("--dhcp-leasefile={}", leases.display()));
    lab.spawn(dnsmasq);

    let home = Home::with_image(tart_testkit::test_guest_image_with_agent()).in_lab(&lab);
    let out = home
        .tart()
        .args(["run", "--net-bridged=list", "guest"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{listing}");
    assert!(
        listing.contains("brlab (bridge") && listing.contains("phys0 (interface") && !listing.contains("lan1"),
        "{listing}"
    );

    let run = home.run_vm("guest", 1, &["--net-bridged", "brlab", "--net-bridged", "phys0"]);
    wait_for_agent(&home, "guest");
    let on_bridge = guest_address(&home, 1, "eth0");
    let on_macvtap = guest_address(&home, 1, "eth1");
    assert_eq!(on_bridge.octets()[..3], [10, 50, 0], "{on_bridge}");
    assert_eq!(on_macvtap.octets()[..3], [10, 60, 0], "{on_macvtap}");
    assert!(lab.output_in(&host, "ip", &["-o", "link"]).contains("tartmv0@phys0"));
    // No lease of ours to read; arp finds it once the guest has talked to the host.
    let out = home.tart().args(["ip", "guest"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use \"tart ip --resolver arp\""));
    assert!(can_ping(&home, "guest", "10.50.0.1"));
    assert_eq!(
        home.ok(&["ip", "--resolver", "arp", "guest"]).trim(),
        on_bridge.to_string()
    );
    assert!(can_ping(&home, "guest", "10.60.0.2"));

    stop(&home, "guest", run);
    assert_nothing_left(&lab);
}

/// User-mode networking (QEMU's slirp): explicit with port forwards, and the automatic fallback of a
/// `tart run` without CAP_NET_ADMIN; what needs the capability says so.
#[test]
fn user_mode_networking_and_missing_privileges() {
    let mut lab = NetLab::new();
    lab.serve_http(&lab.outside.clone(), "0.0.0.0", 8080, "outside page");
    let home = Home::with_image(tart_testkit::test_guest_image_with_agent()).in_lab(&lab);
    home.add_vm("unprivileged", tart_testkit::test_guest_image_with_agent());
    let user = home.run_vm("guest", 1, &["--net-user", "--net-user-expose", "18081:8000"]);
    let fallback = {
        let mut cmd = home.tart_without_net_admin();
        cmd.args([
            "run",
            "--no-graphics",
            "--serial-path",
            home.serial(2).to_str().unwrap(),
            "unprivileged",
        ]);
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    wait_for_agent(&home, "guest");
    wait_for_agent(&home, "unprivileged");

    for vm in ["guest", "unprivileged"] {
        assert_eq!(
            fetch(&home, vm, &format!("{OUTSIDE}:8080")).as_deref(),
            Some("outside page")
        );
        let out = home.tart().args(["ip", "--wait", "30", vm]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr.contains("not reachable from the host") && stderr.contains("--resolver agent"),
            "{stderr}"
        );
    }
    serve_in_guest(&home, "guest", 8000, "user-mode guest page");
    let page = lab.output_in(&lab.host, "curl", &["-s", "-m", "10", "http://127.0.0.1:18081/"]);
    assert_eq!(page, "user-mode guest page\n");
    // Nothing of the shared network was made for either.
    assert!(!lab.output_in(&lab.host, "ip", &["-o", "link"]).contains("tart0"));

    stop(&home, "guest", user);
    let failing = |args: &[&str], needle: &str| {
        fails_with(
            home.tart_without_net_admin().arg("run").args(args).arg("guest"),
            1,
            needle,
        );
    };
    failing(&["--net-softnet"], "the shared network needs CAP_NET_ADMIN");
    failing(&["--net-host"], "the shared network needs CAP_NET_ADMIN");
    lab.ip(&lab.host, &["link", "add", "br9", "type", "bridge"]);
    failing(&["--net-bridged", "br9"], "add \"allow br9\" to /etc/qemu/bridge.conf");
    failing(&["--net-bridged", "uplink"], "needs CAP_NET_ADMIN");

    let (_, stderr) = stop(&home, "unprivileged", fallback);
    assert!(
        stderr.contains("no CAP_NET_ADMIN): the VM gets user-mode networking (QEMU's slirp)"),
        "{stderr}"
    );
}

/// Bad input: one clear line, nothing of the network made, the VM still runnable.
#[test]
fn network_bad_input() {
    let lab = NetLab::new();
    let home = Home::with_guest().in_lab(&lab);
    let fails = |args: &[&str], code: i32, needle: &str| {
        fails_with(home.tart().arg("run").args(args).arg("guest"), code, needle)
    };
    fails(
        &["--net-softnet", "--net-host"],
        64,
        "--net-bridged, --net-softnet and --net-host are mutually exclusive",
    );
    fails(&["--net-host", "--net-bridged", "x"], 64, "mutually exclusive");
    fails(
        &["--net-user", "--net-softnet-allow", "10.0.0.0/8"],
        64,
        "--net-user cannot be used with",
    );
    fails(&["--net-softnet-allow", "10.0.0.1/8"], 64, "host bits are set");
    fails(&["--net-softnet-block", "10.0.0.0/40"], 64, "prefix length");
    fails(&["--net-softnet-expose", "22"], 64, "expected EXTERNAL:INTERNAL");
    fails(&["--net-user-expose", "0:22"], 64, "is not a port number");
    let line = fails(
        &["--net-bridged", "nosuch0"],
        1,
        "no network interface named \"nosuch0\"",
    );
    assert_eq!(line.lines().count(), 1, "{line}");

    // Missing programs, one at a time, with everything else still found.
    let bin = home.dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let link_all_but = |missing: &str| {
        for entry in fs::read_dir(&bin).unwrap().flatten() {
            fs::remove_file(entry.path()).unwrap();
        }
        for program in [
            "ip",
            "nft",
            "dnsmasq",
            "dhcp_release",
            "qemu-system-x86_64",
            "passt",
            "vhost-device-vsock",
        ] {
            if program != missing {
                let found = Command::new("sh")
                    .args(["-c", &format!("command -v {program}")])
                    .output()
                    .unwrap();
                let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
                assert!(!path.is_empty(), "{program} is installed");
                std::os::unix::fs::symlink(path, bin.join(program)).unwrap();
            }
        }
    };
    for (program, package) in [
        ("dnsmasq", "dnsmasq-base"),
        ("nft", "nftables"),
        ("dhcp_release", "dnsmasq-utils"),
    ] {
        link_all_but(program);
        let out = home.tart().env("PATH", &bin).args(["run", "guest"]).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("{program} not found in PATH: install Debian's {package} package (apt-get install {package})\n")
        );
    }

    // A subnet that another interface has, and a settings file that is not valid.
    lab.ip(
        &lab.host,
        &["link", "add", "other0", "type", "veth", "peer", "name", "other1"],
    );
    lab.ip(&lab.host, &["addr", "add", "192.168.64.20/24", "dev", "other0"]);
    fails(
        &[],
        1,
        "the subnet 192.168.64.0/24 is already used by other0 on this host; choose another one in",
    );
    fs::write(
        home.dir.path().join("home/network.json"),
        r#"{"subnet": "10.1.2.3/24"}"#,
    )
    .unwrap();
    fails(&[], 1, "invalid network settings");
    assert!(!lab.output_in(&lab.host, "ip", &["-o", "link"]).contains("tart0"));
    assert_eq!(lab.output_in(&lab.host, "nft", &["list", "ruleset"]), "");
    assert_eq!(home.state(), "stopped");

    // A free subnet from the settings: the VM runs on it.
    fs::write(
        home.dir.path().join("home/network.json"),
        r#"{"subnet": "10.1.2.0/24", "dhcpLeaseSeconds": 300}"#,
    )
    .unwrap();
    let run = home.run(1);
    let address = guest_address(&home, 1, "eth0");
    assert_eq!(address.octets()[..3], [10, 1, 2], "{address}");
    let leases = fs::read_to_string(lab.lease_file()).unwrap();
    stop(&home, "guest", run);
    let expiry: u64 = leases.split_whitespace().next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(expiry <= now + 300, "lease time from network.json: {leases}");
}
