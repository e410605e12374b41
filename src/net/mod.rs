//! The node's network clients: DHCPv4 for its address and SNTP for its clock.
//!
//! `dhcp` and `sntp` are protocol cores without I/O or clock: the caller passes time, random
//! seeds and received bytes in and gets packets and decisions out. `io` holds the thin blocking
//! runners keel-init uses: sockets, the interface ioctls, resolv.conf and the clock syscalls.

/// Where keel-init writes the DHCP lease's resolver; the image's `/etc/resolv.conf` links here
/// (the root is read-only) and kubelet's `resolvConf` points here.
pub const RESOLV_CONF: &str = "/run/keel/resolv.conf";

pub mod dhcp;
pub mod io;
pub mod sntp;
