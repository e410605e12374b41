//! A DHCPv4 client (RFC 2131) as a state machine that does no I/O and reads no clock.
//!
//! The caller owns the socket and the clock. Call order, as in quinn-proto:
//! - [`DhcpClient::handle_timeout`] whenever [`DhcpClient::poll_timeout`] has come (and once at
//!   the start: a new client sends its DISCOVER from there);
//! - [`DhcpClient::handle_packet`] for every datagram that arrives on port 68;
//! - then [`DhcpClient::poll_action`] until it returns `None`: packets to send, leases to apply,
//!   leases to drop.
//!
//! Time is a monotonic `Duration` since any origin the caller likes; randomness (transaction ids,
//! the ±1 s jitter of retransmissions) comes from a seed the caller passes in. Packets are
//! encoded and decoded with `dhcproto`; a received packet is checked (a reply, to our hardware
//! address, with our transaction id, of a message type that fits the state) and anything else is
//! ignored with a reason, never a panic.
//!
//! States and timers (RFC 2131 §4.4): INIT sends a DISCOVER (SELECTING); the first usable OFFER
//! is requested (REQUESTING); its ACK binds the lease (BOUND), a NAK starts over. At T1 the
//! client asks the lease's server by unicast (RENEWING), at T2 any server by broadcast
//! (REBINDING); at the lease's end the address is dropped and the client starts over. Lease
//! times count from the first sending of the REQUEST that was acknowledged. Every retransmission
//! waits 4 s, 8 s, ... up to 64 s, ±1 s, and never past the next state boundary (T2, expiry).
//!
//! Left out on purpose: INIT-REBOOT (a node asks anew at each boot), the ARP probe and DECLINE
//! of §4.4.1, DHCPRELEASE, DHCPINFORM, relay agents and option overload.

use crate::config::Ipv4Cidr;
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode, MAGIC};
use dhcproto::{Decodable, Encodable};
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Duration;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;

/// The first retransmission waits this long, each next one twice as long, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(4);
const MAX_BACKOFF: Duration = Duration::from_secs(64);
/// REQUESTs sent in REQUESTING before starting over with a DISCOVER (about a minute).
const REQUEST_ATTEMPTS: u32 = 5;
/// After a NAK the client starts over after this pause, so that a server that NAKs everything
/// does not make it spin.
pub const NAK_PAUSE: Duration = Duration::from_secs(2);
/// The shortest lease honoured: shorter ones would make the client renew in a tight loop.
pub const MIN_LEASE: Duration = Duration::from_secs(30);
/// The largest DHCP message we take (option 57).
pub const MAX_MESSAGE_SIZE: u16 = 1500;
/// BOOTP's minimum message size; some servers drop shorter requests.
const MIN_PACKET_SIZE: usize = 300;

/// What the server is asked for (option 55).
const REQUESTED: [OptionCode; 10] = [
    OptionCode::SubnetMask,
    OptionCode::Router,
    OptionCode::DomainNameServer,
    OptionCode::Hostname,
    OptionCode::DomainName,
    OptionCode::NtpServers,
    OptionCode::AddressLeaseTime,
    OptionCode::Renewal,
    OptionCode::Rebinding,
    OptionCode::DomainSearch,
];

/// The options read from replies. Only these reach `dhcproto`'s decoder: an option that fails to
/// decode ends the decoding of the options after it, and some others trip assertions inside
/// `dhcproto` when their length is not the expected one.
const READ: [u8; 13] = [1, 3, 6, 12, 15, 42, 51, 53, 54, 56, 58, 59, 119];

/// Who the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The interface's Ethernet address: chaddr, and the client identifier `01 ‖ mac`.
    pub mac: [u8; 6],
    /// Sent as option 12 so that the server may register the name (dnsmasq does).
    pub hostname: Option<String>,
}

/// An acknowledged lease: what the interface, the resolver and the clock need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Cidr,
    /// The first usable router of option 3.
    pub router: Option<Ipv4Addr>,
    pub dns_servers: Vec<Ipv4Addr>,
    /// Option 15, when it is a valid domain name.
    pub domain: Option<String>,
    /// Option 119, the valid names only.
    pub search: Vec<String>,
    /// Option 12, when it is a valid host name.
    pub hostname: Option<String>,
    /// Option 42: for the SNTP client.
    pub ntp_servers: Vec<Ipv4Addr>,
    /// The lease's length (at least [`MIN_LEASE`]); T1 and T2 count from the same start.
    pub lease_time: Duration,
    pub t1: Duration,
    pub t2: Duration,
    /// The server that granted it (option 54): renewals go there.
    pub server_id: Ipv4Addr,
}

impl Lease {
    /// Whether `other` needs the interface configured anew (address, prefix or router differ).
    fn same_link(&self, other: &Lease) -> bool {
        self.address == other.address && self.router == other.router
    }
}

/// Where a packet goes: always from port 68 to port 67.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// 255.255.255.255 on the client's interface.
    Broadcast,
    Unicast(Ipv4Addr),
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this datagram.
    Send { to: Destination, packet: Vec<u8> },
    /// A new lease: give the interface its address, route and resolver, replacing any earlier.
    Configure(Lease),
    /// The lease was extended with the same address, prefix and router; the resolver data or
    /// the times may have changed.
    Renewed(Lease),
    /// The lease is gone (expired, refused by a NAK, or replaced by another address): remove
    /// its address and route.
    Deconfigure(Lease),
}

/// The RFC 2131 state, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    Init,
    Selecting,
    Requesting,
    Bound,
    Renewing,
    Rebinding,
}

/// Why a received packet was ignored. None of these is fatal: the client waits on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    /// Too short, no DHCP magic cookie, or undecodable.
    #[error("not a DHCP message: {0}")]
    Malformed(String),
    #[error("not a BOOTREPLY")]
    NotAReply,
    #[error("for another client (htype {htype}, hardware address {chaddr})")]
    OtherClient { htype: u8, chaddr: String },
    #[error("no request is outstanding (state {0:?})")]
    NotWaiting(ClientState),
    #[error("transaction id {got:#010x} is not ours ({ours:#010x})")]
    WrongXid { ours: u32, got: u32 },
    #[error("no DHCP message type (option 53)")]
    NoMessageType,
    #[error("a {message} is not expected in state {state:?}")]
    Unexpected { message: String, state: ClientState },
    #[error("from server {got}, but we asked {ours}")]
    OtherServer { ours: Ipv4Addr, got: Ipv4Addr },
    #[error("{0} is not a usable unicast address")]
    BadAddress(Ipv4Addr),
    #[error("acknowledges {got}, but we asked for {asked}")]
    WrongAddress { asked: Ipv4Addr, got: Ipv4Addr },
    #[error("no server identifier (option 54)")]
    NoServerId,
    #[error("no lease time (option 51)")]
    NoLeaseTime,
    #[error("subnet mask {0} is not a prefix of 1 to 32 bits")]
    BadNetmask(Ipv4Addr),
}

