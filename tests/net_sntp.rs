//! The SNTP client against a real NTP server: Debian's chronyd on loopback with `local
//! stratum 8`, serving the host's clock (`-x`: it never touches it). The test never sets the
//! host clock either: the step/slew decision is checked as a value.
//!
//! Needs chronyd (ci/install-deps installs chrony); without it the test fails.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use keelos::net::io::{query, query_servers, SntpError};
use keelos::net::sntp::{adjustment, ClockAdjustment};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn find_program(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} is not installed: run ci/install-deps (package chrony)"))
}

/// chronyd in the foreground; killed when dropped, even when the test fails.
struct Chronyd {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Chronyd {
    fn start(port: u16) -> Chronyd {
        let chronyd = find_program("chronyd");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let conf = dir.path().join("chrony.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbindaddress 127.0.0.1\nallow 127.0.0.1\nlocal stratum 8\n\
                 cmdport 0\npidfile {d}/chronyd.pid\ndriftfile {d}/drift\n"
            ),
        )
        .unwrap();
        let log = dir.path().join("chronyd.log");
        let child = Command::new(chronyd)
            .args(["-d", "-x", "-u", "root", "-f"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("chronyd.err")).unwrap())
            .spawn()
            .expect("start chronyd");
        Chronyd {
            child,
            log,
            _dir: dir,
        }
    }

    fn output(&self) -> String {
        let err = self.log.with_file_name("chronyd.err");
        format!(
            "{}{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(err).unwrap_or_default()
        )
    }
}

impl Drop for Chronyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn sntp_query_against_chronyd_on_loopback() {
    let port = free_udp_port();
    let mut chronyd = Chronyd::start(port);
    let server = SocketAddr::from((Ipv4Addr::LOCALHOST, port));

    // chronyd needs a moment to bind and to take its local reference
    let end = Instant::now() + Duration::from_secs(20);
    let sample = loop {
        match query(server, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(e) => {
                if let Ok(Some(st)) = chronyd.child.try_wait() {
                    panic!("chronyd exited ({st}):\n{}", chronyd.output());
                }
                assert!(
                    Instant::now() < end,
                    "no usable reply from chronyd in 20 s: {e}\n{}",
                    chronyd.output()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    println!("chronyd on {server}: {sample:?}");
    assert_eq!(sample.stratum, 8, "local stratum 8");
    // chronyd serves this very clock: the offset is the measuring error only
    assert!(
        sample.offset_ns.unsigned_abs() < 1_000_000_000,
        "{sample:?}"
    );
    assert!(sample.delay_ns < 1_000_000_000, "{sample:?}");

    // the decision, not carried out: a first sync steps, a later one this small slews
    assert_eq!(
        adjustment(sample.offset_ns, true),
        ClockAdjustment::Step {
            offset_ns: sample.offset_ns
        }
    );
    assert_eq!(
        adjustment(sample.offset_ns, false),
        ClockAdjustment::Slew {
            offset_ns: sample.offset_ns
        }
    );

    // several servers: a dead one and a name that does not resolve are reported, chronyd used
    let dead = format!("127.0.0.1:{}", free_udp_port());
    let servers = vec![
        dead.clone(),
        format!("127.0.0.1:{port}"),
        "no-such-host.invalid".to_string(),
    ];
    let (best, failed) = query_servers(&servers, Duration::from_millis(500));
    let (used, s) = best.expect("chronyd answers");
    assert_eq!(used, format!("127.0.0.1:{port}"));
    assert_eq!(s.stratum, 8);
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(
        failed.iter().all(|e| matches!(
            e,
            SntpError::Io { .. } | SntpError::Timeout { .. } | SntpError::NoAddress(_)
        )),
        "{failed:?}"
    );
}
