//! Network bring-up without any tool: loopback, and one interface with a static IPv4 address
//! and default route, through the classic socket ioctls. The interface choice is pure.

use crate::config::Ipv4Cidr;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// A network interface as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicInfo {
    pub name: String,
    /// The driver's name (`virtio_net`), if the interface has a device.
    pub driver: Option<String>,
}

/// The interface to configure when none is named: the first virtio NIC by name, else the first
/// NIC with a device (loopback, bridges and tunnels have none).
pub fn choose_interface(nics: &[NicInfo]) -> Option<String> {
    let mut with_dev: Vec<&NicInfo> = nics
        .iter()
        .filter(|n| n.name != "lo" && n.driver.is_some())
        .collect();
    with_dev.sort_by(|a, b| a.name.cmp(&b.name));
    with_dev
        .iter()
        .find(|n| n.driver.as_deref() == Some("virtio_net"))
        .or(with_dev.first())
        .map(|n| n.name.clone())
}

/// The interfaces under `/sys/class/net`.
pub fn list_interfaces(sys_class_net: &Path) -> Vec<NicInfo> {
    let Ok(rd) = std::fs::read_dir(sys_class_net) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let driver = std::fs::read_link(e.path().join("device/driver"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
            NicInfo { name, driver }
        })
        .collect()
}

/// A network ioctl failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} on interface {iface} failed: {source}")]
pub struct NetError {
    pub op: &'static str,
    pub iface: String,
    #[source]
    pub source: std::io::Error,
}

fn socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> Result<libc::ifreq, std::io::Error> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!(
            "{name:?} is not an interface name"
        )));
    }
    // SAFETY: ifreq is plain data; all zeroes is a valid value
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(r)
}

fn sockaddr(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the ioctls take it
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn addr_of(sa: &libc::sockaddr) -> Ipv4Addr {
    // SAFETY: the kernel filled an AF_INET address into this sockaddr
    let sin: libc::sockaddr_in = unsafe { std::mem::transmute_copy(sa) };
    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))
}

