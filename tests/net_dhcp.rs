//! The DHCP runner against a real server: Debian's dnsmasq in one network namespace on one end
//! of a veth pair, the client in another on the other end (a thread that joined it with
//! setns). The client gets its lease by broadcast, configures the interface (address, default
//! route) and resolv.conf, then renews by unicast to dnsmasq and rebinds by broadcast, both
//! acknowledged.
//!
//! Needs root, iproute2 and dnsmasq (ci/install-deps); without them the test fails. The
//! namespaces carry the process id; a guard removes them and stops dnsmasq even on failure.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use keelos::init::net::address;
use keelos::net::io::{DhcpEvent, DhcpLink};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn find_program(name: &str, package: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: run ci/install-deps (package {package})")
        })
}

fn ip(args: &[&str]) {
    let out = Command::new(find_program("ip", "iproute2"))
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two network namespaces joined by a veth pair, and dnsmasq serving one end.
struct Lab {
    server_ns: String,
    client_ns: String,
    dnsmasq: Option<Child>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            server_ns: format!("keel-dhcp-s{pid}"),
            client_ns: format!("keel-dhcp-c{pid}"),
            dnsmasq: None,
            dir: tempfile::tempdir().unwrap(),
        };
        let (s, c) = (lab.server_ns.as_str(), lab.client_ns.as_str());
        ip(&["netns", "add", s]);
        ip(&["netns", "add", c]);
        ip(&[
            "link", "add", "vsrv", "netns", s, "type", "veth", "peer", "name", "vcli", "netns", c,
        ]);
        ip(&["-n", s, "addr", "add", "10.77.0.1/24", "dev", "vsrv"]);
        ip(&["-n", s, "link", "set", "vsrv", "up"]);
        ip(&["-n", s, "link", "set", "lo", "up"]);
        ip(&["-n", c, "link", "set", "lo", "up"]);
        lab
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("dnsmasq.log")
    }

    fn dnsmasq_output(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// dnsmasq as DHCP server only (`--port=0`: no DNS), 2-minute leases (its minimum).
    fn start_dnsmasq(&mut self) {
        let dnsmasq = find_program("dnsmasq", "dnsmasq-base");
        let d = self.dir.path();
        let child = Command::new(find_program("ip", "iproute2"))
            .args(["netns", "exec", &self.server_ns])
            .arg(dnsmasq)
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0",
                "--interface=vsrv",
                "--bind-interfaces",
                "--dhcp-authoritative",
                "--dhcp-range=10.77.0.50,10.77.0.99,255.255.255.0,2m",
                "--dhcp-option=option:router,10.77.0.1",
                "--dhcp-option=option:dns-server,10.77.0.53",
                "--dhcp-option=option:domain-name,keel.test",
                "--dhcp-option=option:ntp-server,10.77.0.123",
                "--log-dhcp",
                "--log-facility=-",
                "--user=root",
            ])
            .arg(format!("--dhcp-leasefile={}", d.join("leases").display()))
            .arg(format!("--pid-file={}", d.join("dnsmasq.pid").display()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.log()).unwrap())
            .stderr(std::fs::File::create(self.log().with_extension("err")).unwrap())
            .spawn()
            .expect("start dnsmasq");
        self.dnsmasq = Some(child);
        // wait until it listens, so that the first DISCOVER is not lost
        let end = Instant::now() + Duration::from_secs(10);
        let started = self.log().with_extension("err");
        loop {
            let text =
                std::fs::read_to_string(&started).unwrap_or_default() + &self.dnsmasq_output();
            if text.contains("DHCP, IP range") {
                return;
            }
            if let Some(Ok(Some(st))) = self.dnsmasq.as_mut().map(|c| c.try_wait()) {
                panic!("dnsmasq exited ({st}):\n{text}");
            }
            assert!(Instant::now() < end, "dnsmasq did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn all_output(&self) -> String {
        std::fs::read_to_string(self.log().with_extension("err")).unwrap_or_default()
            + &self.dnsmasq_output()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(c) = self.dnsmasq.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.server_ns, &self.client_ns] {
            // deleting a namespace deletes the veth end in it, and with it the pair
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The default route's interface and gateway in the calling thread's network namespace.
fn default_route() -> Option<(String, Ipv4Addr)> {
    let routes = std::fs::read_to_string("/proc/thread-self/net/route").unwrap();
    routes.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[1] == "00000000").then(|| {
            let gw = u32::from_str_radix(f[2], 16).unwrap();
            (f[0].to_string(), Ipv4Addr::from(u32::from_be(gw)))
        })
    })
}