/// One exchange: a transaction id and its retransmission schedule.
#[derive(Debug, Clone)]
struct Transaction {
    xid: u32,
    /// When the first packet was (or is to be) sent: `secs` counts from here, a lease too.
    started: Duration,
    sent: u32,
    next_send: Duration,
}

/// A lease and when it started.
#[derive(Debug, Clone)]
struct Binding {
    lease: Lease,
    start: Duration,
}

impl Binding {
    fn t1_at(&self) -> Duration {
        self.start.saturating_add(self.lease.t1)
    }
    fn t2_at(&self) -> Duration {
        self.start.saturating_add(self.lease.t2)
    }
    fn expiry(&self) -> Duration {
        self.start.saturating_add(self.lease.lease_time)
    }
}

#[derive(Debug, Clone)]
enum State {
    /// Start a DISCOVER at this time.
    Init {
        at: Duration,
    },
    Selecting(Transaction),
    Requesting {
        tx: Transaction,
        address: Ipv4Addr,
        server: Ipv4Addr,
    },
    Bound(Binding),
    Renewing(Binding, Transaction),
    Rebinding(Binding, Transaction),
}

/// The client of one interface.
#[derive(Debug)]
pub struct DhcpClient {
    config: ClientConfig,
    rng: SplitMix64,
    state: State,
    actions: VecDeque<Action>,
}

impl DhcpClient {
    /// A client in INIT; its first [`handle_timeout`](Self::handle_timeout) sends a DISCOVER.
    /// `seed` feeds the transaction ids and jitter: pass a random value.
    pub fn new(config: ClientConfig, seed: u64) -> Self {
        DhcpClient {
            config,
            rng: SplitMix64(seed),
            state: State::Init { at: Duration::ZERO },
            actions: VecDeque::new(),
        }
    }

    pub fn state(&self) -> ClientState {
        match self.state {
            State::Init { .. } => ClientState::Init,
            State::Selecting(_) => ClientState::Selecting,
            State::Requesting { .. } => ClientState::Requesting,
            State::Bound(_) => ClientState::Bound,
            State::Renewing(..) => ClientState::Renewing,
            State::Rebinding(..) => ClientState::Rebinding,
        }
    }

