//! The blocking edges of the network clients: the DHCP socket and the interface it configures,
//! resolv.conf, the SNTP socket and the system clock. All protocol decisions are in
//! [`super::dhcp`] and [`super::sntp`]; nothing here decides, it only carries out.

use super::dhcp::{self, Action, ClientConfig, Destination, DhcpClient, Lease};
use super::sntp::{self, ClockAdjustment, Request, Sample};
use crate::init::net::{add_default_route, link_up, set_address, NetError};
use nix::sys::socket::{self as sock, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// A DHCP runner failed; the operator's next step is in each message.
#[derive(Debug, thiserror::Error)]
pub enum DhcpIoError {
    #[error("DHCP socket on {iface}: {op} failed: {source} (keel-init runs as root; is the interface there?)")]
    Socket {
        iface: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Interface(#[from] NetError),
    #[error("writing {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What happened to the lease; the interface and resolv.conf already reflect it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpEvent {
    /// A new lease was configured.
    Bound(Lease),
    /// The lease was extended (by unicast to its server in RENEWING, or by broadcast in
    /// REBINDING: `rebinding` says which).
    Renewed { lease: Lease, rebinding: bool },
    /// The lease was lost and its address removed; the client is asking anew.
    Lost(Lease),
}

/// The DHCP client of one interface with its socket on 0.0.0.0:68, bound to the interface.
#[derive(Debug)]
pub struct DhcpLink {
    iface: String,
    socket: UdpSocket,
    client: DhcpClient,
    origin: Instant,
    resolv_conf: Option<PathBuf>,
    events: Vec<DhcpEvent>,
}

impl DhcpLink {
    /// Bring `iface` up and open the socket. `hostname` is sent to the server (option 12);
    /// `resolv_conf` is where the lease's resolver goes (none: nowhere).
    pub fn open(
        iface: &str,
        hostname: Option<String>,
        resolv_conf: Option<PathBuf>,
    ) -> Result<Self, DhcpIoError> {
        let mac = hardware_address(iface)?;
        link_up(iface)?;
        let socket = dhcp_socket(iface)?;
        let config = ClientConfig { mac, hostname };
        Ok(DhcpLink {
            iface: iface.to_string(),
            socket,
            client: DhcpClient::new(config, random_u64()),
            origin: Instant::now(),
            resolv_conf,
            events: Vec::new(),
        })
    }

    pub fn client(&self) -> &DhcpClient {
        &self.client
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Renew the lease now instead of at T1 (when bound).
    pub fn renew(&mut self) -> Result<(), DhcpIoError> {
        let now = self.now();
        let before = self.client.state();
        self.client.renew(now);
        self.carry_out(before)
    }

    /// Rebind now (broadcast to any server) instead of at T2 (when bound or renewing).
    pub fn rebind(&mut self) -> Result<(), DhcpIoError> {
        let now = self.now();
        let before = self.client.state();
        self.client.rebind(now);
        self.carry_out(before)
    }

    /// Run the client until the lease changes (the event is returned after it was applied) or
    /// `deadline` passes (`Ok(None)`).
    pub fn next_event(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<DhcpEvent>, DhcpIoError> {
        let mut buf = [0u8; 2048];
        loop {
            if !self.events.is_empty() {
                return Ok(Some(self.events.remove(0)));
            }
            let now = self.now();
            if now >= self.client.poll_timeout() {
                let before = self.client.state();
                self.client.handle_timeout(now);
                self.carry_out(before)?;
                continue;
            }
            let mut wait = self.client.poll_timeout() - now;
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                wait = wait.min(left);
            }
            self.socket
                .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
                .map_err(self.sock_err("SO_RCVTIMEO"))?;
            match self.socket.recv_from(&mut buf) {
                Ok((n, _from)) => {
                    // an ignored packet (another client's, a stale xid) changes nothing
                    let before = self.client.state();
                    let _ = self.client.handle_packet(self.now(), &buf[..n]);
                    self.carry_out(before)?;
                }
                Err(e) if nothing_yet(&e) => {}
                Err(e) => return Err(self.sock_err("recvfrom")(e)),
            }
        }
    }

    /// Keep the lease for as long as the process runs, reporting each change.
    pub fn run(mut self, mut on_event: impl FnMut(&DhcpEvent)) -> Result<(), DhcpIoError> {
        loop {
            if let Some(ev) = self.next_event(None)? {
                on_event(&ev);
            }
        }
    }

    fn sock_err(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> DhcpIoError + '_ {
        move |source| DhcpIoError::Socket {
            iface: self.iface.clone(),
            op,
            source,
        }
    }

    /// Carry out the client's actions: send, configure, drop. `before` is the client's state
    /// before the call that made them.
    fn carry_out(&mut self, before: dhcp::ClientState) -> Result<(), DhcpIoError> {
        let rebinding = before == dhcp::ClientState::Rebinding;
        while let Some(a) = self.client.poll_action() {
            match a {
                Action::Send { to, packet } => {
                    let dest = match to {
                        Destination::Broadcast => Ipv4Addr::BROADCAST,
                        Destination::Unicast(a) => a,
                    };
                    // a failed send is retransmitted on the client's schedule
                    let _ = self
                        .socket
                        .send_to(&packet, SocketAddrV4::new(dest, dhcp::SERVER_PORT));
                }
                Action::Configure(lease) => {
                    set_address(&self.iface, lease.address)?;
                    link_up(&self.iface)?;
                    if let Some(r) = lease.router {
                        add_default_route(&self.iface, r)?;
                    }
                    self.write_resolv_conf(&lease)?;
                    self.events.push(DhcpEvent::Bound(lease));
                }
                Action::Renewed(lease) => {
                    self.write_resolv_conf(&lease)?;
                    self.events.push(DhcpEvent::Renewed { lease, rebinding });
                }
                Action::Deconfigure(lease) => {
                    clear_address(&self.iface)?;
                    self.events.push(DhcpEvent::Lost(lease));
                }
            }
        }
        Ok(())
    }

    fn write_resolv_conf(&self, lease: &Lease) -> Result<(), DhcpIoError> {
        match &self.resolv_conf {
            Some(path) => write_if_changed(path, &dhcp::resolv_conf(lease)),
            None => Ok(()),
        }
    }
}

/// Replace `path` atomically with `content` unless it holds it already.
fn write_if_changed(path: &Path, content: &str) -> Result<(), DhcpIoError> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == content) {
        return Ok(());
    }
    let err = |source| DhcpIoError::ResolvConf {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = OsString::from(path.as_os_str());
    tmp.push(".new");
    std::fs::write(&tmp, content).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn dhcp_socket(iface: &str) -> Result<UdpSocket, DhcpIoError> {
    let e = |op| {
        move |errno: nix::Error| DhcpIoError::Socket {
            iface: iface.to_string(),
            op,
            source: std::io::Error::from(errno),
        }
    };
    let fd = sock::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(e("socket"))?;
    sock::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(e("SO_REUSEADDR"))?;
    sock::setsockopt(&fd, sockopt::Broadcast, &true).map_err(e("SO_BROADCAST"))?;
    sock::setsockopt(&fd, sockopt::BindToDevice, &OsString::from(iface))
        .map_err(e("SO_BINDTODEVICE"))?;
    let any = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, dhcp::CLIENT_PORT));
    sock::bind(fd.as_raw_fd(), &any).map_err(e("bind 0.0.0.0:68"))?;
    Ok(UdpSocket::from(fd))
}

fn ifreq(iface: &str) -> Result<libc::ifreq, NetError> {
    let b = iface.as_bytes();
    if b.is_empty() || b.len() >= libc::IFNAMSIZ {
        return Err(NetError {
            op: "name",
            iface: iface.to_string(),
            source: std::io::Error::other("not an interface name"),
        });
    }
    // SAFETY: ifreq is plain data; all zeroes is a valid value
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    Ok(r)
}

fn ioctl(
    iface: &str,
    op: &'static str,
    req: libc::c_ulong,
    r: &mut libc::ifreq,
) -> Result<(), NetError> {
    let err = |source| NetError {
        op,
        iface: iface.to_string(),
        source,
    };
    let s = sock::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| err(e.into()))?;
    // SAFETY: every caller passes a request whose argument is an ifreq
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), req as _, r as *mut libc::ifreq) };
    if rc < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The interface's Ethernet address (SIOCGIFHWADDR; sysfs would show another namespace's).