fn ioctl(fd: &OwnedFd, req: libc::c_ulong, arg: *mut libc::c_void) -> std::io::Result<()> {
    // SAFETY: every caller passes a request whose argument is the pointed-to struct
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A socket and the interface's request with its flags read (SIOCGIFFLAGS).
fn read_flags(iface: &str) -> Result<(OwnedFd, libc::ifreq), NetError> {
    let s = socket().map_err(net_err("socket", iface))?;
    let mut r = ifreq(iface).map_err(net_err("name", iface))?;
    ioctl(&s, libc::SIOCGIFFLAGS, &mut r as *mut _ as *mut _)
        .map_err(net_err("SIOCGIFFLAGS", iface))?;
    Ok((s, r))
}

fn net_err<'a>(op: &'static str, iface: &'a str) -> impl FnOnce(std::io::Error) -> NetError + 'a {
    move |source| NetError {
        op,
        iface: iface.to_string(),
        source,
    }
}

/// Set the interface up.
pub fn link_up(iface: &str) -> Result<(), NetError> {
    let (s, mut r) = read_flags(iface)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union
    unsafe { r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(&s, libc::SIOCSIFFLAGS, &mut r as *mut _ as *mut _)
        .map_err(net_err("SIOCSIFFLAGS", iface))?;
    Ok(())
}

/// Whether the interface is up.
pub fn is_up(iface: &str) -> Result<bool, NetError> {
    let (_s, r) = read_flags(iface)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union
    Ok(unsafe { r.ifr_ifru.ifru_flags } & libc::IFF_UP as libc::c_short != 0)
}

/// Give the interface an address and netmask.
pub fn set_address(iface: &str, cidr: Ipv4Cidr) -> Result<(), NetError> {
    let e = |op| {
        move |source| NetError {
            op,
            iface: iface.to_string(),
            source,
        }
    };
    let s = socket().map_err(e("socket"))?;
    let mut r = ifreq(iface).map_err(e("name"))?;
    r.ifr_ifru.ifru_addr = sockaddr(cidr.addr);
    ioctl(&s, libc::SIOCSIFADDR, &mut r as *mut _ as *mut _).map_err(e("SIOCSIFADDR"))?;
    let mut r = ifreq(iface).map_err(e("name"))?;
    r.ifr_ifru.ifru_netmask = sockaddr(cidr.netmask());
    ioctl(&s, libc::SIOCSIFNETMASK, &mut r as *mut _ as *mut _).map_err(e("SIOCSIFNETMASK"))?;
    Ok(())
}

/// The interface's IPv4 address and netmask.
pub fn address(iface: &str) -> Result<(Ipv4Addr, Ipv4Addr), NetError> {
    let e = |op| {
        move |source| NetError {
            op,
            iface: iface.to_string(),
            source,
        }
    };
    let s = socket().map_err(e("socket"))?;
    let mut r = ifreq(iface).map_err(e("name"))?;
    ioctl(&s, libc::SIOCGIFADDR, &mut r as *mut _ as *mut _).map_err(e("SIOCGIFADDR"))?;
    // SAFETY: SIOCGIFADDR filled the address member
    let a = addr_of(unsafe { &r.ifr_ifru.ifru_addr });
    let mut r = ifreq(iface).map_err(e("name"))?;
    ioctl(&s, libc::SIOCGIFNETMASK, &mut r as *mut _ as *mut _).map_err(e("SIOCGIFNETMASK"))?;
    // SAFETY: SIOCGIFNETMASK filled the netmask member
    let m = addr_of(unsafe { &r.ifr_ifru.ifru_netmask });
    Ok((a, m))
}

/// Add a default route through `gateway` on `iface`. An existing identical route is fine.
pub fn add_default_route(iface: &str, gateway: Ipv4Addr) -> Result<(), NetError> {
    let e = |op| {
        move |source| NetError {
            op,
            iface: iface.to_string(),
            source,
        }
    };
    let s = socket().map_err(e("socket"))?;
    let mut dev = std::ffi::CString::new(iface)
        .map_err(|_| e("name")(std::io::Error::other("NUL in name")))?
        .into_bytes_with_nul();
    // SAFETY: rtentry is plain data; all zeroes is a valid value
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(gateway);
    rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
    rt.rt_dev = dev.as_mut_ptr() as *mut libc::c_char;
    match ioctl(&s, libc::SIOCADDRT, &mut rt as *mut _ as *mut _) {
        Ok(()) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(err) => Err(e("SIOCADDRT")(err)),
    }
}

/// Bring up loopback (127.0.0.1/8).
pub fn loopback_up() -> Result<(), NetError> {
    set_address(
        "lo",
        Ipv4Cidr {
            addr: Ipv4Addr::LOCALHOST,
            prefix: 8,
        },
    )?;
    link_up("lo")
}

/// Configure `iface` with `cidr`, bring it up and route through `gateway`.
pub fn configure(iface: &str, cidr: Ipv4Cidr, gateway: Option<Ipv4Addr>) -> Result<(), NetError> {
    set_address(iface, cidr)?;
    link_up(iface)?;
    if let Some(g) = gateway {
        add_default_route(iface, g)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(name: &str, driver: Option<&str>) -> NicInfo {
        NicInfo {
            name: name.into(),
            driver: driver.map(String::from),
        }
    }

    #[test]
    fn first_virtio_nic_is_chosen() {
        let n = [
            nic("lo", None),
            nic("ens4", Some("e1000")),
            nic("eth1", Some("virtio_net")),
            nic("eth0", Some("virtio_net")),
            nic("br0", None),
        ];
        assert_eq!(choose_interface(&n).as_deref(), Some("eth0"));
        let n = [
            nic("lo", None),
            nic("ens5", Some("e1000")),
            nic("ens4", Some("e1000e")),
        ];
        assert_eq!(choose_interface(&n).as_deref(), Some("ens4"));
        assert_eq!(choose_interface(&[nic("lo", None)]), None);
    }

    /// A static address and default route on an Ethernet-like interface (one end of a veth
    /// pair, made by the test host's `ip`; the image has none) in a new network namespace.
    #[test]
    fn static_address_and_default_route_on_a_veth() {
        let t = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET): run the tests as root");
            // children forked from this thread start in its network namespace
            let ip = |args: &[&str]| {
                let st = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .expect("ip: install iproute2 (ci/install-deps)");
                assert!(st.success(), "ip {args:?}");
            };
            ip(&[
                "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
            ]);
            ip(&["link", "set", "peer0", "up"]);
            let cidr: Ipv4Cidr = "10.0.2.15/24".parse().unwrap();
            configure("eth0", cidr, Some(Ipv4Addr::new(10, 0, 2, 2))).unwrap();
            assert!(is_up("eth0").unwrap());
            assert_eq!(
                address("eth0").unwrap(),
                (Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(255, 255, 255, 0))
            );
            let routes = std::fs::read_to_string("/proc/thread-self/net/route").unwrap();
            // Iface Destination Gateway ... in little-endian hex
            let default = routes
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.len() > 2 && f[1] == "00000000")
                .unwrap_or_else(|| panic!("no default route in\n{routes}"));
            assert_eq!((default[0], default[2]), ("eth0", "0202000A"), "{routes}");
            // adding it again is fine
            add_default_route("eth0", Ipv4Addr::new(10, 0, 2, 2)).unwrap();
        });
        t.join().unwrap();
    }

    /// The ioctls for real, on the loopback of a new network namespace (the test runs as
    /// root; the namespace is the calling thread's only).
    #[test]
    fn loopback_in_a_fresh_network_namespace() {
        let t = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET): run the tests as root");
            assert!(!is_up("lo").unwrap());
            loopback_up().unwrap();
            assert!(is_up("lo").unwrap());
            assert_eq!(
                address("lo").unwrap(),
                (Ipv4Addr::LOCALHOST, Ipv4Addr::new(255, 0, 0, 0))
            );
            // a second address setting on lo changes it; read back what was set
            set_address("lo", "127.0.0.9/16".parse().unwrap()).unwrap();
            assert_eq!(
                address("lo").unwrap(),
                (Ipv4Addr::new(127, 0, 0, 9), Ipv4Addr::new(255, 255, 0, 0))
            );
            let l = std::net::TcpListener::bind("127.0.0.9:0").unwrap();
            std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let err = link_up("nosuch0").unwrap_err();
            assert!(err.to_string().contains("nosuch0"), "{err}");
        });
        t.join().unwrap();
    }
}