    /// The lease held, in BOUND, RENEWING and REBINDING.
    pub fn lease(&self) -> Option<&Lease> {
        match &self.state {
            State::Bound(b) | State::Renewing(b, _) | State::Rebinding(b, _) => Some(&b.lease),
            _ => None,
        }
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Duration {
        match &self.state {
            State::Init { at } => *at,
            State::Selecting(tx) | State::Requesting { tx, .. } => tx.next_send,
            State::Bound(b) => b.t1_at(),
            State::Renewing(b, tx) => tx.next_send.min(b.t2_at()),
            State::Rebinding(b, tx) => tx.next_send.min(b.expiry()),
        }
    }

    /// Renew now instead of at T1 (BOUND only; otherwise nothing happens).
    pub fn renew(&mut self, now: Duration) {
        if let State::Bound(b) = &self.state {
            let b = b.clone();
            let tx = self.transaction(now);
            self.state = State::Renewing(b, tx);
            self.handle_timeout(now);
        }
    }

    /// Rebind now, asking any server by broadcast, instead of at T2 (BOUND and RENEWING only).
    pub fn rebind(&mut self, now: Duration) {
        if let State::Bound(b) | State::Renewing(b, _) = &self.state {
            let b = b.clone();
            let tx = self.transaction(now);
            self.state = State::Rebinding(b, tx);
            self.handle_timeout(now);
        }
    }

    /// Act on every timer that has come by `now`: (re)transmissions and state changes.
    pub fn handle_timeout(&mut self, now: Duration) {
        // a late call may cross several boundaries at once (T1, T2 and expiry after a suspend)
        loop {
            let state = std::mem::replace(&mut self.state, State::Init { at: now });
            let (next, again) = match state {
                State::Init { at } if now >= at => (State::Selecting(self.transaction(now)), true),
                State::Selecting(mut tx) => {
                    if now >= tx.next_send {
                        self.send_discover(now, &mut tx);
                    }
                    (State::Selecting(tx), false)
                }
                State::Requesting {
                    mut tx,
                    address,
                    server,
                } => {
                    if now < tx.next_send {
                        (
                            State::Requesting {
                                tx,
                                address,
                                server,
                            },
                            false,
                        )
                    } else if tx.sent >= REQUEST_ATTEMPTS {
                        (State::Init { at: now }, true)
                    } else {
                        self.send_select_request(now, &mut tx, address, server);
                        (
                            State::Requesting {
                                tx,
                                address,
                                server,
                            },
                            false,
                        )
                    }
                }
                State::Bound(b) if now >= b.t1_at() => {
                    let tx = self.transaction(now);
                    (State::Renewing(b, tx), true)
                }
                State::Renewing(b, _) if now >= b.t2_at() => {
                    let tx = self.transaction(now);
                    (State::Rebinding(b, tx), true)
                }
                State::Renewing(b, mut tx) => {
                    if now >= tx.next_send {
                        let to = Destination::Unicast(b.lease.server_id);
                        self.send_extend_request(now, &mut tx, &b, to, b.t2_at());
                    }
                    (State::Renewing(b, tx), false)
                }
                State::Rebinding(b, _) if now >= b.expiry() => {
                    self.actions.push_back(Action::Deconfigure(b.lease));
                    (State::Init { at: now }, true)
                }
                State::Rebinding(b, mut tx) => {
                    if now >= tx.next_send {
                        let to = Destination::Broadcast;
                        self.send_extend_request(now, &mut tx, &b, to, b.expiry());
                    }
                    (State::Rebinding(b, tx), false)
                }
                s @ (State::Init { .. } | State::Bound(_)) => (s, false),
            };
            self.state = next;
            if !again {
                return;
            }
        }
    }

    /// Take a datagram received on port 68. `Err` says why it was ignored; the state is then
    /// unchanged.
    pub fn handle_packet(&mut self, now: Duration, bytes: &[u8]) -> Result<(), Ignored> {
        let msg = decode(bytes)?;
        if msg.opcode() != Opcode::BootReply {
            return Err(Ignored::NotAReply);
        }
        let htype = u8::from(msg.htype());
        // chaddr() slices by hlen: check it first
        if htype != 1 || msg.hlen() != 6 || msg.chaddr() != self.config.mac {
            let n = usize::from(msg.hlen()).min(16);
            let raw = bytes.get(28..28 + n).unwrap_or_default();
            return Err(Ignored::OtherClient {
                htype,
                chaddr: hex(raw),
            });
        }
        let state = self.state();
        let ours = match &self.state {
            State::Selecting(tx)
            | State::Requesting { tx, .. }
            | State::Renewing(_, tx)
            | State::Rebinding(_, tx) => tx.xid,
            State::Init { .. } | State::Bound(_) => return Err(Ignored::NotWaiting(state)),
        };
        if msg.xid() != ours {
            return Err(Ignored::WrongXid {
                ours,
                got: msg.xid(),
            });
        }
        let mtype = msg.opts().msg_type().ok_or(Ignored::NoMessageType)?;
        let server_id = match msg.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(s)) => Some(*s),
            _ => None,
        };
        let unexpected = || Ignored::Unexpected {
            message: format!("{mtype:?}"),
            state,
        };
        match (&self.state, mtype) {
            (State::Selecting(_), MessageType::Offer) => {
                let address = msg.yiaddr();
                if !usable_unicast(address) {
                    return Err(Ignored::BadAddress(address));
                }
                let server = server_id.ok_or(Ignored::NoServerId)?;
                let tx = Transaction {
                    xid: ours,
                    started: now,
                    sent: 0,
                    next_send: now,
                };
                self.state = State::Requesting {
                    tx,
                    address,
                    server,
                };
            }
            (
                State::Requesting {
                    tx,
                    address,
                    server,
                },
                MessageType::Ack,
            ) => {
                if let Some(got) = server_id.filter(|s| s != server) {
                    return Err(Ignored::OtherServer { ours: *server, got });
                }
                if msg.yiaddr() != *address {
                    return Err(Ignored::WrongAddress {
                        asked: *address,
                        got: msg.yiaddr(),
                    });
                }
                let lease = parse_lease(&msg, Some(*server))?;
                self.actions.push_back(Action::Configure(lease.clone()));
                self.state = State::Bound(Binding {
                    lease,
                    start: tx.started,
                });
            }
            (State::Requesting { server, .. }, MessageType::Nak) => {
                if let Some(got) = server_id.filter(|s| s != server) {
                    return Err(Ignored::OtherServer { ours: *server, got });
                }
                self.state = State::Init {
                    at: now.saturating_add(NAK_PAUSE),
                };
            }
            (State::Renewing(b, tx) | State::Rebinding(b, tx), MessageType::Ack) => {
                let lease = parse_lease(&msg, Some(b.lease.server_id))?;
                if b.lease.same_link(&lease) {
                    self.actions.push_back(Action::Renewed(lease.clone()));
                } else {
                    self.actions.push_back(Action::Deconfigure(b.lease.clone()));
                    self.actions.push_back(Action::Configure(lease.clone()));
                }
                self.state = State::Bound(Binding {
                    lease,
                    start: tx.started,
                });
            }
            (State::Renewing(b, _) | State::Rebinding(b, _), MessageType::Nak) => {
                self.actions.push_back(Action::Deconfigure(b.lease.clone()));
                self.state = State::Init {
                    at: now.saturating_add(NAK_PAUSE),
                };
            }
            _ => return Err(unexpected()),
        }
        self.handle_timeout(now);
        Ok(())
    }

    fn transaction(&mut self, now: Duration) -> Transaction {
        Transaction {
            xid: self.rng.next() as u32,
            started: now,
            sent: 0,
            next_send: now,
        }
    }

    /// The wait after the `sent`-th transmission: 4 s · 2^(sent-1), at most 64 s, ±1 s.
    fn backoff(&mut self, sent: u32) -> Duration {
        let exp = sent.saturating_sub(1).min(8);
        let base = FIRST_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF);
        let jitter_ms = (self.rng.next() % 2001) as i64 - 1000;
        let ms = base.as_millis() as i64 + jitter_ms;
        Duration::from_millis(ms.max(0) as u64)
    }

    fn sent(&mut self, now: Duration, tx: &mut Transaction, limit: Duration) {
        tx.sent = tx.sent.saturating_add(1);
        let wait = self.backoff(tx.sent);
        tx.next_send = now.saturating_add(wait).min(limit.max(now));
    }

    fn send_discover(&mut self, now: Duration, tx: &mut Transaction) {
        let msg = self.message(MessageType::Discover, tx, now, Ipv4Addr::UNSPECIFIED, true);
        self.push_send(Destination::Broadcast, &msg);
        self.sent(now, tx, Duration::MAX);
    }

    fn send_select_request(
        &mut self,
        now: Duration,
        tx: &mut Transaction,
        address: Ipv4Addr,
        server: Ipv4Addr,
    ) {
        let mut msg = self.message(MessageType::Request, tx, now, Ipv4Addr::UNSPECIFIED, true);
        msg.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(address));
        msg.opts_mut().insert(DhcpOption::ServerIdentifier(server));
        self.push_send(Destination::Broadcast, &msg);
        self.sent(now, tx, Duration::MAX);
    }

    /// A REQUEST in RENEWING or REBINDING: ciaddr is ours, no server id nor requested address.
    fn send_extend_request(
        &mut self,
        now: Duration,
        tx: &mut Transaction,
        b: &Binding,
        to: Destination,
        limit: Duration,
    ) {
        let msg = self.message(MessageType::Request, tx, now, b.lease.address.addr, false);
        self.push_send(to, &msg);
        self.sent(now, tx, limit);
    }

    fn message(
        &self,
        kind: MessageType,
        tx: &Transaction,
        now: Duration,
        ciaddr: Ipv4Addr,
        broadcast: bool,
    ) -> Message {
        let unspecified = Ipv4Addr::UNSPECIFIED;
        let mut m = Message::new_with_id(
            tx.xid,
            ciaddr,
            unspecified,
            unspecified,
            unspecified,
            &self.config.mac,
        );
        let secs = now.saturating_sub(tx.started).as_secs();
        m.set_secs(u16::try_from(secs).unwrap_or(u16::MAX));
        if broadcast {
            // our interface has no address yet to take a unicast reply at
            m.set_flags(Flags::default().set_broadcast());
        }
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        let mut id = vec![1];
        id.extend_from_slice(&self.config.mac);
        o.insert(DhcpOption::ClientIdentifier(id));
        o.insert(DhcpOption::MaxMessageSize(MAX_MESSAGE_SIZE));
        o.insert(DhcpOption::ParameterRequestList(REQUESTED.to_vec()));
        if let Some(h) = self
            .config
            .hostname
            .as_deref()
            .filter(|h| valid_dns_name(h))
        {
            o.insert(DhcpOption::Hostname(h.to_string()));
        }
        m
    }

    fn push_send(&mut self, to: Destination, msg: &Message) {
        // encoding what `message` builds cannot fail; were it to, the retransmission timer
        // still runs and nothing is sent
        if let Ok(mut packet) = msg.to_vec() {
            if packet.len() < MIN_PACKET_SIZE {
                packet.resize(MIN_PACKET_SIZE, 0);
            }
            self.actions.push_back(Action::Send { to, packet });
        }
    }
}