pub fn hardware_address(iface: &str) -> Result<[u8; 6], NetError> {
    let mut r = ifreq(iface)?;
    ioctl(iface, "SIOCGIFHWADDR", libc::SIOCGIFHWADDR, &mut r)?;
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member
    let data = unsafe { r.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Ok(mac)
}

/// Remove the interface's IPv4 address, and with it the routes through it (SIOCSIFADDR with
/// 0.0.0.0 deletes the address).
pub fn clear_address(iface: &str) -> Result<(), NetError> {
    let mut r = ifreq(iface)?;
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the ioctl takes it
    r.ifr_ifru.ifru_addr = unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) };
    match ioctl(iface, "SIOCSIFADDR", libc::SIOCSIFADDR, &mut r) {
        // no address to remove
        Err(e) if e.source.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
        r => r,
    }
}

/// Eight random bytes from the kernel (a fixed value if it has none yet: the seed only spreads
/// transaction ids and retransmissions).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into b
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n == b.len() as isize {
        u64::from_ne_bytes(b)
    } else {
        wall_clock().as_nanos() as u64 ^ u64::from(std::process::id())
    }
}

/// The wall clock since the Unix epoch (zero before it).
pub fn wall_clock() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

/// An SNTP query failed.
#[derive(Debug, thiserror::Error)]
pub enum SntpError {
    #[error("NTP server {server:?}: {source}")]
    Io {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("NTP server {server:?} gave no usable reply within {timeout:?}{}", last.as_ref().map(|l| format!(" (last refused: {l})")).unwrap_or_default())]
    Timeout {
        server: String,
        timeout: Duration,
        last: Option<sntp::ReplyError>,
    },
    #[error("NTP server {0:?} does not resolve to an address")]
    NoAddress(String),
    #[error("no NTP server is configured or offered by DHCP")]
    NoServers,
}