#[test]
fn lease_from_dnsmasq_configures_the_interface_renews_and_rebinds() {
    let mut lab = Lab::new();
    lab.start_dnsmasq();
    let client_ns = PathBuf::from("/run/netns").join(&lab.client_ns);
    let resolv = lab.dir.path().join("resolv.conf");
    let resolv_in_thread = resolv.clone();

    let client = std::thread::spawn(move || {
        let ns = std::fs::File::open(&client_ns).unwrap();
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("setns into the client's network namespace: run the tests as root");
        let mut link = DhcpLink::open("vcli", Some("keel-test".into()), Some(resolv_in_thread))
            .expect("open the DHCP link");
        let deadline = Some(Instant::now() + Duration::from_secs(30));
        let lease = match link.next_event(deadline).unwrap() {
            Some(DhcpEvent::Bound(l)) => l,
            other => panic!("expected a lease within 30 s, got {other:?}"),
        };
        let configured = address("vcli").unwrap();
        let route = default_route();
        link.renew().unwrap();
        let renewed = link.next_event(Some(Instant::now() + Duration::from_secs(30)));
        link.rebind().unwrap();
        let rebound = link.next_event(Some(Instant::now() + Duration::from_secs(30)));
        (lease, configured, route, renewed.unwrap(), rebound.unwrap())
    });
    let (lease, configured, route, renewed, rebound) = match client.join() {
        Ok(r) => r,
        Err(p) => {
            eprintln!("dnsmasq said:\n{}", lab.all_output());
            std::panic::resume_unwind(p)
        }
    };
    let log = lab.all_output();
    println!("lease: {lease:?}\ndnsmasq said:\n{log}");

    let a = lease.address.addr;
    assert!(
        (50..=99).contains(&a.octets()[3]) && a.octets()[..3] == [10, 77, 0],
        "{a} is not from the range"
    );
    assert_eq!(lease.address.prefix, 24);
    assert_eq!(configured, (a, Ipv4Addr::new(255, 255, 255, 0)));
    assert_eq!(
        route,
        Some(("vcli".to_string(), Ipv4Addr::new(10, 77, 0, 1)))
    );
    assert_eq!(lease.router, Some(Ipv4Addr::new(10, 77, 0, 1)));
    assert_eq!(lease.server_id, Ipv4Addr::new(10, 77, 0, 1));
    assert_eq!(lease.dns_servers, vec![Ipv4Addr::new(10, 77, 0, 53)]);
    assert_eq!(lease.ntp_servers, vec![Ipv4Addr::new(10, 77, 0, 123)]);
    assert_eq!(lease.domain.as_deref(), Some("keel.test"));
    assert_eq!(lease.lease_time, Duration::from_secs(120));
    let text = std::fs::read_to_string(&resolv).unwrap();
    assert!(text.contains("nameserver 10.77.0.53\n"), "{text}");
    assert!(text.contains("search keel.test\n"), "{text}");

    match renewed {
        Some(DhcpEvent::Renewed {
            lease: l,
            rebinding: false,
        }) => assert_eq!(l.address, lease.address),
        other => panic!("expected a renewal by unicast, got {other:?}\n{log}"),
    }
    match rebound {
        Some(DhcpEvent::Renewed {
            lease: l,
            rebinding: true,
        }) => assert_eq!(l.address, lease.address),
        other => panic!("expected a rebinding by broadcast, got {other:?}\n{log}"),
    }
    // dnsmasq acknowledged the broadcast exchange, the unicast renewal and the rebinding
    assert_eq!(
        log.matches(&format!("DHCPACK(vsrv) {a} ")).count(),
        3,
        "{log}"
    );
    // the OFFER and the first ACK went to the broadcast flag; the others to our address
    assert_eq!(log.matches("broadcast response").count(), 2, "{log}");
    assert!(
        log.contains("keel-test"),
        "the hostname reached dnsmasq:\n{log}"
    );
}