/// Decode a received datagram: only the options in [`READ`] are handed to `dhcproto`.
fn decode(bytes: &[u8]) -> Result<Message, Ignored> {
    const OPTIONS: usize = 240;
    if bytes.len() < OPTIONS {
        return Err(Ignored::Malformed(format!(
            "{} bytes, a DHCP message has at least {OPTIONS}",
            bytes.len()
        )));
    }
    if bytes[236..OPTIONS] != MAGIC {
        return Err(Ignored::Malformed("no DHCP magic cookie".into()));
    }
    let mut kept = bytes[..OPTIONS].to_vec();
    let mut rest = &bytes[OPTIONS..];
    while let Some((&code, tail)) = rest.split_first() {
        match code {
            0 => rest = tail,
            255 => break,
            _ => {
                let Some((&len, tail)) = tail.split_first() else {
                    break;
                };
                let Some(value) = tail.get(..usize::from(len)) else {
                    break;
                };
                if READ.contains(&code) {
                    kept.extend_from_slice(&[code, len]);
                    kept.extend_from_slice(value);
                }
                rest = &tail[usize::from(len)..];
            }
        }
    }
    kept.push(255);
    Message::from_bytes(&kept).map_err(|e| Ignored::Malformed(e.to_string()))
}

/// The lease an ACK grants. `fallback_server` stands in for a missing option 54.
fn parse_lease(msg: &Message, fallback_server: Option<Ipv4Addr>) -> Result<Lease, Ignored> {
    let o = msg.opts();
    let addr = msg.yiaddr();
    if !usable_unicast(addr) {
        return Err(Ignored::BadAddress(addr));
    }
    let prefix = match o.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(m)) => mask_prefix(*m)
            .filter(|p| *p > 0)
            .ok_or(Ignored::BadNetmask(*m))?,
        _ => classful_prefix(addr),
    };
    let addrs = |code| match o.get(code) {
        Some(
            DhcpOption::Router(v) | DhcpOption::DomainNameServer(v) | DhcpOption::NtpServers(v),
        ) => v.iter().copied().filter(|a| usable_unicast(*a)).collect(),
        _ => Vec::new(),
    };
    let name = |code| match o.get(code) {
        Some(DhcpOption::DomainName(s) | DhcpOption::Hostname(s)) => clean_name(s),
        _ => None,
    };
    let search = match o.get(OptionCode::DomainSearch) {
        Some(DhcpOption::DomainSearch(names)) => names
            .iter()
            .filter_map(|n| clean_name(&n.to_ascii()))
            .collect(),
        _ => Vec::new(),
    };
    let secs = |code| match o.get(code) {
        Some(
            DhcpOption::AddressLeaseTime(s) | DhcpOption::Renewal(s) | DhcpOption::Rebinding(s),
        ) => Some(Duration::from_secs(u64::from(*s))),
        _ => None,
    };
    let lease_time = secs(OptionCode::AddressLeaseTime)
        .ok_or(Ignored::NoLeaseTime)?
        .max(MIN_LEASE);
    // RFC 2131 §4.4.5: T1 defaults to half the lease, T2 to 7/8; both must keep 0 < T1 < T2 < lease
    let (t1, t2) = match (secs(OptionCode::Renewal), secs(OptionCode::Rebinding)) {
        (Some(t1), Some(t2)) if !t1.is_zero() && t1 < t2 && t2 < lease_time => (t1, t2),
        _ => (lease_time / 2, lease_time / 8 * 7),
    };
    let server_id = match o.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => Some(*s),
        _ => fallback_server,
    }
    .ok_or(Ignored::NoServerId)?;
    Ok(Lease {
        address: Ipv4Cidr { addr, prefix },
        router: addrs(OptionCode::Router).first().copied(),
        dns_servers: addrs(OptionCode::DomainNameServer),
        domain: name(OptionCode::DomainName),
        search,
        hostname: name(OptionCode::Hostname),
        ntp_servers: addrs(OptionCode::NtpServers),
        lease_time,
        t1,
        t2,
        server_id,
    })
}

/// The prefix length of a contiguous netmask.
fn mask_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// The class A/B/C prefix, for servers that send no subnet mask (RFC 2131 leaves it open).
fn classful_prefix(a: Ipv4Addr) -> u8 {
    match a.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// An address a host may have or talk to.
fn usable_unicast(a: Ipv4Addr) -> bool {
    !(a.is_unspecified()
        || a.is_broadcast()
        || a.is_multicast()
        || a.is_loopback()
        || a.octets()[0] == 0
        || a.octets()[0] >= 240)
}

/// A name as a server sends it (maybe with trailing NULs or dot), if it is a valid DNS name.
fn clean_name(s: &str) -> Option<String> {
    let s = s.trim_end_matches('\0').trim_end_matches('.');
    valid_dns_name(s).then(|| s.to_ascii_lowercase())
}

/// Letters, digits and hyphens in dot-separated labels of 1 to 63 characters, 253 at most in
/// all: nothing that could break a line of resolv.conf or a hostname.
pub fn valid_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        })
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The node's host name: the configured one wins over the lease's.
pub fn choose_hostname(configured: Option<&str>, lease: &Lease) -> Option<String> {
    configured
        .map(str::to_string)
        .or_else(|| lease.hostname.clone())
}