/// Ask one server; replies that fail the checks (another request's, spoofed) are skipped
/// until `timeout` ends.
pub fn query(server: SocketAddr, timeout: Duration) -> Result<Sample, SntpError> {
    let name = server.to_string();
    let io = |source| SntpError::Io {
        server: name.clone(),
        source,
    };
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(local).map_err(io)?;
    s.connect(server).map_err(io)?;
    let request = Request::new(wall_clock(), random_u64() as u32);
    s.send(&request.packet()).map_err(io)?;
    let end = Instant::now() + timeout;
    let mut last = None;
    let mut buf = [0u8; 512];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SntpError::Timeout {
                server: name,
                timeout,
                last,
            });
        }
        s.set_read_timeout(Some(left)).map_err(io)?;
        match s.recv(&mut buf) {
            Ok(n) => match sntp::parse_reply(&request, &buf[..n], wall_clock()) {
                Ok(sample) => return Ok(sample),
                Err(e) => last = Some(e),
            },
            Err(e) if nothing_yet(&e) => {}
            Err(e) => return Err(io(e)),
        }
    }
}

/// `host`, `host:port`, `a.b.c.d` or `[v6]:port`; the port defaults to 123.
fn resolve(server: &str) -> Result<SocketAddr, SntpError> {
    let with_port = if server.parse::<SocketAddr>().is_ok()
        || server
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.contains(':') && p.parse::<u16>().is_ok())
    {
        server.to_string()
    } else if server.contains(':') {
        format!("[{server}]:{}", sntp::NTP_PORT)
    } else {
        format!("{server}:{}", sntp::NTP_PORT)
    };
    with_port
        .to_socket_addrs()
        .map_err(|source| SntpError::Io {
            server: server.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| SntpError::NoAddress(server.to_string()))
}

/// Ask every server in turn and keep the sample with the smallest delay; the failures are
/// returned too, for the log.
pub fn query_servers(
    servers: &[String],
    timeout: Duration,
) -> (Option<(String, Sample)>, Vec<SntpError>) {
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for server in servers {
        match resolve(server).and_then(|a| query(a, timeout)) {
            Ok(s) => ok.push((server.clone(), s)),
            Err(e) => failed.push(e),
        }
    }
    let best =
        sntp::best(ok.iter().map(|(_, s)| *s)).and_then(|b| ok.into_iter().find(|(_, s)| *s == b));
    (best, failed)
}

/// Carry out a clock decision: `clock_settime(CLOCK_REALTIME)` for a step, `adjtime` for a
/// slew.
pub fn adjust_clock(adjustment: ClockAdjustment) -> std::io::Result<()> {
    match adjustment {
        ClockAdjustment::Step { offset_ns } => {
            let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)?;
            let now_ns = i128::from(now.tv_sec()) * 1_000_000_000 + i128::from(now.tv_nsec());
            let t = now_ns + i128::from(offset_ns);
            let ts = libc::timespec {
                tv_sec: t.div_euclid(1_000_000_000) as libc::time_t,
                tv_nsec: t.rem_euclid(1_000_000_000) as libc::c_long,
            };
            // SAFETY: ts is a valid, normalized timespec
            if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        ClockAdjustment::Slew { offset_ns } => {
            let us = offset_ns / 1000;
            let tv = libc::timeval {
                tv_sec: us.div_euclid(1_000_000) as libc::time_t,
                tv_usec: us.rem_euclid(1_000_000) as libc::suseconds_t,
            };
            // SAFETY: tv is a valid, normalized timeval; the old delta is not asked for
            if unsafe { libc::adjtime(&tv, std::ptr::null_mut()) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// One sync: ask `servers`, decide ([`sntp::adjustment`]) and adjust the clock. Returns the
/// server used, its sample and what was done, with the failures of the others.
pub fn sync_clock(
    servers: &[String],
    timeout: Duration,
    first_sync: bool,
) -> Result<(String, Sample, ClockAdjustment, Vec<SntpError>), SntpError> {
    if servers.is_empty() {
        return Err(SntpError::NoServers);
    }
    let (best, mut failed) = query_servers(servers, timeout);
    let Some((server, sample)) = best else {
        return Err(failed.pop().unwrap_or(SntpError::NoServers));
    };
    let adj = sntp::adjustment(sample.offset_ns, first_sync);
    adjust_clock(adj).map_err(|source| SntpError::Io {
        server: server.clone(),
        source,
    })?;
    Ok((server, sample, adj, failed))
}

/// A receive that timed out or was interrupted: nothing arrived yet, the caller waits on.
fn nothing_yet(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::net::address;

    /// The interface helpers on a veth pair in a new network namespace of this thread (root;
    /// `ip` makes the pair, as in init::net's tests).
    #[test]
    fn hardware_address_and_clear_address_on_a_veth() {
        let t = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET): run the tests as root");
            let st = std::process::Command::new("ip")
                .args([
                    "link",
                    "add",
                    "eth0",
                    "address",
                    "02:00:00:aa:bb:cc",
                    "type",
                    "veth",
                ])
                .args(["peer", "name", "peer0"])
                .status()
                .expect("ip: install iproute2 (ci/install-deps)");
            assert!(st.success());
            assert_eq!(
                hardware_address("eth0").unwrap(),
                [2, 0, 0, 0xaa, 0xbb, 0xcc]
            );
            assert!(hardware_address("nosuch0").is_err());
            // nothing to clear is fine
            clear_address("eth0").unwrap();
            crate::init::net::configure(
                "eth0",
                "10.9.0.5/24".parse().unwrap(),
                Some(Ipv4Addr::new(10, 9, 0, 1)),
            )
            .unwrap();
            let routes = || std::fs::read_to_string("/proc/thread-self/net/route").unwrap();
            assert!(routes().contains("eth0"), "{}", routes());
            clear_address("eth0").unwrap();
            assert!(address("eth0").is_err(), "the address is gone");
            assert!(!routes().contains("eth0"), "its routes too: {}", routes());
        });
        t.join().unwrap();
    }

    #[test]
    fn resolv_conf_is_replaced_only_when_it_changes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("resolv.conf");
        write_if_changed(&p, "nameserver 10.0.0.1\n").unwrap();
        let before = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        write_if_changed(&p, "nameserver 10.0.0.1\n").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), before);
        write_if_changed(&p, "nameserver 10.0.0.2\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "nameserver 10.0.0.2\n"
        );
        assert!(!d.path().join("resolv.conf.new").exists());
    }

    #[test]
    fn server_names_take_port_123_by_default() {
        let a = |s| resolve(s).unwrap();
        assert_eq!(a("127.0.0.1"), "127.0.0.1:123".parse().unwrap());
        assert_eq!(a("127.0.0.1:4123"), "127.0.0.1:4123".parse().unwrap());
        assert_eq!(a("::1"), "[::1]:123".parse().unwrap());
        assert_eq!(a("[::1]:5"), "[::1]:5".parse().unwrap());
        assert_eq!(a("localhost:9").port(), 9);
        assert!(resolve("no-such-host.invalid").is_err());
    }
}