/// glibc reads at most three `nameserver` lines (MAXNS).
const MAX_NAMESERVERS: usize = 3;

/// The content of /etc/resolv.conf for a lease: its DNS servers (the first three), and its
/// search list (option 119), else its domain (option 15). Names were validated when the lease
/// was parsed, so no line can carry anything else.
pub fn resolv_conf(lease: &Lease) -> String {
    let mut s = format!(
        "# written by keel-init from the DHCP lease of {}/{} (server {})\n",
        lease.address.addr, lease.address.prefix, lease.server_id
    );
    let search: Vec<&str> = if lease.search.is_empty() {
        lease.domain.iter().map(String::as_str).collect()
    } else {
        lease.search.iter().map(String::as_str).collect()
    };
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    for ns in lease.dns_servers.iter().take(MAX_NAMESERVERS) {
        s.push_str(&format!("nameserver {ns}\n"));
    }
    s
}

/// SplitMix64: enough randomness for transaction ids and jitter from one seed.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    const OFFERED: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 50);
    const S: fn(u64) -> Duration = Duration::from_secs;

    fn client() -> DhcpClient {
        DhcpClient::new(
            ClientConfig {
                mac: MAC,
                hostname: Some("node-1".into()),
            },
            7,
        )
    }

    fn actions(c: &mut DhcpClient) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    /// The one packet the client wants sent, decoded.
    fn sent(c: &mut DhcpClient) -> (Destination, Message) {
        let a = actions(c);
        assert_eq!(a.len(), 1, "{a:?}");
        match &a[0] {
            Action::Send { to, packet } => (*to, Message::from_bytes(packet).unwrap()),
            other => panic!("expected a send, got {other:?}"),
        }
    }

    fn lease_options() -> Vec<DhcpOption> {
        vec![
            DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)),
            DhcpOption::Router(vec![SERVER]),
            DhcpOption::DomainNameServer(vec![Ipv4Addr::new(10, 77, 0, 53)]),
            DhcpOption::DomainName("keel.test".into()),
            DhcpOption::NtpServers(vec![Ipv4Addr::new(10, 77, 0, 123)]),
            DhcpOption::Hostname("from-lease".into()),
            DhcpOption::AddressLeaseTime(600),
        ]
    }

    /// A server's reply to `req`.
    fn reply(req: &Message, kind: MessageType, yiaddr: Ipv4Addr, opts: Vec<DhcpOption>) -> Vec<u8> {
        let mut m = Message::new_with_id(
            req.xid(),
            Ipv4Addr::UNSPECIFIED,
            yiaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            req.chaddr(),
        );
        m.set_opcode(Opcode::BootReply);
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        m.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        for o in opts {
            m.opts_mut().insert(o);
        }
        m.to_vec().unwrap()
    }

    /// A client bound at t = 10 s (its REQUEST went out at 10 s) to a 600 s lease.
    fn bound() -> DhcpClient {
        let mut c = client();
        c.handle_timeout(S(10));
        let (_, discover) = sent(&mut c);
        let offer = reply(&discover, MessageType::Offer, OFFERED, lease_options());
        c.handle_packet(S(10), &offer).unwrap();
        let (_, request) = sent(&mut c);
        let ack = reply(&request, MessageType::Ack, OFFERED, lease_options());
        c.handle_packet(S(11), &ack).unwrap();
        assert!(matches!(actions(&mut c)[..], [Action::Configure(_)]));
        c
    }

    #[test]
    fn full_handshake() {
        let mut c = client();
        assert_eq!(c.state(), ClientState::Init);
        assert_eq!(c.poll_timeout(), Duration::ZERO);
        c.handle_timeout(S(10));
        assert_eq!(c.state(), ClientState::Selecting);
        let (to, discover) = sent(&mut c);
        assert_eq!(to, Destination::Broadcast);
        assert_eq!(discover.opts().msg_type(), Some(MessageType::Discover));
        assert!(discover.flags().broadcast());
        assert_eq!(discover.chaddr(), MAC);
        assert_eq!(discover.ciaddr(), Ipv4Addr::UNSPECIFIED);
        let Some(DhcpOption::ParameterRequestList(prl)) =
            discover.opts().get(OptionCode::ParameterRequestList)
        else {
            panic!("no parameter request list");
        };
        for code in [
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::DomainName,
            OptionCode::Hostname,
            OptionCode::NtpServers,
        ] {
            assert!(prl.contains(&code), "{code:?} not requested");
        }
        assert_eq!(
            discover.opts().get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("node-1".into()))
        );

        let offer = reply(&discover, MessageType::Offer, OFFERED, lease_options());
        c.handle_packet(S(11), &offer).unwrap();
        assert_eq!(c.state(), ClientState::Requesting);
        let (to, request) = sent(&mut c);
        assert_eq!(to, Destination::Broadcast);
        assert_eq!(request.xid(), discover.xid());
        assert_eq!(request.opts().msg_type(), Some(MessageType::Request));
        assert_eq!(
            request.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(OFFERED))
        );
        assert_eq!(
            request.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SERVER))
        );
        // a second server's late offer changes nothing
        assert!(matches!(
            c.handle_packet(S(11), &offer),
            Err(Ignored::Unexpected { .. })
        ));

        let ack = reply(&request, MessageType::Ack, OFFERED, lease_options());
        c.handle_packet(S(12), &ack).unwrap();
        let expected = Lease {
            address: "10.77.0.50/24".parse().unwrap(),
            router: Some(SERVER),
            dns_servers: vec![Ipv4Addr::new(10, 77, 0, 53)],
            domain: Some("keel.test".into()),
            search: vec![],
            hostname: Some("from-lease".into()),
            ntp_servers: vec![Ipv4Addr::new(10, 77, 0, 123)],
            lease_time: S(600),
            t1: S(300),
            t2: S(525),
            server_id: SERVER,
        };
        assert_eq!(actions(&mut c), vec![Action::Configure(expected.clone())]);
        assert_eq!(c.state(), ClientState::Bound);
        assert_eq!(c.lease(), Some(&expected));
        // the lease counts from the REQUEST's sending, at 11 s
        assert_eq!(c.poll_timeout(), S(11 + 300));
        assert_eq!(
            choose_hostname(None, &expected).as_deref(),
            Some("from-lease")
        );
        assert_eq!(
            choose_hostname(Some("cfg"), &expected).as_deref(),
            Some("cfg")
        );
    }

    #[test]
    fn nak_restarts_with_a_new_discover() {
        let mut c = client();
        c.handle_timeout(S(0));
        let (_, discover) = sent(&mut c);
        let offer = reply(&discover, MessageType::Offer, OFFERED, lease_options());
        c.handle_packet(S(1), &offer).unwrap();
        let (_, request) = sent(&mut c);
        c.handle_packet(
            S(2),
            &reply(&request, MessageType::Nak, Ipv4Addr::UNSPECIFIED, vec![]),
        )
        .unwrap();
        assert_eq!(c.state(), ClientState::Init);
        assert!(actions(&mut c).is_empty());
        assert_eq!(c.poll_timeout(), S(2) + NAK_PAUSE);
        c.handle_timeout(c.poll_timeout());
        let (to, again) = sent(&mut c);
        assert_eq!(to, Destination::Broadcast);
        assert_eq!(again.opts().msg_type(), Some(MessageType::Discover));
        assert_ne!(again.xid(), discover.xid());
    }

    #[test]
    fn no_offer_backs_off_exponentially_with_jitter() {
        for seed in 0..50 {
            let mut c = DhcpClient::new(
                ClientConfig {
                    mac: MAC,
                    hostname: None,
                },
                seed,
            );
            let mut now = S(0);
            c.handle_timeout(now);
            let (_, first) = sent(&mut c);
            for base in [4u64, 8, 16, 32, 64, 64, 64] {
                let wait = c.poll_timeout() - now;
                assert!(
                    wait >= S(base - 1) && wait <= S(base + 1),
                    "seed {seed}: waited {wait:?} for {base} s"
                );
                // nothing happens before its time
                c.handle_timeout(c.poll_timeout() - Duration::from_millis(1));
                assert!(actions(&mut c).is_empty());
                now = c.poll_timeout();
                c.handle_timeout(now);
                let (to, again) = sent(&mut c);
                assert_eq!(to, Destination::Broadcast);
                assert_eq!(again.xid(), first.xid(), "a retransmission keeps its xid");
                assert_eq!(again.secs(), now.as_secs() as u16);
            }
        }
    }

    #[test]
    fn unanswered_request_starts_over() {
        let mut c = client();
        c.handle_timeout(S(0));
        let (_, discover) = sent(&mut c);
        let offer = reply(&discover, MessageType::Offer, OFFERED, lease_options());
        c.handle_packet(S(0), &offer).unwrap();
        let mut requests = 0;
        while c.state() == ClientState::Requesting {
            c.handle_timeout(c.poll_timeout());
            for a in actions(&mut c) {
                let Action::Send { packet, .. } = a else {
                    panic!("{a:?}");
                };
                let m = Message::from_bytes(&packet).unwrap();
                match m.opts().msg_type() {
                    Some(MessageType::Request) => requests += 1,
                    Some(MessageType::Discover) => assert_ne!(m.xid(), discover.xid()),
                    t => panic!("{t:?}"),
                }
            }
        }
        assert_eq!(
            requests, REQUEST_ATTEMPTS,
            "the first and its retransmissions"
        );
        assert_eq!(c.state(), ClientState::Selecting);
    }

    #[test]
    fn renewal_at_t1_is_unicast_and_extends_the_lease() {
        let mut c = bound();
        let lease = c.lease().cloned().unwrap();
        c.handle_timeout(S(10 + 299));
        assert!(actions(&mut c).is_empty());
        c.handle_timeout(S(10 + 300));
        assert_eq!(c.state(), ClientState::Renewing);
        let (to, req) = sent(&mut c);
        assert_eq!(to, Destination::Unicast(SERVER));
        assert_eq!(req.opts().msg_type(), Some(MessageType::Request));
        assert_eq!(req.ciaddr(), OFFERED);
        assert!(!req.flags().broadcast());
        assert!(req.opts().get(OptionCode::RequestedIpAddress).is_none());
        assert!(req.opts().get(OptionCode::ServerIdentifier).is_none());
        let mut opts = lease_options();
        opts.push(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            10, 77, 0, 54,
        )]));
        c.handle_packet(S(311), &reply(&req, MessageType::Ack, OFFERED, opts))
            .unwrap();
        let renewed = Lease {
            dns_servers: vec![Ipv4Addr::new(10, 77, 0, 54)],
            ..lease
        };
        assert_eq!(actions(&mut c), vec![Action::Renewed(renewed)]);
        assert_eq!(c.state(), ClientState::Bound);
        assert_eq!(
            c.poll_timeout(),
            S(310 + 300),
            "counts from the renewal's start"
        );
    }

    #[test]
    fn forced_renewal_and_rebinding() {
        let mut c = bound();
        c.renew(S(20));
        assert_eq!(c.state(), ClientState::Renewing);
        let (to, req) = sent(&mut c);
        assert_eq!(to, Destination::Unicast(SERVER));
        c.handle_packet(
            S(20),
            &reply(&req, MessageType::Ack, OFFERED, lease_options()),
        )
        .unwrap();
        assert!(matches!(actions(&mut c)[..], [Action::Renewed(_)]));
        // and rebinding on demand broadcasts
        c.rebind(S(30));
        assert_eq!(c.state(), ClientState::Rebinding);
        let (to, req) = sent(&mut c);
        assert_eq!((to, req.ciaddr()), (Destination::Broadcast, OFFERED));
        // not bound: nothing to renew or rebind
        let mut fresh = client();
        fresh.renew(S(0));
        fresh.rebind(S(0));
        assert_eq!(fresh.state(), ClientState::Init);
    }

    #[test]
    fn rebinding_at_t2_broadcasts_and_any_server_may_answer() {
        let mut c = bound();
        c.handle_timeout(S(310));
        let _ = sent(&mut c);
        // retransmissions in RENEWING never pass T2 (535 s)
        let mut now = S(310);
        while c.state() == ClientState::Renewing {
            now = c.poll_timeout();
            assert!(now <= S(10 + 525), "{now:?}");
            c.handle_timeout(now);
            let _ = actions(&mut c);
        }
        assert_eq!(now, S(535));
        assert_eq!(c.state(), ClientState::Rebinding);
        c.handle_timeout(now);
        // the REQUEST went out when T2 came
        c.handle_timeout(c.poll_timeout());
        let (to, req) = sent(&mut c);
        assert_eq!(to, Destination::Broadcast);
        assert_eq!(req.ciaddr(), OFFERED);
        let mut ack =
            Message::from_bytes(&reply(&req, MessageType::Ack, OFFERED, lease_options())).unwrap();
        ack.opts_mut()
            .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 77, 0, 2)));
        c.handle_packet(now + S(5), &ack.to_vec().unwrap()).unwrap();
        let a = actions(&mut c);
        let [Action::Renewed(l)] = &a[..] else {
            panic!("{a:?}")
        };
        assert_eq!(l.server_id, Ipv4Addr::new(10, 77, 0, 2));
    }

    #[test]
    fn lease_expiry_drops_the_address_and_starts_over() {
        let mut c = bound();
        let lease = c.lease().cloned().unwrap();
        // nobody answers; time runs to the end of the lease in steps of the client's timers
        let mut dropped = false;
        while !dropped {
            let now = c.poll_timeout();
            assert!(now <= S(10 + 600), "{now:?}");
            c.handle_timeout(now);
            for a in actions(&mut c) {
                if let Action::Deconfigure(l) = a {
                    assert_eq!(l, lease);
                    assert_eq!(now, S(610));
                    dropped = true;
                }
            }
        }
        assert_eq!(
            c.state(),
            ClientState::Selecting,
            "a DISCOVER went out at once"
        );
        assert_eq!(c.lease(), None);
    }

    #[test]
    fn a_late_call_crosses_every_boundary_at_once() {
        let mut c = bound();
        c.handle_timeout(S(100_000));
        let a = actions(&mut c);
        assert!(
            matches!(a[..], [Action::Deconfigure(_), Action::Send { .. }]),
            "{a:?}"
        );
        assert_eq!(c.state(), ClientState::Selecting);
    }

    #[test]
    fn nak_while_renewing_drops_the_lease() {
        let mut c = bound();
        c.renew(S(20));
        let (_, req) = sent(&mut c);
        c.handle_packet(
            S(21),
            &reply(&req, MessageType::Nak, Ipv4Addr::UNSPECIFIED, vec![]),
        )
        .unwrap();
        assert!(matches!(actions(&mut c)[..], [Action::Deconfigure(_)]));
        assert_eq!(c.state(), ClientState::Init);
    }

    #[test]
    fn a_new_address_on_renewal_replaces_the_old() {
        let mut c = bound();
        c.renew(S(20));
        let (_, req) = sent(&mut c);
        let other = Ipv4Addr::new(10, 77, 0, 51);
        c.handle_packet(
            S(21),
            &reply(&req, MessageType::Ack, other, lease_options()),
        )
        .unwrap();
        let a = actions(&mut c);
        assert!(
            matches!(&a[..], [Action::Deconfigure(old), Action::Configure(new)]
                if old.address.addr == OFFERED && new.address.addr == other),
            "{a:?}"
        );
    }

    #[test]
    fn replies_for_others_are_ignored() {
        let mut c = client();
        c.handle_timeout(S(0));
        let (_, discover) = sent(&mut c);
        let mut offer = Message::from_bytes(&reply(
            &discover,
            MessageType::Offer,
            OFFERED,
            lease_options(),
        ))
        .unwrap();
        offer.set_xid(discover.xid().wrapping_add(1));
        assert_eq!(
            c.handle_packet(S(1), &offer.to_vec().unwrap()),
            Err(Ignored::WrongXid {
                ours: discover.xid(),
                got: discover.xid().wrapping_add(1)
            })
        );
        offer.set_xid(discover.xid());
        offer.set_chaddr(&[1, 2, 3, 4, 5, 6]);
        assert!(matches!(
            c.handle_packet(S(1), &offer.to_vec().unwrap()),
            Err(Ignored::OtherClient { .. })
        ));
        // our own request echoed back, an hlen beyond chaddr, a packet without magic
        assert_eq!(
            c.handle_packet(S(1), &discover.to_vec().unwrap()),
            Err(Ignored::NotAReply)
        );
        let mut raw = reply(&discover, MessageType::Offer, OFFERED, lease_options());
        raw[2] = 200;
        assert!(matches!(
            c.handle_packet(S(1), &raw),
            Err(Ignored::OtherClient { htype: 1, .. })
        ));
        raw[2] = 6;
        raw[236] = 0;
        assert!(matches!(
            c.handle_packet(S(1), &raw),
            Err(Ignored::Malformed(_))
        ));
        // an offer of an unusable address, or without a server id
        for (addr, sid) in [(Ipv4Addr::BROADCAST, true), (OFFERED, false)] {
            let mut m =
                Message::from_bytes(&reply(&discover, MessageType::Offer, addr, vec![])).unwrap();
            if !sid {
                m.opts_mut().remove(OptionCode::ServerIdentifier);
            }
            assert!(c.handle_packet(S(1), &m.to_vec().unwrap()).is_err());
        }
        assert_eq!(c.state(), ClientState::Selecting);
        assert!(actions(&mut c).is_empty());
        // bound, with no request out, replies are not waited for
        let mut b = bound();
        let (_, req) = (0, discover);
        assert_eq!(
            b.handle_packet(
                S(30),
                &reply(&req, MessageType::Ack, OFFERED, lease_options())
            ),
            Err(Ignored::NotWaiting(ClientState::Bound))
        );
    }

    #[test]
    fn lease_defaults_and_hostile_names() {
        let mut c = client();
        c.handle_timeout(S(0));
        let (_, d) = sent(&mut c);
        c.handle_packet(S(0), &reply(&d, MessageType::Offer, OFFERED, vec![]))
            .unwrap();
        let (_, r) = sent(&mut c);
        let ack = reply(
            &r,
            MessageType::Ack,
            OFFERED,
            vec![
                DhcpOption::AddressLeaseTime(5),
                DhcpOption::Renewal(100),
                DhcpOption::Rebinding(50),
                DhcpOption::Hostname("evil\nnameserver 6.6.6.6".into()),
                DhcpOption::DomainName("lab.example.\0".into()),
                DhcpOption::DomainNameServer(vec![Ipv4Addr::BROADCAST, Ipv4Addr::new(9, 9, 9, 9)]),
            ],
        );
        c.handle_packet(S(0), &ack).unwrap();
        let l = c.lease().unwrap();
        assert_eq!(l.address.prefix, 8, "class A without a subnet mask");
        assert_eq!(l.lease_time, MIN_LEASE);
        assert_eq!(
            (l.t1, l.t2),
            (MIN_LEASE / 2, MIN_LEASE / 8 * 7),
            "T1 > T2 refused"
        );
        assert_eq!(l.hostname, None);
        assert_eq!(l.domain.as_deref(), Some("lab.example"));
        assert_eq!(l.dns_servers, vec![Ipv4Addr::new(9, 9, 9, 9)]);
        assert_eq!(l.router, None);
    }

    #[test]
    fn ack_without_lease_time_or_with_a_bad_mask_is_ignored() {
        let mut c = client();
        c.handle_timeout(S(0));
        let (_, d) = sent(&mut c);
        c.handle_packet(S(0), &reply(&d, MessageType::Offer, OFFERED, vec![]))
            .unwrap();
        let (_, r) = sent(&mut c);
        let no_time = reply(&r, MessageType::Ack, OFFERED, vec![]);
        assert_eq!(c.handle_packet(S(0), &no_time), Err(Ignored::NoLeaseTime));
        let mask = Ipv4Addr::new(255, 0, 255, 0);
        let bad_mask = reply(
            &r,
            MessageType::Ack,
            OFFERED,
            vec![
                DhcpOption::AddressLeaseTime(60),
                DhcpOption::SubnetMask(mask),
            ],
        );
        assert_eq!(
            c.handle_packet(S(0), &bad_mask),
            Err(Ignored::BadNetmask(mask))
        );
        let wrong = reply(
            &r,
            MessageType::Ack,
            Ipv4Addr::new(10, 77, 0, 9),
            lease_options(),
        );
        assert!(matches!(
            c.handle_packet(S(0), &wrong),
            Err(Ignored::WrongAddress { .. })
        ));
        assert_eq!(c.state(), ClientState::Requesting);
    }

    #[test]
    fn resolv_conf_lists_search_and_at_most_three_servers() {
        let mut l = bound().lease().cloned().unwrap();
        assert_eq!(
            resolv_conf(&l),
            "# written by keel-init from the DHCP lease of 10.77.0.50/24 (server 10.77.0.1)\n\
             search keel.test\n\
             nameserver 10.77.0.53\n"
        );
        l.search = vec!["a.test".into(), "b.test".into()];
        l.dns_servers = (1..=5).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        let text = resolv_conf(&l);
        assert!(text.contains("search a.test b.test\n"), "{text}");
        assert_eq!(text.matches("nameserver").count(), 3, "{text}");
    }

    #[test]
    fn netmask_prefixes() {
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 240, 0)), Some(20));
        assert_eq!(mask_prefix(Ipv4Addr::new(0, 0, 0, 0)), Some(0));
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 0, 0, 255)), None);
    }

    /// A client in each state that waits for replies, with the request it sent.
    fn waiting_clients(seed: u64) -> Vec<(DhcpClient, Message)> {
        let mut out = Vec::new();
        let mut c = DhcpClient::new(
            ClientConfig {
                mac: MAC,
                hostname: None,
            },
            seed,
        );
        c.handle_timeout(S(0));
        let (_, d) = sent(&mut c);
        let mut r = DhcpClient::new(
            ClientConfig {
                mac: MAC,
                hostname: None,
            },
            seed,
        );
        r.handle_timeout(S(0));
        let _ = sent(&mut r);
        r.handle_packet(S(0), &reply(&d, MessageType::Offer, OFFERED, vec![]))
            .unwrap();
        let (_, req) = sent(&mut r);
        out.push((c, d));
        out.push((r, req));
        let mut b = bound();
        b.renew(S(20));
        let (_, renew) = sent(&mut b);
        out.push((b, renew));
        out
    }

    fn arb_options() -> impl Strategy<Value = Vec<u8>> {
        // raw TLVs: any code, a length that may lie, any bytes; with the codes the client reads
        // and those dhcproto asserts on drawn often
        let code = prop_oneof![
            any::<u8>(),
            prop::sample::select(vec![1u8, 3, 6, 12, 15, 42, 51, 53, 54, 58, 59, 119]),
            prop::sample::select(vec![80u8, 81, 94, 151, 152, 153, 154, 155, 82, 121]),
        ];
        prop::collection::vec(
            (code, any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)),
            0..12,
        )
        .prop_map(|opts| {
            let mut b = Vec::new();
            for (code, len, data) in opts {
                b.push(code);
                b.push(len);
                b.extend(data);
            }
            b
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any bytes at all: ignored with a reason or taken, never a panic.
        #[test]
        fn random_bytes_never_panic(seed in any::<u64>(), bytes in prop::collection::vec(any::<u8>(), 0..700)) {
            for (mut c, _) in waiting_clients(seed) {
                let _ = c.handle_packet(S(30), &bytes);
                let _ = c.poll_timeout();
                let _ = actions(&mut c);
            }
        }

        /// Replies with our xid and hardware address but odd options, message types and
        /// addresses: whatever the client takes leaves it in a sound state.
        #[test]
        fn weird_replies_never_panic(
            seed in any::<u64>(),
            yiaddr in any::<u32>(),
            mtype in any::<u8>(),
            opts in arb_options(),
            truncate in any::<u16>(),
        ) {
            for (mut c, req) in waiting_clients(seed) {
                c.handle_timeout(S(30));
                let _ = actions(&mut c);
                let valid = reply(&req, MessageType::Ack, Ipv4Addr::from(yiaddr), vec![]);
                let mut raw = valid[..240].to_vec();
                raw.extend_from_slice(&[53, 1, mtype]);
                raw.extend_from_slice(&opts);
                raw.push(255);
                raw.truncate(usize::from(truncate).max(240));
                let before = c.state();
                match c.handle_packet(S(30), &raw) {
                    Ok(()) => {
                        if let Some(l) = c.lease() {
                            prop_assert!(usable_unicast(l.address.addr));
                            prop_assert!((1..=32).contains(&l.address.prefix));
                            prop_assert!(l.t1 < l.t2 && l.t2 < l.lease_time);
                            prop_assert!(l.lease_time >= MIN_LEASE);
                            let text = resolv_conf(l);
                            prop_assert!(text.lines().all(|x| x.starts_with('#')
                                || x.starts_with("search ") || x.starts_with("nameserver ")));
                        }
                    }
                    Err(_) => prop_assert_eq!(c.state(), before),
                }
                prop_assert!(c.poll_timeout() > S(30), "{:?} {:?}", c.state(), c.poll_timeout());
                let _ = actions(&mut c);
            }
        }
    }
}
